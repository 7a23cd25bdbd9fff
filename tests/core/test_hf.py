"""Hugging Face image classifiers: hostile configs refused cheaply with codes, size estimates that match the built
model, the folder/zip round trip (keys and shapes identical, from_pretrained loads the output), behaviour layers
from output_hidden_states on a CNN and a transformer, defenses refused where they cannot apply, the CLI without
--spec, and a backdoor removed from an HF ResNet."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from nba_core.errors import NBAError
from nba_core.hf_config import ALLOWED_MODEL_TYPES, MAX_PARAMETERS, applicable_methods, check_hf_config
from nba_core.hf_io import check_hf_zip, pack_hf_zip
from tests.hf_fixtures import TINY_RESNET, TINY_VIT, backdoored_hf_digits

import transformers  # noqa: E402,F401  (declared in the worker and hf extras; the Makefile installs it)

# Small configs of every allowed family (the values a user's tiny model might have).
TINY = {
    "resnet": dict(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8),
    "regnet": dict(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8, groups_width=8),
    "convnext": dict(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2),
    "mobilenet_v2": dict(depth_multiplier=0.35),
    "efficientnet": dict(width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, image_size=32),
    "vit": dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=32),
    "deit": dict(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=32),
    "swin": dict(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4),
}


def _config(model_type: str, **extra) -> dict:
    from transformers import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[model_type](num_labels=10, num_channels=3, **TINY[model_type], **extra).to_dict()
    return json.loads(json.dumps(cfg))


# ---- hostile and malformed configs: refused before anything is built --------------------------------------

@pytest.mark.parametrize("config, code", [
    ({**TINY_RESNET, "auto_map": {"AutoModelForImageClassification": "evil.Model"}}, "hf_remote_code_refused"),
    ({**TINY_RESNET, "trust_remote_code": True}, "hf_remote_code_refused"),
    ({**TINY_RESNET, "model_type": "my_custom_net"}, "hf_unsupported_model_type"),
    ({**TINY_RESNET, "model_type": None}, "hf_unsupported_model_type"),
    ({**TINY_VIT, "hidden_size": 16384, "intermediate_size": 65536, "num_hidden_layers": 48}, "hf_model_too_large"),
    ({**TINY_RESNET, "hidden_sizes": [4096, 8192, 16384, 32768]}, "hf_model_too_large"),
    ({**TINY_RESNET, "num_labels": 1_000_000}, "hf_model_too_large"),
    ({**TINY_VIT, "image_size": 100_000}, "hf_model_too_large"),
    ({**TINY_RESNET, "depths": "deep"}, "hf_config_invalid"),
    ({**TINY_RESNET, "num_channels": 0}, "hf_config_invalid"),
])
def test_hostile_configs_are_refused_with_a_code(config, code):
    with pytest.raises(NBAError) as e:
        check_hf_config(json.dumps(config).encode())
    assert e.value.code == code, e.value.message
    assert 400 <= e.value.http_status < 500


def test_a_two_billion_parameter_config_is_refused_from_its_numbers_alone():
    config = {**TINY_VIT, "image_size": 224, "patch_size": 16, "hidden_size": 8192, "intermediate_size": 32768,
              "num_hidden_layers": 3, "num_attention_heads": 64}
    with pytest.raises(NBAError) as e:
        check_hf_config(json.dumps(config))
    assert e.value.code == "hf_model_too_large" and "parameters" in e.value.message
    # ~2.4 billion: what building it would have allocated (checked on the meta device, no memory used)
    from nba_core.models.hf import count_parameters_meta

    info = check_hf_config(config, max_parameters=10**11, max_activation_bytes=1 << 50)
    assert count_parameters_meta(info) > 2 * 10**9 > MAX_PARAMETERS


@pytest.mark.parametrize("raw, code", [
    (b"\x00\x01not json", "hf_config_invalid"),
    (b"[1, 2, 3]", "hf_config_invalid"),
    (b'{"model_type": "resnet", "id2label": ' + b'"' + b"x" * (100 * 1024 * 1024) + b'"}', "hf_config_invalid"),
])
def test_non_json_and_huge_configs_are_refused_cheaply(raw, code):
    with pytest.raises(NBAError) as e:
        check_hf_config(raw)
    assert e.value.code == code


def test_a_100_mb_config_in_a_zip_is_refused_from_the_zip_directory(tmp_path):
    path = tmp_path / "big.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("model/config.json", b" " * (100 * 1024 * 1024))  # compresses to ~100 KB
        zf.writestr("model/model.safetensors", b"")
    with pytest.raises(NBAError) as e:
        check_hf_zip(path)
    assert e.value.code == "hf_config_invalid" and e.value.http_status == 413


def test_a_weights_zip_bomb_is_refused_before_extraction(tmp_path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", json.dumps(TINY_RESNET))
        zf.writestr("model.safetensors", b"\0" * (64 * 1024 * 1024))
    with pytest.raises(NBAError) as e:
        check_hf_zip(path)
    assert e.value.code == "hf_archive_invalid" and "expand" in e.value.message


@pytest.mark.parametrize("model_type", sorted(ALLOWED_MODEL_TYPES))
def test_size_estimate_matches_the_built_model(model_type):
    from nba_core.models.hf import count_parameters_meta

    info = check_hf_config(_config(model_type), input_size=(32, 32))
    exact = count_parameters_meta(info)
    assert 0.75 * exact <= info.estimated_parameters <= 1.33 * exact, (info.estimated_parameters, exact)


# ---- build, behaviour layers, round trip ------------------------------------------------------------------

def _save_pretrained(config: dict, folder: Path) -> Path:
    from nba_core.models.hf import build_hf_model

    torch.manual_seed(0)
    model = build_hf_model(check_hf_config(config, input_size=(32, 32)))
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("model_type", sorted(ALLOWED_MODEL_TYPES))
def test_every_allowed_family_loads_with_behaviour_layers_and_round_trips(model_type, tmp_path):
    from transformers import AutoModelForImageClassification

    from nba_core.models.hf import load_hf_model, save_hf_model

    src = _save_pretrained(_config(model_type), tmp_path / "src")
    loaded = load_hf_model(src, default_input_size=(32, 32))
    assert loaded.module.behavior_layers, model_type
    x = torch.rand(2, 3, 32, 32)
    from nba_core.models.base import capture_outputs

    with capture_outputs(loaded.module, loaded.module.behavior_layers) as store:
        logits = loaded.module(x)
    assert logits.shape == (2, 10)
    for name in loaded.module.behavior_layers:
        assert store[name].ndim in (3, 4)  # tokens or feature maps
    with torch.no_grad():  # "clean" it: change a weight, write it back
        next(loaded.module.parameters()).add_(1.0)
    save_hf_model(loaded, loaded.module, tmp_path / "out")
    original = AutoModelForImageClassification.from_pretrained(src).state_dict()
    again = AutoModelForImageClassification.from_pretrained(tmp_path / "out").state_dict()
    assert list(original) == list(again)
    assert all(original[k].shape == again[k].shape for k in original)
    assert any(not torch.equal(original[k], again[k]) for k in original)  # the new weights, not the old ones
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads((src / "config.json").read_text())


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    from nba_core.models.hf import load_hf_model

    src = _save_pretrained(_config("resnet"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "hidden_sizes": [8, 24]}))
    with pytest.raises(NBAError) as e:
        load_hf_model(src, default_input_size=(32, 32))
    assert e.value.code == "checkpoint_shape_mismatch"


def test_sharded_or_pickled_weights_are_named_in_the_error(tmp_path):
    from nba_core.models.hf import load_hf_model

    src = _save_pretrained(_config("resnet"), tmp_path / "src")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(NBAError) as e:
        load_hf_model(src)
    assert "pytorch_model.bin" in e.value.message and "save_pretrained" in e.value.message


def test_token_features_are_read_as_channels_over_positions():
    from nba_core.defenses.behavior import REPRESENTATIONS, as_feature_map, behavior_distance

    tokens = torch.rand(4, 17, 32)  # B×N×D
    assert as_feature_map(tokens).shape == (4, 32, 17, 1)
    assert as_feature_map((tokens, None)).shape == (4, 32, 17, 1)
    for kind in REPRESENTATIONS:
        d = behavior_distance(kind, [tokens, tokens * 2 + 1], [tokens + 0.1, tokens])
        assert torch.isfinite(d) and d > 0


def test_which_defenses_apply_is_decided_from_the_config():
    vit = applicable_methods(check_hf_config(TINY_VIT))
    resnet = applicable_methods(check_hf_config(TINY_RESNET))
    assert vit["anp"] and vit["fp"] and not vit["nba"] and not vit["nad"]
    assert all(resnet[m] is None for m in ("ft", "fp", "nad", "anp", "ibau", "nba"))
    assert resnet["sau"] is None and resnet["ftsam"] is None and vit["sau"] is None and vit["ftsam"] is None
    assert resnet["scan"] is None and vit["scan"] is None  # the verdict needs only inputs and logits


@pytest.mark.parametrize("model_type", ["resnet", "regnet", "mobilenet_v2", "efficientnet"])
def test_fine_pruning_bakes_into_every_family_it_is_allowed_for(model_type, tmp_path):
    """The applicability table says FP applies: its prune-and-bake must then work (no RuntimeError)."""
    from nba_core.data.imageset import ImageSet
    from nba_core.defenses import get_defense
    from nba_core.defenses.base import DefenseContext
    from nba_core.models.hf import load_hf_model

    loaded = load_hf_model(_save_pretrained(_config(model_type), tmp_path / "src"), default_input_size=(32, 32))
    rng = np.random.default_rng(0)
    clean = ImageSet(rng.random((40, 3, 32, 32), dtype=np.float32), np.arange(40) % 10)
    ctx = DefenseContext(spec=loaded.spec, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    result = get_defense("fp", {"epochs": 0, "max_acc_drop": 1.0, "max_prune_ratio": 0.5, "prune_step": 0.25}).run(
        loaded.module, clean, ctx)
    assert result.info["pruned"] > 0 and result.info["baked_into"] != "none"


# ---- end to end on tiny backdoored models -----------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_resnet(tmp_path_factory):
    return backdoored_hf_digits(TINY_RESNET, tmp_path_factory.mktemp("hf-resnet"), epochs=20)


def test_cli_scan_takes_an_hf_zip_without_spec(hf_resnet, tmp_path, capsys):
    from nba_core.cli import EXIT_SUSPECTED, main

    code = main(["scan", "--model", str(hf_resnet["zip"]), "--data", str(hf_resnet["clean"]), "--quiet", "--json",
                 "--report", str(tmp_path / "scan.json")])
    report = json.loads((tmp_path / "scan.json").read_text())
    before = report["verdict"]["before"]
    # The mechanics (this 8x8 fixture's backdoor is weak, ASR ~0.6: its score sits near the threshold, so the
    # status may honestly be inconclusive): a verdict of the three kinds, the exit code following it.
    assert before["status"] in ("suspected", "not_suspected", "inconclusive")
    assert code == (EXIT_SUSPECTED if before["status"] == "suspected" else 0)
    assert before["score"] > 0.5 and before["images"] == len(np.load(hf_resnet["clean"])["y"])
    assert report["model"]["model_type"] == "resnet" and report["verdict"]["after"] is None
    assert report["data"]["input_size"] == [8, 8]


def test_cli_eval_data_and_crossfit_work_on_an_hf_model(hf_resnet, tmp_path, capsys):
    from nba_core.cli import main

    code = main(["sanitize", "--model", str(hf_resnet["folder"]), "--data", str(hf_resnet["clean"]), "--method",
                 "ft", "--param", "epochs=1", "--eval-data", str(hf_resnet["test"]), "--crossfit", "2",
                 "--no-evidence", "--quiet", "--json", "--out", str(tmp_path / "out"), "--report",
                 str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["metrics"]["before"]["clean_accuracy_on"] == "eval_set"
    assert report["metrics"]["before"]["holdout_size"] == 359  # the digits test split, not the clean subset
    assert report["data"]["eval_resized_from"] is None
    assert report["crossfit"]["k"] == 2 and len(report["crossfit"]["folds"]) == 2


def test_cli_sanitizes_an_hf_zip_without_spec_and_removes_the_backdoor(hf_resnet, tmp_path, capsys):
    from transformers import AutoModelForImageClassification

    from nba_core.cli import main
    from nba_core.models.hf import load_hf_model

    assert hf_resnet["asr"] > 0.3  # the fixture really is backdoored
    out = tmp_path / "cleaned"
    code = main(["sanitize", "--model", str(hf_resnet["zip"]), "--data", str(hf_resnet["clean"]), "--method", "ft",
                 "--param", "epochs=15", "--probe", str(hf_resnet["probe"]), "--probe-target", "0",
                 "--no-evidence", "--quiet", "--json", "--out", str(out), "--report", str(tmp_path / "r.json")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert after["attack_success_rate"] < 0.5 * before["attack_success_rate"]
    assert report["model"]["model_type"] == "resnet" and report["data"]["resized_from"] is None
    assert report["output"]["format"] == "hf"
    src = AutoModelForImageClassification.from_pretrained(hf_resnet["folder"]).state_dict()
    got = AutoModelForImageClassification.from_pretrained(out).state_dict()
    assert list(src) == list(got) and all(src[k].shape == got[k].shape for k in src)
    # `nba evaluate` reads the cleaned folder without a spec and agrees with the report
    capsys.readouterr()
    assert main(["evaluate", "--model", str(out), "--triggered", str(hf_resnet["probe"]), "--target", "0",
                 "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert evaluated["attack_success_rate"] == pytest.approx(after["attack_success_rate"], abs=1e-6)
    # what the CLI wrote is what we measured
    reloaded = load_hf_model(out)
    from nba_core.data.formats import load_dataset_file

    probe = load_dataset_file(hf_resnet["probe"])  # the one npz layout rule (save_npz writes N×H×W×C)
    pred = reloaded.module(torch.as_tensor(probe.x).float()).argmax(1)
    mask = probe.y != 0
    asr = float((pred[torch.as_tensor(mask)] == 0).float().mean())
    assert asr == pytest.approx(after["attack_success_rate"], abs=1e-6)


def test_clean_images_are_resized_to_the_model_input(hf_resnet, tmp_path):
    from nba_core.data.formats import save_npz
    from nba_core.data.imageset import ImageSet
    from nba_core.hf_pipeline import sanitize_hf

    from nba_core.data.formats import load_dataset_file

    clean = load_dataset_file(hf_resnet["clean"])  # N×C×H×W floats, whatever layout the npz holds
    x = torch.nn.functional.interpolate(torch.as_tensor(clean.x).float(), size=(16, 16)).numpy()
    save_npz(tmp_path / "big.npz", ImageSet(x, clean.y))
    report = sanitize_hf(model_path=str(hf_resnet["folder"]), data_path=str(tmp_path / "big.npz"), method="ft",
                         params={"epochs": 1}, out_path=str(tmp_path / "out"), evidence=False)
    assert report["data"]["resized_from"] == [16, 16] and report["data"]["input_size"] == [8, 8]


def test_anp_on_a_vit_is_refused_before_anything_runs(tmp_path):
    from nba_core.hf_pipeline import sanitize_hf

    folder = tmp_path / "vit"
    from nba_core.models.hf import build_hf_model

    build_hf_model(check_hf_config(TINY_VIT)).save_pretrained(folder)
    with pytest.raises(NBAError) as e:
        sanitize_hf(model_path=str(folder), data_path=str(tmp_path / "never-read.npz"), method="anp", params=None,
                    out_path=str(tmp_path / "out"))
    assert e.value.code == "defense_not_applicable" and "LayerNorm" in e.value.message


def test_nba_and_nad_run_on_vit_tokens(tmp_path):
    """A transformer's behaviour layers are token tensors: the distillation defenses must run on them."""
    from nba_core.data.builtin import train_test
    from nba_core.data.formats import save_npz
    from nba_core.data.imageset import stratified_split
    from nba_core.hf_pipeline import sanitize_hf
    from nba_core.models.hf import build_hf_model

    folder = tmp_path / "vit"
    torch.manual_seed(0)
    build_hf_model(check_hf_config(TINY_VIT)).save_pretrained(folder)
    train, _ = train_test("digits")
    _, idx = stratified_split(train.y, 0.1, 0)
    save_npz(tmp_path / "clean.npz", train.subset(idx))
    for method, params in (("nad", {"teacher_epochs": 1, "epochs": 1}),
                           ("nba", {"teacher_epochs": 1, "student_epochs": 1, "scan_steps": 2, "refresh_every": 0})):
        report = sanitize_hf(model_path=str(folder), data_path=str(tmp_path / "clean.npz"), method=method,
                             params=params, out_path=str(tmp_path / method), evidence=False,
                             allow_low_accuracy=True)  # an untrained ViT: the mechanics, not the accuracy
        assert report["defense_info"]["layers"] == ["hf.vit.layers.0", "hf.vit.layers.2", "hf.vit.layers.3"]
        assert (tmp_path / method / "model.safetensors").is_file()


