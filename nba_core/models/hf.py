"""Hugging Face image classifiers as NBA models: built by `transformers` from a checked config, never from code
shipped with the model, wrapped so that they take pixels in [0, 1] and name their behaviour layers.

Behaviour layers come from the model itself: one probe forward with `output_hidden_states=True` records which
module produced each hidden state (the outermost module whose output *is* that tensor), so the stage outputs
the model exposes become the layers the defenses read -- no per-architecture table. CNNs use every stage; a
transformer with L blocks uses the blocks at L/3, 2L/3 and L (NAD's three groups; all blocks would multiply the
distillation cost without adding a different level of behaviour). `layers=` overrides the choice.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import NBAError
from ..hf_config import HF_MODEL_TOO_LARGE, HFConfigInfo, MAX_PARAMETERS, Preprocessing, check_hf_config, \
    parse_preprocessor, IMAGENET_STANDARD, ADAMW_MODEL_TYPES
from ..hf_io import CONFIG_NAME, PREPROCESSOR_NAME, WEIGHTS_NAME, check_hf_folder, replace_folder, unpack_hf_zip
from ..spec import ModelSpec
from .base import Normalize


class HFImageClassifier(nn.Module):
    """(x - mean) / std, then the transformers model; returns logits. `behavior_layers` are module names."""

    def __init__(self, hf_model: nn.Module, mean, std, behavior_layers: tuple[str, ...]):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.hf = hf_model
        self.behavior_layers = tuple(behavior_layers)
        # Transformer families fine-tune with AdamW, not the CNN recipes' SGD (train.recipe_for).
        self.adamw_recipe = getattr(hf_model.config, "model_type", None) in ADAMW_MODEL_TYPES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=self.normalize(x), return_dict=True).logits


def model_class(model_type: str):
    """The transformers class for image classification of `model_type` (its own modelling code)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES

    names = MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES[model_type]
    name = names[0] if isinstance(names, (tuple, list)) else names  # deit: the head without distillation token
    return getattr(transformers, name)


def hf_config_object(info: HFConfigInfo):
    from transformers import CONFIG_MAPPING

    raw = {k: v for k, v in info.config.items() if k not in ("transformers_version", "architectures")}
    raw.pop("model_type", None)
    config = CONFIG_MAPPING[info.model_type](**raw)
    # Plain (eager) attention: the fused SDPA kernels have no double backward, which I-BAU's hypergradient and
    # NBA's trigger search through the student need; the cost is speed, only for transformers.
    config._attn_implementation = "eager"
    return config


def count_parameters_meta(info: HFConfigInfo) -> int:
    """Exact parameter count, from a build on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = model_class(info.model_type)(hf_config_object(info))
    return sum(p.numel() for p in model.parameters())


def build_hf_model(info: HFConfigInfo, max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """Count on the meta device first; build for real (random weights, eval mode) only when within the bound."""
    n = count_parameters_meta(info)
    if n > max_parameters:
        raise NBAError(HF_MODEL_TOO_LARGE, f"the config builds {n} parameters; at most {max_parameters}",
                       http_status=413)
    return model_class(info.model_type)(hf_config_object(info)).eval()


def load_hf_weights(folder: Path, info: HFConfigInfo, max_parameters: int = MAX_PARAMETERS) -> nn.Module:
    """Build the model from the checked config and load `model.safetensors` with transformers' own loader (it maps
    the key layouts save_pretrained writes, which differ from state_dict keys for some families), then insist on
    an exact match: missing, unexpected or mis-shaped tensors are errors here, not warnings."""
    from ..errors import (CHECKPOINT_MISSING_KEYS, CHECKPOINT_NONFINITE, CHECKPOINT_SHAPE_MISMATCH,
                          CHECKPOINT_UNEXPECTED_KEYS)

    n = count_parameters_meta(info)
    if n > max_parameters:
        raise NBAError(HF_MODEL_TOO_LARGE, f"the config builds {n} parameters; at most {max_parameters}",
                       http_status=413)
    cls = model_class(info.model_type)
    try:
        model, loading = cls.from_pretrained(folder, config=hf_config_object(info), local_files_only=True,
                                             use_safetensors=True, output_loading_info=True, dtype=torch.float32,
                                             attn_implementation="eager")
    except (OSError, ValueError, RuntimeError) as e:
        text = str(e)
        code = CHECKPOINT_SHAPE_MISMATCH if "mismatch" in text.lower() else "checkpoint_unreadable"
        raise NBAError(code, f"model.safetensors does not load into the model config.json describes: "
                       f"{text[:400]}") from None
    problems = [(CHECKPOINT_SHAPE_MISMATCH, "tensors with the wrong shape", loading.get("mismatched_keys")),
                (CHECKPOINT_MISSING_KEYS, "keys missing from model.safetensors", loading.get("missing_keys")),
                (CHECKPOINT_UNEXPECTED_KEYS, "keys in model.safetensors the config does not build",
                 loading.get("unexpected_keys"))]
    for code, what, keys in problems:
        if keys:
            keys = sorted(str(k) for k in keys)
            raise NBAError(code, f"{len(keys)} {what}: {', '.join(keys[:5])}"
                           f"{' ...' if len(keys) > 5 else ''} (does config.json belong to these weights?)")
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise NBAError(CHECKPOINT_NONFINITE, f"{bad[0]}: contains NaN or infinite values")
    return model.eval()


@torch.no_grad()
def discover_stage_modules(hf_model: nn.Module, in_channels: int, input_size: tuple[int, int]) -> list[str]:
    """Names of the modules whose outputs are the model's hidden states (embeddings excluded), in order."""
    outputs: list[tuple[str, Any]] = []
    handles = [m.register_forward_hook(lambda _m, _i, out, name=name: outputs.append((name, out)))
               for name, m in hf_model.named_modules() if name]
    was_training = hf_model.training
    hf_model.eval()
    try:
        result = hf_model(pixel_values=torch.zeros(1, in_channels, *input_size), output_hidden_states=True,
                          return_dict=True)
    finally:
        for h in handles:
            h.remove()
        hf_model.train(was_training)
    hidden = list(result.hidden_states or ())[1:]
    names: list[str] = []
    for h in hidden:
        owners = [name for name, out in outputs
                  if out is h or (isinstance(out, (tuple, list)) and len(out) and out[0] is h)]
        if owners:
            outermost = min(owners, key=lambda n: n.count("."))
            if outermost not in names:
                names.append(outermost)
    return names


