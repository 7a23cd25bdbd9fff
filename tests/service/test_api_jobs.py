"""Jobs over real HTTP: creation (enqueued after commit), validation, idempotency, pagination/filter, cancel, and
owner isolation."""

from __future__ import annotations


import httpx
import pytest
from sqlalchemy import update

from app.client import APIError, NBAClient
from app.core.models import Job

from .conftest import digits_npz_bytes


def _job_body(uploaded: dict, **extra) -> dict:
    return {"model_id": uploaded["model"]["id"], "dataset_id": uploaded["dataset"]["id"], "method": "ft",
            "params": {"epochs": 1}, **extra}


def _error(resp: httpx.Response) -> str:
    assert set(resp.json()) == {"error"}
    return resp.json()["error"]["code"]


def test_create_job_is_queued_and_enqueued(http, uploaded, db) -> None:
    resp = http.post("/v1/jobs", json=_job_body(uploaded))
    assert resp.status_code == 201, resp.text
    job = resp.json()
    assert job["status"] in ("queued", "running", "succeeded", "failed")  # a test worker may already run it
    assert job["method"] == "ft" and job["params"] == {"epochs": 1}
    assert job["attempts"] <= 1 and job["max_attempts"] == 3 and job["error"] is None
    assert job["links"]["self"] == f"/v1/jobs/{job['id']}"
    assert job["enqueued_at"] is not None  # the task message went to the broker after the commit
    got = http.get(f"/v1/jobs/{job['id']}").json()
    assert got["id"] == job["id"] and got["model_id"] == uploaded["model"]["id"]


@pytest.mark.parametrize("patch, status, code", [
    ({"method": "magic"}, 422, "unknown_method"),
    ({"params": {"bad name!": 1}}, 422, "invalid_params"),
    ({"params": [1, 2]}, 422, "validation_error"),
    ({"model_id": "00000000-0000-0000-0000-000000000000"}, 404, "not_found"),
    ({"probe_target": 10, "probe_id": "DATASET"}, 422, "invalid_params"),
    ({"probe_target": -1}, 422, "validation_error"),
    ({"surprise": True}, 422, "validation_error"),
])
def test_create_job_validation(http, uploaded, patch: dict, status: int, code: str) -> None:
    body = _job_body(uploaded, **patch)
    if body.get("probe_id") == "DATASET":
        body["probe_id"] = uploaded["dataset"]["id"]
    resp = http.post("/v1/jobs", json=body)
    assert resp.status_code == status and _error(resp) == code, resp.text


def test_create_job_artifact_kinds_are_checked(http, uploaded) -> None:
    swapped = _job_body(uploaded, model_id=uploaded["dataset"]["id"], dataset_id=uploaded["model"]["id"])
    resp = http.post("/v1/jobs", json=swapped)
    assert resp.status_code == 422 and _error(resp) == "invalid_artifact"


def test_malformed_json_is_validation_error(http) -> None:
    resp = http.post("/v1/jobs", content=b"{nope", headers={"Content-Type": "application/json"})
    assert resp.status_code == 422 and _error(resp) == "validation_error"


def test_idempotency_key(http, uploaded) -> None:
    body = _job_body(uploaded)
    first = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    again = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-1"})
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    conflict = http.post("/v1/jobs", json={**body, "params": {"epochs": 2}}, headers={"Idempotency-Key": "abc-1"})
    assert conflict.status_code == 409 and _error(conflict) == "idempotency_conflict"
    other = http.post("/v1/jobs", json=body, headers={"Idempotency-Key": "abc-2"})
    assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
    no_key = http.post("/v1/jobs", json=body)
    assert no_key.status_code == 201 and no_key.json()["id"] not in (first.json()["id"], other.json()["id"])


def test_idempotency_keys_are_per_owner(api_server, http, uploaded, second_owner_key) -> None:
    first = http.post("/v1/jobs", json=_job_body(uploaded), headers={"Idempotency-Key": "shared"})
    assert first.status_code == 201
    with NBAClient(api_server.url, second_owner_key) as other:
        data = digits_npz_bytes(seed=5)
        ds = other.upload_stream("/v1/datasets", [data], len(data), filename="d.npz")
        # Same key, but another owner: must not see (or conflict with) the first owner's job.
        with pytest.raises(APIError) as err:
            other.create_job(uploaded["model"]["id"], ds["id"], "ft", idempotency_key="shared")
        assert err.value.status == 404


