"""Reports a browser can open: a signed, short-lived link to a job's HTML report (no API key in the browser)."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel

from app.core.links import check_token, link_secret, make_token
from app.core.models import Artifact, Job, Owner
from nba_core.errors import NBAError
from nba_core.report_html import render_report_html

from .deps import ServiceState, current_owner, get_state
from .errors import not_found
from .schemas import ErrorResponse

router = APIRouter(prefix="/v1", tags=["reports"])
_ERRORS = {401: {"model": ErrorResponse}, 403: {"model": ErrorResponse}, 404: {"model": ErrorResponse},
           409: {"model": ErrorResponse}}


class ReportLink(BaseModel):
    url: str
    expires_at: datetime


@router.get("/jobs/{job_id}/report-link", response_model=ReportLink, responses=_ERRORS,
            summary="A signed link to the job's HTML report that a browser opens without the API key")
def report_link(job_id: str, request: Request, state: ServiceState = Depends(get_state),
                owner: Owner = Depends(current_owner),
                ttl: int = Query(900, ge=10, description="seconds the link stays valid (at most NBA_LINK_MAX_TTL)")
                ) -> ReportLink:
    if ttl > state.settings.link_max_ttl:
        raise NBAError("invalid_params", f"ttl must be at most {state.settings.link_max_ttl} s")
    with state.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or job.owner_id != owner.id:
            raise not_found("job", job_id)
        if job.status != "succeeded" or not job.report_id:
            raise NBAError("job_not_finished", f"job {job_id} is {job.status}; its report exists once it succeeded",
                           http_status=409)
    token, expires = make_token(link_secret(state.settings), job_id, ttl)
    return ReportLink(url=str(request.url_for("shared_report", token=token)),
                      expires_at=datetime.fromtimestamp(expires, tz=timezone.utc))


@router.get("/shared-reports/{token}", response_class=HTMLResponse, responses=_ERRORS,
            summary="The HTML report behind a signed link (no API key: the link is the permission)")
def shared_report(token: str, state: ServiceState = Depends(get_state)) -> Response:
    job_id = check_token(link_secret(state.settings), token)
    with state.sessions() as session:
        job = session.get(Job, job_id)
        if job is None or not job.report_id:
            raise not_found("report of job", job_id)
        report = session.get(Artifact, job.report_id)
        html_artifact = session.get(Artifact, job.report_html_id) if job.report_html_id else None
    headers = {"Cache-Control": "private, no-store", "X-Robots-Tag": "noindex",
               "Content-Security-Policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'"}
    if html_artifact is not None:
        return StreamingResponse(state.store.iter_range(html_artifact.storage_key), media_type="text/html",
                                 headers=headers)
    with state.store.open_read(report.storage_key) as f:
        data = json.loads(f.read())
    return HTMLResponse(render_report_html(data, job_id=job.id, plots=False), headers=headers)
