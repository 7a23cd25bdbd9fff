"""The backdoor-experiment runner on sklearn's 8×8 digits (fast): fields, bookkeeping, a working backdoor."""

from __future__ import annotations

import numpy as np
import pytest

from nba_core.data.builtin import DATASET_INFO, train_test
from nba_core.errors import INVALID_PARAMS, UNKNOWN_ARCHITECTURE, UNKNOWN_ATTACK, UNKNOWN_DATASET, NBAError
from nba_core.experiment import BackdoorRun, backdoor_experiment, default_spec, default_train_config
from nba_core.train import predict


@pytest.fixture(scope="module")
def run() -> BackdoorRun:
    stages = []
    r = backdoor_experiment("digits", "badnets", "small_cnn", seed=1, epochs=6, device="cpu",
                            progress=lambda stage, fraction: stages.append((stage, fraction)))
    r.stages = stages  # type: ignore[attr-defined]
    return r


def test_run_fields_are_consistent(run):
    full_train, test = train_test("digits")
    assert run.spec.arch == "small_cnn" and run.spec.in_channels == 1 and tuple(run.spec.input_size) == (8, 8)
    # The defender's clean subset is held out of the attacker's training set, stratified, ~5%.
    assert len(run.train) + len(run.clean_subset) == len(full_train)
    assert abs(len(run.clean_subset) - 0.05 * len(full_train)) <= 10
    assert set(np.unique(run.clean_subset.y)) == set(range(10))
    # Poisoning bookkeeping: 10% of the attacker's set, relabelled to the target.
    assert len(run.poisoned_idx) == int(round(0.1 * len(run.train)))
    assert (run.train.y[run.poisoned_idx] == 0).all()
    # Test sets: the clean one is the fixed split; the triggered one drops the target class, keeps true labels.
    np.testing.assert_array_equal(run.test.y, test.y)
    np.testing.assert_array_equal(run.test_triggered.y, test.y[test.y != 0])
    np.testing.assert_array_equal(run.test_triggered.x, run.attack.apply(test.x[test.y != 0]))
    assert run.seconds > 0 and len(run.train_log) == 6
    assert run.stages[-1] == ("evaluate", 1.0)
    assert all(0.0 <= f <= 1.0 for _, f in run.stages)


def test_the_backdoor_works_and_the_model_is_accurate(run):
    assert run.clean_accuracy > 0.8
    assert run.attack_success_rate > 0.5
    # Clean non-target images are rarely sent to the target: the trigger, not a bias, causes the ASR.
    clean_non_target = run.test.without_class(0)
    base_rate = float((predict(run.model, clean_non_target.x).numpy() == 0).mean())
    assert base_rate < 0.1
    assert run.attack_success_rate > base_rate + 0.4


def test_model_based_attack_runs_through_the_experiment():
    r = backdoor_experiment("digits", "trojan", seed=0, epochs=2, device="cpu",
                            attack_params={"reference_epochs": 1, "steps": 5})
    assert r.attack.pattern is not None
    assert len(r.test_triggered) == int((r.test.y != 0).sum())
    assert 0.0 <= r.attack_success_rate <= 1.0


@pytest.mark.parametrize("dataset", sorted(DATASET_INFO))
def test_default_spec_and_config_match_the_dataset(dataset):
    info = DATASET_INFO[dataset]
    spec = default_spec(dataset, "small_cnn")
    assert spec.in_channels == info["in_channels"] and tuple(spec.input_size) == tuple(info["input_size"])
    assert spec.num_classes == info["num_classes"] and len(spec.mean) == info["in_channels"]
    cfg = default_train_config(dataset, "small_cnn")
    assert cfg.epochs >= 10 and cfg.hflip == info["hflip"] and cfg.shift >= 1


@pytest.mark.parametrize(
    "kwargs, code",
    [
        ({"dataset": "cifar1000"}, UNKNOWN_DATASET),
        ({"arch": "resnet9000"}, UNKNOWN_ARCHITECTURE),
        ({"attack": "nope"}, UNKNOWN_ATTACK),
        ({"poison_rate": 0.0}, INVALID_PARAMS),
        ({"clean_fraction": 1.0}, INVALID_PARAMS),
        ({"target": 10}, INVALID_PARAMS),
        ({"epochs": 0}, INVALID_PARAMS),
        ({"attack_params": {"bogus": 1}}, INVALID_PARAMS),
    ],
)
def test_bad_arguments_raise_coded_errors_before_training(kwargs, code):
    args = {"dataset": "digits", "device": "cpu", **kwargs}
    with pytest.raises(NBAError) as e:
        backdoor_experiment(**args)
    assert e.value.code == code
