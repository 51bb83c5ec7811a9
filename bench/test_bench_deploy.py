"""Benchmarks of deployed inference: the packed, folded EM-PF ResNet-18 (CIFAR, T=4) against the
same architecture with dense weights.

Run: `pytest bench/test_bench_deploy.py --benchmark-json=results.json` (on its own, not with
tests/). Works with pytest-benchmark's `benchmark` fixture alone.

Cases (batch B in {1, 256} on CUDA; a small width and B in {1, 8} on the CPU, a dry run):

- `deployed`: `empf_triton.deploy.fold(model)` run all T steps at once; every binary conv is
  `binary_conv_neuron` (the fused packed conv + folded BN/Mem-BN + neuron kernel on CUDA), 4-bit
  spike codes between layers when `spike_bits=4`. fp16 on CUDA, fp32 on the CPU.
- `dense`: the same architecture built with `weight_bits=32` (dense convolutions, cuDNN), fp16,
  channels_last, `torch.compile`d on CUDA (eager fp32 on the CPU), eval mode, step mode "m".

`extra_info`: device, versions, case, B, T, width, spike_bits, the weight bytes each case reads
(packed words + scales vs dense fp16/fp32 weights), and on CUDA the activation memory: the peak
allocated during one forward minus what was allocated before it (`cuda_activation_peak_bytes`).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

import pytest
import torch

from empf_triton import reset_net
from empf_triton.deploy import fold
from empf_triton.models import build_model, set_step_mode

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
DTYPE = torch.float16 if ON_CUDA else torch.float32
BATCHES = [1, 256] if ON_CUDA else [1, 8]
WIDTH = 64 if ON_CUDA else 8
HW = 32 if ON_CUDA else 16
T = 4


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _env() -> dict:
    return {
        "device": torch.cuda.get_device_name() if ON_CUDA else f"cpu: {platform.processor()}",
        "device_type": DEVICE,
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "cpu_threads": torch.get_num_threads(),
    }


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _model(spike_bits, weight_bits):
    torch.manual_seed(0)
    return build_model(
        "resnet18",
        in_shape=(3, HW, HW),
        num_classes=10,
        T=T,
        width=WIDTH,
        spike_bits=spike_bits,
        weight_bits=weight_bits,
    ).eval()


def _activation_peak(fn) -> int | None:
    if not ON_CUDA:
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    _sync()
    return torch.cuda.max_memory_allocated() - before


def _run(benchmark, fn, extra: dict) -> None:
    fn()  # warm-up (and compilation)
    _sync()
    extra["cuda_activation_peak_bytes"] = _activation_peak(fn)

    def timed():
        fn()
        _sync()

    rounds = 20 if ON_CUDA else 3
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update({**_env(), **extra})


@pytest.mark.parametrize("spike_bits", [None, 4], ids=["float_spikes", "4bit"])
@pytest.mark.parametrize("B", BATCHES)
def test_bench_deployed_resnet18(benchmark, B, spike_bits):
    deployed = fold(_model(spike_bits, 1)).to(DEVICE, DTYPE)
    x = torch.randn(B, 3, HW, HW, device=DEVICE, dtype=DTYPE)
    weight_bytes = sum(b.numel() * b.element_size() for b in deployed.buffers())
    with torch.no_grad():
        _run(
            benchmark,
            lambda: deployed(x),
            {"op": "deploy_inference", "case": "deployed", "B": B, "T": T, "width": WIDTH,
             "spike_bits": spike_bits, "weight_bytes": weight_bytes},
        )  # fmt: skip


@pytest.mark.parametrize("B", BATCHES)
def test_bench_dense_resnet18(benchmark, B):
    model = _model(None, 32).to(DEVICE, DTYPE)
    set_step_mode(model, "m")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if ON_CUDA:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
        compiled = torch.compile(model)
    else:
        compiled = model  # inductor on a CPU takes minutes per shape; the CPU run is a dry run
    x = torch.randn(T, B, 3, HW, HW, device=DEVICE, dtype=DTYPE)

    def fwd():
        reset_net(model)
        return compiled(x).sum(0)

    with torch.no_grad():
        _run(
            benchmark,
            fwd,
            {"op": "deploy_inference", "case": "dense_fp16_cudnn_compiled" if ON_CUDA
             else "dense_fp32_eager", "B": B, "T": T, "width": WIDTH, "spike_bits": None,
             "weight_bytes": weight_bytes},
        )  # fmt: skip
