"""Run one job: claim it, fetch its inputs, call nba_core.pipeline.sanitize (or .scan for method "scan"), store the
outputs, finish once. metrics.before and the before-verdict are stored as soon as they exist.

Free of Celery so it can be tested and reused directly; worker/tasks.py wraps it in the Celery task.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path

from app.core.settings import Settings
from app.core.storage import INSUFFICIENT_STORAGE, ArtifactStore
from nba_core.errors import (CHECKPOINT_UNREADABLE, DATA_UNREADABLE, INTERNAL_ERROR, SPEC_INVALID,
                             TIME_LIMIT_EXCEEDED, Cancelled, NBAError)

from . import jobstate
from .jobstate import Claim, NewArtifact, SessionFactory
from .monitor import REASON_CANCEL, REASON_DEADLINE, REASON_LOST, JobMonitor

log = logging.getLogger(__name__)

SUFFIX = {"safetensors": ".safetensors", "pt": ".pt", "npz": ".npz", "zip": ".zip", "tar": ".tar", "hf": ".zip"}

# Run outcomes (returned by run_job, logged by the task).
SUCCEEDED, FAILED, CANCELLED, LOST = "succeeded", "failed", "cancelled", "lost"


def json_safe(value):
    """NaN/inf become null: strict JSON for the report file, and Postgres JSONB rejects NaN outright (a metric
    such as ASR is NaN when a probe set holds only target-class images)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def fetch_inputs(session_factory: SessionFactory, store: ArtifactStore, claim: Claim, folder: Path) -> dict:
    """Copy the job's model/dataset/probe from the store into `folder`; returns paths and the model's spec."""
    out: dict = {}
    for role, artifact_id in (("model", claim.model_id), ("data", claim.dataset_id), ("probe", claim.probe_id)):
        if artifact_id is None:
            out[role] = None
            continue
        art = jobstate.load_artifact(session_factory, artifact_id)
        if art is None:
            raise NBAError(CHECKPOINT_UNREADABLE if role == "model" else DATA_UNREADABLE,
                           f"the job's {role} artifact no longer exists")
        path = folder / f"{role}{SUFFIX.get(art.format, '')}"
        store.fetch_to_path(art.storage_key, path)
        out[role] = str(path)
        if role == "model":
            out["spec"] = art.spec
            out["model_format"] = art.format
    if not out.get("spec"):
        raise NBAError(SPEC_INVALID, "the model artifact has no spec")
    return out


VERDICT_KEYS = ("status", "targets", "pairs", "score", "reasons")


def job_verdict(verdict: dict | None) -> dict | None:
    """The verdict as the job JSON shows it (the report keeps the per-class scores and scans)."""
    if not verdict:
        return None
    out = {w: ({k: verdict[w][k] for k in VERDICT_KEYS if k in verdict[w]} if verdict.get(w) else None)
           for w in ("before", "after")}
    out["headline"] = verdict.get("headline") or []
    out["change"] = (verdict.get("change") or {}).get("summary")
    return out


def job_metrics(report: dict) -> dict:
    """What the job row stores: the metrics, plus the verdict and warnings (lifted out by the API)."""
    return {**(report.get("metrics") or {}), "verdict": job_verdict(report.get("verdict")),
            "warnings": list(report.get("warnings") or [])}


def store_outputs(store: ArtifactStore, report: dict, *, out_path: Path | None, job_id: str, hf_zip: bool = False
                  ) -> tuple[NewArtifact | None, NewArtifact, NewArtifact | None]:
    from nba_core.report_html import render_report_html

    model_obj = None
    if out_path is not None:
        model_obj = store.put_file(out_path)
        expected = (report.get("output") or {}).get("sha256")
        if expected and expected != model_obj.sha256:
            raise RuntimeError(f"cleaned model hash changed between save and store ({expected} != {model_obj.sha256})")
        # The worker's temp path means nothing to the client; the job id and the artifact hash do.
        report = {**report, "output": {**(report.get("output") or {}), "path": None,
                                       "sha256": model_obj.sha256, "size_bytes": model_obj.size}}
    report = {**report, "job_id": job_id}
    report_obj = store.put_bytes(json.dumps(report, indent=2, allow_nan=False).encode())
    html_art = None
    try:
        html_obj = store.put_bytes(render_report_html(report, job_id=job_id).encode())
        html_art = NewArtifact("report", "html", "report.html", html_obj.key, html_obj.sha256, html_obj.size)
    except Exception:  # the HTML is a convenience; a plotting failure must not fail a finished job
        log.exception("rendering the HTML report of job %s failed", job_id)
    fmt, name = ("hf-zip", "cleaned.zip") if hf_zip else ("safetensors", "cleaned.safetensors")
    result = None if model_obj is None else NewArtifact(
        "result", fmt, name, model_obj.key, model_obj.sha256, model_obj.size, spec=report.get("spec"))
    return (result,
            NewArtifact("report", "json", "report.json", report_obj.key, report_obj.sha256, report_obj.size),
            html_art)


# How writers report a full disk when they do not raise OSError: safetensors' Rust writer and torch's zip writer
# carry the OS message in their own exception types.
_NO_SPACE_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "os error 28", "os error 122")


def disk_failure(e: BaseException) -> tuple[str, str] | None:
    """A full disk or quota on the worker (its scratch folder or the artifact store) is the operator's condition,
    not a bug: the job fails with `insufficient_storage` and says so, instead of `internal_error`."""
    full = (isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)) or any(
        text in str(e) for text in _NO_SPACE_TEXT)
    if full:
        return (INSUFFICIENT_STORAGE, "the worker ran out of disk space while running or storing the job; "
                                      "retry later (the operator has to free space)")
    return None


