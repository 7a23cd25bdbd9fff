"""The one HTML rendering of a sanitization report (worker, API and CLI all use it): a self-contained page with
the metric table, the class names, timing and, when matplotlib is installed and `plots` is on, PNG plots inlined as
data: URIs (before/after bars; training-loss curves from report["log"]), so the single file opens anywhere,
offline. No script and no external URL: it is safe to open from a download.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

# (label, path into the metrics dict); only metrics present in the report are shown.
BAR_METRICS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("clean accuracy", ("clean_accuracy",)),
    ("attack success rate", ("attack_success_rate",)),
    ("robust accuracy", ("robust_accuracy",)),
)


def _dig(d: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def metric_rows(report: dict) -> list[tuple[str, float, float]]:
    """(label, before, after) for each bar metric present (as numbers) on both sides."""
    metrics = report.get("metrics") or {}
    rows = []
    for label, path in BAR_METRICS:
        b, a = _dig(metrics.get("before"), path), _dig(metrics.get("after"), path)
        if isinstance(b, (int, float)) and isinstance(a, (int, float)):
            rows.append((label, float(b), float(a)))
    return rows


def loss_curves(log: list[dict] | None) -> dict[str, list[tuple[float, float]]]:
    """Per stage, the (step, value) points of every numeric '*loss*' column of the per-epoch log."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(log or []):
        if not isinstance(row, dict):
            continue
        stage = str(row.get("stage", "train"))
        x = row.get("epoch", i)
        x = float(x) if isinstance(x, (int, float)) else float(i)
        for key, value in row.items():
            if "loss" in key and isinstance(value, (int, float)) and not isinstance(value, bool):
                curves.setdefault(f"{stage}: {key}", []).append((x, float(value)))
    return curves


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def render_plots(report: dict) -> list[tuple[str, str]]:
    """(title, base64 PNG) for the metric bars and the loss curves; empty when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")  # no display in a worker; must precede pyplot
    import matplotlib.pyplot as plt

    plots: list[tuple[str, str]] = []
    rows = metric_rows(report)
    if rows:
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [100 * r[1] for r in rows], width=0.4, label="before", color="#c44e52")
        ax.bar([x + 0.2 for x in xs], [100 * r[2] for r in rows], width=0.4, label="after", color="#4c72b0")
        ax.set_xticks(list(xs), [r[0] for r in rows], fontsize=8)
        ax.set_ylabel("%")
        ax.set_ylim(0, 105)
        ax.legend()
        plots.append(("Before / after", _png(fig)))
        plt.close(fig)
    curves = loss_curves(report.get("log"))
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 3.2))
        for name, points in curves.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend(fontsize=7)
        plots.append(("Training losses", _png(fig)))
        plt.close(fig)
    return plots


def _plots_or_none(report: dict) -> list[tuple[str, str]]:
    try:
        import matplotlib  # noqa: F401  (the worker extra installs it; the API image does not)
    except ModuleNotFoundError:
        return []
    return render_plots(report)


def _class_table(report: dict) -> str:
    names = _dig(report, ("data", "class_names")) or _dig(report, ("spec", "class_names"))
    if not isinstance(names, list) or not names:
        return ""
    cells = "".join(f"<tr><td>{i}</td><td>{html.escape(str(n))}</td></tr>" for i, n in enumerate(names))
    return f"<h2>Classes (label index → name)</h2><table><tr><th>label</th><th>name</th></tr>{cells}</table>"


def _evidence_line(report: dict) -> str:
    """The trigger-free scan in one sentence: which class looks like a backdoor target, before and after."""
    metrics = report.get("metrics") or {}
    before, after = _dig(metrics, ("before", "trigger_free")), _dig(metrics, ("after", "trigger_free"))
    if not isinstance(before, dict):
        return ""
    names = _dig(report, ("data", "class_names")) or []
    suspect = before.get("suspect_class")
    label = f"{suspect} ({names[suspect]})" if isinstance(suspect, int) and suspect < len(names) else str(suspect)
    text = (f"Trigger-free scan: the most backdoor-like class is {label}, anomaly index "
            f"{before.get('anomaly_index')} before")
    if isinstance(after, dict):
        text += f" and {after.get('anomaly_index')} after"
    flagged = before.get("flagged_classes") or []
    return text + (f"; flagged before cleaning (index above {before.get('anomaly_threshold')}): {flagged}." if flagged
                   else f"; no class above the threshold {before.get('anomaly_threshold')} before cleaning.")


def render_report_html(report: dict, *, job_id: str | None = None, plots: bool = True) -> str:
    esc = html.escape
    title = f"NBA sanitization report{f' — job {job_id}' if job_id else ''}"
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;max-width:760px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}"
             "td:first-child{text-align:left}.warn{color:#a60}</style></head><body>",
             f"<h1>{esc(title)}</h1>",
             f"<p>method <b>{esc(str(report.get('method')))}</b>, seed {esc(str(report.get('seed')))}, "
             f"device {esc(str(report.get('device')))}</p>"]
    verdict = report.get("verdict") or {}
    for line in verdict.get("headline") or []:  # the verdict first
        parts.append(f"<p style='font-size:1.2em'><b>{esc(str(line))}</b></p>")
    if (verdict.get("change") or {}).get("summary"):
        parts.append(f"<p>{esc(str(verdict['change']['summary']))}</p>")
    for warning in report.get("warnings") or []:  # right under the verdict, before any number
        parts.append(f"<p class='warn'><b>Warning:</b> {esc(str(warning))}</p>")
    if report.get("note"):
        parts.append(f"<p><i>{esc(str(report['note']))}</i></p>")
    before = _dig(report, ("metrics", "before")) or {}
    if isinstance(before.get("clean_accuracy_ci95"), list):
        after = _dig(report, ("metrics", "after")) or {}
        ci = [m.get("clean_accuracy_ci95") for m in (before, after)]
        parts.append(f"<p>held-out clean accuracy on n={esc(str(before.get('holdout_size')))} images, 95 % Wilson "
                     "interval: " + " → ".join(f"{100 * c[0]:.1f}–{100 * c[1]:.1f} %" for c in ci if c) + "</p>")
        if before.get("clean_accuracy_note"):
            parts.append(f"<p>{esc(str(before['clean_accuracy_note']))}</p>")
    rows = metric_rows(report)
    if rows:
        parts.append("<table><tr><th>metric</th><th>before</th><th>after</th></tr>")
        parts += [f"<tr><td>{esc(n)}</td><td>{100 * b:.2f} %</td><td>{100 * a:.2f} %</td></tr>" for n, b, a in rows]
        parts.append("</table>")
    timing = report.get("timing") or {}
    if isinstance(timing.get("total_seconds"), (int, float)):
        parts.append(f"<p>total time {timing['total_seconds']:.1f} s</p>")
    evidence = _evidence_line(report)
    if evidence:
        parts.append(f"<p>{esc(evidence)}</p>")
    classes = _class_table(report)
    if classes:
        parts.append(classes)
    for name, png in (_plots_or_none(report) if plots else []):
        parts.append(f"<h2>{esc(name)}</h2><img alt='{esc(name)}' src='data:image/png;base64,{png}'>")
    sha = _dig(report, ("output", "sha256"))
    if sha:
        parts.append(f"<p>cleaned model sha256 <code>{esc(str(sha))}</code></p>")
    parts.append("</body></html>")
    return "\n".join(parts)
