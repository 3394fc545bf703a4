"""The password-hashing gate: how many argon2 hashes the server computes at once.

Every signup and login hashes a password with argon2id (64 MiB, 4 lanes: argon2-cffi's
defaults, which stay as they are). A flood of them, run in the web server's shared thread pool,
used to take every core and slow other tenants' runs about fifteen-fold. So hashing happens
only here:

- at most ``concurrency`` hashes at once (by default half the CPUs, at least one), on threads
  of the gate's own, not the pool other requests use;
- at most ``queue`` more requests wait for a turn, on the event loop (no thread waits);
- any request beyond that is refused at once with :class:`~cape.host.admission.ServerBusyError`
  (HTTP 503 with ``Retry-After``), like every other "the server is full" answer;
- the gate's threads, and the threads argon2 starts for its lanes (a new thread inherits its
  creator's nice value on Linux), run at a lower CPU priority (:data:`NICE`), so what hashing
  there is yields the CPU to sessions.

``cape serve --limit password_hashes=N --limit password_hash_queue=N`` sets the two bounds
(docs/limits.md, "Accounts"). The gate counts what it admitted and refused, and the most
hashes it ran at once, for tests and logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Final, TypeVar

from cape.host.admission import ServerBusyError

__all__ = ["DEFAULT_HASH_QUEUE", "NICE", "PasswordHashGate", "default_hash_concurrency"]

_T = TypeVar("_T")

NICE: Final = 10
"""How much lower than the server's the hashing threads' priority is (``nice`` increment)."""
DEFAULT_HASH_QUEUE: Final = 8
RETRY_AFTER_S: Final = 2.0
BUSY_TEXT: Final = "the server is busy checking passwords; try again later"


def default_hash_concurrency() -> int:
    """Half this machine's CPUs, at least one."""
    return max(1, (os.cpu_count() or 1) // 2)


def _lower_priority() -> None:
    """Run this thread (and the threads it starts) at a lower priority; best effort."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux, or a sandbox refuses
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)


class PasswordHashGate:
    """Runs password-hashing work with bounded concurrency and a bounded queue (one per
    server process; :meth:`run` is called from the event loop)."""

    def __init__(self, concurrency: int | None = None, queue: int = DEFAULT_HASH_QUEUE) -> None:
        concurrency = default_hash_concurrency() if concurrency is None else concurrency
        if concurrency < 1 or queue < 0:
            raise ValueError("the password hash gate needs concurrency >= 1 and queue >= 0")
        self.concurrency = concurrency
        self.queue = queue
        self._turns = asyncio.Semaphore(concurrency)
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix="cape-hash", initializer=_lower_priority
        )
        self.waiting = 0
        self.running = 0
        self.admitted = 0
        self.refused = 0
        self.peak = 0
        """The most hashing jobs that ran at once."""

    async def run(self, work: Callable[[], _T]) -> _T:
        """``work()`` on a hashing thread once a turn is free.

        Raises:
            ServerBusyError: every turn is taken and the queue is full (nothing was run).
        """
        if self._turns.locked() and self.waiting >= self.queue:
            self.refused += 1
            raise ServerBusyError(BUSY_TEXT, retry_after_s=RETRY_AFTER_S)
        self.waiting += 1
        try:
            await self._turns.acquire()
        finally:
            self.waiting -= 1
        self.admitted += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, work)
        finally:
            self.running -= 1
            self._turns.release()
