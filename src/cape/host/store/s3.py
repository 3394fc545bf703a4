"""The S3 blob store: function bundles as objects in an S3-compatible bucket (``s3://…``).

The same contract as :class:`~cape.host.store.blobs.DirectoryBlobStore`, for a cluster of
``cape serve`` nodes sharing one object store:

- a blob is the object ``<prefix>/<key>``; keys are validated as for the directory store, so no
  key names an object outside the prefix;
- a write (:meth:`S3BlobStore.begin`, which ``put_stream`` uses) is a multipart upload fed
  from the chunks as they arrive, one part (:data:`PART_BYTES`) buffered at a time, so memory
  stays bounded whatever the size; S3 makes an object visible only when the upload
  completes, so a blob is whole or absent, and
  ``CompleteMultipartUpload`` (or ``PutObject`` for a blob smaller than one part) returns only
  once the object is durably stored: the deploy's row is written after that (DESIGN.md
  invariant 7, :mod:`~cape.host.store.deploys`);
- an unfinished write is an unfinished multipart upload: any error aborts it, and
  :meth:`S3BlobStore.sweep_temp` aborts those a crashed node left, by listing them with an age
  threshold (several nodes share the bucket: never sweep with age 0 while any node serves);
- :meth:`S3BlobStore.open` streams the object's body; nothing is read ahead beyond a buffer.

Errors of the object store (network, credentials, missing bucket) are :class:`ObjectStoreError`,
an :class:`OSError` as the directory store's are, so the deploy path treats both alike.

boto3 is the ``aws`` extra; the endpoint URL is configurable for S3-compatible stores (MinIO,
Ceph, moto in the tests). Credentials come from boto3's usual chain (environment, profile,
instance role).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, Final
from urllib.parse import urlsplit

from cape.errors import FormatError, LimitExceededError
from cape.host.errors import NotFoundError
from cape.host.store.blobs import BlobStore, BlobWriter, check_key

__all__ = ["PART_BYTES", "ObjectStoreError", "S3BlobStore", "parse_s3_url"]

PART_BYTES: Final = 8 << 20
"""The multipart part size (S3's minimum is 5 MiB for every part but the last)."""


class ObjectStoreError(OSError):
    """The object store failed or refused a request (unreachable, denied, no such bucket)."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/prefix`` → ``(bucket, prefix)`` (prefix without slashes at the ends).

    Raises:
        FormatError: not an ``s3://`` URL with a bucket name.
    """
    parts = urlsplit(url)
    bucket = parts.netloc
    if parts.scheme != "s3" or not bucket or parts.query or parts.fragment:
        raise FormatError(f"blob store: {url[:100]!r} is not an s3://BUCKET[/PREFIX] URL")
    return bucket, parts.path.strip("/")


def _code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", ""))
    return ""


def _is_missing(exc: Exception) -> bool:
    return _code(exc) in {"404", "NoSuchKey", "NotFound"}


class _Body(io.RawIOBase):
    """A botocore streaming body as a raw stream (for :class:`io.BufferedReader`)."""

    def __init__(self, body: Any) -> None:
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._body.read(len(view))
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._body.close()
        super().close()


class _S3Writer(BlobWriter):
    """One blob being written: parts of :data:`PART_BYTES` go up as they fill (a multipart
    upload, started by the first full part); a blob smaller than one part is one ``PutObject``
    at :meth:`commit`. Nothing is visible under the key before the commit returns."""

    def __init__(self, store: S3BlobStore, name: str, max_bytes: int | None) -> None:
        self._store = store
        self._name = name
        self._max_bytes = max_bytes
        self._size = 0
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._done = False

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise ValueError("the blob writer is closed")
        self._size += len(chunk)
        if self._max_bytes is not None and self._size > self._max_bytes:
            raise LimitExceededError("blob size", self._max_bytes)
        self._buffer += chunk
        while len(self._buffer) >= PART_BYTES:
            self._upload(self._buffer[:PART_BYTES])
            del self._buffer[:PART_BYTES]

    def _upload(self, data: bytes | bytearray) -> None:
        store = self._store
        if self._upload_id is None:
            self._upload_id = store._call(
                "start upload", "create_multipart_upload", Bucket=store.bucket, Key=self._name
            )["UploadId"]
        number = len(self._parts) + 1
        self._parts.append(store._part(self._name, self._upload_id, number, data))

    def commit(self) -> int:
        store = self._store
        if self._upload_id is None:
            store._call(
                "put", "put_object", Bucket=store.bucket, Key=self._name, Body=bytes(self._buffer)
            )
        else:
            if self._buffer:
                self._upload(self._buffer)
            store._call(
                "complete upload",
                "complete_multipart_upload",
                Bucket=store.bucket,
                Key=self._name,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
            self._upload_id = None
        self._done = True
        self._buffer.clear()
        return self._size

    def abort(self) -> None:
        self._done = True
        self._buffer.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            with contextlib.suppress(Exception):
                self._store._client.abort_multipart_upload(
                    Bucket=self._store.bucket, Key=self._name, UploadId=upload_id
                )


class S3BlobStore(BlobStore):
    """Blobs as objects under ``s3://bucket/prefix`` (see the module docstring)."""

    def __init__(
        self, bucket: str, prefix: str = "", *, client: Any = None, endpoint_url: str | None = None
    ) -> None:
        if client is None:
            try:
                import boto3  # the aws extra
            except ImportError:
                raise FormatError(
                    "an s3:// blob store needs boto3: pip install 'cape[aws]'"
                ) from None
            client = boto3.client("s3", endpoint_url=endpoint_url)
        self._client = client
        self.clock: Callable[[], float] = time.time
        """POSIX seconds now (the sweep's age threshold counts from it)."""
        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None) -> S3BlobStore:
        bucket, prefix = parse_s3_url(url)
        return cls(bucket, prefix, endpoint_url=endpoint_url)

    def _name(self, key: str) -> str:
        return self.prefix + check_key(key)

    def _call(self, what: str, method: str, **kwargs: Any) -> Any:
        """One client call; the object store's failures as :class:`ObjectStoreError`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(**kwargs)
        except ClientError as exc:
            if _is_missing(exc):
                raise NotFoundError("no such blob") from None
            raise ObjectStoreError(f"object store: {what}: {_code(exc) or exc}") from None
        except BotoCoreError as exc:
            raise ObjectStoreError(f"object store: {what}: {exc}") from None

    def check(self) -> None:
        """Raise :class:`ObjectStoreError` unless the bucket is reachable (readiness)."""
        try:
            self._call("bucket", "head_bucket", Bucket=self.bucket)
        except NotFoundError:
            raise ObjectStoreError(f"object store: no bucket {self.bucket!r}") from None

    def begin(self, key: str, *, max_bytes: int | None = None) -> BlobWriter:
        name = self._name(key)
        if self.exists(key):
            raise FileExistsError(f"blob {key} exists")
        return _S3Writer(self, name, max_bytes)

    def _part(
        self, name: str, upload_id: str, number: int, data: bytes | bytearray
    ) -> dict[str, Any]:
        reply = self._call(
            "upload part",
            "upload_part",
            Bucket=self.bucket,
            Key=name,
            UploadId=upload_id,
            PartNumber=number,
            Body=bytes(data),
        )
        return {"ETag": reply["ETag"], "PartNumber": number}

    def open(self, key: str) -> BinaryIO:
        reply = self._call("get", "get_object", Bucket=self.bucket, Key=self._name(key))
        return io.BufferedReader(_Body(reply["Body"]), buffer_size=1 << 20)

    def delete(self, key: str) -> bool:
        name = self._name(key)
        if not self.exists(key):
            return False
        self._call("delete", "delete_object", Bucket=self.bucket, Key=name)
        return True

    def exists(self, key: str) -> bool:
        try:
            self._call("head", "head_object", Bucket=self.bucket, Key=self._name(key))
        except NotFoundError:
            return False
        return True

    def keys(self) -> Iterator[str]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call("list", "list_objects_v2", **kwargs)
            for item in page.get("Contents", ()):
                name = str(item["Key"]).removeprefix(self.prefix)
                with contextlib.suppress(ValueError):
                    yield check_key(name)
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def sweep_temp(self, *, min_age_s: float = 0.0) -> int:
        cutoff = self.clock() - min_age_s
        removed = 0
        markers: dict[str, str] = {}
        while True:
            page = self._call(
                "list uploads",
                "list_multipart_uploads",
                Bucket=self.bucket,
                Prefix=self.prefix,
                **markers,
            )
            for upload in page.get("Uploads", ()):
                initiated: dt.datetime = upload["Initiated"]
                if initiated.timestamp() > cutoff:
                    continue
                with contextlib.suppress(NotFoundError):
                    self._call(
                        "abort upload",
                        "abort_multipart_upload",
                        Bucket=self.bucket,
                        Key=upload["Key"],
                        UploadId=upload["UploadId"],
                    )
                    removed += 1
            if not page.get("IsTruncated"):
                return removed
            markers = {
                "KeyMarker": page.get("NextKeyMarker", ""),
                "UploadIdMarker": page.get("NextUploadIdMarker", ""),
            }

    def modified_at(self, key: str) -> float:
        reply = self._call("head", "head_object", Bucket=self.bucket, Key=self._name(key))
        stamp: dt.datetime = reply["LastModified"]
        return stamp.timestamp()
