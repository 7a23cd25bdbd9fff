"""FP: Fine-Pruning (Liu, Dolan-Gavitt & Garg, RAID 2018).

1. Rank the channels of the last behaviour layer (`model.behavior_layers[-1]`) by their mean activation on the
   clean subset: backdoor neurons tend to be dormant on clean inputs.
2. Prune them in increasing order (a channel mask on the layer's output) until clean accuracy on a held-out slice of
   the clean subset drops by more than `max_acc_drop` (absolute; BackdoorBench stops at a 10 % drop) or
   `max_prune_ratio` of the channels are gone.
3. Fine-tune with the mask in place (a gentle lr, as in the paper).
4. Bake the mask into ordinary weights so the result loads into the same spec: either the layer's own last
   BatchNorm (weight = bias = 0, exact when the layer ends in BN→ReLU) or the first module that consumes the layer
   (BN/conv/linear input columns). Each candidate is verified numerically against the masked network.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from ..data.imageset import ImageSet, stratified_split
from ..errors import Cancelled
from ..models.base import SpecModel, capture_outputs
from ..train import predict_logits, train_classifier
from .base import Defense, DefenseContext, DefenseResult, StageTimer, param
from .behavior import as_feature_map
from .finetune import FineTuningConfig, check_range, clean_tensors, working_copy

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


@torch.no_grad()
def mean_channel_activation(model: nn.Module, layer: str, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Per-channel activation of `layer`'s output averaged over samples and positions (C values)."""
    model.eval()
    total: torch.Tensor | None = None
    with capture_outputs(model, (layer,)) as store:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
            feat = as_feature_map(store[layer]).float()  # tokens B×N×D: channels are D
            s = feat.sum(0).flatten(1).mean(1)
            total = s if total is None else total + s
    assert total is not None
    return total / len(x)


class ChannelMask:
    """Multiplies a layer's output by a 0/1 channel mask through a forward hook (architecture untouched)."""

    def __init__(self, model: nn.Module, layer: str, channels: int):
        self.module = dict(model.named_modules())[layer]
        self.keep = torch.ones(channels, device=next(model.parameters()).device)
        self._handle = self.module.register_forward_hook(self._hook)

    def _hook(self, _m, _inp, out):
        if isinstance(out, tuple):  # e.g. a Swin stage: the features are the first item
            return (self._mask(out[0]), *out[1:])
        return self._mask(out)

    def _mask(self, out: torch.Tensor) -> torch.Tensor:
        # channels: dim 1 of a feature map / vector, the last dim of transformer tokens (B×N×D)
        shape = (1, 1, -1) if out.ndim == 3 else (1, -1) + (1,) * (out.ndim - 2)
        return out * self.keep.to(out.dtype).view(shape)

    def set_pruned(self, pruned: torch.Tensor) -> None:
        self.keep = torch.ones_like(self.keep)
        self.keep[pruned] = 0.0

    def remove(self) -> None:
        self._handle.remove()


def _zero_bn(bn: nn.Module, pruned: torch.Tensor, *, as_consumer: bool) -> None:
    """Producer side: weight = bias = 0 makes the channel exactly 0. Consumer side: reproduce BN(0) as a constant."""
    with torch.no_grad():
        if as_consumer:
            const = bn.bias[pruned] - bn.weight[pruned] * bn.running_mean[pruned] / torch.sqrt(bn.running_var[pruned] + bn.eps)
            bn.bias[pruned] = const
        else:
            bn.bias[pruned] = 0.0
        bn.weight[pruned] = 0.0


def _zero_conv_inputs(conv: nn.Conv2d, pruned: torch.Tensor) -> None:
    per_group_in = conv.in_channels // conv.groups
    per_group_out = conv.out_channels // conv.groups
    with torch.no_grad():
        for c in pruned.tolist():
            g, local = divmod(c, per_group_in)
            conv.weight[g * per_group_out : (g + 1) * per_group_out, local] = 0.0


