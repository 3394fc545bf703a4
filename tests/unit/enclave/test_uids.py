"""Sandbox uids nobody else can hold (issue 18, finding 5).

The system files are temp copies (the paths are a seam); the last test starts the real
``cape serve`` with a range that collides with this machine's own files.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cape.enclave import uids as uids_module
from cape.enclave.uids import (
    DEFAULT_RANGE,
    SystemFiles,
    UidPool,
    UidRange,
    UidRangeError,
    check_range,
    parse_range,
)

# What a Debian machine with two accounts holds (useradd gave each 65,536 subordinate ids).
PASSWD = "root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/bash\n"
GROUP = "root:x:0:\nalice:x:1000:\n"
SUBUID = "alice:100000:65536\nbob:165536:65536\n"
LOGIN_DEFS = """# comment
UID_MIN			 1000
UID_MAX			60000
SYS_UID_MIN		  101
SUB_UID_MIN		   100000
SUB_UID_MAX		600100000
SUB_UID_COUNT		    65536
"""


@pytest.fixture
def files(tmp_path: Path) -> SystemFiles:
    paths = SystemFiles(
        passwd=tmp_path / "passwd",
        group=tmp_path / "group",
        subuid=tmp_path / "subuid",
        subgid=tmp_path / "subgid",
        login_defs=tmp_path / "login.defs",
    )
    paths.passwd.write_text(PASSWD)
    paths.group.write_text(GROUP)
    paths.subuid.write_text(SUBUID)
    paths.subgid.write_text(SUBUID)
    paths.login_defs.write_text(LOGIN_DEFS)
    return paths


def test_the_old_hard_coded_range_is_refused(files: SystemFiles) -> None:
    # 200000-249999 was the built-in range before: it lies inside bob's subordinate uids.
    with pytest.raises(UidRangeError, match=r"subuid \(bob: 165536-231071\)"):
        check_range(UidRange(200_000, 249_999), files)


def test_the_default_range_is_outside_everything_handed_out(files: SystemFiles) -> None:
    check_range(DEFAULT_RANGE, files)
    assert DEFAULT_RANGE.start > 600_100_000 + 65_536


@pytest.mark.parametrize(
    ("uids", "named"),
    [
        (UidRange(0, 10), r"passwd \(root: 0\)"),
        (UidRange(1000, 1000), r"passwd \(alice: 1000\)"),
        (UidRange(500_000, 500_000), r"login.defs \(SUB_UID_MIN-SUB_UID_MAX: 100000-600100000\)"),
        (UidRange(600_000_000, 700_000_000), "login.defs"),
        (UidRange(500, 900), r"login.defs \(SYS_UID_MIN-UID_MAX: 101-60000\)"),
    ],
)
def test_overlaps_name_the_file_and_range(files: SystemFiles, uids: UidRange, named: str) -> None:
    with pytest.raises(UidRangeError, match=named) as info:
        check_range(uids, files)
    assert "\n" not in info.value.diagnostics()


def test_a_later_allocation_is_foreseen_from_login_defs(files: SystemFiles) -> None:
    files.login_defs.write_text("SUB_UID_MAX 3000000000\n")
    with pytest.raises(UidRangeError, match="SUB_UID_MIN-SUB_UID_MAX: 100000-3000000000"):
        check_range(DEFAULT_RANGE, files)
    files.login_defs.unlink()  # absent: shadow's own defaults still apply
    with pytest.raises(UidRangeError, match="100000-600100000"):
        check_range(UidRange(300_000, 300_001), files)
    check_range(DEFAULT_RANGE, files)


def test_a_subgid_or_group_overlap_is_refused(files: SystemFiles) -> None:
    files.login_defs.write_text("")
    files.subgid.write_text("carol:2000000100:10\n")
    with pytest.raises(UidRangeError, match=r"subgid \(carol: 2000000100-2000000109\)"):
        check_range(DEFAULT_RANGE, files)
    files.subgid.write_text("")
    files.group.write_text("odd:x:2000000001:\n")
    with pytest.raises(UidRangeError, match="group"):
        check_range(DEFAULT_RANGE, files)


@pytest.mark.parametrize("text", ["", "abc", "5", "10-5", "1-99999999999", "-1-5"])
def test_bad_range_text_is_one_clear_error(text: str) -> None:
    with pytest.raises(UidRangeError, match=r"START-END|not a range"):
        parse_range(text)


def test_the_pool_hands_out_only_the_configured_range(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("uids are handed out only to a root runtime")
    # Its own lock folder: the host's is shared with every runtime (and test run) on the machine.
    pool = UidPool(UidRange(2_100_000_000, 2_100_000_001), lock_dir=tmp_path / "locks")
    taken = {pool.acquire(), pool.acquire()}
    try:
        assert taken == {2_100_000_000, 2_100_000_001}
        with pytest.raises(RuntimeError, match="no free sandbox uid"):
            pool.acquire()
    finally:
        for uid in taken:
            if uid is not None:
                pool.release(uid)


def test_cape_serve_refuses_a_colliding_range_at_start(tmp_path: Path) -> None:
    # Real files of this machine: uid 0 is root's in /etc/passwd everywhere.
    result = subprocess.run(
        [
            *(sys.executable, "-m", "cape", "serve", "--data-dir", str(tmp_path / "data")),
            *("--port", "0", "--sandbox-uids", "0-100"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "CAPE_CONFIG_DIR": str(tmp_path / "config")},
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "Error: the sandbox uid range 0-100 overlaps /etc/passwd (root: 0); choose a free "
        "range with --sandbox-uids START-END (default 2000000000-2000049999)"
    ]
    assert not (tmp_path / "data").exists()  # refused before anything was created


# --- lock files: runtimes on one host, and what a crashed one leaves (issue 16) ----------------

# A second runtime, as a real process: takes a uid from the range, optionally starts a process
# as that uid (a sandbox it will leave behind), prints both and waits to be killed.
HOLDER = """
import os, subprocess, sys, time
from pathlib import Path
from cape.enclave.uids import UidPool, UidRange
pool = UidPool(UidRange(int(sys.argv[1]), int(sys.argv[2])), lock_dir=Path(sys.argv[3]))
uid = pool.acquire()
pid = 0
if sys.argv[4] == "leftover":
    pid = subprocess.Popen(
        ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "sleep", "600"],
        start_new_session=True,
    ).pid
    deadline = time.monotonic() + 30
    while os.stat(f"/proc/{pid}").st_uid != uid:  # setpriv switches after its exec
        assert time.monotonic() < deadline, "setpriv did not switch"
        time.sleep(0.01)
