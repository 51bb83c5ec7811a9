"""Data loaders: MNIST-1D (generation, cache, split, augmentation), digits, CIFAR folders, DVS."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from empf_triton.data import (
    DATASETS,
    ArrayDataset,
    DatasetInfo,
    DatasetNotFoundError,
    MissingDependencyError,
    load_dataset,
)
from empf_triton.data.cifar import cifar_augment, read_batch
from empf_triton.data.dvs import load_dvs
from empf_triton.data.mnist1d import mnist1d_arrays, mnist1d_augment


@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """A private cache folder, generated once for the module (about 6 s)."""
    root = tmp_path_factory.mktemp("mnist1d_cache")
    pytest.importorskip("mnist1d")
    load_dataset("mnist1d", str(root))
    return root


def test_unknown_dataset():
    with pytest.raises(ValueError, match="unknown dataset 'mnist2d'.*mnist1d"):
        load_dataset("mnist2d")
    for name in (["mnist1d"], {"mnist1d": 1}):  # was "unhashable type: 'list'", no name
        with pytest.raises(ValueError, match=r"unknown dataset .*mnist1d.*; expected one of"):
            load_dataset(name)
    assert {"mnist1d", "digits", "cifar10", "cifar100", "dvs_cifar10", "dvs_gesture"} <= set(
        DATASETS
    )


def test_mnist1d_split_and_shapes(mnist1d_cache):
    train, test, info = load_dataset("mnist1d", str(mnist1d_cache))
    assert isinstance(info, DatasetInfo)
    assert (len(train), len(test)) == (4000, 1000)
    assert info.in_shape == (1, 40) and info.num_classes == 10 and not info.is_event
    assert info.default_model == "mnist1d_cnn"
    assert train.x.shape == (4000, 1, 40) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and set(train.y.tolist()) == set(range(10))
    x, y = train[3]
    assert x.shape == (1, 40) and int(y) in range(10)
    # mnist1d normalises the whole set to zero mean, unit std.
    allx = torch.cat([train.x, test.x])
    assert abs(float(allx.mean())) < 1e-3 and abs(float(allx.std()) - 1) < 1e-2


def test_mnist1d_deterministic_and_cached(mnist1d_cache):
    files = list(mnist1d_cache.glob("mnist1d-*.npz"))
    assert len(files) == 1
    assert not list(mnist1d_cache.glob("*.tmp"))  # the atomic write left no temp file
    a = mnist1d_arrays(mnist1d_cache)  # from the cache
    import random

    random.seed(123)  # a stream of the caller's own (not the one generation leaves behind)
    state, py_state = np.random.get_state(), random.getstate()
    b = mnist1d_arrays(cache=False)  # generated afresh
    # Generation seeds numpy's and Python's global RNGs internally; the caller's streams are
    # left as they were.
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert random.getstate() == py_state
    for k in ("x", "y", "x_test", "y_test"):
        assert np.array_equal(a[k], b[k]), k


def test_mnist1d_corrupt_cache_regenerated(mnist1d_cache, tmp_path):
    (f,) = mnist1d_cache.glob("mnist1d-*.npz")
    bad = tmp_path / f.name
    bad.write_bytes(f.read_bytes()[:1000])  # a truncated cache file
    good = mnist1d_arrays(mnist1d_cache)
    again = mnist1d_arrays(tmp_path)
    assert np.array_equal(good["x"], again["x"])
    with np.load(bad) as z:  # replaced by a whole file
        assert z["x"].shape == (4000, 40)


@pytest.mark.parametrize(
    "damage",
    [
        "short y_test",
        "x_test of another length",
        "int32 labels",
        "a label of 10",
        "a NaN",
        "too few samples",
    ],
)
def test_mnist1d_readable_but_wrong_cache_regenerated(mnist1d_cache, tmp_path, damage):
    """A cache file that reads but is not a whole data set of these arguments is regenerated,
    never returned (where before a wrong test split loaded and failed later, unnamed)."""
    from empf_triton.data.common import save_npz_atomic

    (f,) = mnist1d_cache.glob("mnist1d-*.npz")
    good = mnist1d_arrays(mnist1d_cache)
    bad = {k: v.copy() for k, v in good.items()}
    if damage == "short y_test":
        bad["y_test"] = bad["y_test"][:-3]
    elif damage == "x_test of another length":
        bad["x_test"] = bad["x_test"][:, :30]
    elif damage == "int32 labels":
        bad["y"] = bad["y"].astype(np.int32)
    elif damage == "a label of 10":
        bad["y"][5] = 10
    elif damage == "a NaN":
        bad["x"][2, 7] = np.nan
    else:  # the arrays of a smaller set (train and test lengths consistent, too few samples)
        bad = {k: v[:100] for k, v in good.items()}
    save_npz_atomic(tmp_path / f.name, **bad)
    again = mnist1d_arrays(tmp_path)
    for k in good:
        assert again[k].dtype == good[k].dtype and np.array_equal(again[k], good[k]), k
    with np.load(tmp_path / f.name) as z:  # replaced by a whole file
        assert np.array_equal(z["y_test"], good["y_test"])


def test_mnist1d_bad_generation_arg():
    with pytest.raises(ValueError, match="unknown mnist1d generation arguments"):
        load_dataset("mnist1d", num_sample=10)


def test_mnist1d_augment_is_a_circular_shift():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 40)
    y = mnist1d_augment(x, g, max_shift=5)
    assert y.shape == x.shape
    shifted = 0
    for i in range(64):
        matches = [s for s in range(-5, 6) if torch.equal(torch.roll(x[i], s, -1), y[i])]
        assert matches, f"sample {i} is not a circular shift within 5"
        shifted += matches[0] != 0
    assert shifted > 40  # most samples move
    y2 = mnist1d_augment(x, torch.Generator().manual_seed(0), max_shift=5)
    assert torch.equal(y, y2)
    assert torch.equal(mnist1d_augment(x, g, max_shift=0), x)


def test_mnist1d_train_transform(mnist1d_cache):
    _, _, info = load_dataset("mnist1d", str(mnist1d_cache))
    assert info.train_transform is not None
    _, _, off = load_dataset("mnist1d", str(mnist1d_cache), augment=False)
    assert off.train_transform is None


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"test_fraction": "0.2"}, "test_fraction must be a float in"),  # was torch's '<' error
        ({"test_fraction": True}, "test_fraction must be a float in"),
        ({"seed": 1.5}, "seed must be an int in"),  # was numpy's "Cannot cast scalar"
        ({"seed": "a"}, "seed must be an int in"),
        ({"seed": -1}, "seed must be an int in"),
        ({"seed": True}, "seed must be an int in"),  # was taken as seed 1
    ],
)
def test_digits_options_are_named(kw, match):
    pytest.importorskip("sklearn")
    from empf_triton.data.digits import load_digits

    with pytest.raises(ValueError, match=match):
        load_digits(**kw)


def test_digits_fixed_stratified_split():
    pytest.importorskip("sklearn")
    train, test, info = load_dataset("digits")
    assert (len(train), len(test)) == (1438, 359)
    from empf_triton.data.digits import load_digits

    with pytest.raises(ValueError, match="leaves a class without test samples"):
        load_digits(test_fraction=0.001)  # was an empty test set
    assert info.in_shape == (64,) and info.num_classes == 10 and info.default_model == "digits_mlp"
    assert float(train.x.min()) >= 0 and float(train.x.max()) <= 1
    counts = torch.bincount(test.y, minlength=10)
    assert int(counts.min()) >= 30  # every class is in the test split
    train2, test2, _ = load_dataset("digits")
    assert torch.equal(train.x, train2.x) and torch.equal(test.y, test2.y)
    # train and test are disjoint (no sample row appears in both with its label)
    tr = {(tuple(r), int(c)) for r, c in zip(train.x.numpy().round(4).tolist(), train.y)}
    dup = sum((tuple(r), int(c)) in tr for r, c in zip(test.x.numpy().round(4).tolist(), test.y))
    assert dup < 5  # digits holds a handful of exact duplicate images


def test_array_dataset_rejects_mismatch():
    with pytest.raises(ValueError, match="3 samples but y has 2"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long))


# ----------------------------------------------------------------------------------------- CIFAR


def _write_batch(path, n, label_key, seed, extra=None):
    rng = np.random.RandomState(seed)
    d = {
        b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
        label_key: rng.randint(0, 10, n).tolist(),
        b"filenames": [f"img{i}.png".encode() for i in range(n)],
        **(extra or {}),
    }
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=2)
    return d


def _fake_cifar10(root):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = [_write_batch(folder / f"data_batch_{i}", 4, b"labels", i) for i in range(1, 6)]
    test = _write_batch(folder / "test_batch", 3, b"labels", 9)
    return folder, batches, test


def test_cifar10_missing_folder_names_path(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        load_dataset("cifar10", str(tmp_path / "nowhere"))
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        load_dataset("cifar100", str(tmp_path))


def test_cifar10_reads_fake_folder(tmp_path):
    folder, batches, test_b = _fake_cifar10(tmp_path)
    train, test, info = load_dataset("cifar10", str(tmp_path))
    assert (len(train), len(test)) == (20, 3)
    assert info.in_shape == (3, 32, 32) and info.num_classes == 10
    assert train.x.shape == (20, 3, 32, 32) and train.x.dtype == torch.float32
    assert train.y.tolist() == sum((b[b"labels"] for b in batches), [])
    # pixel (c=0, 0, 0) of the first image, normalised with the CIFAR-10 mean/std
    raw = batches[0][b"data"][0, 0] / 255.0
    assert float(train.x[0, 0, 0, 0]) == pytest.approx((raw - 0.4914) / 0.2470, abs=1e-5)
    # the batches folder itself is accepted as root too
    train2, _, _ = load_dataset("cifar10", str(folder))
    assert torch.equal(train.x, train2.x)
    # a missing batch file is named
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", str(tmp_path))


def test_cifar100_reads_fake_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    tr = _write_batch(folder / "train", 5, b"fine_labels", 1, {b"coarse_labels": [0] * 5})
    _write_batch(folder / "test", 2, b"fine_labels", 2, {b"coarse_labels": [0] * 2})
    train, test, info = load_dataset("cifar100", str(tmp_path))
    assert info.num_classes == 100 and len(train) == 5 and len(test) == 2
    assert train.y.tolist() == tr[b"fine_labels"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_batch_refuses_code(tmp_path):
    """A tampered batch file that would run code on unpickling is refused."""
    folder, _, _ = _fake_cifar10(tmp_path)
    with open(folder / "data_batch_1", "wb") as f:
        pickle.dump({b"data": _Evil(), b"labels": []}, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load"):
        read_batch(folder / "data_batch_1")
    with pytest.raises(ValueError, match="refusing to load"):
        load_dataset("cifar10", str(tmp_path))


def test_corrupt_cifar_batches_are_one_clear_error(tmp_path):
    """Random byte damage to a batch file fails inside the unpickler in many ways (attribute and
    lookup errors among them): each is a ValueError naming the file."""
    import random

    good = pickle.dumps({b"labels": [1, 2, 3], b"data": np.zeros((3, 3072), np.uint8)}, protocol=2)
    r = random.Random(0)
    path = tmp_path / "data_batch_1"
    for _ in range(1500):
        b = bytearray(good)
        for _ in range(r.randint(1, 4)):
            b[r.randrange(len(b))] = r.randrange(256)
        if r.random() < 0.3:
            b = b[: r.randrange(len(b))]
        path.write_bytes(bytes(b))
        try:
            read_batch(path)
        except ValueError as e:
            assert str(path) in str(e) or "CIFAR batch" in str(e)


def test_cifar_augment_crop_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    y = cifar_augment(x, g)
    assert y.shape == x.shape
    assert torch.equal(y, cifar_augment(x, torch.Generator().manual_seed(0)))
    # pad=0 leaves only flips: every sample equals itself or its mirror
    z = cifar_augment(x, torch.Generator().manual_seed(1), pad=0)
    for i in range(8):
        assert torch.equal(z[i], x[i]) or torch.equal(z[i], x[i].flip(-1))


# ------------------------------------------------------------------------------------------- DVS


def test_dvs_needs_tonic_or_files(tmp_path):
    try:
        import tonic  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="tonic"):
            load_dataset("dvs_cifar10", str(tmp_path))
    else:
        with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "CIFAR10DVS")):
            load_dataset("dvs_cifar10", str(tmp_path))
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        load_dataset("dvs_gesture", str(tmp_path), T=0)
    for size in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="size must be None or an int >= 1"):
            load_dvs("dvs_gesture", str(tmp_path), T=2, size=size)


def test_mnist1d_default_args_match_package():
    """The cache key uses a copy of the package's defaults: it must not drift from them."""
    data = pytest.importorskip("mnist1d.data")
    from empf_triton.data.mnist1d import DEFAULT_ARGS

    args = data.get_dataset_args(as_dict=True)
    args.pop("url", None)
    assert args == DEFAULT_ARGS


