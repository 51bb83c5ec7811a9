"""scikit-learn's bundled 8x8 digits (1797 samples, no download), fixed stratified split."""

from __future__ import annotations

import numpy as np
import torch

from .common import ArrayDataset, MissingDependencyError

IN_SHAPE = (64,)
NUM_CLASSES = 10


def load_digits(root=None, test_fraction: float = 0.2, seed: int = 0):
    """(train_set, test_set, DatasetInfo): x items [64] in [0, 1] float32.

    The split is stratified by class with a fixed permutation (`seed`), so it never changes:
    1438 train / 359 test with the defaults.
    """
    from . import DatasetInfo

    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as e:
        raise MissingDependencyError(
            "the digits data set needs scikit-learn: pip install 'empf-triton[data]'"
        ) from e
    real = isinstance(test_fraction, (int, float)) and not isinstance(test_fraction, bool)
    if not (real and 0 < test_fraction < 1):
        raise ValueError(f"test_fraction must be a float in (0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    d = sk_load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.RandomState(seed)
    test_idx = []
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        test_idx.append(idx[: round(len(idx) * test_fraction)])
    if not all(len(i) for i in test_idx):
        raise ValueError(
            f"test_fraction {test_fraction!r} leaves a class without test samples (the classes "
            f"have about {len(y) // NUM_CLASSES} samples each)"
        )
    test_mask = np.zeros(len(y), dtype=bool)
    test_mask[np.concatenate(test_idx)] = True
    train = ArrayDataset(torch.from_numpy(x[~test_mask]), torch.from_numpy(y[~test_mask]))
    test = ArrayDataset(torch.from_numpy(x[test_mask]), torch.from_numpy(y[test_mask]))
    return train, test, DatasetInfo("digits", IN_SHAPE, NUM_CLASSES, False, None, "digits_mlp")
