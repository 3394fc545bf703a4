"""An EIF and newc reader written from the specification, for testing the writer.

Deliberately independent of ``cape``: it uses only ``struct``, ``zlib``, ``hashlib``,
``json`` and ``cbor2``, following AWS's ``aws-nitro-enclaves-image-format`` README ("EIF
Specification") and the kernel's initramfs buffer format, so a bug shared by cape's writer
and cape's reader cannot hide here.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import cbor2

HEADER = 548
SECTION_HEADER = 12
TYPES = {1: "kernel", 2: "cmdline", 3: "ramdisk", 4: "signature", 5: "metadata"}


@dataclass
class Section:
    type: str
    flags: int
    offset: int
    data: bytes


@dataclass
class Image:
    magic: bytes
    version: int
    flags: int
    default_mem: int
    default_cpus: int
    reserved: int
    num_sections: int
    offsets: list[int]
    sizes: list[int]
    unused: int
    crc: int
    sections: list[Section]


def read(data: bytes) -> Image:
    magic = data[0:4]
    version, flags = struct.unpack(">HH", data[4:8])
    default_mem, default_cpus = struct.unpack(">QQ", data[8:24])
    reserved, num_sections = struct.unpack(">HH", data[24:28])
    offsets = list(struct.unpack(">32Q", data[28 : 28 + 256]))
    sizes = list(struct.unpack(">32Q", data[284 : 284 + 256]))
    unused, crc = struct.unpack(">II", data[540:548])
    sections = []
    for i in range(num_sections):
        offset = offsets[i]
        kind, section_flags, size = struct.unpack(">HHQ", data[offset : offset + 12])
        assert size == sizes[i]
        sections.append(
            Section(TYPES[kind], section_flags, offset, data[offset + 12 : offset + 12 + size])
        )
    return Image(
        magic,
        version,
        flags,
        default_mem,
        default_cpus,
        reserved,
        num_sections,
        offsets,
        sizes,
        unused,
        crc,
        sections,
    )


def crc_of(data: bytes) -> int:
    """CRC-32 of the whole file except the CRC field (bytes 544..548)."""
    return zlib.crc32(data[:544] + data[548:])


def pcr(content: bytes) -> bytes:
    return hashlib.sha384(bytes(48) + hashlib.sha384(content).digest()).digest()


def pcrs(image: Image) -> dict[int, bytes]:
    measured = [s for s in image.sections if s.type in ("kernel", "cmdline", "ramdisk")]
    ramdisks = [s for s in image.sections if s.type == "ramdisk"]
    first = ramdisks[0]
    boot = [s for s in measured if s.type != "ramdisk" or s is first]
    return {
        0: pcr(b"".join(s.data for s in measured)),
        1: pcr(b"".join(s.data for s in boot)),
        2: pcr(b"".join(s.data for s in ramdisks[1:])),
    }


def signature_entries(section: bytes) -> list[dict[str, Any]]:
    """The serde_cbor ``Vec<PcrSignature>``, byte vectors kept as the integer arrays they are."""
    item = cbor2.loads(section)
    assert isinstance(item, list)
    return item


@dataclass
class CpioMember:
    name: str
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    rdev: tuple[int, int]
    data: bytes


def read_newc(data: bytes) -> list[CpioMember]:
    members: list[CpioMember] = []
    position = 0
    while True:
        head = data[position : position + 110]
        assert head[:6] == b"070701", head[:6]
        fields = [int(head[6 + 8 * i : 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, gid, nlink, mtime, size, _dmaj, _dmin, rmaj, rmin, namesize, _check = fields
        name_start = position + 110
        name = data[name_start : name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        position = name_start + namesize
        position += -position % 4
        content = data[position : position + size]
        position += size
        position += -position % 4
        if name == "TRAILER!!!":
            assert position == len(data)
            return members
        members.append(CpioMember(name, ino, mode, uid, gid, nlink, mtime, (rmaj, rmin), content))
