"""The Enclave Image File (EIF): what a Nitro Enclave boots, and its measurements.

Normative reference: AWS's ``aws-nitro-enclaves-image-format`` (``src/defs/mod.rs``, README
"EIF Specification"). All integers are big-endian.

- **Header** (548 bytes): magic ``.eif``, version u16 (4), flags u16 (bit 0: aarch64),
  default memory u64, default CPUs u64, reserved u16, section count u16, 32 section offsets
  u64, 32 section sizes u64, unused u32, and last a CRC-32 (IEEE, as ``zlib.crc32``) over the
  whole file except those 4 bytes.
- **Sections**: a 12-byte header (type u16: 1 kernel, 2 cmdline, 3 ramdisk, 4 signature,
  5 metadata; flags u16; size u64) then the data. :func:`write_eif` lays them out kernel,
  cmdline, metadata, ramdisks, signature, back to back, as nitro-cli does.
- **Measurements**: each PCR is ``SHA384(0^48 ‖ SHA384(content))``: PCR0 over kernel ‖
  cmdline ‖ every ramdisk, PCR1 over kernel ‖ cmdline ‖ the first ramdisk, PCR2 over the
  other ramdisks, PCR8 over the DER of the signing certificate. Headers, metadata and the
  signature are never measured.
- **Signature section**: serde_cbor of ``[{"signing_certificate": PEM, "signature":
  COSE_Sign1}]`` where both byte vectors are CBOR *arrays of integers*, not byte strings (a
  serde quirk copied exactly); the COSE_Sign1 (ES384, untagged) signs serde_cbor of
  ``{"register_index": 0, "register_value": PCR0}``, again with the value as integers.
- **Metadata section**: JSON ``{"ImageName", "ImageVersion", "BuildMetadata": {"BuildTime",
  "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion"}, "DockerInfo",
  "CustomMetadata"}``.

This module is pure format: bytes in, bytes and models out. Signing and signature checks
live in :mod:`cape.crypto.eif_signature`; reading a whole file with its checks in
:mod:`cape.verify.eif`.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO

import cbor2

from cape.errors import FormatError
from cape.formats.cose import loads_cbor

__all__ = [
    "CRC_OFFSET",
    "HEADER_BYTES",
    "MAGIC",
    "MAX_METADATA_BYTES",
    "MAX_SECTIONS",
    "SECTION_HEADER_BYTES",
    "SIGNATURE_MAX_BYTES",
    "VERSION",
    "EifHeader",
    "PcrSignatureEntry",
    "SectionType",
    "decode_pcr_payload",
    "decode_signature_section",
    "encode_metadata",
    "encode_pcr_payload",
    "encode_signature_section",
    "pack_header",
    "pack_section_header",
    "parse_header",
    "parse_section_header",
    "pcr_value",
    "write_eif",
]

MAGIC = b".eif"
VERSION = 4
MAX_SECTIONS = 32
HEADER_BYTES = 548
SECTION_HEADER_BYTES = 12
CRC_OFFSET = HEADER_BYTES - 4
#: nitro-cli's limit for the signature section.
SIGNATURE_MAX_BYTES = 32768
#: Our limit for the metadata JSON (nitro-cli writes a few hundred bytes).
MAX_METADATA_BYTES = 1 << 20
FLAG_ARM64 = 0x1
DEFAULT_MEMORY = 1 << 30
DEFAULT_CPUS = 2
PCR_BYTES = 48

_HEAD = struct.Struct(">4sHHQQHH")
_SECTION = struct.Struct(">HHQ")
_CHUNK = 1 << 20


class SectionType(enum.IntEnum):
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True)
class EifHeader:
    """The fixed header; ``sections`` holds ``(offset, size)`` for each used slot."""

    version: int
    flags: int
    default_memory: int
    default_cpus: int
    sections: tuple[tuple[int, int], ...]
    crc32: int


def pcr_value(content_digest: bytes) -> bytes:
    """A PCR from the SHA-384 of its content: ``SHA384(0^48 ‖ content_digest)``."""
    return hashlib.sha384(bytes(PCR_BYTES) + content_digest).digest()


def pack_header(header: EifHeader) -> bytes:
    """The 548 header bytes, CRC included as given."""
    count = len(header.sections)
    if not 0 < count <= MAX_SECTIONS:
        raise ValueError(f"an EIF holds 1 to {MAX_SECTIONS} sections, not {count}")
    offsets = [o for o, _ in header.sections] + [0] * (MAX_SECTIONS - count)
    sizes = [s for _, s in header.sections] + [0] * (MAX_SECTIONS - count)
    return b"".join(
        (
            _HEAD.pack(
                MAGIC,
                header.version,
                header.flags,
                header.default_memory,
                header.default_cpus,
                0,
                count,
            ),
            struct.pack(f">{MAX_SECTIONS}Q", *offsets),
            struct.pack(f">{MAX_SECTIONS}Q", *sizes),
            struct.pack(">II", 0, header.crc32),
        )
    )


def parse_header(data: bytes) -> EifHeader:
    """Parse and structurally check the 548-byte header (not the CRC, not the sections)."""
    if len(data) != HEADER_BYTES:
        raise FormatError(f"not an enclave image: shorter than the {HEADER_BYTES}-byte header")
    magic, version, flags, memory, cpus, _reserved, count = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise FormatError("not an enclave image: the file does not start with '.eif'")
    if version != VERSION:
        raise FormatError(f"unsupported EIF version {version} (this reader knows version 4)")
    if flags & ~FLAG_ARM64:
        raise FormatError(f"EIF header has unknown flags 0x{flags:04x}")
    if not 2 <= count <= MAX_SECTIONS:
        raise FormatError(f"EIF header claims {count} sections (2 to {MAX_SECTIONS} allowed)")
    offsets = struct.unpack_from(f">{MAX_SECTIONS}Q", data, _HEAD.size)
    sizes = struct.unpack_from(f">{MAX_SECTIONS}Q", data, _HEAD.size + 8 * MAX_SECTIONS)
    if any(offsets[count:]) or any(sizes[count:]):
        raise FormatError("EIF header has offsets or sizes beyond its section count")
    (crc,) = struct.unpack_from(">I", data, CRC_OFFSET)
    return EifHeader(
        version=version,
        flags=flags,
        default_memory=memory,
        default_cpus=cpus,
        sections=tuple(zip(offsets[:count], sizes[:count], strict=True)),
        crc32=crc,
    )


def pack_section_header(kind: SectionType, size: int) -> bytes:
    return _SECTION.pack(int(kind), 0, size)


def parse_section_header(data: bytes) -> tuple[SectionType, int, int]:
    """``(type, flags, size)`` of a 12-byte section header."""
    if len(data) != SECTION_HEADER_BYTES:
        raise FormatError("EIF section header is truncated")
    kind, flags, size = _SECTION.unpack(data)
    try:
        section_type = SectionType(kind)
    except ValueError:
        raise FormatError(f"EIF section has unknown type {kind}") from None
    return section_type, flags, size


# --- the signature section ----------------------------------------------------------------


@dataclass(frozen=True)
class PcrSignatureEntry:
    """One ``PcrSignature`` of the signature section: a PEM certificate and a COSE_Sign1."""

    signing_certificate: bytes
    signature: bytes


def _int_array(value: bytes) -> list[int]:
    return list(value)


def _bytes_from_ints(value: Any, what: str) -> bytes:
    if not isinstance(value, list) or not all(
        isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= 255 for i in value
    ):
        raise FormatError(f"EIF signature: {what} must be an array of byte values")
    return bytes(value)


def encode_pcr_payload(index: int, value: bytes) -> bytes:
    """serde_cbor of ``PcrInfo {register_index: i32, register_value: Vec<u8>}``."""
    return bytes(cbor2.dumps({"register_index": index, "register_value": _int_array(value)}))


def decode_pcr_payload(data: bytes) -> tuple[int, bytes]:
    """``(register_index, register_value)`` from a signed payload; strict."""
    item = loads_cbor(data, "EIF signature payload")
    if not isinstance(item, dict) or set(item) != {"register_index", "register_value"}:
        raise FormatError("EIF signature payload must be {register_index, register_value}")
    index = item["register_index"]
    if isinstance(index, bool) or not isinstance(index, int):
        raise FormatError("EIF signature register_index must be an integer")
    return index, _bytes_from_ints(item["register_value"], "register_value")


def encode_signature_section(entries: Sequence[PcrSignatureEntry]) -> bytes:
    """serde_cbor of ``Vec<PcrSignature>``, byte vectors as arrays of integers."""
    return bytes(
        cbor2.dumps(
            [
                {
                    "signing_certificate": _int_array(e.signing_certificate),
                    "signature": _int_array(e.signature),
                }
                for e in entries
            ]
        )
    )


def decode_signature_section(data: bytes) -> list[PcrSignatureEntry]:
    """The entries of a signature section; :class:`FormatError` unless exactly that shape."""
    if len(data) > SIGNATURE_MAX_BYTES:
        raise FormatError(f"EIF signature section is larger than {SIGNATURE_MAX_BYTES} bytes")
    item = loads_cbor(data, "EIF signature section")
    if not isinstance(item, list) or not item:
        raise FormatError("EIF signature section must be a non-empty array")
    entries = []
    for element in item:
        if not isinstance(element, dict) or set(element) != {"signing_certificate", "signature"}:
            raise FormatError("EIF signature entries must be {signing_certificate, signature}")
        entries.append(
            PcrSignatureEntry(
                signing_certificate=_bytes_from_ints(
                    element["signing_certificate"], "signing_certificate"
                ),
                signature=_bytes_from_ints(element["signature"], "signature"),
            )
        )
    return entries


# --- metadata ----------------------------------------------------------------------------


def encode_metadata(
    *,
    name: str,
    version: str,
    build_time: str,
    build_tool: str,
    build_tool_version: str,
    operating_system: str = "Generic Linux",
    kernel_version: str = "Unknown version",
    docker_info: Mapping[str, Any] | None = None,
    custom: Mapping[str, Any] | None = None,
) -> bytes:
    """The metadata section's JSON, keys in the crate's field order, no spaces."""
    document = {
        "ImageName": name,
        "ImageVersion": version,
        "BuildMetadata": {
            "BuildTime": build_time,
            "BuildTool": build_tool,
            "BuildToolVersion": build_tool_version,
            "OperatingSystem": operating_system,
            "KernelVersion": kernel_version,
        },
        "DockerInfo": dict(docker_info or {}),
        "CustomMetadata": dict(custom or {}),
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


# --- writing ------------------------------------------------------------------------------

Source = bytes | Callable[[], BinaryIO]


def _size_of(source: Source, size: int | None) -> int:
    if isinstance(source, bytes):
        return len(source)
    if size is None:
        raise ValueError("a streamed section needs its size")
    return size


def _stream(source: Source) -> Any:
    if isinstance(source, bytes):
        yield source
        return
    with source() as handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


def write_eif(
    out: BinaryIO,
    *,
    kernel: bytes,
    cmdline: bytes,
    metadata: bytes,
    ramdisks: Sequence[tuple[Source, int | None]],
    signature: bytes | None = None,
    arm64: bool = False,
    default_memory: int = DEFAULT_MEMORY,
    default_cpus: int = DEFAULT_CPUS,
) -> int:
    """Write an EIF (sections kernel, cmdline, metadata, ramdisks, signature); return its size.

    ``ramdisks`` are ``(bytes, None)`` or ``(opener, size)`` pairs; openers are read once.
    The CRC is computed while writing, so ``out`` must be seekable (the CRC is written last).
    """
    if b"\0" in cmdline:
        raise FormatError("the kernel command line must not contain NUL bytes")
    if not ramdisks:
        raise ValueError("an EIF needs at least one ramdisk")
    layout: list[tuple[SectionType, Source, int]] = [
        (SectionType.KERNEL, kernel, len(kernel)),
        (SectionType.CMDLINE, cmdline, len(cmdline)),
        (SectionType.METADATA, metadata, len(metadata)),
    ]
    layout += [(SectionType.RAMDISK, src, _size_of(src, size)) for src, size in ramdisks]
    if signature is not None:
        if len(signature) > SIGNATURE_MAX_BYTES:
            raise FormatError(f"the signature section exceeds {SIGNATURE_MAX_BYTES} bytes")
        layout.append((SectionType.SIGNATURE, signature, len(signature)))
    if len(layout) > MAX_SECTIONS:
        raise FormatError(f"an EIF holds at most {MAX_SECTIONS} sections")
    offsets = []
    position = HEADER_BYTES
    for _, _, size in layout:
        offsets.append((position, size))
        position += SECTION_HEADER_BYTES + size
    header = pack_header(
        EifHeader(
            version=VERSION,
            flags=FLAG_ARM64 if arm64 else 0,
            default_memory=default_memory,
            default_cpus=default_cpus,
            sections=tuple(offsets),
            crc32=0,
        )
    )
    start = out.tell()
    crc = zlib.crc32(header[:CRC_OFFSET])
    out.write(header)
    for kind, source, size in layout:
        head = pack_section_header(kind, size)
        crc = zlib.crc32(head, crc)
        out.write(head)
        written = 0
        for chunk in _stream(source):
            crc = zlib.crc32(chunk, crc)
            out.write(chunk)
            written += len(chunk)
        if written != size:
            raise FormatError(f"the {kind.label} section changed size while it was written")
    end = out.tell()
    out.seek(start + CRC_OFFSET)
    out.write(struct.pack(">I", crc))
    out.seek(end)
    return end - start
