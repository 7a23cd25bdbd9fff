"""Issue 10 against the real stack (Postgres, Redis, uvicorn over HTTP): each row of the security review's table
that the API owns, the quotas (shared by two API processes), the sweeper's broker check and the migration lock.
The library-side rows (bounds computed from headers) are in tests/core/test_hardening.py."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import event, select

from app.core.models import Artifact, Job, Owner, utcnow
from app.core.storage import InsufficientStorage, LocalStore

from .conftest import DIGITS_SPEC, REPO, digits_npz_bytes, safetensors_bytes, upload_placeholders

pytestmark = pytest.mark.service


def code(resp: httpx.Response) -> str:
    return resp.json()["error"]["code"]


def raw_request(url: str, head: bytes, body: bytes = b"", wait: float = 10.0) -> bytes:
    """Send raw bytes on a fresh connection; return what the server answers before closing (or `wait` s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as s:
        s.sendall(head + body)
        chunks = []
        try:
            while data := s.recv(65536):
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and b'"error"' in b"".join(chunks):
                    break
        except socket.timeout:
            pass
    return b"".join(chunks)


def job_body(ids: dict[str, str], **extra) -> dict:
    return {**ids, "method": "ft", "params": {"epochs": 1}, **extra}


# ------------------------------------------------------------------------- row 3: body cap before parse/auth

def test_row3_huge_json_body_without_key_is_refused_before_reading(api_server):
    rss_before = api_server.memory_kb("VmRSS")
    started = time.monotonic()
    # 200 MiB declared, 1 MiB actually sent: the answer must not wait for (or read) the rest.
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 209715200\r\n\r\n")
    answer = raw_request(api_server.url, head, b"[" * (1024 * 1024))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"payload_too_large" in answer
    assert time.monotonic() - started < 5
    assert api_server.memory_kb("VmRSS") - rss_before < 20 * 1024


def test_row3_chunked_body_is_cut_at_the_cap(api_server, api_key):
    def body():
        for _ in range(64):  # 4 MiB in 64 KiB chunks, no Content-Length
            yield b" " * 65536

    resp = httpx.post(f"{api_server.url}/v1/jobs", content=body(), timeout=30,
                      headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    assert resp.status_code == 413 and code(resp) == "payload_too_large"


# --------------------------------------------------------------- rows 6, 7, 8: NaN, deep specs, empty keys

def test_row6_nan_and_infinity_are_refused(http, uploaded):
    ids = {"model_id": uploaded["model"]["id"], "dataset_id": uploaded["dataset"]["id"]}
    for literal in ("NaN", "Infinity", "-Infinity"):
        raw = json.dumps(job_body(ids)).replace('"epochs": 1', f'"lr": {literal}')
        resp = http.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
        assert resp.status_code == 422 and code(resp) == "invalid_params", resp.text
    spec = json.dumps(DIGITS_SPEC).replace('"std": [0.5]', '"std": [NaN]')
    assert "NaN" in spec
    resp = http.post("/v1/models", files={"spec": (None, spec), "file": ("m.safetensors", safetensors_bytes())})
    assert resp.status_code == 422 and code(resp) == "spec_invalid"
    assert http.get("/v1/jobs").json()["items"] == []


def test_row7_deep_spec_is_422_and_the_connection_survives(http):
    spec = json.dumps(DIGITS_SPEC)[:-1] + ', "arch_params": ' + "[" * 30_000 + "]" * 30_000 + "}"
    resp = http.post("/v1/models", files={"spec": (None, spec), "file": ("m.safetensors", safetensors_bytes())})
    assert resp.status_code == 422 and code(resp) == "spec_invalid"
    assert http.get("/v1/jobs").status_code == 200  # same keep-alive client: the next request is answered


def test_row8_empty_idempotency_key_is_refused(http, uploaded):
    ids = {"model_id": uploaded["model"]["id"], "dataset_id": uploaded["dataset"]["id"]}
    for _ in range(2):
        resp = http.post("/v1/jobs", json=job_body(ids), headers={"Idempotency-Key": ""})
        assert resp.status_code == 422 and code(resp) == "validation_error"
    assert http.get("/v1/jobs").json()["items"] == []


# ---------------------------------------------------------------- rows 1, 2, 4, 5 and 10 at the API

def test_row2_absurd_width_is_refused_at_upload(http):
    for width in (6000, -3):
        spec = json.dumps({**DIGITS_SPEC, "arch_params": {"width": width}})
        resp = http.post("/v1/models", files={"spec": (None, spec), "file": ("m.safetensors", safetensors_bytes())})
        assert resp.status_code == 422 and code(resp) == "spec_invalid"


def _black_png(size: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size)).save(buf, "PNG")
    return buf.getvalue()


def test_row1_decoded_size_is_checked_before_queueing(http):
    # 400 black 512×512 RGB PNGs against a 3×512×512 spec: 1.26 GB of float32 > the 1 GiB loader bound.
    spec = {**DIGITS_SPEC, "in_channels": 3, "input_size": [512, 512], "mean": [0.5] * 3, "std": [0.5] * 3}
    model = http.post("/v1/models", files={"spec": (None, json.dumps(spec)),
                                           "file": ("m.safetensors", safetensors_bytes())}).json()
    png = _black_png(512)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(400):
            z.writestr(f"{i % 2}/{i}.png", png)
    data = http.post("/v1/datasets", files={"file": ("black.zip", buf.getvalue())})
    assert data.status_code == 201, data.text
    resp = http.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": data.json()["id"], "method": "ft"})
    assert resp.status_code == 422 and code(resp) == "data_too_large", resp.text


def test_shape_and_labels_are_checked_before_queueing(http):
    spec = {**DIGITS_SPEC, "num_classes": 5}
    model = http.post("/v1/models", files={"spec": (None, json.dumps(spec)),
                                           "file": ("m.safetensors", safetensors_bytes())}).json()
    data = http.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())}).json()  # labels 0..9
    resp = http.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": data["id"], "method": "ft"})
    assert resp.status_code == 422 and code(resp) == "data_label_out_of_range"
    wide = {**DIGITS_SPEC, "input_size": [16, 16]}
    model = http.post("/v1/models", files={"spec": (None, json.dumps(wide)),
                                           "file": ("m.safetensors", safetensors_bytes())}).json()
    resp = http.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": data["id"], "method": "ft"})
    assert resp.status_code == 422 and code(resp) == "data_shape_mismatch"
    resp = http.post("/v1/jobs", json={"model_id": model["id"], "dataset_id": data["id"], "method": "nba",
                                       "params": {"top_k": 11}})
    assert resp.status_code == 422


