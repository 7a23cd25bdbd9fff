"""Trigger-free evidence: what the service reports when the user has no trigger (NBA.md §4, last point).

A batched Neural-Cleanse-like scan (triggerscan.py, shared with NBA's pseudo samples) of the model on the
user's clean data: per class, the smallest synthesised universal trigger and how often it works. A backdoored
model has one class whose trigger is unusually small and reliable (high anomaly index); after sanitization
that class's trigger should need a larger mask and/or work less often.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from .data.imageset import ImageSet
from .errors import INVALID_PARAMS, NBAError
from .triggerscan import ANOMALY_THRESHOLD, scan_universal_triggers
from .train import CancelFn, never_cancel

# budget -> scan settings; "fast" runs twice per sanitization job, so it stays a few seconds on a CPU.
BUDGETS: dict[str, dict] = {
    "fast": {"steps": 60, "batch_size": 8},
    "thorough": {"steps": 150, "batch_size": 16},
}
MAX_IMAGES = 1000  # the scan needs a few hundred images at most; larger sets are subsampled (stratified enough)


def trigger_free_evidence(model: nn.Module, clean: ImageSet, *, num_classes: int, device: torch.device | None = None,
                          seed: int = 0, budget: str = "fast", should_cancel: CancelFn = never_cancel,
                          on_step=None) -> dict:
    """Scan `model` on `clean` and return a JSON-ready summary (plain floats, ints, lists)."""
    if budget not in BUDGETS:
        raise NBAError(INVALID_PARAMS, f"unknown evidence budget {budget!r}; known: {', '.join(BUDGETS)}")
    if len(clean) < 2:
        raise NBAError(INVALID_PARAMS, "trigger-free evidence needs at least two clean images")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(clean), size=MAX_IMAGES, replace=False)) if len(clean) > MAX_IMAGES else None
    data = clean.subset(idx) if idx is not None else clean
    device = device or next(model.parameters()).device
    generator = torch.Generator().manual_seed(int(seed))
    scan = scan_universal_triggers(model, data.x, data.y, num_classes=num_classes, device=device,
                                   generator=generator, should_cancel=should_cancel, on_step=on_step,
                                   **BUDGETS[budget])
    suspect = scan.ranking()[0]
    return {
        "method": "batched Neural-Cleanse-like universal trigger scan (mask + pattern per class)",
        "budget": budget,
        "images": len(data),
        "per_class": [
            {"class": k, "mask_l1": _num(scan.mask_l1[k], 3), "success_rate": _num(scan.success_rate[k], 4),
             "anomaly_index": _num(scan.anomaly_indices[k], 4)}
            for k in range(num_classes)
        ],
        "anomaly_index": _num(scan.anomaly_index, 4),
        "anomaly_threshold": ANOMALY_THRESHOLD,
        "flagged_classes": list(scan.flagged),
        "suspect_class": suspect,
        "suspect_mask_l1": _num(scan.mask_l1[suspect], 3),
        "suspect_success_rate": _num(scan.success_rate[suspect], 4),
        "median_mask_l1": round(float(np.median(scan.mask_l1)), 3),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _num(value: float, digits: int) -> float | None:
    """Rounded float, or None for NaN/inf (strict JSON has neither)."""
    return round(float(value), digits) if np.isfinite(value) else None
