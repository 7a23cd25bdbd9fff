"""SAU: Shared Adversarial Unlearning (Wei, Zhang, Zha & Wu, NeurIPS 2023).

A backdoored model's triggered inputs are adversarial examples that the model shares with any network trained on
the same poisoned data. SAU keeps a frozen copy f₀ of the suspect model and, per batch of the clean subset:

1. maximisation -- per-image perturbations δ (L∞ ≤ trigger_norm, pixel units, started at +trigger_norm) that are
   adversarial for BOTH the student f and f₀ and push them to the SAME wrong label: signed-gradient descent on
   β₁·L_adv + β₂·L_share, where L_adv = −½·(CE(f(x+δ), y) + CE(f₀(x+δ), y)) over the images each model still
   classifies as on clean input, and L_share = the Jensen-Shannon divergence between f and f₀ on x+δ over the
   images not yet attacked in a shared way (stops early once every image is);
2. minimisation -- one Adam step on λ₁·CE(f(x), y) + λ₂·CE(f(x+δ), y) + λ₃·L_sar, where L_sar asks f to give low
   probability to the wrong label f₀ predicts on x+δ, over the images f₀ is fooled on.

Both models stay in eval mode (BatchNorm frozen, as in the authors' default), no augmentation.
Hyperparameters and deviations: docs/baselines.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..data.imageset import ImageSet
from ..errors import Cancelled
from ..models.base import SpecModel
from ..train import iterate_batches
from .base import Defense, DefenseContext, DefenseResult, StageTimer
from .finetune import check_range, clean_tensors, working_copy


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class SAUConfig:
    """Defaults = BackdoorBench's SAU (SCLBD/BackdoorBench defense/sau.py + config/defense/sau/config.yaml, the
    official implementation by the paper's first author)."""

    rounds: int = _param(100, "passes over the clean subset (authors: n_rounds 100)")
    batch_size: int = _param(256, "mini-batch size (authors: 256)")
    lr: float = _param(1e-4, "Adam learning rate of the unlearning step, constant (authors: 1e-4; their cosine "
                             "scheduler is built but never stepped)")
    weight_decay: float = _param(0.0, "Adam weight decay (authors: 0)")
    trigger_norm: float = _param(0.2, "L∞ bound of the shared adversarial perturbation, pixel units (authors: 0.2)")
    adv_lr: float = _param(0.2, "signed-gradient step size of the perturbation search (authors: 0.2)")
    adv_steps: int = _param(5, "steps of the perturbation search per batch (authors: 5)")
    beta_adv: float = _param(0.01, "β₁: weight of the adversarial loss in the search (authors: 0.01)")
    beta_share: float = _param(1.0, "β₂: weight of the shared (JS-divergence) loss in the search (authors: 1)")
    lmd_clean: float = _param(1.0, "λ₁: weight of clean cross-entropy in unlearning (authors: 1)")
    lmd_adv: float = _param(0.0, "λ₂: weight of adversarial-training cross-entropy (authors: 0, off)")
    lmd_shared: float = _param(1.0, "λ₃: weight of the shared adversarial risk L_sar (authors: 1)")

    def __post_init__(self) -> None:
        check_range("rounds", self.rounds, 1, 10000)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("lr", self.lr, 1e-8, 0.1)
        check_range("weight_decay", self.weight_decay, 0.0, 0.1)
        check_range("trigger_norm", self.trigger_norm, 0.0, 1.0)
        check_range("adv_lr", self.adv_lr, 0.0, 1.0)
        check_range("adv_steps", self.adv_steps, 1, 100)
        for name in ("beta_adv", "beta_share", "lmd_clean", "lmd_adv", "lmd_shared"):
            check_range(name, getattr(self, name), 0.0, 100.0)


