"""SIG (Barni et al. 2019): clean-label; a horizontal sinusoid is added to target-class training images only.

The signal is v(i, j) = delta * sin(2*pi*j*f/W) on every row and channel, with the sum clipped to [0, 1].

Defaults (measured on MNIST-5k + small_cnn, seed 0, 15 epochs with ±2 px shifts):
- delta = 40/255, f = 6: BackdoorBench's SIG config (Barni et al. used 20/255 on their data; at 20/255 our
  model barely keys on the signal: ASR 0.9% at the training amplitude, 60-90% only at test amplitude 60-100/255).
- Poisoned images: `rate` of the training set, capped at `max_class_fraction` = 0.8 of the target class. With
  10 balanced classes rate 0.1 is the whole class (BackdoorBench's cap); then no clean target image is left, the
  model learns "target = stripes" and clean accuracy fell to 91.7%; keeping 20% of them clean restores 98.1%.
- Test-time trigger: the same sinusoid at a larger amplitude `test_delta` = 100/255 (a stronger test-time signal is
  common in SIG evaluations); measured ASR 13% / 65% / 91% / 97% at test amplitude
  40 / 60 / 80 / 100 (/255).
"""

from __future__ import annotations

import numpy as np

from ..data.imageset import ImageSet
from .base import Attack


def sinusoid(width: int, delta: float, frequency: float) -> np.ndarray:
    """The 1-D horizontal signal delta*sin(2*pi*j*f/W), j = 0..W-1."""
    j = np.arange(width, dtype=np.float32)
    return (delta * np.sin(2.0 * np.pi * j * frequency / width)).astype(np.float32)


def clean_label_indices(train: ImageSet, target: int, rate: float, seed: int,
                        max_class_fraction: float = 1.0) -> np.ndarray:
    """`rate` of the whole training set, drawn from the target class only, capped at `max_class_fraction` of
    that class (BackdoorBench caps at the whole class: with 10 balanced classes, rate 0.1 is all of it)."""
    rng = np.random.default_rng(seed)
    candidates = np.flatnonzero(train.y == target)
    k = min(int(round(max_class_fraction * len(candidates))), int(round(rate * len(train))))
    return np.sort(rng.choice(candidates, size=k, replace=False))


class SIG(Attack):
    name = "sig"

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, delta: float = 40 / 255,
                 test_delta: float = 100 / 255, frequency: float = 6.0, max_class_fraction: float = 0.8):
        super().__init__(target, rate, seed)
        self.delta, self.test_delta, self.frequency = float(delta), float(test_delta), float(frequency)
        self.max_class_fraction = float(max_class_fraction)

    def _add(self, x: np.ndarray, delta: float) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        signal = sinusoid(x.shape[-1], delta, self.frequency)  # broadcasts over N, C and rows
        return np.clip(x + signal, 0.0, 1.0).astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The test-time trigger (amplitude `test_delta`)."""
        return self._add(x, self.test_delta)

    def poison(self, train: ImageSet) -> tuple[ImageSet, np.ndarray]:
        """Clean-label: only target-class images get the (training-amplitude) signal; labels stay as they are."""
        idx = clean_label_indices(train, self.target, self.rate, self.seed, self.max_class_fraction)
        x = train.x.copy()
        x[idx] = self._add(x[idx], self.delta)
        return ImageSet(x, train.y.copy()), idx

    def describe(self) -> dict:
        return {**super().describe(), "delta": self.delta, "test_delta": self.test_delta, "frequency": self.frequency}
