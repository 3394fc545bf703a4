"""Temporary directories that carry their creator's pid, so that what a killed process left
behind can be recognised and removed later.

``cape serve`` killed with SIGKILL cannot clean up: its enclaves' work directories and their
sandboxes' support directories stay in the temp directory. Each is now named
``<prefix>p<pid>-<random>``; before making a new one, directories of that prefix whose
process is gone (and that belong to this user) are removed. A directory of a live process, of
another user, or in another naming scheme is never touched.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["private_tempdir", "sweep_stale"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def sweep_stale(prefix: str, directory: Path | None = None) -> list[Path]:
    """Remove ``<prefix>p<pid>-*`` directories of this user whose process is gone."""
    base = directory or Path(tempfile.gettempdir())
    pattern = re.compile(re.escape(prefix) + r"p(\d+)-[^/]+")
    removed: list[Path] = []
    try:
        candidates = list(base.iterdir())
    except OSError:
        return removed
    for path in candidates:
        match = pattern.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            info = path.lstat()
        except OSError:
            continue
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def private_tempdir(prefix: str) -> Path:
    """A new 0700 temp directory named after this process (stale ones swept first)."""
    sweep_stale(prefix)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}p{os.getpid()}-"))
