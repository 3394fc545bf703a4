"""The runtime's side of the sandbox zygote: start it, ask it for sandboxes, hear how they ended.

A bubblewrap start costs a process exec, namespace and mount set-up and a fresh interpreter per
session (≈ 25-32 ms of CPU, benchmarks/README.md "A cheaper sandbox per session"). The zygote
(:mod:`cape.enclave.zygote_program`, stdlib only, root in the runtime's namespaces, the worker
already loaded, never any user code) forks per session a child that builds the same sandbox
itself and then runs the worker, which imports ``app.py`` as before.

:class:`ZygoteSpawn` has the surface of :class:`cape.enclave.spawn.Spawn` that
:class:`cape.enclave.sandbox.FunctionSandbox` uses: the channel and services sockets, the stderr
pipe, a pidfd that becomes readable when the sandbox has ended (the zygote's *monitor* of the
session), :meth:`~ZygoteSpawn.wait_started` (the pidfd of the sandbox's pid 1: killing it ends
the pid namespace), :meth:`~ZygoteSpawn.kill` and :meth:`~ZygoteSpawn.reap` (exit status and
CPU time, which the zygote reads with ``wait4`` since the runtime is not the parent).

Where the zygote cannot be used the runtime keeps bubblewrap: not root (no uid range),
``sandbox_start = "bubblewrap"`` (:func:`set_start_path`), or the zygote's own probe sandbox
failed (:func:`zygote_for`, logged once). A zygote found dead is restarted once; if that fails
too, that start falls back to bubblewrap. No start waits on it without a deadline: a zygote
that does not fork a session within ``_FORK_TIMEOUT_S`` is ended (with the sandboxes it
forked, which die with it, so that no abandoned request can still run a function) and that
start uses bubblewrap; the next start gets a fresh zygote.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cape.enclave import seccomp
from cape.enclave.cgroups import SandboxCgroup
from cape.enclave.sandbox_root import CHANNEL_FD, SERVICES_FD, read_complaint
from cape.enclave.spawn import _SPAWNER, Timeout, WorkerGone, wait_for
from cape.enclave.staging import SUPPORT, Layout
from cape.errors import SandboxError

__all__ = [
    "START_PATHS",
    "Zygote",
    "ZygoteSpawn",
    "ZygoteUnavailable",
    "describe_start",
    "set_start_path",
    "start_path",
    "zygote_for",
]

log = logging.getLogger("cape.enclave")

PROGRAM = Path(__file__).with_name("zygote_program.py")
#: The zygote answers a request at once (it only forks); a slower answer means it is wedged.
_FORK_TIMEOUT_S = 10.0
_PROBE_TIMEOUT_S = 30.0
_EXIT_REPORT_S = 5.0
_MAX_MESSAGE = 256
START_PATHS = ("auto", "bubblewrap")


class ZygoteUnavailable(Exception):
    """The zygote could not take this start (dead, wedged, refused): use bubblewrap."""


_settings = {"start": "auto"}


def set_start_path(value: str) -> None:
    """``auto`` (the zygote where the runtime is root, else bubblewrap) or ``bubblewrap``."""
    if value not in START_PATHS:
        raise ValueError(f"sandbox start must be one of {', '.join(START_PATHS)}, not {value!r}")
    _settings["start"] = value


def start_path() -> str:
    """The configured start path (see :func:`set_start_path`)."""
    return _settings["start"]


def describe_start(setting: str | None = None) -> str:
    """One line for start-up banners: how sessions' sandboxes start (``setting``: the
    configured start path, default this process's; see :mod:`cape.enclave.zygote`)."""
    setting = start_path() if setting is None else setting
    if setting == "bubblewrap":
        return "bubblewrap per session (sandbox_start = bubblewrap)"
    if os.geteuid() != 0:
        return "bubblewrap per session (the sandbox zygote needs root)"
    return (
        "a sandbox zygote per enclave forks each session's sandbox (the same namespaces, "
        "mounts and seccomp filter as bubblewrap; bubblewrap where the zygote's probe fails)"
    )


