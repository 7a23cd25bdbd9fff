"""The in-memory core `sanitize_loaded`: a module and an ImageSet in, the cleaned module and the report out,
with the same report fields as the file-based `sanitize` and nothing written to disk."""

from __future__ import annotations

import os

import pytest

from nba_core.errors import Cancelled, NBAError
from nba_core.metrics import attack_success_rate
from nba_core.pipeline import sanitize_loaded
from tests.core.digits_backdoor import SPEC, backdoored_digits


@pytest.fixture(scope="module")
def backdoored():
    return backdoored_digits(rate=0.1)


def test_core_cleans_a_module_in_memory(backdoored, tmp_path, monkeypatch):
    model, clean, test, triggered = backdoored
    monkeypatch.chdir(tmp_path)
    stages = []
    outcome = sanitize_loaded(model, clean, spec=SPEC, method="ft", params={"epochs": 10, "lr": 0.05},
                              probe=triggered, probe_target=0, seed=0, evidence=False,
                              progress=lambda stage, value: stages.append((stage, value)))
    report = outcome.report
    assert os.listdir(tmp_path) == []  # nothing written
    assert {"kind", "method", "params", "spec", "data", "metrics", "timing", "defense_info", "log"} <= set(report)
    assert "output" not in report  # saving is the caller's business
    assert report["metrics"]["before"]["attack_success_rate"] > 0.5
    assert report["metrics"]["after"]["attack_success_rate"] == pytest.approx(
        attack_success_rate(outcome.model, triggered.x, triggered.y, 0))
    values = [v for _, v in stages]
    assert values == sorted(values) and stages[0][0] == "check"  # the near-chance gate runs first


def test_core_validates_and_cancels(backdoored):
    model, clean, _, triggered = backdoored
    with pytest.raises(NBAError) as e:
        sanitize_loaded(model, clean, spec=SPEC, method="nope")
    assert e.value.code == "unknown_method"
    with pytest.raises(NBAError) as e:
        sanitize_loaded(model, clean, spec=SPEC, method="ft", probe=triggered, probe_target=10)
    assert e.value.code == "invalid_params"
    with pytest.raises(Cancelled):
        sanitize_loaded(model, clean, spec=SPEC, method="ft", params={"epochs": 2}, evidence=False,
                        should_cancel=lambda: True)
