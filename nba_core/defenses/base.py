"""The defense interface: suspect model + clean subset + config in; cleaned model, log and timings out.

Every defense is a class with a `Config` dataclass of defaults (validated overrides come from the CLI/API
`params`), and a `run` that reports progress and honours cancellation through the context.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..data.imageset import ImageSet
from ..errors import INVALID_PARAMS, NBAError
from ..models.base import SpecModel
from ..spec import ModelSpec
from ..train import CancelFn, ProgressFn, never_cancel, no_progress


def param(default: Any, help: str) -> Any:
    """A Config field with its one-line description (`nba methods` shows it; a test requires one for every
    parameter of every registered defense): `epochs: int = param(20, "epochs of fine-tuning")`."""
    return field(default=default, metadata={"help": help})


@dataclass
class DefenseContext:
    spec: ModelSpec
    device: torch.device
    generator: torch.Generator
    seed: int = 0
    progress: ProgressFn = no_progress
    should_cancel: CancelFn = never_cancel
    hflip: bool = False  # whether horizontal flips preserve labels for this data (colour natural images: yes)
    # The pipeline's before-verdict and its scan (nba_core.verdict.Verdict, ModelScan): defenses that need
    # suspects (NBA) take them from here instead of running a second, possibly disagreeing scan.
    verdict: tuple[Any, Any] | None = None


@dataclass
class DefenseResult:
    model: SpecModel
    log: list[dict] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


class StageTimer:
    """Accumulates wall time per named stage: `with timer('teacher'): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def __call__(self, stage: str):
        timer = self

        class _Ctx:
            def __enter__(self):
                self.t0 = time.perf_counter()

            def __exit__(self, *exc):
                timer.seconds[stage] = timer.seconds.get(stage, 0.0) + time.perf_counter() - self.t0

        return _Ctx()


class Defense:
    name: ClassVar[str] = "defense"
    Config: ClassVar[type] = type("Config", (), {})
    # Named parameter sets: `{"preset": "authors"}` starts from presets["authors"]; other keys given with it win.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __init__(self, **params: Any):
        self.config = self.make_config(params)

    @classmethod
    def make_config(cls, params: dict[str, Any]):
        """Build the Config, rejecting unknown keys and values of the wrong type with INVALID_PARAMS."""
        from ..method_params import PARAMS, check_method_params

        if cls.name in PARAMS:  # the shared bounds table (the API applies the same one before queueing)
            params = check_method_params(cls.name, params)
        params = dict(params)
        preset = params.pop("preset", None)
        if preset is not None:
            if not isinstance(preset, str) or preset not in cls.presets:
                raise NBAError(INVALID_PARAMS, f"unknown preset {preset!r} for {cls.name}; known: "
                                               f"{', '.join(sorted(cls.presets)) or 'none'}", http_status=422)
            params = {**cls.presets[preset], **params}
        fields = {f.name: f for f in dataclasses.fields(cls.Config)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise NBAError(INVALID_PARAMS, f"unknown parameter(s) for {cls.name}: {', '.join(unknown)}; "
                           f"known: {', '.join(sorted(fields))}", http_status=422)
        defaults = cls.Config()
        clean: dict[str, Any] = {}
        for key, value in params.items():
            expected = type(getattr(defaults, key))
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if expected in (list, tuple) and isinstance(value, (list, tuple)):
                value = expected(value)
            if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
                raise NBAError(INVALID_PARAMS, f"{cls.name}.{key} must be {expected.__name__}, got {value!r}")
            clean[key] = value
        return dataclasses.replace(defaults, **clean)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dataclasses.asdict(cls.Config())

    @classmethod
    def describe(cls) -> dict[str, dict[str, Any]]:
        """{parameter: {"default", "type", "help"}} in declaration order."""
        defaults = cls.defaults()
        return {f.name: {"default": defaults[f.name], "type": type(defaults[f.name]).__name__,
                         "help": f.metadata.get("help", "")} for f in dataclasses.fields(cls.Config)}

    def run(self, model: SpecModel, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        raise NotImplementedError
