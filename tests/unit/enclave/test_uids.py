"""Sandbox uids nobody else can hold (issue 18, finding 5).

The system files are temp copies (the paths are a seam); the last test starts the real
``cape serve`` with a range that collides with this machine's own files.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_the_pool_hands_out_only_the_configured_range() -> None:
    if os.geteuid() != 0:
        pytest.skip("uids are handed out only to a root runtime")
    pool = UidPool(UidRange(2_100_000_000, 2_100_000_001))
    taken = {pool.acquire(), pool.acquire()}
    assert taken == {2_100_000_000, 2_100_000_001}
    with pytest.raises(RuntimeError, match="no free sandbox uid"):
        pool.acquire()


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
