"""Cheap, torch-free checks on uploads: format sniffing on the first bytes while streaming, and header/archive
validation of the stored object afterwards. Full validation (loading tensors, decoding images) is the worker's.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from app.core.storage import ArtifactStore, LocalStore
from nba_core.errors import NBAError

UNSUPPORTED_FORMAT = "unsupported_format"
MODEL_SNIFF_BYTES = 16
DATASET_SNIFF_BYTES = 4096  # npz needs the first member's name, tar its 512-byte header

# sniff result → artifact format column
_MODEL_FORMATS = {"safetensors": "safetensors", "pt-zip": "pt"}
_DATASET_FORMATS = {"npz": "npz", "zip": "zip", "tar": "tar"}


def sniff_model(head: bytes) -> str:
    from nba_core.safetensors_header import sniff_checkpoint_format

    kind = sniff_checkpoint_format(head)
    if kind == "pt-legacy":
        raise NBAError(UNSUPPORTED_FORMAT, "legacy pickle checkpoints are not accepted (unpickling is unsafe); "
                       "upload safetensors or a torch.save zip-format state_dict", http_status=415)
    if kind not in _MODEL_FORMATS:
        raise NBAError(UNSUPPORTED_FORMAT, "the model file is neither safetensors nor a PyTorch zip checkpoint",
                       http_status=415)
    return _MODEL_FORMATS[kind]


def sniff_dataset(head: bytes) -> str:
    from nba_core.data.formats import sniff_dataset_format

    kind = sniff_dataset_format(head)
    if kind not in _DATASET_FORMATS:
        raise NBAError(UNSUPPORTED_FORMAT, "the dataset file is not .npz, .zip or .tar", http_status=415)
    return _DATASET_FORMATS[kind]


def _model_byte_limit(spec: Any) -> int:
    """What a checkpoint for this spec may hold (its parameter estimate, fp64), or 8 GiB without an estimate."""
    from nba_core.arch_budget import estimate
    from nba_core.safetensors_header import max_checkpoint_bytes

    sizes = None
    if spec is not None:
        sizes = estimate(spec.arch, spec.arch_params, in_channels=spec.in_channels, num_classes=spec.num_classes,
                         input_size=spec.input_size)
    return max_checkpoint_bytes(sizes[0] if sizes else None, 8 * 1024**3)


def check_model_object(store: ArtifactStore, key: str, fmt: str, size: int, spec: Any = None) -> dict[str, Any]:
    """Validate a stored safetensors header (bounded read; raises NBAError checkpoint_*), or a PyTorch zip's
    directory (member count, inflated size against the spec's parameter budget and the file size); the zip's
    tensors themselves are checked by the worker's weights-only loader."""
    from nba_core.errors import CHECKPOINT_TOO_LARGE

    limit = _model_byte_limit(spec)
    if fmt == "pt":
        from nba_core.safetensors_header import check_pt_zip

        if isinstance(store, LocalStore):
            return {"inflated_bytes": check_pt_zip(str(store.path_for(key)), size, limit)}
        with tempfile.TemporaryDirectory(prefix="nba-check-") as tmp:
            path = os.path.join(tmp, "model")
            store.fetch_to_path(key, path)
            return {"inflated_bytes": check_pt_zip(path, size, limit)}
    if fmt != "safetensors":
        return {}
    if size > limit:
        raise NBAError(CHECKPOINT_TOO_LARGE, f"the checkpoint is {size:,} bytes (limit {limit:,} for this spec)")
    from nba_core.safetensors_header import check_safetensors_header

    with store.open_read(key) as f:
        header = check_safetensors_header(f, size)
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    numel = 0
    for info in tensors.values():
        n = 1
        for d in info["shape"]:
            n *= d
        numel += n
    return {"tensors": len(tensors), "parameters": numel}


def check_dataset_object(store: ArtifactStore, key: str, limits: Any = None) -> dict[str, Any]:
    """Validate archive headers (no decoding). Needs a local path: S3 objects are fetched to a temp file."""
    from nba_core.data.formats import check_dataset_file

    kwargs = {} if limits is None else {"limits": limits}
    if isinstance(store, LocalStore):
        info = check_dataset_file(str(store.path_for(key)), **kwargs)
    else:
        with tempfile.TemporaryDirectory(prefix="nba-check-") as tmp:
            path = os.path.join(tmp, "dataset")
            store.fetch_to_path(key, path)
            info = check_dataset_file(path, **kwargs)
    return dict(info or {})
