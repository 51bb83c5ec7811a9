"""Benchmarks of deployed inference: the packed, folded EM-PF ResNet-18 (CIFAR, T=4) against the
same architecture with dense weights.

Run: `pytest bench/test_bench_deploy.py --benchmark-json=results.json` (on its own, not with
tests/). Timing, checks, memory and CUDA-graph replay: bench/conftest.py (`bench_tools.run`).

Cases (`op="deploy_resnet18"`, `batch` 1 and 256 on CUDA with width 64 and 32x32 inputs; on the
CPU width 8, 16x16 inputs and batch 1 and 8: a dry run of the harness, not a measurement):

- `impl="packed"`: `empf_triton.deploy.fold(model)` run all T steps at once: every binary conv is
  `binary_conv_neuron` (the fused packed conv + folded BN/Mem-BN + neuron kernel on CUDA; the
  eager reference on a CPU, `impl_resolved` says which), with `spike_bits` 4 (4-bit codes between
  layers, the paper's compression mode: the case the targets read) and float spikes. fp16 on CUDA,
  fp32 on the CPU. Checked before timing: the fp32 deployed model on the same device and impl
  against the reference path (`fold(model, impl="reference")`) and against the trained model's
  eval-mode logits (relative error of the logits ≤ 1e-4, TF32 off), and the timed fp16 model
  against the fp32 one (≤ 0.1, half-precision currents).
- `impl="dense-fp16-compile"` (CUDA): the same architecture built with `weight_bits=32` (dense
  convolutions, cuDNN), fp16, channels_last, `torch.compile` default mode, eval, step mode "m",
  float spikes. On a CPU `impl="dense-fp32-eager"` (inductor on a CPU takes minutes per shape).

`extra_info`: op, impl, batch, T, width, H, spike_bits, `weight_bytes` (the buffers or parameters
each model reads: packed words + scales vs dense weights) and `activation_bytes`: on CUDA the peak
allocated during one forward above what was allocated before it (the harness's
`cuda_peak_bytes`: activations and workspace, weights excluded); None on a CPU, where no
allocator reports a peak (`activation_bytes_note` says so).

Run order (file order; a GPU stage cut short keeps what finished): the 4-bit packed cases
(`test_bench_deployed_resnet18`), on CUDA batch 1 replayed from `DeployedModel.graphed`
(`test_bench_deployed_resnet18_graphed`, impl "packed-graphed"), the dense cases at batch 256
then 1, then the float-spike packed cases (`test_bench_deployed_resnet18_float_spikes`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import ON_CUDA, randomize_model
from torch import nn

from empf_triton import reset_net
from empf_triton.deploy import fold
from empf_triton.models import build_model, set_step_mode

DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPE = torch.float16 if ON_CUDA else torch.float32
BATCHES = [1, 256] if ON_CUDA else [1, 8]
WIDTH = 64 if ON_CUDA else 8
HW = 32 if ON_CUDA else 16
T = 4
OP = "deploy_resnet18"
NO_PEAK = "no CUDA device: the CPU allocator reports no peak, activation memory not measured"


def _model(spike_bits: int | None, weight_bits: float) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "resnet18",
        in_shape=(3, HW, HW),
        num_classes=10,
        T=T,
        width=WIDTH,
        spike_bits=spike_bits,
        weight_bits=weight_bits,
    )
    return randomize_model(model)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@torch.no_grad()
def _trained_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The trained model's eval-mode logits summed over T (what the deployment must equal)."""
    reset_net(model)
    set_step_mode(model, "m")
    out = model(x.unsqueeze(0).expand(T, *x.shape)).sum(0)
    reset_net(model)
    set_step_mode(model, "s")
    return out


def _deploy_check(model: nn.Module, deployed: nn.Module, x: torch.Tensor):
    """Before timing: the fp32 deployment on this device and impl equals the reference path and
    the trained model; the timed (fp16 on CUDA) model stays close to the fp32 one."""

    def check() -> dict:
        tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            x32 = x.float()
            with torch.no_grad():
                out32 = fold(model).to(DEVICE)(x32)
                ref = fold(model, impl="reference").to(DEVICE)(x32)
                trained = _trained_logits(model.to(DEVICE), x32)
                timed = deployed(x).float()
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        err_ref, err_trained = _rel_err(out32, ref), _rel_err(out32, trained)
        err_timed = _rel_err(timed, out32)
        assert err_ref <= 1e-4, f"deployed fp32 vs the reference path: rel. error {err_ref:.3g}"
        assert err_trained <= 1e-4, f"deployed fp32 vs the trained model: {err_trained:.3g}"
        assert err_timed <= 0.1, f"timed {DTYPE} deployment vs fp32: rel. error {err_timed:.3g}"
        return {
            "rel_err_vs_reference": err_ref,
            "rel_err_vs_trained": err_trained,
            "rel_err_timed_vs_fp32": err_timed,
        }

    return check


