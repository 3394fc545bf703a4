"""The metadata store's SQLAlchemy models (``Base.metadata`` is Alembic's target), the
row-to-record conversions and the prebuilt statements of the per-session reads (re-exported by
:mod:`cape.host.store.metadata`)."""

from __future__ import annotations

import datetime as dt
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Row,
    String,
    bindparam,
    select,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from cape.host.store.records import (
    MAX_DESCRIPTION_CHARS,
    MAX_TOKEN_NAME_CHARS,
    Function,
    Token,
    User,
)

# --------------------------------------------------------------------------- ORM


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware UTC datetime: ``timestamptz`` on PostgreSQL, naive UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("the metadata store takes timezone-aware datetimes only")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(
        self, value: dt.datetime | None, dialect: Dialect
    ) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


_NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """The declarative base; ``Base.metadata`` is Alembic's ``target_metadata``."""

    metadata = MetaData(naming_convention=_NAMING_CONVENTION)


class UserRow(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(22), primary_key=True)
    username: Mapped[str] = mapped_column(String(39), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())


class FunctionRow(Base):
    __tablename__ = "functions"
    __table_args__ = (
        Index("ix_functions_owner_id_name_seq", "owner_id", "name", "seq"),
        Index("ix_functions_owner_id_seq", "owner_id", "seq"),
    )

    # Commit order: "newest" for name resolution and listings, immune to clock steps.
    seq: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True
    )
    id: Mapped[str] = mapped_column(String(22), unique=True)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    checksum: Mapped[str] = mapped_column(String(64))
    public: Mapped[bool] = mapped_column(Boolean())
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    blob_key: Mapped[str] = mapped_column(String(64), unique=True)
    size: Mapped[int] = mapped_column(BigInteger())


class TokenRow(Base):
    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(22), primary_key=True)
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(MAX_TOKEN_NAME_CHARS))
    description: Mapped[str] = mapped_column(String(MAX_DESCRIPTION_CHARS))
    function_id: Mapped[str | None] = mapped_column(
        ForeignKey("functions.id", ondelete="CASCADE"), index=True
    )
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime(), index=True)
    last_used: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())


def _user(row: UserRow | Row[Any]) -> User:
    return User(row.id, row.username, row.password_hash, row.created_at)


def _function(row: FunctionRow | Row[Any], owner_name: str) -> Function:
    return Function(
        id=row.id,
        owner_id=row.owner_id,
        owner_name=owner_name,
        name=row.name,
        checksum=row.checksum,
        public=row.public,
        created_at=row.created_at,
        blob_key=row.blob_key,
        size=row.size,
    )


def _token(row: TokenRow | Row[Any]) -> Token:
    return Token(
        id=row.id,
        user_id=row.user_id,
        name=row.name,
        description=row.description,
        function_id=row.function_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used=row.last_used,
        kind=row.kind,
    )


# The reads every session makes (its token, its user, its function), as plain statements
# with bound parameters: run on a connection, not through an ORM session, they cost a sixth of
# the CPU (≈120 µs for the three against ≈720, SQLite; benchmarks/README.md, t16v), and read
# the same committed rows, so nothing is cached and a deletion is seen at once.
_USERS, _FUNCTIONS, _TOKENS = UserRow.__table__, FunctionRow.__table__, TokenRow.__table__
_USER_BY_ID: Final = select(_USERS).where(_USERS.c.id == bindparam("id"))
_TOKEN_BY_ID: Final = select(_TOKENS).where(_TOKENS.c.id == bindparam("id"))
_FUNCTIONS_WITH_OWNER: Final = select(_FUNCTIONS, _USERS.c.username).join(
    _USERS, _USERS.c.id == _FUNCTIONS.c.owner_id
)
_FUNCTION_BY_ID: Final = _FUNCTIONS_WITH_OWNER.where(_FUNCTIONS.c.id == bindparam("id"))
_FUNCTION_BY_NAME: Final = (
    _FUNCTIONS_WITH_OWNER.where(
        _USERS.c.username == bindparam("owner"), _FUNCTIONS.c.name == bindparam("name")
    )
    .order_by(_FUNCTIONS.c.seq.desc())
    .limit(1)
)
