"""Content-addressed artifact store: local folder or S3.

Uploads stream into a temporary object while being hashed; only when the stream ends within the size cap is the
object moved (atomically) to its final key `sha256/<aa>/<hash>`. Identical bytes therefore share one key, and an
aborted or oversized upload leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterable, BinaryIO, Iterable, Iterator, Protocol
from urllib.parse import urlparse

from nba_core.errors import NBAError

from .settings import Settings

PAYLOAD_TOO_LARGE = "payload_too_large"
STORAGE_ERROR = "storage_error"
INSUFFICIENT_STORAGE = "insufficient_storage"
READ_CHUNK = 1024 * 1024
# Local downloads read this much per thread hop (os.pread): few hops, and the socket gets big writes.
LOCAL_READ_CHUNK = 4 * 1024 * 1024
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class PayloadTooLarge(NBAError):
    def __init__(self, max_bytes: int):
        super().__init__(PAYLOAD_TOO_LARGE, f"upload exceeds the limit of {max_bytes} bytes", http_status=413)
        self.max_bytes = max_bytes


class InsufficientStorage(NBAError):
    """The artifact store is full (ENOSPC/EDQUOT): 507, a condition for the operator, not a bug (was 500)."""

    def __init__(self, detail: str = "the artifact store is out of space; retry later"):
        super().__init__(INSUFFICIENT_STORAGE, detail, http_status=507)


def _map_no_space(e: OSError) -> NBAError | OSError:
    return InsufficientStorage() if e.errno in _NO_SPACE else e


@dataclass(frozen=True)
class StoredObject:
    key: str
    sha256: str
    size: int


def content_key(sha256_hex: str) -> str:
    return f"sha256/{sha256_hex[:2]}/{sha256_hex}"


class StreamWriter(Protocol):
    """An upload in progress: write() chunks, then commit() (or abort(); both are idempotent-safe)."""

    size: int

    def write(self, chunk: bytes) -> None: ...

    def commit(self) -> StoredObject: ...

    def abort(self) -> None: ...


class ArtifactStore(Protocol):
    def open_writer(self, *, max_bytes: int | None = None) -> StreamWriter: ...

    def put_stream(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject: ...

    async def aput_stream(self, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> StoredObject: ...

    def put_file(self, path: str | os.PathLike) -> StoredObject: ...

    def put_bytes(self, data: bytes) -> StoredObject: ...

    def open_read(self, key: str) -> BinaryIO: ...

    def iter_range(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = READ_CHUNK) -> Iterator[bytes]: ...

    def fetch_to_path(self, key: str, dest_path: str | os.PathLike) -> None: ...

    def size(self, key: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def delete(self, key: str) -> None: ...

    def check(self, min_free_bytes: int = 0) -> None: ...

    def free_bytes(self) -> int | None: ...


class _StoreHelpers:
    """Store-independent conveniences built on open_writer()."""

    def open_writer(self, *, max_bytes: int | None = None) -> StreamWriter:  # pragma: no cover - abstract
        raise NotImplementedError

    def put_stream(self, chunks: Iterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        writer = self.open_writer(max_bytes=max_bytes)
        try:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    async def aput_stream(self, chunks: AsyncIterable[bytes], *, max_bytes: int | None = None) -> StoredObject:
        """Async variant; writes run in a worker thread so the event loop never blocks on disk/network."""
        from anyio import to_thread

        writer = self.open_writer(max_bytes=max_bytes)
        try:
            async for chunk in chunks:
                await to_thread.run_sync(writer.write, chunk)
            return await to_thread.run_sync(writer.commit)
        except BaseException:
            writer.abort()
            raise

    def put_file(self, path: str | os.PathLike) -> StoredObject:
        with open(path, "rb") as f:
            return self.put_stream(iter(lambda: f.read(READ_CHUNK), b""))

    def put_bytes(self, data: bytes) -> StoredObject:
        return self.put_stream([data])


# --------------------------------------------------------------------------------------------------- local


class _LocalWriter:
    """Writes straight to the file descriptor (no Python-level buffer): uploads arrive in 4 MiB batches already."""

    def __init__(self, store: "LocalStore", max_bytes: int | None):
        self.store = store
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        self._fd: int | None
        self._fd, self._tmp = tempfile.mkstemp(prefix="upload-", dir=store.tmp_dir)

    def write(self, chunk: bytes | memoryview) -> None:
        if self._fd is None:
            raise RuntimeError("writer is closed")
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(self.max_bytes)
        self._hash.update(chunk)
        view = memoryview(chunk)
        try:
            while view:  # a regular file may take fewer bytes than asked (e.g. near a full disk)
                written = os.write(self._fd, view)
                if written == 0:
                    raise OSError(errno.ENOSPC, "no space left on device")
                view = view[written:]
        except OSError as e:
            self.abort()
            raise _map_no_space(e) from None

    def commit(self) -> StoredObject:
        if self._fd is None:
            raise RuntimeError("writer is closed")
        try:
            # mkstemp made the file 0600; stored objects get the usual mode (umask applies) so that a proxy
            # serving the store read-only (X-Accel-Redirect, deploy/nginx.conf) can read them.
            os.fchmod(self._fd, 0o666 & ~_UMASK)
            os.fsync(self._fd)
        except OSError as e:
            self.abort()
            raise _map_no_space(e) from None
        os.close(self._fd)
        self._fd = None
        digest = self._hash.hexdigest()
        key = content_key(digest)
        final = self.store.path_for(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        # os.replace is atomic within one filesystem (tmp_dir is under root); same bytes → same file anyway.
        os.replace(self._tmp, final)
        return StoredObject(key=key, sha256=digest, size=self.size)

    def abort(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


class LocalStore(_StoreHelpers):
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path_for(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise NBAError(STORAGE_ERROR, f"invalid storage key {key!r}", http_status=500)
        return path

    def open_writer(self, *, max_bytes: int | None = None) -> _LocalWriter:
        try:
            return _LocalWriter(self, max_bytes)
        except OSError as e:
            raise _map_no_space(e) from None

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def local_path(self, key: str) -> Path:
        """The object's file (downloads read it directly, in large chunks)."""
        return self.path_for(key)

    def open_read(self, key: str) -> BinaryIO:
        return open(self.path_for(key), "rb")

    def iter_range(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        """Bytes start..end inclusive (end None = to the end of the object)."""
        with self.open_read(key) as f:
            f.seek(start)
            remaining = None if end is None else end - start + 1
            while remaining is None or remaining > 0:
                chunk = f.read(chunk_size if remaining is None else min(chunk_size, remaining))
                if not chunk:
                    break
                if remaining is not None:
                    remaining -= len(chunk)
                yield chunk

    def fetch_to_path(self, key: str, dest_path: str | os.PathLike) -> None:
        shutil.copyfile(self.path_for(key), dest_path)

    def size(self, key: str) -> int:
        return self.path_for(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def delete(self, key: str) -> None:
        self.path_for(key).unlink(missing_ok=True)

    def check(self, min_free_bytes: int = 0) -> None:
        """Raise if the store cannot be written or has less than `min_free_bytes` free (used by /readyz)."""
        with tempfile.NamedTemporaryFile(dir=self.tmp_dir, prefix="ready-"):
            pass
        free = self.free_bytes()
        if free < min_free_bytes:
            raise InsufficientStorage(f"only {free} bytes free in the artifact store (threshold {min_free_bytes})")


# ------------------------------------------------------------------------------------------------------ S3

S3_PART_SIZE = 8 * 1024 * 1024  # S3 wants parts of at least 5 MiB (except the last)


class _S3Writer:
    """Buffers up to one part in memory; small objects become one put_object straight to the final key, large
    ones a multipart upload to a temporary key that is copied to the content key once the hash is known."""

    def __init__(self, store: "S3Store", max_bytes: int | None):
        self.store = store
        self.max_bytes = max_bytes
        self.size = 0
        self._hash = hashlib.sha256()
        self._buf = bytearray()
        self._tmp_key = store.full_key(f"tmp/{uuid.uuid4()}")
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._closed = False

    def write(self, chunk: bytes) -> None:
        if self._closed:
            raise RuntimeError("writer is closed")
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            self.abort()
            raise PayloadTooLarge(self.max_bytes)
        self._hash.update(chunk)
        self._buf += chunk
        while len(self._buf) >= S3_PART_SIZE:
            self._flush_part(bytes(self._buf[:S3_PART_SIZE]))
            del self._buf[:S3_PART_SIZE]

    def _flush_part(self, data: bytes) -> None:
        client, bucket = self.store.client, self.store.bucket
        if self._upload_id is None:
            self._upload_id = client.create_multipart_upload(Bucket=bucket, Key=self._tmp_key)["UploadId"]
        number = len(self._parts) + 1
        resp = client.upload_part(Bucket=bucket, Key=self._tmp_key, UploadId=self._upload_id,
                                  PartNumber=number, Body=data)
        self._parts.append({"PartNumber": number, "ETag": resp["ETag"]})

    def commit(self) -> StoredObject:
        if self._closed:
            raise RuntimeError("writer is closed")
        client, bucket = self.store.client, self.store.bucket
        digest = self._hash.hexdigest()
        key = content_key(digest)
        final = self.store.full_key(key)
        try:
            if self._upload_id is None:
                client.put_object(Bucket=bucket, Key=final, Body=bytes(self._buf))
            else:
                if self._buf:
                    self._flush_part(bytes(self._buf))
                client.complete_multipart_upload(Bucket=bucket, Key=self._tmp_key, UploadId=self._upload_id,
                                                 MultipartUpload={"Parts": self._parts})
                self._upload_id = None
                # Managed copy (multipart copy for big objects); readers only ever see the complete object.
                client.copy({"Bucket": bucket, "Key": self._tmp_key}, bucket, final)
                client.delete_object(Bucket=bucket, Key=self._tmp_key)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._buf = bytearray()
        return StoredObject(key=key, sha256=digest, size=self.size)

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._buf = bytearray()
        client, bucket = self.store.client, self.store.bucket
        if self._upload_id is not None:
            try:
                client.abort_multipart_upload(Bucket=bucket, Key=self._tmp_key, UploadId=self._upload_id)
            finally:
                self._upload_id = None
        try:
            client.delete_object(Bucket=bucket, Key=self._tmp_key)
        except Exception:  # best effort: the temp object may never have existed
            pass


class S3Store(_StoreHelpers):
    def __init__(self, bucket: str, prefix: str = "", client: Any = None):
        if client is None:
            import boto3

            client = boto3.client("s3")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client

    def full_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def open_writer(self, *, max_bytes: int | None = None) -> _S3Writer:
        return _S3Writer(self, max_bytes)

    def open_read(self, key: str) -> BinaryIO:
        return self.client.get_object(Bucket=self.bucket, Key=self.full_key(key))["Body"]

    def iter_range(self, key: str, start: int = 0, end: int | None = None,
                   chunk_size: int = READ_CHUNK) -> Iterator[bytes]:
        rng = f"bytes={start}-" if end is None else f"bytes={start}-{end}"
        body = self.client.get_object(Bucket=self.bucket, Key=self.full_key(key), Range=rng)["Body"]
        try:
            while chunk := body.read(chunk_size):
                yield chunk
        finally:
            body.close()

    def fetch_to_path(self, key: str, dest_path: str | os.PathLike) -> None:
        self.client.download_file(self.bucket, self.full_key(key), str(dest_path))

    def size(self, key: str) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))["ContentLength"])

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.full_key(key))
            return True
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.full_key(key))

    def check(self, min_free_bytes: int = 0) -> None:
        self.client.head_bucket(Bucket=self.bucket)

    def free_bytes(self) -> int | None:
        return None  # unbounded as far as we can tell


def store_from_settings(settings: Settings) -> ArtifactStore:
    """`file:///abs/path` → LocalStore; `s3://bucket/prefix` → S3Store (S3_* settings configure boto3)."""
    url = str(settings.storage_url)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return LocalStore(parsed.path if not parsed.netloc else parsed.netloc + parsed.path)
    if parsed.scheme == "s3":
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=settings.s3_access_key_id,
            aws_secret_access_key=settings.s3_secret_access_key,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60),
        )
        return S3Store(parsed.netloc, parsed.path, client)
    raise ValueError(f"unsupported STORAGE_URL scheme in {url!r} (use file:// or s3://)")
