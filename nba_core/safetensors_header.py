"""Cheap, torch-free checks of model files: format sniffing and a strict safetensors header validation.

The API process runs these on uploads before anything heavy happens, so this module imports neither torch nor
numpy. Layout of a safetensors file: an 8-byte little-endian header length N, N bytes of UTF-8 JSON mapping
tensor names to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data buffer) plus an
optional "__metadata__" str->str map, then the data buffer, whose tensors must tile it exactly.
"""

from __future__ import annotations

import json
import struct
from typing import Any, BinaryIO, Literal

from .errors import CHECKPOINT_TRUNCATED, CHECKPOINT_UNREADABLE, NBAError

# The safetensors reference implementation refuses headers above 100 MB; a model header is a few kB per
# hundred tensors, so 16 MiB is generous and bounds what a hostile file makes us parse.
DEFAULT_MAX_HEADER_BYTES = 16 * 1024 * 1024

# Bytes per element of every dtype we accept (sub-byte formats are refused).
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}

CheckpointFormat = Literal["safetensors", "pt-zip", "pt-legacy", "unknown"]


SPEC_METADATA_KEY = "nba_spec"  # safetensors metadata entry holding the model spec JSON (written by nba)


def embedded_spec(path) -> str | None:
    """The spec JSON a .safetensors written by nba carries in its metadata, or None (no torch needed)."""
    import os

    with open(path, "rb") as f:
        header = check_safetensors_header(f, os.path.getsize(path))
    return (header.get("__metadata__") or {}).get(SPEC_METADATA_KEY)


def _unreadable(msg: str) -> NBAError:
    return NBAError(CHECKPOINT_UNREADABLE, f"not a valid safetensors file: {msg}")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    # JSON allows repeated keys (the last wins in Python); two tensors claiming one name is a malformed file.
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _unreadable(f"duplicate header key {k!r}")
        out[k] = v
    return out


