"""Benchmarks of whole-model inference: the EM-PF ResNet-18 (CIFAR, 10 classes, T=4), no grad.

Run: `pytest bench/test_bench_models.py --benchmark-json=results.json` (on its own, not with
tests/). Timing, checks, memory and CUDA-graph replay: bench/conftest.py (`bench_tools.run`).

One timed call is one sample batch: `reset_net(model)` (outside any compiled region, as between
samples), then all T steps and the logits summed over T:
- step mode "m" (`step_mode="m"`): `model(x repeated over T)` once, `[T, B, 10]` summed;
- step mode "s" (`step_mode="s"`): a Python loop of T calls `model(x)`, one step each.

Models come from `empf_triton.models.build_model("resnet18", ...)` with `impl="auto"` (Triton
kernels on CUDA, the eager reference on a CPU; `impl_resolved` says which), eval mode, fp32,
trained-looking BN statistics and neuron parameters (so spikes are neither all zero nor
everywhere). CUDA: width 64 (the real ResNet-18), 32x32 inputs, batch 1 and 64. CPU: width 4,
16x16 inputs, batch 1 and 4 (a dry run of the harness, not a measurement).

Cases (`op="resnet18_inference"`, `batch`, `T=4`, `step_mode`, `impl`):
- `eager`: the model called directly. On CUDA checked before timing against the same weights
  built with `impl="reference"` (logits' relative error ≤ 1e-3, TF32 off); the harness also
  captures the call in a `torch.cuda.CUDAGraph` and replays it (`graph_wall_time_s`).
- `eager-frozen`: the same calls inside `empf_triton.nn.frozen_weights(model)`, as `evaluate` and
  `empf eval` run them: the binary layers quantise their weights once, not per call. Checked
  against `eager` (≤ 1e-3; the same kernels, so equal in practice).
- `compile`: `torch.compile` (default mode) of the whole sample function (the step loop unrolled
  into one graph). Checked against eager (≤ 1e-3).
- `compile-reduce-overhead`: `torch.compile(mode="reduce-overhead")`: inductor + CUDA graphs
  (cudagraph trees). Checked against eager (≤ 1e-3). Not captured again by the harness. The GPU
  target (bench/report.py): batch 1, T=4, ≤ 2 ms per sample, best step mode.

torch.compile cases run where `EMPF_BENCH_COMPILE_T` includes T=4 (all on CUDA; none on a CPU by
default, where inductor takes minutes for this model: skipped with the reason, which the report
lists). `extra_info["compile_s"]`: seconds of the first call (compilation) of compiled cases.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import torch
from conftest import (
    ON_CUDA,
    bench_skip,
    compile_skip_reason,
    raise_recompile_limit,
    randomize_model,
)
from torch import nn

from empf_triton import reset_net
from empf_triton.models import build_model, set_step_mode
from empf_triton.nn import frozen_weights

DEVICE = "cuda" if ON_CUDA else "cpu"
T = 4
WIDTH = 64 if ON_CUDA else 4
HW = 32 if ON_CUDA else 16
BATCHES = [1, 64] if ON_CUDA else [1, 4]
# the target's case (reduce-overhead) right after eager, which it is compared with
IMPLS = ["eager", "compile-reduce-overhead", "eager-frozen", "compile"]
COMPILE_MODE = {"compile": "default", "compile-reduce-overhead": "reduce-overhead"}
OP = "resnet18_inference"
REL_TOL = 1e-3


def _model(step_mode: str, impl: str = "auto") -> nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "resnet18", in_shape=(3, HW, HW), num_classes=10, T=T, width=WIDTH, impl=impl
    )
    model = randomize_model(model).to(DEVICE)
    return set_step_mode(model, step_mode)


def _sample_fn(model: nn.Module, step_mode: str):
    """All T steps of one sample batch x [B, 3, H, W] -> logits summed over T [B, 10]."""
    if step_mode == "m":

        def sample(x: torch.Tensor) -> torch.Tensor:
            return model(x.unsqueeze(0).expand(T, *x.shape)).sum(0)

    else:

        def sample(x: torch.Tensor) -> torch.Tensor:
            out = model(x)
            for _ in range(T - 1):
                out = out + model(x)
            return out

    return sample


def _run_sample(model: nn.Module, fn, x: torch.Tensor) -> torch.Tensor:
    reset_net(model)  # between samples, outside any compiled region
    with torch.no_grad():
        return fn(x)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@contextlib.contextmanager
def _tf32_off():
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _check_against(get, want, what: str):
    """Before timing: `get()` against `want()` (relative error of the logits ≤ REL_TOL), TF32
    off while both run; two samples, so that a state left over between samples shows."""

    def check() -> dict:
        with _tf32_off():
            errs = []
            for _ in range(2):
                a, b = get(), want()
                assert bool(b.abs().max() > 0), "reference logits are all zero"
                errs.append(_rel_err(a, b))
        err = max(errs)
        assert err <= REL_TOL, f"logits differ from {what}: rel. error {err:.3g}"
        return {f"rel_err_vs_{what}": err}

    return check


@pytest.mark.parametrize("B", BATCHES, ids=lambda b: f"B{b}")
@pytest.mark.parametrize("step_mode", ["m", "s"], ids=lambda s: f"step_{s}")
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_resnet18_inference(benchmark, bench_tools, impl, step_mode, B):
    if impl.startswith("compile"):
        reason = compile_skip_reason(T)
        if reason:
            bench_skip(reason)
    model = _model(step_mode)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, HW, HW, generator=g).to(DEVICE)
    eager = _sample_fn(model, step_mode)
    info = {
        "op": OP,
        "impl": impl,
        # CUDA: Triton neurons, binary convs as impl="auto" picks them there
        "impl_resolved": "auto-cuda" if ON_CUDA else "reference",
        "batch": B,
        "T": T,
        "step_mode": step_mode,
        "width": WIDTH,
        "H": HW,
        "num_classes": 10,
        "dtype": "fp32",
    }

    frozen = contextlib.nullcontext()
    if impl == "eager-frozen":
        fn, frozen = eager, frozen_weights(model)
        with _tf32_off():  # as the check runs; outside the block: quantised per call
            want = _run_sample(model, eager, x).clone()
        check = _check_against(lambda: _run_sample(model, fn, x), lambda: want, "eager")
    elif impl == "eager":
        fn = _sample_fn(model, step_mode)
        check = None
        if ON_CUDA:  # the Triton kernels against the same weights on the reference ops
            ref = _model(step_mode, impl="reference")
            ref.load_state_dict(model.state_dict())
            ref_fn = _sample_fn(ref, step_mode)
            check = _check_against(
                lambda: _run_sample(model, fn, x), lambda: _run_sample(ref, ref_fn, x), "reference"
            )
    else:
        raise_recompile_limit()
        torch._dynamo.reset()
        fn = torch.compile(_sample_fn(model, step_mode), mode=COMPILE_MODE[impl])
        t0 = time.perf_counter()
        _run_sample(model, fn, x)
        bench_tools.sync()
        info["compile_s"] = time.perf_counter() - t0
        info["compile_mode"] = COMPILE_MODE[impl]
        check = _check_against(
            lambda: _run_sample(model, fn, x).clone(), lambda: _run_sample(model, eager, x), "eager"
        )

    with frozen:
        bench_tools.run(
            benchmark,
            lambda: _run_sample(model, fn, x),
            check=check,
            graph=impl != "compile-reduce-overhead",
            **info,
        )
