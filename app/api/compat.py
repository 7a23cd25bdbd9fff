"""Model/data compatibility checked at `POST /v1/jobs`, from what the upload checks recorded (artifacts.info) and
the model's spec: no decoding, no torch. A job the worker would refuse on these grounds is refused here (422)
instead of being queued: image shape against the spec's input, labels against its classes, and the decoded size
of the set (N×C×H×W float32) against the loader's bound. Artifacts uploaded before these records existed
(info NULL) are left to the worker's full checks.
"""

from __future__ import annotations

from typing import Any

from app.core.models import Artifact
from nba_core.data.formats import DataLimits, check_decoded_size, npz_layout
from nba_core.errors import DATA_LABEL_OUT_OF_RANGE, DATA_SHAPE_MISMATCH, NBAError


def _check_one(which: str, info: dict[str, Any] | None, spec: dict[str, Any], limits: DataLimits) -> None:
    if not info:
        return
    channels, size = spec.get("in_channels"), spec.get("input_size")
    num_classes = spec.get("num_classes")
    if not isinstance(channels, int) or not isinstance(size, (list, tuple)) or len(size) != 2:
        return
    expect = (channels, int(size[0]), int(size[1]))
    images = info.get("images")
    arrays = info.get("arrays") or {}
    if "x" in arrays:
        images, shape = npz_layout(arrays["x"]["shape"], arrays["x"]["dtype"], expect)
        if shape != expect:
            raise NBAError(DATA_SHAPE_MISMATCH, f"the {which}'s images are {list(shape)} (C, H, W); the model "
                           f"expects {list(expect)}")
    if isinstance(images, int):
        try:
            check_decoded_size(images, expect, limits)
        except NBAError as e:
            raise NBAError(e.code, f"the {which}: {e.message}") from None
    labels = info.get("label_range")
    if isinstance(num_classes, int) and isinstance(labels, (list, tuple)) and len(labels) == 2:
        low, high = labels
        if low < 0 or high >= num_classes:
            raise NBAError(DATA_LABEL_OUT_OF_RANGE, f"the {which}'s labels span [{low}, {high}] but the model has "
                           f"{num_classes} classes")


def check_job_inputs(model: Artifact, dataset: Artifact, probe: Artifact | None,
                     limits: DataLimits = DataLimits()) -> None:
    spec = model.spec or {}
    _check_one("dataset", dataset.info, spec, limits)
    if probe is not None:
        _check_one("probe set", probe.info, spec, limits)
