"""Job state transitions done by the worker, each one a single guarded UPDATE so they are atomic on Postgres and
SQLite alike.

Fencing: a claim increments `attempts`, and every later write by that worker (heartbeat, finish) is guarded by
`status = 'running' AND attempts = <its attempt>`. A worker that was presumed dead and replaced can therefore
never overwrite the new attempt's state, and a job finishes exactly once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Callable

from sqlalchemy import and_, or_, select, update
from sqlalchemy.orm import Session

from app.core.models import Artifact, Job, JobEvent, utcnow
from nba_core.errors import TOO_MANY_ATTEMPTS

log = logging.getLogger(__name__)

SessionFactory = Callable[[], Session]

# Claim outcomes other than a successful claim.
CLAIMED = "claimed"
MISSING = "missing"  # no such job
FINISHED = "finished"  # already succeeded/failed/cancelled: a duplicate delivery, nothing to do
BUSY = "busy"  # running elsewhere with a fresh heartbeat
EXHAUSTED = "exhausted"  # attempts used up: marked failed (too_many_attempts)
CANCELLED = "cancelled"  # cancel was requested before it (re)started: marked cancelled


@dataclass(frozen=True)
class Claim:
    """What a worker needs to run a job it owns; `attempt` is its fencing token."""

    job_id: str
    attempt: int
    owner_id: str
    model_id: str
    dataset_id: str
    probe_id: str | None
    probe_target: int | None
    method: str
    params: dict[str, Any]
    options: dict[str, Any] = field(default_factory=dict)  # class_names, allow_low_accuracy


def claimable(cutoff: datetime):
    """Queued, or running with a heartbeat older than `cutoff` (its worker died)."""
    return or_(Job.status == "queued",
               and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff)))


def _owned(claim: Claim):
    return and_(Job.id == claim.job_id, Job.status == "running", Job.attempts == claim.attempt)


def add_event(session: Session, job_id: str, kind: str, data: dict | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data, at=utcnow()))


def claim_job(session_factory: SessionFactory, job_id: str, *, worker: str, stale_after: float,
              now: datetime | None = None) -> tuple[str, Claim | None]:
    """Atomically take the job for this worker (attempts += 1). Returns (outcome, claim-or-None)."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_after)
    with session_factory() as session:
        row = session.execute(
            update(Job)
            .where(Job.id == job_id, claimable(cutoff), Job.attempts < Job.max_attempts,
                   Job.cancel_requested.is_(False))
            .values(status="running", attempts=Job.attempts + 1, worker=worker[:200], started_at=now,
                    heartbeat_at=now, stage="starting", progress=0.0, error_code=None, error_message=None,
                    updated_at=now)
            .returning(Job.attempts, Job.owner_id, Job.model_id, Job.dataset_id, Job.probe_id, Job.probe_target,
                       Job.method, Job.params, Job.options)
            .execution_options(synchronize_session=False)
        ).first()
        if row is not None:
            add_event(session, job_id, "claimed", {"attempt": row.attempts, "worker": worker})
            session.commit()
            return CLAIMED, Claim(job_id=job_id, attempt=row.attempts, owner_id=row.owner_id, model_id=row.model_id,
                                  dataset_id=row.dataset_id, probe_id=row.probe_id, probe_target=row.probe_target,
                                  method=row.method, params=dict(row.params or {}),
                                  options=dict(row.options or {}))
        session.rollback()

        job = session.get(Job, job_id)
        if job is None:
            return MISSING, None
        if job.finished:
            return FINISHED, None
        # Not claimable for a reason we can settle here: cancelled before it ran, or out of attempts.
        guard = and_(Job.id == job_id, claimable(cutoff))
        if job.cancel_requested:
            done = _finish(session, guard, status="cancelled", now=now, stage="cancelled")
            return (CANCELLED if done else BUSY), None
        if job.attempts >= job.max_attempts:
            done = _finish(session, guard, status="failed", now=now, error_code=TOO_MANY_ATTEMPTS,
                           error_message=f"the job was started {job.attempts} times and its worker stopped "
                                         f"each time (max_attempts={job.max_attempts})")
            return (EXHAUSTED if done else BUSY), None
        return BUSY, None


