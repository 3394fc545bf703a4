"""Real enclave processes: the launcher starts the runtime (own network and mount namespaces),
and a client-side harness completes key, deploy, run and test flows over the channel, with
attestation verified exactly as a client would. A runtime with one byte changed gets no key.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cape
from cape.crypto import envelope, hpke, results
from cape.crypto.keys import load_rsa_public_key
from cape.crypto.results import SEALED_ERROR_TEXT
from cape.crypto.session_keys import SessionKeys
from cape.enclave.measure import measure_runtime
from cape.errors import DecryptionError
from cape.formats.attestation import AttestationDocument
from cape.host.launcher import EnclaveConnection, HostSession, expect
from tests.integration.harness import (
    COUNTER,
    ECHO,
    FAILING,
    OWNER,
    Platform,
    attested,
    deploy,
    deploy_async,
    invoke,
    requires_enclaves,
    user_data,
    zip_app,
)

pytestmark = requires_enclaves

RAISES_SECRET = b"def cape_handler(x):\n    raise ValueError(b'secret ' + x)\n"


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    platform = Platform(tmp_path_factory.mktemp("platform"))
    yield platform
    platform.close()


@pytest.fixture(scope="module")
def enclave(platform: Platform) -> Iterator[EnclaveConnection]:
    connection = platform.run(platform.launcher().start())
    yield connection
    platform.run(connection.close())


def test_enclave_reports_measured_pcrs(enclave: EnclaveConnection) -> None:
    measurement = measure_runtime()
    assert enclave.pcrs[0] == measurement.pcr0
    assert enclave.pcrs[2] == measurement.pcr2


def test_key_flow(enclave: EnclaveConnection, platform: Platform) -> None:
    async def flow() -> bytes:
        session, doc = await attested(enclave, platform, "key")
        assert (await session.receive())["t"] == "close"
        return base64.b64decode(user_data(doc)["key"])

    der = platform.run(flow())
    key = load_rsa_public_key(der)
    assert key.key_size == 4096
    assert der == platform.kms.get_public_key(OWNER)
    assert platform.run(flow()) == der  # created once, then reused


def test_deploy_then_run_several_invokes(enclave: EnclaveConnection, platform: Platform) -> None:
    ciphertext, checksum = deploy(enclave, platform, COUNTER)
    assert b"calls" not in ciphertext  # the stored bundle is ciphertext

    async def flow() -> list[bytes]:
        session, doc = await attested(enclave, platform, "run", bundle=ciphertext)
        assert base64.b64decode(user_data(doc)["func_checksum"]).hex() == checksum
        outputs = []
        for data in (b"a", b"b", b"c"):
            outputs.append(expect(await invoke(session, doc, data), "result")["data"])
        await session.close()
        return outputs

    assert platform.run(flow()) == [b"1:a", b"2:b", b"3:c"]
    # A new session starts with fresh state: module-level code runs once per session.
    assert platform.run(flow()) == [b"1:a", b"2:b", b"3:c"]


def test_cape_inputs_are_decrypted_with_the_owners_key(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, ECHO)
    public = load_rsa_public_key(platform.kms.get_public_key(OWNER))
    text_form = envelope.encrypt_text(b"secret input", public).encode()

    async def flow() -> bytes:
        session, doc = await attested(enclave, platform, "run", bundle=ciphertext)
        result = expect(await invoke(session, doc, text_form), "result")["data"]
        await session.close()
        return bytes(result)

    assert platform.run(flow()) == b"secret input"


def test_function_error_keeps_the_session(enclave: EnclaveConnection, platform: Platform) -> None:
    ciphertext, _ = deploy(enclave, platform, FAILING)

    async def flow() -> tuple[dict[str, Any], dict[str, Any]]:
        session, doc = await attested(enclave, platform, "run", bundle=ciphertext)
        failed = await invoke(session, doc, b"boom")
        after = await invoke(session, doc, b"fine")
        await session.close()
        return failed, after

    failed, after = platform.run(flow())
    assert failed["t"] == "error" and not failed["fatal"]
    assert "ValueError" in failed["message"] and "boom" in failed["message"]
    assert expect(after, "result")["data"] == b"fine"


def test_results_sealed_to_the_clients_response_key(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, ECHO)
    response = hpke.generate_keypair()

    async def flow() -> tuple[AttestationDocument, dict[str, Any]]:
        session, doc = await attested(
            enclave, platform, "run", bundle=ciphertext, response_key=response.public_bytes
        )
        result = await invoke(session, doc, b"for my eyes only")
        await session.close()
        return doc, result

    doc, result = platform.run(flow())
    bound = base64.b64decode(user_data(doc)["response_key_sha256"])
    assert bound == hashlib.sha256(response.public_bytes).digest()
    assert result["encrypted"] is True and b"for my eyes only" not in result["data"]
    assert doc.public_key is not None
    channel = SessionKeys.for_client(response, doc.public_key).results
    assert channel.open(0, result["data"]) == b"for my eyes only"
    # Bound to its place in the session and to this session's keys: anything else fails.
    with pytest.raises(DecryptionError):
        channel.open(1, result["data"])
    with pytest.raises(DecryptionError):
        hpke.open(response, result["data"])
    stranger = SessionKeys.derive(
        hpke.generate_keypair().private_key,
        doc.public_key,
        session_public=doc.public_key,
        response_public=response.public_bytes,
    ).results
    with pytest.raises(DecryptionError):
        stranger.open(0, result["data"])


def test_function_errors_are_sealed_when_sealing_is_bound(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, RAISES_SECRET)
    response = hpke.generate_keypair()

    async def flow() -> tuple[AttestationDocument, list[dict[str, Any]]]:
        session, doc = await attested(
            enclave, platform, "run", bundle=ciphertext, response_key=response.public_bytes
        )
        replies = [await invoke(session, doc, b"first"), await invoke(session, doc, b"second")]
        await session.close()
        return doc, replies

    doc, replies = platform.run(flow())
    assert doc.public_key is not None
    channel = SessionKeys.for_client(response, doc.public_key).results
    for sequence, (reply, word) in enumerate(zip(replies, (b"first", b"second"), strict=True)):
        assert reply["t"] == "error" and not reply["fatal"]
        assert reply["message"] == SEALED_ERROR_TEXT and word not in repr(reply).encode()
        details = channel.open(sequence, reply["sealed"], kind=results.ERROR)
        assert b"ValueError" in details and b"secret " + word in details


def test_test_flow_runs_an_unstored_bundle(enclave: EnclaveConnection, platform: Platform) -> None:
    async def flow() -> bytes:
        session, doc = await attested(enclave, platform, "test")
        assert doc.public_key is not None
        await session.send({"t": "bundle", "data": hpke.seal(doc.public_key, zip_app(ECHO))})
        result = expect(await invoke(session, doc, b"tested"), "result")["data"]
        await session.close()
        return bytes(result)

    assert platform.run(flow()) == b"tested"


@pytest.mark.parametrize(
    ("kind", "extra", "words"),
    [
        ("run", {"bundle": b"cape:" + b"\x00" * 600}, "decryption failed"),
        ("run", {}, "stored bundle"),
        ("nonsense", {}, "unknown session kind"),
    ],
)
def test_bad_sessions_get_a_fatal_error_and_the_enclave_keeps_serving(
    enclave: EnclaveConnection, platform: Platform, kind: str, extra: dict[str, Any], words: str
) -> None:
    async def flow() -> dict[str, Any]:
        session = await enclave.open_session(kind, owner=OWNER, nonce=b"n", **extra)
        return await session.receive()

    message = platform.run(flow())
    assert message["t"] == "error" and message["fatal"] and words in message["message"]
    test_key_flow(enclave, platform)


def test_tampered_runtime_gets_no_key(platform: Platform, tmp_path: Path) -> None:
    """Change one byte of the runtime's code: the PCRs change and the key service refuses."""
    ciphertext, _ = deploy_with_fresh_enclave(platform)
    copy = tmp_path / "site"
    shutil.copytree(
        Path(cape.__file__).parent, copy / "cape", ignore=shutil.ignore_patterns("__pycache__")
    )
    target = copy / "cape" / "enclave" / "session.py"
    target.write_bytes(target.read_bytes() + b"\n# one more byte\n")

    async def flow() -> dict[str, Any]:
        tampered = await platform.launcher(extra_env={"PYTHONPATH": str(copy)}).start()
        try:
            assert tampered.pcrs[2] != measure_runtime().pcr2
            session = await tampered.open_session("run", owner=OWNER, nonce=b"n", bundle=ciphertext)
            return await session.receive()
        finally:
            await tampered.close()

    message = platform.run(flow())
    assert message["t"] == "error" and message["fatal"]
    assert "PCR" in message["message"]


