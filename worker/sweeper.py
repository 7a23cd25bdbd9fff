"""The sweeper: re-enqueues jobs that Postgres says should run but that no worker is running.

Cases: the broker lost the message (Redis flushed or failed over, enqueue failed after the commit), or a worker
died and its message was not redelivered. A job qualifies when it is
  - queued, and its last enqueue (or creation, if never enqueued) is older than SWEEP_STALE_AFTER, or
  - running with a heartbeat older than SWEEP_STALE_AFTER (and no enqueue within that time either).
Running jobs whose attempts are used up are marked failed (too_many_attempts) instead of being re-enqueued.

A job whose task message is still waiting in the broker (the queue, or Redis's `unacked` hash of messages a
worker holds) is never re-sent: a long queue is not a lost message, and a running job whose worker holds its
message is alive even if its heartbeat could not be written (a database outage longer than SWEEP_STALE_AFTER
used to get such jobs re-sent to idle workers). Only when the broker cannot be inspected does the sweeper fall
back to judging by time alone.

Deployment: one `nba sweeper` process (a loop: sweep_once every SWEEP_INTERVAL seconds); `nba serve` runs the
same loop in a thread. Several sweepers are harmless: the enqueued_at bump is a guarded UPDATE, and a duplicate
message is a no-op because the worker's claim is atomic and finished jobs are skipped.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta
from typing import Callable

from sqlalchemy import and_, or_, select, update

from app.core.models import Job, utcnow
from nba_core.errors import TOO_MANY_ATTEMPTS

from .jobstate import SessionFactory, add_event

log = logging.getLogger(__name__)


def _stale_conditions(cutoff: datetime):
    never_enqueued_long_ago = and_(Job.enqueued_at.is_(None), Job.created_at < cutoff)
    not_recently_enqueued = or_(never_enqueued_long_ago, Job.enqueued_at < cutoff)
    stale_queued = and_(Job.status == "queued", not_recently_enqueued)
    stale_running = and_(Job.status == "running", or_(Job.heartbeat_at.is_(None), Job.heartbeat_at < cutoff),
                         not_recently_enqueued)
    return stale_queued, stale_running


def redis_backlog(broker_url: str, queue: str) -> Callable[[], bytes | None]:
    """Raw bytes of every message waiting in the Redis queue (and its priority lists) or held unacked by a worker;
    job ids are searched in them. None when Redis cannot be read."""
    import redis

    client = redis.Redis.from_url(broker_url, socket_timeout=5, socket_connect_timeout=5)

    def backlog() -> bytes | None:
        try:
            keys = [queue.encode()] + [k for k in client.scan_iter(match=f"{queue}\x06\x16*", count=100)]
            parts = [m for k in keys for m in client.lrange(k, 0, -1)]
            parts += client.hvals("unacked")
            return b"\n".join(parts)
        except Exception as e:  # noqa: BLE001
            log.warning("cannot inspect the broker (%s); judging by time alone", e)
            return None

    return backlog


def folder_backlog(folder: str) -> Callable[[], bytes | None]:
    """The same for the embedded filesystem broker: the message files waiting in its queue folder."""
    import os

    def backlog() -> bytes | None:
        try:
            parts = []
            for name in os.listdir(folder):
                with open(os.path.join(folder, name), "rb") as f:
                    parts.append(f.read(1024 * 1024))
            return b"\n".join(parts)
        except OSError as e:
            log.warning("cannot inspect the broker folder (%s); judging by time alone", e)
            return None

    return backlog


def backlog_from_settings(settings) -> Callable[[], bytes | None]:
    from .celery_app import QUEUE

    if settings.embedded_broker:
        return folder_backlog(settings.broker_transport_options()["data_folder_in"])
    if str(settings.broker_url).startswith(("redis://", "rediss://")):
        return redis_backlog(str(settings.broker_url), QUEUE)
    return lambda: None


def sweep_once(session_factory: SessionFactory, enqueue: Callable[[str], None], *, stale_after: float = 300,
               now: datetime | None = None, limit: int = 500,
               backlog: Callable[[], bytes | None] | None = None) -> list[str]:
    """One pass; returns the ids of the jobs re-enqueued. `backlog()` gives the broker's waiting/unacked messages
    (raw bytes): jobs named there still have their message and are skipped."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stale_after)
    stale_queued, stale_running = _stale_conditions(cutoff)
    candidates: list[str] = []
    with session_factory() as session:
        rows = session.execute(
            select(Job.id, Job.status, Job.attempts, Job.max_attempts)
            .where(or_(stale_queued, stale_running)).order_by(Job.created_at).limit(limit)
        ).all()
        waiting = backlog() if (backlog is not None and rows) else None
        for job_id, status, attempts, max_attempts in rows:
            if waiting is not None and job_id.encode() in waiting:
                continue  # its message is still queued or held by a live worker: nothing was lost
            guard = and_(Job.id == job_id, stale_queued if status == "queued" else stale_running)
            if status == "running" and attempts >= max_attempts:
                # The last allowed attempt died: settle it here rather than enqueue a message that would.
                failed = session.execute(
                    update(Job).where(guard).values(
                        status="failed", finished_at=now, updated_at=now, error_code=TOO_MANY_ATTEMPTS,
                        error_message=f"the worker stopped during all {attempts} attempts")
                    .returning(Job.id).execution_options(synchronize_session=False)).scalar()
                if failed:
                    add_event(session, job_id, "failed", {"error_code": TOO_MANY_ATTEMPTS, "by": "sweeper"})
                continue
            bumped = session.execute(
                update(Job).where(guard).values(enqueued_at=now)
                .returning(Job.id).execution_options(synchronize_session=False)).scalar()
            if bumped:
                add_event(session, job_id, "requeued", {"status": status, "attempts": attempts})
                candidates.append(job_id)
        session.commit()  # commit before publishing, so a worker never sees an older row than the message

    enqueued = []
    for job_id in candidates:
        try:
            enqueue(job_id)
            enqueued.append(job_id)
        except Exception:  # broker down: enqueued_at was bumped, so the next pass after stale_after retries
            log.warning("re-enqueue of job %s failed", job_id, exc_info=True)
    if enqueued:
        log.info("sweeper re-enqueued %d job(s): %s", len(enqueued), ", ".join(enqueued))
    return enqueued


