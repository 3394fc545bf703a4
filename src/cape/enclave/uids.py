"""Host uids for sandboxes: a range nobody else on the machine can hold, now or later.

A sandbox runs as one host uid of its own (its user namespace's root maps to it). Whoever
holds that uid, or a subordinate-uid range covering it, owns the sandbox's user namespace and
can read everything in it (``/proc/<pid>/cwd``, ``mem``, the function's files). So the range
must lie outside every range the system hands out:

- the uids and gids of ``/etc/passwd`` and ``/etc/group`` (the sandbox's gid equals its uid);
- the subordinate ranges of ``/etc/subuid`` and ``/etc/subgid``;
- what ``useradd`` may allocate later, from ``/etc/login.defs``: ``SYS_UID_MIN``-``UID_MAX``,
  ``SYS_GID_MIN``-``GID_MAX``, ``SUB_UID_MIN``-``SUB_UID_MAX`` and ``SUB_GID_MIN``-
  ``SUB_GID_MAX`` (shadow's defaults when a key is absent; Debian's reach 600,100,000).

:data:`DEFAULT_RANGE` starts at two thousand million, above all of those and below systemd's
reserved ranges near 2^31. :func:`check_range` runs at every ``cape serve`` start and names
the file and the overlapping range; the files are parameters (a seam for tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import re
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cape.errors import CapeError

__all__ = [
    "DEFAULT_RANGE",
    "LOCK_DIR",
    "SYSTEM_FILES",
    "UidPool",
    "UidRange",
    "UidRangeError",
    "check_range",
    "parse_range",
]

#: The highest uid this module hands out (``(uid_t) -1`` and -2 mean "none"/"nobody").
_MAX_UID = (1 << 32) - 3


class UidRangeError(CapeError):
    """The sandbox uid range is malformed or overlaps a range the system hands out."""


@dataclass(frozen=True)
class UidRange:
    """``start``-``end``, both included."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end <= _MAX_UID:
            raise UidRangeError(f"sandbox uid range {self} is not a range of valid uids")

    def __str__(self) -> str:
        return f"{self.start}-{self.end}"

    def __len__(self) -> int:
        return self.end - self.start + 1

    def overlaps(self, other: UidRange) -> bool:
        return self.start <= other.end and other.start <= self.end


#: 50,000 uids from 2,000,000,000: a sandbox each, far above what useradd hands out.
DEFAULT_RANGE = UidRange(2_000_000_000, 2_000_049_999)


def parse_range(text: str) -> UidRange:
    """``START-END`` (decimal, both included), as ``cape serve --sandbox-uids`` takes it."""
    found = re.fullmatch(r"\s*(\d{1,10})\s*-\s*(\d{1,10})\s*", text)
    if found is None:
        raise UidRangeError(
            f"sandbox uid range {text[:40]!r} is not START-END (e.g. {DEFAULT_RANGE})"
        )
    return UidRange(int(found[1]), int(found[2]))


@dataclass(frozen=True)
class SystemFiles:
    """Where the system's uid allocations are written down (paths are a seam for tests)."""

    passwd: Path = Path("/etc/passwd")
    group: Path = Path("/etc/group")
    subuid: Path = Path("/etc/subuid")
    subgid: Path = Path("/etc/subgid")
    login_defs: Path = Path("/etc/login.defs")


SYSTEM_FILES = SystemFiles()

# shadow's built-in defaults for the login.defs keys (useradd(8), login.defs(5)).
_LOGIN_DEFAULTS = {
    "SYS_UID_MIN": 101,
    "UID_MAX": 60000,
    "SYS_GID_MIN": 101,
    "GID_MAX": 60000,
    "SUB_UID_MIN": 100000,
    "SUB_UID_MAX": 600100000,
    "SUB_GID_MIN": 100000,
    "SUB_GID_MAX": 600100000,
}
_LOGIN_RANGES = (
    ("SYS_UID_MIN", "UID_MAX"),
    ("SYS_GID_MIN", "GID_MAX"),
    ("SUB_UID_MIN", "SUB_UID_MAX"),
    ("SUB_GID_MIN", "SUB_GID_MAX"),
)