def deploy_with_fresh_enclave(platform: Platform) -> tuple[bytes, str]:
    async def start() -> EnclaveConnection:
        return await platform.launcher().start()

    connection = platform.run(start())
    try:
        return deploy(connection, platform, ECHO)
    finally:
        platform.run(connection.close())


SPIN = b"def cape_handler(data):\n    while True:\n        pass\n"


def test_hostile_function_ends_its_session_and_the_enclave_keeps_serving(
    platform: Platform,
) -> None:
    """An infinite loop hits the wall clock: that session gets a fatal error naming the
    limit; the same enclave then serves another session normally."""

    async def flow() -> tuple[dict[str, Any], bytes]:
        enclave = await platform.launcher(runtime_args=["--call-timeout", "2"]).start()
        try:
            spin, _ = await deploy_async(enclave, platform, SPIN)
            session, doc = await attested(enclave, platform, "run", bundle=spin)
            failed = await invoke(session, doc, b"x")
            echo, _ = await deploy_async(enclave, platform, ECHO)
            session, doc = await attested(enclave, platform, "run", bundle=echo)
            ok = expect(await invoke(session, doc, b"still serving"), "result")["data"]
            await session.close()
            return failed, bytes(ok)
        finally:
            await enclave.close()

    failed, ok = platform.run(flow())
    assert failed["t"] == "error" and failed["fatal"]
    assert "time" in failed["message"]
    assert ok == b"still serving"


