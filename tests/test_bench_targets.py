"""bench/report.py reads the model-level target records as bench/test_bench_models.py and
bench/test_bench_deploy.py write them (field names and values), on synthetic records."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _report():
    spec = importlib.util.spec_from_file_location("empf_bench_report_t", ROOT / "bench/report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rec(**kw):
    base = {"device_type": "cuda", "device": "GPU", "name": "x", "T": 4}
    base.update(kw)
    return base


def _rows(recs):
    return {r["target"].split(" (step mode")[0]: r for r in _report().gpu_targets(recs)}


INF = "EM-PF ResNet-18 CIFAR T=4 inference B=1, torch.compile reduce-overhead"


def test_inference_target_takes_the_faster_step_mode():
    inf = {"op": "resnet18_inference", "batch": 1, "impl": "compile-reduce-overhead"}
    recs = [
        _rec(step_mode="m", median_s=2.5e-3, **inf),
        _rec(step_mode="s", median_s=1.5e-3, **inf),
        _rec(
            step_mode="m",
            median_s=0.5e-3,
            op="resnet18_inference",
            batch=64,
            impl="compile-reduce-overhead",
        ),
        _rec(step_mode="m", median_s=0.5e-3, op="resnet18_inference", batch=1, impl="eager"),
    ]
    row = [r for r in _report().gpu_targets(recs) if r["target"].startswith(INF)][0]
    assert row["status"] == "PASS" and row["value"] == "1.50 ms"
    assert row["target"].endswith("(step mode s)")
    slow = [dict(r, median_s=3e-3) if r.get("step_mode") == "s" else r for r in recs]
    assert _rows(slow)[INF]["status"] == "FAIL"
    cpu = [dict(r, device_type="cpu") for r in recs]
    assert _rows(cpu)[INF]["status"] == "not measured"
    assert "no CUDA records" in _rows(cpu)[INF]["value"]


def test_deploy_targets_read_the_4bit_packed_records():
    dep = {"op": "deploy_resnet18"}
    recs = [
        # float-spike packed records come first and must not be the ones read
        _rec(batch=1, impl="packed", spike_bits=None, median_s=5e-3, activation_bytes=1, **dep),
        _rec(batch=256, impl="packed", spike_bits=None, median_s=9e-3, activation_bytes=1, **dep),
        _rec(batch=1, impl="packed", spike_bits=4, median_s=0.8e-3, activation_bytes=10, **dep),
        _rec(batch=256, impl="packed", spike_bits=4, median_s=2e-3, activation_bytes=20, **dep),
        _rec(
            batch=256,
            impl="dense-fp16-compile",
            spike_bits=None,
            median_s=5e-3,
            activation_bytes=100,
            **dep,
        ),
    ]
    rows = _rows(recs)
    b1 = rows["deployed ResNet-18 B=1 latency per sample"]
    assert b1["status"] == "PASS" and b1["value"] == "0.80 ms"
    thr = rows["deployed ResNet-18 B=256 throughput vs dense fp16 cuDNN (compiled)"]
    assert thr["status"] == "FAIL" and thr["value"] == "2.50x"  # needs 3x
    mem = rows["deployed ResNet-18 activation memory / dense fp16"]
    assert mem["status"] == "PASS" and mem["value"] == "0.20"
    no_act = [dict(r, activation_bytes=None) for r in recs]
    assert _rows(no_act)["deployed ResNet-18 activation memory / dense fp16"]["status"] == (
        "not measured"
    )


def test_a_target_never_pairs_records_of_two_commits():
    """Two runs of one device at different commits reported together (as the README's combined
    H200 table is): a ratio took run A's Triton case and run B's eager reference (each the first
    match over all records) and stated the target PASS, comparing two different codes."""
    neuron = {"op": "empf_neuron", "T": 4, "N": 1 << 22, "dtype": "fp32", "spike_bits": None,
              "grad_mode": "online", "pass": "fwd+bwd"}  # fmt: skip
    name = "empf_neuron fwd+bwd T=4 N=2^22 online: triton vs eager reference"
    tri_a = _rec(impl="triton", median_s=1e-4, run_commit="aaa", **neuron)
    eag_b = _rec(impl="eager", median_s=6e-4, run_commit="bbb", **neuron)
    row = _rows([tri_a, eag_b])[name]
    assert row["status"] == "not measured" and "different commits: aaa, bbb" in row["value"]
    sp = _report().speedups([tri_a, eag_b])  # nor do the summary's speed-ups
    assert [k for k in sp if k[-1] == "triton"] == []
    # with both cases in run B, run B's pair is judged (run A's lone Triton case is not used)
    eag_a = dict(eag_b, run_commit="aaa", median_s=3e-4)
    assert _rows([tri_a, eag_b, dict(tri_a, run_commit="bbb", median_s=2e-4)])[name]["value"] == (
        "3.00x"
    )
    assert _rows([tri_a, eag_a, eag_b])[name]["value"] == "3.00x"  # the first commit's pair


def test_step_target_reads_only_the_target_size():
    """The fused-op targets read N = 2^22 only; the step target took a case of any N (a run with
    a smaller EMPF_BENCH_N was judged against a target stated at 2^22)."""
    step = {"op": "empf_neuron_step", "T": 4, "dtype": "fp32", "spike_bits": None,
            "grad_mode": "online", "pass": "fwd+bwd"}  # fmt: skip
    name = "empf_neuron_step: T=4 calls, backward after each, triton vs eager"
    small = [_rec(impl="triton", median_s=1e-4, N=1024, **step),
             _rec(impl="eager", median_s=5e-4, N=1024, **step)]  # fmt: skip
    assert _rows(small)[name]["status"] == "not measured"
    full = [dict(r, N=1 << 22) for r in small]
    assert _rows(full)[name]["status"] == "PASS" and _rows(full)[name]["value"] == "5.00x"
