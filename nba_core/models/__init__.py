"""Architecture registry: build a network from a ModelSpec."""

from __future__ import annotations

from typing import Callable

from torch import nn

from ..arch_budget import check_arch_params
from ..errors import NBAError, SPEC_INVALID, UNKNOWN_ARCHITECTURE
from ..spec import ModelSpec
from .base import SpecModel, capture_outputs
from .small_cnn import SmallCNN

# name -> constructor(num_classes, in_channels, **arch_params); must list exactly nba_core.spec.ARCHITECTURES.
REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "small_cnn": SmallCNN,
}


def _register_optional() -> None:
    # The larger architectures live in their own modules; imported here so the registry is complete.
    from .preact_resnet import PreActResNet18
    from .wrn import WideResNet16
    from .vgg import VGG11BN
    from .mobilenetv2 import MobileNetV2

    REGISTRY.update(
        {"preact_resnet18": PreActResNet18, "wrn16": WideResNet16, "vgg11_bn": VGG11BN, "mobilenetv2": MobileNetV2}
    )


_register_optional()


def build_model(spec: ModelSpec) -> SpecModel:
    try:
        ctor = REGISTRY[spec.arch]
    except KeyError:
        raise NBAError(UNKNOWN_ARCHITECTURE, f"unknown architecture {spec.arch!r}") from None
    # Bounded before anything is allocated (parse_spec checks this too; a ModelSpec built directly did not).
    check_arch_params(spec.arch, spec.arch_params, in_channels=spec.in_channels, num_classes=spec.num_classes,
                      input_size=spec.input_size)
    try:
        net = ctor(num_classes=spec.num_classes, in_channels=spec.in_channels, **spec.arch_params)
    except TypeError as e:
        raise NBAError(SPEC_INVALID, f"bad arch_params for {spec.arch}: {e}") from e
    return SpecModel(net, spec.mean, spec.std)


__all__ = ["REGISTRY", "build_model", "SpecModel", "capture_outputs"]
