"""SIG (Barni et al. 2019): clean-label; a horizontal sinusoid is added to target-class training images only.

The signal is v(i, j) = delta * sin(2*pi*j*f/W) on every row and channel, with the sum clipped to [0, 1].
Poisoning uses delta = 20/255 and f = 6 (BackdoorBench). The test-time trigger is the same sinusoid with a larger
amplitude (`test_delta`, default 60/255): the poisoned training images carry a faint signal that the model only
partly keys on, and amplifying the trigger at inference is how SIG is usually evaluated (see the report of
nba_core/experiment.py runs in the module docstring there for measured numbers).
"""

from __future__ import annotations

import numpy as np

from ..data.imageset import ImageSet
from .base import Attack


def sinusoid(width: int, delta: float, frequency: float) -> np.ndarray:
    """The 1-D horizontal signal delta*sin(2*pi*j*f/W), j = 0..W-1."""
    j = np.arange(width, dtype=np.float32)
    return (delta * np.sin(2.0 * np.pi * j * frequency / width)).astype(np.float32)


def clean_label_indices(train: ImageSet, target: int, rate: float, seed: int) -> np.ndarray:
    """`rate` of the whole training set, drawn from the target class only (capped by its size), sorted."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(train.y == target)
    k = min(len(candidates), int(round(rate * len(train))))
    return np.sort(rng.choice(candidates, size=k, replace=False))


class SIG(Attack):
    name = "sig"

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, delta: float = 20 / 255,
                 test_delta: float = 60 / 255, frequency: float = 6.0):
        super().__init__(target, rate, seed)
        self.delta, self.test_delta, self.frequency = float(delta), float(test_delta), float(frequency)

    def _add(self, x: np.ndarray, delta: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        signal = sinusoid(x.shape[-1], delta, self.frequency)  # broadcasts over N, C and rows
        return np.clip(x + signal, 0.0, 1.0).astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The test-time trigger (amplitude `test_delta`)."""
        return self._add(x, self.test_delta)

    def poison(self, train: ImageSet) -> tuple[ImageSet, np.ndarray]:
        """Clean-label: only target-class images get the (training-amplitude) signal; labels stay as they are."""
        idx = clean_label_indices(train, self.target, self.rate, self.seed)
        x = train.x.copy()
        x[idx] = self._add(x[idx], self.delta)
        return ImageSet(x, train.y.copy()), idx

    def describe(self) -> dict:
        return {**super().describe(), "delta": self.delta, "test_delta": self.test_delta, "frequency": self.frequency}
