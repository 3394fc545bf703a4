"""The session flows: key, deploy, run and test over :class:`~cape.sdk.session.Session`."""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from cape.crypto import envelope
from cape.crypto.keys import load_rsa_public_key
from cape.errors import FormatError, VerificationError
from cape.sdk.session import Session, SessionOptions

__all__ = [
    "DEPLOY_CHUNK_BYTES",
    "Deployed",
    "deploy",
    "fetch_key",
    "key_from_user_data",
    "run_path",
    "test",
]

DEPLOY_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class Deployed:
    id: str
    checksum: str
    name: str


def run_path(function: str) -> str:
    """``/v1/run/<id>`` or ``/v1/run/<user>/<name>``."""
    if function.count("/") == 1 and all(function.split("/")):
        return f"/v1/run/{function}"
    if "/" in function or not function:
        raise FormatError("a function is an id or 'user/name'")
    return f"/v1/run/{function}"


def key_from_user_data(user_data: dict[str, Any], owner: str | None) -> RSAPublicKey:
    """The RSA Cape key an attested document carries, checked to belong to ``owner``."""
    encoded = user_data.get("key")
    if not isinstance(encoded, str):
        raise FormatError("the key document carries no key")
    if owner is not None and user_data.get("owner") != owner:
        raise VerificationError(
            f"the key document is for {user_data.get('owner')!r}, not {owner!r}; refusing it"
        )
    try:
        der = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError("the key in the key document is not valid base64") from None
    return load_rsa_public_key(der)


async def fetch_key(
    url: str, token: str, options: SessionOptions, *, owner: str | None = None
) -> RSAPublicKey:
    """The caller's Cape key from an attested key session (created on first use).

    With ``owner``, the document must say the key is that account's.
    """
    session = await Session.open(url, "/v1/key", token, options)
    try:
        return key_from_user_data(session.user_data, owner)
    finally:
        await session.wait_closed()


async def deploy(
    url: str,
    token: str,
    options: SessionOptions,
    bundle: bytes,
    *,
    name: str,
    public: bool = False,
    key: RSAPublicKey,
    progress: Callable[[int, int], None] | None = None,
) -> Deployed:
    """Deploy a zip: attested session, function info, ``cape:`` + raw envelope of the zip.

    ``progress(sent, total)`` is called after each chunk of the upload.
    """
    checksum = hashlib.sha256(bundle).hexdigest()
    ciphertext = envelope.encrypt(bundle, key)
    session = await Session.open(url, "/v1/deploy", token, options)
    try:
        # Our extension: announce the size and send chunks, so the server never holds the
        # whole bundle (Cape's clients send one binary frame; the server takes both).
        await session.send_json(
            {"function_name": name, "public": public, "bundle_size": len(ciphertext)}
        )
        view = memoryview(ciphertext)
        for start in range(0, len(view), DEPLOY_CHUNK_BYTES):
            await session.send_bytes(view[start : start + DEPLOY_CHUNK_BYTES])
            if progress is not None:
                progress(min(start + DEPLOY_CHUNK_BYTES, len(view)), len(view))
        view.release()
        del ciphertext
        reply: dict[str, Any] = await session.receive()
    finally:
        await session.wait_closed()
    if reply.get("checksum") != checksum:
        raise FormatError(
            f"the enclave reports checksum {reply.get('checksum')}, but the bundle's is {checksum}"
        )
    if not isinstance(reply.get("id"), str):
        raise FormatError("the deploy reply carries no function id")
    return Deployed(id=reply["id"], checksum=checksum, name=str(reply.get("name", name)))


async def test(
    url: str, token: str, options: SessionOptions, bundle: bytes, inputs: list[bytes]
) -> list[bytes]:
    """Run a zip on inputs without storing it: the sealed zip (input 0 of a session with sealed
    inputs, else HPKE), then each input."""
    session = await Session.open(url, "/v1/test", token, options)
    try:
        await session.send_sealed(bundle)
        return [await session.invoke(data) for data in inputs]
    finally:
        await session.close()
