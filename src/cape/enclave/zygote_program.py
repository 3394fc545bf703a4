"""The sandbox zygote: one long-lived process per enclave runtime that forks each session's sandbox.

Like :mod:`cape.enclave.worker` this file runs under the sandbox's own interpreter with ``-I -S``
and imports nothing but the standard library (never cape or cryptography). It runs as root in
the runtime's namespaces, has the worker's code loaded already, and **never runs user code**:
``app.py`` is imported only by the session's own pid 1, after that process has built and entered
its sandbox (issue 16: a zygote that imported a function would have run user code while holding
what it needs to build every later session's namespaces).

Started by :mod:`cape.enclave.zygote` as ``python -I -S -B zygote_program.py <control fd>``. The
control socket (``SOCK_SEQPACKET``) carries, first, the sandbox's layout and the seccomp program
(``init``), then one message per session: its settings and descriptors (``SCM_RIGHTS``): a status
socket, the call channel, the stderr pipe, the services socket (optional) and one
``cgroup.procs`` descriptor per hierarchy. Per session the zygote forks a *monitor* (A), which:

1. joins the session's cgroup (writes ``0`` to each ``cgroup.procs``) while still root;
2. switches groups, gid and uid to the session's host uid (all three of real, effective, saved);
3. unshares user, mount, pid, net, ipc, uts and cgroup namespaces, writes ``setgroups`` deny
   and the uid/gid maps ``1000 U 1`` (made dumpable for the write only), limits the new user
   namespace to no further user namespaces (``user.max_user_namespaces`` = 0, what bubblewrap's
   ``--disable-userns`` achieves; seccomp refuses them too) and sets the hostname;
4. forks the sandbox's pid 1 (B), hands its pidfd to the runtime, and waits for it like
   bubblewrap's monitor (exit status ``128 + signal`` when B was killed).

B builds the mount tree exactly as bubblewrap does for :class:`cape.enclave.spawn.Spawn`'s argv
(see :func:`_build_root`), then ``setsid``, drops every capability (bounding and ambient sets
included), sets ``no_new_privs``, loads the seccomp program and runs the worker's ``main``. Any
failed step writes one ``cape-zygote: <step>: <reason>`` line to the stderr pipe and exits with
status 1 before user code could run (fail closed, reported like bubblewrap's own failures).
Both A and B die with their parent (``PR_SET_PDEATHSIG``); the zygote exits when the runtime
closes the control socket. The zygote reports each monitor's exit status and CPU time
(``wait4``: the monitor's plus the sandbox's) on the session's status socket.
"""

from __future__ import annotations

# What the worker has loaded when it imports app.py under bubblewrap (the interpreter's own
# modules, the worker's, ctypes) is loaded first; each sandbox forgets every module the zygote
# imported after that (socket, select, ...), so that a function finds the same sys.modules
# either way and pays for its own imports as it would under bubblewrap.
import ctypes
import os
import sys
from importlib.machinery import SourceFileLoader

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_PATH = "/cape-worker/worker.py"


def _load_worker() -> ModuleType:
    loader = SourceFileLoader("cape_sandbox_worker", os.path.join(HERE, "worker.py"))
    module = type(sys)("cape_sandbox_worker")
    module.__file__ = WORKER_PATH
    loader.exec_module(module)
    return module


WORKER = _load_worker()
WORKER_MODULES = frozenset(sys.modules)

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
INNER_UID = 1000
HOSTNAME = b"cape-sandbox"
GUEST_PATH = "/cape-worker/guest"
GUEST_MODULES = ("cape_encrypt.py",)
FUNCTION_PATH = "/function"
CHANNEL_FD = 3
SERVICES_FD = 4
MAX_MESSAGE = 1 << 20
MAX_FDS = 32

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
NAMESPACES = (
    CLONE_NEWUSER
    | CLONE_NEWNS
    | CLONE_NEWPID
    | CLONE_NEWNET
    | CLONE_NEWIPC
    | CLONE_NEWUTS
    | CLONE_NEWCGROUP
)
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_SILENT = 32768
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MNT_DETACH = 2
# statvfs flags that are mount flags the kernel locks on mounts copied into a user namespace.
ST_TO_MS = {os.ST_NOSUID: MS_NOSUID, os.ST_NODEV: MS_NODEV, os.ST_NOEXEC: MS_NOEXEC}
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_SECCOMP = 22
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SECCOMP_MODE_FILTER = 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = (
    ("/proc/self/fd/0", "stdin"),
    ("/proc/self/fd/1", "stdout"),
    ("/proc/self/fd/2", "stderr"),
    ("/proc/self/fd", "fd"),
    ("/proc/kcore", "core"),
)
PROC_COVERS = ("sys", "sysrq-trigger", "irq", "bus")

