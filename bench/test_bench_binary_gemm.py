"""Benchmarks of the binary-weight GEMM: packed Triton kernel vs dense cuBLAS vs the reference.

Run: `pytest bench/test_bench_binary_gemm.py --benchmark-json=results.json` (on its own, not with
tests/). Timing, checks and CUDA-graph replay: bench/conftest.py (`bench_tools.run`); every
case is checked before it is timed (the GEMM per output against a rounding bound).

Cases, all with `extra_info` (device, versions, impl, M, N, K, dtype, bits, weight bytes, bytes
moved, GB/s and TFLOP/s from the median wall time, the same from GPU-only time on CUDA, and
`auto_choice`, what `impl="auto"` runs at this M):

- `test_bench_binary_gemm[impl-M]`: inference `x[M, K] @ W^T` with W binary, K = N = 4096 on CUDA
  (fp16 activations), M in {1, 4, 16, 64, 256, 1024, 4096}; small shapes on CPU.
  impl: `triton` (binary_matmul on the packed weight), `cublas` (torch.matmul on the dense fp16
  weight: the baseline the targets are stated against), `dense` (what `auto` runs where
  `PACKED_MAX_M` does not list the GPU or M is above its entry: Triton unpack to fp16 + cuBLAS,
  per call), `reference` (eager unpack + matmul), `auto`. The device times of `triton` and
  `dense` here are what `PACKED_MAX_M` is set from.
- `test_bench_binary_linear_train[impl-M]`: the training step's forward + backward on a latent fp32
  weight (`binary_linear`): `triton` (pack + packed GEMM, grad_x from packed words, grad_W dense),
  `dense` (Triton binarize + cuBLAS, what `auto` runs where `PACKED_MAX_M_TRAIN` does not list
  the GPU, today every M), `reference`, `auto`.
- `test_bench_weight_quantize[impl-op]`: `binarize` / `ternarize` of a [512, 512, 3, 3] weight
  (what a binary conv's training forward runs every call), Triton against the reference.

Timing (bench/conftest.py): `wall_time_s`, one synchronised call (includes Python and launch
overhead, which dominates at M = 1); `device_time_s` (CUDA events, L2 flushed); and the call
replayed from a CUDA graph (`graph_wall_time_s`, `graph_device_time_s`: launch overhead
removed), the numbers to compare with the bandwidth bound. Byte model: weights read once in their
stored format (packed: bits/8 B per weight + 4 B scale per row; dense: 2 B per weight), x read,
out written; `dense`/`reference` also write and re-read the dense weight they build.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ON_CUDA, triton_skip_reason

from empf_triton.ops.binary import (
    binarize,
    binary_auto_choice,
    binary_linear,
    binary_matmul,
    pack_weight,
    ternarize,
    unpack_weight,
)

DEVICE = "cuda" if ON_CUDA else "cpu"
_MS = os.environ.get("EMPF_BENCH_GEMM_M")
if _MS:
    MS = [int(m) for m in _MS.split(",")]
else:
    MS = [1, 4, 16, 64, 256, 1024, 4096] if ON_CUDA else [1, 16, 64]
KN = int(os.environ.get("EMPF_BENCH_GEMM_KN", 4096 if ON_CUDA else 256))
DTYPE = torch.float16 if ON_CUDA else torch.float32
TRITON_SKIP = triton_skip_reason()


def _gemm_check(fn, x: torch.Tensor, w: torch.Tensor):
    """Before timing: out = x @ w^T against an fp64 product of the same operands, per output
    within γ_K·Σ|x||w| (fp32 accumulation, any order; γ_K = K·u/(1 - K·u), u = 2^-24) plus two
    roundings of the output dtype (the output itself, and α applied after the sum rather than
    folded into a rounded dense weight). A wrong kernel is off by O(|out|), far outside."""

    def check():
        got = fn().double()
        xd, wd = x.double(), w.double()
        ref = xd @ wd.t()
        K = x.shape[-1]
        u = 2.0**-24
        gamma = K * u / (1 - K * u)
        s = xd.abs() @ wd.abs().t()
        u_out = torch.finfo(DTYPE).eps / 2
        bound = gamma * s + 2 * u_out * (ref.abs() + gamma * s) + torch.finfo(DTYPE).tiny
        excess = ((got - ref).abs() - bound).max().item()
        assert excess <= 0, f"result exceeds the rounding bound by {excess:.3g}"
        return {"max_abs_err_vs_fp64": (got - ref).abs().max().item()}

    return check


def _train_check(fn, ref_fn):
    """Before timing: the gradients against the eager reference's, relative to their largest
    magnitude (1e-2 for fp16 data, 1e-4 for fp32). A sanity check that catches a wrong kernel;
    the rounding audit of these kernels is in tests/test_binary.py."""

    def check():
        worst = 0.0
        for a, b in zip(fn(), ref_fn()):
            a, b = a.double(), b.double()
            scale = max(b.abs().max().item(), 1e-30) if b.numel() else 1.0
            worst = max(worst, (a - b).abs().max().item() / scale if b.numel() else 0.0)
        limit = 1e-2 if DTYPE != torch.float32 else 1e-4
        assert worst <= limit, f"gradients differ from the reference: rel. error {worst:.3g}"
        return {"rel_err_vs_reference": worst}

    return check


def _packed_bytes(N: int, K: int, bits: int) -> int:
    return bits * N * math.ceil(K / 32) * 4 + N * 4


GEMM_IMPLS = ["triton", "cublas", "dense", "reference", "auto"]


@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("impl", GEMM_IMPLS)
def test_bench_binary_gemm(benchmark, bench_tools, impl, M):
    if impl in ("triton", "dense") and TRITON_SKIP:
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

    w_exact = unpack_weight(packed, torch.float32, impl="reference")
    bench_tools.run(
        benchmark,
        fn,
        check=_gemm_check(fn, x, w_exact),
        bytes_moved=moved,
        flops=2 * M * N * K,
        op="binary_gemm",
        # torch.matmul of the dense weight is cuBLAS only on CUDA: never label a CPU run so
        impl=impl if impl != "cublas" or ON_CUDA else "torch.matmul",
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
def test_bench_binary_linear_train(benchmark, bench_tools, impl, M):
    if impl in ("triton", "dense") and TRITON_SKIP:
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

    def reference():
        return torch.autograd.grad(binary_linear(x, w, b, bits=1, impl="reference"), (x, w, b), g)

    bench_tools.run(
        benchmark,
        fn,
        check=_train_check(fn, reference),
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


QUANT_SHAPE = (512, 512, 3, 3) if ON_CUDA else (64, 32, 3, 3)  # ResNet's widest 3x3 conv


@pytest.mark.parametrize("bits", [1, 2], ids=["binarize", "ternarize"])
@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_bench_weight_quantize(benchmark, bench_tools, impl, bits):
    """What a binary layer's training forward runs on its latent weight every call: `binarize`
    (one launch on the Triton path) or `ternarize` (three), against the eager reference (torch
    reductions). No gradient recorded."""
    if impl == "triton" and TRITON_SKIP:
        pytest.skip(TRITON_SKIP)
    torch.manual_seed(0)
    w = torch.randn(QUANT_SHAPE, device=DEVICE) * 0.5
    quant = binarize if bits == 1 else ternarize
    n = w[0].numel() if bits == 1 else w.numel()

    def fn():
        return quant(w, impl=impl)

    def check():
        got, ref = fn(), quant(w, impl="reference")
        assert torch.equal(torch.sign(got), torch.sign(ref)), "the sign / zero pattern differs"
        rel = ((got - ref).abs().max() / ref.abs().max()).item()
        limit = 2 * (n.bit_length() + n // 2048 + 2) * 2.0**-24  # two fp32 sums, other orders
        assert rel <= limit, f"magnitudes differ from the reference by {rel:.3g} (> {limit:.3g})"
        return {"rel_err_vs_reference": rel}

    # w read (twice for binarize's two row passes, three times for ternarize's), out written
    moved = w.numel() * 4 * ((2 if bits == 1 else 3) + 1)
    bench_tools.run(
        benchmark,
        fn,
        check=check,
        bytes_moved=moved,
        op="weight_quantize",
        impl=impl,
        N=QUANT_SHAPE[0],
        K=n if bits == 1 else w[0].numel(),
        bits=bits,
        dtype="float32",
    )
