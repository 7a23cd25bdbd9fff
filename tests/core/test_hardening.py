"""Issue 10, library side: hostile files and specs are refused from headers, before anything big is allocated.

Each test is a scaled-down version of a row of the security review's table (tiny files, limits scaled down to
the same ratio); "before allocation" is checked by making the expensive call (np.load, zipfile.ZipFile,
TarFile.next, torch.load, image decoding) fail the test if it runs, and by tracemalloc's peak.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nba_core import checkpoint
from nba_core.arch_budget import BUDGETS, estimate
from nba_core.data import formats
from nba_core.data.formats import DataLimits, check_dataset_file, load_dataset_file
from nba_core.errors import NBAError
from nba_core.models import build_model
from nba_core.spec import ModelSpec, parse_spec

SMALL = {"arch": "small_cnn", "num_classes": 10, "in_channels": 3, "input_size": [32, 32],
         "mean": [0.5] * 3, "std": [0.5] * 3}


def code_of(fn, *args, **kwargs) -> str:
    with pytest.raises(NBAError) as e:
        fn(*args, **kwargs)
    return e.value.code


def peak_bytes(fn, *args, **kwargs) -> tuple[str | None, int]:
    """(error code or None, tracemalloc peak while running fn) -- numpy reports its buffers to tracemalloc."""
    tracemalloc.start()
    try:
        try:
            fn(*args, **kwargs)
            code = None
        except NBAError as e:
            code = e.code
        return code, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def forbid(monkeypatch, owner, name: str) -> None:
    def boom(*_a, **_k):
        raise AssertionError(f"{name} must not run for a refused file")
    monkeypatch.setattr(owner, name, boom)


def png(h: int, w: int, channels: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((h, w, channels) if channels > 1 else (h, w), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- row 1: N×H×W×C of an image archive bounded

def test_row1_image_archive_decoded_size_is_bounded_before_decoding(tmp_path: Path, monkeypatch):
    # 1,000 black 512×512 RGB PNGs (3 GiB of float32) scaled down: 20 black 64×64 PNGs against a limit of 10.
    path = tmp_path / "black.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(20):
            z.writestr(f"{i % 2}/{i}.png", png(64, 64))
    one_image = 3 * 64 * 64 * 4
    limits = DataLimits(max_decoded_bytes=10 * one_image)
    forbid(monkeypatch, formats, "_decode_image")
    code, peak = peak_bytes(load_dataset_file, path, expect_shape=(3, 64, 64), limits=limits)
    assert code == "data_too_large"
    assert peak < 2 * one_image  # nothing of the 20 images' size was allocated


def test_row1_without_a_spec_the_first_image_sizes_the_bound(tmp_path: Path):
    path = tmp_path / "black.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(20):
            z.writestr(f"{i % 2}/{i}.png", png(64, 64))
    code, peak = peak_bytes(load_dataset_file, path, limits=DataLimits(max_decoded_bytes=10 * 3 * 64 * 64 * 4))
    assert code == "data_too_large" and peak < 4 * 3 * 64 * 64 * 4


def test_row1_loading_makes_one_float32_copy(tmp_path: Path):
    path = tmp_path / "ok.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(40):
            z.writestr(f"{i % 2}/{i}.png", png(64, 64))
    decoded = 40 * 3 * 64 * 64 * 4
    code, peak = peak_bytes(load_dataset_file, path, expect_shape=(3, 64, 64))
    assert code is None
    assert peak < 1.5 * decoded  # was ~2.25x (uint8 buffer, astype copy, division copy)


def test_row1_npz_uint8_is_divided_into_one_float32_array(tmp_path: Path):
    path = tmp_path / "x.npz"
    np.savez(path, x=np.zeros((200, 32, 32, 3), np.uint8), y=np.zeros(200, np.int64))
    decoded = 200 * 3 * 32 * 32 * 4
    code, peak = peak_bytes(load_dataset_file, path, expect_shape=(3, 32, 32))
    assert code is None and peak < 1.5 * decoded


# ------------------------------------------------------------------ row 2: arch_params validated and budgeted

@pytest.mark.parametrize("params", [{"width": 6000}, {"width": -3}, {"width": 0}, {"width": 2.5},
                                    {"width": True}, {"depth": 4}])
def test_row2_small_cnn_width_is_validated_at_parse(params):
    assert code_of(parse_spec, SMALL | {"arch_params": params}) == "spec_invalid"


def test_row2_build_model_checks_specs_that_skipped_parsing(monkeypatch):
    spec = ModelSpec.model_construct(**(SMALL | {"input_size": (32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3,
                                                 "arch_params": {"width": 6000}, "spec_version": 1}))
    forbid(monkeypatch, torch.nn.Conv2d, "__init__")
    assert code_of(build_model, spec) == "spec_invalid"


def test_row2_activation_size_is_bounded_from_the_input_size():
    # Within the width range, but 512×512 input at width 512: ~2 GiB of activations per image.
    assert code_of(parse_spec, SMALL | {"input_size": [512, 512], "arch_params": {"width": 512}}) == "spec_invalid"
    assert parse_spec(SMALL | {"input_size": [512, 512], "arch_params": {"width": 16}})


@pytest.mark.parametrize("arch,params", [("small_cnn", {}), ("small_cnn", {"width": 4}), ("small_cnn", {"width": 40}),
                                         ("wrn16", {}), ("wrn16", {"widen_factor": 3}), ("preact_resnet18", {}),
                                         ("vgg11_bn", {}), ("mobilenetv2", {}), ("mobilenetv2", {"width_mult": 0.5})])
def test_row2_estimates_bound_the_real_networks(arch, params):
    torch.manual_seed(0)
    spec = parse_spec(SMALL | {"arch": arch, "arch_params": params, "input_size": [32, 32]})
    model = build_model(spec).eval()
    real_params = sum(p.numel() for p in model.parameters())
    acts = [0]
    hooks = [m.register_forward_hook(lambda _m, _i, o: acts.__setitem__(0, acts[0] + o.numel()))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    for h in hooks:
        h.remove()
    est_params, est_acts = estimate(arch, params, in_channels=3, num_classes=10, input_size=(32, 32))
    # Upper bounds, and not absurdly loose (mobilenetv2 below width 1 keeps its 1280-wide head: looser there).
    assert real_params <= est_params < 3.5 * real_params + 50_000
    assert acts[0] <= est_acts < 2 * acts[0] + 10_000
    assert set(BUDGETS) <= set(__import__("nba_core.spec", fromlist=["ARCHITECTURES"]).ARCHITECTURES)


# ------------------------------------------------------ row 4: zip central directory bounded before zipfile

def _many_member_zip(path: Path, members: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for i in range(members):
            z.writestr(f"0/{i}.png", b"")
    return path


def test_row4_zip_member_count_is_refused_before_zipfile_parses(tmp_path: Path, monkeypatch):
    # 1M entries against a 100k limit, scaled: 3,000 entries against 100.
    path = _many_member_zip(tmp_path / "many.zip", 3000)
    forbid(monkeypatch, zipfile, "ZipFile")
    code, peak = peak_bytes(check_dataset_file, path, DataLimits(max_members=100))
    assert code == "data_too_large"
    assert peak < path.stat().st_size + 64 * 1024  # one read of the directory, no ZipInfo per entry


def test_row4_a_directory_that_lies_about_its_count_is_still_counted(tmp_path: Path, monkeypatch):
    path = _many_member_zip(tmp_path / "liar.zip", 3000)
    data = bytearray(path.read_bytes())
    eocd = data.rfind(b"PK\x05\x06")
    data[eocd + 8:eocd + 12] = (1).to_bytes(2, "little") * 2  # "1 entry"
    path.write_bytes(bytes(data))
    forbid(monkeypatch, zipfile, "ZipFile")
    assert code_of(check_dataset_file, path, DataLimits(max_members=100)) == "data_too_large"


def test_row4_oversized_directory_is_refused(tmp_path: Path):
    path = _many_member_zip(tmp_path / "dir.zip", 50)
    assert code_of(check_dataset_file, path, DataLimits(max_central_directory_bytes=1000)) == "data_too_large"


def test_row4_zip64_archives_are_read(tmp_path: Path):
    path = tmp_path / "z64.zip"
    with zipfile.ZipFile(path, "w", allowZip64=True) as z:
        for i in range(3):
            with z.open(f"{i}/a.png", "w", force_zip64=True) as f:
                f.write(png(8, 8))
    assert check_dataset_file(path)["images"] == 3


# ------------------------------------------- row 5: .pt inflated size and npz shapes bounded before decoding

def _zip_bomb_pt(path: Path, inflated: int) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", bytes(inflated))
    return path


def test_row5_pt_zip_bomb_is_refused_before_torch_load(tmp_path: Path, monkeypatch):
    # 0.5 MB inflating to 512 MiB, scaled: ~8 KiB inflating to 8 MiB.
    path = _zip_bomb_pt(tmp_path / "bomb.pt", 8 * 1024**2)
    forbid(monkeypatch, torch, "load")
    code, peak = peak_bytes(checkpoint.read_state_dict, path)
    assert code == "checkpoint_too_large" and peak < 1024**2


def test_row5_pt_size_is_bounded_by_the_spec(tmp_path: Path, monkeypatch):
    # small_cnn width 4 has 44k parameters: 5 MiB of stored (uncompressed, ratio 1) tensors cannot be its weights.
    path = tmp_path / "big.pt"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
        z.writestr("archive/data/0", bytes(5 * 1024**2))
    forbid(monkeypatch, torch, "load")
    spec = parse_spec(SMALL | {"arch_params": {"width": 4}})
    assert code_of(checkpoint.load_model, path, spec) == "checkpoint_too_large"


def test_row5_npz_decoded_size_and_shape_come_from_the_headers(tmp_path: Path, monkeypatch):
    path = tmp_path / "zeros.npz"
    np.savez_compressed(path, x=np.zeros((400, 32, 32, 3), np.uint8), y=np.zeros(400, np.int64))
    forbid(monkeypatch, np, "load")
    limits = DataLimits(max_decoded_bytes=100 * 3 * 32 * 32 * 4)
    code, peak = peak_bytes(load_dataset_file, path, expect_shape=(3, 32, 32), limits=limits)
    assert code == "data_too_large" and peak < 256 * 1024
    assert code_of(load_dataset_file, path, expect_shape=(1, 28, 28)) == "data_shape_mismatch"
    assert code_of(check_dataset_file, path, limits) == "data_too_large"


def test_row5_npz_label_count_is_checked_from_headers(tmp_path: Path, monkeypatch):
    path = tmp_path / "labels.npz"
    np.savez(path, x=np.zeros((10, 8, 8, 1), np.uint8), y=np.zeros(9, np.int64))
    forbid(monkeypatch, np, "load")
    assert code_of(check_dataset_file, path) == "data_invalid"


# --------------------------------------------------------------------- rows 6, 7: NaN/Infinity and deep specs

@pytest.mark.parametrize("change", [{"std": [math.nan] * 3}, {"mean": [math.inf, 0, 0]}, {"std": [-math.inf] * 3},
                                    {"std": [1e9] * 3}, {"arch_params": {"width": math.nan}}])
def test_row6_non_finite_spec_numbers_are_refused(change):
    assert code_of(parse_spec, SMALL | change) == "spec_invalid"


@pytest.mark.parametrize("text", ['"std": [NaN, 1, 1]', '"mean": [Infinity, 0, 0]', '"mean": [-Infinity, 0, 0]'])
def test_row6_json_nan_literals_are_refused(text):
    doc = json.dumps({k: v for k, v in SMALL.items() if k not in ("std", "mean")})
    doc = doc[:-1] + ", " + text + (', "std": [1, 1, 1]' if "std" not in text else ', "mean": [0, 0, 0]') + "}"
    assert code_of(parse_spec, doc) == "spec_invalid"
    assert code_of(parse_spec, doc.encode()) == "spec_invalid"


def test_row7_deeply_nested_spec_is_spec_invalid_not_recursion_error():
    deep = "[" * 30_000 + "]" * 30_000  # 60 KB nested 30k deep, under the spec size cap
    doc = json.dumps(SMALL)[:-1] + ', "arch_params": ' + deep + "}"
    assert len(doc) < 64 * 1024
    assert code_of(parse_spec, doc) == "spec_invalid"
    assert code_of(parse_spec, SMALL | {"arch_params": {"a": [[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]}}) == "spec_invalid"


# -------------------------------------------------------------------------- row 11: tar member count is cheap

def test_row11_tar_member_count_is_refused_without_tarfile(tmp_path: Path, monkeypatch):
    # 120k empty members in 0.5 MiB against a 100k limit, scaled: 3,000 against 100.
    path = tmp_path / "many.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        for i in range(3000):
            info = tarfile.TarInfo(f"0/{i}.png")
            t.addfile(info, io.BytesIO(b""))
    forbid(monkeypatch, tarfile.TarFile, "next")
    assert code_of(check_dataset_file, path, DataLimits(max_members=100)) == "data_too_large"


def test_row11_member_walk_skips_data_and_meta_headers(tmp_path: Path):
    path = tmp_path / "ok.tar"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
        for i in range(5):
            data = png(8, 8)
            info = tarfile.TarInfo(f"{i % 2}/{'n' * 120}{i}.png")  # long names: pax headers
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    assert formats._count_tar_members(path, False, DataLimits()) == 5
    assert check_dataset_file(path, DataLimits(max_members=5))["images"] == 5
