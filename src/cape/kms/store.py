"""Where the built-in key service keeps its rows: SQLite, or PostgreSQL for ``cape kms serve``.

Two tables, the same on both (see :mod:`cape.kms.local` for what the columns hold and how every
row is sealed under the master key)::

    keys(owner PRIMARY KEY, key_id UNIQUE, public_der, wrapped_private, policy_json, created_at)
    key_log(id, at, actor, action, owner, key_id, old_policy_json, new_policy_json, reason)

A :class:`KeyRows` is not thread-safe; :class:`~cape.kms.local.LocalKeyService` serializes its
calls. Each backend reports a :meth:`~KeyRows.data_version` that changes when another process
changes rows (``cape kms rebind``), so the service drops its cache of opened rows.

- SQLite (a path, or ``sqlite:///PATH``): WAL, ``synchronous=FULL``, the schema version in
  ``PRAGMA user_version``; ``data_version`` is SQLite's own.
- PostgreSQL (``postgresql+psycopg://…``, psycopg 3, the ``postgres`` extra): the schema made
  under an advisory lock (services starting together), its version in ``kms_schema``;
  ``data_version`` is the newest ``key_log`` id (rows change only by rebinds, which log).
  A lost connection is reopened on the next call.
"""

from __future__ import annotations

import abc
import os
import sqlite3
from pathlib import Path
from typing import Any, Final

from cape.errors import FormatError
from cape.kms.base import KeyStoreError

__all__ = ["SCHEMA_VERSION", "KeyRows", "open_key_rows", "safe_location"]

SCHEMA_VERSION: Final = 2
_BUSY_TIMEOUT_S: Final = 30.0
_PG_LOCK: Final = 0x6B6D735F63617065  # pg_advisory_xact_lock key: "kms_cape"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    owner TEXT PRIMARY KEY NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    public_der BLOB NOT NULL,
    wrapped_private BLOB NOT NULL,
    policy_json TEXT NOT NULL,
    created_at TEXT NOT NULL
)
"""
_LOG_SCHEMA = """
CREATE TABLE IF NOT EXISTS key_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    owner TEXT NOT NULL,
    key_id TEXT NOT NULL,
    old_policy_json TEXT NOT NULL,
    new_policy_json TEXT NOT NULL,
    reason TEXT NOT NULL
)
"""
COLUMNS: Final = "owner, key_id, public_der, wrapped_private, policy_json, created_at"
LOG_COLUMNS: Final = "at, actor, action, owner, key_id, old_policy_json, new_policy_json, reason"

Row = tuple[Any, ...]


class KeyRows(abc.ABC):
    """The key service's two tables (see the module docstring)."""

    @abc.abstractmethod
    def data_version(self) -> object:
        """Changes whenever another connection changed rows."""

    @abc.abstractmethod
    def select(self, owner: str) -> Row | None:
        """The ``keys`` row of ``owner`` (:data:`COLUMNS` order), or ``None``."""

    @abc.abstractmethod
    def insert(self, row: Row) -> bool:
        """Insert a ``keys`` row unless the owner has one; whether it was inserted."""

    @abc.abstractmethod
    def owners(self) -> list[str]:
        """Every owner with a key, sorted."""

    @abc.abstractmethod
    def rebind(
        self, owner: str, key_id: str, old_policy: str, wrapped: bytes, new_policy: str, log: Row
    ) -> bool:
        """In one transaction: change the row if its policy is still ``old_policy``, and add
        the ``key_log`` row ``log`` (:data:`LOG_COLUMNS` order). False (nothing changed) when
        the row changed meanwhile."""

    @abc.abstractmethod
    def log(self) -> list[Row]:
        """The ``key_log`` rows, oldest first."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise :class:`KeyStoreError` when the database does not answer."""

    @abc.abstractmethod
    def close(self) -> None: ...


