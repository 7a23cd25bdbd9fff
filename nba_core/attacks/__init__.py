"""Backdoor attacks (for evaluation and demos), by name."""

from __future__ import annotations

from ..errors import NBAError, UNKNOWN_ATTACK, INVALID_PARAMS
from .base import Attack
from .badnets import BadNets
from .blended import Blended
from .trojan import Trojan
from .sig import SIG
from .label_consistent import LabelConsistent
from .wanet import WaNet
from .label_shift import AllToAll, MultiTarget

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blended": Blended,
    "trojan": Trojan,
    "sig": SIG,
    "cl": LabelConsistent,
    "wanet": WaNet,
}


def get_attack(name: str, *, all_to_all: bool = False, num_classes: int | None = None, **params) -> Attack:
    """The attack `name`; with all_to_all, its trigger maps class y to y + 1 mod num_classes instead of one target."""
    if all_to_all:
        if num_classes is None:
            raise NBAError(INVALID_PARAMS, "an all-to-all attack needs num_classes")
        if name in ("sig", "cl"):
            raise NBAError(INVALID_PARAMS, f"{name} is clean-label (poisons only target images): no all-to-all mode")
        params.pop("target", None)
        return AllToAll(get_attack(name, **params), num_classes)
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise NBAError(UNKNOWN_ATTACK, f"unknown attack {name!r}; known: {', '.join(ATTACKS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise NBAError(INVALID_PARAMS, f"bad parameters for attack {name}: {e}") from e


__all__ = ["Attack", "ATTACKS", "AllToAll", "MultiTarget", "get_attack"]
