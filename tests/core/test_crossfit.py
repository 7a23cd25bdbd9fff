"""Cross-fitting folds: stratified, disjoint, covering every image once."""

from __future__ import annotations

import numpy as np
import pytest

from nba_core.crossfit import crossfit_accuracy_change, stratified_folds
from nba_core.errors import INVALID_PARAMS, NBAError


def test_folds_are_stratified_and_cover_everything_once():
    y = np.repeat(np.arange(5), [10, 7, 3, 1, 9])
    fold = stratified_folds(y, 3, seed=0)
    assert fold.shape == y.shape and set(fold.tolist()) == {0, 1, 2}
    for c in range(5):
        counts = np.bincount(fold[y == c], minlength=3)
        assert counts.max() - counts.min() <= 1  # each class spread evenly
    assert np.array_equal(fold, stratified_folds(y, 3, seed=0))
    assert not np.array_equal(fold, stratified_folds(y, 3, seed=1))


def test_bad_fold_counts_are_rejected():
    from nba_core.data.imageset import ImageSet

    data = ImageSet(np.zeros((6, 1, 4, 4), np.float32), np.arange(6) % 2)
    for k in (1, 11, 4):  # 4 folds need 8 images
        with pytest.raises(NBAError) as e:
            crossfit_accuracy_change(None, None, data, k, 0, lambda s: None)
        assert e.value.code == INVALID_PARAMS