def test_dvs_cifar10_split_reads_no_sample_when_targets_are_known(tmp_path, monkeypatch):
    """The 90/10 split of CIFAR10-DVS uses the data set's `targets` and reads no event file for
    it (before: every sample was read and framed to build a default list that was not used)."""
    import sys
    import types

    reads = []

    class FakeCIFAR10DVS:
        sensor_size = (128, 128, 2)

        def __init__(self, save_to, transform=None, train=None):
            self.targets, self.transform = [i % 10 for i in range(200)], transform

        def __len__(self):
            return len(self.targets)

        def __getitem__(self, i):
            reads.append(i)
            return np.zeros((self.transform.n_time_bins, 2, 128, 128), np.int16), self.targets[i]

    class ToFrame:
        def __init__(self, sensor_size, n_time_bins):
            self.n_time_bins = n_time_bins

    tonic = types.ModuleType("tonic")
    tonic.datasets = types.SimpleNamespace(CIFAR10DVS=FakeCIFAR10DVS)
    tonic.transforms = types.SimpleNamespace(ToFrame=ToFrame)
    monkeypatch.setitem(sys.modules, "tonic", tonic)
    (tmp_path / "CIFAR10DVS").mkdir()
    train, test, _ = load_dataset("dvs_cifar10", str(tmp_path), T=2)
    assert (len(train), len(test)) == (180, 20) and reads == []


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([0, 1, 10, 2], r"labels holds labels 0\.\.10, expected 0\.\.9"),
        ([0, -1, 3, 2], r"labels holds labels -1\.\.3, expected 0\.\.9"),
        ([0, 1, 2], r"labels has shape \(3,\), expected \[4\]"),
    ],
)
def test_cifar_labels_out_of_range_name_the_file(tmp_path, labels, match):
    """A batch whose labels do not fit the classes (or the images) is a ValueError naming the
    file at load, not an IndexError from the loss in the middle of training."""
    folder, _, _ = _fake_cifar10(tmp_path)
    _write_batch(folder / "data_batch_2", 4, b"labels", 2, {b"labels": labels})
    with pytest.raises(ValueError, match=match) as e:
        load_dataset("cifar10", str(tmp_path))
    assert "data_batch_2" in str(e.value)


