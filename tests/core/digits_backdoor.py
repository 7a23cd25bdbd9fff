"""A tiny BadNets-backdoored small CNN on digits 8×8, shared by the defense and NBA tests."""

from __future__ import annotations

import torch

from nba_core.attacks.badnets import BadNets
from nba_core.data.builtin import train_test
from nba_core.data.imageset import stratified_split
from nba_core.device import seed_everything
from nba_core.models import build_model
from nba_core.spec import ModelSpec
from nba_core.train import TrainConfig, train_classifier

SPEC = ModelSpec(arch="small_cnn", num_classes=10, in_channels=1, input_size=(8, 8), mean=(0.3,), std=(0.4,))


def backdoored_digits(rate: float):
    """(model, 20 % clean subset, clean test set, triggered non-target test set) for a BadNets backdoor."""
    train, test = train_test("digits")
    attack = BadNets(target=0, rate=rate, seed=0)
    poisoned, _ = attack.poison(train)
    gen = seed_everything(0)
    model = build_model(SPEC)
    train_classifier(model, torch.as_tensor(poisoned.x), torch.as_tensor(poisoned.y),
                     TrainConfig(epochs=12, lr=0.05, batch_size=64), generator=gen)
    model.eval()
    _, sub_idx = stratified_split(train.y, 0.2, 0)
    return model, train.subset(sub_idx), test, attack.triggered_test_set(test)
