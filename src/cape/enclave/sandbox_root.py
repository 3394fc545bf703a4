"""The sandbox's root and privileges, built by the zygote and each session's pid 1 (issue 16).

Loaded by :mod:`cape.enclave.zygote_program` (stdlib only, like it and the worker). The mount
tree of :class:`cape.enclave.spawn.Spawn`'s bubblewrap argv is made in two parts. What is the
same for every session (the read-only binds with their flags, symlinks, covered
site-packages, ``/dev``'s device binds and symlinks, the worker's files, read-only ``/`` and
``/dev``) is made once per zygote, in a mount namespace of its own
(:func:`build_template`); each session's monitor copies it with its ``unshare``, which locks
every copied mount in the session's user namespace. Each session's pid 1, which holds every
capability in its own user namespace, mounts what is its own (``/proc``, ``/dev/pts``, the
size-capped scratch, ``/function``) and ``pivot_root``s into it (:func:`enter_root`).
:func:`drop_capabilities` empties every capability set, :func:`load_seccomp` installs the
filter. Each system call's errno is checked; a failure raises :class:`SetupFailed`, whose
text is the one line the runtime reports.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

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
CLONE_NEWNS = 0x00020000
# mount_setattr(2) (Linux 5.12; the same number on x86_64 and aarch64) and its attributes.
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MS_TO_ATTR = {MS_RDONLY: 0x1, MS_NOSUID: 0x2, MS_NODEV: 0x4}
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
#: The sandbox's root in the zygote's template (a directory of the template's tmpfs).
NEWROOT = "newroot"
#: The uid (and gid) the zygote resolves the template's bind sources as: one with no access
#: beyond what any uid has, like each session's own.
NOBODY = 65534
# What a sandbox holds, whichever path builds it (bubblewrap's argv in cape.enclave.spawn, or
# build_root below): one definition, so the two cannot drift apart.
INNER_UID = 1000
FUNCTION_PATH = "/function"
WORKER_PATH = "/cape-worker/worker.py"
GUEST_PATH = "/cape-worker/guest"
GUEST_MODULES = ("cape_encrypt.py",)  # bound read-only into every sandbox
HOSTNAME = "cape-sandbox"
# Where a zygote-built sandbox's pid 1 puts the channel and services sockets (the worker's
# arguments name them).
CHANNEL_FD = 3
SERVICES_FD = 4
PASSWD = f"cape:x:{INNER_UID}:{INNER_UID}:cape function:/tmp:/usr/sbin/nologin\n"
GROUP = f"cape:x:{INNER_UID}:\n"


def environment(python_bin: str) -> dict[str, str]:
    """The sandbox's whole environment (nothing of the runtime's is passed on)."""
    return {
        "PATH": f"{python_bin}:/usr/local/bin:/usr/bin:/bin",
        "HOME": "/tmp",  # noqa: S108 - the sandbox's own tmpfs
        "TMPDIR": "/tmp",  # noqa: S108
        "LANG": "C.UTF-8",
        "USER": "cape",
        "LOGNAME": "cape",
        # glibc reserves 64 MiB of address space per malloc arena and thread; under
        # RLIMIT_AS that would starve threaded code long before real memory runs out.
        "MALLOC_ARENA_MAX": "2",
    }


MAX_STDERR_BYTES = 4 << 10


def read_complaint(fd: int) -> str:
    """The one line a failed start wrote to its stderr pipe (bubblewrap's, or the zygote
    child's: the worker's own stderr is /dev/null), bounded, whitespace folded."""
    os.set_blocking(fd, False)
    try:
        data = os.read(fd, MAX_STDERR_BYTES)
    except OSError:
        data = b""
    return " ".join(data.decode("utf-8", "replace").split())


libc = ctypes.CDLL(None, use_errno=True)
#: What each session's monitor and pid 1 call: looked up once here, in the zygote, rather
#: than after each fork (ctypes resolves and caches a function on first use; issue 16).
for _name in ("capset", "mount", "prctl", "sethostname", "syscall", "umount2", "unshare"):
    getattr(libc, _name)


class SetupFailed(Exception):
    """A step of building the sandbox failed: ``str()`` is the one line for the runtime."""


def check(result: int, step: str) -> None:
    """Raise SetupFailed naming ``step`` and errno when a libc call returned non-zero."""
    if result != 0:
        err = ctypes.get_errno()
        raise SetupFailed(f"{step}: {os.strerror(err)}")


def _b(path: str | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    result = libc.mount(
        _b(source), _b(target), _b(fstype), ctypes.c_ulong(flags), _b(data) if data else None
    )
    check(result, f"mount {target}")


def prctl(option: int, arg: int, step: str) -> None:
    check(libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), step)


def build_template(config: Any, base: str) -> None:
    """The zygote, once: what every session's tree shares, read-only, under ``base``/newroot.

    The zygote unshares a mount namespace of its own, a slave of the host's (nothing mounted
    here reaches the host; ``base``, an empty directory of the host, stays empty there), mounts
    a tmpfs at ``base`` and builds in it the parts of :class:`cape.enclave.spawn.Spawn`'s
    bubblewrap tree that are the same for every session, in its order: the read-only binds
    with their flags, symlinks, covered site-packages, ``/dev`` (its device binds and
    symlinks), the worker's files, mount points for what each session mounts itself
    (:func:`enter_root`), then ``/dev`` and ``/`` read-only. The whole template is then made
    private, so that a host mount made later never reaches it. Each session's monitor copies
    it with its ``unshare``; copied into the session's user namespace, every mount of it is
    locked (its read-only, nosuid, nodev flags cannot be cleared, nor can it be unmounted to
    show what is below), as bubblewrap's copies of the host's mounts are.
    """
    check(libc.unshare(CLONE_NEWNS), "unshare the zygote's mount namespace")
    mount(None, "/", None, MS_SILENT | MS_SLAVE | MS_REC)
    mount("tmpfs", base, "tmpfs", MS_NODEV | MS_NOSUID, "mode=0711")
    top = base + "/" + NEWROOT
    try:
        os.mkdir(top, 0o755)
    except OSError as exc:
        raise SetupFailed(f"prepare the base tmpfs: {exc.strerror}") from None
    mount(top, top, None, MS_SILENT | MS_BIND | MS_REC)
    tree = _Tree(base)
    for source, dest in config.binds:
        tree.bind(source, dest)
    for target, path in config.symlinks:
        tree.symlink(target, path)
    for path in config.hidden:
        tree.bind(config.empty, path)
    tree.dir("/proc")
    tree.dev()
    for path in ("/dev/shm", "/tmp", FUNCTION_PATH):  # noqa: S108 - each session's own
        tree.dir(path)
    tree.bind_data(config.worker_source, WORKER_PATH, "worker")
    for name, text in config.guest_sources:
        tree.bind_data(text, f"{GUEST_PATH}/{name}", name)
    tree.bind_data(PASSWD.encode(), "/etc/passwd", "passwd")
    tree.bind_data(GROUP.encode(), "/etc/group", "group")
    _remount(tree.top + "/dev", MS_RDONLY | MS_NOSUID | MS_NODEV)
    _remount(tree.top, MS_RDONLY | MS_NOSUID | MS_NODEV)
    mount(None, base, None, MS_SILENT | MS_REC | MS_PRIVATE)


def enter_root(config: Any, request: Any) -> None:
    """A session's pid 1: its copy of the zygote's template (:func:`build_template`), what is
    its own mounted on it (``/proc``, ``/dev/pts``, the size-capped ``/dev/shm`` and ``/tmp``,
    the function read-only at ``/function``), then ``pivot_root`` into it and the rest of the
    copied namespace detached (``config``, ``request``: the zygote program's Config and
    Request)."""
    tree = _Tree(config.template)
    top = tree.top
    # The copy of the template's top is locked (pivot_root refuses a locked new root); a
    # recursive bind of it is not, and keeps every mount below it and their locked flags.
    mount(top, top, None, MS_SILENT | MS_BIND | MS_REC)
    _mount_proc(top)
    mount(
        "devpts",
        top + "/dev/pts",
        "devpts",
        MS_NOSUID | MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=620",
    )
    for path in ("/dev/shm", "/tmp"):  # noqa: S108 - the sandbox's own scratch
        mount(
            "tmpfs",
            top + path,
            "tmpfs",
            MS_NOSUID | MS_NODEV,
            f"mode=01777,size={request.tmp_bytes}",
        )
    tree.bind(request.function_dir, FUNCTION_PATH, made=True)
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY)
    try:
        os.chdir(top)
        check(libc.syscall(config.pivot_root, b".", b"."), "pivot_root to the new root")
        os.fchdir(old)  # the old root, stacked on the new one
        mount(None, ".", None, MS_SILENT | MS_REC | MS_PRIVATE)
        check(libc.umount2(b".", MNT_DETACH), "detach the old root")
        os.chdir("/")
    finally:
        os.close(old)


class _Tree:
    """Mount points and mounts made under ``base``/newroot, named by their sandbox paths."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.top = base + "/" + NEWROOT

    def _shown(self, path: str) -> str:
        return path[len(self.top) :] or "/"

    def dir(self, dest: str) -> None:
        self._ensure_dir(self.top + dest)

    def _ensure_dir(self, path: str) -> None:
        try:
            try:  # most are one level below a directory that exists: one mkdir, as bubblewrap
                os.mkdir(path, 0o755)
            except FileNotFoundError:
                os.makedirs(path, 0o755, exist_ok=True)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(path).st_mode):  # as makedirs(exist_ok=True)
                    raise
        except OSError as exc:
            raise SetupFailed(f"create {self._shown(path)}: {exc.strerror}") from None

    def _ensure_file(self, path: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
        try:
            try:
                fd = os.open(path, flags, 0o444)
            except FileNotFoundError:  # its directory first
                self._ensure_dir(os.path.dirname(path))
                fd = os.open(path, flags, 0o444)
            os.close(fd)
        except OSError as exc:
            raise SetupFailed(f"create {self._shown(path)}: {exc.strerror}") from None

    def bind(
        self,
        source: str,
        dest: str,
        *,
        devices: bool = False,
        readonly: bool = True,
        made: bool = False,
    ) -> None:
        """bubblewrap's --ro-bind (--dev-bind for device nodes): a recursive bind, then nosuid
        (and nodev, read-only) added to every mount of it, each keeping its other flags
        (``made``: a session's bind, whose mount point is in the template)."""
        target = self.top + dest
        # The zygote (root) resolves a template's source as an unprivileged uid with no group,
        # as bubblewrap does as the session's uid: a source behind a closed directory fails.
        try:
            _fs_user(made, NOBODY)
            is_dir = stat.S_ISDIR(os.stat(source).st_mode)
        except OSError as exc:
            raise SetupFailed(f"bind {source}: {exc.strerror}") from None
        finally:
            _fs_user(made, 0)
        if made:
            pass
        elif is_dir:
            self._ensure_dir(target)
        else:
            self._ensure_file(target)
        try:
            _fs_user(made, NOBODY)
            mount(source, target, None, MS_SILENT | MS_BIND | MS_REC)
        finally:
            _fs_user(made, 0)
        extra = MS_NOSUID | (0 if devices else MS_NODEV) | (MS_RDONLY if readonly else 0)
        if made:  # a session's: every mount below (those covered by another too) in one call
            _restrict(target, extra)
        else:  # the template's, once: each mount the table shows there, as bubblewrap does
            _remount_shown(target, extra)

    def symlink(self, target: str, path: str) -> None:
        link = self.top + path
        self._ensure_dir(os.path.dirname(link))
        try:
            os.symlink(target, link)
        except OSError as exc:
            raise SetupFailed(f"symlink {path}: {exc.strerror}") from None

    def dev(self) -> None:
        """``/dev``: a tmpfs, the device nodes bound from the host, bubblewrap's symlinks and
        the mount points of each session's ``/dev/shm`` and ``/dev/pts``."""
        dev = self.top + "/dev"
        self._ensure_dir(dev)
        mount("tmpfs", dev, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755")
        for name in DEVICES:
            self.bind("/dev/" + name, "/dev/" + name, devices=True, readonly=False)
        for target, name in DEV_LINKS:
            self.symlink(target, "/dev/" + name)
        self._ensure_dir(dev + "/shm")
        self._ensure_dir(dev + "/pts")
        self.symlink("pts/ptmx", "/dev/ptmx")

    def bind_data(self, data: bytes, dest: str, name: str) -> None:
        """bubblewrap's --ro-bind-data: a file of the base tmpfs, bound read-only at ``dest``."""
        staged = f"{self.base}/bindfile-{name}"
        try:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        except OSError as exc:
            raise SetupFailed(f"stage {dest}: {exc.strerror}") from None
        target = self.top + dest
        self._ensure_file(target)
        mount(staged, target, None, MS_SILENT | MS_BIND)
        _remount(target, MS_RDONLY | MS_NOSUID | MS_NODEV)
        os.unlink(staged)


def _fs_user(skip: bool, uid: int) -> None:
    """The file-system uid and gid the zygote resolves paths as (``skip``: a session's pid 1,
    which is its session's uid already). Leaving 0 drops the file capabilities (no DAC
    override) and keeps CAP_SYS_ADMIN, so that mount still works."""
    if skip:
        return
    libc.setfsgid(uid)
    libc.setfsuid(uid)
    if libc.setfsuid(uid) != uid or libc.setfsgid(uid) != uid:  # each returns the one in force
        raise SetupFailed(f"resolve bind sources as uid {uid}: not switched")


class _MountAttr(ctypes.Structure):
    _fields_ = [
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    ]


def _restrict(target: str, extra: int) -> None:
    """Add ``extra`` (MS_RDONLY, MS_NOSUID, MS_NODEV) to ``target`` and every mount below it,
    each keeping its other flags: one ``mount_setattr`` (Linux 5.12), else (ENOSYS) a remount
    of each mount the mount table lists there, as bubblewrap does."""
    attr = _MountAttr(sum(bit for ms, bit in MS_TO_ATTR.items() if extra & ms), 0, 0, 0)
    result = libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_long(AT_FDCWD),
        os.fsencode(target),
        ctypes.c_long(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_long(ctypes.sizeof(attr)),
    )
    if result == 0:
        return
    err = ctypes.get_errno()
    if err != errno.ENOSYS or not _MOUNT_SETATTR_FALLBACK:
        raise SetupFailed(f"mount {target}: {os.strerror(err)}")
    _remount_shown(target, extra)


def _remount_shown(target: str, extra: int) -> None:
    """Add ``extra`` to ``target`` and to each mount below it that the mount table lists, by
    path (where two are stacked, the top one), as bubblewrap does."""
    for point in [target, *_below(_mount_points(), target)]:
        _remount(point, extra)


#: Whether :func:`_restrict` may fall back to remounting (cleared only by tests).
_MOUNT_SETATTR_FALLBACK = True


def _mount_points() -> list[str]:
    """Every mount point of our mount namespace, parents first (our own mountinfo)."""
    chunks = []
    try:  # plain descriptors: open()'s io layers cost more than the kernel's work here
        fd = os.open("/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
        try:
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
        finally:
            os.close(fd)
    except OSError as exc:
        raise SetupFailed(f"read the mount table: {exc.strerror}") from None
    lines = b"".join(chunks).split(b"\n")
    return [
        os.fsdecode(_unescape(fields[4]))
        for fields in (line.split(b" ") for line in lines)
        if len(fields) > 4
    ]


def _below(points: list[str], path: str) -> list[str]:
    prefix = path.rstrip("/") + "/"
    return [point for point in points if point.startswith(prefix)]


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
    """A bind remount of ``point`` alone with ``extra`` added to the flags it has."""
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


def _mount_proc(top: str) -> None:
    path = top + "/proc"
    mount("proc", path, "proc", MS_NOSUID | MS_NOEXEC | MS_NODEV)
    for name in PROC_COVERS:  # as bubblewrap: read-only covers where the kernel allows them
        cover = path + "/" + name
        if not os.path.exists(cover):
            continue
        result = libc.mount(
            os.fsencode(cover), os.fsencode(cover), None, ctypes.c_ulong(MS_BIND | MS_REC), None
        )
        if result == 0:
            _restrict(cover, MS_RDONLY | MS_NOSUID | MS_NODEV)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


#: Each capability number as prctl's argument, made once (issue 16: the loop below runs in each
#: session's monitor and pid 1; building the argument and the step's text per call cost them
#: ≈ 0.1 ms each).
_CAP_ARGS = tuple(ctypes.c_ulong(cap) for cap in range(64))


def drop_capabilities(cap_last: int) -> None:
    """Empty the bounding, ambient, inheritable, permitted and effective sets."""
    if cap_last >= len(_CAP_ARGS):  # fail closed on a kernel with more than we know of
        raise SetupFailed(f"drop capability {cap_last}: unknown to the sandbox")
    drop = libc.prctl
    for cap, arg in enumerate(_CAP_ARGS[: cap_last + 1]):
        if drop(PR_CAPBSET_DROP, arg, 0, 0, 0) != 0:
            check(-1, f"drop capability {cap} from the bounding set")
    check(
        libc.prctl(PR_CAP_AMBIENT, ctypes.c_ulong(PR_CAP_AMBIENT_CLEAR_ALL), 0, 0, 0),
        "clear the ambient capabilities",
    )
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    check(libc.capset(ctypes.byref(header), data), "drop every capability")


class _SockFilterProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp(program: bytes) -> None:
    """Install the sandbox's filter (a classic BPF program, ``struct sock_filter`` array)."""
    buffer = ctypes.create_string_buffer(program, len(program))
    prog = _SockFilterProg(len(program) // 8, ctypes.cast(buffer, ctypes.c_void_p))
    check(
        libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(prog), 0, 0),
        "load the seccomp filter",
    )