_libc = ctypes.CDLL(None, use_errno=True)


class SetupFailed(Exception):
    """A step of building the sandbox failed: ``str()`` is the one line for the runtime."""


def _check(result: int, step: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise SetupFailed(f"{step}: {os.strerror(err)}")


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = _libc.mount(
        _b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data) if data else None
    )
    _check(result, f"mount {target}")


def prctl(option: int, arg: int, step: str) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), step)


class Config:
    """What every sandbox of this runtime shares (the ``init`` message)."""

    def __init__(self, fields: list[str], seccomp: bytes) -> None:
        self.binds: list[tuple[str, str]] = []
        self.symlinks: list[tuple[str, str]] = []
        self.hidden: list[str] = []
        self.empty = ""
        self.python_bin = ""
        self.seccomp = seccomp
        it = iter(fields)
        for kind in it:
            if kind == "bind":
                self.binds.append((next(it), next(it)))
            elif kind == "symlink":
                self.symlinks.append((next(it), next(it)))
            elif kind == "hide":
                self.hidden.append(next(it))
            elif kind == "empty":
                self.empty = next(it)
            elif kind == "python_bin":
                self.python_bin = next(it)
            else:
                raise ValueError(f"unknown init field {kind!r}")
        if not self.empty or not self.python_bin or not seccomp or len(seccomp) % 8:
            raise ValueError("incomplete init message")
        with open(os.path.join(HERE, "worker.py"), "rb") as file:
            self.worker_source = file.read()
        self.guest_sources = []
        for name in GUEST_MODULES:
            with open(os.path.join(HERE, "guest", name), "rb") as file:
                self.guest_sources.append((name, file.read()))
        with open("/proc/sys/kernel/cap_last_cap") as file:
            self.cap_last = int(file.read())
        self.pivot_root = SYS_PIVOT_ROOT.get(os.uname().machine)
        if self.pivot_root is None:
            raise ValueError(f"no pivot_root syscall number for {os.uname().machine}")
        self.worker = WORKER


class Request:
    """One session: settings (``name``, value pairs, then ``args`` and the worker's arguments)."""

    def __init__(self, fields: list[str], fds: list[int]) -> None:
        if "args" not in fields:
            raise ValueError("no worker arguments")
        cut = fields.index("args")
        head, self.args = fields[:cut], fields[cut + 1 :]
        if len(head) % 2:
            raise ValueError("odd settings")
        settings = dict(zip(head[::2], head[1::2], strict=True))
        self.uid = int(settings["uid"])
        self.tmp_bytes = int(settings["tmp_bytes"])
        self.function_dir = settings["function_dir"]
        services = settings["services"] == "1"
        groups = int(settings["cgroups"])
        if self.uid <= 0 or self.tmp_bytes <= 0 or len(fds) != 3 + services + groups:
            raise ValueError("bad settings or descriptors")
        self.status, self.channel, self.stderr = fds[:3]
        self.services = fds[3] if services else None
        self.cgroups = fds[3 + services :]
        self.fds = fds


# --- the zygote's loop ------------------------------------------------------------------------


def serve(control: socket.socket) -> None:
    config = _receive_init(control)
    poller = select.poll()
    poller.register(control, select.POLLIN)
    live: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (monitor pid, status socket)
    while True:
        for fd, _ in poller.poll():
            if fd == control.fileno():
                message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, MAX_FDS)
                if not message:
                    return  # the runtime is gone: our monitors die with us (PDEATHSIG)
                _start(config, message, fds, live, poller)
            else:
                pid, status_sock = live.pop(fd)
                poller.unregister(fd)
                _, status, usage = os.wait4(pid, 0)
                cpu_us = int((usage.ru_utime + usage.ru_stime) * 1e6)
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):  # the runtime may have closed it first
                    status_sock.send(f"exit {code} {cpu_us}".encode(), socket.MSG_DONTWAIT)
                status_sock.close()
                os.close(fd)


