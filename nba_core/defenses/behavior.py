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


# ---- NBA's representations (NBA.md §3.2) ------------------------------------------------------------------
# Each `*_repr` maps features to unit-norm rows; `behavior_distance` compares student and teacher with the
# squared L2 distance per sample (in [0, 4]), averaged over the batch, so weights mean the same thing for every
# representation and layer size (NAD's mean-over-pixels distance shrinks with the map size instead).

REPRESENTATIONS: tuple[str, ...] = ("attention", "channel", "relational", "flow", "gram")


def _as_map(feat: torch.Tensor) -> torch.Tensor:
    return feat[:, :, None, None] if feat.ndim == 2 else feat


def channel_repr(feat: torch.Tensor) -> torch.Tensor:
    """Which neurons fire: per-channel mean activation (over H×W), L2-normalised per sample."""
    return F.normalize(_as_map(feat).float().mean((2, 3)), dim=1)


def relational_repr(feat: torch.Tensor) -> torch.Tensor:
    """How the batch's samples relate: the cosine-similarity matrix of flattened features, rows L2-normalised.
    Needs the student and teacher to see the same batch (they do: both get identical inputs)."""
    f = F.normalize(feat.float().flatten(1), dim=1)
    return F.normalize(f @ f.t(), dim=1)


def flow_repr(feat_a: torch.Tensor, feat_b: torch.Tensor) -> torch.Tensor:
    """How behaviour flows from one stage to the next (FSP-like): per sample, the C_a×C_b inner-product matrix
    between the two stages' channel maps (the larger map average-pooled to the smaller size), flattened and
    L2-normalised."""
    a, b = _as_map(feat_a).float(), _as_map(feat_b).float()
    size = (min(a.shape[2], b.shape[2]), min(a.shape[3], b.shape[3]))
    a = F.adaptive_avg_pool2d(a, size).flatten(2)  # B×Ca×P
    b = F.adaptive_avg_pool2d(b, size).flatten(2)  # B×Cb×P
    g = torch.bmm(a, b.transpose(1, 2)) / a.shape[2]
    return F.normalize(g.flatten(1), dim=1)


def gram_repr(feat: torch.Tensor) -> torch.Tensor:
    """Response behaviour in the paper's form: per sample, the C×C Gram matrix of the channel maps (inner products
    over H×W, divided by H·W), flattened and L2-normalised -- which channels respond together, not where."""
    f = _as_map(feat).float().flatten(2)  # B×C×P
    g = torch.bmm(f, f.transpose(1, 2)) / f.shape[2]
    return F.normalize(g.flatten(1), dim=1)


def _sq_dist(rs: torch.Tensor, rt: torch.Tensor) -> torch.Tensor:
    return (rs - rt).pow(2).sum(1).mean()


def behavior_distance(kind: str, student_feats: list[torch.Tensor], teacher_feats: list[torch.Tensor],
                      weights: list[float] | None = None) -> torch.Tensor:
    """Σ_l w_l · D(R_S^l, R_T^l) for one representation over the given stage outputs (flow: over consecutive
    pairs of stages, weighted by the later stage's weight)."""
    n = len(student_feats)
    weights = list(weights) if weights is not None else [1.0] * n
    total = student_feats[0].new_zeros((), dtype=torch.float32)
    if kind == "flow":
        for i in range(n - 1):
            rs = flow_repr(student_feats[i], student_feats[i + 1])
            rt = flow_repr(teacher_feats[i], teacher_feats[i + 1])
            total = total + weights[i + 1] * _sq_dist(rs, rt)
        return total
    fn = {"attention": attention_map, "channel": channel_repr, "relational": relational_repr,
          "gram": gram_repr}.get(kind)
    if fn is None:
        raise ValueError(f"unknown representation {kind!r}; known: {', '.join(REPRESENTATIONS)}")
    for w, fs, ft in zip(weights, student_feats, teacher_feats):
        total = total + w * _sq_dist(fn(fs), fn(ft))
    return total
