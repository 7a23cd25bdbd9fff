"""The batched trigger scan on a tiny, strongly backdoored digits-8×8 model (the verdict is tested in test_verdict.py)."""

from __future__ import annotations

import pytest
import torch

from nba_core.attacks.badnets import BadNets
from nba_core.data.builtin import train_test
from nba_core.device import seed_everything
from nba_core.errors import INVALID_PARAMS, Cancelled, NBAError
from nba_core.models import build_model
from nba_core.spec import ModelSpec
from nba_core.train import TrainConfig, train_classifier
from nba_core.attacks.blended import Blended
from nba_core.attacks.wanet import WaNet
from nba_core.triggerscan import (anomaly_indices, apply_trigger, apply_warp, scan_universal_perturbations,
                                  scan_universal_triggers, scan_universal_warps)

SPEC = ModelSpec(arch="small_cnn", num_classes=10, in_channels=1, input_size=(8, 8), mean=(0.3,), std=(0.4,))
TARGET = 3


def _train(poison_rate: float, seed: int = 0):
    train, test = train_test("digits")
    attack = BadNets(target=TARGET, rate=poison_rate, seed=seed)
    data = attack.poison(train)[0] if poison_rate > 0 else train
    gen = seed_everything(seed)
    model = build_model(SPEC)
    train_classifier(model, torch.as_tensor(data.x), torch.as_tensor(data.y),
                     TrainConfig(epochs=12, lr=0.05, batch_size=64), generator=gen)
    model.eval()
    return model, test, attack


@pytest.fixture(scope="module")
def backdoored():
    """A robust setup: 15 % poisoning of the 2×2 corner patch (a strong, easily found backdoor)."""
    model, test, attack = _train(0.15)
    trig = attack.triggered_test_set(test)
    pred = model(torch.as_tensor(trig.x)).argmax(1)
    assert float((pred == TARGET).float().mean()) > 0.95  # the fixture really is backdoored
    return model, test


def test_apply_trigger_blends_and_broadcasts():
    x = torch.zeros(4, 3, 5, 5)
    mask = torch.zeros(1, 5, 5)
    mask[0, 1, 2] = 1.0
    mask[0, 0, 0] = 0.5
    pattern = torch.ones(3, 5, 5)
    out = apply_trigger(x, mask, pattern)
    assert out.shape == x.shape
    assert torch.all(out[:, :, 1, 2] == 1) and torch.all(out[:, :, 0, 0] == 0.5)
    assert float(out.sum()) == pytest.approx(4 * 3 * 1.5)


def test_anomaly_index_flags_a_low_outlier_only():
    scores = anomaly_indices([100.0, 105.0, 95.0, 98.0, 102.0, 10.0])
    assert scores[-1] > 2
    assert all(s < 2 for s in scores[:-1].tolist())
    assert float(anomaly_indices([5.0] * 4).abs().max()) < 1e-6  # equal norms: nothing anomalous, finite


def test_scan_finds_the_target_class(backdoored):
    model, test = backdoored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = None
    res = scan_universal_triggers(model, test.x, test.y, num_classes=10, generator=torch.Generator().manual_seed(0))
    assert res.masks.shape == (10, 1, 8, 8) and res.patterns.shape == (10, 1, 8, 8)
    assert float(res.masks.min()) >= 0 and float(res.masks.max()) <= 1
    assert float(res.patterns.min()) >= 0 and float(res.patterns.max()) <= 1
    assert len(res.mask_l1) == len(res.success_rate) == len(res.anomaly_indices) == 10
    assert res.ranking()[0] == TARGET
    assert TARGET in res.flagged and res.anomaly_index > 2
    assert res.success_rate[TARGET] > 0.8
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # model untouched
    assert all(p.grad is None for p in model.parameters())


def test_scan_is_deterministic(backdoored):
    model, test = backdoored
    kw = dict(num_classes=10, steps=10, batch_size=6)
    a = scan_universal_triggers(model, test.x, test.y, generator=torch.Generator().manual_seed(5), **kw)
    b = scan_universal_triggers(model, test.x, test.y, generator=torch.Generator().manual_seed(5), **kw)
    assert torch.equal(a.masks, b.masks) and torch.equal(a.patterns, b.patterns)
    assert a.mask_l1 == b.mask_l1 and a.success_rate == b.success_rate


def test_scan_rejects_bad_params_and_honours_cancel(backdoored):
    model, test = backdoored
    g = torch.Generator().manual_seed(0)
    with pytest.raises(NBAError) as e:
        scan_universal_triggers(model, test.x, test.y, num_classes=10, steps=0, generator=g)
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(Cancelled):
        scan_universal_triggers(model, test.x, test.y, num_classes=10, generator=g, should_cancel=lambda: True)


def _trained_on(attack):
    """A digits model trained on `attack`'s poisoned set, checked to carry the backdoor (> 90 % of triggered test
    images to TARGET); returns (model, clean test set)."""
    train, test = train_test("digits")
    poisoned = attack.poison(train)[0]
    gen = seed_everything(0)
    model = build_model(SPEC)
    train_classifier(model, torch.as_tensor(poisoned.x), torch.as_tensor(poisoned.y),
                     TrainConfig(epochs=12, lr=0.05, batch_size=64), generator=gen)
    model.eval()
    trig = attack.triggered_test_set(test)
    assert float((model(torch.as_tensor(trig.x)).argmax(1) == TARGET).float().mean()) > 0.9
    return model, test


