"""The error table: one row per exception class, the generic 500, and Starlette wiring."""

from __future__ import annotations

import json
import logging

import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from cape.errors import (
    CapeError,
    DecryptionError,
    FormatError,
    KeyFormatError,
    LimitExceededError,
    VerificationError,
)
from cape.host.admission import QuotaExceededError, ServerBusyError
from cape.host.api.errors import (
    EXCEPTION_HANDLERS,
    INTERNAL_ERROR_TEXT,
    BodyTooLargeError,
    ClientTooSlowError,
    close_code_for,
    error_response,
)
from cape.host.errors import (
    AuthError,
    ConflictError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    UnavailableError,
)

SECRET = "hunter2-secret-detail"


def body_of(response: Response) -> dict[str, str]:
    data = json.loads(bytes(response.body))
    assert isinstance(data, dict)
    return data


@pytest.mark.parametrize(
    ("exc", "status", "close"),
    [
        (BodyTooLargeError("request body", 10, 11), 413, 1009),
        (ClientTooSlowError("too slow"), 408, 1008),
        (ServerBusyError("too many sessions"), 503, 1013),
        (FormatError("bad frame"), 400, 1008),
        (KeyFormatError("bad key"), 400, 1008),
        (DecryptionError("could not decrypt"), 400, 1008),
        (LimitExceededError("input", 10, 11), 400, 1008),
        (AuthError("invalid token"), 401, 1008),
        (ForbiddenError("not yours"), 403, 1008),
        (RateLimitedError("slow down", retry_after_s=3.0), 429, 1013),
        (NotFoundError("no such function"), 404, 1008),
        (ConflictError("username taken"), 409, 1008),
        (VerificationError("bad document"), 400, 1008),
        (CapeError("other"), 400, 1008),
    ],
)
def test_table_rows(exc: Exception, status: int, close: int) -> None:
    response = error_response(exc)
    assert response.status_code == status
    assert response.media_type == "application/json"
    assert body_of(response) == {"error": str(exc)}
    assert close_code_for(exc) == (close, str(exc))


def test_diagnostics_is_the_text() -> None:
    exc = FormatError("two\n  lines")
    assert body_of(error_response(exc)) == {"error": "two lines"}


def test_rate_limited_sets_retry_after_in_whole_seconds() -> None:
    response = error_response(RateLimitedError("slow down", retry_after_s=2.2))
    assert response.headers["retry-after"] == "3"
    assert "www-authenticate" not in response.headers


def test_admission_refusals_set_retry_after() -> None:
    assert error_response(ServerBusyError("busy", retry_after_s=4.5)).headers["retry-after"] == "5"
    quota = error_response(QuotaExceededError("too many", retry_after_s=5))
    assert quota.status_code == 429 and quota.headers["retry-after"] == "5"
    assert "retry-after" not in error_response(UnavailableError("shutting down")).headers


def test_unauthenticated_sets_www_authenticate_but_forbidden_does_not() -> None:
    assert error_response(AuthError("x")).headers["www-authenticate"] == "Bearer"
    assert "www-authenticate" not in error_response(ForbiddenError("x")).headers


@pytest.mark.parametrize("exc", [RuntimeError(SECRET), KeyError(SECRET), ValueError(SECRET)])
def test_unknown_exceptions_are_a_generic_500(
    exc: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="cape.host.api.errors"):
        response = error_response(exc)
    assert response.status_code == 500
    assert body_of(response) == {"error": INTERNAL_ERROR_TEXT}
    assert SECRET not in bytes(response.body).decode()
    assert close_code_for(exc) == (1011, INTERNAL_ERROR_TEXT)
    # The traceback goes to the logger, at debug level only.
    records = [r for r in caplog.records if r.exc_info]
    assert records
    assert all(r.levelno == logging.DEBUG for r in records)


def test_http_exception_keeps_its_status() -> None:
    response = error_response(HTTPException(405, "Method Not Allowed", {"Allow": "GET"}))
    assert response.status_code == 405
    assert response.headers["allow"] == "GET"
    assert body_of(response) == {"error": "Method Not Allowed"}
    assert close_code_for(HTTPException(404)) == (1008, "Not Found")


def test_close_reason_fits_a_close_frame() -> None:
    code, reason = close_code_for(FormatError("é" * 200))
    assert code == 1008
    assert len(reason.encode()) <= 123
    assert reason == "é" * 61


def test_installed_as_starlette_handlers() -> None:
    async def forbidden(_request: Request) -> Response:
        raise ForbiddenError("not yours")

    async def crash(_request: Request) -> Response:
        raise RuntimeError(SECRET)

    app = Starlette(
        routes=[Route("/forbidden", forbidden), Route("/crash", crash)],
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/forbidden")
        assert (response.status_code, response.json()) == (403, {"error": "not yours"})
        response = client.get("/crash")
        assert (response.status_code, response.json()) == (500, {"error": INTERNAL_ERROR_TEXT})
        assert SECRET not in response.text
        response = client.get("/nowhere")
        assert (response.status_code, response.json()) == (404, {"error": "Not Found"})
