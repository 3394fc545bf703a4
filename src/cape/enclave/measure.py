"""PCR measurements of the simulated enclave: SHA-384 over the runtime's own code.

In a Nitro Enclave the hypervisor measures the image before it boots. The simulated enclave
has no such observer, so ``cape serve`` measures what the enclave process is about to run,
the same way every time, and the simulated secure module signs those values. Any change to
the runtime's code, its crypto dependencies or the interpreter changes the PCRs, so a KMS
policy pinned to them refuses a modified runtime. (This is an integrity check of the files on
disk, not a hardware guarantee: whoever controls the host can also change the measurer.)

Definitions (deterministic: sorted lines, relative paths, content hashes only, no mtimes):

- A *manifest* is the bytes of sorted lines ``"<name>\\t<sha384 hex of content>\\n"``.
- Every PCR starts as 48 zero bytes; ``extend(pcr, data) = SHA384(pcr || data)``.
- **PCR1** ("kernel and bootstrap"): ``extend(0, SHA384(interpreter manifest))``. Lines for the
  interpreter executable (``interpreter/<file name>``), ``sys.version``,
  ``sys.implementation.cache_tag`` and, when the interpreter links one, the libpython shared
  library (``lib/<LDLIBRARY>``).
- **PCR2** ("application"): ``extend(0, SHA384(runtime manifest))``. Lines for every ``*.py``
  file the enclave runs (``cape/<path>``: ``__init__.py``, ``errors.py`` and the ``formats``,
  ``crypto``, ``verify``, ``enclave``, ``kms`` and ``_internal`` subpackages), plus the
  installed ``RECORD`` of ``cryptography``, ``cbor2`` and ``asn1crypto``
  (``dist/<name>/RECORD``; their
  version string, ``dist/<name>/version``, when no RECORD exists).
- **PCR0** ("image"): ``extend(extend(0, SHA384(interpreter manifest)), SHA384(runtime
  manifest))``, so it changes whenever PCR1 or PCR2 does.
- **PCR4**: ``SHA384(0^48 || instance id)``, Nitro's formula; PCR3 (IAM role) and every
  other PCR up to 15 stay zero.
- **PCR8** (the image signer): as in an EIF, ``SHA384(0^48 || SHA384(certificate DER))`` of
  the certificate whose key signed this PCR0. ``cape serve`` signs the runtime's measurement
  with the image-signing key in its data directory and hands the signature section to the
  enclave at start (:mod:`cape.enclave.provision`); the enclave checks it against the PCR0 it
  measured itself. A signature over another measurement (a runtime changed after the host
  signed it), or none, leaves PCR8 zero: the runtime is unsigned, and keys bound to the
  signer are refused to it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import logging
import os
import sys
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import cape
from cape.crypto.eif_signature import verify_signature_section
from cape.errors import FormatError, SignatureError

_log = logging.getLogger(__name__)
__all__ = [
    "PCR_BYTES",
    "RUNTIME_DISTRIBUTIONS",
    "RUNTIME_SUBPACKAGES",
    "RuntimeMeasurement",
    "extend",
    "measure_runtime",
    "signed_pcr8",
    "simulated_pcrs",
]

PCR_BYTES = 48
ZERO_PCR = bytes(PCR_BYTES)
SIMULATED_PCR_COUNT = 16
RUNTIME_TOP_LEVEL_FILES = ("__init__.py", "errors.py")
RUNTIME_SUBPACKAGES = ("formats", "crypto", "verify", "enclave", "kms", "_internal")
RUNTIME_DISTRIBUTIONS = ("cryptography", "cbor2", "asn1crypto")


@dataclass(frozen=True)
class RuntimeMeasurement:
    """PCR0-2 of the simulated enclave and the manifests they were computed from (for audit)."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    interpreter_manifest: bytes
    runtime_manifest: bytes


def extend(pcr: bytes, data: bytes) -> bytes:
    """The NSM's PCR extension: ``SHA384(pcr || data)``."""
    return hashlib.sha384(pcr + data).digest()


def _sha384_hex(data: bytes) -> str:
    return hashlib.sha384(data).hexdigest()


def _file_sha384_hex(path: Path) -> str:
    digest = hashlib.sha384()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(entries: Iterable[tuple[str, str]]) -> bytes:
    """Canonical manifest bytes from ``(name, sha384 hex)`` pairs."""
    lines = []
    for name, digest in entries:
        if not name or "\t" in name or "\n" in name:
            raise ValueError(f"manifest name {name!r} is empty or holds a tab or newline")
        lines.append(f"{name}\t{digest}\n".encode("utf-8", "surrogateescape"))
    if len(set(lines)) != len(lines):
        raise ValueError("manifest has duplicate entries")
    return b"".join(sorted(lines))


