"""NBA (as reconstructed, NBA.md §3) on a tiny backdoored digits-8×8 model: contract, switches, and that it works."""

from __future__ import annotations

import pytest
import torch

from nba_core.defenses import get_defense
from nba_core.defenses.base import DefenseContext
from nba_core.defenses.behavior import REPRESENTATIONS, behavior_distance
from nba_core.device import seed_everything
from nba_core.errors import INVALID_PARAMS, Cancelled, NBAError
from nba_core.metrics import attack_success_rate, clean_accuracy

from tests.core.digits_backdoor import SPEC, backdoored_digits
FAST = {"teacher_epochs": 3, "student_epochs": 3, "scan_steps": 15}


@pytest.fixture(scope="module")
def setup():
    """small_cnn with a BadNets (2×2 patch, 15 %) backdoor on digits 8×8, a 20 % clean subset, triggered test."""
    return backdoored_digits(rate=0.15)


def _ctx(seed=0, **kw):
    return DefenseContext(spec=SPEC, device=torch.device("cpu"), generator=seed_everything(seed), seed=seed, **kw)


def test_behavior_distances_are_zero_for_identical_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    feats = [torch.rand(4, 3, 8, 8, generator=g), torch.rand(4, 5, 4, 4, generator=g), torch.rand(4, 6, 2, 2, generator=g)]
    other = [f + torch.rand(f.shape, generator=g) for f in feats]
    for kind in REPRESENTATIONS:
        assert float(behavior_distance(kind, feats, feats)) == pytest.approx(0.0, abs=1e-6)
        d = behavior_distance(kind, other, feats)
        assert torch.isfinite(d) and float(d) > 0
    with pytest.raises(ValueError):
        behavior_distance("nope", feats, feats)


def test_contract_keys_input_untouched_progress(setup):
    model, clean, test, trig = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    res = get_defense("nba", FAST).run(model, clean, _ctx(progress=lambda s, f: seen.append((s, f))))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(res.model.state_dict()) == set(model.state_dict())
    assert all(res.model.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())
    assert all(torch.isfinite(v.float()).all() for v in res.model.state_dict().values())
    assert {"teacher", "trigger_search", "distillation"} <= set(res.stage_seconds)
    assert {s for s, _ in seen} >= {"teacher", "trigger_search", "distillation"} and seen[-1][1] == 1.0
    for key in ("verdict", "suspect_classes", "chosen_epoch", "selection"):
        assert key in res.info
    assert 1 <= res.info["chosen_epoch"] <= FAST["student_epochs"]


def test_leaves_the_callers_train_eval_mode_alone(setup):
    model, clean, _, _ = setup
    model.train()
    try:
        get_defense("nba", {**FAST, "teacher_epochs": 1, "student_epochs": 1, "scan_steps": 3}).run(model, clean, _ctx())
        assert model.training
    finally:
        model.eval()


def test_cancel_and_invalid_params(setup):
    model, clean, _, _ = setup
    with pytest.raises(Cancelled):
        get_defense("nba", FAST).run(model, clean, _ctx(should_cancel=lambda: True))
    for bad in ({"pseudo": "magic"}, {"representations": "attention,psychic"}, {"beta": -1.0},
                {"student_epochs": 0}, {"holdout_fraction": 0.95}, {"unknown_knob": 1}, {"beta": "x"},
                {"pseudo": "class_scan+universal", "scan_eps": 0.0}, {"uap_top_k": -1}, {"kd_temperature": 0.0},
                {"suspect_kd": -0.5}):
        with pytest.raises(NBAError) as e:
            get_defense("nba", bad)
        assert e.value.code == INVALID_PARAMS
    with pytest.raises(NBAError) as e:
        get_defense("nba", {**FAST, "layers": "net.nowhere"}).run(model, clean, _ctx())
    assert e.value.code == INVALID_PARAMS


