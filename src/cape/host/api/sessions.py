"""The websocket routes: key, deploy, run and test sessions relayed to enclaves.

=================================  ====================================================
route                              session
=================================  ====================================================
``/v1/key``                        the caller's key document (their Cape key)
``/v1/deploy``                     store a function: ``cape:`` bundle → id, checksum
``/v1/run/{id}``                   run a function by id, many inputs per connection
``/v1/run/{user}/{name}``          the same, by name (newest deploy of that name)
``/v1/test``                       HPKE(zip) then inputs; nothing stored
=================================  ====================================================

Authentication is the subprotocol pair ``cape.runtime``, ``<token>`` (one comma-separated
header or two header lines; an ``Authorization: Bearer`` header also works). The server
selects ``cape.runtime`` and never echoes the token. A refused upgrade gets the HTTP status
and ``{"error": …}`` of :mod:`cape.host.api.errors`.

The key service knows a user by their username (canonical, lower case, never reused: there is
no account deletion); functions run with their owner's key.

The server reads only what it must: the nonce frame (nonce and optional response key) and,
on deploy, the function-info frame. Inputs, results and bundles pass through as ciphertext.
Every client frame gets its reply before the next one is read, so neither a slow client nor
a slow enclave makes the server buffer more than one message per session (the ASGI server
stops reading a socket while a message waits). Errors:

- a function error (or a bad ``cape:`` input) is ``{"error": …}`` and the session goes on;
- a protocol error is ``{"error": …}``, then close 1008; an enclave failure close 1011;
- an idle session (no frame for ``idle_timeout_s``) is closed with 1000;
- at shutdown an idle session gets ``{"error": "the server is shutting down"}`` and close
  1001; a call in progress finishes first, and a deploy in progress is committed first.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import queue
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketState

from cape._internal.timefile import utc_now
from cape.errors import CapeError, FormatError, LimitExceededError, TransportError
from cape.host.api.errors import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    BodyTooLargeError,
    close_code_for,
    error_body,
    error_response,
)
from cape.host.auth import Accounts, Principal, authorize_account, authorize_run
from cape.host.errors import AuthError, NotFoundError, UnavailableError
from cape.host.ids import is_id, new_id
from cape.host.launcher import HostSession, expect
from cape.host.pool import EnclavePool
from cape.host.store.blobs import BlobStore
from cape.host.store.deploys import record_deploy
from cape.host.store.metadata import Function, MetadataStore, User, check_function_name

__all__ = ["Lifecycle", "SessionDeps", "create_session_routes"]

log = logging.getLogger("cape.host.sessions")

SUBPROTOCOL: Final = "cape.runtime"
MAX_NONCE_BYTES: Final = 1024
MAX_TEXT_FRAME_BYTES: Final = 64 * 1024
CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
SHUTDOWN_TEXT: Final = "the server is shutting down"
MAX_CHUNK_BYTES: Final = 8 << 20
#: Chunks a single-frame (Cape client) bundle is cut into for the enclave: small enough that
#: the enclave's transient frame copies stay a few percent of a 100 MiB bundle.
ENCLAVE_CHUNK_BYTES: Final = 1 << 20
DIGEST_CACHE_SIZE: Final = 4096
QUEUED_CHUNKS: Final = 2


class Lifecycle:
    """Counts live sessions and tells them when the server starts draining."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.contextmanager
    def track(self) -> Any:
        self.active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def drain(self, timeout_s: float) -> bool:
        """Ask sessions to end; wait up to ``timeout_s``. True if all ended."""
        self.draining.set()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


@dataclass
class SessionDeps:
    """What the websocket routes need."""

    store: MetadataStore
    blobs: BlobStore
    accounts: Accounts
    pool: EnclavePool
    lifecycle: Lifecycle = field(default_factory=Lifecycle)
    idle_timeout_s: float = 120.0
    max_input_bytes: int = 64 << 20
    max_bundle_bytes: int = 1_000_000_000
    clock: Callable[[], dt.datetime] = field(default=utc_now)
    bundle_digests: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    """SHA-256 of stored ciphertexts by blob key, learnt on a function's first run (blobs are
    immutable: a redeploy gets a new key)."""

    def __post_init__(self) -> None:
        if self.idle_timeout_s < 60:
            raise ValueError("the idle timeout may not be below 60 s (pycape expects it)")

    def remember_digest(self, blob_key: str, digest: bytes) -> None:
        self.bundle_digests[blob_key] = digest
        self.bundle_digests.move_to_end(blob_key)
        while len(self.bundle_digests) > DIGEST_CACHE_SIZE:
            self.bundle_digests.popitem(last=False)


