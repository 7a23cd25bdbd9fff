"""Streaming uploads over real HTTP: models (safetensors / .pt zip + spec), datasets, probes; size caps, format and
spec checks, and that a rejected upload leaves neither a stored object nor a row."""

from __future__ import annotations

import json
import pickle

import httpx
import pytest
from sqlalchemy import func, select

from app.client import APIError, MultipartStream
from app.core.models import Artifact

from .conftest import DIGITS_SPEC, digits_npz_bytes, safetensors_bytes, sha256_hex


def _post(http: httpx.Client, url: str, data: bytes, fields: dict[str, str] | None = None,
          filename: str = "f.bin", chunked: bool = False) -> httpx.Response:
    body = MultipartStream(fields or {}, filename, [data], len(data))
    headers = {"Content-Type": body.content_type}
    if chunked:  # no Content-Length: the cap must hold while streaming
        return http.post(url, content=iter(body), headers=headers)
    return http.post(url, content=b"".join(body), headers=headers)


def _error(resp: httpx.Response) -> str:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    return body["error"]["code"]


def _stored_files(store) -> set[str]:
    return {str(p.relative_to(store.root)) for p in store.root.rglob("*") if p.is_file()}


def _artifact_rows(db, sha: str) -> int:
    return db.execute(select(func.count()).select_from(Artifact).where(Artifact.sha256 == sha)).scalar_one()


def test_upload_model_safetensors(client, http, store) -> None:
    data = safetensors_bytes(fill=7)
    out = client.upload_stream("/v1/models", [data], len(data), filename="m.safetensors",
                               fields={"spec": json.dumps(DIGITS_SPEC)})
    assert out["sha256"] == sha256_hex(data) and out["size_bytes"] == len(data)
    assert out["format"] == "safetensors" and out["kind"] == "model" and out["filename"] == "m.safetensors"
    assert out["spec"]["arch"] == "small_cnn" and out["spec"]["num_classes"] == 10
    assert out["details"] == {"tensors": 2, "parameters": 50}
    assert store.exists(f"sha256/{out['sha256'][:2]}/{out['sha256']}")
    got = http.get(f"/v1/models/{out['id']}")
    assert got.status_code == 200 and got.json()["sha256"] == out["sha256"] and got.json()["details"] is None


