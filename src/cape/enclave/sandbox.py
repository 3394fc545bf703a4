"""Run a function's ``cape_handler`` in an OS sandbox: one worker process per session.

DESIGN.md invariant 5: user code runs sandboxed, with no network, no access to the runtime's
keys or files, and bounded CPU time, memory, processes and output. A hostile function harms
only its own invocation. Without OS isolation this module refuses to run user code at all.

Shape (``FunctionSandbox.start`` → ``call`` … → ``close``):

1. **bubblewrap** (``bwrap``, argv in :mod:`cape.enclave.spawn`) builds the sandbox: new
   user, pid, net, ipc, uts and cgroup namespaces (the network namespace has only a down
   loopback), no further user namespaces, a new session, an empty environment, and a private
   mount tree on a read-only tmpfs root: ``/usr`` and the ``/lib*`` links read-only, the
   interpreter's prefix read-only with every site-packages directory covered by an empty one
   (:mod:`cape.enclave.staging`), a few ``/etc`` files the loader needs, a fresh ``/proc``
   (its own pid namespace: only the function's processes) and ``/dev``, size-limited tmpfs at
   ``/tmp`` and ``/dev/shm`` (the only writable places), the session's function directory
   **read-only** at ``/function`` (the worker's working directory), and
   :mod:`cape.enclave.worker` as a read-only file. Nothing else of the host exists in there:
   not the runtime's package or virtualenv, its data or key files, ``/root``, ``/home``.
   Where the runtime is root, the same sandbox is built by the **sandbox zygote** instead
   (:mod:`cape.enclave.zygote`): a per-runtime process that never runs user code forks each
   session's process, which builds the namespaces and this mount tree itself, drops its
   capabilities and loads the same seccomp filter (cheaper: no exec of bubblewrap and of a
   fresh interpreter per session). bubblewrap remains the path where the zygote is
   unavailable or ``sandbox_start = "bubblewrap"``.
2. **An unprivileged host uid** (:mod:`cape.enclave.uids`). bubblewrap itself runs as a uid
   of its own per sandbox, from a range outside everything the system hands out (``cape
   serve`` checks it at every start), so the sandbox's root-in-namespace maps to that uid and
   nobody else on the machine owns its user namespace. Were it run as root, the kernel would
   exempt the sandbox from ``RLIMIT_NPROC``. The function directory is chowned to that uid.
3. **Resource limits** (:class:`SandboxLimits`). Where cgroups are available
   (:mod:`cape.enclave.cgroups`, v2 or v1), each sandbox has its own: memory (all its
   processes and the tmpfs pages they write), pids and a CPU quota. Its processes join it
   before any function code runs (bubblewrap waits on ``--block-fd``), and the group is
   emptied and removed when the session ends. In addition, and alone where cgroups are
   unavailable (the runtime says so at start-up), the worker lowers its soft and hard rlimits
   (address space, CPU seconds, processes, open files, file size, no core files), which count
   per process: forked children each get the whole allowance. The runtime enforces the wall
   clock per call and at load, and the input and output sizes.
4. **seccomp** (:mod:`cape.enclave.seccomp`): a deny-list filter loaded by bubblewrap.

The runtime talks to the worker over a socketpair (the frames are in :mod:`cape.enclave.worker`)
and trusts nothing that comes back: every length is checked before a byte is read. The call
path (``call``, ``call_async`` and their frames) is
:class:`cape.enclave.sandbox_calls.SandboxCalls`; this module starts, closes and reaps
sandboxes and says why one ended.

**Encryption services** (Cape's in-function ``cape_encrypt``): served by
:class:`cape.enclave.services.ServicesServer` on a socket of their own, in the thread that
waits for the worker (see that module).

Why it ended → :class:`cape.errors.SandboxError` ``reason`` (after which the sandbox is dead):
our wall clock → ``timeout``; the cgroup's OOM killer → ``memory``; ``SIGKILL`` with the
CPU budget used up (the worker is pid 1 of its namespace, which ignores ``SIGXCPU``, so its
soft and hard CPU limits are equal) or ``SIGXCPU`` → ``cpu``; the worker ran out of memory
outside the handler → ``memory``; a frame longer than the output limit → ``output``; any
other death (``os._exit``, a signal such as ``SIGSEGV``) → ``crashed``; no isolation →
``unavailable``; bad ``app.py`` → ``load``. An exception inside the handler (``MemoryError``
included) is a :class:`cape.errors.FunctionError` and an oversized result the worker refuses
to send is a :class:`cape.errors.LimitExceededError`: after those the session goes on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cape._internal.closeable import Closeable
from cape.enclave import cgroups
from cape.enclave.cgroups import CgroupLimits, SandboxCgroup
from cape.enclave.sandbox_calls import _LOAD_ERROR, _READY, SandboxCalls, _one_line
from cape.enclave.services import Services, ServicesServer, services_response_limit
from cape.enclave.spawn import (
    BWRAP,
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
from cape.enclave.staging import SUPPORT, layout, move_back, place_function_dir
from cape.enclave.uids import UidPool
from cape.enclave.worker import settings_args
from cape.enclave.zygote import (
    ZygoteSpawn,
    ZygoteUnavailable,
    zygote_for,
)
from cape.errors import SandboxError

__all__ = [
    "BWRAP",
    "UIDS",
    "FunctionSandbox",
    "SandboxLimits",
    "Services",
    "check_isolation",
    "describe_containment",
    "services_response_limit",
]

log = logging.getLogger("cape.enclave")


#: Host uids for sandboxes, one per live sandbox (the runtime sets the range at start-up).
UIDS = UidPool()

# The worker's exit statuses (mirrors cape.enclave.worker, which cannot import cape); its
# frames' statuses are in cape.enclave.sandbox_calls.
_EXIT_MEMORY = 101
_EXIT_PROTOCOL = 102
_EXIT_SETUP = 103
_REAP_TIMEOUT_S = 5.0
_EXIT_GRACE_S = 2.0
# The kernel enforces RLIMIT_CPU on tick-charged CPU time; the rusage we read is the precise
# runtime, which on a loaded (shared-core) machine was measured at 0.64-0.74 of the limit when
# the kernel killed the worker at it. Nothing else SIGKILLs the sandbox's pid 1 (we record our
# own kills; the OOM killer is read from the cgroup first), so half the budget is proof enough.
_CPU_TOLERANCE = 0.5
_PROBE_TIMEOUT_S = 30.0
_UNAVAILABLE_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) and allow unprivileged "
    "user namespaces; refusing to run user code unsandboxed"
)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-session limits; every violation ends in a clear error."""

    # Memory of the whole sandbox (cgroup: all processes and their tmpfs pages) and RLIMIT_AS
    # of each process.
    memory_bytes: int = 2 << 30
    cpu_seconds: int = 60  # RLIMIT_CPU: CPU seconds per process over the whole session
    processes: int = 64  # processes and threads: pids.max of the cgroup, and RLIMIT_NPROC
    cpu_cores: float = 1.0  # CPU bandwidth of the whole sandbox (cgroup cpu quota)
    open_files: int = 256  # RLIMIT_NOFILE
    file_size_bytes: int = 256 << 20  # RLIMIT_FSIZE: largest file the function may write
    call_timeout_s: float = 60.0  # wall clock per call
    max_output_bytes: int = 64 << 20
    max_input_bytes: int = 64 << 20
    load_timeout_s: float = 60.0  # wall clock to import app.py
    tmp_bytes: int = 256 << 20  # size of each of the /tmp and /dev/shm tmpfs

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise ValueError(f"SandboxLimits.{field.name} must be positive")

    def _cgroup(self) -> CgroupLimits:
        return CgroupLimits(self.memory_bytes, self.processes, self.cpu_cores)

    def _rlimits(self) -> dict[str, int]:
        return {
            "memory_bytes": self.memory_bytes,
            "cpu_seconds": self.cpu_seconds,
            "processes": self.processes,
            "open_files": self.open_files,
            "file_size_bytes": self.file_size_bytes,
        }