def shared_perturbation(model: nn.Module, reference: nn.Module, x: torch.Tensor, y: torch.Tensor,
                        cfg: SAUConfig) -> torch.Tensor:
    """Per-image δ (pixel units, L∞ ≤ trigger_norm) adversarial for both models towards a shared label."""
    bound = cfg.trigger_norm
    delta = torch.full_like(x, bound)  # the authors' 'max' initialisation
    with torch.no_grad():
        clean_pred = model(x).argmax(1)
        clean_pred_ref = reference(x).argmax(1)
    n = len(x)
    for _ in range(cfg.adv_steps):
        delta.requires_grad_(True)
        logits, logits_ref = model(x + delta).float(), reference(x + delta).float()
        pred, pred_ref = logits.argmax(1), logits_ref.argmax(1)
        fooled, fooled_ref = pred != clean_pred, pred_ref != clean_pred_ref
        shared = fooled & fooled_ref & (pred == pred_ref)
        ce = F.cross_entropy(logits, y, reduction="none")
        ce_ref = F.cross_entropy(logits_ref, y, reduction="none")
        loss_adv = -((ce * (~fooled)).sum() + (ce_ref * (~fooled_ref)).sum()) / (2 * n)
        p = F.softmax(logits, 1).clamp(min=1e-8)
        p_ref = F.softmax(logits_ref, 1).clamp(min=1e-8)
        mix = 0.5 * (p + p_ref)
        js = 0.5 * (p * (p / mix).log() + p_ref * (p_ref / mix).log()).sum(1)
        loss_share = (js * (~shared)).sum() / n
        (grad,) = torch.autograd.grad(cfg.beta_adv * loss_adv + cfg.beta_share * loss_share, delta)
        delta = (delta.detach() - cfg.adv_lr * grad.sign()).clamp(-bound, bound)
        if bool(shared.all()):
            break
    return delta.detach()


def shared_adversarial_risk(logits_adv: torch.Tensor, pred_adv_ref: torch.Tensor, poisoned: torch.Tensor,
                            n: int) -> torch.Tensor:
    """L_sar: on images where the frozen model is fooled, push the student's probability of the frozen model's
    adversarial label down (both halves of the authors' symmetric, clamped log form), averaged over the batch."""
    if not bool(poisoned.any()):
        return logits_adv.new_zeros(())
    prob = F.softmax(logits_adv, 1)
    onehot = F.one_hot(pred_adv_ref, prob.shape[1]).to(prob.dtype)
    p_wrong = (prob * onehot).sum(1)[poisoned]
    p_rest = (prob * (1 - onehot)).sum(1)[poisoned]
    loss = -torch.log(1e-6 + p_rest.clamp(max=0.999)).sum() - torch.log(1 + 1e-6 - p_wrong.clamp(min=0.001)).sum()
    return loss / 2 / n


class SAU(Defense):
    name = "sau"
    Config = SAUConfig
    stages = ("unlearn",)

    def run(self, model: SpecModel, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg = self.config
        timer = StageTimer()
        x, y = clean_tensors(clean, ctx.device)
        net = working_copy(model, ctx.device)
        reference = copy.deepcopy(net).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        net.eval()  # BatchNorm frozen throughout (the authors' default, train_mode False)
        opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        log: list[dict] = []
        with timer("unlearn"):
            ctx.progress("unlearn", 0.0)
            for r in range(cfg.rounds):
                sums = {"loss": 0.0, "shared_fooled": 0, "images": 0}
                for idx in iterate_batches(len(y), cfg.batch_size, ctx.generator):
                    if ctx.should_cancel():
                        raise Cancelled()
                    idx = idx.to(ctx.device)
                    xb, yb = x[idx], y[idx]
                    for p in net.parameters():
                        p.requires_grad_(False)
                    delta = shared_perturbation(net, reference, xb, yb, cfg)
                    for p in net.parameters():
                        p.requires_grad_(True)
                    x_adv = xb + delta
                    logits, logits_adv = net(torch.cat([xb, x_adv])).float().split(len(xb))
                    with torch.no_grad():
                        ref_clean = reference(xb).argmax(1)
                        ref_adv = reference(x_adv).argmax(1)
                    poisoned = (ref_adv != yb) & (ref_adv != ref_clean)
                    loss = cfg.lmd_clean * F.cross_entropy(logits, yb)
                    if cfg.lmd_adv > 0:
                        loss = loss + cfg.lmd_adv * F.cross_entropy(logits_adv, yb)
                    loss = loss + cfg.lmd_shared * shared_adversarial_risk(logits_adv, ref_adv, poisoned, len(xb))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sums["loss"] += float(loss.detach()) * len(idx)
                    sums["shared_fooled"] += int(((logits_adv.argmax(1) == ref_adv) & poisoned).sum())
                    sums["images"] += len(idx)
                log.append({"stage": "unlearn", "round": r + 1, "loss": sums["loss"] / sums["images"],
                            "shared_fooled_rate": sums["shared_fooled"] / sums["images"]})
                ctx.progress("unlearn", (r + 1) / cfg.rounds)
        net.eval()
        for p in net.parameters():
            p.requires_grad_(False)
        return DefenseResult(model=net, log=log, stage_seconds=timer.seconds,
                             info={"rounds": cfg.rounds, "final_shared_fooled_rate": log[-1]["shared_fooled_rate"]})