class _Closed(Exception):
    """The client went away (or we closed the socket): stop quietly."""


class _Idle(Exception):
    """No frame within the idle timeout."""


class _Draining(Exception):
    """The server is shutting down."""


# --------------------------------------------------------------------------- client frames


def _token(websocket: WebSocket) -> str:
    offered: list[str] = list(websocket.scope.get("subprotocols") or [])
    others = [p for p in offered if p != SUBPROTOCOL]
    if SUBPROTOCOL in offered and others:
        return others[0]
    header = websocket.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    raise AuthError(f"missing token: offer the subprotocols '{SUBPROTOCOL}' and your token")


async def _receive(websocket: WebSocket, lifecycle: Lifecycle, timeout_s: float) -> str | bytes:
    """The next client frame; raises _Closed, _Idle or _Draining instead."""
    receive = asyncio.ensure_future(websocket.receive())
    drain = asyncio.ensure_future(lifecycle.draining.wait())
    try:
        done, _ = await asyncio.wait(
            {receive, drain}, timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
    finally:
        drain.cancel()
    if receive not in done:
        receive.cancel()
        with contextlib.suppress(BaseException):
            await receive
        raise _Draining() if drain in done else _Idle()
    message = receive.result()
    if message["type"] == "websocket.disconnect":
        raise _Closed()
    if message.get("bytes") is not None:
        data: bytes = message["bytes"]
        return data
    text: str = message.get("text") or ""
    return text


def _json_message(frame: str | bytes, what: str) -> dict[str, Any]:
    """``{"message": {...}}`` from a text frame."""
    if not isinstance(frame, str):
        raise FormatError(f"expected the {what} as a text frame, got a binary frame")
    if len(frame) > MAX_TEXT_FRAME_BYTES:
        raise BodyTooLargeError(f"{what} frame size in bytes", MAX_TEXT_FRAME_BYTES, len(frame))
    try:
        parsed = json.loads(frame)
    except ValueError:
        raise FormatError(f"the {what} frame is not JSON") from None
    message = parsed.get("message") if isinstance(parsed, dict) else None
    if not isinstance(message, dict):
        raise FormatError(f'the {what} frame must be {{"message": {{...}}}}')
    return message


def _b64_field(message: dict[str, Any], name: str, limit: int) -> bytes | None:
    value = message.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FormatError(f"'{name}' must be a base64 string")
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"'{name}' is not valid base64") from None
    if len(decoded) > limit:
        raise LimitExceededError(f"{name} size in bytes", limit, len(decoded))
    return decoded


def _nonce_frame(frame: str | bytes) -> tuple[bytes, bytes | None]:
    message = _json_message(frame, "nonce")
    nonce = _b64_field(message, "nonce", MAX_NONCE_BYTES)
    if nonce is None:
        raise FormatError("the first frame must carry 'nonce'")
    return nonce, _b64_field(message, "response_key", 64)


def _binary(frame: str | bytes, what: str, limit: int) -> bytes:
    if not isinstance(frame, bytes):
        raise FormatError(f"expected the {what} as a binary frame, got a text frame")
    if len(frame) > limit:
        raise LimitExceededError(f"{what} size in bytes", limit, len(frame))
    return frame


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- relaying


async def _send(websocket: WebSocket, payload: dict[str, Any]) -> None:
    try:
        await websocket.send_text(json.dumps(payload, separators=(",", ":")))
    except (OSError, RuntimeError) as exc:
        raise _Closed() from exc


async def _close(websocket: WebSocket, code: int, reason: str = "") -> None:
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(OSError, RuntimeError):
            await websocket.close(code, reason)