def safe_location(location: Path | str) -> str:
    """The database's path or URL without a password (for messages)."""
    text = str(location)
    if "://" in text and "@" in text:
        scheme, rest = text.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}" if ":" in credentials else text
    return text


def open_key_rows(location: Path | str) -> KeyRows:
    """A path or ``sqlite:///PATH`` (SQLite), or ``postgresql+psycopg://…``.

    Raises:
        KeyStoreError: the database cannot be opened, or has a newer schema.
        FormatError: a URL of another kind.
    """
    if isinstance(location, Path) or "://" not in location:
        return _SqliteRows(Path(location))
    if location.startswith("sqlite:///"):
        return _SqliteRows(Path(location.removeprefix("sqlite:///")))
    if location.startswith(("postgresql+psycopg://", "postgresql://")):
        return _PostgresRows(location)
    raise FormatError("the key database must be sqlite:///PATH or postgresql+psycopg://…")


class _SqliteRows(KeyRows):
    def __init__(self, path: Path) -> None:
        self._path = path
        if not path.exists():
            # SQLite gives the -wal and -shm files the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600))
        db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S
        )
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("BEGIN IMMEDIATE")
            try:
                (version,) = db.execute("PRAGMA user_version").fetchone()
                _check_version(version, str(path))
                if version < SCHEMA_VERSION:
                    db.execute(_SCHEMA)
                    db.execute(_LOG_SCHEMA)
                    db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        except sqlite3.DatabaseError as exc:
            db.close()
            raise KeyStoreError(f"cannot open the key database {path}: {exc}") from None
        except BaseException:
            db.close()
            raise
        self._db = db

    def data_version(self) -> object:
        # SQLite bumps data_version on every commit made through another connection.
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        return version

    def select(self, owner: str) -> Row | None:
        row: Row | None = self._db.execute(
            f"SELECT {COLUMNS} FROM keys WHERE owner = ?",  # noqa: S608 - constant
            (owner,),
        ).fetchone()
        return row

    def insert(self, row: Row) -> bool:
        return bool(
            self._db.execute(
                f"INSERT OR IGNORE INTO keys ({COLUMNS}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                row,
            ).rowcount
        )

    def owners(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT owner FROM keys ORDER BY owner")]

    def rebind(
        self, owner: str, key_id: str, old_policy: str, wrapped: bytes, new_policy: str, log: Row
    ) -> bool:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            changed = self._db.execute(
                "UPDATE keys SET wrapped_private = ?, policy_json = ? "
                "WHERE owner = ? AND key_id = ? AND policy_json = ?",
                (wrapped, new_policy, owner, key_id, old_policy),
            ).rowcount
            if changed != 1:
                self._db.execute("ROLLBACK")
                return False
            self._db.execute(
                f"INSERT INTO key_log ({LOG_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                log,
            )
            self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise
        return True

    def log(self) -> list[Row]:
        return self._db.execute(
            f"SELECT {LOG_COLUMNS} FROM key_log ORDER BY id"  # noqa: S608 - constant
        ).fetchall()

    def ping(self) -> None:
        try:
            self._db.execute("SELECT 1").fetchone()
        except sqlite3.Error as exc:
            raise KeyStoreError(f"the key database does not answer: {exc}") from None

    def close(self) -> None:
        self._db.close()


def _check_version(version: int, where: str) -> None:
    if version > SCHEMA_VERSION:
        raise KeyStoreError(
            f"the key database {where} has schema version {version}; this cape knows only up "
            f"to {SCHEMA_VERSION}"
        )


_PG_SCHEMA: Final = (
    "CREATE TABLE IF NOT EXISTS kms_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS keys (
        owner TEXT PRIMARY KEY NOT NULL,
        key_id TEXT NOT NULL UNIQUE,
        public_der BYTEA NOT NULL,
        wrapped_private BYTEA NOT NULL,
        policy_json TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS key_log (
        id BIGSERIAL PRIMARY KEY,
        at TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        owner TEXT NOT NULL,
        key_id TEXT NOT NULL,
        old_policy_json TEXT NOT NULL,
        new_policy_json TEXT NOT NULL,
        reason TEXT NOT NULL
    )""",
)


class _PostgresRows(KeyRows):
    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise FormatError(
                "a PostgreSQL key database needs psycopg: pip install 'cape[postgres]'"
            ) from None
        self._psycopg = psycopg
        self._conninfo = "postgresql://" + url.split("://", 1)[1]
        self._where = safe_location(url)
        self._connection: Any = None
        self._run(self._migrate)

    def _connect(self) -> Any:
        if self._connection is None or self._connection.closed or self._connection.broken:
            self._connection = self._psycopg.connect(
                self._conninfo, autocommit=True, connect_timeout=10
            )
        return self._connection

    def _run(self, work: Any) -> Any:
        """``work(connection)``, with a clear error for a database that does not answer."""
        try:
            return work(self._connect())
        except self._psycopg.Error as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise KeyStoreError(f"the key database {self._where}: {reason}") from None

    @staticmethod
    def _migrate(connection: Any) -> None:
        with connection.transaction():
            connection.execute("SELECT pg_advisory_xact_lock(%s)", (_PG_LOCK,))
            for statement in _PG_SCHEMA:
                connection.execute(statement)
            row = connection.execute("SELECT max(version) FROM kms_schema").fetchone()
            version = row[0] or 0
            _check_version(version, "(PostgreSQL)")
            if version < SCHEMA_VERSION:
                connection.execute("DELETE FROM kms_schema")
                connection.execute("INSERT INTO kms_schema VALUES (%s)", (SCHEMA_VERSION,))

    def data_version(self) -> object:
        return self._run(
            lambda c: c.execute("SELECT coalesce(max(id), 0) FROM key_log").fetchone()[0]
        )

    def select(self, owner: str) -> Row | None:
        row = self._run(
            lambda c: c.execute(
                f"SELECT {COLUMNS} FROM keys WHERE owner = %s",  # noqa: S608 - constant
                (owner,),
            ).fetchone()
        )
        if row is None:
            return None
        return tuple(bytes(v) if isinstance(v, memoryview) else v for v in row)

    def insert(self, row: Row) -> bool:
        return bool(
            self._run(
                lambda c: (
                    c.execute(
                        f"INSERT INTO keys ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s) "  # noqa: S608
                        "ON CONFLICT (owner) DO NOTHING",
                        row,
                    ).rowcount
                )
            )
        )

    def owners(self) -> list[str]:
        rows = self._run(lambda c: c.execute("SELECT owner FROM keys ORDER BY owner").fetchall())
        return [row[0] for row in rows]

    def rebind(
        self, owner: str, key_id: str, old_policy: str, wrapped: bytes, new_policy: str, log: Row
    ) -> bool:
        def work(connection: Any) -> bool:
            with connection.transaction():
                changed = connection.execute(
                    "UPDATE keys SET wrapped_private = %s, policy_json = %s "
                    "WHERE owner = %s AND key_id = %s AND policy_json = %s",
                    (wrapped, new_policy, owner, key_id, old_policy),
                ).rowcount
                if changed != 1:
                    raise _Unchanged
                connection.execute(
                    f"INSERT INTO key_log ({LOG_COLUMNS}) "  # noqa: S608 - constant
                    "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                    log,
                )
            return True

        try:
            return bool(self._run(work))
        except _Unchanged:
            return False

    def log(self) -> list[Row]:
        rows = self._run(
            lambda c: c.execute(
                f"SELECT {LOG_COLUMNS} FROM key_log ORDER BY id"  # noqa: S608 - constant
            ).fetchall()
        )
        return [tuple(row) for row in rows]

    def ping(self) -> None:
        self._run(lambda c: c.execute("SELECT 1").fetchone())

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()


class _Unchanged(Exception):
    """A rebind's row changed meanwhile: the transaction rolls back."""
