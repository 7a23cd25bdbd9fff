"""The one HTML renderer (worker, API and CLI): class names, warnings, the scan sentence, no script or URL."""

from __future__ import annotations

import re

from nba_core.report_html import render_report_html

REPORT = {
    "method": "nba", "seed": 0, "device": "cpu",
    "data": {"class_names": ["cat", "dog", "<b>bird</b>"], "class_counts": [5, 5, 1]},
    "warnings": ["fewer than 5 clean images for class(es) 2 (bird): 1"],
    "metrics": {"before": {"clean_accuracy": 0.9, "trigger_free": {"suspect_class": 1, "anomaly_index": 3.1,
                                                                   "anomaly_threshold": 2.0, "flagged_classes": [1],
                                                                   "suspect_success_rate": 0.95}},
                "after": {"clean_accuracy": 0.88, "trigger_free": {"suspect_class": 0, "anomaly_index": 1.2,
                                                                   "suspect_success_rate": 0.2}}},
}


def test_report_names_classes_warns_and_explains_the_scan():
    html = render_report_html(REPORT, job_id="j1", plots=False)
    assert "<td>1</td><td>dog</td>" in html and "&lt;b&gt;bird&lt;/b&gt;" in html
    assert "fewer than 5 clean images" in html
    assert "most backdoor-like class is 1 (dog), anomaly index 3.1 before and 1.2 after" in html
    assert "flagged before cleaning" in html and "data:image/png" not in html
    assert "<script" not in html.lower() and not re.search(r"(src|href)=['\"]?https?:", html)


def test_plots_are_inlined_when_asked():
    html = render_report_html(REPORT, job_id="j1")
    assert html.count("data:image/png;base64,") == 1  # before/after bars (this report has no training log)
