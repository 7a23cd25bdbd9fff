"""Metrics with a known trigger: clean accuracy, attack success rate, robust accuracy, DER."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .train import predict


def clean_accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Share of clean images classified correctly."""
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x).cpu().numpy() == y).mean())


def attack_success_rate(model: nn.Module, x_triggered: np.ndarray, y_true: np.ndarray, target: int) -> float:
    """Share of triggered non-target images classified as the target (images whose true class is the target
    are excluded, so a caller may pass an unfiltered set)."""
    keep = y_true != target
    if not keep.any():
        return float("nan")
    pred = predict(model, x_triggered[keep]).cpu().numpy()
    return float((pred == target).mean())


def robust_accuracy(model: nn.Module, x_triggered: np.ndarray, y_true: np.ndarray, target: int) -> float:
    """Share of triggered non-target images still classified as their true class."""
    keep = y_true != target
    if not keep.any():
        return float("nan")
    pred = predict(model, x_triggered[keep]).cpu().numpy()
    return float((pred == y_true[keep]).mean())


def defense_effectiveness_rating(ca_before: float, asr_before: float, ca_after: float, asr_after: float) -> float:
    """DER = (max(0, ΔASR) - max(0, ΔCA) + 1) / 2, all as fractions; 1 is perfect, 0.5 is 'did nothing'."""
    return (max(0.0, asr_before - asr_after) - max(0.0, ca_before - ca_after) + 1.0) / 2.0


@torch.no_grad()
def evaluate_with_trigger(model: nn.Module, clean_x, clean_y, trig_x, trig_y, target: int) -> dict:
    return {
        "clean_accuracy": clean_accuracy(model, clean_x, clean_y),
        "attack_success_rate": attack_success_rate(model, trig_x, trig_y, target),
        "robust_accuracy": robust_accuracy(model, trig_x, trig_y, target),
    }
