"""Recovery with real processes: a worker SIGKILLed mid-job, and a broker that lost its queue (FLUSHDB).
Real Postgres, Redis, Celery worker subprocesses and the HTTP API."""

from __future__ import annotations

import time

import pytest
import redis

from tests.service.conftest_worker import (SLOW_FT, result_count, running_with_progress, submit_digits_job,
                                           wait_for)
from worker.sweeper import sweep_once

pytestmark = pytest.mark.service

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
    assert done["status"] == "succeeded", (done["error"], done["attempts"], done["stage"])
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
    assert result_count(sessions, job_id) == len(ids)  # one cleaned model per job (same owner for both)


def test_job_over_the_soft_time_limit_fails_cleanly(client, worker_factory, sessions, digits_files):
    worker_factory(job_soft_time_limit=3, job_hard_time_limit=6, visibility_timeout=8)
    job = submit_digits_job(client, digits_files, params=SLOW_FT, probe=False)
    done = client.wait(job["id"], poll=0.3, timeout=60)
    assert (done["status"], done["error"]["code"], done["attempts"]) == ("failed", "time_limit_exceeded", 1), done
    assert result_count(sessions, job["id"]) == 0
