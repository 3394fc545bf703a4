"""Function bundles: validate a zip without trusting anything in it (pure, no file I/O).

A bundle is a zip holding ``app.py`` that defines ``cape_handler``, at the root or inside the
zip's single top-level folder (Cape's CLI zips ``<folder>/<files>``). Nothing in a bundle is
trusted: entry names, declared sizes, compression ratios and file types are all checked, and
sizes are counted while decompressing rather than read from the headers.

Rules (each violation is a :class:`BundleError` (a :class:`~cape.errors.FormatError`) or a
:class:`~cape.errors.LimitExceededError` with a clear message; a :class:`BundleError` also
carries :attr:`BundleError.rule`, the same reason without any entry name, which is what the
enclave reports through the host):

- a readable zip; no encryption; stored or deflated entries only;
- names: relative, no ``..`` component, no backslashes, no drive letters or NUL, no duplicates
  (also after case folding, so an unpacked tree cannot shadow itself), valid UTF-8;
- names that unpack everywhere (issue 18, finding 8): each component at most
  :data:`MAX_NAME_BYTES` (NAME_MAX), the whole path at most :data:`MAX_PATH_BYTES` (PATH_MAX
  less room for the directory it is unpacked in), at most :data:`MAX_DEPTH` directories deep,
  and no name both a file and a directory (``lib`` and ``lib/x``, also after case folding);
- regular files and directories only: symlinks, devices and FIFOs are refused (a link could
  escape the unpack directory);
- at most ``max_files`` entries, ``max_unpacked_bytes`` in total, and a per-entry compression
  ratio of at most ``max_ratio`` (zip bombs);
- ``app.py`` defines ``cape_handler`` at module level (checked by parsing, never by importing:
  user code runs only inside the sandbox).
"""

from __future__ import annotations

import ast
import io
import posixpath
import stat
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO, TYPE_CHECKING

from cape.errors import FormatError, LimitExceededError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = [
    "MAX_DEPTH",
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "BundleError",
    "BundleInfo",
    "BundleLimits",
    "inspect_bundle",
    "open_bundle",
    "read_entry",
]

HANDLER_NAME = "cape_handler"
APP_FILE = "app.py"
_CHUNK = 1 << 20
#: NAME_MAX of Linux file systems: the longest file or directory name, in bytes.
MAX_NAME_BYTES = 255
#: PATH_MAX (4096) less 1 KiB for the directory a bundle is unpacked in (the enclave's work
#: directory and session folders, or ``/function`` in the sandbox).
MAX_PATH_BYTES = 3072
#: Folders deep: far beyond real code, well within what copying and walking a tree handles.
MAX_DEPTH = 64


class BundleError(FormatError):
    """A bundle that fails a rule; :attr:`rule` says which without naming any entry."""

    def __init__(self, rule: str, name: str | None = None) -> None:
        self.rule = f"bundle refused: {rule}"
        super().__init__(f"bundle entry {name!r}: {rule}" if name is not None else self.rule)


@dataclass(frozen=True)
class BundleLimits:
    """Defaults from protocol.md: 1 GB compressed, 2 GB unpacked, 10,000 files."""

    max_bundle_bytes: int = 1_000_000_000
    max_unpacked_bytes: int = 2_000_000_000
    max_files: int = 10_000
    max_ratio: int = 200
    max_app_py_bytes: int = 8 << 20


@dataclass(frozen=True)
class BundleInfo:
    """What validation found: where ``app.py`` is and how big the tree is."""

    root: str
    """The folder inside the zip that holds ``app.py`` ("" for the zip's root)."""
    files: int
    unpacked_bytes: int


