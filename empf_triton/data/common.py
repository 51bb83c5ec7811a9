"""Shared pieces of the data loaders: in-memory dataset, errors, atomic cache writes."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._files import write_file_atomic


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are missing (the message names the folder looked in)."""


class MissingDependencyError(ImportError):
    """An optional package a data set needs is not installed (the message says which)."""


class ArrayDataset(Dataset):
    """An in-memory data set of tensors: items are (x[i], y[i]).

    The training loop batches `x` and `y` directly (no per-item Python calls), so keep them on
    the device you train on if they fit.

    Args:
        x: [N, *] float32 samples.
        y: [N] int64 labels.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has {x.shape[0]} samples but y has {y.shape[0]}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def cache_dir(root: str | os.PathLike | None = None) -> Path:
    """The cache folder: `root`, else `$EMPF_CACHE_DIR`, else `$XDG_CACHE_HOME/empf_triton`, else
    `~/.cache/empf_triton`."""
    if root is not None:
        return Path(root)
    if os.environ.get("EMPF_CACHE_DIR"):
        return Path(os.environ["EMPF_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "empf_triton"


def save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    """Write an .npz to `path` whole (`write_file_atomic`: readers never see half a file; the
    file gets the mode a plain open() would, so a shared cache folder stays readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_file_atomic(path, buf.getbuffer())
