"""bench/report.py turns a real (tiny, CPU) benchmark run into plots and a summary.

The benchmarks run in a subprocess on the CPU with tiny sizes: the eager cases, a few Triton cases
in the interpreter (so the speed-up plots have something to show), and once more through the
built-in fallback runner that replaces pytest-benchmark where it is missing.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"


def _run_bench(
    out_json: Path, select: str, *extra: str, fallback: bool = False, check_json: bool = True
) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EMPF_", "TRITON_", "PYTEST_XDIST"))
    }
    env.update(
        EMPF_BENCH_DEVICE="cpu",
        EMPF_BENCH_N="1024",
        EMPF_BENCH_T="1,4",
        EMPF_BENCH_COMPILE_T="none",
        EMPF_BENCH_TARGET_S="0.001",
        EMPF_POISON_EMPTY="0",
        EMPF_AUTOTUNE="0",
        TRITON_INTERPRET="1",  # Triton cases on CPU tensors: harness check only
        EMPF_COMMIT="testcommit",
    )
    if fallback:
        env["EMPF_BENCH_FALLBACK"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(BENCH / "test_bench_neuron.py"),
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        select,
        f"--benchmark-json={out_json}",
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    if check_json:
        assert out_json.is_file(), proc.stdout[-2000:]


def _load_report():
    spec = importlib.util.spec_from_file_location("empf_bench_report", BENCH / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_from_a_real_cpu_run(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("triton")
    main_json = tmp_path / "neuron.json"
    triton_cases = "triton and fwd-online and fp32-float and not step and not lif"
    _run_bench(main_json, f"copy or eager or ({triton_cases})")
    fb_json = tmp_path / "fallback.json"
    _run_bench(
        fb_json, "copy or (eager and T1 and fwd-online)", "-p", "no:benchmark", fallback=True
    )

    doc = json.loads(main_json.read_text())
    env = doc["machine_info"]["empf"]
    assert env["commit"] == "testcommit" and env["device_type"] == "cpu"
    by_name = {b["name"]: b for b in doc["benchmarks"]}
    rec = by_name["test_bench_empf_neuron[triton-fwd-online-T4-fp32-float]"]["extra_info"]
    # The fused op saves 1 mask bit per element per step plus v[0..2] (fp32) because λ learns.
    assert rec["saved_bytes"] == 4 * (1024 // 8) + 3 * 1024 * 4
    assert rec["rel_err_vs_eager"] == 0.0
    assert rec["gbps"] > 0 and rec["bytes_moved"] > 0
    assert any(b["extra_info"]["op"] == "copy" for b in doc["benchmarks"])

    fb = json.loads(fb_json.read_text())
    assert fb["version"].startswith("empf-fallback")
    assert fb["benchmarks"] and all(b["stats"]["median"] > 0 for b in fb["benchmarks"])
    assert set(fb["benchmarks"][0]) >= {"name", "fullname", "params", "extra_info", "stats"}

    report = _load_report()
    out = tmp_path / "report"
    assert report.main([str(main_json), str(fb_json), "--out", str(out)]) == 0
    pngs = {p.name for p in out.glob("*.png")}
    for name in (
        "speedup_empf_neuron.png",
        "memory_saved.png",
        "bandwidth.png",
        "empf_vs_lif.png",
    ):
        assert name in pngs, sorted(pngs)
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    summary = (out / "summary.md").read_text()
    assert "testcommit" in summary and "| empf_neuron | fwd | online | fp32 | float | triton" in (
        summary
    )
    assert (out / "summary.csv").read_text().startswith("op,pass,grad_mode")


def test_report_rejects_missing_files(tmp_path):
    report = _load_report()
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nope.json"), "--out", str(tmp_path)])


def test_report_refuses_unreadable_json_and_a_file_given_twice(tmp_path, capsys):
    """An empty file (a stage cut before pytest-benchmark wrote it, as in the committed run 1
    folder), a truncated or non-benchmark JSON or a binary file is a clear error naming the file,
    not a traceback; a file given twice is refused (its cases would be listed twice)."""
    report = _load_report()
    bad = {
        "empty.json": ("", "empty"),
        "cut.json": ('{"benchmarks": [', "not valid JSON"),
        "list.json": ("[1, 2]", "not a pytest-benchmark JSON"),
        "stats.json": ('{"benchmarks": [{"name": "x", "stats": [1]}]}', "not a pytest-benchmark"),
        "bin.json": (None, "not a readable text file"),
    }
    for name, (text, message) in bad.items():
        path = tmp_path / name
        if text is None:
            path.write_bytes(b"\xff\xfe\x00")
        else:
            path.write_text(text)
        with pytest.raises(SystemExit):
            report.main([str(path), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert name in err and message in err and "Traceback" not in err, err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit):
        report.main([str(good), str(tmp_path / "." / "good.json"), "--out", str(tmp_path)])
    assert "given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a results folder instead of its files
        report.main([str(tmp_path), "--out", str(tmp_path / "out")])
    assert "is a folder; pass its files" in capsys.readouterr().err


def test_interrupted_cases_are_listed_as_not_measured_never_timed(tmp_path):
    """A case a stage's time limit stopped after some rounds keeps those rounds' median but only
    `interrupted` in its extra_info (bench/conftest.py): it was listed among the other benchmarks
    with that median as if measured, and nowhere as interrupted."""
    pytest.importorskip("matplotlib")
    report = _load_report()
    gm = {"op": "binary_gemm", "M": 1, "N": 4096, "K": 4096, "device_type": "cuda"}
    doc = {
        "machine_info": {"empf": {"device": "GPU", "device_type": "cuda", "commit": "c"}},
        "benchmarks": [
            {"name": "test_bench_binary_gemm[triton-1]", "stats": {"median": 1e-5, "rounds": 9},
             "extra_info": dict(gm, impl="triton")},
            {"name": "test_bench_binary_gemm[cublas-1]", "stats": {"median": 9e-6, "rounds": 1},
             "extra_info": {"interrupted": "stopped by the time limit before it finished"}},
        ],
    }  # fmt: skip
    path = tmp_path / "bench_gemm.json"
    path.write_text(json.dumps(doc))
    out = tmp_path / "out"
    assert report.main([str(path), "--out", str(out), "--readme-table", str(out / "t.md")]) == 0
    summary = (out / "summary.md").read_text()
    other = summary.split("## Other benchmarks")[1].split("\n## ")[0]
    assert "triton-1]" in other and "cublas-1]" not in other
    assert "## Not measured (interrupted cases)" in summary
    assert "| test_bench_binary_gemm[cublas-1] | bench_gemm.json | 1 |" in summary
    table = (out / "t.md").read_text()
    assert "| binary_matmul M=1 N=K=4096 vs cuBLAS fp16, eager | not measured" in table
    assert "1 case(s) stopped by a time limit" in table and "[cublas-1]" in table


def _figure_of(report, plot, records, monkeypatch):
    """The matplotlib Figure a plot function draws (its _finish, which saves it, captured)."""
    figs = []
    monkeypatch.setattr(report, "_finish", lambda fig, *a: figs.append(fig))
    plot(records, "label", Path("."), "", [])
    assert len(figs) == 1
    return figs[0]


def test_gemm_bandwidth_plot_draws_the_copy_bandwidth(monkeypatch):
    """The GB/s column's copy-bandwidth line tested the metric name "gbps", which no column has
    ("gbps_wall"): the line the docstring promises was never drawn."""
    pytest.importorskip("matplotlib")
    report = _load_report()
    recs = [
        _rec(op="copy", impl="torch", gbps=4000.0),
        _rec(op="binary_gemm", impl="triton", M=1, N=64, K=64, gbps=1000.0, flops=10**6),
    ]
    axes = _figure_of(report, report.plot_gemm, recs, monkeypatch).axes
    labels = [ln.get_label() for ln in axes[1].get_lines()]
    assert "copy 4000 GB/s" in labels and axes[1].get_ylabel() == "GB/s"


def test_spikes_plot_draws_no_bar_for_a_case_not_measured(monkeypatch):
    """An impl missing for one case (a skipped reference, an interrupted stage) was drawn as a
    0 GB/s bar."""
    pytest.importorskip("matplotlib")
    report = _load_report()
    recs = [
        _rec(op="encode", impl="triton", bits=4, dtype="fp32", gbps=100.0),
        _rec(op="encode", impl="reference", bits=4, dtype="fp32", gbps=10.0),
        _rec(op="decode", impl="triton", bits=4, dtype="fp32", gbps=80.0),
    ]
    (ax,) = _figure_of(report, report.plot_spikes, recs, monkeypatch).axes
    heights = [b.get_height() for b in ax.patches]
    assert sorted(h for h in heights if h == h) == [10.0, 80.0, 100.0]
    assert 0.0 not in heights and ax.get_ylabel() == "GB/s"


def test_skipped_cases_and_stages_reach_every_device_summary(tmp_path):
    """With files of two devices the summaries are summary_<device>.md; the skipped cases and
    run_gpu.sh's stage table (a stage that timed out) were appended only to a summary.md, which
    then does not exist: they were silently left out."""
    pytest.importorskip("matplotlib")
    report = _load_report()
    paths = []
    for dev in ("GPU one", "GPU two"):
        doc = {
            "machine_info": {"empf": {"device": dev, "device_type": "cuda", "commit": "c"}},
            "benchmarks": [
                {"name": "test_bench_binary_gemm[triton-1]", "stats": {"median": 1e-5},
                 "extra_info": {"op": "binary_gemm", "impl": "triton", "M": 1, "N": 64, "K": 64}},
            ],
            "empf_skipped": [{"nodeid": f"x.py::test_sj[{dev[4:]}]", "reason": "no spikingjelly"}],
        }  # fmt: skip
        paths.append(tmp_path / f"{dev.replace(' ', '_')}.json")
        paths[-1].write_text(json.dumps(doc))
    stages = tmp_path / "stages.tsv"
    stages.write_text("stage\texit\tseconds\tlimit\tnote\nbench_gemm\t130\t40\t40\ttimed out\n")
    out = tmp_path / "out"
    assert report.main([*map(str, paths), "--out", str(out), "--stages", str(stages)]) == 0
    mds = sorted(out.glob("summary*.md"))
    assert [p.name for p in mds] == ["summary_GPU-one.md", "summary_GPU-two.md"]
    for md in mds:
        text = md.read_text()
        assert "| no spikingjelly | test_sj[one], test_sj[two] |" in text
        assert "| bench_gemm | 130 | 40 | 40 | timed out |" in text


def test_harness_survives_disabled_pytest_benchmark(tmp_path):
    """Under xdist pytest-benchmark disables itself and leaves `benchmark.stats` empty; the shared
    harness then times the case with its own loop instead of crashing (the first GPU run's
    'NoneType' object has no attribute 'stats')."""
    pytest.importorskip("xdist")
    pytest.importorskip("triton")
    select = "copy or (triton and T1 and fwd-online and fp32-float)"
    _run_bench(tmp_path / "x.json", select, "-n", "1", check_json=False)


def _rec(**kw):
    base = {"device_type": "cuda", "median_s": 1e-3, "device": "GPU", "name": "x"}
    base.update(kw)
    return base


def test_gpu_targets_pass_fail_and_not_measured():
    report = _load_report()
    gm = {"op": "binary_gemm", "M": 1, "N": 4096, "K": 4096}
    recs = [
        _rec(impl="triton", median_s=10e-6, graph_device_time_s=2e-6, **gm),
        _rec(impl="cublas", median_s=12e-6, graph_device_time_s=2.5e-6, **gm),
    ]
    rows = {r["target"]: r for r in report.gpu_targets(recs)}
    eager = rows["binary_matmul M=1 N=K=4096 vs cuBLAS fp16, eager"]
    graph = rows["binary_matmul M=1 N=K=4096 vs cuBLAS fp16, CUDA graph"]
    assert eager["status"] == "PASS" and eager["value"] == "1.20x"
    assert graph["status"] == "FAIL" and graph["value"] == "1.25x"  # needs 1.5x
    others = [r for name, r in rows.items() if "binary_matmul" not in name]
    assert others and all(r["status"] == "not measured" for r in others)
    # the same records from a CPU run never count for a GPU target
    cpu = [dict(r, device_type="cpu") for r in recs]
    assert all(r["status"] == "not measured" for r in report.gpu_targets(cpu))


def _load_bench_conftest():
    import torch

    threads = torch.get_num_threads()  # the bench conftest pins 1 CPU thread: restore it
    spec = importlib.util.spec_from_file_location("empf_bench_conftest", BENCH / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        torch.set_num_threads(threads)
    return module


class _DisabledBenchmark:
    """What pytest-benchmark's fixture looks like when disabled: pedantic runs, stats stay None."""

    def __init__(self):
        self.extra_info: dict = {}
        self.stats = None
        self.calls = 0

    def pedantic(self, target, rounds=1, warmup_rounds=0, iterations=1, **_):
        self.calls += 1
        target()


