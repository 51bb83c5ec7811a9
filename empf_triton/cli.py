"""The `empf` command: `empf train`, `empf eval`, `empf report`.

    empf train                       # the main job: MNIST-1D, binary weights, online (random step)
    empf train --dataset digits --epochs 5
    empf train --resume runs/mnist1d-mnist1d_cnn-random_step-T4
    empf eval --checkpoint runs/mnist1d-mnist1d_cnn-random_step-T4/best.pt
    empf report                      # PNG plots of the runs' logs (+ benchmark JSON with --bench)
    torchrun --nproc_per_node=2 -m empf_triton.cli train --dataset digits

User errors (unknown data set / model / strategy, T < 1, a number out of range, a checkpoint of
another model, a corrupt or truncated checkpoint, missing data files, an output folder in use,
...) print one line on stderr and exit with status 2, without a traceback; set EMPF_DEBUG=1 to
see the traceback. Ctrl-C exits with status 130 and says which checkpoint is left on disk.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from ._files import check_output_file, write_file_atomic
from .deploy import cli as deploy_cli

__all__ = ["main"]


class UsageError(ValueError):
    """A bad command line (reported like every other user error)."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit status 2): `empf train: error: ... (see --help)`."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: The range of every numeric option of every subcommand, by argparse dest:
#: (int or float, lower bound, lower bound included, upper bound, upper bound included).
NUMERIC_OPTIONS: dict[str, tuple[type, float, bool, float, bool]] = {
    "T": (int, 1, True, math.inf, False),
    "epochs": (int, 1, True, math.inf, False),
    "batch_size": (int, 1, True, math.inf, False),
    "eval_batch_size": (int, 1, True, math.inf, False),
    "stop_after": (int, 1, True, math.inf, False),
    "threads": (int, 0, True, 1024, True),  # torch.set_num_threads(100000) segfaults
    "seed": (int, 0, True, 2**32 - 1, True),  # torch's CPU generator keeps a seed's low 32 bits
    "spike_bits": (int, 1, True, 8, True),
    "lr": (float, 0, False, math.inf, False),
    "weight_decay": (float, 0, True, math.inf, False),
    "momentum": (float, 0, True, 1, False),
    "warmup_epochs": (float, 0, True, math.inf, False),
    "spike_step": (float, 0, False, math.inf, False),
    "grad_clip": (float, 0, False, math.inf, False),
    "tau": (float, 1, False, math.inf, False),
    "v_threshold": (float, 0, False, math.inf, False),
    "surrogate_alpha": (float, 0, False, math.inf, False),
    # empf eval --deployed / empf report --deployed (registered by empf_triton.deploy.cli)
    "energy_samples": (int, 1, True, math.inf, False),
    "latency_runs": (int, 1, True, math.inf, False),
    "samples": (int, 1, True, math.inf, False),
}


def _number(dest: str, none_words: tuple[str, ...] = ()):
    """An argparse `type` that parses option `dest` and checks it against NUMERIC_OPTIONS."""
    kind, lo, lo_in, hi, hi_in = NUMERIC_OPTIONS[dest]

    def parse(text: str):
        if text.strip().lower() in none_words:
            return None
        what = "an integer" if kind is int else "a number"
        fmt = "d" if kind is int else "g"  # 4294967295, not 4.29497e+09
        a, b = f"{kind(lo):{fmt}}", "" if hi == math.inf else f"{kind(hi):{fmt}}"
        rng = f"{'>=' if lo_in else '>'} {a}"
        if hi != math.inf:
            rng = f"in {'[' if lo_in else '('}{a}, {b}{']' if hi_in else ')'}"
        alt = f" or {'/'.join(none_words)}" if none_words else ""
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what} {rng}{alt}, got {text!r}") from None
        ok = math.isfinite(v) and (v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what} {rng}{alt}, got {text!r}")
        return v

    parse.__name__ = dest
    return parse


def _nonempty(what: str):
    """An argparse `type` refusing an empty or blank value (an unset shell variable): an empty
    path would mean the current folder (or, for --json, no file at all), an empty --dataset or
    --model would read as "not given"."""

    def parse(text: str) -> str:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}")
        return text

    return parse