def describe_containment() -> str:
    """One line for start-up banners: how whole-function limits are enforced on this machine
    (checked without creating anything, from any process; the runtime creates its groups)."""
    groups, why = (None, "not root") if os.geteuid() != 0 else cgroups.detect(create=False)
    if groups is not None:
        return f"one cgroup v{groups.version} per sandbox (memory, pids, cpu)"
    return (
        f"cgroups unavailable ({why}): per-process rlimits only, so a function's "
        "processes together may exceed its memory limit"
    )


# --- isolation probe ----------------------------------------------------------------------

_probe_lock = threading.Lock()
_probe_results: dict[tuple[str | None, str], SandboxError | None] = {}


def check_isolation() -> None:
    """Probe once (cached) that sandboxes can be built here; raise ``SandboxError("unavailable")``.

    The probe starts a real sandbox (same namespaces, mounts, uid switch and seccomp filter)
    running the interpreter with no code.
    """
    key = (BWRAP, sys.executable)
    with _probe_lock:
        if key not in _probe_results:
            _probe_results[key] = _probe()
        error = _probe_results[key]
    if error is not None:
        raise SandboxError("unavailable", str(error))


def _unavailable(why: str) -> SandboxError:
    return SandboxError("unavailable", f"sandbox unavailable: {why}; {_UNAVAILABLE_HINT}")


