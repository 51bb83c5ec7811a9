"""The host-time table of README.md from `bench/test_bench_overhead.py` JSON files.

    python bench/overhead_table.py RUN.json [RUN.json ...] [--out TABLE.md]

Several runs of the same machine give one table of per-case medians of their medians (a shared
VM's runs differ by up to 2x when a neighbour is busy; the median of three keeps one bad run out).
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


def load(paths: list[str]) -> tuple[dict[tuple[str, str, str], float], dict]:
    """(case, kind, launch path) -> median over the runs of each run's median (µs); the first
    run's machine_info."""
    runs: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    info: dict = {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        info = info or doc.get("machine_info", {})
        for b in doc.get("benchmarks", []):
            e = b.get("extra_info", {})
            if "host_us" not in e:
                continue
            key = (e["case"], e["kind"], e.get("launch_path", ""))
            runs[key].append(e["host_us"])
    return {k: statistics.median(v) for k, v in runs.items()}, info


def table(us: dict[tuple[str, str, str], float], n_runs: int, info: dict) -> str:
    relu = us.get(("relu", "fwd+bwd", "direct")) or us.get(("relu", "fwd+bwd", "stubbed"))
    if relu is None:
        raise ValueError("no eager relu fwd+bwd case in the JSON: run the whole overhead file")
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
        direct = us.get((case, "fwd+bwd", "direct"))
        triton = us.get((case, "fwd+bwd", "triton"))
        stub = us.get((case, "fwd+bwd", "stubbed"))
        main = direct if direct is not None else stub
        lines.append(
            f"| `{case}` | {_f(triton)} | {_f(main)} | "
            f"{'' if main is None else f'{main / relu:.1f}x'} |"
        )
    lines.append(f"| eager `torch.relu` (the yardstick) | {relu:.0f} | {relu:.0f} | 1.0x |")
    both = {c for (c, k, _) in us if k == "fwd+bwd"}
    fwd_only = sorted({c for (c, k, _) in us if k == "fwd" and c not in both})
    if fwd_only:
        lines += ["", "Forward only (no gradient), µs per call:", "", "| call | µs |", "|---|---|"]
        for case in fwd_only:
            main = us.get((case, "fwd", "direct"), us.get((case, "fwd", "stubbed")))
            lines.append(f"| `{case}` | {_f(main)} |")
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
    us, info = load(args.json)
    text = table(us, len(args.json), info)
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
