"""Downloads handed to nginx (X-Accel-Redirect): the API checks key, owner and job, nginx sends the stored file.
A real nginx runs in front of a real API server with the `/_artifacts/` location of deploy/nginx.conf (CI installs
nginx; without it these tests fail rather than skip)."""

from __future__ import annotations

import getpass
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from bench.service_speed import nginx_artifacts_location

from .conftest import free_port
from .test_api_download import finished_job  # noqa: F401 - the fixture

PREFIX = "/_artifacts/"


@pytest.fixture(scope="module")
def accel_api(server_factory):
    return server_factory(accel_redirect_prefix=PREFIX)


@pytest.fixture(scope="module")
def nginx(accel_api, store, tmp_path_factory):
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    assert os.path.exists(binary), "nginx is not installed (apt-get install nginx)"
    folder = tmp_path_factory.mktemp("nginx")
    port = free_port()
    location = nginx_artifacts_location(store.root)
    (folder / "nginx.conf").write_text(f"""
daemon off;
user {getpass.getuser()};
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass {accel_api.url}; proxy_buffering off; }}
        {location}
    }}
}}
""")
    proc = subprocess.Popen([binary, "-p", str(folder), "-c", str(folder / "nginx.conf")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            httpx.get(url + "/healthz", timeout=1.0)
            break
        except httpx.HTTPError:
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(10)


def test_the_api_answers_with_a_redirect_and_no_body(accel_api, api_key, finished_job, store) -> None:  # noqa: F811
    headers = {"Authorization": f"Bearer {api_key}"}
    resp = httpx.get(f"{accel_api.url}/v1/jobs/{finished_job['id']}/model", headers=headers)
    assert resp.status_code == 200 and resp.content == b""
    target = resp.headers["x-accel-redirect"]
    assert target.startswith(PREFIX)
    stored = Path(store.root) / target[len(PREFIX):]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == finished_job["sha256"]
    assert resp.headers["x-content-sha256"] == finished_job["sha256"]


def test_nginx_serves_the_file_ranges_and_the_hash(nginx, api_key, second_owner_key,
                                                   finished_job) -> None:  # noqa: F811
    url = f"{nginx}/v1/jobs/{finished_job['id']}/model"
    headers = {"Authorization": f"Bearer {api_key}"}
    full = httpx.get(url, headers=headers)
    assert full.status_code == 200 and full.content == finished_job["payload"]
    assert full.headers["x-content-sha256"] == finished_job["sha256"]
    assert full.headers["etag"] == f'"{finished_job["sha256"]}"'
    assert full.headers["content-disposition"] == f'attachment; filename="{finished_job["id"]}.safetensors"'
    assert "x-accel-redirect" not in full.headers

    part = httpx.get(url, headers=headers | {"Range": "bytes=1000-1999"})
    assert part.status_code == 206 and part.content == finished_job["payload"][1000:2000]
    assert part.headers["content-range"] == "bytes 1000-1999/300000"

    # The API still decides who gets what; the internal location cannot be asked for directly.
    other = httpx.get(url, headers={"Authorization": f"Bearer {second_owner_key}"})
    assert other.status_code == 404 and other.json()["error"]["code"] == "not_found"
    assert httpx.get(url).status_code == 401
    direct = httpx.get(f"{nginx}{PREFIX}sha256/{finished_job['sha256'][:2]}/{finished_job['sha256']}")
    assert direct.status_code == 404
