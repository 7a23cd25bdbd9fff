"""The trigger-free verdict: is this model backdoored, and which classes or (source, target) pairs? (docs/verdict.md)

One scan design serves the verdict before and after a defense and NBA's pseudo samples (no second scan):
- **patch rows**: per target class k, the smallest mask+pattern sending images of the other classes to k
  (all-to-one patch triggers: BadNets, Trojan, CL's patch);
- **shift rows**: ONE smallest mask+pattern sending images of every class away from their own label (a few
  restarts, the smallest kept), and, per source class, the class its images land in -- the induced mapping
  (label-shift / all-to-all backdoors, where every target has one source and no patch row stands out);
- **global rows**: per class, a universal additive δ (L∞ ≤ eps) and how often it reaches the class (blends,
  SIG: triggers spread over the whole image);
- **warp rows**: per class, a universal smooth warp of at most one pixel and how often it reaches the class
  (WaNet-style warping triggers, which neither a mask nor an additive δ expresses: without these rows the detection
  table found WaNet's target at none of 12 scans; with them at all 12).

Calibration: a class that is naturally easy to reach (MNIST 2 and 8, Fashion-MNIST Bag/Shirt) is easy on every
model trained on the same data, so each class is compared with ITSELF on a per-job benign reference -- the
suspect fine-tuned hard on the clean data with shifts (NBA's teacher recipe, NBA.md §5 lesson 1: it breaks the
backdoor while keeping the data's natural geometry) -- scanned with the same settings and the same random draws:
    patch_k  = log(L1_ref(k) / L1(k)) - c        shift = log(L1_ref(shift) / L1(shift)) - c
    global_k = logit(SR(k)) - logit(SR_ref(k)) - median_j(same)       (warp_k likewise, with the warp's SR)
with c the median patch log-ratio (a global difference in robustness between model and reference is not a
backdoor; in an all-to-all model the patch rows stay normal, so c stays honest for the shift rows). Each family's
score is divided by its threshold (fitted on benign models of tuning seeds, never on a test trigger); the model
score is the largest, and >= 1 means suspected. The after-verdict reuses the SAME reference scan, so before and
after compare the same classes, and caps every score at its value before (`judge(before=...)`): a defense trains on
clean data and cannot plant a backdoor, so a class it made easier to reach is damage (FT/NAD cost 4-33 CA points and
pushed unrelated classes over the threshold; tuning seed 10: 14/15 -> 15/15 clean models cleared, 4/4 surviving
backdoors still suspected, docs/benchmarks/detection_tuning_v2.md).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from torch import nn

from .train import (CancelFn, ProgressFn, TrainConfig, eval_mode, never_cancel, no_progress, predict_logits,
                    train_classifier)
from .triggerscan import apply_trigger, optimise_mask_triggers, scan_universal_perturbations, scan_universal_warps

SUSPECTED, NOT_SUSPECTED, INCONCLUSIVE = "suspected", "not_suspected", "inconclusive"

# Scan settings (one set for every use; validated for stability across scan seeds on tuning seeds).
SCAN = {"steps": 80, "batch_size": 12, "restarts": 2, "shift_restarts": 2, "shift_batch": 24, "l1_weight": 0.5, "lr": 0.5, "mask_init": 0.05,
        "uap_eps": 0.15, "uap_steps": 25, "uap_batch": 12, "uap_restarts": 2,
        "warp_pixels": 1.0, "warp_grid": 5, "warp_steps": 30, "warp_batch": 12}
# Reference model: the suspect fine-tuned hard on D (NBA's teacher recipe, 30 epochs instead of 10: on tuning
# models after 10 epochs the reference still carried the backdoor (real ASR > 30 %) at 15 of 40 seeds, after 30 at
# none of 40 (max 27 %), and a reference that keeps the backdoor hides its target -- docs/verdict.md).
REFERENCE = {"epochs": 30, "lr": 0.1, "shift": 2, "batch_size": 64, "weight_decay": 5e-4}
REFERENCE_MIN_ACC, REFERENCE_TRIES = 0.8, 3  # accuracy on D relative to the suspect's; retries at lr / 3
# Under MIN_MEAN_PER_CLASS images per class, fine-tuning alone keeps the backdoor; shrinking every weight matrix and
# adding noise first (Ash & Adams' shrink-and-perturb) makes the fine-tuning relearn rather than polish (MNIST-5k
# BadNets, 50 images: the reference kept 100 % of the backdoor plain, 11 % shrunk by 0.5 with noise 0.01).
FEW_IMAGES_SHRINK = {"shrink": 0.5, "noise": 0.01}
# Thresholds per family, in the units of module doc (fitted on benign tuning models; docs/verdict.md).
THRESHOLDS = {"patch": 1.0, "shift": 1.0, "global": 3.0, "warp": 3.0}
PER_CLASS_FAMILIES = ("patch", "global", "warp")  # one score per class; "shift" is one row for the whole model
MIN_LAND_SHARE = 0.5  # a source joins the label-shift pattern when the shift trigger sends most of it to one class
INCONCLUSIVE_BAND = 0.8  # a model score in [0.8, 1) is "inconclusive": too close to call
MIN_PER_CLASS = 2  # fewer clean images of some class than this: the scan cannot be trusted -> inconclusive
# Fewer clean images than this per class on average: the reference, fine-tuned on so few, keeps the backdoor
# (MNIST-5k BadNets, 50 images: 100 % of it after 30, 120 and 240 epochs; 200 images: broken) and hides the
# target, so nothing flagged means nothing -> inconclusive (a flagged class still counts). bench.few_clean.
MIN_MEAN_PER_CLASS = 10
MAX_IMAGES = 1000  # larger clean sets are subsampled for the scan
SR_CLIP = 0.02  # success rates are clipped to [SR_CLIP, 1 - SR_CLIP] before the logit


@dataclass
class ModelScan:
    """One model's scan (CPU tensors). Rows of masks/patterns: K patch rows then the best shift row."""

    patch_l1: list[float]
    shift_l1: float
    source_lands: list[int]  # per source class: where the shift trigger sends its images most often
    source_land_share: list[float]
    global_success: list[float]
    masks: torch.Tensor
    patterns: torch.Tensor
    deltas: torch.Tensor
    seconds: float = 0.0
    # Per restart (rows) and class: what each independent optimisation found; the fields above keep the best.
    patch_l1_restarts: list[list[float]] = field(default_factory=list)
    global_success_restarts: list[list[float]] = field(default_factory=list)
    # Warp rows (per class): success of the universal warp and its control field (triggerscan.apply_warp).
    warp_success: list[float] = field(default_factory=list)
    warps: torch.Tensor | None = None
    warp_pixels: float = 0.0

    @property
    def num_classes(self) -> int:
        return len(self.patch_l1)

    def with_restarts(self, n: int) -> "ModelScan":
        """This scan's judged values as if only its first `n` restarts had run (same rule as scan_model: the
        smallest mask, the most reaching delta); masks and deltas stay those of all restarts."""
        return replace(self, patch_l1=np.min(self.patch_l1_restarts[:n], axis=0).tolist(),
                                   global_success=np.max(self.global_success_restarts[:n], axis=0).tolist())

    def summary(self) -> dict:
        return {"patch_mask_l1": _round(self.patch_l1, 3), "shift_mask_l1": round(self.shift_l1, 3),
                "source_lands_in": list(self.source_lands), "source_land_share": _round(self.source_land_share, 3),
                "global_success_rate": _round(self.global_success, 4),
                "warp_success_rate": _round(self.warp_success, 4), "seconds": round(self.seconds, 3)}


