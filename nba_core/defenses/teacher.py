"""The teacher shared by NAD and NBA: the suspect model fine-tuned hard on the clean subset with augmentation.

NBA.md §5 lesson 1: a small learning rate leaves the backdoor intact, so the teacher is trained at lr 0.1 with
±2 px shifts (and flips where labels allow) -- enough to break the backdoor at some cost in accuracy, which the
student then recovers.
"""

from __future__ import annotations

import copy

import torch

from ..models.base import SpecModel
from ..train import TrainConfig, train_classifier
from .base import DefenseContext


def train_teacher(model: SpecModel, x: torch.Tensor, y: torch.Tensor, ctx: DefenseContext, *,
                  epochs: int = 10, lr: float = 0.1, shift: int = 2, batch_size: int = 64,
                  train_config: TrainConfig | None = None) -> tuple[SpecModel, list[dict]]:
    """Return a frozen, eval-mode copy of `model` fine-tuned on (x, y); `model` itself is untouched.
    `train_config` replaces the default recipe entirely (NAD passes its authors' schedule)."""
    teacher = copy.deepcopy(model)
    cfg = train_config or TrainConfig(epochs=epochs, lr=lr, shift=shift, hflip=ctx.hflip, batch_size=batch_size,
                                      weight_decay=5e-4)
    log = train_classifier(teacher, x, y, cfg, generator=ctx.generator, progress=ctx.progress,
                           should_cancel=ctx.should_cancel, stage="teacher")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, log
