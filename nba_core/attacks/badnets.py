"""BadNets (Gu et al. 2017): a small solid patch near the bottom-right corner (or another corner, for a second
trigger in a multi-target backdoor)."""

from __future__ import annotations

import numpy as np

from ..errors import INVALID_PARAMS, NBAError
from .base import Attack

CORNERS = ("bottom_right", "top_left")


class BadNets(Attack):
    name = "badnets"

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, size: int = 3, margin: int = 1, value: float = 1.0,
                 corner: str = "bottom_right"):
        super().__init__(target, rate, seed)
        if corner not in CORNERS:
            raise NBAError(INVALID_PARAMS, f"badnets: corner must be one of {', '.join(CORNERS)}")
        self.size, self.margin, self.value, self.corner = int(size), int(margin), float(value), corner

    def apply(self, x: np.ndarray) -> np.ndarray:
        out = np.array(x, dtype=np.float32, copy=True)
        h, w = out.shape[-2:]
        size = min(self.size, max(1, h // 4))  # stays a small patch on 8×8 inputs
        top, left = h - self.margin - size, w - self.margin - size
        if self.corner == "top_left":
            top, left = self.margin, self.margin
        out[..., top : top + size, left : left + size] = self.value
        return out
