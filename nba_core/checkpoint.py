"""Safe checkpoint I/O: read user model files without executing code, validate them against a spec, and write
safetensors atomically.

Accepted inputs, detected by content (never by extension):
- safetensors (preferred): header validated by `safetensors_header.check_safetensors_header`, then loaded;
- PyTorch files (zip or legacy) ONLY through `torch.load(..., weights_only=True)`: a pickle that needs anything
  beyond tensors and plain containers is refused (CHECKPOINT_UNSAFE); there is no fallback.
A file may hold a bare state_dict or a {"state_dict" | "model_state_dict" | "model": state_dict} wrapper; a
leading "module." (DataParallel) or "_orig_mod." (torch.compile) on every key is stripped.

Key names: `build_model(spec)` returns a SpecModel whose state_dict keys are "net.<name>". Checkpoints exported
from the bare network (keys "<name>", the common case for users) are accepted too and mapped onto "net.".
Validation is otherwise exact (missing / unexpected keys, shapes, dtypes, finite values), except that missing
BatchNorm "num_batches_tracked" counters are filled with 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import tempfile
import warnings
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .errors import (
    CHECKPOINT_DTYPE_MISMATCH,
    CHECKPOINT_MISSING_KEYS,
    CHECKPOINT_NONFINITE,
    CHECKPOINT_SHAPE_MISMATCH,
    CHECKPOINT_UNEXPECTED_KEYS,
    CHECKPOINT_UNREADABLE,
    CHECKPOINT_UNSAFE,
    NBAError,
)
from .arch_budget import estimate
from .errors import CHECKPOINT_TOO_LARGE
from .models import SpecModel, build_model
from .safetensors_header import (SPEC_METADATA_KEY, check_pt_zip, check_safetensors_header, max_checkpoint_bytes,
                                 sniff_checkpoint_format)
from .spec import ModelSpec, parse_spec

PathLike = str | os.PathLike
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
_STRIPPED_PREFIXES = ("module.", "_orig_mod.")
_ACCEPTED_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_SNIFF_BYTES = 64
# Without a spec to size it from, a checkpoint may hold at most this many bytes of tensors.
DEFAULT_MAX_CHECKPOINT_BYTES = 8 * 1024**3


def _describe(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(repr(k) for k in sorted(keys)[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------- reading

def _read_safetensors(path: Path, size: int, max_bytes: int) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    with open(path, "rb") as f:
        check_safetensors_header(f, size)
    if size > max_bytes:  # the header tiles the file exactly, so its size is the tensors' size
        raise NBAError(CHECKPOINT_TOO_LARGE, f"the checkpoint is {size:,} bytes (limit {max_bytes:,} for this model)")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, ValueError, TypeError, RuntimeError, OSError) as e:
        raise NBAError(CHECKPOINT_UNREADABLE, f"safetensors file could not be loaded: {e}") from None


def _read_torch(path: Path, fmt: str) -> object:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols; the outcome is what matters
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only's restricted unpickler met a global, a callable or an opcode it does not allow.
        raise NBAError(CHECKPOINT_UNSAFE, unsafe_pickle_message(str(e))) from None
    except Exception as e:  # noqa: BLE001 - any failure of a pickle-based reader is a refusal
        if fmt == "pt-zip" and isinstance(e, RuntimeError) and "PytorchStreamReader" in str(e):
            raise NBAError(CHECKPOINT_UNREADABLE, "the PyTorch zip file is corrupt or truncated") from None
        raise NBAError(CHECKPOINT_UNSAFE, f"the PyTorch file could not be loaded safely ({type(e).__name__}); "
                       f"{REEXPORT_HINT}") from None


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
REEXPORT_HINT = ("re-export only the weights, where the model's class is importable: "
                 "torch.save(model.state_dict(), 'weights.pt')  "
                 "(or safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))")


def unsafe_pickle_message(torch_text: str) -> str:
    """One actionable line for a refused pickle: what the file is, that nothing ran, the one-line fix (torch's own
    text is several paragraphs with terminal colour codes)."""
    text = _ANSI.sub("", torch_text)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    what = f" (it references {found.group(1)})" if found else ""
    return (f"the PyTorch file holds a pickled object, not a state_dict of tensors{what}, e.g. a whole model saved "
            f"with torch.save(model); refused, nothing was executed. Fix: {REEXPORT_HINT}; or hand the module "
            f"itself to nba_core.module_api.sanitize_module (Python API)")


def _unwrap(obj: object) -> dict[str, torch.Tensor]:
    """The state_dict inside what torch.load returned: plain, or under a well-known wrapper key."""
    if not isinstance(obj, Mapping):
        raise NBAError(CHECKPOINT_UNREADABLE, f"the file holds a {type(obj).__name__}, not a state_dict")
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise NBAError(CHECKPOINT_UNREADABLE,
                       f"not a state_dict of tensors: entries {_describe(bad)} are not tensors with string names")
    return dict(obj)


def _strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _STRIPPED_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def read_state_dict(path: PathLike, max_bytes: int = DEFAULT_MAX_CHECKPOINT_BYTES) -> dict[str, torch.Tensor]:
    """Read a state_dict (CPU tensors) from a safetensors or PyTorch file without running any pickled code.
    Tensors of more than `max_bytes` (declared sizes, inflated for zips) are refused before anything loads."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise NBAError(CHECKPOINT_UNREADABLE, f"cannot read model file: {e.strerror}") from None
    fmt = sniff_checkpoint_format(head)
    if fmt == "safetensors":
        state = _read_safetensors(path, size, max_bytes)
    elif fmt in ("pt-zip", "pt-legacy"):
        if fmt == "pt-zip":
            check_pt_zip(str(path), size, max_bytes)
        elif size > max_bytes:
            raise NBAError(CHECKPOINT_TOO_LARGE, f"the checkpoint is {size:,} bytes (limit {max_bytes:,})")
        state = _unwrap(_read_torch(path, fmt))
        bad = [k for k, v in state.items() if v.layout != torch.strided or v.is_quantized]
        if bad:
            raise NBAError(CHECKPOINT_UNREADABLE, f"sparse or quantized tensors are not supported: {_describe(bad)}")
    else:
        raise NBAError(CHECKPOINT_UNREADABLE, "unrecognised model file: expected safetensors or a PyTorch "
                       "state_dict (.pt); the content matches neither")
    return _strip_prefixes(state)


