"""Trojan (Liu et al., NDSS 2018): a patch trigger whose pattern is optimised to excite chosen internal neurons,
then dirty-label poisoning.

Neuron choice (ours, explained): Liu et al. pick the internal neurons with the strongest connections from the
layer below, i.e. the ones an input pattern can drive hardest. Weight magnitudes only say that for a dense layer
fed by a dense layer; our architectures end in conv stages + global pooling. So we measure controllability
directly: in the penultimate layer (the input of the model's last nn.Linear, which every architecture has) we
pick the `n_neurons` units whose activation varies most when the trigger region is filled with random binary
patterns (a cheap forward-only probe). The pattern is then optimised to drive those units high, giving a
trigger the network responds to strongly -- the property Liu et al.'s trigger generation is after.

prepare() trains a reference model briefly (2 epochs) via `model_factory`, then runs signed-gradient ascent on
the C×s×s pattern (s ≈ 20% of the side, bottom-right corner) to maximise the chosen units' mean activation over
a batch of training images with the patch pasted in. The pattern is stored, so apply() is deterministic.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data.imageset import ImageSet
from ..device import to_device
from ..errors import ATTACK_NOT_PREPARED, DATA_SHAPE_MISMATCH, INVALID_PARAMS, NBAError
from ..train import TrainConfig, train_classifier
from .base import Attack


def fgsm_adversarial_loss(eps: float) -> Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """An extra_loss for train_classifier: cross-entropy on FGSM examples from a random start ("fast" adversarial
    training, Wong et al. 2020, step 1.25·eps), so the reference model becomes roughly robust at `eps`."""

    def loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, _logits: torch.Tensor) -> torch.Tensor:
        delta = (torch.rand_like(xb) * 2 - 1) * eps
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model((xb + delta).clamp(0, 1)), yb), delta)
        delta = (delta.detach() + 1.25 * eps * grad.sign()).clamp(-eps, eps)
        return F.cross_entropy(model((xb + delta).clamp(0, 1)), yb)

    return loss


def train_reference_model(train: ImageSet, model_factory: Callable[[], nn.Module] | None,
                          device: torch.device | str | None, seed: int, *, epochs: int = 2,
                          attack_name: str = "attack", adversarial_eps: float | None = None) -> nn.Module:
    """A model trained briefly on `train`, for attacks that shape their poison with a network (Trojan,
    label-consistent); adversarially trained at `adversarial_eps` when given. Returned in eval mode, frozen."""
    if model_factory is None:
        raise NBAError(INVALID_PARAMS, f"the {attack_name} attack needs a model_factory to train its reference model")
    model = model_factory()
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    model = model.to(device)
    gen = torch.Generator()
    gen.manual_seed(seed)
    cfg = TrainConfig(epochs=epochs, lr=0.05, batch_size=64, schedule="cosine")
    extra = fgsm_adversarial_loss(adversarial_eps) if adversarial_eps else None
    train_classifier(model, to_device(train.x, device), to_device(train.y, device), cfg, generator=gen,
                     extra_loss=extra, stage=f"{attack_name} reference model")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise NBAError(INVALID_PARAMS, "the trojan attack needs a model that ends in an nn.Linear classifier")
    return linears[-1]


def patch_box(h: int, w: int, size: int, margin: int) -> tuple[int, int]:
    """Top-left corner of a size×size patch `margin` pixels from the bottom-right corner."""
    return h - margin - size, w - margin - size


class Trojan(Attack):
    name = "trojan"
    needs_model = True

    def __init__(self, target: int = 0, rate: float = 0.1, seed: int = 0, size_fraction: float = 0.2,
                 margin: int = 1, n_neurons: int = 2, steps: int = 40, step_size: float = 0.05,
                 reference_epochs: int = 2, batch: int = 256, probes: int = 8):
        super().__init__(target, rate, seed)
        self.size_fraction, self.margin, self.n_neurons = float(size_fraction), int(margin), int(n_neurons)
        self.steps, self.step_size = int(steps), float(step_size)
        self.reference_epochs, self.batch, self.probes = int(reference_epochs), int(batch), max(2, int(probes))
        self.pattern: np.ndarray | None = None  # C×s×s in [0, 1], set by prepare()
        self.neurons: list[int] = []
        self.excitement: tuple[float, float] | None = None  # chosen units' mean activation: (start, end) of the search

    def _size(self, h: int, w: int) -> int:
        return max(2, int(round(self.size_fraction * min(h, w))))

    def prepare(self, train: ImageSet, *, model_factory=None, device=None) -> None:
        model = train_reference_model(train, model_factory, device, self.seed, epochs=self.reference_epochs,
                                      attack_name=self.name)
        dev = next(model.parameters()).device
        head = last_linear(model)

        c, h, w = train.shape
        size = self._size(h, w)
        top, left = patch_box(h, w, size, self.margin)
        rng = np.random.default_rng([self.seed, 11])
        pick = rng.choice(len(train), size=min(self.batch, len(train)), replace=False)
        images = to_device(train.x[np.sort(pick)], dev)

        def stamp(pattern: torch.Tensor) -> torch.Tensor:
            stamped = images.clone()
            stamped[:, :, top : top + size, left : left + size] = pattern
            return stamped

        feats: dict[str, torch.Tensor] = {}
        hook = head.register_forward_pre_hook(lambda _m, args: feats.__setitem__("x", args[0]))
        history: list[float] = []
        try:
            with torch.no_grad():  # controllability probe: activation spread under random binary patches
                probes = torch.from_numpy((rng.random((self.probes, c, size, size)) < 0.5).astype(np.float32)).to(dev)
                responses = []
                for probe in probes:
                    model(stamp(probe))
                    responses.append(feats["x"].float())
                spread = torch.stack(responses).std(dim=0).mean(dim=0)
            self.neurons = torch.topk(spread, min(self.n_neurons, len(spread))).indices.tolist()

            pattern = torch.from_numpy(rng.random((c, size, size), dtype=np.float32)).to(dev)
            for _ in range(self.steps + 1):
                pattern.requires_grad_(True)
                model(stamp(pattern))
                excitement = feats["x"][:, self.neurons].mean()
                history.append(float(excitement.detach()))
                if len(history) > self.steps:  # the last pass only measures the final pattern
                    break
                (grad,) = torch.autograd.grad(excitement, pattern)
                pattern = (pattern.detach() + self.step_size * grad.sign()).clamp_(0.0, 1.0)
        finally:
            hook.remove()
        self.excitement = (history[0], history[-1])
        self.pattern = pattern.detach().cpu().numpy().astype(np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        if self.pattern is None:
            raise NBAError(ATTACK_NOT_PREPARED, "the trojan trigger is optimised in prepare(); call prepare() first")
        out = np.array(x, dtype=np.float32, copy=True)
        c, size, _ = self.pattern.shape
        h, w = out.shape[-2:]
        if out.shape[1] != c or size + self.margin > min(h, w):
            raise NBAError(DATA_SHAPE_MISMATCH, f"trojan trigger is {c}×{size}×{size}; images are {out.shape[1:]}")
        top, left = patch_box(h, w, size, self.margin)
        out[:, :, top : top + size, left : left + size] = self.pattern
        return out

    def describe(self) -> dict:
        return {**super().describe(), "neurons": self.neurons, "patch_size": None if self.pattern is None
                else int(self.pattern.shape[-1]), "margin": self.margin}
