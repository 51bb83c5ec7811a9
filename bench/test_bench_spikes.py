"""Benchmarks of the multi-precision spike ops: reference vs Triton for quantize / encode / decode.

Run: `pytest bench/test_bench_spikes.py --benchmark-json=bench/results/spikes.json`.
Without CUDA only the reference runs (the Triton cases are skipped; the interpreter is not a
performance target). `extra_info` records the bytes each call must move and the achieved GB/s
(median time), so Triton can be compared with the memory bandwidth of the card.
"""

from __future__ import annotations

import pytest
import torch

from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
N = 1 << 24 if HAS_CUDA else 1 << 20  # elements per call
STEP = 0.25
IMPLS = [
    "reference",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")),
]


def _bench(benchmark, fn, n_bytes_moved: int, **info) -> None:
    def timed():
        out = fn()
        if HAS_CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(timed, rounds=30 if HAS_CUDA else 5, warmup_rounds=3, iterations=1)
    median = benchmark.stats.stats.median
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
        torch=torch.__version__,
        n_elements=N,
        bytes_moved=n_bytes_moved,
        gbps=n_bytes_moved / median / 1e9,
        **info,
    )


def _spikes(bits: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(N, generator=g) * (2**bits + 1) * STEP - STEP
    return s.to(dtype).to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bench_quantize(benchmark, impl, dtype):
    s = _spikes(4, dtype)
    moved = 2 * s.numel() * s.element_size()  # read s, write out
    _bench(
        benchmark,
        lambda: quantize_spikes(s, 4, STEP, impl=impl),
        moved,
        op="quantize",
        impl=impl,
        bits=4,
        dtype=str(dtype),
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_bench_encode(benchmark, impl, bits):
    s = _spikes(bits)
    moved = s.numel() * s.element_size() + N * bits // 8
    _bench(
        benchmark,
        lambda: encode_spikes(s, bits, STEP, impl=impl),
        moved,
        op="encode",
        impl=impl,
        bits=bits,
        dtype="torch.float32",
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [1, 4, 8])
def test_bench_decode(benchmark, impl, bits):
    codes = encode_spikes(_spikes(bits), bits, STEP)
    moved = codes.numel() + N * 4
    _bench(
        benchmark,
        lambda: decode_spikes(codes, bits, STEP, (N,), impl=impl),
        moved,
        op="decode",
        impl=impl,
        bits=bits,
        dtype="torch.float32",
    )
