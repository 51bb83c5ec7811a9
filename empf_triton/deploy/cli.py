"""The deployment commands of `empf` (registered by empf_triton/cli.py):

    empf export --checkpoint RUN/best.pt --out model.safetensors
    empf eval --deployed model.safetensors        # accuracy, sizes, energy table, latency
    empf report --deployed model.safetensors      # per-layer firing-rate / SOPs PNG

Errors are `ValueError`s (`DeployError`, `DeployFormatError`, ...), which the main CLI prints as
one line on stderr with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from .._files import write_file_atomic
from .errors import DeployError

__all__ = ["cmd_eval", "cmd_export", "cmd_report", "register"]


def register(sub, eval_parser: argparse.ArgumentParser, report_parser) -> None:
    """Add the `export` subcommand and the `--deployed` options of `eval` and `report`."""
    from ..cli import _name, _number, _path  # options are checked as in cli.py

    p = sub.add_parser(
        "export",
        help="export a checkpoint as a packed .safetensors inference file",
        description="Fold a trained checkpoint (BN and Mem-BN folded, weights bit-packed) and "
        "write it as one .safetensors file that `empf eval --deployed` and "
        "empf_triton.deploy.load() read without the training code.",
    )
    p.add_argument(
        "--checkpoint", type=_path, required=True, help="a checkpoint written by empf train"
    )
    p.add_argument("--out", type=_path, required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    e = eval_parser
    e.add_argument(
        "--deployed", type=_path, default=None, help="evaluate an export (instead of --checkpoint)"
    )
    e.add_argument(
        "--energy-samples",
        dest="energy_samples",
        type=_number("energy_samples"),
        default=None,
        help="test samples for the energy table (default: the whole test set; --deployed only)",
    )
    e.add_argument(
        "--latency-runs",
        dest="latency_runs",
        type=_number("latency_runs"),
        default=None,
        help="timed runs per batch size for the latency (median; default 5; --deployed only)",
    )
    r = report_parser
    r.add_argument("--deployed", type=_path, default=None, help="plot per-layer stats of an export")
    r.add_argument(
        "--dataset", type=_name, default=None, help="data set for --deployed (default: its own)"
    )
    r.add_argument(
        "--data-root", dest="data_root", type=_path, default=None, help="folder of the data files"
    )
    r.add_argument(
        "--samples",
        type=_number("samples"),
        default=None,
        help="test samples for --deployed (default: all)",
    )


def cmd_export(args: argparse.Namespace) -> int:
    from ..data import EVENT_DATASETS
    from ..train.checkpoint import load_checkpoint
    from ..train.loop import build_from_checkpoint
    from .format import export
    from .report import format_size_report, size_report, state_dict_bytes

    if Path(args.out).resolve() == Path(args.checkpoint).resolve():  # --overwrite or not
        raise DeployError(
            f"--out {args.out} is the checkpoint being exported; give the export another name"
        )
    ckpt = load_checkpoint(args.checkpoint)
    model = build_from_checkpoint(ckpt, impl="auto", path=args.checkpoint).eval()
    saved = ckpt.get("extra", {}).get("config", {})
    cfg = dict(ckpt["model_config"])
    dataset = saved.get("dataset")
    fp32 = state_dict_bytes(model)
    ck_bytes = Path(args.checkpoint).stat().st_size
    meta = {
        "model_name": ckpt["model_name"],
        "model_options": {
            k: v for k, v in cfg.items() if k not in ("in_shape", "num_classes", "T")
        },
        "spike_bits": cfg.get("spike_bits"),
        "spike_step": cfg.get("spike_step", 0.25),
        "dataset": dataset,
        "is_event": dataset in EVENT_DATASETS if dataset else False,
        "source": {
            "checkpoint": Path(args.checkpoint).name,
            "checkpoint_bytes": ck_bytes,
            "fp32_state_dict_bytes": fp32,
            "epoch": int(ckpt["epoch"]),
        },
    }
    path = export(model, args.out, meta=meta, overwrite=args.overwrite)
    print(f"exported {ckpt['model_name']} (epoch {ckpt['epoch']}) to {path}")
    print(format_size_report(size_report(path, checkpoint_bytes=ck_bytes,
                                          fp32_state_dict_bytes=fp32)))  # fmt: skip
    return 0


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; expected auto, cpu, cuda or cuda:N")
    return dev


def _load_for_eval(path: str, dataset: str | None, data_root: str | None, device, impl="auto"):
    from ..data import load_dataset
    from .format import load

    model = load(path, device, impl=impl)
    info = model.info
    dataset = dataset or info.get("dataset")
    if not dataset:
        raise DeployError(f"{path} does not record its data set; pass --dataset")
    kw = {"T": model.T} if info.get("is_event") else {}
    _, test_set, dinfo = load_dataset(dataset, data_root, **kw)
    if tuple(dinfo.in_shape) != model.in_shape or dinfo.num_classes != model.num_classes:
        raise DeployError(
            f"{path} is a model for inputs {model.in_shape} with {model.num_classes} classes; "
            f"dataset {dataset!r} has {tuple(dinfo.in_shape)} and {dinfo.num_classes}"
        )
    return model, test_set, dinfo, dataset


def _batches(test_set, batch_size: int, device, is_event: bool):
    """(x, y) batches shaped as the deployed model takes them ([N, *] or [T, N, *]); in-memory
    data sets are sliced, others (event frames read from files) go through a DataLoader."""
    from ..train.strategies import iterate_batches

    for x, y in iterate_batches(test_set, batch_size):
        if is_event:
            x = x.transpose(0, 1)
        yield x.to(device), y.to(device)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _latency(model, x: torch.Tensor, runs: int, device) -> float:
    model(x)  # warm-up
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cmd_eval(args: argparse.Namespace) -> int:
    """`empf eval --deployed FILE`: accuracy, sizes, energy table and latency."""
    from .report import energy_report, format_energy_table, format_size_report, size_report

    if args.deployed is None:
        raise DeployError("empf eval needs --checkpoint FILE or --deployed FILE")
    if getattr(args, "checkpoint", None) is not None:
        raise DeployError("pass either --checkpoint or --deployed, not both")
    given = [f"--{f.replace('_', '-')}" for f in ("step_mode", "precision", "compile")
             if getattr(args, f, None) is not None]  # fmt: skip
    if given:
        raise DeployError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to --checkpoint: a "
            "deployed model runs as it was exported "
            "(its dtype, all steps per call; empf_triton.deploy.load(...).to(dtype) converts it)"
        )
    runs = args.latency_runs if args.latency_runs is not None else 5
    if args.batch_size < 1 or runs < 1:
        raise DeployError("--batch-size and --latency-runs must be >= 1")
    device = _device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu":
        torch.set_num_threads(1)  # as `empf eval`: robust on shared CPUs
    model, test_set, dinfo, dataset = _load_for_eval(
        args.deployed, args.dataset, args.data_root, device, args.impl
    )
    ev = dinfo.is_event
    correct = n = 0
    for x, y in _batches(test_set, args.batch_size, device, ev):
        correct += int((model(x).argmax(-1) == y).sum())
        n += y.shape[0]
    info = model.info
    name = info.get("model_name", info.get("model_class", "model"))
    print(
        f"deployed {name} on {dataset} (T={model.T}): test accuracy {100 * correct / n:.2f}% "
        f"({correct}/{n})"
    )
    src = info.get("source", {}) if isinstance(info.get("source"), dict) else {}
    sizes = size_report(
        args.deployed,
        checkpoint_bytes=src.get("checkpoint_bytes"),
        fp32_state_dict_bytes=src.get("fp32_state_dict_bytes"),
    )
    print(format_size_report(sizes))
    energy = energy_report(
        model, _batches(test_set, args.batch_size, device, ev), max_samples=args.energy_samples
    )
    print(format_energy_table(energy))
    lat: dict[str, Any] = {}
    first = next(_batches(test_set, args.batch_size, device, ev))[0]
    impl = args.impl
    if impl == "auto":
        impl = "triton" if device.type == "cuda" else "reference"
    for bs in sorted({1, first.shape[1] if ev else first.shape[0]}):
        xb = first[:, :bs] if ev else first[:bs]
        t = _latency(model, xb, runs, device)
        lat[str(bs)] = t
        print(
            f"latency at batch {bs}: {t * 1e3:.3f} ms per batch, {t / bs * 1e3:.4f} ms per "
            f"sample (wall time, median of {runs}, {device.type}, "
            f"{torch.get_num_threads()} thread(s), impl {impl})"
        )
    if args.json:
        record = {
            "deployed": str(args.deployed),
            "model": name,
            "dataset": dataset,
            "accuracy": correct / n,
            "correct": correct,
            "samples": n,
            "sizes": sizes,
            "energy": energy,
            "latency_s": lat,
            "device": str(device),
        }
        data = (json.dumps(record, indent=1) + "\n").encode()
        write_file_atomic(Path(args.json), data, overwrite=args.overwrite)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """`empf report --deployed FILE`: per-layer firing-rate and SOPs PNG (+ the text table)."""
    from .report import energy_report, format_energy_table, plot_energy

    device = _device("auto")
    model, test_set, dinfo, dataset = _load_for_eval(
        args.deployed, args.dataset, args.data_root, device
    )
    energy = energy_report(
        model, _batches(test_set, 500, device, dinfo.is_event), max_samples=args.samples
    )
    print(format_energy_table(energy))
    try:
        path = plot_energy(
            energy,
            Path(args.out) / f"{Path(args.deployed).stem}_layers.png",
            title=f"{Path(args.deployed).name} on {dataset}",
        )
    except ImportError as e:
        raise DeployError("empf report needs matplotlib: pip install 'empf-triton[plot]'") from e
    print(path)
    return 0
