"""Multi-precision spikes: quantize_spikes, encode_spikes, decode_spikes (docs/model.md §2)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import DTYPES, assert_close_to_oracle, assert_half_matches_fp32_oracle, near_boundary

import empf_triton.ops._common as ops_common
from empf_triton.ops._common import TritonUnavailableError
from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes
from empf_triton.reference.spikes import (
    decode_spikes_ref,
    encode_spikes_ref,
    quantize_spikes_ref,
)

SIZES = [1, 7, 63, 1000, 4097]
PACK_BITS = [1, 2, 4, 8]


def _spikes(n: int, bits: int, step: float, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Values from 2 steps below 0 to 2 steps above the top level, drawn on the CPU."""
    hi = (2**bits + 1) * step
    s = torch.rand(n, dtype=torch.float64) * (hi + 2 * step) - 2 * step
    return s.to(dtype).to(device)


def _n_bytes(n: int, bits: int) -> int:
    return math.ceil(n * bits / 8)


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("step", [0.25, 0.3])
def test_quantize_fp32_bit_exact(device, n, bits, step):
    s = _spikes(n, bits, step, device=device).requires_grad_()
    out = quantize_spikes(s, bits, step, impl="triton")
    # The CPU reference divides with IEEE division, as the kernel does (CUDA's torch multiplies by
    # the reciprocal, which can differ by an ulp for a step like 0.3).
    ref = quantize_spikes_ref(s.detach().cpu(), bits, step)
    assert out.dtype == torch.float32 and out.shape == s.shape
    assert torch.equal(out.detach().cpu(), ref)
    levels = torch.arange(2**bits, dtype=torch.float32) * step
    assert torch.isin(ref, levels).all()
    g = torch.randn_like(s)
    out.backward(g)
    assert torch.equal(s.grad, g)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("step", [0.25, 0.5, 2.0])
def test_quantize_dtypes_power_of_two_step(device, dtype, bits, step):
    """With a power-of-two step s / step is exact in every dtype: kernel == same-dtype reference."""
    n = 1000
    s = _spikes(n, bits, step, dtype, device).requires_grad_()
    out = quantize_spikes(s, bits, step, impl="triton")
    ref = quantize_spikes(s, bits, step, impl="reference")
    oracle = quantize_spikes_ref(s.detach().double(), bits, step)
    assert out.dtype == dtype
    assert torch.equal(out, ref)
    assert_close_to_oracle("quantize", out.detach(), ref.detach(), oracle)
    g = torch.randn(n, dtype=dtype, device=device)
    (gs,) = torch.autograd.grad(out, s, g)
    (gs_ref,) = torch.autograd.grad(ref, s, g)
    assert torch.equal(gs, g) and torch.equal(gs_ref, g)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_half_general_step_uses_fp32_codes(device, dtype):
    """For fp16/bf16 and a step like 0.3 the kernel's codes are round(fp32(s) / step); the
    same-dtype reference rounds s / step to fp16/bf16 first and may land one code away."""
    bits, step = 8, 0.3
    s = torch.linspace(-1.0, 80.0, 4097, dtype=torch.float64).to(dtype).to(device)
    codes = encode_spikes(s, bits, step, impl="triton")
    assert torch.equal(codes.cpu(), encode_spikes_ref(s.cpu().float(), bits, step))
    code = decode_spikes(codes, bits, 1.0, impl="triton")
    code_ref = decode_spikes(encode_spikes(s, bits, step, impl="reference"), bits, 1.0)
    diff = (code.cpu() - code_ref.cpu()).abs()
    assert diff.max() == 1  # they do differ, by one code at most
    out = quantize_spikes(s, bits, step, impl="triton")
    # fp32-compute oracle: a code may differ only where s / step is within 2 ulps of a rounding
    # point (j + 1/2); everything else within one rounding of the half dtype.
    codes32 = s.float() / step
    dist = ((codes32 - codes32.floor() - 0.5).abs() * step).double()
    may_flip = near_boundary(dist, s.float(), dtype)
    oracle32 = quantize_spikes_ref(s.float(), bits, step)
    assert_half_matches_fp32_oracle("quantize", out, oracle32, may_flip)
    if dtype == torch.float16 or device == "cuda":
        # Triton's interpreter casts fp32 -> bf16 by truncation, so only compiled bf16 is checked.
        expect = quantize_spikes_ref(s.cpu().float(), bits, step).to(dtype)
        assert torch.equal(out.cpu(), expect)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_ties_round_half_even(device, impl, dtype):
    bits, step = 4, 0.25
    k = torch.arange(-2, 2**bits + 2, dtype=torch.float64)
    s = ((k + 0.5) * step).to(dtype).to(device)
    assert torch.equal(s.double().cpu(), (k + 0.5) * step)  # ties exactly representable
    # round(k + 0.5) half to even: k if k is even else k + 1; then clamp to 0..15.
    code = torch.where(k % 2 == 0, k, k + 1).clamp(0, 2**bits - 1)
    out = quantize_spikes(s, bits, step, impl=impl)
    assert torch.equal(out.double().cpu(), code * step)


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_negative_rounds_to_negative_zero_as_reference(device, dtype):
    # round(s / step) of s in [-step/2, 0) is -0.0 (torch.round keeps the sign), and the clamp
    # keeps it: the kernels' rounding gave +0.0 there, so the paths differed in the sign bit
    step = 0.25
    s = torch.tensor([-0.125, -0.1, -1e-30, -0.0, 0.0, 0.1, -0.13], dtype=dtype, device=device)
    out = quantize_spikes(s, 4, step, impl="triton")
    ref = quantize_spikes_ref(s.cpu(), 4, step)
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(torch.signbit(out).cpu(), torch.signbit(ref))
    assert torch.signbit(ref).tolist() == [True, True, True, True, False, False, False]


