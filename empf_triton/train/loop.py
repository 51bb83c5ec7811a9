"""The training run behind `empf train`: data, model, optimizer, schedule, logs and checkpoints.

`run_training(TrainConfig(...))` trains with one of the strategies of `strategies.py`, evaluates
after every epoch (accuracy of the logits summed over T, anytime accuracy per step), prints one
line per epoch, keeps `metrics.json` / `metrics.csv` in the output folder, and saves `last.pt`
(every epoch) and `best.pt` (best test accuracy) atomically. `resume=` continues a run exactly.
Under torchrun each process trains its share of every batch (see `ddp.py`); rank 0 logs and saves.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from . import ddp
from .checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from .strategies import STRATEGIES, evaluate, iterate_batches, num_batches, train_epoch

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "TrainConfig",
    "TrainingDivergedError",
    "build_from_checkpoint",
    "resolve_device",
    "run_training",
]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became non-finite; the last good checkpoint was kept."""


@dataclass
class TrainConfig:
    """Everything a training run needs. The defaults are the README's main job: an EM-PF 1-D conv
    net with binary hidden weights, trained online (random step, T=4) on MNIST-1D.

    Attributes:
        dataset, data_root: `empf_triton.data.load_dataset(dataset, data_root)`.
        model: a registered model name, or "auto" for the data set's default net.
        T: time steps. strategy: "online" | "random_step" | "accumulate" | "bptt".
        epochs: total epochs of the run (a resumed run continues up to this).
        batch_size: per process. eval_batch_size: for evaluation.
        optimizer: "adamw" | "sgd" (momentum, Nesterov). lr, weight_decay, momentum.
        schedule: "cosine" (per batch, to 0 at the end, after `warmup_epochs` of linear warm-up)
            or "constant".
        weight_bits, spike_bits, spike_step, parallel, seca, mem_bn, impl: model options.
        augment: the data set's train-time augmentation (MNIST-1D: random circular shifts).
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda", "cuda:1", ...
        threads: CPU threads for torch (0 = auto: 1 on CPU; see `resolve_threads`).
        seed: seeds the model init, the shuffling, t* and the augmentation.
        out: output folder (None: `runs/<dataset>-<model>-<strategy>-T<T>`, suffixed -2, -3, ...
            when that one already holds a checkpoint).
        resume: a checkpoint file or a run folder (its last.pt) to continue from.
        overwrite: allow starting afresh in an `out` folder that already holds a checkpoint.
        stop_after: stop after this many epochs in this invocation (time-boxed jobs; resume later).
        grad_clip: clip the gradient norm (None: no clipping).
        sync_bn: SyncBatchNorm under DDP (CUDA only).
        progress: show a progress bar on stderr (only where stderr is a terminal).
        model_options: extra keyword options for the model factory.
    """

    dataset: str = "mnist1d"
    data_root: str | None = None
    model: str = "auto"
    T: int = 4
    strategy: str = "random_step"
    epochs: int = 12
    batch_size: int = 128
    eval_batch_size: int = 500
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 1e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    weight_bits: float = 1
    spike_bits: int | None = None
    spike_step: float = 0.25
    parallel: bool = False
    seca: bool = False
    mem_bn: bool = False
    impl: str = "auto"
    augment: bool = True
    device: str = "auto"
    threads: int = 0
    seed: int = 0
    out: str | None = None
    resume: str | None = None
    overwrite: bool = False
    stop_after: int | None = None
    grad_clip: float | None = None
    sync_bn: bool = False
    progress: bool = True
    model_options: dict | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

        def pos_int(name: str, v: object, minimum: int = 1) -> None:
            if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")

        pos_int("T", self.T)
        pos_int("epochs", self.epochs)
        pos_int("batch_size", self.batch_size)
        pos_int("eval_batch_size", self.eval_batch_size)
        pos_int("threads", self.threads, 0)
        if self.stop_after is not None:
            pos_int("stop_after", self.stop_after)
        if self.strategy not in STRATEGIES:
            raise ValueError(
                f"unknown strategy {self.strategy!r}; expected one of {', '.join(STRATEGIES)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(
                f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"unknown schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}"
            )
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs!r}"
            )
        if self.weight_bits not in (1, 1.5, 32):
            raise ValueError(
                f"weight_bits must be 1, 1.5 or 32 (full precision), got {self.weight_bits!r}"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip!r}")

    def model_config(self, in_shape, num_classes: int) -> dict:
        """The build_model keyword arguments (what a checkpoint must match)."""
        wb = self.weight_bits
        cfg = {
            "in_shape": list(in_shape),
            "num_classes": int(num_classes),
            "T": int(self.T),
            "weight_bits": int(wb) if float(wb).is_integer() else float(wb),
            "spike_bits": self.spike_bits,
            "spike_step": float(self.spike_step),
            "parallel": bool(self.parallel),
            "seca": bool(self.seca),
            "mem_bn": bool(self.mem_bn),
        }
        cfg.update(self.model_options or {})
        return cfg


