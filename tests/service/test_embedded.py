"""Embedded one-machine mode: `nba serve` with no server URLs (SQLite + filesystem broker + local worker) runs a
job end to end, and `nba keys create` against the embedded database prints a key that works."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from app.client import NBAClient
from tests.service.conftest_worker import submit_digits_job

REPO_ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nba(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app.cli", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=120, **kw)


@pytest.fixture()
def embedded(tmp_path):
    """A running `nba serve` on a free port with a fresh data dir; yields (url, data_dir, env)."""
    data_dir = tmp_path / "nba-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NBA_")}  # nothing set → embedded defaults
    env.update({"OMP_NUM_THREADS": "1", "NBA_DEVICE": "cpu", "PYTHONUNBUFFERED": "1"})
    port = _free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port), "--data-dir",
                                 str(data_dir)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield url, data_dir, env, log_path
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve stops uvicorn, the sweeper and its worker
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode in (0, 130, -signal.SIGINT), log_path.read_text()[-3000:]


def test_embedded_serve_runs_a_job_end_to_end(embedded, digits_files, tmp_path):
    url, data_dir, env, log_path = embedded
    created = _nba("keys", "create", "alice", "--data-dir", str(data_dir), env=env)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert key.startswith("nba_") and len(key) == 44

    assert (data_dir / "nba.db").is_file()  # SQLite in the data dir, no server URLs configured
    with NBAClient(url, key) as client:
        job = submit_digits_job(client, digits_files, params={"epochs": 1})
        done = client.wait(job["id"], poll=0.3, timeout=120)
        assert done["status"] == "succeeded", (done, log_path.read_text()[-4000:])
        out = tmp_path / "cleaned.safetensors"
        got = client.download_model(job["id"], out)
        assert got["sha256"] == done["result"]["sha256"]
        assert client.get_report(job["id"])["metrics"]["before"]["clean_accuracy"] is not None
    assert any((data_dir / "artifacts").rglob("*")), "artifacts stored locally under the data dir"

    listed = _nba("keys", "list", "--data-dir", str(data_dir), env=env)
    assert key[:12] in listed.stdout
    assert _nba("keys", "revoke", key[:12], "--data-dir", str(data_dir), env=env).returncode == 0
    assert httpx.get(url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 401
