"""A sandbox's start and release on the runtime's event loop (issue 16), and what a start takes.

:class:`SandboxLoop` is the half of :class:`cape.enclave.sandbox.FunctionSandbox` that a
session's sandbox goes through on the event loop where the sandbox zygote starts it: the
zygote's answers and the worker's READY read by readers on their sockets, the release's kill,
the zygote's exit report (a reader on the status socket, then on the monitor's pidfd) and the
cgroup's removal (bounded retries on the loop's timers), each under the deadline the blocking
path has. Before, each session handed both to a thread (the replacement spare's start on the
calls lane, the release on ``asyncio.to_thread``): two hand-offs and wake-ups per session.
What still blocks — bubblewrap's start, serving encryption services while ``app.py`` loads, a
failed load's reaping — goes to the calls lane's thread within the slot the start holds.

Also here (split from :mod:`cape.enclave.sandbox` along that seam, no change of behaviour):
the resources a start takes and gives back on failure (:func:`_prepare`, :func:`_undo`): the
host uid (:data:`UIDS`), the cgroup, the function directory's placement, the worker's argv.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, Self

from cape.enclave import cgroups
from cape.enclave.cgroups import SandboxCgroup
from cape.enclave.lanes import Offload
from cape.enclave.sandbox_calls import _READY, SandboxCalls
from cape.enclave.services import Services, services_response_limit
from cape.enclave.spawn import (
    FUNCTION_PATH,
    GUEST_PATH,
    WORKER_PATH,
    CgroupFailed,
    OutputTooLarge,
    ProtocolViolation,
    Spawn,
    Timeout,
    WorkerGone,
)
from cape.enclave.staging import layout, move_back, place_function_dir
from cape.enclave.uids import UidPool
from cape.enclave.worker import settings_args
from cape.enclave.zygote import ZygoteSpawn, ZygoteUnavailable, zygote_for
from cape.errors import SandboxError

if TYPE_CHECKING:
    from cape.enclave.sandbox import SandboxLimits

__all__ = ["UIDS", "SandboxLoop"]

log = logging.getLogger("cape.enclave")

#: Host uids for sandboxes, one per live sandbox (the runtime sets the range at start-up).
UIDS = UidPool()

_REAP_TIMEOUT_S = 5.0


class SandboxLoop(SandboxCalls):
    """A sandbox's start handshake and release on the event loop (see the module docstring);
    its state and blocking counterparts are :class:`cape.enclave.sandbox.FunctionSandbox`'s."""

    _state_lock: threading.Lock
    _reaped: bool
    _closed: bool
    _cgroup: SandboxCgroup | None
    _cgroup_removed: bool

    def close(self) -> None:
        """Kill and reap the sandbox, give back what it held (FunctionSandbox's)."""
        raise NotImplementedError

    @classmethod
    def _start(
        cls, function_dir: Path, limits: SandboxLimits, services: Services | None, *, zygote: bool
    ) -> Self:
        """The blocking start (FunctionSandbox's)."""
        raise NotImplementedError

    @classmethod
    def _adopt(
        cls,
        spawn: Spawn | ZygoteSpawn,
        limits: SandboxLimits,
        uid: int | None,
        services: Services | None,
        restore: tuple[Path, Path] | None,
        cgroup: SandboxCgroup | None,
    ) -> Self:
        """The sandbox object for a started ``spawn`` (FunctionSandbox's)."""
        raise NotImplementedError

    @classmethod
    async def _start_on_loop(
        cls,
        function_dir: Path,
        offload: Offload,
        limits: SandboxLimits,
        services: Services | None,
    ) -> Self:
        """FunctionSandbox.start_async where the zygote starts it, its probes done."""
        uid, restore, cgroup, source, worker_args = _prepare(function_dir, limits)
        try:
            started, zygote = await _spawn_async(
                uid, source, limits.tmp_bytes, worker_args, services, cgroup, offload
            )
        except BaseException:
            _undo(uid, restore, cgroup)
            raise
        if started is None:  # this one starts on a thread, as before
            _undo(uid, restore, cgroup)
            return await offload(
                functools.partial(cls._start, function_dir, limits, services, zygote=zygote)
            )
        sandbox = cls._adopt(started, limits, uid, services, restore, cgroup)
        try:
            await sandbox._handshake_async(offload)
        except Exception:
            await offload(sandbox.close)
            raise
        except BaseException:  # cancelled: end it here and now, nothing may outlive the start
            sandbox.close()
            raise
        return sandbox

    def _load_failed(self, exc: Exception) -> NoReturn:
        """Why loading app.py failed, the sandbox reaped (FunctionSandbox's)."""
        raise NotImplementedError

    def _check_loaded(self, status: int, body: bytes) -> None:
        """Raise unless the worker said READY (FunctionSandbox's)."""
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

    async def _handshake_async(self, offload: Offload) -> None:
        """:meth:`_handshake` on the event loop (a zygote's sandbox, not yet shared): its
        failures are reaped and reported on ``offload``'s thread."""
        assert isinstance(self._spawn, ZygoteSpawn)
        deadline = time.monotonic() + self._limits.load_timeout_s
        try:
            self._pid1_fd = await self._spawn.wait_started_async(deadline)
            status, body = await self._await_reply(deadline, offload)
        except _LOAD_FAILURES as exc:
            await offload(self._load_failed, exc)
            raise AssertionError("unreachable") from None
        if status != _READY or body:
            await offload(self._check_loaded, status, body)

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