async def _attestation(
    websocket: WebSocket, session: HostSession, frame: dict[str, Any] | None = None
) -> None:
    frame = expect(frame if frame is not None else await session.receive(), "attestation")
    await _send(
        websocket,
        {"message": {"type": "attestation_doc", "message": _b64(frame["document"])}},
    )


class _EnclaveSaid(CapeError):
    """A fatal error frame from the enclave: the session is over."""


async def _reply(websocket: WebSocket, session: HostSession) -> bool:
    """Relay the enclave's answer to one call. False when the enclave ended the session."""
    message = await session.receive()
    kind = message["t"]
    if kind == "result":
        payload: dict[str, Any] = {"type": "function_result", "message": _b64(message["data"])}
        if message.get("encrypted"):
            payload["encrypted"] = True
        await _send(websocket, {"message": payload})
        return True
    if kind == "error":
        if message.get("fatal"):
            raise _EnclaveSaid(str(message.get("message", "enclave error")))
        reply: dict[str, Any] = {"error": str(message.get("message", "function error"))}
        if isinstance(message.get("sealed"), bytes):  # our extension: details for the client
            reply["sealed"] = _b64(message["sealed"])
        await _send(websocket, reply)
        return True
    if kind == "close":
        return False
    raise FormatError(f"unexpected {kind!r} frame from the enclave")


async def _serve_calls(
    websocket: WebSocket, session: HostSession, deps: SessionDeps, *, bundle_first: bool
) -> None:
    """run/test: each binary frame is one call and gets exactly one reply, in order."""
    first = bundle_first
    while True:
        try:
            frame = await _receive(websocket, deps.lifecycle, deps.idle_timeout_s)
        except _Idle:
            await _close(websocket, CLOSE_NORMAL, "idle timeout")
            return
        limit = deps.max_bundle_bytes if first else deps.max_input_bytes
        data = _binary(frame, "test bundle" if first else "input", limit)
        if first:
            await session.send({"t": "bundle", "data": data})
            first = False
            continue
        await session.send({"t": "input", "data": data})
        if not await _reply(websocket, session):
            await _close(websocket, CLOSE_NORMAL)
            return


class _Abort(Exception):
    """Stops the blob writer thread of a chunked deploy (its temp file is removed)."""


def _queued(chunks: queue.Queue[bytes | _Abort | None]) -> Iterator[bytes]:
    while (item := chunks.get()) is not None:
        if isinstance(item, _Abort):
            raise item
        yield item


async def _receive_chunks(
    websocket: WebSocket,
    session: HostSession,
    deps: SessionDeps,
    size: int,
    blob_key: str,
) -> None:
    """Relay ``size`` bytes of binary frames to the enclave and, through a bounded queue, to
    the blob writer thread: the server holds a few chunks, never the bundle."""
    chunks: queue.Queue[bytes | _Abort | None] = queue.Queue(maxsize=QUEUED_CHUNKS)
    writer = asyncio.ensure_future(
        asyncio.to_thread(deps.blobs.put_stream, blob_key, _queued(chunks), max_bytes=size)
    )
    try:
        received = 0
        while received < size:
            frame = await _receive(websocket, deps.lifecycle, deps.idle_timeout_s)
            piece = _binary(frame, "bundle chunk", min(MAX_CHUNK_BYTES, size - received))
            if not piece:
                raise FormatError("bundle chunks must not be empty")
            await session.send({"t": "chunk", "data": piece})
            await asyncio.to_thread(chunks.put, piece)
            received += len(piece)
        await asyncio.to_thread(chunks.put, None)
        await writer
    except BaseException:
        if not writer.done():
            await asyncio.to_thread(chunks.put, _Abort())
        with contextlib.suppress(Exception):
            await writer
        with contextlib.suppress(OSError):
            await asyncio.to_thread(deps.blobs.delete, blob_key)
        raise