def _zero_linear_inputs(linear: nn.Linear, pruned: torch.Tensor, channels: int) -> None:
    per_channel = linear.in_features // channels  # channel-major flatten of C×h×w
    with torch.no_grad():
        for c in pruned.tolist():
            linear.weight[:, c * per_channel : (c + 1) * per_channel] = 0.0


def _bake_candidates(model: nn.Module, layer: str, channels: int) -> list[tuple[str, str]]:
    """(kind, module name) in the order to try: the layer's own last BN, then modules registered after it."""
    named = list(model.named_modules())
    names = [n for n, _ in named]
    out: list[tuple[str, str]] = []
    inside = [n for n, m in named if n.startswith(layer + ".") and isinstance(m, _BN) and m.affine
              and m.num_features == channels]
    if inside:
        out.append(("producer_bn", inside[-1]))
    for name, m in named[names.index(layer) + 1 :]:
        if name.startswith(layer + "."):
            continue
        if isinstance(m, _BN) and m.affine and m.num_features == channels and m.track_running_stats:
            out.append(("consumer_bn", name))
        elif isinstance(m, nn.Conv2d) and m.in_channels == channels:
            out.append(("consumer_conv", name))
        elif isinstance(m, nn.Linear) and m.in_features % channels == 0:
            out.append(("consumer_linear", name))
        if len(out) >= 4:
            break
    return out


