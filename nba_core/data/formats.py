"""User data files: .npz arrays or ImageFolder archives (zip, tar, tar.gz), read safely into an ImageSet.

Safety model: archives are checked from their headers (member count, declared sizes, compression ratio, names,
member types) before anything is decompressed; members are then read into memory one at a time and never
extracted to disk. Arrays are loaded with allow_pickle=False after their .npy headers were checked against the
member sizes, and images are size-checked before Pillow decodes them.

`sniff_dataset_format` and `check_dataset_file` only use the standard library (no numpy, no image decoding), so
the API can run them as its cheap upload check.
"""

from __future__ import annotations

import ast
import io
import os
import re
import stat
import struct
import tarfile
import tempfile
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Literal, Sequence

import numpy as np

from ..errors import (
    DATA_INVALID,
    DATA_LABEL_OUT_OF_RANGE,
    DATA_SHAPE_MISMATCH,
    DATA_TOO_LARGE,
    DATA_UNREADABLE,
    DATA_UNSAFE_ARCHIVE,
    NBAError,
)
from ..zip_bounds import check_zip_directory
from .classes import folder_labels, labels_from_strings, names_from_folders
from .imageset import ImageSet

PathLike = str | os.PathLike
DatasetFormat = Literal["npz", "zip", "tar", "unknown"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
_SNIFF_BYTES = 4096
_MAX_TAR_META_BYTES = 1024 * 1024  # GNU long-name and pax headers: tarfile reads these whole into memory
_MAX_NPY_HEADER_BYTES = 64 * 1024
_MODES = {1: "L", 3: "RGB", 4: "RGBA"}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True)
class DataLimits:
    """Bounds on what an uploaded data file may make us read or allocate."""

    max_members: int = 100_000
    max_total_bytes: int = 2 * 1024**3  # decompressed, all members together
    max_member_bytes: int = 1024**3  # decompressed, one member
    max_compression_ratio: float = 200.0  # deflate tops out near 1000:1 on zeros; real images stay far below
    ratio_min_bytes: int = 4 * 1024**2  # ratios of smaller members/archives are not checked (labels compress well)
    max_image_pixels: int = 1024 * 1024  # per image, checked before decoding
    max_images: int = 200_000
    # The decoded image tensor (N×C×H×W float32) of the whole set, computed from headers before decoding.
    max_decoded_bytes: int = 1024**3
    # A zip's central directory is read and walked (entry count) by us before zipfile parses it.
    max_central_directory_bytes: int = 32 * 1024**2


def decoded_bytes(images: int, shape: tuple[int, ...]) -> int:
    """Bytes of `images` float32 images of shape (C, H, W): what loading the set will allocate."""
    n = images * 4
    for d in shape:
        n *= int(d)
    return n


def check_decoded_size(images: int, shape: tuple[int, ...], limits: "DataLimits") -> None:
    """Refuse (data_too_large) a set whose decoded float32 tensor would exceed limits.max_decoded_bytes."""
    total = decoded_bytes(images, shape)
    if total > limits.max_decoded_bytes:
        raise NBAError(DATA_TOO_LARGE, f"{images} images of shape {list(shape)} decode to {total:,} bytes of "
                       f"float32 (limit {limits.max_decoded_bytes:,})")


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int


# ------------------------------------------------------------------------------------------------ sniffing

def _looks_like_tar(block: bytes) -> bool:
    if len(block) < 512:
        return False
    if block[257:262] == b"ustar":
        return True
    # Old (v7) tar has no magic: trust the header checksum (the checksum field counts as eight spaces).
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:512])


def sniff_dataset_format(first_bytes: bytes) -> DatasetFormat:
    """Guess a data file's format from its first bytes (a few hundred; 4 KiB is plenty). An .npz is a zip whose
    first member is an .npy array; a gzip stream counts as "tar" when its start decompresses to a tar header (or is
    too short to tell)."""
    if first_bytes[:4] == b"PK\x03\x04":
        if len(first_bytes) >= 30:
            name_len = struct.unpack("<H", first_bytes[26:28])[0]
            name = first_bytes[30:30 + name_len]
            if len(name) == name_len and name.endswith(b".npy"):
                return "npz"
        return "zip"
    if first_bytes[:4] == b"PK\x05\x06":
        return "zip"  # an empty archive; check_dataset_file reports it as such
    if first_bytes[:2] == b"\x1f\x8b":
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(first_bytes, 1024)
        except zlib.error:
            return "unknown"
        if len(head) < 512:
            return "tar"
        return "tar" if _looks_like_tar(head[:512]) else "unknown"
    return "tar" if _looks_like_tar(first_bytes[:512]) else "unknown"


