"""The shapes of the names and identifiers client and server exchange (protocol.md
"Identifiers, names, limits"), checked in one place by both sides."""

from __future__ import annotations

import re
from typing import Final

from cape.errors import FormatError

__all__ = [
    "CHECKSUM_PATTERN",
    "FUNCTION_NAME_PATTERN",
    "ID_LENGTH",
    "ID_PATTERN",
    "USERNAME_PATTERN",
    "check_checksum",
    "check_function_name",
    "check_username",
    "is_id",
]

ID_LENGTH: Final = 22

ID_PATTERN: Final = re.compile(r"[A-Za-z0-9]{22}")
"""What a function or token id matches in full (pycape takes any 22 characters as an id)."""

USERNAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,38}")
"""What a (lower-cased) username must match in full."""

FUNCTION_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
"""What a function name must match in full."""

CHECKSUM_PATTERN: Final = re.compile(r"[0-9a-f]{64}")
"""A function checksum: SHA-256 of the plaintext bundle, lower-case hex."""


def is_id(value: object) -> bool:
    """Whether ``value`` is a string shaped like an id (ASCII only, exactly 22 characters)."""
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def check_username(username: object) -> str:
    """Return the canonical (lower-case) form of ``username``.

    Raises:
        FormatError: not a string matching :data:`USERNAME_PATTERN` once lower-cased.
    """
    if isinstance(username, str):
        canonical = username.lower()
        if canonical.isascii() and USERNAME_PATTERN.fullmatch(canonical):
            return canonical
    shown = repr(username)[:60] if isinstance(username, str) else type(username).__name__
    raise FormatError(
        f"invalid username {shown}: use 1-39 characters of a-z, 0-9, '_' and '-', "
        "starting with a letter or digit"
    )


def check_function_name(name: object) -> str:
    """Return ``name`` if it is a valid function name.

    Raises:
        FormatError: not a string matching :data:`FUNCTION_NAME_PATTERN`.
    """
    if isinstance(name, str) and name.isascii() and FUNCTION_NAME_PATTERN.fullmatch(name):
        return name
    shown = repr(name)[:80] if isinstance(name, str) else type(name).__name__
    raise FormatError(
        f"invalid function name {shown}: use 1-64 characters of A-Z, a-z, 0-9, '.', '_' "
        "and '-', starting with a letter or digit"
    )


def check_checksum(checksum: object) -> str:
    """Return ``checksum`` as lower-case hex if it is a SHA-256 digest in hex.

    Raises:
        FormatError: anything else.
    """
    if isinstance(checksum, str) and CHECKSUM_PATTERN.fullmatch(checksum.lower()):
        return checksum.lower()
    raise FormatError("invalid checksum: expected a SHA-256 digest as 64 hex digits")
