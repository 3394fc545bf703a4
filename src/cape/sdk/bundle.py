"""Build the zip that ``cape deploy`` and ``cape test`` upload: deterministic, checked early.

A folder becomes a zip whose bytes depend only on the files' relative paths and contents:

- files sit at the zip's root (``app.py`` at the top, no folder-name prefix), sorted by their
  POSIX relative path, with no directory entries;
- every entry has the timestamp 1980-01-01 00:00:00, mode ``0o644`` (Unix), deflate at level
  :data:`COMPRESS_LEVEL` (stored instead when deflate would exceed the enclave's compression
  ratio limit), and no extra fields or comments;
- ``__pycache__/``, VCS folders (``.git/`` …), tool caches (``.mypy_cache/`` …), ``*.pyc``
  and ``.DS_Store`` are left out; symlinks and special files are refused (never followed).

Deflate output depends on the zlib the interpreter links: machines with the same zlib (stock
zlib 1.2/1.3 everywhere we know of) give the same bytes; a zlib-ng build may not.

With ``requirements.txt`` in the folder (and ``vendor=True``), the requirements are installed
with pip for the enclave's interpreter (:class:`RuntimeTarget`, from ``GET /v1/runtime``) and
zipped beside ``app.py``: the sandbox puts the function's folder first on ``sys.path``. Only
binary wheels can be installed for another platform, so pip runs with ``--only-binary=:all:``
and resolves dependencies. The installed tree is cached under :func:`default_cache_dir`, keyed
by the requirements file's bytes and the target; pip's index settings come from its usual
configuration (``PIP_INDEX_URL``, ``PIP_NO_INDEX``, ``PIP_FIND_LINKS``, pip.conf). The key
covers ``requirements.txt`` only: files it refers to (``-r other.txt``, local wheels) and
unpinned versions are read on the first build only.

A ``.zip`` path is uploaded as it is. Either way the result passes
:func:`cape.formats.bundle.inspect_bundle` (the enclave's own check) before anything is sent.
"""

from __future__ import annotations

import contextlib
import email.parser
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cape.errors import CapeError, FormatError, LimitExceededError
from cape.formats.bundle import BundleLimits, inspect_bundle
from cape.formats.runtime import RuntimeTarget

__all__ = [
    "COMPRESS_LEVEL",
    "MAX_BUNDLE_BYTES",
    "Bundle",
    "RuntimeTarget",
    "build_bundle",
    "default_cache_dir",
    "pip_command",
]