def _receive_init(control: socket.socket) -> Config:
    message, fds, _, _ = socket.recv_fds(control, MAX_MESSAGE, 1)
    if not message.startswith(b"init\0") or len(fds) != 1:
        raise SystemExit("cape-zygote: the first message must be init with the seccomp program")
    with os.fdopen(fds[0], "rb") as file:
        program = file.read()
    return Config(os.fsdecode(message).split("\0")[1:], program)


def _start(
    config: Config,
    message: bytes,
    fds: list[int],
    live: dict[int, tuple[int, socket.socket]],
    poller: select.poll,
) -> None:
    try:
        request = Request(os.fsdecode(message).split("\0"), fds)
    except (ValueError, KeyError):
        for fd in fds:
            os.close(fd)
        return  # the runtime's ZygoteSpawn times out waiting for "forked" and says so
    zygote = os.getpid()
    try:
        pid = os.fork()
    except OSError:
        pid = -1
    if pid == 0:
        _monitor(config, request, zygote)  # never returns
    status_sock = socket.socket(fileno=request.status)
    for fd in request.fds[1:]:
        os.close(fd)
    if pid < 0:
        status_sock.close()
        return
    pidfd = os.pidfd_open(pid)
    with contextlib.suppress(OSError):
        socket.send_fds(status_sock, [b"forked"], [pidfd])
    live[pidfd] = (pid, status_sock)
    poller.register(pidfd, select.POLLIN)


# --- the monitor (A) and the sandbox's pid 1 (B) ----------------------------------------------


def _fail(exc: BaseException) -> None:

    line = f"cape-zygote: {exc}\n" if isinstance(exc, SetupFailed) else f"cape-zygote: {exc!r}\n"
    try:
        os.write(2, line.encode("utf-8", "replace"))
    finally:
        os._exit(1)


def _monitor(config: Config, request: Request, zygote: int) -> None:
    try:
        _monitor_steps(config, request, zygote)
    except BaseException as exc:  # every failure ends here, before user code
        _fail(exc)
    os._exit(1)


