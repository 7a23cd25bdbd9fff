"""User data files: accepted layouts, and one error code per unsafe or malformed input (no torch needed)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nba_core import errors
from nba_core.data.formats import DataLimits, check_dataset_file, load_dataset_file, save_npz, sniff_dataset_format
from nba_core.data.imageset import ImageSet
from nba_core.errors import NBAError

RNG = np.random.default_rng(0)
X_U8 = RNG.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)  # N×H×W×C
Y = np.array([0, 1, 2, 0, 1, 2])


def code_of(path, **kwargs) -> str:
    with pytest.raises(NBAError) as e:
        load_dataset_file(path, **kwargs)
    return e.value.code


def png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


# ------------------------------------------------------------------------------------------------------ npz

def test_npz_uint8_nhwc(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=X_U8, y=Y)
    data = load_dataset_file(tmp_path / "d.npz", num_classes=3, expect_shape=(3, 8, 8))
    assert data.shape == (3, 8, 8) and data.x.dtype == np.float32
    np.testing.assert_allclose(data.x, X_U8.transpose(0, 3, 1, 2) / 255.0, atol=1e-6)
    np.testing.assert_array_equal(data.y, Y)


def test_npz_uint8_grey_nhw(tmp_path: Path):
    np.savez_compressed(tmp_path / "d.npz", x=X_U8[..., 0], y=Y.astype(np.uint8))
    data = load_dataset_file(tmp_path / "d.npz", num_classes=3, expect_shape=(1, 8, 8))
    assert data.shape == (1, 8, 8) and data.y.dtype == np.int64


def test_npz_float_nchw(tmp_path: Path):
    x = RNG.random((6, 3, 8, 8), dtype=np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=Y)
    data = load_dataset_file(tmp_path / "d.npz", num_classes=3, expect_shape=(3, 8, 8))
    np.testing.assert_array_equal(data.x, x)


def test_save_npz_round_trip(tmp_path: Path):
    on_grid = ImageSet(X_U8.transpose(0, 3, 1, 2) / np.float32(255), Y)
    save_npz(tmp_path / "grid.npz", on_grid)
    with np.load(tmp_path / "grid.npz") as z:
        assert z["x"].dtype == np.uint8 and z["x"].shape == (6, 8, 8, 3)
    assert np.array_equal(load_dataset_file(tmp_path / "grid.npz", num_classes=3, expect_shape=(3, 8, 8)).x,
                          on_grid.x)
    blended = ImageSet(on_grid.x * 0.7 + 0.1, Y)  # off the 1/255 grid: stored as float32
    save_npz(tmp_path / "blend.npz", blended)
    with np.load(tmp_path / "blend.npz") as z:
        assert z["x"].dtype == np.float32
    assert np.array_equal(load_dataset_file(tmp_path / "blend.npz").x, blended.x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blend.npz", "grid.npz"]


def test_labels_out_of_range(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=X_U8, y=Y + 1)
    assert code_of(tmp_path / "d.npz", num_classes=3) == errors.DATA_LABEL_OUT_OF_RANGE
    np.savez(tmp_path / "d.npz", x=X_U8, y=Y - 1)
    assert code_of(tmp_path / "d.npz", num_classes=None) == errors.DATA_LABEL_OUT_OF_RANGE


def test_npz_shape_mismatch(tmp_path: Path):
    np.savez(tmp_path / "d.npz", x=X_U8, y=Y)
    assert code_of(tmp_path / "d.npz", expect_shape=(3, 32, 32)) == errors.DATA_SHAPE_MISMATCH
    assert code_of(tmp_path / "d.npz", expect_shape=(1, 8, 8)) == errors.DATA_SHAPE_MISMATCH


@pytest.mark.parametrize("x,y", [
    (X_U8, Y[:5]),  # N differs
    (X_U8, Y.astype(np.float32)),  # float labels
    (np.full((6, 3, 8, 8), np.nan, np.float32), Y),
    (np.full((6, 3, 8, 8), 2.0, np.float32), Y),  # outside [0, 1]
    (X_U8.astype(np.int32), Y),  # neither uint8 nor float
    (X_U8[:0], Y[:0]),  # no images
])
def test_npz_invalid_content(tmp_path: Path, x: np.ndarray, y: np.ndarray):
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert code_of(tmp_path / "d.npz", num_classes=3) == errors.DATA_INVALID


def test_npz_object_array_and_missing_key(tmp_path: Path):
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 6), y=Y)  # pickled inside: must never be loaded
    assert code_of(tmp_path / "obj.npz") == errors.DATA_INVALID
    np.savez(tmp_path / "nox.npz", images=X_U8, y=Y)
    assert code_of(tmp_path / "nox.npz") == errors.DATA_INVALID


def test_npy_header_that_lies_about_its_shape(tmp_path: Path):
    buf = io.BytesIO()
    np.save(buf, X_U8)
    raw = buf.getvalue().replace(b"(6, 8, 8, 3)", b"(9, 8, 8, 3)")  # claims more data than stored
    y_buf = io.BytesIO()
    np.save(y_buf, Y)
    write_zip(tmp_path / "lie.npz", {"x.npy": raw, "y.npy": y_buf.getvalue()})
    assert code_of(tmp_path / "lie.npz") == errors.DATA_UNREADABLE


def test_garbage_file(tmp_path: Path):
    (tmp_path / "g.npz").write_bytes(os.urandom(2048))
    assert code_of(tmp_path / "g.npz") == errors.DATA_UNREADABLE
    (tmp_path / "z.npz").write_bytes(b"PK\x03\x04" + bytes(100))
    assert code_of(tmp_path / "z.npz") == errors.DATA_UNREADABLE


# -------------------------------------------------------------------------------------------- ImageFolder

def test_image_folder_zip_with_named_classes(tmp_path: Path):
    members = {f"upload/{cls}/{i}.png": png(X_U8[i]) for i, cls in enumerate(["dog", "cat", "dog", "cat"])}
    path = write_zip(tmp_path / "imgs.zip", members)
    data = load_dataset_file(path, num_classes=2, expect_shape=(3, 8, 8))
    np.testing.assert_array_equal(data.y, [0, 0, 1, 1])  # cat=0, dog=1 (sorted folder names)
    np.testing.assert_allclose(data.x[0], X_U8[1].transpose(2, 0, 1) / 255.0, atol=1e-6)  # cat/1.png
    info = check_dataset_file(path)
    assert info == {"format": "zip", "members": 4, "total_bytes": sum(map(len, members.values())), "images": 4,
                    "classes": {"cat": 0, "dog": 1}, "label_range": [0, 1]}


def test_image_folder_tar_gz_with_integer_classes(tmp_path: Path):
    members = {f"./{label}/img{i}.png": png(X_U8[i]) for i, label in enumerate([0, 2, 7, 2])}
    path = write_tar(tmp_path / "imgs.tar.gz", members)
    data = load_dataset_file(path, num_classes=8, expect_shape=(3, 8, 8))
    np.testing.assert_array_equal(data.y, [0, 2, 2, 7])  # folder names are the labels
    np.testing.assert_allclose(data.x[3], X_U8[2].transpose(2, 0, 1) / 255.0, atol=1e-6)
    assert check_dataset_file(path)["classes"] == {"0": 0, "2": 2, "7": 7}
    assert code_of(path, num_classes=5) == errors.DATA_LABEL_OUT_OF_RANGE


def test_images_converted_to_the_expected_channels(tmp_path: Path):
    grey = {"a/0.png": png(X_U8[0, :, :, 0]), "b/1.png": png(X_U8[1])}
    path = write_tar(tmp_path / "imgs.tar", grey, mode="w")
    assert load_dataset_file(path, expect_shape=(3, 8, 8)).shape == (3, 8, 8)
    assert load_dataset_file(path, expect_shape=(1, 8, 8)).shape == (1, 8, 8)


def test_image_size_mismatch(tmp_path: Path):
    path = write_zip(tmp_path / "imgs.zip", {"0/a.png": png(X_U8[0]), "1/b.png": png(np.zeros((9, 8, 3), np.uint8))})
    assert code_of(path, expect_shape=(3, 8, 8)) == errors.DATA_SHAPE_MISMATCH
    assert code_of(path) == errors.DATA_SHAPE_MISMATCH  # without a spec, sizes must still agree


def test_bad_archive_content(tmp_path: Path):
    assert code_of(write_zip(tmp_path / "a.zip", {"0/a.png": b"not an image"})) == errors.DATA_UNREADABLE
    assert code_of(write_zip(tmp_path / "b.zip", {"0/notes.txt": b"hi"})) == errors.DATA_INVALID
    assert code_of(write_zip(tmp_path / "c.zip", {"flat.png": png(X_U8[0])})) == errors.DATA_INVALID
    assert code_of(write_zip(tmp_path / "d.zip", {})) == errors.DATA_INVALID


def test_duplicate_member_names(tmp_path: Path):
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as z, pytest.warns(UserWarning):
        z.writestr("0/a.png", png(X_U8[0]))
        z.writestr("0/a.png", png(X_U8[1]))
    assert code_of(path) == errors.DATA_INVALID


def test_image_pixel_limit_checked_before_decoding(tmp_path: Path):
    path = write_zip(tmp_path / "big.zip", {"0/big.png": png(np.zeros((1200, 1000), np.uint8))})
    assert code_of(path) == errors.DATA_TOO_LARGE
    assert load_dataset_file(path, limits=DataLimits(max_image_pixels=2_000_000)).shape == (1, 1200, 1000)


# ----------------------------------------------------------------------------------------- hostile archives

def test_zip_bomb(tmp_path: Path):
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z, z.open("0/a.png", "w") as f:
        chunk = bytes(1 << 20)
        for _ in range(64):  # 64 MiB of zeros -> ~64 KiB on disk
            f.write(chunk)
    assert path.stat().st_size < 1 << 20
    assert code_of(path) == errors.DATA_TOO_LARGE
    assert code_of(path, limits=DataLimits(max_member_bytes=1 << 20, max_compression_ratio=1e9)) == \
        errors.DATA_TOO_LARGE


def test_tar_gz_bomb(tmp_path: Path):
    path = tmp_path / "bomb.tar.gz"
    with tarfile.open(path, "w:gz") as t:
        info = tarfile.TarInfo("0/a.png")
        info.size = 32 << 20
        t.addfile(info, io.BytesIO(bytes(info.size)))
    assert code_of(path) == errors.DATA_TOO_LARGE


def test_npz_bomb(tmp_path: Path):
    np.savez_compressed(tmp_path / "d.npz", x=np.zeros((1000, 3, 64, 64), np.float32), y=np.zeros(1000, int))
    assert code_of(tmp_path / "d.npz") == errors.DATA_TOO_LARGE  # 49 MB of zeros in ~50 KB
    assert code_of(tmp_path / "d.npz", limits=DataLimits(max_total_bytes=1 << 20)) == errors.DATA_TOO_LARGE


def test_too_many_members(tmp_path: Path):
    path = write_zip(tmp_path / "many.zip", {f"0/{i}.png": png(X_U8[0]) for i in range(5)})
    assert code_of(path, limits=DataLimits(max_members=4)) == errors.DATA_TOO_LARGE
    assert code_of(path, limits=DataLimits(max_images=4)) == errors.DATA_TOO_LARGE


@pytest.mark.parametrize("name", ["../evil.png", "0/../../evil.png", "/etc/0/evil.png", "C:/0/evil.png",
                                  "0\\..\\evil.png"])
def test_zip_path_traversal(tmp_path: Path, name: str):
    path = write_zip(tmp_path / "evil.zip", {"0/ok.png": png(X_U8[0]), name: png(X_U8[1])})
    assert code_of(path) == errors.DATA_UNSAFE_ARCHIVE
    with pytest.raises(NBAError) as e:
        check_dataset_file(path)
    assert e.value.code == errors.DATA_UNSAFE_ARCHIVE


def test_zip_symlink_member(tmp_path: Path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("0/a.png")
        info.external_attr = (0o120777 << 16)  # S_IFLNK
        z.writestr(info, "/etc/passwd")
    assert code_of(path) == errors.DATA_UNSAFE_ARCHIVE


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_tar_links_and_devices(tmp_path: Path, kind: bytes):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as t:
        data = png(X_U8[0])
        ok = tarfile.TarInfo("0/ok.png")
        ok.size = len(data)
        t.addfile(ok, io.BytesIO(data))
        special = tarfile.TarInfo("0/link.png")
        special.type = kind
        special.linkname = "/etc/passwd"
        t.addfile(special)
    assert code_of(path) == errors.DATA_UNSAFE_ARCHIVE


def test_tar_path_traversal(tmp_path: Path):
    path = write_tar(tmp_path / "evil.tar.gz", {"0/ok.png": png(X_U8[0]), "../1/evil.png": png(X_U8[1])})
    assert code_of(path) == errors.DATA_UNSAFE_ARCHIVE


def test_tar_oversized_long_name_header(tmp_path: Path):
    path = tmp_path / "longname.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as t:
        info = tarfile.TarInfo("0/" + "a" * (2 << 20) + ".png")  # tarfile would read this header whole
        t.addfile(info, io.BytesIO(b""))
    assert code_of(path) == errors.DATA_UNSAFE_ARCHIVE


# ----------------------------------------------------------------------------------------- cheap checks

def test_sniff_and_check_dataset_file(tmp_path: Path):
    np.savez_compressed(tmp_path / "d.npz", x=X_U8, y=Y)
    zip_path = write_zip(tmp_path / "i.zip", {"0/a.png": png(X_U8[0])})
    tgz = write_tar(tmp_path / "i.tgz", {"0/a.png": png(X_U8[0])})
    tar = write_tar(tmp_path / "i.tar", {"0/a.png": png(X_U8[0])}, mode="w")
    head = lambda p: Path(p).read_bytes()[:512]  # noqa: E731
    assert sniff_dataset_format(head(tmp_path / "d.npz")) == "npz"
    assert sniff_dataset_format(head(zip_path)) == "zip"
    assert sniff_dataset_format(head(tgz)) == "tar"
    assert sniff_dataset_format(head(tar)) == "tar"
    assert sniff_dataset_format(b"\x89PNG\r\n\x1a\n" + bytes(600)) == "unknown"
    info = check_dataset_file(tmp_path / "d.npz")
    assert info["format"] == "npz"
    assert info["arrays"]["x"] == {"dtype": "|u1", "shape": [6, 8, 8, 3]}
    assert check_dataset_file(tgz)["images"] == 1