def _finish(session: Session, guard, *, status: str, now: datetime, **values) -> bool:
    job_id = session.execute(
        update(Job).where(guard).values(status=status, finished_at=now, updated_at=now, **values)
        .returning(Job.id).execution_options(synchronize_session=False)
    ).scalar()
    if job_id is None:
        session.rollback()
        return False
    add_event(session, job_id, status, {k: v for k, v in values.items() if k in ("error_code", "error_message")})
    session.commit()
    return True


def heartbeat(session_factory: SessionFactory, claim: Claim, *, stage: str | None, progress: float,
              events: list[tuple[str, dict]] | None = None) -> bool | None:
    """Record liveness and progress; return cancel_requested, or None if this worker no longer owns the job."""
    now = utcnow()
    with session_factory() as session:
        cancel = session.execute(
            update(Job).where(_owned(claim))
            .values(heartbeat_at=now, stage=stage, progress=min(max(progress, 0.0), 1.0), updated_at=now)
            .returning(Job.cancel_requested).execution_options(synchronize_session=False)
        ).scalar()
        if cancel is None:
            session.rollback()
            return None
        for kind, data in events or []:
            add_event(session, claim.job_id, kind, data)
        session.commit()
        return bool(cancel)


def finish_failed(session_factory: SessionFactory, claim: Claim, code: str, message: str) -> bool:
    with session_factory() as session:
        return _finish(session, _owned(claim), status="failed", now=utcnow(), error_code=code,
                       error_message=message[:4000])


def finish_cancelled(session_factory: SessionFactory, claim: Claim) -> bool:
    with session_factory() as session:
        return _finish(session, _owned(claim), status="cancelled", now=utcnow(), stage="cancelled")


@dataclass
class NewArtifact:
    kind: str
    format: str
    filename: str
    key: str
    sha256: str
    size: int
    spec: dict | None = None


def record_metrics(session_factory: SessionFactory, claim: Claim, metrics: dict) -> bool:
    """Store partial results (metrics.before and the before-verdict) while the job still runs; False if this
    worker no longer owns the job."""
    with session_factory() as session:
        done = session.execute(
            update(Job).where(_owned(claim)).values(metrics=metrics, updated_at=utcnow())
            .returning(Job.id).execution_options(synchronize_session=False)
        ).scalar()
        if done is None:
            session.rollback()
            return False
        add_event(session, claim.job_id, "metrics_before", None)
        session.commit()
        return True


def finish_succeeded(session_factory: SessionFactory, claim: Claim, *, metrics: dict,
                     result: NewArtifact | None, report: NewArtifact, report_html: NewArtifact | None) -> bool:
    """Insert the output artifacts and mark the job succeeded in ONE transaction; False (and nothing written)
    if this worker no longer owns the job. `result` is None for a scan job (no cleaned model)."""
    now = utcnow()
    with session_factory() as session:
        rows = {}
        for name, a in (("result", result), ("report", report), ("report_html", report_html)):
            if a is None:
                continue
            row = Artifact(owner_id=claim.owner_id, kind=a.kind, sha256=a.sha256, size_bytes=a.size,
                           storage_key=a.key, filename=a.filename, format=a.format, spec=a.spec, created_at=now)
            session.add(row)
            rows[name] = row
        session.flush()  # assigns ids
        return _finish(session, _owned(claim), status="succeeded", now=now, stage="done", progress=1.0,
                       metrics=metrics, result_id=rows["result"].id if "result" in rows else None,
                       report_id=rows["report"].id,
                       report_html_id=rows["report_html"].id if "report_html" in rows else None)


def load_artifact(session_factory: SessionFactory, artifact_id: str) -> Artifact | None:
    with session_factory() as session:
        return session.execute(select(Artifact).where(Artifact.id == artifact_id)).scalar_one_or_none()


def fail_if_running_on(session_factory: SessionFactory, job_id: str, worker: str, code: str, message: str) -> bool:
    """Fail a job still marked running by `worker` (used by the pool parent after it killed a child at the hard
    time limit: the child cannot record that itself). Guarded by the worker name, so a job that was already
    taken over by another attempt is left alone."""
    with session_factory() as session:
        guard = and_(Job.id == job_id, Job.status == "running", Job.worker == worker[:200])
        return _finish(session, guard, status="failed", now=utcnow(), error_code=code, error_message=message)
