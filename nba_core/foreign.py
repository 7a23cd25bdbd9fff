"""Recognise checkpoint layouts we do not build (torchvision, timm, a bare Hugging Face state_dict, whole-module
pickles) from their tensor names, so that the error says what the file is and what to do instead.

timm is not supported: it requires torchvision, which has no CPU wheel for the pinned torch here (it would pull the
5.5 GB CUDA build), and its `create_model` builds from a name with pretrained-weight hooks that we would have to
fence off; a timm model is cleaned through the Python API (`nba_core.sanitize_module`), or re-saved as a Hugging
Face folder when transformers has the same architecture.
"""

from __future__ import annotations

import re

PYTHON_API = ("or load the model in Python and call nba_core.sanitize_module(model, data, ...), which takes any "
              "nn.Module")
WHOLE_MODULE_HINT = ("a whole-module pickle (torch.save(model)) would run code when loaded, so it is refused: save "
                     "model.state_dict() (safetensors preferred), use model.save_pretrained(folder) for a Hugging "
                     f"Face model, {PYTHON_API}")

_LAYOUTS: list[tuple[str, list[str], str]] = [
    ("a Hugging Face transformers state_dict", [r"^(resnet|vit|deit|swin|convnext|regnet|mobilenet_v2|efficientnet)\."
                                                r"(embedder|embeddings|encoder|layers)\."],
     "upload the whole save_pretrained folder as a zip (config.json + model.safetensors) with no spec"),
    ("a timm model", [r"^stem\.\d", r"^stages\.\d+\.blocks\.", r"^blocks\.\d+\.attn\.qkv\.", r"^conv_stem\.weight$",
                      r"^patch_embed\.proj\.weight$", r"^head(\.fc)?\.weight$"],
     "timm is not supported (it needs torchvision, see nba_core/foreign.py); re-save it as a Hugging Face folder "
     f"if transformers has the architecture, {PYTHON_API}"),
    ("a torchvision ResNet", [r"^conv1\.weight$", r"^bn1\.", r"^layer[1-4]\.\d+\.conv1\.weight$", r"^fc\.weight$"],
     "torchvision models are not built by the service: export it through transformers (ResNetConfig + "
     f"save_pretrained) or {PYTHON_API}"),
    ("a torchvision VGG / MobileNet / EfficientNet", [r"^features\.\d+(\.\d+)*\.weight$", r"^classifier\.\d+\.weight$"],
     f"torchvision models are not built by the service: {PYTHON_API}"),
]


def describe_foreign_layout(keys: list[str]) -> str | None:
    """'looks like X: do Y' when the tensor names match two of a known foreign layout's patterns."""
    keys = [k[4:] if k.startswith("net.") else k for k in keys]  # as mapped onto a SpecModel's names
    for name, patterns, advice in _LAYOUTS:
        hits = sum(any(re.search(p, k) for k in keys) for p in patterns)
        if hits >= min(2, len(patterns)):
            return f"the file looks like {name}: {advice}"
    return None