class Zygote:
    """One zygote process for one sandbox layout (started on first use, restarted if dead)."""

    def __init__(self, layout: Layout) -> None:
        self._layout = layout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def request(self, fields: list[str], fds: list[int]) -> None:
        """Send one session's request; restart a dead zygote once, else ZygoteUnavailable."""
        data = "\0".join(fields).encode()
        with self._lock:
            for attempt in (1, 2):
                try:
                    if self._control is None or self._proc is None or self._proc.poll() is not None:
                        self._stop()
                        self._start()
                    assert self._control is not None
                    socket.send_fds(self._control, [data], fds)
                    return
                except (OSError, ZygoteUnavailable) as exc:
                    self._stop()
                    if attempt == 2:
                        raise ZygoteUnavailable(
                            f"the sandbox zygote is unavailable ({exc})"
                        ) from None
                    log.warning("the sandbox zygote was gone (%s); restarting it", exc)

    def _start(self) -> None:
        control, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            argv = [self._layout.python, "-I", "-S", "-B", str(PROGRAM), str(child.fileno())]
            fd = child.fileno()
            self._proc = _SPAWNER.submit(
                lambda: subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    pass_fds=[fd],
                    env={},
                    start_new_session=True,
                )
            ).result()
        finally:
            child.close()
        self._control = control
        init = ["init"]
        for source, dest in self._layout.binds:
            init += ["bind", source, dest]
        for target, path in self._layout.symlinks:
            init += ["symlink", target, path]
        for path in self._layout.hidden:
            init += ["hide", path]
        init += ["empty", str(SUPPORT.empty), "python_bin", self._layout.python_bin]
        program = seccomp.program_fd()
        try:
            socket.send_fds(control, ["\0".join(init).encode()], [program])
        finally:
            os.close(program)

    def _stop(self) -> None:
        if self._control is not None:
            self._control.close()
            self._control = None
        if self._proc is not None:
            with contextlib.suppress(OSError):
                self._proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=_EXIT_REPORT_S)
            self._proc = None

    def close(self) -> None:
        """End the zygote (its sandboxes die with it: every child has PR_SET_PDEATHSIG)."""
        with self._lock:
            self._stop()


class ZygoteSpawn:
    """One session's sandbox, forked by the zygote (the surface FunctionSandbox uses)."""

    def __init__(
        self,
        zygote: Zygote,
        uid: int,
        function_dir: Path,
        tmp_bytes: int,
        python_args: Callable[[int, int | None], list[str]],
        *,
        services: bool = False,
        cgroup_fds: tuple[int, ...] = (),
    ) -> None:
        self.services: socket.socket | None = None
        self.pidfd = -1
        self._pid1_fd: int | None = None
        self._exit: tuple[int | None, float] | None = None
        self._gone = False
        self.channel, child_channel = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._status, child_status = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.err_fd, err_w = os.pipe()
        child_fds = [child_status.fileno(), child_channel.fileno(), err_w]
        child_socks = [child_status, child_channel]
        try:
            if services:
                self.services, child_services = socket.socketpair(
                    socket.AF_UNIX, socket.SOCK_STREAM
                )
                child_socks.append(child_services)
                child_fds.append(child_services.fileno())
            fields = ["uid", str(uid), "tmp_bytes", str(tmp_bytes)]
            fields += ["function_dir", str(function_dir), "services", "1" if services else "0"]
            fields += ["cgroups", str(len(cgroup_fds)), "args"]
            fields += python_args(CHANNEL_FD, SERVICES_FD if services else None)
            zygote.request(fields, [*child_fds, *cgroup_fds])
        except BaseException:
            self.close_fds()
            raise
        finally:
            for sock in child_socks:
                sock.close()
            os.close(err_w)
        deadline = time.monotonic() + _FORK_TIMEOUT_S
        try:
            while self.pidfd < 0:
                if not self._next_message(deadline):
                    raise ZygoteUnavailable("the sandbox zygote did not fork the session")
        except BaseException as exc:
            self.close_fds()
            if isinstance(exc, ZygoteUnavailable):
                zygote.close()  # wedged or refusing: the next start gets a fresh one
            raise
        self.channel.setblocking(False)
        if self.services is not None:
            self.services.setblocking(False)

    def _next_message(self, deadline: float | None) -> bool:
        """Read one status message; False at the deadline or once the zygote hung up."""
        if self._gone:
            return False
        fd = self._status.fileno()
        try:
            if deadline is None:
                select.select([fd], [], [])
            else:
                wait_for(fd, select.POLLIN, deadline)
        except Exception:
            return False
        try:
            message, fds, _, _ = socket.recv_fds(self._status, _MAX_MESSAGE, 2)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            message, fds = b"", []
        if message == b"forked" and len(fds) == 1 and self.pidfd < 0:
            self.pidfd = fds.pop()
        elif message == b"started" and len(fds) == 1 and self._pid1_fd is None:
            self._pid1_fd = fds.pop()
        elif message.startswith(b"exit ") and self._exit is None:
            _, code, cpu_us = message.split()
            self._exit = (int(code), int(cpu_us) / 1e6)
        elif not message:
            self._gone = True
        for extra in fds:
            os.close(extra)
        return not self._gone

    def wait_started(self, deadline: float, cgroup: SandboxCgroup | None) -> int:
        """The pidfd of the sandbox's pid 1 (owned by the caller from now on), once it exists;
        WorkerGone when the sandbox ended before (its setup failed: see read_stderr). The
        zygote's child joined ``cgroup`` itself, before anything else."""
        while self._pid1_fd is None and self._exit is None:
            if not self._next_message(deadline):
                if not self._gone:
                    raise Timeout
                break
        fd, self._pid1_fd = self._pid1_fd, None
        if fd is None:
            raise WorkerGone
        return fd

    @property
    def pid(self) -> int:
        """The host pid of the session's monitor (from its pidfd; -1 when it has none)."""
        if self.pidfd < 0:
            return -1
        with open(f"/proc/self/fdinfo/{self.pidfd}") as info:
            for line in info:
                if line.startswith("Pid:"):
                    return int(line.split()[1])
        return -1

    def kill(self) -> None:
        """Kill the session's monitor (the sandbox's pid 1 dies with it: PDEATHSIG)."""
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError, OSError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)

    def reap(self, timeout: float | None) -> tuple[int | None, float] | None:
        """(exit status or None when unknown, CPU seconds) once the sandbox has ended and the
        zygote said so; None when ``timeout`` passed first. Never waits without bound: with
        ``timeout=None`` (after a kill) it waits for the monitor to end, then for the report."""
        if timeout is None:
            select.select([self.pidfd], [], [])
            deadline = time.monotonic() + _EXIT_REPORT_S
        else:
            deadline = time.monotonic() + timeout
        while self._exit is None:
            if not self._next_message(deadline):
                if not self._gone:
                    return None
                # The zygote died: its monitors die with it; the status is unknown.
                remaining = max(0.0, deadline - time.monotonic())
                ready, _, _ = select.select([self.pidfd], [], [], remaining)
                return (None, 0.0) if ready else None
        return self._exit

    def read_stderr(self) -> str:
        """The zygote's child's one-line complaint (the worker's stderr is /dev/null)."""
        return read_complaint(self.err_fd)

    def close_fds(self) -> None:
        for fd in (self.err_fd, self.pidfd, self._pid1_fd if self._pid1_fd is not None else -1):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.pidfd = -1
        self._pid1_fd = None
        self._status.close()
        self.channel.close()
        if self.services is not None:
            self.services.close()


