"""PreAct-ResNet18 (He et al., "Identity Mappings in Deep Residual Networks", 2016) with a CIFAR stem.

The stem is a single 3×3 stride-1 convolution (no max-pool), as is usual for 32×32 inputs; an adaptive average
pool before the classifier lets the same network run on other sizes (e.g. 28×28 grey images).
"""

from __future__ import annotations

import torch
from torch import nn


class PreActBlock(nn.Module):
    """BN-ReLU-conv ×2 with an identity (or 1×1 projection) shortcut; the sum is left un-activated."""

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
        # Not in-place: x is the previous stage's output, which forward hooks may have captured.
        pre = torch.relu(self.bn1(x))
        # A projection shortcut sees the pre-activated input (the paper's placement); identity keeps raw x.
        skip = self.shortcut(pre) if self.shortcut is not None else x
        out = self.conv1(pre)
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + skip


def preact_stage(cin: int, cout: int, stride: int, blocks: int = 2) -> nn.Sequential:
    layers = [PreActBlock(cin, cout, stride)]
    layers += [PreActBlock(cout, cout, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class PreActResNet18(nn.Module):
    # The outputs of the four residual stages (64, 128, 256, 512 channels; strides 1, 2, 2, 2).
    behavior_layers = ("layer1", "layer2", "layer3", "layer4")

    def __init__(self, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        w = 64
        self.conv1 = nn.Conv2d(in_channels, w, 3, stride=1, padding=1, bias=False)
        self.layer1 = preact_stage(w, w, 1)
        self.layer2 = preact_stage(w, 2 * w, 2)
        self.layer3 = preact_stage(2 * w, 4 * w, 2)
        self.layer4 = preact_stage(4 * w, 8 * w, 2)
        # Pre-activation nets end with one BN-ReLU after the last addition.
        self.bn = nn.BatchNorm2d(8 * w)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(8 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.relu(self.bn(x))
        return self.linear(torch.flatten(self.pool(x), 1))