_path = _nonempty("path")  # file and folder options
_name = _nonempty("name")  # --dataset, --model


def _weight_bits(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if v not in (1, 1.5, 32):
        raise argparse.ArgumentTypeError(f"must be 1, 1.5 or 32, got {s!r}")
    return int(v) if v.is_integer() else v


def _json_object(s: str) -> dict:
    try:
        v = json.loads(s)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"is not valid JSON ({e.msg}): {s!r}") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object such as '{{\"hidden\": [64]}}', got {s!r}"
        )
    return v


def _train_parser(sub) -> argparse.ArgumentParser:
    from .train.loop import LIF_DEFAULTS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train an EM-PF (or LIF) spiking network. Defaults: the README's main job "
        "(MNIST-1D, binary hidden weights, random-step online training, T=4). The output "
        "folder is locked while a run uses it. --resume continues a run with its saved "
        "settings; a changed learning rate, schedule, epoch count, strategy, precision, ... is "
        "honoured and logged, while a changed model, data set, optimizer, batch size or seed is "
        "refused.",
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a(
        "--dataset",
        type=_name,
        help=f"mnist1d, digits, cifar10, cifar100, dvs_cifar10, dvs_gesture (default {d.dataset})",
    )
    a(
        "--data-root",
        dest="data_root",
        type=_path,
        help="folder of the data files (cifar/dvs) or of the cache (default: the data set's)",
    )
    a(
        "--model",
        type=_name,
        help=f"registered model name, or auto for the data set's net (default {d.model})",
    )
    a("--T", "-T", type=_number("T"), help=f"time steps, >= 1 (default {d.T})")
    a("--strategy", help=f"online, random_step, accumulate or bptt (default {d.strategy})")
    a("--epochs", type=_number("epochs"), help=f"total epochs of the run (default {d.epochs})")
    a(
        "--batch-size",
        dest="batch_size",
        type=_number("batch_size"),
        help=f"training batch size per process (default {d.batch_size})",
    )
    a(
        "--eval-batch-size",
        dest="eval_batch_size",
        type=_number("eval_batch_size"),
        help=f"batch size of the test-set evaluation after each epoch (default "
        f"{d.eval_batch_size})",
    )
    a("--optimizer", help=f"adamw or sgd (momentum, Nesterov) (default {d.optimizer})")
    a("--lr", type=_number("lr"), help=f"peak learning rate, > 0 (default {d.lr})")
    a(
        "--weight-decay",
        dest="weight_decay",
        type=_number("weight_decay"),
        help=f"weight decay, >= 0 (default {d.weight_decay})",
    )
    a(
        "--momentum",
        type=_number("momentum"),
        help=f"SGD momentum in [0, 1), Nesterov when > 0 (default {d.momentum})",
    )
    a("--schedule", help=f"learning-rate schedule: cosine or constant (default {d.schedule})")
    a(
        "--warmup-epochs",
        dest="warmup_epochs",
        type=_number("warmup_epochs"),
        help=f"epochs of linear learning-rate warm-up, may be fractional (default "
        f"{d.warmup_epochs:g})",
    )
    a(
        "--weight-bits",
        dest="weight_bits",
        type=_weight_bits,
        help="1 (binary), 1.5 (ternary) or 32 (full precision) hidden weights (default 1)",
    )
    a(
        "--spike-bits",
        dest="spike_bits",
        type=_number("spike_bits", ("none", "float")),
        help="k-bit spikes, k in 1..8, or none for float spikes (default none)",
    )
    a(
        "--spike-step",
        dest="spike_step",
        type=_number("spike_step"),
        help="the k-bit spike quantiser's step: a spike is round(s / step) * step, clamped to "
        f"0..(2^k - 1) * step; used only with --spike-bits (default {d.spike_step})",
    )
    a(
        "--parallel",
        action="store_true",
        help="parallel (stateless) neurons: every second one of the net (ResNets: each block's "
        "second; the small nets need two or more blocks)",
    )
    a("--seca", action="store_true", help="SECA channel attention on the input currents")
    a("--mem-bn", dest="mem_bn", action="store_true", help="Mem-BN (per-step membrane BN)")
    a(
        "--neuron",
        choices=("empf", "lif"),
        help="empf (EM-PF) or lif (the LIF baseline with a surrogate gradient) (default empf)",
    )
    a(
        "--tau",
        type=_number("tau"),
        help=f"LIF time constant, > 1; decay 1 - 1/tau (default {LIF_DEFAULTS['tau']}; "
        "--neuron lif only)",
    )
    a(
        "--v-threshold",
        dest="v_threshold",
        type=_number("v_threshold"),
        help=f"LIF firing threshold, > 0 (default {LIF_DEFAULTS['v_threshold']}; --neuron lif "
        "only)",
    )
    a(
        "--surrogate",
        choices=("sigmoid", "atan", "triangle"),
        help="LIF surrogate gradient (default sigmoid; --neuron lif only)",
    )
    a(
        "--surrogate-alpha",
        dest="surrogate_alpha",
        type=_number("surrogate_alpha"),
        help="the surrogate's sharpness, > 0 (default: the surrogate's own, sigmoid 4, atan 2, "
        "triangle 1; --neuron lif only)",
    )
    a(
        "--detach-reset",
        dest="detach_reset",
        action="store_true",
        help="LIF: detach the spike in the soft reset (--neuron lif only)",
    )
    a(
        "--model-options",
        dest="model_options",
        type=_json_object,
        help="extra model options as a JSON object, e.g. '{\"channels\": [32, 32, 64, 64]}'",
    )
    a("--impl", help="kernels: auto (Triton on CUDA), triton or reference (default auto)")
    a(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        help="fp32, or bf16/fp16 autocast for convolutions and linears (the neurons compute "
        "in fp32 and carry their membrane in the currents' dtype; fp16 adds a gradient "
        "scaler) (default fp32)",
    )
    a(
        "--compile",
        choices=("none", "default", "reduce-overhead"),
        help="torch.compile the model: none, default, or reduce-overhead (CUDA graphs; on a CPU "
        "the same as default) (default none)",
    )
    a("--no-augment", dest="augment", action="store_false", help="no train-time augmentation")
    a(
        "--grad-clip",
        dest="grad_clip",
        type=_number("grad_clip"),
        help="clip the gradient norm to this, > 0 (default: no clipping)",
    )
    a("--sync-bn", dest="sync_bn", action="store_true", help="SyncBatchNorm under DDP (CUDA)")
    a("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    a("--threads", type=_number("threads"), help="CPU threads (default 0 = auto: 1 on CPU)")
    a("--seed", type=_number("seed"), help=f"random seed, 0 to 2^32 - 1 (default {d.seed})")
    a(
        "--out",
        type=_path,
        help="output folder (default runs/<dataset>-<model>-<strategy>-T<T>, or the first of "
        "its -2, -3, ... variants that holds no run)",
    )
    a("--resume", type=_path, help="checkpoint file or run folder to continue from")
    a(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out holding a run's files (removed at the first save)",
    )
    a(
        "--stop-after",
        dest="stop_after",
        type=_number("stop_after"),
        help="stop after N epochs in this invocation (resume later)",
    )
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.checkpoint import CheckpointError, load_checkpoint
    from .train.loop import LIF_FIELDS, RUN_CONTROL, TrainConfig, run_training

    explicit = {k: v for k, v in vars(args).items() if k != "command"}
    base = asdict(TrainConfig())
    if explicit.get("resume") is not None:
        path = Path(explicit["resume"])
        ckpt = load_checkpoint(path / "last.pt" if path.is_dir() else path)
        saved = dict(ckpt.get("extra", {}).get("config", {}))
        if isinstance(saved.get("model_options"), str):
            try:
                saved["model_options"] = json.loads(saved["model_options"]) or None
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path} records unreadable model options: {e}") from e
        names = {f.name for f in fields(TrainConfig)} - set(RUN_CONTROL)
        if explicit.get("neuron", saved.get("neuron")) != saved.get("neuron"):
            # another neuron type (refused by run_training): do not inherit the LIF options
            names -= set(LIF_FIELDS)
        base.update({k: v for k, v in saved.items() if k in names})
    base.update(explicit)
    cfg = TrainConfig(**base)
    summary = run_training(cfg)
    if summary["epochs_run"] and summary["final"] and summary.get("rank", 0) == 0:
        f = summary["final"]
        best = summary["best_test_accuracy"] * 100
        print(
            f"done: test accuracy {f['test_accuracy'] * 100:.2f}% after "
            f"{_plural(summary['epochs_done'], 'epoch')} (best {best:.2f}%); logs and "
            f"checkpoints in {summary['out']}"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import EVENT_DATASETS, load_dataset
    from .train.checkpoint import load_checkpoint
    from .train.loop import build_from_checkpoint, resolve_device, resolve_threads
    from .train.precision import compile_model
    from .train.strategies import evaluate, iterate_batches

    if args.json:  # before the work, for both sources
        check_output_file(args.json, "--json", overwrite=args.overwrite)
    elif args.overwrite:
        raise UsageError("--overwrite applies to --json (the only file empf eval writes)")
    if args.deployed is not None or args.checkpoint is None:
        return deploy_cli.cmd_eval(args)
    given = [f for f, v in (("--energy-samples", args.energy_samples),
                            ("--latency-runs", args.latency_runs)) if v is not None]  # fmt: skip
    if given:
        verb = "applies" if len(given) == 1 else "apply"
        raise UsageError(f"{' and '.join(given)} {verb} to --deployed, not to --checkpoint")
    step_mode = args.step_mode or "m"
    compile_mode = args.compile or "none"
    device = resolve_device(args.device)
    torch.set_num_threads(resolve_threads(args.threads, device))
    ckpt = load_checkpoint(args.checkpoint)
    saved = ckpt.get("extra", {}).get("config", {})
    # the precision the run evaluated in, so the accuracy is the one its log shows
    precision = args.precision or saved.get("precision") or "fp32"
    dataset = args.dataset or saved.get("dataset")
    if not dataset:
        raise UsageError(f"{args.checkpoint} does not record its data set; pass --dataset")
    cfg = ckpt["model_config"]
    kw = {"T": int(cfg["T"])} if dataset in EVENT_DATASETS else {}
    _, test_set, info = load_dataset(dataset, args.data_root or saved.get("data_root"), **kw)
    if list(info.in_shape) != list(cfg["in_shape"]) or info.num_classes != cfg["num_classes"]:
        raise UsageError(
            f"{args.checkpoint} is a model for inputs {tuple(cfg['in_shape'])} with "
            f"{cfg['num_classes']} classes; dataset {dataset!r} has {info.in_shape} and "
            f"{info.num_classes}"
        )
    model = build_from_checkpoint(ckpt, impl=args.impl, path=args.checkpoint).to(device)
    T = int(cfg["T"])
    ev = evaluate(
        compile_model(model, compile_mode),
        iterate_batches(test_set, args.batch_size, device=device),
        T,
        is_event=info.is_event,
        step_mode=step_mode,
        precision=precision,
    )
    print(
        f"{ckpt['model_name']} on {dataset} (epoch {ckpt['epoch']}, T={T}"
        f"{'' if precision == 'fp32' else f', {precision} autocast'}): test accuracy "
        f"{ev['accuracy'] * 100:.2f}% ({ev['correct']}/{ev['samples']}), loss {ev['loss']:.4f}"
    )
    print(
        "anytime accuracy: "
        + ", ".join(f"t={t + 1} {a * 100:.2f}%" for t, a in enumerate(ev["anytime"]))
    )
    if args.json:
        record = {
            "checkpoint": str(args.checkpoint),
            "model": ckpt["model_name"],
            "dataset": dataset,
            "epoch": ckpt["epoch"],
            "precision": precision,
            "compile": compile_mode,
            **ev,
        }
        data = (json.dumps(record, indent=1) + "\n").encode()
        write_file_atomic(Path(args.json), data, overwrite=args.overwrite)
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _load_bench_report():
    """bench/report.py's module (found next to the package in a source checkout), or None."""
    here = Path(__file__).resolve().parent.parent
    candidates = [Path.cwd() / "bench" / "report.py", here / "bench" / "report.py"]
    for path in candidates:
        if path.is_file():
            spec = importlib.util.spec_from_file_location("empf_bench_report", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            if hasattr(mod, "main"):
                return mod
    return None


#: Fields every epoch row of a metrics.json must hold for `empf report` (numbers).
_LOG_FIELDS = ("epoch", "train_loss", "train_accuracy", "test_accuracy")


def read_training_log(run_dir: Path) -> list[dict]:
    """The epoch rows of `run_dir/metrics.json`, checked: a list of objects, each with the
    numeric fields of `_LOG_FIELDS` (and, if present, `anytime_accuracy` a list of numbers).

    Raises:
        UsageError: naming the file, the row and the missing or malformed field.
    """
    f = Path(run_dir) / "metrics.json"
    try:
        hist = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"cannot read training log {f}: {e}") from e
    if not isinstance(hist, list) or not hist:
        raise UsageError(f"training log {f} holds no epochs (expected a list of epoch rows)")

    def num(v: object) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for i, row in enumerate(hist):
        if not isinstance(row, dict):
            raise UsageError(f"training log {f}: row {i + 1} is not an object")
        for k in _LOG_FIELDS:
            if k not in row:
                raise UsageError(f"training log {f}: row {i + 1} lacks the field {k!r}")
            if not num(row[k]):
                raise UsageError(
                    f"training log {f}: row {i + 1} field {k!r} is not a number: {row[k]!r}"
                )
        any_t = row.get("anytime_accuracy")
        if any_t is not None and not (isinstance(any_t, list) and all(map(num, any_t))):
            raise UsageError(
                f"training log {f}: row {i + 1} field 'anytime_accuracy' is not a list of numbers"
            )
    return hist


def run_names(run_dirs: Sequence[Path]) -> list[str]:
    """Each run's label in the table and plots: its folder's name, or the path as given where
    two runs' folders share a name (x/run and y/run)."""
    names = [Path(d).name for d in run_dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, run_dirs)]


