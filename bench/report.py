"""Turn benchmark JSON files (pytest-benchmark's `--benchmark-json`) into PNG plots and a summary.

Usage: `python bench/report.py results.json [more.json ...] --out DIR [--readme-table PATH]
[--stages stages.tsv]`

Writes into DIR, for each device found in the files (a device suffix when there are several):
- `speedup_<op>.png`: speed-up over the eager reference vs T, per pass and grad mode, with the
  issue's targets marked where the plot has Triton data (fused fwd+bwd 5x at T=4; step 3x);
- `memory_saved.png`: bits saved for backward per element per step vs T (target for the fused
  online neuron: 1 bit plus v when the decay learns), and `memory_peak.png` (CUDA peak memory);
- `bandwidth.png`: achieved GB/s vs T against the copy bandwidth measured in the same run;
- `empf_vs_lif.png`: EM-PF and LIF times at the same T (project goal: EM-PF at least as fast);
- `binary_gemm.png` (time, GB/s, TFLOP/s vs M per impl) and `spikes.png` when present;
- `summary.md` and `summary.csv`: the GPU targets of the open issues (PASS / FAIL / not measured,
  see `gpu_targets`), times, speed-ups and GB/s fractions at T=4 and T=32, other checks, the
  skipped cases with their reasons, and run_gpu.sh's stage table (`--stages`);
- `--readme-table PATH`: the README's performance table (targets, measured values, status).
Every plot is labelled with the device, torch/triton versions and commit of its run.
`main(argv)` is the entry point (for a CLI).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

NEURON_OPS = ("empf_neuron", "empf_neuron_step", "parallel_neuron", "lif_neuron")
BASELINE = "eager"
IMPL_COLORS = {
    "eager": "tab:gray",
    "compile": "tab:orange",
    "triton": "tab:blue",
    "reference": "tab:gray",
    "packed": "tab:blue",
    "cublas": "tab:green",
    "dense": "tab:purple",
    "auto": "tab:red",
    "torch": "k",
    "torch.matmul": "tab:green",
    "spikingjelly": "tab:brown",
    "flexsn": "tab:pink",
}
PASS_STYLE = {"fwd": "--", "fwd+bwd": "-"}
MODE_MARKER = {"online": "o", "bptt": "s", None: "^"}
SUMMARY_T = (4, 32)
#: Targets from the issue (measured side by side on one H100/H200 run).
SPEEDUP_TARGETS = {("empf_neuron", "fwd+bwd"): {4: 5.0}}
STEP_SPEEDUP_TARGET = 3.0
BANDWIDTH_TARGET = 0.85
GEMM_OPS = ("binary_gemm", "binary_matmul", "binary_linear", "bgemm")
SPIKE_OPS = ("quantize", "encode", "decode")


# ---------------------------------------------------------------------------------------- load


def _dtype_name(d) -> str | None:
    if d is None:
        return None
    d = str(d).removeprefix("torch.")
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}.get(d, d)


def read_doc(path: str | Path) -> dict:
    """One pytest-benchmark JSON file; ValueError saying what is wrong with it (an empty file is
    what a stage cut by its time limit before pytest-benchmark wrote anything leaves)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable text file ({e})") from None
    if not text.strip():
        raise ValueError(f"{path}: empty (its benchmark run wrote nothing: nothing measured)")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    benches = doc.get("benchmarks", []) if isinstance(doc, dict) else None
    fields = ("stats", "extra_info")
    if not isinstance(benches, list) or not all(
        isinstance(b, dict) and all(isinstance(b.get(k) or {}, dict) for k in fields)
        for b in benches
    ):
        raise ValueError(
            f"{path}: not a pytest-benchmark JSON file (an object with a 'benchmarks' list)"
        )
    return doc


def load(paths: Sequence[str | Path]) -> tuple[list[dict], dict[str, list[dict]]]:
    """All benchmark records of the files (extra_info + median time + device), and the run
    environments per device (from machine_info["empf"], else pytest-benchmark's own fields)."""
    records: list[dict] = []
    envs: dict[str, list[dict]] = defaultdict(list)
    for path in paths:
        doc = read_doc(path)
        machine = doc.get("machine_info") or {}
        commit = doc.get("commit_info") or {}
        env = dict(machine.get("empf") or {})
        env.setdefault("torch", None)
        env.setdefault("triton", None)
        if not env.get("commit"):
            env["commit"] = (commit.get("id") or "unknown")[:12]
            env["commit_dirty"] = commit.get("dirty")
        env.setdefault("date", doc.get("datetime"))
        for bench in doc.get("benchmarks", []):
            extra = dict(bench.get("extra_info") or {})
            stats = bench.get("stats") or {}
            device = next(
                (
                    str(d)
                    for d in (
                        env.get("device"),
                        extra.get("device"),
                        (machine.get("cpu") or {}).get("brand_raw"),
                    )
                    if d and str(d).split(":", 1)[-1].strip()  # not "" nor a bare "cpu: "
                ),
                "unknown device",
            )
            rec = dict(extra)
            rec.update(
                device=device,
                name=bench.get("name", ""),
                median_s=stats.get("median"),
                min_s=stats.get("min"),
                rounds=stats.get("rounds"),
                source=str(path),
                run_commit=str(env["commit"]) + ("+dirty" if env.get("commit_dirty") else ""),
            )
            rec["op"] = extra.get("op") or _infer_op(rec["name"])
            rec["impl"] = extra.get("impl") or "?"
            if rec["impl"] == "cublas" and extra.get("device_type") == "cpu":
                rec["impl"] = "torch.matmul"  # no cuBLAS on a CPU: never label it so
            if extra.get("impl_resolved") and extra["impl_resolved"] != rec["impl"]:
                rec["impl_label"] = f"{rec['impl']} ({extra['impl_resolved']})"
            rec["dtype"] = _dtype_name(extra.get("dtype"))
            if rec.get("gbps") is None and extra.get("bytes_moved") and rec["median_s"]:
                rec["gbps"] = extra["bytes_moved"] / rec["median_s"] / 1e9
            if rec.get("tflops") is None and extra.get("flops") and rec["median_s"]:
                rec["tflops"] = extra["flops"] / rec["median_s"] / 1e12
            records.append(rec)
            if env not in envs[device]:
                envs[device].append(env)
    return records, dict(envs)


