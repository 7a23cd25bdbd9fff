"""Safe checkpoint I/O: round trips, accepted .pt variants, and one distinct error code per bad input."""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from nba_core import errors
from nba_core.checkpoint import (
    load_model,
    read_checkpoint_metadata,
    read_state_dict,
    save_model,
    sha256_file,
    validate_state_dict,
)
from nba_core.errors import NBAError
from nba_core.models import build_model
from nba_core.safetensors_header import check_safetensors_header, sniff_checkpoint_format
from nba_core.spec import parse_spec

torch.set_num_threads(1)

SPEC = parse_spec({"arch": "small_cnn", "num_classes": 3, "in_channels": 1, "input_size": [8, 8],
                   "mean": [0.5], "std": [0.25], "arch_params": {"width": 4}})


@pytest.fixture()
def model():
    torch.manual_seed(0)
    m = build_model(SPEC).train()
    with torch.no_grad():
        m(torch.rand(8, 1, 8, 8))  # non-trivial BatchNorm statistics
    return m.eval()


def outputs(m) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.linspace(0, 1, 2 * 64).view(2, 1, 8, 8))


def code_of(fn, *args) -> str:
    with pytest.raises(NBAError) as e:
        fn(*args)
    return e.value.code


# ------------------------------------------------------------------------------------------------ round trips

def test_save_then_load_round_trip_with_spec_metadata(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    digest = save_model(model, path, spec=SPEC, metadata={"nba_method": "nba", "epochs": 3})
    assert digest == sha256_file(path) and len(digest) == 64
    meta = read_checkpoint_metadata(path)
    assert parse_spec(meta["nba_spec"]) == SPEC
    assert meta["nba_method"] == "nba" and json.loads(meta["epochs"]) == 3
    assert torch.equal(outputs(load_model(path, SPEC)), outputs(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"], "no temp files left behind"


def test_save_overwrites_atomically(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"old content")
    save_model(model, path)
    assert read_state_dict(path).keys() == model.state_dict().keys()
    assert len(list(tmp_path.iterdir())) == 1


def test_pt_state_dict_is_accepted_and_converted(model, tmp_path: Path):
    # A user export: bare network keys, DataParallel prefix, fp16 weights, inside a training-script wrapper.
    bare = {f"module.{k}": (v.half() if v.is_floating_point() else v.int()) for k, v in model.net.state_dict().items()}
    path = tmp_path / "model.pt"
    torch.save({"state_dict": bare, "epoch": 7, "optimizer": "sgd"}, path)
    loaded = load_model(path, SPEC)
    assert loaded.net.block1[0].weight.dtype == torch.float32
    assert loaded.net.block1[1].num_batches_tracked.dtype == torch.int64
    assert torch.allclose(outputs(loaded), outputs(model), atol=1e-2)


def test_legacy_pt_and_model_wrapper_are_accepted(model, tmp_path: Path):
    path = tmp_path / "legacy.bin"
    torch.save({"model": model.state_dict()}, path, _use_new_zipfile_serialization=False)
    assert sniff_checkpoint_format(path.read_bytes()[:16]) == "pt-legacy"
    assert torch.equal(outputs(load_model(path, SPEC)), outputs(model))


def test_format_is_detected_by_content_not_extension(model, tmp_path: Path):
    path = tmp_path / "weights.pt"  # actually safetensors
    save_model(model, path)
    assert sniff_checkpoint_format(path.read_bytes()[:16]) == "safetensors"
    assert torch.equal(outputs(load_model(path, SPEC)), outputs(model))


# ------------------------------------------------------------------------------------------ unsafe pickles

class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_with_code_payload_is_refused_without_running(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"net.block1.0.weight": _Payload(marker)}))
    assert code_of(read_state_dict, evil) == errors.CHECKPOINT_UNSAFE
    assert code_of(load_model, evil, SPEC) == errors.CHECKPOINT_UNSAFE
    assert not marker.exists()


def test_payload_inside_torch_zip_is_refused(tmp_path: Path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "x": _Payload(marker)}, evil)
    assert sniff_checkpoint_format(evil.read_bytes()[:16]) == "pt-zip"
    assert code_of(read_state_dict, evil) == errors.CHECKPOINT_UNSAFE
    assert not marker.exists()


# --------------------------------------------------------------------------------------- malformed files

