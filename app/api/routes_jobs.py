"""Jobs: create (idempotent), list, get, cancel, download the cleaned model (Range), report (JSON/HTML)."""

from __future__ import annotations

import base64
import json
import logging
import re
from datetime import datetime
from typing import Any

from anyio import to_thread
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel
from sqlalchemy import and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core import jobs as jobstate
from app.core.models import JOB_STATUSES, METHODS, Artifact, Job, Owner, utcnow
from app.core.storage import LocalStore
from nba_core.errors import INVALID_PARAMS, UNKNOWN_METHOD, NBAError
from nba_core.method_params import check_method_params
from nba_core.spec import all_finite

from . import compat
from .deps import ServiceState, bearer_token, current_owner, get_state, owner_session
from .downloads import LocalFileResponse
from .errors import VALIDATION_ERROR, not_found
from .poll import poll_row, token_digest
from .ranges import parse_range
from .schemas import ErrorResponse, JobCreate, JobList, JobOut

log = logging.getLogger("nba.api")
router = APIRouter(prefix="/v1", tags=["jobs"])

IDEMPOTENCY_CONFLICT = "idempotency_conflict"
JOB_NOT_FINISHED = "job_not_finished"
INVALID_ARTIFACT = "invalid_artifact"
MAX_PARAMS_BYTES = 16 * 1024
_PARAM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

_ERRORS: dict[int | str, dict[str, Any]] = {s: {"model": ErrorResponse} for s in (401, 404, 409, 422)}


def _json(model: BaseModel, status: int = 200) -> Response:
    """Serialise once with pydantic's Rust encoder (FastAPI would validate the returned model again)."""
    return Response(content=model.model_dump_json(), media_type="application/json", status_code=status)


def _check_params(method: str, params: dict[str, Any], num_classes: int | None = None) -> dict[str, Any]:
    """Torch-free: names, types, finite values and ranges against the defense's table (nba_core.method_params,
    the same one Defense.make_config applies), so a bad job is refused here instead of queued to fail."""
    if not all_finite(params):
        raise NBAError(INVALID_PARAMS, "params must not hold NaN or infinite numbers")
    if len(json.dumps(params)) > MAX_PARAMS_BYTES:
        raise NBAError(INVALID_PARAMS, f"params are larger than {MAX_PARAMS_BYTES} bytes")
    for name in params:
        if not _PARAM_NAME.match(name):
            raise NBAError(INVALID_PARAMS, f"invalid parameter name {name[:80]!r}")
    return check_method_params(method, params, num_classes=num_classes)


def _owned(session: Session, owner: Owner, model: type, ident: str | None, what: str):
    row = session.get(model, ident) if ident and len(ident) <= 36 else None
    if row is None or row.owner_id != owner.id:
        raise not_found(what, str(ident))
    return row


def _artifact_of_kind(session: Session, owner: Owner, ident: str, kinds: tuple[str, ...], field: str) -> Artifact:
    artifact = _owned(session, owner, Artifact, ident, field.replace("_id", ""))
    if artifact.kind not in kinds:
        raise NBAError(INVALID_ARTIFACT, f"{field} {ident} is a {artifact.kind}, expected {' or '.join(kinds)}")
    return artifact


def _job_out(session: Session, job: Job) -> JobOut:
    result = session.get(Artifact, job.result_id) if job.result_id else None
    return JobOut.of(job, result)


def _replay(existing: Job, rhash: str, response: Response, session: Session) -> JobOut:
    if existing.request_hash != rhash:
        raise NBAError(IDEMPOTENCY_CONFLICT, "this Idempotency-Key was already used with a different request body",
                       http_status=409)
    response.status_code = 200
    return _job_out(session, existing)


@router.post("/jobs", status_code=201, response_model=JobOut, responses={**_ERRORS, 200: {"model": JobOut}},
             summary="Create a sanitization job, or a detect-only job with method \"scan\" (201; 200 when replayed "
                     "with the same Idempotency-Key)")
