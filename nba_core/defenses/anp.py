"""ANP: Adversarial Neuron Pruning (Wu & Wang, NeurIPS 2021).

Backdoored networks are sensitive to small perturbations of a few neurons. ANP learns a mask m ∈ [0, 1] per
BatchNorm neuron while an adversary multiplies the BN affine parameters by (m + δ) and (1 + ξ), |δ|, |ξ| ≤ ε:

    min_m  α · CE(f(x; m)) + (1 − α) · max_{δ,ξ} CE(f(x; m + δ, 1 + ξ))

(the inner max: random start in [−ε, ε] then `anp_steps` signed-gradient steps), then prunes neurons whose mask
falls below a threshold (or the lowest fraction). The architectures are not rewritten: the perturbed forward is a
`torch.func.functional_call` that substitutes the BN weights/biases. As in the reference implementation, BN uses
batch statistics while masks are learned (train mode, on a throw-away copy) and pruning is applied to the
*original* weights: a pruned neuron gets weight 0 (its output becomes the constant bias, which is what the mask
modelled); `zero_bias=True` also zeroes the bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data.imageset import ImageSet
from ..errors import INVALID_PARAMS, Cancelled, NBAError
from ..models.base import SpecModel
from ..train import augment
from .base import Defense, DefenseContext, DefenseResult, StageTimer, param
from .finetune import check_range, clean_tensors, working_copy

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """All affine BatchNorm modules (the 'neurons' ANP masks), in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _BN) and m.affine]


