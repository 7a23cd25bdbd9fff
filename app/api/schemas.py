"""Request/response bodies (also what the OpenAPI document shows)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.core.models import Artifact, Job

Method = Literal["nba", "nad", "ft", "fp", "anp", "ibau", "sau", "ftsam", "scan"]
VerdictStatus = Literal["suspected", "not_suspected", "inconclusive"]
Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ArtifactOut(BaseModel):
    id: str
    kind: str
    sha256: str
    size_bytes: int
    format: str
    filename: str | None = None
    spec: dict[str, Any] | None = None
    created_at: datetime
    details: dict[str, Any] | None = Field(default=None, description="what the upload checks found (upload only)")

    @classmethod
    def of(cls, a: Artifact, details: dict[str, Any] | None = None) -> "ArtifactOut":
        return cls(id=a.id, kind=a.kind, sha256=a.sha256, size_bytes=a.size_bytes, format=a.format,
                   filename=a.filename, spec=a.spec, created_at=a.created_at, details=details)


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model_id: str = Field(max_length=36)
    dataset_id: str = Field(max_length=36)
    method: str = Field(max_length=32, description="nba | nad | ft | fp | anp | ibau | sau | ftsam to sanitize; scan to "
                                                   "detect only (the job gets a verdict and a report, no cleaned model)")
    params: dict[str, Any] = Field(default_factory=dict, description="method parameters (validated by the worker)")
    probe_id: str | None = Field(default=None, max_length=36, description="a triggered probe set (POST /v1/probes)")
    probe_target: int | None = Field(default=None, ge=0, description="the backdoor target class of the probe")
    class_names: list[Annotated[str, Field(min_length=1, max_length=200)]] | None = Field(
        default=None, max_length=1000, description="the model's classes in label order: maps class folders and "
        "string labels to labels (default: the spec's class_names, else integer or sorted folder names)")
    allow_low_accuracy: bool = Field(default=False, description="run even when the model is near chance on the "
                                     "clean data before cleaning (refused otherwise: accuracy_near_chance)")

    @field_validator("method")
    @classmethod
    def _method_case(cls, v: str) -> str:
        return v.strip().lower()  # "NBA" and "nba" name the same defense

    def options(self) -> dict[str, Any] | None:
        opts = {k: v for k, v in (("class_names", self.class_names),
                                  ("allow_low_accuracy", self.allow_low_accuracy or None)) if v is not None}
        return opts or None


class JobLinks(BaseModel):
    self: str
    cancel: str
    model: str | None = None
    report: str | None = None
    report_html: str | None = None
    report_link: str | None = Field(default=None, description="GET it (with your key) for a signed URL a browser "
                                    "opens without the key")


class ModelVerdict(BaseModel):
    status: VerdictStatus
    targets: list[int] = Field(description="suspected backdoor target classes")
    pairs: list[list[int]] = Field(description="label-shift backdoors: [source, target] class pairs")
    score: float = Field(description="largest per-class score in threshold units; >= 1 means suspected")
    reasons: list[str] = Field(default_factory=list)


class JobVerdict(BaseModel):
    """The trigger-free backdoor verdict (docs/verdict.md): `before` appears as soon as it is computed, `after`
    when a sanitization job succeeds (null for method scan)."""

    before: ModelVerdict | None = None
    after: ModelVerdict | None = None
    headline: list[str] = Field(default_factory=list, description="one plain line per verdict")
    change: str | None = Field(default=None, description="what changed between before and after")


class JobOut(BaseModel):
    id: str
    status: Status
    stage: str | None
    progress: float
    method: str
    params: dict[str, Any]
    model_id: str
    dataset_id: str
    probe_id: str | None
    probe_target: int | None
    class_names: list[str] | None = Field(default=None, description="label order given at creation (the report "
                                          "holds the order actually used)")
    allow_low_accuracy: bool = False
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: ErrorBody | None
    verdict: JobVerdict | None = Field(default=None, description="the backdoor verdict, first thing to read")
    warnings: list[str] = Field(default_factory=list, description="e.g. the cleaned model is still suspected")
    metrics: dict[str, Any] | None
    result: ArtifactOut | None = None
    created_at: datetime
    updated_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    links: JobLinks

    @classmethod
    def of(cls, job: Job, result: Artifact | None = None) -> "JobOut":
        base = f"/v1/jobs/{job.id}"
        done = job.status == "succeeded"
        error = ErrorBody(code=job.error_code, message=job.error_message or "") if job.error_code else None
        # The worker keeps the verdict and warnings next to the metrics in the job's JSON column.
        stored = dict(job.metrics or {})
        verdict, warnings = stored.pop("verdict", None), stored.pop("warnings", None) or []
        return cls(
            id=job.id, status=job.status, stage=job.stage, progress=job.progress, method=job.method,
            params=job.params or {}, model_id=job.model_id, dataset_id=job.dataset_id, probe_id=job.probe_id,
            probe_target=job.probe_target, class_names=(job.options or {}).get("class_names"),
            allow_low_accuracy=bool((job.options or {}).get("allow_low_accuracy")), attempts=job.attempts,
            max_attempts=job.max_attempts, cancel_requested=job.cancel_requested, error=error, verdict=verdict,
            warnings=warnings, metrics=stored or None,
            result=ArtifactOut.of(result) if result is not None else None,
            created_at=job.created_at, updated_at=job.updated_at, enqueued_at=job.enqueued_at,
            started_at=job.started_at, finished_at=job.finished_at, heartbeat_at=job.heartbeat_at,
            links=JobLinks(self=base, cancel=f"{base}/cancel",
                           model=f"{base}/model" if done and job.result_id else None,
                           report=f"{base}/report" if done and job.report_id else None,
                           report_html=f"{base}/report?format=html" if done and job.report_id else None,
                           report_link=f"{base}/report-link" if done and job.report_id else None),
        )


class JobList(BaseModel):
    items: list[JobOut]
    next_cursor: str | None = Field(description="pass as ?cursor= to get the next page; null on the last page")
