"""WRN-16-k (Zagoruyko & Komodakis, "Wide Residual Networks", 2016): 3 groups of 2 pre-activation blocks.

`widen_factor` is k (WRN-16-1 is the network NAD and NBA report on). Dropout is not used (rate 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NBAError, SPEC_INVALID
from .preact_resnet import preact_stage


class WideResNet16(nn.Module):
    # NAD's attention layers: the first two group outputs and the third after the final BN+ReLU.
    behavior_layers = ("block1", "block2", "final_act")

    depth = 16

    def __init__(self, num_classes: int = 10, in_channels: int = 3, widen_factor: int = 1):
        super().__init__()
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or not 1 <= widen_factor <= 16:
            raise NBAError(SPEC_INVALID, f"wrn16 widen_factor must be an integer in [1, 16], got {widen_factor!r}")
        blocks = (self.depth - 4) // 6  # 2 blocks per group for depth 16
        widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        # WRN's block is the pre-activation residual block (1×1 projection of the activated input).
        self.block1 = preact_stage(widths[0], widths[1], 1, blocks)
        self.block2 = preact_stage(widths[1], widths[2], 2, blocks)
        self.block3 = preact_stage(widths[2], widths[3], 2, blocks)
        self.final_act = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.final_act(x)
        return self.fc(torch.flatten(self.pool(x), 1))
