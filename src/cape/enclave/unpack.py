"""Unpack a validated bundle into enclave-private storage.

Everything said here goes back through the host, so no error names a bundle entry: a refusal
carries :attr:`cape.formats.bundle.BundleError.rule` (the client's own check, run before it
sent the bundle, names the entry), and a file system failure only its errno name.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path, PurePosixPath

from cape.errors import BusyError, FormatError
from cape.formats.bundle import BundleError, BundleLimits, inspect_bundle, open_bundle, read_entry

__all__ = ["check_bundle", "unpack_bundle"]


def check_bundle(data: bytes | memoryview, limits: BundleLimits) -> None:
    """:func:`inspect_bundle`, with refusals that name no entry."""
    try:
        inspect_bundle(data, limits)
    except BundleError as exc:
        raise FormatError(exc.rule) from None


def unpack_bundle(data: bytes, destination: Path, limits: BundleLimits | None = None) -> Path:
    """Validate ``data`` and unpack it into ``destination`` (an empty, private directory).

    Returns the directory holding ``app.py``. Files are created with ``O_EXCL | O_NOFOLLOW``
    below ``destination`` only, and real decompressed sizes are counted against the limits.
    """
    limits = limits or BundleLimits()
    try:
        return _unpack(data, destination, limits)
    except BundleError as exc:
        raise FormatError(exc.rule) from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise BusyError("the enclave's function storage is full; try again later") from None
        name = errno.errorcode.get(exc.errno or 0, "an I/O error")
        raise FormatError(f"bundle refused: it cannot be unpacked ({name})") from None


def _unpack(data: bytes, destination: Path, limits: BundleLimits) -> Path:
    info = inspect_bundle(data, limits)
    destination = destination.resolve()
    budget = limits.max_unpacked_bytes
    with open_bundle(data, limits) as archive:
        for entry in archive.infolist():
            target = destination.joinpath(*PurePosixPath(entry.filename).parts)
            if destination not in target.parents:
                raise BundleError("an entry escapes the unpack folder")
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
