"""Stored attestation documents for ``GET /v1/user/{username}/key`` (cape-reference.md §3.7).

When a user's Cape key is first needed (at signup), the server opens a ``key`` session with a
random server-side nonce and keeps the document the enclave returns: it binds the user's RSA
public key (``user_data.key``) to the attested runtime. Clients verify it later at the leaf
certificate's notBefore time, since the 3-hour leaf has long expired by then. The host cannot
forge such a document; it can only serve an older genuine one.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

from cape.errors import FormatError
from cape.host.launcher import expect
from cape.host.pool import EnclavePool
from cape.host.store.blobs import DirectoryBlobStore
from cape.host.store.metadata import MetadataStore, User

__all__ = ["KeyDocuments"]

SERVER_NONCE_BYTES = 16


class KeyDocuments:
    """Key documents by user id, in their own directory (not swept with function blobs)."""

    def __init__(self, root: Path, store: MetadataStore) -> None:
        self._blobs = DirectoryBlobStore(root)
        self._store = store
        self._locks: dict[str, asyncio.Lock] = {}

    def get(self, username: str) -> bytes | None:
        """The stored document for ``username``, or ``None``."""
        try:
            user = self._store.get_user_by_name(username)
        except FormatError:
            return None
        if user is None or not self._blobs.exists(user.id):
            return None
        return self._blobs.get(user.id)

    async def ensure(self, user: User, pool: EnclavePool) -> bytes:
        """The user's document, creating their key (and the document) on first use."""
        lock = self._locks.setdefault(user.id, asyncio.Lock())
        async with lock:
            if await asyncio.to_thread(self._blobs.exists, user.id):
                return await asyncio.to_thread(self._blobs.get, user.id)
            nonce = secrets.token_bytes(SERVER_NONCE_BYTES)
            async with pool.session("key", owner=user.username, nonce=nonce) as session:
                document: bytes = expect(await session.receive(), "attestation")["document"]
            await asyncio.to_thread(self._blobs.put, user.id, document)
            return document