def finished(records: list[dict]) -> list[dict]:
    """The records with a median that ran to the end: a case stopped by a stage's time limit
    after some rounds (bench/conftest.py marks it `interrupted`) has a median of those rounds
    and none of its fields, so it is listed as not measured, never timed or judged."""
    return [r for r in records if r.get("median_s") and not r.get("interrupted")]


def interrupted(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("interrupted")]


def _infer_op(name: str) -> str:
    base = re.sub(r"\[.*\]$", "", name).removeprefix("test_bench_")
    return base or name


def env_label(envs: list[dict], device: str) -> str:
    """One line: device · torch · triton · commit (dirty) · date, merging several runs."""

    def join(key, fmt=str):
        vals = []
        for e in envs:
            v = e.get(key)
            if v is not None and fmt(v) not in vals:
                vals.append(fmt(v))
        return "/".join(vals) if vals else "?"

    commits = []
    for e in envs:
        c = str(e.get("commit") or "unknown")[:12] + ("+dirty" if e.get("commit_dirty") else "")
        if c not in commits:
            commits.append(c)
    date = join("date", lambda d: str(d)[:10])
    return (
        f"{device} · torch {join('torch')} · triton {join('triton')} · "
        f"commit {'/'.join(commits)} · {date}"
    )


# ----------------------------------------------------------------------------------- helpers


def _main_variant(r: dict) -> bool:
    """The default case of a sweep: fp32 current, float spikes."""
    return r.get("dtype") in (None, "fp32") and r.get("spike_bits") is None


def _variant(r: dict) -> str:
    spk = "float" if r.get("spike_bits") is None else f"{r['spike_bits']}-bit"
    return f"{r.get('dtype')} {spk}"


def _key(r: dict, *, impl: bool = True) -> tuple:
    k = (
        r["op"],
        r.get("pass"),
        r.get("grad_mode"),
        r.get("T"),
        r.get("dtype"),
        r.get("spike_bits"),
        r.get("N"),
        r.get("run_commit"),
    )
    return (*k, r["impl"]) if impl else k


def speedups(records: list[dict]) -> dict[tuple, float]:
    """Eager median / impl median for every record that has an eager twin (same everything,
    the commit of the run included)."""
    base = {_key(r, impl=False): r["median_s"] for r in records if r["impl"] == BASELINE}
    out = {}
    for r in records:
        b = base.get(_key(r, impl=False))
        if b and r.get("median_s"):
            out[_key(r)] = b / r["median_s"]
    return out


def copy_bandwidth(records: list[dict]) -> float | None:
    vals = [r["gbps"] for r in records if r["op"] == "copy" and r.get("gbps")]
    return max(vals) if vals else None


def saved_bits(r: dict) -> float | None:
    if r.get("saved_bytes") is None or not r.get("T") or not r.get("N"):
        return None
    return r["saved_bytes"] * 8 / (r["T"] * r["N"])


def _dtype_bits(dtype: str | None) -> int:
    return {"fp32": 32, "bf16": 16, "fp16": 16, "fp64": 64}.get(dtype or "fp32", 32)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "device"


def _setup_axes_T(ax, Ts):
    ax.set_xscale("log", base=2)
    if Ts:
        ax.set_xticks(sorted(Ts))
        ax.set_xticklabels([str(t) for t in sorted(Ts)])
    ax.set_xlabel("T (time steps)")
    ax.grid(True, which="both", alpha=0.3)


