"""Deploys that survive crashes: the blob, then the row (DESIGN.md invariant 7).

A deploy is acknowledged when :func:`commit_deploy` returns, and only then may the API answer
the client with the id. The order makes every crash point safe:

1. the ciphertext goes to a temp file, is fsynced and renamed under a fresh key (durable,
   atomic: the key holds all of it or does not exist);
2. the function row is inserted in one transaction (SQLite ``synchronous=FULL``: durable
   on commit) — this is the commit point: the function exists exactly when its row does;
3. if the insert fails, the blob is deleted.

A crash before 2 commits leaves at worst a temp file or a blob no row names; it was never
acknowledged, and :func:`sweep_orphans` removes it at the next start. A row never exists
without its blob, because the blob is durable before the row is written; deleting a function
removes the row first and the blob second, so a crash there also leaves only an orphan blob.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import BinaryIO

from cape.host.errors import NotFoundError
from cape.host.ids import new_id
from cape.host.store.blobs import BlobStore
from cape.host.store.metadata import (
    Function,
    MetadataStore,
    User,
    check_checksum,
    check_function_name,
)

__all__ = ["commit_deploy", "delete_deploy", "record_deploy", "sweep_orphans"]


def commit_deploy(
    metadata: MetadataStore,
    blobs: BlobStore,
    *,
    owner: User,
    name: str,
    checksum: str,
    public: bool,
    ciphertext_chunks: Iterable[bytes] | BinaryIO,
    max_bytes: int | None = None,
) -> Function:
    """Store a deployed function's ciphertext and metadata; return it once durable.

    ``checksum`` is the SHA-256 (hex) of the plaintext bundle, computed inside the enclave;
    the host stores it without being able to check it.

    Raises:
        FormatError: bad function name or checksum (checked before anything is written).
        LimitExceededError: the ciphertext exceeds ``max_bytes``.
        NotFoundError: the owner no longer exists.
    """
    name = check_function_name(name)
    checksum = check_checksum(checksum)
    blob_key = new_id()
    size = blobs.put_stream(blob_key, ciphertext_chunks, max_bytes=max_bytes)
    return record_deploy(
        metadata,
        blobs,
        owner=owner,
        name=name,
        checksum=checksum,
        public=public,
        blob_key=blob_key,
        size=size,
    )


def record_deploy(
    metadata: MetadataStore,
    blobs: BlobStore,
    *,
    owner: User,
    name: str,
    checksum: str,
    public: bool,
    blob_key: str,
    size: int,
) -> Function:
    """The second half of a deploy whose blob is already durable under ``blob_key``: add the
    row, or remove the blob if the row cannot be added (a crash in between leaves an orphan
    that :func:`sweep_orphans` removes)."""
    try:
        return metadata.add_function(
            owner_id=owner.id,
            name=check_function_name(name),
            checksum=check_checksum(checksum),
            public=public,
            blob_key=blob_key,
            size=size,
        )
    except BaseException:
        # The row did not commit: the deploy did not happen.
        with contextlib.suppress(OSError):
            blobs.delete(blob_key)
        raise


def delete_deploy(metadata: MetadataStore, blobs: BlobStore, function_id: str) -> Function | None:
    """Delete a function: its row (and scoped tokens) first, then its blob.

    Returns the deleted record, or ``None`` if there was none. Authorization is the caller's.
    """
    deleted = metadata.delete_function(function_id)
    if deleted is not None:
        with contextlib.suppress(OSError):
            blobs.delete(deleted.blob_key)
    return deleted


def sweep_orphans(metadata: MetadataStore, blobs: BlobStore, *, min_age_s: float = 0.0) -> int:
    """Remove blobs that no function row references, and unfinished temp files.

    Run it at startup, before serving: with the default ``min_age_s`` it would also remove a
    deploy in flight (blob written, row not yet committed). A periodic sweep while serving
    must pass a ``min_age_s`` longer than any deploy takes.

    Returns the number of blobs and temp files removed.
    """
    removed = blobs.sweep_temp(min_age_s=min_age_s)
    referenced = metadata.all_blob_keys()
    cutoff = time.time() - min_age_s
    for key in list(blobs.keys()):
        if key in referenced:
            continue
        if min_age_s > 0:
            try:
                if blobs.modified_at(key) > cutoff:
                    continue
            except NotFoundError:
                continue
        if blobs.delete(key):
            removed += 1
    return removed