def test_attack_cli_builds_and_backdoors_an_hf_model(tmp_path, capsys):
    from nba_core.cli import main

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(TINY_RESNET))
    code = main(["attack", "--dataset", "digits", "--hf-config", str(config), "--epochs", "1", "--quiet", "--json",
                 "--out", str(tmp_path / "bd")])
    assert code == 0, capsys.readouterr().err
    assert {p.name for p in (tmp_path / "bd" / "model").iterdir()} == {"config.json", "model.safetensors",
                                                                       "preprocessor_config.json"}
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["arch"] == "hf:resnet"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**TINY_RESNET, "auto_map": {"x": "y"}}))
    assert main(["attack", "--dataset", "digits", "--hf-config", str(bad), "--out", str(tmp_path / "x")]) == 3
    assert "hf_remote_code_refused" in capsys.readouterr().err


def test_bench_configs_are_accepted():
    bench = Path(__file__).resolve().parents[2] / "bench" / "configs"
    for name in ("hf_resnet_tiny", "hf_vit_tiny", "hf_resnet18"):
        info = check_hf_config((bench / f"{name}.json").read_bytes(), input_size=(64, 64))
        assert info.model_type in ("resnet", "vit")


# ---- foreign layouts and plain modules ---------------------------------------------------------------------

def _torchvision_resnet18_keys() -> dict[str, torch.Tensor]:
    keys = ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var", "fc.weight", "fc.bias"]
    keys += [f"layer{i}.{j}.{n}.weight" for i in range(1, 5) for j in range(2) for n in ("conv1", "conv2", "bn1")]
    return {k: torch.zeros(2) for k in keys}


