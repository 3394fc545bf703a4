"""The sandbox's root and privileges, built from inside by the zygote's child (issue 16).

Loaded by :mod:`cape.enclave.zygote_program` (stdlib only, like it and the worker) and used by
each session's pid 1, which has unshared its namespaces and holds every capability in its own
user namespace: :func:`build_root` makes the mount tree of
:class:`cape.enclave.spawn.Spawn`'s bubblewrap argv in its order (a tmpfs base, ``pivot_root``
into it, the read-only binds with their locked flags kept, symlinks, covered site-packages,
``/proc``, ``/dev``, the size-capped scratch, ``/function``, the worker's files, then the old
root detached and a second ``pivot_root``), :func:`drop_capabilities` empties every capability
set, :func:`load_seccomp` installs the filter. Each system call's errno is checked; a failure
raises :class:`SetupFailed`, whose text is the one line the runtime reports.
"""

from __future__ import annotations

import ctypes
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


def build_root(config: Any, request: Any) -> None:
    """The mount tree of :class:`cape.enclave.spawn.Spawn`'s bubblewrap argv, in its order
    (``config``, ``request``: the zygote program's Config and Request)."""
    mount(None, "/", None, MS_SILENT | MS_SLAVE | MS_REC)
    base = "/tmp"  # noqa: S108 - a mount point in our own mount namespace, as bubblewrap uses
    mount("tmpfs", base, "tmpfs", MS_NODEV | MS_NOSUID)
    try:
        os.chdir(base)
        os.mkdir("newroot", 0o755)
        os.mkdir("oldroot", 0o755)
    except OSError as exc:
        raise SetupFailed(f"prepare the base tmpfs: {exc.strerror}") from None
    check(libc.syscall(config.pivot_root, b".", b"oldroot"), "pivot_root to the base")
    os.chdir("/")
    mount("newroot", "newroot", None, MS_SILENT | MS_BIND | MS_REC)
    _old_points[:] = _mount_points()
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
    _bind_data(PASSWD.encode(), "/etc/passwd", "passwd")
    _bind_data(GROUP.encode(), "/etc/group", "group")
    _remount_ro("/newroot/dev", MS_NOSUID | MS_NODEV)
    _remount_ro("/newroot", MS_NOSUID | MS_NODEV)
    mount("oldroot", "oldroot", None, MS_SILENT | MS_REC | MS_PRIVATE)
    check(libc.umount2(b"oldroot", MNT_DETACH), "detach the old root")
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY)
    try:
        os.chdir("/newroot")
        check(libc.syscall(config.pivot_root, b".", b"."), "pivot_root to the new root")
        os.fchdir(old)
        check(libc.umount2(b".", MNT_DETACH), "detach the base tmpfs")
        os.chdir("/")
    finally:
        os.close(old)


def _ensure_dir(path: str) -> None:
    try:
        try:  # most are one level below a directory that exists: one mkdir, as bubblewrap
            os.mkdir(path, 0o755)
        except FileNotFoundError:
            os.makedirs(path, 0o755, exist_ok=True)
        except FileExistsError:
            if not stat.S_ISDIR(os.stat(path).st_mode):  # as makedirs(exist_ok=True)
                raise
    except OSError as exc:
        raise SetupFailed(f"create {path[len('/newroot') :] or '/'}: {exc.strerror}") from None


def _ensure_file(path: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
    try:
        try:
            fd = os.open(path, flags, 0o444)
        except FileNotFoundError:  # its directory first
            _ensure_dir(os.path.dirname(path))
            fd = os.open(path, flags, 0o444)
        os.close(fd)
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
    for point in _mounts_under(host, target):
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


def _mount_points() -> list[str]:
    """Every mount point of our mount namespace, parents first (our own mountinfo)."""
    chunks = []
    try:  # plain descriptors: open()'s io layers cost more than the kernel's work here
        fd = os.open("/oldroot/proc/self/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
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


#: The mount points of the old root, read once per sandbox after the first pivot: a bind
#: whose source has none below it needs no second look at the mount table (issue 16: reading
#: it once per bind cost ≈ 2 ms of a start).
_old_points: list[str] = []


def _mounts_under(source: str, target: str) -> list[str]:
    """``target`` and every mount below it (the submounts its recursive bind of ``source``
    brought along), parents first."""
    if not _below(_old_points, source):
        return [target]
    return [target, *_below(_mount_points(), target)]


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
        result = libc.mount(
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


def drop_capabilities(cap_last: int) -> None:
    """Empty the bounding, ambient, inheritable, permitted and effective sets."""
    for cap in range(cap_last + 1):
        prctl(PR_CAPBSET_DROP, cap, f"drop capability {cap} from the bounding set")
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
