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

ATTACKS: dict[str, type[Attack]] = {
    "badnets": BadNets,
    "blended": Blended,
    "trojan": Trojan,
    "sig": SIG,
    "cl": LabelConsistent,
    "wanet": WaNet,
}


def get_attack(name: str, **params) -> Attack:
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise NBAError(UNKNOWN_ATTACK, f"unknown attack {name!r}; known: {', '.join(ATTACKS)}") from None
    try:
        return cls(**params)
    except TypeError as e:
        raise NBAError(INVALID_PARAMS, f"bad parameters for attack {name}: {e}") from e


__all__ = ["Attack", "ATTACKS", "get_attack"]
