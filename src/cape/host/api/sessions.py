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

The server reads only what it must: the nonce frame (nonce, optional response key, the result
form the client asks for) and, on deploy, the function-info frame. Inputs, results and bundles
pass through as ciphertext: an input frame goes to the enclave as it came, and a result goes
back as JSON text (Cape's form) or, when the client asked for ``result_frames: "binary"``
(our SDK; protocol.md "Result frames"), as one binary frame: a tag byte and the bytes.
Every client frame gets its reply before the next one is read, so neither a slow client nor
a slow enclave makes the server buffer more than one message per session.

**Tenants share the server safely** (docs/limits.md, "Server"):

- a session is admitted (:mod:`cape.host.admission`) before the upgrade is accepted: per user
  and server-wide limits on sessions, deploys and bundle bytes in flight, refused with 429 or
  503 and ``Retry-After``;
- every client message has a size limit set before it is read and a deadline
  (:mod:`cape.host.api.frames`): ``frame_timeout_s`` within an exchange (nonce, function
  info, bundle, each chunk), ``idle_timeout_s`` between calls; and the client must take
  each reply within ``frame_timeout_s`` too (:class:`~cape.host.api.app.SendDeadline`);
- client-paced work holds no thread: a deploy's chunks are written as they arrive, each
  write a bounded job on the dedicated ``blob_io`` executor;
- every frame of a run or test session re-checks its authorisation: an expired token, a
  deleted (revoked) token or a deleted function ends the session before the next call.

Errors:

- a function error (or a bad ``cape:`` input) is ``{"error": …}`` and the session goes on;
- a protocol error is ``{"error": …}``, then close 1008 (1009 for a message over its limit,
  1013 when a limit of the server or the enclave says "try again later"); an enclave
  failure close 1011;
- an idle session (no frame for ``idle_timeout_s``) is closed with 1000;
- at shutdown an idle session gets ``{"error": "the server is shutting down"}`` and close
  1001; a call in progress finishes first, and a deploy in progress is committed first.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

from starlette.concurrency import run_in_threadpool
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from cape.errors import CapeError, FormatError, LimitExceededError, TransportError
from cape.host.admission import Reservation, ServerBusyError
from cape.host.api.client_frames import MAX_NONCE_BYTES as MAX_NONCE_BYTES
from cape.host.api.client_frames import RESULT_FRAMES as RESULT_FRAMES
from cape.host.api.client_frames import (
    SUBPROTOCOL,
    _b64,
    _bundle_room,
    _next,
    _nonce_frame,
    _Start,
    _token,
)
from cape.host.api.errors import (
    CLOSE_INTERNAL_ERROR,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TRY_AGAIN_LATER,
    ClientTooSlowError,
    close_code_for,
    error_body,
    error_response,
)
from cape.host.api.frames import (
    MAX_TEXT_FRAME_BYTES,
    Closed,
    Draining,
    Idle,
    ReceiveDeadline,
    binary,
    json_message,
)
from cape.host.api.session_deps import BLOB_IO_THREADS as BLOB_IO_THREADS
from cape.host.api.session_deps import DIGEST_CACHE_SIZE as DIGEST_CACHE_SIZE
from cape.host.api.session_deps import Lifecycle, SessionDeps, _Grant, _still_allowed, authorized
from cape.host.errors import UnavailableError
from cape.host.ids import new_id
from cape.host.launcher import HostSession, expect
from cape.host.store.deploys import record_deploy
from cape.host.store.metadata import User, check_function_name

__all__ = ["Lifecycle", "SessionDeps", "create_session_routes"]

log = logging.getLogger("cape.host.sessions")

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
SHUTDOWN_TEXT: Final = "the server is shutting down"
RESULT_PLAIN: Final = b"\x00"
RESULT_SEALED: Final = b"\x01"
"""The first byte of a binary result frame: the rest is the output as is, or sealed."""
MAX_CHUNK_BYTES: Final = 8 << 20
"""The largest deploy chunk, and the chunk limit when the function info announces none."""
#: Chunks a single-frame (Cape client) bundle is cut into for the enclave: small enough that
#: the enclave's transient frame copies stay a few percent of a 100 MiB bundle.
ENCLAVE_CHUNK_BYTES: Final = 1 << 20


# --------------------------------------------------------------------------- relaying


async def _send(websocket: WebSocket, payload: dict[str, Any] | bytes) -> None:
    try:
        if isinstance(payload, bytes):
            await websocket.send_bytes(payload)
        else:
            await websocket.send_text(json.dumps(payload, separators=(",", ":")))
    except (OSError, RuntimeError, WebSocketDisconnect, ClientTooSlowError) as exc:
        # the client went away, or stopped reading
        raise Closed() from exc


async def _close(websocket: WebSocket, code: int, reason: str = "") -> None:
    if websocket.application_state == WebSocketState.CONNECTED:
        with contextlib.suppress(OSError, RuntimeError, WebSocketDisconnect, ClientTooSlowError):
            await websocket.close(code, reason)


async def _attestation(
    websocket: WebSocket,
    session: HostSession,
    frame: dict[str, Any] | None = None,
    *,
    binary_results: bool = False,
) -> None:
    """Relay the session's document; with ``binary_results``, confirm that form (ours)."""
    frame = expect(frame if frame is not None else await session.receive(), "attestation")
    message = {"type": "attestation_doc", "message": _b64(frame["document"])}
    if binary_results:
        message["result_frames"] = "binary"
    await _send(websocket, {"message": message})


class _EnclaveSaid(CapeError):
    """A fatal error frame from the enclave: the session is over."""


def _result_frame(data: bytes, encrypted: bool) -> bytes:
    """A result in binary form: one tag byte (sealed or plain), then the bytes."""
    return (RESULT_SEALED if encrypted else RESULT_PLAIN) + data


async def _reply(websocket: WebSocket, session: HostSession, *, binary_results: bool) -> bool:
    """Relay the enclave's answer to one call. False when the enclave ended the session."""
    message = await session.receive()
    kind = message["t"]
    if kind == "result":
        data, encrypted = message["data"], bool(message.get("encrypted"))
        if binary_results:
            await _send(websocket, _result_frame(data, encrypted))
            return True
        payload: dict[str, Any] = {"type": "function_result", "message": _b64(data)}
        if encrypted:
            payload["encrypted"] = True
        await _send(websocket, {"message": payload})
        return True
    if kind == "error":
        text = str(message.get("message", "function error"))
        if message.get("busy"):  # the enclave's queue for this work is full
            raise ServerBusyError(text)
        if message.get("fatal"):
            raise _EnclaveSaid(text)
        reply: dict[str, Any] = {"error": text}
        if isinstance(message.get("sealed"), bytes):  # our extension: details for the client
            reply["sealed"] = _b64(message["sealed"])
        await _send(websocket, reply)
        return True
    if kind == "close":
        return False
    raise FormatError(f"unexpected {kind!r} frame from the enclave")


async def _serve_calls(
    websocket: WebSocket,
    session: HostSession,
    deps: SessionDeps,
    grant: _Grant,
    reservation: Reservation,
    *,
    bundle_first: bool,
    binary_results: bool,
) -> None:
    """run/test: each binary frame is one call and gets exactly one reply, in order (a
    result as a binary frame when the client asked for that, else as JSON text)."""
    if bundle_first:
        room = _bundle_room(deps, reservation)
        bundle = binary(await _next(websocket, deps, room, "test bundle"), "test bundle", room)
        await _still_allowed(deps, grant)
        await session.send({"t": "bundle", "data": bundle})
        del bundle
        reservation.release()
    while True:
        try:
            frame = await _next(websocket, deps, deps.max_input_bytes, "input", idle=True)
        except Idle:
            await _close(websocket, CLOSE_NORMAL, "idle timeout")
            return
        data = binary(frame, "input", deps.max_input_bytes)
        await _still_allowed(deps, grant)
        await session.send({"t": "input", "data": data})
        del data, frame
        if not await _reply(websocket, session, binary_results=binary_results):
            await _close(websocket, CLOSE_NORMAL)
            return


async def _receive_chunks(
    websocket: WebSocket,
    session: HostSession,
    deps: SessionDeps,
    size: int,
    chunk_limit: int,
    blob_key: str,
) -> None:
    """Relay ``size`` bytes of binary frames to the enclave and the blob store as they
    arrive: the server holds one chunk, never the bundle, and no thread waits for the
    client (each write is one bounded job on the blob executor)."""
    writer = await deps.io(deps.blobs.begin, blob_key, max_bytes=size)
    try:
        received = 0
        while received < size:
            limit = min(chunk_limit, size - received)
            piece = binary(
                await _next(websocket, deps, limit, "bundle chunk"), "bundle chunk", limit
            )
            if not piece:
                raise FormatError("bundle chunks must not be empty")
            await session.send({"t": "chunk", "data": piece})
            await deps.io(writer.write, piece)
            received += len(piece)
        await deps.io(writer.commit)
    except BaseException:
        await deps.io(writer.abort)
        raise


def _positive_int(info: dict[str, Any], name: str) -> int | None:
    value = info.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise FormatError(f"'{name}' must be a positive integer")
    return value


async def _deploy(
    websocket: WebSocket,
    session: HostSession,
    deps: SessionDeps,
    owner: User,
    reservation: Reservation,
) -> None:
    """Function info, then the bundle: one binary frame (Cape's protocol), or, when the info
    announces ``bundle_size`` (our SDK), binary frames of at most ``chunk_size`` (default and
    at most 8 MiB) adding up to it."""
    info = json_message(
        await _next(websocket, deps, MAX_TEXT_FRAME_BYTES, "function info frame"), "function info"
    )
    name = check_function_name(info.get("function_name"))
    public = info.get("public", False)
    if not isinstance(public, bool):
        raise FormatError("'public' must be true or false")
    size = _positive_int(info, "bundle_size")
    chunk_limit = _positive_int(info, "chunk_size") or MAX_CHUNK_BYTES
    if chunk_limit > MAX_CHUNK_BYTES:
        raise LimitExceededError("chunk size in bytes", MAX_CHUNK_BYTES, chunk_limit)
    blob_key = new_id()
    if size is None:
        room = _bundle_room(deps, reservation)
        bundle = binary(await _next(websocket, deps, room, "bundle"), "bundle", room)
        reservation.resize(len(bundle))
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
        stored: int = await deps.io(
            deps.blobs.put_stream, blob_key, [bundle], max_bytes=deps.max_bundle_bytes
        )
        del bundle
    else:
        if size > deps.max_bundle_bytes:
            raise LimitExceededError("bundle size in bytes", deps.max_bundle_bytes, size)
        reservation.resize(size)
        await session.send({"t": "bundle", "size": size, "name": name, "public": public})
        await _receive_chunks(websocket, session, deps, size, chunk_limit, blob_key)
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
            await deps.io(deps.blobs.delete, blob_key)
        raise
    log.info("deployed function %s (%s/%s)", function.id, owner.username, name)
    await _send(
        websocket,
        {"message": {"id": function.id, "checksum": function.checksum, "name": function.name}},
    )
    await _close(websocket, CLOSE_NORMAL)


# --------------------------------------------------------------------------- routes


Handler = Callable[[WebSocket, _Grant, Reservation], Awaitable[None]]
Body = Callable[[WebSocket, HostSession, _Grant, Reservation, _Start], Awaitable[None]]


def create_session_routes(deps: SessionDeps) -> list[WebSocketRoute]:
    """The websocket routes over ``deps`` (see the module docstring)."""

    async def nonce(websocket: WebSocket) -> _Start:
        return _nonce_frame(await _next(websocket, deps, MAX_TEXT_FRAME_BYTES, "nonce frame"))

    def account_session(kind: str, body: Body) -> Handler:
        """key, deploy, test: the caller's own account (no function-scoped tokens), their key."""

        async def serve(websocket: WebSocket, grant: _Grant, reservation: Reservation) -> None:
            start = await nonce(websocket)
            user = grant.principal.user
            async with deps.pool.session(
                kind,
                owner=user.username,
                nonce=start.nonce,
                response_key=start.response_key,
                sealed_inputs=start.sealed_inputs and kind == "test",  # inputs: test, run only
                sealing=start.sealing,
            ) as session:
                # results exist only in test sessions (run has its own handler)
                binary = start.binary_results and kind == "test"
                await _attestation(websocket, session, binary_results=binary)
                await body(websocket, session, grant, reservation, start)

        return serve

    async def key(websocket: WebSocket, session: HostSession, *_: Any) -> None:
        expect(await session.receive(), "close")
        await _close(websocket, CLOSE_NORMAL)

    async def deploy(
        websocket: WebSocket,
        session: HostSession,
        grant: _Grant,
        reservation: Reservation,
        _: _Start,
    ) -> None:
        await _deploy(websocket, session, deps, grant.principal.user, reservation)

    async def test(
        websocket: WebSocket,
        session: HostSession,
        grant: _Grant,
        reservation: Reservation,
        start: _Start,
    ) -> None:
        await _serve_calls(
            websocket,
            session,
            deps,
            grant,
            reservation,
            bundle_first=True,
            binary_results=start.binary_results,
        )

    async def run(websocket: WebSocket, grant: _Grant, reservation: Reservation) -> None:
        function = grant.function
        assert function is not None
        start = await nonce(websocket)
        # The enclave is told the stored ciphertext's SHA-256 and asks for the bytes only
        # when it does not hold the function warm; the first run reads them to learn it.
        digest = deps.bundle_digests.get(function.blob_key)
        bundle = None
        if digest is None:
            bundle = await deps.io(deps.blobs.get, function.blob_key)
            digest = hashlib.sha256(bundle).digest()
            deps.remember_digest(function.blob_key, digest)
        async with deps.pool.session(
            "run",
            owner=function.owner_name,
            nonce=start.nonce,
            response_key=start.response_key,
            sealed_inputs=start.sealed_inputs,
            sealing=start.sealing,
            bundle=bundle,
            bundle_sha256=digest,
            affinity=function.id,
            caller=grant.principal.user.username,
        ) as session:
            del bundle
            frame = await session.receive()
            if frame["t"] == "need_bundle":
                stored = await deps.io(deps.blobs.get, function.blob_key)
                await session.send({"t": "bundle", "data": stored})
                del stored
                frame = await session.receive()
            await _attestation(websocket, session, frame, binary_results=start.binary_results)
            await _serve_calls(
                websocket,
                session,
                deps,
                grant,
                reservation,
                bundle_first=False,
                binary_results=start.binary_results,
            )

    def endpoint(kind: str, handler: Handler) -> Callable[[WebSocket], Awaitable[None]]:
        async def serve(websocket: WebSocket) -> None:
            with contextlib.ExitStack() as admitted:
                try:
                    if deps.lifecycle.draining.is_set():
                        raise UnavailableError(SHUTDOWN_TEXT)
                    seen = deps.store.revocations  # before the checks: no deletion slips by
                    principal, function = await authorized(
                        deps, kind, _token(websocket), websocket.path_params
                    )
                    reservation = admitted.enter_context(
                        deps.admission.session(principal.user.id, deploy=kind == "deploy")
                    )
                except Exception as exc:  # refuse the upgrade with the table's status and body
                    await _deny(websocket, exc)
                    return
                await websocket.accept(subprotocol=SUBPROTOCOL)
                grant = _Grant(principal, function, seen)
                with deps.lifecycle.track():
                    try:
                        await _guard(websocket, handler(websocket, grant, reservation))
                    finally:
                        ReceiveDeadline.close(websocket)

        return serve

    return [
        WebSocketRoute("/v1/key", endpoint("key", account_session("key", key))),
        WebSocketRoute("/v1/deploy", endpoint("deploy", account_session("deploy", deploy))),
        WebSocketRoute("/v1/test", endpoint("test", account_session("test", test))),
        WebSocketRoute("/v1/run/{id}", endpoint("run", run)),
        WebSocketRoute("/v1/run/{user}/{name}", endpoint("run", run)),
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
    except Closed:
        pass
    except Idle:
        await _close(websocket, CLOSE_NORMAL, "idle timeout")
    except Draining:
        with contextlib.suppress(Closed):
            await _send(websocket, {"error": SHUTDOWN_TEXT})
        await _close(websocket, CLOSE_GOING_AWAY, SHUTDOWN_TEXT)
    except _EnclaveSaid as exc:
        with contextlib.suppress(Closed):
            await _send(websocket, {"error": str(exc)})
        await _close(websocket, CLOSE_POLICY_VIOLATION, str(exc)[:120])
    except TransportError as exc:  # the enclave died or the pool has none
        with contextlib.suppress(Closed):
            await _send(websocket, error_body(exc))
        await _close(websocket, CLOSE_INTERNAL_ERROR, close_code_for(exc)[1])
    except Exception as exc:  # the table decides the text and code; unknown → 1011
        code, reason = close_code_for(exc)
        with contextlib.suppress(Closed):
            await _send(websocket, _busy_marked(error_body(exc), exc, code))
        await _close(websocket, code, reason)


def _busy_marked(body: dict[str, Any], exc: Exception, code: int) -> dict[str, Any]:
    """Our extension (protocol.md, "Errors"): an error before close 1013 says ``"busy": true``
    and, when known, ``"retry_after"`` in whole seconds, so a client tells "try again later"
    from a function's error without waiting for the close (Cape's clients ignore both)."""
    if code != CLOSE_TRY_AGAIN_LATER:
        return body
    marked: dict[str, Any] = {**body, "busy": True}
    retry_after_s = getattr(exc, "retry_after_s", None)
    if isinstance(retry_after_s, int | float):
        marked["retry_after"] = max(1, math.ceil(retry_after_s))
    return marked
