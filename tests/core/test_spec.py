"""The model spec: valid documents parse, unknown architectures and schema errors get their own codes."""

from __future__ import annotations

import json

import pytest

from nba_core.errors import NBAError, SPEC_INVALID, UNKNOWN_ARCHITECTURE
from nba_core.spec import ARCHITECTURES, MAX_SPEC_BYTES, load_spec, parse_spec

VALID = {"arch": "wrn16", "num_classes": 10, "in_channels": 3, "input_size": [32, 32],
         "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26], "arch_params": {"widen_factor": 2}}


def code_of(source) -> str:
    with pytest.raises(NBAError) as e:
        parse_spec(source)
    return e.value.code


@pytest.mark.parametrize("source", [VALID, json.dumps(VALID), json.dumps(VALID).encode()])
def test_valid_spec_from_dict_text_and_bytes(source):
    spec = parse_spec(source)
    assert spec.arch == "wrn16" and spec.input_size == (32, 32) and spec.arch_params == {"widen_factor": 2}
    assert parse_spec(spec.to_json()) == spec


def test_every_architecture_name_is_accepted():
    for arch in ARCHITECTURES:
        assert parse_spec(VALID | {"arch": arch, "arch_params": {}}).arch == arch


def test_unknown_architecture():
    assert code_of(VALID | {"arch": "resnet50"}) == UNKNOWN_ARCHITECTURE
    assert code_of(json.dumps(VALID | {"arch": "WRN16"})) == UNKNOWN_ARCHITECTURE


@pytest.mark.parametrize("change", [
    {"num_classes": 1},
    {"num_classes": "ten"},
    {"in_channels": 0},
    {"input_size": [2, 2]},
    {"input_size": [32]},
    {"mean": [0.5]},  # one entry for three channels
    {"std": [0.25, 0.0, 0.25]},
    {"unexpected_field": 1},
    {"arch": 7},
])
def test_schema_errors(change: dict):
    assert code_of(VALID | change) == SPEC_INVALID


def test_missing_field():
    spec = dict(VALID)
    del spec["std"]
    assert code_of(spec) == SPEC_INVALID


@pytest.mark.parametrize("source", ["{not json", "[1, 2]", b"\xff\xfe", b" " * (MAX_SPEC_BYTES + 1), 42])
def test_not_a_json_object(source):
    assert code_of(source) == SPEC_INVALID


def test_error_message_names_the_field():
    with pytest.raises(NBAError) as e:
        parse_spec(VALID | {"num_classes": 1})
    assert "num_classes" in e.value.message


def test_load_spec(tmp_path):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(VALID))
    assert load_spec(str(path)).num_classes == 10
    with pytest.raises(NBAError) as e:
        load_spec(str(tmp_path / "missing.json"))
    assert e.value.code == SPEC_INVALID
