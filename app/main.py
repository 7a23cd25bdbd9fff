"""FastAPI app factory: `uvicorn --factory app.main:create_app` (or `nba serve`)."""

from __future__ import annotations

import logging
import time
from typing import Callable

from fastapi import FastAPI
from fastapi.responses import RedirectResponse
from fastapi_offline import FastAPIOffline

from app.api import routes_artifacts, routes_health, routes_jobs, routes_reports
from app.api.body_limits import BENCH_SINK, STREAMED_UPLOADS, BodyLimitMiddleware
from app.api.deps import ServiceState
from app.api.errors import install_error_handlers
from app.api.quotas import Quotas
from app.core.db import session_factory
from app.core.settings import Settings
from app.core.storage import store_from_settings

log = logging.getLogger("nba.api")

DESCRIPTION = """Backdoor removal for neural networks, as a service.

Upload a model (`POST /v1/models`) and a clean dataset (`POST /v1/datasets`; a triggered probe set with
`POST /v1/probes` or `kind=probe`), start a job (`POST /v1/jobs`), poll it (`GET /v1/jobs/{id}`), then download the
cleaned model (`GET /v1/jobs/{id}/model`) and the report (`GET /v1/jobs/{id}/report`).

Authenticate with `Authorization: Bearer <key>` (keys are made with `nba keys create OWNER`). Every error is
`{"error": {"code": "...", "message": "..."}}`.
"""


# After a failed enqueue, skip the broker for this long: a dead Redis costs ~6 s per attempt (redis-py's own
# connection retries), and the sweeper re-sends every job whose enqueue was skipped.
BROKER_BACKOFF_S = 15.0


def celery_enqueuer(settings: Settings) -> Callable[[str], None]:
    """Send `nba.sanitize(job_id)` through the worker's Celery configuration (the task code is not imported)."""
    from worker.celery_app import QUEUE, TASK_NAME, make_celery

    celery = make_celery(settings)
    down_until = [0.0]

    def enqueue(job_id: str) -> None:
        if time.monotonic() < down_until[0]:
            raise RuntimeError("the broker was unreachable moments ago; leaving the job to the sweeper")
        try:
            # retry=False: a dead broker must not stall the request further; the sweeper re-sends queued jobs.
            celery.send_task(TASK_NAME, args=[job_id], queue=QUEUE, retry=False)
        except Exception:
            down_until[0] = time.monotonic() + BROKER_BACKOFF_S
            raise

    return enqueue


def _redirect_to(path: str):
    def redirect() -> RedirectResponse:
        return RedirectResponse(path, status_code=307)

    return redirect


def create_app(settings: Settings | None = None, *, enqueue: Callable[[str], None] | None = None) -> FastAPI:
    settings = settings or Settings()
    settings.ensure_dirs()
    # FastAPIOffline: the same FastAPI app, with the Swagger UI / ReDoc assets served from the installed package
    # under /v1/docs-assets instead of a CDN, so the docs render on an air-gapped machine.
    app = FastAPIOffline(title="NBA sanitization service", version="1", description=DESCRIPTION,
                         openapi_url="/v1/openapi.json", docs_url="/v1/docs", redoc_url="/v1/redoc",
                         static_url="/v1/docs-assets", lifespan=_lifespan(settings))
    for old, new in (("/docs", "/v1/docs"), ("/openapi.json", "/v1/openapi.json"), ("/redoc", "/v1/redoc")):
        app.add_api_route(old, _redirect_to(new), include_in_schema=False)
    app.state.nba = ServiceState(settings=settings, sessions=session_factory(settings),
                                 store=store_from_settings(settings),
                                 enqueue=enqueue or celery_enqueuer(settings), quotas=Quotas(settings))
    install_error_handlers(app)
    # Outermost: body size and body stall limits act before routing, JSON parsing and authentication.
    streamed = STREAMED_UPLOADS | ({BENCH_SINK} if settings.bench_endpoints else set())
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_json_body_bytes,
                       read_timeout=settings.body_read_timeout, streamed=streamed)
    app.include_router(routes_health.router)
    app.include_router(routes_artifacts.router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_reports.router)
    if settings.bench_endpoints:
        app.include_router(routes_health.bench_router)
    return app


def _start_poll_cache(app: FastAPI, settings: Settings):
    """One LISTEN thread per API process (uvicorn --workers runs the lifespan in each)."""
    from app.api.poll_cache import ChangeListener, PollCache, libpq_url
    from app.core.keys import LAST_USED_GRANULARITY_S

    conninfo = libpq_url(str(settings.database_url)) if settings.poll_cache else None
    if conninfo is None:
        return None
    cache = PollCache(key_ttl_s=LAST_USED_GRANULARITY_S)
    app.state.nba.poll_cache = cache
    return ChangeListener(cache, conninfo).start()


def _lifespan(settings: Settings):
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        # The threadpool is this process's concurrency for blocking work; the DB pool has as many connections.
        from anyio import to_thread

        to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
        listener = _start_poll_cache(_app, settings)
        try:
            yield
        finally:
            if listener is not None:
                listener.stop()

    return lifespan
