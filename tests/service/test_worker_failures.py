"""Failure paths with real processes: worker SIGKILL mid-job, broker flushed, cancellation, NBAError in the
pipeline. Real Postgres, Redis, Celery worker subprocesses and the HTTP API."""

from __future__ import annotations

import time

import pytest
import redis
from sqlalchemy import func, select

from app.core.models import Artifact, Job
from nba_core.errors import DATA_LABEL_OUT_OF_RANGE
from tests.service.conftest_worker import submit_digits_job, wait_for
from worker.sweeper import sweep_once

pytestmark = pytest.mark.service

# ~6-10 s of fine-tuning on 2 shared cores: long enough to be caught running, short enough to rerun.
SLOW_FT = {"epochs": 60}


def result_count(sessions, job_id: str) -> int:
    with sessions() as s:
        owner_id = s.get(Job, job_id).owner_id
        return s.scalar(select(func.count()).select_from(Artifact)
                        .where(Artifact.owner_id == owner_id, Artifact.kind == "result"))


def running_with_progress(client, job_id: str, minimum: float = 0.1):
    job = client.get_job(job_id)
    assert job["status"] in ("queued", "running"), job
    return job if job["status"] == "running" and job["progress"] > minimum else None


def test_killed_worker_job_is_redelivered_and_completes_once(client, worker_factory, sessions, digits_files):
    first = worker_factory()
    job = submit_digits_job(client, digits_files, params=SLOW_FT)
    wait_for(lambda: running_with_progress(client, job["id"]), 60, what="job running with progress")
    first.kill()  # SIGKILL the whole worker: no ack, no cleanup, the DB row is left 'running'
    assert client.get_job(job["id"])["status"] == "running"

    # The replacement restores the unacked message once the visibility timeout (counted from the first
    # delivery) has passed; by then the dead worker's heartbeat is stale, so the claim succeeds (attempt 2).
    worker_factory(flush=False, job_soft_time_limit=30, job_hard_time_limit=35, visibility_timeout=36)
    done = client.wait(job["id"], poll=0.5, timeout=120)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    assert result_count(sessions, job["id"]) == 1
    # The delivery that is left over (if any) is a no-op: still one result, same attempts.
    time.sleep(1.0)
    assert client.get_job(job["id"])["attempts"] == 2 and result_count(sessions, job["id"]) == 1


def test_jobs_lost_by_the_broker_are_requeued_by_the_sweeper(client, worker_factory, sessions, enqueue,
                                                            redis_url, digits_files):
    broker = redis.Redis.from_url(redis_url)
    broker.flushdb()
    jobs = [submit_digits_job(client, digits_files, params={"epochs": 1}, probe=False) for _ in range(2)]
    ids = {j["id"] for j in jobs}
    assert all(j["enqueued_at"] for j in jobs)
    assert broker.llen("nba") == 2
    broker.flushdb()  # Redis lost everything; Postgres still says queued

    sent: list[str] = []

    def enqueue_mine(job_id: str) -> None:  # other modules' never-run placeholder jobs stay unsent
        if job_id in ids:
            enqueue(job_id)
            sent.append(job_id)

    requeued = sweep_once(sessions, enqueue_mine, stale_after=0)
    assert ids <= set(requeued) and set(sent) == ids
    assert broker.llen("nba") == 2

    worker_factory(flush=False)
    for job_id in ids:
        done = client.wait(job_id, poll=0.5, timeout=90)
        assert done["status"] == "succeeded" and done["attempts"] == 1, done
        assert result_count(sessions, job_id) == 1


def test_cancel_running_job(client, celery_worker, sessions, digits_files):
    job = submit_digits_job(client, digits_files, params=SLOW_FT, probe=False)
    wait_for(lambda: running_with_progress(client, job["id"]), 60, what="job running with progress")
    assert client.cancel_job(job["id"])["cancel_requested"] is True
    done = client.wait(job["id"], poll=0.3, timeout=60)
    assert done["status"] == "cancelled", done
    assert done["result"] is None and done["links"]["model"] is None
    assert result_count(sessions, job["id"]) == 0
    assert done["finished_at"] is not None


def test_pipeline_error_fails_job_with_its_code_without_retry(client, celery_worker, sessions, digits_files):
    job = submit_digits_job(client, digits_files, data_key="bad_labels", probe=False)
    done = client.wait(job["id"], poll=0.3, timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == DATA_LABEL_OUT_OF_RANGE
    assert "label" in done["error"]["message"]
    assert done["attempts"] == 1
    time.sleep(1.5)  # no retry: nothing changes afterwards
    again = client.get_job(job["id"])
    assert (again["status"], again["attempts"]) == ("failed", 1)
    assert result_count(sessions, job["id"]) == 0


def test_invalid_params_fail_fast(client, celery_worker, digits_files):
    job = submit_digits_job(client, digits_files, params={"epochs": "many"}, probe=False)
    done = client.wait(job["id"], poll=0.3, timeout=60)
    assert (done["status"], done["error"]["code"], done["attempts"]) == ("failed", "invalid_params", 1)
