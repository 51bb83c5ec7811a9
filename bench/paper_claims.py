"""Rerun the paper's central claims with this library's trainer and write a report.

Usage:

    python bench/paper_claims.py --dataset mnist1d --epochs 12 --seeds 3 --out DIR
    python bench/paper_claims.py --dataset digits --epochs 1 --seeds 1 --out DIR   # smoke test
    python bench/paper_claims.py --out DIR --report-only     # rebuild the report from DIR

Every configuration of `CONFIGS` is trained with `empf_triton.train.run_training` (the code behind
`python -m empf_triton.cli train`) once per seed, with the data set's default model and the
trainer's defaults otherwise (T=4, AdamW, cosine schedule). The grid: EM-PF and LIF neurons x the
online, random_step and bptt strategies (binary weights, float spikes), plus EM-PF online with
full-precision weights and EM-PF online with 4-bit spikes. Then, with `SavedTensorMeter`
(`empf_triton.train.memory`), the bytes saved for backward by one training batch at T = 2, 4, 8
for every strategy and both neurons.

Written into DIR:

- `claims.md`: mean ± std over seeds of the final and the best test accuracy per configuration;
  for each claim the per-seed difference (mean ± std), the threshold and a verdict; the memory
  table; the machine, versions, wall time and the exact command.
- `claims.png`: accuracies per configuration (mean and spread) and saved bytes vs T.
- `results.json`: every run's numbers (per-epoch test accuracy included) and the memory table.
- `runs/<config>-s<seed>/`: the trainer's own output folder per run (metrics, checkpoints) and
  `result.json`. A run whose `result.json` matches the requested data set and epochs is reused,
  so an interrupted grid continues where it stopped (`--fresh` retrains everything).

The claims (the paper's, on its own data sets; here checked on whatever data set is given):

- (a) online EM-PF is within 0.5 pt of BPTT EM-PF, while online LIF loses more than EM-PF does;
- (b) binary weights are within 1 pt of full-precision weights (EM-PF, online);
- (c) 4-bit spikes are within 0.5 pt of float spikes (EM-PF, online);
- (d) training memory is flat in T for the online strategies (online, random_step, accumulate).

Verdicts use the paired per-seed differences d (pt) against the threshold: "holds" when
mean(d) + std(d) is within it, "does not hold" when mean(d) - std(d) is beyond it, and
"inconclusive" when the threshold lies within one standard deviation of the mean (with one seed,
std = 0, so the mean decides alone). Claims are judged on the final test accuracy; the best
accuracy over epochs is reported beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

#: name -> (neuron, strategy, weight_bits, spike_bits)
CONFIGS: dict[str, dict] = {
    "empf-online": {"neuron": "empf", "strategy": "online", "weight_bits": 1, "spike_bits": None},
    "empf-random_step": {
        "neuron": "empf",
        "strategy": "random_step",
        "weight_bits": 1,
        "spike_bits": None,
    },
    "empf-bptt": {"neuron": "empf", "strategy": "bptt", "weight_bits": 1, "spike_bits": None},
    "lif-online": {"neuron": "lif", "strategy": "online", "weight_bits": 1, "spike_bits": None},
    "lif-random_step": {
        "neuron": "lif",
        "strategy": "random_step",
        "weight_bits": 1,
        "spike_bits": None,
    },
    "lif-bptt": {"neuron": "lif", "strategy": "bptt", "weight_bits": 1, "spike_bits": None},
    "empf-online-fp32w": {
        "neuron": "empf",
        "strategy": "online",
        "weight_bits": 32,
        "spike_bits": None,
    },
    "empf-online-4bit": {"neuron": "empf", "strategy": "online", "weight_bits": 1, "spike_bits": 4},
}

#: Claims on accuracy: (id, title, reference config, variant config, threshold in pt).
#: d = acc(reference) - acc(variant): how much the variant loses.
PAIR_CLAIMS = (
    ("b", "binary weights within 1 pt of full precision", "empf-online-fp32w", "empf-online", 1.0),
    ("c", "4-bit spikes within 0.5 pt of float spikes", "empf-online", "empf-online-4bit", 0.5),
)
#: Claim (a): EM-PF online vs BPTT within this many pt, and LIF losing more.
CLAIM_A_THRESHOLD = 0.5
#: Claim (d): saved bytes may grow by at most this factor from the smallest to the largest T.
MEMORY_FLAT_RATIO = 1.1
MEMORY_T = (2, 4, 8)
ONLINE_STRATEGIES = ("online", "random_step", "accumulate")
ALL_STRATEGIES = ("online", "random_step", "accumulate", "bptt")


# ----------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; 0 for fewer than two values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def verdict_at_most(d: Sequence[float], threshold: float) -> str:
    """Verdict for "d <= threshold" from paired differences d (see the module doc)."""
    if not d:
        return "not run"
    m, s = mean_std(d)
    if m + s <= threshold:
        return "holds"
    if m - s > threshold:
        return "does not hold"
    return "inconclusive"


def verdict_greater(d: Sequence[float], threshold: float = 0.0) -> str:
    """Verdict for "d > threshold" from paired differences d."""
    if not d:
        return "not run"
    m, s = mean_std(d)
    if m - s > threshold:
        return "holds"
    if m + s <= threshold:
        return "does not hold"
    return "inconclusive"


def combine(*verdicts: str) -> str:
    """All parts must hold; any part that does not hold fails the claim."""
    if "not run" in verdicts:
        return "not run"
    if "does not hold" in verdicts:
        return "does not hold"
    if all(v == "holds" for v in verdicts):
        return "holds"
    return "inconclusive"


def _by_seed(runs: list[dict], config: str, key: str) -> dict[int, float]:
    """{seed: accuracy in percent} of one configuration."""
    return {r["seed"]: 100.0 * r[key] for r in runs if r["config"] == config}


def paired(runs: list[dict], ref: str, var: str, key: str) -> list[float]:
    """acc(ref) - acc(var) in pt for every seed both configurations ran."""
    a, b = _by_seed(runs, ref, key), _by_seed(runs, var, key)
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def evaluate_claims(runs: list[dict], memory: list[dict], key: str = "final") -> list[dict]:
    """The claims' numbers and verdicts from run records and memory records.

    Args:
        runs: records with "config", "seed", "final" and "best" (test accuracy in [0, 1]).
        memory: records with "neuron", "strategy", "T", "saved_bytes".
        key: "final" or "best", the accuracy the accuracy claims are judged on.
    """
    claims = []
    # (a): for each online strategy separately; "online" is the claim, random_step extra.
    for strat in ("online", "random_step"):
        g_e = paired(runs, "empf-bptt", f"empf-{strat}", key)
        g_l = paired(runs, "lif-bptt", f"lif-{strat}", key)
        e_by = dict(zip(_seeds(runs, "empf-bptt", f"empf-{strat}"), g_e))
        l_by = dict(zip(_seeds(runs, "lif-bptt", f"lif-{strat}"), g_l))
        extra = [l_by[s] - e_by[s] for s in sorted(set(e_by) & set(l_by))]
        v1 = verdict_at_most(g_e, CLAIM_A_THRESHOLD)
        v2 = verdict_greater(extra, 0.0)
        claims.append(
            {
                "id": "a" if strat == "online" else "a'",
                "title": (
                    f"{strat} EM-PF within {CLAIM_A_THRESHOLD} pt of BPTT EM-PF, and {strat} "
                    "LIF loses more than EM-PF"
                ),
                "parts": [
                    {
                        "what": f"EM-PF loss: bptt - {strat} (pt)",
                        "rule": f"<= {CLAIM_A_THRESHOLD}",
                        "d": g_e,
                        "verdict": v1,
                    },
                    {
                        "what": f"LIF loss: bptt - {strat} (pt)",
                        "rule": "(context)",
                        "d": g_l,
                        "verdict": "",
                    },
                    {
                        "what": "LIF loss - EM-PF loss (pt)",
                        "rule": "> 0",
                        "d": extra,
                        "verdict": v2,
                    },
                ],
                "verdict": combine(v1, v2),
            }
        )
    for cid, title, ref, var, thr in PAIR_CLAIMS:
        d = paired(runs, ref, var, key)
        v = verdict_at_most(d, thr)
        claims.append(
            {
                "id": cid,
                "title": title,
                "parts": [
                    {"what": f"{ref} - {var} (pt)", "rule": f"<= {thr}", "d": d, "verdict": v}
                ],
                "verdict": v,
            }
        )
    claims.append(memory_claim(memory))
    return claims


def _seeds(runs: list[dict], a: str, b: str) -> list[int]:
    sa = {r["seed"] for r in runs if r["config"] == a}
    sb = {r["seed"] for r in runs if r["config"] == b}
    return sorted(sa & sb)


def memory_claim(memory: list[dict]) -> dict:
    """Claim (d): for each neuron and online strategy, saved bytes at the largest T over those
    at the smallest T must be at most `MEMORY_FLAT_RATIO`. BPTT's ratio is shown for contrast."""
    parts = []
    for neuron in ("empf", "lif"):
        for strat in ALL_STRATEGIES:
            rows = sorted(
                (m for m in memory if m["neuron"] == neuron and m["strategy"] == strat),
                key=lambda m: m["T"],
            )
            if len(rows) < 2:
                continue
            ratio = rows[-1]["saved_bytes"] / max(rows[0]["saved_bytes"], 1)
            online = strat in ONLINE_STRATEGIES
            parts.append(
                {
                    "what": f"{neuron} {strat}: saved bytes T={rows[-1]['T']} / T={rows[0]['T']}",
                    "rule": f"<= {MEMORY_FLAT_RATIO}" if online else "(contrast)",
                    "ratio": ratio,
                    "verdict": ("holds" if ratio <= MEMORY_FLAT_RATIO else "does not hold")
                    if online
                    else "",
                }
            )
    judged = [p["verdict"] for p in parts if p["verdict"]]
    return {
        "id": "d",
        "title": "training memory flat in T for the online strategies",
        "parts": parts,
        "verdict": combine(*judged) if judged else "not run",
    }


