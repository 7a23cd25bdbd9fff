"""Result download (Range/ETag/X-Content-SHA256) and report (JSON/HTML) on a job marked succeeded directly in the
database with stored artifacts (the real end-to-end job is the worker's test)."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from sqlalchemy import update

from app.client import APIError
from app.core.models import Artifact, Job, utcnow

REPORT = {"metrics": {"before": {"clean_accuracy": 0.9, "attack_success_rate": 0.97},
                      "after": {"clean_accuracy": 0.88, "attack_success_rate": 0.03}},
          "log": [{"stage": "ft", "epoch": 0, "loss": 1.5}, {"stage": "ft", "epoch": 1, "loss": 0.7}],
          "timing": {"total_s": 1.0}, "output": {"sha256": "?"}}


@pytest.fixture()
def finished_job(http, uploaded, db, store, request) -> dict:
    """A job marked succeeded with a 300 kB result, a JSON report and (if parametrized so) a stored HTML report."""
    job_id = http.post("/v1/jobs", json={"model_id": uploaded["model"]["id"],
                                         "dataset_id": uploaded["dataset"]["id"], "method": "ft"}).json()["id"]
    owner_id = db.get(Job, job_id).owner_id
    payload = os.urandom(300_000)
    rows = {}
    for name, data, kind, fmt in (("result", payload, "result", "safetensors"),
                                  ("report", json.dumps(REPORT).encode(), "report", "json"),
                                  ("html", b"<html><body>stored report with plots</body></html>", "report", "html")):
        obj = store.put_bytes(data)
        rows[name] = Artifact(owner_id=owner_id, kind=kind, sha256=obj.sha256, size_bytes=obj.size,
                              storage_key=obj.key, filename=name, format=fmt, created_at=utcnow())
        db.add(rows[name])
    db.flush()
    with_html = getattr(request, "param", False)
    db.execute(update(Job).where(Job.id == job_id).values(
        status="succeeded", progress=1.0, stage="done", finished_at=utcnow(), metrics=REPORT["metrics"],
        result_id=rows["result"].id, report_id=rows["report"].id,
        report_html_id=rows["html"].id if with_html else None))
    db.commit()
    return {"id": job_id, "payload": payload, "sha256": hashlib.sha256(payload).hexdigest()}


def test_job_shows_links_and_metrics(http, finished_job) -> None:
    job = http.get(f"/v1/jobs/{finished_job['id']}").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert job["metrics"]["after"]["attack_success_rate"] == 0.03
    assert job["links"]["model"] == f"/v1/jobs/{finished_job['id']}/model"
    assert job["links"]["report"] == f"/v1/jobs/{finished_job['id']}/report"
    assert job["result"]["sha256"] == finished_job["sha256"]
    cancel = http.post(f"/v1/jobs/{finished_job['id']}/cancel")
    assert cancel.status_code == 409 and cancel.json()["error"]["code"] == "job_finished"


def test_full_download_headers(http, finished_job) -> None:
    resp = http.get(f"/v1/jobs/{finished_job['id']}/model")
    assert resp.status_code == 200 and resp.content == finished_job["payload"]
    assert resp.headers["x-content-sha256"] == finished_job["sha256"]
    assert resp.headers["etag"] == f'"{finished_job["sha256"]}"'
    assert resp.headers["accept-ranges"] == "bytes"
    assert int(resp.headers["content-length"]) == len(finished_job["payload"])
    again = http.get(f"/v1/jobs/{finished_job['id']}/model", headers={"If-None-Match": resp.headers["etag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("header, start, end", [
    ("bytes=0-99", 0, 99),
    ("bytes=1000-", 1000, 299_999),
    ("bytes=-500", 299_500, 299_999),
    ("bytes=299990-400000", 299_990, 299_999),
    ("bytes=5-5", 5, 5),
])
def test_range_download(http, finished_job, header: str, start: int, end: int) -> None:
    resp = http.get(f"/v1/jobs/{finished_job['id']}/model", headers={"Range": header})
    assert resp.status_code == 206
    assert resp.content == finished_job["payload"][start:end + 1]
    assert resp.headers["content-range"] == f"bytes {start}-{end}/300000"
    assert int(resp.headers["content-length"]) == end - start + 1


@pytest.mark.parametrize("header", ["bytes=300000-", "bytes=999999-1000000", "bytes=-0"])
def test_unsatisfiable_range(http, finished_job, header: str) -> None:
    resp = http.get(f"/v1/jobs/{finished_job['id']}/model", headers={"Range": header})
    assert resp.status_code == 416 and resp.json()["error"]["code"] == "range_not_satisfiable"
    assert resp.headers["content-range"] == "bytes */300000"


@pytest.mark.parametrize("header", ["bytes=0-1,5-6", "items=0-1", "bytes=abc", "bytes=10-5"])
def test_ignored_ranges_serve_everything(http, finished_job, header: str) -> None:
    resp = http.get(f"/v1/jobs/{finished_job['id']}/model", headers={"Range": header})
    assert resp.status_code == 200 and resp.content == finished_job["payload"]


def test_if_range_mismatch_serves_everything(http, finished_job) -> None:
    resp = http.get(f"/v1/jobs/{finished_job['id']}/model", headers={"Range": "bytes=0-9", "If-Range": '"stale"'})
    assert resp.status_code == 200 and len(resp.content) == 300_000
    resp = http.get(f"/v1/jobs/{finished_job['id']}/model",
                    headers={"Range": "bytes=0-9", "If-Range": f'"{finished_job["sha256"]}"'})
    assert resp.status_code == 206 and resp.content == finished_job["payload"][:10]


def test_client_download_verifies_sha256(client, finished_job, tmp_path) -> None:
    out = client.download_model(finished_job["id"], tmp_path / "clean.safetensors")
    assert out["sha256"] == finished_job["sha256"]
    assert (tmp_path / "clean.safetensors").read_bytes() == finished_job["payload"]
    assert not (tmp_path / "clean.safetensors.part").exists()


def test_client_download_rejects_a_corrupted_transfer(client, finished_job, tmp_path, store, db) -> None:
    # Corrupt the stored bytes behind the API's back: the announced sha256 no longer matches.
    result_key = db.get(Artifact, db.get(Job, finished_job["id"]).result_id).storage_key
    path = store.path_for(result_key)
    path.write_bytes(b"\x00" + finished_job["payload"][1:])
    with pytest.raises(APIError) as err:
        client.download_model(finished_job["id"], tmp_path / "bad.safetensors")
    assert err.value.code == "checksum_mismatch"
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.part").exists()
    path.write_bytes(finished_job["payload"])


def test_report_json_and_fallback_html(http, client, finished_job) -> None:
    assert client.get_report(finished_job["id"]) == REPORT
    resp = http.get(f"/v1/jobs/{finished_job['id']}/report", headers={"Accept": "text/html"})
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    # The one report renderer shows the stored metrics as percentages, before and after.
    assert "97.00 %" in resp.text and "3.00 %" in resp.text and "88.00 %" in resp.text
    assert client.get_report(finished_job["id"], html=True) == resp.text
    # Accept preferring JSON → JSON.
    resp = http.get(f"/v1/jobs/{finished_job['id']}/report", headers={"Accept": "application/json, text/html"})
    assert resp.json() == REPORT


@pytest.mark.parametrize("finished_job", [True], indirect=True)
def test_report_html_stored_by_worker(http, finished_job) -> None:
    resp = http.get(f"/v1/jobs/{finished_job['id']}/report", params={"format": "html"})
    assert resp.status_code == 200 and "stored report with plots" in resp.text
    assert http.get(f"/v1/jobs/{finished_job['id']}/report", params={"format": "json"}).json() == REPORT


def test_client_wait(client, finished_job, http, uploaded, db) -> None:
    seen: list[dict] = []
    job = client.wait(finished_job["id"], poll=0.05, on_progress=seen.append, timeout=10)
    assert job["status"] == "succeeded" and len(seen) == 1
    queued = http.post("/v1/jobs", json={"model_id": uploaded["model"]["id"],
                                         "dataset_id": uploaded["dataset"]["id"], "method": "ft"}).json()["id"]
    db.execute(update(Job).where(Job.id == queued).values(status="queued"))
    db.commit()
    with pytest.raises(TimeoutError):
        client.wait(queued, poll=0.05, timeout=0.3)
    page = client.list_jobs(status="succeeded")
    assert [j["id"] for j in page["items"]] == [finished_job["id"]]
    assert client.cancel_job(queued)["status"] == "cancelled"
