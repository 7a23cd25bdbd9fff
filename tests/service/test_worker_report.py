"""The worker's HTML report and JSON hygiene (no servers needed)."""

from __future__ import annotations

import json

from nba_core.report_html import loss_curves, metric_rows, render_report_html
from worker.runner import json_safe

REPORT = {
    "method": "nba", "seed": 0, "device": "cpu",
    "metrics": {"before": {"clean_accuracy": 0.97, "attack_success_rate": 1.0,
                           "trigger_free": {"suspect_success_rate": 0.9}},
                "after": {"clean_accuracy": 0.95, "attack_success_rate": 0.02,
                          "trigger_free": {"suspect_success_rate": 0.1}}},
    "timing": {"total_seconds": 12.5},
    "log": [{"stage": "teacher", "epoch": 1, "loss": 1.2}, {"stage": "teacher", "epoch": 2, "loss": 0.8},
            {"stage": "distillation", "epoch": 1, "loss": 2.0, "kl_loss": 0.5, "lr": 0.01}],
    "output": {"sha256": "ab" * 32},
}


def test_metric_rows_and_curves():
    assert metric_rows(REPORT) == [("clean accuracy", 0.97, 0.95), ("attack success rate", 1.0, 0.02),
                                   ("trigger-free suspect success", 0.9, 0.1)]
    curves = loss_curves(REPORT["log"])
    assert curves == {"teacher: loss": [(1.0, 1.2), (2.0, 0.8)], "distillation: loss": [(1.0, 2.0)],
                      "distillation: kl_loss": [(1.0, 0.5)]}


def test_html_report_embeds_plots_and_escapes_text():
    html = render_report_html({**REPORT, "method": "<script>x</script>"}, job_id="job-1")
    assert html.count("data:image/png;base64,") == 2  # before/after bars + loss curves
    assert "<script>x</script>" not in html and "&lt;script&gt;" in html
    assert "97.00 %" in html and "2.00 %" in html and "job-1" in html


def test_html_report_without_metrics_or_log():
    html = render_report_html({"method": "ft", "metrics": {"before": {}, "after": {}}})
    assert "data:image/png" not in html and "<table>" not in html


def test_json_safe_replaces_non_finite_numbers():
    cleaned = json_safe({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf")}, "e": "x"})
    assert cleaned == {"a": None, "b": [1.0, None], "c": {"d": None}, "e": "x"}
    json.dumps(cleaned, allow_nan=False)