def test_deterministic_per_seed(setup):
    model, clean, _, _ = setup
    a = get_defense("nba", FAST).run(model, clean, _ctx(3)).model.state_dict()
    b = get_defense("nba", FAST).run(model, clean, _ctx(3)).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("switch", [
    {"representations": "attention"}, {"representations": "channel"}, {"representations": "relational"},
    {"representations": "flow"}, {"representations": "attention,channel,relational,flow"},
    {"pseudo": "off"}, {"pseudo": "per_sample", "pseudo_steps": 2}, {"pseudo": "universal", "pseudo_steps": 2},
    {"pseudo": "class_scan", "top_k": 2, "refresh_every": 1, "refresh_steps": 2, "scan_eps": 0.1},
    {"pseudo": "class_scan+universal", "scan_eps": 0.1, "uap_top_k": 2, "uap_steps": 3},
    {"pseudo": "class_scan", "scan_eps": 0.0}, {"pseudo_mix": False}, {"stack_delta": True},
    {"warp_pseudo": False},
    {"kl_weight": 1.0, "gamma": 1.0}, {"beta": 0.0}, {"holdout_fraction": 0.2}, {"suspect_kd": 1.0},
])
def test_every_ablation_switch_runs(setup, switch):
    model, clean, test, _ = setup
    params = {**FAST, "teacher_epochs": 1, "student_epochs": 2, "scan_steps": 5, **switch}
    res = get_defense("nba", params).run(model, clean, _ctx())
    assert all(torch.isfinite(v.float()).all() for v in res.model.state_dict().values())
    assert clean_accuracy(res.model, test.x, test.y) > 0.3


def test_suspect_kd_keeps_the_student_close_to_the_suspect_on_clean_inputs(setup):
    model, clean, test, _ = setup
    params = {**FAST, "pseudo": "off", "beta": 0.0, "suspect_kd": 0.0}

    x = torch.as_tensor(test.x)

    def kl_to_suspect(student):
        with torch.no_grad():
            return float(torch.nn.functional.kl_div(student(x).log_softmax(1), model(x).log_softmax(1),
                                                    log_target=True, reduction="batchmean"))

    free = kl_to_suspect(get_defense("nba", params).run(model, clean, _ctx()).model)
    anchored = kl_to_suspect(get_defense("nba", {**params, "suspect_kd": 1.0}).run(model, clean, _ctx()).model)
    assert anchored < 0.7 * free


def test_reduces_asr_and_keeps_accuracy(setup):
    model, clean, test, trig = setup
    asr0 = attack_success_rate(model, trig.x, trig.y, 0)
    ca0 = clean_accuracy(model, test.x, test.y)
    res = get_defense("nba", {}).run(model, clean, _ctx())
    # Without a verdict NBA falls back on its own scan, whose ranking on 8×8 digits depends on the CPU's float
    # rounding (this model: [8] first at seed 0 on an AMD EPYC, [0] on the earlier machine) while the removal holds
    # either way; which class a scan flags is tested on the verdict (test_verdict.py), which jobs hand NBA.
    assert res.info["suspect_classes"]
    asr = attack_success_rate(res.model, trig.x, trig.y, 0)
    ca = clean_accuracy(res.model, test.x, test.y)
    assert asr0 > 0.9 and asr < 0.5 * asr0
    assert ca > ca0 - 0.15


def _label_shift_scan_and_verdict(k=4):
    """A 4-class scan whose verdict flags two label-shift pairs (0→1, 2→3) and no all-to-one target."""
    from nba_core.verdict import ModelScan, Verdict

    scan = ModelScan(patch_l1=[5.0] * k, shift_l1=3.0, source_lands=[1, 2, 3, 0], source_land_share=[0.9] * k,
                     global_success=[0.1] * k, masks=torch.rand(k + 1, 1, 8, 8), patterns=torch.rand(k + 1, 1, 8, 8),
                     deltas=torch.rand(k, 1, 8, 8))
    scores = {"patch": [0.1, 0.4, 0.2, 0.3], "global": [0.5, 0.2, 0.9, 0.1], "shift": [0.0] * k}
    return scan, Verdict(status="suspected", targets=[], pairs=[[0, 1], [2, 3]], score=2.0, scores=scores)


def test_label_shift_suspects_add_every_landing_class_only_when_asked():
    from nba_core.defenses.nba import Suspects

    scan, verdict = _label_shift_scan_and_verdict()
    plain = Suspects.from_verdict(verdict, scan)
    assert plain.classes == [-1] and plain.delta_classes == [2]  # the shift trigger and the top global class
    both = Suspects.from_verdict(verdict, scan, pair_patches=True)
    assert both.classes == [1, 3, -1]  # each pair's landing class gets its patch trigger, then the shift trigger
    assert torch.equal(both.masks[0], scan.masks[1]) and torch.equal(both.masks[2], scan.masks[4])
    assert both.delta_classes == [2, 1, 3] and torch.equal(both.deltas[1], scan.deltas[1])
    no_delta = Suspects.from_verdict(verdict, scan, uap_top_k=0, pair_patches=True)
    assert no_delta.delta_classes == []  # pseudo="class_scan" switches the δ off, landing classes included