def test_cached_function_is_not_released_under_another_owner(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    """The warm pool keys functions by owner: a host that relabels alice's bundle as bob's
    does not get to skip the key service."""
    ciphertext, _ = deploy(enclave, platform, ECHO)

    async def flow(owner: str) -> dict[str, Any]:
        session = await enclave.open_session("run", owner=owner, nonce=b"n", bundle=ciphertext)
        message = await session.receive()
        await session.close()
        return message

    assert platform.run(flow(OWNER))["t"] == "attestation"  # cached now
    relabelled = platform.run(flow("bob"))
    assert relabelled["t"] == "error" and relabelled["fatal"]


def test_a_warm_function_runs_by_its_hash_alone(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    """Hash-first runs: the host names the stored ciphertext by SHA-256 and sends the bytes
    only when asked; whatever it sends must match the name."""
    ciphertext, _ = deploy(enclave, platform, COUNTER + b"# hash-first\n")
    digest = hashlib.sha256(ciphertext).digest()

    async def by_hash(send: bytes | None) -> list[dict[str, Any]]:
        nonce = secrets.token_bytes(16)
        session = await enclave.open_session("run", owner=OWNER, nonce=nonce, bundle_sha256=digest)
        frames = [await session.receive()]
        if frames[0]["t"] == "need_bundle" and send is not None:
            await session.send({"t": "bundle", "data": send})
            frames.append(await session.receive())
        if frames[-1]["t"] == "attestation":
            doc = platform.verify(frames[-1]["document"], nonce)
            frames.append(expect(await invoke(session, doc, b"x"), "result"))
        await session.close()
        return frames

    cold = platform.run(by_hash(ciphertext))  # not held yet: the enclave asks for the bytes
    assert [f["t"] for f in cold] == ["need_bundle", "attestation", "result"]
    warm = platform.run(by_hash(None))  # held warm now: no bytes travel
    assert [f["t"] for f in warm] == ["attestation", "result"]
    assert warm[-1]["data"] == b"1:x"  # a fresh sandbox for the session

    other_digest = hashlib.sha256(b"never deployed").digest()

    async def wrong_bytes() -> list[dict[str, Any]]:
        session = await enclave.open_session(
            "run", owner=OWNER, nonce=b"n", bundle_sha256=other_digest
        )
        first = await session.receive()
        await session.send({"t": "bundle", "data": ciphertext})  # not what the hash names
        second = await session.receive()
        await session.close()
        return [first, second]

    asked, refused = platform.run(wrong_bytes())
    assert asked["t"] == "need_bundle"
    assert refused["t"] == "error" and refused["fatal"] and "SHA-256" in refused["message"]

    async def bad_hash() -> dict[str, Any]:
        session = await enclave.open_session("run", owner=OWNER, nonce=b"n", bundle_sha256=b"x")
        reply = await session.receive()
        await session.close()
        return reply

    reply = platform.run(bad_hash())
    assert reply["t"] == "error" and reply["fatal"] and "32 bytes" in reply["message"]


def test_many_concurrent_sessions(enclave: EnclaveConnection, platform: Platform) -> None:
    """Eight sessions at once, interleaving invokes: each keeps its own state and key."""
    ciphertext, _ = deploy(enclave, platform, COUNTER)

    async def one(index: int) -> list[bytes]:
        session, doc = await attested(enclave, platform, "run", bundle=ciphertext)
        outputs = []
        for call in range(3):
            reply = expect(await invoke(session, doc, f"s{index}c{call}".encode()), "result")
            outputs.append(bytes(reply["data"]))
        await session.close()
        return outputs

    async def all_at_once() -> list[list[bytes]]:
        return list(await asyncio.gather(*(one(i) for i in range(8))))

    results = platform.run(all_at_once())
    for index, outputs in enumerate(results):
        assert outputs == [f"{n + 1}:s{index}c{n}".encode() for n in range(3)]


def test_bad_cape_input_fails_that_call_only(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, ECHO)

    async def flow() -> tuple[dict[str, Any], dict[str, Any]]:
        session, doc = await attested(enclave, platform, "run", bundle=ciphertext)
        bad = await invoke(session, doc, b"cape:" + b"A" * 800)
        good = await invoke(session, doc, b"plain")
        await session.close()
        return bad, good

    bad, good = platform.run(flow())
    assert bad["t"] == "error" and not bad["fatal"]
    assert "decryption failed" in bad["message"]
    assert expect(good, "result")["data"] == b"plain"


CAPE_ENCRYPT = b"""import cape_encrypt
def cape_handler(data):
    sealed = cape_encrypt.encrypt(data)
    assert cape_encrypt.decrypt(sealed) == data
    return sealed
"""


def test_functions_encrypt_and_decrypt_with_their_owners_key(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    """cape_encrypt inside the sandbox: what a function encrypts is a normal cape: ciphertext
    for its owner, which another of the owner's functions receives decrypted."""
    sealer, _ = deploy(enclave, platform, CAPE_ENCRYPT)
    echo, _ = deploy(enclave, platform, ECHO)

    async def flow() -> tuple[bytes, bytes]:
        session, doc = await attested(enclave, platform, "run", bundle=sealer)
        sealed = bytes(expect(await invoke(session, doc, b"kept for later"), "result")["data"])
        await session.close()
        session, doc = await attested(enclave, platform, "run", bundle=echo)
        opened = bytes(expect(await invoke(session, doc, sealed), "result")["data"])
        await session.close()
        return sealed, opened

    sealed, opened = platform.run(flow())
    assert sealed.startswith(b"cape:") and b"kept for later" not in sealed
    assert opened == b"kept for later"


async def _sealed_session(
    enclave: EnclaveConnection, platform: Platform, kind: str, **kwargs: Any
) -> tuple[HostSession, AttestationDocument, SessionKeys]:
    """A session opened with a fresh response key and sealed inputs, its verified document and
    the client's keys (the document must confirm sealed inputs)."""
    response = hpke.generate_keypair()
    session, doc = await attested(
        enclave, platform, kind, response_key=response.public_bytes, sealed_inputs=True, **kwargs
    )
    assert user_data(doc)["input_frames"] == "sealed"  # confirmed inside the document
    assert doc.public_key is not None
    return session, doc, SessionKeys.for_client(response, doc.public_key)


def test_sealed_inputs_open_in_order_after_the_documents_confirmation(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, COUNTER)

    async def flow() -> list[bytes]:
        session, _, keys = await _sealed_session(enclave, platform, "run", bundle=ciphertext)
        outputs = []
        for sequence, data in enumerate((b"a", b"b", b"c")):
            await session.send({"t": "input", "data": keys.inputs.seal(sequence, data)})
            reply = expect(await session.receive(), "result")
            outputs.append(keys.results.open(sequence, reply["data"]))
        await session.close()
        return outputs

    assert platform.run(flow()) == [b"1:a", b"2:b", b"3:c"]


def test_a_sealed_test_sessions_bundle_is_input_zero(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    async def flow() -> bytes:
        session, _, keys = await _sealed_session(enclave, platform, "test")
        await session.send({"t": "bundle", "data": keys.inputs.seal(0, zip_app(ECHO))})
        await session.send({"t": "input", "data": keys.inputs.seal(1, b"tested")})
        reply = expect(await session.receive(), "result")
        await session.close()
        return keys.results.open(0, reply["data"])

    assert platform.run(flow()) == b"tested"


# What a host may do to a sealed session's input frames: each must end the session with the
# error an undecryptable input gets today, never reach the function.
HOSTILE_INPUTS: dict[str, Any] = {
    # a host sealing its own input to the attested key (base-mode HPKE lets anyone), or one
    # that set input_frames for a client that seals with HPKE
    "hpke-input": lambda keys, doc: [hpke.seal(doc.public_key, b"injected")],
    "replayed": lambda keys, doc: [keys.inputs.seal(0, b"a")] * 2,
    "reordered": lambda keys, doc: [keys.inputs.seal(1, b"b"), keys.inputs.seal(0, b"a")],
    "dropped-then-later": lambda keys, doc: [keys.inputs.seal(0, b"a"), keys.inputs.seal(2, b"c")],
    "truncated": lambda keys, doc: [keys.inputs.seal(0, b"a")[:-1]],
    "tag-only": lambda keys, doc: [keys.inputs.seal(0, b"a")[:15]],
    "results-key": lambda keys, doc: [keys.results.seal(0, b"a")],
}


def test_a_host_cannot_inject_replay_reorder_or_cut_sealed_inputs(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, COUNTER)

    async def flow(case: str) -> list[dict[str, Any]]:
        session, doc, keys = await _sealed_session(enclave, platform, "run", bundle=ciphertext)
        replies = []
        for frame in HOSTILE_INPUTS[case](keys, doc):
            await session.send({"t": "input", "data": frame})
            replies.append(await session.receive())
            if replies[-1]["t"] != "result":
                break
        await session.close()
        return replies

    for case in HOSTILE_INPUTS:
        *accepted, refused = platform.run(flow(case))
        assert all(reply["t"] == "result" for reply in accepted), case
        assert refused["t"] == "error" and refused["fatal"], case
        assert "decryption failed" in refused["message"] or "shorter" in refused["message"], case
        assert len(accepted) == (1 if case in ("replayed", "dropped-then-later") else 0), case


def test_sealed_inputs_need_a_response_key_and_a_known_form(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    """A host that sets the flag without the client's response key gets a protocol error."""

    async def flow() -> dict[str, Any]:
        session = await enclave.open_session(
            "test", owner=OWNER, nonce=secrets.token_bytes(16), sealed_inputs=True
        )
        return await session.receive()

    reply = platform.run(flow())
    assert reply["t"] == "error" and reply["fatal"] and "response key" in reply["message"]