def _subplots(*args, figsize, **kwargs):
    """`pyplot.subplots` on a standalone Figure: no global backend switch or figure registry
    (`empf report --bench` runs this module inside the caller's process)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*args, **kwargs)


def _finish(fig, label: str, title: str, path: Path, written: list[Path]) -> None:
    fig.suptitle(f"{title}\n{label}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    written.append(path)


def _series(records, **match) -> dict[str, list[dict]]:
    out = defaultdict(list)
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            out[r["impl"]].append(r)
    return out


def _present(records, key) -> list:
    seen = []
    for r in records:
        v = r.get(key)
        if v not in seen:
            seen.append(v)
    order = {"online": 0, "bptt": 1, "fwd": 0, "fwd+bwd": 1}
    return sorted(seen, key=lambda v: (order.get(v, 9), str(v)))


# -------------------------------------------------------------------------------------- plots


def plot_speedup(records, label, out: Path, suffix: str, written: list[Path]) -> None:
    sp = speedups(records)
    for op in NEURON_OPS:
        recs = [r for r in records if r["op"] == op and r.get("T") is not None]
        if not any(_key(r) in sp and r["impl"] != BASELINE for r in recs):
            continue
        modes, passes = _present(recs, "grad_mode"), _present(recs, "pass")
        fig, axes = _subplots(
            len(modes), len(passes), figsize=(5.2 * len(passes), 3.6 * len(modes)), squeeze=False
        )
        for i, mode in enumerate(modes):
            for j, pass_ in enumerate(passes):
                ax = axes[i][j]
                cell = [r for r in recs if r.get("grad_mode") == mode and r.get("pass") == pass_]
                for impl, rs in sorted(_series(cell).items()):
                    if impl == BASELINE:
                        continue
                    main = sorted(
                        (r for r in rs if _main_variant(r) and _key(r) in sp), key=lambda r: r["T"]
                    )
                    if main:
                        ax.plot(
                            [r["T"] for r in main],
                            [sp[_key(r)] for r in main],
                            marker="o",
                            color=IMPL_COLORS.get(impl),
                            label=f"{impl} fp32",
                        )
                    for r in rs:
                        if not _main_variant(r) and _key(r) in sp:
                            ax.scatter(
                                [r["T"]],
                                [sp[_key(r)]],
                                marker="D",
                                s=30,
                                color=IMPL_COLORS.get(impl),
                                edgecolors="k",
                                label=f"{impl} {_variant(r)}",
                            )
                ax.axhline(1.0, color=IMPL_COLORS["eager"], lw=1, label="eager = 1")
                has_triton = any(r["impl"] == "triton" and _key(r) in sp for r in cell)
                targets = SPEEDUP_TARGETS.get((op, pass_), {}) if has_triton else {}
                for T, target in targets.items():
                    ax.scatter(
                        [T],
                        [target],
                        marker="*",
                        s=120,
                        color="red",
                        zorder=5,
                        label=f"target {target:g}x @T={T}",
                    )
                if op == "empf_neuron_step" and pass_ == "fwd+bwd" and has_triton:
                    ax.axhline(STEP_SPEEDUP_TARGET, color="red", ls=":", label="target 3x")
                _setup_axes_T(ax, {r["T"] for r in cell})
                ax.set_yscale("log")
                ax.set_ylabel("speed-up over eager (x)")
                ax.set_title(f"{op} · {pass_} · grad_mode={mode}", fontsize=9)
                _dedup_legend(ax)
        _finish(
            fig,
            label,
            f"{op}: speed-up over the eager reference",
            out / f"speedup_{op}{suffix}.png",
            written,
        )


def _dedup_legend(ax, **kw) -> None:
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(zip(labels, handles))
    if uniq:
        kw.setdefault("fontsize", 6)
        kw.setdefault("ncol", 2 if len(uniq) > 8 else 1)
        ax.legend(uniq.values(), uniq.keys(), **kw)


def _one_pass(recs: list[dict]) -> list[dict]:
    """Saved bytes do not depend on the pass: keep fwd+bwd where both exist."""
    keyed = {}
    for r in recs:
        k = (r["impl"], r.get("grad_mode"), r.get("T"), r.get("dtype"), r.get("spike_bits"))
        if k not in keyed or r.get("pass") == "fwd+bwd":
            keyed[k] = r
    return list(keyed.values())


def plot_memory(records, label, out: Path, suffix: str, written: list[Path]) -> None:
    ops = [
        op for op in NEURON_OPS if any(r["op"] == op and saved_bits(r) is not None for r in records)
    ]
    if ops:
        fig, axes = _grid(len(ops))
        for ax, op in zip(axes, ops):
            recs = _one_pass(
                [
                    r
                    for r in records
                    if r["op"] == op and _main_variant(r) and saved_bits(r) is not None
                ]
            )
            Ts = sorted({r["T"] for r in recs})
            for (impl, mode), rs in sorted(
                _group(recs, "impl", "grad_mode").items(), key=lambda kv: str(kv[0])
            ):
                rs.sort(key=lambda r: r["T"])
                ax.plot(
                    [r["T"] for r in rs],
                    [saved_bits(r) for r in rs],
                    marker=MODE_MARKER.get(mode, "o"),
                    color=IMPL_COLORS.get(impl),
                    ls="-" if mode != "bptt" else "--",
                    label=f"{impl} {mode or ''}".strip(),
                )
            if op in ("empf_neuron", "empf_neuron_step") and Ts:
                # The mask, plus v[0..T-2] (the step op: v of steps 1..T-1) because λ learns.
                ys = [1 + 32 * (T - 1) / T for T in Ts]
                ax.plot(Ts, ys, color="red", ls=":", label="target: 1 bit + v (fp32)")
            _setup_axes_T(ax, Ts)
            ax.set_ylim(bottom=0)
            ax.set_ylabel("saved for backward (bits / element / step)")
            ax.set_title(op, fontsize=9)
            _dedup_legend(ax)
        _finish(
            fig,
            label,
            "Activation memory saved for backward (fp32, float spikes)",
            out / f"memory_saved{suffix}.png",
            written,
        )

    peak = [
        r
        for r in records
        if r["op"] in NEURON_OPS
        and r.get("cuda_peak_bytes") is not None
        and _main_variant(r)
        and r.get("pass") == "fwd+bwd"
    ]
    if peak:
        ops = [op for op in NEURON_OPS if any(r["op"] == op for r in peak)]
        fig, axes = _grid(len(ops))
        for ax, op in zip(axes, ops):
            recs = [r for r in peak if r["op"] == op]
            for (impl, mode), rs in sorted(
                _group(recs, "impl", "grad_mode").items(), key=lambda kv: str(kv[0])
            ):
                rs.sort(key=lambda r: r["T"])
                ax.plot(
                    [r["T"] for r in rs],
                    [r["cuda_peak_bytes"] / 2**20 for r in rs],
                    marker=MODE_MARKER.get(mode, "o"),
                    color=IMPL_COLORS.get(impl),
                    ls="-" if mode != "bptt" else "--",
                    label=f"{impl} {mode or ''}".strip(),
                )
            _setup_axes_T(ax, {r["T"] for r in recs})
            ax.set_yscale("log", base=2)
            ax.set_ylabel("CUDA peak memory above inputs (MiB)")
            ax.set_title(f"{op} · fwd+bwd", fontsize=9)
            _dedup_legend(ax)
        _finish(
            fig,
            label,
            "CUDA peak memory of one forward + backward",
            out / f"memory_peak{suffix}.png",
            written,
        )


def _grid(n: int, w: float = 5.4, h: float = 4.0):
    """A figure with n axes, at most two per row; returns (fig, flat list of n axes)."""
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = _subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _group(recs, *keys) -> dict[tuple, list[dict]]:
    out = defaultdict(list)
    for r in recs:
        out[tuple(r.get(k) for k in keys)].append(r)
    return out


def plot_bandwidth(records, label, out: Path, suffix: str, written: list[Path]) -> None:
    copy_bw = copy_bandwidth(records)
    ops = [op for op in NEURON_OPS if any(r["op"] == op and r.get("gbps") for r in records)]
    if not ops:
        return
    fig, axes = _grid(len(ops), w=6.0, h=4.6)
    for ax, op in zip(axes, ops):
        recs = [r for r in records if r["op"] == op and _main_variant(r) and r.get("gbps")]
        for (impl, pass_, mode), rs in sorted(
            _group(recs, "impl", "pass", "grad_mode").items(), key=lambda kv: str(kv[0])
        ):
            rs.sort(key=lambda r: r["T"])
            ax.plot(
                [r["T"] for r in rs],
                [r["gbps"] for r in rs],
                color=IMPL_COLORS.get(impl),
                ls=PASS_STYLE.get(pass_, "-"),
                marker=MODE_MARKER.get(mode, "o"),
                alpha=0.5 if impl == BASELINE else 1.0,
                label=f"{impl} {pass_} {mode or ''}".strip(),
            )
        if copy_bw:
            ax.axhline(copy_bw, color="k", lw=1, label=f"copy {copy_bw:.0f} GB/s")
        if copy_bw and any(r["impl"] == "triton" for r in recs):
            ax.axhline(
                BANDWIDTH_TARGET * copy_bw,
                color="red",
                ls=":",
                label=f"{BANDWIDTH_TARGET:.0%} of copy",
            )
        _setup_axes_T(ax, {r["T"] for r in recs})
        ax.set_yscale("log")
        ax.set_ylabel("GB/s (byte model / median time)")
        ax.set_title(op, fontsize=9)
        _dedup_legend(ax)
    _finish(
        fig,
        label,
        "Achieved bandwidth vs the device's copy bandwidth (fp32, float spikes)",
        out / f"bandwidth{suffix}.png",
        written,
    )


def plot_empf_vs_lif(records, label, out: Path, suffix: str, written: list[Path]) -> None:
    recs = [
        r
        for r in records
        if r["op"] in ("empf_neuron", "lif_neuron")
        and _main_variant(r)
        and r.get("pass") == "fwd+bwd"
        and r.get("median_s")
    ]
    if not {"empf_neuron", "lif_neuron"} <= {r["op"] for r in recs}:
        return
    modes = _present(recs, "grad_mode")
    fig, axes = _subplots(2, len(modes), figsize=(5.2 * len(modes), 7.0), squeeze=False)
    for j, mode in enumerate(modes):
        ax, ax_ratio = axes[0][j], axes[1][j]
        cell = [r for r in recs if r.get("grad_mode") == mode]
        by = _group(cell, "op", "impl")
        for (op, impl), rs in sorted(by.items(), key=lambda kv: str(kv[0])):
            rs.sort(key=lambda r: r["T"])
            ax.plot(
                [r["T"] for r in rs],
                [r["median_s"] * 1e3 for r in rs],
                color=IMPL_COLORS.get(impl),
                ls="-" if op == "empf_neuron" else "--",
                marker="o" if op == "empf_neuron" else "x",
                label=f"{op} {impl}",
            )
        for impl in sorted({r["impl"] for r in cell}):
            empf = {r["T"]: r["median_s"] for r in by.get(("empf_neuron", impl), [])}
            lif = {r["T"]: r["median_s"] for r in by.get(("lif_neuron", impl), [])}
            Ts = sorted(set(empf) & set(lif))
            if Ts:
                ax_ratio.plot(
                    Ts,
                    [lif[T] / empf[T] for T in Ts],
                    marker="o",
                    color=IMPL_COLORS.get(impl),
                    label=impl,
                )
        ax_ratio.axhline(1.0, color="red", ls=":", label="goal: EM-PF at least as fast")
        for a in (ax, ax_ratio):
            _setup_axes_T(a, {r["T"] for r in cell})
            a.set_yscale("log")
            _dedup_legend(a)
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"fwd+bwd · grad_mode={mode}", fontsize=9)
        ax_ratio.set_ylabel("LIF time / EM-PF time")
    _finish(
        fig,
        label,
        "EM-PF vs LIF at the same T (fp32, forward + backward)",
        out / f"empf_vs_lif{suffix}.png",
        written,
    )


def _is_gemm(r: dict) -> bool:
    return r["op"] in GEMM_OPS or "gemm" in str(r["op"]) or "binary" in r.get("name", "")


def plot_gemm(records, label, out: Path, suffix: str, written: list[Path]) -> None:
    """One row per GEMM benchmark op (inference GEMM, training step), columns time / GB/s /
    TFLOP/s vs M; solid = from the wall time of a synchronised call, dashed = from device time
    (the CUDA-graph replay's for the time column, CUDA events for the rates) where recorded."""
    recs = [r for r in records if _is_gemm(r) and r.get("M") is not None and r.get("median_s")]
    if not recs:
        return
    copy_bw = copy_bandwidth(records)
    ops = _present(recs, "op")
    fig, axes = _subplots(len(ops), 3, figsize=(15, 4.2 * len(ops)), squeeze=False)
    for r in recs:  # rates from the wall time (solid) and from the device time (dashed)
        if r.get("gbps_wall") is None and r.get("gbps") is not None:
            r["gbps_wall"] = r["gbps"] if r.get("gbps_basis") != "device_time_s" else None
        if r.get("device_time_s") and r.get("flops"):
            r["tflops_device"] = r["flops"] / r["device_time_s"] / 1e12
        if r.get("median_s") and r.get("flops"):
            r["tflops_wall"] = r["flops"] / r["median_s"] / 1e12
        if r.get("gbps_basis") == "device_time_s":
            r["gbps_device"] = r["gbps"]
    metrics = (
        ("median_s", "graph_device_time_s", 1e3, "time (ms)"),
        ("gbps_wall", "gbps_device", 1.0, "GB/s"),
        ("tflops_wall", "tflops_device", 1.0, "TFLOP/s"),
    )
    for i, op in enumerate(ops):
        groups = _group([r for r in recs if r["op"] == op], "impl", "K", "N", "dtype", "bits")
        for ax, (wall, gpu, scale, ylabel) in zip(axes[i], metrics):
            for (impl, K, N, dtype, bits), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
                rs = sorted(rs, key=lambda r: r["M"])
                name = " ".join(
                    str(x)
                    for x in (impl, K is not None and f"K={K} N={N}", dtype, bits and f"{bits}-bit")
                    if x
                )
                color = IMPL_COLORS.get(impl)
                dashed = " (graph replay, device)" if gpu.startswith("graph") else " (device)"
                for field, ls, tag in ((wall, "-", ""), (gpu, "--", dashed)):
                    pts = [(r["M"], r[field] * scale) for r in rs if r.get(field) is not None]
                    if pts:
                        ax.plot(*zip(*pts), marker="o", ls=ls, color=color, label=name + tag)
            if wall == "gbps_wall" and copy_bw:
                ax.axhline(copy_bw, color="k", lw=1, label=f"copy {copy_bw:.0f} GB/s")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("M (rows of x)")
            ax.set_ylabel(ylabel)
            ax.set_title(op, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            _dedup_legend(ax)
    _finish(fig, label, "Binary-weight GEMM vs M", out / f"binary_gemm{suffix}.png", written)


def plot_spikes(records, label, out: Path, suffix: str, written: list[Path]) -> None:
    recs = [r for r in records if r["op"] in SPIKE_OPS and r.get("gbps")]
    if not recs:
        return
    cases = sorted({(r["op"], r.get("bits"), r.get("dtype")) for r in recs}, key=str)
    impls = sorted({r["impl"] for r in recs})
    width = 0.8 / len(impls)
    fig, ax = _subplots(figsize=(max(6, 1.1 * len(cases)), 4))
    for k, impl in enumerate(impls):
        vals = []
        for c in cases:
            hit = [
                r["gbps"]
                for r in recs
                if (r["op"], r.get("bits"), r.get("dtype")) == c and r["impl"] == impl
            ]
            vals.append(hit[0] if hit else math.nan)  # not measured: no bar, never a 0 GB/s one
        ax.bar(
            [i + k * width for i in range(len(cases))],
            vals,
            width,
            color=IMPL_COLORS.get(impl),
            label=impl,
        )
    copy_bw = copy_bandwidth(records)
    if copy_bw:
        ax.axhline(copy_bw, color="k", lw=1, label=f"copy {copy_bw:.0f} GB/s")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{o}\n{b}-bit {d or ''}" for o, b, d in cases], fontsize=7)
    ax.set_ylabel("GB/s")
    ax.legend(fontsize=7)
    _finish(
        fig,
        label,
        "Spike quantise / encode / decode bandwidth",
        out / f"spikes{suffix}.png",
        written,
    )


# ------------------------------------------------------------------------------------ summary


def summary_rows(records: list[dict]) -> list[dict]:
    """One row per (op, pass, grad mode, dtype, spikes, impl, N) of the T sweeps."""
    sp = speedups(records)
    copy_bw = copy_bandwidth(records)
    groups = defaultdict(dict)
    for r in records:
        if r["op"] not in NEURON_OPS or r.get("T") is None:
            continue
        gk = (
            r["op"],
            r.get("pass"),
            r.get("grad_mode"),
            r.get("dtype"),
            "float" if r.get("spike_bits") is None else f"{r['spike_bits']}-bit",
            r["impl"],
            r.get("N"),
        )
        groups[gk][r["T"]] = r
    rows = []
    for gk, byT in sorted(groups.items(), key=lambda kv: [str(x) for x in kv[0]]):
        op, pass_, mode, dtype, spikes, impl, n = gk
        row = {
            "op": op,
            "pass": pass_,
            "grad_mode": mode,
            "dtype": dtype,
            "spikes": spikes,
            "impl": impl,
            "N": n,
        }
        for T in SUMMARY_T:
            r = byT.get(T)
            row[f"ms_T{T}"] = r["median_s"] * 1e3 if r and r.get("median_s") else None
            row[f"speedup_T{T}"] = sp.get(_key(r)) if r else None
            row[f"gbps_T{T}"] = r.get("gbps") if r else None
            row[f"copy_frac_T{T}"] = (
                r["gbps"] / copy_bw if r and r.get("gbps") and copy_bw else None
            )
            row[f"saved_bits_T{T}"] = saved_bits(r) if r else None
        if any(row[f"ms_T{T}"] is not None for T in SUMMARY_T):
            rows.append(row)
    return rows


def target_checks(records: list[dict]) -> list[dict]:
    """The issue's targets against this run; 'n/a' where the run lacks the cases."""
    sp = speedups(records)
    copy_bw = copy_bandwidth(records)
    checks = []

    def find(**m):
        return [r for r in records if all(r.get(k) == v for k, v in m.items()) and _main_variant(r)]

    for mode in ("online", "bptt"):
        for T, target in SPEEDUP_TARGETS[("empf_neuron", "fwd+bwd")].items():
            rs = find(op="empf_neuron", impl="triton", T=T, grad_mode=mode, **{"pass": "fwd+bwd"})
            val = sp.get(_key(rs[0])) if rs else None
            checks.append(_check(f"fused fwd+bwd speed-up, {mode}, T={T}", val, target, "x"))
    for T in SUMMARY_T:
        rs = find(op="empf_neuron_step", impl="triton", T=T, **{"pass": "fwd+bwd"})
        val = sp.get(_key(rs[0])) if rs else None
        checks.append(_check(f"single-step fwd+bwd speed-up, T={T}", val, STEP_SPEEDUP_TARGET, "x"))
    for mode in ("online", "bptt"):
        rs = find(op="empf_neuron", impl="triton", grad_mode=mode, **{"pass": "fwd+bwd"})
        best = max(rs, key=lambda r: r.get("gbps") or 0, default=None)
        val = best["gbps"] / copy_bw if best and best.get("gbps") and copy_bw else None
        name = f"fused fwd+bwd bandwidth / copy, {mode}, best T"
        if best:
            name += f" (T={best['T']})"
        checks.append(_check(name, val, BANDWIDTH_TARGET, "", fmt="{:.0%}"))
    rs = find(op="empf_neuron", impl="triton", grad_mode="online")
    worst = None
    for r in rs:
        bits = saved_bits(r)
        if bits is None:
            continue
        limit = 1 + _dtype_bits(r.get("dtype")) * (r["T"] - 1) / r["T"]
        excess = bits - limit
        if worst is None or excess > worst[0]:
            worst = (excess, bits, limit, r["T"])
    if worst is not None:
        checks.append(
            {
                "check": f"online saved bits/elem/step ≤ 1 + v (worst T={worst[3]})",
                "value": f"{worst[1]:.3g}",
                "target": f"≤ {worst[2]:.3g}",
                "status": "PASS" if worst[0] <= 1e-6 else "FAIL",
            }
        )
    else:
        checks.append(
            {
                "check": "online saved bits/elem/step ≤ 1 + v",
                "value": "n/a",
                "target": "",
                "status": "n/a",
            }
        )
    for mode in ("online", "bptt"):
        for T in SUMMARY_T:
            e = find(op="empf_neuron", impl="triton", T=T, grad_mode=mode, **{"pass": "fwd+bwd"})
            lif = find(op="lif_neuron", impl="triton", T=T, grad_mode=mode, **{"pass": "fwd+bwd"})
            val = lif[0]["median_s"] / e[0]["median_s"] if e and lif else None
            checks.append(
                _check(f"LIF time / EM-PF time (triton fwd+bwd, {mode}, T={T})", val, 1.0, "x")
            )
    return checks


# ------------------------------------------------------------------------- GPU targets (issues)
# Each target names the records it reads (op and extra_info fields). A target whose records are not
# in the files is "not measured", never passed. Fields other benchmark files must record for their
# targets are listed in docs/benchmarking.md.
N_TARGET = 1 << 22
PAPER_TRAIN_BYTES = 1.68e9


def _one(records, **match):
    """The first record whose fields equal `match` (None when there is none)."""
    for r in records:
        if all(r.get(k) == v for k, v in match.items()):
            return r
    return None


def _t(r, field="median_s"):
    return None if r is None else r.get(field)


def _target(name, value, target, unit, *, better="higher", fmt="{:.2f}", why="", basis=""):
    if value is None:
        return {
            "target": name,
            "value": "not measured" + (f" ({why})" if why else ""),
            "goal": ("≥ " if better == "higher" else "≤ ") + fmt.format(target) + unit,
            "status": "not measured",
            "basis": basis,
        }
    ok = value >= target if better == "higher" else value <= target
    return {
        "target": name,
        "value": fmt.format(value) + unit,
        "goal": ("≥ " if better == "higher" else "≤ ") + fmt.format(target) + unit,
        "status": "PASS" if ok else "FAIL",
        "basis": basis,
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def gpu_targets(records: list[dict]) -> list[dict]:
    """The GPU targets of the open issues, PASS / FAIL / not measured, from these records. Each
    target is judged on the records of one commit (the first that has its cases): a ratio of
    one commit's Triton case to another's reference would compare two different codes."""
    commits = list(dict.fromkeys(r.get("run_commit") for r in records))
    rows = _gpu_targets_one_run(records)
    if len(commits) < 2:
        return rows
    per_commit = [
        _gpu_targets_one_run([r for r in records if r.get("run_commit") == c]) for c in commits
    ]
    out = []
    for i, row in enumerate(rows):
        measured = [rs[i] for rs in per_commit if rs[i]["status"] != "not measured"]
        if measured:
            out.append(measured[0])
        elif row["status"] != "not measured":  # only the records of several commits together
            why = f"its cases come from different commits: {', '.join(map(str, commits))}"
            out.append(dict(row, value=f"not measured ({why})", status="not measured"))
        else:
            out.append(row)
    return out


def _gpu_targets_one_run(records: list[dict]) -> list[dict]:
    rows = []
    on_cuda = any(r.get("device_type") == "cuda" for r in records)
    why_dev = "" if on_cuda else "no CUDA records"
    copy_bw = copy_bandwidth(records)

    def neuron(impl, T, mode, pass_="fwd+bwd", op="empf_neuron"):
        return _one(
            records, op=op, impl=impl, T=T, grad_mode=mode, dtype="fp32", spike_bits=None,
            N=N_TARGET, device_type="cuda", **{"pass": pass_},
        )  # fmt: skip

    for mode in ("online", "bptt"):
        tri, comp, eag = (neuron(i, 4, mode) for i in ("triton", "compile", "eager"))
        basis = "wall time of one synchronised call, T=4, N=2^22, fp32"
        rows.append(
            _target(
                f"empf_neuron fwd+bwd T=4 N=2^22 {mode}: triton vs torch.compile(reference)",
                _ratio(_t(comp), _t(tri)), 2.5, "x", why=why_dev or "case missing", basis=basis,
            )
        )  # fmt: skip
        rows.append(
            _target(
                f"empf_neuron fwd+bwd T=4 N=2^22 {mode}: triton vs eager reference",
                _ratio(_t(eag), _t(tri)), 5.0, "x", why=why_dev or "case missing", basis=basis,
            )
        )  # fmt: skip
    for mode in ("online", "bptt"):
        tri = neuron("triton", 32, mode)
        frac = _ratio(_t(tri, "gbps"), copy_bw)
        rows.append(
            _target(
                f"empf_neuron fwd+bwd T=32 {mode}: bandwidth / measured copy bandwidth",
                frac, 0.85, "", fmt="{:.0%}", why=why_dev or "case or copy missing",
                basis="byte model / device time (CUDA events, L2 flushed)",
            )
        )  # fmt: skip
    tri = _one(records, op="empf_neuron_step", impl="triton", T=4, device_type="cuda",
               dtype="fp32", N=N_TARGET, **{"pass": "fwd+bwd"})  # fmt: skip
    eag = _one(records, op="empf_neuron_step", impl="eager", T=4, device_type="cuda",
               dtype="fp32", N=N_TARGET, **{"pass": "fwd+bwd"})  # fmt: skip
    rows.append(
        _target(
            "empf_neuron_step: T=4 calls, backward after each, triton vs eager",
            _ratio(_t(eag), _t(tri)), 3.0, "x", why=why_dev or "case missing",
            basis="wall time of the T calls",
        )
    )  # fmt: skip
    gm = {"op": "binary_gemm", "M": 1, "N": 4096, "K": 4096, "device_type": "cuda"}
    tri, cub = _one(records, impl="triton", **gm), _one(records, impl="cublas", **gm)
    rows.append(
        _target(
            "binary_matmul M=1 N=K=4096 vs cuBLAS fp16, eager",
            _ratio(_t(cub), _t(tri)), 1.0, "x", why=why_dev or "case missing",
            basis="wall time of one synchronised call",
        )
    )  # fmt: skip
    rows.append(
        _target(
            "binary_matmul M=1 N=K=4096 vs cuBLAS fp16, CUDA graph",
            _ratio(_t(cub, "graph_device_time_s"), _t(tri, "graph_device_time_s")), 1.5, "x",
            why=why_dev or "case or graph missing", basis="device time of one graph replay",
        )
    )  # fmt: skip
    # step mode "m" (one call) or "s" (a loop of T calls): the faster one is what a user runs
    infs = [
        r for r in records
        if all(r.get(k) == v for k, v in dict(
            op="resnet18_inference", batch=1, T=4, impl="compile-reduce-overhead",
            device_type="cuda").items()) and r.get("median_s")
    ]  # fmt: skip
    inf = min(infs, key=lambda r: r["median_s"], default=None)
    rows.append(
        _target(
            "EM-PF ResNet-18 CIFAR T=4 inference B=1, torch.compile reduce-overhead"
            + (f" (step mode {inf.get('step_mode')})" if inf is not None else ""),
            None if inf is None else inf["median_s"] * 1e3, 2.0, " ms", better="lower",
            why=why_dev or "case missing",
            basis="wall time per sample batch: reset_net + T steps (bench/test_bench_models.py)",
        )
    )  # fmt: skip
    tr = {"op": "train_step", "model": "resnet18", "batch": 64, "T": 4, "device_type": "cuda"}
    onl, bptt = _one(records, strategy="online", **tr), _one(records, strategy="bptt", **tr)
    rows.append(
        _target(
            "ResNet-18 B=64 T=4 online training step / BPTT step",
            _ratio(_t(onl), _t(bptt)), 1.5, "x", better="lower", why=why_dev or "case missing",
            basis="wall time per batch (bench/test_bench_training.py)",
        )
    )  # fmt: skip
    em = _one(records, op="neuron_step", neuron="empf", device_type="cuda")
    lif = _one(records, op="neuron_step", neuron="lif", device_type="cuda")
    rows.append(
        _target(
            "EM-PF training step / plain LIF training step (same net, online, T=4)",
            _ratio(_t(em), _t(lif)), 1.0, "x", better="lower", why=why_dev or "case missing",
            basis="wall time per batch",
        )
    )  # fmt: skip
    rows.append(
        _target(
            "ResNet-18 B=64 T=4 online training memory (total allocated, model + optimizer)",
            None if onl is None or onl.get("cuda_total_peak_bytes") is None
            else onl["cuda_total_peak_bytes"] / 1e9,
            PAPER_TRAIN_BYTES / 1e9, " GB", better="lower", why=why_dev or "case missing",
            basis="torch.cuda.max_memory_allocated over one batch; paper: 1.68 GB",
        )
    )  # fmt: skip
    dep = {"op": "deploy_resnet18", "device_type": "cuda"}
    # the packed deployment in the paper's compression mode: 4-bit spike codes between layers
    d1 = _one(records, batch=1, impl="packed", spike_bits=4, **dep)
    rows.append(
        _target(
            "deployed ResNet-18 B=1 latency per sample",
            None if d1 is None else d1["median_s"] * 1e3, 1.0, " ms", better="lower",
            why=why_dev or "case missing", basis="wall time per batch of 1",
        )
    )  # fmt: skip
    d256 = _one(records, batch=256, impl="packed", spike_bits=4, **dep)
    dense = _one(records, batch=256, impl="dense-fp16-compile", **dep)
    rows.append(
        _target(
            "deployed ResNet-18 B=256 throughput vs dense fp16 cuDNN (compiled)",
            _ratio(_t(dense), _t(d256)), 3.0, "x", why=why_dev or "case missing",
            basis="wall time per batch of 256",
        )
    )  # fmt: skip
    rows.append(
        _target(
            "deployed ResNet-18 activation memory / dense fp16",
            _ratio(_t(d256, "activation_bytes"), _t(dense, "activation_bytes")), 0.25, "",
            better="lower", why=why_dev or "case missing", basis="activation bytes per batch",
        )
    )  # fmt: skip
    return rows


def _check(name, value, target, unit, fmt="{:.2f}") -> dict:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {
            "check": name,
            "value": "n/a",
            "target": f"≥ {fmt.format(target)}{unit}",
            "status": "n/a",
        }
    return {
        "check": name,
        "value": fmt.format(value) + unit,
        "target": f"≥ {fmt.format(target)}{unit}",
        "status": "PASS" if value >= target else "FAIL",
    }


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def write_summary(records, label, out: Path, suffix: str, written: list[Path]) -> None:
    rows = summary_rows(records)
    copy_bw = copy_bandwidth(records)
    csv_path = out / f"summary{suffix}.csv"
    fields = ["op", "pass", "grad_mode", "dtype", "spikes", "impl", "N"] + [
        f"{m}_T{T}" for T in SUMMARY_T for m in ("ms", "speedup", "gbps", "copy_frac", "saved_bits")
    ]
    with csv_path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: _fmt(row.get(k)) for k in fields})
    written.append(csv_path)

    lines = [f"# Benchmark summary\n\n{label}\n"]
    lines.append(
        f"Copy bandwidth (read + write): {_fmt(copy_bw)} GB/s\n"
        if copy_bw
        else "Copy bandwidth: not measured in these files\n"
    )
    lines.append("## Targets\n")
    lines.append(
        "The GPU targets of the open issues. A target whose benchmark did not run here is "
        '"not measured", never passed.\n'
    )
    lines.append("| target | value | goal | status | measured as |\n|---|---|---|---|---|")
    for c in gpu_targets(records):
        lines.append(
            f"| {c['target']} | {c['value']} | {c['goal']} | {c['status']} | {c['basis']} |"
        )
    lines.append("\n## Other checks\n")
    lines.append("| check | value | target | status |\n|---|---|---|---|")
    for c in target_checks(records):
        lines.append(f"| {c['check']} | {c['value']} | {c['target']} | {c['status']} |")
    lines.append("\n## Neuron ops at T=4 and T=32\n")
    lines.append(
        "Times are medians; speed-up is over the eager reference of the same case; "
        "GB/s uses the byte model in bench/test_bench_neuron.py; saved bits are per "
        "element per step.\n"
    )
    head = ["op", "pass", "mode", "dtype", "spikes", "impl"]
    for T in SUMMARY_T:
        head += [f"ms T={T}", f"x T={T}", f"GB/s T={T}", f"copy% T={T}", f"bits T={T}"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for row in rows:
        cells = [row["op"], row["pass"], row["grad_mode"], row["dtype"], row["spikes"], row["impl"]]
        for T in SUMMARY_T:
            frac = row[f"copy_frac_T{T}"]
            cells += [
                _fmt(row[f"ms_T{T}"]),
                _fmt(row[f"speedup_T{T}"]),
                _fmt(row[f"gbps_T{T}"]),
                f"{frac:.0%}" if frac is not None else "",
                _fmt(row[f"saved_bits_T{T}"]),
            ]
        lines.append("| " + " | ".join(str(c) if c is not None else "" for c in cells) + " |")
    other = [r for r in records if r["op"] not in NEURON_OPS]
    if other:
        lines.append("\n## Other benchmarks\n")
        lines.append("| benchmark | impl | median ms | GB/s | TFLOP/s |\n|---|---|---|---|---|")
        for r in sorted(other, key=lambda r: r["name"]):
            ms = r["median_s"] * 1e3 if r.get("median_s") else None
            lines.append(
                f"| {r['name']} | {r.get('impl_label', r['impl'])} | {_fmt(ms)} | "
                f"{_fmt(r.get('gbps'))} | {_fmt(r.get('tflops'))} |"
            )
    md_path = out / f"summary{suffix}.md"
    md_path.write_text("\n".join(lines) + "\n")
    written.append(md_path)


# --------------------------------------------------------------------------------------- main


def load_skipped(paths: Sequence[str | Path]) -> list[dict]:
    """Cases the benchmark runs skipped, with their reasons (bench/conftest.py's empf_skipped)."""
    out = []
    for path in paths:
        doc = read_doc(path)
        out += [dict(s, source=Path(path).name) for s in doc.get("empf_skipped") or []]
    return out


def write_extras(paths, out: Path, stages: str | None, written: list[Path]) -> None:
    """Append to summary.md (to each device's summary_<device>.md when the files hold several
    devices) what did not run: interrupted and skipped cases and the stage table of run_gpu.sh."""
    mds = [p for p in written if p.parent == out and re.fullmatch(r"summary(_.+)?\.md", p.name)]
    if not mds:
        return
    lines = []
    cut = interrupted(load(paths)[0])
    if cut:
        lines.append("\n## Not measured (interrupted cases)\n")
        lines.append(
            "Stopped by their stage's time limit after some rounds: left out of every table, "
            "plot and target above.\n"
        )
        lines.append("| case | file | rounds |\n|---|---|---|")
        lines += [
            f"| {r['name']} | {Path(r['source']).name} | {_fmt(r.get('rounds'))} |"
            for r in sorted(cut, key=lambda r: (r["source"], r["name"]))
        ]
    skipped = load_skipped(paths)
    if skipped:
        reasons: dict[str, list[str]] = defaultdict(list)
        for sk in skipped:
            reasons[sk["reason"]].append(sk["nodeid"].split("::")[-1])
        lines.append("\n## Not measured (skipped cases)\n")
        lines.append("| reason | cases |\n|---|---|")
        for reason, cases in sorted(reasons.items()):
            shown = ", ".join(cases[:6]) + (f" and {len(cases) - 6} more" if len(cases) > 6 else "")
            lines.append(f"| {reason} | {shown} |")
    if stages and Path(stages).is_file():
        rows = [line.split("\t") for line in Path(stages).read_text().splitlines() if line]
        if rows:
            lines.append("\n## Stages (bench/run_gpu.sh)\n")
            lines.append("| " + " | ".join(rows[0]) + " |")
            lines.append("|" + "---|" * len(rows[0]))
            lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    for md in mds if lines else ():
        md.write_text(md.read_text() + "\n".join(lines) + "\n")


def readme_table(paths: Sequence[str | Path]) -> str:
    """The README's performance table: every GPU target with its value and status, per device."""
    records, envs = load(paths)
    cut = interrupted(records)
    records = finished(records)
    lines = []
    for device in sorted({r["device"] for r in records}):
        recs = [r for r in records if r["device"] == device]
        lines.append(f"Measured on {env_label(envs.get(device, [{}]), device)}:\n")
        lines.append("| target | measured | goal | status |\n|---|---|---|---|")
        for c in gpu_targets(recs):
            lines.append(f"| {c['target']} | {c['value']} | {c['goal']} | {c['status']} |")
        lines.append("")
    if cut:
        lines.append(
            f"Not measured: {len(cut)} case(s) stopped by a time limit before they finished, "
            f"left out above: {', '.join(sorted(r['name'] for r in cut))}.\n"
        )
    return "\n".join(lines) + "\n"


def report(paths: Sequence[str | Path], out: str | Path) -> list[Path]:
    """Write all plots and summaries for `paths` into `out`; returns the files written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, envs = load(paths)
    records = finished(records)
    written: list[Path] = []
    devices = sorted({r["device"] for r in records})
    for device in devices:
        recs = [r for r in records if r["device"] == device]
        label = env_label(envs.get(device, [{}]), device)
        suffix = "" if len(devices) == 1 else "_" + _slug(device)
        plot_speedup(recs, label, out, suffix, written)
        plot_memory(recs, label, out, suffix, written)
        plot_bandwidth(recs, label, out, suffix, written)
        plot_empf_vs_lif(recs, label, out, suffix, written)
        plot_gemm(recs, label, out, suffix, written)
        plot_spikes(recs, label, out, suffix, written)
        write_summary(recs, label, out, suffix, written)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/report.py", description="Plot benchmark JSON files (pytest-benchmark format)."
    )
    parser.add_argument("json", nargs="+", help="--benchmark-json output files")
    parser.add_argument("--out", required=True, help="directory for the PNGs and summaries")
    parser.add_argument(
        "--readme-table", metavar="PATH", help="also write the README's performance table here"
    )
    parser.add_argument(
        "--stages", metavar="TSV", help="bench/run_gpu.sh's stages.tsv, listed in summary.md"
    )
    args = parser.parse_args(argv)
    folders = [p for p in args.json if Path(p).is_dir()]
    if folders:
        parser.error(f"{folders[0]} is a folder; pass its files, e.g. {folders[0]}/bench_*.json")
    missing = [p for p in args.json if not Path(p).is_file()]
    if missing:
        parser.error(f"no such file: {', '.join(missing)}")
    seen: dict[Path, str] = {}
    for p in args.json:
        if Path(p).resolve() in seen:  # its cases would be listed twice
            parser.error(f"{p} is given twice (as {seen[Path(p).resolve()]})")
        seen[Path(p).resolve()] = p
        try:
            read_doc(p)
        except ValueError as e:
            parser.error(str(e))
    written = report(args.json, args.out)
    if not written:
        print("no benchmark records with timings found", file=sys.stderr)
        return 1
    write_extras(args.json, Path(args.out), args.stages, written)
    if args.readme_table:
        path = Path(args.readme_table)
        path.write_text(readme_table(args.json))
        written.append(path)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
