"""A session's reads on the event loop, for a SQLite metadata store (issue 16).

A session's start reads its token record, its user and, for a run, its function. Handed to a
worker thread, those three reads (≈ 0.1 ms together) cost a thread trip and the GIL's
hand-offs on top: ≈ 0.46 ms of the server's ≈ 5.4 ms of CPU per run at 16 clients on two busy
cores (`benchmarks/README.md`, "The server's CPU per session, again"). With SQLite in WAL
mode a reader never waits for a writer, so the same reads can run on the loop, if nothing
else can make them wait.

:func:`loop_reads` gives, for a file-backed SQLite store only, a :class:`LoopReads`: the
store's own read methods (the same statements, the same rows: nothing is remembered between
reads, so a deleted token or function is refused at once) on one connection of its own that

- never waits for a lock: ``busy_timeout`` 0, so a read that would wait raises
  :class:`ReadWouldWait` at once, and the caller makes it in a worker thread instead, on the
  store's own connections (whose wait is as before);
- never writes: ``query_only``, and the store's write path (its ORM session) raises;
- sees every commit: each read is its own transaction (the connection is returned after each,
  as the store's own reads do).

What can still make such a read wait is the disk: a page of the (small, hot) metadata database
missing from the page cache. PostgreSQL (network round trips), an in-memory database (one
connection, shared with the store) and any other store get ``None``: every read in a thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Row, Select, create_engine, event
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from cape.errors import CapeError
from cape.host.store.metadata import MetadataStore, SqlMetadataStore

__all__ = ["LoopReads", "ReadWouldWait", "loop_reads"]


class ReadWouldWait(CapeError):
    """A read on the loop would have waited (a lock) or failed: make it in a worker thread."""


def _never_wait(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA busy_timeout=0")
        cursor.execute("PRAGMA query_only=1")
    finally:
        cursor.close()


class LoopReads(SqlMetadataStore):
    """The reads of a SQLite :class:`SqlMetadataStore` on a connection that never waits (see
    the module docstring). Only its ``get_*`` and ``resolve_*`` reads made of one statement
    are meant for it; anything that would write raises ``RuntimeError``."""

    def __init__(self, store: SqlMetadataStore) -> None:  # no migrations: the store's database
        self._clock = store._clock
        self.is_sqlite = True
        url = store._engine.url
        self._engine = create_engine(
            url, poolclass=StaticPool, connect_args={"check_same_thread": False}
        )
        self._readers = []
        event.listen(self._engine, "connect", _never_wait)

    def _one(self, statement: Select[Any], **params: str) -> Row[Any] | None:
        try:
            return super()._one(statement, **params)
        except DBAPIError as exc:  # locked, busy, or anything else: the thread path decides
            raise ReadWouldWait(f"a read on the loop would wait: {exc.orig}") from None

    @contextmanager
    def _session(self) -> Iterator[Session]:
        raise RuntimeError("the loop's reads never write nor use an ORM session")
        yield  # pragma: no cover - a generator for contextmanager

    def migrate(self) -> None:
        raise RuntimeError("the loop's reads never migrate")


def loop_reads(store: MetadataStore) -> LoopReads | None:
    """Reads on the loop for ``store`` when it is a file-backed SQLite store, else ``None``."""
    if not isinstance(store, SqlMetadataStore) or not store.is_sqlite:
        return None
    database = store._engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    reads = LoopReads(store)
    store._readers.append(reads)  # closed with the store
    return reads
