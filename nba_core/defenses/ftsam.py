"""FT-SAM: fine-tuning with sharpness-aware minimisation (Zhu, Wei, Shen, Fan & Wu, "Enhancing Fine-Tuning Based
Backdoor Defense with Sharpness-Aware Minimization", ICCV 2023).

Backdoor neurons sit in sharp regions of the loss surface whose weights have large norms; minimising the worst
loss in an (adaptive) neighbourhood of the weights moves them further than plain fine-tuning does. Each step:

1. g = ∇L(w) on the batch; e = ρ · T_w² g / ‖T_w g‖ with T_w = |w| (adaptive SAM, ASAM) or 1 (plain SAM);
2. g' = ∇L(w + e) on the same batch; restore w and let SGD take the step with g'.

L is label-smoothed cross-entropy. Hyperparameters and deviations: docs/baselines.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.imageset import ImageSet
from ..errors import Cancelled
from ..models.base import SpecModel
from ..train import TrainConfig, augment, iterate_batches, make_optimizer, recipe_for
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from .finetune import check_range, clean_tensors, working_copy


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class FTSAMConfig:
    """Defaults = BackdoorBench's FT-SAM (SCLBD/BackdoorBench defense/ft-sam.py + config/defense/ft-sam/config.yaml,
    maintained by the paper's authors)."""

    epochs: int = _param(100, "passes over the clean subset (authors: 100)")
    batch_size: int = _param(256, "mini-batch size (authors: 256)")
    lr: float = _param(0.01, "SGD learning rate, cosine-annealed to 0 over the run (authors: 0.01, CosineAnnealingLR)")
    momentum: float = _param(0.9, "SGD momentum (authors: 0.9)")
    weight_decay: float = _param(5e-4, "SGD weight decay (authors: 5e-4)")
    rho: float = _param(2.0, "radius of the weight neighbourhood (authors: rho_max = rho_min = 2.0)")
    adaptive: bool = _param(True, "adaptive SAM: scale the neighbourhood by |w| (authors: on)")
    label_smoothing: float = _param(0.1, "label smoothing of the cross-entropy (authors: 0.1)")
    shift: int = _param(4, "random translation up to ±shift px, i.e. RandomCrop padding (authors' train "
                           "transform: padding 4)")

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 1, 1000)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("lr", self.lr, 1e-6, 1.0)
        check_range("momentum", self.momentum, 0.0, 0.999)
        check_range("weight_decay", self.weight_decay, 0.0, 0.1)
        check_range("rho", self.rho, 0.0, 100.0)
        check_range("label_smoothing", self.label_smoothing, 0.0, 0.5)
        check_range("shift", self.shift, 0, 8)


@torch.no_grad()
def sam_perturbation(params: list[torch.Tensor], rho: float, adaptive: bool) -> list[torch.Tensor]:
    """The ascent step e(w) from the gradients currently in p.grad (zeros where a parameter has no gradient)."""
    scaled = [(p.abs() if adaptive else 1.0) * p.grad for p in params if p.grad is not None]
    norm = torch.norm(torch.stack([s.norm(2) for s in scaled]), 2) if scaled else torch.zeros(())
    scale = rho / (float(norm) + 1e-12)
    return [torch.zeros_like(p) if p.grad is None else (p.pow(2) if adaptive else 1.0) * p.grad * scale
            for p in params]


class FTSAM(Defense):
    name = "ftsam"
    Config = FTSAMConfig
    stages = ("finetune",)

    def run(self, model: SpecModel, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg = self.config
        timer = StageTimer()
        x, y = clean_tensors(clean, ctx.device)
        net = working_copy(model, ctx.device)
        params = [p for p in net.parameters() if p.requires_grad]
        total_steps = cfg.epochs * max(1, math.ceil(len(y) / cfg.batch_size))
        # Transformer families get the AdamW equivalent of the recipe; which families is train.recipe_for's rule.
        recipe = recipe_for(net, TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                             momentum=cfg.momentum, weight_decay=cfg.weight_decay))
        if recipe.optimizer == "adamw":
            opt, sched = make_optimizer(params, recipe, total_steps)
        else:  # the authors': plain (not Nesterov) momentum SGD, cosine-annealed
            opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            sched = torch.optim.lr_scheduler.LambdaLR(
                opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps)))

        def loss_of(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(net(xb).float(), yb, label_smoothing=cfg.label_smoothing)

        log: list[dict] = []
        with timer("finetune"):
            for epoch in range(cfg.epochs):
                net.train()
                loss_sum, seen = 0.0, 0
                for idx in iterate_batches(len(y), cfg.batch_size, ctx.generator):
                    if ctx.should_cancel():
                        raise Cancelled()
                    idx = idx.to(ctx.device)
                    xb = augment(x[idx], shift=cfg.shift, hflip=ctx.hflip, generator=ctx.generator)
                    yb = y[idx]
                    opt.zero_grad(set_to_none=True)
                    loss = loss_of(xb, yb)
                    loss.backward()
                    with torch.no_grad():
                        steps = sam_perturbation(params, cfg.rho, cfg.adaptive)
                        for p, e in zip(params, steps):
                            p.add_(e)
                    opt.zero_grad(set_to_none=True)
                    loss_of(xb, yb).backward()
                    with torch.no_grad():
                        for p, e in zip(params, steps):
                            p.sub_(e)
                    opt.step()
                    sched.step()
                    loss_sum += float(loss.detach()) * len(idx)
                    seen += len(idx)
                log.append({"stage": "finetune", "epoch": epoch + 1, "loss": loss_sum / seen})
                ctx.progress("finetune", (epoch + 1) / cfg.epochs)
        net.eval()
        return DefenseResult(model=net, log=log, stage_seconds=timer.seconds, info={"clean_samples": len(clean)})
