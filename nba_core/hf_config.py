"""Hugging Face image-classifier configs, checked without torch and without building anything.

A Hugging Face model is a folder written by `save_pretrained`: `config.json`, `model.safetensors` and optionally
`preprocessor_config.json`. Before anything is built we (1) parse the two JSON files under size caps, (2) refuse
configs that would run code (`auto_map`, `trust_remote_code`) or name a `model_type` outside the allow-list,
(3) bound the number of labels, channels and the input size, and (4) estimate the parameter count and the
activation size per image from the config's width/depth fields, so an absurd config is refused with a 4xx
instead of an out-of-memory worker. The API calls this module (it never imports torch); the library repeats the
parameter bound exactly by building the model on the `meta` device (no memory) before building it for real.

Allow-list (why these): the standard image-classification families of `transformers` whose modelling code is
plain convolutions / attention with a fixed input geometry and whose `output_hidden_states` exposes the stage
outputs the defenses read -- ResNet, RegNet, ConvNeXt, MobileNetV2, EfficientNet (CNNs) and ViT, DeiT, Swin
(transformers). Other types may well work but have not been tested here; they are refused rather than guessed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import NBAError

HF_CONFIG_INVALID = "hf_config_invalid"  # not JSON, not an object, too large, missing/ill-typed fields
HF_REMOTE_CODE = "hf_remote_code_refused"  # auto_map / trust_remote_code: the config asks to run its own code
HF_UNSUPPORTED_MODEL_TYPE = "hf_unsupported_model_type"
HF_MODEL_TOO_LARGE = "hf_model_too_large"  # parameter count or activation size above the bounds
HF_PREPROCESSOR_INVALID = "hf_preprocessor_invalid"
DEFENSE_NOT_APPLICABLE = "defense_not_applicable"  # decided from the config, at job creation

MAX_CONFIG_BYTES = 256 * 1024  # id2label for 1000 classes is ~30 KB
MAX_PREPROCESSOR_BYTES = 64 * 1024
MAX_LABELS = 1000  # the defenses need clean samples of every class and scan every class for a trigger
MAX_PARAMETERS = 500_000_000  # NBA holds suspect + teacher + student (+ gradients, momentum): ~5 copies
MAX_ACTIVATION_BYTES_PER_IMAGE = 1 << 30  # fp32, forward tensors kept for the backward pass
MIN_INPUT, MAX_INPUT = 4, 512  # pixels, the same bounds as a ModelSpec

#: model_type -> (kind, normalisation layers). ANP needs BatchNorm; "kind" says what the stage outputs look like.
ALLOWED_MODEL_TYPES: dict[str, tuple[str, str]] = {
    "resnet": ("cnn", "batchnorm"),
    "regnet": ("cnn", "batchnorm"),
    "convnext": ("cnn", "layernorm"),
    "mobilenet_v2": ("cnn", "batchnorm"),
    "efficientnet": ("cnn", "batchnorm"),
    "vit": ("transformer", "layernorm"),
    "deit": ("transformer", "layernorm"),
    "swin": ("transformer", "layernorm"),
}

# Model types that train, and fine-tune, with AdamW rather than SGD (train.recipe_for; experiment's training recipe).
ADAMW_MODEL_TYPES = frozenset({"vit", "deit", "swin", "swinv2", "beit", "dinov2", "convnext", "convnextv2"})

IMAGENET_STANDARD = (0.5, 0.5)  # transformers' default image_mean / image_std when a processor gives none


@dataclass(frozen=True)
class HFConfigInfo:
    """What the service and the library need to know about an HF config before building it."""

    model_type: str
    kind: str
    norm: str
    num_labels: int
    num_channels: int
    image_size: tuple[int, int] | None  # fixed by the architecture (ViT/DeiT/Swin position embeddings) or None
    estimated_parameters: int
    estimated_activation_bytes: int  # per image, at `estimate_size`
    estimate_size: tuple[int, int]
    config: dict = field(repr=False, compare=False, default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"model_type": self.model_type, "kind": self.kind, "norm": self.norm, "num_labels": self.num_labels,
                "num_channels": self.num_channels, "image_size": self.image_size,
                "estimated_parameters": self.estimated_parameters,
                "estimated_activation_bytes_per_image": self.estimated_activation_bytes}


def _load_json_object(raw: bytes | str, *, limit: int, what: str, code: str) -> dict:
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if len(raw) > limit:
        raise NBAError(code, f"{what} is larger than {limit} bytes ({len(raw)})", http_status=413)
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise NBAError(code, f"{what} is not UTF-8 JSON: {e}") from None
    if not isinstance(value, dict):
        raise NBAError(code, f"{what} must be a JSON object")
    return value


def _int(cfg: dict, key: str, default: int | None = None, *, low: int = 1, high: int = 1 << 20) -> int:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise NBAError(HF_CONFIG_INVALID, f"config.{key} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise NBAError(HF_MODEL_TOO_LARGE if value > high else HF_CONFIG_INVALID,
                       f"config.{key} = {value} is outside [{low}, {high}]")
    return int(value)


def _num(cfg: dict, key: str, default: float, *, low: float = 0.0, high: float = 64.0) -> float:
    value = cfg.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise NBAError(HF_CONFIG_INVALID, f"config.{key} must be a number, got {value!r}")
    if not low <= value <= high:
        raise NBAError(HF_MODEL_TOO_LARGE if value > high else HF_CONFIG_INVALID,
                       f"config.{key} = {value} is outside [{low}, {high}]")
    return float(value)


def _ints(cfg: dict, key: str, default: list[int], *, high: int = 1 << 20, max_len: int = 16) -> list[int]:
    value = cfg.get(key, default)
    if not isinstance(value, list) or not 1 <= len(value) <= max_len:
        raise NBAError(HF_CONFIG_INVALID, f"config.{key} must be a list of 1..{max_len} integers")
    return [_int({key: v}, key, high=high) for v in value]


def _pair(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        h, w = (_int({key: v}, key, high=1 << 16) for v in value)
    else:
        h = w = _int({key: value}, key, high=1 << 16)
    if not (MIN_INPUT <= h <= MAX_INPUT and MIN_INPUT <= w <= MAX_INPUT):
        raise NBAError(HF_MODEL_TOO_LARGE if max(h, w) > MAX_INPUT else HF_CONFIG_INVALID,
                       f"config.{key} = {value!r}: input sides must be between {MIN_INPUT} and {MAX_INPUT} pixels")
    return h, w


def _num_labels(cfg: dict) -> int:
    id2label = cfg.get("id2label")
    if id2label is not None and not isinstance(id2label, dict):
        raise NBAError(HF_CONFIG_INVALID, "config.id2label must be an object")
    n = len(id2label) if id2label else cfg.get("num_labels", 2)
    if isinstance(n, bool) or not isinstance(n, int):
        raise NBAError(HF_CONFIG_INVALID, f"config.num_labels must be an integer, got {n!r}")
    if "num_labels" in cfg and id2label and cfg["num_labels"] != len(id2label):
        raise NBAError(HF_CONFIG_INVALID, f"config.num_labels ({cfg['num_labels']}) disagrees with id2label "
                       f"({len(id2label)} entries)")
    if not 2 <= n <= MAX_LABELS:
        raise NBAError(HF_MODEL_TOO_LARGE if n > MAX_LABELS else HF_CONFIG_INVALID,
                       f"num_labels = {n}: between 2 and {MAX_LABELS} classes are supported")
    return n


# ---- per-family estimates (fp32 elements). Within a factor ~1.5 of the built model (tests compare them with a
# meta-device build); they only have to separate real models from absurd configs.

def _cnn_activations(widths: list[int], depths: list[int], size: tuple[int, int], first_stride: int,
                     per_block: float) -> float:
    pixels = size[0] * size[1]
    total = 0.0
    for i, (w, d) in enumerate(zip(widths, depths)):
        total += per_block * d * w * pixels / (first_stride * 2**i) ** 2
    return total


def _estimate_resnet(cfg: dict, c: int, labels: int, size) -> tuple[float, float]:
    emb = _int(cfg, "embedding_size", 64)
    widths = _ints(cfg, "hidden_sizes", [256, 512, 1024, 2048])
    depths = _ints(cfg, "depths", [3, 4, 6, 3], high=1024)
    bottleneck = cfg.get("layer_type", "bottleneck") == "bottleneck"
    params, cin = 49.0 * c * emb, emb
    for w, d in zip(widths, depths):
        for _ in range(d):
            if bottleneck:
                params += cin * w / 4 + 9 * (w / 4) ** 2 + w / 4 * w
            else:
                params += 9 * cin * w + 9 * w * w
            params += cin * w if cin != w else 0
            cin = w
    return params + cin * labels, _cnn_activations(widths, depths, size, 4, 8 if bottleneck else 6)


def _estimate_regnet(cfg: dict, c: int, labels: int, size) -> tuple[float, float]:
    emb = _int(cfg, "embedding_size", 32)
    widths = _ints(cfg, "hidden_sizes", [128, 192, 512, 1088])
    depths = _ints(cfg, "depths", [2, 6, 12, 2], high=1024)
    group = _int(cfg, "groups_width", 64)
    params, cin = 9.0 * c * emb, emb
    for w, d in zip(widths, depths):
        for _ in range(d):
            params += cin * w + 9 * w * min(group, w) + w * w + 0.5 * cin * w + (cin * w if cin != w else 0)
            cin = w
    return params + cin * labels, _cnn_activations(widths, depths, size, 4, 8)


def _estimate_convnext(cfg: dict, c: int, labels: int, size) -> tuple[float, float]:
    patch = _int(cfg, "patch_size", 4, high=64)
    widths = _ints(cfg, "hidden_sizes", [96, 192, 384, 768])
    depths = _ints(cfg, "depths", [3, 3, 9, 3], high=1024)
    params, cin = float(patch * patch * c * widths[0]), widths[0]
    for w, d in zip(widths, depths):
        params += 4 * cin * w if cin != w else 0
        params += d * (49 * w + 8 * w * w)
        cin = w
    return params + cin * labels, _cnn_activations(widths, depths, size, patch, 12)


def _estimate_mobilenet_v2(cfg: dict, c: int, labels: int, size) -> tuple[float, float]:
    dm = _num(cfg, "depth_multiplier", 1.0, low=0.01, high=16)
    expand = _num(cfg, "expand_ratio", 6.0, low=1.0, high=64)
    scale = max(dm, 1.0)  # the last 1x1 conv keeps 1280 channels below multiplier 1
    params = 2.2e6 * dm * dm * expand / 6 + 1280 * scale * (labels + 320 * dm)
    acts = 3.0 * 32 * dm * expand * size[0] * size[1] / 4 * 6
    return params, acts


def _estimate_efficientnet(cfg: dict, c: int, labels: int, size) -> tuple[float, float]:
    wc = _num(cfg, "width_coefficient", 2.0, low=0.01, high=16)
    dc = _num(cfg, "depth_coefficient", 3.1, low=0.01, high=16)
    ins = _ints(cfg, "in_channels", [32, 16, 24, 40, 80, 112, 192], max_len=32)
    outs = _ints(cfg, "out_channels", [16, 24, 40, 80, 112, 192, 320], max_len=32)
    kernels = _ints(cfg, "kernel_sizes", [3, 3, 5, 3, 5, 5, 3], high=31, max_len=32)
    reps = _ints(cfg, "num_block_repeats", [1, 2, 2, 3, 3, 4, 1], high=1024, max_len=32)
    strides = _ints(cfg, "strides", [1, 2, 2, 2, 1, 2, 1], high=8, max_len=32)
    expands = _ints(cfg, "expand_ratios", [1, 6, 6, 6, 6, 6, 6], high=64, max_len=32)
    hidden = _int(cfg, "hidden_dim", 2560)

    def rf(x: int) -> int:
        return max(8, int(x * wc + 4) // 8 * 8)

    params, acts, stride = 9.0 * c * rf(32), 0.0, 2
    pixels = size[0] * size[1]
    for cin, cout, k, r, s, e in zip(ins, outs, kernels, reps, strides, expands):
        cin, cout = rf(cin), rf(cout)
        for j in range(int(math.ceil(dc * r))):
            hid = cin * e
            params += cin * hid * (e != 1) + k * k * hid + hid * cout + 0.5 * hid * cin
            stride *= s if j == 0 else 1
            acts += 4 * hid * pixels / stride**2
            cin = cout
    return params + cin * hidden + hidden * labels, acts


def _estimate_vit(cfg: dict, c: int, labels: int, size) -> tuple[float, float]:
    d = _int(cfg, "hidden_size", 768)
    layers = _int(cfg, "num_hidden_layers", 12, high=1024)
    inter = _int(cfg, "intermediate_size", 3072)
    heads = _int(cfg, "num_attention_heads", 12, high=4096)
    patch = _int(cfg, "patch_size", 16, high=512)
    tokens = (size[0] // patch) * (size[1] // patch) + 2
    params = patch * patch * c * d + tokens * d + layers * (4 * d * d + 2 * d * inter) + 2 * d * labels
    acts = layers * (tokens * (8 * d + 2 * inter) + 2 * heads * tokens * tokens)
    return float(params), float(acts)


def _estimate_swin(cfg: dict, c: int, labels: int, size) -> tuple[float, float]:
    emb = _int(cfg, "embed_dim", 96)
    depths = _ints(cfg, "depths", [2, 2, 6, 2], high=1024)
    heads = _ints(cfg, "num_heads", [3, 6, 12, 24], high=4096)
    patch = _int(cfg, "patch_size", 4, high=512)
    window = _int(cfg, "window_size", 7, high=512)
    mlp = _num(cfg, "mlp_ratio", 4.0, low=0.01, high=64)
    params, acts = float(patch * patch * c * emb), 0.0
    tokens = (size[0] // patch) * (size[1] // patch)
    for i, (depth, h) in enumerate(zip(depths, heads)):
        dim = emb * 2**i
        params += depth * (4 * dim * dim + 2 * mlp * dim * dim) + (8 * dim * dim if i + 1 < len(depths) else 0)
        acts += depth * (tokens * (8 * dim + 2 * mlp * dim) + 2 * h * tokens * window * window)
        tokens = max(1, tokens // 4)
    return params + emb * 2 ** (len(depths) - 1) * labels, acts


_ESTIMATORS = {"resnet": _estimate_resnet, "regnet": _estimate_regnet, "convnext": _estimate_convnext,
               "mobilenet_v2": _estimate_mobilenet_v2, "efficientnet": _estimate_efficientnet,
               "vit": _estimate_vit, "deit": _estimate_vit, "swin": _estimate_swin}


def check_hf_config(raw: bytes | str | dict, *, input_size: tuple[int, int] | None = None,
                    max_parameters: int = MAX_PARAMETERS,
                    max_activation_bytes: int = MAX_ACTIVATION_BYTES_PER_IMAGE) -> HFConfigInfo:
    """Validate a `config.json` (bytes, text or parsed) and return what it describes; NBAError with an hf_* code
    otherwise. `input_size` is the size the model will be run at when the config does not fix one."""
    cfg = raw if isinstance(raw, dict) else _load_json_object(raw, limit=MAX_CONFIG_BYTES, what="config.json",
                                                               code=HF_CONFIG_INVALID)
    if "auto_map" in cfg or cfg.get("trust_remote_code") is not None or "custom_pipelines" in cfg:
        raise NBAError(HF_REMOTE_CODE, "config.json asks for custom code (auto_map / trust_remote_code); only the "
                       "architectures built into transformers are accepted and no code from a model is ever run")
    model_type = cfg.get("model_type")
    if model_type not in ALLOWED_MODEL_TYPES:
        raise NBAError(HF_UNSUPPORTED_MODEL_TYPE, f"model_type {model_type!r} is not supported; supported: "
                       f"{', '.join(ALLOWED_MODEL_TYPES)}")
    kind, norm = ALLOWED_MODEL_TYPES[model_type]
    labels = _num_labels(cfg)
    channels = _int(cfg, "num_channels", 3, high=4)
    fixed = _pair(cfg["image_size"], "image_size") if kind == "transformer" and "image_size" in cfg else None
    if kind == "transformer" and fixed is None:
        fixed = _pair(224, "image_size")
    size = fixed or input_size or (224, 224)
    params, acts = _ESTIMATORS[model_type](cfg, channels, labels, size)
    acts_bytes = int(4 * acts)
    if params > max_parameters:
        raise NBAError(HF_MODEL_TOO_LARGE, f"the config describes ~{params / 1e6:.0f}M parameters; at most "
                       f"{max_parameters / 1e6:.0f}M are accepted", http_status=413)
    if acts_bytes > max_activation_bytes:
        raise NBAError(HF_MODEL_TOO_LARGE, f"the config needs ~{acts_bytes / 2**20:.0f} MiB of activations per "
                       f"image at {size[0]}x{size[1]}; at most {max_activation_bytes / 2**20:.0f} MiB are accepted",
                       http_status=413)
    return HFConfigInfo(model_type=model_type, kind=kind, norm=norm, num_labels=labels, num_channels=channels,
                        image_size=fixed, estimated_parameters=int(params), estimated_activation_bytes=acts_bytes,
                        estimate_size=tuple(size), config=cfg)


@dataclass(frozen=True)
class Preprocessing:
    """Input geometry and normalisation: pixels in [0, 1] are resized to `input_size`, then (x - mean) / std."""

    input_size: tuple[int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    source: str  # "preprocessor_config.json", "config", "given" or "default"


def parse_preprocessor(raw: bytes | str | dict | None, channels: int) -> Preprocessing:
    """Read size / crop_size / image_mean / image_std from a `preprocessor_config.json` (None: nothing known)."""
    if raw is None:
        return Preprocessing(None, None, None, "default")
    cfg = raw if isinstance(raw, dict) else _load_json_object(raw, limit=MAX_PREPROCESSOR_BYTES,
                                                               what="preprocessor_config.json",
                                                               code=HF_PREPROCESSOR_INVALID)
    size = None
    try:
        chosen = cfg.get("crop_size") if cfg.get("do_center_crop") and cfg.get("crop_size") else cfg.get("size")
        if isinstance(chosen, dict):
            if "height" in chosen and "width" in chosen:
                size = _pair([chosen["height"], chosen["width"]], "size")
            elif "shortest_edge" in chosen:
                size = _pair(chosen["shortest_edge"], "size")
        elif chosen is not None:
            size = _pair(chosen, "size")
    except NBAError as e:
        raise NBAError(HF_PREPROCESSOR_INVALID, e.message) from None
    mean = std = None
    if cfg.get("do_normalize", True):
        mean, std = _per_channel(cfg.get("image_mean", IMAGENET_STANDARD[0]), channels, "image_mean"), \
            _per_channel(cfg.get("image_std", IMAGENET_STANDARD[1]), channels, "image_std")
        if any(s <= 0 for s in std):
            raise NBAError(HF_PREPROCESSOR_INVALID, "image_std entries must be positive")
    else:
        mean, std = (0.0,) * channels, (1.0,) * channels
    return Preprocessing(size, mean, std, "preprocessor_config.json")


def _per_channel(value: Any, channels: int, key: str) -> tuple[float, ...]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = [value] * channels
    if (not isinstance(value, list) or len(value) != channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)):
        raise NBAError(HF_PREPROCESSOR_INVALID, f"{key} must be {channels} finite numbers, got {value!r}")
    return tuple(float(v) for v in value)


def applicable_methods(info: HFConfigInfo | dict) -> dict[str, str | None]:
    """method -> None when it applies to this model, else the reason it does not (decided from the config).

    ANP learns masks over BatchNorm neurons; LayerNorm models (ViT, DeiT, Swin, ConvNeXt) have none, and masking
    LayerNorm gains is a different method, not ANP. FP bakes pruned channels into the BatchNorm/conv/linear that
    consumes the last stage; in ConvNeXt, ViT, DeiT and Swin that consumer is a LayerNorm, whose output mixes all
    channels, so a pruned channel cannot be expressed in the same weights."""
    norm = info.norm if isinstance(info, HFConfigInfo) else info.get("norm")
    model_type = info.model_type if isinstance(info, HFConfigInfo) else info.get("model_type")
    # SAU and FT-SAM perturb inputs and weights of any differentiable classifier; the verdict (scan) only scans
    # inputs and reads logits: all three apply to every family.
    out: dict[str, str | None] = {m: None for m in ("ft", "fp", "nad", "anp", "ibau", "nba", "sau", "ftsam", "scan")}
    if norm != "batchnorm":
        out["anp"] = f"ANP masks BatchNorm neurons; a {model_type} model normalises with LayerNorm"
    if model_type not in ("resnet", "regnet", "mobilenet_v2", "efficientnet"):
        out["fp"] = (f"fine-pruning cannot write pruned channels back into a {model_type} model: its last stage "
                     "feeds a LayerNorm")
    return out


def check_method_applies(method: str, info: HFConfigInfo | dict) -> None:
    reason = applicable_methods(info).get(method)
    if reason:
        raise NBAError(DEFENSE_NOT_APPLICABLE, f"{method} does not apply to this model: {reason}")
