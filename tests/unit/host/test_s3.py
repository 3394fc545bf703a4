"""S3BlobStore against moto's S3 server over HTTP on loopback (tests/services.py): the
directory store's contract (whole or absent, never overwritten, keys that cannot escape the
prefix), multipart uploads fed from the chunks, aborted on any failure and swept by age."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from cape.errors import FormatError, LimitExceededError
from cape.host.errors import NotFoundError
from cape.host.ids import new_id
from cape.host.store import s3 as s3_module
from cape.host.store.backends import open_blob_store
from cape.host.store.s3 import ObjectStoreError, S3BlobStore, parse_s3_url
from tests.services import MotoS3

SMALL_PART = 5 << 20  # S3's smallest part; the tests use it to keep uploads small


@pytest.fixture
def bucket(moto_s3: MotoS3) -> str:
    return moto_s3.new_bucket()


@pytest.fixture
def blobs(moto_s3: MotoS3, bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3BlobStore:
    monkeypatch.setattr(s3_module, "PART_BYTES", SMALL_PART)
    store = open_blob_store(f"s3://{bucket}/cape/blobs", endpoint_url=moto_s3.endpoint_url)
    assert isinstance(store, S3BlobStore)
    return store


def test_put_get_list_delete_round_trip(blobs: S3BlobStore, moto_s3: MotoS3, bucket: str) -> None:
    key = new_id()
    assert blobs.put(key, b"ciphertext") == 10
    assert blobs.get(key) == b"ciphertext"
    with blobs.open(key) as f:
        assert f.read() == b"ciphertext"
    assert blobs.exists(key)
    assert list(blobs.keys()) == [key]
    assert [name for name, _ in moto_s3.objects(bucket)] == [f"cape/blobs/{key}"]
    assert blobs.delete(key) is True
    assert not blobs.exists(key) and blobs.delete(key) is False
    assert list(blobs.keys()) == []


def test_a_large_blob_goes_in_parts_and_streams_back(
    blobs: S3BlobStore, moto_s3: MotoS3, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(2 * SMALL_PART + 12345)
    parts: list[int] = []
    original = blobs._part

    def counting(name: str, upload_id: str, number: int, chunk: bytes | bytearray) -> object:
        parts.append(len(chunk))
        return original(name, upload_id, number, chunk)

    monkeypatch.setattr(blobs, "_part", counting)
    key = new_id()
    chunks = (data[i : i + 65536] for i in range(0, len(data), 65536))
    assert blobs.put_stream(key, chunks) == len(data)
    assert parts == [SMALL_PART, SMALL_PART, 12345]  # one part buffered at a time
    with blobs.open(key) as f:
        assert f.read(1000) == data[:1000]
        assert f.read() == data[1000:]
    assert moto_s3.uploads(bucket) == []


def test_an_existing_key_is_never_overwritten(blobs: S3BlobStore) -> None:
    key = new_id()
    blobs.put(key, b"first")
    with pytest.raises(FileExistsError):
        blobs.put(key, b"second")
    assert blobs.get(key) == b"first"


def test_a_failing_source_aborts_the_upload(
    blobs: S3BlobStore, moto_s3: MotoS3, bucket: str
) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"x" * (SMALL_PART + 1)  # one part uploaded before the failure
        raise ConnectionResetError("client went away")

    key = new_id()
    with pytest.raises(ConnectionResetError):
        blobs.put_stream(key, chunks())
    assert not blobs.exists(key)
    assert moto_s3.uploads(bucket) == []
    assert list(moto_s3.objects(bucket)) == []


def test_the_size_limit_stores_nothing(blobs: S3BlobStore, moto_s3: MotoS3, bucket: str) -> None:
    key = new_id()
    with pytest.raises(LimitExceededError):
        blobs.put_stream(key, [b"x" * SMALL_PART, b"x" * SMALL_PART], max_bytes=SMALL_PART + 1)
    assert not blobs.exists(key) and moto_s3.uploads(bucket) == []
    assert blobs.put_stream(key, [b"x" * 500, b"x" * 500], max_bytes=1000) == 1000


def test_sweep_aborts_unfinished_uploads_older_than_the_threshold(
    blobs: S3BlobStore, moto_s3: MotoS3, bucket: str
) -> None:
    client = moto_s3.client()
    client.create_multipart_upload(Bucket=bucket, Key=f"cape/blobs/{new_id()}")
    client.create_multipart_upload(Bucket=bucket, Key=f"elsewhere/{new_id()}")  # not ours
    # moto reports one fixed "Initiated" time for every upload (2010-11-10T20:48:33Z), so the
    # store's clock is set to a minute after it: the uploads are then a minute old.
    initiated = client.list_multipart_uploads(Bucket=bucket)["Uploads"][0]["Initiated"]
    blobs.clock = lambda: float(initiated.timestamp() + 60)
    assert blobs.sweep_temp(min_age_s=3600) == 0  # a node may have it in flight
    assert len(moto_s3.uploads(bucket)) == 2
    assert blobs.sweep_temp(min_age_s=30) == 1
    assert [key.split("/")[0] for key in moto_s3.uploads(bucket)] == ["elsewhere"]


def test_keys_that_could_escape_the_prefix_are_refused(blobs: S3BlobStore) -> None:
    for key in ("../../etc/passwd", "a" * 21 + "/", "", "a" * 65):
        with pytest.raises(ValueError, match="invalid blob key"):
            blobs.put(key, b"x")
        with pytest.raises(ValueError, match="invalid blob key"):
            blobs.get(key)


def test_missing_blobs_and_foreign_objects(
    blobs: S3BlobStore, moto_s3: MotoS3, bucket: str
) -> None:
    with pytest.raises(NotFoundError):
        blobs.get(new_id())
    with pytest.raises(NotFoundError):
        blobs.modified_at(new_id())
    moto_s3.client().put_object(Bucket=bucket, Key="cape/blobs/not a key", Body=b"x")
    assert list(blobs.keys()) == []


def test_an_unreachable_or_missing_store_is_one_clear_error(moto_s3: MotoS3) -> None:
    missing = S3BlobStore.from_url("s3://no-such-bucket-here", endpoint_url=moto_s3.endpoint_url)
    with pytest.raises(ObjectStoreError, match="no bucket 'no-such-bucket-here'"):
        missing.check()
    with pytest.raises(ObjectStoreError, match="object store: put"):
        missing.put(new_id(), b"x")
    down = S3BlobStore.from_url("s3://b", endpoint_url="http://127.0.0.1:9")
    with pytest.raises(ObjectStoreError, match="object store"):
        down.put(new_id(), b"x")


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("s3://", "not an s3://BUCKET"),
        ("s3://bucket/p?x=1", "not an s3://BUCKET"),
        ("gs://bucket", "'gs' is not supported"),
    ],
)
def test_bad_blob_store_urls_are_refused(url: str, error: str) -> None:
    with pytest.raises(FormatError, match=error):
        open_blob_store(url)


def test_parse_s3_url() -> None:
    assert parse_s3_url("s3://bucket") == ("bucket", "")
    assert parse_s3_url("s3://bucket//a/b/") == ("bucket", "a/b")
