"""The model spec: a small JSON document that travels with every checkpoint and says how to build the network.

Torch-free on purpose: the API validates specs (schema, known architecture) without importing torch.
"""

from __future__ import annotations

import json
import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator

from .arch_budget import check_arch_params
from .errors import NBAError, SPEC_INVALID, UNKNOWN_ARCHITECTURE

# Architecture names known to the registry in nba_core.models (a test keeps the two in sync).
ARCHITECTURES: tuple[str, ...] = ("small_cnn", "preact_resnet18", "wrn16", "vgg11_bn", "mobilenetv2")

MAX_SPEC_BYTES = 64 * 1024
# JSON nesting allowed in a spec document (the schema itself needs 3); deeper documents are refused before
# validation, and the JSON parser's own RecursionError is caught too.
MAX_SPEC_DEPTH = 16


def json_depth(value: Any, limit: int) -> int:
    """Nesting depth of a parsed JSON value, computed iteratively (no recursion) and stopping once past `limit`."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list, tuple)):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def all_finite(value: Any) -> bool:
    """False if a NaN or an infinity sits anywhere in a parsed JSON value (iterative)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float) and not math.isfinite(item):
            return False
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return True


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


class ModelSpec(BaseModel):
    """How to build a network: architecture, classes, input geometry and normalisation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: str
    num_classes: int = Field(ge=2, le=1000)
    in_channels: int = Field(ge=1, le=4)
    input_size: tuple[int, int] = Field(description="(height, width) in pixels")
    # FiniteFloat: `NaN <= 0` is False, so a NaN std would pass a plain range check.
    mean: tuple[FiniteFloat, ...] = Field(description="per-channel mean subtracted after scaling pixels to [0, 1]")
    std: tuple[FiniteFloat, ...] = Field(description="per-channel std divided after subtracting the mean")
    arch_params: dict[str, Any] = Field(default_factory=dict, description="e.g. {'widen_factor': 2} for wrn16")
    class_names: tuple[str, ...] | None = Field(default=None, description="the classes in label order (optional); "
                                                "maps data folders and string labels to labels")
    spec_version: int = 1

    @field_validator("input_size")
    @classmethod
    def _sane_size(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not all(4 <= s <= 512 for s in v):
            raise ValueError("input_size entries must be between 4 and 512 pixels")
        return v

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(1e-6 <= s <= 1e3 for s in v):
            raise ValueError("std entries must be between 1e-6 and 1000")
        return v

    @field_validator("mean")
    @classmethod
    def _bounded_mean(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not all(-1e3 <= m <= 1e3 for m in v):
            raise ValueError("mean entries must be between -1000 and 1000")
        return v

    @model_validator(mode="after")
    def _channels_match(self) -> "ModelSpec":
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError("mean and std must have one entry per input channel")
        if self.class_names is not None:
            if len(self.class_names) != self.num_classes:
                raise ValueError(f"class_names has {len(self.class_names)} entries for {self.num_classes} classes")
            if len(set(self.class_names)) != len(self.class_names) or not all(n.strip() for n in self.class_names):
                raise ValueError("class_names must be distinct, non-empty names")
        if not all_finite(self.arch_params):
            raise ValueError("arch_params must not hold NaN or infinite numbers")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True)


def parse_spec(source: str | bytes | dict) -> ModelSpec:
    """Parse and validate a spec from JSON text/bytes or a dict; unknown architectures get their own code."""
    if isinstance(source, (bytes, bytearray)):
        if len(source) > MAX_SPEC_BYTES:
            raise NBAError(SPEC_INVALID, f"spec is larger than {MAX_SPEC_BYTES} bytes")
        try:
            source = source.decode("utf-8")
        except UnicodeDecodeError as e:
            raise NBAError(SPEC_INVALID, "spec is not UTF-8 JSON") from e
    if isinstance(source, str):
        if len(source) > MAX_SPEC_BYTES:
            raise NBAError(SPEC_INVALID, f"spec is larger than {MAX_SPEC_BYTES} bytes")
        try:
            source = json.loads(source, parse_constant=_refuse_constant)
        except (json.JSONDecodeError, ValueError) as e:
            raise NBAError(SPEC_INVALID, f"spec is not valid JSON: {e}") from None
        except RecursionError:
            raise NBAError(SPEC_INVALID, f"spec is nested deeper than {MAX_SPEC_DEPTH} levels") from None
    if not isinstance(source, dict):
        raise NBAError(SPEC_INVALID, "spec must be a JSON object")
    if json_depth(source, MAX_SPEC_DEPTH) > MAX_SPEC_DEPTH:
        raise NBAError(SPEC_INVALID, f"spec is nested deeper than {MAX_SPEC_DEPTH} levels")
    arch = source.get("arch")
    if isinstance(arch, str) and arch not in ARCHITECTURES:
        raise NBAError(
            UNKNOWN_ARCHITECTURE,
            f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}. A Hugging Face model needs no spec "
            "(upload its save_pretrained folder as a zip); any other nn.Module: nba_core.sanitize_module in Python",
        )
    try:
        spec = ModelSpec.model_validate(source)
    except ValidationError as e:
        details = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'spec'}: {err['msg']}" for err in e.errors())
        raise NBAError(SPEC_INVALID, details) from None
    # arch_params' names, types and ranges, then the parameter count and activation size they imply: bounded
    # here, from the spec, so an absurd width is refused at upload instead of OOM-killing a worker.
    check_arch_params(spec.arch, spec.arch_params, in_channels=spec.in_channels, num_classes=spec.num_classes,
                      input_size=spec.input_size)
    return spec


def load_spec(path: str) -> ModelSpec:
    try:
        with open(path, "rb") as f:
            return parse_spec(f.read(MAX_SPEC_BYTES + 1))
    except OSError as e:
        raise NBAError(SPEC_INVALID, f"cannot read spec {path}: {e.strerror}") from e
