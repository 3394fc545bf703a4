"""Sealing (ours, issue 16) against the real enclave runtime: with ``"sealing": "aes-256-gcm"``
in the open frame (and the client's response key) the document confirms the suite in its
``user_data`` and both sealed channels run under AES-256-GCM with the v2 keys; v1 keys open
nothing of such a session, a session that did not ask stays v1 and confirms nothing, and a host
cannot move the session's inputs between the suites."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from cape.crypto import hpke, results
from cape.crypto.session_keys import AES_256_GCM, CHACHA20_POLY1305, Sealing, SessionKeys
from cape.errors import DecryptionError
from cape.formats.attestation import AttestationDocument
from cape.host.launcher import EnclaveConnection, HostSession, expect
from tests.integration.harness import (
    COUNTER,
    FAILING,
    OWNER,
    Platform,
    attested,
    deploy,
    requires_enclaves,
    user_data,
    zip_app,
)

pytestmark = requires_enclaves


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


async def _session(
    enclave: EnclaveConnection, platform: Platform, kind: str, sealing: Sealing, **kwargs: Any
) -> tuple[HostSession, AttestationDocument, SessionKeys, hpke.KeyPair]:
    """A session with sealed inputs, asking for ``sealing`` unless it is v1 (the default)."""
    response = hpke.generate_keypair()
    if sealing is not CHACHA20_POLY1305:
        kwargs["sealing"] = sealing.name
    session, doc = await attested(
        enclave, platform, kind, response_key=response.public_bytes, sealed_inputs=True, **kwargs
    )
    assert doc.public_key is not None
    return session, doc, SessionKeys.for_client(response, doc.public_key, sealing), response


def test_the_document_confirms_aes_and_both_channels_use_it(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, COUNTER)

    async def flow() -> tuple[AttestationDocument, list[bytes], hpke.KeyPair]:
        session, doc, keys, response = await _session(
            enclave, platform, "run", AES_256_GCM, bundle=ciphertext
        )
        sealed = []
        for sequence, data in enumerate((b"a", b"b" * 100_000)):
            await session.send({"t": "input", "data": keys.inputs.seal(sequence, data)})
            sealed.append(bytes(expect(await session.receive(), "result")["data"]))
        await session.close()
        return doc, sealed, response

    doc, sealed, response = platform.run(flow())
    assert user_data(doc)["sealing"] == "aes-256-gcm"  # confirmed inside the document
    assert doc.public_key is not None
    v2 = SessionKeys.for_client(response, doc.public_key, AES_256_GCM).results
    assert v2.open(0, sealed[0]) == b"1:a"
    assert v2.open(1, sealed[1]) == b"2:" + b"b" * 100_000
    v1 = SessionKeys.for_client(response, doc.public_key, CHACHA20_POLY1305).results
    with pytest.raises(DecryptionError):  # the same agreement's v1 key opens nothing of it
        v1.open(0, sealed[0])


def test_without_the_request_the_session_stays_v1(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    """What an older SDK (and every session before this change) gets: no confirmation,
    ChaCha20-Poly1305 under the v1 keys."""
    ciphertext, _ = deploy(enclave, platform, COUNTER)

    async def flow() -> tuple[AttestationDocument, bytes, SessionKeys]:
        session, doc, keys, _ = await _session(
            enclave, platform, "run", CHACHA20_POLY1305, bundle=ciphertext
        )
        await session.send({"t": "input", "data": keys.inputs.seal(0, b"a")})
        reply = bytes(expect(await session.receive(), "result")["data"])
        await session.close()
        return doc, reply, keys

    doc, reply, keys = platform.run(flow())
    assert "sealing" not in user_data(doc)
    assert keys.results.open(0, reply) == b"1:a"


def test_function_errors_are_sealed_under_aes(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    ciphertext, _ = deploy(enclave, platform, FAILING)

    async def flow() -> tuple[dict[str, Any], SessionKeys]:
        session, _, keys, _ = await _session(
            enclave, platform, "run", AES_256_GCM, bundle=ciphertext
        )
        await session.send({"t": "input", "data": keys.inputs.seal(0, b"boom")})
        reply = await session.receive()
        await session.close()
        return reply, keys

    reply, keys = platform.run(flow())
    assert reply["t"] == "error" and not reply["fatal"]
    assert b"boom" in keys.results.open(0, reply["sealed"], kind=results.ERROR)


def test_a_test_sessions_bundle_is_aes_input_zero(
    enclave: EnclaveConnection, platform: Platform
) -> None:
    async def flow() -> bytes:
        session, _, keys, _ = await _session(enclave, platform, "test", AES_256_GCM)
        await session.send({"t": "bundle", "data": keys.inputs.seal(0, zip_app(COUNTER))})
        await session.send({"t": "input", "data": keys.inputs.seal(1, b"tested")})
        reply = expect(await session.receive(), "result")
        await session.close()
        return keys.results.open(0, reply["data"])

    assert platform.run(flow()) == b"1:tested"


@pytest.mark.parametrize(
    "case", ["v1-input-in-a-v2-session", "v2-input-in-a-v1-session", "replayed", "cut"]
)
def test_a_host_cannot_move_inputs_between_suites_or_replay_them(
    enclave: EnclaveConnection, platform: Platform, case: str
) -> None:
    """Each ends the session as an undecryptable input does (fatal), never reaching the
    function; the host can also neither replay nor cut an AES-sealed input."""
    ciphertext, _ = deploy(enclave, platform, COUNTER)
    asked = CHACHA20_POLY1305 if case == "v2-input-in-a-v1-session" else AES_256_GCM

    async def flow() -> list[dict[str, Any]]:
        session, doc, keys, response = await _session(
            enclave, platform, "run", asked, bundle=ciphertext
        )
        assert doc.public_key is not None
        other = AES_256_GCM if asked is CHACHA20_POLY1305 else CHACHA20_POLY1305
        moved = SessionKeys.for_client(response, doc.public_key, other)
        frames = {
            "v1-input-in-a-v2-session": [moved.inputs.seal(0, b"a")],
            "v2-input-in-a-v1-session": [moved.inputs.seal(0, b"a")],
            "replayed": [keys.inputs.seal(0, b"a")] * 2,
            "cut": [keys.inputs.seal(0, b"a")[:-1]],
        }[case]
        replies = []
        for frame in frames:
            await session.send({"t": "input", "data": frame})
            replies.append(await session.receive())
            if replies[-1]["t"] != "result":
                break
        await session.close()
        return replies

    *accepted, refused = platform.run(flow())
    assert all(reply["t"] == "result" for reply in accepted)
    assert len(accepted) == (1 if case == "replayed" else 0)
    assert refused["t"] == "error" and refused["fatal"]
    assert "decryption failed" in refused["message"]


def test_sealing_needs_a_response_key(enclave: EnclaveConnection, platform: Platform) -> None:
    """A host that asks for a suite without the client's response key gets a protocol error."""

    async def flow() -> dict[str, Any]:
        session = await enclave.open_session(
            "run", owner=OWNER, nonce=secrets.token_bytes(16), sealing="aes-256-gcm"
        )
        return await session.receive()

    reply = platform.run(flow())
    assert reply["t"] == "error" and reply["fatal"] and "response key" in reply["message"]
