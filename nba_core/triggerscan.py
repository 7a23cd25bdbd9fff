"""Batched, trigger-free, Neural-Cleanse-like class scan (NBA.md §3.3 and §5 lesson 4).

For every class k at once we look for the smallest mask m_k (H×W, in [0, 1]) and a pattern p_k (C×H×W, in
[0, 1]) such that `(1 - m_k)·x + m_k·p_k` is classified as k for clean x of other classes. A backdoor target
needs a much smaller mask than a normal class, so the mask norms of a backdoored model have one low outlier
(Neural Cleanse's MAD anomaly index, here on log norms). All K optimisations run as one batch of K×b images per step: the
per-class loop of the feasibility run dominated the whole defense's cost.

The L1 weight is adapted per class from the class's own success on its batch (raise it while the trigger
works, lower it while it does not), so no class needs hand tuning; the smallest mask that reached the
success threshold is kept, as Neural Cleanse does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .device import autocast
from .errors import INVALID_PARAMS, Cancelled, NBAError
from .train import CancelFn, eval_mode, never_cancel

MAD_CONSISTENCY = 1.4826  # makes the MAD a consistent estimator of the std under normality
ANOMALY_THRESHOLD = 2.0  # Neural Cleanse's cut-off
LAM_UP = 1.2  # per-step factor of the adaptive L1 weight


@dataclass
class ScanResult:
    """Per-class results of one scan; tensors live on the CPU."""

    masks: torch.Tensor  # K×1×H×W in [0, 1]
    patterns: torch.Tensor  # K×C×H×W in [0, 1]
    mask_l1: list[float]  # sum of the mask, in pixels
    success_rate: list[float]  # of the synthesised trigger on held-back clean images of other classes
    anomaly_indices: list[float]  # MAD score of log(l1_k), positive = smaller than usual
    anomaly_index: float  # of the class with the smallest mask
    flagged: list[int] = field(default_factory=list)  # classes with an anomaly index above 2, most anomalous first
    steps: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.mask_l1)

    def ranking(self) -> list[int]:
        """Classes from most to least suspicious (smallest mask first)."""
        return sorted(range(self.num_classes), key=lambda k: self.mask_l1[k])

    def suspects(self, top_k: int = 1) -> list[int]:
        """The flagged classes, or else the `top_k` most suspicious ones (never empty)."""
        return self.flagged[:top_k] if self.flagged else self.ranking()[:top_k]


def apply_trigger(x: torch.Tensor, mask: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
    """Stamp a trigger: `(1 - mask)·x + mask·pattern`, broadcasting mask (…×1×H×W) over channels."""
    return (1 - mask) * x + mask * pattern


def anomaly_indices(norms: list[float] | torch.Tensor) -> torch.Tensor:
    """Neural Cleanse's MAD score per class, signed so that unusually SMALL norms score high:
    (median - v_k) / (1.4826·MAD) with v = log(mask L1). Norms are scale-like (a normal class may need a mask
    twice another's), so the log makes the spread of normal classes comparable across datasets and budgets;
    on raw norms one wide class hid a 6× smaller backdoor mask in our MNIST runs."""
    t = torch.as_tensor(norms, dtype=torch.float64).clamp_min(1e-6).log()
    med = t.median()
    mad = (t - med).abs().median() * MAD_CONSISTENCY
    return (med - t) / mad.clamp_min(1e-3)


def _sample(pools: list[torch.Tensor], b: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """K×b indices; row k draws (with replacement) from images whose label is not k."""
    rows = []
    for pool in pools:
        pick = torch.randint(len(pool), (b,), generator=generator)
        rows.append(pool[pick.to(pool.device)])
    return torch.stack(rows).to(device)


def _split_held_back(y: torch.Tensor, fraction: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    perm = torch.randperm(len(y), generator=generator).to(y.device)
    k = int(round(len(y) * fraction))
    k = min(max(k, 1), len(y) - 1)
    return perm[k:], perm[:k]


@torch.no_grad()
def trigger_success(model: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, patterns: torch.Tensor,
                    classes: list[int] | None = None, batch_size: int = 512) -> list[float]:
    """Share of images of other classes that the trigger of class k sends to k, per class in `classes`."""
    classes = list(range(len(masks))) if classes is None else classes
    rates = []
    for k in classes:
        xs = x[y != k]
        if len(xs) == 0:
            rates.append(float("nan"))
            continue
        hits = 0
        for i in range(0, len(xs), batch_size):
            xb = apply_trigger(xs[i : i + batch_size], masks[k].to(x.device), patterns[k].to(x.device))
            with autocast(x.device):
                hits += int((model(xb).argmax(1) == k).sum())
        rates.append(hits / len(xs))
    return rates


def optimise_triggers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, classes: list[int], *,
                      steps: int, batch_size: int, l1_weight: float, lr: float = 0.1,
                      success_threshold: float = 0.9, generator: torch.Generator,
                      init: tuple[torch.Tensor, torch.Tensor] | None = None, mask_init: float = 0.5,
                      should_cancel: CancelFn = never_cancel,
                      on_step: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The batched optimisation for the given target classes; returns (masks, patterns) of shape
    len(classes)×1×H×W and len(classes)×C×H×W, on x's device, and the number of steps run.

    `init` warm-starts from earlier masks/patterns (NBA refreshes its pseudo triggers against the student).
    The model's parameters get no gradients and its train/eval mode is restored afterwards.
    """
    return optimise_mask_triggers(model, x, y, targets=classes, sources=[], steps=steps, batch_size=batch_size,
                                  l1_weight=l1_weight, lr=lr, success_threshold=success_threshold,
                                  generator=generator, init=init, mask_init=mask_init, should_cancel=should_cancel,
                                  on_step=on_step)


def optimise_mask_triggers(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, targets: list[int],
                           sources: list[int | None], steps: int, batch_size: int, l1_weight: float, lr: float = 0.1,
                           success_threshold: float = 0.9, generator: torch.Generator,
                           init: tuple[torch.Tensor, torch.Tensor] | None = None, mask_init: float = 0.5,
                           should_cancel: CancelFn = never_cancel,
                           on_step: Callable[[float], None] | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One batched smallest-mask optimisation over two kinds of rows:
    - a *target* row k looks for a trigger sending images of the other classes TO k (all-to-one backdoors);
    - a *source* row s looks for a trigger sending images OF class s to any other class; s = None means images of
      EVERY class, each away from its own label -- one universal trigger that shifts labels (all-to-all
      backdoors, where each class is the target of one source only and no target row stands out).
    Rows are ordered targets then sources; returns (masks, patterns, steps) with one row each."""
    device = x.device
    n_t, n_rows = len(targets), len(targets) + len(sources)
    c, h, w = x.shape[1:]
    if init is None:
        # A half-covering mask succeeds for every class almost at once; the adaptive L1 weight then shrinks it.
        mask_logit = torch.full((n_rows, 1, h, w), float(torch.logit(torch.tensor(mask_init))), device=device)
        pattern_logit = (torch.rand(n_rows, c, h, w, generator=generator) * 2 - 1).to(device)
    else:
        m0, p0 = (t.to(device).clamp(1e-4, 1 - 1e-4) for t in init)
        mask_logit, pattern_logit = torch.logit(m0), torch.logit(p0)
    mask_logit.requires_grad_(True)
    pattern_logit.requires_grad_(True)
    opt = torch.optim.Adam([mask_logit, pattern_logit], lr=lr, betas=(0.5, 0.9))
    pools = [torch.nonzero(y != k).flatten() for k in targets] + [
        torch.arange(len(y), device=y.device) if s is None else torch.nonzero(y == s).flatten() for s in sources]
    if any(len(p) == 0 for p in pools):
        raise NBAError(INVALID_PARAMS, "scan needs images of every scanned source class and of at least two classes")
    target_class = torch.tensor(list(targets) + [0] * len(sources), device=device).repeat_interleave(batch_size)
    is_target = (torch.arange(n_rows, device=device) < n_t).repeat_interleave(batch_size)
    lam = torch.full((n_rows,), float(l1_weight), device=device)
    best_l1 = torch.full((n_rows,), float("inf"), device=device)
    best_mask = torch.sigmoid(mask_logit.detach()).clone()
    best_pattern = torch.sigmoid(pattern_logit.detach()).clone()
    with eval_mode(model):
        for step in range(steps):
            if should_cancel():
                raise Cancelled()
            if on_step is not None:
                on_step(step / steps)  # the fraction of the scan done (a long scan must not look stuck)
            idx = _sample(pools, batch_size, generator, device)  # rows×b
            row_class = torch.where(is_target, target_class, y[idx.flatten()])
            mask = torch.sigmoid(mask_logit)
            pattern = torch.sigmoid(pattern_logit)
            xb = apply_trigger(x[idx], mask[:, None], pattern[:, None])  # rows×b×C×H×W
            with autocast(device):
                logits = model(xb.flatten(0, 1)).float()
            logp = F.log_softmax(logits, 1)
            logp_k = logp.gather(1, row_class[:, None])[:, 0]
            # target rows: -log p(k); source rows: -log(1 - p(s)), i.e. "anything but s".
            away = -torch.log1p(-logp_k.exp().clamp(max=1 - 1e-6))
            loss_i = torch.where(is_target, -logp_k, away)
            pred = logits.argmax(1)
            hit = torch.where(is_target, pred == row_class, pred != row_class)
            ce = loss_i.view(n_rows, batch_size).mean(1)
            area = mask.flatten(1).mean(1)  # fraction of the image covered, per row
            loss = (ce + lam * area).sum()
            g_m, g_p = torch.autograd.grad(loss, [mask_logit, pattern_logit])
            with torch.no_grad():
                success = hit.float().view(n_rows, batch_size).mean(1)
                ok = success >= success_threshold
                l1 = mask.flatten(1).sum(1)
                better = ok & (l1 < best_l1)
                best_l1 = torch.where(better, l1, best_l1)
                best_mask[better] = mask[better].detach()
                best_pattern[better] = pattern[better].detach()
                # Per-row L1 schedule: tighten while the trigger works, relax while it does not.
                lam = torch.where(ok, lam * LAM_UP, lam / LAM_UP).clamp(1e-3, 1e3)
            mask_logit.grad, pattern_logit.grad = g_m, g_p
            opt.step()
    with torch.no_grad():
        # A row that never reached the threshold keeps its final (large) mask.
        never = torch.isinf(best_l1)
        best_mask[never] = torch.sigmoid(mask_logit.detach())[never]
        best_pattern[never] = torch.sigmoid(pattern_logit.detach())[never]
    return best_mask, best_pattern, steps


def scan_universal_triggers(model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor, *, num_classes: int,
                            steps: int = 60, batch_size: int = 8, l1_weight: float = 0.5, lr: float = 0.5,
                            held_back: float = 0.25, mask_init: float = 0.05, device: torch.device | None = None,
                            generator: torch.Generator, should_cancel: CancelFn = never_cancel,
                            on_step: Callable[[float], None] | None = None) -> ScanResult:
    """Scan all classes for a small universal trigger in one batched optimisation (see module doc).

    x_clean: N×C×H×W pixels in [0, 1] (tensor or array); y_clean: N labels. A `held_back` share of the images
    is kept out of the optimisation to measure each trigger's success rate honestly.
    """
    if steps < 1 or batch_size < 1 or l1_weight <= 0 or not 0 < held_back < 1:
        raise NBAError(INVALID_PARAMS, "scan needs steps >= 1, batch_size >= 1, l1_weight > 0, 0 < held_back < 1")
    device = device or next(model.parameters()).device
    x = torch.as_tensor(x_clean).to(device, torch.float32)
    y = torch.as_tensor(y_clean).to(device, torch.long)
    if len(y) < 2 or x.ndim != 4:
        raise NBAError(INVALID_PARAMS, "scan needs at least two images of shape N×C×H×W")
    opt_idx, held_idx = _split_held_back(y, held_back, generator)
    x_opt, y_opt = x[opt_idx], y[opt_idx]
    classes = list(range(num_classes))
    if any(bool((y_opt != k).sum() == 0) for k in classes):
        raise NBAError(INVALID_PARAMS, "scan needs images from at least two classes")
    masks, patterns, n = optimise_triggers(model, x_opt, y_opt, classes, steps=steps, batch_size=batch_size,
                                           l1_weight=l1_weight, lr=lr, generator=generator, mask_init=mask_init,
                                           should_cancel=should_cancel, on_step=on_step)
    with eval_mode(model):
        rates = trigger_success(model, x[held_idx], y[held_idx], masks, patterns)
    l1 = masks.flatten(1).sum(1).cpu()
    scores = anomaly_indices(l1)
    order = torch.argsort(l1).tolist()
    flagged = [k for k in order if float(scores[k]) > ANOMALY_THRESHOLD]
    return ScanResult(masks=masks.detach().cpu(), patterns=patterns.detach().cpu(), mask_l1=[float(v) for v in l1],
                      success_rate=rates, anomaly_indices=[float(v) for v in scores],
                      anomaly_index=float(scores[order[0]]), flagged=flagged, steps=n)


@dataclass
class _UniversalSetup:
    """What every universal (one-per-class) scan shares: optimisation images, per-class pools of images of OTHER
    classes, the K×b target labels, and the held-back images its success is measured on."""

    device: torch.device
    x_opt: torch.Tensor
    pools: list[torch.Tensor]
    targets: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor


def _universal_setup(model: nn.Module, x_clean, y_clean, num_classes: int, batch_size: int, held_back: float,
                     generator: torch.Generator) -> _UniversalSetup:
    device = next(model.parameters()).device
    x = torch.as_tensor(x_clean).to(device, torch.float32)
    y = torch.as_tensor(y_clean).to(device, torch.long)
    opt_idx, held_idx = _split_held_back(y, held_back, generator)
    y_opt = y[opt_idx]
    pools = [torch.nonzero(y_opt != k).flatten() for k in range(num_classes)]
    if any(len(p) == 0 for p in pools):
        raise NBAError(INVALID_PARAMS, "scan needs images from at least two classes")
    targets = torch.arange(num_classes, device=device).repeat_interleave(batch_size)
    return _UniversalSetup(device, x[opt_idx], pools, targets, x[held_idx], y[held_idx])


@torch.no_grad()
def _held_back_success(model: nn.Module, setup: _UniversalSetup, num_classes: int,
                       trigger: Callable[[torch.Tensor, int], torch.Tensor]) -> list[float]:
    """Per class k: the share of held-back images of other classes that `trigger(images, k)` sends to k."""
    rates = []
    for k in range(num_classes):
        xs = setup.x_held[setup.y_held != k]
        if not len(xs):
            rates.append(0.0)
            continue
        with autocast(setup.device):
            pred = model(trigger(xs, k)).argmax(1)
        rates.append(float((pred == k).float().mean()))
    return rates


@dataclass
class PerturbationScan:
    """Per-class universal additive perturbations (L∞ ≤ eps) and how often each reaches its class."""

    deltas: torch.Tensor  # K×C×H×W, on the CPU
    success_rate: list[float]  # on held-back images of other classes
    eps: float

    def ranking(self) -> list[int]:
        """Classes from most to least easily reached."""
        return sorted(range(len(self.success_rate)), key=lambda k: -self.success_rate[k])


def scan_universal_perturbations(model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor, *, num_classes: int,
                                 eps: float = 0.1, steps: int = 20, batch_size: int = 8, held_back: float = 0.25,
                                 generator: torch.Generator,
                                 should_cancel: CancelFn = never_cancel) -> PerturbationScan:
    """For every class k at once, a universal δ_k with ‖δ_k‖∞ ≤ eps that pushes clean images of other classes to
    k (signed-gradient steps, K×b images per step). A backdoor's target is the class a small *global* change
    reaches most easily -- the check the mask scan lacks for blend/warp triggers, whose effect is spread over
    the whole image rather than concentrated in a patch."""
    if steps < 1 or batch_size < 1 or not eps > 0 or not 0 < held_back < 1:
        raise NBAError(INVALID_PARAMS, "perturbation scan needs steps >= 1, batch_size >= 1, eps > 0")
    su = _universal_setup(model, x_clean, y_clean, num_classes, batch_size, held_back, generator)
    delta = torch.zeros(num_classes, *su.x_opt.shape[1:], device=su.device)
    step = 2.5 * eps / steps
    with eval_mode(model):
        for _ in range(steps):
            if should_cancel():
                raise Cancelled()
            idx = _sample(su.pools, batch_size, generator, su.device)  # K×b
            d = delta.clone().requires_grad_(True)
            xb = (su.x_opt[idx] + d[:, None]).clamp(0, 1)
            with autocast(su.device):
                logits = model(xb.flatten(0, 1)).float()
            loss = F.cross_entropy(logits, su.targets, reduction="sum")
            (g,) = torch.autograd.grad(loss, [d])
            delta = (delta - step * g.sign()).clamp(-eps, eps)
        rates = _held_back_success(model, su, num_classes, lambda xs, k: (xs + delta[k]).clamp(0, 1))
    return PerturbationScan(deltas=delta.detach().cpu(), success_rate=rates, eps=eps)


@dataclass
class WarpScan:
    """Per-class universal smooth warps (displacement ≤ max_shift pixels) and how often each reaches its class."""

    controls: torch.Tensor  # K×2×g×g unconstrained control fields, on the CPU (see apply_warp)
    success_rate: list[float]  # on held-back images of other classes
    max_shift: float


def apply_warp(x: torch.Tensor, control: torch.Tensor, max_shift: float) -> torch.Tensor:
    """Resample `x` (N×C×H×W) along a smooth flow: the g×g control field (N×2×g×g or 1×2×g×g, unconstrained)
    squashed by tanh to at most `max_shift` pixels per axis and upsampled bicubically to H×W -- the family of
    warps that WaNet-style triggers live in, whatever their own control grid."""
    n, _, h, w = x.shape
    scale = torch.tensor([2.0 * max_shift / max(w - 1, 1), 2.0 * max_shift / max(h - 1, 1)], device=x.device)
    flow = torch.tanh(control) * scale.view(1, 2, 1, 1)  # normalised grid units: 2/(size-1) per pixel
    flow = F.interpolate(flow, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                            indexing="ij")
    # A NaN coordinate makes grid_sample index out of bounds (a segfault in its backward on CPU, seen with a
    # diverged model): a non-finite flow counts as no shift.
    grid = (torch.stack((xs, ys), -1).unsqueeze(0) + torch.nan_to_num(flow, nan=0.0)).clamp(-1, 1)
    return F.grid_sample(x, grid.expand(n, -1, -1, -1), mode="bilinear", padding_mode="border", align_corners=True)


def scan_universal_warps(model: nn.Module, x_clean: torch.Tensor, y_clean: torch.Tensor, *, num_classes: int,
                         max_shift: float = 1.0, grid: int = 5, steps: int = 30, batch_size: int = 12,
                         lr: float = 0.1, held_back: float = 0.25, generator: torch.Generator,
                         should_cancel: CancelFn = never_cancel) -> WarpScan:
    """For every class k at once, a universal smooth warp of at most `max_shift` pixels that sends clean images
    of other classes to k (Adam on a g×g control field, K×b images per step). A warping backdoor (WaNet) is
    opened by one specific sub-pixel warp: the mask rows cannot express it and an additive δ only approximates it,
    but a warp search finds it directly (tuning seeds 10-11: 98-100 % success towards the target, 0-13 % for
    every class on the benign reference and on benign models)."""
    if steps < 1 or batch_size < 1 or grid < 2 or not max_shift > 0 or not 0 < held_back < 1:
        raise NBAError(INVALID_PARAMS, "warp scan needs steps >= 1, batch_size >= 1, grid >= 2, max_shift > 0")
    su = _universal_setup(model, x_clean, y_clean, num_classes, batch_size, held_back, generator)
    control = (0.01 * torch.randn(num_classes, 2, grid, grid, generator=generator)).to(su.device).requires_grad_(True)
    opt = torch.optim.Adam([control], lr=lr)
    with eval_mode(model):
        for _ in range(steps):
            if should_cancel():
                raise Cancelled()
            idx = _sample(su.pools, batch_size, generator, su.device)  # K×b
            xb = apply_warp(su.x_opt[idx].flatten(0, 1), control.repeat_interleave(batch_size, 0), max_shift)
            with autocast(su.device):
                logits = model(xb).float()
            loss = F.cross_entropy(logits, su.targets)
            (g,) = torch.autograd.grad(loss, [control])
            control.grad = torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)  # a diverged model: no step
            opt.step()
        rates = _held_back_success(model, su, num_classes,
                                   lambda xs, k: apply_warp(xs, control[k : k + 1].detach(), max_shift))
    return WarpScan(controls=control.detach().cpu(), success_rate=rates, max_shift=max_shift)
