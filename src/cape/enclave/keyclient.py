"""The enclave's side of the key service: attested requests over the host's proxy.

A release sends an attestation document whose ``public_key`` is this enclave process's
ephemeral RSA-2048 key (the KMS ``Recipient``). The key service checks the document and answers
with CMS ``CiphertextForRecipient``, which only this process can open. The host relays the
request and the answer but can read neither.

One document serves the releases of :data:`DOCUMENT_REUSE_S` seconds (the key service caches
its verification, so further releases skip the signature and chain checks). Reuse gives the
host nothing: a document only ever unlocks CMS addressed to this process's key. A key whose
policy allows younger documents only refuses a reused one; that refusal is retried once with a
fresh document.

The host cannot forge or replay an answer either: every request carries a fresh challenge and
every answer must carry the key service's signature over request and result, checked against
the identity key the runtime was started with and measured into PCR16
(:mod:`cape.crypto.keyanswers`).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from cape.crypto.cms import open_for_recipient
from cape.crypto.envelope import DEK_SIZE, KeyUnwrapper
from cape.crypto.keyanswers import (
    CHALLENGE_BYTES,
    IDENTITY_PCR,
    identity_measurement,
    load_identity_public_key,
    verify_answer,
)
from cape.crypto.keys import public_key_der
from cape.enclave.lanes import Lanes
from cape.enclave.secure_module.base import SecureModule
from cape.errors import (
    CapeError,
    DecryptionError,
    KeyNotFoundError,
    KeyReleaseDeniedError,
    KeyServiceUnavailableError,
    TransportError,
)

__all__ = ["EnclaveKeyClient"]

KMS_TIMEOUT_S = 30.0
DOCUMENT_REUSE_S = 30.0
"""How long one recipient document serves further releases (well under the default 5-minute
age limit of key policies)."""
_ERRORS: dict[str, type[CapeError]] = {
    "denied": KeyReleaseDeniedError,
    "not_found": KeyNotFoundError,
    "decryption": DecryptionError,
    "unavailable": KeyServiceUnavailableError,
}

Send = Callable[[dict[str, Any]], Awaitable[None]]


class EnclaveKeyClient:
    """Key-service calls from inside the enclave; answers arrive through :meth:`resolve`."""

    def __init__(
        self, module: SecureModule, send: Send, lanes: Lanes | None = None, *, identity: bytes
    ) -> None:
        """``identity``: the key service's raw Ed25519 public key. It is measured here, before
        any document is made: PCR16 is extended with it and locked."""
        self._identity = load_identity_public_key(identity)
        self._setup(module, send, identity_measurement(identity), lanes)

    def _setup(
        self, module: SecureModule, send: Send, measurement: bytes, lanes: Lanes | None
    ) -> None:
        """Measure the key-service configuration into PCR16 (then lock it) and make this
        process's recipient key."""
        module.extend_pcr(IDENTITY_PCR, measurement)
        module.lock_pcr(IDENTITY_PCR)
        self._lanes = lanes or Lanes()
        self._module = module
        self._send = send
        self._recipient_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self._recipient_spki = public_key_der(self._recipient_key)
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._document_lock = threading.Lock()
        self._document: tuple[bytes, float] | None = None  # (document, monotonic time made)

    def resolve(self, message: dict[str, Any]) -> None:
        """Deliver a ``kms_result`` frame to the call waiting for it."""
        future = self._pending.pop(message.get("rid", -1), None)
        if future is None or future.done():
            return
        if "error" in message:
            kind = _ERRORS.get(str(message.get("kind")), CapeError)
            future.set_exception(kind(str(message["error"])))
        else:
            future.set_result((message.get("result"), message.get("sig")))

    def fail_all(self, reason: str) -> None:
        """The channel is gone: every waiting call fails."""
        for future in self._pending.values():
            if not future.done():
                future.set_exception(TransportError(reason))
        self._pending.clear()

    async def _call(self, op: str, owner: str, **arguments: Any) -> Any:
        # At most so many requests in flight, shared fairly across owners (lanes.py).
        async with self._lanes.kms.slot(owner):
            return await self._call_now(op, owner=owner, **arguments)

    async def _call_now(self, op: str, **arguments: Any) -> Any:
        rid = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        request = {"op": op, **arguments, "challenge": os.urandom(CHALLENGE_BYTES)}
        await self._send({"t": "kms", "rid": rid, **request})
        try:
            result, signature = await asyncio.wait_for(future, KMS_TIMEOUT_S)
        except TimeoutError:
            raise TransportError("the key service did not answer in time") from None
        finally:
            self._pending.pop(rid, None)
        verify_answer(self._identity, request, result, signature)
        return result

    def _recipient_document(self, fresh: bool) -> tuple[bytes, bool]:
        """A recipient document and whether it was reused (see the module docstring)."""
        with self._document_lock:
            now = time.monotonic()
            if not fresh and self._document is not None:
                document, made = self._document
                if now - made < DOCUMENT_REUSE_S:
                    return document, True
            document = self._module.attestation(
                public_key=self._recipient_spki, nonce=os.urandom(16)
            )
            self._document = (document, now)
            return document, False

    async def public_key(self, owner: str) -> bytes:
        """The owner's Cape key (DER SPKI), created on first request."""
        result = await self._call("get_public_key", owner, create=True)
        if not isinstance(result, bytes):
            raise CapeError("the key service returned a malformed public key")
        return result

    async def unwrap(self, owner: str, wrapped_key: bytes) -> bytes:
        """Have the key service re-encrypt a DEK to this enclave, and open it here."""
        attestation = self._lanes.attestation
        document, reused = await attestation.run(owner, self._recipient_document, False)
        try:
            cms = await self._call("decrypt", owner, blob=wrapped_key, document=document)
        except KeyReleaseDeniedError:
            if not reused:
                raise
            # Perhaps too old for this key's policy: once more with a fresh document.
            document, _ = await attestation.run(owner, self._recipient_document, True)
            cms = await self._call("decrypt", owner, blob=wrapped_key, document=document)
        if not isinstance(cms, bytes):
            raise CapeError("the key service returned a malformed answer")
        return await attestation.run(owner, self._open, cms)

    def _open(self, cms: bytes) -> bytes:
        return open_for_recipient(cms, self._recipient_key, expected_length=DEK_SIZE)

    def unwrapper_for(self, owner: str, loop: asyncio.AbstractEventLoop) -> KeyUnwrapper:
        """A synchronous :data:`KeyUnwrapper` for envelope code running in a worker thread."""

        def unwrap(wrapped: bytes) -> bytes:
            future = asyncio.run_coroutine_threadsafe(self.unwrap(owner, wrapped), loop)
            return future.result(timeout=KMS_TIMEOUT_S + 5)

        return unwrap