_zygotes_lock = threading.Lock()
_zygotes: dict[Layout, Zygote | None] = {}
_why_not: dict[Layout, str] = {}


def zygote_for(layout: Layout, uid: int | None) -> Zygote | None:
    """The zygote for ``layout`` if this start may use one (probed once, cached)."""
    if uid is None or os.geteuid() != 0 or start_path() == "bubblewrap":
        return None
    with _zygotes_lock:
        if layout not in _zygotes:
            zygote = Zygote(layout)
            why = _probe(zygote, uid)
            if why is not None:
                zygote.close()
                _why_not[layout] = why
                log.warning("sandbox zygote unavailable (%s): sandboxes start with bubblewrap", why)
            _zygotes[layout] = None if why is not None else zygote
        return _zygotes[layout]


def why_unavailable(layout: Layout) -> str | None:
    """Why the probe of ``layout``'s zygote failed (None: not probed, or it worked)."""
    return _why_not.get(layout)


def _probe(zygote: Zygote, uid: int) -> str | None:
    """Build one full sandbox through the zygote and exit right before the worker would run."""
    try:
        spawn = ZygoteSpawn(zygote, uid, SUPPORT.empty, 1 << 20, lambda *_: ["--probe"])
    except (ZygoteUnavailable, OSError, SandboxError) as exc:
        return str(exc)
    try:
        result = spawn.reap(_PROBE_TIMEOUT_S)
        if result is None:
            spawn.kill()
            spawn.reap(None)
            return "the probe sandbox did not finish"
        if result[0] != 0:
            return f"the probe sandbox failed: {spawn.read_stderr() or f'status {result[0]}'}"
        return None
    finally:
        spawn.close_fds()


@atexit.register
def stop_all() -> None:
    """End every zygote of this process (at exit: their sandboxes die with them)."""
    with _zygotes_lock:
        for zygote in _zygotes.values():
            if zygote is not None:
                zygote.close()
        _zygotes.clear()
        _why_not.clear()
