"""The one place that says which `params` each defense accepts: name, type and sane range (torch-free).

Both sides use it: the API checks a job's params here at `POST /v1/jobs` (422 invalid_params before anything is
queued: unknown keys, wrong types, NaN/Infinity, out-of-range values like epochs=10^6), and `Defense.make_config`
applies the same table before building its Config, so the CLI and the worker refuse exactly the same values.
tests/core/test_method_params.py keeps the table in sync with every defense's Config dataclass (same fields,
same types, defaults inside the bounds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .errors import INVALID_PARAMS, NBAError


@dataclass(frozen=True)
class Param:
    kind: type  # int, float, bool, str or tuple (a list of numbers)
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None  # str: allowed values
    items: tuple[str, ...] | None = None  # str: a comma-separated subset of these
    max_len: int = 256  # str length / tuple length

    def check(self, method: str, name: str, value: Any) -> Any:
        where = f"{method}.{name}"
        if self.kind is bool:
            if not isinstance(value, bool):
                raise NBAError(INVALID_PARAMS, f"{where} must be true or false, got {value!r}")
            return value
        if self.kind is str:
            if not isinstance(value, str) or len(value) > self.max_len:
                raise NBAError(INVALID_PARAMS, f"{where} must be a string of at most {self.max_len} characters")
            if self.choices is not None and value not in self.choices:
                raise NBAError(INVALID_PARAMS, f"{where} must be one of {', '.join(self.choices)}, got {value!r}")
            if self.items is not None:
                parts = [p.strip() for p in value.split(",") if p.strip()]
                bad = [p for p in parts if p not in self.items]
                if not parts or bad:
                    raise NBAError(INVALID_PARAMS, f"{where} must be a comma-separated subset of "
                                   f"{', '.join(self.items)}, got {value!r}")
            return value
        if self.kind is tuple:
            if not isinstance(value, (list, tuple)) or len(value) > self.max_len:
                raise NBAError(INVALID_PARAMS, f"{where} must be a list of at most {self.max_len} numbers")
            return tuple(self._number(where + "[]", v, float) for v in value)
        return self._number(where, value, self.kind)

    def _number(self, where: str, value: Any, kind: type) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and isinstance(value, float)):
            raise NBAError(INVALID_PARAMS, f"{where} must be {'an integer' if kind is int else 'a number'}, "
                           f"got {value!r}")
        if not math.isfinite(value):
            raise NBAError(INVALID_PARAMS, f"{where} must be a finite number, got {value!r}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            raise NBAError(INVALID_PARAMS, f"{where} must be between {self.low:g} and {self.high:g}, got {value!r}")
        return float(value) if kind is float else value


def _i(low: float, high: float) -> Param:
    return Param(int, low, high)


def _f(low: float, high: float) -> Param:
    return Param(float, low, high)


BOOL = Param(bool)
EPOCHS = _i(1, 1000)
LR = _f(1e-7, 1.0)
BATCH = _i(1, 4096)
SHIFT = _i(0, 8)
WEIGHT = _f(0.0, 1e4)
STEPS = _i(0, 10_000)

PARAMS: dict[str, dict[str, Param]] = {
    "ft": {"epochs": EPOCHS, "lr": LR, "batch_size": BATCH, "momentum": _f(0.0, 0.999),
           "weight_decay": _f(0.0, 0.1), "shift": SHIFT,
           "schedule": Param(str, choices=("cosine", "step", "constant"))},
    "fp": {"holdout_fraction": _f(0.05, 0.5), "max_acc_drop": _f(0.0, 1.0), "max_prune_ratio": _f(0.0, 0.99),
           "prune_step": _f(0.0, 0.5), "epochs": _i(0, 1000), "lr": LR, "batch_size": BATCH,
           "weight_decay": _f(0.0, 0.1), "shift": SHIFT},
    "nad": {"teacher_epochs": EPOCHS, "epochs": EPOCHS, "lr": _f(1e-6, 1.0), "lr_after": LR,
            "lr_drop_epoch": _i(0, 1000), "batch_size": BATCH, "momentum": _f(0.0, 0.999),
            "weight_decay": _f(0.0, 0.1), "shift": SHIFT, "cutout": _i(0, 16),
            "betas": Param(tuple, 0.0, 1e5, max_len=16), "p": _f(0.5, 8.0)},
    "anp": {"iterations": _i(1, 100_000), "batch_size": BATCH, "eps": _f(0.0, 1.0), "anp_steps": _i(1, 20),
            "alpha": _f(0.0, 1.0), "mask_lr": _f(1e-5, 10.0), "shift": SHIFT,
            "prune_by": Param(str, choices=("threshold", "fraction")), "threshold": _f(0.0, 1.0),
            "prune_fraction": _f(0.0, 0.9), "zero_bias": BOOL},
    "ibau": {"rounds": _i(1, 200), "k_steps": _i(0, 50), "lr": _f(1e-7, 0.1), "batch_size": BATCH,
             "search": Param(str, choices=("pgd", "sgd")), "search_lr": _f(0.0, 1000.0),
             "norm": Param(str, choices=("l2", "linf", "none")), "eps_rms": _f(0.0, 10.0),
             "eps_linf": _f(0.0, 100.0), "pixel_delta": BOOL,
             "inner_steps": _i(1, 1000), "inner_lr": _f(0.0, 10.0), "inner_reg": _f(0.0, 1.0),
             "perturbed_fraction": _f(0.0, 1.0)},
    "sau": {"rounds": _i(1, 10_000), "batch_size": BATCH, "lr": _f(1e-8, 0.1), "weight_decay": _f(0.0, 0.1),
            "trigger_norm": _f(0.0, 1.0), "adv_lr": _f(0.0, 1.0), "adv_steps": _i(1, 100),
            "beta_adv": _f(0.0, 100.0), "beta_share": _f(0.0, 100.0), "lmd_clean": _f(0.0, 100.0),
            "lmd_adv": _f(0.0, 100.0), "lmd_shared": _f(0.0, 100.0)},
    "ftsam": {"epochs": EPOCHS, "batch_size": BATCH, "lr": _f(1e-6, 1.0), "momentum": _f(0.0, 0.999),
              "weight_decay": _f(0.0, 0.1), "rho": _f(0.0, 100.0), "adaptive": BOOL,
              "label_smoothing": _f(0.0, 0.5), "shift": SHIFT},
    "nba": {"teacher_epochs": _i(0, 1000), "teacher_lr": LR, "teacher_shift": SHIFT,
            "representations": Param(str, items=("attention", "channel", "relational", "flow", "gram")),
            "layers": Param(str, max_len=1024),
            "pseudo": Param(str, choices=("off", "per_sample", "universal", "class_scan", "class_scan+universal")),
            "scan_steps": STEPS, "scan_batch": BATCH, "top_k": _i(1, 1000), "refresh_every": _i(0, 1000),
            "refresh_steps": STEPS, "eps": _f(0.0, 1.0), "scan_eps": _f(0.0, 1.0), "uap_top_k": _i(1, 1000),
            "uap_steps": STEPS, "stack_delta": BOOL, "pair_patches": BOOL, "warp_pseudo": BOOL, "target_deltas": BOOL,
            "pseudo_steps": _i(0, 1000), "beta": WEIGHT,
            "gamma": WEIGHT, "kl_weight": WEIGHT, "pseudo_ce": WEIGHT, "suspect_kd": WEIGHT, "teacher_kd": WEIGHT,
            "unflagged_pseudo_weight": WEIGHT,
            "kd_temperature": _f(0.1, 100.0), "student_epochs": EPOCHS, "min_student_images": _i(0, 10_000_000), "student_lr": LR,
            "student_shift": SHIFT, "batch_size": BATCH, "pseudo_mix": BOOL, "holdout_fraction": _f(0.0, 0.89)},
}

# Named parameter sets (`{"preset": name}`; the values live with each Defense class as `presets`).
PRESETS: dict[str, tuple[str, ...]] = {"ibau": ("authors",), "nba": ("paper",)}

# Params that name a number of classes: they cannot exceed the model's (checked where the spec is known).
# Detect only (method "scan", no defense): the verdict's seed (nba_core/verdict.py; its scan settings are fixed).
PARAMS["scan"] = {"seed": _i(0, 2**31 - 1)}

CLASS_COUNT_PARAMS = ("top_k", "uap_top_k")


def check_method_params(method: str, params: dict[str, Any], *, num_classes: int | None = None) -> dict[str, Any]:
    """Validate `params` for `method` (known method, known names, types, finite, in range); returns them with
    ints widened to floats where a float is expected. Raises NBAError(invalid_params / unknown_method)."""
    table = PARAMS.get(method)
    if table is None:
        from .errors import UNKNOWN_METHOD

        raise NBAError(UNKNOWN_METHOD, f"unknown method {method!r}; known: {', '.join(PARAMS)}")
    if not isinstance(params, dict):
        raise NBAError(INVALID_PARAMS, "params must be a JSON object")
    preset = params.get("preset")
    if preset is not None and (not isinstance(preset, str) or preset not in PRESETS.get(method, ())):
        raise NBAError(INVALID_PARAMS, f"unknown preset {preset!r} for {method}; known: "
                       f"{', '.join(PRESETS.get(method, ())) or 'none'}")
    params = {k: v for k, v in params.items() if k != "preset"}
    unknown = sorted(str(k) for k in params if k not in table)
    if unknown:
        raise NBAError(INVALID_PARAMS, f"unknown parameter(s) for {method}: {', '.join(unknown)[:500]}; "
                       f"known: {', '.join(sorted(table))}")
    clean = {name: table[name].check(method, name, value) for name, value in params.items()}
    if preset is not None:
        clean["preset"] = preset
    if num_classes is not None:
        for name in CLASS_COUNT_PARAMS:
            if name in clean and clean[name] > num_classes:
                raise NBAError(INVALID_PARAMS, f"{method}.{name} is {clean[name]} but the model has "
                               f"{num_classes} classes")
    return clean
