"""One sanitization run, end to end: load safely, measure, defend, measure again, save atomically.

Both the CLI (`nba sanitize`) and the service worker call `sanitize`, so what a user gets from either is the same.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import __version__
from .checkpoint import load_model, save_model
from .data.formats import load_dataset_file
from .data.imageset import ImageSet, stratified_split
from .defenses import get_defense
from .defenses.base import DefenseContext
from .device import pick_device, prepare_model, seed_everything
from .data.classes import check_class_names, class_counts, class_warnings
from .errors import INVALID_PARAMS, NBAError
from .metrics import attack_success_rate, clean_accuracy, robust_accuracy
from .sanity import check_clean_accuracy
from .spec import ModelSpec, load_spec, parse_spec
from .train import never_cancel, no_progress
from .verdict import SUSPECTED, VerdictSession, compare
from .verdict import headline as verdict_headline

# Overall progress budget: the defense gets most of the bar; measuring before/after shares the rest.
_BEFORE, _DEFENSE, _AFTER = 0.1, 0.8, 0.1


def resolve_spec(spec: ModelSpec | dict | str | os.PathLike | None, model_path: str | os.PathLike | None = None
                 ) -> ModelSpec:
    """A spec object, dict, JSON text or file; None: the spec a .safetensors written by nba carries."""
    if spec is None:
        return spec_from_checkpoint(model_path)
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, dict):
        return parse_spec(spec)
    text = str(spec)
    if text.lstrip().startswith("{"):
        return parse_spec(text)
    return load_spec(text)


def spec_from_checkpoint(model_path: str | os.PathLike | None) -> ModelSpec:
    from .checkpoint import SPEC_METADATA_KEY, read_checkpoint_metadata
    from .errors import SPEC_INVALID

    text = None
    if model_path is not None and str(model_path).endswith(".safetensors"):
        text = read_checkpoint_metadata(model_path).get(SPEC_METADATA_KEY)
    if not text:
        raise NBAError(SPEC_INVALID, "give the model spec (--spec model.json): this checkpoint does not carry one "
                       "(only .safetensors written by nba do)")
    return parse_spec(text)


class _OverallProgress:
    """Maps a defense's (stage, fraction-of-stage) reports to one monotonic 0..1 bar for the caller."""

    def __init__(self, callback: Callable[[str, float], None], expected_stages: int):
        self.callback = callback
        self.expected = max(1, expected_stages)
        self.done_stages: list[str] = []
        self.current: str | None = None
        self.value = 0.0

    def emit(self, stage: str, overall: float) -> None:
        self.value = max(self.value, min(1.0, overall))
        self.callback(stage, self.value)

    def defense(self, stage: str, fraction: float) -> None:
        if stage != self.current:
            if self.current is not None:
                self.done_stages.append(self.current)
            self.current = stage
        expected = max(self.expected, len(self.done_stages) + 1)
        inner = (len(self.done_stages) + min(max(fraction, 0.0), 1.0)) / expected
        self.emit(stage, _BEFORE + _DEFENSE * inner)


MIN_HOLDOUT = 50  # below this many images the clean accuracy is too uncertain to compare (report says so)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95 % Wilson score interval of a proportion (None for n = 0)."""
    if n <= 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _measure(model, *, holdout: ImageSet, accuracy_on: str, probe: ImageSet | None,
             probe_target: int | None) -> dict[str, Any]:
    ca = clean_accuracy(model, holdout.x, holdout.y) if len(holdout) else None
    out: dict[str, Any] = {"clean_accuracy": ca, "clean_accuracy_on": accuracy_on, "holdout_size": len(holdout)}
    if ca is not None:
        out["clean_accuracy_ci95"] = list(wilson_interval(int(round(ca * len(holdout))), len(holdout)))
        if len(holdout) < MIN_HOLDOUT:
            out["clean_accuracy_note"] = (f"only {len(holdout)} images to measure clean accuracy on: a rough estimate "
                                          f"(95 % interval shown); at least {MIN_HOLDOUT} are needed to compare")
    if probe is not None and probe_target is not None:
        out["attack_success_rate"] = attack_success_rate(model, probe.x, probe.y, probe_target)
        out["robust_accuracy"] = robust_accuracy(model, probe.x, probe.y, probe_target)
    return out


