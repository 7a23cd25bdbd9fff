"""The Celery application (`celery -A worker.celery_app worker`).

Postgres is the source of truth for job state, so Celery is only a delivery mechanism: no result backend, late
acks (a task message is acknowledged after the task returns, so a worker crash leaves it in the broker), and
one task at a time per worker process.

Deployment: run ONE worker process per GPU, each pinned with CUDA_VISIBLE_DEVICES and `-c 1`:
    CUDA_VISIBLE_DEVICES=0 celery -A worker.celery_app worker -c 1 -n gpu0@%h
    CUDA_VISIBLE_DEVICES=1 celery -A worker.celery_app worker -c 1 -n gpu1@%h
On CPU-only machines, one worker with `-c 1` per machine (torch already uses all cores for one job).
CUDA is touched only inside the task (nba_core.device.pick_device), i.e. in the prefork child, never at import
time here, so forking the pool is safe.
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_init

from app.core.settings import Settings, get_settings

TASK_NAME = "nba.sanitize"
QUEUE = "nba"


def redis_transport_options(settings: Settings) -> dict[str, Any]:
    """Visibility timeout plus a restore sweep period scaled to it.

    celery#5935: with acks_late on Redis, a message not acked within visibility_timeout is handed out again, so
    the timeout must outlast the hard time limit (Settings validates that). The unacked-restore sweep is what
    brings back a message whose worker was SIGKILLed; scanning every ~visibility/20 seconds (at most 10 s, with
    no throttling) bounds the extra delay to a few percent of the timeout.
    """
    return {
        "visibility_timeout": settings.visibility_timeout,
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout // 20)),
        "unacked_restore_throttle": 1,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    if settings.embedded_broker:
        transport_options = settings.broker_transport_options()
    else:
        transport_options = {**settings.broker_transport_options(), **redis_transport_options(settings)}
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": transport_options,
        "broker_connection_retry_on_startup": True,
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        # A message is acked only after the task returned; if the worker process dies it is requeued.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.job_soft_time_limit,
        "task_time_limit": settings.job_hard_time_limit,
        # Recycle children now and then: long-lived torch processes fragment host and GPU memory.
        "worker_max_tasks_per_child": 20,
        "worker_concurrency": 1,
        "worker_hijack_root_logger": False,
        "task_track_started": False,
    }


def make_celery(settings: Settings | None = None, *, create_dirs: bool = True) -> Celery:
    settings = settings or get_settings()
    if create_dirs and settings.embedded_broker:
        settings.ensure_dirs()  # the filesystem broker needs its folders before the first publish/consume
    celery = Celery("nba", include=["worker.tasks"])
    celery.conf.update(celery_config(settings))
    return celery


# No folders are created at import (the API imports this module with its own settings); a worker creates them
# when it starts, and enqueue_job before it publishes.
app = make_celery(create_dirs=False)


@celeryd_init.connect
def _worker_dirs(**_kwargs) -> None:
    get_settings().ensure_dirs()


def enqueue_job(job_id: str, celery: Celery | None = None) -> None:
    """Publish `nba.sanitize(job_id)` by name (the caller need not import the task module).

    Call only after the job row is committed; a duplicate enqueue is harmless (the claim is atomic)."""
    if celery is None:
        get_settings().ensure_dirs()
    (celery or app).send_task(TASK_NAME, args=[job_id], queue=QUEUE)
