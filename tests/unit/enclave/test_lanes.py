"""The enclave's lanes (issue 18, finding 3): bounded, fairly shared, "busy" instead of a stall.

Real threads and a real event loop; the work is a thread that waits on an event the test sets,
so what runs when is decided by the test, not by timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable

import pytest

from cape.enclave.lanes import Lane, LaneLimits, Offload
from cape.errors import BusyError

SETTLE_S = 30.0  # liveness bound only: every wait below ends as soon as its condition holds


async def _until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), SETTLE_S)


def _run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), SETTLE_S * 4))


class Gate:
    """Work that holds its thread until released; records the order in which it started."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self._events: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def work(self, name: str) -> str:
        event = threading.Event()
        with self._lock:
            self._events[name] = event
            self.started.append(name)
        event.wait(SETTLE_S)
        return name

    def has_started(self, name: str) -> Callable[[], bool]:
        return lambda: name in self.started

    def is_last(self, name: str) -> Callable[[], bool]:
        return lambda: bool(self.started) and self.started[-1] == name

    def release(self, name: str) -> None:
        with self._lock:
            self._events[name].set()


def test_one_party_holds_at_most_its_share_and_the_other_runs_at_once() -> None:
    async def scenario() -> None:
        lane, gate = Lane("calls", LaneLimits(4, 2, 10, 10)), Gate()
        mallory = [asyncio.create_task(lane.run("mallory", gate.work, f"m{i}")) for i in range(6)]
        await _until(lambda: len(gate.started) == 2)
        assert lane.running("mallory") == 2 and lane.waiting("mallory") == 4
        alice = asyncio.create_task(lane.run("alice", gate.work, "a0"))
        await _until(lambda: "a0" in gate.started)  # free threads remain: no wait behind mallory
        gate.release("a0")
        assert await alice == "a0"
        for i in range(6):
            await _until(gate.has_started(f"m{i}"))
            gate.release(f"m{i}")
        assert await asyncio.gather(*mallory) == [f"m{i}" for i in range(6)]
        assert lane.running() == 0 and lane.waiting() == 0
        lane.close()

    _run(scenario)


def test_waiting_parties_are_admitted_round_robin() -> None:
    async def scenario() -> None:
        lane, gate = Lane("calls", LaneLimits(1, 1, 10, 10)), Gate()
        first = asyncio.create_task(lane.run("mallory", gate.work, "m0"))
        await _until(lambda: gate.started == ["m0"])
        tasks = [asyncio.create_task(lane.run("mallory", gate.work, f"m{i}")) for i in (1, 2, 3)]
        await _until(lambda: lane.waiting("mallory") == 3)
        tasks.append(asyncio.create_task(lane.run("alice", gate.work, "a0")))
        await _until(lambda: lane.waiting() == 4)
        for name in ("m0", "m1", "a0", "m2", "m3"):
            await _until(gate.is_last(name))
            gate.release(name)
        await asyncio.gather(first, *tasks)
        # alice, who came last, ran after one more of mallory's calls, not behind all of them.
        assert gate.started == ["m0", "m1", "a0", "m2", "m3"]
        lane.close()

    _run(scenario)


@pytest.mark.parametrize("queue_per_party", [0, 2])
def test_a_full_queue_refuses_at_once_with_busy(queue_per_party: int) -> None:
    async def scenario() -> None:
        lane, gate = Lane("calls", LaneLimits(4, 2, queue_per_party, 100)), Gate()
        held = [asyncio.create_task(lane.run("mallory", gate.work, f"m{i}")) for i in range(2)]
        queued = [
            asyncio.create_task(lane.run("mallory", gate.work, f"q{i}"))
            for i in range(queue_per_party)
        ]
        await _until(lambda: len(gate.started) == 2 and lane.waiting() == queue_per_party)
        with pytest.raises(BusyError, match=r"the enclave is busy \(calls\); try again later"):
            await lane.run("mallory", gate.work, "refused")
        alice = asyncio.create_task(lane.run("alice", gate.work, "a0"))
        await _until(lambda: "a0" in gate.started)
        for name in ["a0", "m0", "m1"] + [f"q{i}" for i in range(queue_per_party)]:
            await _until(gate.has_started(name))
            gate.release(name)
        await asyncio.gather(alice, *held, *queued)
        assert "refused" not in gate.started
        lane.close()

    _run(scenario)