def _probe() -> SandboxError | None:
    if not sys.platform.startswith("linux"):
        return _unavailable(f"OS isolation needs Linux (this is {sys.platform})")
    if BWRAP is None or not os.access(BWRAP, os.X_OK):
        return _unavailable(f"bubblewrap not found ({BWRAP or 'bwrap not on PATH'})")
    try:
        layout()
        uid = UIDS.acquire()
    except (OSError, ImportError, RuntimeError) as exc:
        return _unavailable(f"cannot prepare the sandbox ({exc})")
    try:
        probe = Spawn(layout(), uid, SUPPORT.empty, 1 << 20, lambda *_: ["-c", ""])
        try:
            code = probe.proc.wait(timeout=_PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            probe.proc.kill()
            probe.proc.wait()
            return _unavailable("the probe sandbox did not finish")
        finally:
            stderr = probe.read_stderr()
            probe.close_fds()
        if code != 0:
            return _unavailable(f"bubblewrap failed (exit status {code}: {stderr or 'no output'})")
    except (OSError, ImportError, SandboxError) as exc:
        return _unavailable(f"bubblewrap could not start ({exc})")
    finally:
        UIDS.release(uid)
    return None


# --- the sandbox ------------------------------------------------------------------------------


class FunctionSandbox(SandboxCalls, Closeable):
    """One session's sandboxed worker: ``app.py`` imported once, then one call at a time."""

    def __init__(
        self,
        spawn: Spawn | ZygoteSpawn,
        limits: SandboxLimits,
        uid: int | None,
        services: Services | None = None,
    ) -> None:
        self._spawn = spawn
        self._limits = limits
        self._uid = uid
        self._services = (
            None
            if spawn.services is None or services is None
            else ServicesServer(spawn.services, services, limits.max_input_bytes, self._terminate)
        )
        self._call_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._pid1_fd: int | None = None
        self._dead: str | None = None  # why the sandbox is no longer usable
        self._killed: str | None = None  # why we killed it, when we did
        self._reaped = False
        self._closed = False
        self._exit_code: int | None = None
        self._cpu_s = 0.0
        self._restore: tuple[Path, Path] | None = None
        self._cgroup: SandboxCgroup | None = None
        self._finalizer = weakref.finalize(self, _kill_quietly, spawn)

    # -- lifecycle

    @classmethod
    def start(
        cls,
        function_dir: Path,
        *,
        limits: SandboxLimits = SandboxLimits(),
        services: Services | None = None,
    ) -> FunctionSandbox:
        """Start the worker and import ``app.py`` once (module-level code runs here).

        ``services(op, data) -> bytes`` serves the function's ``cape_encrypt.encrypt`` and
        ``decrypt`` (``op`` is ``"encrypt"`` or ``"decrypt"``; see the module docstring). It
        runs in the thread that called ``start`` or ``call``, while that waits for the worker,
        and must not call back into this sandbox. Without it, ``cape_encrypt`` reports that
        encryption services are not available in this session.

        Raises ``SandboxError("unavailable")`` without isolation (nothing runs),
        ``SandboxError("load")`` when app.py cannot be imported or lacks ``cape_handler``,
        and other ``SandboxError`` reasons if loading times out or kills the worker.
        """
        check_isolation()
        function_dir = Path(function_dir).resolve()
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

            started = _spawn(uid, source, limits.tmp_bytes, worker_args, services, cgroup)
        except BaseException:
            UIDS.release(uid)
            if restore is not None:
                move_back(*restore)
            if cgroup is not None:
                cgroup.remove()
            raise
        sandbox = cls(started, limits, uid, services)
        sandbox._restore = restore
        sandbox._cgroup = cgroup
        try:
            sandbox._handshake()
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def close(self) -> None:
        """Kill the whole sandbox (idempotent); move a relocated function directory back."""
        self._terminate("the sandbox was closed")
        with self._call_lock, self._state_lock:
            if self._closed:
                return
            self._closed = True
            self._spawn.close_fds()
            if self._pid1_fd is not None:
                os.close(self._pid1_fd)
            if self._cgroup is not None:
                self._cgroup.remove()  # nothing of the function outlives its session
            UIDS.release(self._uid, vacated=self._reaped)  # its pid namespace is gone
            if self._restore is not None:
                move_back(*self._restore)
            self._finalizer.detach()

    @property
    def alive(self) -> bool:
        """True while the worker runs and can take calls."""
        if self._dead is not None:
            return False
        ready, _, _ = select.select([self._spawn.pidfd], [], [], 0)
        return not ready

    @property
    def cgroup(self) -> SandboxCgroup | None:
        """The sandbox's own cgroup (``None`` where cgroups are unavailable)."""
        return self._cgroup

    @property
    def host_uid(self) -> int | None:
        """The host uid the sandbox runs as (``None``: the runtime's own, when not root)."""
        return self._uid

    # -- start (calls: SandboxCalls)

    def _handshake(self) -> None:
        limits = self._limits
        deadline = time.monotonic() + limits.load_timeout_s
        with self._call_lock:
            try:
                self._read_info(deadline)
                status, body = self._receive(deadline)
            except Timeout:
                self._fail(
                    "timeout",
                    f"loading app.py exceeded the time limit of {limits.load_timeout_s:g} s",
                )
            except WorkerGone:
                self._fail_after_exit(during_load=True)
            except (OutputTooLarge, ProtocolViolation) as exc:
                self._fail(
                    "crashed", f"the sandbox worker broke the protocol while loading ({exc})"
                )
            except CgroupFailed as exc:
                self._fail("unavailable", f"the sandbox could not join its cgroup ({exc})")
            if status == _LOAD_ERROR:
                self._fail("load", _one_line(body))
            if status != _READY or body:
                self._fail("crashed", "the sandbox worker broke the protocol while loading")

    def _read_info(self, deadline: float) -> None:
        """Hold the sandbox's pid 1 by a pidfd (to kill it) once it is in its cgroup."""
        self._pid1_fd = self._spawn.wait_started(deadline, self._cgroup)

    def _fail_after_exit(self, *, during_load: bool) -> NoReturn:
        """The worker hung up: wait for the sandbox to end and say why it did."""
        self._terminate(None)
        if self._killed is not None:  # close() from another thread, say
            raise SandboxError("crashed", self._killed)
        reason, message = self._exit_reason(during_load)
        self._dead = message
        raise SandboxError(reason, message)

    def _exit_reason(self, during_load: bool) -> tuple[str, str]:
        limits, code = self._limits, self._exit_code
        when = "while loading app.py" if during_load else "during the call"
        stderr = self._spawn.read_stderr()
        if code is None:
            return "crashed", f"the sandbox ended {when} (exit status unknown)"
        if code == 1 and stderr.startswith("bwrap:"):
            return "unavailable", f"bubblewrap could not build the sandbox: {stderr[:300]}"
        if code == 1 and stderr.startswith("cape-zygote:"):
            return "unavailable", f"the sandbox zygote could not build the sandbox: {stderr[:300]}"
        if code == _EXIT_MEMORY or (self._cgroup is not None and self._cgroup.oom_kills()):
            return (
                "memory",
                f"the function exceeded the memory limit of {limits.memory_bytes} bytes {when}",
            )
        if code == _EXIT_SETUP:
            return "unavailable", "the sandbox worker could not apply its resource limits"
        if code == _EXIT_PROTOCOL:
            return "crashed", "the sandbox worker received a malformed request"
        signum = code - 128 if code > 128 else -code if code < 0 else 0
        # The kernel counts ticks, rusage the precise runtime: see _CPU_TOLERANCE.
        cpu_spent = self._cpu_s >= limits.cpu_seconds * _CPU_TOLERANCE
        if signum == signal.SIGXCPU or (signum == signal.SIGKILL and cpu_spent):
            return (
                "cpu",
                f"the function exceeded the CPU-time limit of {limits.cpu_seconds} s {when}",
            )
        if signum:
            return (
                "crashed",
                f"the function crashed the worker {when}: killed by {_signal_name(signum)}",
            )
        if during_load:
            return "load", f"app.py ended the worker while loading (exit status {code})"
        return "crashed", f"the function ended the worker {when} (exit status {code})"

    def _terminate(self, why: str | None) -> None:
        """Kill pid 1 of the sandbox (the kernel then kills every process in its namespace),
        reap bubblewrap, and record why the sandbox is dead. Idempotent."""
        with self._state_lock:
            if self._reaped:
                return
            if why is not None:
                self._dead = self._killed = why
            # A worker that hung up gets a moment to finish exiting on its own, so that its
            # exit status (a signal, the CPU limit, ...) can be reported.
            if why is None:
                if self._reap(_EXIT_GRACE_S):
                    self._reaped = True
                    self._dead = self._dead or "the sandbox ended"
                    return
                self._dead = self._killed = "the sandbox worker hung up without exiting"
            if self._pid1_fd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pid1_fd, signal.SIGKILL)
            else:
                self._spawn.kill()
            if not self._reap(_REAP_TIMEOUT_S):
                self._spawn.kill()
                self._reap(None)
            self._reaped = True
            if self._dead is None:
                self._dead = "the sandbox ended"

    def _reap(self, timeout: float | None) -> bool:
        result = self._spawn.reap(timeout)
        if result is None:
            return False
        self._exit_code, cpu_s = result
        self._cpu_s = cpu_s or self._cpu_s
        return True


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