def test_warp_flagged_targets_hand_nba_their_universal_warps():
    from nba_core.defenses.nba import Suspects
    from nba_core.verdict import ModelScan, Verdict

    k = 4
    scan = ModelScan(patch_l1=[5.0] * k, shift_l1=9.0, source_lands=[1, 2, 3, 0], source_land_share=[0.1] * k,
                     global_success=[0.1] * k, masks=torch.rand(k + 1, 1, 8, 8), patterns=torch.rand(k + 1, 1, 8, 8),
                     deltas=torch.rand(k, 1, 8, 8), warp_success=[0.0, 0.0, 1.0, 0.0], warps=torch.randn(k, 2, 5, 5),
                     warp_pixels=1.0)
    scores = {"patch": [0.1, 0.9, 0.2, 0.3], "global": [0.1] * k, "shift": [0.0], "warp": [0.0, 0.1, 2.5, 0.2]}
    s = Suspects.from_verdict(Verdict("suspected", [2], [], 2.5, scores), scan)
    assert s.classes == [2] and s.warp_classes == (2,) and torch.equal(s.warps[0], scan.warps[2]) and s.warp_pixels == 1.0
    # A target flagged by another family, or a verdict from before the warp rows, brings no warp.
    patch_only = {**scores, "patch": [0.1, 1.5, 0.2, 0.3], "warp": [0.0] * k}
    assert Suspects.from_verdict(Verdict("suspected", [1], [], 1.5, patch_only), scan).warp_classes == ()
    old = {f: v for f, v in scores.items() if f != "warp"}
    assert Suspects.from_verdict(Verdict("suspected", [2], [], 2.5, old), scan).warps is None


def test_a_small_clean_set_gets_more_student_epochs_unless_the_user_set_them(setup):
    """The defaults were validated at 4,000 images seen (20 epochs on 200); 50 images get 80 epochs."""
    import numpy as np

    model, clean, _, _ = setup
    small = clean.subset(np.arange(50))
    fast = {"teacher_epochs": 1, "scan_steps": 3, "uap_steps": 2}
    res = get_defense("nba", {**fast, "min_student_images": 200}).run(model, small, _ctx())
    assert res.info["student_epochs"] == 20  # max(20, 200 / 50)
    res = get_defense("nba", {**fast, "min_student_images": 2000}).run(model, small, _ctx())
    assert res.info["student_epochs"] == 40 and res.info["chosen_epoch"] == 40
    assert get_defense("nba", {"student_epochs": 2}).config.min_student_images == 0
    assert get_defense("nba").config.min_student_images == 4000


def _handed_verdict(status: str, k: int = 10):
    """A scan of 8×8 digits and a verdict on it as the pipeline hands them over (class 3 most suspicious)."""
    from nba_core.verdict import ModelScan, Verdict

    g = torch.Generator().manual_seed(0)
    scan = ModelScan(patch_l1=[5.0] * k, shift_l1=9.0, source_lands=list(range(1, k)) + [0],
                     source_land_share=[0.1] * k, global_success=[0.1] * k,
                     masks=torch.rand(k + 1, 1, 8, 8, generator=g) * 0.2, patterns=torch.rand(k + 1, 1, 8, 8, generator=g),
                     deltas=torch.rand(k, 1, 8, 8, generator=g) * 0.1)
    scores = {"patch": [0.9 if c == 3 else 0.1 for c in range(k)], "global": [0.2] * k, "shift": [0.0]}
    targets = [3] if status == "suspected" else []
    return Verdict(status, targets, [], 1.5 if targets else 0.5, scores), scan


def test_a_not_suspected_verdict_scales_the_pseudo_samples_by_unflagged_pseudo_weight(setup):
    model, clean, _, _ = setup
    fast = {"teacher_epochs": 1, "student_epochs": 2}

    def weights(status, **params):
        res = get_defense("nba", {**fast, **params}).run(model, clean, _ctx(verdict=_handed_verdict(status)))
        return res.info, res.model.state_dict()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    info_off, off = weights("not_suspected", unflagged_pseudo_weight=0.0)
    assert info_off["pseudo_weight"] == 0.0
    assert same(off, weights("not_suspected", pseudo="off")[1])  # factor 0: exactly no pseudo samples
    info_full, full = weights("not_suspected")  # the default: factor 1, the insurance
    assert info_full["pseudo_weight"] == 1.0 and info_full["suspect_classes"] == [3] and not same(full, off)
    # A verdict that flags something (or is inconclusive) always gets the full unlearning, whatever the factor.
    assert same(weights("suspected")[1], weights("suspected", unflagged_pseudo_weight=0.0)[1])
    assert weights("inconclusive")[0].get("pseudo_weight") is None
