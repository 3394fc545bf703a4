"""A sandbox's release on the runtime's event loop (issue 16).

:class:`SandboxLoop` is the half of :class:`cape.enclave.sandbox.FunctionSandbox` that ends a
session's sandbox from the event loop where the sandbox zygote started it: the kill through pid
1's pidfd, the zygote's exit report (a reader on the status socket, then on the monitor's
pidfd), the cgroup's removal (bounded retries on the loop's timers), each under the deadline the
blocking :meth:`~cape.enclave.sandbox.FunctionSandbox.close` has, and only then the uid's lock
file. Before, each session handed its release to a thread (``asyncio.to_thread``): a hand-off
and a wake-up of the loop per session. Split from :mod:`cape.enclave.sandbox` along that seam.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading

from cape.enclave.cgroups import SandboxCgroup
from cape.enclave.sandbox_calls import SandboxCalls
from cape.enclave.zygote import ZygoteSpawn

__all__ = ["SandboxLoop"]

_REAP_TIMEOUT_S = 5.0


class SandboxLoop(SandboxCalls):
    """A sandbox's release on the event loop (see the module docstring); its state and the
    blocking counterparts are :class:`cape.enclave.sandbox.FunctionSandbox`'s."""

    _state_lock: threading.Lock
    _reaped: bool
    _closed: bool
    _cgroup: SandboxCgroup | None
    _cgroup_removed: bool

    def close(self) -> None:
        """Kill and reap the sandbox, give back what it held (FunctionSandbox's)."""
        raise NotImplementedError

    def _reaped_with(self, result: tuple[int | None, float] | None) -> bool:
        """Record an exit report (FunctionSandbox's)."""
        raise NotImplementedError

    async def close_async(self) -> None:
        """:meth:`close` on the event loop (issue 16): the kill, the zygote's exit report (a
        reader on its status socket, then on the monitor's pidfd, under the same deadlines)
        and the cgroup's removal (its bounded retries on the loop's timers) without a thread;
        then the uid's lock file, only once the sandbox is gone. A bubblewrap sandbox, or one
        that another thread holds (a blocking call, ``close`` from the host's hang-up), is
        closed on a thread as before. Interrupted (cancelled), it finishes with :meth:`close`.
        """
        if not isinstance(self._spawn, ZygoteSpawn) or not self._call_lock.acquire(False):
            await asyncio.to_thread(self.close)
            return
        try:
            if not self._state_lock.acquire(False):
                self._call_lock.release()
                await asyncio.to_thread(self.close)
                return
            try:
                await self._terminate_async(self._spawn, "the sandbox was closed")
                if self._cgroup is not None and not self._closed and not self._cgroup_removed:
                    await self._cgroup.remove_async()
                    self._cgroup_removed = True
            finally:
                self._state_lock.release()
                self._call_lock.release()
        finally:
            self.close()  # what is left takes no wait (all of it, after an interruption)

    async def _terminate_async(self, spawn: ZygoteSpawn, why: str) -> None:
        """:meth:`_terminate` for a kill, on the event loop (``_state_lock`` held)."""
        if self._reaped:
            return
        self._dead = self._killed = why
        if self._pid1_fd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pid1_fd, signal.SIGKILL)
        else:
            spawn.kill()
        if not self._reaped_with(await spawn.reap_async(_REAP_TIMEOUT_S)):
            spawn.kill()
            self._reaped_with(await spawn.reap_async(None))
        self._reaped = True
