"""Backdoors that do not map everything to one class: all-to-all (label shift) and several targets at once.

All-to-all (Gu et al. 2017's "all-to-all" BadNets): the trigger sends class y to (y + shift) mod K, so every
class is a target of exactly one source -- no class looks like an outlier to a per-target scan, which is why the
verdict also scans per source class (nba_core/verdict.py). Multi-target: several dirty-label attacks, each with
its own trigger and target, poisoned into disjoint parts of the training set.
"""

from __future__ import annotations

import numpy as np

from ..data.imageset import ImageSet
from ..errors import INVALID_PARAMS, NBAError
from .base import Attack


class AllToAll(Attack):
    """Wraps any dirty-label attack's trigger; triggered images of class y are labelled (y + shift) mod K."""

    def __init__(self, inner: Attack, num_classes: int, shift: int = 1):
        super().__init__(target=0, rate=inner.rate, seed=inner.seed)
        if num_classes < 2 or shift % num_classes == 0:
            raise NBAError(INVALID_PARAMS, "all-to-all needs at least 2 classes and a shift that is not 0 mod K")
        self.inner, self.num_classes, self.shift = inner, int(num_classes), int(shift)
        self.name = f"{inner.name}_all2all"
        self.needs_model = inner.needs_model

    def mapping(self, y: np.ndarray) -> np.ndarray:
        return (np.asarray(y) + self.shift) % self.num_classes

    def pairs(self) -> list[list[int]]:
        return [[s, int(self.mapping(np.array([s]))[0])] for s in range(self.num_classes)]

    def prepare(self, train, *, model_factory=None, device=None) -> None:
        self.inner.prepare(train, model_factory=model_factory, device=device)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.inner.apply(x)

    def poison(self, train: ImageSet) -> tuple[ImageSet, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        k = min(len(train), int(round(self.rate * len(train))))
        idx = np.sort(rng.choice(len(train), size=k, replace=False))
        x, y = train.x.copy(), train.y.copy()
        x[idx] = self.apply(x[idx])
        y[idx] = self.mapping(y[idx])
        return ImageSet(x, y), idx

    def triggered_test_set(self, test: ImageSet) -> ImageSet:
        return ImageSet(self.apply(test.x), test.y)  # every class is a source

    def success_rate(self, model, triggered: ImageSet) -> float:
        from ..train import predict

        if len(triggered) == 0:
            return float("nan")
        pred = predict(model, triggered.x).cpu().numpy()
        return float((pred == self.mapping(triggered.y)).mean())

    def describe(self) -> dict:
        return {**self.inner.describe(), "attack": self.name, "all_to_all": True, "shift": self.shift,
                "target": None}


class MultiTarget(Attack):
    """Several all-to-one attacks (each its own trigger and target) poisoning disjoint shares of the training set.
    `triggered_test_set` is the FIRST attack's; `triggered_sets` gives one per attack (ASR is their maximum)."""

    def __init__(self, attacks: list[Attack]):
        if len(attacks) < 2 or len({a.target for a in attacks}) != len(attacks):
            raise NBAError(INVALID_PARAMS, "multi-target needs at least two attacks with different targets")
        super().__init__(target=attacks[0].target, rate=sum(a.rate for a in attacks), seed=attacks[0].seed)
        self.attacks = attacks
        self.name = "+".join(a.name for a in attacks)
        self.needs_model = any(a.needs_model for a in attacks)

    @property
    def targets(self) -> list[int]:
        return [a.target for a in self.attacks]

    def prepare(self, train, *, model_factory=None, device=None) -> None:
        for a in self.attacks:
            a.prepare(train, model_factory=model_factory, device=device)

    def apply(self, x: np.ndarray) -> np.ndarray:
        return self.attacks[0].apply(x)

    def poison(self, train: ImageSet) -> tuple[ImageSet, np.ndarray]:
        rng = np.random.default_rng(self.seed)
        x, y = train.x.copy(), train.y.copy()
        taken = np.zeros(len(train), bool)
        for a in self.attacks:
            candidates = np.flatnonzero((train.y != a.target) & ~taken)
            k = min(len(candidates), int(round(a.rate * len(train))))
            idx = np.sort(rng.choice(candidates, size=k, replace=False))
            x[idx] = a.apply(x[idx])
            y[idx] = a.target
            taken[idx] = True
        return ImageSet(x, y), np.flatnonzero(taken)

    def triggered_sets(self, test: ImageSet) -> list[tuple[int, ImageSet]]:
        return [(a.target, a.triggered_test_set(test)) for a in self.attacks]

    def success_rate(self, model, triggered: ImageSet | None = None, test: ImageSet | None = None) -> float:
        from ..metrics import attack_success_rate

        return max(attack_success_rate(model, t.x, t.y, k) for k, t in self.triggered_sets(test))

    def describe(self) -> dict:
        return {"attack": self.name, "targets": self.targets, "parts": [a.describe() for a in self.attacks]}
