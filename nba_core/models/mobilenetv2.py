"""MobileNetV2 (Sandler et al., 2018) with CIFAR strides: a stride-1 stem and a stride-1 second stage, so a 32×32
input reaches the head at 4×4 (total stride 8) instead of ImageNet's total stride 32."""

from __future__ import annotations

import torch
from torch import nn

from ..errors import NBAError, SPEC_INVALID

# (expansion t, output channels c, repeats n, first stride s) per stage, from the paper's Table 2 with the
# first two downsamplings removed for 32×32 inputs.
_SETTINGS: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _divisible(v: float, divisor: int = 8) -> int:
    """Round a scaled width to a multiple of 8 without dropping more than 10 % (the reference rule)."""
    out = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if out < 0.9 * v:
        out += divisor
    return out


def _conv_bn_relu(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU6(inplace=True),
    ]


class InvertedResidual(nn.Module):
    """1×1 expand -> 3×3 depthwise -> 1×1 linear projection; a residual connection when shapes allow."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += _conv_bn_relu(cin, hidden, 1)
        layers += _conv_bn_relu(hidden, hidden, 3, stride=stride, groups=hidden)
        layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        self.use_residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    # The last stage at each spatial resolution (32×32, 16×16, 8×8 and 4×4 for a 32×32 input).
    behavior_layers = ("stage2", "stage3", "stage5", "stage7")

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width_mult: float = 1.0):
        super().__init__()
        if isinstance(width_mult, bool) or not isinstance(width_mult, (int, float)) or not 0.1 <= width_mult <= 4:
            raise NBAError(SPEC_INVALID, f"mobilenetv2 width_mult must be a number in [0.1, 4], got {width_mult!r}")
        cin = _divisible(32 * width_mult)
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, cin, 3, stride=1))
        for i, (t, c, n, s) in enumerate(_SETTINGS, start=1):
            cout = _divisible(c * width_mult)
            blocks = [InvertedResidual(cin if j == 0 else cout, cout, s if j == 0 else 1, t) for j in range(n)]
            setattr(self, f"stage{i}", nn.Sequential(*blocks))
            cin = cout
        last = _divisible(1280 * max(1.0, width_mult))
        self.head = nn.Sequential(*_conv_bn_relu(cin, last, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(1, len(_SETTINGS) + 1):
            x = getattr(self, f"stage{i}")(x)
        x = self.head(x)
        return self.classifier(torch.flatten(self.pool(x), 1))
