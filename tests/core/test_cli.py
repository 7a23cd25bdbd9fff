"""The `nba` CLI contract: attack -> sanitize -> evaluate, exit codes and error codes on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nba_core.cli import EXIT_BAD_INPUT, main

FILES = {"model.safetensors", "model.json", "clean.npz", "test.npz", "test_triggered.npz"}


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attack")
    code = main(["attack", "--dataset", "digits", "--attack", "badnets", "--arch", "small_cnn", "--seed", "0",
                 "--epochs", "8", "--out", str(out), "--quiet"])
    assert code == 0
    return out


def test_attack_writes_the_contract_files(attacked: Path, capsys):
    assert FILES <= {p.name for p in attacked.iterdir()}
    summary = json.loads((attacked / "attack.json").read_text())
    assert summary["attack_success_rate"] > 0.5
    assert summary["clean_accuracy"] > 0.5
    spec = json.loads((attacked / "model.json").read_text())
    assert spec["arch"] == "small_cnn" and spec["input_size"] == [8, 8]
    with np.load(attacked / "test_triggered.npz") as z:
        assert (z["y"] != 0).all(), "triggered set holds non-target images with their true labels"


def test_sanitize_then_evaluate_json(attacked: Path, tmp_path: Path, capsys):
    out, report = tmp_path / "cleaned.safetensors", tmp_path / "report.json"
    code = main(["sanitize", "--model", str(attacked / "model.safetensors"), "--spec", str(attacked / "model.json"),
                 "--data", str(attacked / "clean.npz"), "--method", "ft", "--param", "epochs=2",
                 "--out", str(out), "--report", str(report), "--no-evidence", "--quiet"])
    assert code == 0
    rep = json.loads(report.read_text())
    assert rep["method"] == "ft" and rep["params"]["epochs"] == 2
    assert set(rep["metrics"]) == {"before", "after"}
    assert rep["output"]["sha256"] and out.exists()
    capsys.readouterr()
    code = main(["evaluate", "--model", str(out), "--spec", str(attacked / "model.json"),
                 "--clean", str(attacked / "test.npz"), "--triggered", str(attacked / "test_triggered.npz"),
                 "--target", "0", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.0 <= result["clean_accuracy"] <= 1.0 and 0.0 <= result["attack_success_rate"] <= 1.0


def test_sanitize_trains_on_all_of_d_and_crossfits_the_accuracy_change(attacked: Path, tmp_path: Path):
    with np.load(attacked / "clean.npz") as z:
        n = len(z["y"])
    report = tmp_path / "report.json"
    code = main(["sanitize", "--model", str(attacked / "model.safetensors"), "--spec", str(attacked / "model.json"),
                 "--data", str(attacked / "clean.npz"), "--method", "ft", "--param", "epochs=2",
                 "--eval-data", str(attacked / "test.npz"), "--crossfit", "2",
                 "--out", str(tmp_path / "c.safetensors"), "--report", str(report), "--no-evidence", "--quiet"])
    assert code == 0
    rep = json.loads(report.read_text())
    # the default trains the defense on every clean image, as the benchmark does
    assert rep["data"]["defense_train"] == n and rep["data"]["holdout"] == 0
    with np.load(attacked / "test.npz") as z:
        assert rep["data"]["eval_set"] == len(z["y"])
    assert rep["metrics"]["before"]["clean_accuracy_on"] == "eval_set"
    cf = rep["crossfit"]
    assert cf["k"] == 2 and sum(f["held_out"] for f in cf["folds"]) == n
    assert all(f["train"] + f["held_out"] == n for f in cf["folds"])
    assert cf["change"] == pytest.approx(cf["clean_accuracy_after"] - cf["clean_accuracy_before"])


def test_sanitize_preset_is_reported_with_its_values(attacked: Path, tmp_path: Path):
    report = tmp_path / "report.json"
    code = main(["sanitize", "--model", str(attacked / "model.safetensors"), "--spec", str(attacked / "model.json"),
                 "--data", str(attacked / "clean.npz"), "--method", "ibau",
                 "--params", '{"preset": "authors", "rounds": 1, "k_steps": 1}',
                 "--out", str(tmp_path / "c.safetensors"), "--report", str(report), "--no-evidence", "--quiet"])
    assert code == 0
    params = json.loads(report.read_text())["params"]
    assert params["preset"] == "authors" and params["search"] == "sgd" and params["rounds"] == 1


def test_sanitize_rejects_unknown_method_and_params(attacked: Path, tmp_path: Path, capsys):
    common = ["sanitize", "--model", str(attacked / "model.safetensors"), "--spec", str(attacked / "model.json"),
              "--data", str(attacked / "clean.npz"), "--out", str(tmp_path / "x.safetensors"), "--quiet"]
    assert main(common + ["--method", "magic"]) == EXIT_BAD_INPUT
    assert "unknown_method" in capsys.readouterr().err
    assert main(common + ["--method", "ft", "--param", "bogus=1"]) == EXIT_BAD_INPUT
    assert "invalid_params" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_unsafe_pickle_is_refused_without_running_code(attacked: Path, tmp_path: Path, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    import pickle

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"net.weight": Payload()}))
    code = main(["evaluate", "--model", str(evil), "--spec", str(attacked / "model.json"),
                 "--clean", str(attacked / "test.npz"), "--json"])
    assert code == EXIT_BAD_INPUT
    assert "checkpoint_" in capsys.readouterr().err
    assert not marker.exists()


def test_entry_point_help_runs():
    proc = subprocess.run([sys.executable, "-m", "nba_core.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for command in ("attack", "sanitize", "evaluate"):
        assert command in proc.stdout
