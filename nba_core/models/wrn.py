"""WRN-16-k (Zagoruyko & Komodakis, "Wide Residual Networks", 2016): 3 groups of 2 pre-activation blocks.

`widen_factor` is k (WRN-16-1 is the network NAD and NBA report on). Dropout is not used (rate 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NBAError, SPEC_INVALID


class WideBlock(nn.Module):
    """BN-ReLU-conv3×3 ×2; when the width or stride changes, a 1×1 projection of the activated input is the
    shortcut (as in the reference implementation), otherwise the raw input is."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = torch.relu(self.bn1(x))  # not in-place: x may be a captured group output
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv2(torch.relu(self.bn2(self.conv1(pre))))
        return out + skip


def _group(cin: int, cout: int, stride: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(WideBlock(cin, cout, stride), *[WideBlock(cout, cout, 1) for _ in range(blocks - 1)])


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
        self.block1 = _group(widths[0], widths[1], 1, blocks)
        self.block2 = _group(widths[1], widths[2], 2, blocks)
        self.block3 = _group(widths[2], widths[3], 2, blocks)
        self.final_act = nn.Sequential(nn.BatchNorm2d(widths[3]), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.final_act(x)
        return self.fc(torch.flatten(self.pool(x), 1))