# inf - floor(inf) is NaN inside round_half_even (then discarded); numpy warns in the interpreter.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantize_out_of_range_and_nan(device, impl, dtype):
    bits, step = 3, 0.5
    vals = [-1e4, -float("inf"), -0.3, 0.0, 3.5, 3.76, 1e4, float("inf"), float("nan"), 1.2]
    want = [0.0, 0.0, 0.0, 0.0, 3.5, 3.5, 3.5, 3.5, float("nan"), 1.0]
    s = torch.tensor(vals, dtype=dtype, device=device)
    out = quantize_spikes(s, bits, step, impl=impl)
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(torch.tensor(want)))
    assert torch.equal(
        out.double().cpu().nan_to_num(-7.0), torch.tensor(want).double().nan_to_num(-7.0)
    )


def test_quantize_non_contiguous(device):
    bits, step = 4, 0.25
    base = _spikes(63 * 5, bits, step, device=device).reshape(63, 5)
    s = base.t().requires_grad_()  # [5, 63], non-contiguous
    assert not s.is_contiguous()
    out = quantize_spikes(s, bits, step, impl="triton")
    assert out.shape == s.shape
    assert torch.equal(out.detach().cpu(), quantize_spikes_ref(s.detach().cpu(), bits, step))
    g = torch.randn(63, 5, device=device).t()
    out.backward(g)
    assert torch.equal(s.grad, g)


def test_quantize_empty_and_auto(device):
    s = torch.empty(0, 3, device=device)
    assert quantize_spikes(s, 4, impl="triton").shape == (0, 3)
    x = _spikes(100, 4, 0.25, device=device)
    assert torch.equal(quantize_spikes(x, 4), quantize_spikes_ref(x, 4, 0.25))


def test_quantize_reference_gradcheck_fp64():
    """The straight-through backward is the derivative of the explicit STE form
    s + (Q(s) - s).detach(): Q(s) - Q(s).detach() + s.detach() equals s numerically, and its
    analytical gradient is Q's backward, so gradcheck pins that backward to the identity."""
    s = _spikes(40, 4, 0.25, torch.float64).requires_grad_()

    def f(x):
        q = quantize_spikes(x, 4, 0.25, impl="reference")
        return q - q.detach() + x.detach()

    assert torch.autograd.gradcheck(f, (s,), eps=1e-6, atol=1e-8)
    g = torch.randn(40, dtype=torch.float64)
    (gs,) = torch.autograd.grad(quantize_spikes(s, 4, 0.25, impl="reference"), s, g)
    assert torch.equal(gs, g)