def test_row4_million_entry_zip_is_refused_with_bounded_memory(server_factory, make_key):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        for i in range(100_001):  # one past the member limit
            z.writestr(f"{i}", b"")
    server = server_factory(max_dataset_bytes=64 * 1024**2)
    rss_before = server.memory_kb("VmRSS")
    resp = httpx.post(f"{server.url}/v1/datasets", files={"file": ("many.zip", buf.getvalue())}, timeout=60,
                      headers={"Authorization": f"Bearer {make_key()}"})
    assert resp.status_code == 422 and code(resp) == "data_too_large"
    assert server.memory_kb("VmRSS") - rss_before < 40 * 1024  # the ZipInfo objects were never built


def test_row5_pt_zip_bomb_is_refused_at_upload(http):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", bytes(64 * 1024**2))
    resp = http.post("/v1/models", files={"spec": (None, json.dumps(DIGITS_SPEC)), "file": ("m.pt", buf.getvalue())})
    assert resp.status_code == 422 and code(resp) == "checkpoint_too_large", resp.text


def test_row10_params_checked_against_the_defense(http, uploaded):
    ids = {"model_id": uploaded["model"]["id"], "dataset_id": uploaded["dataset"]["id"]}
    for params in ({"epochs": 10**6}, {"epochs": "20"}, {"warp": 1}, {"lr": -1}):
        resp = http.post("/v1/jobs", json=job_body(ids, params=params))
        assert resp.status_code == 422 and code(resp) == "invalid_params", params
    assert http.post("/v1/jobs", json=job_body(ids, params={"epochs": 1000})).status_code == 201