def _monitor_steps(config: Config, request: Request, zygote: int) -> None:
    # Only this session's descriptors: stdio, then the rest.
    keep = [request.status, request.channel, request.stderr, *request.cgroups]
    if request.services is not None:
        keep.append(request.services)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.dup2(request.stderr, 2)
    os.close(null)
    _close_all_but({0, 1, 2, *keep})
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for fd in request.cgroups:  # join the session's cgroup first, while still root
        try:
            os.write(fd, b"0")
        except OSError as exc:
            raise SetupFailed(f"join the session's cgroup: {exc.strerror}") from None
        os.close(fd)
    uid = request.uid
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise SetupFailed(f"switch to uid {uid}: {exc.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise SetupFailed(f"switch to uid {uid}: not switched")
    _die_with_parent(zygote, "die with the zygote")
    prctl(PR_SET_DUMPABLE, 1, "make the uid map writable")
    _check(_libc.unshare(NAMESPACES), "unshare namespaces")
    _write("/proc/self/setgroups", "deny", "deny setgroups")
    _write("/proc/self/uid_map", f"{INNER_UID} {uid} 1", "write the uid map")
    _write("/proc/self/gid_map", f"{INNER_UID} {uid} 1", "write the gid map")
    prctl(PR_SET_DUMPABLE, 0, "make the monitor not dumpable")
    _write("/proc/sys/user/max_user_namespaces", "0", "disable further user namespaces")
    _check(_libc.sethostname(HOSTNAME, len(HOSTNAME)), "set the hostname")
    _die_with_parent(zygote, "die with the zygote")
    status = socket.socket(fileno=request.status)
    try:
        child = os.fork()
    except OSError as exc:
        raise SetupFailed(f"fork the sandbox's pid 1: {exc.strerror}") from None
    if child == 0:
        try:
            status.detach()
            os.close(request.status)
            _sandbox(config, request)
        except BaseException as exc:
            _fail(exc)
        os._exit(1)
    os.close(request.channel)
    if request.services is not None:
        os.close(request.services)
    os.close(request.stderr)
    try:  # the monitor only waits from now on: it keeps nothing of its namespace's privileges
        _drop_capabilities(config)
        prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
        _die_with_parent(zygote, "die with the zygote")
    except SetupFailed:
        os.kill(child, signal.SIGKILL)
        raise
    pidfd = os.pidfd_open(child)
    try:
        socket.send_fds(status, [b"started"], [pidfd])
    except OSError:
        os.kill(child, signal.SIGKILL)
    status.close()
    os.close(pidfd)
    _, wait_status = os.waitpid(child, 0)
    if os.WIFSIGNALED(wait_status):
        os._exit(128 + os.WTERMSIG(wait_status))
    os._exit(os.waitstatus_to_exitcode(wait_status) & 0xFF)


def _die_with_parent(parent: int, step: str) -> None:
    """PR_SET_PDEATHSIG, set again after each change of credentials (which clears it), and
    checked against a parent that ended before it was set."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, step)
    if parent and os.getppid() != parent:
        raise SetupFailed(f"{step}: it ended")


def _close_all_but(keep: set[int]) -> None:
    low = 0
    for fd in sorted(keep):
        if low < fd:  # closerange(n, n) would close everything from n on
            os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)


def _write(path: str, text: str, step: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        raise SetupFailed(f"{step}: {exc.strerror}") from None


def _sandbox(config: Config, request: Request) -> None:
    """B: pid 1 of the new pid namespace. Build the root, drop everything, run the worker."""
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "die with the monitor")
    _build_root(config, request)
    try:
        os.chdir(FUNCTION_PATH)
        os.setsid()
    except OSError as exc:
        raise SetupFailed(f"enter {FUNCTION_PATH}: {exc.strerror}") from None
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    # Out of the way first, so that moving one to its number cannot overwrite the other.
    channel = fcntl.fcntl(request.channel, fcntl.F_DUPFD_CLOEXEC, 100)
    services = (
        None
        if request.services is None
        else fcntl.fcntl(request.services, fcntl.F_DUPFD_CLOEXEC, 100)
    )
    os.dup2(channel, CHANNEL_FD)
    if services is not None:
        os.dup2(services, SERVICES_FD)
    _close_all_but({0, 1, 2, CHANNEL_FD} | ({SERVICES_FD} if services is not None else set()))
    _drop_capabilities(config)
    prctl(PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    _die_with_parent(0, "die with the monitor")  # its parent is outside: getppid() is 0
    _load_seccomp(config.seccomp)
    os.environ.clear()
    os.environ.update(
        {
            "PATH": f"{config.python_bin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": "/tmp",  # noqa: S108 - the sandbox's own tmpfs
            "TMPDIR": "/tmp",  # noqa: S108
            "LANG": "C.UTF-8",
            "USER": "cape",
            "LOGNAME": "cape",
            "MALLOC_ARENA_MAX": "2",
            "PWD": FUNCTION_PATH,
        }
    )
    if request.args == ["--probe"]:
        os._exit(0)  # the runtime's probe: the whole sandbox was built, nothing more to run
    for name in set(sys.modules) - WORKER_MODULES:
        del sys.modules[name]
    sys.modules["__main__"] = config.worker
    argv = request.args  # the worker script and its arguments, as bubblewrap would run them
    sys.argv[:] = argv
    config.worker.run(argv)


def _build_root(config: Config, request: Request) -> None:
    """The mount tree of :class:`cape.enclave.spawn.Spawn`'s bubblewrap argv, in its order."""
    mount(None, "/", None, MS_SILENT | MS_SLAVE | MS_REC)
    base = "/tmp"  # noqa: S108 - a mount point in our own mount namespace, as bubblewrap uses
    mount("tmpfs", base, "tmpfs", MS_NODEV | MS_NOSUID)
    try:
        os.chdir(base)
        os.mkdir("newroot", 0o755)
        os.mkdir("oldroot", 0o755)
    except OSError as exc:
        raise SetupFailed(f"prepare the base tmpfs: {exc.strerror}") from None
    _check(_libc.syscall(config.pivot_root, b".", b"oldroot"), "pivot_root to the base")
    os.chdir("/")
    mount("newroot", "newroot", None, MS_SILENT | MS_BIND | MS_REC)
    for source, dest in config.binds:
        _bind(source, dest)
    for target, path in config.symlinks:
        _symlink(target, path)
    for path in config.hidden:
        _bind(config.empty, path)
    _mount_proc()
    _mount_dev()
    for path in ("/dev/shm", "/tmp"):  # noqa: S108 - the sandbox's own scratch
        _ensure_dir("/newroot" + path)
        mount(
            "tmpfs",
            "/newroot" + path,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"mode=01777,size={request.tmp_bytes}",
        )
    _bind(request.function_dir, FUNCTION_PATH)
    _bind_data(config.worker_source, WORKER_PATH, "worker")
    for name, text in config.guest_sources:
        _bind_data(text, f"{GUEST_PATH}/{name}", name)
    _bind_data(
        f"cape:x:{INNER_UID}:{INNER_UID}:cape function:/tmp:/usr/sbin/nologin\n".encode(),
        "/etc/passwd",
        "passwd",
    )
    _bind_data(f"cape:x:{INNER_UID}:\n".encode(), "/etc/group", "group")
    _remount_ro("/newroot/dev", MS_NOSUID | MS_NODEV)
    _remount_ro("/newroot", MS_NOSUID | MS_NODEV)
    mount("oldroot", "oldroot", None, MS_SILENT | MS_REC | MS_PRIVATE)
    _check(_libc.umount2(b"oldroot", MNT_DETACH), "detach the old root")
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY)
    try:
        os.chdir("/newroot")
        _check(_libc.syscall(config.pivot_root, b".", b"."), "pivot_root to the new root")
        os.fchdir(old)
        _check(_libc.umount2(b".", MNT_DETACH), "detach the base tmpfs")
        os.chdir("/")
    finally:
        os.close(old)


