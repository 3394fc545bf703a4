"""Unpack a validated bundle into enclave-private storage."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from cape.errors import FormatError
from cape.formats.bundle import BundleLimits, inspect_bundle, open_bundle, read_entry

__all__ = ["unpack_bundle"]


def unpack_bundle(data: bytes, destination: Path, limits: BundleLimits | None = None) -> Path:
    """Validate ``data`` and unpack it into ``destination`` (an empty, private directory).

    Returns the directory holding ``app.py``. Files are created with ``O_EXCL | O_NOFOLLOW``
    below ``destination`` only, and real decompressed sizes are counted against the limits.
    """
    limits = limits or BundleLimits()
    info = inspect_bundle(data, limits)
    destination = destination.resolve()
    budget = limits.max_unpacked_bytes
    with open_bundle(data, limits) as archive:
        for entry in archive.infolist():
            target = destination.joinpath(*PurePosixPath(entry.filename).parts)
            if destination not in target.parents:
                raise FormatError(f"bundle entry {entry.filename!r} escapes the unpack folder")
            if entry.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            content = read_entry(archive, entry, limits, budget)
            budget -= len(content)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
    return destination / info.root if info.root else destination
