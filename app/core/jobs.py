"""Job state transitions done by the API (creation bookkeeping, enqueue mark, cancel).

The worker's transitions (claim with attempt fencing, heartbeat, finish) live in worker/jobstate.py. Every
transition is one conditional UPDATE (`... WHERE status = ...`), so a cancel racing a worker's finish cannot both
win. Functions do not commit; the caller owns the transaction.

    queued ──claim──▶ running ──finish──▶ succeeded | failed | cancelled
       └──cancel──▶ cancelled      (running + cancel → cancel_requested; the worker stops between steps)
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from nba_core.errors import NBAError

from .models import FINISHED_STATUSES, Job, JobEvent, utcnow

JOB_FINISHED = "job_finished"


def request_hash(body: dict[str, Any]) -> str:
    """Canonical hash of a job request (to tell "same Idempotency-Key, same body" from a conflicting reuse)."""
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def add_event(session: Session, job_id: str, kind: str, data: dict[str, Any] | None = None) -> None:
    session.add(JobEvent(job_id=job_id, kind=kind, data=data, at=utcnow()))


def mark_enqueued(session: Session, job_id: str, *, now: datetime | None = None) -> None:
    """Record that the task message was sent (the sweeper re-enqueues queued jobs whose mark is missing/old)."""
    session.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                    .values(enqueued_at=now or utcnow()).execution_options(synchronize_session=False))


def request_cancel(session: Session, job: Job, *, now: datetime | None = None) -> Job:
    """queued → cancelled now; running → cancel_requested (the worker stops between steps);
    finished → NBAError job_finished (409)."""
    now = now or utcnow()
    result = session.execute(update(Job).where(Job.id == job.id, Job.status == "queued")
                             .values(status="cancelled", cancel_requested=True, finished_at=now, updated_at=now,
                                     stage="cancelled")
                             .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        result = session.execute(update(Job).where(Job.id == job.id, Job.status == "running")
                                 .values(cancel_requested=True, updated_at=now)
                                 .execution_options(synchronize_session=False))
        if result.rowcount != 1:
            session.refresh(job)
            raise NBAError(JOB_FINISHED, f"job {job.id} already {job.status}", http_status=409)
    add_event(session, job.id, "cancel_requested")
    session.flush()
    session.refresh(job)
    return job


def is_finished(status: str) -> bool:
    return status in FINISHED_STATUSES