def create_job(body: JobCreate, response: Response, request: Request, state: ServiceState = Depends(get_state),
               idempotency_key: str | None = Header(default=None, alias="Idempotency-Key", min_length=1,
                                                    max_length=200, pattern=r"^[\x21-\x7e]+$",
                                                    description="1-200 visible ASCII characters")
               ) -> JobOut:
    if body.method not in METHODS:
        raise NBAError(UNKNOWN_METHOD, f"unknown method {body.method!r}; known: {', '.join(METHODS)}")
    if not all_finite(body.params):
        raise NBAError(INVALID_PARAMS, "params must not hold NaN or infinite numbers")
    rhash = jobstate.request_hash(body.model_dump(mode="json"))

    with owner_session(state, request) as (session, owner):
        by_key = and_(Job.owner_id == owner.id, Job.idempotency_key == idempotency_key)
        if idempotency_key:
            existing = session.execute(select(Job).where(by_key)).scalar_one_or_none()
            if existing is not None:
                return _replay(existing, rhash, response, session)
        model = _artifact_of_kind(session, owner, body.model_id, ("model",), "model_id")
        if model.format == "hf":
            from nba_core.hf_config import check_method_applies

            check_method_applies(body.method, model.spec or {})
        dataset = _artifact_of_kind(session, owner, body.dataset_id, ("dataset",), "dataset_id")
        probe = None
        if body.probe_id is not None:
            probe = _artifact_of_kind(session, owner, body.probe_id, ("probe", "dataset"), "probe_id")
        num_classes = (model.spec or {}).get("num_classes")
        num_classes = num_classes if isinstance(num_classes, int) else None
        if body.probe_target is not None and num_classes is not None and body.probe_target >= num_classes:
            raise NBAError(INVALID_PARAMS, f"probe_target {body.probe_target} is not a class of this model "
                           f"({num_classes} classes)")
        # Everything a worker would refuse, refused before queueing: params, then model/data compatibility.
        _check_params(body.method, body.params, num_classes)
        compat.check_job_inputs(model, dataset, probe)
        # Quotas last (a refused request should not use them up); the owner lock makes count+insert atomic.
        if state.quotas is not None:
            state.quotas.lock_owner(session, owner.id)
            state.quotas.check_active_jobs(session, owner.id)
            state.quotas.hit_submission(owner.id)
        now = utcnow()
        job = Job(owner_id=owner.id, model_id=body.model_id, dataset_id=body.dataset_id, probe_id=body.probe_id,
                  probe_target=body.probe_target, method=body.method, params=body.params, options=body.options(),
                  status="queued",
                  progress=0.0, attempts=0, max_attempts=state.settings.max_attempts,
                  idempotency_key=idempotency_key, request_hash=rhash, cancel_requested=False,
                  created_at=now, updated_at=now)
        session.add(job)
        try:
            session.commit()
        except IntegrityError:
            # A concurrent request with the same Idempotency-Key won the insert.
            session.rollback()
            existing = session.execute(select(Job).where(by_key)).scalar_one_or_none() if idempotency_key else None
            if existing is None:
                raise
            return _replay(existing, rhash, response, session)

        # Enqueue only after the commit: the worker must find the row. If the broker is down the job stays
        # queued (enqueued_at NULL) and the sweeper sends it later.
        try:
            state.enqueue(job.id)
        except Exception:
            log.warning("enqueue of job %s failed; the sweeper will retry", job.id, exc_info=True)
        else:
            jobstate.mark_enqueued(session, job.id)
            session.commit()
            session.refresh(job)
        return _job_out(session, job)


def _encode_cursor(job: Job) -> str:
    raw = f"{job.created_at.isoformat()}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        at, _, ident = raw.partition("|")
        parsed = datetime.fromisoformat(at)
        if parsed.tzinfo is None or not ident:
            raise ValueError
        return parsed, ident
    except ValueError as e:  # also binascii.Error / UnicodeDecodeError (both ValueError subclasses)
        raise NBAError(VALIDATION_ERROR, "invalid cursor") from e