# ------------------------------------------------------------------------------------------ member checks

def _check_name(name: str) -> None:
    path = PurePosixPath(name)
    if (not name or "\0" in name or "\\" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name)
            or ".." in path.parts):
        raise NBAError(DATA_UNSAFE_ARCHIVE, f"archive member {name[:200]!r} has an absolute or escaping path")


class _Budget:
    """Running totals of members and declared bytes, checked as headers are read."""

    def __init__(self, limits: DataLimits, file_size: int):
        self.limits, self.file_size = limits, max(file_size, 1)
        self.members = 0
        self.total = 0

    def add(self, name: str, size: int, compressed: int | None) -> None:
        lim = self.limits
        self.members += 1
        self.total += size
        if self.members > lim.max_members:
            raise NBAError(DATA_TOO_LARGE, f"archive has more than {lim.max_members} members")
        if size > lim.max_member_bytes:
            raise NBAError(DATA_TOO_LARGE, f"member {name!r} is {size} bytes uncompressed "
                           f"(limit {lim.max_member_bytes})")
        if self.total > lim.max_total_bytes:
            raise NBAError(DATA_TOO_LARGE, f"archive expands to more than {lim.max_total_bytes} bytes")
        compressed = max(compressed, 1) if compressed is not None else None
        if compressed is not None and size > lim.ratio_min_bytes and size > lim.max_compression_ratio * compressed:
            raise NBAError(DATA_TOO_LARGE, f"member {name!r} compresses {size / compressed:.0f}:1 "
                           f"(limit {lim.max_compression_ratio:.0f}:1): refused as a zip bomb")
        if self.total > lim.ratio_min_bytes and self.total > lim.max_compression_ratio * self.file_size:
            raise NBAError(DATA_TOO_LARGE, f"archive expands {self.total / self.file_size:.0f}-fold "
                           f"(limit {lim.max_compression_ratio:.0f}): refused as a decompression bomb")


# What zipfile raises on hostile or corrupt archives (RuntimeError: encryption; NotImplementedError: methods).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError,
               NotImplementedError, struct.error)
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}


def _check_zip_directory(path: Path, size: int, limits: DataLimits) -> None:
    """Bound the central directory BEFORE zipfile.ZipFile() parses it (see nba_core.zip_bounds)."""
    check_zip_directory(path, size, max_members=limits.max_members,
                        max_directory_bytes=limits.max_central_directory_bytes, too_large=DATA_TOO_LARGE,
                        unreadable=DATA_UNREADABLE)


def _scan_zip(zf: zipfile.ZipFile, limits: DataLimits, file_size: int) -> list[_Entry]:
    """Validate every central-directory entry; return the regular files. Nothing is decompressed."""
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise NBAError(DATA_TOO_LARGE, f"archive has {len(infos)} members (limit {limits.max_members})")
    budget = _Budget(limits, file_size)
    files: list[_Entry] = []
    for info in infos:
        _check_name(info.filename)
        kind = stat.S_IFMT(info.external_attr >> 16)
        if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise NBAError(DATA_UNSAFE_ARCHIVE, f"archive member {info.filename!r} is a link or special file")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise NBAError(DATA_UNREADABLE, f"archive member {info.filename!r} is encrypted")
        if info.compress_type not in _ZIP_METHODS:
            raise NBAError(DATA_UNREADABLE, f"archive member {info.filename!r} uses an unsupported compression")
        budget.add(info.filename, info.file_size, info.compress_size)
        files.append(_Entry(info.filename, info.file_size))
    return files