# ---------------------------------------------------------------------------------- report


def _fmt(m: float, s: float, digits: int = 2) -> str:
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def build_report(results: dict) -> str:
    """The claims.md text from a results dict (as written to results.json)."""
    runs, memory, meta = results["runs"], results.get("memory", []), results["meta"]
    lines = [
        f"# Paper claims on {meta['dataset']}",
        "",
        f"Generated by `bench/paper_claims.py` on {meta.get('date', '?')}.",
        "",
        f"- command: `{meta.get('command', '?')}`",
        f"- machine: {meta.get('machine', '?')}",
        *([f"- note: {meta['note']}"] if meta.get("note") else []),
        f"- versions: {meta.get('versions', '?')}",
        f"- commit: {meta.get('commit', '?')}",
        f"- wall time: {meta.get('wall_seconds', math.nan) / 60:.1f} min "
        f"({len(runs)} training runs + the memory table)"
        + (
            f"; 1-minute load average {meta['load_average_start']} at the start, "
            f"{meta.get('load_average_end', '?')} at the end"
            if meta.get("load_average_start") is not None
            else ""
        ),
        f"- model: {meta.get('model', '?')}, T = {meta.get('T', '?')}, "
        f"{meta.get('epochs', '?')} epoch(s), seeds {meta.get('seeds', '?')}, trainer defaults "
        "otherwise (AdamW, cosine schedule, batch 128); accuracy = test accuracy of the logits "
        "summed over T",
        "",
        "## Accuracy per configuration",
        "",
        "| configuration | neuron | strategy | weights | spikes | seeds | final test acc % "
        "| best test acc % | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in CONFIGS.items():
        rs = [r for r in runs if r["config"] == name]
        if not rs:
            continue
        fm, fs = mean_std([100 * r["final"] for r in rs])
        bm, bs = mean_std([100 * r["best"] for r in rs])
        sec = mean_std([r["epoch_seconds"] for r in rs])[0]
        w = "binary" if c["weight_bits"] == 1 else f"{c['weight_bits']}-bit"
        sp = "float" if c["spike_bits"] is None else f"{c['spike_bits']}-bit"
        lines.append(
            f"| {name} | {c['neuron']} | {c['strategy']} | {w} | {sp} | {len(rs)} "
            f"| {_fmt(fm, fs)} | {_fmt(bm, bs)} | {sec:.1f} |"
        )
    lines += [
        "",
        "mean ± sample std over seeds; `final` is the last epoch, `best` the best epoch.",
        "",
        "## Claims",
        "",
        "Each difference d is paired by seed (same seed: same initialisation, data order and "
        "augmentation). Verdict: *holds* when mean(d) + std(d) meets the rule, *does not hold* "
        "when mean(d) - std(d) breaks it, *inconclusive* otherwise (the seeds' spread covers the "
        "threshold). Judged on the final test accuracy; the same table for the best accuracy "
        "follows.",
        "",
    ]
    for key in ("final", "best"):
        claims = evaluate_claims(runs, memory, key)
        lines += [
            f"### On the {key} test accuracy",
            "",
            "| claim | part | rule | d: mean ± std (pt) | per seed | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for c in claims:
            if c["id"] == "d":
                continue
            for i, p in enumerate(c["parts"]):
                m, s = mean_std(p["d"])
                per = ", ".join(f"{v:+.2f}" for v in p["d"]) or "-"
                lines.append(
                    f"| ({c['id']}) {c['title'] if i == 0 else ''} | {p['what']} | {p['rule']} "
                    f"| {_fmt(m, s)} | {per} | {p['verdict']} |"
                )
            lines.append(f"| | **claim ({c['id']})** | | | | **{c['verdict']}** |")
        lines.append("")
    d = memory_claim(memory)
    lines += [
        "## Training memory vs T (claim d)",
        "",
        "Bytes autograd keeps saved for backward (peak over one training batch, "
        "`empf_triton.train.memory.SavedTensorMeter`), batch "
        f"{meta.get('memory_batch', '?')}, {meta.get('model', '?')}; random_step at its "
        "costliest draw t* = T - 1.",
        "",
    ]
    if "CPU only" in str(meta.get("machine", "")):
        lines += [
            'On a CPU, `impl="auto"` runs the eager reference of every op, so these are the '
            "reference's saved tensors (what torch autograd keeps for the eager ops), not the "
            "fused Triton kernels' (1-bit masks; see docs/kernels.md). The "
            "claim is about growth with T, which does not depend on that; comparing EM-PF with "
            "LIF in absolute bytes needs a GPU run.",
            "",
        ]
    Ts = sorted({m["T"] for m in memory})
    if memory:
        lines += [
            "| neuron | strategy | " + " | ".join(f"T={t} (KiB)" for t in Ts) + " |",
            "|---|---|" + "---|" * len(Ts),
        ]
        for neuron in ("empf", "lif"):
            for strat in ALL_STRATEGIES:
                row = {
                    m["T"]: m["saved_bytes"]
                    for m in memory
                    if m["neuron"] == neuron and m["strategy"] == strat
                }
                if row:
                    cells = " | ".join(f"{row[t] / 1024:.1f}" if t in row else "-" for t in Ts)
                    lines.append(f"| {neuron} | {strat} | {cells} |")
        lines += ["", "| part | rule | ratio | verdict |", "|---|---|---|---|"]
        for p in d["parts"]:
            lines.append(f"| {p['what']} | {p['rule']} | {p['ratio']:.3f} | {p['verdict']} |")
    lines += ["", f"**claim (d): {d['verdict']}**", "", "## Summary", ""]
    for c in evaluate_claims(runs, memory, "final"):
        lines.append(f"- ({c['id']}) {c['title']}: **{c['verdict']}**")
    asked = list(meta.get("configs", CONFIGS))
    n_seeds = len(meta.get("seeds", []))
    done = {n: len({r["seed"] for r in runs if r["config"] == n}) for n in asked}
    unfinished = [f"{n} ({done[n]} of {n_seeds} seeds)" for n in asked if done[n] < n_seeds]
    if unfinished:
        lines += ["", f"Configurations requested but not finished: {', '.join(unfinished)}."]
    left_out = [n for n in CONFIGS if n not in asked]
    if left_out:
        lines += ["", f"Configurations not requested (`--configs`): {', '.join(left_out)}."]
    lines += [
        "",
        "Reading the numbers: with the same epochs, `online` makes T optimizer steps per batch "
        "(one per time step) while `random_step` and `bptt` make one, so `online` also gets T "
        "times more updates; `random_step` back-propagates one drawn step per batch.",
        "",
        "These are small-data runs of the claims, not a reproduction of the paper's CIFAR / "
        "ImageNet numbers; a claim that does not hold here is reported as it came out.",
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """claims.png: final and best accuracy per configuration (mean, min-max over seeds as
    points) and saved-for-backward bytes vs T per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, memory, meta = results["runs"], results.get("memory", []), results["meta"]
    names = [n for n in CONFIGS if any(r["config"] == n for r in runs)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    ax = axes[0]
    for k, (key, color) in enumerate((("final", "tab:blue"), ("best", "tab:orange"))):
        for i, n in enumerate(names):
            vals = [100 * r[key] for r in runs if r["config"] == n]
            m, s = mean_std(vals)
            x = i + (k - 0.5) * 0.35
            ax.bar(
                x, m, 0.35, yerr=s, color=color, alpha=0.7, capsize=3, label=key if i == 0 else None
            )
            ax.plot([x] * len(vals), vals, "k.", ms=3)
    if names:
        lo = min(100 * r[k] for r in runs for k in ("final", "best") if r["config"] in names)
        ax.set_ylim(max(0.0, lo - 5), 100)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test accuracy %")
    ax.set_title(
        f"{meta['dataset']}, {meta.get('model')}, T={meta.get('T')}, "
        f"{meta.get('epochs')} ep, {len(meta.get('seeds', []))} seed(s)",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax = axes[1]
    styles = {"empf": "-", "lif": "--"}
    colors = dict(zip(ALL_STRATEGIES, ("tab:blue", "tab:green", "tab:purple", "tab:red")))
    markers = dict(zip(ALL_STRATEGIES, ("o", "s", "^", "D")))
    for neuron in ("empf", "lif"):
        for strat in ALL_STRATEGIES:
            rows = sorted(
                (m for m in memory if m["neuron"] == neuron and m["strategy"] == strat),
                key=lambda m: m["T"],
            )
            if rows:
                ax.plot(
                    [m["T"] for m in rows],
                    [m["saved_bytes"] / 2**20 for m in rows],
                    styles[neuron],
                    marker=markers[strat],
                    ms=9 - 2 * ALL_STRATEGIES.index(strat),  # coinciding lines stay visible
                    color=colors[strat],
                    label=f"{neuron} {strat}",
                )
    ax.set_xlabel("T")
    ax.set_ylabel("saved for backward, MiB (peak)")
    ax.set_title("training memory vs T (claim d)", fontsize=9)
    if memory:
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{meta.get('machine', '')} | {meta.get('versions', '')} | "
        f"commit {meta.get('commit', '?')}",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------- running


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("EMPF_COMMIT", "unknown")


def _machine() -> str:
    import torch

    cpus = os.cpu_count()
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()}, {cpus} CPU core(s), {dev}, one torch thread per run"


def _loadavg() -> float | None:
    """The 1-minute load average (other jobs on the machine slow the runs down), if known."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _versions() -> str:
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return f"python {platform.python_version()}, torch {torch.__version__}, triton {tv}"


def train_one(name: str, seed: int, args, out: Path, log) -> dict:
    """Train configuration `name` with `seed` through the library's trainer; returns its record."""
    from empf_triton.train.loop import TrainConfig, run_training

    c = CONFIGS[name]
    run_dir = out / "runs" / f"{name}-s{seed}"
    done = run_dir / "result.json"
    if done.exists() and not args.fresh:
        rec = json.loads(done.read_text())
        if (
            rec.get("dataset") == args.dataset
            and rec.get("epochs") == args.epochs
            and rec.get("T") == args.T
        ):
            log(f"[{name} seed {seed}] reused {done}")
            return rec
    # The neuron kind: a TrainConfig field where the trainer has one (`--neuron`), else a model
    # option passed through `model_options`.
    if "neuron" in {f.name for f in dataclasses.fields(TrainConfig)}:
        neuron_kw = {"neuron": c["neuron"]}
    else:
        neuron_kw = {"model_options": {"neuron": c["neuron"]} if c["neuron"] != "empf" else None}
    cfg = TrainConfig(
        dataset=args.dataset,
        data_root=args.data_root,
        T=args.T,
        strategy=c["strategy"],
        epochs=args.epochs,
        weight_bits=c["weight_bits"],
        spike_bits=c["spike_bits"],
        seed=seed,
        out=str(run_dir),
        overwrite=True,
        progress=False,
        device=args.device,
        **neuron_kw,
    )
    t0 = time.perf_counter()
    lines: list[str] = []
    summary = run_training(cfg, log=lines.append)
    hist = summary["history"]
    rec = {
        "config": name,
        "seed": seed,
        "dataset": args.dataset,
        "epochs": args.epochs,
        "T": args.T,
        "model": summary["model"],
        **c,
        "final": hist[-1]["test_accuracy"],
        "best": max(h["test_accuracy"] for h in hist),
        "test_accuracy": [h["test_accuracy"] for h in hist],
        "anytime_final": hist[-1]["anytime_accuracy"],
        "train_loss": [h["train_loss"] for h in hist],
        "epoch_seconds": sum(h["epoch_seconds"] for h in hist) / len(hist),
        "wall_seconds": time.perf_counter() - t0,
    }
    done.write_text(json.dumps(rec, indent=1) + "\n")
    log(
        f"[{name} seed {seed}] final {100 * rec['final']:.2f}% best {100 * rec['best']:.2f}% "
        f"({rec['wall_seconds']:.0f} s)"
    )
    return rec


def measure_memory(args, Ts: Sequence[int], log) -> tuple[list[dict], dict]:
    """Peak bytes saved for backward over one training batch, per neuron, strategy and T."""
    import torch

    from empf_triton.data import EVENT_DATASETS, load_dataset
    from empf_triton.models import build_model
    from empf_triton.train.memory import SavedTensorMeter
    from empf_triton.train.strategies import train_batch

    kw = {"T": max(Ts)} if args.dataset in EVENT_DATASETS else {}
    train_set, _, info = load_dataset(args.dataset, args.data_root, **kw)
    n = min(args.memory_batch, len(train_set))
    if hasattr(train_set, "x"):
        # A copy: a view would share the whole data set's storage, which the meter would then
        # count in full wherever a layer saves its input.
        x, y = train_set.x[:n].clone(), train_set.y[:n].clone()
    else:
        pairs = [train_set[i] for i in range(n)]
        x = torch.stack([torch.as_tensor(p[0], dtype=torch.float32) for p in pairs])
        y = torch.tensor([int(p[1]) for p in pairs])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for neuron in ("empf", "lif"):
            for strat in ALL_STRATEGIES:
                for T in Ts:
                    torch.manual_seed(0)
                    model = build_model(
                        info.default_model,
                        in_shape=info.in_shape,
                        num_classes=info.num_classes,
                        T=T,
                        neuron=neuron,
                    )
                    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
                    xb = x[:, :T] if info.is_event else x
                    with SavedTensorMeter() as meter:
                        train_batch(
                            model,
                            xb,
                            y,
                            opt,
                            strat,
                            T,
                            is_event=info.is_event,
                            t_star=T - 1 if strat == "random_step" else None,
                        )
                    rows.append(
                        {"neuron": neuron, "strategy": strat, "T": T, "saved_bytes": meter.peak}
                    )
        log(f"memory table: {len(rows)} measurements")
    finally:
        torch.set_num_threads(threads)
    return rows, {"model": info.default_model, "memory_batch": n}


def write_outputs(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "claims.md").write_text(build_report(results))
    try:
        plot(results, out / "claims.png")
    except ImportError as e:  # matplotlib missing: the report still stands
        print(f"paper_claims: no plot ({e})", file=sys.stderr)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train the claims grid with empf_triton's trainer and write claims.md."
    )
    p.add_argument("--dataset", default="mnist1d", help="data set (default mnist1d)")
    p.add_argument("--data-root", default=None, help="data folder (the data set's default)")
    p.add_argument("--epochs", type=int, default=12, help="epochs per run (default 12)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per configuration")
    p.add_argument("--T", type=int, default=4, help="time steps (default 4)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--configs",
        default=",".join(CONFIGS),
        help=f"comma-separated subset of: {', '.join(CONFIGS)}",
    )
    p.add_argument(
        "--memory-T",
        default=",".join(map(str, MEMORY_T)),
        help="T values of the memory table ('none' to skip it)",
    )
    p.add_argument("--memory-batch", type=int, default=128, help="batch of the memory table")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--fresh", action="store_true", help="retrain runs that already finished")
    p.add_argument(
        "--note", default="", help="a line for claims.md (e.g. what else loaded the machine)"
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild claims.md and claims.png from OUT/results.json, train nothing",
    )
    args = p.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown or 'empty list'}; choose from {', '.join(CONFIGS)}")
    args.config_list = names
    for k in ("epochs", "seeds", "T", "memory_batch"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.memory_T.strip().lower() == "none":
        args.memory_Ts = []
    else:
        try:
            args.memory_Ts = sorted({int(t) for t in args.memory_T.split(",")})
        except ValueError:
            p.error(f"--memory-T must be comma-separated ints or 'none', got {args.memory_T!r}")
        if any(t < 1 for t in args.memory_Ts):
            p.error(f"--memory-T values must be >= 1, got {args.memory_T!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    if args.report_only:
        results = json.loads((out / "results.json").read_text())
        write_outputs(results, out)
        log(f"rebuilt {out / 'claims.md'}")
        return 0
    argv_list = list(sys.argv[1:] if argv is None else argv)
    seeds = list(range(args.seeds))
    t0 = time.perf_counter()
    meta = {
        "dataset": args.dataset,
        "epochs": args.epochs,
        "T": args.T,
        "seeds": seeds,
        "configs": args.config_list,
        "command": "python bench/paper_claims.py " + " ".join(map(shlex.quote, argv_list)),
        "machine": _machine(),
        "versions": _versions(),
        "commit": _commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "note": args.note,
        "load_average_start": _loadavg(),
    }
    results: dict = {"meta": meta, "runs": [], "memory": []}
    if args.memory_Ts:
        results["memory"], mm = measure_memory(args, args.memory_Ts, log)
        meta.update(mm)
    # Seeds outermost: after each seed every configuration has a result, so a grid stopped
    # early still has paired numbers for every claim.
    for seed in seeds:
        for name in args.config_list:
            results["runs"].append(train_one(name, seed, args, out, log))
            meta["wall_seconds"] = time.perf_counter() - t0
            meta.setdefault("model", results["runs"][-1]["model"])
            write_outputs(results, out)  # a report after every run
    meta["wall_seconds"] = time.perf_counter() - t0
    meta["load_average_end"] = _loadavg()
    write_outputs(results, out)
    log(f"wrote {out / 'claims.md'} ({meta['wall_seconds'] / 60:.1f} min)")
    for c in evaluate_claims(results["runs"], results["memory"]):
        log(f"claim ({c['id']}): {c['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