def test_harness_refuses_unchecked_triton_case_and_times_without_stats():
    harness = _load_bench_conftest()
    tools = harness.BenchTools()
    calls = []
    with pytest.raises(ValueError, match="no check"):
        tools.run(_DisabledBenchmark(), lambda: calls.append(1), op="x", impl="triton")
    assert not calls, "an unchecked Triton case must not run at all"
    bm = _DisabledBenchmark()
    checked = []
    extra = tools.run(
        bm,
        lambda: calls.append(1),
        check=lambda: checked.append(1) or {"rel_err_vs_eager": 0.0},
        bytes_moved=1000,
        op="x",
        impl="triton",
    )
    assert checked == [1] and bm.calls == 1 and calls
    assert extra["wall_time_source"].startswith("bench/conftest.py")
    assert extra["wall_time_s"] > 0 and extra["rel_err_vs_eager"] == 0.0
    assert extra["gbps"] > 0 and "wall_time_s" in extra["measured"]
    assert bm.extra_info == extra
    if not harness.ON_CUDA:
        assert extra["device_time_s"] is None and "no CUDA" in extra["graph_skip_reason"]


def _overhead_doc(relu_us: float, cases: dict) -> dict:
    """A `bench/test_bench_overhead.py` JSON with the given medians (µs)."""
    rows = [("relu", "fwd+bwd", "direct", relu_us)]
    rows += [(c, "fwd+bwd", path, us) for (c, path), us in cases.items()]
    return {
        "machine_info": {
            "empf": {"device": "cpu: test", "torch": "t", "triton": "3", "commit": "c"}
        },
        "benchmarks": [
            {"extra_info": {"case": c, "kind": k, "launch_path": p, "host_us": us}}
            for c, k, p, us in rows
        ],
    }


