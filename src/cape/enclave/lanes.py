"""Bounded, fairly shared capacity inside the enclave (issue 18, finding 3).

Blocking work used to share the event loop's default executor (a handful of threads): sixteen
sessions of a function that sleeps held every thread, and another user's attestation waited
behind them for tens of seconds. Each kind of work now has its own :class:`Lane`:

- ``calls``: sandbox starts and function calls (user code runs while a thread waits);
- ``keys``: decrypting bundles and inputs, which waits on key-service round trips, and
  unpacking; also the bound on key-service requests in flight;
- ``attestation``: secure-module signatures and the recipient key's CMS opening (short); a
  session's document from a module that only computes in this process (the simulated
  NSM) is made on the event loop while its slot is held (session.py, issue 16).

A lane has ``threads`` slots. One *party* (the calling user, else the function owner) holds at
most ``per_party`` of them, so nobody can take a whole lane; the rest wait in one queue per
party and are admitted round-robin across parties as slots free up, so a party with a long
queue does not delay one with a short one. A party may keep at most ``queue_per_party`` waiting
and the lane at most ``queue`` in all: beyond that :meth:`Lane.run` raises
:class:`cape.errors.BusyError` at once (the host answers websocket close 1013, "try again
later") instead of letting the caller stall.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from cape.errors import BusyError

__all__ = ["Lane", "LaneLimits", "Lanes", "Offload"]

T = TypeVar("T")


class Offload(Protocol):
    """Runs ``fn(*args)`` on the lane's threads within a slot already held (see
    :meth:`Lane.run_async`)."""

    def __call__(self, fn: Callable[..., T], /, *args: Any) -> Awaitable[T]: ...


@dataclass(frozen=True)
class LaneLimits:
    threads: int
    per_party: int
    queue_per_party: int
    queue: int

    def __post_init__(self) -> None:
        if min(self.threads, self.per_party) < 1 or min(self.queue_per_party, self.queue) < 0:
            raise ValueError(f"lane limits must be positive: {self}")


class Lane:
    """``threads`` slots shared fairly by parties; see the module docstring."""

    def __init__(self, name: str, limits: LaneLimits) -> None:
        self.name = name
        self.limits = limits
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._running: dict[str, int] = {}
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._queued = 0

    # -- admission

    def _free_for(self, party: str) -> bool:
        return (
            sum(self._running.values()) < self.limits.threads
            and self._running.get(party, 0) < self.limits.per_party
        )

    def _take(self, party: str) -> None:
        self._running[party] = self._running.get(party, 0) + 1

    def _give_back(self, party: str) -> None:
        left = self._running[party] - 1
        if left:
            self._running[party] = left
        else:
            del self._running[party]
        self._admit_next()

    def _admit_next(self) -> None:
        """Round-robin: the first party (in queue order) that may run gets a slot, then moves
        to the back of the order."""
        for party in list(self._waiting):
            if not self._free_for(party):
                continue
            queue = self._waiting.pop(party)
            while queue and queue[0].done():  # cancelled while waiting
                queue.popleft()
            if not queue:
                continue
            future = queue.popleft()
            self._queued -= 1
            if queue:
                self._waiting[party] = queue  # to the back: others go first next time
            self._take(party)
            future.set_result(None)
            if sum(self._running.values()) >= self.limits.threads:
                return

    async def _acquire(self, party: str) -> None:
        if not self._waiting.get(party) and self._free_for(party):
            self._take(party)
            return
        if (
            len(self._waiting.get(party, ())) >= self.limits.queue_per_party
            or self._queued >= self.limits.queue
        ):
            raise BusyError(f"the enclave is busy ({self.name}); try again later")
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(party, deque()).append(future)
        self._queued += 1
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._give_back(party)  # admitted and cancelled at once: pass the slot on
            else:
                self._queued -= 1
                queue = self._waiting.get(party)
                if queue is not None and future in queue:
                    queue.remove(future)
                    if not queue:
                        del self._waiting[party]
            raise

    @contextlib.asynccontextmanager
    async def slot(self, party: str) -> AsyncIterator[None]:
        """Hold one slot for async work (no thread), e.g. a key-service request in flight."""
        await self._acquire(party)
        try:
            yield
        finally:
            self._give_back(party)

    async def run(self, party: str, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on this lane's threads once ``party`` is admitted.

        The slot stays taken until the thread has finished, even when the awaiting task is
        cancelled (the thread cannot be): capacity never over-commits.
        """
        await self._acquire(party)
        loop = asyncio.get_running_loop()
        try:
            future = loop.run_in_executor(self._pool(), functools.partial(fn, *args))
        except BaseException:
            self._give_back(party)
            raise
        future.add_done_callback(functools.partial(self._finished, party))
        return await asyncio.shield(future)

    async def run_async(self, party: str, fn: Callable[..., Awaitable[T]], *args: object) -> T:
        """Run the coroutine ``fn(offload, *args)`` on the event loop once ``party`` is
        admitted, holding one slot as :meth:`run` does, without a thread per call (issue 16).

        ``await offload(g, *a)`` runs the blocking ``g(*a)`` on this lane's threads within that
        slot (one at a time per slot: the lane has a thread per slot). The slot is given back
        once the coroutine and every thread it started have finished, even when the awaiting
        task is cancelled first: capacity never over-commits, as with :meth:`run`.
        """
        await self._acquire(party)
        loop = asyncio.get_running_loop()
        pending = 1  # the coroutine, and each thread it started that has not finished

        def finished(future: asyncio.Future[Any] | None = None) -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                self._give_back(party)
            if future is not None and not future.cancelled():
                future.exception()  # retrieved: an awaiter cancelled meanwhile is not an error

        def offload(work: Callable[..., Any], /, *work_args: Any) -> Awaitable[Any]:
            nonlocal pending
            future = loop.run_in_executor(self._pool(), functools.partial(work, *work_args))
            pending += 1
            future.add_done_callback(finished)
            return asyncio.shield(future)

        try:
            return await fn(offload, *args)
        finally:
            finished()

    def _finished(self, party: str, future: asyncio.Future[T]) -> None:
        self._give_back(party)
        if not future.cancelled():
            future.exception()  # retrieved: an awaiter cancelled meanwhile is not an error

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.limits.threads, thread_name_prefix=f"cape-{self.name}"
            )
        return self._executor

    # -- introspection (tests, logs)

    def running(self, party: str | None = None) -> int:
        if party is None:
            return sum(self._running.values())
        return self._running.get(party, 0)

    def waiting(self, party: str | None = None) -> int:
        if party is None:
            return self._queued
        return sum(1 for f in self._waiting.get(party, ()) if not f.done())

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


#: Defaults: 32 concurrent function calls (8 per party), 4 key-service waits (2 per party,
#: 64 requests in flight), 2 attestation signers.
CALLS = LaneLimits(threads=32, per_party=8, queue_per_party=16, queue=128)
KEYS = LaneLimits(threads=8, per_party=2, queue_per_party=16, queue=128)
KMS = LaneLimits(threads=64, per_party=16, queue_per_party=32, queue=256)
ATTESTATION = LaneLimits(threads=2, per_party=1, queue_per_party=16, queue=256)


class Lanes:
    """The runtime's lanes, one per kind of work."""

    def __init__(
        self,
        *,
        calls: LaneLimits = CALLS,
        keys: LaneLimits = KEYS,
        kms: LaneLimits = KMS,
        attestation: LaneLimits = ATTESTATION,
    ) -> None:
        self.calls = Lane("function calls", calls)
        self.keys = Lane("decryption", keys)
        self.kms = Lane("key service", kms)
        self.attestation = Lane("attestation", attestation)

    def close(self) -> None:
        for lane in (self.calls, self.keys, self.kms, self.attestation):
            lane.close()
