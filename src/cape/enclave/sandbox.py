"""Run a function's ``cape_handler`` in an OS sandbox: one worker process per session.

DESIGN.md invariant 5: user code runs sandboxed, with no network, no access to the runtime's
keys or files, and bounded CPU time, memory, processes and output. A hostile function harms
only its own invocation. Without OS isolation this module refuses to run user code at all.

Shape (``FunctionSandbox.start`` → ``call`` … → ``close``):

1. **bubblewrap** (``bwrap``) builds the sandbox: new user, pid, net, ipc, uts and cgroup
   namespaces (the network namespace has only a down loopback), no further user namespaces,
   a new session, an empty environment, and a private mount tree on a read-only tmpfs root:
   ``/usr`` and the ``/lib*`` links read-only, the interpreter's prefix read-only with every
   site-packages directory covered by an empty one, a few ``/etc`` files the loader needs, a
   fresh ``/proc`` and ``/dev``, size-limited tmpfs at ``/tmp`` and ``/dev/shm``, the session's
   function directory read-write at ``/function`` (the worker's working directory), and
   :mod:`cape.enclave.worker` as a read-only file. Nothing else of the host exists in there:
   not the runtime's package or virtualenv, its data or key files, ``/root``, ``/home``.
2. **An unprivileged host uid.** bubblewrap itself runs as a uid of its own per sandbox
   (``SANDBOX_UID_BASE`` + slot, never 0), so the sandbox's root-in-namespace maps to that
   uid. Were it run as root, the kernel would exempt the sandbox from ``RLIMIT_NPROC`` and a
   fork bomb would not be contained. The function directory is chowned to that uid.
3. **Resource limits** (:class:`SandboxLimits`): the worker lowers its soft and hard rlimits
   (address space, CPU seconds, processes, open files, file size, no core files) before any
   of the function's code runs; they cannot be raised again. The runtime enforces the wall
   clock per call and at load, and the input and output sizes.
4. **seccomp** (:mod:`cape.enclave.seccomp`): a deny-list filter loaded by bubblewrap.

The runtime talks to the worker over a socketpair (the frames are in :mod:`cape.enclave.worker`)
and trusts nothing that comes back: every length is checked before a byte is read.

**Encryption services** (Cape's in-function ``cape_encrypt``, reference §8.3): every sandbox
holds the stdlib-only helper ``cape/enclave/guest/cape_encrypt.py`` read-only at
``/cape-worker/guest/cape_encrypt.py``; the worker registers it as ``cape_encrypt`` before
app.py is imported (its docstring has the API and the frames). When ``start`` is given a
``services`` callback, the sandbox also inherits a second socketpair dedicated to it, so that a
handler's request, made in the middle of a call, never interleaves with the call frames. The
runtime serves it in the thread that waits for the worker: while loading app.py (module-level
code may encrypt) and during each call, one request at a time, under the same wall clock. A
request made between calls (by a thread the function left running) waits for the next call.
``services(op, data)`` gets ``"encrypt"`` or ``"decrypt"`` and the data, at most
``max_input_bytes``, and returns the result, at most :func:`services_response_limit` bytes; a
:class:`cape.errors.CapeError` it raises goes back as that one-line ``diagnostics()``, anything
else as ``"internal error"`` (logged as the exception's type only, never with data), and a
``BaseException`` kills the sandbox and propagates. A frame announcing an empty or oversized
request is a protocol violation (``crashed``; nothing beyond the limit is ever read); a
well-framed request with an unknown operation gets an error response. A guest that closes its
end simply stops being served. Without a callback there is no such socket at all (least
privilege): ``cape_encrypt`` then raises "encryption services are not available in this
session" without asking anyone.

Why it ended → :class:`cape.errors.SandboxError` ``reason`` (after which the sandbox is dead):
our wall clock → ``timeout``; ``SIGKILL`` with the CPU budget used up (the worker is pid 1
of its namespace, which ignores ``SIGXCPU``, so its soft and hard CPU limits are equal) or
``SIGXCPU`` → ``cpu``; the worker ran out of memory outside the handler → ``memory``; a frame longer
than the output limit → ``output``; any other death (``os._exit``, a signal such as
``SIGSEGV``) → ``crashed``; no isolation → ``unavailable``; bad ``app.py`` → ``load``. An
exception inside the handler (``MemoryError`` included) is a :class:`cape.errors.FunctionError`
and an oversized result the worker refuses to send is a
:class:`cape.errors.LimitExceededError`: after those the session goes on.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
import os
import random
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cape._internal.closeable import Closeable
from cape._internal.tempdirs import private_tempdir
from cape.errors import CapeError, FunctionError, LimitExceededError, SandboxError

__all__ = [
    "SANDBOX_UID_BASE",
    "SANDBOX_UID_COUNT",
    "FunctionSandbox",
    "SandboxLimits",
    "Services",
    "check_isolation",
    "services_response_limit",
]

log = logging.getLogger("cape.enclave")

#: ``services(op, data) -> result``: op is ``"encrypt"`` or ``"decrypt"`` (see the docstring).
Services = Callable[[str, bytes], bytes]

#: The bubblewrap executable; ``None`` when it is not installed (then nothing runs).
BWRAP: str | None = shutil.which("bwrap")
#: Host uids for sandboxes, one per live sandbox (used when the runtime runs as root).
SANDBOX_UID_BASE = 200_000
SANDBOX_UID_COUNT = 50_000
#: The uid and gid the function sees inside its namespace.
INNER_UID = 1000
WORKER_SOURCE = Path(__file__).with_name("worker.py")
WORKER_PATH = "/cape-worker/worker.py"
GUEST_SOURCE = Path(__file__).with_name("guest")
GUEST_MODULES = ("cape_encrypt.py",)  # bound read-only into every sandbox
GUEST_PATH = "/cape-worker/guest"
FUNCTION_PATH = "/function"
# Paths inside the sandbox's own mount namespace (private tmpfs, not the host's /tmp).
_TMP = "/tmp"  # noqa: S108
_SHM = "/dev/shm"  # noqa: S108

# Worker protocol (mirrors cape.enclave.worker, which cannot import cape).
_HEADER = struct.Struct(">I")
_READY = _OK = 0
_RAISED = 1
_LOAD_ERROR = 2
_TOO_LARGE = 3
_EXIT_MEMORY = 101
_EXIT_PROTOCOL = 102
_EXIT_SETUP = 103
_MAX_TEXT_BYTES = 8 << 10
# Encryption services (mirrors cape.enclave.guest.cape_encrypt).
_OPS = {1: "encrypt", 2: "decrypt"}
_SERVICE_OK = 0
_SERVICE_ERROR = 1
_MAX_REASON_BYTES = 1 << 10
_MAX_STDERR_BYTES = 4 << 10
_REAP_TIMEOUT_S = 5.0
_EXIT_GRACE_S = 2.0
_CPU_TOLERANCE = 0.9
_PROBE_TIMEOUT_S = 30.0
_SYSTEM_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/alternatives",
)
_UNAVAILABLE_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap) and allow unprivileged "
    "user namespaces; refusing to run user code unsandboxed"
)


@dataclass(frozen=True)
class SandboxLimits:
    """Per-session limits; every violation ends in a clear error."""

    memory_bytes: int = 2 << 30  # RLIMIT_AS of every process in the sandbox
    cpu_seconds: int = 60  # RLIMIT_CPU: CPU seconds per process over the whole session
    processes: int = 64  # RLIMIT_NPROC: processes and threads
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

    def _rlimits(self) -> dict[str, int]:
        return {
            "memory_bytes": self.memory_bytes,
            "cpu_seconds": self.cpu_seconds,
            "processes": self.processes,
            "open_files": self.open_files,
            "file_size_bytes": self.file_size_bytes,
        }


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
        layout = _layout()
        uid = _UIDS.acquire()
    except (OSError, ImportError, RuntimeError) as exc:
        return _unavailable(f"cannot prepare the sandbox ({exc})")
    try:
        spawn = _Spawn(
            layout, uid, _SUPPORT.empty, SandboxLimits(), lambda *_: ["-c", ""], writable=False
        )
        try:
            code = spawn.proc.wait(timeout=_PROBE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            spawn.proc.kill()
            spawn.proc.wait()
            return _unavailable("the probe sandbox did not finish")
        finally:
            stderr = spawn.read_stderr()
            spawn.close_fds()
        if code != 0:
            return _unavailable(f"bubblewrap failed (exit status {code}: {stderr or 'no output'})")
    except (OSError, ImportError, SandboxError) as exc:
        return _unavailable(f"bubblewrap could not start ({exc})")
    finally:
        _UIDS.release(uid)
    return None


# --- uids -----------------------------------------------------------------------------------


class _UidPool:
    """One host uid per live sandbox; ``None`` ids when the runtime is not root."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_use: set[int] = set()

    def acquire(self) -> int | None:
        if os.geteuid() != 0:
            return None  # cannot switch: bubblewrap runs as us (see the module docstring)
        busy = _uids_with_processes()
        with self._lock:
            start = random.randrange(SANDBOX_UID_COUNT)  # noqa: S311 - not a secret
            for i in range(SANDBOX_UID_COUNT):
                uid = SANDBOX_UID_BASE + (start + i) % SANDBOX_UID_COUNT
                if uid not in self._in_use and uid not in busy:
                    self._in_use.add(uid)
                    return uid
        raise RuntimeError("no free sandbox uid")

    def release(self, uid: int | None) -> None:
        with self._lock:
            self._in_use.discard(uid if uid is not None else -1)


