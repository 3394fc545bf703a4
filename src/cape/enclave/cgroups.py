"""Whole-function limits: one cgroup per sandbox, on cgroup v2 or the v1 hierarchies.

``RLIMIT_AS`` counts one process: three forked children each get the whole allowance. A cgroup
counts them together, tmpfs pages the function writes included, so each sandbox gets its own
with a memory limit (swap included where the kernel accounts it), a pids limit and a CPU
quota. One small interface, two back ends:

- **v2** (``cgroup.controllers`` lists memory, pids and cpu): ``memory.max``,
  ``memory.swap.max`` = 0, ``pids.max``, ``cpu.max``; ``memory.events`` counts OOM kills and
  ``cgroup.kill`` ends every process at once.
- **v1** (the "hybrid" layout with ``/sys/fs/cgroup/{memory,pids,cpu}``):
  ``memory.limit_in_bytes`` and ``memory.memsw.limit_in_bytes`` when swap is accounted,
  ``pids.max``, ``cpu.cfs_quota_us``/``cpu.cfs_period_us``; ``memory.oom_control`` counts OOM
  kills, and ending the sandbox's pid namespace (what the sandbox does anyway) ends them all.

Sandbox groups are created below this process's own cgroup (``/proc/self/cgroup``) in a
``cape-sandboxes-<pid>`` directory, so the machine's own accounting still covers them. On v2,
when this process's cgroup cannot delegate the controllers (it holds processes itself), the
hierarchy's root is used instead. :func:`detect` returns ``None`` and a reason when none of
this is possible; the sandbox then relies on per-process rlimits alone, and says so.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import itertools
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CgroupLimits", "Cgroups", "SandboxCgroup", "detect", "shared"]

_CONTROLLERS = ("memory", "pids", "cpu")
_CPU_PERIOD_US = 100_000
_KILL_TIMEOUT_S = 5.0
_CREATE_ATTEMPTS = 1000


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    processes: int
    cpu_cores: float


class SandboxCgroup:
    """One sandbox's cgroup (a directory per hierarchy: one on v2, three on v1)."""

    def __init__(self, version: int, directories: dict[str, Path]) -> None:
        self.version = version
        self._dirs = directories  # controller -> directory (v2: the same one for all)
        # As plain strings, each directory once: a session makes, fills, reads and removes
        # its group through ≈ 20 paths, and pathlib's joins cost more than the kernel's work
        # on most of them (issue 16).
        self._paths = {controller: os.fspath(path) for controller, path in directories.items()}
        self._unique = list(dict.fromkeys(self._paths.values()))

    def _write(self, controller: str, name: str, value: str) -> None:
        _write(f"{self._paths[controller]}/{name}", value)

    def _read(self, controller: str, name: str) -> str:
        return _read(f"{self._paths[controller]}/{name}")

    def apply(self, limits: CgroupLimits) -> None:
        quota = max(1000, int(limits.cpu_cores * _CPU_PERIOD_US))
        if self.version == 2:
            self._write("memory", "memory.max", str(limits.memory_bytes))
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: nothing to cap
                self._write("memory", "memory.swap.max", "0")
            self._write("pids", "pids.max", str(limits.processes))
            self._write("cpu", "cpu.max", f"{quota} {_CPU_PERIOD_US}")
            return
        self._write("memory", "memory.limit_in_bytes", str(limits.memory_bytes))
        with contextlib.suppress(FileNotFoundError):  # swap accounting is optional in v1
            self._write("memory", "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
        self._write("pids", "pids.max", str(limits.processes))
        self._write("cpu", "cpu.cfs_period_us", str(_CPU_PERIOD_US))
        self._write("cpu", "cpu.cfs_quota_us", str(quota))

    def add(self, pid: int) -> None:
        """Move ``pid`` (before it runs anything of the function's) into every hierarchy."""
        for directory in self._unique:
            _write(f"{directory}/cgroup.procs", str(pid))

    def open_procs(self) -> list[int]:
        """One write descriptor of ``cgroup.procs`` per hierarchy, opened by us (root): a
        process given them joins the group itself by writing ``0`` (the sandbox zygote's
        children, before they drop privileges). The caller closes them."""
        fds: list[int] = []
        try:
            for directory in self._unique:
                fds.append(os.open(f"{directory}/cgroup.procs", os.O_WRONLY | os.O_CLOEXEC))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return fds

    def pids(self) -> list[int]:
        found: set[int] = set()
        for directory in self._unique:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in _read(f"{directory}/cgroup.procs").split())
        return sorted(found)

    def oom_kills(self) -> int:
        """How many processes the kernel killed for the memory limit."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = self._read("memory", name)
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def memory_peak(self) -> int:
        """The most memory the group held at once, in bytes (0 when the kernel cannot say)."""
        name = "memory.peak" if self.version == 2 else "memory.max_usage_in_bytes"
        try:
            return int(self._read("memory", name).split()[0])
        except (OSError, ValueError, IndexError):
            return 0

    def kill(self) -> None:
        """SIGKILL every process in the group and wait (bounded) until none is left."""
        deadline = time.monotonic() + _KILL_TIMEOUT_S
        if self.version == 2:
            with contextlib.suppress(OSError):
                self._write("memory", "cgroup.kill", "1")
        while (pids := self.pids()) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.01)

    def remove(self) -> None:
        """Kill what is left and remove the directories (idempotent)."""
        self.kill()
        for directory in self._unique:
            with contextlib.suppress(FileNotFoundError):
                _rmdir_retrying(directory)


# Plain descriptors, not Path.write_text/read_text: a sandbox's cgroup takes ≈17 of these (v1)
# per session, and the text-file layers cost more than the kernel's work on these files.
def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)  # as "w"
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _rmdir_retrying(directory: str) -> None:
    # A killed process leaves its cgroup a moment after it is reaped.
    for _ in range(100):
        try:
            os.rmdir(directory)
            return
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise
            time.sleep(0.01)


class Cgroups:
    """Makes sandbox cgroups under one parent per hierarchy (see the module docstring)."""

    def __init__(self, version: int, parents: dict[str, Path]) -> None:
        self.version = version
        self._parents = parents
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def describe(self) -> str:
        where = ", ".join(sorted({str(p) for p in self._parents.values()}))
        return f"cgroup v{self.version} ({where})"

    def create(self, limits: CgroupLimits) -> SandboxCgroup:
        # A name may be taken already: a runtime killed before its exit handler left its
        # groups behind, and a later process with the same pid got its parents (issue 16: the
        # benchmark's runs failed with "File exists"). Such a name is skipped, not reused.
        for _ in range(_CREATE_ATTEMPTS):
            with self._lock:
                name = f"s{next(self._ids)}"
            directories = {ctl: parent / name for ctl, parent in self._parents.items()}
            made: list[str] = []
            try:
                for directory in dict.fromkeys(os.fspath(path) for path in directories.values()):
                    os.mkdir(directory)
                    made.append(directory)
                group = SandboxCgroup(self.version, directories)
                group.apply(limits)
            except BaseException as exc:
                for directory in made:
                    with contextlib.suppress(OSError):
                        os.rmdir(directory)
                if isinstance(exc, FileExistsError):
                    continue
                raise
            return group
        raise FileExistsError(errno.EEXIST, f"{_CREATE_ATTEMPTS} sandbox cgroup names taken")

    def close(self) -> None:
        """Remove the parents (sandboxes remove their own groups first)."""
        for parent in dict.fromkeys(self._parents.values()):
            for child in parent.glob("s*"):
                if child.is_dir():
                    SandboxCgroup(self.version, {c: child for c in _CONTROLLERS}).remove()
            with contextlib.suppress(OSError):
                parent.rmdir()


def _own_paths(proc_cgroup: Path) -> dict[str, str]:
    """Controller (or ``""`` for v2) → this process's cgroup path, from /proc/self/cgroup."""
    paths: dict[str, str] = {}
    for line in proc_cgroup.read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            paths[name] = path
    return paths


