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

The mount tree is bubblewrap's for :class:`cape.enclave.spawn.Spawn`'s argv, made in two parts
(:mod:`cape.enclave.sandbox_root`): at ``init`` the zygote builds, in a mount namespace of its
own, everything of it that is the same for every session, read-only; A's ``unshare`` copies
that (every copied mount locked), and B mounts only what is its own (``/proc``, ``/dev/pts``,
the size-capped ``/tmp`` and ``/dev/shm``, ``/function``) and ``pivot_root``s into it. B then
``setsid``, drops every capability (bounding and ambient sets
included), sets ``no_new_privs``, loads the seccomp program and runs the worker's ``main``. Any
failed step writes one ``cape-zygote: <step>: <reason>`` line to the stderr pipe and exits with
status 1 before user code could run (fail closed, reported like bubblewrap's own failures).
Both A and B die with their parent (``root.PR_SET_PDEATHSIG``); the zygote exits when the runtime
closes the control socket. The guest helper (``cape_encrypt``) is compiled once, from the bytes
the zygote binds into every sandbox, and each session's worker runs that code object
(``worker.PRECOMPILED``) instead of compiling the file again. The zygote reports each monitor's
exit status and CPU time (``wait4``: the monitor's plus the sandbox's) on the session's status
socket.
"""

from __future__ import annotations

# What the worker has loaded when it imports app.py under bubblewrap (the interpreter's own
# modules, the worker's, ctypes) is loaded first; each sandbox forgets every module the zygote
# imported after that (socket, select, ...), so that a function finds the same sys.modules
# either way and pays for its own imports as it would under bubblewrap.
import ctypes  # noqa: F401 - loaded before the snapshot, as the worker loads it
import os
import sys
from importlib.machinery import SourceFileLoader

TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, file: str, path: str) -> ModuleType:
    """A sibling file of this one as a module (this runs with -I -S: no cape on sys.path)."""
    loader = SourceFileLoader(name, os.path.join(HERE, file))
    module = type(sys)(name)
    module.__file__ = path
    loader.exec_module(module)
    return module


if TYPE_CHECKING:
    from cape.enclave import sandbox_root as root
else:
    root = _load("cape_sandbox_root", "sandbox_root.py", os.path.join(HERE, "sandbox_root.py"))
WORKER = _load("cape_sandbox_worker", "worker.py", root.WORKER_PATH)
WORKER.use_libc(root.libc)  # the worker's PR_SET_DUMPABLE call needs no second ctypes.CDLL
WORKER_MODULES = frozenset(sys.modules)

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402

HOSTNAME = root.HOSTNAME.encode()
#: The zygote's own modules that a sandbox's pid 1 removed from ``sys.modules`` (see _sandbox).
_FORGOTTEN: list[ModuleType] = []
CHANNEL_FD, SERVICES_FD = root.CHANNEL_FD, root.SERVICES_FD
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
        for name in root.GUEST_MODULES:
            with open(os.path.join(HERE, "guest", name), "rb") as file:
                self.guest_sources.append((name, file.read()))
        with open("/proc/sys/kernel/cap_last_cap") as file:
            self.cap_last = int(file.read())
        self.pivot_root = root.SYS_PIVOT_ROOT.get(os.uname().machine)
        if self.pivot_root is None:
            raise ValueError(f"no pivot_root syscall number for {os.uname().machine}")
        self.worker = WORKER
        #: The sessions' shared tree (root.build_template) and why it failed, if it did.
        self.template = ""
        self.failure: str | None = None
        for name, text in self.guest_sources:  # what the worker would compile per session
            path = f"{root.GUEST_PATH}/{name}"
            WORKER.PRECOMPILED[path] = compile(text, path, "exec", dont_inherit=True)


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
    config = Config(os.fsdecode(message).split("\0")[1:], program)
    _build_template(config)
    return config


def _build_template(config: Config) -> None:
    """The sessions' shared read-only tree (root.build_template), at an empty directory beside
    ``empty`` (in the runtime's support directory; mode 0711 so that each session's pid 1 can
    reach it). A failure is kept, and each session then fails with it before anything else."""
    base = os.path.join(os.path.dirname(config.empty), f"zygote-{os.getpid()}")
    try:
        with contextlib.suppress(FileExistsError):  # a dead zygote's, with our pid
            os.mkdir(base, 0o711)
        config.template = base
        os.setgroups([])  # no group's access while the tree's sources are resolved
        root.build_template(config, base)
    except root.SetupFailed as exc:
        config.failure = str(exc)
    except OSError as exc:
        config.failure = f"prepare the sandboxes' tree: {exc.strerror}"


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

    line = (
        f"cape-zygote: {exc}\n" if isinstance(exc, root.SetupFailed) else f"cape-zygote: {exc!r}\n"
    )
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
            raise root.SetupFailed(f"join the session's cgroup: {exc.strerror}") from None
        os.close(fd)
    if config.failure is not None:
        raise root.SetupFailed(config.failure)
    uid = request.uid
    try:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    except OSError as exc:
        raise root.SetupFailed(f"switch to uid {uid}: {exc.strerror}") from None
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (uid, uid, uid) or os.getgroups():
        raise root.SetupFailed(f"switch to uid {uid}: not switched")
    _die_with_parent(zygote, "die with the zygote")
    root.prctl(root.PR_SET_DUMPABLE, 1, "make the uid map writable")
    root.check(root.libc.unshare(NAMESPACES), "unshare namespaces")
    _write("/proc/self/setgroups", "deny", "deny setgroups")
    _write("/proc/self/uid_map", f"{root.INNER_UID} {uid} 1", "write the uid map")
    _write("/proc/self/gid_map", f"{root.INNER_UID} {uid} 1", "write the gid map")
    root.prctl(root.PR_SET_DUMPABLE, 0, "make the monitor not dumpable")
    _write("/proc/sys/user/max_user_namespaces", "0", "disable further user namespaces")
    root.check(root.libc.sethostname(HOSTNAME, len(HOSTNAME)), "set the hostname")
    _die_with_parent(zygote, "die with the zygote")
    status = socket.socket(fileno=request.status)
    try:
        child = os.fork()
    except OSError as exc:
        raise root.SetupFailed(f"fork the sandbox's pid 1: {exc.strerror}") from None
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
        root.drop_capabilities(config.cap_last)
        root.prctl(root.PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
        _die_with_parent(zygote, "die with the zygote")
    except root.SetupFailed:
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
    """root.PR_SET_PDEATHSIG, set again after each change of credentials (which clears it), and
    checked against a parent that ended before it was set."""
    root.prctl(root.PR_SET_PDEATHSIG, signal.SIGKILL, step)
    if parent and os.getppid() != parent:
        raise root.SetupFailed(f"{step}: it ended")


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
        raise root.SetupFailed(f"{step}: {exc.strerror}") from None


def _sandbox(config: Config, request: Request) -> None:
    """B: pid 1 of the new pid namespace. Build the root, drop everything, run the worker."""
    root.prctl(root.PR_SET_PDEATHSIG, signal.SIGKILL, "die with the monitor")
    root.enter_root(config, request)
    try:
        os.chdir(root.FUNCTION_PATH)
        os.setsid()
    except OSError as exc:
        raise root.SetupFailed(f"enter {root.FUNCTION_PATH}: {exc.strerror}") from None
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
    root.drop_capabilities(config.cap_last)
    root.prctl(root.PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    _die_with_parent(0, "die with the monitor")  # its parent is outside: getppid() is 0
    root.load_seccomp(config.seccomp)
    os.environ.clear()
    os.environ.update(root.environment(config.python_bin), PWD=root.FUNCTION_PATH)
    if request.args == ["--probe"]:
        os._exit(0)  # the runtime's probe: the whole sandbox was built, nothing more to run
    # Forgotten, not freed: a module whose last reference was sys.modules' would be torn down
    # here, writing to (so copying) pages of the zygote (issue 16: ≈ 0.15 ms, ≈ 25 page faults).
    _FORGOTTEN.extend(sys.modules.pop(name) for name in set(sys.modules) - WORKER_MODULES)
    sys.modules["__main__"] = config.worker
    argv = request.args  # the worker script and its arguments, as bubblewrap would run them
    sys.argv[:] = argv
    config.worker.run(argv)


def main(argv: list[str]) -> None:
    control = socket.socket(fileno=int(argv[1]))
    root.prctl(root.PR_SET_PDEATHSIG, signal.SIGKILL, "die with the runtime")
    serve(control)


if __name__ == "__main__":
    try:
        main(sys.argv)
    except (root.SetupFailed, ValueError, OSError) as exc:
        sys.stderr.write(f"cape-zygote: {exc}\n")
        sys.exit(1)
    sys.exit(0)