def test_foreign_layouts_are_named_in_the_error(tmp_path):
    from safetensors.torch import save_file

    from nba_core.checkpoint import load_model
    from nba_core.foreign import describe_foreign_layout

    path = tmp_path / "tv.safetensors"
    save_file(_torchvision_resnet18_keys(), str(path))
    spec = {"arch": "preact_resnet18", "num_classes": 10, "in_channels": 3, "input_size": [32, 32],
            "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(NBAError) as e:
        load_model(path, spec)
    assert e.value.code == "checkpoint_missing_keys"
    assert "torchvision ResNet" in e.value.message and "sanitize_module" in e.value.message
    assert "timm" in describe_foreign_layout(["stem.0.weight", "stages.0.blocks.0.conv.weight", "head.fc.weight"])
    assert "Hugging Face" in describe_foreign_layout(["resnet.embedder.embedder.convolution.weight"])
    assert describe_foreign_layout(["net.block1.0.weight"]) is None


def test_a_whole_module_pickle_is_refused_with_what_to_do(tmp_path):
    from nba_core.checkpoint import read_state_dict

    path = tmp_path / "whole.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(2, 2)), path)
    with pytest.raises(NBAError) as e:
        read_state_dict(path)
    assert e.value.code == "checkpoint_unsafe" and "state_dict" in e.value.message
    assert "sanitize_module" in e.value.message


def test_sanitize_module_cleans_a_plain_module_with_automatic_layers():
    from nba_core import module_api as nba_core
    from nba_core.errors import Cancelled
    from tests.core.digits_backdoor import backdoored_digits

    model, clean, _, triggered = backdoored_digits(rate=0.1)
    plain = model.net  # the bare network: takes normalised input, no behavior_layers attribute of ours
    seen = []
    cleaned, report = nba_core.sanitize_module(plain, (clean.x, clean.y), method="nad", num_classes=10,
                                               input_size=(8, 8), mean=(0.3,), std=(0.4,),
                                               params={"teacher_epochs": 2, "epochs": 2}, evidence=False,
                                               probe=(triggered.x, triggered.y), probe_target=0,
                                               progress=lambda s, f: seen.append(f))
    assert report["model"]["layers_chosen"] == "automatic" and len(report["model"]["behavior_layers"]) >= 2
    assert report["defense_info"]["layers"] == [f"net.{n}" for n in report["model"]["behavior_layers"]]
    assert cleaned is not plain and type(cleaned) is type(plain)
    assert seen == sorted(seen) and "attack_success_rate" in report["metrics"]["after"]
    with pytest.raises(Cancelled):
        nba_core.sanitize_module(plain, (clean.x, clean.y), method="ft", num_classes=10, input_size=(8, 8),
                                 mean=(0.3,), std=(0.4,), should_cancel=lambda: True, evidence=False)
    with pytest.raises(NBAError) as e:
        nba_core.sanitize_module(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)),
                                 (clean.x, clean.y), method="anp", num_classes=10, input_size=(8, 8))
    assert e.value.code == "defense_not_applicable"