def _is_nonneg_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_safetensors_header(f: BinaryIO, total_size: int,
                             max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, Any]:
    """Validate the header of the safetensors stream `f` (positioned at its start; `total_size` bytes long).

    Returns {tensor_name: {"dtype": str, "shape": [int, ...]}} plus "__metadata__" (a str->str dict) when the
    file has one. Raises NBAError CHECKPOINT_TRUNCATED when the file is shorter than its header says, and
    CHECKPOINT_UNREADABLE for anything else malformed (bad length, bad JSON, gaps, overlaps, trailing bytes)."""
    prefix = f.read(8)
    if len(prefix) < 8:
        raise NBAError(CHECKPOINT_TRUNCATED, "file is shorter than the 8-byte safetensors header length")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len < 2 or header_len > max_header_bytes:
        raise _unreadable(f"implausible header length {header_len}")
    if header_len > total_size - 8:
        raise NBAError(CHECKPOINT_TRUNCATED, f"header claims {header_len} bytes but the file has {total_size - 8}")
    raw = f.read(header_len)
    if len(raw) < header_len:
        raise NBAError(CHECKPOINT_TRUNCATED, "file ends inside the safetensors header")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except NBAError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _unreadable(f"header is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise _unreadable("header is not a JSON object")

    out: dict[str, Any] = {}
    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise _unreadable("__metadata__ must map strings to strings")
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise _unreadable(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPE_SIZES:
            raise _unreadable(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_nonneg_int(d) for d in shape):
            raise _unreadable(f"tensor {name!r} has an invalid shape {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_nonneg_int(o) for o in offsets)
                or offsets[0] > offsets[1]):
            raise _unreadable(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * DTYPE_SIZES[dtype]:
            raise _unreadable(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes do not hold {dtype} {shape}")
        spans.append((offsets[0], offsets[1], name))
        out[name] = {"dtype": dtype, "shape": list(shape)}

    # The tensors must tile the data buffer: sorted by offset, each starts where the previous one ended.
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else "leaves a gap before it"
            raise _unreadable(f"tensor {name!r} {kind}")
        position = end
    available = total_size - 8 - header_len
    if position > available:
        raise NBAError(CHECKPOINT_TRUNCATED,
                       f"tensor data needs {position} bytes but only {available} follow the header")
    if position < available:
        raise _unreadable(f"{available - position} unexpected trailing bytes after the tensor data")
    if metadata is not None:
        out["__metadata__"] = dict(metadata)
    return out


def sniff_checkpoint_format(first_bytes: bytes) -> CheckpointFormat:
    """Guess a model file's format from its first bytes (>= 16 recommended): by content, never by extension."""
    if len(first_bytes) >= 9:
        (n,) = struct.unpack("<Q", first_bytes[:8])
        # A JSON header of sane length right after the length field. Checked first: a small header length can
        # start with the byte 0x80, which would otherwise look like a pickle.
        if 2 <= n <= DEFAULT_MAX_HEADER_BYTES and first_bytes[8:9] == b"{":
            return "safetensors"
    if first_bytes[:4] == b"PK\x03\x04":
        return "pt-zip"  # torch.save's default container (a zip holding data.pkl and the tensor storages)
    if len(first_bytes) >= 2 and first_bytes[0] == 0x80 and 2 <= first_bytes[1] <= 5:
        return "pt-legacy"  # a bare pickle stream (PROTO opcode): the pre-1.6 torch.save format
    return "unknown"


# torch.save writes its zip members uncompressed, so a PyTorch zip that inflates far beyond its own size is a
# bomb, not a checkpoint. Below PT_RATIO_MIN_BYTES ratios are not judged (tiny models, small headers).
PT_MAX_MEMBERS = 100_000
PT_MAX_DIRECTORY_BYTES = 16 * 1024 * 1024
PT_MAX_RATIO = 20.0
PT_RATIO_MIN_BYTES = 4 * 1024 * 1024


def check_pt_zip(path: str, size: int, max_inflated_bytes: int) -> int:
    """Bound a zip-format PyTorch checkpoint from its central directory, before torch.load touches it: member
    count and directory size (read by hand, before zipfile parses it), then the members' inflated sizes against
    `max_inflated_bytes` and against the file's own size. Returns the inflated total; raises NBAError
    (checkpoint_too_large / checkpoint_unreadable)."""
    import zipfile

    from .errors import CHECKPOINT_TOO_LARGE
    from .zip_bounds import check_zip_directory

    check_zip_directory(path, size, max_members=PT_MAX_MEMBERS, max_directory_bytes=PT_MAX_DIRECTORY_BYTES,
                        too_large=CHECKPOINT_TOO_LARGE, unreadable=CHECKPOINT_UNREADABLE)
    try:
        with zipfile.ZipFile(path) as zf:
            inflated = sum(info.file_size for info in zf.infolist())
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, struct.error) as e:
        raise NBAError(CHECKPOINT_UNREADABLE, f"the PyTorch zip file is corrupt: {e}") from None
    if inflated > max_inflated_bytes:
        raise NBAError(CHECKPOINT_TOO_LARGE, f"the checkpoint inflates to {inflated:,} bytes (limit "
                       f"{max_inflated_bytes:,} for this model)")
    if inflated > PT_RATIO_MIN_BYTES and inflated > PT_MAX_RATIO * max(size, 1):
        raise NBAError(CHECKPOINT_TOO_LARGE, f"the checkpoint inflates {inflated / max(size, 1):.0f}-fold "
                       f"(limit {PT_MAX_RATIO:.0f}): refused as a decompression bomb")
    return inflated


def max_checkpoint_bytes(parameter_estimate: int | None, default: int) -> int:
    """What a checkpoint for a network of `parameter_estimate` parameters may hold: 8 bytes (fp64) per
    parameter and buffer plus room for headers; `default` when the architecture has no estimate."""
    if parameter_estimate is None:
        return default
    return 10 * parameter_estimate + 4 * 1024 * 1024  # 8 bytes each, +25 % for buffers (BatchNorm statistics)