def test_overhead_table_takes_the_median_of_runs_and_the_ratio_to_relu(tmp_path):
    spec = importlib.util.spec_from_file_location("overhead_table", BENCH / "overhead_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    runs = [
        _overhead_doc(20.0, {("lif_neuron", "direct"): 60.0, ("lif_neuron", "triton"): 100.0}),
        _overhead_doc(22.0, {("lif_neuron", "direct"): 66.0, ("lif_neuron", "triton"): 110.0}),
        _overhead_doc(90.0, {("lif_neuron", "direct"): 300.0, ("lif_neuron", "triton"): 500.0}),
    ]
    paths = []
    for i, doc in enumerate(runs):
        paths.append(tmp_path / f"run{i}.json")
        paths[-1].write_text(json.dumps(doc))
    out = tmp_path / "table.md"
    assert mod.main([str(p) for p in paths] + ["--out", str(out)]) == 0
    text = out.read_text()
    assert "median of 3 run(s)" in text and "cpu: test" in text
    # medians: relu 22, direct 66, triton 110 (the busy third run is outvoted)
    assert "| `lif_neuron` | 110 | 66 | 3.0x |" in text
    assert "| eager `torch.relu` (the yardstick) | 22 | 22 | 1.0x |" in text
    assert "Forward only" not in text  # every case here has a backward
    doc = _overhead_doc(20.0, {})
    doc["benchmarks"].append(
        {
            "extra_info": {
                "case": "deployed",
                "kind": "fwd",
                "launch_path": "direct",
                "host_us": 512.4,
            }
        }
    )
    paths[1].write_text(json.dumps(doc))
    assert mod.main([str(paths[1]), "--out", str(out)]) == 0
    assert "Forward only" in out.read_text() and "| `deployed` | 512 |" in out.read_text()
    paths[0].write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(ValueError, match="relu"):
        mod.main([str(paths[0])])