@dataclass
class Verdict:
    status: str
    targets: list[int]
    pairs: list[list[int]]
    score: float  # max over families of score / threshold; >= 1 suspected
    scores: dict[str, list[float]] = field(default_factory=dict)  # per family, per class, in threshold units
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"status": self.status, "targets": list(self.targets), "pairs": [list(p) for p in self.pairs],
                "score": round(self.score, 4), "threshold": 1.0,
                "scores": {k: _round(v, 4) for k, v in self.scores.items()}, "reasons": list(self.reasons)}


def scan_subset(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The (at most MAX_IMAGES) images every scan of one job uses."""
    x, y = np.asarray(x), np.asarray(y)
    if len(y) > MAX_IMAGES:
        idx = np.sort(np.random.default_rng(seed).choice(len(y), size=MAX_IMAGES, replace=False))
        x, y = x[idx], y[idx]
    return x, y


def scan_model(model: nn.Module, x, y, *, num_classes: int, seed: int, device: torch.device | None = None,
               should_cancel: CancelFn = never_cancel, settings: dict | None = None,
               on_step: Callable[[float], None] | None = None) -> ModelScan:
    """Scan `model` on clean (x, y): patch, source and global rows (module doc). The random draws depend only on
    `seed`, so two models scanned with the same seed see the same images in the same order. `on_step(fraction)`
    follows the mask optimisation, the bulk of the cost."""
    s = {**SCAN, **(settings or {})}
    t0 = time.perf_counter()
    device = device or next(model.parameters()).device
    xt, yt = _tensor(x, device, torch.float32), _tensor(y, device, torch.long)
    k, restarts = num_classes, int(s["restarts"])
    classes = list(range(k))
    gen = torch.Generator().manual_seed(int(seed))
    # Every class is optimised `restarts` times in the same batch (rows r*K + k) and the smallest mask kept: one
    # run alone missed a working BadNets/Trojan trigger at about one scan seed in four (detection table).
    masks, patterns, _ = optimise_mask_triggers(
        model, xt, yt, targets=classes * restarts, sources=[None] * s["shift_restarts"], steps=s["steps"],
        batch_size=s["batch_size"], l1_weight=s["l1_weight"], lr=s["lr"], generator=gen, mask_init=s["mask_init"],
        should_cancel=should_cancel, on_step=on_step)
    l1 = masks.flatten(1).sum(1).cpu()
    per_restart = l1[: k * restarts].view(restarts, k)
    rows = per_restart.argmin(0) * k + torch.arange(k)
    best = k * restarts + int(l1[k * restarts :].argmin())
    rows = torch.cat([rows, torch.tensor([best])])
    masks, patterns = masks[rows.to(masks.device)], patterns[rows.to(patterns.device)]
    lands, shares = [], []
    with eval_mode(model), torch.no_grad():
        for src in classes:
            xs = xt[yt == src]
            if len(xs) == 0:  # a class absent from the clean set: no mapping to read
                lands.append(src)
                shares.append(0.0)
                continue
            pred = predict_logits(model, apply_trigger(xs, masks[k], patterns[k])).argmax(1)
            counts = torch.bincount(pred[pred != src], minlength=k)
            land = int(counts.argmax())
            lands.append(land)
            shares.append(float(counts[land]) / max(len(xs), 1))
    # The global rows likewise: per class, the restart whose delta reaches it most often.
    uaps = [scan_universal_perturbations(model, xt, yt, num_classes=k, eps=s["uap_eps"], steps=s["uap_steps"],
                                         batch_size=s["uap_batch"], generator=gen, should_cancel=should_cancel)
            for _ in range(int(s["uap_restarts"]))]
    success = torch.tensor([u.success_rate for u in uaps])  # restarts×K
    pick = success.argmax(0)
    deltas = torch.stack([uaps[int(pick[c])].deltas[c] for c in classes])
    warp = scan_universal_warps(model, xt, yt, num_classes=k, max_shift=s["warp_pixels"], grid=int(s["warp_grid"]),
                                steps=int(s["warp_steps"]), batch_size=int(s["warp_batch"]), generator=gen,
                                should_cancel=should_cancel)
    return ModelScan(patch_l1=[float(v) for v in per_restart.min(0).values], shift_l1=float(l1[best]),
                     source_lands=lands, source_land_share=shares,
                     global_success=[float(v) for v in success.max(0).values],
                     masks=masks.detach().cpu(), patterns=patterns.detach().cpu(), deltas=deltas,
                     patch_l1_restarts=per_restart.tolist(), global_success_restarts=success.tolist(),
                     warp_success=list(warp.success_rate), warps=warp.controls, warp_pixels=warp.max_shift,
                     seconds=time.perf_counter() - t0)


def train_reference(model: nn.Module, x, y, *, seed: int, hflip: bool = False,
                    should_cancel: CancelFn = never_cancel, progress: ProgressFn = no_progress,
                    shrink: dict | None = None) -> nn.Module:
    """The per-job benign reference: a copy of `model` fine-tuned hard on the clean (x, y) (module doc); with
    `shrink` ({"shrink": λ, "noise": σ}) its weight matrices become λ·W + σ·N(0, 1) before the fine-tuning."""
    device = next(model.parameters()).device
    xt, yt = _tensor(x, device, torch.float32), _tensor(y, device, torch.long)
    floor = REFERENCE_MIN_ACC * _accuracy(model, xt, yt)
    lr = REFERENCE["lr"]
    for _ in range(REFERENCE_TRIES):
        ref = copy.deepcopy(model)
        if shrink:
            noise_gen = torch.Generator().manual_seed(int(seed) + 104729)
            with torch.no_grad():
                for p in ref.parameters():
                    if p.ndim > 1:  # conv / linear weights; biases and norm scales stay
                        p.mul_(shrink["shrink"]).add_(shrink["noise"] * torch.randn(
                            p.shape, generator=noise_gen).to(p.device, p.dtype))
        for p in ref.parameters():
            p.requires_grad_(True)
        cfg = TrainConfig(epochs=REFERENCE["epochs"], lr=lr, shift=REFERENCE["shift"], hflip=hflip,
                          batch_size=REFERENCE["batch_size"], weight_decay=REFERENCE["weight_decay"])
        train_classifier(ref, xt, yt, cfg, generator=torch.Generator().manual_seed(int(seed) + 7919),
                         should_cancel=should_cancel, stage="reference", progress=progress)
        ref.eval()
        # lr 0.1 on a few dozen images can diverge (a collapsed reference makes every class look odd): retry gentler.
        if _accuracy(ref, xt, yt) >= floor:
            break
        lr /= 3
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def reference_problem(model: nn.Module, reference: nn.Module, x, y) -> str | None:
    """Why the reference cannot calibrate a verdict, or None. Fine-tuning that collapses a model (every retry
    below REFERENCE_MIN_ACC of the suspect's accuracy on D, e.g. the SGD recipe on a small ViT) leaves a reference
    whose masks are all odd: comparing with it would flag or clear classes at random."""
    device = next(model.parameters()).device
    xt, yt = _tensor(x, device, torch.float32), _tensor(y, device, torch.long)
    suspect, ref = _accuracy(model, xt, yt), _accuracy(reference, xt, yt)
    if ref >= REFERENCE_MIN_ACC * suspect:
        return None
    return (f"the benign reference could not be trained on this model (accuracy on the clean set {ref:.1%} "
            f"after fine-tuning vs {suspect:.1%} for the model itself): no calibrated verdict")


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with eval_mode(model), torch.no_grad():
        return float((predict_logits(model, x).argmax(1) == y).float().mean())


def _logit(p: float) -> float:
    p = min(max(p, SR_CLIP), 1 - SR_CLIP)
    return math.log(p / (1 - p))


def judge(scan: ModelScan, ref: ModelScan, *, too_little_data: str | None = None,
          thresholds: dict | None = None, unreliable_reference: str | None = None,
          before: Verdict | None = None) -> Verdict:
    """Compare a model's scan with the reference's, class by class (module doc). With `unreliable_reference`
    (the benign reference could not be trained) the comparison means nothing either way: inconclusive.
    With `before` (the verdict on the model before a defense) every score is capped at its value before: a defense
    trains on clean data only, so a class that got EASIER to reach is the defense's damage, not a backdoor."""
    th = {**THRESHOLDS, **(thresholds or {})}
    k = scan.num_classes
    patch_lr = [math.log(max(ref.patch_l1[i], 1e-3) / max(scan.patch_l1[i], 1e-3)) for i in range(k)]
    shift_lr = math.log(max(ref.shift_l1, 1e-3) / max(scan.shift_l1, 1e-3))
    c = float(np.median(patch_lr))
    scores = {"patch": [(v - c) / th["patch"] for v in patch_lr],
              "shift": [(shift_lr - c) / th["shift"]],
              "global": _success_scores(scan.global_success, ref.global_success, th["global"])}
    if scan.warp_success and ref.warp_success:
        scores["warp"] = _success_scores(scan.warp_success, ref.warp_success, th["warp"])
    raised: list[str] = []
    if before is not None:
        scores, raised = cap_at(scores, before.scores)
    per_class = [f for f in PER_CLASS_FAMILIES if f in scores]
    targets = sorted({i for i in range(k) if any(scores[f][i] >= 1 for f in per_class)},
                     key=lambda i: -max(scores[f][i] for f in per_class))
    pairs = []
    if scores["shift"][0] >= 1:
        pairs = [[i, scan.source_lands[i]] for i in range(k) if scan.source_land_share[i] >= MIN_LAND_SHARE
                 and scan.source_lands[i] not in targets]
    # Many flagged sources landing in one class is an all-to-one backdoor the patch rows missed: a target.
    landing = [p[1] for p in pairs]
    for t in sorted(set(landing)):
        if landing.count(t) >= max(3, k // 2):
            targets.append(t)
            pairs = [p for p in pairs if p[1] != t]
    score = max(max(v) for v in scores.values())
    reasons = []
    if unreliable_reference:
        return Verdict(status=INCONCLUSIVE, targets=[], pairs=[], score=score, scores=scores,
                       reasons=[unreliable_reference])
    if targets:
        reasons.append(f"classes {targets}: a trigger reaches them far more easily than on the benign reference")
    if pairs:
        reasons.append(f"one small trigger moves {len(pairs)} source classes each to one other class (label shift)")
    if raised:
        reasons.append("easier to reach than before the defense, not counted (a defense on clean data cannot plant "
                       "a backdoor): " + ", ".join(raised))
    if targets or pairs:
        status = SUSPECTED
    elif too_little_data:
        status = INCONCLUSIVE
        reasons.append(too_little_data)
    elif score >= INCONCLUSIVE_BAND:
        status = INCONCLUSIVE
        reasons.append(f"score {score:.2f} is close to the threshold 1")
    else:
        status = NOT_SUSPECTED
    return Verdict(status=status, targets=targets, pairs=pairs, score=score, scores=scores, reasons=reasons)


def _success_scores(success: list[float], ref_success: list[float], threshold: float) -> list[float]:
    """Per class: logit SR - logit SR_ref, less its median over classes, in threshold units (global, warp rows)."""
    diff = [_logit(a) - _logit(b) for a, b in zip(success, ref_success)]
    mid = float(np.median(diff))
    return [(v - mid) / threshold for v in diff]


def cap_at(scores: dict[str, list[float]], ceiling: dict[str, list[float]],
           notable: float = INCONCLUSIVE_BAND) -> tuple[dict[str, list[float]], list[str]]:
    """Each score capped at its value in `ceiling`; also names the capped rows that reached `notable` uncapped."""
    capped, raised = {}, []
    for fam, values in scores.items():
        if fam not in ceiling:  # a family the before-verdict did not have: nothing to cap at
            capped[fam] = list(values)
            continue
        capped[fam] = [min(v, c) for v, c in zip(values, ceiling[fam])]
        raised += [f"{fam} {'row' if fam == 'shift' else 'class ' + str(i)} {v:.2f} (was {c:.2f})"
                   for i, (v, c) in enumerate(zip(values, ceiling[fam])) if v > c and v >= notable]
    return capped, raised


def too_few_to_clear(n_images: int, num_classes: int) -> bool:
    """Under MIN_MEAN_PER_CLASS images per class: a plain reference keeps a backdoor (see the constant)."""
    return n_images < MIN_MEAN_PER_CLASS * num_classes


def data_problem(y, num_classes: int) -> str | None:
    counts = np.bincount(np.asarray(y), minlength=num_classes)
    if counts.min() < MIN_PER_CLASS:
        return (f"too few clean images to scan every class (the smallest class has {int(counts.min())}, "
                f"at least {MIN_PER_CLASS} needed)")
    if len(counts) and too_few_to_clear(int(counts.sum()), num_classes):
        return (f"too few clean images to clear a model ({int(counts.sum())}; at least {MIN_MEAN_PER_CLASS * num_classes}, "
                f"{MIN_MEAN_PER_CLASS} per class): a benign reference fine-tuned on so few keeps a backdoor, so finding "
                "nothing proves nothing")
    return None


class VerdictSession:
    """The reference and its scan for one job, shared by the before- and after-verdict (same classes, same draws)."""

    def __init__(self, model: nn.Module, x, y, *, ref_x=None, ref_y=None, num_classes: int, seed: int = 0,
                 hflip: bool = False, should_cancel: CancelFn = never_cancel,
                 on_step: Callable[[float], None] | None = None, scan_settings: dict | None = None):
        """`on_step(fraction)` reports how far the reference (training, then its scan) has come: minutes on a CPU
        must not look stuck. `scan_settings` override SCAN for every scan of the session (for benches measuring
        cheaper scans on tuning models; jobs use SCAN)."""
        self.num_classes, self.seed, self.should_cancel = num_classes, int(seed), should_cancel
        self.scan_settings = dict(scan_settings or {})
        self.problem = data_problem(y, num_classes)  # a missing or tiny class: the verdict can only be inconclusive
        self.x, self.y = scan_subset(x, y, seed)
        step = on_step or (lambda f: None)
        t0 = time.perf_counter()
        if ref_x is None:
            ref_x, ref_y = x, y
        few = too_few_to_clear(len(ref_y), num_classes)
        self.reference = train_reference(model, ref_x, ref_y, seed=seed, hflip=hflip, should_cancel=should_cancel,
                                         shrink=FEW_IMAGES_SHRINK if few else None,
                                         progress=lambda _stage, f: step(0.6 * f))
        self.reference_seconds = time.perf_counter() - t0
        self.reference_problem = reference_problem(model, self.reference, ref_x, ref_y)
        step(0.6)
        self.reference_scan = self.scan(self.reference, lambda f: step(0.6 + 0.4 * f))
        step(1.0)

    def scan(self, model: nn.Module, on_step: Callable[[float], None] | None = None) -> ModelScan:
        return scan_model(model, self.x, self.y, num_classes=self.num_classes, seed=self.seed,
                          should_cancel=self.should_cancel, settings=self.scan_settings, on_step=on_step)

    def judge(self, model: nn.Module, on_step: Callable[[float], None] | None = None,
              before: Verdict | None = None) -> tuple[Verdict, ModelScan]:
        """`before`: the verdict on the model before a defense (the after-verdict caps each score at it)."""
        scan = self.scan(model, on_step)
        return judge(scan, self.reference_scan, too_little_data=self.problem,
                     unreliable_reference=self.reference_problem, before=before), scan

    def report(self, verdict: Verdict, scan: ModelScan) -> dict:
        return {**verdict.to_dict(), "scan": scan.summary(), "reference_scan": self.reference_scan.summary(),
                "images": int(len(self.y)), "seed": self.seed}


def compare(before: dict, after: dict) -> dict:
    """What changed between the before- and after-verdict, on the SAME classes (those flagged before)."""
    fams = [f for f in PER_CLASS_FAMILIES if f in before["scores"] and f in after["scores"]]
    classes = sorted(set(before.get("targets", [])) | {p[1] for p in before.get("pairs", [])})
    rows = [{"class": c, **{f"{f}_before": before["scores"][f][c] for f in fams},
             **{f"{f}_after": after["scores"][f][c] for f in fams}} for c in classes]
    shift = {"shift_before": before["scores"]["shift"][0], "shift_after": after["scores"]["shift"][0]}
    if before["status"] == SUSPECTED and after["status"] == NOT_SUSPECTED:
        summary = "the backdoor evidence found before is gone"
    elif after["status"] == SUSPECTED and before["status"] == SUSPECTED:
        summary = "still suspected after the defense"
    elif after["status"] == SUSPECTED:
        summary = "suspected after the defense, not before"
    else:
        summary = f"{before['status']} before, {after['status']} after"
    return {"summary": summary, "classes": rows, **shift}


def headline(verdict: dict, when: str) -> str:
    """One plain line: 'backdoor verdict after: SUSPECTED (targets [0])'."""
    word = {SUSPECTED: "SUSPECTED", NOT_SUSPECTED: "not suspected", INCONCLUSIVE: "inconclusive"}[verdict["status"]]
    extra = []
    if verdict.get("targets"):
        extra.append(f"target class(es) {verdict['targets']}")
    if verdict.get("pairs"):
        extra.append("label shift " + ", ".join(f"{s}->{t}" for s, t in verdict["pairs"]))
    return f"backdoor verdict {when}: {word}" + (f" ({'; '.join(extra)})" if extra else "") + \
        f" [score {verdict['score']:.2f}, threshold 1]"


def _tensor(a, device, dtype) -> torch.Tensor:
    return a.to(device, dtype) if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a)).to(device, dtype)


def _round(values, digits):
    return [round(float(v), digits) if math.isfinite(float(v)) else None for v in values]
