"""Liveness/readiness (incl. a broker that is down), OpenAPI, and that the API process never imports torch."""

from __future__ import annotations

import socket

import httpx

from .conftest import free_port


def test_healthz_readyz_openapi(api_server) -> None:
    assert httpx.get(f"{api_server.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{api_server.url}/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"
    assert {k for k, v in ready.json()["checks"].items() if v["ok"]} == {"database", "broker", "storage"}
    spec = httpx.get(f"{api_server.url}/v1/openapi.json").json()
    for path in ("/v1/models", "/v1/datasets", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/cancel",
                 "/v1/jobs/{job_id}/model", "/v1/jobs/{job_id}/report"):
        assert path in spec["paths"], path
    assert "multipart/form-data" in spec["paths"]["/v1/models"]["post"]["requestBody"]["content"]
    # The verdict contract and the detect-only method are documented.
    schemas = spec["components"]["schemas"]
    assert {"verdict", "warnings"} <= set(schemas["JobOut"]["properties"])
    assert set(schemas["ModelVerdict"]["properties"]["status"]["enum"]) == {"suspected", "not_suspected",
                                                                          "inconclusive"}
    assert "scan" in schemas["JobCreate"]["properties"]["method"]["description"]


def test_readyz_reports_a_down_broker_and_jobs_stay_queued(server_factory, make_key, uploaded_factory) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    server = server_factory(broker_url=f"redis://127.0.0.1:{closed}/0")
    ready = httpx.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 503
    body = ready.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["broker"]["ok"] is False and body["checks"]["broker"]["error"]
    assert body["checks"]["database"]["ok"] is True and body["checks"]["storage"]["ok"] is True

    # Creating a job still works: the row is committed, the enqueue fails, the sweeper will send it later.
    key = make_key()
    ids = uploaded_factory(server.url, key)
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as h:
        resp = h.post("/v1/jobs", json={**ids, "method": "ft"})
        assert resp.status_code == 201, resp.text
        assert resp.json()["status"] == "queued" and resp.json()["enqueued_at"] is None


def test_readyz_reports_a_down_database_and_hides_debug(server_factory) -> None:
    server = server_factory(database_url=f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nope", debug="0")
    ready = httpx.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 503 and ready.json()["checks"]["database"]["ok"] is False
    assert ready.json()["checks"]["broker"]["ok"] is True
    # Requests that need the database fail cleanly in the error shape.
    resp = httpx.get(f"{server.url}/v1/jobs", headers={"Authorization": "Bearer nba_" + "x" * 40}, timeout=30)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "service_unavailable"
    # The debug endpoint exists only with NBA_DEBUG=1.
    assert httpx.get(f"{server.url}/v1/_debug/process").status_code == 404


def test_api_process_never_imports_torch(api_server, http, uploaded) -> None:
    # After uploads (model and dataset checks ran) and a job creation the server process has no torch loaded.
    assert http.post("/v1/jobs", json={"model_id": uploaded["model"]["id"],
                                       "dataset_id": uploaded["dataset"]["id"], "method": "nba"}).status_code == 201
    info = http.get("/v1/_debug/process").json()
    assert info["pid"] == api_server.pid
    assert info["torch_imported"] is False
    assert not [m for m in info["modules"] if m.split(".")[0] in ("torch", "matplotlib")]


def test_upload_ceiling_endpoint_exists_only_for_the_benchmark(server_factory, api_server) -> None:
    """bench.service_speed's upload ceiling reads a body bigger than the JSON cap and discards it; without
    NBA_BENCH_ENDPOINTS the path is capped like any JSON route and not routed."""
    body = bytes(3 * 1024 * 1024)
    bench = server_factory(bench_endpoints="1", max_json_body_bytes=str(1024 * 1024))
    r = httpx.post(f"{bench.url}/v1/_bench/sink", content=body, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"received": len(body)}
    plain = httpx.post(f"{api_server.url}/v1/_bench/sink", content=b"{}", timeout=30)
    assert plain.status_code == 404