def warnings_for(report: dict) -> list[str]:
    """Plain warnings for the user: the cleaned model is still suspected, the held-out set is too small."""
    out = []
    after = (report.get("verdict") or {}).get("after") or {}
    if after.get("status") == SUSPECTED:
        out.append("the cleaned model is still suspected of a backdoor: " + verdict_headline(after, "after"))
    before = (report.get("metrics") or {}).get("before") or {}
    if before.get("clean_accuracy_note"):
        out.append(before["clean_accuracy_note"])
    damage = accuracy_damage(before, (report.get("metrics") or {}).get("after") or {})
    if damage:
        out.append(damage)
    return out


CA_DROP_WARN = 0.05  # a drop of clean accuracy this large (and outside both intervals) is worth a warning


def accuracy_damage(before: dict, after: dict) -> str | None:
    """A warning when cleaning clearly cost clean accuracy: a drop of at least CA_DROP_WARN whose 95 % intervals
    (when measured on a held-out set) do not overlap. Fine-tuning recipes that do not suit an architecture
    collapse it (SGD on a small ViT: 87 % -> 10-20 %) and the job must not look like a plain success."""
    ca0, ca1 = before.get("clean_accuracy"), after.get("clean_accuracy")
    if ca0 is None or ca1 is None or ca0 - ca1 < CA_DROP_WARN:
        return None
    ci0, ci1 = before.get("clean_accuracy_ci95"), after.get("clean_accuracy_ci95")
    if ci0 and ci1 and ci1[1] >= ci0[0]:
        return None
    return (f"cleaning cost clean accuracy: {ca0:.1%} before, {ca1:.1%} after; check the cleaned model before "
            "using it (another method, or more clean images)")


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=2, default=_json_default)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, torch.Tensor):
        return o.detach().cpu().tolist()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)


def _check_probe_target(probe_target: int | None, num_classes: int) -> None:
    if probe_target is not None and not 0 <= int(probe_target) < num_classes:
        raise NBAError(INVALID_PARAMS, f"probe_target must be in [0, {num_classes})")


def _check_request(method: str, params: dict | None, *, probe_given: bool, probe_target: int | None,
                   holdout_fraction: float):
    """Cheap checks before any heavy work; returns the configured defense."""
    if not 0.0 <= holdout_fraction < 0.9:
        raise NBAError(INVALID_PARAMS, "holdout_fraction must be in [0, 0.9)")
    defense = get_defense(method, params)  # validates method and params before any heavy work
    if probe_given and probe_target is None:
        raise NBAError(INVALID_PARAMS, "a probe set needs probe_target (the class the suspected trigger maps to)")
    return defense


