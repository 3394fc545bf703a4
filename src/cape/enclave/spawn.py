"""Start one bubblewrap sandbox and talk to it: the argv, the descriptors, the framed I/O.

:class:`Spawn` builds the sandbox described in :mod:`cape.enclave.sandbox` (namespaces, the
read-only mount tree, size-capped scratch tmpfs, the function directory read-only at
``/function``, the seccomp filter) and starts bubblewrap as the sandbox's host uid (through
``setpriv`` where it exists, so that starting it costs no fork of the runtime). With
``block=True`` the sandbox's first process waits on a pipe before running anything, so that
the caller can place every process of the sandbox in its cgroup first (:meth:`Spawn.release`).

The helpers below read and write the worker's frames against a deadline; they raise the
small private exceptions the sandbox turns into :class:`cape.errors.SandboxError` reasons.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import select
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from cape.enclave.cgroups import SandboxCgroup
from cape.enclave.sandbox_root import (
    FUNCTION_PATH,
    GROUP,
    GUEST_MODULES,
    GUEST_PATH,
    HOSTNAME,
    INNER_UID,
    PASSWD,
    WORKER_PATH,
    environment,
    read_complaint,
)
from cape.enclave.staging import SUPPORT, Layout
from cape.errors import SandboxError

__all__ = ["BWRAP", "FUNCTION_PATH", "GUEST_PATH", "WORKER_PATH", "Spawn"]

#: The bubblewrap executable; ``None`` when it is not installed (then nothing runs).
BWRAP: str | None = shutil.which("bwrap")
#: util-linux's ``setpriv`` (Debian: essential), which switches to the sandbox's uid before it
#: execs bubblewrap; ``None``: ``subprocess`` switches it in the forked child instead (below).
SETPRIV: str | None = shutil.which("setpriv")
#: The uid and gid the function sees inside its namespace.
WORKER_SOURCE = Path(__file__).with_name("worker.py")
GUEST_SOURCE = Path(__file__).with_name("guest")
# Paths inside the sandbox's own mount namespace (private tmpfs, not the host's /tmp).
_TMP = "/tmp"  # noqa: S108
_SHM = "/dev/shm"  # noqa: S108


# bwrap's --die-with-parent follows the *thread* that forked it, so every sandbox is forked
# by one long-lived thread rather than by whichever (possibly short-lived) thread asked.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cape-sandbox")


@functools.cache
def _worker_source() -> bytes:
    return WORKER_SOURCE.read_bytes()


@functools.cache
def _guest_sources() -> tuple[tuple[str, bytes], ...]:
    return tuple((name, (GUEST_SOURCE / name).read_bytes()) for name in GUEST_MODULES)


def _data_fd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class Spawn:
    """One bubblewrap process and the runtime's ends of its descriptors."""

    def __init__(
        self,
        layout: Layout,
        uid: int | None,
        function_dir: Path,
        tmp_bytes: int,
        python_args: Callable[[int, int | None], list[str]],
        *,
        services: bool = False,
        block: bool = False,
    ) -> None:
        from cape.enclave import seccomp  # here: a missing libseccomp must fail closed, later

        if BWRAP is None:
            raise SandboxError("unavailable", "bubblewrap is not installed")
        self.services: socket.socket | None = None
        self.channel, child_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_sockets = [child_channel]
        self.info_fd, info_w = os.pipe()
        self.err_fd, err_w = os.pipe()
        child_fds = [info_w, err_w]
        self._block_w: int | None = None
        try:
            if services:
                self.services, child_services = socket.socketpair(
                    socket.AF_UNIX, socket.SOCK_STREAM
                )
                child_sockets.append(child_services)
            if block:
                block_r, self._block_w = os.pipe()
                child_fds.append(block_r)
            seccomp_fd = seccomp.program_fd()
            child_fds.append(seccomp_fd)
            worker_fd = _data_fd("worker", _worker_source())
            child_fds.append(worker_fd)
            passwd_fd = _data_fd("passwd", PASSWD.encode())
            child_fds.append(passwd_fd)
            group_fd = _data_fd("group", GROUP.encode())
            child_fds.append(group_fd)
            guest_fds: list[tuple[int, str]] = []
            for module, text in _guest_sources():
                guest_fds.append((_data_fd(module, text), f"{GUEST_PATH}/{module}"))
                child_fds.append(guest_fds[-1][0])
        except BaseException:
            for sock in child_sockets:
                sock.close()
            for fd in child_fds:
                os.close(fd)
            self.close_fds()
            raise
        child_fds += [sock.fileno() for sock in child_sockets]
        argv = [BWRAP, "--unshare-all", "--unshare-user", "--disable-userns"]
        argv += ["--die-with-parent", "--as-pid-1", "--new-session", "--hostname", HOSTNAME]
        argv += ["--uid", str(INNER_UID), "--gid", str(INNER_UID), "--clearenv"]
        for name, value in environment(layout.python_bin).items():
            argv += ["--setenv", name, value]
        for source, dest in layout.binds:
            argv += ["--ro-bind", source, dest]
        for target, path in layout.symlinks:
            argv += ["--symlink", target, path]
        for path in layout.hidden:
            argv += ["--ro-bind", str(SUPPORT.empty), path]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", _SHM]
        argv += ["--size", str(tmp_bytes), "--perms", "1777", "--tmpfs", _TMP]
        argv += ["--ro-bind", str(function_dir), FUNCTION_PATH]  # read-only: finding 18.4
        argv += ["--ro-bind-data", str(worker_fd), WORKER_PATH]
        for fd, path in guest_fds:
            argv += ["--ro-bind-data", str(fd), path]
        argv += ["--ro-bind-data", str(passwd_fd), "/etc/passwd"]
        argv += ["--ro-bind-data", str(group_fd), "/etc/group"]
        argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
        argv += ["--chdir", FUNCTION_PATH, "--info-fd", str(info_w), "--seccomp", str(seccomp_fd)]
        if block:
            argv += ["--block-fd", str(block_r)]
        child_services_fd = child_sockets[1].fileno() if services else None
        argv += [
            layout.python,
            "-I",
            "-S",
            "-B",
            *python_args(child_channel.fileno(), child_services_fd),
        ]
        try:
            self.proc = _SPAWNER.submit(self._popen, argv, uid, child_fds).result()
        except BaseException:
            self.close_fds()
            raise
        finally:
            for sock in child_sockets:
                sock.close()
            for fd in child_fds[: -len(child_sockets)]:
                os.close(fd)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.channel.setblocking(False)
        if self.services is not None:
            self.services.setblocking(False)

    @staticmethod
    def _popen(argv: list[str], uid: int | None, fds: list[int]) -> subprocess.Popen[bytes]:
        # Python 3.11's subprocess cannot vfork when it switches uid, gid or groups itself
        # (``user=``/``group=``/``extra_groups=``): it forks, copying the page tables of this
        # whole runtime (≈1.7 ms of CPU at ≈50 MB, more as it grows). With setpriv it vforks
        # and setpriv makes the same switch before it execs bubblewrap: real, effective and
        # saved uid and gid the sandbox's, no supplementary groups (``--clear-groups``), and
        # no capabilities left, as the kernel drops them on leaving uid 0 (checked by
        # test_sandbox.py's test_bubblewrap_runs_as_the_sandbox_uid_with_no_groups_or_capabilities,
        # for both ways). A failed switch ends the process before bubblewrap runs: a non-zero
        # exit status and setpriv's line on the stderr pipe, which the sandbox reports.
        switch = uid is not None and SETPRIV is None
        if uid is not None and SETPRIV is not None:
            argv = [SETPRIV, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--", *argv]
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=fds[1],
            pass_fds=fds,
            env={},
            start_new_session=True,
            user=uid if switch else None,
            group=uid if switch else None,
            extra_groups=[] if switch else None,
        )

    def wait_started(self, deadline: float, cgroup: SandboxCgroup | None) -> int | None:
        """bubblewrap's info JSON names the sandbox's pid 1: return a pidfd of it (to kill the
        sandbox) after moving bubblewrap and pid 1 into ``cgroup``, then let them go on."""
        data = b""
        while True:
            chunk = read_some(self.info_fd, deadline, 4096)
            if not chunk:
                break
            data += chunk
            if len(data) > 64 << 10:
                raise ProtocolViolation("oversized info from bubblewrap")
        if not data:
            raise WorkerGone
        try:
            pid1 = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolViolation("unreadable info from bubblewrap") from exc
        pid1_fd = None
        with contextlib.suppress(ProcessLookupError):
            pid1_fd = os.pidfd_open(pid1)
        if cgroup is not None:
            # Both are waiting on the block pipe: nothing of the function has run yet, and
            # whatever it starts later is born inside the group.
            try:
                cgroup.add(self.proc.pid)
                cgroup.add(pid1)
            except OSError as exc:
                if pid1_fd is not None:
                    os.close(pid1_fd)
                raise CgroupFailed(exc.strerror or str(exc)) from None
        self.release()
        return pid1_fd

    @property
    def pid(self) -> int:
        """bubblewrap's host pid."""
        return self.proc.pid

    def kill(self) -> None:
        """Kill bubblewrap (the sandbox dies with it: --die-with-parent)."""
        self.proc.kill()

    def reap(self, timeout: float | None) -> tuple[int | None, float] | None:
        """(exit status, CPU seconds of bubblewrap and the sandbox) once bubblewrap has ended;
        None when ``timeout`` passed first (``None``: wait)."""
        proc = self.proc
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
            except ChildProcessError:
                return proc.returncode, 0.0
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                return proc.returncode, usage.ru_utime + usage.ru_stime
            if deadline is None:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            select.select([self.pidfd], [], [], remaining)

    def release(self) -> None:
        """Let a sandbox started with ``block=True`` go on (idempotent)."""
        if self._block_w is not None:
            fd, self._block_w = self._block_w, None
            with contextlib.suppress(OSError):
                os.write(fd, b"go")
            os.close(fd)

    def read_stderr(self) -> str:
        """bubblewrap's own complaints (the worker's stderr is /dev/null), one line, bounded."""
        return read_complaint(self.err_fd)

    def close_fds(self) -> None:
        block, self._block_w = self._block_w, None
        for fd in (self.info_fd, self.err_fd, getattr(self, "pidfd", -1), block or -1):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.channel.close()
        if self.services is not None:
            self.services.close()