def test_overhead_table_refuses_mixed_or_repeated_runs_and_marks_partial_cases(tmp_path, capsys):
    """The table's header named the first run's commit and 'median of N run(s)' for N files:
    runs of two commits were mixed under one commit's name, a file given twice counted as two
    runs, a case some runs lack showed the median of fewer runs unmarked, and an empty file was
    a traceback."""
    spec = importlib.util.spec_from_file_location("overhead_table", BENCH / "overhead_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lif = {("lif_neuron", "direct"): 60.0}
    docs = {
        "a": _overhead_doc(20.0, lif),
        "b": _overhead_doc(20.0, lif),
        "c": _overhead_doc(22.0, {}),
    }
    docs["b"]["machine_info"]["empf"]["commit"] = "other"
    paths = {}
    for name, doc in docs.items():
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(doc))
    (tmp_path / "empty.json").write_text("")
    refused = {
        "different machines, versions or commits": [paths["a"], paths["b"]],
        "given twice": [paths["a"], paths["c"], tmp_path / "." / "a.json"],
        "empty.json: not a readable JSON file": [tmp_path / "empty.json"],
    }
    for message, args in refused.items():
        with pytest.raises(SystemExit):
            mod.main([str(p) for p in args])
        assert message in capsys.readouterr().err
    assert mod.main([str(paths["a"]), str(paths["c"])]) == 0
    text = capsys.readouterr().out
    assert "median of 2 run(s)" in text and "| `lif_neuron` | – | 60 (1 of 2 runs) | 2.9x |" in text