def sanitize(*, model_path: str, spec: ModelSpec | dict | str, data_path: str, method: str,
             params: dict | None, out_path: str, report_path: str | None = None, probe_path: str | None = None,
             probe_target: int | None = None, device: str = "auto", seed: int = 0,
             holdout_fraction: float = 0.0, progress: Callable[[str, float], None] | None = None,
             should_cancel: Callable[[], bool] | None = None, evidence: bool = True,
             eval_path: str | None = None, crossfit: int = 0,
             on_before: Callable[[dict], None] | None = None,
             class_names: list[str] | None = None, allow_low_accuracy: bool = False) -> dict:
    """Sanitize the model at `model_path` with `method`; write cleaned safetensors to `out_path` and return the
    report (also written to `report_path`). Raises NBAError for bad inputs, Cancelled when asked to stop.
    A thin file-based wrapper: loads safely, calls `sanitize_loaded`, saves atomically. `eval_path`: an optional
    separate labelled clean set to measure clean accuracy on (see `sanitize_loaded`). `spec` None: read from the
    checkpoint. `class_names`: label order (else the spec's, else the data's)."""
    t_start = time.perf_counter()
    progress = progress or no_progress
    _check_request(method, params, probe_given=probe_path is not None, probe_target=probe_target,
                   holdout_fraction=holdout_fraction)
    method = str(method).strip().lower()
    spec = resolve_spec(spec, model_path)
    _check_probe_target(probe_target, spec.num_classes)
    shape = (spec.in_channels, *spec.input_size)
    progress("load", 0.0)
    model = load_model(model_path, spec)
    if class_names is not None:
        class_names = check_class_names(class_names, spec.num_classes)
    data = load_dataset_file(data_path, num_classes=spec.num_classes, expect_shape=shape,
                             class_names=class_names or spec.class_names)
    probe = load_dataset_file(probe_path, num_classes=spec.num_classes, expect_shape=shape) if probe_path else None
    eval_set = load_dataset_file(eval_path, num_classes=spec.num_classes, expect_shape=shape) if eval_path else None

    outcome = sanitize_loaded(model, data, spec=spec, method=method, params=params, probe=probe,
                              probe_target=probe_target, device=device, seed=seed,
                              holdout_fraction=holdout_fraction, progress=progress, should_cancel=should_cancel,
                              evidence=evidence, eval_set=eval_set, crossfit=crossfit, on_before=on_before,
                              allow_low_accuracy=allow_low_accuracy)
    progress("save", 0.99)
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    sha256 = save_model(outcome.model, out_path, spec=spec, metadata={"nba_method": method, "nba_seed": str(seed)})
    report = outcome.report
    report["timing"]["total_seconds"] = time.perf_counter() - t_start
    report["output"] = {"path": str(out_path), "sha256": sha256}
    if report_path:
        write_json_atomic(report_path, report)
    progress("done", 1.0)
    return report


@dataclass
class SanitizeOutcome:
    """The cleaned module (on the run's device, in eval mode as the defense left it) and the JSON report."""

    model: torch.nn.Module
    report: dict