def _ensure_dir(path: str) -> None:
    try:
        os.makedirs(path, 0o755, exist_ok=True)
    except OSError as exc:
        raise SetupFailed(f"create {path[len('/newroot') :] or '/'}: {exc.strerror}") from None


def _ensure_file(path: str) -> None:
    _ensure_dir(os.path.dirname(path))
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o444))
    except OSError as exc:
        raise SetupFailed(f"create {path[len('/newroot') :]}: {exc.strerror}") from None


def _bind(source: str, dest: str, *, devices: bool = False, readonly: bool = True) -> None:
    """bubblewrap's --ro-bind (--dev-bind for device nodes): a recursive bind, then every
    mount of it remounted with nosuid (and nodev, read-only) on top of its locked flags."""
    host = _in_old_root(source)
    target = "/newroot" + dest
    try:
        is_dir = stat.S_ISDIR(os.stat(host).st_mode)
    except OSError as exc:
        raise SetupFailed(f"bind {source}: {exc.strerror}") from None
    if is_dir:
        _ensure_dir(target)
    else:
        _ensure_file(target)
    mount(host, target, None, MS_SILENT | MS_BIND | MS_REC)
    extra = MS_NOSUID | (0 if devices else MS_NODEV) | (MS_RDONLY if readonly else 0)
    for point in _mounts_under(target):
        _remount(point, extra)


def _in_old_root(path: str) -> str:
    """``path`` of the host, its symlinks resolved inside ``/oldroot`` (an absolute link
    target means the host's root, as bubblewrap resolves bind sources)."""
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = "/oldroot/" + "/".join([*resolved, part])
        try:
            target = os.readlink(candidate)
        except OSError:
            resolved.append(part)  # not a link (or missing: the mount says so)
            continue
        links += 1
        if links > 40:
            raise SetupFailed(f"bind {path}: too many levels of symbolic links")
        if target.startswith("/"):
            resolved = []
        parts = [p for p in target.split("/") if p] + parts
    return "/oldroot/" + "/".join(resolved)


