"""The attack interface: poison a training set, and apply the trigger to test images.

All images are float32 N×C×H×W in [0, 1]; attacks are deterministic for a given seed.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..data.imageset import ImageSet


class Attack:
    """Dirty-label, all-to-one by default: `rate` of the training set (drawn from non-target images) gets the
    trigger and the target label. Clean-label attacks (SIG, CL) override `poison`."""

    name: ClassVar[str] = "attack"
    needs_model: ClassVar[bool] = False  # True when prepare() trains/uses a model (Trojan, CL)

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0):
        self.target = int(target)
        self.rate = float(rate)
        self.seed = int(seed)

    def prepare(self, train: ImageSet, *, model_factory=None, device=None) -> None:
        """Fit whatever the trigger needs (shape from the data, an optimised pattern, ...). Default: nothing."""

    def apply(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def poison(self, train: ImageSet) -> tuple[ImageSet, np.ndarray]:
        """Return the poisoned training set and the indices that were poisoned."""
        rng = np.random.default_rng(self.seed)
        candidates = np.flatnonzero(train.y != self.target)
        k = min(len(candidates), int(round(self.rate * len(train))))
        idx = np.sort(rng.choice(candidates, size=k, replace=False))
        x, y = train.x.copy(), train.y.copy()
        x[idx] = self.apply(x[idx])
        y[idx] = self.target
        return ImageSet(x, y), idx

    def triggered_test_set(self, test: ImageSet) -> ImageSet:
        """Non-target test images with the trigger, labelled with their true classes (for ASR and RA)."""
        keep = test.without_class(self.target)
        return ImageSet(self.apply(keep.x), keep.y)

    def describe(self) -> dict:
        return {"attack": self.name, "target": self.target, "rate": self.rate, "seed": self.seed}