def _check_name(name: str) -> PurePosixPath:
    if not name or "\x00" in name or "\\" in name:
        raise BundleError("an entry name is not allowed (empty, NUL or backslash)", name)
    path = PurePosixPath(name)
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise BundleError("an entry has an absolute path", name)
    if any(part in ("..", ".") for part in path.parts) or posixpath.normpath(name) != name.rstrip(
        "/"
    ):
        raise BundleError("an entry name is not a plain relative path", name)
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES for part in path.parts):
        raise BundleError(f"a file or folder name is longer than {MAX_NAME_BYTES} bytes", name)
    if len(name.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise BundleError(f"an entry's path is longer than {MAX_PATH_BYTES} bytes", name)
    if len(path.parts) > MAX_DEPTH + 1:
        raise BundleError(f"an entry lies more than {MAX_DEPTH} folders deep", name)
    return path


def _entry_kind(info: zipfile.ZipInfo) -> str:
    mode = info.external_attr >> 16
    # Only zips made on Unix carry a file type; many writers (Python's writestr among them)
    # leave the type bits empty, which means a plain file or directory.
    if info.create_system == 3 and stat.S_IFMT(mode):
        if stat.S_ISLNK(mode):
            return "symlink"
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            return "special file"
    return "directory" if info.is_dir() else "file"


class _ViewReader(io.RawIOBase):
    """A read-only, seekable file over a memoryview that never copies the whole buffer.

    ``io.BytesIO`` shares memory only with ``bytes``; given a bytearray or memoryview it copies.
    """

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view = view.cast("B") if view.format != "B" or view.ndim != 1 else view
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            target = offset
        elif whence == io.SEEK_CUR:
            target = self._pos + offset
        elif whence == io.SEEK_END:
            target = len(self._view) + offset
        else:
            raise ValueError(f"invalid whence ({whence})")
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = target
        return target

    def readinto(self, buffer: WriteableBuffer) -> int:
        self._check_open()
        with memoryview(buffer) as out, out.cast("B") as target:
            start = min(self._pos, len(self._view))
            count = min(len(target), len(self._view) - start)
            target[:count] = self._view[start : start + count]
        self._pos = start + count
        return count

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def close(self) -> None:
        if not self.closed:
            self._view.release()
        super().close()


def _reader(data: bytes | memoryview) -> IO[bytes]:
    if isinstance(data, bytes):
        return io.BytesIO(data)  # shares the bytes object's memory
    return io.BufferedReader(_ViewReader(memoryview(data)))


def open_bundle(data: bytes | memoryview, limits: BundleLimits) -> zipfile.ZipFile:
    """Open a bundle's zip without copying it (``data`` may be a view of a larger buffer)."""
    if len(data) > limits.max_bundle_bytes:
        raise LimitExceededError("bundle size in bytes", limits.max_bundle_bytes, len(data))
    try:
        return zipfile.ZipFile(_reader(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError) as exc:
        raise FormatError(f"bundle is not a valid zip file: {exc}") from None


def _check_entries(archive: zipfile.ZipFile, limits: BundleLimits) -> list[zipfile.ZipInfo]:
    entries = archive.infolist()
    if not entries:
        raise BundleError("the zip is empty")
    if len(entries) > limits.max_files:
        raise LimitExceededError("bundle file count", limits.max_files, len(entries))
    seen: set[str] = set()
    files: dict[str, str] = {}  # case-folded file path -> its name
    folders: dict[str, str] = {}  # case-folded folder path (explicit or implied) -> a name
    declared = 0
    for info in entries:
        if info.flag_bits & 0x1:
            raise BundleError("an entry is encrypted", info.filename)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise BundleError("an entry uses an unsupported compression", info.filename)
        path = _check_name(info.filename)
        kind = _entry_kind(info)
        if kind in ("symlink", "special file"):
            raise BundleError(f"an entry is a {kind}; only files and folders", info.filename)
        folded = info.filename.rstrip("/").casefold()
        if folded in seen:
            raise BundleError("duplicate entry names (ignoring case)", info.filename)
        seen.add(folded)
        _check_clash(path, kind, info.filename, files, folders)
        declared += info.file_size
        if declared > limits.max_unpacked_bytes:
            raise LimitExceededError(
                "bundle unpacked size in bytes", limits.max_unpacked_bytes, declared
            )
        if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
            raise LimitExceededError("bundle compression ratio", limits.max_ratio)
        if info.compress_size == 0 and info.file_size > 0:
            raise LimitExceededError("bundle compression ratio", limits.max_ratio)
    return entries


def _check_clash(
    path: PurePosixPath, kind: str, name: str, files: dict[str, str], folders: dict[str, str]
) -> None:
    """No name may be a file and a folder at once (``lib`` and ``lib/x``), ignoring case."""
    parts = [part.casefold() for part in path.parts]
    for depth in range(1, len(parts)):  # every parent is a folder
        parent = "/".join(parts[:depth])
        if parent in files:
            raise BundleError("a name is both a file and a folder", name)
        folders.setdefault(parent, name)
    full = "/".join(parts)
    if kind == "directory":
        if full in files:
            raise BundleError("a name is both a file and a folder", name)
        folders.setdefault(full, name)
    else:
        if full in folders:
            raise BundleError("a name is both a file and a folder", name)
        files[full] = name


def _find_root(entries: list[zipfile.ZipInfo]) -> str:
    names = {info.filename for info in entries if not info.is_dir()}
    if APP_FILE in names:
        return ""
    tops = {PurePosixPath(info.filename).parts[0] for info in entries}
    if len(tops) == 1:
        (top,) = tops
        if f"{top}/{APP_FILE}" in names:
            return top
    raise BundleError("no app.py at the root or inside the single top-level folder")


def read_entry(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: BundleLimits, budget: int
) -> bytes:
    """Decompress one entry, counting real bytes: headers may lie about sizes."""
    out = bytearray()
    try:
        with archive.open(info) as handle:
            while chunk := handle.read(_CHUNK):
                out += chunk
                if len(out) > budget:
                    raise LimitExceededError(
                        "bundle unpacked size in bytes", limits.max_unpacked_bytes
                    )
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise BundleError(f"an entry is corrupt ({type(exc).__name__})", info.filename) from None
    return bytes(out)


def _defines_handler(node: ast.stmt) -> bool:
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == HANDLER_NAME
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == HANDLER_NAME for t in node.targets)
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.target, ast.Name) and node.target.id == HANDLER_NAME
    if isinstance(node, ast.ImportFrom | ast.Import):
        return any((a.asname or a.name) == HANDLER_NAME for a in node.names)
    return False


