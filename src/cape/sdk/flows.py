"""The session flows: key, deploy, run and test over :class:`~cape.sdk.session.Session`."""

from __future__ import annotations

import base64
import hashlib
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from cape.crypto import envelope
from cape.crypto.keys import load_rsa_public_key
from cape.errors import FormatError
from cape.sdk.session import Session, SessionOptions

__all__ = ["DEPLOY_CHUNK_BYTES", "Deployed", "deploy", "fetch_key", "run_path", "test"]

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


async def fetch_key(url: str, token: str, options: SessionOptions) -> RSAPublicKey:
    """The caller's Cape key from an attested key session (created on first use)."""
    session = await Session.open(url, "/v1/key", token, options)
    try:
        encoded = session.user_data.get("key")
        if not isinstance(encoded, str):
            raise FormatError("the key document carries no key")
        return load_rsa_public_key(base64.b64decode(encoded, validate=True))
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
) -> Deployed:
    """Deploy a zip: attested session, function info, ``cape:`` + raw envelope of the zip."""
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
        view.release()
        del ciphertext
        reply: dict[str, Any] = await session.receive()
    finally:
        await session.wait_closed()
    if reply.get("checksum") != checksum:
        raise FormatError(
            f"the enclave reports checksum {reply.get('checksum')}, but the bundle's is {checksum}"
        )
    return Deployed(id=str(reply["id"]), checksum=checksum, name=str(reply.get("name", name)))


async def test(
    url: str, token: str, options: SessionOptions, bundle: bytes, inputs: list[bytes]
) -> list[bytes]:
    """Run a zip on inputs without storing it: HPKE(zip), then each input."""
    session = await Session.open(url, "/v1/test", token, options)
    try:
        await session.send_sealed(bundle)
        return [await session.invoke(data) for data in inputs]
    finally:
        await session.close()
