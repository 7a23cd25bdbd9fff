"""Hyperparameter overrides as the command line gives them: `--params '{"epochs": 5}'` and `--param epochs=5`."""

from __future__ import annotations

import json

from .errors import INVALID_PARAMS, NBAError


def parse_params(items: list[str] | None, params_json: str | None) -> dict:
    """Merge a JSON object and KEY=VALUE items (values parsed as JSON when they parse, else kept as strings)."""
    params: dict = {}
    if params_json:
        try:
            loaded = json.loads(params_json)
        except json.JSONDecodeError as e:
            raise NBAError(INVALID_PARAMS, f"--params is not valid JSON: {e}") from e
        if not isinstance(loaded, dict):
            raise NBAError(INVALID_PARAMS, "--params must be a JSON object")
        params.update(loaded)
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise NBAError(INVALID_PARAMS, f"--param wants KEY=VALUE, got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params
