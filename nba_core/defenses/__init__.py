"""Defenses by name: ft, fp, nad, anp, ibau, sau, ftsam, nba."""

from __future__ import annotations

import importlib

from ..errors import NBAError, UNKNOWN_METHOD
from .base import Defense, DefenseContext, DefenseResult

# method name -> "module:Class" (imported lazily so one broken/slow module does not block the others)
_DEFENSES = {
    "ft": "finetune:FineTuning",
    "fp": "fineprune:FinePruning",
    "nad": "nad:NAD",
    "anp": "anp:ANP",
    "ibau": "ibau:IBAU",
    "sau": "sau:SAU",
    "ftsam": "ftsam:FTSAM",
    "nba": "nba:NBA",
}
METHODS: tuple[str, ...] = tuple(_DEFENSES)


def defense_class(method: str) -> type[Defense]:
    """The defense class for a method name (case-insensitive: "NBA" is "nba")."""
    try:
        module, cls = _DEFENSES[str(method).strip().lower()].split(":")
    except KeyError:
        raise NBAError(UNKNOWN_METHOD, f"unknown method {method!r}; known: {', '.join(METHODS)}") from None
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def get_defense(method: str, params: dict | None = None) -> Defense:
    return defense_class(method)(**(params or {}))


__all__ = ["Defense", "DefenseContext", "DefenseResult", "METHODS", "defense_class", "get_defense"]
