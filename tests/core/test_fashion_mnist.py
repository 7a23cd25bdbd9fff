"""Fashion-MNIST from IDX files (the Debian package's format), and the message when the package is missing."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from nba_core.data.builtin import load_fashion_mnist, read_idx
from nba_core.errors import UNKNOWN_DATASET, NBAError


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_and_takes_the_first_images_of_each_class(tmp_path: Path, gz: bool):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 4)
    rng.shuffle(labels)
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", images, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", labels, gz)
    data = load_fashion_mnist(tmp_path, per_class=2)
    assert data.x.shape == (20, 1, 28, 28) and data.x.dtype == np.float32
    assert np.bincount(data.y).tolist() == [2] * 10
    first = np.flatnonzero(labels == 3)[0]
    assert any(np.array_equal(data.x[i, 0], images[first] / np.float32(255)) for i in range(20))
    assert float(data.x.max()) <= 1.0


def test_truncated_idx_is_rejected(tmp_path: Path):
    path = tmp_path / "x"
    write_idx(path, np.zeros((3, 4), np.uint8), gz=False)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(NBAError) as e:
        read_idx(path)
    assert e.value.code == UNKNOWN_DATASET


def test_missing_files_say_how_to_install(tmp_path: Path):
    with pytest.raises(NBAError) as e:
        load_fashion_mnist(tmp_path)
    assert e.value.code == UNKNOWN_DATASET and "apt-get install -y dataset-fashion-mnist" in str(e.value)