def sanitize_loaded(model: torch.nn.Module, data: ImageSet, *, spec: ModelSpec, method: str,
                    params: dict | None = None, probe: ImageSet | None = None, probe_target: int | None = None,
                    device: str = "auto", seed: int = 0, holdout_fraction: float = 0.0,
                    progress: Callable[[str, float], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None, evidence: bool = True,
                    eval_set: ImageSet | None = None, crossfit: int = 0,
                    on_before: Callable[[dict], None] | None = None,
                    allow_low_accuracy: bool = False) -> SanitizeOutcome:
    """The in-memory core: check, measure, defend, measure again. A model near chance on `data` is refused
    (sanity.py) unless `allow_low_accuracy`; `data.class_names` (when known) names the labels in the report.
    `model` takes pixels in [0, 1] (N×C×H×W, the geometry
    of `spec`) and names its stage outputs in `model.behavior_layers`; `data` is the clean subset. Nothing is read
    or written on disk. Raises NBAError for bad inputs, Cancelled when asked to stop.

    The defense trains on all of `data` (what the benchmark measures) unless holdout_fraction > 0. Clean accuracy
    is measured on `eval_set` when given, else on the held-out part, else on `data` itself -- flagged
    `clean_accuracy_on: "clean_subset"`, optimistic after the defense since it trained on those images.
    crossfit = K ≥ 2 adds an honest K-fold estimate of the clean-accuracy change (nba_core/crossfit.py; K more
    defense runs). docs/baselines.md, "Held-out split".

    evidence=True (default) computes the trigger-free verdict before and after (nba_core/verdict.py) and hands the
    before-verdict's scan to the defense; `on_before({"metrics": ..., "verdict": ...})` is called as soon as the
    before-measurements exist."""
    t_start = time.perf_counter()
    progress = progress or no_progress
    should_cancel = should_cancel or never_cancel
    method = str(method).strip().lower()
    defense = _check_request(method, params, probe_given=probe is not None, probe_target=probe_target,
                             holdout_fraction=holdout_fraction)
    _check_probe_target(probe_target, spec.num_classes)

    generator = seed_everything(seed)
    dev = pick_device(device)
    model = prepare_model(model, dev)
    train_idx, hold_idx = stratified_split(data.y, holdout_fraction, seed) if holdout_fraction > 0 else (
        np.arange(len(data)), np.arange(0))
    train_part, holdout = data.subset(train_idx), data.subset(hold_idx)
    accuracy_set, accuracy_on = ((eval_set, "eval_set") if eval_set is not None else
                                 (holdout, "holdout") if len(holdout) else (data, "clean_subset"))
    measure = dict(holdout=accuracy_set, accuracy_on=accuracy_on, probe=probe, probe_target=probe_target)

    bar = _OverallProgress(progress, expected_stages=len(getattr(defense, "stages", ())) or 2)
    bar.emit("check", 0.0)
    names = data.class_names
    counts = class_counts(data.y, spec.num_classes)
    accuracy_all = clean_accuracy(model, data.x, data.y)  # on every clean image: fails fast, before minutes of work
    warnings = check_clean_accuracy(accuracy_all, spec.num_classes, allow_low_accuracy=allow_low_accuracy,
                                    class_names=names) + class_warnings(counts, names)
    bar.emit("evaluate_before", 0.0)
    t0 = time.perf_counter()
    before = _measure(model, **measure)
    verdicts: dict[str, Any] = {}
    session = prior = None
    if evidence:
        # The scan sees all of D (more images, steadier); the reference trains on the defense's part only.
        session = VerdictSession(model, data.x, data.y, ref_x=train_part.x, ref_y=train_part.y,
                                 num_classes=spec.num_classes, seed=seed, hflip=spec.in_channels == 3,
                                 should_cancel=should_cancel,
                                 on_step=lambda f: bar.emit("evaluate_before", _BEFORE * 0.6 * f))
        v_before, scan_before = session.judge(model, lambda f: bar.emit("evaluate_before", _BEFORE * (0.6 + 0.4 * f)))
        verdicts["before"] = session.report(v_before, scan_before)
        verdicts["reference_seconds"] = round(session.reference_seconds, 3)
        prior = (v_before, scan_before)
    t_before = time.perf_counter() - t0
    if on_before is not None:
        on_before(json.loads(json.dumps({"metrics": {"before": before}, "verdict": verdicts}, default=_json_default)))
    bar.emit("evaluate_before", _BEFORE)

    ctx = DefenseContext(spec=spec, device=dev, generator=generator, seed=seed, progress=bar.defense,
                         should_cancel=should_cancel, hflip=spec.in_channels == 3, verdict=prior)
    t0 = time.perf_counter()
    result = defense.run(model, train_part, ctx)
    t_defense = time.perf_counter() - t0

    if should_cancel():
        from .errors import Cancelled

        raise Cancelled()
    bar.emit("evaluate_after", _BEFORE + _DEFENSE)
    t0 = time.perf_counter()
    after = _measure(result.model, **measure)
    if session is not None:
        # Capped at the before-verdict: a class the defense made easier to reach is damage, not a backdoor.
        v_after, scan_after = session.judge(
            result.model, lambda f: bar.emit("evaluate_after", _BEFORE + _DEFENSE + 0.09 * f), before=v_before)
        verdicts["after"] = session.report(v_after, scan_after)
        verdicts["change"] = compare(verdicts["before"], verdicts["after"])
        verdicts["headline"] = [verdict_headline(verdicts["before"], "before"),
                                verdict_headline(verdicts["after"], "after")]
    t_after = time.perf_counter() - t0
    crossfit_result = None
    if crossfit:
        from .crossfit import crossfit_accuracy_change

        t0 = time.perf_counter()
        crossfit_result = crossfit_accuracy_change(
            defense, model, train_part, crossfit, seed,
            lambda s: DefenseContext(spec=spec, device=dev, generator=seed_everything(s), seed=s,
                                     should_cancel=should_cancel, hflip=spec.in_channels == 3))
        crossfit_result["seconds"] = time.perf_counter() - t0

    report = {
        "kind": "nba-sanitize-report",
        "note": "NBA as reconstructed from the published abstract (Ying & Wu, 2023); see README.",
        "nba_core_version": __version__,
        "method": method,
        "params": dataclasses.asdict(defense.config) | ({"preset": params["preset"]} if params and "preset" in params else {}),
        "seed": seed,
        "device": str(dev),
        "host": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads()},
        "spec": spec.model_dump(mode="json"),
        "data": {"clean_subset": len(data), "defense_train": len(train_part), "holdout": len(holdout),
                 "eval_set": len(eval_set) if eval_set is not None else None, "clean_accuracy_on": accuracy_on,
                 "probe": len(probe) if probe is not None else None, "probe_target": probe_target,
                 "class_names": names, "class_counts": counts, "clean_accuracy_all_before": accuracy_all},
        "verdict": verdicts or None,
        "metrics": {"before": before, "after": after},
        "crossfit": crossfit_result,
        "timing": {"total_seconds": time.perf_counter() - t_start, "evaluate_before_seconds": t_before,
                   "defense_seconds": t_defense, "evaluate_after_seconds": t_after,
                   "stages": result.stage_seconds},
        "defense_info": result.info,
        "log": result.log,
    }
    report["warnings"] = warnings + warnings_for(report)
    report = json.loads(json.dumps(report, default=_json_default))  # plain JSON types only
    return SanitizeOutcome(model=result.model, report=report)


