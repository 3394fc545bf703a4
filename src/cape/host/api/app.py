"""The API application: the REST and websocket routes on one Starlette app."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cape.host.api.errors import EXCEPTION_HANDLERS, ClientTooSlowError
from cape.host.api.frames import SEND_READY_EXTENSION
from cape.host.api.rest import ApiDeps, create_rest_routes
from cape.host.api.sessions import SessionDeps, create_session_routes
from cape.host.console import console_routes

__all__ = ["BodyDeadline", "SendDeadline", "create_app"]


class BodyDeadline:
    """ASGI middleware: each piece of an HTTP request body must arrive within ``timeout_s``
    (a client that stops sending gets 408 instead of holding its request open). Once the
    body is complete, ``receive`` is passed through untouched."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        complete = False

        async def timed_receive() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout_s)
            except TimeoutError:
                raise ClientTooSlowError(
                    f"the request body did not arrive within {self.timeout_s:.0f} s"
                ) from None
            complete = message.get("type") != "http.request" or not message.get("more_body")
            return message

        await self.app(scope, timed_receive, send)


class SendDeadline:
    """ASGI middleware: a websocket client must take each message the server sends (its
    previous ones drained from the connection's buffer) within ``timeout_s``. A client that
    stops reading gets its session ended instead of holding it, and what the session holds
    (an enclave session, an admission slot), for ever: the send raises
    :class:`ClientTooSlowError`, and so does every later one of that connection at once.

    Under ``cape serve`` (the scope extension :data:`~cape.host.api.frames.SEND_READY_EXTENSION`)
    a send that the server takes without waiting is passed straight through: no timer is armed
    and cancelled for every message (issue 16); the deadline applies from the moment a send
    would wait for the client to read."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app = app
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        stalled = False
        ready: Callable[[], bool] | None = (scope.get("extensions") or {}).get(SEND_READY_EXTENSION)

        async def timed_send(message: Message) -> None:
            nonlocal stalled
            if stalled:
                raise ClientTooSlowError("the client stopped reading")
            if ready is not None and ready():
                await send(message)  # returns at once: nothing to wait for, no timer
                return
            try:
                async with asyncio.timeout(self.timeout_s):  # no task per send (wait_for's)
                    await send(message)
            except TimeoutError:
                stalled = True
                raise ClientTooSlowError(
                    f"the client read nothing within {self.timeout_s:.0f} s"
                ) from None

        await self.app(scope, receive, timed_send)


def create_app(
    rest: ApiDeps,
    sessions: SessionDeps,
    operations: Sequence[BaseRoute] = (),
    *,
    body_timeout_s: float = 30.0,
    send_timeout_s: float | None = None,
) -> ASGIApp:
    """Every route of protocol.md over the given dependencies (no lifespan: the caller owns
    the enclave pool and the stores) and the node's ``operations`` routes
    (:mod:`cape.host.api.operations`), with a deadline for request bodies and one for
    websocket clients to read what is sent to them (default: the sessions' frame timeout)."""
    app = Starlette(
        routes=[
            *create_rest_routes(rest),
            *create_session_routes(sessions),
            *console_routes(),
            *operations,
        ],
        exception_handlers=dict(EXCEPTION_HANDLERS),
    )
    send_deadline = SendDeadline(app, send_timeout_s or sessions.frame_timeout_s)
    return BodyDeadline(send_deadline, body_timeout_s)