@pytest.fixture(scope="module")
def blended():
    """An image-wide (blend) backdoor: the kind of trigger the mask scan does not model."""
    return _trained_on(Blended(target=TARGET, rate=0.15, seed=0, alpha=0.2))


def test_perturbation_scan_ranks_the_blend_target_first_within_eps(blended):
    model, test = blended
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = scan_universal_perturbations(model, test.x[:300], test.y[:300], num_classes=10, eps=0.15,
                                     generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    assert r.deltas.shape == (10, 1, 8, 8) and float(r.deltas.abs().max()) <= 0.15 + 1e-6
    assert r.ranking()[0] == TARGET
    others = [v for k, v in enumerate(r.success_rate) if k != TARGET]
    assert r.success_rate[TARGET] > max(others)
    again = scan_universal_perturbations(model, test.x[:300], test.y[:300], num_classes=10, eps=0.15,
                                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(r.deltas, again.deltas)


def test_perturbation_scan_rejects_bad_params_and_honours_cancel(blended):
    model, test = blended
    g = torch.Generator().manual_seed(0)
    for bad in ({"eps": 0.0}, {"steps": 0}, {"batch_size": 0}):
        with pytest.raises(NBAError) as e:
            scan_universal_perturbations(model, test.x[:50], test.y[:50], num_classes=10, generator=g, **bad)
        assert e.value.code == INVALID_PARAMS
    with pytest.raises(Cancelled):
        scan_universal_perturbations(model, test.x[:50], test.y[:50], num_classes=10, generator=g,
                                     should_cancel=lambda: True)


def test_scans_leave_the_model_mode_and_batchnorm_statistics_as_they_found_them(backdoored):
    model, test = backdoored
    x, y = torch.as_tensor(test.x[:60]), torch.as_tensor(test.y[:60])
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert stats  # the model has BatchNorm, so a scan in train mode would move these
    for mode in (True, False):
        model.train(mode)
        scan_universal_triggers(model, x, y, num_classes=10, steps=3, generator=seed_everything(0))
        scan_universal_perturbations(model, x, y, num_classes=10, steps=2, generator=seed_everything(0))
        assert model.training is mode
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in stats.items())
    model.train(True)
    with pytest.raises(Cancelled):  # restored on the way out of an exception too
        scan_universal_triggers(model, x, y, num_classes=10, steps=3, generator=seed_everything(0),
                                should_cancel=lambda: True)
    assert model.training
    model.eval()


@pytest.fixture(scope="module")
def warped():
    """A warping (WaNet) backdoor: neither a mask nor an additive δ expresses it."""
    return _trained_on(WaNet(target=TARGET, rate=0.15, seed=0, strength=1.0))


def test_apply_warp_is_the_identity_at_zero_and_moves_at_most_max_shift_pixels():
    ramp = torch.arange(16.0).repeat(16, 1)[None, None] / 15  # brightness = column / 15
    assert torch.allclose(apply_warp(ramp, torch.zeros(1, 2, 5, 5), 1.0), ramp, atol=1e-6)
    # A diverged model's NaN gradient must not reach grid_sample (a NaN coordinate crashed its backward).
    assert torch.allclose(apply_warp(ramp, torch.full((1, 2, 5, 5), float("nan")), 1.0), ramp, atol=1e-6)
    wild = torch.full((1, 2, 5, 5), 50.0)  # tanh saturates: the largest shift allowed, to the right and down
    moved = apply_warp(ramp, wild, 0.7)
    shift_px = (moved - ramp)[..., 2:-2, 2:-2] * 15  # away from the clamped border
    assert torch.allclose(shift_px, torch.full_like(shift_px, 0.7), atol=1e-3)


def test_warp_scan_finds_the_warping_backdoor_target(warped):
    model, test = warped
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kw = dict(num_classes=10, max_shift=0.5, generator=torch.Generator().manual_seed(0))
    r = scan_universal_warps(model, test.x[:300], test.y[:300], **kw)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training
    assert r.controls.shape == (10, 2, 5, 5) and r.max_shift == 0.5
    others = [v for k, v in enumerate(r.success_rate) if k != TARGET]
    assert r.success_rate[TARGET] > 0.7 and max(others) < 0.4
    again = scan_universal_warps(model, test.x[:300], test.y[:300], **{**kw, "generator": torch.Generator().manual_seed(0)})
    assert torch.equal(r.controls, again.controls)


def test_warp_scan_rejects_bad_params_and_honours_cancel(warped):
    model, test = warped
    g = torch.Generator().manual_seed(0)
    for bad in ({"max_shift": 0.0}, {"steps": 0}, {"batch_size": 0}, {"grid": 1}):
        with pytest.raises(NBAError) as e:
            scan_universal_warps(model, test.x[:50], test.y[:50], num_classes=10, generator=g, **bad)
        assert e.value.code == INVALID_PARAMS
    with pytest.raises(Cancelled):
        scan_universal_warps(model, test.x[:50], test.y[:50], num_classes=10, generator=g,
                             should_cancel=lambda: True)