def _activation(extra: dict, benchmark) -> None:
    act = extra.get("cuda_peak_bytes")
    benchmark.extra_info["activation_bytes"] = act
    if act is None:
        benchmark.extra_info["activation_bytes_note"] = NO_PEAK


def _bench_deployed(benchmark, bench_tools, B: int, spike_bits: int | None) -> None:
    model = _model(spike_bits, 1)
    deployed = fold(model).to(DEVICE, DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, HW, HW, generator=g).to(DEVICE, DTYPE)
    weight_bytes = sum(b.numel() * b.element_size() for b in deployed.buffers())

    def fn():
        with torch.no_grad():
            return deployed(x)

    extra = bench_tools.run(
        benchmark,
        fn,
        check=_deploy_check(model, deployed, x),
        op=OP,
        impl="packed",
        impl_resolved="triton" if ON_CUDA else "reference",
        batch=B,
        T=T,
        width=WIDTH,
        H=HW,
        spike_bits=spike_bits,
        dtype=str(DTYPE).removeprefix("torch."),
        weight_bytes=weight_bytes,
    )
    _activation(extra, benchmark)


# File order is run order (a GPU stage may be cut short): the cases the targets read first.
@pytest.mark.parametrize("B", BATCHES)
def test_bench_deployed_resnet18(benchmark, bench_tools, B):
    """4-bit spike codes between layers (the paper's compression mode; the targets' case)."""
    _bench_deployed(benchmark, bench_tools, B, 4)


@pytest.mark.skipif(not ON_CUDA, reason="a CUDA graph needs a CUDA device")
def test_bench_deployed_resnet18_graphed(benchmark, bench_tools):
    """Batch 1, 4-bit codes, replayed from a CUDA graph (`DeployedModel.graphed`): the latency
    when the host is out of the way (the eager case above is host-bound at batch 1)."""
    model = _model(4, 1)
    deployed = fold(model).to(DEVICE, DTYPE)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, HW, HW, generator=g).to(DEVICE, DTYPE)
    graphed = deployed.graphed(x)

    def check() -> dict:
        out, ref = graphed(x), deployed(x)
        assert torch.equal(out, ref), "the graph replay differs from the eager forward"
        return {"equal_to_eager": True}

    bench_tools.run(
        benchmark,
        lambda: graphed(x),
        check=check,
        graph=False,  # already a graph replay
        op=OP,
        impl="packed-graphed",
        impl_resolved="triton",
        batch=1,
        T=T,
        width=WIDTH,
        H=HW,
        spike_bits=4,
        dtype=str(DTYPE).removeprefix("torch."),
    )


@pytest.mark.parametrize("B", BATCHES[::-1])
def test_bench_dense_resnet18(benchmark, bench_tools, B):
    model = _model(None, 32).to(DEVICE, DTYPE)
    set_step_mode(model, "m")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if ON_CUDA:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        run = torch.compile(model)
        impl = "dense-fp16-compile"
    else:
        run = model  # inductor on a CPU takes minutes per shape; the CPU run is a dry run
        impl = "dense-fp32-eager"
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 3, HW, HW, generator=g).to(DEVICE, DTYPE)
    xs = x.unsqueeze(0).expand(T, *x.shape).contiguous()

    def fn():
        reset_net(model)
        with torch.no_grad():
            return run(xs).sum(0)

    extra = bench_tools.run(
        benchmark,
        fn,
        op=OP,
        impl=impl,
        batch=B,
        T=T,
        width=WIDTH,
        H=HW,
        spike_bits=None,
        dtype=str(DTYPE).removeprefix("torch."),
        weight_bytes=weight_bytes,
    )
    _activation(extra, benchmark)


@pytest.mark.parametrize("B", BATCHES)
def test_bench_deployed_resnet18_float_spikes(benchmark, bench_tools, B):
    """Float spikes between layers (fp16 on CUDA)."""
    _bench_deployed(benchmark, bench_tools, B, None)
