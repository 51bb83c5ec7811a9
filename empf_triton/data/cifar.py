"""CIFAR-10 / CIFAR-100 from a local folder in torchvision's layout (never downloaded).

`root` is the folder that contains `cifar-10-batches-py/` (data_batch_1..5, test_batch) or
`cifar-100-python/` (train, test), as `torchvision.datasets.CIFAR10(root)` expects; `root` may
also be that subfolder itself. torchvision is not needed.

The batch files are Python pickles, and unpickling can run arbitrary code. They are read with a
restricted unpickler that resolves only what the genuine files contain (numpy's array
reconstruction and dtypes); anything else raises `pickle.UnpicklingError`, so a tampered file
cannot execute code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from .common import ArrayDataset, DatasetNotFoundError

#: Per-channel mean and std of the CIFAR training images (RGB, in [0, 1]).
STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_LAYOUT = {
    10: (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        b"labels",
    ),
    100: ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name} from a CIFAR batch file (only numpy arrays are "
            "allowed; the file is not a genuine CIFAR batch)"
        )


def read_batch(path: Path) -> dict:
    """Unpickle one CIFAR batch file safely (see the module docstring)."""
    with open(path, "rb") as f:
        try:
            d = _RestrictedUnpickler(f, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
                LookupError, MemoryError, OverflowError) as e:  # fmt: skip
            # corrupt bytes fail in many ways inside the unpickler; every one names the file
            raise ValueError(f"cannot read CIFAR batch {path}: {type(e).__name__}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"CIFAR batch {path} does not hold a dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}


def _find_folder(root: Path, sub: str) -> Path:
    if (root / sub).is_dir():
        return root / sub
    if root.name == sub and root.is_dir():
        return root
    raise DatasetNotFoundError(
        f"CIFAR folder not found: expected {root / sub} (torchvision layout; this library never "
        f"downloads). Put the extracted '{sub}' folder under {root} or pass --data-root"
    )


def _load_split(folder: Path, files: list[str], label_key: str, num_classes: int):
    xs, ys = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DatasetNotFoundError(f"CIFAR batch file missing: {path}")
        d = read_batch(path)
        if "data" not in d or label_key not in d:
            raise ValueError(f"CIFAR batch {path} lacks 'data' or '{label_key}'")
        x = np.asarray(d["data"], dtype=np.uint8)
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise ValueError(f"CIFAR batch {path}: data has shape {x.shape}, expected [N, 3072]")
        y = np.asarray(d[label_key], dtype=np.int64)
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"CIFAR batch {path}: {label_key} has shape {y.shape}, expected [{x.shape[0]}] "
                "(one label per image)"
            )
        if y.size and not (0 <= y.min() and y.max() < num_classes):
            raise ValueError(
                f"CIFAR batch {path}: {label_key} holds labels {int(y.min())}..{int(y.max())}, "
                f"expected 0..{num_classes - 1}"
            )
        xs.append(x.reshape(-1, 3, 32, 32))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def cifar_augment(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with `pad` pixels of zero padding and random horizontal flip, per sample.

    x: [N, C, H, W] normalised images; the generator is a CPU torch.Generator.
    """
    N, _, H, W = x.shape
    flip = torch.rand(N, generator=generator) < 0.5
    dx = torch.randint(-pad, pad + 1, (N,), generator=generator)
    dy = torch.randint(-pad, pad + 1, (N,), generator=generator)
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    ar_h, ar_w = torch.arange(H), torch.arange(W)
    rows = (ar_h.unsqueeze(0) + pad + dy.unsqueeze(1)).to(x.device)  # [N, H]
    cols = ar_w.unsqueeze(0) + pad + dx.unsqueeze(1)
    cols = torch.where(flip.unsqueeze(1), cols.flip(1), cols).to(x.device)  # [N, W]
    n = torch.arange(N, device=x.device)
    return xp[n[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def load_cifar(root=None, num_classes: int = 10, augment: bool = True):
    """(train_set, test_set, DatasetInfo) for CIFAR-10/100; x items [3, 32, 32] normalised."""
    from . import DatasetInfo

    if num_classes not in _LAYOUT:
        raise ValueError(f"num_classes must be 10 or 100, got {num_classes!r}")
    sub, train_files, test_files, label_key = _LAYOUT[num_classes]
    folder = _find_folder(Path(root if root is not None else "data"), sub)
    label_key = label_key.decode()
    xtr, ytr = _load_split(folder, train_files, label_key, num_classes)
    xte, yte = _load_split(folder, test_files, label_key, num_classes)
    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in STATS[num_classes])

    def norm(a: np.ndarray) -> torch.Tensor:
        return (torch.from_numpy(a).float() / 255.0 - mean) / std

    train = ArrayDataset(norm(xtr), torch.from_numpy(ytr))
    test = ArrayDataset(norm(xte), torch.from_numpy(yte))
    info = DatasetInfo(
        f"cifar{num_classes}",
        (3, 32, 32),
        num_classes,
        False,
        cifar_augment if augment else None,
        "resnet18",
    )
    return train, test, info
