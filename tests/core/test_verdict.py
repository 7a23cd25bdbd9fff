"""The trigger-free verdict: judging a scan against its benign reference, and the shared scan itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nba_core.pipeline import wilson_interval
from nba_core.verdict import (INCONCLUSIVE, NOT_SUSPECTED, SUSPECTED, ModelScan, compare, data_problem, headline,
                              judge, scan_model)

K = 10
NATURAL = [60.0, 80.0, 25.0, 50.0, 55.0, 45.0, 60.0, 50.0, 28.0, 40.0]  # classes 2 and 8 naturally easy


def _scan(patch=None, shift=40.0, lands=None, share=None, glob=None, warp=None) -> ModelScan:
    return ModelScan(patch_l1=list(patch or NATURAL), shift_l1=shift,
                     source_lands=list(lands or [(s + 5) % K for s in range(K)]),
                     source_land_share=list(share or [0.4] * K), global_success=list(glob or [0.05] * K),
                     masks=torch.zeros(K + 1, 1, 4, 4), patterns=torch.zeros(K + 1, 1, 4, 4),
                     deltas=torch.zeros(K, 1, 4, 4), warp_success=list(warp or [0.03] * K))


def test_naturally_easy_classes_are_not_targets_when_the_reference_shares_them():
    ref = _scan()
    benign = _scan(patch=[v * f for v, f in zip(NATURAL, [1.1, 0.9, 1.2, 1.0, 0.8, 1.1, 1.0, 0.95, 0.9, 1.05])])
    v = judge(benign, ref)
    assert v.status == NOT_SUSPECTED and v.targets == [] and v.pairs == []
    # A model uniformly harder or easier than its reference is not backdoored either.
    assert judge(_scan(patch=[2 * v for v in NATURAL]), ref).status == NOT_SUSPECTED


def test_patch_target_two_targets_and_the_same_classes_after():
    ref = _scan()
    before = judge(_scan(patch=[6.0] + NATURAL[1:5] + [5.0] + NATURAL[6:]), ref)
    assert before.status == SUSPECTED and sorted(before.targets) == [0, 5]
    after = judge(_scan(patch=[55.0] + NATURAL[1:]), ref)
    assert after.status == NOT_SUSPECTED
    change = compare(before.to_dict(), after.to_dict())
    assert [row["class"] for row in change["classes"]] == [0, 5]
    assert change["summary"] == "the backdoor evidence found before is gone"
    assert "SUSPECTED" in headline(before.to_dict(), "before") and "[0, 5]" in headline(before.to_dict(), "before")


def test_label_shift_pairs_come_from_the_shift_trigger_mapping():
    ref = _scan()
    a2a = _scan(shift=2.0, lands=[(s + 1) % K for s in range(K)], share=[0.9] * K)
    v = judge(a2a, ref)
    assert v.status == SUSPECTED and v.targets == []
    assert v.pairs == [[s, (s + 1) % K] for s in range(K)]
    # The same small shift trigger sending everything to one class is an all-to-one target, not ten pairs.
    one = judge(_scan(shift=2.0, lands=[3] * K, share=[0.9] * K), ref)
    assert one.targets == [3] and one.pairs == []


def test_global_trigger_and_inconclusive_band():
    ref = _scan()
    v = judge(_scan(glob=[0.05] * 7 + [0.97] + [0.05] * 2), ref)
    assert v.status == SUSPECTED and v.targets == [7]
    near = judge(_scan(patch=[NATURAL[0] / 2.4] + NATURAL[1:]), ref)  # log(2.4) = 0.88 of the threshold
    assert near.status == INCONCLUSIVE and near.targets == []
    assert judge(_scan(), ref, too_little_data="too few").status == INCONCLUSIVE
    assert data_problem(np.array([0, 0, 1]), 3) is not None and data_problem(np.repeat(np.arange(3), 10), 3) is None
    # Every class present but 5 per class (50 images for 10 classes): too few for a reference to lose a backdoor.
    few = data_problem(np.repeat(np.arange(10), 5), 10)
    assert few is not None and "at least 100" in few and data_problem(np.repeat(np.arange(10), 10), 10) is None


def test_a_warp_that_reaches_one_class_far_more_than_on_the_reference_flags_it():
    ref = _scan(warp=[0.0, 0.1, 0.02, 0.0, 0.05, 0.04, 0.0, 0.07, 0.1, 0.0])
    v = judge(_scan(warp=[0.98] + [0.02] * (K - 1)), ref)
    assert v.status == SUSPECTED and v.targets == [0] and v.scores["warp"][0] >= 1
    assert max(v.scores["warp"][1:]) < 0.8
    # Warps that reach every class a little more than on the reference (a less robust model) flag nothing.
    assert judge(_scan(warp=[0.3] * K), ref).status == NOT_SUSPECTED
    # Before and after compare the warp rows of the same classes; the cap applies to them too.
    after = judge(_scan(warp=[0.02] * K), ref, before=v)
    change = compare(v.to_dict(), after.to_dict())
    assert after.status == NOT_SUSPECTED and change["classes"][0]["warp_before"] >= 1 > change["classes"][0]["warp_after"]


def test_after_a_defense_a_class_counts_only_as_much_as_it_did_before():
    """A defense trains on clean data: a class that got easier to reach (damage) is not a new backdoor, while a
    target flagged before that still stands out after is still suspected."""
    ref = _scan()
    before = judge(_scan(patch=[6.0] + NATURAL[1:]), ref)
    assert before.status == SUSPECTED and before.targets == [0]
    damaged = _scan(patch=[55.0, 80.0, 25.0 / 3] + NATURAL[3:])  # target gone, class 2 three times easier
    assert judge(damaged, ref).targets == [2]  # without the before-verdict: a false alarm on class 2
    v = judge(damaged, ref, before=before)
    assert v.status == NOT_SUSPECTED and v.targets == []
    assert any("class 2" in r and "not counted" in r for r in v.reasons)
    survived = judge(_scan(patch=[10.0] + NATURAL[1:]), ref, before=before)
    assert survived.status == SUSPECTED and survived.targets == [0]
    assert survived.scores["patch"][0] == pytest.approx(judge(_scan(patch=[10.0] + NATURAL[1:]), ref).scores["patch"][0])


def test_wilson_interval():
    lo, hi = wilson_interval(9, 10)
    assert lo == pytest.approx(0.596, abs=1e-3) and hi == pytest.approx(0.982, abs=1e-3)
    assert wilson_interval(0, 0) is None and wilson_interval(0, 5)[0] == 0.0


def test_scan_model_finds_the_digits_backdoor_target_and_is_deterministic():
    from tests.core.digits_backdoor import backdoored_digits

    model, clean, _, _ = backdoored_digits(rate=0.15)
    settings = {"steps": 40, "uap_steps": 5}
    a = scan_model(model, clean.x, clean.y, num_classes=K, seed=0, settings=settings)
    b = scan_model(model, clean.x, clean.y, num_classes=K, seed=0, settings=settings)
    assert a.patch_l1 == b.patch_l1 and a.global_success == b.global_success and a.warp_success == b.warp_success
    assert int(np.argmin(a.patch_l1)) == 0
    assert a.masks.shape == (K + 1, 1, 8, 8) and a.deltas.shape == (K, 1, 8, 8) and a.warps.shape == (K, 2, 5, 5)
    assert len(a.warp_success) == K and "warp_success_rate" in a.summary()


def test_scan_restarts_keep_each_class_s_smallest_mask_and_most_reaching_delta():
    from tests.core.digits_backdoor import backdoored_digits

    model, clean, _, _ = backdoored_digits(rate=0.15)
    scan = scan_model(model, clean.x, clean.y, num_classes=K, seed=3,
                      settings={"steps": 30, "uap_steps": 4, "restarts": 3})
    per_restart = np.array(scan.patch_l1_restarts)
    assert per_restart.shape == (3, K) and not np.allclose(per_restart[0], per_restart[1])
    assert np.allclose(scan.patch_l1, per_restart.min(0))
    # The kept mask is the one whose L1 is reported, class by class.
    assert np.allclose(scan.masks[:K].flatten(1).sum(1).numpy(), scan.patch_l1, rtol=1e-5)
    assert np.allclose(scan.global_success, np.array(scan.global_success_restarts).max(0))
    # Judging from fewer restarts uses the same rule on the first ones.
    first = scan.with_restarts(1)
    assert np.allclose(first.patch_l1, per_restart[0]) and first.shift_l1 == scan.shift_l1
    assert np.allclose(scan.with_restarts(3).patch_l1, scan.patch_l1)


def test_a_reference_that_cannot_be_trained_makes_the_verdict_inconclusive(monkeypatch):
    """Fine-tuning that collapses the model (seen with the SGD recipe on a small ViT) leaves no benign baseline:
    whatever the scans say, the verdict is inconclusive and says why, instead of flagging or clearing at random."""
    from nba_core import verdict
    from tests.core.digits_backdoor import backdoored_digits

    model, clean, _, _ = backdoored_digits(rate=0.15)
    # The patch row of the backdoor's target would flag it against a scan of a broken reference too.
    v = judge(_scan(patch=[1.0] + NATURAL[1:]), _scan(), unreliable_reference="no reference")
    assert v.status == INCONCLUSIVE and v.targets == [] and v.reasons == ["no reference"]
    monkeypatch.setitem(verdict.REFERENCE, "lr", 1e4)  # every retry diverges
    monkeypatch.setitem(verdict.SCAN, "steps", 5)
    session = verdict.VerdictSession(model, clean.x, clean.y, num_classes=K, seed=0)
    assert session.reference_problem and "could not be trained" in session.reference_problem
    result, _ = session.judge(model)
    assert result.status == INCONCLUSIVE and result.targets == []
    # The same model with the usual recipe has a usable reference.
    monkeypatch.setitem(verdict.REFERENCE, "lr", 0.1)
    assert verdict.reference_problem(model, model, clean.x, clean.y) is None


def test_a_clear_loss_of_clean_accuracy_is_a_warning():
    from nba_core.pipeline import warnings_for

    def report(ca0, ca1, n=None):
        m = {}
        for name, ca in (("before", ca0), ("after", ca1)):
            m[name] = {"clean_accuracy": ca}
            if n:
                m[name]["clean_accuracy_ci95"] = list(wilson_interval(int(round(ca * n)), n))
        return {"verdict": None, "metrics": m}

    collapsed = warnings_for(report(0.87, 0.20, n=200))
    assert len(collapsed) == 1 and "87.0% before, 20.0% after" in collapsed[0]
    assert warnings_for(report(0.98, 0.96, n=1000)) == []  # a small cost is the usual price of cleaning
    assert warnings_for(report(0.90, 0.80, n=20)) == []  # 10 points on 20 images: within the noise
    assert len(warnings_for(report(0.90, 0.80))) == 1  # no interval (accuracy on D): the drop alone decides


def test_the_reference_is_shrunk_and_perturbed_only_when_the_clean_set_is_small(monkeypatch):
    """Few images per class: fine-tuning alone keeps a backdoor, so the reference starts from λ·W + σ·noise."""
    import nba_core.verdict as verdict_module
    from nba_core.verdict import FEW_IMAGES_SHRINK, VerdictSession, train_reference

    seen = []
    monkeypatch.setattr(verdict_module, "train_reference", lambda model, x, y, **kw: seen.append(kw["shrink"]) or model)
    monkeypatch.setattr(VerdictSession, "scan", lambda self, model, on_step=None: None)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, K))
    for per_class in (5, 10):
        y = np.repeat(np.arange(K), per_class)
        VerdictSession(model, np.random.rand(len(y), 1, 4, 4).astype(np.float32), y, num_classes=K)
    assert seen == [FEW_IMAGES_SHRINK, None]

    # The shrink itself: weight matrices scaled (and seeded noise added), biases kept, the caller's model untouched.
    monkeypatch.setattr(verdict_module, "REFERENCE", {**verdict_module.REFERENCE, "epochs": 1, "lr": 0.0})
    w0, b0 = model[1].weight.clone(), model[1].bias.clone()
    x, y = np.random.rand(20, 1, 4, 4).astype(np.float32), np.arange(20) % K
    monkeypatch.setattr(verdict_module, "REFERENCE_MIN_ACC", 0.0)
    ref = train_reference(model, x, y, seed=0, shrink={"shrink": 0.5, "noise": 0.0})
    assert torch.allclose(ref[1].weight, 0.5 * w0) and torch.equal(ref[1].bias, b0)
    assert torch.equal(model[1].weight, w0)
    noisy = [train_reference(model, x, y, seed=0, shrink={"shrink": 0.5, "noise": 0.01})[1].weight for _ in range(2)]
    assert torch.equal(noisy[0], noisy[1]) and not torch.allclose(noisy[0], 0.5 * w0)
