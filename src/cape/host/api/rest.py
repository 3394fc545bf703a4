"""The REST routes (protocol.md "REST", cape-reference.md §3.8).

=====================================  =======================================================
route                                  result
=====================================  =======================================================
``POST /v1/signup``                    201 ``{"access_token","token_type","expires_at",
                                       "user_id","username"}`` · 403 · 409 · 429 · 503
``POST /v1/login``                     200, same shape · 401 · 429 · 503
``GET /v1/functions?limit&offset``     200 ``[{"id","name","created_at","checksum","public"}]``
``GET /v1/functions/{id}``             200 that object · 404 · 403
``DELETE /v1/functions/{id}``          200 ``{"id"}`` · 404 · 403
``POST /v1/token``                     201 ``{"token","id"}``
``GET /v1/tokens``                     200 ``[{"id","name","description","created_at",
                                       "expiry"?,"last_used"?,"function_id"?}]``
``DELETE /v1/token/{id}``              200 ``{"id"}`` · 404
``GET /v1/user/{username}/key``        200 ``{"attestation_document": b64}`` · 404 (no auth)
``GET /v1/attestation/root``           the root certificate PEM (no auth)
``GET /v1/runtime``                    200 ``{"python_version","implementation","abi",
                                       "platforms","max_input_bytes"}`` (no auth)
=====================================  =======================================================

Decisions:

- Authentication is ``Authorization: Bearer <token>`` (login access tokens and personal access
  tokens alike). Errors are ``{"error": ...}`` with statuses from :mod:`cape.host.api.errors`.
- ``GET /v1/functions/{id}`` answers whoever may run the function (:func:`authorize_run`):
  the owner, a token scoped to that function, and, for a public function, any authenticated
  caller. Another user's private function gets exactly the answer of a missing one (404
  ``{"error": "no such function"}``), here, on ``DELETE`` and on the run routes; 403 is only
  for what the caller may see but not do (another user's public function, a token scoped to
  another function). Listing, deleting and token routes are account actions: a
  function-scoped token gets 403 there.
- ``POST /v1/signup`` takes ``{"username","password"}`` and, on an invite-only server,
  ``"invite"``. The signup mode (open, invite, closed) refuses with 403 ``{"error"}``; too many
  signups from one address, or failed logins, get 429 with ``Retry-After``
  (:mod:`cape.host.ratelimit`). When the server is already hashing as many passwords as it
  takes and its short queue is full, a signup or login gets 503 with ``Retry-After`` at once
  (:mod:`cape.host.hashgate`). The client address is the TCP peer, or the
  ``X-Forwarded-For`` address when the peer is a proxy the operator listed: the ASGI server
  decides that (``cape serve --forwarded-allow-ips``), never this module.
- ``expiry`` on ``POST /v1/token`` is either an RFC 3339 timestamp with an offset (what Cape's
  CLI sends, e.g. ``2030-01-01T00:00:00Z``) or a whole number of seconds from now; absent or
  ``null`` means the token never expires. ``function_id`` absent, ``null`` or ``""`` means an
  unscoped token.
- Times are RFC 3339 UTC with whole seconds (``2025-03-01T12:00:00Z``).
- Bodies are JSON objects of at most :attr:`ApiDeps.max_body_bytes` (64 KiB): larger ones get
  413, anything that is not a JSON object or has wrongly typed fields 400.
- ``GET /v1/runtime`` describes the enclave's Python (:class:`RuntimeTarget`) so that
  ``cape deploy`` can vendor ``requirements.txt`` wheels that fit it.
- Blocking work (argon2, the database) runs in Starlette's thread pool. Nothing here logs
  request bodies, tokens or passwords.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cape._internal.timefile import utc_now
from cape.errors import FormatError
from cape.formats.runtime import RuntimeTarget
from cape.host.api.errors import BodyTooLargeError, error_response
from cape.host.auth import (
    NOT_FOUND_TEXT,
    Accounts,
    IssuedToken,
    Principal,
    authorize_account,
    authorize_owner,
    authorize_run,
)
from cape.host.errors import AuthError, NotFoundError
from cape.host.hashgate import PasswordHashGate
from cape.host.store.blobs import BlobStore
from cape.host.store.deploys import delete_deploy
from cape.host.store.metadata import Function, MetadataStore, Token, User

__all__ = ["DEFAULT_MAX_BODY_BYTES", "ApiDeps", "create_rest_routes"]

DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024
DEFAULT_PAGE_SIZE: Final = 100
MAX_OFFSET: Final = 2**53
_MAX_EXPIRY_S: Final = 10 * 366 * 24 * 3600
PEM_MEDIA_TYPE: Final = "application/x-pem-file"

_T = TypeVar("_T")
logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ApiDeps:
    """What the REST routes need.

    ``key_documents(username)`` returns the stored attestation document of that user's Cape
    key, or ``None`` if there is none (it may create the document for an existing user).
    ``on_signup(user)`` runs after an account is created (``cape serve`` creates the user's
    key document there); its failure is logged, not reported, since the account exists.
    ``clock`` is the time tokens are checked at. ``runtime`` is the enclave's Python, which
    ``GET /v1/runtime`` reports: by default this host's interpreter, which is right in
    simulated mode, where enclaves run this same interpreter; with Nitro it must come from
    the enclave image.
    """

    store: MetadataStore
    blobs: BlobStore
    accounts: Accounts
    attestation_root_pem: bytes
    key_documents: Callable[[str], Awaitable[bytes | None]]
    on_signup: Callable[[User], Awaitable[None]] | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    clock: Callable[[], dt.datetime] = field(default=utc_now)
    runtime: RuntimeTarget = field(default_factory=RuntimeTarget.local)
    max_input_bytes: int = 64 << 20
    """The largest function input a session accepts (``GET /v1/runtime`` tells clients, so
    that ``cape encrypt`` writes a form ``cape run`` can send)."""
    hash_gate: PasswordHashGate = field(default_factory=PasswordHashGate)
    """Where signups and logins hash passwords (bounded; beyond its queue, 503)."""


# --------------------------------------------------------------------------- helpers


def _rfc3339(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization")
    if not header:
        raise AuthError("missing bearer token: send 'Authorization: Bearer <token>'")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthError("malformed Authorization header: expected 'Bearer <token>'")
    return token


async def _principal(deps: ApiDeps, request: Request) -> Principal:
    token = _bearer(request)
    return await run_in_threadpool(deps.accounts.authenticate, token, now=deps.clock())


async def _json_object(deps: ApiDeps, request: Request) -> dict[str, Any]:
    """The request body as a JSON object, read up to the size limit.

    Raises:
        BodyTooLargeError: the body is longer than ``deps.max_body_bytes``.
        FormatError: not UTF-8 JSON, or not an object.
    """
    limit = deps.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError("request body", limit, int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError("request body", limit)
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise FormatError("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise FormatError("the request body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type[_T], *, required: bool = True) -> _T | None:
    """``body[name]`` if it has type ``kind``; ``None`` if absent/null and not required."""
    value = body.get(name)
    if value is None:
        if required:
            raise FormatError(f"the field {name!r} is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FormatError(f"the field {name!r} must be a {_TYPE_NAMES.get(kind, kind.__name__)}")
    return value


_TYPE_NAMES: Final[dict[type, str]] = {str: "string", int: "integer", bool: "boolean"}


def _required_str(body: dict[str, Any], name: str) -> str:
    value = _field(body, name, str)
    assert value is not None
    return value


def _expiry(value: object, now: dt.datetime) -> dt.timedelta | None:
    """An ``expiry`` field as a lifetime: RFC 3339 timestamp, whole seconds, or null."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 < value <= _MAX_EXPIRY_S:
            raise FormatError("an expiry in seconds must be positive and at most ten years")
        return dt.timedelta(seconds=value)
    if isinstance(value, str):
        try:
            when = dt.datetime.fromisoformat(value)
        except ValueError:
            raise FormatError("expiry must be an RFC 3339 timestamp or seconds") from None
        if when.tzinfo is None:
            raise FormatError("an expiry timestamp needs a UTC offset, e.g. a trailing 'Z'")
        lifetime = when - now
        if lifetime <= dt.timedelta(0):
            raise FormatError("the expiry lies in the past")
        return lifetime
    raise FormatError("expiry must be an RFC 3339 timestamp or an integer of seconds")