def resolve_device(device: str) -> torch.device:
    """ "auto" -> cuda when available, else cpu; anything else must name an available device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) present"
            )
    elif dev.type != "cpu":
        raise ValueError(f"unsupported device {device!r}; expected auto, cpu, cuda or cuda:N")
    return dev


def resolve_threads(threads: int, device: torch.device) -> int:
    """Torch CPU threads: `threads` if > 0; else 1 on CPU, leaving torch's default on CUDA.

    One thread is the robust choice on CPU for these small nets: their per-step ops are too
    small to split well, and when other processes load the cores, OpenMP's busy-waiting threads
    slow training down several times over (measured 4x on 2 cores under load).
    """
    if threads > 0:
        return threads
    return 1 if device.type == "cpu" else torch.get_num_threads()


def _build_model(name: str, config: dict, impl: str):
    from ..models import build_model

    kw = dict(config)
    in_shape, num_classes, T = tuple(kw.pop("in_shape")), kw.pop("num_classes"), kw.pop("T")
    return build_model(name, in_shape=in_shape, num_classes=num_classes, T=T, impl=impl, **kw)


def build_from_checkpoint(ckpt: dict, *, impl: str = "auto", path: str = "checkpoint"):
    """Rebuild the model a checkpoint was saved from and load its weights."""
    model = _build_model(ckpt["model_name"], ckpt["model_config"], impl)
    load_model_state(model, ckpt, path=path)
    return model


class _Progress:
    """A plain progress bar on stderr (no dependency); silent unless stderr is a terminal."""

    def __init__(self, total: int, label: str, enabled: bool) -> None:
        self.total, self.label = total, label
        self.enabled = enabled and sys.stderr.isatty()
        self.start = self.last = time.perf_counter()

    def __call__(self, i: int, loss: float, acc: float) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.1 and i < self.total:
            return
        self.last = now
        width = 24
        done = int(width * i / max(self.total, 1))
        rate = i / max(now - self.start, 1e-9)
        eta = (self.total - i) / max(rate, 1e-9)
        sys.stderr.write(
            f"\r{self.label} [{'#' * done}{'.' * (width - done)}] {i}/{self.total} "
            f"loss {loss:.4f} acc {acc * 100:5.1f}% {rate:5.1f} it/s eta {eta:4.0f}s "
        )
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 100 + "\r")
            sys.stderr.flush()


def _atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_logs(out: Path, history: list[dict]) -> None:
    _atomic_write_text(out / "metrics.json", json.dumps(history, indent=1) + "\n")
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for row in history:
        w.writerow({k: (json.dumps(v) if isinstance(v, list) else v) for k, v in row.items()})
    _atomic_write_text(out / "metrics.csv", buf.getvalue())


def _peak_memory_mb(device: torch.device) -> tuple[str, float]:
    if device.type == "cuda":
        return "cuda_peak_mb", torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    # ru_maxrss is KiB on Linux (bytes on macOS); the process's peak resident set so far.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return "peak_rss_mb", rss / (2**20 if sys.platform == "darwin" else 2**10)


def _resolve_out(cfg: TrainConfig, model_name: str) -> Path:
    if cfg.out is not None:
        out = Path(cfg.out)
        if (out / "last.pt").exists() and not cfg.overwrite and cfg.resume is None:
            raise ValueError(
                f"output folder {out} already holds a checkpoint (last.pt); pass --resume {out} "
                "to continue that run, --overwrite to start over, or another --out"
            )
        return out
    base = Path("runs") / f"{cfg.dataset}-{model_name}-{cfg.strategy}-T{cfg.T}"
    out, k = base, 1
    while (out / "last.pt").exists() and cfg.resume is None and not cfg.overwrite:
        k += 1
        out = base.with_name(f"{base.name}-{k}")
    return out


def _make_scheduler(cfg: TrainConfig, optimizer, steps_per_epoch: int):
    total = max(cfg.epochs * steps_per_epoch, 1)
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (
            1.0 + math.cos(math.pi * min(step - warm, total - warm) / max(total - warm, 1))
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train as `cfg` says; returns a summary dict (final metrics, paths, epochs run).

    Raises:
        ValueError: a bad configuration (unknown data set / model / strategy, T < 1, ...).
        CheckpointError: `resume` names a missing, corrupt or incompatible checkpoint.
        DatasetNotFoundError, MissingDependencyError: the data set cannot be loaded.
        TrainingDivergedError: the loss became non-finite (last good checkpoint kept).
    """
    cfg.validate()
    from ..data import load_dataset

    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(cfg.threads, device))
    try:
        return _start(cfg, device, log, load_dataset)
    finally:
        torch.set_num_threads(threads_before)