def test_npz_cache_file_gets_the_umask_mode(tmp_path):
    """A data set cache file is readable as a plain open() would make it (a shared cache
    folder), not 0600 as mkstemp makes files."""
    from empf_triton._files import default_file_mode
    from empf_triton.data.common import save_npz_atomic

    old = os.umask(0o022)
    try:
        save_npz_atomic(tmp_path / "c.npz", a=np.arange(3))
    finally:
        os.umask(old)
    assert (tmp_path / "c.npz").stat().st_mode & 0o777 == 0o644
    assert np.load(tmp_path / "c.npz")["a"].tolist() == [0, 1, 2]
    assert default_file_mode() == 0o666 & ~old


# -------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 0, "drop_last": True}, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": -2}, "batch_size must be an int >= 1, got -2"),
        ({"batch_size": 2.5}, "batch_size must be an int >= 1, got 2.5"),
        ({"batch_size": True}, "batch_size must be an int >= 1, got True"),
        ({"batch_size": 3, "world_size": 0}, "world_size must be an int >= 1, got 0"),
        ({"batch_size": 3, "rank": 3, "world_size": 3}, r"rank must be an int in 0\.\.2, got 3"),
        ({"batch_size": 3, "rank": -1, "world_size": 2}, r"rank must be an int in 0\.\.1, got -1"),
    ],
)
def test_iterate_batches_bad_arguments_are_named(kw, match):
    """A batch size < 1 or a rank outside the world is a ValueError naming it, raised at the call
    (before: range()'s 'arg 3 must not be zero', a ZeroDivisionError, an empty epoch for a
    negative size, or rank 3 of 3 silently repeating rank 0's samples)."""
    from empf_triton.train.strategies import iterate_batches, num_batches

    ds = ArrayDataset(torch.zeros(10, 2), torch.arange(10))
    with pytest.raises(ValueError, match=match):
        iterate_batches(ds, **kw)
    if "rank" not in kw:
        with pytest.raises(ValueError, match=match):
            num_batches(10, kw["batch_size"], kw.get("world_size", 1))


