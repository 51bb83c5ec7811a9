"""Benchmarks of the multi-precision spike ops: reference vs Triton for quantize / encode / decode.

Run: `pytest bench/test_bench_spikes.py --benchmark-json=spikes.json` (bench/ on its own).
Timing, checks and CUDA-graph replay come from bench/conftest.py (`bench_tools.run`). Every
Triton case is compared with the reference (bit-exact: these ops are exact) before it is timed.
Without CUDA the Triton cases are skipped unless TRITON_INTERPRET=1 (harness check only).
`extra_info`: op, impl, bits, dtype, n_elements, bytes_moved (read input + write output in their
stored formats) and GB/s.
"""

from __future__ import annotations

import pytest
import torch
from conftest import BENCH_N, DEVICE, triton_skip_reason

from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes

# 8 x the neuron benchmarks' elements per step: 2^24 on CUDA by default.
N = 8 * BENCH_N
STEP = 0.25
_SKIP = triton_skip_reason()
IMPLS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")),
]


def _spikes(bits: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(N, generator=g) * (2**bits + 1) * STEP - STEP
    return s.to(dtype).to(DEVICE)


def _exact(fn, ref_fn):
    """A check: the Triton result equals the reference's bit for bit."""

    def check():
        got, ref = fn(), ref_fn()
        assert torch.equal(got, ref), "Triton result differs from the reference"
        return {"max_abs_err_vs_reference": 0.0}

    return check


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_quantize(benchmark, bench_tools, impl, dtype):
    s = _spikes(4, dtype)
    moved = 2 * s.numel() * s.element_size()  # read s, write out
    fn = lambda: quantize_spikes(s, 4, STEP, impl=impl)  # noqa: E731
    bench_tools.run(
        benchmark,
        fn,
        check=_exact(fn, lambda: quantize_spikes(s, 4, STEP, impl="reference")),
        bytes_moved=moved,
        op="quantize",
        impl=impl,
        bits=4,
        dtype=str(dtype),
        n_elements=N,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_bench_encode(benchmark, bench_tools, impl, bits):
    s = _spikes(bits)
    moved = s.numel() * s.element_size() + N * bits // 8
    fn = lambda: encode_spikes(s, bits, STEP, impl=impl)  # noqa: E731
    bench_tools.run(
        benchmark,
        fn,
        check=_exact(fn, lambda: encode_spikes(s, bits, STEP, impl="reference")),
        bytes_moved=moved,
        op="encode",
        impl=impl,
        bits=bits,
        dtype="torch.float32",
        n_elements=N,
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_bench_decode(benchmark, bench_tools, impl, bits):
    codes = encode_spikes(_spikes(bits), bits, STEP)
    moved = codes.numel() + N * 4
    fn = lambda: decode_spikes(codes, bits, STEP, (N,), impl=impl)  # noqa: E731
    bench_tools.run(
        benchmark,
        fn,
        check=_exact(fn, lambda: decode_spikes(codes, bits, STEP, (N,), impl="reference")),
        bytes_moved=moved,
        op="decode",
        impl=impl,
        bits=bits,
        dtype="torch.float32",
        n_elements=N,
    )