# What a start's frames raise while app.py loads (see FunctionSandbox._load_failed).
_LOAD_FAILURES = (Timeout, WorkerGone, OutputTooLarge, ProtocolViolation, CgroupFailed)


def _prepare(
    function_dir: Path, limits: SandboxLimits
) -> tuple[
    int | None,
    tuple[Path, Path] | None,
    SandboxCgroup | None,
    Path,
    Callable[[int, int | None], list[str]],
]:
    """A start's uid, relocation, cgroup, bind source and worker argv (undone on failure)."""
    if not function_dir.is_dir():
        raise SandboxError("load", f"function directory {function_dir} does not exist")
    uid = UIDS.acquire()
    restore: tuple[Path, Path] | None = None
    cgroup: SandboxCgroup | None = None
    try:
        cgroup = _new_cgroup(limits)
        source, original = place_function_dir(function_dir, uid)
        if original is not None:
            restore = (source, original)
    except BaseException:
        _undo(uid, restore, cgroup)
        raise
    config: dict[str, object] = {
        "root": FUNCTION_PATH,
        "limits": limits._rlimits(),
        "max_input_bytes": limits.max_input_bytes,
        "max_output_bytes": limits.max_output_bytes,
        "guest_dir": GUEST_PATH,
        "services": None,
    }

    def worker_args(fd: int, services_fd: int | None) -> list[str]:
        if services_fd is not None:
            config["services"] = {
                "fd": services_fd,
                "max_request_bytes": limits.max_input_bytes,
                "max_response_bytes": services_response_limit(limits.max_input_bytes),
            }
        return [WORKER_PATH, str(fd), *settings_args(config)]

    return uid, restore, cgroup, source, worker_args


def _undo(uid: int | None, restore: tuple[Path, Path] | None, cgroup: SandboxCgroup | None) -> None:
    """Give back what :func:`_prepare` took, for a start that failed before its sandbox."""
    UIDS.release(uid)
    if restore is not None:
        move_back(*restore)
    if cgroup is not None:
        cgroup.remove()


def _new_cgroup(limits: SandboxLimits) -> SandboxCgroup | None:
    """The sandbox's own cgroup, or None where cgroups are unavailable (rlimits only)."""
    groups, _ = cgroups.shared()
    if groups is None:
        return None
    try:
        return groups.create(limits._cgroup())
    except OSError as exc:
        raise SandboxError(
            "unavailable", f"cannot create the sandbox's cgroup ({exc.strerror or exc})"
        ) from None


async def _spawn_async(
    uid: int | None,
    source: Path,
    tmp_bytes: int,
    worker_args: Callable[[int, int | None], list[str]],
    services: Services | None,
    cgroup: SandboxCgroup | None,
    offload: Offload,
) -> tuple[ZygoteSpawn | None, bool]:
    """The zygote's start of this sandbox on the event loop, or (None, whether the zygote
    may still be tried) when this start must be made on a thread as before: no zygote here,
    the request could not be sent at once (a restart, a full socket), or the zygote was
    wedged or died mid-start (then that start is bubblewrap's: ``False``)."""
    zygote = zygote_for(layout(), uid)  # probed already (see _starts_on_loop): a look-up
    if zygote is None or uid is None:
        return None, True
    cgroup_fds = cgroup.open_procs() if cgroup is not None else []
    try:
        started = await ZygoteSpawn.start_async(
            zygote,
            uid,
            source,
            tmp_bytes,
            worker_args,
            offload,
            services=services is not None,
            cgroup_fds=tuple(cgroup_fds),
        )
    except ZygoteUnavailable as exc:
        log.warning("%s; this sandbox starts with bubblewrap", exc)
        return None, False
    finally:
        for fd in cgroup_fds:
            os.close(fd)
    return started, True