def _mounts_under(target: str) -> list[str]:
    """``target`` and every mount below it, parents first (from our own mountinfo)."""
    points = [target]
    try:
        with open("/oldroot/proc/self/mountinfo", "rb") as file:
            lines = file.read().split(b"\n")
    except OSError as exc:
        raise SetupFailed(f"read the mount table: {exc.strerror}") from None
    prefix = os.fsencode(target.rstrip("/") + "/")
    for line in lines:
        fields = line.split(b" ")
        if len(fields) > 4 and fields[4].startswith(prefix):
            points.append(os.fsdecode(_unescape(fields[4])))
    return points


def _unescape(field: bytes) -> bytes:
    out = bytearray()
    i = 0
    while i < len(field):
        if field[i] == 0x5C and i + 3 < len(field):  # \ooo
            out.append(int(field[i + 1 : i + 4], 8))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return bytes(out)


def _remount(point: str, extra: int) -> None:
    try:
        flags = os.statvfs(point).f_flag
    except OSError as exc:
        raise SetupFailed(f"statvfs {point}: {exc.strerror}") from None
    locked = 0
    for st, ms in ST_TO_MS.items():
        if flags & st:
            locked |= ms
    if flags & os.ST_RDONLY:
        locked |= MS_RDONLY
    mount(None, point, None, MS_SILENT | MS_BIND | MS_REMOUNT | locked | extra)


def _remount_ro(point: str, extra: int) -> None:
    _remount(point, MS_RDONLY | extra)


def _symlink(target: str, path: str) -> None:
    link = "/newroot" + path
    _ensure_dir(os.path.dirname(link))
    try:
        os.symlink(target, link)
    except OSError as exc:
        raise SetupFailed(f"symlink {path}: {exc.strerror}") from None


def _mount_proc() -> None:
    _ensure_dir("/newroot/proc")
    mount("proc", "/newroot/proc", "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV)
    for name in PROC_COVERS:  # as bubblewrap: read-only covers where the kernel allows them
        path = "/newroot/proc/" + name
        if not os.path.exists(path):
            continue
        result = _libc.mount(
            os.fsencode(path), os.fsencode(path), None, ctypes.c_ulong(MS_BIND | MS_REC), None
        )
        if result == 0:
            _remount(path, MS_RDONLY | MS_NOSUID | MS_NODEV)


def _mount_dev() -> None:
    dev = "/newroot/dev"
    _ensure_dir(dev)
    mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
    for name in DEVICES:
        _bind("/dev/" + name, "/dev/" + name, devices=True, readonly=False)
    for target, name in DEV_LINKS:
        _symlink(target, "/dev/" + name)
    _ensure_dir(dev + "/shm")
    _ensure_dir(dev + "/pts")
    mount(
        "devpts",
        dev + "/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    _symlink("pts/ptmx", "/dev/ptmx")


def _bind_data(data: bytes, dest: str, name: str) -> None:
    """bubblewrap's --ro-bind-data: a file of the base tmpfs, bound read-only at ``dest``."""
    staged = "/bindfile-" + name
    try:
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SetupFailed(f"stage {dest}: {exc.strerror}") from None
    target = "/newroot" + dest
    _ensure_file(target)
    mount(staged, target, None, MS_SILENT | MS_BIND)
    _remount(target, MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.unlink(staged)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


def _drop_capabilities(config: Config) -> None:
    for cap in range(config.cap_last + 1):
        prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
    _check(
        _libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0),
        "clear the ambient capabilities",
    )
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "drop every capability")


class _SockFilterProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _load_seccomp(program: bytes) -> None:
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFilterProg(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    _check(
        _libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0),
        "load the seccomp filter",
    )


def main(argv: list[str]) -> None:
    control = socket.socket(fileno=int(argv[1]))
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL, "die with the runtime")
    serve(control)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except (SetupFailed, ValueError, OSError) as exc:
        sys.stderr.write(f"cape-zygote: {exc}\n")
        sys.exit(1)
    sys.exit(0)
