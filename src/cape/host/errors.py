"""Errors of the host side: accounts, tokens and stored records.

They extend :mod:`cape.errors`' tree (STYLE.md "Error hierarchy"); the API maps each class to
one HTTP status or close code. Messages never carry tokens, passwords or hashes.
"""

from __future__ import annotations

from cape.errors import CapeError

__all__ = [
    "AuthError",
    "ConflictError",
    "ForbiddenError",
    "NotFoundError",
    "RateLimitedError",
    "SignupRefusedError",
    "UnavailableError",
]


class AuthError(CapeError):
    """A bad, expired or revoked token, or wrong credentials (HTTP 401)."""


class ForbiddenError(AuthError):
    """The caller is authenticated but its token does not allow this (HTTP 403)."""


class SignupRefusedError(ForbiddenError):
    """The server takes no signups, or none without a valid invite code (HTTP 403)."""


class RateLimitedError(AuthError):
    """Too many failed logins or signups: try again after ``retry_after_s`` seconds (HTTP 429)."""

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(message)


class NotFoundError(CapeError):
    """No such user, function or token, or none the caller may know of (HTTP 404)."""


class ConflictError(CapeError):
    """The name is taken, e.g. a username at signup (HTTP 409)."""


class UnavailableError(CapeError):
    """The server cannot take this now (shutting down, no enclave ready): retry (HTTP 503)."""
