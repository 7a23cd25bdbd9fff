"""Checks on the user's inputs that no backdoor explains, run before any cleaning.

A model that scores near chance on the user's own clean images is not backdoored (a backdoor leaves clean
accuracy intact): the labels are in another order than the model's outputs (folders sorted alphabetically,
`eight, five, four, ...`), or the spec's mean/std are not the ones the model was trained with. Cleaning such a
model "repairs" it towards the wrong labels and destroys it, so it is refused unless the caller says it is
intended (`allow_low_accuracy`). Missing or tiny classes are only warned about.
"""

from __future__ import annotations

from typing import Sequence

from .errors import NBAError

ACCURACY_NEAR_CHANCE = "accuracy_near_chance"
LOW_ACCURACY_WARNING = 0.6  # below this a deployed classifier is unusual: say so, but run


def chance_threshold(num_classes: int) -> float:
    """Accuracy at or below which the model is "near chance": chance plus 15 % of the way to perfect."""
    chance = 1.0 / num_classes
    return chance + 0.15 * (1.0 - chance)


def check_clean_accuracy(accuracy: float, num_classes: int, *, allow_low_accuracy: bool,
                         class_names: Sequence[str] | None = None) -> list[str]:
    """Raise `accuracy_near_chance` (or, with the override, return it as a warning) when the suspect model is near
    chance on the clean data; warn when it is merely low. Returns the warnings."""
    threshold = chance_threshold(num_classes)
    order = (f"the label order used was {', '.join(list(class_names)[:10])}{', ...' if len(class_names) > 10 else ''}"
             if class_names else "labels are the integers in the data")
    if accuracy <= threshold:
        message = (f"the model classifies only {100 * accuracy:.1f} % of your clean images correctly (chance is "
                   f"{100 / num_classes:.1f} %): a backdoor does not do that. Check that the labels follow the "
                   f"model's output order ({order}; fix it with a class list: --classes FILE / class_names) and that "
                   f"the spec's mean/std are the ones used in training. To clean it anyway: --allow-low-accuracy "
                   f"(REST: \"allow_low_accuracy\": true)")
        if not allow_low_accuracy:
            raise NBAError(ACCURACY_NEAR_CHANCE, message)
        return [f"cleaning a model that is near chance on the clean data (allowed by the caller): {message}"]
    if accuracy < LOW_ACCURACY_WARNING:
        return [f"clean accuracy before cleaning is {100 * accuracy:.1f} %, low for a deployed model: check the label "
                f"order ({order}) and the spec's mean/std"]
    return []
