"""Sanitize a Hugging Face image classifier: folder or zip in, the same layout out (config.json, model.safetensors
[, preprocessor_config.json]) so that `AutoModelForImageClassification.from_pretrained(out)` loads it unchanged.

The run itself is the registry's: `pipeline.sanitize_loaded` on the wrapped model. What is HF-specific: the cheap
config checks come first, the clean images are resized to the model's input when their size differs (the report
says so), and which defenses apply is decided from the config before anything is built.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from .data.imageset import ImageSet
from .errors import DATA_SHAPE_MISMATCH, NBAError
from .hf_config import DEFENSE_NOT_APPLICABLE, applicable_methods, check_method_applies
from .hf_io import check_hf_folder, check_hf_zip, is_hf_folder, pack_hf_zip, zip_has_hf_config



def is_hf_model_path(path: str | os.PathLike) -> bool:
    p = Path(path)
    return is_hf_folder(p) or (p.is_file() and zip_has_hf_config(p))


def check_hf_path(path: str | os.PathLike, input_size=None):
    p = Path(path)
    return check_hf_folder(p, input_size=input_size) if p.is_dir() else check_hf_zip(p, input_size=input_size)


def fit_to_input(data: ImageSet, channels: int, size: tuple[int, int]) -> tuple[ImageSet, list[int] | None]:
    """Resize images (bilinear, antialiased) to the model's input size; returns the set and the old (H, W) or None."""
    if data.shape[0] != channels:
        raise NBAError(DATA_SHAPE_MISMATCH, f"images have {data.shape[0]} channels; the model takes {channels}")
    if tuple(data.shape[1:]) == tuple(size):
        return data, None
    import torch
    import torch.nn.functional as F

    out = []
    for i in range(0, len(data), 256):
        xb = torch.as_tensor(data.x[i : i + 256])
        out.append(F.interpolate(xb, size=tuple(size), mode="bilinear", align_corners=False,
                                 antialias=True).clamp_(0, 1).numpy())
    return ImageSet(np.concatenate(out), data.y), list(data.shape[1:])


def _load_data(path: str, num_classes: int, channels: int, size: tuple[int, int] | None):
    from .data.formats import load_dataset_file

    if size is not None:
        try:
            return load_dataset_file(path, num_classes=num_classes, expect_shape=(channels, *size)), None
        except NBAError as e:
            if e.code != DATA_SHAPE_MISMATCH:
                raise
    data = load_dataset_file(path, num_classes=num_classes)
    if size is None:
        return data, None
    return fit_to_input(data, channels, size)


def _fixed_input_size(checked, input_size: tuple[int, int] | None) -> tuple[int, int] | None:
    """The input size the model needs: its config's image size, else the caller's, else the preprocessor's
    (None: any size, the data's own)."""
    return checked.info.image_size or (tuple(input_size) if input_size else None) or (
        tuple(checked.preprocessor["input_size"]) if checked.preprocessor and checked.preprocessor["input_size"]
        else None)


