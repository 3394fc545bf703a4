"""The metadata store: users, functions and token records in SQL.

The host is untrusted (DESIGN.md): these tables hold only metadata — names, ids, checksums,
password hashes, token *records* — never plaintext and never a token string. Ciphertext lives
in the :mod:`~cape.host.store.blobs` store; a function row names its blob by ``blob_key``.

:class:`SqlMetadataStore` runs on SQLAlchemy 2 and works with SQLite (``cape serve``: WAL,
foreign keys on, ``synchronous=FULL`` so an acknowledged commit survives a crash) and with
PostgreSQL. Alembic owns the schema: :meth:`SqlMetadataStore.migrate` (run on open) applies
``migrations/versions`` up to head, with a config built here, so no ``alembic.ini`` is needed.

Rules the store enforces (each violation a :class:`~cape.errors.FormatError`):

- usernames: ``[a-z0-9][a-z0-9_-]{0,38}`` — GitHub-like and case-insensitive: names are
  lower-cased before they are checked or stored, so ``Alice`` and ``alice`` are one user (and
  one key owner in the key service, which uses the same rule);
- function names: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, case-sensitive;
- checksums: SHA-256 as 64 hex digits (stored lower-case).

Deploying an existing name adds a row with a new id; a name resolves to its newest deploy
(protocol.md), by commit order (``seq``), not by the wall clock.
"""

from __future__ import annotations

import abc
import datetime as dt
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final, Self

from alembic import command
from alembic.config import Config
from sqlalchemy import CursorResult, Row, Select, create_engine, delete, event, select, text, update
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from cape._internal.timefile import utc_now
from cape.errors import FormatError
from cape.formats.names import (
    FUNCTION_NAME_PATTERN,
    USERNAME_PATTERN,
    check_checksum,
    check_function_name,
    check_username,
    is_id,
)
from cape.host.errors import ConflictError, NotFoundError
from cape.host.ids import new_id
from cape.host.store.orm import (
    _FUNCTION_BY_ID,
    _FUNCTION_BY_NAME,
    _TOKEN_BY_ID,
    _USER_BY_ID,
    Base,
    _function,
    _token,
    _user,
)
from cape.host.store.orm import FunctionRow as FunctionRow
from cape.host.store.orm import TokenRow as TokenRow
from cape.host.store.orm import UserRow as UserRow
from cape.host.store.orm import UTCDateTime as UTCDateTime
from cape.host.store.records import (
    MAX_DESCRIPTION_CHARS,
    MAX_PAGE_SIZE,
    TOKEN_KINDS,
    Function,
    Token,
    User,
    _check_page,
    check_token_name,
)
from cape.host.store.records import MAX_TOKEN_NAME_CHARS as MAX_TOKEN_NAME_CHARS

__all__ = [
    "FUNCTION_NAME_PATTERN",
    "MAX_DESCRIPTION_CHARS",
    "MAX_PAGE_SIZE",
    "MIGRATIONS_DIR",
    "TOKEN_KINDS",
    "USERNAME_PATTERN",
    "Base",
    "Function",
    "MetadataStore",
    "SqlMetadataStore",
    "Token",
    "User",
    "check_checksum",
    "check_function_name",
    "check_token_name",
    "check_username",
    "migration_config",
]


MIGRATIONS_DIR: Final = Path(__file__).resolve().parent / "migrations"

MIGRATION_LOCK: Final = 0x63617065_6D696772
"""The PostgreSQL advisory lock key migrations hold ("capemigr")."""


# --------------------------------------------------------------------------- the seam