FAST = {"ft": {"epochs": 1}, "fp": {"epochs": 1, "prune_step": 0.25}, "nad": {"teacher_epochs": 1, "epochs": 1},
        "anp": {"iterations": 3}, "ibau": {"rounds": 1, "k_steps": 1, "inner_steps": 2},
        "nba": {"teacher_epochs": 1, "student_epochs": 1, "scan_steps": 2, "refresh_every": 0},
        "sau": {"rounds": 1, "adv_steps": 1}, "ftsam": {"epochs": 1}}


@pytest.mark.parametrize("config", [TINY_RESNET, TINY_VIT], ids=["resnet", "vit"])
def test_every_applicable_defense_runs_on_an_hf_cnn_and_transformer(config, tmp_path):
    """Each defense the applicability table allows runs to the end on the wrapped model (tiny settings)."""
    from nba_core.data.builtin import train_test
    from nba_core.data.imageset import stratified_split
    from nba_core.models.hf import build_hf_model, load_hf_model
    from nba_core.pipeline import sanitize_loaded

    torch.manual_seed(0)
    build_hf_model(check_hf_config(config)).save_pretrained(tmp_path / "m")
    loaded = load_hf_model(tmp_path / "m", default_input_size=(8, 8))
    train, _ = train_test("digits")
    _, idx = stratified_split(train.y, 0.08, 0)
    allowed = [m for m, why in applicable_methods(loaded.info).items() if why is None and m != "scan"]
    assert sorted(allowed) == sorted(FAST if config is TINY_RESNET else ["ft", "nad", "ibau", "nba", "sau", "ftsam"])
    for method in allowed:
        outcome = sanitize_loaded(loaded.module, train.subset(idx), spec=loaded.spec, method=method,
                                  params=FAST[method], evidence=False, device="cpu",
                                  allow_low_accuracy=True)  # untrained: the mechanics, not the accuracy
        assert outcome.report["metrics"]["after"]["clean_accuracy"] is not None, method