def _uids_with_processes() -> set[int]:
    uids = set()
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    uids.add(entry.stat().st_uid)
    return uids


_UIDS = _UidPool()


# --- filesystem layout ----------------------------------------------------------------------


class _Support:
    """A per-process directory (mode 0711) for what the sandbox user must be able to reach."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: Path | None = None

    @property
    def root(self) -> Path:
        with self._lock:
            if self._root is None:
                root = private_tempdir("cape-sandbox-")  # a killed runtime's are swept here
                root.chmod(0o711)
                (root / "empty").mkdir(mode=0o555)
                (root / "empty").chmod(0o555)
                atexit.register(shutil.rmtree, root, True)
                self._root = root
            return self._root

    @property
    def empty(self) -> Path:
        return self.root / "empty"


_SUPPORT = _Support()


@dataclass(frozen=True)
class _Layout:
    python: str  # the interpreter, in the sandbox's paths
    python_bin: str
    binds: tuple[tuple[str, str], ...]  # read-only: (host source, sandbox destination)
    symlinks: tuple[tuple[str, str], ...]  # (target, sandbox path)
    hidden: tuple[str, ...]  # sandbox paths covered by an empty read-only directory


_layout_lock = threading.Lock()
_layout_cache: dict[str, _Layout] = {}


def _layout() -> _Layout:
    with _layout_lock:
        if sys.executable not in _layout_cache:
            _layout_cache[sys.executable] = _build_layout()
        return _layout_cache[sys.executable]


def _build_layout() -> _Layout:
    base = os.path.realpath(sys.base_prefix)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    python = os.path.realpath(sys.executable)
    if not _inside(python, base):
        python = os.path.join(base, "bin", f"python{version}")
    if not os.path.isfile(python):
        raise RuntimeError(f"cannot find the base interpreter of {sys.executable}")
    binds: list[tuple[str, str]] = [("/usr", "/usr")]
    symlinks: list[tuple[str, str]] = []
    for path in _SYSTEM_DIRS:
        if os.path.islink(path):
            symlinks.append((os.readlink(path), path))
        elif os.path.isdir(path):
            binds.append((path, path))
    binds += [(path, path) for path in _ETC_FILES if os.path.exists(path)]
    bound_trees = [dest for _, dest in binds]
    if not _inside(base, "/usr"):
        switching = os.geteuid() == 0
        source = base if not switching or _world_readable(base) else _stage_python(base, python)
        binds.append((source, base))
        bound_trees.append(base)
        if source != base:
            bound_trees.remove(base)  # the staged copy holds no site-packages
    hidden = sorted(
        path
        for path in _site_directories(base, version)
        if os.path.isdir(path) and any(_inside(path, tree) for tree in bound_trees)
    )
    # A path inside another hidden one (the cape package in an installed dist-packages, as
    # in the enclave image) is covered already; bwrap could not mount over it read-only.
    hidden = [p for p in hidden if not any(p != q and _inside(p, q) for q in hidden)]
    return _Layout(
        python=python,
        python_bin=os.path.dirname(python),
        binds=tuple(binds),
        symlinks=tuple(symlinks),
        hidden=tuple(hidden),
    )


def _inside(path: str, tree: str) -> bool:
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def _world_readable(path: str) -> bool:
    """Whether any uid can reach ``path`` (every ancestor o+x) and read it (o+r)."""
    current = Path(path)
    if not os.stat(current).st_mode & stat.S_IROTH:
        return False
    return all(os.stat(parent).st_mode & stat.S_IXOTH for parent in [current, *current.parents])


def _site_directories(base: str, version: str) -> set[str]:
    """Every place the host keeps installed packages (the runtime's among them)."""
    found = {
        sysconfig.get_paths()["purelib"],
        sysconfig.get_paths()["platlib"],
        sysconfig.get_paths(vars={"base": base, "platbase": base})["purelib"],
        sysconfig.get_paths(vars={"base": base, "platbase": base})["platlib"],
        str(Path(__file__).resolve().parents[1]),  # the cape package itself
    }
    for lib in ("/usr/lib", "/usr/local/lib", "/usr/lib64", "/usr/local/lib64"):
        for pattern in (
            "python3*/site-packages",
            "python3*/dist-packages",
            "python3/dist-packages",
        ):
            found.update(str(p) for p in Path(lib).glob(pattern))
    found.add(os.path.join(base, "lib", f"python{version}", "site-packages"))
    return {os.path.realpath(p) for p in found}


def _stage_python(base: str, python: str) -> str:
    """Mirror the interpreter (no site-packages) where the sandbox uid can read it.

    Used when the prefix sits in a directory other users cannot enter (pyenv under /root):
    bubblewrap resolves bind sources as the unprivileged uid. Files are hard links when the
    file system allows, copies otherwise; the mirror is mounted at the original prefix.
    """
    stage = _SUPPORT.root / "python"
    if stage.exists():
        return str(stage)
    work = Path(tempfile.mkdtemp(prefix="python-", dir=_SUPPORT.root))
    libdir = str(sysconfig.get_config_var("LIBDIR") or os.path.join(base, "lib"))
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    wanted: list[tuple[str, str]] = [(python, os.path.relpath(python, base))]
    if _inside(libdir, base):
        for entry in os.scandir(libdir):
            if entry.name.startswith("libpython"):
                wanted.append((entry.path, os.path.relpath(entry.path, base)))
    stdlib = os.path.join(base, "lib", version)
    skip = {os.path.join(stdlib, "site-packages"), os.path.join(stdlib, "test")}
    for directory, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if os.path.join(directory, d) not in skip]
        wanted += [
            (p, os.path.relpath(p, base)) for p in (os.path.join(directory, f) for f in files)
        ]
    for source, rel in wanted:
        target = work / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
            continue
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    (work / "lib" / version / "site-packages").mkdir(exist_ok=True)  # stays empty
    for directory, _, _ in os.walk(work):
        os.chmod(directory, 0o755)  # noqa: S103 - the sandbox uid must read the stdlib
    work.rename(stage)  # complete or absent: _layout() builds it once, under its lock
    return str(stage)


