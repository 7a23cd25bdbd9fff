"""The wrapper every architecture lives in: input normalisation plus the declared behaviour layers."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class Normalize(nn.Module):
    """(x - mean) / std, with non-persistent buffers so checkpoints hold only learned weights."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SpecModel(nn.Module):
    """A network that takes pixels in [0, 1]. `behavior_layers` names the stage outputs (module names within
    this wrapper) that defenses read; each architecture declares them, no defense hard-codes them."""

    def __init__(self, net: nn.Module, mean, std):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = net
        self.behavior_layers: tuple[str, ...] = tuple(f"net.{n}" for n in net.behavior_layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


@contextlib.contextmanager
def capture_outputs(model: nn.Module, layer_names: tuple[str, ...] | list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the forward outputs of the named modules into a dict (overwritten on every forward)."""
    modules = dict(model.named_modules())
    missing = [n for n in layer_names if n not in modules]
    if missing:
        raise KeyError(f"layers not in model: {missing}")
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in layer_names:
        def hook(_m, _inp, out, name=name):
            store[name] = out[0] if isinstance(out, (tuple, list)) else out  # e.g. a Swin stage
        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()
