"""Reading an enclave image file with every check: what ``cape enclave describe`` shows.

:func:`describe_eif` streams the file once and refuses it (one :class:`FormatError` or
:class:`SignatureError` line) unless:

1. it is no larger than ``max_bytes`` and at least a header long;
2. the header parses (magic, version 4, known flags, 2-32 sections, unused slots zero);
3. the sections lie back to back from byte 548 to the end of the file, each section header
   agrees with the header's size, and every type is known;
4. there is exactly one kernel, one cmdline (without NUL bytes), one metadata section (JSON
   object, at most 1 MiB), at least one ramdisk, all after the kernel, and at most one
   signature (at most 32 KiB);
5. the CRC-32 matches;
6. when signed, the signature verifies with its certificate and signs this PCR0.

PCR0/1/2 are computed from the section bytes while reading; PCR0 and PCR2 (the large
customer ramdisk) are hashed on two threads, since ``hashlib`` releases the GIL.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from cape.crypto.eif_signature import SignerIdentity, verify_signature_section
from cape.errors import FormatError
from cape.formats.eif import (
    CRC_OFFSET,
    FLAG_ARM64,
    HEADER_BYTES,
    MAX_METADATA_BYTES,
    SECTION_HEADER_BYTES,
    SIGNATURE_MAX_BYTES,
    SectionType,
    parse_header,
    parse_section_header,
    pcr_value,
)

__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "EifDescription", "EifSection", "describe_eif"]

#: Images larger than this are refused unless the caller raises the limit.
DEFAULT_MAX_IMAGE_BYTES = 8 << 30
_CHUNK = 1 << 20


@dataclass(frozen=True)
class EifSection:
    type: SectionType
    offset: int
    size: int


@dataclass(frozen=True)
class EifDescription:
    """A checked image: its sections, metadata, PCRs and signer (``None`` when unsigned)."""

    size: int
    arm64: bool
    default_memory: int
    default_cpus: int
    sections: tuple[EifSection, ...]
    metadata: dict[str, Any]
    cmdline: str
    pcrs: dict[int, bytes]
    signer: SignerIdentity | None = field(default=None)

    @property
    def signed(self) -> bool:
        return self.signer is not None

    def to_json(self) -> dict[str, Any]:
        """The shape ``cape enclave describe -o json`` prints."""
        document: dict[str, Any] = {
            "pcrs": {str(i): v.hex() for i, v in sorted(self.pcrs.items())},
            "sections": [{"type": s.type.label, "size": s.size} for s in self.sections],
            "metadata": self.metadata,
            "signed": self.signed,
        }
        if self.signer is not None:
            problem = self.signer.validity_problem()
            document["signer"] = {
                "subject": self.signer.subject,
                "not_before": self.signer.not_before.isoformat(),
                "not_after": self.signer.not_after.isoformat(),
                "certificate_valid_now": problem is None,
            }
        return document


class _Hashers:
    """PCR0/1/2 content hashes and the CRC, fed in file order."""

    def __init__(self, pool: ThreadPoolExecutor) -> None:
        self.image = hashlib.sha384()
        self.boot = hashlib.sha384()
        self.app = hashlib.sha384()
        self.crc = 0
        self._pool = pool

    def measured(self, data: bytes | memoryview, *, boot: bool, app: bool) -> None:
        # The application hash runs beside the image hash: two cores, one pass.
        pending = self._pool.submit(self.app.update, data) if app else None
        self.image.update(data)
        if boot:
            self.boot.update(data)
        self.crc = zlib.crc32(data, self.crc)
        if pending is not None:
            pending.result()

    def unmeasured(self, data: bytes | memoryview) -> None:
        self.crc = zlib.crc32(data, self.crc)


def _read_exact(handle: BinaryIO, size: int, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise FormatError(f"enclave image is truncated inside {what}")
    return data


def _layout(header_sections: tuple[tuple[int, int], ...], file_size: int) -> None:
    position = HEADER_BYTES
    for number, (offset, size) in enumerate(header_sections):
        if offset != position:
            raise FormatError(
                f"EIF section {number} starts at byte {offset}, expected {position} "
                "(sections must follow each other without gaps)"
            )
        position = offset + SECTION_HEADER_BYTES + size
        if position > file_size:
            raise FormatError(f"EIF section {number} runs past the end of the file (truncated)")
    if position != file_size:
        raise FormatError(f"enclave image has {file_size - position} bytes after its last section")


def _check_counts(kinds: list[SectionType]) -> None:
    for kind in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA):
        if kinds.count(kind) != 1:
            raise FormatError(f"enclave image must have exactly one {kind.label} section")
    if SectionType.RAMDISK not in kinds:
        raise FormatError("enclave image has no ramdisk section")
    if kinds.count(SectionType.SIGNATURE) > 1:
        raise FormatError("enclave image has more than one signature section")
    kernel_at = kinds.index(SectionType.KERNEL)
    if kinds.index(SectionType.RAMDISK) < kernel_at:
        raise FormatError("enclave image has a ramdisk before its kernel")


def _parse_metadata(data: bytes) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise FormatError("EIF metadata section is not valid JSON") from None
    if not isinstance(document, dict):
        raise FormatError("EIF metadata section must be a JSON object")
    return document


def describe_eif(path: Path, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> EifDescription:
    """Read and check the image at ``path`` (see the module docstring for the checks)."""
    try:
        handle = Path(path).open("rb")  # noqa: SIM115 - closed by the with below
    except OSError as exc:
        raise FormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    with handle, ThreadPoolExecutor(1, thread_name_prefix="eif-hash") as pool:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise FormatError(f"enclave image is {size} bytes, more than the {max_bytes} limit")
        header_bytes = handle.read(HEADER_BYTES)
        header = parse_header(header_bytes)
        _layout(header.sections, size)
        hashers = _Hashers(pool)
        hashers.unmeasured(header_bytes[:CRC_OFFSET])
        sections: list[EifSection] = []
        kept: dict[SectionType, bytes] = {}
        ramdisks = 0
        for number, (offset, expected) in enumerate(header.sections):
            head = _read_exact(handle, SECTION_HEADER_BYTES, f"section {number}'s header")
            kind, _flags, section_size = parse_section_header(head)
            if section_size != expected:
                raise FormatError(
                    f"EIF section {number} header says {section_size} bytes, "
                    f"the file header {expected}"
                )
            hashers.unmeasured(head)
            sections.append(EifSection(kind, offset, section_size))
            if kind in (SectionType.METADATA, SectionType.SIGNATURE, SectionType.CMDLINE):
                limit = {
                    SectionType.METADATA: MAX_METADATA_BYTES,
                    SectionType.SIGNATURE: SIGNATURE_MAX_BYTES,
                    SectionType.CMDLINE: 1 << 20,
                }[kind]
                if section_size > limit:
                    raise FormatError(f"EIF {kind.label} section is larger than {limit} bytes")
                data = _read_exact(handle, section_size, f"the {kind.label} section")
                if kind is SectionType.CMDLINE:
                    hashers.measured(data, boot=True, app=False)
                else:
                    hashers.unmeasured(data)
                kept.setdefault(kind, data)
                continue
            first_ramdisk = kind is SectionType.RAMDISK and ramdisks == 0
            boot = kind is SectionType.KERNEL or first_ramdisk
            app = kind is SectionType.RAMDISK and not first_ramdisk
            ramdisks += kind is SectionType.RAMDISK
            remaining = section_size
            while remaining:
                chunk = handle.read(min(_CHUNK, remaining))
                if not chunk:
                    raise FormatError(f"enclave image is truncated inside section {number}")
                hashers.measured(chunk, boot=boot, app=app)
                remaining -= len(chunk)
        _check_counts([s.type for s in sections])
        if hashers.crc != header.crc32:
            raise FormatError(
                f"enclave image CRC mismatch (header 0x{header.crc32:08x}, "
                f"computed 0x{hashers.crc:08x}): the file is corrupt"
            )
    cmdline = kept[SectionType.CMDLINE]
    if b"\0" in cmdline:
        raise FormatError("EIF cmdline section contains a NUL byte")
    pcrs = {
        0: pcr_value(hashers.image.digest()),
        1: pcr_value(hashers.boot.digest()),
        2: pcr_value(hashers.app.digest()),
    }
    signer = None
    if SectionType.SIGNATURE in kept:
        signer = verify_signature_section(kept[SectionType.SIGNATURE], pcrs[0])
        pcrs[8] = signer.pcr8
    return EifDescription(
        size=size,
        arm64=bool(header.flags & FLAG_ARM64),
        default_memory=header.default_memory,
        default_cpus=header.default_cpus,
        sections=tuple(sections),
        metadata=_parse_metadata(kept[SectionType.METADATA]),
        cmdline=cmdline.decode("utf-8", "replace"),
        pcrs=pcrs,
        signer=signer,
    )