def _place_function_dir(function_dir: Path, uid: int | None) -> tuple[Path, Path | None]:
    """Make the directory reachable and writable for the sandbox uid.

    bubblewrap resolves bind sources as that uid, so every parent must be traversable by
    others. If one is not (a 0700 ``mkdtemp``), the directory is moved for the session into a
    0711 holder we create next to the deepest reachable parent (same file system, so a
    rename), or into our support directory; :func:`_move_back` undoes it. Returns the path
    to bind and the original path when it was moved.
    """
    if uid is None:
        return function_dir, None
    source, original = function_dir, None
    if not all(os.stat(p).st_mode & stat.S_IXOTH for p in function_dir.parents):
        source, original = _relocate(function_dir), function_dir
    _chown_tree(source, uid)
    return source, original


def _relocate(function_dir: Path) -> Path:
    reachable = Path("/")
    for parent in reversed(function_dir.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            break
        reachable = parent
    errors = []
    for place in (reachable, _SUPPORT.root):
        try:
            holder = Path(tempfile.mkdtemp(prefix=".cape-sandbox-", dir=place))
        except OSError as exc:
            errors.append(f"{place}: {exc.strerror}")
            continue
        holder.chmod(0o711)
        try:
            function_dir.rename(holder / "function")
        except OSError as exc:
            holder.rmdir()
            errors.append(f"{place}: {exc.strerror}")
            continue
        return holder / "function"
    raise ValueError(
        f"{function_dir}: a parent directory is closed to the sandbox user and the directory "
        f"cannot be moved next to a reachable one ({'; '.join(errors)}); create session "
        "directories with mode 0711 under a traversable directory"
    )


def _chown_tree(top: Path, uid: int) -> None:
    os.chown(top, uid, uid, follow_symlinks=False)
    top.chmod(stat.S_IMODE(top.stat().st_mode) | 0o700)
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                continue  # a hard link might be shared with a file outside: never give it away
            os.chown(path, uid, uid, follow_symlinks=False)


# --- spawning -------------------------------------------------------------------------------

# bwrap's --die-with-parent follows the *thread* that forked it, so every sandbox is forked
# by one long-lived thread rather than by whichever (possibly short-lived) thread asked.
_SPAWNER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cape-sandbox")


@functools.cache
def _worker_source() -> bytes:
    return WORKER_SOURCE.read_bytes()


@functools.cache
def _guest_sources() -> tuple[tuple[str, bytes], ...]:
    return tuple((name, (GUEST_SOURCE / name).read_bytes()) for name in GUEST_MODULES)


def services_response_limit(max_request_bytes: int) -> int:
    """The largest services result: room for ``cape:`` + base64 of a maximal plaintext."""
    return max_request_bytes + max_request_bytes // 3 + (64 << 10)


def _data_fd(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class _Spawn:
    """One bubblewrap process and the runtime's ends of its descriptors."""

    def __init__(
        self,
        layout: _Layout,
        uid: int | None,
        function_dir: Path,
        limits: SandboxLimits,
        python_args: Callable[[int, int | None], list[str]],
        *,
        writable: bool = True,
        services: bool = False,
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
        passwd = f"cape:x:{INNER_UID}:{INNER_UID}:cape function:/tmp:/usr/sbin/nologin\n"
        try:
            if services:
                self.services, child_services = socket.socketpair(
                    socket.AF_UNIX, socket.SOCK_STREAM
                )
                child_sockets.append(child_services)
            seccomp_fd = seccomp.program_fd()
            child_fds.append(seccomp_fd)
            worker_fd = _data_fd("worker", _worker_source())
            child_fds.append(worker_fd)
            passwd_fd = _data_fd("passwd", passwd.encode())
            child_fds.append(passwd_fd)
            group_fd = _data_fd("group", f"cape:x:{INNER_UID}:\n".encode())
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
        argv += ["--die-with-parent", "--as-pid-1", "--new-session", "--hostname", "cape-sandbox"]
        argv += ["--uid", str(INNER_UID), "--gid", str(INNER_UID), "--clearenv"]
        env = {
            "PATH": f"{layout.python_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": _TMP,
            "TMPDIR": _TMP,
            "LANG": "C.UTF-8",
            "USER": "cape",
            "LOGNAME": "cape",
            # glibc reserves 64 MiB of address space per malloc arena and thread; under
            # RLIMIT_AS that would starve threaded code long before real memory runs out.
            "MALLOC_ARENA_MAX": "2",
        }
        for name, value in env.items():
            argv += ["--setenv", name, value]
        for source, dest in layout.binds:
            argv += ["--ro-bind", source, dest]
        for target, path in layout.symlinks:
            argv += ["--symlink", target, path]
        for path in layout.hidden:
            argv += ["--ro-bind", str(_SUPPORT.empty), path]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--size", str(limits.tmp_bytes), "--perms", "1777", "--tmpfs", _SHM]
        argv += ["--size", str(limits.tmp_bytes), "--perms", "1777", "--tmpfs", _TMP]
        argv += ["--bind" if writable else "--ro-bind", str(function_dir), FUNCTION_PATH]
        argv += ["--ro-bind-data", str(worker_fd), WORKER_PATH]
        for fd, path in guest_fds:
            argv += ["--ro-bind-data", str(fd), path]
        argv += ["--ro-bind-data", str(passwd_fd), "/etc/passwd"]
        argv += ["--ro-bind-data", str(group_fd), "/etc/group"]
        argv += ["--remount-ro", "/dev", "--remount-ro", "/"]
        argv += ["--chdir", FUNCTION_PATH, "--info-fd", str(info_w), "--seccomp", str(seccomp_fd)]
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
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=fds[1],
            pass_fds=fds,
            env={},
            start_new_session=True,
            user=uid,
            group=uid,
            extra_groups=[] if uid is not None else None,
        )

    def read_stderr(self) -> str:
        """bubblewrap's own complaints (the worker's stderr is /dev/null), one line, bounded."""
        os.set_blocking(self.err_fd, False)
        try:
            data = os.read(self.err_fd, _MAX_STDERR_BYTES)
        except OSError:
            data = b""
        return " ".join(data.decode("utf-8", "replace").split())

    def close_fds(self) -> None:
        for fd in (self.info_fd, self.err_fd, getattr(self, "pidfd", -1)):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.channel.close()
        if self.services is not None:
            self.services.close()


# --- the sandbox ------------------------------------------------------------------------------


class _Timeout(Exception):
    pass


class _WorkerGone(Exception):
    pass


class _OutputTooLarge(Exception):
    pass


class _ProtocolViolation(Exception):
    pass


class FunctionSandbox(Closeable):
    """One session's sandboxed worker: ``app.py`` imported once, then one call at a time."""

    def __init__(
        self,
        spawn: _Spawn,
        limits: SandboxLimits,
        uid: int | None,
        services: Services | None = None,
    ) -> None:
        self._spawn = spawn
        self._limits = limits
        self._uid = uid
        self._services = services
        # Served until the guest closes its end (only while a call or the load is under way).
        self._services_open = spawn.services is not None and services is not None
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
        uid = _UIDS.acquire()
        restore: tuple[Path, Path] | None = None
        try:
            source, original = _place_function_dir(function_dir, uid)
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
                return [WORKER_PATH, str(fd), json.dumps(config)]

            spawn = _Spawn(
                _layout(), uid, source, limits, worker_args, services=services is not None
            )
        except BaseException:
            _UIDS.release(uid)
            if restore is not None:
                _move_back(*restore)
            raise
        sandbox = cls(spawn, limits, uid, services)
        sandbox._restore = restore
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
            _UIDS.release(self._uid)
            if self._restore is not None:
                _move_back(*self._restore)
            self._finalizer.detach()

    @property
    def alive(self) -> bool:
        """True while the worker runs and can take calls."""
        if self._dead is not None:
            return False
        ready, _, _ = select.select([self._spawn.pidfd], [], [], 0)
        return not ready

    @property
    def host_uid(self) -> int | None:
        """The host uid the sandbox runs as (``None``: the runtime's own, when not root)."""
        return self._uid

    # -- calls

    def call(self, data: bytes) -> bytes:
        """Run ``cape_handler(data)`` and return its output bytes.

        Raises FunctionError when the handler raised (the session stays usable),
        LimitExceededError for an input or output over its limit (likewise), and
        SandboxError when the sandbox died, timed out or broke a limit; it is dead after that.
        """
        limits = self._limits
        if len(data) > limits.max_input_bytes:
            raise LimitExceededError("function input in bytes", limits.max_input_bytes, len(data))
        with self._call_lock:
            if self._dead is not None:
                raise SandboxError("crashed", f"the sandbox is no longer running ({self._dead})")
            deadline = time.monotonic() + limits.call_timeout_s
            try:
                self._send(data, deadline)
                status, body = self._receive(deadline)
            except _Timeout:
                self._fail(
                    "timeout", f"the call exceeded the time limit of {limits.call_timeout_s:g} s"
                )
            except _OutputTooLarge as exc:
                self._fail(
                    "output",
                    f"function output exceeds the limit of {limits.max_output_bytes} bytes{exc}",
                )
            except _ProtocolViolation as exc:
                self._fail("crashed", f"the sandbox worker broke the protocol ({exc})")
            except _WorkerGone:
                self._fail_after_exit(during_load=False)
        if status == _OK:
            return body
        if status == _RAISED:
            raise FunctionError(f"function raised {_one_line(body)}")
        if status == _TOO_LARGE and body.isdigit() and len(body) < 20:
            raise LimitExceededError("function output in bytes", limits.max_output_bytes, int(body))
        with self._call_lock:
            self._fail("crashed", f"the sandbox worker sent an unknown status {status}")

    # -- internals

    def _handshake(self) -> None:
        limits = self._limits
        deadline = time.monotonic() + limits.load_timeout_s
        with self._call_lock:
            try:
                self._read_info(deadline)
                status, body = self._receive(deadline)
            except _Timeout:
                self._fail(
                    "timeout",
                    f"loading app.py exceeded the time limit of {limits.load_timeout_s:g} s",
                )
            except _WorkerGone:
                self._fail_after_exit(during_load=True)
            except (_OutputTooLarge, _ProtocolViolation) as exc:
                self._fail(
                    "crashed", f"the sandbox worker broke the protocol while loading ({exc})"
                )
            if status == _LOAD_ERROR:
                self._fail("load", _one_line(body))
            if status != _READY or body:
                self._fail("crashed", "the sandbox worker broke the protocol while loading")

    def _read_info(self, deadline: float) -> None:
        """bubblewrap's info JSON names the sandbox's pid 1; hold it by a pidfd to kill it."""
        data = b""
        while True:
            chunk = _read_some(self._spawn.info_fd, deadline, 4096)
            if not chunk:
                break
            data += chunk
            if len(data) > 64 << 10:
                raise _ProtocolViolation("oversized info from bubblewrap")
        if not data:
            raise _WorkerGone
        try:
            pid1 = int(json.loads(data)["child-pid"])
        except (ValueError, KeyError, TypeError) as exc:
            raise _ProtocolViolation("unreadable info from bubblewrap") from exc
        with contextlib.suppress(ProcessLookupError):
            self._pid1_fd = os.pidfd_open(pid1)

    def _send(self, data: bytes, deadline: float) -> None:
        _send_all(self._spawn.channel, (_HEADER.pack(len(data)), data), deadline)

    def _receive(self, deadline: float) -> tuple[int, bytes]:
        sock = self._spawn.channel
        self._serve_until_readable(deadline)
        (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
        if length == 0:
            raise _ProtocolViolation("empty frame")
        if length - 1 > self._limits.max_output_bytes:
            raise _OutputTooLarge(f" ({length - 1} bytes announced)")
        status = _recv_exact(sock, 1, deadline)[0]
        return status, _recv_exact(sock, length - 1, deadline)

    # -- encryption services

    def _serve_until_readable(self, deadline: float) -> None:
        """Serve services requests until the channel has something to read (or the deadline)."""
        services, channel = self._spawn.services, self._spawn.channel
        while self._services_open and services is not None:
            poller = select.poll()
            poller.register(channel.fileno(), select.POLLIN)
            poller.register(services.fileno(), select.POLLIN)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout
            ready = dict(poller.poll(remaining * 1000))
            if channel.fileno() in ready:
                return
            if services.fileno() in ready:
                self._serve_one(services, deadline)

    def _serve_one(self, sock: socket.socket, deadline: float) -> None:
        """Read one request (nothing beyond the limit), answer it; a closed end stops serving."""
        limit = self._limits.max_input_bytes
        try:
            try:
                if not sock.recv(1, socket.MSG_PEEK):
                    raise _WorkerGone
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                raise _WorkerGone from exc
            (length,) = _HEADER.unpack(_recv_exact(sock, _HEADER.size, deadline))
            if length == 0:
                raise _ProtocolViolation("an empty encryption-services request")
            if length - 1 > limit:
                raise _ProtocolViolation(
                    f"an encryption-services request of {length - 1} bytes, "
                    f"over the limit of {limit} bytes"
                )
            op = _recv_exact(sock, 1, deadline)[0]
            data = _recv_exact(sock, length - 1, deadline)
            status, body = self._run_service(op, data)
            del data
            _send_all(sock, (_HEADER.pack(len(body) + 1) + bytes((status,)), body), deadline)
        except _WorkerGone:
            self._services_open = False  # the function closed its end (or died: the channel says)

    def _run_service(self, op: int, data: bytes) -> tuple[int, bytes]:
        name = _OPS.get(op)
        if name is None or self._services is None:
            return _SERVICE_ERROR, f"unknown encryption-services operation {op}".encode()
        try:
            result = self._services(name, data)
            if not isinstance(result, bytes | bytearray | memoryview):
                raise TypeError(f"services returned {type(result).__name__}, not bytes")
        except CapeError as exc:
            reason = exc.diagnostics().encode("utf-8", "replace")[:_MAX_REASON_BYTES]
            return _SERVICE_ERROR, reason.decode("utf-8", "ignore").encode()
        except Exception as exc:
            log.error("sandbox: the %s service failed with %s", name, type(exc).__name__)
            return _SERVICE_ERROR, b"internal error"
        except BaseException:
            self._terminate("the runtime stopped while serving the function's encryption request")
            raise
        limit = services_response_limit(self._limits.max_input_bytes)
        if len(result) > limit:
            return (
                _SERVICE_ERROR,
                f"the result of {name} is {len(result)} bytes, over the limit of {limit} "
                "bytes".encode(),
            )
        return _SERVICE_OK, bytes(result)

    def _fail(self, reason: str, message: str) -> NoReturn:
        self._terminate(message)
        raise SandboxError(reason, message)

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
        if code == _EXIT_MEMORY:
            return (
                "memory",
                f"the function exceeded the memory limit of {limits.memory_bytes} bytes {when}",
            )
        if code == _EXIT_SETUP:
            return "unavailable", "the sandbox worker could not apply its resource limits"
        if code == _EXIT_PROTOCOL:
            return "crashed", "the sandbox worker received a malformed request"
        signum = code - 128 if code > 128 else -code if code < 0 else 0
        # rusage is sampled per tick: a kill at the limit may be reported a little under it.
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
                self._spawn.proc.kill()
            if not self._reap(_REAP_TIMEOUT_S):
                self._spawn.proc.kill()
                self._reap(None)
            self._reaped = True
            if self._dead is None:
                self._dead = "the sandbox ended"

    def _reap(self, timeout: float | None) -> bool:
        proc = self._spawn.proc
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                pid, status, usage = os.wait4(proc.pid, 0 if deadline is None else os.WNOHANG)
            except ChildProcessError:
                self._exit_code = proc.returncode
                return True
            if pid:
                self._exit_code = proc.returncode = os.waitstatus_to_exitcode(status)
                self._cpu_s = usage.ru_utime + usage.ru_stime
                return True
            if deadline is None:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            select.select([self._spawn.pidfd], [], [], remaining)


def _kill_quietly(spawn: _Spawn) -> None:
    """Last resort when a sandbox is garbage-collected without close()."""
    with contextlib.suppress(OSError):
        spawn.proc.kill()


def _move_back(source: Path, original: Path) -> None:
    """Undo :func:`_relocate`: the directory returns, our holder goes."""
    try:
        source.rename(original)
    except OSError:
        shutil.rmtree(source, ignore_errors=True)  # the runtime discarded the session already
    with contextlib.suppress(OSError):
        source.parent.rmdir()


def _one_line(body: bytes) -> str:
    text = body[:_MAX_TEXT_BYTES].decode("utf-8", "replace")
    return " ".join(text.split()) or "(no message)"


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _wait(fd: int, events: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, events)
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Timeout
        if poller.poll(remaining * 1000):
            return


def _read_some(fd: int, deadline: float, size: int) -> bytes:
    _wait(fd, select.POLLIN, deadline)
    try:
        return os.read(fd, size)
    except OSError:
        return b""


def _send_all(sock: socket.socket, chunks: tuple[bytes, ...], deadline: float) -> None:
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            _wait(sock.fileno(), select.POLLOUT, deadline)
            try:
                sent = sock.send(view, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                raise _WorkerGone from exc
            view = view[sent:]


def _recv_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        _wait(sock.fileno(), select.POLLIN, deadline)
        try:
            k = sock.recv_into(view[got:], n - got)
        except (BlockingIOError, InterruptedError):
            continue
        except OSError as exc:
            raise _WorkerGone from exc
        if k == 0:
            raise _WorkerGone
        got += k
    return bytes(buf)
