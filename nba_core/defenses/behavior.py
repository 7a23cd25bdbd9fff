"""Neural-behaviour representations R^l of a layer's output (see NBA.md §3.2).

NAD uses `attention_map`; NBA may combine several. Each maps a B×C×H×W (or B×D) feature tensor to a
normalised summary so that distances between student and teacher are scale-free.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """NAD's spatial attention: sum_c |F_c|^p, flattened over H×W, L2-normalised per sample."""
    if feat.ndim == 2:
        feat = feat[:, :, None, None]
    a = feat.float().abs().pow(p).sum(1).flatten(1)
    return F.normalize(a, dim=1)


def attention_distance(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Mean squared distance between attention maps (NAD's per-layer loss, before its β weight)."""
    return (attention_map(student_feat, p) - attention_map(teacher_feat, p)).pow(2).mean()