def _spawn(
    uid: int | None,
    source: Path,
    tmp_bytes: int,
    worker_args: Callable[[int, int | None], list[str]],
    services: Services | None,
    cgroup: SandboxCgroup | None,
) -> Spawn | ZygoteSpawn:
    """The session's sandbox from the zygote where there is one, else from bubblewrap (also
    when the zygote turns out to be unavailable for this start: see cape.enclave.zygote)."""
    zygote = zygote_for(layout(), uid)
    if zygote is not None and uid is not None:
        cgroup_fds = cgroup.open_procs() if cgroup is not None else []
        try:
            return ZygoteSpawn(
                zygote,
                uid,
                source,
                tmp_bytes,
                worker_args,
                services=services is not None,
                cgroup_fds=tuple(cgroup_fds),
            )
        except ZygoteUnavailable as exc:
            log.warning("%s; this sandbox starts with bubblewrap", exc)
        finally:
            for fd in cgroup_fds:
                os.close(fd)
    return Spawn(
        layout(),
        uid,
        source,
        tmp_bytes,
        worker_args,
        services=services is not None,
        block=True,
    )


def _kill_quietly(spawn: Spawn | ZygoteSpawn) -> None:
    """Last resort when a sandbox is garbage-collected without close()."""
    with contextlib.suppress(OSError):
        spawn.kill()


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