def choose_behavior_layers(stages: list[str], kind: str) -> tuple[str, ...]:
    if kind == "transformer" and len(stages) > 3:
        n = len(stages)
        picks = sorted({max(0, round(n * k / 3) - 1) for k in (1, 2, 3)})
        return tuple(stages[i] for i in picks)
    return tuple(stages)


@dataclass
class HFModel:
    """A loaded HF model: the wrapper the defenses run on, and what is needed to write it back unchanged."""

    module: HFImageClassifier
    info: HFConfigInfo
    spec: ModelSpec  # input geometry / normalisation / classes, for the pipeline and the report
    preprocessing: Preprocessing
    source_folder: Path

    def describe(self) -> dict[str, Any]:
        return {"format": "hf", **self.info.summary(), "behavior_layers": list(self.module.behavior_layers),
                "preprocessing_source": self.preprocessing.source}


def _resolve_preprocessing(pre: Preprocessing, info: HFConfigInfo, input_size, mean, std) -> Preprocessing:
    c = info.num_channels
    size = tuple(input_size) if input_size else (info.image_size or pre.input_size)
    source = "given" if (input_size or mean or std) else pre.source
    m = tuple(mean) if mean else (pre.mean or (IMAGENET_STANDARD[0],) * c)
    s = tuple(std) if std else (pre.std or (IMAGENET_STANDARD[1],) * c)
    if info.image_size and size and tuple(size) != tuple(info.image_size):
        raise NBAError("hf_config_invalid", f"this {info.model_type} model takes {info.image_size} inputs "
                       f"(config.image_size); {tuple(size)} was asked for")
    return Preprocessing(tuple(size) if size else None, m, s, source)


def load_hf_model(path: str | os.PathLike, *, input_size: tuple[int, int] | None = None,
                  mean=None, std=None, layers: tuple[str, ...] | None = None,
                  default_input_size: tuple[int, int] | None = None, workdir: str | None = None) -> HFModel:
    """Load an HF model folder or zip (checked first: config, bounds, weights header), build it with transformers,
    load the weights strictly (keys and shapes must match exactly). `default_input_size` is used for a CNN whose
    size neither the preprocessor config nor the caller gives (e.g. the clean data's own size)."""
    path = Path(path)
    if path.is_dir():
        folder = path
    else:
        folder = Path(tempfile.mkdtemp(prefix="nba-hf-", dir=workdir))
        unpack_hf_zip(path, folder)
    pre_raw = (folder / PREPROCESSOR_NAME).read_bytes() if (folder / PREPROCESSOR_NAME).is_file() else None
    check = check_hf_folder(folder, input_size=input_size or default_input_size)
    info = check.info
    pre = parse_preprocessor(pre_raw, info.num_channels)
    pre = _resolve_preprocessing(pre, info, input_size, mean, std)
    if pre.input_size is None:
        pre = Preprocessing(tuple(default_input_size or (224, 224)), pre.mean, pre.std, pre.source)
    hf_model = load_hf_weights(folder, info)
    try:
        stages = discover_stage_modules(hf_model, info.num_channels, pre.input_size)
    except (RuntimeError, ValueError, IndexError) as e:  # a config transformers accepts but cannot run
        raise NBAError("hf_config_invalid", f"the model built from config.json fails on a "
                       f"{pre.input_size[0]}x{pre.input_size[1]} input: {str(e)[:300]}") from None
    chosen = tuple(layers) if layers else choose_behavior_layers(stages, info.kind)
    if not chosen:
        raise NBAError("hf_config_invalid", "the model exposes no hidden states to read behaviour from")
    known = {n for n, _ in hf_model.named_modules()}
    unknown = [n for n in chosen if n not in known]
    if unknown:
        raise NBAError("invalid_params", f"layers not in the model: {unknown}; stage outputs: {stages}")
    module = HFImageClassifier(hf_model, pre.mean, pre.std, tuple(f"hf.{n}" for n in chosen)).eval()
    spec = ModelSpec(arch=f"hf:{info.model_type}", num_classes=info.num_labels, in_channels=info.num_channels,
                     input_size=pre.input_size, mean=pre.mean, std=pre.std)
    return HFModel(module, info, spec, pre, folder)


