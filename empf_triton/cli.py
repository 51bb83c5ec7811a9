"""The `empf` command: `empf train`, `empf eval`, `empf report`.

    empf train                       # the main job: MNIST-1D, binary weights, online (random step)
    empf train --dataset digits --epochs 5
    empf train --resume runs/mnist1d-mnist1d_cnn-random_step-T4
    empf eval --checkpoint runs/mnist1d-mnist1d_cnn-random_step-T4/best.pt
    empf report                      # PNG plots of the runs' logs (+ benchmark JSON with --bench)
    torchrun --nproc_per_node=2 -m empf_triton.cli train --dataset digits

User errors (unknown data set / model / strategy, T < 1, a checkpoint of another model, a corrupt
or truncated checkpoint, missing data files, ...) print one message on stderr and exit with
status 2, without a traceback; set EMPF_DEBUG=1 to see the traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

from .deploy import cli as deploy_cli

__all__ = ["main"]

#: Fields a resumed run takes from its checkpoint unless given again on the command line.
_RUN_CONTROL = {"device", "threads", "out", "resume", "overwrite", "stop_after", "progress"}


class UsageError(ValueError):
    """A bad command line (reported like every other user error)."""


def _int_or_none(s: str) -> int | None:
    return None if s.lower() in ("none", "float") else int(s)


def _weight_bits(s: str) -> float:
    v = float(s)
    return int(v) if v.is_integer() else v


def _train_parser(sub) -> argparse.ArgumentParser:
    from .train.loop import TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train",
        help="train a model",
        description="Train an EM-PF network online. Defaults: the README's main job "
        "(MNIST-1D, binary hidden weights, random-step online training, T=4).",
        argument_default=argparse.SUPPRESS,
    )
    a = p.add_argument
    a(
        "--dataset",
        help=f"mnist1d, digits, cifar10, cifar100, dvs_cifar10, dvs_gesture (default {d.dataset})",
    )
    a("--data-root", dest="data_root", help="folder of the data files (cifar/dvs) or cache")
    a("--model", help=f"registered model name or auto (default {d.model})")
    a("--T", "-T", type=int, help=f"time steps (default {d.T})")
    a("--strategy", help=f"online, random_step, accumulate or bptt (default {d.strategy})")
    a("--epochs", type=int, help=f"total epochs (default {d.epochs})")
    a(
        "--batch-size",
        dest="batch_size",
        type=int,
        help=f"batch size per process (default {d.batch_size})",
    )
    a("--eval-batch-size", dest="eval_batch_size", type=int)
    a("--optimizer", help=f"adamw or sgd (default {d.optimizer})")
    a("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    a("--weight-decay", dest="weight_decay", type=float, help=f"(default {d.weight_decay})")
    a("--momentum", type=float, help=f"SGD momentum, Nesterov (default {d.momentum})")
    a("--schedule", help=f"cosine or constant (default {d.schedule})")
    a("--warmup-epochs", dest="warmup_epochs", type=float)
    a(
        "--weight-bits",
        dest="weight_bits",
        type=_weight_bits,
        help="1 (binary), 1.5 (ternary) or 32 (full precision) hidden weights (default 1)",
    )
    a(
        "--spike-bits",
        dest="spike_bits",
        type=_int_or_none,
        help="k-bit spikes 1..8, or none for float spikes (default none)",
    )
    a("--spike-step", dest="spike_step", type=float)
    a("--parallel", action="store_true", help="parallel (stateless) neurons where the net allows")
    a("--seca", action="store_true", help="SECA channel attention")
    a("--mem-bn", dest="mem_bn", action="store_true", help="Mem-BN in the neurons")
    a(
        "--model-options",
        dest="model_options",
        type=json.loads,
        help="extra model options as JSON, e.g. '{\"channels\": [32, 32, 64, 64]}'",
    )
    a("--impl", help="auto, triton or reference (default auto)")
    a("--no-augment", dest="augment", action="store_false", help="no train-time augmentation")
    a("--grad-clip", dest="grad_clip", type=float)
    a("--sync-bn", dest="sync_bn", action="store_true", help="SyncBatchNorm under DDP (CUDA)")
    a("--device", help="auto, cpu, cuda, cuda:N (default auto)")
    a("--threads", type=int, help="CPU threads (default 0 = auto: 1 on CPU)")
    a("--seed", type=int, help=f"(default {d.seed})")
    a("--out", help="output folder (default runs/<dataset>-<model>-<strategy>-T<T>)")
    a("--resume", help="checkpoint file or run folder to continue from")
    a("--overwrite", action="store_true", help="start afresh in an --out holding a checkpoint")
    a("--stop-after", dest="stop_after", type=int, help="stop after N epochs in this invocation")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.checkpoint import load_checkpoint
    from .train.loop import TrainConfig, run_training

    explicit = {k: v for k, v in vars(args).items() if k != "command"}
    base = asdict(TrainConfig())
    if explicit.get("resume") is not None:
        path = Path(explicit["resume"])
        ckpt = load_checkpoint(path / "last.pt" if path.is_dir() else path)
        saved = dict(ckpt.get("extra", {}).get("config", {}))
        if isinstance(saved.get("model_options"), str):
            saved["model_options"] = json.loads(saved["model_options"]) or None
        names = {f.name for f in fields(TrainConfig)} - _RUN_CONTROL
        base.update({k: v for k, v in saved.items() if k in names})
    base.update(explicit)
    cfg = TrainConfig(**base)
    summary = run_training(cfg)
    if summary["epochs_run"] and summary["final"]:
        f = summary["final"]
        print(
            f"done: test accuracy {f['test_accuracy'] * 100:.2f}% after {summary['epochs_done']} "
            f"epoch(s) (best {summary['best_test_accuracy'] * 100:.2f}%); logs and checkpoints "
            f"in {summary['out']}"
        )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .data import EVENT_DATASETS, load_dataset
    from .train.checkpoint import load_checkpoint
    from .train.loop import build_from_checkpoint, resolve_device, resolve_threads
    from .train.strategies import evaluate, iterate_batches

    if args.deployed is not None or args.checkpoint is None:
        return deploy_cli.cmd_eval(args)
    device = resolve_device(args.device)
    torch.set_num_threads(resolve_threads(args.threads, device))
    ckpt = load_checkpoint(args.checkpoint)
    saved = ckpt.get("extra", {}).get("config", {})
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
        model,
        iterate_batches(test_set, args.batch_size, device=device),
        T,
        is_event=info.is_event,
        step_mode=args.step_mode,
    )
    print(
        f"{ckpt['model_name']} on {dataset} (epoch {ckpt['epoch']}, T={T}): test accuracy "
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
            **ev,
        }
        Path(args.json).write_text(json.dumps(record, indent=1) + "\n")
    return 0


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


def plot_training_logs(run_dirs: Sequence[Path], out: Path) -> list[Path]:
    """Accuracy curves (test and train accuracy per epoch) and the final anytime accuracy of
    each run folder holding a metrics.json. Returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for d in run_dirs:
        f = Path(d) / "metrics.json"
        try:
            hist = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UsageError(f"cannot read training log {f}: {e}") from e
        if not isinstance(hist, list) or not hist:
            raise UsageError(f"training log {f} holds no epochs")
        runs.append((Path(d).name, hist))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in runs:
        ep = [h["epoch"] for h in hist]
        line = ax1.plot(
            ep, [100 * h["test_accuracy"] for h in hist], marker="o", ms=3, label=f"{name} test"
        )[0]
        ax1.plot(
            ep,
            [100 * h["train_accuracy"] for h in hist],
            ls="--",
            color=line.get_color(),
            label=f"{name} train",
        )
        any_t = hist[-1].get("anytime_accuracy") or []
        ax2.plot(
            range(1, len(any_t) + 1),
            [100 * a for a in any_t],
            marker="o",
            color=line.get_color(),
            label=name,
        )
    ax1.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy per epoch")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=7)
    ax2.set(
        xlabel="time steps used (t)",
        ylabel="test accuracy (%)",
        title="anytime accuracy (last epoch)",
    )
    ax2.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, hist in runs:
        ax.plot([h["epoch"] for h in hist], [h["train_loss"] for h in hist], label=name)
    ax.set(xlabel="epoch", ylabel="train loss", yscale="log", title="training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def plot_training_bench(json_files: Sequence[str], out: Path) -> list[Path]:
    """Memory and time per step vs T for each training strategy, from the `train_step` records
    of bench/test_bench_training.py, plus the EM-PF / LIF step times. Returns the PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
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
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if neuron:
        fig, ax = plt.subplots(figsize=(4.5, 3.5))
        names = sorted(neuron)
        ax.bar(
            names, [1e3 * neuron[n] for n in names], color=["tab:blue", "tab:gray"][: len(names)]
        )
        ax.set(ylabel="ms per batch (online, T=4)", title=f"EM-PF vs LIF step ({device})")
        if "empf" in neuron and "lif" in neuron:
            ax.set_xlabel(f"EM-PF / LIF = {neuron['empf'] / neuron['lif']:.2f} (target <= 1.2)")
        fig.tight_layout()
        path = out / "training_empf_vs_lif.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _cmd_report(args: argparse.Namespace) -> int:
    if args.deployed is not None:
        return deploy_cli.cmd_report(args)
    out = Path(args.out)
    runs = (
        [Path(r) for r in args.runs]
        if args.runs
        else sorted(p.parent for p in Path("runs").glob("*/metrics.json"))
    )
    for r in runs:
        if not (r / "metrics.json").is_file():
            raise UsageError(f"{r} is not a run folder (no metrics.json)")
    if not runs and not args.bench:
        raise UsageError(
            "nothing to report: no run folders with metrics.json under runs/ and no --bench "
            "files; pass --runs DIR ... and/or --bench FILE.json ..."
        )
    written: list[Path] = []
    if runs:
        try:
            written += plot_training_logs(runs, out)
        except ImportError as e:
            raise UsageError("empf report needs matplotlib: pip install 'empf-triton[plot]'") from e
    if args.bench:
        missing = [b for b in args.bench if not Path(b).is_file()]
        if missing:
            raise UsageError(f"no such benchmark file: {', '.join(missing)}")
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
    parser = argparse.ArgumentParser(
        prog="empf", description="EM-PF spiking networks: online training, evaluation, reports."
    )
    sub = parser.add_subparsers(dest="command", metavar="{train,eval,report,export}")
    sub.required = True
    _train_parser(sub)
    e = sub.add_parser("eval", help="evaluate a checkpoint on its test set")
    e.add_argument("--checkpoint", default=None, help="a checkpoint written by empf train")
    e.add_argument("--dataset", default=None, help="override the checkpoint's data set")
    e.add_argument("--data-root", dest="data_root", default=None)
    e.add_argument("--batch-size", dest="batch_size", type=int, default=500)
    e.add_argument("--device", default="auto")
    e.add_argument("--threads", type=int, default=0)
    e.add_argument("--impl", default="auto")
    e.add_argument(
        "--step-mode",
        dest="step_mode",
        choices=("m", "s"),
        default="m",
        help="m: all steps per call (fast); s: one step per call",
    )
    e.add_argument("--json", default=None, help="also write the metrics to this JSON file")
    r = sub.add_parser("report", help="plot training logs and benchmark JSON as PNGs")
    r.add_argument(
        "--runs",
        nargs="*",
        default=None,
        help="run folders with metrics.json (default: every runs/*/)",
    )
    r.add_argument(
        "--bench",
        nargs="*",
        default=None,
        help="pytest-benchmark JSON files (plotted by bench/report.py)",
    )
    r.add_argument("--out", default="reports", help="folder for the PNGs (default reports)")
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
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        json.JSONDecodeError,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `empf` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)  # argparse reports its own errors (exit 2, no traceback)
    handlers = {"train": _cmd_train, "eval": _cmd_eval, "report": _cmd_report}
    handlers["export"] = deploy_cli.cmd_export
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("empf: interrupted (the last saved checkpoint is intact)", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("EMPF_DEBUG"):
            raise
        msg = str(e) or type(e).__name__
        print(f"empf {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