# ----------------------------------------------------------------------------- encode / decode


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_encode_layout(device, impl):
    s = torch.tensor([0.0, 1.0, 2.0, 3.0, 3.0, 2.0], device=device)
    assert encode_spikes(s, 2, 1.0, impl=impl).tolist() == [
        0 | 1 << 2 | 2 << 4 | 3 << 6,
        3 | 2 << 2,
    ]
    s1 = torch.tensor([1, 0, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.float32, device=device)
    assert encode_spikes(s1, 1, 1.0, impl=impl).tolist() == [0b10111001, 0b11]
    s4 = torch.tensor([15.0, 1.0, 6.0], device=device) * 0.25
    assert encode_spikes(s4, 4, impl=impl).tolist() == [15 | 1 << 4, 6]
    s8 = torch.tensor([0.0, 255.0, 17.0, 300.0, -3.0], device=device)
    assert encode_spikes(s8, 8, 1.0, impl=impl).tolist() == [0, 255, 17, 255, 0]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", PACK_BITS)
def test_encode_decode_fp32_bit_exact(device, n, bits):
    step = 0.3
    s = _spikes(n, bits, step, device=device)
    codes = encode_spikes(s, bits, step, impl="triton")
    codes_ref = encode_spikes_ref(s.cpu(), bits, step)
    assert codes.dtype == torch.uint8 and codes.shape == (_n_bytes(n, bits),)
    assert torch.equal(codes.cpu(), codes_ref)
    # Unused high bits of the last byte are zero.
    used = (n % (8 // bits)) * bits
    if used:
        assert int(codes[-1]) >> used == 0
    out = decode_spikes(codes, bits, step, s.shape, impl="triton")
    assert torch.equal(out.cpu(), decode_spikes_ref(codes.cpu(), bits, step, (n,)))
    assert torch.equal(out.cpu(), quantize_spikes_ref(s.cpu(), bits, step))
    assert torch.equal(out, quantize_spikes(s, bits, step, impl="triton"))


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", PACK_BITS)
def test_round_trip_dtypes(device, impl, dtype, bits):
    """decode(encode(s)) == quantize(s) in s's dtype; step 0.25 keeps half dtypes exact too."""
    step = 0.25
    s = _spikes(1000, bits, step, dtype, device).reshape(8, 125)
    codes = encode_spikes(s, bits, step, impl=impl)
    assert torch.equal(codes.cpu(), encode_spikes_ref(s.cpu(), bits, step))
    out = decode_spikes(codes, bits, step, s.shape, dtype=dtype, impl=impl)
    assert out.shape == s.shape and out.dtype == dtype
    assert torch.equal(out, quantize_spikes(s, bits, step, impl=impl))
    assert torch.equal(out, quantize_spikes_ref(s, bits, step))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_trip_general_step_same_impl(device, dtype):
    """With any step, each impl's round trip is exact against its own quantiser."""
    bits, step = 4, 0.3
    s = _spikes(1000, bits, step, dtype, device)
    for impl in ("triton", "reference"):
        codes = encode_spikes(s, bits, step, impl=impl)
        out = decode_spikes(codes, bits, step, s.shape, dtype=dtype, impl=impl)
        assert torch.equal(out, quantize_spikes(s, bits, step, impl=impl)), impl


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_encode_nan_is_code_zero(device, impl):
    bits, step = 2, 0.25
    s = torch.tensor([0.5, float("nan"), 0.75, 0.25, float("nan")], device=device)
    codes = encode_spikes(s, bits, step, impl=impl)
    assert codes.tolist() == [2 | 0 << 2 | 3 << 4 | 1 << 6, 0]
    out = decode_spikes(codes, bits, step, s.shape, impl=impl)
    assert out.tolist() == [0.5, 0.0, 0.75, 0.25, 0.0]


def test_encode_decode_non_contiguous(device):
    bits, step = 4, 0.25
    s = _spikes(7 * 9, bits, step, device=device).reshape(7, 9).t()
    assert not s.is_contiguous()
    codes = encode_spikes(s, bits, step, impl="triton")
    assert torch.equal(codes.cpu(), encode_spikes_ref(s.cpu().contiguous(), bits, step))
    wide = torch.stack([codes, torch.zeros_like(codes)], dim=1).reshape(-1)
    strided = wide[::2]
    assert not strided.is_contiguous()
    out = decode_spikes(strided, bits, step, s.shape, impl="triton")
    assert torch.equal(out, quantize_spikes(s, bits, step, impl="triton"))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_decode_shapes_and_empty(device, impl):
    codes = torch.tensor([0x21, 0x43], dtype=torch.uint8, device=device)
    assert decode_spikes(codes, 4, 1.0, impl=impl).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert decode_spikes(codes, 4, 1.0, 3, impl=impl).tolist() == [1.0, 2.0, 3.0]
    assert decode_spikes(codes, 8, 0.5, (2, 1), impl=impl).tolist() == [[16.5], [33.5]]
    empty = torch.empty(0, device=device)
    codes0 = encode_spikes(empty, 4, impl=impl)
    assert codes0.shape == (0,) and codes0.dtype == torch.uint8
    assert decode_spikes(codes0, 4, shape=(0, 5), impl=impl).shape == (0, 5)


def test_encode_no_grad_and_fp64_reference():
    s = _spikes(50, 4, 0.25, torch.float64).requires_grad_()
    codes = encode_spikes(s, 4, impl="reference")
    assert not codes.requires_grad
    out = decode_spikes(codes, 4, shape=(50,), dtype=torch.float64, impl="reference")
    assert torch.equal(out, quantize_spikes_ref(s.detach(), 4, 0.25))


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_quantize_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        quantize_spikes(torch.zeros(3), bits)


@pytest.mark.parametrize("bits", [3, 5, 0, 16])
def test_encode_decode_bad_bits(bits):
    with pytest.raises(ValueError, match=f"got {bits}"):
        encode_spikes(torch.zeros(3), bits)
    with pytest.raises(ValueError, match=f"got {bits}"):
        decode_spikes(torch.zeros(3, dtype=torch.uint8), bits)


@pytest.mark.parametrize("bits", [4.0, None, True])
def test_bits_not_int(bits):
    with pytest.raises(TypeError, match="bits"):
        quantize_spikes(torch.zeros(3), bits)
    with pytest.raises(TypeError, match="bits"):
        encode_spikes(torch.zeros(3), bits)


@pytest.mark.parametrize("step", [0.0, -0.25, float("inf"), float("nan"), 1e300, 3.5e38, 1e-50])
def test_bad_step(step):
    # 1e300 and 3.5e38 are inf in fp32 (the kernels' step), 1e-50 is 0: they used to return NaN
    for call in (
        lambda: quantize_spikes(torch.zeros(3), 4, step),
        lambda: encode_spikes(torch.zeros(3), 4, step),
        lambda: decode_spikes(torch.zeros(2, dtype=torch.uint8), 4, step),
    ):
        with pytest.raises(ValueError, match="step"):
            call()
    with pytest.raises(TypeError, match="step"):
        quantize_spikes(torch.zeros(3), 4, "0.25")


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_huge_int_step_raises_value_error(device, impl):
    # an int beyond float range: float() raised OverflowError inside the check, not ValueError
    s, codes = torch.zeros(3, device=device), torch.zeros(2, dtype=torch.uint8, device=device)
    for call in (
        lambda: quantize_spikes(s, 4, 10**400, impl=impl),
        lambda: encode_spikes(s, 4, 10**400, impl=impl),
        lambda: decode_spikes(codes, 4, 10**400, impl=impl),
    ):
        with pytest.raises(ValueError, match="step must be finite and > 0 in fp32"):
            call()


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("step", [3.4e38, 1e-45])
def test_extreme_steps_inside_fp32_range_work(device, impl, step):
    # 3.4e38 and 1e-45 (a subnormal) are finite and > 0 in fp32: accepted, no NaN
    s = torch.tensor([0.0, 1.0, 1e38], device=device)
    out = quantize_spikes(s, 4, step, impl=impl)
    assert not torch.isnan(out).any()
    assert torch.equal(out, quantize_spikes_ref(s.cpu(), 4, step).to(device))


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_quantize_spikes_step_error_names_step(device, impl):
    with pytest.raises(ValueError, match=r"step must be finite and > 0 in fp32, got 1e\+300"):
        quantize_spikes(torch.zeros(3, device=device), 4, 1e300, impl=impl)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_integer_spikes(device, dtype):
    s = torch.zeros(4, dtype=dtype, device=device)
    for impl in ("reference", "triton"):
        with pytest.raises(TypeError, match="dtype"):
            quantize_spikes(s, 4, impl=impl)
        with pytest.raises(TypeError, match="dtype"):
            encode_spikes(s, 4, impl=impl)
    with pytest.raises(TypeError, match="torch.Tensor"):
        quantize_spikes([0.5, 1.0], 4)


def test_triton_rejects_fp64(device):
    with pytest.raises(TypeError, match="float64"):
        quantize_spikes(torch.zeros(3, dtype=torch.float64, device=device), 4, impl="triton")
    codes = torch.zeros(2, dtype=torch.uint8, device=device)
    with pytest.raises(TypeError, match="float64"):
        decode_spikes(codes, 4, dtype=torch.float64, impl="triton")


def test_decode_bad_codes():
    with pytest.raises(TypeError, match="uint8"):
        decode_spikes(torch.zeros(2, dtype=torch.int8), 4, shape=(4,))
    with pytest.raises(TypeError, match="uint8"):
        decode_spikes(torch.zeros(2), 4, shape=(4,))
    with pytest.raises(TypeError, match="torch.Tensor"):
        decode_spikes([1, 2], 4, shape=(4,))
    with pytest.raises(ValueError, match="1-D"):
        decode_spikes(torch.zeros(2, 1, dtype=torch.uint8), 4, shape=(4,))
    with pytest.raises(ValueError, match=r"= 3 bytes .* got 2"):
        decode_spikes(torch.zeros(2, dtype=torch.uint8), 4, shape=(5,))
    with pytest.raises(ValueError, match=r"= 1 bytes .* got 2"):
        decode_spikes(torch.zeros(2, dtype=torch.uint8), 1, shape=(2, 3))
    with pytest.raises(ValueError, match="non-negative"):
        decode_spikes(torch.zeros(2, dtype=torch.uint8), 4, shape=(-4,))
    with pytest.raises(TypeError, match="shape"):
        decode_spikes(torch.zeros(2, dtype=torch.uint8), 4, shape=(4.0,))
    with pytest.raises(TypeError, match="dtype"):
        decode_spikes(torch.zeros(2, dtype=torch.uint8), 4, dtype=torch.int32)


def test_unknown_impl():
    with pytest.raises(ValueError, match="impl"):
        quantize_spikes(torch.zeros(3), 4, impl="cuda")
    with pytest.raises(ValueError, match="impl"):
        encode_spikes(torch.zeros(3), 4, impl="eager")
    with pytest.raises(ValueError, match="impl"):
        decode_spikes(torch.zeros(2, dtype=torch.uint8), 4, impl="")


def test_triton_unavailable_never_falls_back(monkeypatch):
    monkeypatch.setattr(ops_common, "_interpreter_on", lambda: False)
    s = torch.zeros(8)
    with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET"):
        quantize_spikes(s, 4, impl="triton")
    with pytest.raises(TritonUnavailableError):
        encode_spikes(s, 4, impl="triton")
    with pytest.raises(TritonUnavailableError):
        decode_spikes(torch.zeros(4, dtype=torch.uint8), 4, impl="triton")
    assert torch.equal(quantize_spikes(s, 4), s)  # auto on CPU is the reference


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_decode_shape_accepts_integer_likes(impl):
    """numpy integers, a numpy shape array and 0-d integer tensors are sizes, as torch takes them
    (they were a TypeError); bools, floats and strings are not."""
    np = pytest.importorskip("numpy")
    s = torch.tensor([0.0, 0.25, 0.5, 3.75, 1.0, 2.0])
    codes = encode_spikes(s, 4, 0.25, impl="reference")
    want = s.reshape(2, 3)
    for shape in [(np.int64(2), np.int32(3)), np.array([2, 3]), (torch.tensor(2), 3)]:
        got = decode_spikes(codes, 4, 0.25, shape, impl=impl)
        assert got.shape == (2, 3) and type(got.shape[0]) is int
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    flat = decode_spikes(codes, 4, 0.25, np.int64(6), impl=impl)
    torch.testing.assert_close(flat, s, rtol=0, atol=0)
    for bad in [(True, 6), (2.0, 3), "23", (torch.tensor(2.0), 3), np.float64(6)]:
        with pytest.raises(TypeError, match="shape"):
            decode_spikes(codes, 4, 0.25, bad, impl=impl)