def test_the_whole_queue_is_bounded_too() -> None:
    async def scenario() -> None:
        lane, gate = Lane("calls", LaneLimits(1, 1, 5, 2)), Gate()
        first = asyncio.create_task(lane.run("p0", gate.work, "p0"))
        await _until(lambda: gate.started == ["p0"])
        queued = [asyncio.create_task(lane.run(f"p{i}", gate.work, f"p{i}")) for i in (1, 2)]
        await _until(lambda: lane.waiting() == 2)
        with pytest.raises(BusyError):
            await lane.run("p3", gate.work, "p3")
        for name in ("p0", "p1", "p2"):
            await _until(gate.has_started(name))
            gate.release(name)
        await asyncio.gather(first, *queued)
        lane.close()

    _run(scenario)


def test_a_cancelled_caller_keeps_the_slot_until_its_thread_ends() -> None:
    # The thread cannot be cancelled: its slot stays taken, so the lane never over-commits,
    # and is passed on when the thread ends. A cancelled waiter leaves the queue.
    async def scenario() -> None:
        lane, gate = Lane("calls", LaneLimits(1, 1, 5, 5)), Gate()
        running = asyncio.create_task(lane.run("mallory", gate.work, "m0"))
        await _until(lambda: gate.started == ["m0"])
        waiter = asyncio.create_task(lane.run("mallory", gate.work, "m1"))
        await _until(lambda: lane.waiting() == 1)
        waiter.cancel()
        running.cancel()
        await asyncio.gather(waiter, running, return_exceptions=True)
        assert lane.waiting() == 0 and lane.running() == 1
        alice = asyncio.create_task(lane.run("alice", gate.work, "a0"))
        await asyncio.sleep(0.2)
        assert gate.started == ["m0"]  # alice waits for the thread, not for the cancelled task
        gate.release("m0")
        await _until(lambda: "a0" in gate.started)
        gate.release("a0")
        assert await alice == "a0"
        assert lane.running() == 0 and "m1" not in gate.started
        lane.close()

    _run(scenario)


def test_a_call_on_the_event_loop_counts_the_same_and_keeps_its_slot_for_its_thread() -> None:
    # run_async (issue 16: a call without a thread hop) is admitted like run: one party's
    # share, busy beyond its queue. What it hands to the lane's threads keeps the slot until
    # the thread ends, even when the caller is cancelled first.
    async def scenario() -> None:
        lane, gate = Lane("calls", LaneLimits(2, 1, 0, 0)), Gate()
        on_loop = threading.get_ident()
        ran_on: list[int] = []

        async def call(offload: Offload, name: str) -> str:
            ran_on.append(threading.get_ident())
            return await offload(gate.work, name)

        mallory = asyncio.create_task(lane.run_async("mallory", call, "m0"))
        await _until(lambda: gate.started == ["m0"])
        assert ran_on == [on_loop] and lane.running("mallory") == 1
        with pytest.raises(BusyError):
            await lane.run_async("mallory", call, "m1")  # over her share, and no queue
        mallory.cancel()
        await asyncio.gather(mallory, return_exceptions=True)
        assert lane.running("mallory") == 1  # her thread still runs: the slot stays taken
        alice = asyncio.create_task(lane.run_async("alice", call, "a0"))
        await _until(lambda: "a0" in gate.started)  # the other slot
        with pytest.raises(BusyError):
            await lane.run_async("bob", call, "b0")  # both slots taken, no queue
        gate.release("m0")
        await _until(lambda: lane.running("mallory") == 0)
        gate.release("a0")
        assert await alice == "a0"
        assert lane.running() == 0
        lane.close()

    _run(scenario)


def test_a_slot_without_a_thread_counts_the_same() -> None:
    async def scenario() -> None:
        lane = Lane("key service", LaneLimits(2, 1, 0, 0))
        async with lane.slot("mallory"):
            assert lane.running("mallory") == 1
            with pytest.raises(BusyError):
                async with lane.slot("mallory"):
                    pass
            async with lane.slot("alice"):
                assert lane.running() == 2
        assert lane.running() == 0

    _run(scenario)


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        LaneLimits(0, 1, 1, 1)
    with pytest.raises(ValueError, match="positive"):
        LaneLimits(1, 1, -1, 1)
