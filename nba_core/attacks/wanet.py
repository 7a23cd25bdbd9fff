"""WaNet (Nguyen & Tran, ICLR 2021): an imperceptible, smooth image warp as the trigger, dirty-label.

Trigger: a fixed random k×k field of 2-D offsets in [-1, 1], normalised by its mean absolute value, upsampled
(bicubic) to a smooth H×W flow, scaled by s/H and added to the identity sampling grid, which is clamped to
[-1, 1] and applied with grid_sample. Defaults k = 4, s = 0.5 (BackdoorBench). Because the control field is
k×k, the same attack object warps inputs of any size consistently.

"Noise mode": besides the `rate` share of backdoor samples, `cross_ratio × rate` of the training set gets the
trigger warp plus a random per-image jitter while keeping its true label, so the model must learn this exact
warp rather than "any warp means the target".
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.imageset import ImageSet
from ..errors import INVALID_PARAMS, NBAError
from .base import Attack


class WaNet(Attack):
    name = "wanet"

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, k: int = 4, strength: float = 0.5,
                 cross_ratio: float = 2.0, grid_seed: int | None = None):
        super().__init__(target, rate, seed)
        if int(k) < 2:
            raise NBAError(INVALID_PARAMS, "wanet: k must be at least 2")
        self.k, self.strength, self.cross_ratio = int(k), float(strength), float(cross_ratio)
        self.grid_seed = self.seed if grid_seed is None else int(grid_seed)
        rng = np.random.default_rng([self.grid_seed, 7])
        field = rng.uniform(-1.0, 1.0, size=(1, 2, self.k, self.k)).astype(np.float32)
        self.control = field / np.abs(field).mean()  # the paper's normalisation: mean |offset| = 1
        self.noise_idx = np.empty(0, np.int64)  # indices of the noise-mode samples of the last poison()

    def _grid(self, h: int, w: int) -> torch.Tensor:
        """The 1×H×W×2 sampling grid of the trigger warp (x, y order, as grid_sample wants)."""
        flow = F.interpolate(torch.from_numpy(self.control), size=(h, w), mode="bicubic", align_corners=True)
        flow = flow.permute(0, 2, 3, 1)  # 1×H×W×2
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        identity = torch.stack((xs, ys), dim=-1).unsqueeze(0)
        return torch.clamp(identity + self.strength * flow / h, -1.0, 1.0)

    def _warp(self, x: np.ndarray, grid: torch.Tensor) -> np.ndarray:
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        if len(xt) == 0:
            return xt.numpy()
        out = F.grid_sample(xt, grid.expand(len(xt), -1, -1, -1), mode="bilinear", padding_mode="border",
                            align_corners=True)
        return out.clamp_(0.0, 1.0).numpy()

    def apply(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        return self._warp(x, self._grid(*x.shape[-2:]))

    def apply_noise_mode(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The trigger warp plus uniform per-pixel jitter of up to one pixel-step (the paper's noise mode)."""
        x = np.asarray(x, dtype=np.float32)
        h, w = x.shape[-2:]
        jitter = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(len(x), h, w, 2)).astype(np.float32)) / h
        grid = torch.clamp(self._grid(h, w) + jitter, -1.0, 1.0)
        return self._warp(x, grid)

    def poison(self, train: ImageSet) -> tuple[ImageSet, np.ndarray]:
        """Backdoor samples (non-target, relabelled) plus label-keeping noise-mode samples drawn from the rest
        of the set (all classes). Returns only the backdoor indices; the noise-mode ones are in `noise_idx`."""
        rng = np.random.default_rng(self.seed)
        n = len(train)
        candidates = np.flatnonzero(train.y != self.target)
        k = min(len(candidates), int(round(self.rate * n)))
        idx = np.sort(rng.choice(candidates, size=k, replace=False))
        rest = np.setdiff1d(np.arange(n), idx)
        k_noise = min(len(rest), int(round(self.cross_ratio * self.rate * n)))
        noise_idx = np.sort(rng.choice(rest, size=k_noise, replace=False))
        x, y = train.x.copy(), train.y.copy()
        x[idx] = self.apply(x[idx])
        y[idx] = self.target
        x[noise_idx] = self.apply_noise_mode(x[noise_idx], rng)
        self.noise_idx = noise_idx
        return ImageSet(x, y), idx

    def describe(self) -> dict:
        return {**super().describe(), "k": self.k, "strength": self.strength, "cross_ratio": self.cross_ratio,
                "grid_seed": self.grid_seed}
