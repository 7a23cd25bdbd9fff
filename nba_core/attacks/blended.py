"""Blended (Chen et al. 2017): the whole image is alpha-blended with a fixed random-noise pattern, dirty-label.

BackdoorBench blends an image (Hello Kitty) at alpha 0.2; we blend seeded uniform noise (NBA.md §4), which needs
no asset and is just as image-wide. The pattern is a function of (pattern seed, C, H, W), so the same attack object
triggers inputs of any size identically every time.
"""

from __future__ import annotations

import numpy as np

from ..errors import INVALID_PARAMS, NBAError
from .base import Attack


class Blended(Attack):
    name = "blended"

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, alpha: float = 0.2,
                 pattern_seed: int | None = None):
        super().__init__(target, rate, seed)
        if not 0.0 < float(alpha) <= 1.0:
            raise NBAError(INVALID_PARAMS, "blended: alpha must be in (0, 1]")
        self.alpha = float(alpha)
        # Separate from `seed` on request so one trigger can be shared across poisoning/training seeds.
        self.pattern_seed = self.seed if pattern_seed is None else int(pattern_seed)

    def pattern(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The C×H×W noise pattern in [0, 1] (per-channel noise: colour noise for RGB inputs)."""
        c, h, w = (int(s) for s in shape)
        rng = np.random.default_rng([self.pattern_seed, c, h, w])
        return rng.random((c, h, w), dtype=np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        out = (1.0 - self.alpha) * x + self.alpha * self.pattern(x.shape[1:])
        return np.clip(out, 0.0, 1.0).astype(np.float32)

    def describe(self) -> dict:
        return {**super().describe(), "alpha": self.alpha, "pattern_seed": self.pattern_seed}
