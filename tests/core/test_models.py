"""Every registered architecture builds from a spec, runs on CIFAR- and MNIST-sized input, exposes 4-D behaviour
layers that gradients flow through, and round-trips through save_model / load_model."""

from __future__ import annotations

import pytest
import torch

from nba_core.checkpoint import load_model, save_model
from nba_core.errors import NBAError, SPEC_INVALID, UNKNOWN_ARCHITECTURE
from nba_core.models import REGISTRY, build_model, capture_outputs
from nba_core.spec import ARCHITECTURES, ModelSpec, parse_spec

torch.set_num_threads(1)


def make_spec(arch: str, channels: int = 3, size: int = 32, num_classes: int = 10, **arch_params) -> ModelSpec:
    return parse_spec({"arch": arch, "num_classes": num_classes, "in_channels": channels,
                       "input_size": [size, size], "mean": [0.5] * channels, "std": [0.25] * channels,
                       "arch_params": arch_params})


def test_registry_matches_spec_architectures():
    assert set(REGISTRY) == set(ARCHITECTURES)
    for arch in ARCHITECTURES:
        assert isinstance(REGISTRY[arch].behavior_layers, tuple) and len(REGISTRY[arch].behavior_layers) >= 3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_and_behavior_layers_rgb32(arch: str):
    torch.manual_seed(0)
    model = build_model(make_spec(arch, num_classes=7)).eval()
    x = torch.rand(2, 3, 32, 32)
    with capture_outputs(model, model.behavior_layers) as feats, torch.no_grad():
        out = model(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    assert list(feats) == list(model.behavior_layers)
    sizes = [f.shape[-1] for f in feats.values()]
    for f in feats.values():
        assert f.ndim == 4 and f.shape[0] == 2
    assert sizes == sorted(sizes, reverse=True), "stages are listed from input to output"


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_grey28(arch: str):
    model = build_model(make_spec(arch, channels=1, size=28)).eval()
    with capture_outputs(model, model.behavior_layers) as feats, torch.no_grad():
        out = model(torch.rand(2, 1, 28, 28))
    assert out.shape == (2, 10)
    assert all(f.ndim == 4 and min(f.shape[-2:]) >= 1 for f in feats.values())


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_gradients_flow_through_captured_features(arch: str):
    # Defenses put losses on behaviour-layer outputs in train mode: no in-place op may clobber them.
    torch.manual_seed(0)
    model = build_model(make_spec(arch, size=16)).train()
    with capture_outputs(model, model.behavior_layers) as feats:
        out = model(torch.rand(2, 3, 16, 16))
        loss = out.logsumexp(1).mean() + sum(f.pow(2).mean() for f in feats.values())
    loss.backward()
    first_conv = next(p for n, p in model.named_parameters() if p.ndim == 4)
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_round_trip(arch: str, tmp_path):
    torch.manual_seed(1)
    spec = make_spec(arch, num_classes=5)
    model = build_model(spec).train()
    with torch.no_grad():
        model(torch.rand(4, 3, 32, 32))  # move BatchNorm running stats away from their initial values
    model.eval()
    path = tmp_path / f"{arch}.safetensors"
    save_model(model, path, spec=spec)
    loaded = load_model(path, spec)
    assert not loaded.training
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_parameter_counts_are_the_standard_ones():
    counts = {arch: sum(p.numel() for p in build_model(make_spec(arch)).parameters()) for arch in ARCHITECTURES}
    assert 11.0e6 < counts["preact_resnet18"] < 11.3e6
    assert 0.16e6 < counts["wrn16"] < 0.19e6  # WRN-16-1
    assert 9.1e6 < counts["vgg11_bn"] < 9.4e6
    assert 2.1e6 < counts["mobilenetv2"] < 2.4e6


def test_width_parameters():
    base = build_model(make_spec("wrn16"))
    wide = build_model(make_spec("wrn16", widen_factor=2))
    assert wide.net.fc.in_features == 2 * base.net.fc.in_features == 128
    slim = build_model(make_spec("mobilenetv2", width_mult=0.5))
    assert slim(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("arch,params", [("wrn16", {"widen_factor": "2"}), ("wrn16", {"widen_factor": 0}),
                                         ("mobilenetv2", {"width_mult": -1}), ("vgg11_bn", {"depth": 19})])
def test_bad_arch_params(arch: str, params: dict):
    with pytest.raises(NBAError) as e:
        build_model(make_spec(arch, **params))
    assert e.value.code == SPEC_INVALID


def test_build_model_refuses_unregistered_arch():
    spec = ModelSpec.model_validate({"arch": "resnet1000", "num_classes": 10, "in_channels": 1,
                                     "input_size": [8, 8], "mean": [0.0], "std": [1.0]})
    with pytest.raises(NBAError) as e:
        build_model(spec)
    assert e.value.code == UNKNOWN_ARCHITECTURE
