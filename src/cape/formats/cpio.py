"""Deterministic ``newc`` cpio archives, the format of an enclave image's ramdisks.

The Linux initramfs loader reads "new ASCII" (``070701``) cpio: per entry a 110-byte header of
thirteen 8-digit hex fields (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor,
rdevmajor, rdevminor, namesize, check), the NUL-terminated name padded to 4 bytes, then the
data padded to 4 bytes; a ``TRAILER!!!`` entry ends the archive
(``Documentation/driver-api/early-userspace/buffer-format.rst``).

So that the same inputs give the same bytes, :func:`write_newc` fixes everything a build
machine could leak: names sorted bytewise, inode numbers counted 1, 2, 3… in that order (never
the build disk's), ``uid``/``gid`` 0, ``mtime`` 0, ``nlink`` 2 for directories and 1 for the
rest, device numbers 0 except a device node's own ``rdev``. Modes are normalized by the
caller (:mod:`cape.image.tree`); this module writes what it is given.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

from cape.errors import FormatError

__all__ = ["MAGIC", "TRAILER", "CpioEntry", "write_newc"]

MAGIC = b"070701"
TRAILER = "TRAILER!!!"
HEADER_BYTES = 110
_CHUNK = 1 << 20


class Writer(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


@dataclass(frozen=True)
class CpioEntry:
    """One archive member.

    ``name`` is relative (no leading ``/``), ``mode`` holds the file type bits and the
    permissions. ``size`` and ``open`` describe a regular file's content (``open`` returns a
    fresh binary stream); a symlink's target goes in ``link``; a device node's number in
    ``rdev`` as ``(major, minor)``.
    """

    name: str
    mode: int
    size: int = 0
    open: Callable[[], BinaryIO] | None = None
    link: str = ""
    rdev: tuple[int, int] = (0, 0)

    def __post_init__(self) -> None:
        if not self.name or self.name.startswith("/") or "\0" in self.name:
            raise FormatError(f"cpio member name {self.name!r} must be relative and non-empty")
        if ".." in self.name.split("/"):
            raise FormatError(f"cpio member name {self.name!r} must not contain '..'")


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(ino: int, entry: CpioEntry, size: int, name: bytes) -> bytes:
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (ino, entry.mode, 0, 0, nlink, 0, size, 0, 0, *entry.rdev, len(name) + 1, 0)
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise FormatError(f"cpio member {entry.name!r}: a field does not fit 32 bits")
    return MAGIC + b"".join(b"%08X" % value for value in fields)


def _chunks(entry: CpioEntry) -> Iterator[bytes]:
    if stat.S_ISLNK(entry.mode):
        yield entry.link.encode("utf-8", "surrogateescape")
        return
    if not stat.S_ISREG(entry.mode) or entry.size == 0:
        return
    if entry.open is None:
        raise FormatError(f"cpio member {entry.name!r} has a size but no content")
    remaining = entry.size
    with entry.open() as source:
        while remaining:
            chunk = source.read(min(_CHUNK, remaining))
            if not chunk:
                raise FormatError(f"{entry.name!r} shrank while it was archived")
            remaining -= len(chunk)
            yield chunk
        if source.read(1):
            raise FormatError(f"{entry.name!r} grew while it was archived")


def write_newc(out: Writer, entries: Iterable[CpioEntry]) -> int:
    """Write ``entries`` (sorted here by name) and the trailer; return the bytes written."""
    ordered = sorted(entries, key=lambda e: e.name.encode("utf-8", "surrogateescape"))
    names = [e.name for e in ordered]
    if len(set(names)) != len(names):
        raise FormatError("cpio archive has duplicate member names")
    written = 0
    for ino, entry in enumerate(ordered, start=1):
        name = entry.name.encode("utf-8", "surrogateescape")
        if stat.S_ISLNK(entry.mode):
            size = len(entry.link.encode("utf-8", "surrogateescape"))
        elif stat.S_ISREG(entry.mode):
            size = entry.size
        else:
            size = 0
        head = _header(ino, entry, size, name) + name + b"\0"
        head += _pad(len(head))
        out.write(head)
        written += len(head)
        for chunk in _chunks(entry):
            out.write(chunk)
        out.write(_pad(size))
        written += size + (-size % 4)
    trailer_name = TRAILER.encode()
    trailer = CpioEntry(TRAILER, 0)
    tail = _header(0, trailer, 0, trailer_name) + trailer_name + b"\0"
    tail += _pad(len(tail))
    out.write(tail)
    return written + len(tail)
