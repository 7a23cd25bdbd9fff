"""The one in-memory data container every module passes around."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ImageSet:
    """Images as float32 N×C×H×W in [0, 1] (pixel space: triggers are applied here) and int64 labels."""

    x: np.ndarray
    y: np.ndarray
    class_names: list[str] | None = field(default=None, compare=False)  # label i is class_names[i], when known

    def __post_init__(self) -> None:
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"ImageSet wants x N×C×H×W and y N, got {self.x.shape} and {self.y.shape}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.x[index], self.y[index], class_names=self.class_names)

    def without_class(self, label: int) -> "ImageSet":
        return self.subset(np.flatnonzero(self.y != label))


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices so that `fraction` of every class goes to the second part (at least one per class
    when the class has two or more members). Deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for label in np.unique(y):
        idx = np.flatnonzero(y == label)
        rng.shuffle(idx)
        k = int(round(len(idx) * fraction))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        second.append(idx[:k])
        first.append(idx[k:])
    return np.sort(np.concatenate(first)), np.sort(np.concatenate(second))