@router.get("/jobs", response_model=JobList, responses=_ERRORS,
            summary="Your jobs, newest first (keyset pagination with ?cursor=, optional ?status= filter)")
def list_jobs(state: ServiceState = Depends(get_state), owner: Owner = Depends(current_owner),
              limit: int = Query(20, ge=1, le=100), cursor: str | None = Query(None, max_length=200),
              status: str | None = Query(None, description="queued|running|succeeded|failed|cancelled")
              ) -> JobList:
    stmt = select(Job).where(Job.owner_id == owner.id)
    if status is not None:
        if status not in JOB_STATUSES:
            raise NBAError(VALIDATION_ERROR, f"status must be one of {', '.join(JOB_STATUSES)}")
        stmt = stmt.where(Job.status == status)
    if cursor:
        at, ident = _decode_cursor(cursor)
        stmt = stmt.where(or_(Job.created_at < at, and_(Job.created_at == at, Job.id < ident)))
    stmt = stmt.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with state.sessions() as session:
        rows = list(session.execute(stmt).scalars())
        page = rows[:limit]
        results = {a.id: a for a in session.execute(
            select(Artifact).where(Artifact.id.in_([j.result_id for j in page if j.result_id]))).scalars()}
        items = [JobOut.of(j, results.get(j.result_id or "")) for j in page]
    return JobList(items=items, next_cursor=_encode_cursor(page[-1]) if len(rows) > limit else None)


@router.get("/jobs/{job_id}", response_model=JobOut, responses=_ERRORS, summary="Status, progress, metrics")
async def get_job(job_id: str, request: Request, state: ServiceState = Depends(get_state)) -> Response:
    # The hot path. A hit in this process's poll cache needs no thread hop and no SQL; a miss is one thread hop,
    # one autocommit session and one statement (app/api/poll.py), and fills the cache unless the job changed
    # meanwhile.
    token = bearer_token(request)
    cache = state.poll_cache
    digest = token_digest(token) if cache is not None else None
    if digest is not None:
        body = cache.lookup(digest, job_id)
        if body is not None:
            return Response(content=body, media_type="application/json")
    ticket = cache.ticket() if digest is not None else -1
    out, key_id, owner_id = await to_thread.run_sync(_poll_db, state, token, job_id)
    body = out.model_dump_json().encode()
    if digest is not None:
        cache.store(ticket, digest, key_id, owner_id, job_id, body)
    return Response(content=body, media_type="application/json")


def _poll_db(state: ServiceState, token: str | None, job_id: str):
    with state.read_sessions() as session:
        return poll_row(session, token, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses=_ERRORS,
             summary="Cancel: queued → cancelled now; running → stops between steps; finished → 409")
def cancel_job(job_id: str, state: ServiceState = Depends(get_state),
               owner: Owner = Depends(current_owner)) -> JobOut:
    with state.sessions() as session:
        job = _owned(session, owner, Job, job_id, "job")
        jobstate.request_cancel(session, job)
        session.commit()
        if state.poll_cache is not None:  # read-your-writes in this process, before the notification arrives
            state.poll_cache.changed(f"jobs:{job_id}")
        return _job_out(session, job)


def _finished_artifact(session: Session, owner: Owner, job_id: str, which: str) -> tuple[Job, Artifact | None]:
    job = _owned(session, owner, Job, job_id, "job")
    if job.status != "succeeded":
        raise NBAError(JOB_NOT_FINISHED, f"job {job_id} is {job.status}; its outputs exist once it succeeded",
                       http_status=409)
    ident = getattr(job, which)
    return job, (session.get(Artifact, ident) if ident else None)


@router.get("/jobs/{job_id}/model", responses={**_ERRORS, 206: {"description": "partial content"},
                                               416: {"model": ErrorResponse}},
            response_class=StreamingResponse,
            summary="Download the cleaned model (safetensors); supports Range, ETag, X-Content-SHA256")
