"""Data as users have it, and the checks that catch their mistakes: plain folders of class folders, class names
(folder names, a --classes file, the spec), string labels with a class list, one npz layout rule, the
near-chance gate with its override, spec from the checkpoint, and actionable messages."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nba_core.cli import EXIT_BAD_INPUT, EXIT_OK, main
from nba_core.data.formats import load_dataset_file, save_npz
from nba_core.data.imageset import ImageSet
from nba_core.errors import NBAError

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def attacked(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("attack")
    assert main(["attack", "--dataset", "digits", "--attack", "badnets", "--arch", "small_cnn", "--seed", "0",
                 "--epochs", "8", "--out", str(out), "--quiet"]) == 0
    return out


def write_folders(npz: Path, root: Path, names: list[str]) -> Path:
    """The clean subset as PNGs in root/<names[label]>/<i>.png, the way users keep images."""
    with np.load(npz) as z:
        x, y = z["x"], z["y"]
    if x.dtype != np.uint8:  # digits are on a 1/16 grid: PNGs hold 8-bit pixels
        x = np.rint(x * 255).clip(0, 255).astype(np.uint8)
    for i, (img, label) in enumerate(zip(x, y)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[:, :, 0]).save(folder / f"{i}.png")
    return root


def sanitize_args(attacked: Path, data: Path, tmp_path: Path, *extra: str) -> list[str]:
    return ["sanitize", "--model", str(attacked / "model.safetensors"), "--data", str(data), "--method", "FT",
            "--param", "epochs=1", "--out", str(tmp_path / "cleaned.safetensors"), "--report",
            str(tmp_path / "report.json"), "--no-evidence", "--quiet", *extra]


def test_folder_of_word_named_classes_is_refused_then_fixed_by_a_class_list(attacked, tmp_path, capsys):
    """Folders zero..nine sort to eight, five, four, ...: the model is near chance on them and the gate refuses;
    a --classes file gives the right order; --allow-low-accuracy runs anyway (with a warning in the report)."""
    data = write_folders(attacked / "clean.npz", tmp_path / "images", WORDS)
    assert main(sanitize_args(attacked, data, tmp_path)) == EXIT_BAD_INPUT  # no --spec: read from the checkpoint
    err = capsys.readouterr().err
    assert "accuracy_near_chance" in err and "--allow-low-accuracy" in err and "eight, five, four" in err

    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(WORDS) + "\n")
    assert main(sanitize_args(attacked, data, tmp_path, "--classes", str(classes))) == EXIT_OK
    out = capsys.readouterr().out
    assert "0=zero" in out and "9=nine" in out  # the label mapping is printed
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["class_names"] == WORDS and sum(report["data"]["class_counts"]) == report["data"]["clean_subset"]
    assert report["data"]["clean_accuracy_all_before"] > 0.8 and report["method"] == "ft"

    assert main(sanitize_args(attacked, data, tmp_path, "--allow-low-accuracy")) == EXIT_OK
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["class_names"][:3] == ["eight", "five", "four"]
    assert any("near chance" in w for w in report["warnings"])
    assert "near chance" in capsys.readouterr().err


def test_integer_folders_and_a_missing_class_warning(attacked, tmp_path, capsys):
    data = write_folders(attacked / "clean.npz", tmp_path / "images", [str(i) for i in range(10)])
    for png in (data / "7").iterdir():
        png.unlink()
    (data / "7").rmdir()
    assert main(sanitize_args(attacked, data, tmp_path, "--json")) == EXIT_OK
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["class_counts"][7] == 0
    assert any("class(es) 7" in w for w in report["warnings"])
    assert "no clean images for class(es) 7" in capsys.readouterr().err


def test_string_labels_need_a_class_list(tmp_path):
    x = (np.random.default_rng(0).random((6, 8, 8, 1)) * 255).astype(np.uint8)
    y = np.array(["cat", "dog", "cat", "dog", "cat", "dog"])
    np.savez(tmp_path / "s.npz", x=x, y=y)
    with pytest.raises(NBAError) as e:
        load_dataset_file(tmp_path / "s.npz")
    assert e.value.code == "data_invalid" and "class list" in e.value.message and "object" not in e.value.message
    assert load_dataset_file(tmp_path / "s.npz", class_names=["dog", "cat"]).y.tolist() == [1, 0, 1, 0, 1, 0]
    np.savez(tmp_path / "c.npz", x=x, y=y, classes=np.array(["dog", "cat"]))
    loaded = load_dataset_file(tmp_path / "c.npz")
    assert loaded.y.tolist() == [1, 0, 1, 0, 1, 0] and loaded.class_names == ["dog", "cat"]
    with pytest.raises(NBAError, match="not in the class list"):
        load_dataset_file(tmp_path / "s.npz", class_names=["dog", "bird"])


def test_one_layout_rule_for_uint8_and_float(tmp_path):
    rng = np.random.default_rng(0)
    u8 = (rng.random((4, 3, 10, 12)) * 255).astype(np.uint8)  # N×C×H×W
    ref = u8.astype(np.float32) / 255
    variants = {"u8_nchw": u8, "u8_nhwc": u8.transpose(0, 2, 3, 1), "f_nchw": ref, "f_nhwc": ref.transpose(0, 2, 3, 1)}
    for name, x in variants.items():
        np.savez(tmp_path / f"{name}.npz", x=x, y=np.arange(4))
        for expect in (None, (3, 10, 12)):
            got = load_dataset_file(tmp_path / f"{name}.npz", expect_shape=expect)
            np.testing.assert_allclose(got.x, ref, atol=1e-6, err_msg=f"{name} expect={expect}")
    # writing: always N×H×W×C (uint8 when lossless, else float32), whatever the pixels
    save_npz(tmp_path / "w.npz", ImageSet(ref + 0.001, np.arange(4)))
    with np.load(tmp_path / "w.npz") as z:
        assert z["x"].dtype == np.float32 and z["x"].shape == (4, 10, 12, 3)


def test_attack_writes_triggered_sets_in_one_layout(tmp_path):
    for attack in ("badnets", "blended"):
        out = tmp_path / attack
        assert main(["attack", "--dataset", "digits", "--attack", attack, "--epochs", "1", "--out", str(out),
                     "--quiet"]) == 0
        for name in ("clean.npz", "test.npz", "test_triggered.npz"):
            with np.load(out / name) as z:
                assert z["x"].shape[1:] == (8, 8, 1), (attack, name, z["x"].shape)


def test_evaluate_reads_the_spec_from_the_checkpoint(attacked, capsys):
    assert main(["evaluate", "--model", str(attacked / "model.safetensors"), "--clean",
                 str(attacked / "test.npz"), "--json"]) == EXIT_OK
    assert json.loads(capsys.readouterr().out)["clean_accuracy"] > 0.8


def test_spec_is_required_for_a_checkpoint_without_one(attacked, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(attacked / "model.safetensors")), str(tmp_path / "bare.safetensors"))
    assert main(["evaluate", "--model", str(tmp_path / "bare.safetensors"), "--clean",
                 str(attacked / "test.npz")]) == EXIT_BAD_INPUT
    assert "--spec" in capsys.readouterr().err


def test_whole_module_checkpoint_gets_a_one_line_fix(attacked, tmp_path, capsys):
    from nba_core.models import build_model
    from nba_core.spec import load_spec

    model = build_model(load_spec(str(attacked / "model.json")))
    torch.save(model, tmp_path / "whole.pt")
    assert main(["evaluate", "--model", str(tmp_path / "whole.pt"), "--spec", str(attacked / "model.json"),
                 "--clean", str(attacked / "test.npz")]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "\x1b" not in err and "checkpoint_unsafe" in err
    assert "torch.save(model.state_dict(), 'weights.pt')" in err and len(err.strip().splitlines()) == 1
    assert re.search(r"references [\w.]+", err)


def test_every_parameter_of_every_defense_has_a_description(capsys):
    from nba_core.defenses import METHODS, defense_class

    for method in METHODS:
        described = defense_class(method).describe()
        assert described, method
        missing = [name for name, p in described.items() if not p["help"].strip()]
        assert not missing, f"{method}: parameters without a description: {missing}"
    assert main(["methods", "Nba", "--json"]) == EXIT_OK
    payload = json.loads(capsys.readouterr().out)
    assert payload["nba"]["student_epochs"]["help"]


def test_progress_moves_during_the_before_and_after_scans(attacked, tmp_path):
    from nba_core.pipeline import sanitize

    seen: list[tuple[str, float]] = []
    sanitize(model_path=str(attacked / "model.safetensors"), spec=None, data_path=str(attacked / "clean.npz"),
             method="ft", params={"epochs": 1}, out_path=str(tmp_path / "c.safetensors"),
             progress=lambda stage, f: seen.append((stage, f)))
    for stage in ("evaluate_before", "evaluate_after"):
        values = sorted({round(f, 4) for s, f in seen if s == stage})
        assert len(values) >= 10, (stage, values)  # the scan reports as it goes, not only at its ends
    fractions = [f for _, f in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
