"""K-fold cross-fitting: an honest estimate of what a defense does to clean accuracy, without holding data back.

The delivered model is trained on ALL of the clean subset D (what the benchmark measures). Its accuracy on D says
little (it trained on D), so the clean-accuracy change is estimated on models that did not see the images they are
scored on: D is split into K class-stratified folds; for each fold the defense runs on the other K − 1 folds and the
suspect and the fold's cleaned model are scored on the fold. The estimate is the pooled before/after accuracy over
all folds. Cost: K extra defense runs. It estimates the change for a model trained on (K−1)/K of D, a slightly
pessimistic proxy for the delivered one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .data.imageset import ImageSet
from .defenses.base import Defense, DefenseContext
from .errors import INVALID_PARAMS, NBAError
from .metrics import clean_accuracy

MAX_FOLDS = 10


def stratified_folds(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index (0..k-1) per sample: each class is shuffled and dealt round-robin over the folds."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        fold[idx] = (np.arange(len(idx)) + offset) % k
        offset += len(idx)  # rotate the start so that small classes do not all land in fold 0
    return fold


def crossfit_accuracy_change(defense: Defense, model, data: ImageSet, k: int, seed: int,
                             make_ctx: Callable[[int], DefenseContext]) -> dict:
    """Pooled clean accuracy of the suspect and of the cleaned models on held-out folds (see module doc)."""
    if not 2 <= k <= MAX_FOLDS:
        raise NBAError(INVALID_PARAMS, f"crossfit needs 2..{MAX_FOLDS} folds, got {k}")
    if len(data) < 2 * k:
        raise NBAError(INVALID_PARAMS, f"crossfit with {k} folds needs at least {2 * k} clean images, got {len(data)}")
    fold = stratified_folds(data.y, k, seed)
    folds, hits_before, hits_after = [], 0.0, 0.0
    for i in range(k):
        train, held = data.subset(np.flatnonzero(fold != i)), data.subset(np.flatnonzero(fold == i))
        before = clean_accuracy(model, held.x, held.y)
        cleaned = defense.run(model, train, make_ctx(seed + 1000 * (i + 1))).model
        after = clean_accuracy(cleaned, held.x, held.y)
        folds.append({"fold": i, "train": len(train), "held_out": len(held), "before": before, "after": after})
        hits_before += before * len(held)
        hits_after += after * len(held)
    before, after = hits_before / len(data), hits_after / len(data)
    return {"k": k, "clean_accuracy_before": before, "clean_accuracy_after": after, "change": after - before,
            "folds": folds}