@torch.no_grad()
def _logits_fp32(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits without autocast: the bake check compares networks, bf16 noise would blur it."""
    model.eval()
    return torch.cat([model(x[i : i + 256]).float() for i in range(0, len(x), 256)])


def bake_channel_prune(masked_model: nn.Module, mask: ChannelMask, layer: str, pruned: torch.Tensor,
                       probe_x: torch.Tensor) -> tuple[nn.Module, str]:
    """Return a copy of `masked_model` (without hook) whose weights reproduce the channel mask, and the module used.

    Removes `mask`'s hook. Raises RuntimeError when no candidate reproduces the masked outputs (an architecture
    whose stage output cannot be zeroed by one BN/conv/linear: a bug to fix in that architecture's declaration).
    """
    channels = mask.keep.numel()
    reference = _logits_fp32(masked_model, probe_x)
    tolerance = 1e-3 * float(reference.abs().max()) + 1e-4  # TF32 convs on GPU; a wrong candidate is off by O(1)
    mask.remove()
    if len(pruned) == 0:
        return masked_model, "none"
    for kind, name in _bake_candidates(masked_model, layer, channels):
        trial = copy.deepcopy(masked_model)
        module = dict(trial.named_modules())[name]
        if kind == "producer_bn":
            _zero_bn(module, pruned, as_consumer=False)
        elif kind == "consumer_bn":
            _zero_bn(module, pruned, as_consumer=True)
        elif kind == "consumer_conv":
            _zero_conv_inputs(module, pruned)
        else:
            _zero_linear_inputs(module, pruned, channels)
        if torch.allclose(_logits_fp32(trial, probe_x), reference, atol=tolerance, rtol=1e-3):
            return trial, name
    raise RuntimeError(f"cannot express pruned channels of {layer} as weights of the same architecture")


@dataclass
class FinePruningConfig:
    # slice of the clean subset that judges the accuracy drop while pruning
    holdout_fraction: float = param(0.2, "share of the clean subset held out to judge the accuracy drop while pruning")
    # absolute drop of held-out accuracy that stops pruning (BackdoorBench: 10 %)
    max_acc_drop: float = param(0.10, "stop pruning once held-out accuracy has dropped by this much (absolute)")
    max_prune_ratio: float = param(0.95, "never prune more than this share of the last convolution's channels")
    # fraction of channels pruned per step (at least one)
    prune_step: float = param(0.01, "share of channels pruned per step (at least one), least active on clean data first")
    # fine-tuning after pruning; 0 = prune only
    epochs: int = param(20, "epochs of fine-tuning after pruning (0 = prune only)")
    lr: float = param(0.01, "fine-tuning learning rate")
    batch_size: int = param(64, "images per fine-tuning step")
    weight_decay: float = param(5e-4, "fine-tuning L2 weight decay")
    shift: int = param(2, "random translation (pixels) during fine-tuning")

    def __post_init__(self) -> None:
        check_range("holdout_fraction", self.holdout_fraction, 0.05, 0.5)
        check_range("max_acc_drop", self.max_acc_drop, 0.0, 1.0)
        check_range("max_prune_ratio", self.max_prune_ratio, 0.0, 0.99)
        check_range("prune_step", self.prune_step, 0.0, 0.5)
        check_range("epochs", self.epochs, 0, 1000)
        FineTuningConfig(epochs=max(self.epochs, 1), lr=self.lr, batch_size=self.batch_size,
                         weight_decay=self.weight_decay, shift=self.shift)  # same range checks as FT


def choose_prune_count(order: torch.Tensor, mask: ChannelMask, accuracy_of: Callable[[], float], *,
                       max_count: int, step: int, max_acc_drop: float,
                       on_step: Callable[[float], None]) -> tuple[int, list[dict]]:
    """Prune `order[:k]` for growing k while held-out accuracy stays within `max_acc_drop` of the unpruned one."""
    base = accuracy_of()
    best, log = 0, [{"stage": "prune", "pruned": 0, "holdout_acc": base}]
    for k in range(step, max_count + 1, step):
        mask.set_pruned(order[:k])
        acc = accuracy_of()
        log.append({"stage": "prune", "pruned": k, "holdout_acc": acc})
        on_step(k / max_count)
        if base - acc > max_acc_drop + 1e-9:
            break
        best = k
    mask.set_pruned(order[:best])
    return best, log


class FinePruning(Defense):
    name = "fp"
    Config = FinePruningConfig
    stages = ("prune", "finetune")

    def run(self, model: SpecModel, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        cfg = self.config
        timer = StageTimer()
        x, y = clean_tensors(clean, ctx.device)
        net = working_copy(model, ctx.device)
        layer = net.behavior_layers[-1]
        _, hold_idx = stratified_split(clean.y, cfg.holdout_fraction, ctx.seed)
        if len(hold_idx) == 0:  # a subset too small to split: judge the accuracy drop on all of it
            hold_idx = np.arange(len(clean))
        hold = torch.as_tensor(hold_idx, device=ctx.device)
        hx, hy = x[hold], y[hold]

        def holdout_accuracy() -> float:
            if ctx.should_cancel():
                raise Cancelled()
            return float((predict_logits(net, hx).argmax(1) == hy).float().mean())

        with timer("prune"):
            ctx.progress("prune", 0.0)
            activation = mean_channel_activation(net, layer, x)
            channels = activation.numel()
            order = torch.argsort(activation.cpu(), stable=True).to(ctx.device)
            mask = ChannelMask(net, layer, channels)
            max_count = int(math.floor(cfg.max_prune_ratio * channels))
            step = max(1, int(cfg.prune_step * channels))
            count, log = choose_prune_count(order, mask, holdout_accuracy, max_count=max_count, step=step,
                                            max_acc_drop=cfg.max_acc_drop,
                                            on_step=lambda f: ctx.progress("prune", min(f, 1.0)))
            ctx.progress("prune", 1.0)
        with timer("finetune"):
            if cfg.epochs > 0:
                tcfg = FineTuningConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                                        weight_decay=cfg.weight_decay, shift=cfg.shift).train_config(ctx.hflip)
                log += train_classifier(net, x, y, tcfg, generator=ctx.generator, progress=ctx.progress,
                                        should_cancel=ctx.should_cancel, stage="finetune")
            else:
                ctx.progress("finetune", 1.0)
            pruned = order[:count]
            net, baked_into = bake_channel_prune(net, mask, layer, pruned, x[: min(len(x), 256)])
        net.eval()
        info = {"layer": layer, "channels": channels, "pruned": count, "pruned_channels": pruned.cpu().tolist(),
                "baked_into": baked_into, "holdout_size": int(len(hold_idx)),
                "holdout_acc_unpruned": log[0]["holdout_acc"],
                "holdout_acc_pruned": next(r["holdout_acc"] for r in log if r.get("pruned") == count)}
        return DefenseResult(model=net, log=log, stage_seconds=timer.seconds, info=info)
