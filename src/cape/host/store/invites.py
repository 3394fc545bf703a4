"""Invite records: single-use, expiring signup codes, stored as hashes (``invites`` table).

The code itself is never stored: a row keeps the SHA-256 of it (:mod:`cape.host.signup` makes
codes and hashes them). Redeeming is one transaction that marks the invite used and creates the
account, so an invite is spent exactly once, and only by a signup that succeeds (a taken
username leaves it unused). The table lives in the metadata store's database and schema
(migration 0002); :class:`InviteStore` works over an open :class:`SqlMetadataStore`, so the
operator's ``cape admin invite`` and a running ``cape serve`` share it safely.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from sqlalchemy import ForeignKey, String, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, Session, mapped_column

from cape.errors import FormatError
from cape.formats.names import check_username, is_id
from cape.host.errors import ConflictError
from cape.host.ids import new_id
from cape.host.store.metadata import Base, SqlMetadataStore, User, UserRow, UTCDateTime

__all__ = ["MAX_NOTE_CHARS", "Invite", "InviteRow", "InviteStore", "check_note"]

MAX_NOTE_CHARS: Final = 200
CODE_HASH_CHARS: Final = 64


@dataclass(frozen=True, slots=True)
class Invite:
    """An invite's record (never its code)."""

    id: str
    note: str
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None
    used_by: str | None
    """The username that redeemed it (``None`` if unused or that account is gone)."""

    def state(self, *, now: dt.datetime) -> str:
        """``used``, ``expired`` or ``unused`` at ``now``."""
        if self.used_at is not None:
            return "used"
        return "expired" if now >= self.expires_at else "unused"


class InviteRow(Base):
    __tablename__ = "invites"

    id: Mapped[str] = mapped_column(String(22), primary_key=True)
    code_hash: Mapped[str] = mapped_column(String(CODE_HASH_CHARS), unique=True)
    note: Mapped[str] = mapped_column(String(MAX_NOTE_CHARS))
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    expires_at: Mapped[dt.datetime] = mapped_column(UTCDateTime())
    used_at: Mapped[dt.datetime | None] = mapped_column(UTCDateTime())
    used_by: Mapped[str | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))


def check_note(note: object) -> str:
    """An invite's note: at most 200 printable characters.

    Raises:
        FormatError: not a string, too long, or with control characters.
    """
    if not isinstance(note, str) or len(note) > MAX_NOTE_CHARS or not note.isprintable():
        raise FormatError(f"an invite note must have at most {MAX_NOTE_CHARS} printable characters")
    return note


def _check_hash(code_hash: object) -> str:
    if (
        not isinstance(code_hash, str)
        or len(code_hash) != CODE_HASH_CHARS
        or not all(c in "0123456789abcdef" for c in code_hash)
    ):
        raise ValueError("an invite code hash is 64 lower-case hex digits")
    return code_hash


class InviteStore:
    """Invites in ``store``'s database."""

    def __init__(self, store: SqlMetadataStore) -> None:
        self._store = store

    def add(
        self, *, code_hash: str, expires_at: dt.datetime, note: str, now: dt.datetime
    ) -> Invite:
        """Record a new invite for the code whose hash is ``code_hash``."""
        row = InviteRow(
            id=new_id(),
            code_hash=_check_hash(code_hash),
            note=check_note(note),
            created_at=now,
            expires_at=expires_at,
            used_at=None,
            used_by=None,
        )
        if expires_at <= now:
            raise FormatError("an invite must expire in the future")
        with self._store.connect() as connection, Session(bind=connection) as session:
            session.add(row)
            session.flush()
        return Invite(row.id, row.note, row.created_at, row.expires_at, None, None)

    def list(self) -> list[Invite]:
        """Every invite, oldest first."""
        query = (
            select(InviteRow, UserRow.username)
            .outerjoin(UserRow, UserRow.id == InviteRow.used_by)
            .order_by(InviteRow.created_at, InviteRow.id)
        )
        with self._store.connect() as connection, Session(bind=connection) as session:
            return [
                Invite(row.id, row.note, row.created_at, row.expires_at, row.used_at, username)
                for row, username in session.execute(query)
            ]

    def delete(self, invite_id: str) -> bool:
        """Revoke an invite (used or not). True if one was deleted."""
        if not is_id(invite_id):
            return False
        with self._store.connect() as connection:
            result = connection.execute(delete(InviteRow).where(InviteRow.id == invite_id))
            return bool(result.rowcount)

    def redeem(
        self, *, code_hash: str, username: str, password_hash: str, now: dt.datetime
    ) -> User | None:
        """Spend the unused, unexpired invite ``code_hash`` on a new account, atomically.

        Returns ``None`` (and changes nothing) if there is no such usable invite.

        Raises:
            FormatError: bad username.
            ConflictError: the username is taken (the invite stays unused).
        """
        name = check_username(username)
        if not isinstance(password_hash, str) or not password_hash:
            raise ValueError("a password hash is required")
        user = UserRow(id=new_id(), username=name, password_hash=password_hash, created_at=now)
        try:
            with self._store.connect() as connection, Session(bind=connection) as session:
                spent = connection.execute(
                    update(InviteRow)
                    .where(
                        InviteRow.code_hash == _check_hash(code_hash),
                        InviteRow.used_at.is_(None),
                        InviteRow.expires_at > now,
                    )
                    .values(used_at=now)
                )
                if spent.rowcount != 1:
                    return None
                session.add(user)
                session.flush()
                connection.execute(
                    update(InviteRow)
                    .where(InviteRow.code_hash == code_hash)
                    .values(used_by=user.id)
                )
        except IntegrityError as exc:
            raise ConflictError(f"the username {name!r} is taken") from exc
        return User(user.id, user.username, user.password_hash, user.created_at)
