"""``cape enclave build``: boot blobs and a root filesystem into a reproducible, signed EIF.

Inputs:

- ``blobs``: nitro-cli's boot blobs directory (on a parent instance
  ``/usr/share/nitro_enclaves/blobs``): ``bzImage`` (x86_64) or ``Image`` (aarch64),
  ``cmdline``, ``init``, ``nsm.ko``.
- ``rootfs``: a directory, or a ``docker save`` / OCI layout archive (:mod:`cape.image.tree`).

The ramdisks follow nitro-cli's layout: first the bootstrap (``dev/``, ``init``, ``nsm.ko``),
then the customer root (``rootfs/…``, ``cmd``: one argument per line, ``env``: one
``NAME=value`` per line). Both are deterministic newc cpio (:mod:`cape.formats.cpio`); the
metadata's build time comes from ``build_time``, else ``$SOURCE_DATE_EPOCH``, else the Unix
epoch, never the clock. So the same inputs give the same bytes, signed or not (signatures
are deterministic ECDSA).

The EIF is written to a temporary file beside ``output`` and renamed into place, so a
failed build never leaves a half-written image under the final name.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import cape
from cape.crypto.eif_signature import ImageSigner, SignerIdentity
from cape.errors import FormatError
from cape.formats.cpio import CpioEntry, write_newc
from cape.formats.eif import encode_metadata, pcr_value, write_eif
from cape.image.tree import RootFilesystem, read_directory, read_image_archive

__all__ = [
    "DEFAULT_CMD",
    "DEFAULT_ENV",
    "BuildResult",
    "build_image",
    "parse_build_time",
]

#: What the standard runtime root filesystem runs: the runtime, talking to the host on vsock.
DEFAULT_CMD = (
    "/usr/bin/python3",
    "-m",
    "cape.enclave.runtime",
    "--workdir",
    "/run/cape",
)
DEFAULT_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
    "CAPE_CHANNEL=vsock:3:5000",
    "CAPE_SECURE_MODULE=nitro",
)
_KERNELS = (("bzImage", False), ("Image", True))
_MAX_CMDLINE = 4096


@dataclass(frozen=True)
class BuildResult:
    """The written image: its path, size, PCR0-2 and, when signed, the signer (PCR8)."""

    path: Path
    size: int
    pcrs: dict[int, bytes]
    signer: SignerIdentity | None


def parse_build_time(text: str | None) -> str:
    """The metadata build time: ``text`` (RFC 3339), else ``$SOURCE_DATE_EPOCH``, else 1970."""
    if text is None:
        epoch = os.environ.get("SOURCE_DATE_EPOCH")
        if epoch is None:
            return "1970-01-01T00:00:00+00:00"
        try:
            moment = dt.datetime.fromtimestamp(int(epoch), dt.UTC)
        except (ValueError, OverflowError, OSError):
            raise FormatError("SOURCE_DATE_EPOCH must be whole seconds since 1970") from None
        return moment.isoformat()
    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        raise FormatError(f"--build-time {text[:40]!r} is not an RFC 3339 time") from None
    if moment.tzinfo is None:
        raise FormatError("--build-time needs a UTC offset (e.g. 2026-01-01T00:00:00Z)")
    return moment.astimezone(dt.UTC).isoformat()


def _read_blob(blobs: Path, name: str, limit: int = 1 << 30) -> bytes:
    path = blobs / name
    try:
        if path.stat().st_size > limit:
            raise FormatError(f"boot blob {path} is larger than {limit} bytes")
        return path.read_bytes()
    except FileNotFoundError:
        raise FormatError(f"the boot blobs directory {blobs} has no {name}") from None
    except OSError as exc:
        raise FormatError(f"cannot read boot blob {path}: {exc.strerror or exc}") from None


def _kernel(blobs: Path) -> tuple[bytes, bool]:
    for name, arm64 in _KERNELS:
        if (blobs / name).is_file():
            return _read_blob(blobs, name), arm64
    raise FormatError(f"the boot blobs directory {blobs} has neither bzImage nor Image")


def _cmdline(blobs: Path) -> bytes:
    text = _read_blob(blobs, "cmdline", _MAX_CMDLINE).rstrip(b"\r\n\0 \t")
    if b"\0" in text or b"\n" in text:
        raise FormatError("the boot blobs' cmdline must be one line without NUL bytes")
    return text


def _lines(values: Sequence[str], what: str) -> bytes:
    for value in values:
        if "\n" in value or "\0" in value:
            raise FormatError(f"{what} entries must not contain newlines or NUL bytes")
    return "".join(f"{value}\n" for value in values).encode()


def _bytes_entry(name: str, data: bytes, mode: int) -> CpioEntry:
    return CpioEntry(name, stat.S_IFREG | mode, size=len(data), open=lambda: io.BytesIO(data))


class _HashingWriter:
    """Writes to ``out`` and feeds every byte to ``digest`` (PCR0 while the ramdisk is made)."""

    def __init__(self, out: BinaryIO, digests: Sequence[Any]) -> None:
        self._out = out
        self._digests = digests

    def write(self, data: bytes, /) -> int:
        for digest in self._digests:
            digest.update(data)
        self._out.write(data)
        return len(data)


def _file_opener(path: Path) -> Callable[[], BinaryIO]:
    return lambda: path.open("rb")


def _rootfs(path: Path) -> RootFilesystem:
    if path.is_dir():
        return read_directory(path)
    if path.is_file():
        return read_image_archive(path)
    raise FormatError(f"the root filesystem {path} is neither a directory nor an image archive")


def build_image(
    *,
    blobs: Path,
    rootfs: Path,
    output: Path,
    signer: ImageSigner | None = None,
    name: str = "cape-runtime",
    version: str | None = None,
    build_time: str | None = None,
    cmd: Sequence[str] | None = None,
    env: Sequence[str] | None = None,
    custom_metadata: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Build the image described in the module docstring and return what it measures.

    ``cmd``/``env`` override the archive's (a directory has none: the defaults start the Cape
    runtime, :data:`DEFAULT_CMD` and :data:`DEFAULT_ENV`).

    Raises:
        FormatError: a missing or unreadable blob, a bad root filesystem or archive, a bad
            build time, or ``cmd``/``env`` values with newlines.
    """
    blobs, rootfs, output = Path(blobs), Path(rootfs), Path(output)
    if not blobs.is_dir():
        raise FormatError(f"the boot blobs directory {blobs} does not exist")
    kernel, arm64 = _kernel(blobs)
    cmdline = _cmdline(blobs)
    bootstrap = [
        CpioEntry("dev", stat.S_IFDIR | 0o755),
        _bytes_entry("init", _read_blob(blobs, "init"), 0o755),
        _bytes_entry("nsm.ko", _read_blob(blobs, "nsm.ko"), 0o644),
    ]
    tree = _rootfs(rootfs)
    command = tuple(cmd) if cmd is not None else tree.cmd or DEFAULT_CMD
    environment = tuple(env) if env is not None else tree.env or DEFAULT_ENV
    if not command:
        raise FormatError("the image needs a command to run (cmd is empty)")
    customer = [
        *tree.entries,
        _bytes_entry("cmd", _lines(command, "cmd"), 0o644),
        _bytes_entry("env", _lines(environment, "env"), 0o644),
    ]
    metadata = encode_metadata(
        name=name,
        version=version or cape.__version__,
        build_time=parse_build_time(build_time),
        build_tool="cape enclave build",
        build_tool_version=cape.__version__,
        docker_info=tree.docker_info,
        custom=custom_metadata,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=".cape-build-") as scratch:
        work = Path(scratch)
        image, boot, app = hashlib.sha384(), hashlib.sha384(), hashlib.sha384()
        for digest in (image, boot):
            digest.update(kernel)
            digest.update(cmdline)
        sizes = []
        for number, (entries, digests) in enumerate(
            ((bootstrap, (image, boot)), (customer, (image, app)))
        ):
            with (work / f"ramdisk{number}.cpio").open("wb") as handle:
                sizes.append(write_newc(_HashingWriter(handle, digests), entries))
        pcrs = {
            0: pcr_value(image.digest()),
            1: pcr_value(boot.digest()),
            2: pcr_value(app.digest()),
        }
        signature = signer.sign_pcr0(pcrs[0]) if signer is not None else None
        if signer is not None:
            pcrs[8] = signer.identity.pcr8
        temporary = work / "image.eif"
        with temporary.open("wb") as out:
            size = write_eif(
                out,
                kernel=kernel,
                cmdline=cmdline,
                metadata=metadata,
                ramdisks=[(_file_opener(work / f"ramdisk{n}.cpio"), sizes[n]) for n in (0, 1)],
                signature=signature,
                arm64=arm64,
            )
            out.flush()
            os.fsync(out.fileno())
        temporary.chmod(0o644)
        os.replace(temporary, output)
    return BuildResult(
        path=output,
        size=size,
        pcrs=pcrs,
        signer=signer.identity if signer is not None else None,
    )