def run_table(runs: Sequence[tuple[str, list[dict]]]) -> str:
    """A markdown table of each run's final, best (with its epoch) and last-epoch anytime
    accuracy (%)."""
    lines = [
        "| run | epochs | final acc % | best acc % (epoch) | anytime acc % (t = 1..T) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, hist in runs:
        last = hist[-1]
        best = max(hist, key=lambda h: h["test_accuracy"])
        any_t = last.get("anytime_accuracy") or []
        lines.append(
            f"| {name} | {last['epoch']} | {100 * last['test_accuracy']:.2f} | "
            f"{100 * best['test_accuracy']:.2f} ({best['epoch']}) | "
            f"{' / '.join(f'{100 * a:.1f}' for a in any_t) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def _zoom(ax, values: Sequence[float], pad_frac: float = 0.08, min_span: float = 2.0) -> None:
    """Limit the y axis to the range the values occupy (plus a margin), within [0, 100]."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return
    lo, hi = min(vals), max(vals)
    span = max(hi - lo, min_span)
    mid = (lo + hi) / 2
    lo, hi = mid - span / 2 - pad_frac * span, mid + span / 2 + pad_frac * span
    ax.set_ylim(max(lo, 0.0), min(hi, 100.0))


def plot_training_logs(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """Accuracy curves (test and train accuracy per epoch), the final anytime accuracy and the
    loss of each run folder holding a metrics.json, with the accuracy axes zoomed to the range
    the runs occupy; writes runs.md (see `run_table`). Returns the files written."""
    import matplotlib.ticker

    from ._plot import save_png, subplots

    runs = [(n, read_training_log(Path(d))) for n, d in zip(run_names(run_dirs), run_dirs)]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
    acc_vals: list[float] = []
    any_vals: list[float] = []
    for name, hist in runs:
        ep = [h["epoch"] for h in hist]
        test = [100 * h["test_accuracy"] for h in hist]
        train = [100 * h["train_accuracy"] for h in hist]
        acc_vals += test + train
        line = ax1.plot(ep, test, marker="o", ms=3, label=f"{name} test")[0]
        ax1.plot(ep, train, ls="--", color=line.get_color(), label=f"{name} train")
        any_t = [100 * a for a in hist[-1].get("anytime_accuracy") or []]
        any_vals += any_t
        ax2.plot(range(1, len(any_t) + 1), any_t, marker="o", color=line.get_color(), label=name)
    ax1.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy per epoch")
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    _zoom(ax1, acc_vals)
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set(
        xlabel="time steps used (t)",
        ylabel="test accuracy (%)",
        title="anytime accuracy (last epoch)",
    )
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    _zoom(ax2, any_vals)
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = out / "accuracy.png"
    save_png(fig, path)
    written.append(path)

    fig, ax = subplots(figsize=(5.5, 4))
    for name, hist in runs:
        ax.plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], label=name)
    losses = [h["train_loss"] for _, hist in runs for h in hist]
    log_scale = all(math.isfinite(v) and v > 0 for v in losses)
    ax.set(
        xlabel="epoch", ylabel="train loss", yscale="log" if log_scale else "linear",
        title="training loss",
    )  # fmt: skip
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "loss.png"
    save_png(fig, path)
    written.append(path)

    path = out / "runs.md"
    write_file_atomic(path, ("# Training runs\n\n" + run_table(runs)).encode())
    written.append(path)
    return written


def plot_training_bench(json_files: Sequence[str], out: Path) -> list[Path]:
    """Memory and time per step vs T for each training strategy, from the `train_step` records
    of bench/test_bench_training.py, plus the EM-PF / LIF step times. Returns the PNGs written."""
    import matplotlib.ticker

    from ._plot import save_png, subplots

    rows, neuron, device = [], {}, None
    for f in json_files:
        try:
            doc = json.loads(Path(f).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read benchmark file {f}: {e}") from e
        for b in doc.get("benchmarks", []) if isinstance(doc, dict) else []:
            e = b.get("extra_info", {})
            device = device or e.get("device")
            if e.get("op") == "train_step":
                rows.append(e)
            elif e.get("op") == "neuron_step" and "time_median_s" in e:
                neuron[e["neuron"]] = e["time_median_s"]
    written: list[Path] = []
    if not rows and not neuron:
        return written
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        fig, (ax1, ax2) = subplots(1, 2, figsize=(11, 4))
        for strategy in sorted({r["strategy"] for r in rows}):
            rs = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["T"])
            Ts = [r["T"] for r in rs]
            mem = [r.get("cuda_peak_bytes") or r.get("saved_peak_bytes") or 0 for r in rs]
            ax1.plot(Ts, [m / 2**20 for m in mem], marker="o", label=strategy)
            ax2.plot(Ts, [1e3 * r["time_per_step_s"] for r in rs], marker="o", label=strategy)
        cuda = any(r.get("cuda_peak_bytes") for r in rows)
        ax1.set(
            xlabel="T", ylabel="MiB", xscale="log", yscale="log",
            title="CUDA peak memory per batch" if cuda else "bytes saved for backward (peak)",
        )  # fmt: skip
        ax2.set(xlabel="T", ylabel="ms per time step", xscale="log", title="training time")
        for ax in (ax1, ax2):
            ax.set_xticks(sorted({r["T"] for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"online training vs BPTT ({rows[0].get('model')}, {device})", fontsize=9)
        fig.tight_layout()
        path = out / "training_memory_speed.png"
        save_png(fig, path)
        written.append(path)
    if neuron:
        fig, ax = subplots(figsize=(4.5, 3.5))
        names = sorted(neuron)
        ax.bar(
            names, [1e3 * neuron[n] for n in names], color=["tab:blue", "tab:gray"][: len(names)]
        )
        ax.set(ylabel="ms per batch (online, T=4)", title=f"EM-PF vs LIF step ({device})")
        if "empf" in neuron and "lif" in neuron:
            ax.set_xlabel(f"EM-PF / LIF = {neuron['empf'] / neuron['lif']:.2f} (target <= 1.2)")
        fig.tight_layout()
        path = out / "training_empf_vs_lif.png"
        save_png(fig, path)
        written.append(path)
    return written


def _cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out)
    there = next(p for p in (out, *out.parents) if p.exists() or p.is_symlink())
    if not there.is_dir():  # before any work, not after the plots are drawn
        where = "" if there == out else f": {there} is a file"
        raise UsageError(f"--out {out} is a file{where}; give a folder for the report")
    if args.deployed is not None:
        given = [f for f in ("runs", "bench") if getattr(args, f) is not None]
        if given:
            raise UsageError(
                f"{' and '.join('--' + f for f in given)} report training runs and benchmarks; "
                "--deployed reports one export (run them as two commands)"
            )
        return deploy_cli.cmd_report(args)
    given = [f for f in ("dataset", "data_root", "samples") if getattr(args, f) is not None]
    if given:
        raise UsageError(
            f"{' and '.join('--' + f.replace('_', '-') for f in given)} "
            f"{'applies' if len(given) == 1 else 'apply'} to --deployed"
        )
    if args.runs == []:  # `--runs` with no folder after it: not "every run" silently
        raise UsageError("--runs needs one or more run folders (leave it out for every runs/*/)")
    runs = (
        [Path(r) for r in args.runs]
        if args.runs
        else sorted(p.parent for p in Path("runs").glob("*/metrics.json"))
    )
    for r in runs:
        if not (r / "metrics.json").is_file():
            raise UsageError(f"{r} is not a run folder (no metrics.json)")
    resolved = [r.resolve() for r in runs]
    twice = [str(r) for i, r in enumerate(runs) if resolved[i] in resolved[:i]]
    if twice:
        raise UsageError(f"run folder given twice: {', '.join(twice)}")
    if not runs and not args.bench:
        raise UsageError(
            "nothing to report: no run folders with metrics.json under runs/ and no --bench "
            "files; pass --runs DIR ... and/or --bench FILE.json ..."
        )
    written: list[Path] = []
    if runs:
        table = run_table([(n, read_training_log(r)) for n, r in zip(run_names(runs), runs)])
        try:
            written += plot_training_logs(runs, out)
        except ImportError as e:
            raise UsageError("empf report needs matplotlib: pip install 'empf-triton[plot]'") from e
        print(table)
    if args.bench:
        folders = [b for b in args.bench if Path(b).is_dir()]
        if folders:
            raise UsageError(
                f"{folders[0]} is a folder; pass its files, e.g. {folders[0]}/bench_*.json"
            )
        missing = [b for b in args.bench if not Path(b).is_file()]
        if missing:
            raise UsageError(f"no such benchmark file: {', '.join(missing)}")
        resolved = [Path(b).resolve() for b in args.bench]
        twice = [b for i, b in enumerate(args.bench) if resolved[i] in resolved[:i]]
        if twice:
            raise UsageError(f"benchmark file given twice: {', '.join(twice)}")
        for b in args.bench:
            try:
                doc = json.loads(Path(b).read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise UsageError(f"{b} is not a readable JSON file ({e})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks", []), list):
                raise UsageError(
                    f"{b} is not a pytest-benchmark JSON file (an object with a 'benchmarks' list)"
                )
        try:
            written += plot_training_bench(args.bench, out)
        except ImportError as e:
            raise UsageError("empf report needs matplotlib: pip install 'empf-triton[plot]'") from e
        mod = _load_bench_report()
        if mod is None:
            if not written:
                raise UsageError(
                    "benchmark plots of the ops need bench/report.py from the source tree; run "
                    "empf report from the repository root"
                )
        else:
            rc = mod.main([*args.bench, "--out", str(out)])
            if rc and not written:
                return rc
    for p in written:
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="empf", description="EM-PF spiking networks: online training, evaluation, reports."
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,report,export}")
    sub.required = True
    _train_parser(sub)
    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint on its test set",
        description="Evaluate a checkpoint written by empf train on its data set's test split: "
        "accuracy of the logits summed over T, and the anytime accuracy after each step.",
    )
    e.add_argument(
        "--checkpoint", type=_path, default=None, help="a checkpoint written by empf train"
    )
    e.add_argument(
        "--dataset",
        type=_name,
        default=None,
        help="override the checkpoint's data set (same input shape)",
    )
    e.add_argument(
        "--data-root",
        dest="data_root",
        type=_path,
        default=None,
        help="folder of the data files (default: the one the run used)",
    )
    e.add_argument(
        "--batch-size",
        dest="batch_size",
        type=_number("batch_size"),
        default=500,
        help="evaluation batch size (default 500)",
    )
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    e.add_argument(
        "--threads",
        type=_number("threads"),
        default=0,
        help="CPU threads (default 0 = auto: 1 on CPU)",
    )
    e.add_argument(
        "--impl", default="auto", help="kernels: auto, triton or reference (default auto)"
    )
    e.add_argument(
        "--step-mode",
        dest="step_mode",
        choices=("m", "s"),
        default=None,
        help="m: all steps per call (fast); s: one step per call (default m; --checkpoint only)",
    )
    e.add_argument(
        "--precision",
        choices=("fp32", "bf16", "fp16"),
        default=None,
        help="fp32, or bf16/fp16 autocast for convolutions and linears (default: the "
        "precision the run trained in, as its logged test accuracy; --checkpoint only)",
    )
    e.add_argument(
        "--compile",
        choices=("none", "default", "reduce-overhead"),
        default=None,
        help="torch.compile the model: none, default, or reduce-overhead (CUDA graphs; on a CPU "
        "the same as default) (default none; --checkpoint only)",
    )
    e.add_argument(
        "--json",
        type=_path,
        default=None,
        help="also write the metrics to this JSON file (a new file)",
    )
    e.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    r = sub.add_parser(
        "report",
        help="plot training logs and benchmark JSON as PNGs",
        description="Plot the accuracy and loss curves of training runs, with a table of each "
        "run's final, best and anytime accuracy (printed and written as runs.md), and plot "
        "pytest-benchmark JSON files.",
    )
    r.add_argument(
        "--runs",
        nargs="*",
        type=_path,
        default=None,
        help="run folders with metrics.json (default: every runs/*/)",
    )
    r.add_argument(
        "--bench",
        nargs="*",
        type=_path,
        default=None,
        help="pytest-benchmark JSON files (plotted by bench/report.py)",
    )
    r.add_argument(
        "--out",
        type=_path,
        default="reports",
        help="folder for the PNGs and runs.md (default reports); an earlier report's files "
        "of the same names are replaced",
    )
    deploy_cli.register(sub, e, r)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    from .data import DatasetNotFoundError, MissingDependencyError
    from .train.checkpoint import CheckpointError
    from .train.loop import TrainingDivergedError

    return (
        ValueError,
        CheckpointError,
        DatasetNotFoundError,
        MissingDependencyError,
        TrainingDivergedError,
        OSError,  # missing / unwritable files, a file where a folder should be, disk full, ...
        json.JSONDecodeError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `empf` console script; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)  # one-line errors, exit status 2 (see _Parser)
    except SystemExit as e:  # --help (0) or a bad command line (2)
        return e.code if isinstance(e.code, int) else 2
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "report": _cmd_report}
    handlers["export"] = deploy_cli.cmd_export
    # The commands set torch's thread count (--threads); called in a process that uses torch
    # already (a notebook, a test), give its own setting back afterwards.
    torch_mod = sys.modules.get("torch")
    threads_before = torch_mod.get_num_threads() if torch_mod is not None else None
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt as e:
        from .train.loop import TrainingInterrupted

        msg = str(e) if isinstance(e, TrainingInterrupted) and str(e) else "interrupted"
        print(f"empf {args.command}: {msg}", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("EMPF_DEBUG"):
            raise
        print(f"empf {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if threads_before is not None and torch_mod.get_num_threads() != threads_before:
            torch_mod.set_num_threads(threads_before)


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and not isinstance(e, UsageError):
        where = f": {e.filename}" if e.filename else ""
        return f"{e.strerror}{where}"
    msg = str(e) or type(e).__name__
    return " ".join(msg.split())


if __name__ == "__main__":
    sys.exit(main())
