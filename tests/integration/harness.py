"""A client-side harness for real enclave processes: the pieces `cape serve` wires together
(simulated authority, key service, launcher), minus the API server, and a client that verifies
attestation exactly as the SDK will."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import io
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cape.crypto import envelope, hpke
from cape.crypto.keys import load_rsa_public_key
from cape.errors import CapeError
from cape.formats.attestation import AttestationDocument
from cape.host.launcher import EnclaveConnection, HostSession, expect
from cape.host.pool import EnclavePool
from cape.platform.local import LocalPlatform
from cape.verify.policy import AttestationPolicy
from cape.verify.verifier import verify_attestation

T = TypeVar("T")
Rewrite = Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]]
OWNER = "alice"
ECHO = b"def cape_handler(data):\n    return data\n"
COUNTER = b"""calls = 0
def cape_handler(data):
    global calls
    calls += 1
    return f'{calls}:'.encode() + data
"""
FAILING = b"""def cape_handler(data):
    if data == b'boom':
        raise ValueError('boom')
    return data
"""


def zip_app(source: bytes, folder: str = "fn") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{folder}/app.py", source)
    return buffer.getvalue()


requires_enclaves = [
    pytest.mark.skipif(os.geteuid() != 0, reason="simulated enclaves need root for namespaces"),
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed"),
]


class Platform(LocalPlatform):
    """The local platform plus an event loop and a client that verifies as the SDK will."""

    def __init__(self, tmp: Path, **options: Any) -> None:
        super().__init__(tmp, master_key=secrets.token_bytes(32), **options)
        self.loop = asyncio.new_event_loop()

    def close(self) -> None:
        super().close()
        self.loop.close()

    def run(self, coro: Awaitable[T]) -> T:
        return self.loop.run_until_complete(coro)

    def verify(self, document: bytes, nonce: bytes) -> AttestationDocument:
        return verify_attestation(
            document,
            root=self.authority.root_certificate,
            now=dt.datetime.now(dt.UTC),
            policy=AttestationPolicy(nonce=nonce),
        )


async def attested(
    enclave: EnclaveConnection, platform: Platform, kind: str, **kwargs: Any
) -> tuple[HostSession, AttestationDocument]:
    nonce = secrets.token_bytes(16)
    session = await enclave.open_session(
        kind, owner=kwargs.pop("owner", OWNER), nonce=nonce, **kwargs
    )
    frame = expect(await session.receive(), "attestation")
    return session, platform.verify(frame["document"], nonce)


def user_data(doc: AttestationDocument) -> dict[str, Any]:
    assert doc.user_data is not None
    parsed: dict[str, Any] = json.loads(doc.user_data)
    return parsed


async def invoke(session: HostSession, doc: AttestationDocument, data: bytes) -> dict[str, Any]:
    assert doc.public_key is not None
    await session.send({"t": "input", "data": hpke.seal(doc.public_key, data)})
    return await session.receive()


async def pool_key_document(
    pool: EnclavePool, platform: Platform, owner: str = OWNER
) -> tuple[dict[int, bytes], bytes]:
    """A key session on ``pool`` for ``owner``, verified: the document's PCRs and the key."""
    nonce = secrets.token_bytes(16)
    async with pool.session("key", owner=owner, nonce=nonce) as session:
        frame = expect(await session.receive(), "attestation")
    document = platform.verify(frame["document"], nonce)
    return dict(document.pcrs), base64.b64decode(user_data(document)["key"])


async def deploy_async(
    enclave: EnclaveConnection, platform: Platform, source: bytes
) -> tuple[bytes, str]:
    """Deploy ``source`` as OWNER's function: returns the stored ciphertext and checksum."""
    if _has_key(platform):
        public = load_rsa_public_key(platform.kms.get_public_key(OWNER))
    else:
        key_session, key_doc = await attested(enclave, platform, "key")
        await key_session.close()
        public = load_rsa_public_key(base64.b64decode(user_data(key_doc)["key"]))
    session, _ = await attested(enclave, platform, "deploy")
    bundle = zip_app(source)
    ciphertext = envelope.encrypt(bundle, public)
    await session.send({"t": "bundle", "data": ciphertext, "name": "echo", "public": False})
    reply = expect(await session.receive(), "deployed")
    assert reply["checksum"] == hashlib.sha256(bundle).hexdigest()
    assert reply["owner"] == OWNER and reply["name"] == "echo"
    return ciphertext, reply["checksum"]


def deploy(enclave: EnclaveConnection, platform: Platform, source: bytes) -> tuple[bytes, str]:
    return platform.run(deploy_async(enclave, platform, source))


def _has_key(platform: Platform) -> bool:
    try:
        platform.kms.get_public_key(OWNER)
    except CapeError:
        return False
    return True


# ---------------------------------------------------------------- a host that rewrites key answers
# test_key_answers.py (the host's own key service) and test_network_key_answers.py (a node
# relaying a network key service) run the same attacks through these.


@dataclass
class AnswerTap:
    """A hostile relay's hand on the key service's answers: it records every (request,
    answer) pair and, while ``rewrite`` is set, hands the enclave the rewritten answer."""

    rewrite: Rewrite | None = None
    seen: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)

    def __call__(self, message: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        self.seen.append((message, reply))
        return reply if self.rewrite is None else self.rewrite(message, reply)

    def honest(self) -> None:
        self.rewrite = None
        self.seen.clear()

    def answer_for(self, owner: str) -> dict[str, Any]:
        """The (signed) answer the key service gave to a request for ``owner``."""
        return next(reply for message, reply in self.seen if message["owner"] == owner)


def substitute_public_key(rogue: bytes) -> Rewrite:
    """Answers a public-key request with ``rogue``, keeping the service's signature."""

    def swap(message: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        return {**reply, "result": rogue} if message["op"] == "get_public_key" else reply

    return swap


async def key_session_error(enclave: EnclaveConnection, owner: str) -> str:
    """The error a key session ends with; fails the test if the enclave attested instead."""
    session = await enclave.open_session("key", owner=owner, nonce=secrets.token_bytes(16))
    try:
        frame = await session.receive()
    finally:
        await session.close()
    assert frame["t"] == "error", f"the enclave attested a substituted key: {frame['t']}"
    return str(frame["message"])
