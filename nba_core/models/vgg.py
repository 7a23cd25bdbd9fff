"""VGG-11 with batch norm (Simonyan & Zisserman, 2015; config "A"), CIFAR-style: a single linear classifier on
the pooled 512-channel map instead of the ImageNet 4096-wide head.

Max-pools use ceil_mode so that inputs whose side is not a multiple of 32 (e.g. 28×28) never shrink to zero;
for 32×32 inputs this is identical to the usual floor pooling.
"""

from __future__ import annotations

import torch
from torch import nn

# Output channels of the convolutions in each of the five stages (each stage ends in a 2×2 max-pool).
_STAGES: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512))


def _stage(cin: int, widths: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for cout in widths:
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        cin = cout
    return nn.Sequential(*layers)


class VGG11BN(nn.Module):
    # The last three conv stages, taken before their pooling (256, 512, 512 channels).
    behavior_layers = ("stage3", "stage4", "stage5")

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        cin = in_channels
        for i, widths in enumerate(_STAGES, start=1):
            setattr(self, f"stage{i}", _stage(cin, widths))
            setattr(self, f"pool{i}", nn.MaxPool2d(2, ceil_mode=True))
            cin = widths[-1]
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(_STAGES) + 1):
            x = getattr(self, f"pool{i}")(getattr(self, f"stage{i}")(x))
        return self.classifier(torch.flatten(self.avgpool(x), 1))
