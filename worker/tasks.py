"""Celery task `nba.sanitize(job_id)`: a thin wrapper around worker.runner.run_job."""

from __future__ import annotations

import logging
import os

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from celery.worker.request import Request

from app.core.settings import get_settings

from .celery_app import TASK_NAME, app

log = logging.getLogger(__name__)


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    """A forked pool child must not reuse the parent's pooled DB connections."""
    from app.core.db import dispose_engines

    dispose_engines()


def worker_name(hostname: str | None, pid: int) -> str:
    """How a job row names the process running it (the pool parent can rebuild it for its children)."""
    return f"{hostname or 'worker'}:{pid}"


class SanitizeRequest(Request):
    """Runs in the pool parent. At the hard time limit the child is killed and cannot update its job; the parent
    marks it failed (time_limit_exceeded) instead of leaving it 'running' for the sweeper to retry."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft or not self.args:
            return
        try:
            from app.core.db import session_factory
            from nba_core.errors import TIME_LIMIT_EXCEEDED

            from .jobstate import fail_if_running_on

            fail_if_running_on(session_factory(get_settings()), str(self.args[0]),
                               worker_name(self.hostname, self.worker_pid), TIME_LIMIT_EXCEEDED,
                               f"the job was stopped at the hard time limit ({timeout:.0f} s)")
        except Exception:
            log.exception("could not mark job %s failed after its hard time limit", self.args[0])


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          Request=SanitizeRequest)
def sanitize(self, job_id: str) -> str:
    from app.core.db import session_factory
    from app.core.storage import store_from_settings

    from .runner import run_job

    settings = get_settings()
    worker = worker_name(self.request.hostname, os.getpid())
    outcome = run_job(job_id, settings=settings, session_factory=session_factory(settings),
                      store=store_from_settings(settings), worker=worker,
                      timeout_exceptions=(SoftTimeLimitExceeded,))
    log.info("job %s: %s", job_id, outcome)
    return outcome
