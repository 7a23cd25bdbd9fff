"""Behaviour of the six backdoor attacks on tiny data: triggers, poisoning bookkeeping, prepare()."""

from __future__ import annotations

import numpy as np
import pytest

from nba_core.attacks import ATTACKS, get_attack
from nba_core.attacks.label_consistent import LabelConsistent
from nba_core.attacks.sig import SIG
from nba_core.attacks.trojan import Trojan
from nba_core.attacks.wanet import WaNet
from nba_core.data.builtin import load_digits8, make_shapes32
from nba_core.data.imageset import ImageSet
from nba_core.device import seed_everything
from nba_core.errors import ATTACK_NOT_PREPARED, INVALID_PARAMS, NBAError
from nba_core.models import build_model
from nba_core.spec import ModelSpec
from nba_core.train import predict

ALL = ["badnets", "blended", "trojan", "sig", "cl", "wanet"]
DIRTY = ["badnets", "blended", "trojan", "wanet"]
CLEAN_LABEL = ["sig", "cl"]


@pytest.fixture(scope="module")
def digits() -> ImageSet:
    data = load_digits8()
    return data.subset(np.arange(600))  # 8×8 grey, ~60 per class


@pytest.fixture(scope="module")
def shapes() -> ImageSet:
    return make_shapes32(per_class=12, seed=5)  # 32×32 colour, 120 images


@pytest.fixture(scope="module")
def mnist_like() -> ImageSet:
    """28×28 grey images (digits upsampled), so sizes between 8 and 32 are covered."""
    d = load_digits8().subset(np.arange(100))
    x = np.kron(d.x, np.ones((1, 1, 3, 3), np.float32))  # 24×24
    x = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    return ImageSet(x, d.y)


def _factory(data: ImageSet):
    c, h, w = data.shape
    spec = ModelSpec(arch="small_cnn", num_classes=10, in_channels=c, input_size=(h, w), mean=(0.5,) * c, std=(0.3,) * c)
    return lambda: build_model(spec)


def _prepared(name: str, data: ImageSet, **params):
    """An attack ready to apply(): model-based attacks get a 1-epoch reference model on `data`."""
    attack = get_attack(name, seed=3, **params)
    if attack.needs_model:
        seed_everything(0)
        attack.prepare(data, model_factory=_factory(data), device="cpu")
    else:
        attack.prepare(data)
    return attack


@pytest.fixture(scope="module")
def prepared(digits, shapes, mnist_like):
    """(attack name, dataset key) -> prepared attack, built once per module (prepare trains a model)."""
    sets = {"digits": digits, "shapes": shapes, "mnist_like": mnist_like}
    cache: dict = {}

    def get(name: str, key: str):
        if (name, key) not in cache:
            cache[(name, key)] = _prepared(name, sets[key], reference_epochs=1) if name in ("trojan", "cl") \
                else _prepared(name, sets[key])
        return cache[(name, key)], sets[key]

    return get


