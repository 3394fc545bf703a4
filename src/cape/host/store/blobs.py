"""The blob store: encrypted function bundles, stored as opaque bytes under random keys.

The host only ever stores ciphertext here (DESIGN.md invariant 1); it cannot read what it
keeps. :class:`DirectoryBlobStore` is the local backend of ``cape serve``:

- a blob lives at ``root/<key[:2]>/<key>``, written first to ``root/.tmp/<random>``, fsynced,
  renamed into place and the directory fsynced, so a blob is either wholly there and durable
  or absent — never partial under its key;
- keys are validated (:data:`KEY_PATTERN`: letters and digits only), so no key can name a
  path outside the store;
- directories are 0700 and files 0600: only the service's user reads them.

An S3 backend (production, DESIGN.md "Nitro") fits the same interface: ``put_stream`` as a
multipart upload (S3 makes an object visible only once complete, which gives the same
atomicity), ``keys`` as a paginated ``ListObjectsV2`` and ``sweep_temp`` as aborting stale
multipart uploads. It is not written yet.
"""

from __future__ import annotations

import abc
import contextlib
import os
import re
import stat
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Final

from cape._internal.timefile import fsync_dir
from cape.errors import LimitExceededError
from cape.host.errors import NotFoundError
from cape.host.ids import new_id

__all__ = [
    "CHUNK_BYTES",
    "KEY_PATTERN",
    "BlobStore",
    "BlobWriter",
    "DirectoryBlobStore",
    "check_key",
]

KEY_PATTERN: Final = re.compile(r"[A-Za-z0-9]{16,64}")
"""What a blob key must match in full (our keys are 22-character ids)."""

CHUNK_BYTES: Final = 1 << 20
"""How much :meth:`BlobStore.put_stream` reads from a file object at a time."""

TEMP_DIR_NAME: Final = ".tmp"


def check_key(key: object) -> str:
    """Return ``key`` if it is a valid blob key, else raise ``ValueError``.

    Keys are made by the host, never taken from a request, so a bad one is a bug.
    """
    if isinstance(key, str) and key.isascii() and KEY_PATTERN.fullmatch(key):
        return key
    raise ValueError("invalid blob key")


def _chunks_of(source: Iterable[bytes] | BinaryIO) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview | str):
        raise TypeError("pass an iterable of bytes chunks or a binary file, not bytes")
    read = getattr(source, "read", None)
    if callable(read):
        while chunk := read(CHUNK_BYTES):
            if not isinstance(chunk, bytes):
                raise TypeError("the file object must be opened in binary mode")
            yield chunk
        return
    for chunk in source:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise TypeError("chunks must be bytes")
        yield bytes(chunk)


class BlobWriter(abc.ABC):
    """One blob being written: :meth:`write` pieces, then :meth:`commit` or :meth:`abort`.

    Each call does a bounded amount of work and returns: the writer never waits for its
    bytes, so a client that sends them slowly holds no thread (the API writes a deploy's
    chunks on a dedicated executor as they arrive)."""

    @abc.abstractmethod
    def write(self, chunk: bytes) -> None:
        """Append ``chunk``. Raises LimitExceededError past the writer's ``max_bytes``."""

    @abc.abstractmethod
    def commit(self) -> int:
        """Make the blob durable under its key; return its size."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Discard what was written (idempotent; nothing is stored under the key)."""