def _read_zip_member(zf: zipfile.ZipFile, entry: _Entry) -> bytes:
    try:
        with zf.open(entry.name) as f:
            data = f.read(entry.size + 1)
    except _ZIP_ERRORS as e:
        raise NBAError(DATA_UNREADABLE, f"cannot read archive member {entry.name!r}: {e}") from None
    if len(data) != entry.size:
        raise NBAError(DATA_UNREADABLE, f"archive member {entry.name!r} does not match its declared size")
    return data


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized GNU long-name / pax headers, which tarfile would otherwise read whole into memory."""

    def _proc_member(self, tarfile_obj):  # noqa: ANN001 - tarfile's internal hook
        meta_types = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                      tarfile.SOLARIS_XHDTYPE)
        if self.type in meta_types and self.size > _MAX_TAR_META_BYTES:
            raise NBAError(DATA_UNSAFE_ARCHIVE, f"tar metadata header of {self.size} bytes refused")
        return super()._proc_member(tarfile_obj)


def _iter_tar(path: Path, gz: bool) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """Stream through a tar (decompressing sequentially, never seeking back), yielding each member header."""
    try:
        # Uncompressed tars are read seekable ("r:"), so member data is skipped, not read; gzip is streamed.
        with tarfile.open(path, mode="r|gz" if gz else "r:", tarinfo=_BoundedTarInfo) as tf:
            while (member := tf.next()) is not None:
                yield tf, member
    except NBAError:
        raise
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError) as e:
        raise NBAError(DATA_UNREADABLE, f"cannot read the tar archive: {e}") from None


_TAR_META_TYPES = frozenset(b"xgLKX")  # pax, GNU long name/link, Solaris pax: headers of the next member


def _tar_blocks(path: Path, gz: bool, chunk: int = 1024 * 1024) -> Iterator[bytes]:
    """The (decompressed) tar stream in chunks."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS) if gz else None
    with open(path, "rb") as f:
        while raw := f.read(chunk):
            if inflate is None:
                yield raw
                continue
            data = inflate.decompress(raw, 4 * chunk)
            while True:
                if data:
                    yield data
                if not inflate.unconsumed_tail:
                    break
                data = inflate.decompress(inflate.unconsumed_tail, 4 * chunk)
            if inflate.eof:
                return


def _tar_size(field: bytes) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256
        return int.from_bytes(field[1:], "big") if field[:1] == b"\x80" else -1
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _count_tar_members(path: Path, gz: bool, limits: DataLimits) -> int:
    """Count member headers with a walk over 512-byte blocks (no TarInfo objects, no name decoding), stopping at
    the member limit: tarfile spends ~35 µs per member, so 120k empty members cost seconds before it could refuse.
    Malformed headers end the walk; tarfile's own scan reports them."""
    if not gz:
        return _count_plain_tar_members(path, limits)
    count = 0
    skip = 0  # data bytes of the current member still to pass
    pending = b""
    for data in _tar_blocks(path, gz):
        if skip >= len(data):
            skip -= len(data)
            continue
        buf = pending + data[skip:] if pending else data[skip:]
        skip = 0
        pos = 0
        while pos + 512 <= len(buf):
            header = buf[pos:pos + 512]
            if header.count(0) == 512:
                return count  # end-of-archive marker
            size = _tar_header_size(header)
            if size is None:
                return count
            count = _count_member(header, count, limits)
            pos += 512 + (size + 511) // 512 * 512
        if pos > len(buf):
            skip = pos - len(buf)
            pending = b""
        else:
            pending = buf[pos:]
    return count


def _tar_header_size(header: bytes) -> int | None:
    """The data size a 512-byte tar header declares, or None where the walk must stop (unreadable or negative:
    tarfile itself then reports what is wrong)."""
    try:
        size = _tar_size(header[124:136])
    except ValueError:
        return None
    return size if size >= 0 else None


def _count_member(header: bytes, count: int, limits: DataLimits) -> int:
    """`count` plus this header's member (metadata headers such as pax/long names do not count), bounded."""
    if header[156] in _TAR_META_TYPES:
        return count
    count += 1
    if count > limits.max_members:
        raise NBAError(DATA_TOO_LARGE, f"archive has more than {limits.max_members} members")
    return count


