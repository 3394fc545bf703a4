"""Per-message websocket size limits enforced before a byte is buffered, and a deadline for
HTTP request headers: the uvicorn protocol classes ``cape serve`` runs.

uvicorn's ``websockets-sansio`` protocol hands every byte it reads to a ``websockets``
:class:`~websockets.server.ServerProtocol`, whose parser refuses a frame whose header
announces more than ``max_message_size`` bytes (close 1009) before reading its payload. That
limit is one number for the whole server (``ws_max_size``), and the parser runs ahead: all
frames already read are parsed at once, so a limit changed by the application after it took
a message would come too late for the frames behind it. Here:

- :class:`SizedWebSocketProtocol` gives each connection a parser that stops after every
  complete data message (control frames, such as the pong of a keep-alive ping, still pass)
  until the application asks for the next message, and exposes that as the ASGI scope
  extension :data:`~cape.host.api.frames.NEXT_MESSAGE_EXTENSION`: a callable taking the
  byte limit of the next message. The application sets each limit from what the session may
  send next (64 KiB for a nonce, the input limit for an input, …); a larger frame is refused
  from its header: the client gets ``{"error": …}`` and close 1009, and the payload is never
  buffered. While the parser waits, at most :data:`HELD_BYTES` of unread input are held
  before the socket stops being read. It also exposes
  :data:`~cape.host.api.frames.SEND_READY_EXTENSION`, whether a send now returns without
  waiting for the client, so that the send deadline arms no timer for sends that cannot wait.
- :class:`DeadlineHttpProtocol` closes an HTTP connection that has not sent a whole request
  head within ``header_timeout_s`` of connecting (uvicorn has no such deadline; its
  keep-alive timeout starts only after a first response).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Generator
from typing import Any, Final

import h11
from uvicorn.config import Config
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader

from cape.host.api.frames import NEXT_MESSAGE_EXTENSION, SEND_READY_EXTENSION

__all__ = ["HELD_BYTES", "DeadlineHttpProtocol", "SizedWebSocketProtocol", "http_protocol"]

HELD_BYTES: Final = 64 * 1024
"""Unparsed client bytes held while the application has not asked for the next message."""
_CONTROL_BIT: Final = 0x08  # opcodes 0x8-0xF are control frames (RFC 6455 §5.5)
_DATA: Final = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


class _GatedReader(StreamReader):
    """A stream reader that lets the frame parser start a data frame only while open."""

    def __init__(self) -> None:
        super().__init__()
        self.open = True

    def at_eof(self) -> Generator[None, None, bool]:
        # The parser calls this before every frame: hold data frames while closed.
        while not self.open and not self.eof:
            if self.buffer and self.buffer[0] & _CONTROL_BIT:
                break
            yield
        return (yield from super().at_eof())


class _SizedServerProtocol(ServerProtocol):
    """A server protocol whose parser pauses after each data message and that sends an
    ``{"error"}`` text frame before closing with 1009."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.next_message = "nonce frame"
        """What the next data message is, for the refusal's text. Every Cape session opens
        with its nonce frame, which may arrive before the application set a limit."""
        self.gated = _GatedReader()
        self.reader = self.gated
        self.parser = self.parse()  # the one started above reads from the replaced reader
        next(self.parser)

    def recv_frame(self, frame: Frame) -> None:
        super().recv_frame(frame)
        if frame.opcode in _DATA and frame.fin:
            self.gated.open = False

    def fail(self, code: int, reason: str = "") -> None:
        if self.state is State.OPEN and code == 1009:
            # Worded as LimitExceededError words it (clients match "<what> … exceeds the
            # limit of"), with the parser's reason, which names the announced size.
            text = (
                f"message too large: {self.next_message} size in bytes exceeds the limit of "
                f"{self.max_message_size}"
            )
            if reason:
                text += f" ({reason})"
            self.send_frame(Frame(Opcode.TEXT, json.dumps({"error": text}).encode()))
        super().fail(code, reason)


class SizedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol with a size limit per message (see the module
    docstring). The first message's limit is ``config.ws_max_size``."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        conn = _SizedServerProtocol(
            extensions=[], max_size=config.ws_max_size, logger=self.conn.logger
        )
        self.conn = conn
        self._reader = conn.gated
        """The connection's gated reader (it is never replaced)."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is not None:  # the ASGI task starts later, on the next loop iteration
            extensions: dict[str, Any] = scope.setdefault("extensions", {})
            extensions[NEXT_MESSAGE_EXTENSION] = self._next_message
            # uvicorn's send waits only for ``writable`` (cleared while the transport's write
            # buffer is over its high-water mark): while it is set, a send cannot wait.
            extensions[SEND_READY_EXTENSION] = self.writable.is_set

    def _next_message(self, limit: int, what: str = "message") -> None:
        """Let the parser read the next data message (``what``), of at most ``limit`` bytes."""
        reader = self._reader
        assert isinstance(self.conn, _SizedServerProtocol)
        self.conn.max_message_size = limit
        self.conn.next_message = what
        if reader.open:
            return
        if not self.queue.empty():
            # The message this call is for was read already (under the limit in force then;
            # the application checks it again). Opening now would let the one after it be
            # read under this limit and name: it waits for the next call instead.
            return
        reader.open = True
        if reader.buffer and not reader.eof and self.conn.parser_exc is None:
            self.conn.receive_data(b"")  # parse what was held back
            if self.conn.parser_exc is not None:
                self.handle_parser_exception()
                return
            self.handle_events()
        self._resume_if_room()

    def _resume_if_room(self) -> None:
        held = not self._reader.open and len(self._reader.buffer) >= HELD_BYTES
        if self.read_paused and self.queue.empty() and not held and not self.close_sent:
            self.read_paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        reader = self._reader
        if not reader.open and len(reader.buffer) >= HELD_BYTES and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    async def receive(self) -> Any:
        message = await self.queue.get()
        self._resume_if_room()
        return message


class DeadlineHttpProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections that send no whole request head in time."""

    header_timeout_s: float = 30.0

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._head_deadline = self.loop.call_later(self.header_timeout_s, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._head_deadline.cancel()
        super().connection_lost(exc)

    def _head_timeout(self) -> None:
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed already, or upgraded to a websocket (which has its own limits)
        if self.cycle is None and self.conn.their_state is h11.IDLE:
            self.transport.close()


def http_protocol(header_timeout_s: float) -> type[DeadlineHttpProtocol]:
    """A :class:`DeadlineHttpProtocol` class with the given head deadline, for uvicorn."""
    return type(
        "DeadlineHttpProtocol", (DeadlineHttpProtocol,), {"header_timeout_s": header_timeout_s}
    )
