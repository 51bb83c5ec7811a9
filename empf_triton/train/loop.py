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
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .._files import write_file_atomic
from . import ddp
from .checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from .lock import OutputLock
from .precision import (
    check_compile,
    check_precision,
    compile_model,
    make_grad_scaler,
)
from .strategies import STRATEGIES, evaluate, iterate_batches, num_batches, train_epoch

__all__ = [
    "NEURONS",
    "OPTIMIZERS",
    "RESUME_CHANGEABLE",
    "RESUME_FIXED",
    "SURROGATES",
    "SCHEDULES",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "build_from_checkpoint",
    "resolve_device",
    "run_training",
]

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")
NEURONS = ("empf", "lif")
SURROGATES = ("sigmoid", "atan", "triangle")
#: LIF defaults filled in when neuron="lif" and the option is not given.
LIF_DEFAULTS = {"tau": 2.0, "v_threshold": 1.0, "surrogate": "sigmoid"}
LIF_FIELDS = ("tau", "v_threshold", "surrogate", "surrogate_alpha", "detach_reset")

#: Settings a resumed run may change: they are honoured from the resumed epoch on (and logged).
RESUME_CHANGEABLE = (
    "epochs",
    "lr",
    "weight_decay",
    "momentum",
    "schedule",
    "warmup_epochs",
    "strategy",
    "grad_clip",
    "eval_batch_size",
    "augment",
    "impl",
    "data_root",
    "sync_bn",
    "precision",
    "compile",
)
#: Settings a resumed run must keep (the model's are also checked against the checkpoint).
RESUME_FIXED = ("dataset", "batch_size", "optimizer", "seed", "neuron")
#: Fields that steer one invocation and are never compared on resume.
RUN_CONTROL = ("device", "threads", "out", "resume", "overwrite", "stop_after", "progress")