def save_hf_model(model: HFModel, cleaned: nn.Module, out_folder: str | os.PathLike) -> dict[str, Any]:
    """Write the cleaned weights in the same HF layout as the input (transformers' save_pretrained, the original
    config.json and preprocessor_config.json byte for byte) into `out_folder`, atomically; the written tensor names
    and shapes are checked against the input file. Returns {"path", "sha256"} of the weights file."""
    from ..checkpoint import sha256_file

    out = Path(out_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf = copy.deepcopy(cleaned.hf if isinstance(cleaned, HFImageClassifier) else cleaned).to("cpu")
        hf.save_pretrained(tmp, safe_serialization=True)
        for extra in set(os.listdir(tmp)) - {WEIGHTS_NAME, CONFIG_NAME}:
            _remove(tmp / extra)
        shutil.copyfile(model.source_folder / CONFIG_NAME, tmp / CONFIG_NAME)
        if (model.source_folder / PREPROCESSOR_NAME).is_file():
            shutil.copyfile(model.source_folder / PREPROCESSOR_NAME, tmp / PREPROCESSOR_NAME)
        if _tensor_shapes(tmp / WEIGHTS_NAME) != _tensor_shapes(model.source_folder / WEIGHTS_NAME):
            raise RuntimeError("the cleaned model.safetensors does not have the input's tensor names and shapes")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": str(out), "sha256": sha256_file(out / WEIGHTS_NAME)}


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def _tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from ..safetensors_header import check_safetensors_header

    with open(path, "rb") as f:
        header = check_safetensors_header(f, path.stat().st_size)
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def new_hf_model(config: dict, *, seed: int = 0) -> nn.Module:
    """A freshly initialised model from a (checked) config dict: for `nba attack` and tests."""
    info = check_hf_config(json.dumps(config))
    torch.manual_seed(seed)
    return build_hf_model(info)


def adapt_config(config: dict, *, num_labels: int, num_channels: int, input_size: tuple[int, int]) -> dict:
    """A config for a dataset: its class count and channels; transformers also get its image size."""
    from ..hf_config import ALLOWED_MODEL_TYPES

    out = {k: v for k, v in config.items() if k not in ("id2label", "label2id")}
    out.update(num_labels=num_labels, num_channels=num_channels,
               id2label={str(i): f"class_{i}" for i in range(num_labels)},
               label2id={f"class_{i}": i for i in range(num_labels)})
    if ALLOWED_MODEL_TYPES.get(out.get("model_type"), ("", ""))[0] == "transformer":
        out["image_size"] = list(input_size) if input_size[0] != input_size[1] else input_size[0]
    return out


def new_hf_classifier(config: dict, spec: ModelSpec) -> HFImageClassifier:
    """A freshly initialised wrapped model (pixels in [0, 1] -> logits) for `spec`'s geometry: for `nba attack`."""
    info = check_hf_config(json.dumps(config), input_size=spec.input_size)
    hf_model = build_hf_model(info)
    stages = discover_stage_modules(hf_model, info.num_channels, spec.input_size)
    layers = choose_behavior_layers(stages, info.kind)
    return HFImageClassifier(hf_model, spec.mean, spec.std, tuple(f"hf.{n}" for n in layers))


def preprocessor_config(spec: ModelSpec) -> dict:
    """What an image processor for this model would save: resize to the input size, scale to [0, 1], normalise."""
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": spec.input_size[0], "width": spec.input_size[1]}, "resample": 2,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(spec.mean), "image_std": list(spec.std)}


def write_hf_folder(module: HFImageClassifier, spec: ModelSpec, out_folder: str | os.PathLike) -> Path:
    """save_pretrained (config.json + model.safetensors) plus preprocessor_config.json, atomically."""
    out = Path(out_folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        module.hf.to("cpu").save_pretrained(tmp, safe_serialization=True)
        (tmp / PREPROCESSOR_NAME).write_text(json.dumps(preprocessor_config(spec), indent=2) + "\n")
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
