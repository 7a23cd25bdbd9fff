"""What an architecture may be asked for, and what it will cost, computed from the spec alone (torch-free).

`check_arch_params` validates `arch_params` (names, types, ranges) and bounds the network's parameter count and
its forward activations per image BEFORE anything is built, so a spec like small_cnn `{"width": 6000}` is refused
at upload with spec_invalid instead of OOM-killing a worker in `build_model`. The estimates are upper bounds
(tests/core/test_arch_budget.py builds every architecture and checks estimate >= actual and < 1.5 x actual).
Architectures without an entry here (added elsewhere) are not bounded by this module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

from .errors import NBAError, SPEC_INVALID

# A network of more parameters than this is refused (PreAct-ResNet18 has 11.2M, VGG11-BN 9.2M).
MAX_PARAMETERS = 64_000_000
# Forward activations of one image, in values (fp32: 4 bytes each); training keeps them for a whole batch.
MAX_ACTIVATIONS_PER_IMAGE = 2**27


@dataclass(frozen=True)
class Knob:
    """One arch_params entry: its type (int or float) and inclusive range."""

    kind: type
    low: float
    high: float

    def check(self, arch: str, name: str, value: Any) -> float:
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not is_number or (self.kind is int and not isinstance(value, int)):
            raise NBAError(SPEC_INVALID, f"{arch} arch_params.{name} must be {self.kind.__name__}, got {value!r}")
        if not (math.isfinite(value) and self.low <= value <= self.high):
            raise NBAError(SPEC_INVALID, f"{arch} arch_params.{name} must be between {self.low:g} and "
                           f"{self.high:g}, got {value!r}")
        return value


@dataclass(frozen=True)
class ArchBudget:
    knobs: dict[str, Knob]
    defaults: dict[str, float]
    # (arch_params with defaults filled, in_channels, num_classes) -> upper bound on the parameter count
    parameters: Callable[[dict[str, float], int, int], float]
    # (arch_params, in_channels) -> upper bound on activation values per input pixel
    activations_per_pixel: Callable[[dict[str, float], int], float]


def _small_cnn_params(p: dict[str, float], cin: int, classes: int) -> float:
    w = p["width"]
    convs = 9 * (cin * w + 2 * w * w + 4 * w * w + 8 * w * w + 16 * w * w)
    return convs + 26 * w + 36 * w * 256 + 256 + 257 * classes


BUDGETS: dict[str, ArchBudget] = {
    "small_cnn": ArchBudget(
        {"width": Knob(int, 1, 512)}, {"width": 16}, _small_cnn_params,
        lambda p, cin: 8 * p["width"] + cin + 2),
    "wrn16": ArchBudget(
        {"widen_factor": Knob(int, 1, 16)}, {"widen_factor": 1},
        lambda p, cin, classes: 176_000 * p["widen_factor"] ** 2 + 432 * cin + 65 * p["widen_factor"] * classes,
        lambda p, cin: 280 * p["widen_factor"] + cin),
    "preact_resnet18": ArchBudget(
        {}, {}, lambda p, cin, classes: 11_170_000 + 576 * cin + 513 * classes, lambda p, cin: 1150 + cin),
    "vgg11_bn": ArchBudget(
        {}, {}, lambda p, cin, classes: 9_230_000 + 576 * cin + 513 * classes, lambda p, cin: 480 + cin),
    "mobilenetv2": ArchBudget(
        {"width_mult": Knob(float, 0.1, 4.0)}, {"width_mult": 1.0},
        lambda p, cin, classes: 2_240_000 * max(1.0, p["width_mult"]) ** 2 + 288 * cin
        + 1281 * max(1.0, p["width_mult"]) * classes,
        lambda p, cin: 4700 * max(1.0, p["width_mult"]) + cin),
}


def estimate(arch: str, arch_params: dict[str, Any], *, in_channels: int, num_classes: int,
             input_size: tuple[int, int]) -> tuple[int, int] | None:
    """(parameters, activation values per image) upper bounds, or None for an architecture not listed here."""
    budget = BUDGETS.get(arch)
    if budget is None:
        return None
    params = {**budget.defaults, **arch_params}
    pixels = input_size[0] * input_size[1]
    return (math.ceil(budget.parameters(params, in_channels, num_classes)),
            math.ceil(budget.activations_per_pixel(params, in_channels) * pixels + 4096))


def check_arch_params(arch: str, arch_params: dict[str, Any], *, in_channels: int, num_classes: int,
                      input_size: tuple[int, int]) -> None:
    """Raise NBAError(spec_invalid) for unknown/mistyped/out-of-range arch_params or a network over the budget."""
    budget = BUDGETS.get(arch)
    if budget is None:
        return
    unknown = sorted(set(arch_params) - set(budget.knobs))
    if unknown:
        known = ", ".join(sorted(budget.knobs)) or "none"
        raise NBAError(SPEC_INVALID, f"unknown arch_params for {arch}: {', '.join(unknown)} (known: {known})")
    for name, value in arch_params.items():
        budget.knobs[name].check(arch, name, value)
    params, activations = estimate(arch, arch_params, in_channels=in_channels, num_classes=num_classes,
                                   input_size=input_size)  # type: ignore[misc]
    if params > MAX_PARAMETERS:
        raise NBAError(SPEC_INVALID, f"{arch} with {arch_params} has about {params:,} parameters "
                       f"(limit {MAX_PARAMETERS:,})")
    if activations > MAX_ACTIVATIONS_PER_IMAGE:
        raise NBAError(SPEC_INVALID, f"{arch} at {input_size[0]}x{input_size[1]} would hold about {activations:,} "
                       f"activation values per image (limit {MAX_ACTIVATIONS_PER_IMAGE:,}); use a smaller input "
                       "size or width")
