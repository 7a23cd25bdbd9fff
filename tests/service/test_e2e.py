"""End to end through real HTTP, Postgres, Redis and a Celery worker: upload → job → poll → download → report."""

from __future__ import annotations

import hashlib
import json

import pytest

from nba_core.checkpoint import load_model, read_checkpoint_metadata
from tests.service.conftest_worker import submit_digits_job

pytestmark = pytest.mark.service


def sha256_file(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("method, params", [
    ("ft", {"epochs": 1}),
    ("nba", {"teacher_epochs": 1, "student_epochs": 1, "scan_steps": 5, "refresh_every": 0}),
])
def test_full_job(method, params, client, http, celery_worker, digits_files, tmp_path):
    seen: list[tuple[str, str | None, float]] = []
    job = submit_digits_job(client, digits_files, method=method, params=params)
    assert job["status"] in ("queued", "running")
    done = client.wait(job["id"], poll=0.2, timeout=120,
                       on_progress=lambda j: seen.append((j["status"], j["stage"], j["progress"])))
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 1 and done["error"] is None and done["progress"] == 1.0
    assert done["started_at"] and done["finished_at"] and done["heartbeat_at"]
    progresses = [p for status, _, p in seen if status == "running"]
    assert progresses == sorted(progresses)  # progress never goes backwards

    # Metrics before/after, as measured by the worker (probe set given → ASR too).
    before, after = done["metrics"]["before"], done["metrics"]["after"]
    for side in (before, after):
        assert 0.0 <= side["clean_accuracy"] <= 1.0 and 0.0 <= side["attack_success_rate"] <= 1.0
    assert before["attack_success_rate"] > 0.5  # the fixture model really is backdoored

    # The cleaned model: download, verify hash, load it with the spec.
    out = tmp_path / "cleaned.safetensors"
    got = client.download_model(job["id"], out)
    assert got["sha256"] == sha256_file(out) == done["result"]["sha256"]
    model = load_model(out, digits_files["spec_dict"])
    assert sum(p.numel() for p in model.parameters()) > 0
    assert read_checkpoint_metadata(out).get("nba_method") == method

    report = client.get_report(job["id"])
    assert report["method"] == method and report["job_id"] == job["id"]
    assert report["metrics"] == done["metrics"]
    assert report["output"]["sha256"] == got["sha256"] and report["output"]["path"] is None
    assert report["log"], "per-epoch log rows are kept for the curves"
    json.dumps(report)

    html = client.get_report(job["id"], html=True)
    assert html.lstrip().startswith("<!doctype html>")
    assert "data:image/png;base64," in html and "attack success rate" in html


def test_duplicate_delivery_of_finished_job_is_noop(client, celery_worker, enqueue, digits_files):
    job = submit_digits_job(client, digits_files, params={"epochs": 1}, probe=False)
    done = client.wait(job["id"], poll=0.2, timeout=90)
    assert done["status"] == "succeeded"
    enqueue(job["id"])  # e.g. a sweeper and a broker redelivery racing
    enqueue(job["id"])
    import time

    time.sleep(2.0)
    again = client.get_job(job["id"])
    assert again["attempts"] == 1 and again["result"]["id"] == done["result"]["id"]
    assert again["finished_at"] == done["finished_at"]


def test_cli_submit_status_download(api_server, api_key, celery_worker, digits_files, tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("NBA_")}
    env.update({"NBA_URL": api_server.url, "NBA_API_KEY": api_key})

    def nba(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", *args], env=env, text=True,
                              capture_output=True, timeout=180)

    out = tmp_path / "cleaned.safetensors"
    submitted = nba("submit", str(digits_files["model"]), "--spec", str(digits_files["spec"]), "--data",
                    str(digits_files["clean"]), "--method", "ft", "--params", '{"epochs": 1}', "--probe",
                    str(digits_files["probe"]), "--probe-target", str(digits_files["target"]), "--wait",
                    "--out", str(out))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0].strip()
    assert "succeeded" in submitted.stdout and "attack success rate" in submitted.stdout
    assert out.is_file() and sha256_file(out) in submitted.stdout

    status = nba("status", job_id, "--json")
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "succeeded"
    report_path, again = tmp_path / "report.json", tmp_path / "again.safetensors"
    downloaded = nba("download", job_id, "--out", str(again), "--report", str(report_path))
    assert downloaded.returncode == 0, downloaded.stderr
    assert sha256_file(again) == sha256_file(out) == json.loads(report_path.read_text())["output"]["sha256"]

    missing = nba("status", "00000000-0000-0000-0000-000000000000")
    assert missing.returncode == 3 and "not_found" in missing.stderr
