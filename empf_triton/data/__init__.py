"""Data sets for EM-PF training: `load_dataset(name, root=None, **kw)`.

- `mnist1d`: generated offline by the `mnist1d` package with a fixed seed and cached;
  4000 train / 1000 test, in_shape (1, 40). Needs `mnist1d` (only to generate).
- `digits`: scikit-learn's bundled 8x8 digits, fixed stratified split 1438 / 359, in_shape (64,).
- `cifar10`, `cifar100`: a local torchvision-format folder (never downloaded), 50000 / 10000,
  in_shape (3, 32, 32).
- `dvs_cifar10`, `dvs_gesture`: event files read through `tonic` (never downloaded), frames
  [T, 2, H, W].

Static samples are stored once (not repeated over T): the training loop feeds the same x at each
step. Event samples are [T, *in_shape] frames (`DatasetInfo.is_event`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .common import ArrayDataset, DatasetNotFoundError, MissingDependencyError

__all__ = [
    "DATASETS",
    "EVENT_DATASETS",
    "ArrayDataset",
    "DatasetInfo",
    "DatasetNotFoundError",
    "MissingDependencyError",
    "load_dataset",
]


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and the training loop need to know about a data set.

    Attributes:
        name: registry name.
        in_shape: shape of one sample at one time step (no batch, no T).
        num_classes: number of classes.
        is_event: samples are already [T, *in_shape] frames (event data); else static.
        train_transform: optional batched augmentation `f(x, generator) -> x` applied by the
            training loop to each training batch (x [N, *] or [N, T, *]); None for none.
        default_model: the registry name of the net `--model auto` picks for this data set.
    """

    name: str
    in_shape: tuple[int, ...]
    num_classes: int
    is_event: bool = False
    train_transform: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = field(
        default=None, compare=False, repr=False
    )
    default_model: str = ""


def _mnist1d(root, **kw):
    from .mnist1d import load_mnist1d

    return load_mnist1d(root, **kw)


def _digits(root, **kw):
    from .digits import load_digits

    return load_digits(root, **kw)


def _cifar10(root, **kw):
    from .cifar import load_cifar

    return load_cifar(root, num_classes=10, **kw)


def _cifar100(root, **kw):
    from .cifar import load_cifar

    return load_cifar(root, num_classes=100, **kw)


def _dvs_cifar10(root, **kw):
    from .dvs import load_dvs

    return load_dvs("dvs_cifar10", root, **kw)


def _dvs_gesture(root, **kw):
    from .dvs import load_dvs

    return load_dvs("dvs_gesture", root, **kw)


#: name -> loader(root, **kw) returning (train_set, test_set, DatasetInfo).
DATASETS: dict[str, Callable] = {
    "mnist1d": _mnist1d,
    "digits": _digits,
    "cifar10": _cifar10,
    "cifar100": _cifar100,
    "dvs_cifar10": _dvs_cifar10,
    "dvs_gesture": _dvs_gesture,
}


#: Data sets whose samples are event frames [T, ...]; their loaders take the time steps `T`.
EVENT_DATASETS = frozenset({"dvs_cifar10", "dvs_gesture"})


def load_dataset(name: str, root: str | None = None, **kw) -> tuple:
    """Load a data set by name.

    Args:
        name: one of `DATASETS` ("mnist1d", "digits", "cifar10", "cifar100", "dvs_cifar10",
            "dvs_gesture").
        root: folder of the files for cifar/dvs (default "./data"); the cache folder for mnist1d
            (default `$EMPF_CACHE_DIR`, else `$XDG_CACHE_HOME/empf_triton`, else
            `~/.cache/empf_triton`); unused by digits.
        **kw: loader options (e.g. `T` for event data, `cache=False` for mnist1d).

    Returns:
        (train_set, test_set, DatasetInfo). Static sets are `ArrayDataset`s whose items are
        (x [*in_shape] float32, label int64).

    Raises:
        ValueError: unknown name, a bad option value, or a damaged data file (the message
            names it).
        DatasetNotFoundError: the files are not under `root`, or are incomplete (the message
            names the path).
        MissingDependencyError: the optional package the data set needs is not installed.
    """
    if not isinstance(name, str) or name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    return DATASETS[name](root, **kw)
