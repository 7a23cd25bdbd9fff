"""Job outcomes with a real worker: cancellation of a running job, and pipeline errors that fail a job with the
library's error code and no retry. Real Postgres, Redis, Celery worker subprocess and the HTTP API."""

from __future__ import annotations

import time

import pytest

from app.client import APIError
from nba_core.errors import DATA_LABEL_OUT_OF_RANGE, INVALID_PARAMS
from tests.service.conftest_worker import (SLOW_FT, result_count, running_with_progress, submit_digits_job,
                                           wait_for)

pytestmark = pytest.mark.service


def test_cancel_running_job(client, celery_worker, sessions, digits_files):
    job = submit_digits_job(client, digits_files, params=SLOW_FT, probe=False)
    wait_for(lambda: running_with_progress(client, job["id"]), 60, what="job running with progress")
    assert client.cancel_job(job["id"])["cancel_requested"] is True
    done = client.wait(job["id"], poll=0.3, timeout=60)
    assert done["status"] == "cancelled", done
    assert done["result"] is None and done["links"]["model"] is None
    assert result_count(sessions, job["id"]) == 0
    assert done["finished_at"] is not None


def test_bad_labels_are_refused_before_queueing(client, digits_files):
    with pytest.raises(APIError) as e:
        submit_digits_job(client, digits_files, data_key="bad_labels", probe=False)
    assert (e.value.status, e.value.code) == (422, DATA_LABEL_OUT_OF_RANGE)


def test_pipeline_error_fails_job_with_its_code_without_retry(client, celery_worker, sessions, digits_files):
    # The API refuses these labels up front now (test above); a dataset uploaded before the upload checks were
    # recorded (info NULL) still reaches the worker, whose error must fail the job once, without retry.
    from sqlalchemy import update

    from app.core.models import Artifact

    model = client.upload_model(digits_files["model"], spec=digits_files["spec"])
    data = client.upload_dataset(digits_files["bad_labels"])
    with sessions() as s:
        s.execute(update(Artifact).where(Artifact.id == data["id"]).values(info=None))
        s.commit()
    job = client.create_job(model["id"], data["id"], "ft", {})
    done = client.wait(job["id"], poll=0.3, timeout=60)
    assert done["status"] == "failed"
    assert done["error"]["code"] == DATA_LABEL_OUT_OF_RANGE
    assert "label" in done["error"]["message"]
    assert done["attempts"] == 1
    time.sleep(1.5)  # no retry: nothing changes afterwards
    again = client.get_job(job["id"])
    assert (again["status"], again["attempts"]) == ("failed", 1)
    assert result_count(sessions, job["id"]) == 0


def test_invalid_params_fail_fast(client, celery_worker, digits_files):
    # Refused at submission since issue 10 (the defense's params table), so nothing is queued to fail later.
    with pytest.raises(APIError) as e:
        submit_digits_job(client, digits_files, params={"epochs": "many"}, probe=False)
    assert (e.value.status, e.value.code) == (422, INVALID_PARAMS)
    assert client.list_jobs()["items"] == []
