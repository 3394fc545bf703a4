"""The metadata store's records (frozen dataclasses), token kinds, label limits and their
checks (re-exported by :mod:`cape.host.store.metadata`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Final

from cape.errors import FormatError

TOKEN_KINDS: Final = frozenset({"access", "pat"})
"""``access``: issued by login, short-lived; ``pat``: a personal access token."""

MAX_TOKEN_NAME_CHARS: Final = 64
MAX_DESCRIPTION_CHARS: Final = 1024
MAX_PAGE_SIZE: Final = 1000
"""The largest ``limit`` :meth:`MetadataStore.list_functions` accepts."""


# --------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class User:
    id: str
    username: str
    password_hash: str
    created_at: dt.datetime


@dataclass(frozen=True, slots=True)
class Function:
    id: str
    owner_id: str
    owner_name: str
    name: str
    checksum: str
    """SHA-256 of the plaintext bundle as computed by the enclave, lower-case hex."""
    public: bool
    created_at: dt.datetime
    blob_key: str
    size: int
    """Bytes of stored ciphertext."""


@dataclass(frozen=True, slots=True)
class Token:
    """A token's record. The token string itself is never stored: it cannot be recovered."""

    id: str
    """The JWT's ``jti``."""
    user_id: str
    name: str
    description: str
    function_id: str | None
    created_at: dt.datetime
    expires_at: dt.datetime | None
    last_used: dt.datetime | None
    kind: str = "pat"
    """One of :data:`TOKEN_KINDS`."""


# --------------------------------------------------------------------------- validation


def check_token_name(name: object, description: object = "") -> tuple[str, str]:
    """Return ``(name, description)`` if both are acceptable token labels.

    A name has 1-64 printable characters, a description at most 1024 (newlines allowed).

    Raises:
        FormatError: either is not a string, too long, empty (name) or has control characters.
    """
    if not isinstance(name, str) or not 0 < len(name) <= MAX_TOKEN_NAME_CHARS:
        raise FormatError(f"a token name must have 1-{MAX_TOKEN_NAME_CHARS} characters")
    if not name.isprintable():
        raise FormatError("a token name must not contain control characters")
    if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
        raise FormatError(f"a token description must have at most {MAX_DESCRIPTION_CHARS} chars")
    if not all(c.isprintable() or c in "\n\t" for c in description):
        raise FormatError("a token description must not contain control characters")
    return name, description


def _check_page(limit: int, offset: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE_SIZE:
        raise FormatError(f"limit must be an integer from 1 to {MAX_PAGE_SIZE}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise FormatError("offset must be a non-negative integer")
