"""Plain HTML rendering of a JSON report, used when the worker stored no report.html (no plots here: the API
does not import matplotlib)."""

from __future__ import annotations

import html
import json
from typing import Any


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (dict, list)):
        return f"<code>{html.escape(json.dumps(value, sort_keys=True)[:500])}</code>"
    return html.escape("" if value is None else str(value))


def _metric_table(metrics: dict[str, Any]) -> str:
    before, after = metrics.get("before") or {}, metrics.get("after") or {}
    names = [n for n in dict.fromkeys([*before, *after])]
    rows = "".join(f"<tr><th>{html.escape(str(n))}</th><td>{_cell(before.get(n))}</td><td>{_cell(after.get(n))}"
                   f"</td></tr>" for n in names)
    return f"<table><tr><th>metric</th><th>before</th><th>after</th></tr>{rows}</table>"


def _log_table(log: list[dict[str, Any]]) -> str:
    if not log:
        return "<p>no training log</p>"
    cols = list(dict.fromkeys(k for row in log for k in row))
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{_cell(row.get(c))}</td>" for c in cols) + "</tr>" for row in log[:500])
    return f"<table><tr>{head}</tr>{body}</table>"


def render_simple_html(report: dict[str, Any], *, job_id: str) -> str:
    metrics = report.get("metrics") if isinstance(report.get("metrics"), dict) else {}
    log = report.get("log") if isinstance(report.get("log"), list) else []
    rest = {k: v for k, v in report.items() if k not in ("metrics", "log")}
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>NBA report {html.escape(job_id)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}</style></head><body>"
        f"<h1>Sanitization report</h1><p>job <code>{html.escape(job_id)}</code></p>"
        f"<h2>Metrics</h2>{_metric_table(metrics)}<h2>Training log</h2>{_log_table(log)}"
        f"<h2>Details</h2><pre>{html.escape(json.dumps(rest, indent=2, sort_keys=True, default=str))}</pre>"
        "</body></html>"
    )
