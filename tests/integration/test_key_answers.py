"""Key-service answers the host cannot forge (simulated mode, real enclave processes).

The host relays the enclave's key-service calls. A hostile host that substitutes its own RSA
key for a user's Cape key, strips the key service's signature, or replays one user's answer
into another user's request must make the session fail with a clear error, never get its key
attested as the user's. The key service's identity is measured into PCR16, so an enclave
started with another key service's identity is visible in every document it makes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cape.crypto.keyanswers import IDENTITY_PCR, AnswerSigner, identity_pcr
from cape.crypto.keys import generate_cape_key, public_key_der
from cape.host.launcher import EnclaveConnection
from tests.integration.harness import (
    OWNER,
    AnswerTap,
    Platform,
    attested,
    key_session_error,
    requires_enclaves,
    substitute_public_key,
    user_data,
)

pytestmark = requires_enclaves


class HostilePlatform(Platform):
    """The platform with a host that may rewrite key-service answers on their way back."""

    def __init__(self, tmp: Path) -> None:
        super().__init__(tmp)
        self.tap = AnswerTap()

    def _kms(self, message: dict[str, Any]) -> dict[str, Any]:
        return self.tap(message, super()._kms(message))


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostilePlatform]:
    platform = HostilePlatform(tmp_path_factory.mktemp("platform"))
    yield platform
    platform.close()


@pytest.fixture(scope="module")
def enclave(platform: HostilePlatform) -> Iterator[EnclaveConnection]:
    connection = platform.run(platform.launcher().start())
    yield connection
    platform.run(connection.close())


@pytest.fixture(autouse=True)
def _honest_again(platform: HostilePlatform) -> Iterator[None]:
    yield
    platform.tap.honest()


def _key_session_error(platform: HostilePlatform, enclave: EnclaveConnection, owner: str) -> str:
    return platform.run(key_session_error(enclave, owner))


def test_honest_relay_answers_verify(platform: HostilePlatform, enclave: EnclaveConnection) -> None:
    async def flow() -> bytes:
        session, doc = await attested(enclave, platform, "key")
        await session.close()
        return base64.b64decode(user_data(doc)["key"])

    assert platform.run(flow()) == platform.kms.get_public_key(OWNER)
    request, reply = platform.tap.seen[-1]
    assert isinstance(request["challenge"], bytes) and len(request["challenge"]) == 16
    assert isinstance(reply["sig"], bytes)


def test_host_substituting_its_own_public_key_fails_the_session(
    platform: HostilePlatform, enclave: EnclaveConnection
) -> None:
    rogue = public_key_der(generate_cape_key().public_key())

    platform.tap.rewrite = substitute_public_key(rogue)
    error = _key_session_error(platform, enclave, OWNER)
    assert "does not verify against the measured key service identity" in error


def test_host_stripping_the_signature_fails_the_session(
    platform: HostilePlatform, enclave: EnclaveConnection
) -> None:
    rogue = public_key_der(generate_cape_key().public_key())
    platform.tap.rewrite = lambda message, reply: {"result": rogue}
    assert "is not signed" in _key_session_error(platform, enclave, OWNER)


def test_host_signing_with_its_own_identity_fails_the_session(
    platform: HostilePlatform, enclave: EnclaveConnection
) -> None:
    rogue_identity = AnswerSigner.generate()
    rogue = public_key_der(generate_cape_key().public_key())

    def forge(message: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        return {"result": rogue, "sig": rogue_identity.sign(message, rogue)}

    platform.tap.rewrite = forge
    assert "does not verify" in _key_session_error(platform, enclave, OWNER)


def test_host_replaying_another_users_answer_fails_the_session(
    platform: HostilePlatform, enclave: EnclaveConnection
) -> None:
    # The host controls "mallory", a signed-up user: it asks for her key honestly...
    platform.run(attested(enclave, platform, "key", owner="mallory"))
    recorded = platform.tap.answer_for("mallory")
    # ...then answers alice's request with mallory's signed answer, so that alice's clients
    # would encrypt to a key the host's user holds.
    platform.tap.rewrite = lambda message, reply: recorded
    error = _key_session_error(platform, enclave, OWNER)
    assert "does not verify" in error and "'alice'" in error


def test_host_replaying_an_earlier_answer_to_the_same_user_fails(
    platform: HostilePlatform, enclave: EnclaveConnection
) -> None:
    platform.run(attested(enclave, platform, "key"))
    recorded = platform.tap.seen[-1][1]
    platform.tap.rewrite = lambda message, reply: recorded  # the challenge differs now
    assert "does not verify" in _key_session_error(platform, enclave, OWNER)


def test_the_key_service_identity_is_measured_into_pcr16(
    platform: HostilePlatform, enclave: EnclaveConnection
) -> None:
    expected = identity_pcr(platform.identity.public_bytes)
    assert enclave.pcrs[IDENTITY_PCR] == expected
    _, doc = platform.run(attested(enclave, platform, "key"))
    assert doc.pcrs[IDENTITY_PCR] == expected
    assert IDENTITY_PCR in platform.policy.pcrs  # keys are released only to such enclaves


def test_an_enclave_started_with_another_identity_shows_it_in_pcr16(
    platform: HostilePlatform,
) -> None:
    """A host that starts the runtime with its own key-service identity (to sign its own
    answers) changes PCR16 in every document, which the key policy pins, and that enclave
    refuses the real key service's answers."""
    rogue_identity = AnswerSigner.generate()

    async def flow() -> tuple[bytes, dict[str, Any]]:
        enclave = await platform.launcher(
            runtime_args=["--kms-identity", rogue_identity.public_bytes.hex()]
        ).start()
        try:
            session = await enclave.open_session("key", owner=OWNER, nonce=b"n")
            frame = await session.receive()
            await session.close()
            return enclave.pcrs[IDENTITY_PCR], frame
        finally:
            await enclave.close()

    pcr16, frame = platform.run(flow())
    assert pcr16 == identity_pcr(rogue_identity.public_bytes)
    assert pcr16 not in platform.policy.pcrs[IDENTITY_PCR]
    assert frame["t"] == "error" and "does not verify" in frame["message"]
