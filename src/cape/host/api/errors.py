"""The one table from exceptions to HTTP statuses and websocket close codes (STYLE.md).

Every error the API sends is ``{"error": "<text>"}``. The text of a :class:`CapeError` is its
:meth:`~cape.errors.CapeError.diagnostics` (safe to show by contract); anything else is a bug
or an environment failure and gets status 500 / close code 1011 with the generic text
:data:`INTERNAL_ERROR_TEXT`, its traceback going only to this module's logger at debug level.

==========================================  ======  =====  ==============================
exception (first match in this order)       status  close  extra
==========================================  ======  =====  ==============================
:class:`BodyTooLargeError`                  413     1009
:class:`ClientTooSlowError`                 408     1008
:class:`~cape.errors.FormatError`           400     1008
:class:`~cape.errors.LimitExceededError`    400     1008
:class:`~cape.host.errors.ForbiddenError`   403     1008
:class:`~cape.host.errors.RateLimitedError` 429     1013   ``Retry-After: <whole seconds>``
:class:`~cape.host.errors.AuthError`        401     1008   ``WWW-Authenticate: Bearer``
:class:`~cape.host.errors.NotFoundError`    404     1008
:class:`~cape.host.errors.ConflictError`    409     1008
:class:`~cape.host.errors.UnavailableError` 503     1013   ``Retry-After`` if it has one
any other :class:`~cape.errors.CapeError`   400     1008
Starlette ``HTTPException`` (routing)       its own 1008   its headers
anything else                               500     1011   generic text
==========================================  ======  =====  ==============================

:data:`EXCEPTION_HANDLERS` installs :func:`error_response` as Starlette exception handlers;
websocket code closes with :func:`close_code_for`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Final

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cape.errors import CapeError, FormatError, LimitExceededError
from cape.host.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
)

__all__ = [
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_TRY_AGAIN_LATER",
    "EXCEPTION_HANDLERS",
    "INTERNAL_ERROR_TEXT",
    "BodyTooLargeError",
    "ClientTooSlowError",
    "close_code_for",
    "error_body",
    "error_response",
    "status_for",
]

logger = logging.getLogger(__name__)

INTERNAL_ERROR_TEXT: Final = "internal server error"
CLOSE_POLICY_VIOLATION: Final = 1008
CLOSE_MESSAGE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013
MAX_CLOSE_REASON_BYTES: Final = 123
"""RFC 6455: a close frame's reason fits in 123 bytes of UTF-8."""
MAX_ERROR_CHARS: Final = 1000


class BodyTooLargeError(LimitExceededError):
    """A request body (or message) larger than the API accepts (HTTP 413)."""


class ClientTooSlowError(FormatError):
    """The client did not send a request (or a message) within its deadline (HTTP 408)."""


# The table, most specific class first: (class, HTTP status, close code).
_TABLE: Final[tuple[tuple[type[BaseException], int, int], ...]] = (
    (BodyTooLargeError, 413, CLOSE_MESSAGE_TOO_BIG),
    (ClientTooSlowError, 408, CLOSE_POLICY_VIOLATION),
    (FormatError, 400, CLOSE_POLICY_VIOLATION),
    (LimitExceededError, 400, CLOSE_POLICY_VIOLATION),
    (ForbiddenError, 403, CLOSE_POLICY_VIOLATION),
    (RateLimitedError, 429, CLOSE_TRY_AGAIN_LATER),
    (AuthError, 401, CLOSE_POLICY_VIOLATION),
    (NotFoundError, 404, CLOSE_POLICY_VIOLATION),
    (ConflictError, 409, CLOSE_POLICY_VIOLATION),
    (UnavailableError, 503, CLOSE_TRY_AGAIN_LATER),
    (CapeError, 400, CLOSE_POLICY_VIOLATION),
)


def _row(exc: BaseException) -> tuple[int, int] | None:
    for error_class, status, close_code in _TABLE:
        if isinstance(exc, error_class):
            return status, close_code
    return None


def _text(exc: BaseException) -> str:
    """The client-safe text for ``exc`` (generic for anything not ours)."""
    if isinstance(exc, CapeError):
        text = exc.diagnostics()
    elif isinstance(exc, HTTPException):
        text = " ".join(str(exc.detail).split())
    else:
        return INTERNAL_ERROR_TEXT
    return text[:MAX_ERROR_CHARS]


def status_for(exc: BaseException) -> int:
    """The HTTP status for ``exc``."""
    if isinstance(exc, HTTPException):
        return exc.status_code
    row = _row(exc)
    return 500 if row is None else row[0]


def error_body(exc: BaseException) -> dict[str, str]:
    """``{"error": text}`` for ``exc``."""
    return {"error": _text(exc)}


def _log_if_internal(exc: BaseException) -> None:
    if _row(exc) is None and not isinstance(exc, HTTPException):
        logger.debug("unexpected error in an API handler", exc_info=exc)


def error_response(exc: BaseException) -> Response:
    """The JSON error response for ``exc`` (status, body and headers per the table)."""
    _log_if_internal(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, HTTPException) and exc.headers:
        headers.update(exc.headers)
    retry_after = getattr(exc, "retry_after_s", None)
    if isinstance(exc, RateLimitedError | UnavailableError) and retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    elif isinstance(exc, AuthError) and not isinstance(exc, ForbiddenError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc), status_code=status_for(exc), headers=headers)


def close_code_for(exc: BaseException) -> tuple[int, str]:
    """The websocket close code and reason (at most 123 bytes of UTF-8) for ``exc``."""
    _log_if_internal(exc)
    if isinstance(exc, HTTPException):
        code = CLOSE_INTERNAL_ERROR if exc.status_code >= 500 else CLOSE_POLICY_VIOLATION
    else:
        row = _row(exc)
        code = CLOSE_INTERNAL_ERROR if row is None else row[1]
    reason = _text(exc).encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
    return code, reason


async def _handle(_request: Request, exc: Exception) -> Response:
    return error_response(exc)


EXCEPTION_HANDLERS: Final[Mapping[type[Exception], Callable[..., Awaitable[Response]]]] = {
    HTTPException: _handle,
    CapeError: _handle,
    Exception: _handle,
}
"""Pass as ``Starlette(exception_handlers=dict(EXCEPTION_HANDLERS))``.

Starlette runs the ``Exception`` handler in its outermost middleware and then re-raises for
the server to log; :func:`cape.host.api.rest.create_rest_routes` therefore also converts
exceptions inside its endpoints, so those never reach that path.
"""