def test_truncated_safetensors(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    assert code_of(read_state_dict, path) == errors.CHECKPOINT_TRUNCATED
    path.write_bytes(data[:20])  # cut inside the header
    assert code_of(read_state_dict, path) == errors.CHECKPOINT_TRUNCATED


def test_garbage_and_corrupt_files_are_unreadable(tmp_path: Path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    assert code_of(read_state_dict, garbage) == errors.CHECKPOINT_UNREADABLE
    corrupt_zip = tmp_path / "corrupt.pt"
    corrupt_zip.write_bytes(b"PK\x03\x04" + bytes(200))
    assert code_of(read_state_dict, corrupt_zip) == errors.CHECKPOINT_UNREADABLE
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    assert code_of(read_state_dict, empty) == errors.CHECKPOINT_UNREADABLE
    assert code_of(read_state_dict, tmp_path / "missing.safetensors") == errors.CHECKPOINT_UNREADABLE


def test_file_without_a_state_dict(tmp_path: Path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    assert code_of(read_state_dict, path) == errors.CHECKPOINT_UNREADABLE
    torch.save({"w": torch.zeros(1), "epoch": 3}, path)  # a non-tensor entry and no wrapper key
    assert code_of(read_state_dict, path) == errors.CHECKPOINT_UNREADABLE


# ----------------------------------------------------------------------------------- validation against spec

def _with(model, **changes) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in changes.items():
        key = k.replace("__", ".")
        if v is None:
            del state[key]
        else:
            state[key] = v
    return state


def test_wrong_shape_names_key_and_shapes(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file(_with(model, net__head__4__weight=torch.zeros(5, 256)), str(path))
    with pytest.raises(NBAError) as e:
        load_model(path, SPEC)
    assert e.value.code == errors.CHECKPOINT_SHAPE_MISMATCH
    assert "net.head.4.weight" in e.value.message and "[5, 256]" in e.value.message and "[3, 256]" in e.value.message


def test_missing_key(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file(_with(model, net__head__4__bias=None), str(path))
    with pytest.raises(NBAError) as e:
        load_model(path, SPEC)
    assert e.value.code == errors.CHECKPOINT_MISSING_KEYS and "net.head.4.bias" in e.value.message


def test_missing_batchnorm_counters_are_tolerated(model):
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    validate_state_dict(state, model)


def test_unexpected_key(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_file(_with(model, net__extra__weight=torch.zeros(2)), str(path))
    with pytest.raises(NBAError) as e:
        load_model(path, SPEC)
    assert e.value.code == errors.CHECKPOINT_UNEXPECTED_KEYS and "net.extra.weight" in e.value.message


def test_nan_weights(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    bad = model.state_dict()["net.block2.0.weight"].clone()
    bad[0, 0, 0, 0] = float("nan")
    save_file(_with(model, net__block2__0__weight=bad), str(path))
    with pytest.raises(NBAError) as e:
        load_model(path, SPEC)
    assert e.value.code == errors.CHECKPOINT_NONFINITE and "net.block2.0.weight" in e.value.message


def test_dtype_mismatch(model):
    w = model.state_dict()["net.head.4.weight"]
    assert code_of(validate_state_dict, _with(model, net__head__4__weight=w.to(torch.int32)), model) == \
        errors.CHECKPOINT_DTYPE_MISMATCH
    assert code_of(validate_state_dict, _with(model, net__block1__1__num_batches_tracked=torch.tensor(1.5)), model) \
        == errors.CHECKPOINT_DTYPE_MISMATCH
    validate_state_dict(_with(model, net__head__4__weight=w.double()), model)  # fp64 is accepted (cast)


def test_validate_accepts_bare_network_keys(model):
    validate_state_dict(model.net.state_dict(), model)
    validate_state_dict(model.state_dict(), model)


# ------------------------------------------------------------------------------------ safetensors header check

def _header_file(header: dict, data_len: int) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(data_len)


def _check(blob: bytes) -> dict:
    return check_safetensors_header(io.BytesIO(blob), len(blob))


def test_header_check_good_file(model, tmp_path: Path):
    path = tmp_path / "m.safetensors"
    save_model(model, path, spec=SPEC)
    with open(path, "rb") as f:
        header = check_safetensors_header(f, path.stat().st_size)
    assert header["net.head.4.weight"] == {"dtype": "F32", "shape": [3, 256]}
    assert header["net.block1.1.num_batches_tracked"] == {"dtype": "I64", "shape": []}
    assert "nba_spec" in header["__metadata__"]
    assert _check(_header_file({"a": {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}}, 12))["a"]["shape"] \
        == [2, 3]


@pytest.mark.parametrize("blob,code", [
    (b"", errors.CHECKPOINT_TRUNCATED),
    (struct.pack("<Q", 1000) + b'{"a":', errors.CHECKPOINT_TRUNCATED),
    (struct.pack("<Q", 2**40) + b"{}", errors.CHECKPOINT_UNREADABLE),  # implausible header length
    (struct.pack("<Q", 4) + b"\xff\xfe{}", errors.CHECKPOINT_UNREADABLE),  # not UTF-8
    (struct.pack("<Q", 2) + b"[]", errors.CHECKPOINT_UNREADABLE),  # not an object
    (os.urandom(64), errors.CHECKPOINT_UNREADABLE),
])
def test_header_check_bad_prefix(blob: bytes, code: str):
    assert code_of(_check, blob) == code


@pytest.mark.parametrize("header,data_len,code", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, errors.CHECKPOINT_TRUNCATED),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 20, errors.CHECKPOINT_UNREADABLE),  # trailing
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 12]}}, 12, errors.CHECKPOINT_UNREADABLE),  # size
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, errors.CHECKPOINT_UNREADABLE),  # overlap
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, errors.CHECKPOINT_UNREADABLE),  # gap
    ({"a": {"dtype": "OBJ", "shape": [1], "data_offsets": [0, 1]}}, 1, errors.CHECKPOINT_UNREADABLE),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, 4, errors.CHECKPOINT_UNREADABLE),
    ({"a": {"dtype": "F32", "shape": [1]}}, 4, errors.CHECKPOINT_UNREADABLE),
    ({"__metadata__": {"k": 1}}, 0, errors.CHECKPOINT_UNREADABLE),
])
def test_header_check_bad_entries(header: dict, data_len: int, code: str):
    assert code_of(_check, _header_file(header, data_len)) == code


def test_sniff_checkpoint_format(model, tmp_path: Path):
    save_model(model, tmp_path / "a")
    torch.save(model.state_dict(), tmp_path / "b")
    assert sniff_checkpoint_format((tmp_path / "a").read_bytes()[:16]) == "safetensors"
    assert sniff_checkpoint_format((tmp_path / "b").read_bytes()[:16]) == "pt-zip"
    assert sniff_checkpoint_format(pickle.dumps({"a": 1}, protocol=2)) == "pt-legacy"
    assert sniff_checkpoint_format(b"GIF89a" + bytes(20)) == "unknown"
    assert sniff_checkpoint_format(b"") == "unknown"


def test_header_module_is_torch_and_numpy_free():
    code = ("import sys, nba_core.safetensors_header; "
            "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
