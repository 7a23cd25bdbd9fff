"""Shared benchmark plumbing: provenance, JSONL rows with resume, mean ± std aggregation."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from statistics import mean, stdev

OUT_DIR = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def provenance() -> dict:
    """Which code and which machine produced a result (every committed number carries this)."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except Exception:
            return None

    import torch

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(dirty),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
    }


class RowLog:
    """Append-only JSONL of result rows, so an interrupted run resumes where it stopped."""

    def __init__(self, path: Path, key_fields: tuple[str, ...]):
        self.path = path
        self.key_fields = key_fields
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def key(self, row: dict) -> tuple:
        return tuple(row.get(f) for f in self.key_fields)

    def has(self, **fields) -> bool:
        k = tuple(fields.get(f) for f in self.key_fields)
        return any(self.key(r) == k for r in self.rows)

    def add(self, row: dict) -> None:
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return mean(values), (stdev(values) if len(values) > 1 else 0.0)


def fmt_pct(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{100 * m:.1f} ± {100 * s:.1f}"


def timed(fn, device) -> float:
    """Wall seconds of fn(), with the device's queue drained before and after (CUDA runs asynchronously)."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def parse_overrides(text: str) -> dict:
    """"epochs=1,lr=0.001" -> {"epochs": 1, "lr": 0.001} (a defense row named "ft:epochs=1,lr=0.001")."""
    params: dict = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if value in ("true", "false"):
            params[key] = value == "true"
        else:
            try:
                params[key] = float(value) if any(c in value for c in ".e") else int(value)
            except ValueError:  # a word: pseudo=off
                params[key] = value
    return params


# The tuning harness (bench.tuning) writes its choice here; bench.quality reads it for "method:tuned" rows.
def tuning_path(dataset: str, arch: str, out: Path | None = None) -> Path:
    return (out or OUT_DIR) / f"tuning_{dataset}_{arch}.json"


def selected_params(method: str, dataset: str | None, arch: str | None, out: Path | None = None) -> dict:
    """The tuned configuration's parameter overrides (for bench.quality's 'method:tuned' rows)."""
    path = tuning_path(str(dataset), str(arch), out)
    if not path.exists():
        raise SystemExit(f"{method}:tuned needs {path}: run python -m bench.tuning for this suite first")
    chosen = json.loads(path.read_text())["chosen"]
    if method not in chosen:
        raise SystemExit(f"{path} has no tuned configuration for {method}")
    return chosen[method]["params"]