# -------------------------------------------------------------------------------------------------- validation

def _match_key_namespace(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Map a bare-network checkpoint onto SpecModel names ("net." prefix) when that matches more keys."""
    direct = sum(k in expected for k in state)
    prefixed = sum(f"net.{k}" in expected for k in state)
    if prefixed > direct:
        return {f"net.{k}": v for k, v in state.items()}
    return state


def conform_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Check `state` against `model` and return it ready for load_state_dict(strict=True): keys mapped to the
    model's names, floating tensors cast to the model's dtype (fp16/bf16/fp64 accepted), integer buffers to
    theirs. Raises NBAError with a CHECKPOINT_* code naming the first problem."""
    reference = model.state_dict()
    state = _match_key_namespace(dict(state), set(reference))
    # BatchNorm's step counter only matters with momentum=None; exports from older PyTorch or other frameworks
    # lack it, so a missing one is filled with the fresh model's value (0) instead of refusing the file.
    for k, v in reference.items():
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = v.clone()
    missing = [k for k in reference if k not in state]
    if missing:
        from .foreign import describe_foreign_layout

        hint = describe_foreign_layout(list(state))
        raise NBAError(CHECKPOINT_MISSING_KEYS, f"{len(missing)} keys missing from the checkpoint: "
                       f"{_describe(missing)} ({hint or 'does the spec' + chr(39) + 's arch / arch_params match the file?'})")
    unexpected = [k for k in state if k not in reference]
    if unexpected:
        raise NBAError(CHECKPOINT_UNEXPECTED_KEYS, f"{len(unexpected)} keys not in {type(model).__name__}: "
                       f"{_describe(unexpected)}")
    out: dict[str, torch.Tensor] = {}
    for key, ref in reference.items():
        t = state[key]
        if tuple(t.shape) != tuple(ref.shape):
            raise NBAError(CHECKPOINT_SHAPE_MISMATCH,
                           f"{key}: checkpoint has shape {list(t.shape)}, the model expects {list(ref.shape)}")
        if ref.is_floating_point():
            if t.dtype not in _ACCEPTED_FLOATS:
                raise NBAError(CHECKPOINT_DTYPE_MISMATCH, f"{key}: expected a floating tensor, got {t.dtype}")
            t = t.to(ref.dtype)
            if not bool(torch.isfinite(t).all()):
                raise NBAError(CHECKPOINT_NONFINITE, f"{key}: contains NaN or infinite values")
        else:
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise NBAError(CHECKPOINT_DTYPE_MISMATCH, f"{key}: expected an integer tensor, got {t.dtype}")
            t = t.to(ref.dtype)
        out[key] = t
    return out


def validate_state_dict(state: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """Raise NBAError (CHECKPOINT_*) unless `state` loads into `model`: exact keys (bare-network keys are
    accepted for a SpecModel), shapes, dtypes, finite values. Use conform_state_dict to get the loadable dict."""
    conform_state_dict(state, model)


def load_model(path: PathLike, spec: ModelSpec | dict | str) -> SpecModel:
    """Build the network the spec describes and load the weights at `path` into it (eval mode, CPU)."""
    if not isinstance(spec, ModelSpec):
        spec = parse_spec(spec)
    sizes = estimate(spec.arch, spec.arch_params, in_channels=spec.in_channels, num_classes=spec.num_classes,
                     input_size=spec.input_size)
    limit = max_checkpoint_bytes(sizes[0] if sizes else None, DEFAULT_MAX_CHECKPOINT_BYTES)
    model = build_model(spec)
    state = conform_state_dict(read_state_dict(path, limit), model)
    model.load_state_dict(state, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------------------------------- writing

def sha256_file(path: PathLike, chunk_size: int = 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: nn.Module, path: PathLike, spec: ModelSpec | None = None,
               metadata: dict | None = None) -> str:
    """Write the model's state_dict as safetensors, atomically (temp file in the same folder, fsync, rename), with
    the spec JSON under metadata "nba_spec" and `metadata` (non-string values JSON-encoded). Returns the sha256
    hex digest of the written file."""
    from safetensors.torch import save

    # Own, contiguous CPU copies: safetensors refuses shared or strided storage (e.g. channels_last on CUDA).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    if spec is not None:
        meta[SPEC_METADATA_KEY] = spec.to_json()
    data = save(tensors, metadata=meta or None)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)
    return hashlib.sha256(data).hexdigest()


def _unlink_quietly(path: PathLike) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    # Makes the rename itself durable; not possible on every platform, hence best effort.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint_metadata(path: PathLike) -> dict[str, str]:
    """The safetensors "__metadata__" of `path` (empty if none), e.g. {"nba_spec": "<spec JSON>"}."""
    path = Path(path)
    with open(path, "rb") as f:
        header = check_safetensors_header(f, path.stat().st_size)
    return header.get("__metadata__", {})
