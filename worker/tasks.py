"""Celery task `nba.sanitize(job_id)`: a thin wrapper around worker.runner.run_job."""

from __future__ import annotations

import logging
import os

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from app.core.settings import get_settings

from .celery_app import TASK_NAME, app

log = logging.getLogger(__name__)


@worker_process_init.connect
def _fresh_connections(**_kwargs) -> None:
    """A forked pool child must not reuse the parent's pooled DB connections."""
    from app.core.db import dispose_engines

    dispose_engines()


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def sanitize(self, job_id: str) -> str:
    from app.core.db import session_factory
    from app.core.storage import store_from_settings

    from .runner import run_job

    settings = get_settings()
    worker = f"{self.request.hostname or 'worker'}:{os.getpid()}"
    outcome = run_job(job_id, settings=settings, session_factory=session_factory(settings),
                      store=store_from_settings(settings), worker=worker,
                      timeout_exceptions=(SoftTimeLimitExceeded,))
    log.info("job %s: %s", job_id, outcome)
    return outcome