def _check_handler(source: bytes) -> None:
    try:
        tree = ast.parse(source, filename=APP_FILE)
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None)
        where = f" (line {line})" if isinstance(line, int) else ""
        error = BundleError(f"app.py does not parse{where}")
        error.args = (f"app.py does not parse: {exc}",)  # the client's own check shows it
        raise error from None
    if not any(_defines_handler(node) for node in tree.body):
        raise BundleError("app.py does not define cape_handler at module level")


def inspect_bundle(data: bytes | memoryview, limits: BundleLimits | None = None) -> BundleInfo:
    """Validate a bundle without writing anything; returns where ``app.py`` is.

    ``data`` may be a memoryview (for example of a buffer decrypted in place): it is read
    without being copied.
    """
    limits = limits or BundleLimits()
    with open_bundle(data, limits) as archive:
        entries = _check_entries(archive, limits)
        root = _find_root(entries)
        app = archive.getinfo(f"{root}/{APP_FILE}" if root else APP_FILE)
        if app.file_size > limits.max_app_py_bytes:
            raise LimitExceededError("app.py size in bytes", limits.max_app_py_bytes)
        _check_handler(read_entry(archive, app, limits, limits.max_app_py_bytes))
        total = sum(info.file_size for info in entries)
        files = sum(1 for info in entries if not info.is_dir())
        return BundleInfo(root=root, files=files, unpacked_bytes=total)
