"""Temp directories named after their process; what dead processes left is swept."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cape._internal.tempdirs import private_tempdir, sweep_stale


def _dead_pid() -> int:
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(child.stdout)


def test_only_dead_processes_directories_of_the_prefix_go(tmp_path: Path) -> None:
    dead = _dead_pid()
    stale = tmp_path / f"cape-x-p{dead}-abc"
    (stale / "inner").mkdir(parents=True)
    (stale / "inner" / "file").write_text("left behind")
    mine = tmp_path / f"cape-x-p{os.getpid()}-def"
    mine.mkdir()
    parents = tmp_path / f"cape-x-p{os.getppid()}-ghi"
    parents.mkdir()
    old_style = tmp_path / "cape-x-12345678"
    old_style.mkdir()
    other_prefix = tmp_path / f"cape-y-p{dead}-jkl"
    other_prefix.mkdir()
    a_file = tmp_path / f"cape-x-p{dead}-file"
    a_file.write_text("not a directory")
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / f"cape-x-p{dead}-link"
    link.symlink_to(target)

    assert sweep_stale("cape-x-", tmp_path) == [stale]
    assert not stale.exists()
    for kept in (mine, parents, old_style, other_prefix, a_file, link, target):
        assert kept.exists() or kept.is_symlink()


def test_private_tempdir_names_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    stale = tmp_path / f"cape-z-p{_dead_pid()}-old"
    stale.mkdir()
    made = private_tempdir("cape-z-")
    assert made.parent == tmp_path and made.name.startswith(f"cape-z-p{os.getpid()}-")
    assert made.stat().st_mode & 0o777 == 0o700
    assert not stale.exists()
