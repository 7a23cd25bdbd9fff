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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from ..data.imageset import ImageSet
from ..errors import INVALID_PARAMS, Cancelled, NBAError
from ..models.base import SpecModel
from ..train import iterate_batches
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


@dataclass
class ANPConfig:
    # the paper uses 2000 on CIFAR-10 (GPU); a CPU-sized budget (< 60 s on 2 cores)
    iterations: int = param(200, "optimisation steps of the neuron masks")
    batch_size: int = param(128, "images per step")
    # bound of the multiplicative neuron perturbation
    eps: float = param(0.4, "bound of the adversarial multiplicative neuron perturbation")
    # signed-gradient steps of the inner maximisation
    anp_steps: int = param(1, "gradient steps of the inner (perturbation) maximisation")
    # weight of the natural loss (1 − alpha on the perturbed loss)
    alpha: float = param(0.2, "weight of the natural loss (1 - alpha on the perturbed loss)")
    mask_lr: float = param(0.2, "learning rate of the neuron masks")
    # threshold | fraction
    prune_by: str = param("threshold", "threshold (prune masks below `threshold`) | fraction (prune the lowest `prune_fraction`)")
    threshold: float = param(0.2, "mask value below which a neuron is pruned (prune_by=threshold)")
    prune_fraction: float = param(0.05, "share of neurons pruned (prune_by=fraction)")
    zero_bias: bool = param(False, "also zero the bias of pruned neurons")

    def __post_init__(self) -> None:
        check_range("iterations", self.iterations, 1, 100000)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("eps", self.eps, 0.0, 1.0)
        check_range("anp_steps", self.anp_steps, 1, 20)
        check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("mask_lr", self.mask_lr, 1e-5, 10.0)
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
    it, nat_sum, rob_sum = 0, 0.0, 0.0
    while it < cfg.iterations:
        for idx in iterate_batches(len(y), cfg.batch_size, ctx.generator):
            if it >= cfg.iterations:
                break
            if ctx.should_cancel():
                raise Cancelled()
            idx = idx.to(x.device)
            xb, yb = x[idx], y[idx]
            if cfg.eps > 0:  # inner maximisation over the neuron noise
                pert.reset_noise(ctx.generator)
                for _ in range(cfg.anp_steps):
                    loss_adv = F.cross_entropy(pert.forward(model, xb, perturbed=True), yb)
                    grads = torch.autograd.grad(loss_adv, pert.noise_w + pert.noise_b)
                    with torch.no_grad():
                        for t, g in zip(pert.noise_w + pert.noise_b, grads):
                            t.add_(step_size * g.sign()).clamp_(-cfg.eps, cfg.eps)
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
            it += 1
            nat_sum += float(loss_nat.detach())
            rob_sum += float(loss_rob.detach())
            if it % report_every == 0 or it == cfg.iterations:
                log.append({"stage": "mask", "iteration": it, "loss_nat": nat_sum / report_every,
                            "loss_rob": rob_sum / report_every})
                nat_sum = rob_sum = 0.0
                ctx.progress("mask", it / cfg.iterations)
    return pert


def select_pruned(masks: list[torch.Tensor], cfg: ANPConfig) -> list[torch.Tensor]:
    """Per BN layer, a boolean vector of neurons to prune (below threshold, or the globally lowest fraction)."""
    if cfg.prune_by == "threshold":
        return [m < cfg.threshold for m in masks]
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