def sanitize_hf(*, model_path: str, data_path: str, method: str, params: dict | None, out_path: str,
                report_path: str | None = None, probe_path: str | None = None, probe_target: int | None = None,
                device: str = "auto", seed: int = 0, holdout_fraction: float = 0.0,
                progress: Callable[[str, float], None] | None = None,
                should_cancel: Callable[[], bool] | None = None, evidence: bool = True,
                input_size: tuple[int, int] | None = None, mean=None, std=None, layers=None,
                out_zip: str | None = None, on_before: Callable[[dict], None] | None = None,
                allow_low_accuracy: bool = False, eval_path: str | None = None, crossfit: int = 0) -> dict:
    """Like `pipeline.sanitize` for an HF folder/zip; `out_path` is the output folder (and `out_zip` a zip of it).
    `eval_path`: a separate labelled clean set for clean accuracy (resized to the model's input like the data);
    `crossfit` = K ≥ 2: the K-fold estimate of the clean-accuracy change (K more defense runs)."""
    from .models.hf import load_hf_model, save_hf_model
    from .pipeline import write_json_atomic, sanitize_loaded
    from .train import no_progress

    t_start = time.perf_counter()
    progress = progress or no_progress
    from .defenses import get_defense

    get_defense(method, params)  # method and params first: cheap
    checked = check_hf_path(model_path, input_size=input_size)  # configs and weights header, nothing built
    info = checked.info
    check_method_applies(method, info)
    progress("load", 0.0)
    fixed = _fixed_input_size(checked, input_size)
    data, resized_from = _load_data(data_path, info.num_labels, info.num_channels, fixed)
    size = fixed or tuple(data.shape[1:])
    with tempfile.TemporaryDirectory(prefix="nba-hf-") as work:
        model = load_hf_model(model_path, input_size=input_size, mean=mean, std=std, layers=layers,
                              default_input_size=size, workdir=work)
        probe = None
        probe_resized = None
        if probe_path:
            probe, probe_resized = _load_data(probe_path, info.num_labels, info.num_channels, model.spec.input_size)
        eval_set = eval_resized = None
        if eval_path:
            eval_set, eval_resized = _load_data(eval_path, info.num_labels, info.num_channels, model.spec.input_size)
        outcome = sanitize_loaded(model.module, data, spec=model.spec, method=method, params=params, probe=probe,
                                  probe_target=probe_target, device=device, seed=seed,
                                  holdout_fraction=holdout_fraction, progress=progress,
                                  should_cancel=should_cancel, evidence=evidence, on_before=on_before,
                                  allow_low_accuracy=allow_low_accuracy, eval_set=eval_set, crossfit=crossfit)
        progress("save", 0.99)
        saved = save_hf_model(model, outcome.model, out_path)
    report = outcome.report
    report["model"] = model.describe()
    report["data"]["input_size"] = list(model.spec.input_size)
    report["data"]["resized_from"] = resized_from  # None: the images already had the model's input size
    if probe is not None:
        report["data"]["probe_resized_from"] = probe_resized
    if eval_set is not None:
        report["data"]["eval_resized_from"] = eval_resized
    output = {"path": str(out_path), "sha256": saved["sha256"], "format": "hf"}
    if out_zip:
        pack_hf_zip(out_path, out_zip)
        output["zip"] = str(out_zip)
    report["timing"]["total_seconds"] = time.perf_counter() - t_start
    report["output"] = output
    report = json.loads(json.dumps(report, default=str))
    if report_path:
        write_json_atomic(report_path, report)
    progress("done", 1.0)
    return report


def scan_hf(*, model_path: str, data_path: str, report_path: str | None = None, device: str = "auto", seed: int = 0,
            progress: Callable[[str, float], None] | None = None, should_cancel: Callable[[], bool] | None = None,
            input_size: tuple[int, int] | None = None, mean=None, std=None, layers=None) -> dict:
    """Detect only, for an HF folder/zip: `pipeline.scan`'s verdict (the clean set resized to the model's input)."""
    from .models.hf import load_hf_model
    from .pipeline import scan_loaded, write_json_atomic
    from .train import no_progress

    t_start = time.perf_counter()
    progress = progress or no_progress
    checked = check_hf_path(model_path, input_size=input_size)  # configs and weights header, nothing built
    info = checked.info
    progress("load", 0.0)
    fixed = _fixed_input_size(checked, input_size)
    data, resized_from = _load_data(data_path, info.num_labels, info.num_channels, fixed)
    with tempfile.TemporaryDirectory(prefix="nba-hf-") as work:
        model = load_hf_model(model_path, input_size=input_size, mean=mean, std=std, layers=layers,
                              default_input_size=fixed or tuple(data.shape[1:]), workdir=work)
        report = scan_loaded(model.module, data, spec=model.spec, device=device, seed=seed, progress=progress,
                             should_cancel=should_cancel)
    report["model"] = model.describe()
    report["data"] |= {"input_size": list(model.spec.input_size), "resized_from": resized_from}
    report["timing"]["total_seconds"] = time.perf_counter() - t_start
    report = json.loads(json.dumps(report, default=str))
    if report_path:
        write_json_atomic(report_path, report)
    progress("done", 1.0)
    return report


__all__ = ["sanitize_hf", "scan_hf", "is_hf_model_path", "applicable_methods", "check_method_applies", "fit_to_input",
           "DEFENSE_NOT_APPLICABLE"]
