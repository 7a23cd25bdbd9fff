"""A user's first hour against the real service (Postgres, Redis, a Celery worker, HTTP): a plain folder of
class folders through the client, label order by a class list, the near-chance gate and its override, the
offline API docs, and a report a browser opens through a signed link."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from app.core.links import LINK_EXPIRED, check_token, make_token
from nba_core.client import APIError, NBAClient, sanitize
from nba_core.errors import NBAError

pytestmark = pytest.mark.service

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def word_folders(npz: Path, root: Path) -> Path:
    with np.load(npz) as z:
        x, y = z["x"], z["y"]
    if x.dtype != np.uint8:
        x = np.rint(x * 255).clip(0, 255).astype(np.uint8)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / WORDS[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, :, 0]).save(folder / f"{i}.png")
    return root


@pytest.fixture()
def folders(digits_files, tmp_path) -> Path:
    return word_folders(digits_files["clean"], tmp_path / "my_images")


def test_folder_dataset_with_class_list_through_rest(api_server, api_key, celery_worker, digits_files, folders,
                                                     tmp_path):
    job = sanitize(api_server.url, api_key, model=digits_files["model"], data=folders,  # spec from the file
                   method="FT", params={"epochs": 1}, class_names=WORDS, out=tmp_path / "cleaned.safetensors",
                   timeout=120)
    assert job["status"] == "succeeded", job.get("error")
    assert job["method"] == "ft" and job["class_names"] == WORDS
    report = job["report"]
    assert report["data"]["class_names"] == WORDS
    assert report["data"]["clean_accuracy_all_before"] > 0.5
    assert job["download"]["sha256"] == report["output"]["sha256"]


def test_misordered_folders_refused_then_allowed(client, celery_worker, digits_files, folders):
    model = client.upload_model(digits_files["model"])  # spec read from the safetensors metadata
    data = client.upload_dataset(folders)  # a folder: zipped on the fly
    assert data["details"]["classes"]["eight"] == 0  # sorted names: the trap this gate is for
    refused = client.wait(client.create_job(model["id"], data["id"], "ft", {"epochs": 1})["id"], poll=0.3,
                          timeout=120)
    assert refused["status"] == "failed" and refused["error"]["code"] == "accuracy_near_chance"
    assert "allow_low_accuracy" in refused["error"]["message"] and refused["attempts"] == 1
    allowed = client.wait(client.create_job(model["id"], data["id"], "ft", {"epochs": 1},
                                            allow_low_accuracy=True)["id"], poll=0.3, timeout=120)
    assert allowed["status"] == "succeeded" and allowed["allow_low_accuracy"] is True
    report = client.get_report(allowed["id"])
    assert report["data"]["class_names"][:2] == ["eight", "five"]
    assert any("near chance" in w for w in report["warnings"])


def test_docs_are_served_without_any_external_url(api_server):
    with httpx.Client(base_url=api_server.url, timeout=10) as http:
        for page in ("/v1/docs", "/v1/redoc"):
            resp = http.get(page)
            assert resp.status_code == 200 and "text/html" in resp.headers["content-type"]
            html = resp.text
            assert not re.search(r"(src|href)=[\"']?(https?:)?//", html), f"{page} loads from elsewhere:\n{html}"
            assert "cdn" not in html.lower() and "fonts.googleapis" not in html
            assets = re.findall(r"(?:src|href)=[\"']([^\"']+)[\"']", html)
            assert any(a.endswith(".js") for a in assets), html
            for asset in assets:
                got = http.get(asset)
                assert got.status_code == 200 and len(got.content) > 100, asset  # served by the API itself
        assert http.get("/v1/openapi.json").json()["info"]["title"]
        assert http.get("/docs", follow_redirects=False).headers["location"] == "/v1/docs"
        assert http.get("/openapi.json", follow_redirects=True).json()["openapi"].startswith("3.")


def test_report_link_opens_without_a_key_and_nothing_else(api_server, api_key, client, celery_worker, digits_files,
                                                          second_owner_key, tmp_path, capsys):
    from tests.service.conftest_worker import submit_digits_job

    job = client.wait(submit_digits_job(client, digits_files, params={"epochs": 1})["id"], poll=0.3, timeout=120)
    assert job["status"] == "succeeded" and job["links"]["report_link"].endswith("/report-link")
    link = client.report_link(job["id"], ttl=60)
    page = httpx.get(link["url"], timeout=10)  # a browser: no Authorization header
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "clean accuracy" in page.text and job["id"] in page.text and "<script" not in page.text.lower()
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert httpx.get(f"{api_server.url}/v1/jobs/{job['id']}/report?format=html").status_code == 401

    token = link["url"].rsplit("/", 1)[1]
    forged = token[:-1] + ("0" if token[-1] != "0" else "1")
    bad = httpx.get(link["url"].replace(token, forged), timeout=10)
    assert bad.status_code == 403 and bad.json()["error"]["code"] == "link_invalid"
    job_id, expires, _ = token.split(".")
    longer = httpx.get(link["url"].replace(token, f"{job_id}.{int(expires) + 3600}.{token.split('.')[2]}"))
    assert longer.status_code == 403  # the expiry is signed too
    with NBAClient(api_server.url, second_owner_key) as other, pytest.raises(APIError) as e:
        other.report_link(job["id"])
    assert e.value.status == 404

    from app.cli import main as nba  # the CLI: the HTML report as a file, and the link
    common = ["--url", api_server.url, "--api-key", api_key]
    assert nba(["download", job["id"], "--report", str(tmp_path / "report.html"), *common]) == 0
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "clean accuracy" in html
    assert nba(["download", job["id"], "--report-link", "--ttl", "120", *common]) == 0
    assert "/v1/shared-reports/" in capsys.readouterr().out


def test_link_tokens_expire():
    token, expires = make_token(b"k" * 32, "job-1", ttl=30, now=1000)
    assert expires == 1030 and check_token(b"k" * 32, token, now=1029) == "job-1"
    with pytest.raises(NBAError) as e:
        check_token(b"k" * 32, token, now=1031)
    assert e.value.code == LINK_EXPIRED and e.value.http_status == 403
    with pytest.raises(NBAError):
        check_token(b"other-secret", token, now=1000)
