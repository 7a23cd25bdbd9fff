"""Label-consistent backdoor (CL; Turner, Tsipras & Madry 2019): clean-label poisoning that works.

Target-class training images are first pushed away from their own class by an untargeted L∞ PGD attack on a
briefly trained reference model, so their natural features become hard to learn; then a small checkerboard
trigger is stamped on them. Labels are never changed: to fit these images the victim leans on the trigger.
At test time the trigger is the checkerboard alone (no perturbation).

Defaults: ε = 16/255 for colour images (Turner et al., BackdoorBench) and 48/255 for 1-channel images (grey
digits are far easier to classify, so a larger budget is needed to hide their features; 32-64/255 is the range
used for MNIST-like data); 10 PGD steps of ε/4. Trigger: a 3×3 black/white checkerboard 1 px from each of the
four corners (Turner et al.'s four-corner variant, which survives horizontal-flip augmentation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..data.imageset import ImageSet
from ..device import to_device
from ..errors import ATTACK_NOT_PREPARED, NBAError
from .base import Attack
from .sig import clean_label_indices
from .trojan import train_reference_model


class LabelConsistent(Attack):
    name = "cl"
    needs_model = True

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, eps: float | None = None,
                 steps: int = 10, step_fraction: float = 0.25, size: int = 3, margin: int = 1,
                 four_corners: bool = True, reference_epochs: int = 2):
        super().__init__(target, rate, seed)
        self.eps = None if eps is None else float(eps)
        self.steps, self.step_fraction = int(steps), float(step_fraction)
        self.size, self.margin, self.four_corners = int(size), int(margin), bool(four_corners)
        self.reference_epochs = int(reference_epochs)
        self.reference = None  # set by prepare()

    def epsilon(self, channels: int) -> float:
        if self.eps is not None:
            return self.eps
        return 16 / 255 if channels >= 3 else 48 / 255

    def prepare(self, train: ImageSet, *, model_factory=None, device=None) -> None:
        self.reference = train_reference_model(train, model_factory, device, self.seed,
                                               epochs=self.reference_epochs, attack_name=self.name)

    def perturb(self, x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """Untargeted L∞ PGD (no random start, so deterministic) against the reference model."""
        if self.reference is None:
            raise NBAError(ATTACK_NOT_PREPARED, "the cl attack perturbs images with a reference model; call prepare() first")
        dev = next(self.reference.parameters()).device
        eps = self.epsilon(x.shape[1])
        step = self.step_fraction * eps
        out = []
        for i in range(0, len(x), batch_size):
            x0 = to_device(x[i : i + batch_size], dev)
            yb = to_device(y[i : i + batch_size], dev)
            adv = x0.clone()
            for _ in range(self.steps):
                adv.requires_grad_(True)
                loss = F.cross_entropy(self.reference(adv), yb)
                (grad,) = torch.autograd.grad(loss, adv)
                adv = adv.detach() + step * grad.sign()
                adv = torch.min(torch.max(adv, x0 - eps), x0 + eps).clamp_(0.0, 1.0)
            out.append(adv.detach().cpu().numpy())
        return np.concatenate(out).astype(np.float32) if out else np.asarray(x, np.float32).copy()

    def _checkerboard(self, channels: int, size: int) -> np.ndarray:
        ii, jj = np.mgrid[0:size, 0:size]
        board = ((ii + jj) % 2 == 0).astype(np.float32)
        return np.broadcast_to(board, (channels, size, size))

    def apply(self, x: np.ndarray) -> np.ndarray:
        """The trigger: a checkerboard in the bottom-right corner (and the other three with four_corners)."""
        out = np.array(x, dtype=np.float32, copy=True)
        c, h, w = out.shape[1:]
        size = min(self.size, max(1, min(h, w) // 4))  # stays small on 8×8 inputs
        board = self._checkerboard(c, size)
        bottom, right = h - self.margin - size, w - self.margin - size
        corners = [(bottom, right)]
        if self.four_corners:
            corners += [(self.margin, self.margin), (self.margin, right), (bottom, self.margin)]
        for top, left in corners:
            out[:, :, top : top + size, left : left + size] = board
        return out

    def poison(self, train: ImageSet) -> tuple[ImageSet, np.ndarray]:
        """Clean-label: `rate` of the training set (capped by the target class size), target-class images only,
        perturbed then stamped; labels unchanged."""
        idx = clean_label_indices(train, self.target, self.rate, self.seed)
        x = train.x.copy()
        if len(idx):
            x[idx] = self.apply(self.perturb(x[idx], train.y[idx]))
        return ImageSet(x, train.y.copy()), idx

    def describe(self) -> dict:
        return {**super().describe(), "eps": self.eps, "steps": self.steps, "size": self.size,
                "four_corners": self.four_corners}
