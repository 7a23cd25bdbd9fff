"""Worker job-state transitions and the sweeper against the real test Postgres database (no worker process)."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from app.core.models import Artifact, Job, JobEvent, Owner, utcnow
from worker import jobstate
from worker.sweeper import sweep_once


@pytest.fixture()
def owner_and_model(sessions) -> tuple[str, str]:
    with sessions() as s:
        owner = Owner(name=f"state-{uuid.uuid4().hex[:10]}", created_at=utcnow())
        s.add(owner)
        s.flush()
        art = Artifact(owner_id=owner.id, kind="model", sha256="0" * 64, size_bytes=1, storage_key="sha256/00/x",
                       format="safetensors", spec={"arch": "small_cnn"}, created_at=utcnow())
        s.add(art)
        s.commit()
        return owner.id, art.id


@pytest.fixture()
def make_job(sessions, owner_and_model):
    owner_id, art_id = owner_and_model

    def make(**values) -> str:
        now = utcnow()
        fields = dict(owner_id=owner_id, model_id=art_id, dataset_id=art_id, method="ft", params={"epochs": 1},
                      status="queued", attempts=0, max_attempts=3, created_at=now, updated_at=now)
        fields.update(values)
        with sessions() as s:
            job = Job(**fields)
            s.add(job)
            s.commit()
            return job.id

    return make


def get(sessions, job_id: str) -> Job:
    with sessions() as s:
        return s.get(Job, job_id)


def result_artifact(kind: str = "result") -> jobstate.NewArtifact:
    return jobstate.NewArtifact(kind, "safetensors", "cleaned.safetensors", "sha256/ab/x", "ab" * 32, 10)


def test_claim_is_exclusive_and_counts_attempts(sessions, make_job):
    job_id = make_job()
    outcome, claim = jobstate.claim_job(sessions, job_id, worker="w1", stale_after=60)
    assert outcome == jobstate.CLAIMED and claim.attempt == 1
    # A duplicate delivery while the first worker is alive (fresh heartbeat) does not start a second run.
    assert jobstate.claim_job(sessions, job_id, worker="w2", stale_after=60) == (jobstate.BUSY, None)
    job = get(sessions, job_id)
    assert (job.status, job.attempts, job.worker) == ("running", 1, "w1")


def test_stale_running_job_is_taken_over_and_old_worker_is_fenced(sessions, make_job):
    job_id = make_job()
    _, first = jobstate.claim_job(sessions, job_id, worker="w1", stale_after=60)
    later = utcnow() + timedelta(seconds=120)  # w1's heartbeat is now 2 minutes old
    outcome, second = jobstate.claim_job(sessions, job_id, worker="w2", stale_after=60, now=later)
    assert outcome == jobstate.CLAIMED and second.attempt == 2
    # The presumed-dead worker can neither heartbeat nor finish the job any more ...
    assert jobstate.heartbeat(sessions, first, stage="x", progress=0.5) is None
    assert not jobstate.finish_succeeded(sessions, first, metrics={}, result=result_artifact(),
                                         report=result_artifact("report"), report_html=None)
    assert not jobstate.finish_failed(sessions, first, "internal_error", "boom")
    # ... while the new owner can, exactly once.
    assert jobstate.heartbeat(sessions, second, stage="train", progress=0.5) is False
    assert jobstate.finish_succeeded(sessions, second, metrics={"after": {}}, result=result_artifact(),
                                     report=result_artifact("report"), report_html=None)
    assert not jobstate.finish_succeeded(sessions, second, metrics={}, result=result_artifact(),
                                         report=result_artifact("report"), report_html=None)
    job = get(sessions, job_id)
    assert (job.status, job.attempts, job.progress) == ("succeeded", 2, 1.0)
    with sessions() as s:
        results = s.scalar(select(func.count()).select_from(Artifact).where(Artifact.owner_id == job.owner_id,
                                                                            Artifact.kind == "result"))
    assert results == 1  # the rejected finishes left no artifact rows behind
    assert jobstate.claim_job(sessions, job_id, worker="w3", stale_after=60)[0] == jobstate.FINISHED


def test_attempt_cap_marks_failed(sessions, make_job):
    old = utcnow() - timedelta(seconds=600)
    job_id = make_job(status="running", attempts=3, max_attempts=3, heartbeat_at=old, started_at=old)
    assert jobstate.claim_job(sessions, job_id, worker="w", stale_after=60) == (jobstate.EXHAUSTED, None)
    job = get(sessions, job_id)
    assert (job.status, job.error_code, job.attempts) == ("failed", "too_many_attempts", 3)


def test_cancel_requested_before_start_is_settled_at_claim(sessions, make_job):
    job_id = make_job(cancel_requested=True)
    assert jobstate.claim_job(sessions, job_id, worker="w", stale_after=60) == (jobstate.CANCELLED, None)
    assert get(sessions, job_id).status == "cancelled"


def test_heartbeat_reports_cancel_and_records_events(sessions, make_job):
    job_id = make_job()
    _, claim = jobstate.claim_job(sessions, job_id, worker="w", stale_after=60)
    assert jobstate.heartbeat(sessions, claim, stage="teacher", progress=0.3,
                              events=[("stage", {"stage": "teacher"})]) is False
    with sessions() as s:
        s.get(Job, job_id).cancel_requested = True
        s.commit()
    assert jobstate.heartbeat(sessions, claim, stage="teacher", progress=0.4) is True
    assert jobstate.finish_cancelled(sessions, claim)
    with sessions() as s:
        kinds = s.scalars(select(JobEvent.kind).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
    assert kinds == ["claimed", "stage", "cancelled"]


def test_sweeper_requeues_only_stale_jobs(sessions, make_job):
    now = utcnow()
    old = now - timedelta(seconds=600)
    lost_queued = make_job(created_at=old, enqueued_at=old)
    never_enqueued = make_job(created_at=old)
    fresh_queued = make_job(created_at=now, enqueued_at=now)
    dead_running = make_job(status="running", attempts=1, heartbeat_at=old, enqueued_at=old, created_at=old)
    live_running = make_job(status="running", attempts=1, heartbeat_at=now, enqueued_at=old, created_at=old)
    exhausted = make_job(status="running", attempts=3, max_attempts=3, heartbeat_at=old, enqueued_at=old,
                         created_at=old)
    done = make_job(status="succeeded", created_at=old, enqueued_at=old)

    sent: list[str] = []
    requeued = sweep_once(sessions, sent.append, stale_after=300, now=now)
    mine = {lost_queued, never_enqueued, fresh_queued, dead_running, live_running, exhausted, done}
    assert set(requeued) & mine == {lost_queued, never_enqueued, dead_running}
    assert set(sent) == set(requeued)
    assert get(sessions, exhausted).status == "failed"
    assert get(sessions, exhausted).error_code == "too_many_attempts"
    assert get(sessions, live_running).status == "running"
    # The enqueue mark was bumped, so an immediate second pass (or a second sweeper) sends nothing again.
    assert not set(sweep_once(sessions, sent.append, stale_after=300, now=now + timedelta(seconds=1))) & mine


def test_sweeper_survives_a_broker_error(sessions, make_job):
    old = utcnow() - timedelta(seconds=600)
    job_id = make_job(created_at=old, enqueued_at=old)

    def broken(_job_id: str) -> None:
        raise ConnectionError("broker down")

    assert job_id not in sweep_once(sessions, broken, stale_after=300)
    assert get(sessions, job_id).status == "queued"  # still queued: a later pass will send it
