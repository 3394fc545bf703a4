"""SendDeadline: a client must take each message within the deadline; under ``cape serve``
(the send-ready scope extension) a send the server takes at once arms no timer (issue 16),
and one that would wait still gets the deadline. The end-to-end case, a real client that stops
reading: ``test_a_client_that_stops_reading_does_not_keep_its_sessions`` in
``tests/e2e/test_tenant_server.py``."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.types import Message, Receive, Scope, Send

from cape.host.api.app import SendDeadline
from cape.host.api.errors import ClientTooSlowError
from cape.host.api.frames import SEND_READY_EXTENSION

DEADLINE_S = 0.2


class Transport:
    """What uvicorn's websocket send does: wait while the client's buffer is full, then write."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.written: list[Message] = []

    async def send(self, message: Message) -> None:
        await self.writable.wait()
        self.written.append(message)

    def scope(self, *, extension: bool) -> Scope:
        extensions: dict[str, Any] = {}
        if extension:
            extensions[SEND_READY_EXTENSION] = self.writable.is_set
        return {"type": "websocket", "extensions": extensions}


def _timers() -> int:
    loop = asyncio.get_running_loop()
    return len(loop._scheduled)  # type: ignore[attr-defined]


async def _noop_receive() -> Message:  # pragma: no cover - never called
    raise AssertionError


def test_a_send_the_server_takes_at_once_arms_no_timer() -> None:
    async def scenario() -> None:
        transport = Transport()
        armed: list[int] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            before = _timers()
            for number in range(50):
                await send({"type": "websocket.send", "bytes": bytes([number])})
            armed.append(_timers() - before)

        await SendDeadline(app, 30.0)(
            transport.scope(extension=True), _noop_receive, transport.send
        )
        assert len(transport.written) == 50
        # asyncio.timeout leaves each cancelled timer in the loop's heap until it is due
        assert armed == [0]

    asyncio.run(scenario())


@pytest.mark.parametrize("extension", [True, False])
def test_a_send_that_waits_for_the_client_gets_the_deadline(extension: bool) -> None:
    """The client stops reading (the transport stays unwritable): the send fails with
    ClientTooSlowError after the deadline, and every later send of the connection at once."""

    async def scenario() -> None:
        transport = Transport()
        outcomes: list[str] = []

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            await send({"type": "websocket.send", "text": "taken"})
            transport.writable.clear()  # the client's buffer is full from here on
            for _ in range(2):
                try:
                    await send({"type": "websocket.send", "text": "never taken"})
                except ClientTooSlowError as exc:
                    outcomes.append(str(exc))

        scope = transport.scope(extension=extension)
        await asyncio.wait_for(
            SendDeadline(app, DEADLINE_S)(scope, _noop_receive, transport.send), 30
        )
        assert [m["text"] for m in transport.written] == ["taken"]
        assert outcomes == ["the client read nothing within 0 s", "the client stopped reading"]

    asyncio.run(scenario())
