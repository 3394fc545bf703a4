"""Reading client frames of a websocket session: every wait has a deadline, every message a
size limit set before it is read, and JSON frames are parsed strictly.

**Limits before buffering.** Before each receive the session states the largest message it
accepts next through the ASGI scope extension :data:`NEXT_MESSAGE_EXTENSION` (``cape serve``'s
websocket protocol, :mod:`cape.platform.wire_limits`, refuses a larger frame from its header,
with ``{"error"}`` and close 1009, before reading its payload). Under another ASGI server the
extension is absent and the same limits are checked after the message arrives.

**Strict JSON.** Session JSON is a UTF-8 object of at most :data:`MAX_TEXT_FRAME_BYTES`,
nested at most :data:`MAX_JSON_DEPTH` deep, without duplicate keys or ``NaN``/``Infinity``;
anything else is a :class:`~cape.errors.FormatError` (``{"error"}`` and close 1008), never an
internal error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from collections.abc import Callable
from typing import Any, Final, NoReturn

from starlette.websockets import WebSocket

from cape.errors import FormatError, LimitExceededError
from cape.host.api.errors import BodyTooLargeError, ClientTooSlowError

__all__ = [
    "MAX_JSON_DEPTH",
    "MAX_TEXT_FRAME_BYTES",
    "NEXT_MESSAGE_EXTENSION",
    "SEND_READY_EXTENSION",
    "Closed",
    "DrainSignal",
    "Draining",
    "Idle",
    "ReceiveDeadline",
    "b64_field",
    "binary",
    "json_message",
    "receive",
    "strict_json",
]

NEXT_MESSAGE_EXTENSION: Final = "cape.websocket.next_message_limit"
"""ASGI scope extension: a callable taking the byte limit of the next client message and what
that message is (for the refusal's text, e.g. "input")."""
SEND_READY_EXTENSION: Final = "cape.websocket.send_ready"
"""ASGI scope extension: a callable returning True when the server's next send returns without
waiting for the client to read (its buffer has room), so that a send deadline needs no timer
(:class:`~cape.host.api.app.SendDeadline`)."""
MAX_TEXT_FRAME_BYTES: Final = 64 * 1024
MAX_JSON_DEPTH: Final = 8


class Closed(Exception):
    """The client went away (or we closed the socket): stop quietly."""


class Idle(Exception):
    """No frame within the idle timeout (between calls: the session ends normally)."""


class Draining(Exception):
    """The server is shutting down."""


class DrainSignal(asyncio.Event):
    """Set when the server starts draining; also expires the deadline of every
    :func:`receive` waiting at that moment, so that the wait ends without a watcher task
    per frame."""

    def __init__(self) -> None:
        super().__init__()
        self._deadlines: set[asyncio.Timeout] = set()

    def set(self) -> None:
        super().set()
        if self._deadlines:
            now = asyncio.get_running_loop().time()
            for deadline in list(self._deadlines):
                deadline.reschedule(now)

    def watch(self, deadline: asyncio.Timeout) -> None:
        """Until :meth:`unwatch`, :meth:`set` expires ``deadline`` (a pair, not a context
        manager: this runs for every client frame, issue 16)."""
        self._deadlines.add(deadline)

    def unwatch(self, deadline: asyncio.Timeout) -> None:
        self._deadlines.discard(deadline)


_DEADLINE_KEY: Final = "cape.receive_deadline"
"""Where a connection's :class:`ReceiveDeadline` lives in its ASGI scope."""


class ReceiveDeadline:
    """The receive deadlines of one connection on one timer (issue 16).

    Each :func:`receive` waits inside an ``asyncio.Timeout`` without a time of its own and
    tells this object its deadline. A timer is armed only when none is pending or the new
    deadline comes before it; when the timer fires before the current deadline (the receive it
    was armed for got its message), it re-arms for the current one; when it fires past it, it
    expires that receive's ``Timeout`` (asyncio's own expiry: the wait raises
    ``TimeoutError``). So a receive costs no timer of its own, where ``asyncio.timeout``
    pushed one on the loop's heap and cancelled it for every client frame."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0
        self._waiting: asyncio.Timeout | None = None

    @classmethod
    def of(cls, websocket: WebSocket) -> ReceiveDeadline:
        """The connection's deadline (made at its first receive)."""
        deadline: ReceiveDeadline | None = websocket.scope.get(_DEADLINE_KEY)
        if deadline is None:
            deadline = cls(asyncio.get_running_loop())
            websocket.scope[_DEADLINE_KEY] = deadline
        return deadline

    def start(self, waiting: asyncio.Timeout, timeout_s: float) -> None:
        """``waiting`` expires ``timeout_s`` from now unless :meth:`stop` comes first."""
        self._waiting = waiting
        self._when = when = self._loop.time() + timeout_s
        handle = self._handle
        if handle is None or handle.when() > when:
            if handle is not None:
                handle.cancel()
            self._handle = self._loop.call_at(when, self._fire)

    def stop(self) -> None:
        self._waiting = None

    @staticmethod
    def close(websocket: WebSocket) -> None:
        """The connection is over: cancel its pending timer, if any."""
        deadline: ReceiveDeadline | None = websocket.scope.pop(_DEADLINE_KEY, None)
        if deadline is not None and deadline._handle is not None:
            deadline._handle.cancel()
            deadline._handle = None

    def _fire(self) -> None:
        self._handle = None
        waiting = self._waiting
        if waiting is None:
            return  # no receive waits; the next one arms a timer again
        now = self._loop.time()
        if now < self._when:
            self._handle = self._loop.call_at(self._when, self._fire)
        else:
            waiting.reschedule(now)


async def receive(
    websocket: WebSocket,
    draining: DrainSignal,
    *,
    limit: int,
    timeout_s: float,
    idle: bool = False,
    what: str = "message",
) -> str | bytes:
    """The next client message (``what``, e.g. "input"), of at most ``limit`` bytes, within
    ``timeout_s``.

    Raises:
        Closed: the client disconnected.
        Draining: the server started shutting down while waiting.
        Idle: ``idle`` and no message came in time (the session ends normally).
        ClientTooSlowError: not ``idle`` and no message came in time.
        BodyTooLargeError: the message is larger than ``limit`` (another ASGI server).
    """
    allow: Callable[[int, str], None] | None = (websocket.scope.get("extensions") or {}).get(
        NEXT_MESSAGE_EXTENSION
    )
    if allow is not None:
        allow(limit, what)
    if draining.is_set():
        raise Draining()
    # One deadline around the receive itself: no task, wait set or timer per frame (issue 16,
    # ReceiveDeadline). A DrainSignal expires it at once when the server starts draining.
    timer = ReceiveDeadline.of(websocket)
    try:
        async with asyncio.Timeout(None) as deadline:
            timer.start(deadline, timeout_s)
            draining.watch(deadline)
            try:
                message = await websocket.receive()
            finally:
                draining.unwatch(deadline)
                timer.stop()
    except TimeoutError:
        if draining.is_set():
            raise Draining() from None
        if idle:
            raise Idle() from None
        raise ClientTooSlowError(
            f"no message within {timeout_s:.0f} s; closing the session"
        ) from None
    if message["type"] == "websocket.disconnect":
        raise Closed()
    data: str | bytes
    if message.get("bytes") is not None:
        data = message["bytes"]
        size = len(data)
    else:
        data = message.get("text") or ""
        size = len(data.encode()) if len(data) * 4 > limit else len(data)
    if size > limit:
        raise BodyTooLargeError(f"{what} size in bytes", limit, size)
    return data


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise FormatError("duplicate key")
    return result


def _no_constant(name: str) -> NoReturn:
    raise FormatError(f"{name} is not allowed")


def _depth(value: Any) -> int:
    """How deeply ``value`` nests arrays and objects (iteratively)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((child, depth + 1) for child in children)
    return deepest


def strict_json(text: str, what: str) -> Any:
    """Parse ``text`` as strict JSON (see the module docstring)."""
    if len(text) > MAX_TEXT_FRAME_BYTES:
        raise BodyTooLargeError(f"{what} frame size in bytes", MAX_TEXT_FRAME_BYTES, len(text))
    try:
        parsed = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise FormatError(f"the {what} frame nests too deeply") from None
    except FormatError as exc:
        raise FormatError(f"the {what} frame is not strict JSON: {exc}") from None
    except ValueError:
        raise FormatError(f"the {what} frame is not JSON") from None
    if _depth(parsed) > MAX_JSON_DEPTH:
        raise FormatError(f"the {what} frame nests more than {MAX_JSON_DEPTH} levels deep")
    return parsed


def json_message(frame: str | bytes, what: str) -> dict[str, Any]:
    """``{"message": {...}}`` from a text frame."""
    if not isinstance(frame, str):
        raise FormatError(f"expected the {what} as a text frame, got a binary frame")
    parsed = strict_json(frame, what)
    message = parsed.get("message") if isinstance(parsed, dict) else None
    if not isinstance(message, dict):
        raise FormatError(f'the {what} frame must be {{"message": {{...}}}}')
    return message


def b64_field(message: dict[str, Any], name: str, limit: int) -> bytes | None:
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


def binary(frame: str | bytes, what: str, limit: int) -> bytes:
    if not isinstance(frame, bytes):
        raise FormatError(f"expected the {what} as a binary frame, got a text frame")
    if len(frame) > limit:
        raise LimitExceededError(f"{what} size in bytes", limit, len(frame))
    return frame
