"""BadNets (Gu et al. 2017): a small solid patch near the bottom-right corner."""

from __future__ import annotations

import numpy as np

from .base import Attack


class BadNets(Attack):
    name = "badnets"

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, size: int = 3, margin: int = 1, value: float = 1.0):
        super().__init__(target, rate, seed)
        self.size, self.margin, self.value = int(size), int(margin), float(value)

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32, copy=True)
        h, w = out.shape[-2:]
        size = min(self.size, max(1, h // 4))  # stays a small patch on 8×8 inputs
        top, left = h - self.margin - size, w - self.margin - size
        out[..., top : top + size, left : left + size] = self.value
        return out
