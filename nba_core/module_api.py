"""Bring your own `nn.Module`: clean a model that is already in memory, from Python.

    from nba_core.module_api import sanitize_module
    cleaned, report = sanitize_module(my_model, (x, y), method="nba", input_size=(32, 32),
                                      mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26), num_classes=10)

`module` maps normalised images N×C×H×W to logits N×num_classes (a transformers image classifier may be passed
as it is: its `.logits` are used). `data` is the clean subset: an ImageSet, a pair (x, y) of arrays/tensors with
pixels in [0, 1] (N×C×H×W or N×H×W×C uint8), or a path to a file in one of the formats `nba sanitize` reads.
Images whose size differs from `input_size` are resized (the report says so).

Behaviour layers (for NAD and NBA): `layers=` names modules (as in `module.named_modules()`); by default they are
chosen automatically -- a transformers model: the modules behind `output_hidden_states`; any other module: one
probe forward records the output shape of every direct child of the module (descending into a lone container
child), children are grouped into runs of equal output shape, and the last child of each of the last three runs
with at least 3-D outputs is taken (the ends of the resolution stages of a CNN, or evenly spaced blocks of a
transformer). The caller's module is never modified: the defenses train a copy.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from .data.imageset import ImageSet
from .errors import INVALID_PARAMS, NBAError
from .hf_config import ADAMW_MODEL_TYPES
from .models.base import Normalize
from .spec import ModelSpec


class ModuleClassifier(nn.Module):
    """(x - mean) / std, then the user's module; returns logits (also from a transformers output object)."""

    def __init__(self, module: nn.Module, mean, std, behavior_layers: tuple[str, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.net = module
        self.behavior_layers = tuple(f"net.{n}" for n in behavior_layers)
        # Fine-tune with AdamW rather than SGD (train.recipe_for): a transformers model of a transformer family, or
        # a module whose owner set `adamw_recipe = True` on it (e.g. a ViT of their own).
        model_type = getattr(getattr(module, "config", None), "model_type", None)
        self.adamw_recipe = bool(getattr(module, "adamw_recipe", False)) or model_type in ADAMW_MODEL_TYPES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(self.normalize(x))
        return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def auto_behavior_layers(module: nn.Module, in_channels: int, input_size: tuple[int, int]) -> tuple[str, ...]:
    """The documented automatic choice (module docstring) for a plain nn.Module."""
    if hasattr(module, "config") and getattr(module.config, "model_type", None):  # a transformers model
        from .hf_config import ALLOWED_MODEL_TYPES
        from .models.hf import choose_behavior_layers, discover_stage_modules

        stages = discover_stage_modules(module, in_channels, input_size)
        kind = ALLOWED_MODEL_TYPES.get(module.config.model_type, ("transformer", ""))[0]
        if stages:
            return choose_behavior_layers(stages, kind)
    prefix, parent = "", module
    while True:
        kids = list(parent.named_children())
        if len(kids) == 1 and list(kids[0][1].children()):
            prefix, parent = f"{prefix}{kids[0][0]}.", kids[0][1]
            continue
        break
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, child in parent.named_children():
        def hook(_m, _i, out, name=name):
            out = out[0] if isinstance(out, (tuple, list)) and len(out) else out
            if isinstance(out, torch.Tensor):
                shapes[name] = tuple(out.shape[1:])
        handles.append(child.register_forward_hook(hook))
    was_training = module.training
    module.eval()
    try:
        module(torch.zeros(2, in_channels, *input_size))
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    order = [n for n, _ in parent.named_children() if n in shapes and len(shapes[n]) >= 2]
    runs: list[str] = []
    for i, name in enumerate(order):
        if i + 1 == len(order) or shapes[order[i + 1]] != shapes[name]:
            runs.append(name)
    chosen = tuple(f"{prefix}{n}" for n in runs[-3:])
    if not chosen:
        raise NBAError(INVALID_PARAMS, "could not find behaviour layers automatically (no child module returns "
                       "feature maps or tokens); pass layers=[module names]")
    return chosen


def _as_imageset(data: Any, num_classes: int) -> ImageSet:
    if isinstance(data, ImageSet):
        return data
    if isinstance(data, (str, os.PathLike)):
        from .data.formats import load_dataset_file

        return load_dataset_file(data, num_classes=num_classes)
    try:
        x, y = data
    except (TypeError, ValueError):
        raise NBAError(INVALID_PARAMS, "data must be an ImageSet, a pair (x, y) or a path to a data file") from None
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    y = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if x.dtype == np.uint8:  # N×H×W×C bytes, as images are usually stored
        x = (x[..., None] if x.ndim == 3 else x).transpose(0, 3, 1, 2).astype(np.float32) / 255
    if x.ndim != 4 or not np.isfinite(x).all() or x.min() < -1e-3 or x.max() > 1 + 1e-3:
        raise NBAError(INVALID_PARAMS, "x must be N×C×H×W floats in [0, 1] (or N×H×W×C uint8)")
    if y.ndim != 1 or y.dtype.kind not in "iu" or len(y) != len(x) or y.min() < 0 or y.max() >= num_classes:
        raise NBAError(INVALID_PARAMS, f"y must be {len(x)} integer labels in [0, {num_classes})")
    return ImageSet(np.clip(x, 0, 1), y)


def sanitize_module(module: nn.Module, data: Any, *, method: str = "nba", num_classes: int,
                    input_size: tuple[int, int], mean=None, std=None, params: dict | None = None,
                    layers: list[str] | tuple[str, ...] | None = None, probe: Any = None,
                    probe_target: int | None = None, device: str = "auto", seed: int = 0,
                    holdout_fraction: float = 0.0, progress: Callable[[str, float], None] | None = None,
                    should_cancel: Callable[[], bool] | None = None, evidence: bool = True
                    ) -> tuple[nn.Module, dict]:
    """Clean `module` with `method` on the clean subset `data`; return (cleaned copy of `module`, report).

    `mean`/`std` (per channel, default 0 / 1: the module takes [0, 1] pixels) are applied before the module, as
    its training pipeline did. `progress(stage, fraction)` is called as the run goes; `should_cancel()` returning
    True stops it with `nba_core.errors.Cancelled`. The report has the same fields as `nba sanitize`'s (and
    whatever the pipeline adds, e.g. a verdict), minus the output file."""
    from .hf_pipeline import fit_to_input
    from .pipeline import sanitize_loaded

    if not isinstance(module, nn.Module):
        raise NBAError(INVALID_PARAMS, "module must be a torch.nn.Module")
    if method == "anp" and not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in module.modules()):
        from .hf_config import DEFENSE_NOT_APPLICABLE

        raise NBAError(DEFENSE_NOT_APPLICABLE, "anp does not apply: ANP masks BatchNorm neurons and this module has "
                       "no BatchNorm layer")
    clean = _as_imageset(data, num_classes)
    channels = clean.shape[0]
    mean = tuple(float(v) for v in (mean if mean is not None else (0.0,) * channels))
    std = tuple(float(v) for v in (std if std is not None else (1.0,) * channels))
    try:
        spec = ModelSpec(arch="module", num_classes=num_classes, in_channels=channels,
                         input_size=tuple(input_size), mean=mean, std=std)
    except ValueError as e:
        raise NBAError(INVALID_PARAMS, f"bad model description: {e}") from None
    clean, resized_from = fit_to_input(clean, channels, spec.input_size)
    probe_set = None
    if probe is not None:
        probe_set, _ = fit_to_input(_as_imageset(probe, num_classes), channels, spec.input_size)
    known = {n for n, _ in module.named_modules()}
    chosen = tuple(layers) if layers else auto_behavior_layers(module, channels, spec.input_size)
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise NBAError(INVALID_PARAMS, f"layers not in the module: {unknown}")
    wrapped = ModuleClassifier(module, mean, std, chosen)
    outcome = sanitize_loaded(wrapped, clean, spec=spec, method=method, params=params, probe=probe_set,
                              probe_target=probe_target, device=device, seed=seed,
                              holdout_fraction=holdout_fraction, progress=progress, should_cancel=should_cancel,
                              evidence=evidence)
    report = outcome.report
    report["model"] = {"format": "module", "class": type(module).__name__,
                       "behavior_layers": list(chosen), "layers_chosen": "given" if layers else "automatic"}
    report["data"]["input_size"] = list(spec.input_size)
    report["data"]["resized_from"] = resized_from
    return outcome.model.net, report