def _count_plain_tar_members(path: Path, limits: DataLimits) -> int:
    """The same walk on an uncompressed tar: read each header, seek past its data."""
    count = 0
    with open(path, "rb") as f:
        while len(header := f.read(512)) == 512 and header.count(0) != 512:
            size = _tar_header_size(header)
            if size is None:
                return count
            count = _count_member(header, count, limits)
            f.seek((size + 511) // 512 * 512, os.SEEK_CUR)
    return count


def _scan_tar(path: Path, gz: bool, limits: DataLimits, file_size: int) -> list[_Entry]:
    """Validate every member header; links, devices and sparse files are refused. Sizes come from headers, and
    the running totals are checked before the next header is read, so a bomb stops early."""
    _count_tar_members(path, gz, limits)
    budget = _Budget(limits, file_size)
    files: list[_Entry] = []
    for _tf, m in _iter_tar(path, gz):
        _check_name(m.name)
        if m.isdir():
            continue
        if not m.isreg() or m.issparse():
            raise NBAError(DATA_UNSAFE_ARCHIVE, f"archive member {m.name!r} is a link, device or special file")
        budget.add(m.name, m.size, None)  # per-member compressed sizes are unknown in a stream; totals are checked
        files.append(_Entry(m.name, m.size))
    return files


# ------------------------------------------------------------------------------------------- .npy headers

_DESCR = re.compile(r"^[<>|=]?([biufcUS])(\d+)$")  # numbers, and fixed-width strings for class names


def _read_npy_header(f: io.BufferedIOBase, name: str) -> tuple[str, bool, tuple[int, ...], int]:
    """Parse an .npy header without numpy: (descr, fortran_order, shape, header_bytes). Object and structured
    dtypes are refused here, before np.load."""
    magic = f.read(8)
    if len(magic) < 8 or magic[:6] != b"\x93NUMPY" or magic[6] not in (1, 2, 3):
        raise NBAError(DATA_UNREADABLE, f"{name} is not a .npy array")
    len_bytes = 2 if magic[6] == 1 else 4
    raw_len = f.read(len_bytes)
    header_len = int.from_bytes(raw_len, "little") if len(raw_len) == len_bytes else -1
    if not 0 < header_len <= _MAX_NPY_HEADER_BYTES:
        raise NBAError(DATA_UNREADABLE, f"{name} has an implausible .npy header")
    raw = f.read(header_len)
    try:
        header = ast.literal_eval(raw.decode("utf-8" if magic[6] == 3 else "latin1"))
        descr, fortran, shape = header["descr"], header["fortran_order"], tuple(header["shape"])
    except (ValueError, SyntaxError, KeyError, TypeError, MemoryError, RecursionError):
        raise NBAError(DATA_UNREADABLE, f"{name} has a malformed .npy header") from None
    if not isinstance(descr, str) or not _DESCR.match(descr):
        raise NBAError(DATA_INVALID, f"{name} has dtype {descr!r}: only numeric and fixed-width string arrays are "
                       "accepted (object arrays are refused: save strings with np.array(names, dtype=str))")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise NBAError(DATA_UNREADABLE, f"{name} has an invalid shape {shape!r}")
    return descr, bool(fortran), shape, 8 + len_bytes + header_len


def _npy_info(zf: zipfile.ZipFile, entry: _Entry) -> dict[str, Any]:
    try:
        with zf.open(entry.name) as f:
            descr, _fortran, shape, header_bytes = _read_npy_header(f, entry.name)
    except _ZIP_ERRORS as e:
        raise NBAError(DATA_UNREADABLE, f"cannot read {entry.name}: {e}") from None
    numel = 1
    for d in shape:
        numel *= d
    kind, width = _DESCR.match(descr).groups()  # type: ignore[union-attr]
    itemsize = int(width) * (4 if kind == "U" else 1)  # "<U5": five UCS-4 characters
    # The declared shape must account for exactly the member's bytes, so np.load allocates only what is there.
    if numel * itemsize != entry.size - header_bytes:
        raise NBAError(DATA_UNREADABLE, f"{entry.name}: shape {list(shape)} does not match the stored data")
    return {"dtype": descr, "shape": list(shape)}


# ------------------------------------------------------------------------------------------ ImageFolder

def _image_layout(files: list[_Entry], class_names: Sequence[str] | None = None
                  ) -> tuple[list[tuple[_Entry, int]], dict[str, int]]:
    """Map `<class>/<image>` members to labels (an optional single top folder is allowed), by the rule of
    data/classes.py: a class list when given, else integer folder names, else the sorted folder names."""
    images: list[tuple[_Entry, tuple[str, ...]]] = []
    for e in files:
        parts = PurePosixPath(e.name).parts
        if not parts or parts[0] == "__MACOSX" or parts[-1].startswith("."):
            continue  # archiver droppings (resource forks, .DS_Store)
        if not parts[-1].lower().endswith(IMAGE_EXTENSIONS):
            raise NBAError(DATA_INVALID, f"unexpected file {e.name!r}: an ImageFolder archive holds only "
                           f"{'/'.join(IMAGE_EXTENSIONS)} images in per-class folders")
        images.append((e, parts))
    if not images:
        raise NBAError(DATA_INVALID, "the archive holds no images")
    if all(len(p) == 3 for _, p in images) and len({p[0] for _, p in images}) == 1:
        images = [(e, p[1:]) for e, p in images]  # zipped from the parent folder: one root directory
    bad = [e.name for e, p in images if len(p) != 2]
    if bad:
        raise NBAError(DATA_INVALID, f"expected <class>/<image> layout, got {bad[0]!r}")
    labels = folder_labels([p[0] for _, p in images], class_names)
    ordered = sorted(((e, labels[p[0]]) for e, p in images), key=lambda t: (t[1], t[0].name))
    return ordered, labels


# ------------------------------------------------------------------------------------------- cheap check

def _scan(path: Path, limits: DataLimits) -> tuple[str, list[_Entry], bool]:
    """Sniff and header-check the file: (format, regular-file members, gzip-compressed)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise NBAError(DATA_UNREADABLE, f"cannot read data file: {e.strerror}") from None
    fmt = sniff_dataset_format(head)
    if fmt in ("npz", "zip"):
        try:
            _check_zip_directory(path, size, limits)
            with zipfile.ZipFile(path) as zf:
                files = _scan_zip(zf, limits, size)
        except _ZIP_ERRORS as e:
            raise NBAError(DATA_UNREADABLE, f"corrupt zip archive: {e}") from None
        # Decide by all member names, not only the first: an .npz holds nothing but .npy arrays.
        fmt = "npz" if files and all(e.name.endswith(".npy") for e in files) else "zip"
    elif fmt == "tar":
        files = _scan_tar(path, head[:2] == b"\x1f\x8b", limits, size)
    else:
        raise NBAError(DATA_UNREADABLE, "unrecognised data file: expected .npz (x, y) or a zip / tar / tar.gz "
                       "ImageFolder archive")
    names = [e.name for e in files]
    if len(set(names)) != len(names):
        # Readers disagree on which copy of a repeated name wins; refuse rather than guess.
        raise NBAError(DATA_INVALID, "the archive holds two members with the same name")
    return fmt, files, head[:2] == b"\x1f\x8b"


def _npz_arrays(path: Path, files: list[_Entry]) -> dict[str, dict[str, Any]]:
    """{key: {"dtype", "shape"}} from the .npy headers, each checked against its member size; x and y required."""
    try:
        with zipfile.ZipFile(path) as zf:
            arrays = {e.name[:-4]: _npy_info(zf, e) for e in files}
    except _ZIP_ERRORS as e:
        raise NBAError(DATA_UNREADABLE, f"corrupt zip archive: {e}") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise NBAError(DATA_INVALID, f"the .npz has no {key!r} array (found: {sorted(arrays)})")
    return arrays


CHANNEL_COUNTS = (1, 3, 4)


def is_channels_last(shape: tuple[int, int, int, int], expect_shape: tuple[int, int, int] | None = None) -> bool:
    """THE layout rule for 4-D image arrays, whatever their dtype: the channel axis is the one whose size matches
    the model's (C, H, W) when a spec is known, else the one of size 1, 3 or 4; channels-last when both fit."""
    _, a, b, c = shape
    if expect_shape is not None:
        if (c, a, b) == tuple(expect_shape):
            return True
        if (a, b, c) == tuple(expect_shape):
            return False
    return not (a in CHANNEL_COUNTS and c not in CHANNEL_COUNTS)


def npz_layout(x_shape: tuple[int, ...] | list[int], x_dtype: str,
               expect_shape: tuple[int, int, int] | None = None) -> tuple[int, tuple[int, int, int]]:
    """(images, (C, H, W)) that loading an .npz `x` of this header shape yields (the loader's rule, is_channels_last;
    N×H×W is one channel). Computed from the .npy header, before any decoding; `x_dtype` does not matter."""
    shape = tuple(int(d) for d in x_shape)
    if len(shape) == 3:
        return shape[0], (1, shape[1], shape[2])
    if len(shape) != 4:
        raise NBAError(DATA_INVALID, f"x must be 3-D or 4-D, got shape {list(shape)}")
    n, a, b, c = shape
    return n, ((c, a, b) if is_channels_last(shape, expect_shape) else (a, b, c))  # type: ignore[arg-type]


def _check_npz_arrays(arrays: dict[str, dict[str, Any]], limits: DataLimits,
                      expect_shape: tuple[int, int, int] | None = None) -> tuple[int, tuple[int, int, int]]:
    """Bounds and shapes of an .npz from its .npy headers: the decoded float32 size, the image shape against
    the model's, and as many labels as images -- all before np.load decodes anything."""
    x, y = arrays["x"], arrays["y"]
    images, shape = npz_layout(x["shape"], x["dtype"], expect_shape)
    if images > limits.max_images:
        raise NBAError(DATA_TOO_LARGE, f"{images} images (limit {limits.max_images})")
    check_decoded_size(images, shape, limits)
    if expect_shape is not None and shape != tuple(expect_shape):
        raise NBAError(DATA_SHAPE_MISMATCH, f"images are {list(shape)} (C, H, W); the model expects "
                       f"{list(expect_shape)}")
    y_shape = list(y["shape"])
    if y_shape not in ([images], [images, 1]):
        raise NBAError(DATA_INVALID, f"x has {images} images but y has shape {y_shape}")
    return images, shape


def check_dataset_file(path: PathLike, limits: DataLimits = DataLimits(),
                       class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Validate a data file's structure without decoding images or loading arrays.

    Returns {"format", "members", "total_bytes"} plus, for npz, "arrays": {key: {"dtype", "shape"}}, or, for
    archives, "images" and "classes" ({folder: label}). Raises NBAError (DATA_*) on anything unsafe or malformed."""
    path = Path(path)
    fmt, files, _gz = _scan(path, limits)
    info: dict[str, Any] = {"format": fmt, "members": len(files), "total_bytes": sum(e.size for e in files)}
    if fmt == "npz":
        info["arrays"] = _npz_arrays(path, files)
        images, shape = _check_npz_arrays(info["arrays"], limits)
        info["images"] = images
        info["image_shape"] = list(shape)
        info["label_range"] = _npz_label_range(path, info["arrays"]["y"])
    else:
        images, labels = _image_layout(files, class_names)
        if len(images) > limits.max_images:
            raise NBAError(DATA_TOO_LARGE, f"{len(images)} images (limit {limits.max_images})")
        info["images"] = len(images)
        info["classes"] = labels
        info["label_range"] = [min(labels.values()), max(labels.values())]
    return info


def _npz_label_range(path: Path, y_info: dict[str, Any]) -> list[int] | None:
    """[min, max] of the labels: y is small (its shape was checked against the image count, itself bounded)."""
    if not _DESCR.match(y_info["dtype"]) or _DESCR.match(y_info["dtype"]).group(1) not in "iu":  # type: ignore
        return None
    try:
        with zipfile.ZipFile(path) as zf, zf.open("y.npy") as f:
            y = np.lib.format.read_array(f, allow_pickle=False)
    except (*_ZIP_ERRORS, KeyError) as e:
        raise NBAError(DATA_UNREADABLE, f"cannot read y: {e}") from None
    return [int(y.min()), int(y.max())] if y.size else None


# -------------------------------------------------------------------------------------------------- loading

def _to_nchw(x: np.ndarray, expect_shape: tuple[int, int, int] | None) -> np.ndarray:
    """N×H×W -> N×1×H×W; a 4-D array by the one layout rule (is_channels_last)."""
    if x.ndim == 3:
        return x[:, None]
    if x.ndim != 4:
        raise NBAError(DATA_INVALID, f"x must be 3-D or 4-D, got shape {list(x.shape)}")
    return x.transpose(0, 3, 1, 2) if is_channels_last(x.shape, expect_shape) else x


def _images_from_array(x: np.ndarray, expect_shape: tuple[int, int, int] | None) -> np.ndarray:
    """One float32 N×C×H×W array (the only float copy made; uint8 is divided straight into it)."""
    if x.dtype == np.uint8:
        nchw = _to_nchw(x, expect_shape)
        out = np.empty(nchw.shape, dtype=np.float32)
        np.divide(nchw, np.float32(255), out=out)
        return out
    if x.dtype.kind != "f":
        raise NBAError(DATA_INVALID, f"x must be uint8 (0..255) or float (0..1), N×H×W×C or N×C×H×W, got {x.dtype}")
    x = np.ascontiguousarray(_to_nchw(x, expect_shape), dtype=np.float32)
    if x.size and not np.isfinite(x).all():
        raise NBAError(DATA_INVALID, "x holds NaN or infinite values")
    if x.size and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise NBAError(DATA_INVALID, f"float x must be in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    return np.clip(x, 0.0, 1.0, out=x)


def _labels_from_array(y: np.ndarray, class_names: Sequence[str] | None) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise NBAError(DATA_INVALID, f"y must be 1-D, got shape {list(y.shape)}")
    if y.dtype.kind in "US":  # class names as strings: their order comes from the class list
        return np.asarray(labels_from_strings([str(v) for v in y.astype(str)], class_names), dtype=np.int64)
    if y.dtype.kind not in "iu":
        raise NBAError(DATA_INVALID, f"y must hold integer class indices or class-name strings, got {y.dtype}")
    return y.astype(np.int64)


def _load_npz(path: Path, expect_shape: tuple[int, int, int] | None,
              class_names: Sequence[str] | None = None) -> ImageSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            x_raw, y_raw = z["x"], z["y"]
            listed = z["classes"] if "classes" in z.files else None
    except NBAError:
        raise
    except ValueError as e:  # numpy's refusal of object arrays without allow_pickle lands here
        raise NBAError(DATA_INVALID, f"cannot load the .npz arrays (x: numbers, y: integers or strings, classes: "
                       f"strings; no object arrays): {e}") from None
    except (OSError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise NBAError(DATA_UNREADABLE, f"cannot load the .npz arrays: {e}") from None
    if listed is not None:
        if listed.ndim != 1 or listed.dtype.kind not in "US":
            raise NBAError(DATA_INVALID, "the npz 'classes' array must be 1-D strings (class names in label order)")
        listed = [str(v) for v in listed.astype(str)]
        if class_names and list(class_names) != listed:
            raise NBAError(DATA_INVALID, f"the npz lists classes {listed[:6]}... but the given class list is "
                           f"{list(class_names)[:6]}...")
    names = list(class_names) if class_names else listed
    x = _images_from_array(x_raw, expect_shape)
    del x_raw
    y = _labels_from_array(y_raw, names)
    if len(x) != len(y):
        raise NBAError(DATA_INVALID, f"x has {len(x)} images but y has {len(y)} labels")
    return ImageSet(x, y, class_names=names)


def _decode_image(data: bytes, name: str, mode: str | None, size: tuple[int, int] | None,
                  limits: DataLimits) -> np.ndarray:
    """One image -> H×W×C uint8, with its pixel count and size checked before any pixel is decoded."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency notes etc.; errors still raise
            with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
                w, h = img.size
                if w * h > limits.max_image_pixels:
                    raise NBAError(DATA_TOO_LARGE, f"{name} is {w}×{h} pixels (limit {limits.max_image_pixels})")
                if size is not None and (h, w) != size:
                    raise NBAError(DATA_SHAPE_MISMATCH, f"{name} is {h}×{w} (H×W); the model expects "
                                   f"{size[0]}×{size[1]} and images are not resized")
                if mode is None:
                    mode = "L" if img.mode in _GREY_MODES else "RGB"
                arr = np.asarray(img.convert(mode), dtype=np.uint8)
    except NBAError:
        raise
    except UnidentifiedImageError:
        raise NBAError(DATA_UNREADABLE, f"{name!r} is not a PNG or JPEG image") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise NBAError(DATA_UNREADABLE, f"cannot decode image {name!r}: {e}") from None
    return arr[:, :, None] if arr.ndim == 2 else arr


def _load_image_archive(path: Path, fmt: str, gz: bool, files: list[_Entry],
                        expect_shape: tuple[int, int, int] | None, limits: DataLimits,
                        class_names: Sequence[str] | None = None) -> ImageSet:
    images, labels = _image_layout(files, class_names)
    if len(images) > limits.max_images:
        raise NBAError(DATA_TOO_LARGE, f"{len(images)} images (limit {limits.max_images})")
    mode = size = None
    if expect_shape is not None:
        mode = _MODES.get(expect_shape[0])
        if mode is None:
            raise NBAError(DATA_SHAPE_MISMATCH, f"images cannot be converted to {expect_shape[0]} channels")
        size = (expect_shape[1], expect_shape[2])
        # N×C×H×W×4 bytes known before the first image is decoded.
        check_decoded_size(len(images), expect_shape, limits)
    index = {e.name: i for i, (e, _) in enumerate(images)}
    y = np.array([label for _, label in images], dtype=np.int64)
    x: np.ndarray | None = None
    filled = 0

    def put(name: str, data: bytes) -> None:
        nonlocal x, mode, size, filled
        arr = _decode_image(data, name, mode, size, limits)
        filled += 1
        if x is None:  # without a spec, the first image fixes mode and size for the rest
            size = size or arr.shape[:2]
            mode = mode or ("L" if arr.shape[2] == 1 else "RGB")
            shape = (arr.shape[2], arr.shape[0], arr.shape[1])
            check_decoded_size(len(images), shape, limits)
            x = np.empty((len(images), *shape), dtype=np.float32)  # the one float copy, filled image by image
        np.divide(arr.transpose(2, 0, 1), np.float32(255), out=x[index[name]])

    if fmt == "zip":
        try:
            with zipfile.ZipFile(path) as zf:
                for entry, _ in images:
                    put(entry.name, _read_zip_member(zf, entry))
        except _ZIP_ERRORS as e:
            raise NBAError(DATA_UNREADABLE, f"corrupt zip archive: {e}") from None
    else:
        wanted = {e.name: e for e, _ in images}
        for tf, m in _iter_tar(path, gz):
            entry = wanted.get(m.name)
            if entry is None or not m.isreg():
                continue
            f = tf.extractfile(m)
            data = f.read(entry.size + 1) if f is not None else b""
            if len(data) != entry.size:
                raise NBAError(DATA_UNREADABLE, f"archive member {m.name!r} does not match its declared size")
            put(m.name, data)
    if x is None or filled != len(images):
        raise NBAError(DATA_UNREADABLE, "the archive changed while it was being read")
    names = list(class_names) if class_names else names_from_folders(labels)
    return ImageSet(x, y, class_names=names)


def load_dataset_file(path: PathLike, *, num_classes: int | None = None,
                      expect_shape: tuple[int, int, int] | None = None,
                      limits: DataLimits = DataLimits(), class_names: Sequence[str] | None = None) -> ImageSet:
    """Load a user data file (format detected by content) into an ImageSet, checking it against the model:
    labels in [0, num_classes), images of shape `expect_shape` = (C, H, W). `class_names` (label order) maps
    folder names and string labels; the resolved names are in the result's `class_names` (None when the data
    names no classes). A directory of class folders is read as such. Raises NBAError (DATA_*)."""
    path = Path(path)
    if path.is_dir():  # a plain folder of class folders: packed into a zip so it gets the archive's checks
        from .classes import pack_folder

        with tempfile.TemporaryDirectory(prefix="nba-folder-") as tmp:
            pack_folder(path, Path(tmp) / "data.zip")
            return load_dataset_file(Path(tmp) / "data.zip", num_classes=num_classes, expect_shape=expect_shape,
                                     limits=limits, class_names=class_names)
    expect = tuple(int(d) for d in expect_shape) if expect_shape is not None else None
    fmt, files, gz = _scan(path, limits)
    if fmt == "npz":
        # .npy headers vs member sizes, then decoded size, image shape and label count, all before np.load.
        _check_npz_arrays(_npz_arrays(path, files), limits, expect)  # type: ignore[arg-type]
        data = _load_npz(path, expect, class_names)  # type: ignore[arg-type]
    else:
        data = _load_image_archive(path, fmt, gz, files, expect, limits, class_names)  # type: ignore[arg-type]
    if len(data) == 0:
        raise NBAError(DATA_INVALID, "the data file holds no images")
    if len(data) > limits.max_images:
        raise NBAError(DATA_TOO_LARGE, f"{len(data)} images (limit {limits.max_images})")
    if expect is not None and data.shape != expect:
        raise NBAError(DATA_SHAPE_MISMATCH, f"images are {list(data.shape)} (C, H, W); the model expects "
                       f"{list(expect)}")
    low, high = int(data.y.min()), int(data.y.max())
    if low < 0 or (num_classes is not None and high >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "non-negative"
        raise NBAError(DATA_LABEL_OUT_OF_RANGE, f"labels span [{low}, {high}] but must be {bound}")
    return data


# -------------------------------------------------------------------------------------------------- writing

def save_npz(path: PathLike, data: ImageSet) -> None:
    """Write `data` as a compressed .npz (atomically), always N×H×W×C: x as uint8 when that is lossless (pixels
    on the 1/255 grid), otherwise float32 in [0, 1]; y as int64; `classes` when the set names its classes."""
    u8 = np.rint(data.x * 255).clip(0, 255).astype(np.uint8)
    if np.array_equal(u8.astype(np.float32) / np.float32(255), data.x):
        x: np.ndarray = u8.transpose(0, 2, 3, 1)
    else:
        x = data.x.astype(np.float32).transpose(0, 2, 3, 1)
    extra = {"classes": np.asarray(data.class_names, dtype=str)} if data.class_names else {}
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:  # a file object, so numpy does not append ".npz" to the name
            np.savez_compressed(f, x=np.ascontiguousarray(x), y=data.y.astype(np.int64), **extra)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
