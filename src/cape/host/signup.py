"""Who may sign up: the server's signup mode and invite codes (``cape serve --signup``).

=========  ==============================================================================
mode       a signup is accepted
=========  ==============================================================================
open       from anyone (the default: a local or personal server, as before)
invite     only with an unused, unexpired invite code (``cape admin invite create``)
closed     never: existing accounts only
=========  ==============================================================================

A refusal is a :class:`~cape.host.errors.SignupRefusedError` (HTTP 403 ``{"error"}``); an
unknown, used, expired and revoked code get one message, so a code's fate is not told to
whoever holds it. Every signup attempt, in every mode that may accept it, first passes the
per-address :class:`~cape.host.ratelimit.SignupRateLimiter`.

An invite code is 32 characters of URL-safe base64 from :mod:`secrets` (192 bits): too many
to guess, so it is stored as a plain SHA-256 (a slow password hash would buy nothing) and
looked up by that hash. The code is shown once, to the operator who made it, and never
logged.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from cape.errors import FormatError
from cape.host.errors import NotFoundError, SignupRefusedError

if TYPE_CHECKING:  # the CLI imports this module; SQLAlchemy loads only when a store is used
    from cape.host.store.invites import Invite, InviteStore

__all__ = [
    "DEFAULT_INVITE_TTL",
    "MAX_INVITE_TTL",
    "CreatedInvite",
    "Invites",
    "SignupMode",
    "hash_invite_code",
    "new_invite_code",
]

DEFAULT_INVITE_TTL: Final = dt.timedelta(days=7)
MAX_INVITE_TTL: Final = dt.timedelta(days=366)
MAX_CODE_CHARS: Final = 200
"""Longer ``invite`` fields are refused before hashing (ours have 32 characters)."""

CLOSED_TEXT: Final = "signups are closed on this server: ask its operator for an account"
NEEDS_INVITE_TEXT: Final = (
    "this server takes signups by invitation only: ask its operator for an invite code "
    "and sign up with it (cape signup --invite CODE)"
)
BAD_INVITE_TEXT: Final = "invalid invite code: it is unknown, used, expired or revoked"


class SignupMode(enum.StrEnum):
    open = "open"
    invite = "invite"
    closed = "closed"


def new_invite_code() -> str:
    """A fresh invite code (32 URL-safe characters, 192 random bits)."""
    return secrets.token_urlsafe(24)


def hash_invite_code(code: str) -> str:
    """The SHA-256 (hex) under which an invite code is stored."""
    return hashlib.sha256(code.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class CreatedInvite:
    """A new invite and its code, which exists only here (show it once)."""

    code: str
    invite: Invite


class Invites:
    """Invite management for operators (``cape admin invite``) over an :class:`InviteStore`."""

    def __init__(self, store: InviteStore) -> None:
        self._store = store

    def create(
        self, *, now: dt.datetime, ttl: dt.timedelta = DEFAULT_INVITE_TTL, note: str = ""
    ) -> CreatedInvite:
        """Make a single-use invite that expires ``ttl`` after ``now``.

        Raises:
            FormatError: a lifetime outside (0, 366 days], or a bad note.
        """
        if not dt.timedelta(0) < ttl <= MAX_INVITE_TTL:
            raise FormatError(f"an invite must expire within {MAX_INVITE_TTL.days} days")
        code = new_invite_code()
        invite = self._store.add(
            code_hash=hash_invite_code(code), expires_at=now + ttl, note=note, now=now
        )
        return CreatedInvite(code, invite)

    def list(self) -> list[Invite]:
        return self._store.list()

    def revoke(self, invite_id: str) -> None:
        """Delete an invite. Raises NotFoundError if there is none with that id."""
        if not self._store.delete(invite_id):
            raise NotFoundError(f"no invite with id {invite_id[:40]!r}")


def check_invite_code(code: object) -> str:
    """The invite field of a signup, or :class:`SignupRefusedError` for a malformed one."""
    if not isinstance(code, str) or not 0 < len(code) <= MAX_CODE_CHARS:
        raise SignupRefusedError(BAD_INVITE_TEXT)
    return code
