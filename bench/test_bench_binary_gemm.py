"""Benchmarks of the binary-weight GEMM: packed Triton kernel vs dense cuBLAS vs the reference.

Run: `pytest bench/test_bench_binary_gemm.py --benchmark-json=results.json` (on its own, not with
tests/). Works with pytest-benchmark's `benchmark` fixture alone; bench/conftest.py is not needed.

Cases, all with `extra_info` (device, versions, impl, M, N, K, dtype, bits, weight bytes, bytes
moved, GB/s and TFLOP/s from the median wall time, the same from GPU-only time on CUDA, and
`auto_choice`, what `impl="auto"` runs at this M):

- `test_bench_binary_gemm[impl-M]`: inference `x[M, K] @ W^T` with W binary, K = N = 4096 on CUDA
  (fp16 activations), M in {1, 4, 16, 64, 256, 1024, 4096}; small shapes on CPU.
  impl: `triton` (binary_matmul on the packed weight), `cublas` (torch.matmul on the dense fp16
  weight: the baseline the targets are stated against), `dense` (what `auto` runs above
  AUTO_PACKED_MAX_M: Triton unpack to fp16 + cuBLAS, per call), `reference` (eager unpack +
  matmul), `auto`.
- `test_bench_binary_linear_train[impl-M]`: the training step's forward + backward on a latent fp32
  weight (`binary_linear`): `triton` (pack + packed GEMM, grad_x from packed words, grad_W dense),
  `dense` (Triton binarize + cuBLAS, what `auto` runs above AUTO_PACKED_MAX_M_TRAIN), `reference`,
  `auto`.

Timing: the wall time of one synchronised call (pytest-benchmark's stats; includes Python and
launch overhead, which dominates at M = 1), and `gpu_time_s`: the mean GPU time of the call
replayed from a CUDA graph (launch overhead removed), the number to compare with the bandwidth
bound (`bytes_moved` / the device's memory bandwidth). Byte model: weights read once in their
stored format (packed: bits/8 B per weight + 4 B scale per row; dense: 2 B per weight), x read,
out written; `dense`/`reference` also write and re-read the dense weight they build.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform

import pytest
import torch
import torch.nn.functional as F

from empf_triton.ops.binary import (
    binarize,
    binary_auto_choice,
    binary_linear,
    binary_matmul,
    pack_weight,
    unpack_weight,
)

ON_CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEVICE = "cuda" if ON_CUDA else "cpu"
MS = [1, 4, 16, 64, 256, 1024, 4096] if ON_CUDA else [1, 16, 64]
KN = 4096 if ON_CUDA else 256
DTYPE = torch.float16 if ON_CUDA else torch.float32
TRITON_SKIP = "the packed Triton kernels are timed on CUDA only (the interpreter is no target)"


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _env() -> dict:
    info = {
        "device": torch.cuda.get_device_name() if ON_CUDA else f"cpu: {platform.processor()}",
        "device_type": DEVICE,
        "torch": torch.__version__,
        "triton": _version("triton") or _version("pytorch-triton"),
        "cuda": torch.version.cuda,
        "autotune": os.environ.get("EMPF_AUTOTUNE", "1"),
    }
    if ON_CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["sm_count"] = props.multi_processor_count
    return info


def _sync() -> None:
    if ON_CUDA:
        torch.cuda.synchronize()


def _gpu_time(fn, reps: int = 50) -> float | None:
    """Mean GPU seconds per call of `fn` replayed from a CUDA graph (events if capture fails)."""
    if not ON_CUDA:
        return None
    fn()
    _sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        _sync()
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
    except RuntimeError:
        _sync()
        start.record()
        for _ in range(reps):
            fn()
        end.record()
    _sync()
    return start.elapsed_time(end) / 1e3 / reps


def _run(benchmark, fn, *, bytes_moved: int, flops: int, **info) -> None:
    def timed():
        fn()
        _sync()

    for _ in range(3):  # compile + autotune outside the timing
        timed()
    benchmark.pedantic(timed, rounds=30 if ON_CUDA else 5, warmup_rounds=2, iterations=1)
    median = benchmark.stats.stats.median
    extra = _env()
    extra.update(info)
    extra.update(
        time_median_s=median,
        bytes_moved=int(bytes_moved),
        gbps=bytes_moved / median / 1e9,
        flops=int(flops),
        tflops=flops / median / 1e12,
    )
    gpu = _gpu_time(fn)
    if gpu is not None:
        extra.update(gpu_time_s=gpu, gbps_gpu=bytes_moved / gpu / 1e9)
        extra["tflops_gpu"] = flops / gpu / 1e12
    benchmark.extra_info.update(extra)


def _packed_bytes(N: int, K: int, bits: int) -> int:
    return bits * N * math.ceil(K / 32) * 4 + N * 4


GEMM_IMPLS = ["triton", "cublas", "dense", "reference", "auto"]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("impl", GEMM_IMPLS)
def test_bench_binary_gemm(benchmark, impl, M):
    if impl in ("triton", "dense") and not ON_CUDA:
        pytest.skip(TRITON_SKIP)
    N = K = KN
    bits = 1
    torch.manual_seed(0)
    w = torch.randn(N, K, device=DEVICE)
    packed = pack_weight(w, bits)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE)
    ds = x.element_size()
    packed_b = _packed_bytes(N, K, bits)
    dense_b = N * K * ds
    io = M * K * ds + M * N * ds
    choice = binary_auto_choice(M, DEVICE)

    if impl == "cublas":
        w_dense = unpack_weight(packed, DTYPE)
        fn = lambda: torch.matmul(x, w_dense.t())  # noqa: E731
        weight_b, moved = dense_b, dense_b + io
    elif impl == "dense":
        fn = lambda: F.linear(x, unpack_weight(packed, DTYPE, impl="triton"))  # noqa: E731
        weight_b, moved = packed_b, packed_b + 2 * dense_b + io
    else:
        fn = lambda: binary_matmul(x, packed, impl=impl)  # noqa: E731
        runs = impl if impl != "auto" else choice
        weight_b = packed_b
        moved = packed_b + io + (2 * dense_b if runs != "triton" else 0)

    _run(
        benchmark,
        fn,
        bytes_moved=moved,
        flops=2 * M * N * K,
        op="binary_gemm",
        impl=impl,
        M=M,
        N=N,
        K=K,
        bits=bits,
        dtype=str(DTYPE).removeprefix("torch."),
        weight_bytes=weight_b,
        weight_bytes_fp32=N * K * 4,
        packed_bytes=packed_b,
        compression_vs_fp32=N * K * 4 / packed_b,
        auto_choice=choice,
    )


TRAIN_IMPLS = ["triton", "dense", "reference", "auto"]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("impl", TRAIN_IMPLS)
def test_bench_binary_linear_train(benchmark, impl, M):
    if impl in ("triton", "dense") and not ON_CUDA:
        pytest.skip(TRITON_SKIP)
    N = K = KN
    torch.manual_seed(0)
    w = (torch.randn(N, K, device=DEVICE) * 0.5).requires_grad_()
    b = torch.zeros(N, device=DEVICE, dtype=DTYPE, requires_grad=True)
    x = torch.randn(M, K, device=DEVICE, dtype=DTYPE, requires_grad=True)
    g = torch.randn(M, N, device=DEVICE, dtype=DTYPE)
    choice = binary_auto_choice(M, DEVICE, training=True)

    if impl == "dense":

        def forward():
            return F.linear(x, binarize(w, impl="triton").to(DTYPE), b)
    else:

        def forward():
            return binary_linear(x, w, b, bits=1, impl=impl)

    def fn():
        return torch.autograd.grad(forward(), (x, w, b), g)

    ds = x.element_size()
    # fwd: W fp32 read (quantise/pack), x read, out written; bwd: g, x read, grad_x, grad_W
    # written; the packed path re-reads packed words, the dense one its dense copy.
    moved = N * K * 4 + 2 * M * K * ds + 2 * M * N * ds + M * K * ds + N * K * 4
    _run(
        benchmark,
        fn,
        bytes_moved=moved,
        flops=3 * 2 * M * N * K,
        op="binary_linear_train",
        impl=impl,
        M=M,
        N=N,
        K=K,
        bits=1,
        dtype=str(DTYPE).removeprefix("torch."),
        auto_choice=choice,
    )
