"""Artifact store: content addressing, streaming size cap with nothing left behind, ranges; LocalStore and S3Store
(S3 via moto, in-process)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from app.core.settings import Settings
from app.core.storage import LocalStore, PayloadTooLarge, S3Store, content_key, store_from_settings


def _all_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_local_put_stream_is_content_addressed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    chunks = [b"a" * 1000, b"b" * 10, b"c"]
    obj = store.put_stream(iter(chunks), max_bytes=10_000)
    data = b"".join(chunks)
    assert obj.sha256 == hashlib.sha256(data).hexdigest()
    assert obj.size == len(data)
    assert obj.key == content_key(obj.sha256) == f"sha256/{obj.sha256[:2]}/{obj.sha256}"
    assert store.exists(obj.key) and store.size(obj.key) == len(data)
    # Same bytes → same key, still one file.
    again = store.put_bytes(data)
    assert again.key == obj.key
    assert len(_all_files(tmp_path)) == 1
    with store.open_read(obj.key) as f:
        assert f.read() == data
    assert b"".join(store.iter_range(obj.key, 999, 1001)) == b"abb"
    assert b"".join(store.iter_range(obj.key, 1005)) == b"bbbbbc"
    dest = tmp_path / "copy.bin"
    store.fetch_to_path(obj.key, dest)
    assert dest.read_bytes() == data
    store.delete(obj.key)
    assert not store.exists(obj.key)


def test_local_oversize_stream_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    with pytest.raises(PayloadTooLarge) as err:
        store.put_stream(iter([b"x" * 600, b"y" * 600]), max_bytes=1000)
    assert err.value.code == "payload_too_large" and err.value.http_status == 413
    assert _all_files(tmp_path) == []


def test_local_failed_stream_leaves_nothing(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)

    def broken():
        yield b"partial data"
        raise ConnectionError("client went away")

    with pytest.raises(ConnectionError):
        store.put_stream(broken())
    assert _all_files(tmp_path) == []
    # An explicitly aborted writer too.
    writer = store.open_writer()
    writer.write(b"abc")
    writer.abort()
    assert _all_files(tmp_path) == []


def test_local_rejects_keys_outside_root(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    with pytest.raises(Exception):
        store.open_read("../../etc/passwd")


def test_store_from_settings(tmp_path: Path) -> None:
    local = store_from_settings(Settings(data_dir=tmp_path))
    assert isinstance(local, LocalStore) and local.root == (tmp_path / "artifacts").absolute()
    s3 = store_from_settings(Settings(data_dir=tmp_path, storage_url="s3://bucket/some/prefix",
                                      s3_region="us-east-1", s3_access_key_id="x", s3_secret_access_key="y"))
    assert isinstance(s3, S3Store) and s3.bucket == "bucket" and s3.prefix == "some/prefix"


@pytest.fixture()
def s3(monkeypatch):
    from moto import mock_aws
    import boto3

    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(k, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket="nba-test")
        yield client


def _s3_keys(client) -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket="nba-test").get("Contents", [])]


def _multipart_uploads(client) -> list:
    return client.list_multipart_uploads(Bucket="nba-test").get("Uploads", [])


def test_s3_small_and_multipart_uploads(s3, monkeypatch) -> None:
    import app.core.storage as storage

    monkeypatch.setattr(storage, "S3_PART_SIZE", 5 * 1024 * 1024)  # S3's minimum part size
    store = S3Store("nba-test", "pre/fix", s3)
    small = store.put_bytes(b"hello")
    assert small.key == content_key(hashlib.sha256(b"hello").hexdigest())
    assert _s3_keys(s3) == [f"pre/fix/{small.key}"]

    big = os.urandom(1024) * (11 * 1024)  # 11 MiB → 3 parts
    obj = store.put_stream((big[i:i + 700_000] for i in range(0, len(big), 700_000)), max_bytes=len(big))
    assert obj.sha256 == hashlib.sha256(big).hexdigest() and obj.size == len(big)
    assert sorted(_s3_keys(s3)) == sorted([f"pre/fix/{small.key}", f"pre/fix/{obj.key}"])  # temp object gone
    assert store.size(obj.key) == len(big) and store.exists(obj.key)
    assert b"".join(store.iter_range(obj.key, 10, 19)) == big[10:20]
    with store.open_read(small.key) as f:
        assert f.read() == b"hello"
    store.check()
    store.delete(small.key)
    assert not store.exists(small.key)


def test_s3_oversize_aborts_multipart_and_leaves_nothing(s3, monkeypatch) -> None:
    import app.core.storage as storage

    monkeypatch.setattr(storage, "S3_PART_SIZE", 5 * 1024 * 1024)
    store = S3Store("nba-test", "", s3)
    chunk = b"z" * (1024 * 1024)
    with pytest.raises(PayloadTooLarge):
        store.put_stream((chunk for _ in range(12)), max_bytes=11 * 1024 * 1024)
    assert _s3_keys(s3) == []
    assert _multipart_uploads(s3) == []
