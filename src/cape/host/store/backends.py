"""Which storage a ``cape serve`` node uses, from URLs: the embedded default or shared ones.

- metadata: ``sqlite:///PATH`` (the default, in the data directory) or
  ``postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB`` (psycopg 3, the ``postgres`` extra);
- blobs: a directory path or ``file://PATH`` (the default: ``DATA_DIR/blobs``), or
  ``s3://BUCKET[/PREFIX]`` (boto3, the ``aws`` extra; ``blob_endpoint_url`` for
  S3-compatible stores).

When either is shared by several nodes, the start-up orphan sweep must spare deploys another
node has in flight: :func:`sweep_age_s` gives the age below which nothing is swept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from cape.errors import CapeError, FormatError
from cape.host.store.blobs import BlobStore, DirectoryBlobStore
from cape.host.store.metadata import SqlMetadataStore

__all__ = [
    "SHARED_SWEEP_AGE_S",
    "check_database_url",
    "is_shared",
    "open_blob_store",
    "open_metadata_store",
    "safe_database_url",
    "sweep_age_s",
]

SHARED_SWEEP_AGE_S: Final = 6 * 3600.0
"""With shared storage, start-up sweeps only orphans older than this (longer than any deploy
takes), so a starting node never removes another node's deploy in flight."""

DATABASE_BACKENDS: Final = frozenset({"sqlite", "postgresql"})


def check_database_url(url: str) -> str:
    """Return ``url`` if SQLAlchemy can parse it and its backend is SQLite or PostgreSQL.

    Raises:
        FormatError: anything else (the message never repeats a password).
    """
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        raise FormatError(
            "database_url: not a database URL (sqlite:///PATH or "
            "postgresql+psycopg://USER:PASSWORD@HOST:PORT/DB)"
        ) from None
    if parsed.get_backend_name() not in DATABASE_BACKENDS:
        raise FormatError(
            f"database_url: {parsed.get_backend_name()!r} is not supported (sqlite or postgresql)"
        )
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        raise FormatError("database_url: use postgresql+psycopg://… (psycopg 3)")
    return url


def safe_database_url(url: str) -> str:
    """``url`` with its password masked (for banners and messages)."""
    return make_url(url).render_as_string(hide_password=True)


def is_shared(database_url: str, blob_url: str) -> bool:
    """Whether other nodes may use the same stores (anything but SQLite + a directory)."""
    return make_url(database_url).get_backend_name() != "sqlite" or blob_url.startswith("s3://")


def sweep_age_s(database_url: str, blob_url: str) -> float:
    """The start-up sweep's age threshold: 0 for a lone node, else :data:`SHARED_SWEEP_AGE_S`."""
    return SHARED_SWEEP_AGE_S if is_shared(database_url, blob_url) else 0.0


def open_blob_store(url: str, *, endpoint_url: str | None = None) -> BlobStore:
    """The blob store a URL names (see the module docstring).

    Raises:
        FormatError: an unsupported scheme or a malformed ``s3://`` URL.
    """
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        from cape.host.store.s3 import S3BlobStore

        return S3BlobStore.from_url(url, endpoint_url=endpoint_url)
    if scheme == "file":
        return DirectoryBlobStore(Path(urlsplit(url).path))
    if scheme:
        raise FormatError(
            f"blob_store: {scheme!r} is not supported (a directory, file:// or s3://)"
        )
    return DirectoryBlobStore(Path(url))


def open_metadata_store(url: str) -> SqlMetadataStore:
    """The metadata store at ``url``, migrated to head (one node at a time on PostgreSQL).

    Raises:
        FormatError: a bad URL, or PostgreSQL without psycopg installed.
        CapeError: the database cannot be reached or refused us (no password in the message).
    """
    check_database_url(url)
    try:
        return SqlMetadataStore(url)
    except ModuleNotFoundError as exc:
        raise FormatError(f"database_url needs {exc.name}: pip install 'cape[postgres]'") from None
    except DBAPIError as exc:
        where = safe_database_url(url)
        reason = " ".join(str(exc.orig).split())[:300]
        raise CapeError(f"database {where}: {reason}") from None
