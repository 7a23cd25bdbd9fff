"""NAD: Neural Attention Distillation (Li et al., ICLR 2021), the closest verified ancestor of NBA (NBA.md §2).

Teacher = the suspect model fine-tuned on the clean subset with the authors' recipe (and β = 0); student = the
suspect model trained on the same subset with `CE + Σ_l β_l · attention_distance(S_l, T_l)` over the stage outputs
the architecture declares (`model.behavior_layers`), teacher frozen in eval mode. Hyperparameters and the remaining
deviations from the authors' code: docs/baselines.md.

β: BackdoorBench uses 500/1000/1000 on the last three stages (for PreAct-ResNet18 it skips the first of four);
`betas=()` applies exactly that rule (earlier stages get 0); pass one value per behaviour layer to override.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class NADConfig:
    """Defaults = the authors' recipe (bboylyg/NAD: config.py, main.py, utils/util.py, data_loader.py; see
    docs/baselines.md). The teacher is trained with the same recipe and β = 0 for `teacher_epochs`."""

    teacher_epochs: int = _param(10, "epochs of the teacher's fine-tuning on the clean subset (authors: 10)")
    epochs: int = _param(20, "epochs of the student's attention distillation (authors: 20)")
    lr: float = _param(0.1, "SGD learning rate for the first lr_drop_epoch epochs (authors: 0.1)")
    lr_after: float = _param(0.01, "SGD learning rate from epoch lr_drop_epoch on (authors: 0.01)")
    lr_drop_epoch: int = _param(2, "epoch at which the learning rate drops to lr_after (authors: 2)")
    batch_size: int = _param(64, "mini-batch size (authors: 64)")
    momentum: float = _param(0.9, "SGD momentum, Nesterov (authors: 0.9)")
    weight_decay: float = _param(1e-4, "SGD weight decay (authors: 1e-4)")
    shift: int = _param(4, "random translation up to ±shift px, i.e. RandomCrop with padding (authors: padding 4)")
    cutout: int = _param(3, "side of the one square Cutout hole per image (authors: Cutout(1, 3))")
    betas: tuple = _param((), "one attention-loss weight β per behaviour layer; () = 500/1000/1000 on the deepest "
                              "three stages, 0 before them")
    p: float = _param(2.0, "exponent of the attention map Σ_c |F_c|^p (authors: 2)")

    def __post_init__(self) -> None:
        check_range("teacher_epochs", self.teacher_epochs, 1, 1000)
        check_range("epochs", self.epochs, 1, 1000)
        check_range("lr", self.lr, 1e-6, 1.0)
        check_range("lr_after", self.lr_after, 1e-7, 1.0)
        check_range("lr_drop_epoch", self.lr_drop_epoch, 0, 1000)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("momentum", self.momentum, 0.0, 0.999)
        check_range("weight_decay", self.weight_decay, 0.0, 0.1)
        check_range("shift", self.shift, 0, 8)
        check_range("cutout", self.cutout, 0, 16)
        check_range("p", self.p, 0.5, 8.0)
        if not all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b <= 1e5 for b in self.betas):
            raise NBAError(INVALID_PARAMS, f"betas must be numbers in [0, 1e5], got {self.betas!r}")

    def train_config(self, epochs: int, hflip: bool) -> TrainConfig:
        """The authors' optimiser and schedule: lr for lr_drop_epoch epochs, then lr_after (util.adjust_learning_rate)."""
        lrs = (self.lr,) * self.lr_drop_epoch + (self.lr_after,)
        return TrainConfig(epochs=epochs, lr=self.lr, batch_size=self.batch_size, momentum=self.momentum,
                           weight_decay=self.weight_decay, shift=self.shift, hflip=hflip, cutout=self.cutout,
                           epoch_lrs=lrs)


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
            teacher, log = train_teacher(student, x, y, ctx,
                                         train_config=cfg.train_config(cfg.teacher_epochs, ctx.hflip))
        tcfg = cfg.train_config(cfg.epochs, ctx.hflip)
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