def download_model(job_id: str, request: Request, state: ServiceState = Depends(get_state),
                   owner: Owner = Depends(current_owner)) -> Response:
    with state.sessions() as session:
        job, artifact = _finished_artifact(session, owner, job_id, "result_id")
    if artifact is None:
        raise not_found("result of job", job_id)
    etag = f'"{artifact.sha256}"'
    suffix = "zip" if artifact.format == "hf-zip" else "safetensors"  # an HF model comes back as its folder zip
    headers = {"ETag": etag, "X-Content-SHA256": artifact.sha256, "Accept-Ranges": "bytes",
               "Content-Disposition": f'attachment; filename="{job.id}.{suffix}"',
               "Cache-Control": "private, max-age=0"}
    if etag in [t.strip() for t in request.headers.get("if-none-match", "").split(",")]:
        return Response(status_code=304, headers=headers)
    size = artifact.size_bytes
    prefix = state.settings.accel_redirect_prefix
    if prefix and isinstance(state.store, LocalStore) and size:
        # nginx serves the stored file (sendfile, and Range/If-Range itself); the API has checked the owner and
        # the job. deploy/nginx.conf adds ETag and X-Content-SHA256 back from these headers.
        return Response(status_code=200, media_type="application/octet-stream",
                        headers=headers | {"X-Accel-Redirect": prefix + artifact.storage_key})
    if_range = request.headers.get("if-range")
    rng = parse_range(request.headers.get("range"), size) if (not if_range or if_range.strip() == etag) else None
    start, end = rng if rng is not None else (0, size - 1)
    headers["Content-Length"] = str(max(0, end - start + 1))
    if rng is not None:
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    if isinstance(state.store, LocalStore) and size:
        # Local files: read in 4 MiB pread()s (one thread hop each), or handed to the server whole when it
        # supports the ASGI pathsend extension (zero-copy sendfile).
        return LocalFileResponse(state.store.local_path(artifact.storage_key), start, end,
                                 status_code=206 if rng is not None else 200, headers=headers,
                                 media_type="application/octet-stream")
    body = state.store.iter_range(artifact.storage_key, start, end) if size else iter([b""])
    return StreamingResponse(body, status_code=206 if rng is not None else 200, headers=headers,
                             media_type="application/octet-stream")


def _wants_html(request: Request, fmt: str | None) -> bool:
    if fmt is not None:
        return fmt == "html"
    accept = request.headers.get("accept", "").lower()
    return "text/html" in accept and "application/json" not in accept.split("text/html")[0]


@router.get("/jobs/{job_id}/report", responses={**_ERRORS, 200: {"content": {"application/json": {},
                                                                               "text/html": {}}}},
            response_class=Response,
            summary="The job report: JSON by default, HTML with plots for Accept: text/html or ?format=html")
def get_report(job_id: str, request: Request, state: ServiceState = Depends(get_state),
               owner: Owner = Depends(current_owner),
               format: str | None = Query(None, pattern="^(json|html)$")) -> Response:
    with state.sessions() as session:
        job, report = _finished_artifact(session, owner, job_id, "report_id")
        html_artifact = session.get(Artifact, job.report_html_id) if job.report_html_id else None
    if report is None:
        raise not_found("report of job", job_id)
    if _wants_html(request, format):
        if html_artifact is not None:
            return StreamingResponse(state.store.iter_range(html_artifact.storage_key), media_type="text/html")
        with state.store.open_read(report.storage_key) as f:
            data = json.loads(f.read())
        from nba_core.report_html import render_report_html

        return HTMLResponse(render_report_html(data, job_id=job.id, plots=False))  # no matplotlib on the API path
    return StreamingResponse(state.store.iter_range(report.storage_key), media_type="application/json",
                             headers={"Content-Length": str(report.size_bytes), "ETag": f'"{report.sha256}"'})
