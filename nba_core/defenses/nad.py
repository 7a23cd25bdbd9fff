"""NAD: Neural Attention Distillation (Li et al., ICLR 2021), the closest verified ancestor of NBA (NBA.md §2).

Teacher = the suspect model fine-tuned hard on the clean subset (defenses/teacher.py, shared with NBA); student =
the suspect model trained on the same subset with `CE + Σ_l β_l · attention_distance(S_l, T_l)` over the stage
outputs the architecture declares (`model.behavior_layers`), teacher frozen in eval mode.

β: BackdoorBench uses 500/1000/1000 on the last three stages (for PreAct-ResNet18 it skips the first of four);
`betas=()` applies exactly that rule (earlier stages get 0); pass one value per behaviour layer to override.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..data.imageset import ImageSet
from ..errors import INVALID_PARAMS, NBAError
from ..models.base import SpecModel, capture_outputs
from ..train import TrainConfig, train_classifier
from .base import Defense, DefenseContext, DefenseResult, StageTimer, param
from .behavior import attention_distance
from .finetune import check_range, clean_tensors, working_copy
from .teacher import train_teacher


def default_betas(n_layers: int) -> tuple[float, ...]:
    """BackdoorBench's 500/1000/1000 on the deepest three stages, 0 before them (fewer stages: the deepest ones)."""
    tail = (500.0, 1000.0, 1000.0)[-n_layers:] if n_layers <= 3 else (500.0, 1000.0, 1000.0)
    return (0.0,) * (n_layers - len(tail)) + tail


def attention_loss(student_feats: dict[str, torch.Tensor], teacher_feats: dict[str, torch.Tensor],
                   layers: tuple[str, ...], betas: tuple[float, ...], p: float) -> torch.Tensor:
    """Σ_l β_l · attention_distance over the layers with β_l > 0."""
    total = None
    for layer, beta in zip(layers, betas):
        if beta == 0:
            continue
        term = beta * attention_distance(student_feats[layer], teacher_feats[layer].detach(), p)
        total = term if total is None else total + term
    return total if total is not None else torch.zeros(())


@dataclass
class NADConfig:
    teacher_epochs: int = param(10, "epochs fine-tuning the teacher (a copy of the suspect model) on the clean subset")
    teacher_lr: float = param(0.1, "teacher fine-tuning learning rate")
    teacher_shift: int = param(2, "random translation (pixels) while fine-tuning the teacher")
    epochs: int = param(20, "epochs of attention distillation into the student")
    lr: float = param(0.01, "student learning rate")
    batch_size: int = param(64, "images per step")
    momentum: float = param(0.9, "SGD momentum")
    weight_decay: float = param(1e-4, "L2 weight decay")
    shift: int = param(2, "random translation (pixels) while distilling")
    # one β per behaviour layer; () = BackdoorBench's rule (default_betas)
    betas: tuple = param((), "attention-loss weight per behaviour layer; empty = BackdoorBench's defaults")
    p: float = param(2.0, "exponent of the attention maps")  # attention map exponent

    def __post_init__(self) -> None:
        check_range("teacher_epochs", self.teacher_epochs, 1, 1000)
        check_range("teacher_lr", self.teacher_lr, 1e-6, 1.0)
        check_range("teacher_shift", self.teacher_shift, 0, 8)
        check_range("epochs", self.epochs, 1, 1000)
        check_range("lr", self.lr, 1e-6, 1.0)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("momentum", self.momentum, 0.0, 0.999)
        check_range("weight_decay", self.weight_decay, 0.0, 0.1)
        check_range("shift", self.shift, 0, 8)
        check_range("p", self.p, 0.5, 8.0)
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= 1e5 for b in self.betas):
            raise NBAError(INVALID_PARAMS, f"betas must be numbers in [0, 1e5], got {self.betas!r}")


class NAD(Defense):
    name = "nad"
    Config = NADConfig
    stages = ("teacher", "student")

    def resolve_betas(self, n_layers: int) -> tuple[float, ...]:
        if not self.config.betas:
            return default_betas(n_layers)
        if len(self.config.betas) != n_layers:
            raise NBAError(INVALID_PARAMS, f"nad.betas needs one value per behaviour layer ({n_layers}), "
                                           f"got {len(self.config.betas)}")
        return tuple(float(b) for b in self.config.betas)

    def run(self, model: SpecModel, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg = self.config
        timer = StageTimer()
        layers = tuple(model.behavior_layers)
        betas = self.resolve_betas(len(layers))
        x, y = clean_tensors(clean, ctx.device)
        student = working_copy(model, ctx.device)
        with timer("teacher"):
            teacher, log = train_teacher(student, x, y, ctx, epochs=cfg.teacher_epochs, lr=cfg.teacher_lr,
                                         shift=cfg.teacher_shift, batch_size=cfg.batch_size)
        tcfg = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=cfg.momentum,
                           weight_decay=cfg.weight_decay, shift=cfg.shift, hflip=ctx.hflip)
        with timer("student"), capture_outputs(student, layers) as s_feats, capture_outputs(teacher, layers) as t_feats:

            def distill(_m: nn.Module, xb: torch.Tensor, _yb: torch.Tensor, _logits: torch.Tensor) -> torch.Tensor:
                # s_feats holds the student's features of this very forward; the teacher sees the same batch.
                with torch.no_grad():
                    teacher(xb)
                return attention_loss(s_feats, t_feats, layers, betas, cfg.p).to(xb.device)

            log += train_classifier(student, x, y, tcfg, generator=ctx.generator, extra_loss=distill,
                                    progress=ctx.progress, should_cancel=ctx.should_cancel, stage="student")
        student.eval()
        info = {"layers": list(layers), "betas": list(betas)}
        return DefenseResult(model=student, log=log, stage_seconds=timer.seconds, info=info)