def _libpython() -> Path | None:
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    name = sysconfig.get_config_var("LDLIBRARY")
    libdir = sysconfig.get_config_var("LIBDIR")
    if not name or not libdir:
        return None
    path = Path(libdir) / name
    return path if path.is_file() else None


def interpreter_manifest(interpreter: Path | None = None) -> bytes:
    """The PCR1 manifest: the interpreter executable, its version and its libpython."""
    executable = Path(os.path.realpath(interpreter or sys.executable))
    entries = [
        (f"interpreter/{executable.name}", _file_sha384_hex(executable)),
        ("sys.version", _sha384_hex(sys.version.encode())),
        ("sys.implementation.cache_tag", _sha384_hex(str(sys.implementation.cache_tag).encode())),
    ]
    library = _libpython()
    if library is not None:
        entries.append((f"lib/{library.name}", _file_sha384_hex(library)))
    return _manifest(entries)


def _python_files(directory: Path) -> Iterable[Path]:
    for current, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                yield Path(current) / name


def _distribution_entry(name: str) -> tuple[str, str]:
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(f"the enclave runtime needs {name!r}, which is not installed") from None
    record = dist.read_text("RECORD")
    if record is not None:
        return f"dist/{name}/RECORD", _sha384_hex(record.encode())
    return f"dist/{name}/version", _sha384_hex(dist.version.encode())


def runtime_manifest(package_root: Path | None = None) -> bytes:
    """The PCR2 manifest: the runtime's ``*.py`` files and its crypto dependencies."""
    root = Path(package_root) if package_root is not None else Path(cape.__file__).parent
    if not (root / "__init__.py").is_file():
        raise ValueError(f"{root} is not a Python package directory")
    files = [root / name for name in RUNTIME_TOP_LEVEL_FILES if (root / name).is_file()]
    for sub in RUNTIME_SUBPACKAGES:
        if (root / sub).is_dir():
            files.extend(_python_files(root / sub))
    entries = [
        (f"cape/{path.relative_to(root).as_posix()}", _file_sha384_hex(path)) for path in files
    ]
    entries.extend(_distribution_entry(name) for name in RUNTIME_DISTRIBUTIONS)
    return _manifest(entries)


def _measure(package_root: Path | None, interpreter: Path | None) -> RuntimeMeasurement:
    interp = interpreter_manifest(interpreter)
    runtime = runtime_manifest(package_root)
    interp_digest = hashlib.sha384(interp).digest()
    runtime_digest = hashlib.sha384(runtime).digest()
    return RuntimeMeasurement(
        pcr0=extend(extend(ZERO_PCR, interp_digest), runtime_digest),
        pcr1=extend(ZERO_PCR, interp_digest),
        pcr2=extend(ZERO_PCR, runtime_digest),
        interpreter_manifest=interp,
        runtime_manifest=runtime,
    )


@functools.lru_cache(maxsize=1)
def _default_measurement() -> RuntimeMeasurement:
    return _measure(None, None)


def measure_runtime(
    package_root: Path | None = None, *, interpreter: Path | None = None
) -> RuntimeMeasurement:
    """Measure the enclave runtime: the package at ``package_root`` run by ``interpreter``.

    The defaults measure the installed ``cape`` package and the running interpreter; that
    result is computed once per process (the code already imported is what runs, whatever
    happens to the files later). ``interpreter`` replaces only the executable's hash; the
    version lines and libpython always describe the running interpreter.
    """
    if package_root is None and interpreter is None:
        return _default_measurement()
    return _measure(package_root, interpreter)


def signed_pcr8(measurement: RuntimeMeasurement, image_signature: bytes | None) -> bytes:
    """PCR8 for ``measurement`` given the host's signature section (zero when it does not
    sign exactly this PCR0)."""
    if image_signature is None:
        return ZERO_PCR
    try:
        return verify_signature_section(image_signature, measurement.pcr0).pcr8
    except (FormatError, SignatureError) as exc:
        _log.warning("the runtime's image signature does not apply (%s): PCR8 stays zero", exc)
        return ZERO_PCR


def simulated_pcrs(
    measurement: RuntimeMeasurement,
    *,
    instance_id: str,
    image_signature: bytes | None = None,
) -> dict[int, bytes]:
    """PCR0-15 of a simulated enclave on the host ``instance_id``, 48 bytes each; PCR8 from
    ``image_signature`` (see :func:`signed_pcr8`)."""
    if not instance_id or not instance_id.isascii():
        raise ValueError("instance_id must be non-empty ASCII")
    pcrs = dict.fromkeys(range(SIMULATED_PCR_COUNT), ZERO_PCR)
    pcrs[0] = measurement.pcr0
    pcrs[1] = measurement.pcr1
    pcrs[2] = measurement.pcr2
    pcrs[4] = hashlib.sha384(ZERO_PCR + instance_id.encode("ascii")).digest()
    pcrs[8] = signed_pcr8(measurement, image_signature)
    return pcrs
