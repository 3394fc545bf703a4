"""Invariant 1: plaintext code, inputs and outputs never reach the host.

Full flows (key, deploy, run with text-form and stream-form ``cape:`` inputs, test) carry a
canary in the function's code, in every input and in every output. Afterwards the canary is
searched for in every byte that crossed the channel, in the key service's database and every
other file under the host's data directory and the enclave's host-side work directory, and
in everything the enclave and the host logged.
"""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

import pytest

from cape.crypto import envelope, hpke, stream
from cape.crypto.keys import load_rsa_public_key
from cape.crypto.results import ResultChannel
from cape.crypto.session_keys import SessionKeys
from cape.formats.attestation import AttestationDocument
from cape.host.launcher import expect
from tests.integration.harness import OWNER, Platform, attested, invoke, requires_enclaves, zip_app

pytestmark = requires_enclaves


def forms(canary: bytes) -> list[bytes]:
    """The canary as the host could meet it: raw, hex, base64 at each alignment."""
    found = [canary, canary.hex().encode()]
    for shift in range(3):
        encoded = base64.b64encode(b"\x00" * shift + canary)
        found.append(encoded[4 : len(encoded) - 4])
    return found


def _channel(response: hpke.KeyPair, doc: AttestationDocument) -> ResultChannel:
    assert doc.public_key is not None
    return SessionKeys.for_client(response, doc.public_key).results


def test_canary_never_reaches_the_host(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    canary = b"CANARY-" + secrets.token_hex(12).encode()
    (tmp_path / "data").mkdir()
    platform = Platform(tmp_path / "data")
    traffic: list[bytes] = []
    code = b"SECRET = %r\ndef cape_handler(data):\n    return SECRET + b'|' + data\n" % canary

    async def flows() -> list[bytes]:
        enclave = await platform.launcher(
            tap=lambda _direction, frame: traffic.append(frame)
        ).start()
        try:
            key_session, key_doc = await attested(enclave, platform, "key")
            await key_session.close()
            assert key_doc.user_data is not None
            public = load_rsa_public_key(platform.kms.get_public_key(OWNER))

            deploy_session, _ = await attested(enclave, platform, "deploy")
            bundle = envelope.encrypt(zip_app(code), public)
            await deploy_session.send({"t": "bundle", "data": bundle, "name": "c", "public": False})
            expect(await deploy_session.receive(), "deployed")

            response = hpke.generate_keypair()
            run, doc = await attested(
                enclave, platform, "run", bundle=bundle, response_key=response.public_bytes
            )
            outputs = []
            for sequence, data in enumerate(
                (
                    canary,
                    envelope.encrypt_text(canary, public).encode(),
                    stream.encrypt_stream_bytes(canary * 1000, public, chunk_size=1024),
                )
            ):
                sealed = expect(await invoke(run, doc, data), "result")["data"]
                outputs.append(_channel(response, doc).open(sequence, sealed))
            await run.close()

            test_session, test_doc = await attested(
                enclave, platform, "test", response_key=response.public_bytes
            )
            assert test_doc.public_key is not None
            sealed_zip = hpke.seal(test_doc.public_key, zip_app(code))
            await test_session.send({"t": "bundle", "data": sealed_zip})
            sealed = expect(await invoke(test_session, test_doc, canary), "result")["data"]
            outputs.append(_channel(response, test_doc).open(0, sealed))
            await test_session.close()
            return outputs
        finally:
            await enclave.close()

    try:
        outputs = platform.run(flows())
    finally:
        platform.close()
    # The flows really carried the canary end to end...
    assert all(canary in output for output in outputs)
    assert outputs[2].count(canary) == 1001
    # ...and none of it is visible on the host side.
    captured = capfd.readouterr()
    logs = (captured.out + captured.err).encode()
    files = [p for p in (tmp_path).rglob("*") if p.is_file()]
    assert any(p.name == "kms.sqlite3" for p in files)
    for needle in forms(canary):
        for index, frame in enumerate(traffic):
            assert needle not in frame, f"canary in channel frame {index}"
        for path in files:
            assert needle not in path.read_bytes(), f"canary in {path}"
        assert needle not in logs
    assert len(traffic) > 10