def test_upload_model_from_path_with_spec_file_part_after_the_file(client, http, tmp_path) -> None:
    # The client sends the spec first; here the spec comes as a *file part after* the model part.
    data = safetensors_bytes(fill=3)
    boundary = "xyzBOUNDARY"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"w.safetensors\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"spec\"; filename=\"spec.json\"\r\n"
            f"Content-Type: application/json\r\n\r\n{json.dumps(DIGITS_SPEC)}\r\n--{boundary}--\r\n").encode()
    resp = http.post("/v1/models", content=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert resp.status_code == 201, resp.text
    assert resp.json()["sha256"] == sha256_hex(data)
    # And the client's path-based upload with a spec file.
    (tmp_path / "spec.json").write_text(json.dumps(DIGITS_SPEC))
    (tmp_path / "w.safetensors").write_bytes(data)
    out = client.upload_model(tmp_path / "w.safetensors", tmp_path / "spec.json")
    assert out["sha256"] == sha256_hex(data)


def test_upload_pt_zip_is_accepted_and_legacy_pickle_refused(http, store, db) -> None:
    import zipfile
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the container torch.save writes (content is checked by the worker)
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/version", b"3\n")
    resp = _post(http, "/v1/models", buf.getvalue(), {"spec": json.dumps(DIGITS_SPEC)}, "m.pt")
    assert resp.status_code == 201, resp.text
    assert resp.json()["format"] == "pt"

    legacy = pickle.dumps({"w": [1.0, 2.0]}, protocol=2) + b"\x00" * 64
    before = _stored_files(store)
    resp = _post(http, "/v1/models", legacy, {"spec": json.dumps(DIGITS_SPEC)}, "old.pt")
    assert resp.status_code == 415 and _error(resp) == "unsupported_format"
    assert _stored_files(store) == before and _artifact_rows(db, sha256_hex(legacy)) == 0


@pytest.mark.parametrize("payload", [b"GIF89a" + b"\x00" * 100, b"hello", b""])
def test_upload_model_wrong_format(http, store, payload: bytes) -> None:
    before = _stored_files(store)
    resp = _post(http, "/v1/models", payload, {"spec": json.dumps(DIGITS_SPEC)})
    assert resp.status_code == 415 and _error(resp) == "unsupported_format"
    assert _stored_files(store) == before


def test_upload_model_truncated_safetensors_is_rejected_and_removed(http, store, db) -> None:
    data = safetensors_bytes(fill=9)[:-5]
    before = _stored_files(store)
    resp = _post(http, "/v1/models", data, {"spec": json.dumps(DIGITS_SPEC)})
    assert resp.status_code == 422 and _error(resp) == "checkpoint_truncated"
    assert _stored_files(store) == before and _artifact_rows(db, sha256_hex(data)) == 0


@pytest.mark.parametrize("spec, code", [
    ("{not json", "spec_invalid"),
    (json.dumps({**DIGITS_SPEC, "num_classes": 1}), "spec_invalid"),
    (json.dumps({**DIGITS_SPEC, "mean": [0.5, 0.5]}), "spec_invalid"),
    (json.dumps({**DIGITS_SPEC, "arch": "resnet9000"}), "unknown_architecture"),
    (None, "spec_invalid"),
])
def test_upload_model_bad_spec(http, store, db, spec: str | None, code: str) -> None:
    data = safetensors_bytes(fill=11)
    before = _stored_files(store)
    resp = _post(http, "/v1/models", data, {"spec": spec} if spec is not None else {})
    assert resp.status_code == 422 and _error(resp) == code
    assert _stored_files(store) == before and _artifact_rows(db, sha256_hex(data)) == 0


def test_spec_sent_first_is_checked_before_the_file(http) -> None:
    # One request body with a bad spec followed by a file that is not a model at all: the spec is rejected
    # before any byte of the file is looked at.
    resp = _post(http, "/v1/models", b"GIF89a" + b"\x00" * 100, {"spec": json.dumps({**DIGITS_SPEC, "arch": "x"})})
    assert resp.status_code == 422 and _error(resp) == "unknown_architecture"


def test_upload_dataset_and_probe(client, http) -> None:
    data = digits_npz_bytes(seed=1)
    out = client.upload_stream("/v1/datasets", [data], len(data), filename="d.npz")
    assert out["kind"] == "dataset" and out["format"] == "npz" and out["sha256"] == sha256_hex(data)
    assert http.get(f"/v1/datasets/{out['id']}").json()["id"] == out["id"]
    # A model id is not a dataset.
    assert http.get(f"/v1/models/{out['id']}").status_code == 404

    probe = client.upload_stream("/v1/datasets", [data], len(data), filename="p.npz", fields={"kind": "probe"})
    assert probe["kind"] == "probe"
    probe2 = client.upload_stream("/v1/probes", [data], len(data), filename="p.npz")
    assert probe2["kind"] == "probe" and http.get(f"/v1/probes/{probe2['id']}").status_code == 200
    bad = _post(http, "/v1/datasets", data, {"kind": "weird"})
    assert bad.status_code == 422 and _error(bad) == "validation_error"


def test_upload_dataset_wrong_format(http, store) -> None:
    before = _stored_files(store)
    resp = _post(http, "/v1/datasets", b"just some text, not an archive at all", filename="d.txt")
    assert resp.status_code == 415 and _error(resp) == "unsupported_format"
    assert _stored_files(store) == before


@pytest.mark.parametrize("chunked", [False, True])
def test_oversize_dataset_is_413_and_leaves_nothing(http, store, db, service_settings, chunked: bool) -> None:
    data = b"PK\x03\x04" + b"\x00" * (service_settings.max_dataset_bytes + 10)
    before = _stored_files(store)
    resp = _post(http, "/v1/datasets", data, filename="big.zip", chunked=chunked)
    assert resp.status_code == 413 and _error(resp) == "payload_too_large"
    assert _stored_files(store) == before
    assert _artifact_rows(db, sha256_hex(data)) == 0


def test_oversize_model_on_small_cap_server(server_factory, make_key, store) -> None:
    server = server_factory(max_model_bytes=64 * 1024)
    key = make_key()
    data = safetensors_bytes({"w": ("F32", [128, 160])})  # 80 KiB of tensor data
    before = _stored_files(store)
    from app.client import NBAClient

    with NBAClient(server.url, key) as c:
        with pytest.raises(APIError) as err:
            c.upload_stream("/v1/models", [data], len(data), filename="m.safetensors",
                            fields={"spec": json.dumps(DIGITS_SPEC)})
        assert err.value.status == 413 and err.value.code == "payload_too_large"
        # Streaming (chunked) without Content-Length hits the cap while streaming.
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as h:
            resp = _post(h, "/v1/models", data, {"spec": json.dumps(DIGITS_SPEC)}, chunked=True)
        assert resp.status_code == 413 and _error(resp) == "payload_too_large"
        small = safetensors_bytes(fill=5)
        assert c.upload_stream("/v1/models", [small], len(small), filename="s.safetensors",
                               fields={"spec": json.dumps(DIGITS_SPEC)})["size_bytes"] == len(small)
    assert _stored_files(store) - before == {f"sha256/{sha256_hex(small)[:2]}/{sha256_hex(small)}"}


def test_upload_requires_multipart_and_a_file(http) -> None:
    resp = http.post("/v1/models", content=b"raw", headers={"Content-Type": "application/octet-stream"})
    assert resp.status_code == 415 and _error(resp) == "unsupported_media_type"
    body = MultipartStream({"spec": json.dumps(DIGITS_SPEC)}, "x", [], 0)
    raw = b"".join(body).replace(b'name="file"', b'name="other"')
    resp = http.post("/v1/models", content=raw, headers={"Content-Type": body.content_type})
    assert resp.status_code == 422 and _error(resp) == "validation_error"
    # A body cut off inside the file part (no closing delimiter) is not stored.
    data = safetensors_bytes(fill=13)
    body = MultipartStream({"spec": json.dumps(DIGITS_SPEC)}, "m.safetensors", [data], len(data))
    raw = b"".join(body)
    resp = http.post("/v1/models", content=raw[:-len(f"\r\n--{body.boundary}--\r\n")],
                     headers={"Content-Type": body.content_type})
    assert resp.status_code == 422 and _error(resp) == "validation_error"
