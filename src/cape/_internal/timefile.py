"""Small helpers every domain needs: aware UTC times and durable directory updates."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

__all__ = ["as_utc", "fsync_dir", "utc_now"]


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