def scan(*, model_path: str, spec: ModelSpec | dict | str | None, data_path: str, report_path: str | None = None,
         device: str = "auto", seed: int = 0, progress: Callable[[str, float], None] | None = None,
         should_cancel: Callable[[], bool] | None = None) -> dict:
    """Detect only: the trigger-free verdict of the model at `model_path` on the clean set at `data_path`
    (`verdict.before`; there is no `after`). The benign reference trains on all of the clean set."""
    t_start = time.perf_counter()
    progress = progress or no_progress
    spec = resolve_spec(spec, model_path)
    shape = (spec.in_channels, *spec.input_size)
    progress("load", 0.0)
    model = load_model(model_path, spec)
    data = load_dataset_file(data_path, num_classes=spec.num_classes, expect_shape=shape)
    report = scan_loaded(model, data, spec=spec, device=device, seed=seed, progress=progress,
                         should_cancel=should_cancel)
    report["timing"]["total_seconds"] = time.perf_counter() - t_start
    if report_path:
        write_json_atomic(report_path, report)
    progress("done", 1.0)
    return report


def scan_loaded(model: torch.nn.Module, data: ImageSet, *, spec: ModelSpec, device: str = "auto", seed: int = 0,
                progress: Callable[[str, float], None] | None = None,
                should_cancel: Callable[[], bool] | None = None) -> dict:
    """The in-memory core of `scan` (any model taking pixels in [0, 1] with `spec`'s geometry): the report dict."""
    t_start = time.perf_counter()
    progress = progress or no_progress
    seed_everything(seed)
    dev = pick_device(device)
    model = prepare_model(model, dev)
    progress("scan", 0.1)
    session = VerdictSession(model, data.x, data.y, num_classes=spec.num_classes, seed=seed,
                             hflip=spec.in_channels == 3, should_cancel=should_cancel or never_cancel)
    progress("scan", 0.5)
    verdict, model_scan = session.judge(model)
    before = session.report(verdict, model_scan)
    report = {
        "kind": "nba-scan-report",
        "note": "Trigger-free backdoor verdict (see docs/verdict.md); NBA as reconstructed from the published abstract.",
        "nba_core_version": __version__,
        "method": "scan",
        "seed": seed,
        "device": str(dev),
        "spec": spec.model_dump(mode="json"),
        "data": {"clean_subset": len(data)},
        "verdict": {"before": before, "after": None, "headline": [verdict_headline(before, "before")],
                    "reference_seconds": round(session.reference_seconds, 3)},
        "metrics": {"before": {}},
        "timing": {"total_seconds": time.perf_counter() - t_start},
    }
    report["warnings"] = []
    return json.loads(json.dumps(report, default=_json_default))