def test_iterate_batches_epoch_covers_every_sample_once():
    """Shuffled epochs: the same seed gives the same batches, another seed another order, every
    sample exactly once; the short last batch is kept unless drop_last (as num_batches counts)."""
    from empf_triton.train.strategies import iterate_batches, num_batches

    ds = ArrayDataset(torch.arange(10).float().unsqueeze(1), torch.arange(10))

    def epoch(seed, **kw):
        g = torch.Generator().manual_seed(seed)
        return [y.tolist() for _, y in iterate_batches(ds, 3, shuffle=True, generator=g, **kw)]

    a = epoch(0)
    assert a == epoch(0) and a != epoch(1)
    assert sorted(sum(a, [])) == list(range(10)) and [len(b) for b in a] == [3, 3, 3, 1]
    assert len(a) == num_batches(10, 3)
    d = epoch(0, drop_last=True)
    assert d == a[:3] and len(d) == num_batches(10, 3, drop_last=True)


def _fake_tonic(monkeypatch, downloads):
    """A stand-in for tonic's dataset classes as tonic 1.x writes them: files under
    save_to/<class name>; the constructor calls self.download() unless its archive is there and
    enough files are extracted; samples are ToFrame frames [T, P, H, W] int16."""
    import sys
    import types

    class Base:
        sensor_size = (128, 128, 2)
        filename, folder_name, ext = "", "", ".npy"

        def __init__(self, save_to, transform=None, train=True):
            self.location_on_system = os.path.join(save_to, type(self).__name__)
            self.transform, self.data, self.targets = transform, [], []
            if not self._check_exists():
                self.download()
            folder = os.path.join(self.location_on_system, self.folder_name)
            for f in sorted(os.listdir(folder)):
                self.data.append(f)
                self.targets.append(int(f.split("_")[0]))

        def _check_exists(self):
            where = os.path.join(self.location_on_system, self.folder_name)
            return os.path.isfile(os.path.join(self.location_on_system, self.filename)) and (
                os.path.isdir(where) and len(os.listdir(where)) >= 4
            )

        def download(self):  # tonic's: download_and_extract_archive into location_on_system
            downloads.append(self.location_on_system)
            os.makedirs(self.location_on_system, exist_ok=True)
            with open(os.path.join(self.location_on_system, self.filename), "wb") as f:
                f.write(b"downloaded")

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            T = self.transform.n_time_bins
            frames = np.full((T, 2, 128, 128), i, np.int16)
            frames[:, 1] += 1000  # the OFF channel differs from the ON channel
            return frames, self.targets[i]

    class DVSGesture(Base):
        def __init__(self, save_to, train=True, transform=None):
            self.filename = "ibmGestureTrain.tar.gz" if train else "ibmGestureTest.tar.gz"
            self.folder_name = "ibmGestureTrain" if train else "ibmGestureTest"
            super().__init__(save_to, transform, train)

    class CIFAR10DVS(Base):
        filename, folder_name = "CIFAR10DVS.zip", "CIFAR10DVS"

    class ToFrame:
        def __init__(self, sensor_size, n_time_bins):
            self.n_time_bins = n_time_bins

    tonic = types.ModuleType("tonic")
    tonic.datasets = types.SimpleNamespace(DVSGesture=DVSGesture, CIFAR10DVS=CIFAR10DVS)
    tonic.transforms = types.SimpleNamespace(ToFrame=ToFrame)
    monkeypatch.setitem(sys.modules, "tonic", tonic)