async def _deploy(
    websocket: WebSocket, session: HostSession, deps: SessionDeps, owner: User
) -> None:
    """Function info, then the bundle: one binary frame (Cape's protocol), or, when the info
    announces ``bundle_size`` (our SDK), binary frames of at most 8 MiB adding up to it."""
    info = _json_message(
        await _receive(websocket, deps.lifecycle, deps.idle_timeout_s), "function info"
    )
    name = check_function_name(info.get("function_name"))
    public = info.get("public", False)
    if not isinstance(public, bool):
        raise FormatError("'public' must be true or false")
    size = info.get("bundle_size")
    blob_key = new_id()
    if size is None:
        bundle = _binary(
            await _receive(websocket, deps.lifecycle, deps.idle_timeout_s),
            "bundle",
            deps.max_bundle_bytes,
        )
        # The websocket layer hands over the whole frame; the enclave still gets it in chunks,
        # so it assembles and decrypts one copy in place (as for our SDK's chunked deploys).
        await session.send({"t": "bundle", "size": len(bundle), "name": name, "public": public})
        view = memoryview(bundle)
        try:
            for start in range(0, len(view), ENCLAVE_CHUNK_BYTES):
                await session.send(
                    {"t": "chunk", "data": bytes(view[start : start + ENCLAVE_CHUNK_BYTES])}
                )
        finally:
            view.release()
        stored: int = await run_in_threadpool(
            deps.blobs.put_stream, blob_key, [bundle], max_bytes=deps.max_bundle_bytes
        )
        del bundle
    else:
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise FormatError("'bundle_size' must be a positive integer")
        if size > deps.max_bundle_bytes:
            raise LimitExceededError("bundle size in bytes", deps.max_bundle_bytes, size)
        await session.send({"t": "bundle", "size": size, "name": name, "public": public})
        await _receive_chunks(websocket, session, deps, size, blob_key)
        stored = size
    try:
        deployed = expect(await session.receive(), "deployed")
        function = await run_in_threadpool(
            functools.partial(
                record_deploy,
                deps.store,
                deps.blobs,
                owner=owner,
                name=name,
                checksum=deployed["checksum"],
                public=public,
                blob_key=blob_key,
                size=stored,
            )
        )
    except BaseException:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(deps.blobs.delete, blob_key)
        raise
    log.info("deployed function %s (%s/%s)", function.id, owner.username, name)
    await _send(
        websocket,
        {"message": {"id": function.id, "checksum": function.checksum, "name": function.name}},
    )
    await _close(websocket, CLOSE_NORMAL)


# --------------------------------------------------------------------------- routes


Handler = Callable[[WebSocket, Principal], Awaitable[None]]
Body = Callable[[WebSocket, HostSession, User], Awaitable[None]]


