"""The params table (nba_core.method_params) matches every defense's Config, and bad values are refused the same
way by the torch-free check the API runs and by Defense.make_config (issue 10 rows 6 and 10)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from nba_core.defenses import METHODS, defense_class
from nba_core.errors import NBAError
from nba_core.method_params import PARAMS, check_method_params


@pytest.mark.parametrize("method", METHODS)
def test_table_matches_the_config(method):
    cls = defense_class(method)
    defaults = cls.Config()
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    assert set(PARAMS[method]) == fields
    for name, param in PARAMS[method].items():
        value = getattr(defaults, name)
        assert param.kind is type(value), (method, name)
        assert param.check(method, name, value) == value  # every default lies inside its bounds


@pytest.mark.parametrize("method", METHODS)
def test_just_past_every_numeric_bound_is_refused_by_both(method):
    cls = defense_class(method)
    for name, param in PARAMS[method].items():
        if param.kind not in (int, float) or param.high is None:
            continue
        bad = param.high + (1 if param.kind is int else param.high * 0.01 + 1e-9)
        for check in (lambda p: check_method_params(method, p), cls.make_config):
            with pytest.raises(NBAError) as e:
                check({name: bad})
            assert e.value.code == "invalid_params", (method, name)


@pytest.mark.parametrize("params", [{"epochs": 10**6}, {"lr": math.nan}, {"lr": math.inf}, {"epochs": 2.0},
                                    {"epochs": True}, {"epochs": "20"}, {"nope": 1}, {"schedule": "warp"}])
def test_bad_values(params):
    with pytest.raises(NBAError) as e:
        check_method_params("ft", params)
    assert e.value.code == "invalid_params"
    with pytest.raises(NBAError):
        defense_class("ft").make_config(params)


def test_lists_strings_and_class_counts():
    assert check_method_params("nad", {"betas": [1, 2]}) == {"betas": (1.0, 2.0)}
    assert check_method_params("nba", {"representations": "attention,flow", "lr" if False else "beta": 2})
    for params in ({"betas": [math.nan]}, {"representations": "attention,evil"}, {"layers": "x" * 5000}):
        with pytest.raises(NBAError):
            check_method_params("nba" if "betas" not in params else "nad", params)
    with pytest.raises(NBAError):
        check_method_params("nba", {"top_k": 11}, num_classes=10)
    assert check_method_params("nba", {"top_k": 10}, num_classes=10) == {"top_k": 10}
    with pytest.raises(NBAError) as e:
        check_method_params("nope", {})
    assert e.value.code == "unknown_method"
