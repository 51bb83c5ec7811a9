"""The host-time table of README.md from `bench/test_bench_overhead.py` JSON files.

    python bench/overhead_table.py RUN.json [RUN.json ...] [--out TABLE.md]

Several runs of the same machine give one table of per-case medians of their medians (a shared
VM's runs differ by up to 2x when a neighbour is busy; the median of three keeps one bad run out).
Runs of different machines, versions or commits are refused (one table, one machine and code); a
case that some runs lack shows the median of the others and says "(k of n runs)".
Rows: the fused ops through each launch path (forward + backward), the other ops, the module
steps, the floor (an empty two-output autograd.Function) and eager relu, the yardstick; the last
column is the direct path over relu.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(paths: list[str]) -> tuple[dict[tuple[str, str, str], list[float]], dict]:
    """(case, kind, launch path) -> each run's median (µs); the first run's machine_info.
    ValueError for a file that is not a benchmark JSON, a file given twice, or runs of different
    machines, versions or commits (one table is one machine and one code)."""
    runs: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    info: dict = {}
    seen: dict[tuple, str] = {}  # (device, torch, triton, commit) -> a file of that run
    files: set[Path] = set()
    for p in paths:
        try:
            doc = json.loads(Path(p).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{p}: not a readable JSON file ({e})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("benchmarks", []), list):
            raise ValueError(f"{p}: not a pytest-benchmark JSON file")
        if Path(p).resolve() in files:
            raise ValueError(f"{p} is given twice: each file is one run")
        files.add(Path(p).resolve())
        empf = (doc.get("machine_info") or {}).get("empf") or {}
        seen[tuple(empf.get(k) for k in ("device", "torch", "triton", "commit"))] = p
        info = info or doc.get("machine_info", {})
        for b in doc.get("benchmarks", []):
            e = b.get("extra_info") or {}
            if "host_us" not in e:
                continue
            key = (e["case"], e["kind"], e.get("launch_path", ""))
            runs[key].append(e["host_us"])
    if len(seen) > 1:
        raise ValueError(
            "runs of different machines, versions or commits (device, torch, triton, commit): "
            + "; ".join(f"{p}: {', '.join(map(str, k))}" for k, p in seen.items())
        )
    return runs, info


def table(runs: dict[tuple[str, str, str], list[float]], n_runs: int, info: dict) -> str:
    us = {k: statistics.median(v) for k, v in runs.items()}
    relu = us.get(("relu", "fwd+bwd", "direct")) or us.get(("relu", "fwd+bwd", "stubbed"))
    if relu is None:
        raise ValueError("no eager relu fwd+bwd case in the JSON: run the whole overhead file")

    def cell(key) -> str:  # a case some runs lack: the median of fewer runs, said so
        n = len(runs.get(key, ()))
        return _f(us.get(key)) + (f" ({n} of {n_runs} runs)" if 0 < n < n_runs else "")

    empf = info.get("empf", {})
    lines = [
        f"Host µs per call, forward + backward, median of {n_runs} run(s); "
        f"{empf.get('device', '?')}, torch {empf.get('torch', '?')}, "
        f"Triton {empf.get('triton', '?')}, commit {empf.get('commit', '?')}:",
        "",
        "| call | Triton's launch path | direct launcher | direct / relu |",
        "|---|---|---|---|",
    ]
    cases = sorted({c for (c, k, _) in us if k == "fwd+bwd" and c != "relu"}, key=_order)
    for case in cases:
        direct = (case, "fwd+bwd", "direct")
        main = direct if direct in us else (case, "fwd+bwd", "stubbed")
        lines.append(
            f"| `{case}` | {cell((case, 'fwd+bwd', 'triton'))} | {cell(main)} | "
            f"{'' if main not in us else f'{us[main] / relu:.1f}x'} |"
        )
    lines.append(f"| eager `torch.relu` (the yardstick) | {relu:.0f} | {relu:.0f} | 1.0x |")
    both = {c for (c, k, _) in us if k == "fwd+bwd"}
    fwd_only = sorted({c for (c, k, _) in us if k == "fwd" and c not in both})
    if fwd_only:
        lines += ["", "Forward only (no gradient), µs per call:", "", "| call | µs |", "|---|---|"]
        for case in fwd_only:
            direct = (case, "fwd", "direct")
            lines.append(
                f"| `{case}` | {cell(direct if direct in us else (case, 'fwd', 'stubbed'))} |"
            )
    return "\n".join(lines) + "\n"


def _order(case: str) -> tuple[int, str]:
    if case.startswith("empty"):  # the autograd floor, last, above the yardstick
        return 10, case
    if "custom ops" in case:  # a compiled graph's calls, after the eager ops
        return 7, case
    for i, prefix in enumerate(("empf_neuron", "parallel", "lif", "quantize", "binar", "tern")):
        if case.startswith(prefix):
            return i, case
    return (9 if "step" in case and case[0].isupper() else 8), case


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.0f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="bench/test_bench_overhead.py --benchmark-json files")
    ap.add_argument("--out", help="write the table here (default: stdout)")
    args = ap.parse_args(argv)
    try:
        runs, info = load(args.json)
    except ValueError as e:
        ap.error(str(e))
    text = table(runs, len(args.json), info)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