class BlobStore(abc.ABC):
    """Opaque bytes by key (the ``BlobStore`` seam of DESIGN.md)."""

    @abc.abstractmethod
    def begin(self, key: str, *, max_bytes: int | None = None) -> BlobWriter:
        """Start writing the blob ``key``.

        Raises:
            FileExistsError: ``key`` is taken (keys are never reused).
        """

    def put_stream(
        self, key: str, chunks: Iterable[bytes] | BinaryIO, *, max_bytes: int | None = None
    ) -> int:
        """Store the concatenated chunks under ``key`` atomically and durably; return the size.

        On return the blob is durable. On any error nothing is stored under ``key``.

        Raises:
            FileExistsError: ``key`` is taken (keys are never reused).
            LimitExceededError: more than ``max_bytes`` bytes arrived.
        """
        source = _chunks_of(chunks)  # type errors before anything is created
        writer = self.begin(key, max_bytes=max_bytes)
        try:
            for chunk in source:
                writer.write(chunk)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    def put(self, key: str, data: bytes) -> int:
        """:meth:`put_stream` for bytes in memory."""
        return self.put_stream(key, [data])

    @abc.abstractmethod
    def open(self, key: str) -> BinaryIO:
        """The blob for reading. Raises NotFoundError if absent."""

    def get(self, key: str) -> bytes:
        """The whole blob. Raises NotFoundError if absent."""
        with self.open(key) as f:
            return f.read()

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the blob durably; True if it existed."""

    @abc.abstractmethod
    def keys(self) -> Iterator[str]:
        """Every stored key, in no particular order."""

    @abc.abstractmethod
    def sweep_temp(self, *, min_age_s: float = 0.0) -> int:
        """Remove unfinished writes at least ``min_age_s`` old; return how many.

        With the default, call it only while no write is in progress (at startup).
        """

    @abc.abstractmethod
    def modified_at(self, key: str) -> float:
        """When the blob was stored (POSIX seconds). Raises NotFoundError if absent."""

    def exists(self, key: str) -> bool:
        try:
            self.open(key).close()
        except NotFoundError:
            return False
        return True

    def check(self) -> None:
        """Raise :class:`OSError` unless the store can be reached (a node's readiness)."""
        next(iter(self.keys()), None)


def _private_dir(path: Path) -> bool:
    """Create ``path`` as a 0700 directory if absent; True if it was created."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        if not path.is_dir():
            raise
        return False
    path.chmod(0o700)  # mkdir's mode is filtered by the umask
    return True


class _FileWriter(BlobWriter):
    """A temp file under ``root/.tmp``, fsynced and renamed into place on commit."""

    def __init__(self, root: Path, temp: Path, final: Path, max_bytes: int | None) -> None:
        self._root, self._temp, self._final, self._max_bytes = root, temp, final, max_bytes
        self.size = 0
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self._out: BinaryIO | None = os.fdopen(fd, "wb")

    def _file(self) -> BinaryIO:
        if self._out is None:
            raise ValueError("this blob writer is finished")
        return self._out

    def write(self, chunk: bytes) -> None:
        out = self._file()
        if self._max_bytes is not None and self.size + len(chunk) > self._max_bytes:
            raise LimitExceededError("blob size", self._max_bytes)
        out.write(chunk)
        self.size += len(chunk)

    def commit(self) -> int:
        out = self._file()
        try:
            out.flush()
            os.fsync(out.fileno())
            out.close()
            self._out = None
            if _private_dir(self._final.parent):
                fsync_dir(self._root)
            if self._final.exists():
                raise FileExistsError(f"blob {self._final.name} exists")
            os.rename(self._temp, self._final)
            fsync_dir(self._final.parent)
        except BaseException:
            self.abort()
            raise
        return self.size

    def abort(self) -> None:
        if self._out is not None:
            with contextlib.suppress(OSError):
                self._out.close()
            self._out = None
        with contextlib.suppress(FileNotFoundError):
            self._temp.unlink()


class DirectoryBlobStore(BlobStore):
    """Blobs as files under ``root`` (created 0700 if absent)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)
        self._temp = self.root / TEMP_DIR_NAME
        if _private_dir(self._temp):
            fsync_dir(self.root)

    def check(self) -> None:
        if not (self.root.is_dir() and self._temp.is_dir()):
            raise FileNotFoundError(f"blob directory {self.root} is missing")

    def _path(self, key: str) -> Path:
        key = check_key(key)
        return self.root / key[:2] / key

    def begin(self, key: str, *, max_bytes: int | None = None) -> BlobWriter:
        final = self._path(key)
        if final.exists():
            raise FileExistsError(f"blob {key} exists")
        return _FileWriter(self.root, self._temp / new_id(), final, max_bytes)

    def open(self, key: str) -> BinaryIO:
        try:
            return self._path(key).open("rb")
        except FileNotFoundError:
            raise NotFoundError("no such blob") from None

    def delete(self, key: str) -> bool:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    def keys(self) -> Iterator[str]:
        for shard in sorted(self.root.iterdir()):
            if shard.name == TEMP_DIR_NAME or len(shard.name) != 2 or not shard.is_dir():
                continue
            for entry in sorted(shard.iterdir()):
                name = entry.name
                if KEY_PATTERN.fullmatch(name) and name[:2] == shard.name:
                    yield name

    def sweep_temp(self, *, min_age_s: float = 0.0) -> int:
        removed = 0
        cutoff = time.time() - min_age_s
        for entry in self._temp.iterdir():
            try:
                info = entry.lstat()
                if stat.S_ISDIR(info.st_mode) or info.st_mtime > cutoff:
                    continue
                entry.unlink()
            except FileNotFoundError:
                continue
            removed += 1
        if removed:
            fsync_dir(self._temp)
        return removed

    def modified_at(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            raise NotFoundError("no such blob") from None

    def size(self, key: str) -> int:
        """The blob's size in bytes. Raises NotFoundError if absent."""
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFoundError("no such blob") from None