def run_job(job_id: str, *, settings: Settings, session_factory: SessionFactory, store: ArtifactStore,
            worker: str | None = None, timeout_exceptions: tuple[type[BaseException], ...] = ()) -> str:
    """Run `job_id` if it can be claimed. Returns the outcome: succeeded/failed/cancelled/lost, or a claim outcome
    (finished/busy/missing/exhausted/cancelled) when there was nothing to run."""
    worker = worker or f"{socket.gethostname()}:{os.getpid()}"
    outcome, claim = jobstate.claim_job(session_factory, job_id, worker=worker,
                                        stale_after=settings.sweep_stale_after)
    if claim is None:
        log.info("job %s not run: %s", job_id, outcome)
        return outcome
    log.info("job %s claimed by %s (attempt %d)", job_id, worker, claim.attempt)
    monitor = JobMonitor(session_factory, claim, interval=settings.heartbeat_interval,
                         soft_deadline=time.monotonic() + settings.job_soft_time_limit).start()
    try:
        return _run_claimed(claim, settings=settings, session_factory=session_factory, store=store,
                            monitor=monitor, timeout_exceptions=timeout_exceptions)
    finally:
        monitor.stop()


def _run_claimed(claim: Claim, *, settings: Settings, session_factory: SessionFactory, store: ArtifactStore,
                 monitor: JobMonitor, timeout_exceptions: tuple[type[BaseException], ...]) -> str:
    def fail(code: str, message: str) -> str:
        monitor.stop()
        if monitor.stop_reason == REASON_LOST or not jobstate.finish_failed(session_factory, claim, code, message):
            return LOST
        return FAILED

    try:
        from nba_core.pipeline import sanitize, scan  # torch (and CUDA, via pick_device) only inside the worker child

        def on_before(partial: dict) -> None:
            jobstate.record_metrics(session_factory, claim, json_safe(job_metrics(partial)))

        with tempfile.TemporaryDirectory(prefix=f"nba-job-{claim.job_id[:8]}-") as tmp:
            folder = Path(tmp)
            inputs = fetch_inputs(session_factory, store, claim, folder)
            out_path: Path | None = folder / "cleaned.safetensors"
            hf_zip = inputs.get("model_format") == "hf"
            run = dict(data_path=inputs["data"], method=claim.method, params=claim.params,
                       probe_path=inputs["probe"], probe_target=claim.probe_target, device=settings.device,
                       progress=monitor.progress, should_cancel=monitor.should_cancel, on_before=on_before,
                       allow_low_accuracy=bool(claim.options.get("allow_low_accuracy")))
            if claim.method == "scan":
                scan_args = dict(model_path=inputs["model"], data_path=inputs["data"], device=settings.device,
                                 seed=int((claim.params or {}).get("seed", 0)), progress=monitor.progress,
                                 should_cancel=monitor.should_cancel)
                if hf_zip:
                    from nba_core.hf_pipeline import scan_hf

                    report = scan_hf(**scan_args)
                else:
                    report = scan(spec=inputs["spec"], **scan_args)
                out_path, hf_zip = None, False
            elif hf_zip:  # a Hugging Face folder zip in, the same layout zipped out
                from nba_core.checkpoint import sha256_file
                from nba_core.hf_pipeline import sanitize_hf

                out_path = folder / "cleaned.zip"
                report = sanitize_hf(model_path=inputs["model"], out_path=str(folder / "cleaned"),
                                     out_zip=str(out_path), **run)
                report["output"] = {**report["output"], "weights_sha256": report["output"]["sha256"],
                                    "sha256": sha256_file(out_path), "zip": None}
            else:
                report = sanitize(model_path=inputs["model"], spec=inputs["spec"], out_path=str(out_path),
                                  class_names=claim.options.get("class_names"), **run)
            report = json_safe(report)
            monitor.progress("store", 1.0)
            monitor.stop()
            monitor.flush()  # final heartbeat: are we still the owner, was cancel asked at the last moment?
            if monitor.stop_reason == REASON_LOST:
                return LOST
            result, report_art, html_art = store_outputs(store, report, out_path=out_path, job_id=claim.job_id,
                                                         hf_zip=hf_zip)
        # A cleaned model that is still suspected is a success with a warning (report["warnings"]), not a failure:
        # the user gets the model, the verdict and the reason to distrust it.
        done = jobstate.finish_succeeded(session_factory, claim, metrics=job_metrics(report),
                                         result=result, report=report_art, report_html=html_art)
        return SUCCEEDED if done else LOST
    except Cancelled:
        monitor.stop()
        if monitor.stop_reason == REASON_LOST:
            return LOST
        if monitor.stop_reason == REASON_DEADLINE:
            return fail(TIME_LIMIT_EXCEEDED, f"the job ran longer than {settings.job_soft_time_limit} s")
        if monitor.stop_reason == REASON_CANCEL or monitor.stop_reason is None:
            return CANCELLED if jobstate.finish_cancelled(session_factory, claim) else LOST
        return LOST
    except NBAError as e:
        return fail(e.code, e.message)
    except timeout_exceptions:
        return fail(TIME_LIMIT_EXCEEDED, f"the job ran longer than {settings.job_soft_time_limit} s")
    except Exception as e:
        known = disk_failure(e)
        if known is not None:
            log.error("job %s: %s (%s)", claim.job_id, known[1], e)
            return fail(*known)
        log.exception("job %s failed with an unexpected error", claim.job_id)
        return fail(INTERNAL_ERROR, "an internal error stopped the job; the operator can find details in the "
                                    "worker log")