class NeuronPerturbation:
    """Mask m (learned) and adversarial noise δ (weight) / ξ (bias) for every BN neuron of a model."""

    def __init__(self, model: nn.Module, eps: float):
        self.layers = bn_layers(model)
        if not self.layers:
            raise NBAError(INVALID_PARAMS, "ANP needs BatchNorm layers; this architecture has none")
        self.eps = eps
        dev = self.layers[0][1].weight.device
        self.masks = [torch.ones(m.num_features, device=dev, requires_grad=True) for _, m in self.layers]
        self.noise_w = [torch.zeros(m.num_features, device=dev, requires_grad=True) for _, m in self.layers]
        self.noise_b = [torch.zeros(m.num_features, device=dev, requires_grad=True) for _, m in self.layers]

    def reset_noise(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for t in self.noise_w + self.noise_b:
                r = torch.rand(t.shape, generator=generator).to(t.device)
                t.copy_((2 * r - 1) * self.eps)

    def overrides(self, perturbed: bool) -> dict[str, torch.Tensor]:
        """BN weight/bias substitutes: w·(m + δ), b·(1 + ξ) when perturbed; w·m, b otherwise."""
        out: dict[str, torch.Tensor] = {}
        for (name, bn), m, dw, db in zip(self.layers, self.masks, self.noise_w, self.noise_b):
            w, b = bn.weight.detach(), bn.bias.detach()
            out[f"{name}.weight"] = w * (m + dw) if perturbed else w * m
            out[f"{name}.bias"] = b * (1 + db) if perturbed else b
        return out

    def forward(self, model: nn.Module, x: torch.Tensor, perturbed: bool) -> torch.Tensor:
        return functional_call(model, self.overrides(perturbed), (x,), strict=False)

    def mask_values(self) -> list[torch.Tensor]:
        return [m.detach().clone() for m in self.masks]


def _param(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass
class ANPConfig:
    """Defaults = the authors' (csdongxian/ANP_backdoor: optimize_mask_cifar.py, prune_neuron_cifar.py, README;
    see docs/baselines.md)."""

    iterations: int = _param(2000, "mask-optimisation iterations, one mini-batch each (authors: nb-iter 2000)")
    batch_size: int = _param(128, "images per iteration, drawn with replacement (authors: 128, RandomSampler "
                                  "with replacement)")
    eps: float = _param(0.4, "bound of the random start of the multiplicative neuron noise (authors: anp-eps 0.4)")
    anp_steps: int = _param(1, "signed-gradient steps of the inner maximisation, each of size eps/anp_steps "
                               "(authors: 1)")
    alpha: float = _param(0.2, "weight of the natural loss; 1 − alpha weighs the perturbed loss (authors: 0.2)")
    mask_lr: float = _param(0.2, "SGD (momentum 0.9) learning rate of the masks (authors: 0.2)")
    shift: int = _param(4, "random translation up to ±shift px of each batch, i.e. RandomCrop padding (authors: 4)")
    prune_by: str = _param("threshold", "threshold: prune neurons whose mask ≤ threshold; fraction: the lowest "
                                        "prune_fraction of all neurons")
    threshold: float = _param(0.2, "mask value at or below which a neuron is pruned (authors' README: 0.2)")
    prune_fraction: float = _param(0.05, "share of all neurons pruned when prune_by = fraction")
    zero_bias: bool = _param(False, "also zero the pruned neurons' BN bias (authors: weight only)")

    def __post_init__(self) -> None:
        check_range("iterations", self.iterations, 1, 100000)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("eps", self.eps, 0.0, 1.0)
        check_range("anp_steps", self.anp_steps, 1, 20)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("mask_lr", self.mask_lr, 1e-5, 10.0)
        check_range("shift", self.shift, 0, 8)
        check_range("threshold", self.threshold, 0.0, 1.0)
        check_range("prune_fraction", self.prune_fraction, 0.0, 0.9)
        if self.prune_by not in ("threshold", "fraction"):
            raise NBAError(INVALID_PARAMS, f"anp.prune_by must be threshold or fraction, got {self.prune_by!r}")


def learn_masks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: ANPConfig, ctx: DefenseContext,
                log: list[dict]) -> NeuronPerturbation:
    """Optimise the neuron masks of a (throw-away) copy against adversarial neuron perturbations."""
    for p in model.parameters():
        p.requires_grad_(False)
    model.train()  # batch statistics, as in the reference implementation
    pert = NeuronPerturbation(model, cfg.eps)
    mask_opt = torch.optim.SGD(pert.masks, lr=cfg.mask_lr, momentum=0.9)
    step_size = cfg.eps / cfg.anp_steps
    report_every = max(1, cfg.iterations // 50)
    nat_sum, rob_sum = 0.0, 0.0
    for it in range(cfg.iterations):
        if ctx.should_cancel():
            raise Cancelled()
        # As the authors: every batch is drawn with replacement from D and augmented.
        idx = torch.randint(len(y), (cfg.batch_size,), generator=ctx.generator).to(x.device)
        xb = augment(x[idx], shift=cfg.shift, hflip=ctx.hflip, generator=ctx.generator)
        yb = y[idx]
        if cfg.eps > 0:  # inner maximisation over the neuron noise
            pert.reset_noise(ctx.generator)
            for _ in range(cfg.anp_steps):
                loss_adv = F.cross_entropy(pert.forward(model, xb, perturbed=True), yb)
                grads = torch.autograd.grad(loss_adv, pert.noise_w + pert.noise_b)
                with torch.no_grad():
                    # No projection after the step: the authors' noise optimiser only takes the signed step,
                    # so the noise may end up to 2·eps from 0 (random start + one step of eps).
                    for t, g in zip(pert.noise_w + pert.noise_b, grads):
                        t.add_(step_size * g.sign())
            loss_rob = F.cross_entropy(pert.forward(model, xb, perturbed=True), yb)
        else:
            loss_rob = torch.zeros((), device=x.device)
        loss_nat = F.cross_entropy(pert.forward(model, xb, perturbed=False), yb)
        loss = cfg.alpha * loss_nat + (1 - cfg.alpha) * loss_rob
        mask_opt.zero_grad(set_to_none=True)
        loss.backward()
        mask_opt.step()
        with torch.no_grad():
            for m in pert.masks:
                m.clamp_(0.0, 1.0)
        nat_sum += float(loss_nat.detach())
        rob_sum += float(loss_rob.detach())
        if (it + 1) % report_every == 0 or it + 1 == cfg.iterations:
            log.append({"stage": "mask", "iteration": it + 1, "loss_nat": nat_sum / report_every,
                        "loss_rob": rob_sum / report_every})
            nat_sum = rob_sum = 0.0
            ctx.progress("mask", (it + 1) / cfg.iterations)
    return pert


def select_pruned(masks: list[torch.Tensor], cfg: ANPConfig) -> list[torch.Tensor]:
    """Per BN layer, a boolean vector of neurons to prune (below threshold, or the globally lowest fraction)."""
    if cfg.prune_by == "threshold":
        return [m <= cfg.threshold for m in masks]  # the authors prune values <= threshold
    flat = torch.cat(masks)
    k = int(round(cfg.prune_fraction * flat.numel()))
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        chosen[torch.argsort(flat.cpu(), stable=True)[:k].to(flat.device)] = True
    return list(torch.split(chosen, [m.numel() for m in masks]))


def prune_bn_neurons(model: nn.Module, pruned: list[torch.Tensor], zero_bias: bool) -> None:
    """Zero the BN weight (and optionally bias) of pruned neurons, in place; `pruned` follows bn_layers order."""
    with torch.no_grad():
        for (_, bn), sel in zip(bn_layers(model), pruned):
            bn.weight[sel] = 0.0
            if zero_bias:
                bn.bias[sel] = 0.0


class ANP(Defense):
    name = "anp"
    Config = ANPConfig
    stages = ("mask", "prune")

    def run(self, model: SpecModel, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg = self.config
        timer = StageTimer()
        x, y = clean_tensors(clean, ctx.device)
        log: list[dict] = []
        with timer("mask"):
            ctx.progress("mask", 0.0)
            pert = learn_masks(working_copy(model, ctx.device), x, y, cfg, ctx, log)
        with timer("prune"):
            masks = pert.mask_values()
            pruned = select_pruned(masks, cfg)
            net = working_copy(model, ctx.device)  # pristine weights and running statistics
            prune_bn_neurons(net, pruned, cfg.zero_bias)
            net.eval()
            ctx.progress("prune", 1.0)
        names = [n for n, _ in pert.layers]
        info = {
            "bn_layers": len(names),
            "neurons": int(sum(m.numel() for m in masks)),
            "pruned": int(sum(int(s.sum()) for s in pruned)),
            "pruned_per_layer": {n: int(s.sum()) for n, s in zip(names, pruned)},
            "mask_mean": float(torch.cat(masks).mean()),
        }
        return DefenseResult(model=net, log=log, stage_seconds=timer.seconds, info=info)
