"""Storage on the untrusted host: metadata in SQL, ciphertext in a blob store.

- :mod:`~cape.host.store.metadata`: :class:`MetadataStore` and :class:`SqlMetadataStore`
  (SQLite or PostgreSQL, schema by Alembic);
- :mod:`~cape.host.store.blobs`: :class:`BlobStore` and :class:`DirectoryBlobStore`;
- :mod:`~cape.host.store.deploys`: :func:`commit_deploy` and :func:`sweep_orphans`, which
  keep the two consistent across crashes (DESIGN.md invariant 7).
"""

from __future__ import annotations

from cape.host.store.blobs import BlobStore, DirectoryBlobStore
from cape.host.store.deploys import commit_deploy, sweep_orphans
from cape.host.store.metadata import (
    Function,
    MetadataStore,
    SqlMetadataStore,
    Token,
    User,
)

__all__ = [
    "BlobStore",
    "DirectoryBlobStore",
    "Function",
    "MetadataStore",
    "SqlMetadataStore",
    "Token",
    "User",
    "commit_deploy",
    "sweep_orphans",
]
