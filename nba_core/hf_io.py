"""Hugging Face model folders and zips: recognise them, check them cheaply, unpack them safely, pack them.

Torch-free (the API uses it on uploads). A model is what `save_pretrained` writes: `config.json`,
`model.safetensors` and optionally `preprocessor_config.json`, either as a folder or as a zip of it (the files at
the zip's root or inside one top-level folder). Other members (README.md, training_args.bin, ...) are ignored and
never extracted; sharded or pickled weights are refused with a message saying what to do.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CHECKPOINT_UNREADABLE, NBAError
from .hf_config import HF_CONFIG_INVALID, HFConfigInfo, MAX_CONFIG_BYTES, MAX_PREPROCESSOR_BYTES, \
    MAX_PARAMETERS, check_hf_config, parse_preprocessor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PREPROCESSOR_NAME = "preprocessor_config.json"
HF_ARCHIVE_INVALID = "hf_archive_invalid"

MAX_ZIP_MEMBERS = 256
MAX_WEIGHTS_BYTES = 8 * 1024**3
MAX_WEIGHTS_RATIO = 100  # uncompressed / compressed size of model.safetensors in a zip
_SIZE_LIMITS = {CONFIG_NAME: MAX_CONFIG_BYTES, PREPROCESSOR_NAME: MAX_PREPROCESSOR_BYTES, WEIGHTS_NAME: MAX_WEIGHTS_BYTES}
# Files save_pretrained writes for other weight formats: named so the error can say what to do instead.
_OTHER_WEIGHTS = {"pytorch_model.bin": "a pickled PyTorch file", "model.safetensors.index.json": "sharded weights",
                  "tf_model.h5": "TensorFlow weights", "flax_model.msgpack": "Flax weights"}


def is_hf_folder(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / CONFIG_NAME).is_file()


def zip_has_hf_config(path: str | os.PathLike) -> bool:
    """True for a readable zip with a config.json at its root or one folder down (a torch.save zip has none)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(_base_name(n) == CONFIG_NAME for n in zf.namelist()[:MAX_ZIP_MEMBERS])
    except (OSError, zipfile.BadZipFile):
        return False


def _base_name(name: str) -> str | None:
    """The file name of a member at depth 0 or 1 (None deeper or for folders)."""
    parts = [p for p in name.replace("\\", "/").split("/") if p]
    if not parts or name.endswith("/") or len(parts) > 2:
        return None
    return parts[-1]