def _query_int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise FormatError(f"{name} must be an integer") from None
    if abs(value) > MAX_OFFSET:
        raise FormatError(f"{name} is out of range")
    return value


def _function_json(function: Function) -> dict[str, Any]:
    return {
        "id": function.id,
        "name": function.name,
        "created_at": _rfc3339(function.created_at),
        "checksum": function.checksum,
        "public": function.public,
    }


def _token_json(token: Token) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": token.id,
        "name": token.name,
        "description": token.description,
        "created_at": _rfc3339(token.created_at),
    }
    if token.expires_at is not None:
        out["expiry"] = _rfc3339(token.expires_at)
    if token.last_used is not None:
        out["last_used"] = _rfc3339(token.last_used)
    if token.function_id is not None:
        out["function_id"] = token.function_id
    return out


def _session_json(issued: IssuedToken, user_id: str, username: str) -> dict[str, Any]:
    return {
        "access_token": issued.token,
        "token_type": "Bearer",
        "expires_at": None if issued.expires_at is None else _rfc3339(issued.expires_at),
        "user_id": user_id,
        "username": username,
    }


def _client(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


Endpoint = Callable[[Request], Awaitable[Response]]


def _guarded(endpoint: Endpoint) -> Endpoint:
    """Turn every exception of ``endpoint`` into its error response (see api.errors)."""

    async def guarded(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Exception as exc:  # every failure gets the table's answer
            return error_response(exc)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded


# --------------------------------------------------------------------------- routes


def create_rest_routes(deps: ApiDeps) -> list[Route]:
    """The REST routes over ``deps`` (see the module docstring)."""
    store, accounts = deps.store, deps.accounts

    def _login(username: str, password: str, client: str) -> dict[str, Any]:
        issued = accounts.login(username, password, client=client)
        user = store.get_user_by_name(username)
        if user is None:  # deleted between the two calls
            raise AuthError("invalid username or password")
        return _session_json(issued, user.id, user.username)

    async def signup(request: Request) -> Response:
        body = await _json_object(deps, request)
        username, password = _required_str(body, "username"), _required_str(body, "password")
        invite = _field(body, "invite", str, required=False)
        client = _client(request)

        def run() -> tuple[User, dict[str, Any]]:
            user = accounts.signup(username, password, client=client, invite=invite)
            return user, _login(username, password, client)

        user, result = await deps.hash_gate.run(run)
        if deps.on_signup is not None:
            try:
                await deps.on_signup(user)
            except Exception:  # the account exists; the hook's work can be redone later
                logger.warning("post-signup step failed for %s", username, exc_info=True)
        return JSONResponse(result, status_code=201)

    async def login(request: Request) -> Response:
        body = await _json_object(deps, request)
        username, password = _required_str(body, "username"), _required_str(body, "password")
        client = _client(request)
        result = await deps.hash_gate.run(lambda: _login(username, password, client))
        return JSONResponse(result)

    def _function_for(function_id: str) -> Function:
        function = store.get_function(function_id)
        if function is None:
            raise NotFoundError(NOT_FOUND_TEXT)
        return function

    async def list_functions(request: Request) -> Response:
        principal = await _principal(deps, request)
        authorize_account(principal)
        limit = _query_int(request, "limit", DEFAULT_PAGE_SIZE)
        offset = _query_int(request, "offset", 0)
        functions = await run_in_threadpool(
            store.list_functions, principal.user.id, limit=limit, offset=offset
        )
        return JSONResponse([_function_json(f) for f in functions])

    async def get_function(request: Request) -> Response:
        principal = await _principal(deps, request)
        function = await run_in_threadpool(_function_for, request.path_params["id"])
        authorize_run(principal, function)
        return JSONResponse(_function_json(function))

    async def delete_function(request: Request) -> Response:
        principal = await _principal(deps, request)
        authorize_account(principal)

        def run() -> str:
            function = _function_for(request.path_params["id"])
            authorize_owner(principal, function)
            if delete_deploy(store, deps.blobs, function.id) is None:
                raise NotFoundError(NOT_FOUND_TEXT)
            return function.id

        return JSONResponse({"id": await run_in_threadpool(run)})

    async def create_token(request: Request) -> Response:
        principal = await _principal(deps, request)
        authorize_account(principal)
        body = await _json_object(deps, request)
        name = _required_str(body, "name")
        description = _field(body, "description", str, required=False) or ""
        function_id = _field(body, "function_id", str, required=False) or None
        expiry = _expiry(body.get("expiry"), deps.clock())
        issued = await run_in_threadpool(
            accounts.create_token, principal.user, name, description, function_id, expiry
        )
        return JSONResponse({"token": issued.token, "id": issued.id}, status_code=201)

    async def list_tokens(request: Request) -> Response:
        principal = await _principal(deps, request)
        authorize_account(principal)
        tokens = await run_in_threadpool(accounts.list_tokens, principal.user)
        return JSONResponse([_token_json(t) for t in tokens])

    async def delete_token(request: Request) -> Response:
        principal = await _principal(deps, request)
        authorize_account(principal)
        token_id = request.path_params["id"]
        await run_in_threadpool(accounts.delete_token, principal.user, token_id)
        return JSONResponse({"id": token_id})

    async def user_key(request: Request) -> Response:
        username = request.path_params["username"]
        document = await deps.key_documents(username)
        if document is None:
            raise NotFoundError("no key document for that user")
        return JSONResponse({"attestation_document": base64.b64encode(document).decode()})

    async def attestation_root(_request: Request) -> Response:
        return Response(deps.attestation_root_pem, media_type=PEM_MEDIA_TYPE)

    runtime_json = {**deps.runtime.to_json(), "max_input_bytes": deps.max_input_bytes}

    async def runtime(_request: Request) -> Response:
        return JSONResponse(runtime_json)

    return [
        Route("/v1/signup", _guarded(signup), methods=["POST"]),
        Route("/v1/login", _guarded(login), methods=["POST"]),
        Route("/v1/functions", _guarded(list_functions), methods=["GET"]),
        Route("/v1/functions/{id}", _guarded(get_function), methods=["GET"]),
        Route("/v1/functions/{id}", _guarded(delete_function), methods=["DELETE"]),
        Route("/v1/token", _guarded(create_token), methods=["POST"]),
        Route("/v1/tokens", _guarded(list_tokens), methods=["GET"]),
        Route("/v1/token/{id}", _guarded(delete_token), methods=["DELETE"]),
        Route("/v1/user/{username}/key", _guarded(user_key), methods=["GET"]),
        Route("/v1/attestation/root", _guarded(attestation_root), methods=["GET"]),
        Route("/v1/runtime", _guarded(runtime), methods=["GET"]),
    ]