def test_registry_has_the_six_attacks():
    assert set(ATTACKS) == set(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("key", ["digits", "mnist_like", "shapes"])
def test_apply_is_deterministic_in_range_and_changes_images(prepared, name, key):
    attack, data = prepared(name, key)
    x = data.x[:40]
    before = x.copy()
    out1, out2 = attack.apply(x), attack.apply(x)
    np.testing.assert_array_equal(x, before)  # input untouched
    np.testing.assert_array_equal(out1, out2)
    assert out1.shape == x.shape and out1.dtype == np.float32
    assert out1.min() >= 0.0 and out1.max() <= 1.0
    changed = np.abs(out1 - x).reshape(len(x), -1).max(axis=1) > 1e-4
    assert changed.mean() > 0.9  # (nearly) every image carries the trigger


@pytest.mark.parametrize("name", ["badnets", "blended", "sig", "wanet"])
def test_same_seed_same_trigger_other_seed_differs_for_random_triggers(digits, name):
    x = digits.x[:20]
    a, b = get_attack(name, seed=1).apply(x), get_attack(name, seed=1).apply(x)
    np.testing.assert_array_equal(a, b)
    if name in ("blended", "wanet"):
        assert not np.allclose(a, get_attack(name, seed=2).apply(x))


@pytest.mark.parametrize("name", DIRTY)
def test_dirty_label_poison_relabels_rate_share_of_non_target_images(prepared, name):
    attack, data = prepared(name, "digits")
    poisoned, idx = attack.poison(data)
    assert len(poisoned) == len(data)
    assert len(idx) == int(round(attack.rate * len(data)))
    assert len(np.unique(idx)) == len(idx)
    assert (data.y[idx] != attack.target).all()
    assert (poisoned.y[idx] == attack.target).all()
    rest = np.setdiff1d(np.arange(len(data)), idx)
    np.testing.assert_array_equal(poisoned.y[rest], data.y[rest])
    np.testing.assert_allclose(poisoned.x[idx], attack.apply(data.x[idx]))
    untouched = np.setdiff1d(rest, getattr(attack, "noise_idx", np.empty(0, np.int64)))
    np.testing.assert_array_equal(poisoned.x[untouched], data.x[untouched])
    # deterministic for a seed
    again, idx2 = attack.poison(data)
    np.testing.assert_array_equal(idx, idx2)
    np.testing.assert_array_equal(poisoned.x, again.x)


def test_wanet_noise_mode_keeps_labels_and_differs_from_the_trigger(digits):
    attack = WaNet(seed=0, rate=0.1, cross_ratio=2.0)
    poisoned, idx = attack.poison(digits)
    noise = attack.noise_idx
    assert len(noise) == int(round(0.2 * len(digits)))
    assert len(np.intersect1d(noise, idx)) == 0
    np.testing.assert_array_equal(poisoned.y[noise], digits.y[noise])
    assert not np.allclose(poisoned.x[noise], digits.x[noise])
    assert not np.allclose(poisoned.x[noise], attack.apply(digits.x[noise]))  # random warps, not the trigger


@pytest.mark.parametrize("name", CLEAN_LABEL)
@pytest.mark.parametrize("rate", [0.05, 0.5])
def test_clean_label_poison_touches_only_target_images_and_keeps_labels(prepared, name, rate):
    attack, data = prepared(name, "digits")
    attack.rate = rate
    try:
        poisoned, idx = attack.poison(data)
    finally:
        attack.rate = 0.1
    n_target = int((data.y == attack.target).sum())
    cap = int(round(attack.max_class_fraction * n_target))
    assert len(idx) == min(cap, int(round(rate * len(data))))
    assert (data.y[idx] == attack.target).all()
    np.testing.assert_array_equal(poisoned.y, data.y)
    changed = np.flatnonzero(np.abs(poisoned.x - data.x).reshape(len(data), -1).max(axis=1) > 0)
    assert set(changed) <= set(idx)
    assert len(changed) >= 0.9 * len(idx)


@pytest.mark.parametrize("name", ALL)
def test_triggered_test_set_excludes_target_and_keeps_true_labels(prepared, name):
    attack, data = prepared(name, "digits")
    trig = attack.triggered_test_set(data)
    keep = data.y != attack.target
    assert len(trig) == int(keep.sum())
    assert (trig.y != attack.target).all()
    np.testing.assert_array_equal(trig.y, data.y[keep])
    np.testing.assert_array_equal(trig.x, attack.apply(data.x[keep]))


def test_blended_is_an_alpha_blend_of_a_fixed_pattern(digits):
    attack = get_attack("blended", alpha=0.2, seed=4)
    x = digits.x[:5]
    pattern = attack.pattern(x.shape[1:])
    np.testing.assert_allclose(attack.apply(x), 0.8 * x + 0.2 * pattern, atol=1e-6)
    with pytest.raises(NBAError) as e:
        get_attack("blended", alpha=1.5)
    assert e.value.code == INVALID_PARAMS


def test_sig_adds_a_horizontal_sinusoid_stronger_at_test_time(digits):
    attack = SIG(target=0, rate=1.0, delta=20 / 255, test_delta=60 / 255, frequency=6)
    blank = np.full((1, 1, 8, 8), 0.5, np.float32)
    poisoned, idx = attack.poison(ImageSet(blank, np.zeros(1, np.int64)))
    assert list(idx) == [0]
    train_signal = poisoned.x - blank
    test_signal = attack.apply(blank) - blank
    j = np.arange(8)
    np.testing.assert_allclose(train_signal[0, 0, 3], 20 / 255 * np.sin(2 * np.pi * j * 6 / 8), atol=1e-6)
    np.testing.assert_allclose(test_signal, 3 * train_signal, atol=1e-6)
    assert np.allclose(test_signal[0, 0], test_signal[0, 0, :1])  # same on every row


def test_trojan_needs_prepare_and_a_model_factory(digits):
    attack = Trojan()
    with pytest.raises(NBAError) as e:
        attack.apply(digits.x[:2])
    assert e.value.code == ATTACK_NOT_PREPARED
    with pytest.raises(NBAError) as e:
        attack.prepare(digits)
    assert e.value.code == INVALID_PARAMS


def test_trojan_prepare_optimises_a_pattern_that_excites_the_chosen_neurons(prepared):
    attack, data = prepared("trojan", "digits")
    assert attack.pattern is not None and attack.pattern.shape == (1, 2, 2)
    assert len(attack.neurons) == attack.n_neurons
    start, end = attack.excitement
    assert end > start
    assert attack.describe()["patch_size"] == 2
    # Re-preparing from the same seed gives the same trigger.
    again = _prepared("trojan", data, reference_epochs=1)
    np.testing.assert_allclose(again.pattern, attack.pattern, atol=1e-5)


def test_cl_needs_prepare_and_perturbs_within_budget_against_the_reference(prepared):
    with pytest.raises(NBAError) as e:
        LabelConsistent().poison(load_digits8().subset(np.arange(50)))
    assert e.value.code == ATTACK_NOT_PREPARED
    attack, data = prepared("cl", "digits")
    x0, y0 = data.x[data.y == 0], data.y[data.y == 0]
    norm, eps = attack.threat(data.shape)
    assert norm == "l2" and attack.threat((3, 32, 32)) == ("linf", 16 / 255)
    adv = attack.perturb(x0, y0)
    assert np.linalg.norm((adv - x0).reshape(len(x0), -1), axis=1).max() <= eps + 1e-4
    assert adv.min() >= 0.0 and adv.max() <= 1.0
    np.testing.assert_array_equal(adv, attack.perturb(x0, y0))  # deterministic
    linf = LabelConsistent(norm="linf", eps=0.1)
    linf.reference = attack.reference
    assert np.abs(linf.perturb(x0, y0) - x0).max() <= 0.1 + 1e-5
    # The perturbation hides the target images' own features from the reference model.
    acc_clean = float((predict(attack.reference, x0).numpy() == 0).mean())
    acc_adv = float((predict(attack.reference, adv).numpy() == 0).mean())
    assert acc_adv < acc_clean - 0.3


def test_cl_trigger_is_a_corner_patch_only(digits):
    attack = LabelConsistent(size=3, margin=1, four_corners=True)
    blank = np.full((1, 3, 32, 32), 0.5, np.float32)
    diff = np.abs(attack.apply(blank) - blank)[0, 0] > 0
    assert diff[1:4, 1:4].any() and diff[-4:-1, -4:-1].any() and diff[1:4, -4:-1].any() and diff[-4:-1, 1:4].any()
    assert not diff[5:-5, 5:-5].any()


def test_unknown_attack_parameters_are_invalid_params():
    with pytest.raises(NBAError) as e:
        get_attack("sig", nonsense=1)
    assert e.value.code == INVALID_PARAMS
    with pytest.raises(NBAError) as e:
        get_attack("wanet", k=1)
    assert e.value.code == INVALID_PARAMS



def test_all_to_all_and_two_target_poisoning():
    import numpy as np

    from nba_core.attacks import AllToAll, MultiTarget, get_attack
    from nba_core.data.imageset import ImageSet

    rng = np.random.default_rng(0)
    train = ImageSet(rng.random((200, 1, 8, 8), dtype=np.float32), np.repeat(np.arange(10), 20))
    a2a = get_attack("badnets", all_to_all=True, num_classes=10, rate=0.2, seed=0)
    assert isinstance(a2a, AllToAll) and a2a.pairs()[9] == [9, 0]
    poisoned, idx = a2a.poison(train)
    assert len(idx) == 40 and (poisoned.y[idx] == (train.y[idx] + 1) % 10).all()
    assert (poisoned.x[idx][..., -2, -2] == 1.0).all()
    with pytest.raises(NBAError):
        get_attack("sig", all_to_all=True, num_classes=10)
    two = MultiTarget([get_attack("badnets", target=0, rate=0.05, seed=0),
                       get_attack("badnets", target=5, rate=0.05, seed=1, corner="top_left")])
    poisoned, idx = two.poison(train)
    assert len(idx) == 20 and set(poisoned.y[idx]) == {0, 5} and two.targets == [0, 5]
    top_left = poisoned.y[idx] == 5
    assert (poisoned.x[idx][top_left][..., 1, 1] == 1.0).all()