def _fake_gesture_files(root, split, n):
    folder = root / "DVSGesture" / split
    folder.mkdir(parents=True, exist_ok=True)
    (root / "DVSGesture" / f"{split}.tar.gz").write_bytes(b"archive")
    for i in range(n):
        (folder / f"{i % 11}_{i}.npy").write_bytes(b"")


@pytest.mark.parametrize("missing", ["empty folder", "archive gone", "test split not extracted"])
def test_dvs_incomplete_files_are_refused_not_downloaded(tmp_path, monkeypatch, missing):
    """tonic downloads whenever its files look incomplete; the loader, documented never to
    download, refuses with DatasetNotFoundError naming the folder, and writes nothing there
    (before: tonic's download ran, into the user's data folder)."""
    downloads = []
    _fake_tonic(monkeypatch, downloads)
    (tmp_path / "DVSGesture").mkdir()
    if missing != "empty folder":
        _fake_gesture_files(tmp_path, "ibmGestureTrain", 6)
        _fake_gesture_files(tmp_path, "ibmGestureTest", 6)
    if missing == "archive gone":
        (tmp_path / "DVSGesture" / "ibmGestureTrain.tar.gz").unlink()
    elif missing == "test split not extracted":
        for f in (tmp_path / "DVSGesture" / "ibmGestureTest").iterdir():
            f.unlink()
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(DatasetNotFoundError, match="never downloads") as e:
        load_dataset("dvs_gesture", str(tmp_path), T=2)
    assert str(tmp_path / "DVSGesture") in str(e.value) and "tar.gz" in str(e.value)
    assert downloads == []
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_dvs_frames_per_step(tmp_path, monkeypatch):
    """Event samples are T frames [T, 2, size, size] float32 (ON/OFF channels kept apart) and
    batches are [N, T, 2, size, size], so the model gets frame t at step t."""
    from empf_triton.train.strategies import iterate_batches, step_inputs

    _fake_tonic(monkeypatch, [])
    _fake_gesture_files(tmp_path, "ibmGestureTrain", 6)
    _fake_gesture_files(tmp_path, "ibmGestureTest", 5)
    train, test, info = load_dataset("dvs_gesture", str(tmp_path), T=3)
    assert (len(train), len(test)) == (6, 5)
    assert info.is_event and info.in_shape == (2, 48, 48) and info.num_classes == 11
    x, y = train[2]
    assert x.shape == (3, 2, 48, 48) and x.dtype == torch.float32 and isinstance(y, int)
    # "area" resizing of a constant frame keeps the value; the channels stay apart
    assert float(x[:, 0].min()) == float(x[:, 0].max()) == 2.0 and float(x[:, 1].min()) == 1002.0
    (xb, yb), *_ = iterate_batches(train, 4)
    assert xb.shape == (4, 3, 2, 48, 48) and yb.dtype == torch.int64
    assert torch.equal(step_inputs(xb, 1, True), xb[:, 1])
    _, _, full = load_dvs("dvs_gesture", str(tmp_path), T=3, size=None)
    assert full.in_shape == (2, 128, 128)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"num_samples": 0}, "num_samples must be an int >= 1, got 0"),
        ({"num_samples": "100"}, "num_samples must be an int >= 1, got '100'"),
        ({"num_samples": 5}, r"leave an empty split \(0 samples are made"),
        ({"train_split": 1.0}, "train_split 1.0 leave an empty split"),
        ({"train_split": "0.8"}, "train_split must be a number, got '0.8'"),
        ({"final_seq_length": 0}, "final_seq_length must be an int >= 1, got 0"),
    ],
)
def test_mnist1d_bad_generation_values_are_named(tmp_path, kw, match):
    """Generation arguments that cannot make two non-empty splits are a ValueError naming them,
    before generating or caching anything (before: numpy's 'need at least one array to stack',
    a TypeError from inside the package, or an empty test set / signals of length 0 cached)."""
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist1d", str(tmp_path), **kw)
    assert list(tmp_path.iterdir()) == []