def run_sweeper(session_factory: SessionFactory, enqueue: Callable[[str], None], *, interval: float,
                stale_after: float, stop: threading.Event | None = None,
                backlog: Callable[[], bytes | None] | None = None) -> None:
    """Loop until `stop` is set; errors in one pass (DB or broker down) are logged and the loop goes on."""
    stop = stop or threading.Event()
    while not stop.is_set():
        try:
            sweep_once(session_factory, enqueue, stale_after=stale_after, backlog=backlog)
        except Exception as e:
            log.warning("sweep failed (retrying in %.0f s): %s", interval, str(e).splitlines()[0] if str(e) else e)
            log.debug("sweep failure details", exc_info=True)
        stop.wait(interval)


def run_from_settings(stop: threading.Event | None = None) -> None:
    """`nba sweeper`: the loop with the process's settings, DB and broker."""
    from app.core.db import session_factory
    from app.core.settings import get_settings

    from .celery_app import enqueue_job

    settings = get_settings()
    settings.ensure_dirs()
    run_sweeper(session_factory(settings), enqueue_job, interval=settings.sweep_interval,
                stale_after=settings.sweep_stale_after, stop=stop, backlog=backlog_from_settings(settings))


if __name__ == "__main__":  # `python -m worker.sweeper` (docker-compose); same as `nba sweeper`
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        run_from_settings()
    except KeyboardInterrupt:
        pass