def create_session_routes(deps: SessionDeps) -> list[WebSocketRoute]:
    """The websocket routes over ``deps`` (see the module docstring)."""

    async def authenticate(websocket: WebSocket) -> Principal:
        token = _token(websocket)
        return await run_in_threadpool(deps.accounts.authenticate, token, now=deps.clock())

    def resolve(websocket: WebSocket, principal: Principal) -> Function:
        params = websocket.path_params
        if "id" in params:
            function_id = params["id"]
            function = deps.store.get_function(function_id) if is_id(function_id) else None
        else:
            try:
                function = deps.store.resolve_function(params["user"], params["name"])
            except FormatError:
                function = None
        if function is None:
            raise NotFoundError("no such function")
        authorize_run(principal, function)
        return function

    async def nonce(websocket: WebSocket) -> tuple[bytes, bytes | None]:
        return _nonce_frame(await _receive(websocket, deps.lifecycle, deps.idle_timeout_s))

    def account_session(kind: str, body: Body) -> Handler:
        """key, deploy, test: the caller's own account (no function-scoped tokens), their key."""

        async def serve(websocket: WebSocket, principal: Principal) -> None:
            authorize_account(principal)
            nonce_bytes, response_key = await nonce(websocket)
            async with deps.pool.session(
                kind, owner=principal.user.username, nonce=nonce_bytes, response_key=response_key
            ) as session:
                await _attestation(websocket, session)
                await body(websocket, session, principal.user)

        return serve

    async def key(websocket: WebSocket, session: HostSession, _user: User) -> None:
        expect(await session.receive(), "close")
        await _close(websocket, CLOSE_NORMAL)

    async def deploy(websocket: WebSocket, session: HostSession, user: User) -> None:
        await _deploy(websocket, session, deps, user)

    async def test(websocket: WebSocket, session: HostSession, _user: User) -> None:
        await _serve_calls(websocket, session, deps, bundle_first=True)

    def run_handler(function: Function) -> Handler:
        async def run(websocket: WebSocket, principal: Principal) -> None:
            nonce_bytes, response_key = await nonce(websocket)
            # The enclave is told the stored ciphertext's SHA-256 and asks for the bytes only
            # when it does not hold the function warm; the first run reads them to learn it.
            digest = deps.bundle_digests.get(function.blob_key)
            bundle = None
            if digest is None:
                bundle = await run_in_threadpool(deps.blobs.get, function.blob_key)
                digest = hashlib.sha256(bundle).digest()
                deps.remember_digest(function.blob_key, digest)
            async with deps.pool.session(
                "run",
                owner=function.owner_name,
                caller=principal.user.username,  # the enclave's fair share (its lanes)
                nonce=nonce_bytes,
                response_key=response_key,
                bundle=bundle,
                bundle_sha256=digest,
                affinity=function.id,
            ) as session:
                del bundle
                frame = await session.receive()
                if frame["t"] == "need_bundle":
                    stored = await run_in_threadpool(deps.blobs.get, function.blob_key)
                    await session.send({"t": "bundle", "data": stored})
                    del stored
                    frame = await session.receive()
                await _attestation(websocket, session, frame)
                await _serve_calls(websocket, session, deps, bundle_first=False)

        return run

    def endpoint(handler: Handler | None) -> Callable[[WebSocket], Awaitable[None]]:
        async def serve(websocket: WebSocket) -> None:
            try:
                if deps.lifecycle.draining.is_set():
                    raise UnavailableError(SHUTDOWN_TEXT)
                principal = await authenticate(websocket)
                chosen = handler
                if chosen is None:
                    chosen = run_handler(await run_in_threadpool(resolve, websocket, principal))
            except Exception as exc:  # refuse the upgrade with the table's status and body
                await _deny(websocket, exc)
                return
            await websocket.accept(subprotocol=SUBPROTOCOL)
            with deps.lifecycle.track():
                await _guard(websocket, chosen(websocket, principal))

        return serve

    return [
        WebSocketRoute("/v1/key", endpoint(account_session("key", key))),
        WebSocketRoute("/v1/deploy", endpoint(account_session("deploy", deploy))),
        WebSocketRoute("/v1/test", endpoint(account_session("test", test))),
        WebSocketRoute("/v1/run/{id}", endpoint(None)),
        WebSocketRoute("/v1/run/{user}/{name}", endpoint(None)),
    ]


async def _deny(websocket: WebSocket, exc: Exception) -> None:
    if "websocket.http.response" in (websocket.scope.get("extensions") or {}):
        await websocket.send_denial_response(error_response(exc))
    else:  # the server cannot answer the upgrade with a body: close before accepting
        code, reason = close_code_for(exc)
        await websocket.close(code, reason)


async def _guard(websocket: WebSocket, work: Awaitable[None]) -> None:
    """Run one accepted session; every failure becomes an error frame and a close code."""
    try:
        await work
    except _Closed:
        pass
    except _Idle:
        await _close(websocket, CLOSE_NORMAL, "idle timeout")
    except _Draining:
        with contextlib.suppress(_Closed):
            await _send(websocket, {"error": SHUTDOWN_TEXT})
        await _close(websocket, CLOSE_GOING_AWAY, SHUTDOWN_TEXT)
    except _EnclaveSaid as exc:
        with contextlib.suppress(_Closed):
            await _send(websocket, {"error": str(exc)})
        await _close(websocket, CLOSE_POLICY_VIOLATION, str(exc)[:120])
    except TransportError as exc:  # the enclave died or the pool has none
        with contextlib.suppress(_Closed):
            await _send(websocket, error_body(exc))
        await _close(websocket, CLOSE_INTERNAL_ERROR, close_code_for(exc)[1])
    except Exception as exc:  # the table decides the text and code; unknown → 1011
        code, reason = close_code_for(exc)
        with contextlib.suppress(_Closed):
            await _send(websocket, error_body(exc))
        await _close(websocket, code, reason)