def test_transformers_train_with_adamw_and_cnns_with_sgd():
    """The bench's transformer models train with AdamW: the CNNs' SGD recipe left a tiny ViT at chance (digits,
    8 epochs: 10.0 % with SGD, 16.4 % with AdamW; 34 % after 20 epochs of AdamW)."""
    from nba_core.experiment import default_train_config
    from nba_core.train import TrainConfig, make_optimizer

    assert default_train_config("mnist5k", "hf", TINY_VIT).optimizer == "adamw"
    assert default_train_config("mnist5k", "hf", TINY_RESNET).optimizer == "sgd"
    assert default_train_config("mnist5k", "small_cnn").optimizer == "sgd"
    opt, _ = make_optimizer(torch.nn.Linear(2, 2).parameters(), TrainConfig(optimizer="adamw"), steps=1)
    assert isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ValueError):
        make_optimizer(torch.nn.Linear(2, 2).parameters(), TrainConfig(optimizer="lion"), steps=1)


def test_transformer_families_fine_tune_with_the_adamw_equivalent_of_every_recipe(tmp_path, monkeypatch):
    """Every SGD recipe (FT, NAD, NBA's teacher and student, the verdict's reference) runs as its AdamW equivalent on
    a ViT (a tiny ViT fell to chance at the SGD recipes, docs/hf.md) and unchanged on an HF ResNet or a CNN."""
    import nba_core.train as train
    from nba_core.models.hf import build_hf_model, load_hf_model
    from nba_core.module_api import ModuleClassifier
    from nba_core.train import ADAMW_LR_SCALE, TrainConfig, recipe_for, train_classifier

    models = {}
    for name, config in (("vit", TINY_VIT), ("resnet", TINY_RESNET)):
        build_hf_model(check_hf_config(config)).save_pretrained(tmp_path / name)
        models[name] = load_hf_model(tmp_path / name, default_input_size=(8, 8)).module
    nad_like = TrainConfig(lr=0.1, epoch_lrs=(0.1, 0.1, 0.01), weight_decay=5e-4)
    vit = recipe_for(models["vit"], nad_like)
    assert vit.optimizer == "adamw" and vit.weight_decay == 0.05 and vit.momentum == 0.9
    assert vit.lr == pytest.approx(0.1 * ADAMW_LR_SCALE)
    assert vit.epoch_lrs == pytest.approx((0.1 * ADAMW_LR_SCALE, 0.1 * ADAMW_LR_SCALE, 0.01 * ADAMW_LR_SCALE))
    assert recipe_for(models["resnet"], nad_like) == nad_like
    already_adamw = TrainConfig(optimizer="adamw", lr=3e-4)
    assert recipe_for(models["vit"], already_adamw) == already_adamw

    # A user's own module opts in with an attribute; a plain one keeps SGD.
    own = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    plain = ModuleClassifier(own, mean=(0.5,), std=(0.5,), behavior_layers=())
    assert recipe_for(plain, nad_like) == nad_like
    own.adamw_recipe = True
    assert recipe_for(ModuleClassifier(own, mean=(0.5,), std=(0.5,), behavior_layers=()), nad_like).optimizer == "adamw"

    # train_classifier (used by every fine-tuning defense) applies the rule itself.
    seen = []
    real = train.make_optimizer
    monkeypatch.setattr(train, "make_optimizer", lambda params, cfg, *a, **k: seen.append(cfg) or real(params, cfg, *a, **k))
    x, y = torch.rand(8, 1, 8, 8), torch.arange(8) % 10
    for name in ("vit", "resnet"):
        train_classifier(models[name], x, y, TrainConfig(epochs=1, lr=0.1), generator=torch.Generator().manual_seed(0))
    assert [c.optimizer for c in seen] == ["adamw", "sgd"]