#: The largest bundle the server accepts (protocol.md): refused here before any upload.
MAX_BUNDLE_BYTES: int = BundleLimits().max_bundle_bytes
COMPRESS_LEVEL: Final = 6
REQUIREMENTS: Final = "requirements.txt"
ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)
FILE_MODE: Final = stat.S_IFREG | 0o644
_UNIX: Final = 3
_SKIP_DIRS: Final = frozenset(
    {"__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
)
_SKIP_FILES: Final = frozenset({".DS_Store"})
_SKIP_SUFFIXES: Final = (".pyc",)
_CACHE_FORMAT: Final = 1
_MANIFEST: Final = "manifest.json"
_SITE: Final = "site"
# Settings that would send pip's output somewhere other than our target directory.
_PIP_LOCATION_ENV: Final = ("PIP_USER", "PIP_PREFIX", "PIP_ROOT", "PIP_TARGET")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Bundle:
    """A checked bundle, ready to upload."""

    data: bytes
    checksum: str
    """SHA-256 of ``data``, lowercase hex."""
    files: int
    vendored: tuple[str, ...]
    """``name==version`` of every distribution installed from ``requirements.txt``, sorted."""
    source: Path


def default_cache_dir() -> Path:
    """Where vendored requirements are cached.

    ``$CAPE_CACHE_DIR/vendor``, else ``$XDG_CACHE_HOME/cape/vendor``, else
    ``~/.cache/cape/vendor``.
    """
    cape_cache = os.environ.get("CAPE_CACHE_DIR")
    if cape_cache:
        return Path(cape_cache) / "vendor"
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and Path(xdg).is_absolute():  # the XDG spec says to ignore relative values
        return Path(xdg) / "cape" / "vendor"
    return Path.home() / ".cache" / "cape" / "vendor"


def build_bundle(
    path: Path,
    *,
    vendor: bool = True,
    target: RuntimeTarget | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> Bundle:
    """The bundle for ``path``: a function folder (zipped here) or a ``.zip`` (as it is).

    ``target`` defaults to this interpreter (:meth:`RuntimeTarget.local`); pass the server's
    ``GET /v1/runtime`` answer. ``cache_dir`` defaults to :func:`default_cache_dir`.

    Raises:
        CapeError: unreadable paths, symlinks or special files, an empty folder, a failed pip
            install, or a clash between the folder's files and installed requirements.
        FormatError: no ``app.py`` or no ``cape_handler`` in it, or an invalid zip.
        LimitExceededError: over :data:`MAX_BUNDLE_BYTES` or another bundle limit.
    """
    report = progress or (lambda _message: None)
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CapeError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        return _build_folder(path, vendor, target, cache_dir, report)
    if stat.S_ISREG(mode) and path.suffix.lower() == ".zip":
        return _passthrough(path, report)
    raise CapeError(f"{path} is neither a folder nor a .zip file")


# --------------------------------------------------------------------------- zip files


def _limits() -> BundleLimits:
    return BundleLimits(max_bundle_bytes=MAX_BUNDLE_BYTES)


def _check_size(size: int) -> None:
    if size > MAX_BUNDLE_BYTES:
        raise LimitExceededError("bundle size in bytes", MAX_BUNDLE_BYTES, size)


def _inspect(data: bytes, source: Path) -> int:
    try:
        return inspect_bundle(data, _limits()).files
    except LimitExceededError:
        raise
    except FormatError as exc:
        raise FormatError(f"{source}: {exc}") from None


def _passthrough(path: Path, report: Progress) -> Bundle:
    try:
        _check_size(path.stat().st_size)
        data = path.read_bytes()
    except OSError as exc:
        raise CapeError(f"cannot read {path}: {exc.strerror or exc}") from None
    _check_size(len(data))
    files = _inspect(data, path)
    checksum = hashlib.sha256(data).hexdigest()
    report(f"Using {path} as it is: {files} files, {len(data)} bytes")
    return Bundle(data=data, checksum=checksum, files=files, vendored=(), source=path)


# --------------------------------------------------------------------------- folders


def _walk(root: Path) -> dict[str, Path]:
    """Regular files under ``root`` by POSIX relative path, skipping caches and VCS data."""
    found: dict[str, Path] = {}
    pending: list[tuple[Path, str]] = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        try:
            with os.scandir(directory) as scan:
                entries = list(scan)
        except OSError as exc:
            raise CapeError(f"cannot read {directory}: {exc.strerror or exc}") from None
        for entry in entries:
            name, full = entry.name, Path(entry.path)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                raise CapeError(f"{full} has a name that is not valid UTF-8") from None
            try:
                mode = entry.stat(follow_symlinks=False).st_mode
            except OSError as exc:
                raise CapeError(f"cannot read {full}: {exc.strerror or exc}") from None
            if stat.S_ISLNK(mode):
                raise CapeError(
                    f"{full} is a symbolic link; a bundle holds only regular files "
                    "(replace the link with a copy of its target)"
                )
            if stat.S_ISDIR(mode):
                if name not in _SKIP_DIRS:
                    pending.append((full, f"{prefix}{name}/"))
            elif stat.S_ISREG(mode):
                if name not in _SKIP_FILES and not name.endswith(_SKIP_SUFFIXES):
                    found[prefix + name] = full
            else:
                raise CapeError(f"{full} is a special file (not a regular file or folder)")
    return found


def _folders(names: Iterable[str]) -> dict[str, str]:
    """Every folder that holds one of ``names``, case-folded, with its spelling."""
    return {
        folder.casefold(): folder
        for name in names
        for folder in (name.rsplit("/", i)[0] for i in range(1, name.count("/") + 1))
    }


def _check_clashes(folder: Path, own: Iterable[str], vendored: Iterable[str]) -> None:
    """Refuse paths that both sides claim (case-insensitively, as the enclave's check does)."""
    own_files = {name.casefold(): name for name in own}
    own_folders = _folders(own_files.values())
    vendored_files = {name.casefold() for name in vendored}
    vendored_folders = set(_folders(vendored_files))
    clashes = sorted(
        {own_files[key] for key in own_files.keys() & (vendored_files | vendored_folders)}
        | {own_folders[key] for key in own_folders.keys() & vendored_files}
    )
    if clashes:
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise CapeError(
            f"{folder / clashes[0]} clashes with a file installed from {REQUIREMENTS}{more}: "
            "remove it from the folder, or deploy with --no-vendor"
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CapeError(f"cannot read {path}: {exc.strerror or exc}") from None


def _zip(files: list[tuple[str, Path]], stored: frozenset[str]) -> tuple[bytes, set[str]]:
    """The zip of ``files`` (sorted), and the names whose deflate ratio is over the limit."""
    max_ratio = _limits().max_ratio
    too_compressible: set[str] = set()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, path in files:
            info = zipfile.ZipInfo(name, date_time=ZIP_EPOCH)
            info.create_system = _UNIX
            info.external_attr = FILE_MODE << 16
            method = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            archive.writestr(info, _read(path), compress_type=method, compresslevel=COMPRESS_LEVEL)
            if info.file_size > max_ratio * max(info.compress_size, 1):
                too_compressible.add(name)
            _check_size(buffer.tell())
    return buffer.getvalue(), too_compressible


def _build_folder(
    folder: Path,
    vendor: bool,
    target: RuntimeTarget | None,
    cache_dir: Path | None,
    report: Progress,
) -> Bundle:
    own = _walk(folder)
    if not own:
        raise CapeError(f"{folder} has no files")
    if "app.py" not in own:
        raise FormatError(f"{folder} has no app.py at its top level")
    files = dict(own)
    vendored: tuple[str, ...] = ()
    requirements = own.get(REQUIREMENTS)
    if vendor and requirements is not None and _has_requirements(_read(requirements)):
        site, vendored = _vendor(
            folder,
            _read(requirements),
            target or RuntimeTarget.local(),
            cache_dir or default_cache_dir(),
            report,
        )
        installed = _walk(site)
        _check_clashes(folder, own, installed)
        files.update(installed)

    limits = _limits()
    if len(files) > limits.max_files:
        raise LimitExceededError("bundle file count", limits.max_files, len(files))
    ordered = sorted(files.items())
    data, too_compressible = _zip(ordered, frozenset())
    if too_compressible:  # stored instead: the enclave refuses extreme ratios (zip bombs)
        data, _ = _zip(ordered, frozenset(too_compressible))
    count = _inspect(data, folder)
    checksum = hashlib.sha256(data).hexdigest()
    report(f"Bundled {count} files from {folder}: {len(data)} bytes, sha256 {checksum[:12]}")
    return Bundle(data=data, checksum=checksum, files=count, vendored=vendored, source=folder)


# --------------------------------------------------------------------------- vendoring


def _has_requirements(text: bytes) -> bool:
    lines = (line.strip() for line in text.decode("utf-8", "replace").splitlines())
    return any(line and not line.startswith("#") for line in lines)


def pip_command(target: RuntimeTarget, site: Path, requirements: Path) -> list[str]:
    """The pip invocation that installs ``requirements`` into ``site`` for ``target``.

    No index options: pip's own configuration and ``PIP_*`` environment choose the index.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--disable-pip-version-check",
        "--no-input",
        "--no-compile",
        "--no-warn-script-location",
        f"--target={site}",
        "--only-binary=:all:",
        f"--python-version={target.python_version}",
        f"--implementation={target.implementation}",
        f"--abi={target.abi}",
    ]
    command += [f"--platform={tag}" for tag in target.platforms]
    return [*command, "-r", str(requirements)]


def _cache_key(requirements: bytes, target: RuntimeTarget) -> str:
    material = {
        "format": _CACHE_FORMAT,
        "requirements": hashlib.sha256(requirements).hexdigest(),
        "target": target.to_json(),
    }
    encoded = json.dumps(material, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def _pip_error(stderr: str, stdout: str) -> str:
    """The last meaningful line pip printed, without its ``ERROR:`` prefix."""
    lines = [line.strip() for line in (stderr or stdout).splitlines() if line.strip()]
    errors = [
        line
        for line in lines
        if line.startswith("ERROR:") and "for help visit" not in line  # ResolutionImpossible
    ]
    useful = [line for line in lines if not line.startswith(("[notice]", "WARNING:"))]
    line = (errors or useful or ["pip failed without saying why"])[-1]
    line = line.removeprefix("ERROR:").strip()
    return line if len(line) <= 300 else line[:297] + "..."


def _installed(site: Path) -> tuple[str, ...]:
    found = []
    for metadata in site.glob("*.dist-info/METADATA"):
        with metadata.open("rb") as handle:
            headers = email.parser.BytesHeaderParser().parse(handle)
        found.append(f"{headers.get('Name', metadata.parent.name)}=={headers.get('Version', '?')}")
    return tuple(sorted(found, key=str.casefold))


def _load_manifest(entry: Path) -> tuple[str, ...] | None:
    try:
        manifest = json.loads((entry / _MANIFEST).read_text(encoding="utf-8"))
        installed = manifest["installed"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(installed, list) or not all(isinstance(i, str) for i in installed):
        return None
    if not (entry / _SITE).is_dir():
        return None
    return tuple(installed)


def _install(folder: Path, target: RuntimeTarget, site: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in _PIP_LOCATION_ENV}
    # Absolute paths: pip runs in the folder, so a relative `cape deploy DIR` (or cache
    # directory) would otherwise be looked up relative to DIR itself.
    command = pip_command(target, site.absolute(), folder.absolute() / REQUIREMENTS)
    try:
        result = subprocess.run(
            command,
            cwd=folder,  # local paths in requirements.txt are relative to the folder
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            check=False,
        )
    except OSError as exc:
        raise CapeError(f"cannot run pip ({sys.executable}): {exc.strerror or exc}") from None
    if result.returncode != 0:
        where = f"Python {target.python_version} ({target.abi}, {target.platforms[0]})"
        raise CapeError(
            f"pip could not install {folder / REQUIREMENTS} as binary wheels for {where}: "
            f"{_pip_error(result.stderr, result.stdout)}"
        )


def _vendor(
    folder: Path,
    requirements: bytes,
    target: RuntimeTarget,
    cache_dir: Path,
    report: Progress,
) -> tuple[Path, tuple[str, ...]]:
    """The installed requirements (from the cache, else installed into it) and their names."""
    entry = cache_dir / _cache_key(requirements, target)
    installed = _load_manifest(entry)
    if installed is not None:
        report(f"Using the cached install of {REQUIREMENTS} ({len(installed)} packages)")
        return entry / _SITE, installed
    report(
        f"Installing {REQUIREMENTS} for Python {target.python_version} "
        f"({target.abi}, {target.platforms[0]}) with pip"
    )
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    except OSError as exc:
        raise CapeError(f"cannot use the cache {cache_dir}: {exc.strerror or exc}") from None
    try:
        site = staging / _SITE
        _install(folder, target, site)
        site.mkdir(exist_ok=True)  # pip leaves nothing behind for wheel-less requirements
        shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts: no use in a sandbox
        for cache in sorted(site.rglob("__pycache__"), reverse=True):
            shutil.rmtree(cache, ignore_errors=True)
        installed = _installed(site)
        manifest = {"format": _CACHE_FORMAT, "target": target.to_json(), "installed": installed}
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if _load_manifest(entry) is None:  # a broken entry (removed by hand?) is replaced
            shutil.rmtree(entry, ignore_errors=True)
        try:
            staging.rename(entry)
        except OSError:
            if _load_manifest(entry) is None:  # lost no race: a real failure
                raise
        else:
            report(f"Installed {len(installed)} packages: {', '.join(installed) or 'none'}")
            return entry / _SITE, installed
    except OSError as exc:
        raise CapeError(f"cannot write the cache {cache_dir}: {exc.strerror or exc}") from None
    finally:
        with contextlib.suppress(OSError):
            if staging.exists():
                shutil.rmtree(staging)
    # Another build installed the same requirements first: use its entry.
    cached = _load_manifest(entry)
    if cached is None:
        raise CapeError(f"the cache entry {entry} vanished while in use")
    return entry / _SITE, cached
