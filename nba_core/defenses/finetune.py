"""FT: plain fine-tuning of the suspect model on the clean subset (the simplest baseline).

Default = the *strong* recipe (lr 0.1, ±2 px shifts, 20 epochs, cosine): the same regime as NAD's published
fine-tuning baseline and as our NAD/NBA teacher. NBA.md §5 shows the BackdoorBench-style recipe (lr 0.01, no
strong augmentation) leaves BadNets at ~100 % ASR on MNIST-5k, so using it as the default would make every other
defense look better than it is. The weak recipe stays one parameter set away: {"lr": 0.01, "shift": 0}.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

from ..data.imageset import ImageSet
from ..device import prepare_model, to_device
from ..errors import INVALID_PARAMS, NBAError
from ..models.base import SpecModel
from ..train import TrainConfig, train_classifier
from .base import Defense, DefenseContext, DefenseResult, StageTimer, param


def clean_tensors(clean: ImageSet, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The clean subset as device tensors (moved once; every loop slices them)."""
    if len(clean) == 0:
        raise NBAError(INVALID_PARAMS, "the clean subset is empty")
    return to_device(clean.x, device), to_device(clean.y, device)


def working_copy(model: SpecModel, device: torch.device) -> SpecModel:
    """A deep copy on the run's device, so the caller's model is never modified."""
    return prepare_model(copy.deepcopy(model), device)


def check_range(name: str, value: float, low: float, high: float) -> None:
    """Raise INVALID_PARAMS unless low <= value <= high (shared by the baseline Configs)."""
    if not low <= value <= high:
        raise NBAError(INVALID_PARAMS, f"{name} must be between {low} and {high}, got {value!r}")


@dataclass
class FineTuningConfig:
    epochs: int = param(20, "epochs of fine-tuning on the clean subset")
    lr: float = param(0.1, "initial SGD learning rate")
    batch_size: int = param(64, "images per SGD step")
    momentum: float = param(0.9, "SGD momentum")
    weight_decay: float = param(5e-4, "L2 weight decay")
    # random translation ±shift px (the small-image analogue of random-crop-with-padding)
    shift: int = param(2, "random translation of training images by up to this many pixels (augmentation)")
    schedule: str = param("cosine", "learning-rate schedule: cosine | step | constant")

    def __post_init__(self) -> None:
        check_range("epochs", self.epochs, 1, 1000)
        check_range("lr", self.lr, 1e-6, 1.0)
        check_range("batch_size", self.batch_size, 1, 4096)
        check_range("momentum", self.momentum, 0.0, 0.999)
        check_range("weight_decay", self.weight_decay, 0.0, 0.1)
        check_range("shift", self.shift, 0, 8)
        if self.schedule not in ("cosine", "step", "constant"):
            raise NBAError(INVALID_PARAMS, f"schedule must be cosine, step or constant, got {self.schedule!r}")

    def train_config(self, hflip: bool) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size, momentum=self.momentum,
                           weight_decay=self.weight_decay, shift=self.shift, hflip=hflip, schedule=self.schedule)


class FineTuning(Defense):
    name = "ft"
    Config = FineTuningConfig
    stages = ("finetune",)

    def run(self, model: SpecModel, clean: ImageSet, ctx: DefenseContext) -> DefenseResult:
        timer = StageTimer()
        x, y = clean_tensors(clean, ctx.device)
        net = working_copy(model, ctx.device)
        with timer("finetune"):
            log = train_classifier(net, x, y, self.config.train_config(ctx.hflip), generator=ctx.generator,
                                   progress=ctx.progress, should_cancel=ctx.should_cancel, stage="finetune")
        net.eval()
        return DefenseResult(model=net, log=log, stage_seconds=timer.seconds, info={"clean_samples": len(clean)})
