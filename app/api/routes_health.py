"""Liveness (/healthz), readiness (/readyz: database, broker, storage) and debug-only introspection."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable

from anyio import to_thread
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import select, text

from app.core.models import Job

from .deps import ServiceState, get_state
from .errors import not_found

router = APIRouter(tags=["health"])

CHECK_TIMEOUT_S = 3.0


@router.get("/healthz", summary="Liveness: the process answers (no dependencies checked)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def check_database(state: ServiceState) -> None:
    with state.sessions() as session:
        session.execute(text("SELECT 1"))


def check_broker(state: ServiceState) -> None:
    settings = state.settings
    if settings.embedded_broker:
        folder = settings.broker_transport_options()["data_folder_in"]
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise RuntimeError(f"broker folder {folder} is missing or not writable")
        return
    from kombu import Connection

    with Connection(str(settings.broker_url), connect_timeout=CHECK_TIMEOUT_S,
                    transport_options={"socket_timeout": CHECK_TIMEOUT_S,
                                       "socket_connect_timeout": CHECK_TIMEOUT_S}) as conn:
        conn.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_S)


def check_storage(state: ServiceState) -> None:
    # Not ready below MIN_FREE_BYTES: uploads would fail (507) and jobs could not write their results.
    state.store.check(state.settings.min_free_bytes)


def _run(check: Callable[[ServiceState], None], state: ServiceState) -> dict[str, Any]:
    started = time.monotonic()
    try:
        check(state)
        return {"ok": True, "ms": round(1000 * (time.monotonic() - started), 1)}
    except Exception as e:  # readiness reports any failure, it never raises
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}


@router.get("/readyz", summary="Readiness: database, broker and storage reachable (503 with details if not)")
async def readyz(state: ServiceState = Depends(get_state)) -> JSONResponse:
    checks = {name: await to_thread.run_sync(_run, fn, state)
              for name, fn in (("database", check_database), ("broker", check_broker), ("storage", check_storage))}
    ok = all(c["ok"] for c in checks.values())
    return JSONResponse({"status": "ready" if ok else "unavailable", "checks": checks},
                        status_code=200 if ok else 503)


bench_router = APIRouter(tags=["bench"], include_in_schema=False)


@bench_router.get("/v1/_bench/constant")
async def bench_constant() -> Response:
    """Ceiling 1 (NBA_BENCH_ENDPOINTS=1 only): constant JSON, no thread, no database."""
    return Response(content=_CONSTANT, media_type="application/json")


@bench_router.get("/v1/_bench/select/{job_id}")
def bench_select(job_id: str, state: ServiceState = Depends(get_state)) -> Response:
    """Ceiling 2: one thread hop, one pooled session (autocommit, as the poll's), one SELECT by primary key."""
    with state.read_sessions() as session:
        status = session.execute(select(Job.status).where(Job.id == job_id)).scalar()
    return Response(content=json.dumps({"id": job_id, "status": status}), media_type="application/json")


@bench_router.post("/v1/_bench/sink")
async def bench_sink(request: Request) -> Response:
    """Ceiling 3, for uploads: the same server stack reads the request body and throws it away (no parsing, no
    hashing, no disk). An upload cannot be faster than this on the same machine."""
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
    return Response(content=json.dumps({"received": received}), media_type="application/json")


_CONSTANT = b'{"status":"ok"}'


@router.get("/v1/_debug/process", include_in_schema=False)
async def debug_process(state: ServiceState = Depends(get_state)) -> dict[str, Any]:
    """Only with NBA_DEBUG=1: lets tests check that the API process never imported torch."""
    if not state.settings.debug:
        raise not_found("path", "/v1/_debug/process")
    cache = state.poll_cache
    return {"pid": os.getpid(), "torch_imported": "torch" in sys.modules,
            "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "matplotlib")),
            "poll_cache": None if cache is None else {"live": cache.live, "hits": cache.hits}}