def _zip_members(zf: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    infos = zf.infolist()
    if len(infos) > MAX_ZIP_MEMBERS:
        raise NBAError(HF_ARCHIVE_INVALID, f"the zip has more than {MAX_ZIP_MEMBERS} members")
    found: dict[str, zipfile.ZipInfo] = {}
    folders: set[str] = set()
    for info in infos:
        base = _base_name(info.filename)
        if base in _SIZE_LIMITS or base in _OTHER_WEIGHTS:
            if base in found:
                raise NBAError(HF_ARCHIVE_INVALID, f"the zip holds more than one {base}")
            if info.flag_bits & 0x1:
                raise NBAError(HF_ARCHIVE_INVALID, f"{info.filename} is encrypted")
            found[base] = info
            folders.add(info.filename.rsplit("/", 1)[0] if "/" in info.filename.strip("/") else "")
    if len(folders) > 1:
        raise NBAError(HF_ARCHIVE_INVALID, f"the model files are spread over several folders: {sorted(folders)}")
    return found


def _missing_weights(present: set[str]) -> NBAError:
    other = [f"{n} ({what})" for n, what in _OTHER_WEIGHTS.items() if n in present]
    hint = (f"found {', '.join(other)}; " if other else "") + (
        "re-save the model with `model.save_pretrained(folder, safe_serialization=True, max_shard_size='100GB')` "
        "so that the folder holds one model.safetensors")
    return NBAError(CHECKPOINT_UNREADABLE, f"no {WEIGHTS_NAME} in the model folder: {hint}")


def _read_bounded(f, limit: int, what: str) -> bytes:
    data = f.read(limit + 1)
    if len(data) > limit:
        raise NBAError(HF_CONFIG_INVALID, f"{what} is larger than {limit} bytes", http_status=413)
    return data


@dataclass
class HFArchiveCheck:
    """The cheap (torch-free) verdict on an HF model upload."""

    info: HFConfigInfo
    preprocessor: dict[str, Any] | None
    tensors: int
    parameters: int  # elements in model.safetensors' header

    def summary(self) -> dict[str, Any]:
        return {"format": "hf", **self.info.summary(), "tensors": self.tensors, "parameters": self.parameters,
                "has_preprocessor_config": self.preprocessor is not None}


def _check_weights_header(f, size: int, info: HFConfigInfo) -> tuple[int, int]:
    from .safetensors_header import check_safetensors_header

    header = check_safetensors_header(f, size)
    numel = 0
    tensors = 0
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        tensors += 1
        n = 1
        for d in spec["shape"]:
            n *= d
        numel += n
    if numel > MAX_PARAMETERS:
        raise NBAError("hf_model_too_large", f"model.safetensors holds {numel} elements; at most {MAX_PARAMETERS}",
                       http_status=413)
    # The config decides what gets built; weights far from its size cannot belong to it (estimates are within
    # ~1.2x of the built model, see tests), so the mismatch is reported before the worker builds anything.
    if not info.estimated_parameters / 3 <= numel <= info.estimated_parameters * 3 + 10_000:
        raise NBAError("hf_weights_config_mismatch", f"model.safetensors holds {numel} elements but config.json "
                       f"describes ~{info.estimated_parameters}; they do not belong together")
    return tensors, numel


def check_hf_zip(path: str | os.PathLike, *, input_size: tuple[int, int] | None = None) -> HFArchiveCheck:
    """Validate an HF model zip without extracting it: member bounds, the configs, the weights header."""
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as e:
        raise NBAError(HF_ARCHIVE_INVALID, f"not a readable zip: {e}") from None
    with zf:
        members = _zip_members(zf)
        if CONFIG_NAME not in members:
            raise NBAError(HF_ARCHIVE_INVALID, f"no {CONFIG_NAME} in the zip")
        for base, info in members.items():
            limit = _SIZE_LIMITS.get(base)
            if limit is not None and info.file_size > limit:
                raise NBAError(HF_CONFIG_INVALID if base != WEIGHTS_NAME else HF_ARCHIVE_INVALID,
                               f"{base} is larger than {limit} bytes ({info.file_size})", http_status=413)
        weights = members.get(WEIGHTS_NAME)
        if weights is not None and weights.file_size > MAX_WEIGHTS_RATIO * weights.compress_size + (1 << 20):
            # trained float weights barely compress; a huge ratio is a zip bomb aimed at the worker's disk
            raise NBAError(HF_ARCHIVE_INVALID, f"{WEIGHTS_NAME} would expand {weights.file_size // max(1, weights.compress_size)}"
                           "x; refused", http_status=413)
        with zf.open(members[CONFIG_NAME]) as f:
            config_raw = _read_bounded(f, MAX_CONFIG_BYTES, CONFIG_NAME)
        pre_raw = None
        if PREPROCESSOR_NAME in members:
            with zf.open(members[PREPROCESSOR_NAME]) as f:
                pre_raw = _read_bounded(f, MAX_PREPROCESSOR_BYTES, PREPROCESSOR_NAME)
        return _check_parts(config_raw, pre_raw, members, zf, input_size)


def check_hf_folder(path: str | os.PathLike, *, input_size: tuple[int, int] | None = None) -> HFArchiveCheck:
    folder = Path(path)
    present = {p.name for p in folder.iterdir() if p.is_file()}
    with open(folder / CONFIG_NAME, "rb") as f:
        config_raw = _read_bounded(f, MAX_CONFIG_BYTES, CONFIG_NAME)
    pre_raw = None
    if PREPROCESSOR_NAME in present:
        with open(folder / PREPROCESSOR_NAME, "rb") as f:
            pre_raw = _read_bounded(f, MAX_PREPROCESSOR_BYTES, PREPROCESSOR_NAME)
    info = check_hf_config(config_raw, input_size=_input_size(pre_raw, input_size))
    pre = _parse_pre(pre_raw, info)
    if WEIGHTS_NAME not in present:
        raise _missing_weights(present)
    weights = folder / WEIGHTS_NAME
    with open(weights, "rb") as f:
        tensors, numel = _check_weights_header(f, weights.stat().st_size, info)
    return HFArchiveCheck(info, pre, tensors, numel)


def _input_size(pre_raw: bytes | None, given: tuple[int, int] | None) -> tuple[int, int] | None:
    if given is not None or pre_raw is None:
        return given
    try:
        return parse_preprocessor(pre_raw, 3).input_size
    except NBAError:
        return None  # reported properly once the channel count is known


def _parse_pre(pre_raw: bytes | None, info: HFConfigInfo) -> dict | None:
    if pre_raw is None:
        return None
    p = parse_preprocessor(pre_raw, info.num_channels)
    return {"input_size": p.input_size, "mean": p.mean, "std": p.std}


def _check_parts(config_raw: bytes, pre_raw: bytes | None, members: dict[str, zipfile.ZipInfo],
                 zf: zipfile.ZipFile, input_size) -> HFArchiveCheck:
    info = check_hf_config(config_raw, input_size=_input_size(pre_raw, input_size))
    pre = _parse_pre(pre_raw, info)
    if WEIGHTS_NAME not in members:
        raise _missing_weights(set(members))
    with zf.open(members[WEIGHTS_NAME]) as f:
        tensors, numel = _check_weights_header(f, members[WEIGHTS_NAME].file_size, info)
    return HFArchiveCheck(info, pre, tensors, numel)


def unpack_hf_zip(path: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Check the zip, then copy its three model files (only those, under our own names) into `dest`."""
    check_hf_zip(path)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path) as zf:
        for base, info in _zip_members(zf).items():
            if base not in _SIZE_LIMITS:
                continue
            with zf.open(info) as src, open(dest / base, "wb") as out:
                copied = _copy_bounded(src, out, _SIZE_LIMITS[base])
            if copied != info.file_size:
                raise NBAError(HF_ARCHIVE_INVALID, f"{base}: the zip entry's size does not match its content")
    return dest


def _copy_bounded(src, out, limit: int) -> int:
    total = 0
    while chunk := src.read(1 << 20):
        total += len(chunk)
        if total > limit:
            raise NBAError(HF_ARCHIVE_INVALID, f"a model file is larger than {limit} bytes", http_status=413)
        out.write(chunk)
    return total


def pack_hf_zip(folder: str | os.PathLike, zip_path: str | os.PathLike) -> Path:
    """Zip the model files of `folder` (at the zip's root), atomically."""
    folder, zip_path = Path(folder), Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=zip_path.parent, prefix=f".{zip_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
            for name in (CONFIG_NAME, WEIGHTS_NAME, PREPROCESSOR_NAME):
                if (folder / name).is_file():
                    zf.write(folder / name, arcname=name)
        os.replace(tmp, zip_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return zip_path


def replace_folder(src: Path, dest: Path) -> None:
    """Move the finished folder `src` to `dest` (replacing an older one) so readers never see half a model."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)