def test_mnist1d_cache_hits_when_num_samples_is_not_a_multiple_of_10(tmp_path, monkeypatch):
    """The package makes num_samples // 10 samples of each class; the cache check expects that
    many (before: it expected num_samples, so such a cache was regenerated on every load)."""
    pytest.importorskip("mnist1d")
    import empf_triton.data.mnist1d as m

    a = mnist1d_arrays(tmp_path, num_samples=55)
    assert (len(a["x"]), len(a["x_test"])) == (40, 10)

    def no_generation(args):
        raise AssertionError("regenerated although the cache holds these arguments")

    monkeypatch.setattr(m, "_generate", no_generation)
    b = mnist1d_arrays(tmp_path, num_samples=55)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("damage", ["compression method", "encrypted flag", "zip version"])
def test_mnist1d_cache_damaged_in_the_zip_headers_regenerated(tmp_path, damage):
    """A cache file whose zip headers are damaged makes zipfile raise NotImplementedError or
    RuntimeError: it is regenerated like any other corrupt cache (before: the error escaped and
    the load failed)."""
    pytest.importorskip("mnist1d")
    good = mnist1d_arrays(tmp_path, num_samples=20)
    (path,) = tmp_path.glob("mnist1d-*.npz")
    b = bytearray(path.read_bytes())
    central = b.index(b"PK\x01\x02")  # the first central directory entry
    if damage == "compression method":
        b[central + 10] = 99
    elif damage == "encrypted flag":
        b[central + 8] |= 1
    else:
        b[central + 6] = 200  # "version needed to extract": 20.0
    path.write_bytes(bytes(b))
    again = mnist1d_arrays(tmp_path, num_samples=20)
    assert all(np.array_equal(again[k], good[k]) for k in good)
    with np.load(path) as z:  # replaced by a whole file
        assert np.array_equal(z["x"], good["x"])


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"max_shift": -1}, "max_shift must be an int >= 0, got -1"),
        ({"max_shift": 2.5}, "max_shift must be an int >= 0, got 2.5"),
        ({"max_shift": True}, "max_shift must be an int >= 0, got True"),
        ({"noise": -0.1}, "noise must be a finite number >= 0, got -0.1"),
        ({"noise": float("nan")}, "noise must be a finite number >= 0, got nan"),
    ],
)
def test_mnist1d_bad_augmentation_options_are_named(tmp_path, kw, match):
    """Augmentation options are checked at load, before generating anything (before: a negative
    max_shift or a NaN noise silently turned that augmentation off, and a float max_shift failed
    in torch.randint at the first training batch)."""
    with pytest.raises(ValueError, match=match):
        load_dataset("mnist1d", str(tmp_path), **kw)
    assert list(tmp_path.iterdir()) == []
