"""Device choice, seeding and the GPU fast paths (bf16 autocast, channels_last), from one code path."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def pick_device(name: str | None = "auto") -> torch.device:
    """'auto' picks CUDA when available. CUDA is first touched here, so call it in the worker child only."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a CPU generator for explicit, repeatable sampling."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if os.environ.get("NBA_DETERMINISTIC", "1") == "1":
        torch.use_deterministic_algorithms(True, warn_only=True)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def autocast(device: torch.device):
    """bf16 autocast on CUDA (tensor cores); plain fp32 on CPU, where bf16 is slower for these small nets."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def to_device(x: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a whole (small) array to the device once, so training loops never go back to host memory."""
    t = torch.as_tensor(x)
    t = t.to(device, non_blocking=True)
    if device.type == "cuda" and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t