# --- frames against a deadline ----------------------------------------------------------------


class Timeout(Exception):
    pass


class WorkerGone(Exception):
    pass


class OutputTooLarge(Exception):
    pass


class ProtocolViolation(Exception):
    pass


class CgroupFailed(Exception):
    pass


def wait_for(fd: int, events: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, events)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Timeout
        if poller.poll(remaining * 1000):
            return


def read_some(fd: int, deadline: float, size: int) -> bytes:
    wait_for(fd, select.POLLIN, deadline)
    try:
        return os.read(fd, size)
    except OSError:
        return b""


def send_all(sock: socket.socket, chunks: tuple[bytes, ...], deadline: float) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            wait_for(sock.fileno(), select.POLLOUT, deadline)
            try:
                sent = sock.send(view, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise WorkerGone from exc
            view = view[sent:]


def recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        wait_for(sock.fileno(), select.POLLIN, deadline)
        try:
            k = sock.recv_into(view[got:], n - got)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            raise WorkerGone from exc
        if k == 0:
            raise WorkerGone
        got += k
    return bytes(buf)


# --- the same on the event loop (FunctionSandbox.call_async) ---------------------------------

# Inputs up to this size go to the channel in one write with their frame head.
COALESCE_BYTES = 64 << 10


async def readable_first(
    loop: asyncio.AbstractEventLoop, channel: socket.socket, services: socket.socket
) -> bool:
    """Wait until ``channel`` (True, first when both are) or ``services`` (False) has
    something to read."""
    waiter: asyncio.Future[bool] = loop.create_future()

    def ready(which: bool) -> None:
        if not waiter.done():
            waiter.set_result(which)

    loop.add_reader(channel.fileno(), ready, True)
    loop.add_reader(services.fileno(), ready, False)
    try:
        if await waiter:
            return True
    finally:
        loop.remove_reader(channel.fileno())
        loop.remove_reader(services.fileno())
    ready_now, _, _ = select.select([channel], [], [], 0)
    return bool(ready_now)


async def recv_some(loop: asyncio.AbstractEventLoop, sock: socket.socket, into: memoryview) -> int:
    """At least one byte into ``into``, on the event loop; ``WorkerGone`` when ``sock`` closes
    first."""
    try:
        count = await loop.sock_recv_into(sock, into)
    except OSError as exc:
        raise WorkerGone from exc
    if count == 0:
        raise WorkerGone
    return count
