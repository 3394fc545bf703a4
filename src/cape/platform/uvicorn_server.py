"""uvicorn as ``cape serve`` runs it: a drain step before shutdown, the listening socket, and
the filter for uvicorn's denial noise (re-exported by :mod:`cape.platform.serve`)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from websockets.exceptions import InvalidState

from cape.errors import CapeError
from cape.host.api.sessions import Lifecycle

log = logging.getLogger("cape.serve")


class _Uvicorn(uvicorn.Server):
    """uvicorn, with a drain step before it closes connections on a signal."""

    def __init__(
        self,
        config: uvicorn.Config,
        lifecycle: Lifecycle,
        drain_timeout_s: float,
        on_drain: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(config)
        self._on_drain = on_drain
        self._lifecycle = lifecycle
        self._drain_timeout_s = drain_timeout_s
        self._draining = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[Any] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not calling super(): uvicorn would re-raise the signal after shutting down.
        # At once, in the signal handler: a signal to the whole process group (systemd,
        # `timeout`, Ctrl-C) reaches the enclaves too, and the pool must not restart them.
        self._on_drain()
        if self._draining or self._loop is None:
            self.should_exit = True
            self.force_exit = self._draining
            return
        self._draining = True
        self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        log.info("draining: %d session(s) in progress", self._lifecycle.active)
        if not await self._lifecycle.drain(self._drain_timeout_s):
            log.warning("sessions still running after %.0fs; closing them", self._drain_timeout_s)
        self.should_exit = True

    def request_shutdown(self) -> None:
        """What a signal does, for callers in the same process (tests, embedding)."""
        self.handle_exit(signal.SIGTERM, None)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn's websockets-sansio protocol sends close 1012 on every connection it still
        # holds; one whose peer's close frame already arrived (its transport closing, the TLS
        # shutdown still in flight) raises InvalidState there and would end the server with a
        # traceback. Such connections are over: just let their transport close.
        for connection in list(self.server_state.connections):
            connection.shutdown = _guarded_shutdown(connection)  # type: ignore[method-assign]
        await super().shutdown(sockets)


def _guarded_shutdown(connection: Any) -> Callable[[], None]:
    original = connection.shutdown

    def shutdown() -> None:
        try:
            original()
        except InvalidState:
            connection.transport.close()

    return shutdown


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, made with ``IPPROTO_TCP`` named: asyncio sets ``TCP_NODELAY`` on an
    accepted connection only when its socket says so (``proto == IPPROTO_TCP``, which
    ``socket.socket(family, SOCK_STREAM)`` leaves 0). Without it Nagle's algorithm held each
    small TLS record written right after another (the 101 response after the session ticket,
    the TLS close after the close frame) until the client's delayed ACK, ≈ 40 ms twice per
    session (issue 16)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(1024)
    except OSError as exc:
        listener.close()
        raise CapeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


class _DenialNoise(logging.Filter):
    """uvicorn 0.54's websockets-sansio protocol logs "ASGI callable returned without
    completing handshake" after every *complete* denial response (it never marks those as
    handled). Our routes always accept or send a full denial, so the line is noise that would
    bury real errors; drop exactly that message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "ASGI callable returned without completing handshake."
