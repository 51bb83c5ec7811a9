"""Event-camera data sets through `tonic` (optional; files must already be on disk).

- `dvs_cifar10`: CIFAR10-DVS (`tonic.datasets.CIFAR10DVS`), 10 classes, 128x128 sensor; tonic
  ships no split, so a fixed stratified 90/10 split is used (as in the EM-PF paper's code).
- `dvs_gesture`: DVS128 Gesture (`tonic.datasets.DVSGesture`), 11 classes, its own train/test.

Samples are frames [T, 2, H, W] (events binned into T equal slices, ON/OFF polarity channels,
optionally resized to `size`), float32. Nothing is downloaded: the extracted files must be under
`root` in tonic's layout, else `DatasetNotFoundError` names the folder looked in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .common import DatasetNotFoundError, MissingDependencyError

_SPECS = {
    # name: (tonic class, tonic folder name, classes)
    "dvs_cifar10": ("CIFAR10DVS", "CIFAR10DVS", 10),
    "dvs_gesture": ("DVSGesture", "DVSGesture", 11),
}


def _import_tonic():
    try:
        import tonic  # noqa: F401
    except ImportError as e:
        raise MissingDependencyError(
            "event data sets (dvs_cifar10, dvs_gesture) need the 'tonic' package: pip install tonic"
        ) from e
    return tonic


def _no_download(cls, name: str, where: Path):
    """`cls` with its `download()` refusing: tonic downloads (gigabytes, into `where`) whenever
    its files look incomplete there, e.g. the archive it fetched is gone or few files are
    extracted. The subclass keeps tonic's class name, which names tonic's folder."""

    def download(self):
        raise DatasetNotFoundError(
            f"{name} files under {where} are missing or incomplete: tonic expects its archive "
            f"{getattr(self, 'filename', '')!r} there and the files extracted from it (this "
            "library never downloads; fetch and extract the data set there, or pass --data-root)"
        )

    return type(cls.__name__, (cls,), {"download": download})


class FramesDataset(Dataset):
    """Wraps a tonic data set: items (frames [T, 2, H, W] float32, label int)."""

    def __init__(self, base, indices, T: int, size: int | None) -> None:
        self.base, self.indices, self.T, self.size = base, list(indices), T, size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        frames, label = self.base[self.indices[i]]
        x = torch.as_tensor(np.asarray(frames), dtype=torch.float32)  # [T, 2, H, W]
        if self.size is not None and tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="area")
        return x, int(label)


def load_dvs(name: str, root=None, T: int = 10, size: int | None = 48, seed: int = 0):
    """(train_set, test_set, DatasetInfo) for an event data set (see the module docstring)."""
    from . import DatasetInfo

    if name not in _SPECS:
        raise ValueError(f"unknown event dataset {name!r}; expected one of {sorted(_SPECS)}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be an int >= 1, got {T!r}")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"size must be None or an int >= 1, got {size!r}")
    cls_name, folder, num_classes = _SPECS[name]
    root = Path(root if root is not None else "data")
    tonic = _import_tonic()
    if not (root / folder).is_dir():
        raise DatasetNotFoundError(
            f"{name} files not found: expected tonic's folder {root / folder} (this library never "
            "downloads; fetch and extract the data set there, or pass --data-root)"
        )
    cls = _no_download(getattr(tonic.datasets, cls_name), name, root / folder)
    sensor = cls.sensor_size
    to_frames = tonic.transforms.ToFrame(sensor_size=sensor, n_time_bins=T)
    if name == "dvs_gesture":
        train_base = cls(save_to=str(root), train=True, transform=to_frames)
        test_base = cls(save_to=str(root), train=False, transform=to_frames)
        train = FramesDataset(train_base, range(len(train_base)), T, size)
        test = FramesDataset(test_base, range(len(test_base)), T, size)
    else:
        base = cls(save_to=str(root), transform=to_frames)
        targets = getattr(base, "targets", None)  # reading every sample only where it is missing
        if targets is None:
            targets = [base[i][1] for i in range(len(base))]
        targets = np.asarray(targets)
        rng = np.random.RandomState(seed)
        test_idx = []
        for c in range(num_classes):
            idx = np.flatnonzero(targets == c)
            rng.shuffle(idx)
            test_idx += idx[: len(idx) // 10].tolist()
        test_set = set(test_idx)
        train = FramesDataset(base, [i for i in range(len(base)) if i not in test_set], T, size)
        test = FramesDataset(base, sorted(test_set), T, size)
    hw = (size, size) if size is not None else (sensor[1], sensor[0])
    info = DatasetInfo(name, (2, *hw), num_classes, True, None, "vgg11")
    return train, test, info
