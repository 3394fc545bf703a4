"""DirectoryBlobStore: atomic, durable, private, and keys that cannot name a path."""

from __future__ import annotations

import io
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cape.errors import LimitExceededError
from cape.host.errors import NotFoundError
from cape.host.ids import new_id
from cape.host.store.blobs import DirectoryBlobStore, check_key


@pytest.fixture
def blobs(tmp_path: Path) -> DirectoryBlobStore:
    return DirectoryBlobStore(tmp_path / "blobs")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _temp_files(blobs: DirectoryBlobStore) -> list[Path]:
    return list((blobs.root / ".tmp").iterdir())


def test_put_and_get_round_trip(blobs: DirectoryBlobStore) -> None:
    key = new_id()
    assert blobs.put(key, b"ciphertext") == 10
    assert blobs.get(key) == b"ciphertext"
    with blobs.open(key) as f:
        assert f.read() == b"ciphertext"
    assert blobs.exists(key)
    assert blobs.size(key) == 10
    assert list(blobs.keys()) == [key]


def test_layout_is_sharded_by_the_first_two_characters(blobs: DirectoryBlobStore) -> None:
    key = new_id()
    blobs.put(key, b"x")
    assert (blobs.root / key[:2] / key).read_bytes() == b"x"


def test_put_stream_takes_chunks_and_file_objects(blobs: DirectoryBlobStore) -> None:
    data = os.urandom(3 * (1 << 20) + 17)
    a, b, c = new_id(), new_id(), new_id()
    assert blobs.put_stream(a, (data[i : i + 4096] for i in range(0, len(data), 4096))) == len(data)
    assert blobs.put_stream(b, io.BytesIO(data)) == len(data)
    assert blobs.put_stream(c, []) == 0
    assert blobs.get(a) == blobs.get(b) == data
    assert blobs.get(c) == b""


def test_put_stream_refuses_bytes_and_text(blobs: DirectoryBlobStore) -> None:
    with pytest.raises(TypeError):
        blobs.put_stream(new_id(), b"not chunks")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        blobs.put_stream(new_id(), io.StringIO("text"))  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        blobs.put_stream(new_id(), ["text"])  # type: ignore[list-item]
    assert list(blobs.keys()) == []
    assert _temp_files(blobs) == []


def test_directories_are_0700_and_files_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        blobs = DirectoryBlobStore(tmp_path / "blobs")
        key = new_id()
        blobs.put(key, b"x")
    finally:
        os.umask(old)
    assert _mode(blobs.root) == 0o700
    assert _mode(blobs.root / ".tmp") == 0o700
    assert _mode(blobs.root / key[:2]) == 0o700
    assert _mode(blobs.root / key[:2] / key) == 0o600


def test_an_existing_key_is_never_overwritten(blobs: DirectoryBlobStore) -> None:
    key = new_id()
    blobs.put(key, b"first")
    with pytest.raises(FileExistsError):
        blobs.put(key, b"second")
    assert blobs.get(key) == b"first"
    assert _temp_files(blobs) == []


@pytest.mark.parametrize(
    "key",
    [
        "",
        "short",
        "../../../../etc/passwd",
        "aaaaaaaaaaaaaaaaaaaaa/",
        "/aaaaaaaaaaaaaaaaaaaaaa",
        "..aaaaaaaaaaaaaaaaaaaa",
        ".tmpaaaaaaaaaaaaaaaaaa",
        "aaaaaaaaaaaaaaaaaaaaa\x00",
        "aaaaaaaaaaaaaaaaaaaaa\u0661",
        "a" * 65,
    ],
)
def test_keys_that_could_name_a_path_are_refused(blobs: DirectoryBlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        check_key(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        blobs.put(key, b"x")
    with pytest.raises(ValueError, match="invalid blob key"):
        blobs.get(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        blobs.delete(key)


def test_missing_blob_is_not_found(blobs: DirectoryBlobStore) -> None:
    with pytest.raises(NotFoundError):
        blobs.get(new_id())
    with pytest.raises(NotFoundError):
        blobs.size(new_id())
    with pytest.raises(NotFoundError):
        blobs.modified_at(new_id())
    assert not blobs.exists(new_id())
    assert blobs.delete(new_id()) is False


def test_delete_removes_the_blob(blobs: DirectoryBlobStore) -> None:
    key = new_id()
    blobs.put(key, b"x")
    assert blobs.delete(key) is True
    assert not blobs.exists(key)
    assert list(blobs.keys()) == []


def test_size_limit_stores_nothing(blobs: DirectoryBlobStore) -> None:
    key = new_id()
    with pytest.raises(LimitExceededError):
        blobs.put_stream(key, [b"x" * 600, b"x" * 600], max_bytes=1000)
    assert not blobs.exists(key)
    assert _temp_files(blobs) == []
    assert blobs.put_stream(key, [b"x" * 500, b"x" * 500], max_bytes=1000) == 1000


def test_a_failing_source_stores_nothing(blobs: DirectoryBlobStore) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"partial"
        raise ConnectionResetError("client went away")

    key = new_id()
    with pytest.raises(ConnectionResetError):
        blobs.put_stream(key, chunks())
    assert not blobs.exists(key)
    assert _temp_files(blobs) == []


def test_put_fsyncs_the_file_before_the_rename_and_the_directory_after(
    blobs: DirectoryBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []
    real_fsync, real_rename = os.fsync, os.rename

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def rename(src: Path, dst: Path) -> None:
        events.append("rename")
        real_rename(src, dst)

    blobs.put(new_id(), b"warm")  # the shard directory may need creating the first time
    key = new_id()
    while key[:2] == next(iter(blobs.keys()))[:2]:
        key = new_id()
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    blobs.put(key, b"durable")
    # file data, new shard directory's entry in root, the rename, the rename's directory
    assert events == ["fsync-file", "fsync-dir", "rename", "fsync-dir"]
    events.clear()
    other = key[:2] + new_id()[2:]
    blobs.put(other, b"same shard")
    assert events == ["fsync-file", "rename", "fsync-dir"]


def test_sweep_temp_removes_unfinished_writes(blobs: DirectoryBlobStore) -> None:
    key = new_id()
    blobs.put(key, b"kept")
    for name in ("a", "b", "c"):
        (blobs.root / ".tmp" / name).write_bytes(b"half a blob")
    assert blobs.sweep_temp() == 3
    assert _temp_files(blobs) == []
    assert blobs.get(key) == b"kept"


def test_sweep_temp_with_an_age_spares_fresh_files(blobs: DirectoryBlobStore) -> None:
    old = blobs.root / ".tmp" / "old"
    old.write_bytes(b"x")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    (blobs.root / ".tmp" / "fresh").write_bytes(b"x")
    assert blobs.sweep_temp(min_age_s=600) == 1
    assert [p.name for p in _temp_files(blobs)] == ["fresh"]


def test_keys_ignore_foreign_files(blobs: DirectoryBlobStore) -> None:
    key = new_id()
    blobs.put(key, b"x")
    (blobs.root / "README").write_text("not a blob")
    (blobs.root / key[:2] / "notes.txt").write_text("not a blob")
    (blobs.root / key[:2] / ("zz" + key[2:])).write_text("in the wrong shard")
    (blobs.root / ".tmp" / new_id()).write_bytes(b"unfinished")
    assert list(blobs.keys()) == [key]


def test_reopening_keeps_blobs(tmp_path: Path) -> None:
    key = new_id()
    DirectoryBlobStore(tmp_path / "b").put(key, b"persisted")
    assert DirectoryBlobStore(tmp_path / "b").get(key) == b"persisted"