print(uid, pid, flush=True)
time.sleep(600)
"""
LOCK_UIDS = UidRange(2_100_000_010, 2_100_000_011)


def _root_only() -> None:
    if os.geteuid() != 0:
        pytest.skip("uids are handed out only to a root runtime")


class Holder:
    def __init__(self, uids: UidRange, lock_dir: Path, mode: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(uids.start), str(uids.end), str(lock_dir), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        uid_text, pid_text = self.process.stdout.readline().split()
        self.uid, self.leftover = int(uid_text), int(pid_text)

    def crash(self) -> None:
        self.process.kill()  # SIGKILL: no release, its lock goes with its descriptors
        self.process.wait(30)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def kill_leftover(self) -> None:
        if self.leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leftover, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while Path(f"/proc/{self.leftover}").exists() and time.monotonic() < deadline:
                # a zombie until init reaps it: its uid is still on /proc/PID
                time.sleep(0.05)


@pytest.fixture
def scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the /proc scans acquire makes (the real scan still runs)."""
    counted: list[int] = []
    real = uids_module._uids_with_processes

    def counting() -> set[int]:
        counted.append(1)
        return real()

    monkeypatch.setattr(uids_module, "_uids_with_processes", counting)
    return counted


def test_two_runtimes_on_one_host_never_share_a_uid(tmp_path: Path) -> None:
    _root_only()
    other = Holder(LOCK_UIDS, tmp_path / "locks", "hold")  # holds a uid, no process yet
    try:
        ours = UidPool(LOCK_UIDS, lock_dir=tmp_path / "locks")
        for _ in range(8):  # the pool starts at a random place in the range each time
            uid = ours.acquire()
            assert uid is not None and uid != other.uid
            ours.release(uid, vacated=True)
        only_theirs = UidPool(UidRange(other.uid, other.uid), lock_dir=tmp_path / "locks")
        with pytest.raises(RuntimeError, match="no free sandbox uid"):
            only_theirs.acquire()
    finally:
        other.crash()
    assert only_theirs.acquire() == other.uid  # its lock went with it, and nothing runs as it