def test_pagination_and_status_filter(http, uploaded, db) -> None:
    ids = [http.post("/v1/jobs", json=_job_body(uploaded, params={"epochs": i + 1})).json()["id"] for i in range(5)]
    # Freeze them in known states (no worker must touch them): two failed, three queued-with-no-message.
    db.execute(update(Job).where(Job.id.in_(ids[:2])).values(status="failed", error_code="x", error_message="y"))
    db.execute(update(Job).where(Job.id.in_(ids[2:])).values(status="queued"))
    db.commit()

    seen, cursor = [], None
    while True:
        page = http.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        assert len(page["items"]) <= 2
        seen += [j["id"] for j in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    failed = http.get("/v1/jobs", params={"status": "failed"}).json()
    assert {j["id"] for j in failed["items"]} == set(ids[:2]) and failed["next_cursor"] is None
    assert failed["items"][0]["error"] == {"code": "x", "message": "y"}
    assert _error(http.get("/v1/jobs", params={"status": "bogus"})) == "validation_error"
    assert _error(http.get("/v1/jobs", params={"cursor": "!!!"})) == "validation_error"
    assert _error(http.get("/v1/jobs", params={"limit": 0})) == "validation_error"


def test_cancel(http, uploaded, db) -> None:
    job_id = http.post("/v1/jobs", json=_job_body(uploaded)).json()["id"]
    db.execute(update(Job).where(Job.id == job_id).values(status="queued"))  # make sure no worker has it
    db.commit()
    resp = http.post(f"/v1/jobs/{job_id}/cancel")
    assert resp.status_code == 200 and resp.json()["status"] == "cancelled"
    assert resp.json()["finished_at"] is not None
    again = http.post(f"/v1/jobs/{job_id}/cancel")
    assert again.status_code == 409 and _error(again) == "job_finished"

    running = http.post("/v1/jobs", json=_job_body(uploaded, params={"epochs": 3})).json()["id"]
    db.execute(update(Job).where(Job.id == running).values(status="running", attempts=1))
    db.commit()
    resp = http.post(f"/v1/jobs/{running}/cancel")
    assert resp.status_code == 200
    assert resp.json()["status"] == "running" and resp.json()["cancel_requested"] is True
    assert _error(http.get(f"/v1/jobs/{running}/model")) == "job_not_finished"


def test_owner_isolation(api_server, http, uploaded, second_owner_key) -> None:
    job_id = http.post("/v1/jobs", json=_job_body(uploaded)).json()["id"]
    with httpx.Client(base_url=api_server.url, headers={"Authorization": f"Bearer {second_owner_key}"}) as other:
        for path in (f"/v1/models/{uploaded['model']['id']}", f"/v1/datasets/{uploaded['dataset']['id']}",
                     f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/model", f"/v1/jobs/{job_id}/report"):
            resp = other.get(path)
            assert resp.status_code == 404 and _error(resp) == "not_found", path
        assert other.post(f"/v1/jobs/{job_id}/cancel").status_code == 404
        assert other.get("/v1/jobs").json()["items"] == []
        # Using someone else's model in a job is not possible either.
        resp = other.post("/v1/jobs", json=_job_body(uploaded))
        assert resp.status_code == 404 and _error(resp) == "not_found"
    assert http.get(f"/v1/jobs/{job_id}").status_code == 200


def test_auth_missing_invalid_revoked(api_server, http, api_key, sessions, make_key) -> None:
    from app.core import keys

    url = api_server.url
    for headers in ({}, {"Authorization": "Bearer nba_notavalidkeyatall_000000000000000000000"},
                    {"Authorization": f"Basic {api_key}"}, {"Authorization": "Bearer"}):
        resp = httpx.get(f"{url}/v1/jobs", headers=headers)
        assert resp.status_code == 401 and _error(resp) == "unauthorized"
        assert resp.headers["www-authenticate"] == "Bearer"
    # Uploads are refused before the body is stored.
    resp = httpx.post(f"{url}/v1/datasets", files={"file": ("d.npz", digits_npz_bytes())})
    assert resp.status_code == 401 and _error(resp) == "unauthorized"

    key = make_key()
    assert httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    with sessions() as s:
        keys.revoke_key(s, key[:12])
        s.commit()
    resp = httpx.get(f"{url}/v1/jobs", headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 401 and _error(resp) == "unauthorized"


def test_unknown_route_and_method_use_error_shape(http) -> None:
    assert _error(http.get("/v1/nothing-here")) == "not_found"
    assert _error(http.delete("/v1/jobs")) == "method_not_allowed"