# ------------------------------------------------------------------------------------------ quotas (row 10)

def test_11th_active_job_gets_429_and_two_processes_share_the_limits(server_factory, make_key):
    a = server_factory(quota_active_jobs=10, quota_jobs_per_minute=1000)
    b = server_factory(quota_active_jobs=10, quota_jobs_per_minute=1000)
    key = make_key()
    ids = upload_placeholders(a.url, key)
    auth = {"Authorization": f"Bearer {key}"}
    statuses = [httpx.post(f"{(a, b)[i % 2].url}/v1/jobs", json=job_body(ids), headers=auth, timeout=30)
                for i in range(11)]
    assert [r.status_code for r in statuses[:10]] == [201] * 10
    last = statuses[10]
    assert last.status_code == 429 and code(last) == "too_many_active_jobs"
    assert int(last.headers["Retry-After"]) > 0
    # Cancelling one frees a slot, on either process.
    assert httpx.post(f"{a.url}/v1/jobs/{statuses[0].json()['id']}/cancel", headers=auth).status_code == 200
    assert httpx.post(f"{b.url}/v1/jobs", json=job_body(ids), headers=auth, timeout=30).status_code == 201


def test_submission_rate_is_shared_through_redis(server_factory, make_key):
    a = server_factory(quota_active_jobs=100, quota_jobs_per_minute=5)
    b = server_factory(quota_active_jobs=100, quota_jobs_per_minute=5)
    key = make_key()
    ids = upload_placeholders(a.url, key)
    auth = {"Authorization": f"Bearer {key}"}
    answers = [httpx.post(f"{(a, b)[i % 2].url}/v1/jobs", json=job_body(ids), headers=auth, timeout=30)
               for i in range(6)]
    assert [r.status_code for r in answers] == [201] * 5 + [429]
    assert code(answers[5]) == "rate_limited" and 0 < int(answers[5].headers["Retry-After"]) <= 60
    other = make_key()  # per key: another owner is not affected
    other_ids = upload_placeholders(a.url, other)
    assert httpx.post(f"{b.url}/v1/jobs", json=job_body(other_ids), headers={"Authorization": f"Bearer {other}"},
                      timeout=30).status_code == 201