def test_skipped_only_json_goes_to_the_given_path_and_never_over_timed_results(tmp_path):
    """bench/conftest.py writes a JSON of skipped cases when pytest-benchmark wrote none. It used
    to take the basename of the `--benchmark-json` path (a Path in this pytest-benchmark) and so
    wrote into the working directory, and it did not see cases timed by the `benchmark` fixture
    alone: each such run left a stray JSON in the checkout."""
    pytest.importorskip("pytest_benchmark")
    cwd, out = tmp_path / "cwd", tmp_path / "results"
    cwd.mkdir()
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EMPF_", "PYTEST_XDIST"))}
    env.update(TRITON_INTERPRET="1", EMPF_BENCH_OVERHEAD_ROUNDS="3", EMPF_BENCH_DEVICE="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    docs = {}
    for name, select in (("timed", "relu or (encode and bwd)"), ("skipped", "encode and bwd")):
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", str(BENCH / "test_bench_overhead.py"), "-q",
             "-p", "no:cacheprovider", "-p", "no:xdist", "-k", select,
             f"--rootdir={ROOT}", f"--benchmark-json={out / (name + '.json')}"],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
        docs[name] = json.loads((out / (name + ".json")).read_text())
    assert list(cwd.rglob("*.json")) == []  # (pytest-benchmark makes its own .benchmarks/)
    assert {b["extra_info"]["case"] for b in docs["timed"]["benchmarks"]} == {"relu"}
    assert docs["skipped"]["benchmarks"] == [] and docs["skipped"]["empf_skipped"]


def test_readme_tables_regenerate_from_the_committed_results():
    """The README's GPU-target table and its host-time table are the generators' output for the
    result files committed under bench/results/ (README figures are never typed in by hand)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = BENCH / "results"

    report = _load_report()
    # the JSON files the README's "Measured on an H200" paragraph names (update both together)
    gpu_inputs = [
        results / "NVIDIA-H200-20261204-1810" / "bench_neuron_targets.json",
        results / "NVIDIA-H200-20261204-1810" / "bench_models_target.json",
        results / "NVIDIA-H200-20261204-1835" / "bench_gemm.json",
    ]
    gpu = report.readme_table(gpu_inputs)
    assert "| target | measured | goal | status |" in gpu
    assert gpu == (results / "NVIDIA-H200-20261204-combined" / "readme_table.md").read_text()
    assert gpu.strip() in readme

    spec = importlib.util.spec_from_file_location("overhead_table", BENCH / "overhead_table.py")
    overhead = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overhead)
    (folder,) = set(re.findall(r"bench/results/(cpu-[\w-]+-overhead-\w+)/", readme))
    runs = sorted(str(p) for p in (results / folder).glob("overhead-*.json"))
    assert runs
    by_case, info = overhead.load(runs)
    table = overhead.table(by_case, len(runs), info)
    assert "eager `torch.relu` (the yardstick)" in table
    assert table == (results / folder / "table.md").read_text()
    assert table.strip() in readme


def test_readme_claims_table_matches_the_committed_claims():
    """Each row of the README's paper-claims table carries the final and best accuracy of the
    same configuration in the committed claims.md it links to."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    (path,) = set(re.findall(r"\]\((bench/results/claims-[\w-]+/claims\.md)\)", readme))
    claims = {}
    for line in (ROOT / path).read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 9 and cells[6][:1].isdigit():  # configuration ... final, best, s/epoch
            claims[cells[0]] = (cells[6], cells[7])
    table = readme.split("| configuration (mnist1d_cnn, T = 4) |", 1)[1].split("\n\n", 1)[0]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    assert len(rows) == len(claims) == 8
    for row in rows:
        label, final, best = (c.strip() for c in row.strip("|").split("|"))
        neuron, strategy, *extra = (p.strip() for p in label.split(","))
        key = f"{'empf' if neuron == 'EM-PF' else 'lif'}-{strategy.replace('BPTT', 'bptt')}"
        key += {"full-precision weights": "-fp32w", "4-bit spikes": "-4bit"}.get(
            extra[0] if extra else "", ""
        )
        assert claims[key] == (final, best), row
