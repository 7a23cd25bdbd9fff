"""Hugging Face models over REST: a zip of a save_pretrained folder is uploaded with no spec, cleaned by a real
worker (Postgres + Redis + Celery, and the embedded one-machine mode), and comes back as a zip that
`from_pretrained` loads with the same keys and shapes; hostile configs are refused at upload with a code."""

from __future__ import annotations

import io
import json
import zipfile

import httpx
import pytest

from app.client import APIError, NBAClient
from tests.hf_fixtures import TINY_RESNET, TINY_VIT, backdoored_hf_digits
from tests.service.conftest import safetensors_bytes
from tests.service.test_embedded import _nba, embedded  # noqa: F401  (the embedded-server fixture)

import transformers  # noqa: E402,F401  (declared in the worker and hf extras; the Makefile installs it)
pytestmark = pytest.mark.service

FT = {"epochs": 15}  # strong fine-tuning removes this tiny BadNets backdoor in seconds (see tests/core/test_hf.py)


@pytest.fixture(scope="module")
def hf_files(tmp_path_factory):
    return backdoored_hf_digits(TINY_RESNET, tmp_path_factory.mktemp("hf-resnet"), epochs=20)


def _round_trip(client: NBAClient, hf_files, tmp_path, timeout: float = 300) -> dict:
    from transformers import AutoModelForImageClassification

    model = client.upload_model(hf_files["zip"])  # no spec
    assert model["format"] == "hf"
    data = client.upload_dataset(hf_files["clean"])
    probe = client.upload_dataset(hf_files["probe"], kind="probe")
    job = client.create_job(model["id"], data["id"], "ft", FT, probe_id=probe["id"], probe_target=0)
    done = client.wait(job["id"], poll=0.3, timeout=timeout)
    assert done["status"] == "succeeded", done
    out = tmp_path / "cleaned.zip"
    got = client.download_model(job["id"], out)
    assert got["sha256"] == done["result"]["sha256"]
    with zipfile.ZipFile(out) as zf:
        assert sorted(zf.namelist()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
        zf.extractall(tmp_path / "cleaned")
    src = AutoModelForImageClassification.from_pretrained(hf_files["folder"]).state_dict()
    back = AutoModelForImageClassification.from_pretrained(tmp_path / "cleaned").state_dict()
    assert list(src) == list(back) and all(src[k].shape == back[k].shape for k in src)
    before, after = done["metrics"]["before"], done["metrics"]["after"]
    assert before["attack_success_rate"] > 0.3  # the uploaded model really is backdoored
    assert after["attack_success_rate"] < 0.5 * before["attack_success_rate"]
    report = client.get_report(job["id"])
    assert report["model"]["format"] == "hf" and report["output"]["format"] == "hf"
    return done


def test_hf_zip_round_trip_with_postgres_redis_and_a_worker(client, celery_worker, hf_files, tmp_path):
    _round_trip(client, hf_files, tmp_path)


def test_hf_zip_round_trip_in_embedded_mode(embedded, hf_files, tmp_path):  # noqa: F811
    url, data_dir, env, log_path = embedded
    created = _nba("keys", "create", "hf-user", "--data-dir", str(data_dir), env=env)
    assert created.returncode == 0, created.stderr
    with NBAClient(url, created.stdout.strip()) as client:
        _round_trip(client, hf_files, tmp_path, timeout=300)


def _zip(config: bytes | dict, weights: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/config.json", config if isinstance(config, bytes) else json.dumps(config))
        zf.writestr("model/model.safetensors", weights if weights is not None else safetensors_bytes())
    return buf.getvalue()


@pytest.mark.parametrize("config, code", [
    ({**TINY_RESNET, "auto_map": {"AutoModelForImageClassification": "m.Net"}}, "hf_remote_code_refused"),
    ({**TINY_RESNET, "trust_remote_code": True}, "hf_remote_code_refused"),
    ({**TINY_RESNET, "model_type": "llama"}, "hf_unsupported_model_type"),
    ({**TINY_VIT, "hidden_size": 8192, "intermediate_size": 32768, "num_hidden_layers": 3,
      "num_attention_heads": 64, "image_size": 224, "patch_size": 16}, "hf_model_too_large"),  # ~2.4 B parameters
    ({**TINY_RESNET, "num_labels": 1_000_000}, "hf_model_too_large"),
    (b"this is not json", "hf_config_invalid"),
    (b" " * (100 * 1024 * 1024), "hf_config_invalid"),  # 100 MB config (deflates to ~100 KB)
    (TINY_RESNET, "hf_weights_config_mismatch"),  # a 50-element file cannot be this network's weights
])
def test_hostile_hf_uploads_are_refused_with_a_code(api_server, client, config, code):
    body = _zip(config)
    with pytest.raises(APIError) as e:
        client.upload_stream("/v1/models", [body], len(body), filename="model.zip")
    assert e.value.code == code and 400 <= e.value.status < 500, (e.value.code, e.value.message)
    assert httpx.get(api_server.url + "/healthz", timeout=5).status_code == 200
    assert api_server.memory_kb("VmRSS") < 400_000  # nothing was built or decompressed whole


def test_a_zip_without_spec_or_config_still_needs_a_spec(client):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("weights.bin", b"0" * 100)
    body = buf.getvalue()
    with pytest.raises(APIError) as e:
        client.upload_stream("/v1/models", [body], len(body), filename="x.zip")
    assert e.value.code == "spec_invalid"


def test_a_defense_that_cannot_apply_is_refused_at_job_creation(client, tmp_path):
    import torch

    from nba_core.hf_config import check_hf_config
    from nba_core.hf_io import pack_hf_zip
    from nba_core.models.hf import build_hf_model

    torch.manual_seed(0)
    build_hf_model(check_hf_config(TINY_VIT)).save_pretrained(tmp_path / "vit")
    pack_hf_zip(tmp_path / "vit", tmp_path / "vit.zip")
    model = client.upload_model(tmp_path / "vit.zip")
    assert model["details"]["model_type"] == "vit" and model["details"]["norm"] == "layernorm"
    from tests.service.conftest import digits_npz_bytes

    raw = digits_npz_bytes()
    data = client.upload_stream("/v1/datasets", [raw], len(raw), filename="d.npz")
    with pytest.raises(APIError) as e:
        client.create_job(model["id"], data["id"], "anp", {})
    assert e.value.code == "defense_not_applicable" and e.value.status == 422
    job = client.create_job(model["id"], data["id"], "nad", {"teacher_epochs": 1, "epochs": 1})
    assert job["status"] in ("queued", "running")


def test_a_scan_job_takes_an_hf_zip(client, celery_worker, hf_files):
    """Detect-only over REST for a Hugging Face model: a verdict, no cleaned model."""
    model = client.upload_model(hf_files["zip"])
    data = client.upload_dataset(hf_files["clean"])
    job = client.create_job(model["id"], data["id"], "scan", {})
    done = client.wait(job["id"], poll=0.3, timeout=300)
    assert done["status"] == "succeeded", done
    assert done["verdict"]["before"]["status"] in ("suspected", "not_suspected", "inconclusive")
    assert done["result"] is None
    report = client.get_report(job["id"])
    assert report["kind"] == "nba-scan-report" and report["model"]["model_type"] == "resnet"