class TrainingDivergedError(RuntimeError):
    """The loss or the weights became non-finite (the message says which checkpoint is left)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says which checkpoint (if any) is left on disk."""


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
            when that one already holds a run's files, `RUN_FILES`).
        resume: a checkpoint file or a run folder (its last.pt) to continue from.
        overwrite: allow starting afresh in an `out` folder that already holds a run's files
            (they are removed at this run's first save, before its own are written).
        stop_after: stop after this many epochs in this invocation (time-boxed jobs; resume later).
        grad_clip: clip the gradient norm (None: no clipping).
        sync_bn: SyncBatchNorm under DDP (CUDA only).
        progress: show a progress bar on stderr (only where stderr is a terminal).
        model_options: extra keyword options for the model factory (a dict; keys the
            command line sets elsewhere, such as T or impl, are refused).
        precision: "fp32" | "bf16" | "fp16" (autocast for convolutions and linears; fp16 adds a
            GradScaler). compile: "none" | "default" | "reduce-overhead" (`torch.compile`).
        neuron: "empf" | "lif". tau (LIF decay 1 - 1/tau, tau > 1; default 2.0), v_threshold
            (default 1.0), surrogate ("sigmoid" | "atan" | "triangle"; default sigmoid),
            surrogate_alpha (None: the surrogate's default), detach_reset: LIF options, passed
            to the model as `neuron`, `tau`, `v_threshold`, `surrogate`, `alpha`,
            `detach_reset` only when neuron="lif" (and refused with neuron="empf").
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
    precision: str = "fp32"
    compile: str = "none"
    neuron: str = "empf"
    tau: float | None = None
    v_threshold: float | None = None
    surrogate: str | None = None
    surrogate_alpha: float | None = None
    detach_reset: bool = False

    def __post_init__(self) -> None:
        if self.neuron == "lif":  # record the values that actually run
            for k, v in LIF_DEFAULTS.items():
                if getattr(self, k) is None:
                    setattr(self, k, v)

    def validate(self) -> None:
        """Raise ValueError naming the first bad field."""

        def number(name: str, v: object, lo: float, hi: float = math.inf, lo_open=True) -> None:
            ok = (
                isinstance(v, (int, float))
                and not isinstance(v, bool)
                and math.isfinite(v)
                and (v > lo if lo_open else v >= lo)
                and v <= hi
            )
            if not ok:
                rng = f"> {lo}" if lo_open else f">= {lo}"
                rng += "" if hi == math.inf else f" and <= {hi}"
                raise ValueError(f"{name} must be a finite number {rng}, got {v!r}")

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
        number("lr", self.lr, 0)
        number("weight_decay", self.weight_decay, 0, lo_open=False)
        number("momentum", self.momentum, 0, lo_open=False)
        if not self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        # Settings that would do nothing are refused (as the LIF options with neuron='empf'),
        # not accepted and then logged as honoured on a resume.
        if self.optimizer != "sgd" and self.momentum != _DEFAULT_MOMENTUM:
            raise ValueError(
                f"momentum is an SGD setting; optimizer {self.optimizer!r} has none "
                "(use --optimizer sgd, or leave --momentum out)"
            )
        number("warmup_epochs", self.warmup_epochs, 0, lo_open=False)
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(
                f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs!r}"
            )
        if isinstance(self.weight_bits, bool) or self.weight_bits not in (1, 1.5, 32):
            raise ValueError(
                f"weight_bits must be 1, 1.5 or 32 (full precision), got {self.weight_bits!r}"
            )
        if self.grad_clip is not None:
            number("grad_clip", self.grad_clip, 0)
        if self.spike_bits is not None:
            pos_int("spike_bits", self.spike_bits)
            if self.spike_bits > 8:
                raise ValueError(f"spike_bits must be 1..8 or None, got {self.spike_bits!r}")
        number("spike_step", self.spike_step, 0)
        if self.spike_bits is None and self.spike_step != _DEFAULT_SPIKE_STEP:
            raise ValueError(
                "spike_step is the k-bit spike quantiser's step; it needs spike_bits "
                "(--spike-bits K), float spikes have no step"
            )
        pos_int("seed", self.seed, 0)
        if self.seed > 2**32 - 1:
            # torch's CPU generator keeps only a seed's low 32 bits: 2**32 would rerun seed 0
            raise ValueError(
                f"seed must be at most 2**32 - 1 (torch uses a seed's low 32 bits, so a larger "
                f"one repeats a smaller one's run), got {self.seed}"
            )
        check_precision(self.precision)
        check_compile(self.compile)
        if self.model_options is not None and not isinstance(self.model_options, dict):
            mo = self.model_options
            raise ValueError(
                "model_options must be a JSON object such as '{\"hidden\": [64]}', got "
                f"{json.dumps(mo) if _jsonable(mo) else repr(mo)}"
            )
        reserved = sorted(set(self.model_options or {}) & set(_RESERVED_OPTIONS))
        if reserved:
            k = reserved[0]
            how = _RESERVED_OPTIONS[k]
            raise ValueError(f"model_options may not set {k!r}: {how}")
        if self.neuron not in NEURONS:
            raise ValueError(f"neuron must be one of {', '.join(NEURONS)}, got {self.neuron!r}")
        if self.neuron == "empf":
            given = [k for k in LIF_FIELDS if getattr(self, k) not in (None, False)]
            if given:
                raise ValueError(
                    f"{given[0]} is a LIF option; it needs neuron='lif' (--neuron lif)"
                )
        else:
            number("tau", self.tau, 1)
            number("v_threshold", self.v_threshold, 0)
            if self.surrogate not in SURROGATES:
                raise ValueError(
                    f"surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}"
                )
            if self.surrogate_alpha is not None:
                number("surrogate_alpha", self.surrogate_alpha, 0)

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
        if self.neuron == "lif":
            cfg.update(
                neuron="lif",
                tau=float(self.tau),
                v_threshold=float(self.v_threshold),
                surrogate=self.surrogate,
                detach_reset=bool(self.detach_reset),
            )
            if self.surrogate_alpha is not None:
                cfg["alpha"] = float(self.surrogate_alpha)
        cfg.update(self.model_options or {})
        return cfg


def _jsonable(v: object) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


_DEFAULT_MOMENTUM = TrainConfig.momentum
_DEFAULT_SPIKE_STEP = TrainConfig.spike_step

#: model_options keys that other settings own, and what to use instead.
_RESERVED_OPTIONS = {
    "in_shape": "the input shape is fixed by the data set",
    "num_classes": "the number of classes is fixed by the data set",
    "T": "use --T",
    "impl": "use --impl",
    "weight_bits": "use --weight-bits",
    "spike_bits": "use --spike-bits",
    "spike_step": "use --spike-step",
    "parallel": "use --parallel",
    "seca": "use --seca",
    "mem_bn": "use --mem-bn",
    "neuron": "use --neuron",
    "tau": "use --tau",
    "v_threshold": "use --v-threshold",
    "surrogate": "use --surrogate",
    "alpha": "use --surrogate-alpha",
    "detach_reset": "use --detach-reset",
    "grad_mode": "the strategy sets it (online, random_step and accumulate train online, bptt "
    "through time)",
    "step_mode": "training and evaluation set it",
}


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


def _option_defaults(name: str) -> dict[str, Any]:
    """The keyword defaults of model `name`: its factory's, or (for a factory that passes
    **options on) those of the class named in its return annotation. {} if unknown."""
    import inspect

    from ..models import MODELS

    fn = MODELS.get(name)
    if fn is None:
        return {}
    try:
        sig = inspect.signature(fn, eval_str=True)
    except (NameError, TypeError, ValueError):
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return {}
    out = {k: p.default for k, p in sig.parameters.items() if p.default is not p.empty}
    if not any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return out
    cls = sig.return_annotation
    if not inspect.isclass(cls):
        return {}  # **options go somewhere unknown: the model's own checks decide
    try:
        csig = inspect.signature(cls)
    except (TypeError, ValueError):
        return {}
    out.update({k: p.default for k, p in csig.parameters.items() if p.default is not p.empty})
    return out


def check_model_options(name: str, options: dict | None) -> None:
    """Refuse model options whose kind differs from the model's default for that option: a
    number for a list of widths, a list for a flag, a negative width, ... (ValueError naming the
    option, its default and the value given)."""
    defaults = _option_defaults(name)
    takes = sorted(set(defaults) - set(_RESERVED_OPTIONS) - {"grad_mode", "step_mode"})
    for k, v in (options or {}).items():
        if k not in defaults:
            if defaults:
                raise ValueError(
                    f"model {name!r} does not take the option {k!r}; it takes {', '.join(takes)}"
                )
            continue  # the model's options are unknown here: build_model checks them
        if defaults[k] is None:
            continue
        d = defaults[k]

        def bad(expected: str, k=k, d=d, v=v) -> ValueError:
            return ValueError(
                f"model option {k!r} of {name!r} must be {expected} "
                f"(default {json.dumps(_plain_default(d))}), got {json.dumps(v)}"
            )

        if isinstance(d, bool):
            if not isinstance(v, bool):
                raise bad("true or false")
        elif isinstance(d, (tuple, list)):
            if not isinstance(v, list):
                raise bad("a list")
            if all(isinstance(e, int) and not isinstance(e, bool) for e in d) and d:
                # widths (all positive by default) must be >= 1; indices may be 0
                low = 1 if min(d) > 0 else 0
                if not v or any(
                    isinstance(e, bool) or not isinstance(e, int) or e < low for e in v
                ):
                    raise bad(f"a non-empty list of integers >= {low}")
        elif isinstance(d, int):
            low = 1 if d > 0 else 0
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise bad(f"an integer >= {low}")
        elif isinstance(d, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad("a number")
        elif isinstance(d, str) and not isinstance(v, str):
            raise bad("a string")


def _plain_default(d: Any) -> Any:
    return list(d) if isinstance(d, tuple) else d


def _build_model(name: str, config: dict, impl: str):
    """build_model(name, **config); any failure of the factory on these options becomes one
    ValueError that names the model and the options (not the Python internals behind it)."""
    from ..models import build_model

    kw = dict(config)
    in_shape, num_classes, T = tuple(kw.pop("in_shape")), kw.pop("num_classes"), kw.pop("T")
    try:
        return build_model(name, in_shape=in_shape, num_classes=num_classes, T=T, impl=impl, **kw)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError, AttributeError) as e:
        if isinstance(e, ValueError) and str(e).startswith(f"model {name!r}"):
            raise
        opts = json.dumps(kw, default=str)
        raise ValueError(f"model {name!r} cannot be built with options {opts}: {e}") from e


def _smoke_forward(model, name: str, model_config: dict, device: torch.device) -> None:
    """One eval-mode forward step on a zero input, so model options that build but cannot run
    (a width of 0, a shape the layers do not fit, ...) fail here with one clear message rather
    than deep inside the first batch. Consumes no random numbers and leaves no state."""
    from ..nn.neuron import reset_net
    from .strategies import set_step_mode

    shape = [1, *model_config["in_shape"]]
    was_training = model.training
    model.eval()
    set_step_mode(model, "s")
    try:
        with torch.no_grad():
            out = model(torch.zeros(shape, device=device))
        n = model_config["num_classes"]
        if tuple(out.shape) != (1, n):
            raise ValueError(f"it gives logits of shape {tuple(out.shape)}, expected (1, {n})")
    except (RuntimeError, ValueError, IndexError, TypeError) as e:
        opts = {k: v for k, v in model_config.items() if k not in ("in_shape", "num_classes")}
        msg = " ".join(str(e).split())[:300]
        raise ValueError(
            f"model {name!r} with options {json.dumps(opts, default=str)} cannot run on inputs "
            f"of shape {tuple(model_config['in_shape'])}: {msg}"
        ) from e
    finally:
        reset_net(model)
        model.train(was_training)


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

    def due(self, i: int) -> bool:
        """Whether batch i is drawn (at most ten redraws a second, and the last batch): only
        then does `train_epoch` read the loss and accuracy back from the device for it."""
        return self.enabled and (i >= self.total or time.perf_counter() - self.last >= 0.1)

    def __call__(self, i: int, loss: float, acc: float) -> None:
        if not self.due(i):
            return
        now = self.last = time.perf_counter()
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
    write_file_atomic(path, text.encode())


def _inherited_best(resume_path: Path | None, history: list[dict], best: float) -> bytes | None:
    """The bytes of the best.pt beside the checkpoint a branch resumed from, when that file is
    this run's best epoch so far (its history is a prefix of this run's and its test accuracy is
    `best`); else None."""
    if resume_path is None:
        return None
    src = resume_path.parent / "best.pt"
    try:
        data = src.read_bytes()
        ck = load_checkpoint(src)
    except (OSError, CheckpointError):
        return None
    n = int(ck.get("epoch", 0))
    hist = ck.get("history", [])
    if not 0 < n <= len(history) or hist != history[:n]:
        return None
    return data if hist[-1].get("test_accuracy") == best else None


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


#: What a run writes into its folder. A folder holding any of them holds (part of) a run, whose
#: files another run may replace only with `overwrite` (a user's own config.json or metrics.csv
#: in `--out .` included).
RUN_FILES = ("last.pt", "best.pt", "metrics.json", "metrics.csv", "config.json")


def _held_run_files(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


def _holds_run(folder: Path) -> bool:
    return bool(_held_run_files(folder))


def _check_out_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder; choose a folder path")


def _lock_out(
    cfg: TrainConfig, model_name: str, resume_path: Path | None, resume_stat=None
) -> tuple[Path, Any]:
    """Choose the output folder and lock it (see lock.py); returns (folder, lock).

    An explicit `out` (or, for a resume, the resumed checkpoint's folder) is used as given:
    refused if it is a file, if another run holds its lock, or if it holds files of a run
    (`RUN_FILES`) that this run would replace without continuing it (a fresh run, a resume from
    another folder, or a resume from best.pt), unless `overwrite`; and refused if the
    resumed last.pt changed since it was read (`resume_stat`: another run wrote it meanwhile).
    The default folder `runs/<dataset>-<model>-<strategy>-T<T>` is suffixed -2, -3, ...
    past folders that hold a run's files or are in use; with `overwrite` the default folder
    itself is taken (an error if another run is using it). The checks run after the lock is taken,
    so two runs racing for one folder cannot both pass them.
    """
    from .lock import OutputFolderBusyError

    if cfg.out is not None or resume_path is not None:
        out = Path(cfg.out) if cfg.out is not None else resume_path.parent
        _check_out_folder(out)
        lock = OutputLock(out).acquire()
        last = out / "last.pt"
        continuing = resume_path is not None and last.exists() and last.samefile(resume_path)
        if _holds_run(out) and not cfg.overwrite and not continuing:
            lock.release()
            if resume_path is not None and out.resolve() == resume_path.parent.resolve():
                what = f"{last}, a later checkpoint of" if last.exists() else "the files of"
                raise ValueError(
                    f"resuming from {resume_path} would replace {what} this run; pass --out "
                    f"NEW_FOLDER to branch off, or --overwrite"
                )
            hint = (
                f"pass --resume {out} to continue that run, "
                if resume_path is None and last.exists()
                else ""
            )
            raise ValueError(
                f"output folder {out} already holds files of another run "
                f"({', '.join(_held_run_files(out))}); {hint}--overwrite to replace them, or "
                f"another --out"
            )
        if continuing and resume_stat is not None:
            now = last.stat()
            if (now.st_mtime_ns, now.st_size) != resume_stat:
                lock.release()
                raise ValueError(
                    f"{last} changed while this run started (another run wrote it); "
                    "run the command again to resume from the new checkpoint"
                )
        return out, lock
    base = Path("runs") / f"{cfg.dataset}-{model_name}-{cfg.strategy}-T{cfg.T}"
    if cfg.overwrite:
        # --overwrite replaces the default folder's run, never another (suffixed) one: a busy
        # default folder is an error, not a reason to move on to the next one and replace that.
        _check_out_folder(base)
        return base, OutputLock(base).acquire()
    k = 1
    while True:
        out = base if k == 1 else base.with_name(f"{base.name}-{k}")
        k += 1
        if out.exists() and not out.is_dir():
            continue
        if _holds_run(out):
            continue
        try:
            lock = OutputLock(out).acquire()
        except OutputFolderBusyError:
            continue
        if _holds_run(out):  # another run finished here meanwhile
            lock.release()
            continue
        return out, lock


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


def resume_changes(cfg: TrainConfig, saved: dict, path: object = "checkpoint") -> dict:
    """The settings `cfg` changes relative to the resumed run's saved config.

    Returns {field: (saved, requested)} for the changed fields of `RESUME_CHANGEABLE` (a resumed
    run honours them). Raises ValueError for a changed field of `RESUME_FIXED`. Fields the
    checkpoint does not record are taken as unchanged (checkpoints of older versions).
    """
    now = asdict(cfg)
    for k in RESUME_FIXED:
        if k in saved and saved[k] != now[k]:
            why = {
                "optimizer": "its optimizer state cannot be carried over to another optimizer",
                "batch_size": "the schedule and data order are counted in its batches",
                "seed": "its random streams are restored from the checkpoint",
                "dataset": "the model was trained on that data set",
                "neuron": "the model was built with those neurons",
            }[k]
            raise ValueError(
                f"{path} was trained with {k} {saved[k]!r}; a resumed run cannot use "
                f"{now[k]!r} ({why}). Start a new run to change it"
            )
    return {k: (saved[k], now[k]) for k in RESUME_CHANGEABLE if k in saved and saved[k] != now[k]}


def _apply_hyperparameters(cfg: TrainConfig, optimizer, scheduler) -> None:
    """Put cfg's lr / weight decay / momentum into a restored optimizer and scheduler (their
    state_dicts bring back the saved ones), with the lr at the scheduler's current position."""
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    step = scheduler.last_epoch
    for g, lam in zip(optimizer.param_groups, scheduler.lr_lambdas):
        g["initial_lr"] = cfg.lr
        g["lr"] = cfg.lr * lam(step)
        g["weight_decay"] = cfg.weight_decay
        if cfg.optimizer == "sgd":
            g["momentum"] = cfg.momentum
            g["nesterov"] = cfg.momentum > 0
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train as `cfg` says; returns a summary dict (final metrics, paths, epochs run).

    The output folder is locked for the whole run (a second run into it fails at once), and
    config.json, last.pt, best.pt and the logs are (re)written together at the end of each
    epoch, so the folder never mixes files of two runs. A resumed run honours changed
    `RESUME_CHANGEABLE` settings (it logs them and records them in config.json, which lists
    every resume of the run so far under "resumes") and refuses
    changed `RESUME_FIXED` ones. The global torch RNG is the caller's again afterwards.

    Raises:
        ValueError: a bad configuration (unknown data set / model / strategy, T < 1, ...), an
            output folder in use or holding another run, a setting a resume cannot change.
        CheckpointError: `resume` names a missing, corrupt or incompatible checkpoint.
        DatasetNotFoundError, MissingDependencyError: the data set cannot be loaded.
        TrainingDivergedError: the loss became non-finite (the message says what was kept).
        TrainingInterrupted: Ctrl-C (the message says which checkpoint is left).
    """
    cfg.validate()
    from ..data import load_dataset

    device = resolve_device(cfg.device)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(resolve_threads(cfg.threads, device))
    # The run seeds (and a resume restores) the global torch RNG, which model init and dropout
    # draw from; the caller's own stream is given back afterwards, as it was.
    cuda = list(range(torch.cuda.device_count())) if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):
            return _start(cfg, device, log, load_dataset)
    finally:
        torch.set_num_threads(threads_before)


def _start(cfg: TrainConfig, device: torch.device, log, load_dataset) -> dict:
    ckpt = None
    resume_path = None
    resume_stat = None
    if cfg.resume is not None:
        resume_path = Path(cfg.resume)
        if resume_path.is_dir():
            resume_path = resume_path / "last.pt"
        st = resume_path.stat() if resume_path.is_file() else None
        ckpt = load_checkpoint(resume_path)  # fail before anything is written or trained
        if st is not None:
            resume_stat = (st.st_mtime_ns, st.st_size)

    dist = ddp.init_distributed(device)
    if dist.enabled and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    state = _RunState()
    try:
        return _run(cfg, device, dist, ckpt, (resume_path, resume_stat), load_dataset, log, state)
    except KeyboardInterrupt as e:
        if isinstance(e, TrainingInterrupted):
            raise
        raise TrainingInterrupted(f"interrupted; {state.describe()}") from None
    finally:
        if state.lock is not None:
            state.lock.release()
        ddp.cleanup(dist)


class _RunState:
    """What is on disk for this run, so errors and interrupts can say what is true."""

    def __init__(self) -> None:
        self.out: Path | None = None
        self.lock = None
        self.saved_epoch: int | None = None  # epoch of out/last.pt written by this run
        self.resumed: tuple[Path, int] | None = None  # (checkpoint resumed from, its epoch)
        self.preexisting = False  # out/last.pt of an earlier run was there at the start
        self.main = True  # only rank 0 writes (and knows what it wrote)

    def describe(self) -> str:
        if not self.main:
            return "rank 0 saves the checkpoints and reports what was kept"
        if self.out is None:
            return "nothing was written"
        last = self.out / "last.pt"
        if self.saved_epoch is not None:
            return f"the last good checkpoint, {last} (epoch {self.saved_epoch}), was kept"
        if self.resumed is not None and self.resumed[0].resolve() == last.resolve():
            return (
                f"no epoch finished in this run; the checkpoint it resumed from, {last} "
                f"(epoch {self.resumed[1]}), is unchanged"
            )
        msg = f"no epoch finished, so this run saved no checkpoint in {self.out}"
        if self.preexisting:
            msg += f" (the earlier run's {last} there is unchanged)"
        if self.resumed is not None:
            msg += f"; the checkpoint it resumed from, {self.resumed[0]}, is unchanged"
        return msg


class _DeferInterrupt:
    """Hold Ctrl-C until the block ends (the main thread only), so the checkpoints and logs of
    an epoch are all written, never some of them."""

    def __enter__(self):
        import signal
        import threading

        self.pending = False
        self.old = None
        if threading.current_thread() is threading.main_thread():
            try:
                self.old = signal.signal(signal.SIGINT, self._hold)
            except ValueError:
                self.old = None
        return self

    def _hold(self, signum, frame) -> None:
        self.pending = True

    def __exit__(self, *exc) -> None:
        import signal

        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.pending and exc[0] is None:
            raise KeyboardInterrupt


def _run(cfg, device, dist, ckpt, resume, load_dataset, log, state) -> dict:
    resume_path, resume_stat = resume
    from ..data import EVENT_DATASETS

    changes: dict = {}
    if ckpt is not None:  # settings a resume cannot change: refused before any work
        saved = dict(ckpt.get("extra", {}).get("config", {}))
        saved_ds = saved.get("dataset")
        if saved_ds is not None and saved_ds != cfg.dataset:
            raise CheckpointError(
                f"{resume_path} was trained on dataset {saved_ds!r}, not {cfg.dataset!r}"
            )
        changes = resume_changes(cfg, saved, resume_path)
        saved_ws = ckpt.get("extra", {}).get("world_size")
        if saved_ws is not None and saved_ws != dist.world_size:
            raise ValueError(
                f"{resume_path} was trained with world size {saved_ws} (processes); a "
                f"resumed run cannot use {dist.world_size} (the schedule and data order are "
                "counted in the batches of all processes together). Resume with as many "
                "processes, or start a new run"
            )
    kw = {"T": cfg.T} if cfg.dataset in EVENT_DATASETS else {}
    train_set, test_set, info = load_dataset(cfg.dataset, cfg.data_root, **kw)
    model_name = cfg.model if cfg.model != "auto" else info.default_model
    if not model_name:
        raise ValueError(f"dataset {cfg.dataset!r} has no default model; pass --model NAME")
    from ..models import MODELS

    if model_name not in MODELS:
        raise ValueError(f"unknown model {model_name!r}; available: {', '.join(sorted(MODELS))}")
    check_model_options(model_name, cfg.model_options)
    if cfg.neuron == "lif":
        defaults = _option_defaults(model_name)
        if defaults and "neuron" not in defaults:
            raise ValueError(
                f"model {model_name!r} cannot build LIF neurons (it takes no 'neuron' option); "
                "use --neuron empf or a model that supports LIF"
            )
    model_config = cfg.model_config(info.in_shape, info.num_classes)
    if ckpt is not None:
        check_compatible(ckpt, model_name, model_config, path=resume_path, exact=True)

    torch.manual_seed(cfg.seed)
    model = _build_model(model_name, model_config, cfg.impl).to(device)
    _smoke_forward(model, model_name, model_config, device)
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
    _check_single_sample_batch(model, len(train_set), cfg.batch_size, dist.world_size)
    scheduler = _make_scheduler(cfg, optimizer, steps)
    scaler = make_grad_scaler(device, cfg.precision)
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
        try:
            if ckpt.get("optimizer") is not None:
                optimizer.load_state_dict(ckpt["optimizer"])
            if ckpt.get("scheduler") is not None:
                scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"the optimizer state in {resume_path} does not fit this run's "
                f"{cfg.optimizer} optimizer ({type(e).__name__}: {e})"
            ) from e
        _apply_hyperparameters(cfg, optimizer, scheduler)
        scaler_state = ckpt.get("extra", {}).get("grad_scaler")
        if scaler is not None and scaler_state:
            scaler.load_state_dict(scaler_state)
        restore_rng(ckpt["rng"], gens)
        # under DDP each rank continues its own augmentation stream (saved by rank 0 for all)
        per_rank = ckpt["rng"].get("generators", {}).get(f"augment@rank{dist.rank}")
        if dist.enabled and per_rank is not None:
            gens["augment"].set_state(per_rank)
        start_epoch = int(ckpt["epoch"])
        history = list(ckpt.get("history", []))
        best = max((h.get("test_accuracy", -1.0) for h in history), default=-1.0)
        state.resumed = (resume_path, start_epoch)
    refused: BaseException | None = None
    if dist.is_main:
        try:
            out, state.lock = _lock_out(cfg, model_name, resume_path, resume_stat)
            state.preexisting = (out / "last.pt").exists()
        except (ValueError, OSError) as e:  # the output folder is refused: tell the ranks
            refused = e
    else:
        out = Path(cfg.out) if cfg.out is not None else Path(".")
        state.main = False
    if (
        dist.enabled
        and ddp.all_reduce_sum([float(refused is None)], device, dist)[0] < dist.world_size
    ):
        # every rank stops here with one line, instead of the others failing inside DDP's
        # constructor when rank 0 leaves
        if refused is None:
            raise ValueError("rank 0 refused the output folder (its error says why)")
    if refused is not None:
        raise refused
    state.out = out
    same_folder = (
        (out / "last.pt").exists()
        and resume_path is not None
        and ((out / "last.pt").samefile(resume_path))
    )
    wrapped = ddp.wrap_model(model, device, dist, cfg.sync_bn)
    train_model = compile_model(wrapped, cfg.compile)
    eval_model = train_model if wrapped is model else compile_model(model, cfg.compile)
    conf = asdict(cfg)
    conf.update(
        model_resolved=model_name,
        model_config=model_config,
        device_resolved=str(device),
        world_size=dist.world_size,
    )
    # Every resume of this run's chain, oldest first (each checkpoint carries the list so far):
    # config.json records them all, the latest also as resumed_from / changed_on_resume.
    resumes = list(ckpt.get("extra", {}).get("resumes", [])) if ckpt is not None else []
    if ckpt is not None:
        conf["resumed_from"] = {"checkpoint": str(resume_path), "epoch": start_epoch}
        conf["changed_on_resume"] = {k: {"saved": a, "now": b} for k, (a, b) in changes.items()}
        resumes.append({**conf["resumed_from"], "changed": conf["changed_on_resume"]})
        conf["resumes"] = resumes
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        log(
            f"empf train: {cfg.dataset} ({len(train_set)} train / {len(test_set)} test), "
            f"model {model_name} ({n_params:,} params, weight_bits={cfg.weight_bits}"
            f"{', LIF neurons' if cfg.neuron == 'lif' else ''}), "
            f"strategy {cfg.strategy}, T={cfg.T}, {_plural(cfg.epochs, 'epoch')}, "
            f"batch {cfg.batch_size}"
            f"{f' x {dist.world_size} ranks' if dist.enabled else ''}, device {device}"
            f"{'' if cfg.precision == 'fp32' else f', {cfg.precision} autocast'}"
            f"{'' if cfg.compile == 'none' else f', torch.compile {cfg.compile}'}, "
            f"out {out}" + (f", resumed at epoch {start_epoch}" if ckpt is not None else "")
        )
        if changes:
            log(
                "resumed with changed settings (honoured from here on): "
                + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())
            )
        if ckpt is not None and start_epoch >= cfg.epochs:
            log(
                f"checkpoint {resume_path} already completed {_plural(start_epoch, 'epoch')} of "
                f"{cfg.epochs}; nothing to train (raise --epochs to continue)"
            )

    transform = info.train_transform if cfg.augment else None
    extra = {"config": {k: v for k, v in asdict(cfg).items() if k != "model_options"}}
    extra["config"]["model_options"] = json.dumps(cfg.model_options or {})
    extra["world_size"] = dist.world_size
    if resumes:
        extra["resumes"] = resumes
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
            train_model,
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
            precision=cfg.precision,
            scaler=scaler,
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
        ev = evaluate(
            eval_model, test_batches, cfg.T, is_event=info.is_event, precision=cfg.precision
        )
        # Sum counts over ranks (each evaluated and trained on its own shard).
        sums = ddp.all_reduce_sum(
            [
                r.loss * r.samples,
                r.samples,
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
                f"training diverged at epoch {epoch + 1} (train loss {train_loss}); "
                f"{state.describe()}. Try a lower --lr."
            )
        history.append(row)
        run_epochs += 1
        saved_gens = gens
        if dist.enabled:  # every rank takes part; rank 0 saves each rank's augmentation state
            saved_gens = dict(gens)
            for rank, st in enumerate(ddp.all_gather_states(gens["augment"], dist)):
                saved_gens[f"augment@rank{rank}"] = torch.Generator().set_state(st)
        if dist.is_main:
            log(
                f"epoch {epoch + 1:3d}/{cfg.epochs} loss {train_loss:.4f} "
                f"train {train_acc * 100:5.2f}% test {anytime[-1] * 100:5.2f}% "
                f"(anytime {' '.join(f'{a * 100:.1f}' for a in anytime)}) "
                f"{r.seconds:5.1f}s {mem_key.replace('_mb', '')} {mem:.0f} MB"
            )
            if scaler is not None:
                extra["grad_scaler"] = {
                    k: (float(v) if isinstance(v, float) else v)
                    for k, v in scaler.state_dict().items()
                }
            ck = {
                "model": model,
                "model_name": model_name,
                "model_config": model_config,
                "optimizer": optimizer,
                "scheduler": scheduler,
                "epoch": epoch + 1,
                "generators": saved_gens,
                "history": history,
                "extra": extra,
            }
            # All of an epoch's files, or none: Ctrl-C waits until they are written.
            with _DeferInterrupt():
                first = state.saved_epoch is None and not same_folder
                inherited = None
                if first and anytime[-1] <= best:  # a branch whose best epoch came before it
                    inherited = _inherited_best(resume_path, history, best)
                if first:
                    # An earlier run's files here (--overwrite) go before this run writes any,
                    # so a crash mid-save never leaves the two runs' files side by side.
                    for name in RUN_FILES:
                        (out / name).unlink(missing_ok=True)
                save_checkpoint(out / "last.pt", **ck)
                # The first save into a folder other than the resumed one writes best.pt too,
                # so best.pt never belongs to another run or is missing: the branch's own best
                # epoch (copied from the folder it branched off) or this one.
                if inherited is not None:
                    write_file_atomic(out / "best.pt", inherited)
                elif anytime[-1] > best or first:
                    save_checkpoint(out / "best.pt", **ck)
                    if anytime[-1] <= best:
                        log(f"best.pt: the best epoch so far is not in {resume_path.parent}; "
                            f"best.pt holds epoch {epoch + 1} until a better one")  # fmt: skip
                best = max(best, anytime[-1])
                _write_logs(out, history)
                _atomic_write_text(
                    out / "config.json", json.dumps(conf, indent=1, default=str) + "\n"
                )
                state.saved_epoch = epoch + 1
        summary = row
    ddp.barrier(dist)
    return {
        "rank": dist.rank,  # under DDP only rank 0's summary has the run's best and folder
        "out": str(out),
        "model": model_name,
        "epochs_run": run_epochs,
        "epochs_done": start_epoch + run_epochs,
        "best_test_accuracy": best,
        "final": summary,
        "history": history,
    }


def _check_single_sample_batch(model, n: int, batch_size: int, world_size: int) -> None:
    """Refuse, before any training, a batch size that leaves a training batch of one sample
    when the model has batch norm: its training statistics need more than one value per
    channel, so that batch would stop the run at the end of the first epoch."""
    from ..nn.membn import MemBN

    per_rank = (n - n % world_size) // world_size
    last = per_rank % batch_size or min(batch_size, per_rank)
    if last != 1 or not any(
        isinstance(m, (nn.modules.batchnorm._BatchNorm, MemBN)) for m in model.modules()
    ):
        return
    where = f" on each of {world_size} processes" if world_size > 1 else ""
    raise ValueError(
        f"--batch-size {batch_size} leaves a training batch of 1 sample ({per_rank} training "
        f"samples{where}), and the model's batch norm cannot train on one sample; choose "
        "another --batch-size"
    )


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


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