def _v2_parent(root: Path, own: str) -> Path | None:
    """A v2 directory whose children can have memory, pids and cpu, or None."""
    wanted = set(_CONTROLLERS)
    for candidate in (root / own.lstrip("/"), root):
        try:
            if not wanted <= set((candidate / "cgroup.controllers").read_text().split()):
                continue
            enabled = set((candidate / "cgroup.subtree_control").read_text().split())
            if not wanted <= enabled:
                # EBUSY when the cgroup holds processes (v2's "no internal processes" rule).
                (candidate / "cgroup.subtree_control").write_text(
                    " ".join(f"+{c}" for c in sorted(wanted - enabled))
                )
        except OSError:
            continue
        return candidate
    return None


def detect(
    root: Path = Path("/sys/fs/cgroup"),
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    *,
    create: bool = True,
) -> tuple[Cgroups | None, str]:
    """This machine's cgroups for sandboxes, or ``(None, why not)``.

    Creates this process's ``cape-sandboxes-<pid>`` parents (removed at exit); with
    ``create=False`` only checks that it could (for start-up banners of other processes).
    """
    try:
        own = _own_paths(proc_cgroup)
    except (OSError, ValueError):
        return None, "cannot read /proc/self/cgroup"
    name = f"cape-sandboxes-{os.getpid()}"
    parents: dict[str, Path] = {}
    version = 0
    if all((root / ctl / "cgroup.procs").exists() for ctl in _CONTROLLERS):
        version = 1
        for ctl in _CONTROLLERS:
            parents[ctl] = root / ctl / own.get(ctl, "/").lstrip("/") / name
    else:
        base = None
        if (root / "cgroup.controllers").exists():
            base = _v2_parent(root, own.get("", "/"))
        if base is None:
            return None, (
                f"no cgroup v2 with the memory, pids and cpu controllers at {root} and no "
                "v1 memory, pids and cpu hierarchies"
            )
        version = 2
        parents = {ctl: base / name for ctl in _CONTROLLERS}
    if not create:
        writable = all(os.access(p.parent, os.W_OK) for p in parents.values())
        if not writable:
            return None, f"cannot create cgroups under {next(iter(parents.values())).parent}"
        return Cgroups(version, parents), ""
    made: list[Path] = []
    try:
        for parent in dict.fromkeys(parents.values()):
            parent.mkdir(exist_ok=True)
            made.append(parent)
        if version == 2:
            (parents["memory"] / "cgroup.subtree_control").write_text("+memory +pids +cpu")
    except OSError as exc:
        for parent in made:
            with contextlib.suppress(OSError):
                parent.rmdir()
        return None, f"cannot create sandbox cgroups ({exc.strerror or exc})"
    cgroups = Cgroups(version, parents)
    atexit.register(cgroups.close)
    return cgroups, ""


_shared_lock = threading.Lock()
_shared: list[tuple[Cgroups | None, str]] = []


def shared() -> tuple[Cgroups | None, str]:
    """:func:`detect` once per process (root only: others cannot write cgroups here)."""
    with _shared_lock:
        if not _shared:
            if os.geteuid() != 0:
                _shared.append((None, "the enclave runtime is not root"))
            elif not Path("/sys/fs/cgroup").is_dir():
                _shared.append((None, "no /sys/fs/cgroup"))
            else:
                _shared.append(detect())
        return _shared[0]