def test_a_crashed_runtimes_leftover_process_keeps_its_uid_taken(
    tmp_path: Path, scans: list[int]
) -> None:
    _root_only()
    crashed = Holder(LOCK_UIDS, tmp_path / "locks", "leftover")
    try:
        crashed.crash()
        assert (tmp_path / "locks" / str(crashed.uid)).read_bytes().startswith(b"held")
        pool = UidPool(UidRange(crashed.uid, crashed.uid), lock_dir=tmp_path / "locks")
        with pytest.raises(RuntimeError, match="no free sandbox uid"):
            pool.acquire()  # no lock holds it, but a process of the uid still runs
        assert scans == [1]
    finally:
        crashed.kill_leftover()
    uid = pool.acquire()
    assert uid == crashed.uid
    pool.release(uid, vacated=True)


def test_only_a_clean_release_spares_the_next_scan(tmp_path: Path, scans: list[int]) -> None:
    _root_only()
    pool = UidPool(UidRange(LOCK_UIDS.start, LOCK_UIDS.start), lock_dir=tmp_path / "locks")
    uid = pool.acquire()
    assert uid == LOCK_UIDS.start
    assert scans == [1]  # a new lock file vouches for nothing
    pool.release(uid)  # not vacated: e.g. a start that failed half-way
    uid = pool.acquire()
    assert scans == [1, 1]
    pool.release(uid, vacated=True)
    assert pool.acquire() == uid
    assert scans == [1, 1]  # the clean release vouched: no scan
    pool.release(uid, vacated=True)
    # A lock directory others may write to vouches for nothing: back to a scan every time.
    (tmp_path / "open").mkdir(mode=0o777)
    (tmp_path / "open").chmod(0o777)
    (tmp_path / "open" / str(uid)).write_bytes(b"vacated")
    loose = UidPool(UidRange(LOCK_UIDS.start, LOCK_UIDS.start), lock_dir=tmp_path / "open")
    assert loose.acquire() == uid
    assert scans == [1, 1, 1]


def test_a_runtimes_sessions_reuse_the_uids_it_vacated_without_a_scan(
    tmp_path: Path, scans: list[int]
) -> None:
    _root_only()
    pool = UidPool(UidRange(2_100_000_020, 2_100_049_999), lock_dir=tmp_path / "locks")
    first = pool.acquire()
    second = pool.acquire()
    assert len(scans) == 2  # new lock files: each scanned once
    pool.release(first, vacated=True)
    pool.release(second, vacated=True)
    for _ in range(10):  # sessions one after another, then two at once
        uid = pool.acquire()
        pool.release(uid, vacated=True)
        both = pool.acquire(), pool.acquire()
        assert set(both) == {first, second}
        for taken in both:
            pool.release(taken, vacated=True)
    assert len(scans) == 2
    assert len(list((tmp_path / "locks").iterdir())) == 2  # files for the uids used, no more