def _start(cfg: TrainConfig, device: torch.device, log, load_dataset) -> dict:
    ckpt = None
    resume_path = None
    if cfg.resume is not None:
        resume_path = Path(cfg.resume)
        if resume_path.is_dir():
            resume_path = resume_path / "last.pt"
        ckpt = load_checkpoint(resume_path)  # fail before anything is written or trained

    dist = ddp.init_distributed(device)
    if dist.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    try:
        return _run(cfg, device, dist, ckpt, resume_path, load_dataset, log)
    finally:
        ddp.cleanup(dist)


def _run(cfg, device, dist, ckpt, resume_path, load_dataset, log) -> dict:
    from ..data import EVENT_DATASETS

    kw = {"T": cfg.T} if cfg.dataset in EVENT_DATASETS else {}
    train_set, test_set, info = load_dataset(cfg.dataset, cfg.data_root, **kw)
    model_name = cfg.model if cfg.model != "auto" else info.default_model
    if not model_name:
        raise ValueError(f"dataset {cfg.dataset!r} has no default model; pass --model NAME")
    from ..models import MODELS

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(sorted(MODELS))}")
    model_config = cfg.model_config(info.in_shape, info.num_classes)
    if ckpt is not None:
        check_compatible(ckpt, model_name, model_config, path=resume_path)
        saved_ds = ckpt.get("extra", {}).get("config", {}).get("dataset")
        if saved_ds is not None and saved_ds != cfg.dataset:
            raise CheckpointError(
                f"{resume_path} was trained on dataset {saved_ds!r}, not {cfg.dataset!r}"
            )

    torch.manual_seed(cfg.seed)
    model = _build_model(model_name, model_config, cfg.impl).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        optimizer = torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
        )
    steps = num_batches(len(train_set), cfg.batch_size, dist.world_size)
    scheduler = _make_scheduler(cfg, optimizer, steps)
    # Separate streams, so e.g. turning augmentation off does not change the data order or t*.
    gens = {
        "shuffle": torch.Generator().manual_seed(cfg.seed + 1),
        "t_star": torch.Generator().manual_seed(cfg.seed + 2),
        # Augmentation differs per rank (each rank sees other samples anyway).
        "augment": torch.Generator().manual_seed(cfg.seed + 3 + 1000 * dist.rank),
    }
    start_epoch, history, best = 0, [], -1.0
    if ckpt is not None:
        load_model_state(model, ckpt, path=resume_path)
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scheduler") is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        restore_rng(ckpt["rng"], gens)
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
        best = max((h.get("test_accuracy", -1.0) for h in history), default=-1.0)
        if start_epoch >= cfg.epochs:
            log(
                f"checkpoint {resume_path} already completed {start_epoch} epoch(s) of "
                f"{cfg.epochs}; nothing to train (raise --epochs to continue)"
            )
    out = (
        _resolve_out(cfg, model_name)
        if ckpt is None
        else (Path(cfg.out) if cfg.out is not None else resume_path.parent)
    )
    wrapped = ddp.wrap_model(model, device, dist, cfg.sync_bn)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        conf = asdict(cfg)
        conf.update(
            model_resolved=model_name, device_resolved=str(device), world_size=dist.world_size
        )
        _atomic_write_text(out / "config.json", json.dumps(conf, indent=1, default=str) + "\n")
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"empf train: {cfg.dataset} ({len(train_set)} train / {len(test_set)} test), "
            f"model {model_name} ({n_params:,} params, weight_bits={cfg.weight_bits}), "
            f"strategy {cfg.strategy}, T={cfg.T}, {cfg.epochs} epochs, batch {cfg.batch_size}"
            f"{f' x {dist.world_size} ranks' if dist.enabled else ''}, device {device}, "
            f"out {out}" + (f", resumed at epoch {start_epoch}" if ckpt is not None else "")
        )

    transform = info.train_transform if cfg.augment else None
    extra = {"config": {k: v for k, v in asdict(cfg).items() if k != "model_options"}}
    extra["config"]["model_options"] = json.dumps(cfg.model_options or {})
    run_epochs = 0
    summary: dict[str, Any] = {}
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.stop_after is not None and run_epochs >= cfg.stop_after:
            break
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        bar = _Progress(steps, f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress and dist.is_main)
        batches = iterate_batches(
            train_set,
            cfg.batch_size,
            shuffle=True,
            generator=gens["shuffle"],
            rank=dist.rank,
            world_size=dist.world_size,
            device=device,
        )
        r = train_epoch(
            wrapped,
            batches,
            optimizer,
            cfg.strategy,
            cfg.T,
            is_event=info.is_event,
            generator=gens["t_star"],
            scheduler=scheduler,
            transform=transform,
            transform_generator=gens["augment"],
            grad_clip=cfg.grad_clip,
            progress=bar,
            check_tstar=dist.enabled,
        )
        bar.close()
        test_batches = (
            iterate_batches(
                test_set,
                cfg.eval_batch_size,
                rank=dist.rank,
                world_size=dist.world_size,
                device=device,
            )
            if not dist.enabled
            else _eval_shard(test_set, cfg.eval_batch_size, dist, device)
        )
        ev = evaluate(model, test_batches, cfg.T, is_event=info.is_event)
        # Sum counts over ranks (each evaluated and trained on its own shard).
        sums = ddp.all_reduce_sum(
            [
                r.loss * r.batches,
                r.batches,
                r.accuracy * r.samples,
                r.samples,
                ev["loss"] * ev["samples"],
                ev["samples"],
                *ev["anytime_correct"],
            ],
            device,
            dist,
        )
        train_loss, train_acc = sums[0] / max(sums[1], 1), sums[2] / max(sums[3], 1)
        n_test = max(sums[5], 1)
        anytime = [c / n_test for c in sums[6:]]
        mem_key, mem = _peak_memory_mb(device)
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss,
            "train_accuracy": train_acc,
            "test_loss": sums[4] / n_test,
            "test_accuracy": anytime[-1],
            "anytime_accuracy": anytime,
            "epoch_seconds": r.seconds,
            "lr": optimizer.param_groups[0]["lr"],
            mem_key: mem,
        }
        if not math.isfinite(train_loss) or not all(
            torch.isfinite(p).all() for p in model.parameters()
        ):
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch + 1} (train loss {train_loss}); the last "
                f"good checkpoint in {out} was kept. Try a lower --lr."
            )
        history.append(row)
        run_epochs += 1
        if dist.is_main:
            log(
                f"epoch {epoch + 1:3d}/{cfg.epochs} loss {train_loss:.4f} "
                f"train {train_acc * 100:5.2f}% test {anytime[-1] * 100:5.2f}% "
                f"(anytime {' '.join(f'{a * 100:.1f}' for a in anytime)}) "
                f"{r.seconds:5.1f}s {mem_key.replace('_mb', '')} {mem:.0f} MB"
            )
            ck = {
                "model": model,
                "model_name": model_name,
                "model_config": model_config,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "epoch": epoch + 1,
                "generators": gens,
                "history": history,
                "extra": extra,
            }
            save_checkpoint(out / "last.pt", **ck)
            if anytime[-1] > best:
                best = anytime[-1]
                save_checkpoint(out / "best.pt", **ck)
            _write_logs(out, history)
        summary = row
    ddp.barrier(dist)
    return {
        "out": str(out),
        "model": model_name,
        "epochs_run": run_epochs,
        "epochs_done": start_epoch + run_epochs,
        "best_test_accuracy": best,
        "final": summary,
        "history": history,
    }


def _eval_shard(dataset, batch_size: int, dist, device):
    # Unlike training, evaluation keeps every sample: rank r takes r, r + W, r + 2W, ...
    n = len(dataset)
    idx = torch.arange(dist.rank, n, dist.world_size)
    if hasattr(dataset, "x"):
        for i in range(0, len(idx), batch_size):
            j = idx[i : i + batch_size]
            yield dataset.x[j].to(device), dataset.y[j].to(device)
        return
    from torch.utils.data import Subset

    yield from iterate_batches(Subset(dataset, idx.tolist()), batch_size, device=device)


def config_fields() -> list[str]:
    return [f.name for f in fields(TrainConfig)]
