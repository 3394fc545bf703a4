"""frames.receive's deadline (issue 16): one timer per connection instead of one per client
frame, with the same outcomes as before: a message in time, Idle or ClientTooSlowError when
none comes, Draining when the server drains, and an outside cancellation left as it is. The
end-to-end cases against ``cape serve``: ``test_client_paced_waits_have_deadlines`` in
``tests/e2e/test_tenant_server.py`` and ``test_sigterm_lets_a_call_finish_and_tells_idle_sessions``
in ``tests/e2e/test_sessions.py``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cape.host.api import frames
from cape.host.api.errors import ClientTooSlowError
from cape.host.api.frames import Draining, DrainSignal, Idle

LIVENESS_S = 30.0
"""Only against a hang: a loaded machine may run the loop late, never early."""


class Connection:
    """What frames.receive uses of a Starlette WebSocket: its scope and its receive."""

    def __init__(self) -> None:
        self.scope: dict[str, Any] = {"type": "websocket", "extensions": {}}
        self.inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def receive(self) -> dict[str, Any]:
        return await self.inbox.get()

    def deliver_soon(self, data: bytes) -> None:
        message = {"type": "websocket.receive", "bytes": data}
        asyncio.get_running_loop().call_soon(self.inbox.put_nowait, message)


def _receive(
    connection: Connection, draining: DrainSignal, timeout_s: float, *, idle: bool = False
) -> Awaitable[str | bytes]:
    return frames.receive(
        connection,  # type: ignore[arg-type]
        draining,
        limit=1 << 20,
        timeout_s=timeout_s,
        idle=idle,
        what="input",
    )


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), LIVENESS_S)

    asyncio.run(bounded())


def test_messages_in_time_arm_one_timer_per_connection_not_one_per_frame() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        connection, draining = Connection(), DrainSignal()

        def live() -> int:
            return sum(not h.cancelled() for h in loop._scheduled)  # type: ignore[attr-defined]

        before, live_before = len(loop._scheduled), live()  # type: ignore[attr-defined]
        for number in range(50):
            connection.deliver_soon(bytes([number]))
            assert await _receive(connection, draining, 120.0, idle=True) == bytes([number])
        # asyncio.timeout left each frame's cancelled timer in the loop's heap until it was due
        assert len(loop._scheduled) - before == 1  # type: ignore[attr-defined]
        frames.ReceiveDeadline.close(connection)  # type: ignore[arg-type]
        assert live() == live_before  # the connection is over: its timer is cancelled

    _run(scenario)


@pytest.mark.parametrize("idle", [True, False])
def test_no_message_in_time_is_idle_or_too_slow(idle: bool) -> None:
    async def scenario() -> None:
        connection, draining = Connection(), DrainSignal()
        started = time.monotonic()
        with pytest.raises(Idle if idle else ClientTooSlowError):
            await _receive(connection, draining, 0.2, idle=idle)
        assert time.monotonic() - started >= 0.19  # not before its deadline

    _run(scenario)


def test_a_shorter_deadline_after_a_longer_one_still_holds() -> None:
    """The timer pending for a 60 s idle wait must not delay the next, 0.2 s, deadline."""

    async def scenario() -> None:
        connection, draining = Connection(), DrainSignal()
        connection.deliver_soon(b"call")
        assert await _receive(connection, draining, 60.0, idle=True) == b"call"
        with pytest.raises(ClientTooSlowError):
            await _receive(connection, draining, 0.2)

    _run(scenario)


def test_a_timer_armed_for_an_earlier_frame_does_not_end_a_later_wait_early() -> None:
    async def scenario() -> None:
        connection, draining = Connection(), DrainSignal()
        connection.deliver_soon(b"first")
        assert await _receive(connection, draining, 0.1) == b"first"  # its timer stays armed
        started = time.monotonic()
        with pytest.raises(ClientTooSlowError):
            await _receive(connection, draining, 0.5)
        assert time.monotonic() - started >= 0.49

    _run(scenario)


def test_draining_ends_a_wait_at_once_and_an_outside_cancel_stays_a_cancel() -> None:
    async def scenario() -> None:
        connection, draining = Connection(), DrainSignal()
        waiting = asyncio.ensure_future(_receive(connection, draining, 120.0, idle=True))
        await asyncio.sleep(0.05)
        draining.set()
        with pytest.raises(Draining):
            await waiting

        other = Connection()
        waiting = asyncio.ensure_future(_receive(other, DrainSignal(), 0.2, idle=True))
        await asyncio.sleep(0.05)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await asyncio.sleep(0.3)  # its timer fires with nothing waiting: nothing happens
        other.deliver_soon(b"later")
        assert await _receive(other, DrainSignal(), 0.2, idle=True) == b"later"

    _run(scenario)