def test_stored_bytes_quota(server_factory, make_key):
    server = server_factory(quota_stored_bytes=6000)
    key = make_key()
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        first = h.post("/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())})
        assert first.status_code == 201
        second = h.post("/v1/datasets", files={"file": ("e.npz", digits_npz_bytes(seed=1))})
        assert second.status_code == 429 and code(second) == "storage_quota_exceeded"
        assert int(second.headers["Retry-After"]) > 0


# ------------------------------------------------------------------------------- row 9: storage full → 507

def test_row9_enospc_is_507_not_500(tmp_path: Path):
    store = LocalStore(tmp_path / "store")
    writer = store.open_writer()
    os.close(writer._fd)
    writer._fd = os.open("/dev/full", os.O_WRONLY)  # the kernel answers every write with ENOSPC
    with pytest.raises(InsufficientStorage) as e:
        writer.write(b"x" * 1024)
    assert (e.value.http_status, e.value.code) == (507, "insufficient_storage")
    assert not any((tmp_path / "store" / "tmp").iterdir())  # the temporary file was removed


def test_row9_low_free_space_readyz_and_uploads(server_factory, make_key):
    server = server_factory(min_free_bytes=2**62)
    ready = httpx.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 503
    storage = ready.json()["checks"]["storage"]
    assert storage["ok"] is False and "free" in storage["error"]
    key = make_key()
    resp = httpx.post(f"{server.url}/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())},
                      headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert resp.status_code == 507 and code(resp) == "insufficient_storage"


# -------------------------------------------------------------------------------- row 12: slow clients

def test_row12_stalled_body_is_cut(server_factory):
    server = server_factory(body_read_timeout=1)
    started = time.monotonic()
    answer = raw_request(server.url, b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: 100\r\n\r\n{", wait=15)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 10


def test_row12_proxy_and_server_timeouts_are_configured():
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    for directive in ("client_header_timeout", "client_body_timeout", "client_max_body_size", "send_timeout",
                      "keepalive_timeout", "limit_conn"):
        assert directive in nginx, directive
    compose = (REPO / "docker-compose.yml").read_text()
    assert "nginx" in compose and "deploy/nginx.conf" in compose
    dockerfile = (REPO / "Dockerfile").read_text()
    for flag in ("--loop", "uvloop", "--http", "httptools", "--timeout-keep-alive"):
        assert flag in dockerfile, flag


# ------------------------------------------------------------------------- the hot path: one commit a minute

def test_poll_commits_only_when_last_used_at_changes(sessions, make_key, service_settings):
    from app.api.deps import ServiceState, owner_session
    from app.core.storage import store_from_settings

    key = make_key()
    state = ServiceState(settings=service_settings, sessions=sessions, store=store_from_settings(service_settings),
                         enqueue=lambda _j: None)
    commits = []
    engine = sessions.kw["bind"]
    listener = lambda _conn: commits.append(1)  # noqa: E731
    event.listen(engine, "commit", listener)

    class Req:
        headers = {"authorization": f"Bearer {key}"}

    try:
        for _ in range(5):
            with owner_session(state, Req()) as (_s, owner):
                assert owner.name.startswith("test-")
    finally:
        event.remove(engine, "commit", listener)
    assert len(commits) == 1  # the first request stamps last_used_at; the next four within a minute do not


# ----------------------------------------------------------------- row 13: the sweeper asks the broker first

def test_row13_sweeper_does_not_resend_a_job_whose_message_waits(sessions, redis_url, make_key):
    import redis

    from worker.celery_app import QUEUE
    from worker.sweeper import redis_backlog, sweep_once

    client = redis.Redis.from_url(redis_url)
    with sessions() as s:
        owner = Owner(name=f"sweep-{time.time_ns()}", created_at=utcnow())
        s.add(owner)
        s.flush()
        art = Artifact(owner_id=owner.id, kind="model", sha256="0" * 64, size_bytes=1, storage_key="k",
                       format="safetensors", spec={}, created_at=utcnow())
        s.add(art)
        s.flush()
        old = utcnow() - timedelta(seconds=900)
        job = Job(owner_id=owner.id, model_id=art.id, dataset_id=art.id, method="ft", params={}, status="queued",
                  attempts=0, max_attempts=3, created_at=old, updated_at=old, enqueued_at=old)
        s.add(job)
        s.commit()
        job_id = job.id
    message = json.dumps({"headers": {"task": "nba.sanitize", "argsrepr": f"['{job_id}']"}, "body": "..."})
    client.lpush(QUEUE, message)
    try:
        sent: list[str] = []
        backlog = redis_backlog(redis_url, QUEUE)
        assert job_id not in sweep_once(sessions, sent.append, stale_after=300, backlog=backlog)
        # Held unacked by a worker: still not lost.
        client.delete(QUEUE)
        client.hset("unacked", "tag-1", message)
        assert job_id not in sweep_once(sessions, sent.append, stale_after=300, backlog=backlog)
        # The message is gone (Redis flushed): now it is re-sent.
        client.hdel("unacked", "tag-1")
        assert job_id in sweep_once(sessions, sent.append, stale_after=300, backlog=backlog)
    finally:
        client.delete(QUEUE)
        client.hdel("unacked", "tag-1")


# ------------------------------------------------------------------------------ row 14: the migration lock

def test_row14_concurrent_first_migrations_on_a_fresh_data_dir(tmp_path: Path):
    code_ = ("import sys; from app.core.db import upgrade_database; upgrade_database(sys.argv[1])")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBA_")}
    env["PYTHONPATH"] = str(REPO)
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'fresh{attempt}' / 'nba.db'}"
        procs = [subprocess.Popen([sys.executable, "-c", code_, url], env=env, cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(3)]
        outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(outputs)[-3000:]
    from alembic.script import ScriptDirectory
    from sqlalchemy import create_engine, text

    from app.core.db import alembic_config

    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()  # the latest migration, whichever
    engine = create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == head
        assert conn.execute(select(Owner)).all() == []
    engine.dispose()