class MetadataStore(abc.ABC):
    """Users, functions and token records (the ``MetadataStore`` seam of DESIGN.md).

    Getters return ``None`` when nothing matches (also for malformed ids and names, which
    match nothing); records are frozen dataclasses, safe to pass between threads.
    """

    revocations: int = 0
    """Bumped after a token or function is deleted: open sessions re-check their
    authorisation when it moves (:mod:`cape.host.api.sessions`)."""

    # users
    @abc.abstractmethod
    def create_user(self, username: str, password_hash: str) -> User:
        """Add a user. Raises FormatError (bad name) or ConflictError (name taken)."""

    @abc.abstractmethod
    def get_user_by_name(self, username: str) -> User | None:
        """The user with that name, compared case-insensitively."""

    @abc.abstractmethod
    def get_user_by_id(self, user_id: str) -> User | None: ...

    @abc.abstractmethod
    def set_password_hash(self, user_id: str, password_hash: str) -> None:
        """Replace a user's password hash (rehash on login after a parameter change)."""

    # functions
    @abc.abstractmethod
    def add_function(
        self,
        *,
        owner_id: str,
        name: str,
        checksum: str,
        public: bool,
        blob_key: str,
        size: int,
    ) -> Function:
        """Record a deploy in one transaction; its blob must already be durable.

        Raises:
            FormatError: bad name or checksum.
            NotFoundError: no such owner.
        """

    @abc.abstractmethod
    def get_function(self, function_id: str) -> Function | None: ...

    @abc.abstractmethod
    def resolve_function(self, owner_name: str, name: str) -> Function | None:
        """The newest deploy of ``owner_name/name``."""

    @abc.abstractmethod
    def list_functions(self, owner_id: str, *, limit: int = 100, offset: int = 0) -> list[Function]:
        """The owner's functions, newest first. Raises FormatError for a bad page."""

    @abc.abstractmethod
    def delete_function(self, function_id: str) -> Function | None:
        """Delete a function and the tokens scoped to it; return what was deleted.

        The caller removes the blob afterwards (a crash in between leaves an orphan blob,
        which :func:`~cape.host.store.deploys.sweep_orphans` removes).
        """

    @abc.abstractmethod
    def all_blob_keys(self) -> set[str]:
        """Every blob key a function row references (for the orphan sweep)."""

    # tokens
    @abc.abstractmethod
    def add_token(
        self,
        *,
        user_id: str,
        kind: str,
        name: str,
        description: str,
        function_id: str | None,
        expires_at: dt.datetime | None,
        token_id: str | None = None,
    ) -> Token:
        """Record a token about to be issued. Raises NotFoundError for an unknown user or
        function, FormatError for bad labels."""

    @abc.abstractmethod
    def get_token(self, token_id: str) -> Token | None: ...

    @abc.abstractmethod
    def list_tokens(self, user_id: str, *, kind: str | None = None) -> list[Token]:
        """The user's token records, oldest first, optionally of one kind."""

    @abc.abstractmethod
    def delete_token(self, token_id: str, user_id: str) -> bool:
        """Revoke: delete the record if it belongs to ``user_id``. True if one was deleted."""

    @abc.abstractmethod
    def touch_token(self, token_id: str, when: dt.datetime) -> None:
        """Set the record's ``last_used``."""

    @abc.abstractmethod
    def delete_expired_tokens(self, before: dt.datetime) -> int:
        """Delete records that expired before ``before``; return how many."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# --------------------------------------------------------------------------- SQL store


def migration_config(connection: Connection | None = None, *, url: str | None = None) -> Config:
    """An Alembic config for :data:`MIGRATIONS_DIR`, built in code (no ``alembic.ini``).

    Pass an open ``connection`` to migrate through it (its transaction is the migration's), or
    a ``url`` (offline ``--sql`` rendering, or a standalone engine).
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
    finally:
        cursor.close()


def _create_private_file(path: Path) -> None:
    """Create ``path`` as an empty 0600 file unless it exists (SQLite would use 0644; its
    ``-wal`` and ``-shm`` files copy the database file's mode)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class SqlMetadataStore(MetadataStore):
    """The metadata store on SQLAlchemy: ``sqlite:///path`` or ``postgresql+psycopg://…``.

    Opening applies pending Alembic migrations (pass ``migrate=False`` to skip). ``clock``
    stamps ``created_at`` (a seam for tests).
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Callable[[], dt.datetime] = utc_now,
        migrate: bool = True,
    ) -> None:
        parsed = make_url(url)
        self._clock = clock
        kwargs: dict[str, Any] = {}
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        if self.is_sqlite:
            database = parsed.database
            if not database or database == ":memory:":
                kwargs["poolclass"] = StaticPool
                kwargs["connect_args"] = {"check_same_thread": False}
            else:
                _create_private_file(Path(database))
        else:
            kwargs["pool_pre_ping"] = True
        self._engine = create_engine(parsed, **kwargs)
        self._readers: list[SqlMetadataStore] = []
        """Stores on this one's database that close with it (the loop's reads)."""
        if self.is_sqlite:
            event.listen(self._engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        if migrate:
            self.migrate()

    def migrate(self) -> None:
        """Apply every pending migration (Alembic ``upgrade head``) in one transaction.

        On PostgreSQL the transaction first takes an advisory lock (:data:`MIGRATION_LOCK`),
        so nodes of a cluster starting together migrate one after another: the first applies
        the revisions, the others then find the schema at head.
        """
        with self._engine.begin() as connection:
            if not self.is_sqlite:
                connection.execute(
                    text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK}
                )
            command.upgrade(migration_config(connection), "head")

    def ping(self) -> None:
        """One round trip to the database (a node's readiness); raises if it does not answer."""
        with self._engine.connect() as connection:
            connection.execute(text("SELECT 1"))

    def close(self) -> None:
        for reader in self._readers:
            reader.close()
        self._engine.dispose()

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection in a transaction (for migrations checks and maintenance)."""
        with self._engine.begin() as connection:
            yield connection

    @contextmanager
    def _session(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _one(self, statement: Select[Any], **params: str) -> Row[Any] | None:
        """The one row (or none) of a read: a plain connection, no ORM session."""
        with self._engine.connect() as connection:
            return connection.execute(statement, params).one_or_none()

    # users ------------------------------------------------------------------

    def create_user(self, username: str, password_hash: str) -> User:
        name = check_username(username)
        if not isinstance(password_hash, str) or not password_hash:
            raise ValueError("a password hash is required")
        row = UserRow(
            id=new_id(), username=name, password_hash=password_hash, created_at=self._clock()
        )
        try:
            with self._session() as session:
                session.add(row)
        except IntegrityError as exc:
            raise ConflictError(f"the username {name!r} is taken") from exc
        return _user(row)

    def get_user_by_name(self, username: str) -> User | None:
        try:
            name = check_username(username)
        except FormatError:
            return None
        with self._session() as session:
            row = session.scalars(select(UserRow).where(UserRow.username == name)).one_or_none()
            return None if row is None else _user(row)

    def get_user_by_id(self, user_id: str) -> User | None:
        if not is_id(user_id):
            return None
        row = self._one(_USER_BY_ID, id=user_id)
        return None if row is None else _user(row)

    def set_password_hash(self, user_id: str, password_hash: str) -> None:
        with self._session() as session:
            session.execute(
                update(UserRow).where(UserRow.id == user_id).values(password_hash=password_hash)
            )

    # functions --------------------------------------------------------------

    def add_function(
        self,
        *,
        owner_id: str,
        name: str,
        checksum: str,
        public: bool,
        blob_key: str,
        size: int,
    ) -> Function:
        name = check_function_name(name)
        checksum = check_checksum(checksum)
        if not isinstance(public, bool):
            raise FormatError("public must be true or false")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError("size must be a non-negative integer")
        row = FunctionRow(
            id=new_id(),
            owner_id=owner_id,
            name=name,
            checksum=checksum,
            public=public,
            created_at=self._clock(),
            blob_key=blob_key,
            size=size,
        )
        with self._session() as session:
            owner = session.get(UserRow, owner_id) if is_id(owner_id) else None
            if owner is None:
                raise NotFoundError("no such user")
            session.add(row)
            owner_name = owner.username
        return _function(row, owner_name)

    def _select_functions(self) -> Any:
        return select(FunctionRow, UserRow.username).join(
            UserRow, UserRow.id == FunctionRow.owner_id
        )

    def get_function(self, function_id: str) -> Function | None:
        if not is_id(function_id):
            return None
        row = self._one(_FUNCTION_BY_ID, id=function_id)
        return None if row is None else _function(row, row.username)

    def resolve_function(self, owner_name: str, name: str) -> Function | None:
        try:
            owner = check_username(owner_name)
            name = check_function_name(name)
        except FormatError:
            return None
        row = self._one(_FUNCTION_BY_NAME, owner=owner, name=name)
        return None if row is None else _function(row, row.username)

    def list_functions(self, owner_id: str, *, limit: int = 100, offset: int = 0) -> list[Function]:
        _check_page(limit, offset)
        query = (
            self._select_functions()
            .where(FunctionRow.owner_id == owner_id)
            .order_by(FunctionRow.seq.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._session() as session:
            return [_function(row, owner) for row, owner in session.execute(query)]

    def delete_function(self, function_id: str) -> Function | None:
        if not is_id(function_id):
            return None
        with self._session() as session:
            found = session.execute(
                self._select_functions().where(FunctionRow.id == function_id)
            ).one_or_none()
            if found is None:
                return None
            record = _function(found[0], found[1])
            # Explicit as well as ON DELETE CASCADE, so revocation never depends on the
            # database enforcing foreign keys.
            session.execute(delete(TokenRow).where(TokenRow.function_id == function_id))
            session.execute(delete(FunctionRow).where(FunctionRow.id == function_id))
        self.revocations += 1
        return record

    def all_blob_keys(self) -> set[str]:
        with self._session() as session:
            return set(session.scalars(select(FunctionRow.blob_key)))

    # tokens -----------------------------------------------------------------

    def add_token(
        self,
        *,
        user_id: str,
        kind: str,
        name: str,
        description: str,
        function_id: str | None,
        expires_at: dt.datetime | None,
        token_id: str | None = None,
    ) -> Token:
        if kind not in TOKEN_KINDS:
            raise ValueError(f"unknown token kind {kind!r}")
        name, description = check_token_name(name, description)
        row = TokenRow(
            id=new_id() if token_id is None else token_id,
            user_id=user_id,
            kind=kind,
            name=name,
            description=description,
            function_id=function_id,
            created_at=self._clock(),
            expires_at=expires_at,
            last_used=None,
        )
        if not is_id(row.id):
            raise ValueError("a token id must be a 22-character id")
        with self._session() as session:
            if not is_id(user_id) or session.get(UserRow, user_id) is None:
                raise NotFoundError("no such user")
            if function_id is not None and self._function_row(session, function_id) is None:
                raise NotFoundError("no such function")
            session.add(row)
        return _token(row)

    @staticmethod
    def _function_row(session: Session, function_id: str) -> FunctionRow | None:
        if not is_id(function_id):
            return None
        query = select(FunctionRow).where(FunctionRow.id == function_id)
        return session.scalars(query).one_or_none()

    def get_token(self, token_id: str) -> Token | None:
        if not is_id(token_id):
            return None
        row = self._one(_TOKEN_BY_ID, id=token_id)
        return None if row is None else _token(row)

    def list_tokens(self, user_id: str, *, kind: str | None = None) -> list[Token]:
        query = select(TokenRow).where(TokenRow.user_id == user_id)
        if kind is not None:
            query = query.where(TokenRow.kind == kind)
        with self._session() as session:
            rows = session.scalars(query.order_by(TokenRow.created_at, TokenRow.id))
            return [_token(row) for row in rows]

    def delete_token(self, token_id: str, user_id: str) -> bool:
        with self._session() as session:
            result = session.execute(
                delete(TokenRow).where(TokenRow.id == token_id, TokenRow.user_id == user_id)
            )
            deleted = _rowcount(result) > 0
        self.revocations += int(deleted)
        return deleted

    def touch_token(self, token_id: str, when: dt.datetime) -> None:
        with self._session() as session:
            session.execute(update(TokenRow).where(TokenRow.id == token_id).values(last_used=when))

    def delete_expired_tokens(self, before: dt.datetime) -> int:
        with self._session() as session:
            result = session.execute(
                delete(TokenRow).where(
                    TokenRow.expires_at.is_not(None), TokenRow.expires_at < before
                )
            )
            removed = _rowcount(result)
        self.revocations += int(removed > 0)
        return removed


def _rowcount(result: object) -> int:
    if not isinstance(result, CursorResult):
        raise RuntimeError("expected a cursor result from a DML statement")
    return int(result.rowcount)
