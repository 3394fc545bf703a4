"""Small helpers every domain needs: aware UTC times and durable file updates."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

__all__ = ["as_utc", "fsync_dir", "utc_now", "write_private"]


def utc_now() -> dt.datetime:
    """The current time as an aware UTC datetime (the default clock everywhere)."""
    return dt.datetime.now(dt.UTC)


def as_utc(moment: dt.datetime, what: str = "time") -> dt.datetime:
    """``moment`` converted to UTC; a naive datetime is a programming error (ValueError)."""
    if moment.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware")
    return moment.astimezone(dt.UTC)


def fsync_dir(path: Path) -> None:
    """fsync a directory, so a rename or link inside it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically (temp, fsync, rename, fsync dir) at ``mode``."""
    temp = path.with_name(f".{path.name}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temp, path)
    fsync_dir(path.parent)
