"""Small, device-resident training and inference loops shared by attacks, defenses and metrics.

The whole (small) dataset lives on the device as one tensor; batches are index slices, augmentation is batched
on the device (no DataLoader, no host round trips) -- the airbench way.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .device import autocast, to_device
from .errors import Cancelled

ProgressFn = Callable[[str, float], None]
CancelFn = Callable[[], bool]


def no_progress(stage: str, fraction: float) -> None:  # default callback
    pass


def never_cancel() -> bool:
    return False


def augment(x: torch.Tensor, *, shift: int, hflip: bool, generator: torch.Generator | None = None,
            cutout: int = 0) -> torch.Tensor:
    """Random integer translation by up to ±shift pixels (zero fill), optional horizontal flip and, with cutout > 0,
    one zeroed square of side `cutout` per image at a random centre (clipped at the border), batched."""
    if shift <= 0 and not hflip and cutout <= 0:
        return x
    n = x.shape[0]
    out = x
    if shift > 0:
        h, w = x.shape[-2:]
        padded = F.pad(x, (shift, shift, shift, shift))
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=generator).to(x.device)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=generator).to(x.device)
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # n×h
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # n×w
        c = x.shape[1]
        idx_r = rows.view(n, 1, h, 1).expand(n, c, h, padded.shape[-1])
        out = padded.gather(2, idx_r)
        idx_c = cols.view(n, 1, 1, w).expand(n, c, h, w)
        out = out.gather(3, idx_c)
    if hflip:
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        out = torch.where(flip.view(n, 1, 1, 1), out.flip(-1), out)
    if cutout > 0:
        h, w = x.shape[-2:]
        cy = torch.randint(0, h, (n,), generator=generator).to(x.device).view(n, 1, 1)
        cx = torch.randint(0, w, (n,), generator=generator).to(x.device).view(n, 1, 1)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        half = cutout // 2
        hole = (rows >= cy - half) & (rows < cy + half + cutout % 2) & (cols >= cx - half) & (cols < cx + half + cutout % 2)
        out = out * (~hole).unsqueeze(1).to(out.dtype)
    return out


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 0.01
    batch_size: int = 64
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift: int = 0
    hflip: bool = False
    schedule: str = "cosine"  # cosine | step | constant
    label_smoothing: float = 0.0
    cutout: int = 0  # side of one zeroed square per image (0 = off)
    # Per-epoch learning rates overriding `schedule` when given: epoch e uses epoch_lrs[min(e, len - 1)]
    # (e.g. NAD's 0.1 for two epochs then 0.01: (0.1, 0.1, 0.01)).
    epoch_lrs: tuple = ()
    # "sgd" (Nesterov momentum) or "adamw" (momentum = β1); vision transformers do not train from scratch with
    # the SGD recipe that suits the CNNs (a tiny ViT on MNIST-5k stayed near chance), AdamW trains them.
    optimizer: str = "sgd"


# Transformer families (ViT, DeiT, Swin, ConvNeXt) do not fine-tune with the CNN recipes' SGD: a tiny ViT at SGD
# lr 0.01-0.1 falls to chance within a few epochs (docs/hf.md). A model that carries `adamw_recipe = True` (the HF
# wrapper sets it for those families; a Python user may set it on their module) runs every SGD recipe as AdamW:
# learning rates scaled by ADAMW_LR_SCALE, the ratio between this project's two training recipes (AdamW 1e-3 for
# transformers vs SGD 0.05 for CNNs), β1 0.9 and the transformers' training weight decay.
ADAMW_LR_SCALE = 1e-3 / 0.05
ADAMW_WEIGHT_DECAY = 0.05


def uses_adamw_recipe(model: nn.Module) -> bool:
    return bool(getattr(model, "adamw_recipe", False))


def recipe_for(model: nn.Module, cfg: TrainConfig) -> TrainConfig:
    """`cfg` as `model`'s family fine-tunes: unchanged for CNNs, the AdamW equivalent of an SGD recipe for models
    with `adamw_recipe` (rule above). Recipes that already name AdamW are left alone."""
    if cfg.optimizer != "sgd" or not uses_adamw_recipe(model):
        return cfg
    return replace(cfg, optimizer="adamw", lr=cfg.lr * ADAMW_LR_SCALE, momentum=0.9,
                   weight_decay=ADAMW_WEIGHT_DECAY, epoch_lrs=tuple(lr * ADAMW_LR_SCALE for lr in cfg.epoch_lrs))


def make_optimizer(params, cfg: TrainConfig, steps: int, steps_per_epoch: int = 1):
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              nesterov=cfg.momentum > 0)
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: sgd or adamw")
    if cfg.epoch_lrs:
        lrs = tuple(cfg.epoch_lrs)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lrs[min(s // max(steps_per_epoch, 1), len(lrs) - 1)] / cfg.lr)
    elif cfg.schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / max(steps, 1))))
    elif cfg.schedule == "step":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.1 ** int(s >= steps * 0.5) * 0.1 ** int(s >= steps * 0.75))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, sched


def iterate_batches(n: int, batch_size: int, generator: torch.Generator, drop_last: bool = False):
    perm = torch.randperm(n, generator=generator)
    stop = n - (n % batch_size) if drop_last and n >= batch_size else n
    for i in range(0, stop, batch_size):
        yield perm[i : i + batch_size]


def train_classifier(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    *,
    generator: torch.Generator,
    extra_loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: ProgressFn = no_progress,
    should_cancel: CancelFn = never_cancel,
    stage: str = "train",
    on_epoch_end: Callable[[int], None] | None = None,
) -> list[dict]:
    """Train `model` in place on device tensors x (N×C×H×W in [0,1]) and y with `cfg` as the model's family
    runs it (`recipe_for`: SGD for CNNs, its AdamW equivalent for transformer families).

    extra_loss(model, xb, yb, logits) adds a term (distillation, regularisers); returns per-epoch logs.
    """
    cfg = recipe_for(model, cfg)
    device = x.device
    steps_per_epoch = max(1, math.ceil(len(y) / cfg.batch_size))
    opt, sched = make_optimizer([p for p in model.parameters() if p.requires_grad], cfg, cfg.epochs * steps_per_epoch,
                                steps_per_epoch)
    log = []
    for epoch in range(cfg.epochs):
        model.train()
        total, correct, loss_sum = 0, 0, 0.0
        for idx in iterate_batches(len(y), cfg.batch_size, generator):
            if should_cancel():
                raise Cancelled()
            idx = idx.to(device)
            xb = augment(x[idx], shift=cfg.shift, hflip=cfg.hflip, generator=generator, cutout=cfg.cutout)
            yb = y[idx]
            with autocast(device):
                logits = model(xb)
                loss = F.cross_entropy(logits.float(), yb, label_smoothing=cfg.label_smoothing)
                if extra_loss is not None:
                    loss = loss + extra_loss(model, xb, yb, logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
            total += len(idx)
        log.append({"stage": stage, "epoch": epoch + 1, "loss": loss_sum / total, "train_acc": correct / total})
        if on_epoch_end is not None:
            on_epoch_end(epoch)
        progress(stage, (epoch + 1) / cfg.epochs)
    model.eval()
    return log


@contextmanager
def eval_mode(model: nn.Module):
    """Run a block with `model` in eval mode (BatchNorm statistics frozen), restoring train/eval mode after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    model.eval()
    outs = []
    for i in range(0, len(x), batch_size):
        with autocast(x.device):
            outs.append(model(x[i : i + batch_size]).float())
    return torch.cat(outs) if outs else torch.empty(0)


def predict(model: nn.Module, x, device: torch.device | None = None, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels for a numpy array or tensor of images."""
    if device is None:
        device = next(model.parameters()).device
    xt = to_device(x, device)
    return predict_logits(model, xt, batch_size).argmax(1)


def accuracy(model: nn.Module, x, y, device: torch.device | None = None) -> float:
    if len(y) == 0:
        return float("nan")
    pred = predict(model, x, device)
    return float((pred.cpu() == torch.as_tensor(y).cpu()).float().mean())