def _lines(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UidRangeError(
            f"cannot read {path} to check the sandbox uid range: {exc.strerror}"
        ) from None
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def _account_ids(path: Path) -> Iterator[tuple[str, UidRange]]:
    """``name:x:ID:...`` lines (passwd, group): each id as a one-uid range."""
    for line in _lines(path):
        fields = line.split(":")
        if len(fields) >= 3 and fields[2].isdigit():
            yield f"{fields[0]}: {fields[2]}", UidRange(int(fields[2]), int(fields[2]))


def _subordinate(path: Path) -> Iterator[tuple[str, UidRange]]:
    """``name:start:count`` lines (subuid, subgid)."""
    for line in _lines(path):
        fields = line.split(":")
        if len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit() and int(fields[2]):
            start, count = int(fields[1]), int(fields[2])
            end = min(start + count - 1, _MAX_UID)
            yield f"{fields[0]}: {start}-{end}", UidRange(min(start, end), end)


def _login_defs(path: Path) -> Iterator[tuple[str, UidRange]]:
    values = dict(_LOGIN_DEFAULTS)
    for line in _lines(path):
        key, _, value = line.partition(" ")
        key, value = key.strip(), value.strip()
        if key in values and value.isdigit():
            values[key] = int(value)
    for low, high in _LOGIN_RANGES:
        start, end = values[low], min(values[high], _MAX_UID)
        if start <= end:
            yield f"{low}-{high}: {start}-{end}", UidRange(start, end)


def check_range(uids: UidRange, files: SystemFiles = SYSTEM_FILES) -> None:
    """Raise :class:`UidRangeError` naming the file and range when ``uids`` overlaps one."""
    sources = (
        (files.passwd, _account_ids(files.passwd)),
        (files.group, _account_ids(files.group)),
        (files.subuid, _subordinate(files.subuid)),
        (files.subgid, _subordinate(files.subgid)),
        (files.login_defs, _login_defs(files.login_defs)),
    )
    for path, entries in sources:
        for what, taken in entries:
            if uids.overlaps(taken):
                raise UidRangeError(
                    f"the sandbox uid range {uids} overlaps {path} ({what}); choose a free "
                    f"range with --sandbox-uids START-END (default {DEFAULT_RANGE})"
                )


#: Where every runtime on the host keeps a lock file per sandbox uid it holds (see UidPool).
LOCK_DIR = Path("/run/cape-sandbox-uids")
_VACATED = b"vacated"  # a clean release: no process of the uid was left
_HELD = b"held...."  # same length: a holder (live, or one that died without releasing)
_TAKEN = -1


class UidPool:
    """One host uid per live sandbox; ``None`` when the runtime is not root (no switch).

    Runtimes on one host share the uid range (each ``cape serve`` enclave is one), so a uid
    is free only when no other runtime holds it and no process runs as it (a crashed
    runtime's leftovers). Each runtime holds an ``flock`` on ``LOCK_DIR/<uid>`` while its
    sandbox lives, which another runtime's ``acquire`` cannot take, and marks the file
    *held*; :meth:`release` with ``vacated=True`` (the sandbox was reaped: its pid namespace,
    and every process in it, is gone) marks it *vacated* before unlocking. A uid whose file
    says *vacated* is handed out without looking further; any other (a new file, or *held*
    left by a runtime that died, its lock gone with it) only when a scan of ``/proc`` finds
    no process of that uid (issue 16: the scan, ≈0.4 ms, ran at every start before). A pool
    tries the uids it vacated itself first, then the range in order. Where
    ``LOCK_DIR`` cannot be used (missing ``/run``, not root-owned and closed to others), every
    acquire scans, as before.
    """

    def __init__(self, uids: UidRange = DEFAULT_RANGE, *, lock_dir: Path = LOCK_DIR) -> None:
        self._lock = threading.Lock()
        self._in_use: dict[int, int | None] = {}  # uid -> its lock file's descriptor
        self._lock_dir = lock_dir
        self._lock_dir_ok: bool | None = None  # checked once, at the first acquire
        self._vacated: list[int] = []  # released clean by this pool: tried first
        self.range = uids

    def configure(self, uids: UidRange) -> None:
        with self._lock:
            self.range = uids

    def acquire(self) -> int | None:
        if os.geteuid() != 0:
            return None  # cannot switch: bubblewrap runs as us (see cape.enclave.sandbox)
        with self._lock:
            locking = self._usable_lock_dir()
            busy: set[int] | None = None
            for uid in self._candidates(locking):
                if uid in self._in_use:
                    continue
                fd = self._lock_uid(uid) if locking else None
                if fd == _TAKEN:
                    continue  # another runtime's sandbox holds it
                if fd is None or os.pread(fd, len(_VACATED), 0) != _VACATED:
                    if busy is None:
                        busy = _uids_with_processes()
                    if uid in busy:
                        if fd is not None:
                            os.close(fd)  # stays "held": the next acquirer scans too
                        continue
                if fd is not None:
                    os.pwrite(fd, _HELD, 0)
                self._in_use[uid] = fd
                return uid
        raise RuntimeError("no free sandbox uid")

    def _candidates(self, locking: bool) -> Iterator[int]:
        """With lock files: the uids this pool vacated, latest first (their files vouch for
        them: no scan), then the range in order, so that files for few uids ever exist.
        Without: the range from a random place, as before (runtimes then rarely race)."""
        base, count = self.range.start, len(self.range)
        if locking:
            while self._vacated:
                uid = self._vacated.pop()
                if base <= uid <= self.range.end:
                    yield uid
            yield from range(base, base + count)
            return
        start = random.randrange(count)  # noqa: S311 - not a secret
        for i in range(count):
            yield base + (start + i) % count

    def release(self, uid: int | None, *, vacated: bool = False) -> None:
        """Give ``uid`` back; ``vacated=True`` vouches that no process of it is left."""
        with self._lock:
            fd = self._in_use.pop(uid if uid is not None else -1, None)
        if fd is None or uid is None:
            return
        marked = False
        with contextlib.suppress(OSError):
            if vacated:
                marked = os.pwrite(fd, _VACATED, 0) == len(_VACATED)
        os.close(fd)  # the flock goes with it
        if marked:
            with self._lock:
                self._vacated.append(uid)

    def _usable_lock_dir(self) -> bool:
        """Create ``LOCK_DIR`` (root's, 0700) once; False when it is missing or open to others."""
        if self._lock_dir_ok is None:
            with contextlib.suppress(FileExistsError, OSError):
                self._lock_dir.mkdir(mode=0o700)
            try:
                info = os.lstat(self._lock_dir)
            except OSError:
                self._lock_dir_ok = False
            else:
                self._lock_dir_ok = (
                    stat.S_ISDIR(info.st_mode) and info.st_uid == 0 and not info.st_mode & 0o077
                )
        return self._lock_dir_ok

    def _lock_uid(self, uid: int) -> int | None:
        """A descriptor holding ``uid``'s lock file; ``_TAKEN`` while another holds it;
        None when the file cannot be locked (then the scan alone decides, as before)."""
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(self._lock_dir / str(uid), flags, 0o600)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return _TAKEN
        except BaseException:
            os.close(fd)
            raise
        return fd


def _uids_with_processes() -> set[int]:
    uids = set()
    with contextlib.suppress(OSError), os.scandir("/proc") as entries:
        for entry in entries:
            if entry.name.isdigit():
                with contextlib.suppress(OSError):
                    uids.add(entry.stat().st_uid)
    return uids
