"""Fused packed convolution + scale/bias + EM-PF neuron (`binary_conv_neuron`): Triton vs reference.

With uint8 spike codes every path computes the same exact integer sums and the same fp32
epilogue, so codes, float spikes and currents must match bit for bit. Float spikes are tested
with values on a 1/16 grid (exact sums: again bit for bit) and with arbitrary values (currents
within a rigorous fp32 summation bound of an fp64 oracle).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from empf_triton.ops.binary import pack_weight, unpack_weight
from empf_triton.ops.binary_conv import MAX_CODE_K, binary_conv_neuron
from empf_triton.ops.neuron import empf_neuron
from empf_triton.reference.binary import decode_ref
from empf_triton.reference.binary_conv import binary_conv_neuron_ref

U32 = 2.0**-24  # unit roundoff of fp32
# Kernels run on CUDA where it exists (the interpreter is off there), else in the interpreter.
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (C_in, C_out, (kh, kw), stride, padding, groups, H, W): odd channel counts, C_out > BLOCK_CO,
# K > BLOCK_K, H*W > BLOCK_P, 1x1, grouped, depthwise, 1-D (H = 1) and asymmetric stride/padding.
GEOMS = [
    (3, 5, (3, 3), 1, 1, 1, 7, 6),
    (5, 7, (3, 3), 2, 0, 1, 9, 8),
    (8, 67, (3, 3), 1, 1, 1, 9, 10),
    (4, 6, (1, 1), 1, 0, 2, 5, 5),
    (6, 6, (3, 3), 2, 1, 6, 7, 7),
    (3, 9, (1, 3), (1, 2), (0, 1), 1, 1, 11),
]
GEOM_IDS = ["3x3", "s2p0", "wide", "1x1g2", "dw", "1d"]


def _params(T, C, *, per_step, bias, seed=0):
    """Positive scales and biases on a grid (exact in fp32 and fp16), [C] or [T, C]."""
    g = torch.Generator().manual_seed(seed)
    shape = (T, C) if per_step else (C,)
    scale = (torch.randint(1, 9, shape, generator=g).float() / 8).to(DEV)
    b = (torch.randint(-8, 9, shape, generator=g).float() / 16).to(DEV) if bias else None
    return scale, b


def _neuron(T, C, seed=1):
    g = torch.Generator().manual_seed(seed)
    decay = torch.randint(2, 8, (T, C), generator=g).float() / 8
    # Thresholds off the 1/64 grid that the codes' currents live on: no current ever equals one.
    threshold = (torch.randint(4, 40, (T, C), generator=g).float() + 0.37) / 16
    return decay.to(DEV), threshold.to(DEV)


def _packed(C_out, Cg, k, bits, seed=2):
    g = torch.Generator().manual_seed(seed)
    return pack_weight(torch.randn(C_out, Cg, *k, generator=g), bits, impl="reference").to(DEV)


def _both(*args, **kwargs):
    out = binary_conv_neuron(*args, impl="triton", **kwargs)
    ref = binary_conv_neuron(*args, impl="reference", **kwargs)
    return out, ref


def _assert_equal(out, ref, what):
    assert out.dtype == ref.dtype and out.shape == ref.shape, what
    if out.is_floating_point():
        assert not out.isnan().any(), f"{what}: NaN (unwritten output?)"
    assert torch.equal(out, ref), f"{what}: max diff {(out.double() - ref.double()).abs().max()}"


# ------------------------------------------------------------------------------ uint8 code inputs


@pytest.mark.parametrize("bits", [1, 2], ids=["binary", "ternary"])
@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("geom", GEOMS, ids=GEOM_IDS)
def test_codes_in_every_output_matches_reference(geom, T, bits):
    C_in, C_out, k, stride, padding, groups, H, W = geom
    packed = _packed(C_out, C_in // groups, k, bits)
    decay, threshold = _neuron(T, C_out)
    fired = 0
    for i, k_in in enumerate((1, 2, 4, 8)):
        x = torch.randint(0, 2**k_in, (T, 2, C_in, H, W), dtype=torch.uint8, device=DEV)
        scale, bias = _params(T, C_out, per_step=i % 2 == 1, bias=i != 2, seed=i)
        # Decoded spikes up to about 2-4 whatever k_in (powers of two: exact steps).
        in_step = 2.0 ** (2 - k_in)
        common = dict(stride=stride, padding=padding, groups=groups, in_step=in_step, in_bits=k_in)
        cases = {
            "codes": dict(decay=decay, threshold=threshold, spike_bits=4, spike_step=0.25),
            "codes1": dict(decay=decay, threshold=threshold, spike_bits=1, spike_step=0.5),
            "float": dict(decay=decay, threshold=threshold),
            "parallel_codes": dict(threshold=threshold, parallel=True, spike_bits=8),
            "parallel_fp16": dict(threshold=threshold, parallel=True, out_dtype=torch.float16),
            "currents": dict(),
        }
        for name, kw in cases.items():
            if k_in != 4 and name not in ("codes", "currents"):
                continue  # every output format once per geometry: the interpreter is slow
            out, ref = _both(x, packed, scale, bias, **common, **kw)
            _assert_equal(out, ref, f"k_in={k_in} {name}")
            if name == "codes":
                assert int(ref.max()) <= 15
                fired = max(fired, int(ref.max()))
    assert fired > 1, "the test should produce non-trivial codes"


def test_currents_equal_exact_convolution():
    """The reference itself: codes * in_step convolved with the ±1 weight, scaled, biased."""
    T, C_in, C_out = 2, 5, 7
    packed = _packed(C_out, C_in, (3, 3), 1)
    x = torch.randint(0, 256, (T, 3, C_in, 6, 5), dtype=torch.uint8, device=DEV)
    scale, bias = _params(T, C_out, per_step=True, bias=True)
    y = binary_conv_neuron(x, packed, scale, bias, padding=1, in_step=0.125, impl="triton")
    w = decode_ref(packed.words, packed.K).double().reshape(packed.shape)
    y64 = F.conv2d(x.double().reshape(T * 3, C_in, 6, 5) * 0.125, w, padding=1)
    y64 = y64.reshape(T, 3, C_out, 6, 5) * scale.double()[:, None, :, None, None]
    y64 = y64 + bias.double()[:, None, :, None, None]
    assert torch.equal(y.double(), y64)  # every value here is exact in fp32


def test_in_bits_masks_high_bits_on_both_paths():
    packed = _packed(6, 4, (3, 3), 2)
    x = torch.randint(0, 256, (2, 2, 4, 5, 5), dtype=torch.uint8, device=DEV)
    scale, bias = _params(2, 6, per_step=False, bias=True)
    out, ref = _both(x, packed, scale, bias, padding=1, in_step=0.5, in_bits=3)
    _assert_equal(out, ref, "in_bits=3")
    masked = binary_conv_neuron(
        x & 7, packed, scale, bias, padding=1, in_step=0.5, impl="reference"
    )
    assert torch.equal(ref, masked)


def test_large_codes_stay_exact():
    """8-bit codes near 255 with K = 16*9 = 144: sums up to ~37000, exact on both paths."""
    packed = _packed(20, 16, (3, 3), 1)
    x = torch.randint(200, 256, (1, 1, 16, 6, 6), dtype=torch.uint8, device=DEV)
    scale, bias = _params(1, 20, per_step=False, bias=True)
    out, ref = _both(x, packed, scale, bias, padding=1, in_step=0.3)
    _assert_equal(out, ref, "large codes")


def test_non_contiguous_input():
    T, N, C_in, C_out = 2, 3, 5, 6
    base = torch.randint(0, 16, (N, T, 7, 8, C_in), dtype=torch.uint8, device=DEV)  # NTHWC
    x = base.permute(1, 0, 4, 2, 3)
    assert not x.is_contiguous()
    packed = _packed(C_out, C_in, (3, 3), 1)
    scale, bias = _params(T, C_out, per_step=True, bias=True)
    decay, threshold = _neuron(T, C_out)
    kw = dict(stride=2, padding=1, in_step=0.25, decay=decay, threshold=threshold, spike_bits=4)
    out, ref = _both(x, packed, scale, bias, **kw)
    _assert_equal(out, ref, "non-contiguous")
    contiguous = binary_conv_neuron(x.contiguous(), packed, scale, bias, impl="triton", **kw)
    assert torch.equal(out, contiguous)


def test_strided_and_half_precision_parameters():
    """[T, C] scale as a transposed view, bias as a strided [C] column expanded to [T, C], fp16
    decay and threshold: converted to fp32 alike on both paths."""
    T, C_in, C_out = 3, 4, 9
    packed = _packed(C_out, C_in, (3, 3), 1)
    x = torch.randint(0, 16, (T, 2, C_in, 5, 5), dtype=torch.uint8, device=DEV)
    scale_ct, bias_c = _params(C_out, T, per_step=True, bias=True)  # [C, T]
    scale = scale_ct.t()
    bias = bias_c[:, 0].expand(T, C_out)  # strides (0, T)
    assert not scale.is_contiguous() and bias.stride() == (0, T)
    decay, threshold = _neuron(T, C_out)
    kw = dict(padding=1, in_step=0.25, decay=decay.half(), threshold=threshold.half())
    out, ref = _both(x, packed, scale, bias, spike_bits=4, **kw)
    _assert_equal(out, ref, "strided params")
    dense = binary_conv_neuron(
        x, packed, scale.contiguous(), bias.contiguous(), spike_bits=4, impl="triton", **kw
    )
    assert torch.equal(out, dense)


# ------------------------------------------------------------------------------ float spike inputs


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2], ids=["binary", "ternary"])
def test_float_spikes_on_a_grid_match_exactly(x_dtype, bits):
    """Spikes k/16 (exact in every dtype; exact fp32 sums): every output matches bit for bit."""
    T, C_in, C_out = 3, 7, 11
    packed = _packed(C_out, C_in, (3, 3), bits)
    x = (torch.randint(0, 32, (T, 2, C_in, 6, 7), device=DEV).float() / 16).to(x_dtype)
    scale, bias = _params(T, C_out, per_step=True, bias=True)
    decay, threshold = _neuron(T, C_out)
    common = dict(stride=1, padding=1)
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        for kw in (
            dict(decay=decay, threshold=threshold),
            dict(threshold=threshold, parallel=True),
            dict(),
        ):
            out, ref = _both(x, packed, scale, bias, out_dtype=out_dtype, **common, **kw)
            _assert_equal(out, ref, f"{x_dtype} -> {out_dtype} {list(kw)}")
    out, ref = _both(x, packed, scale, None, decay=decay, threshold=threshold, spike_bits=4)
    _assert_equal(out, ref, f"{x_dtype} codes")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_float_spikes_currents_within_fp32_summation_bound(x_dtype):
    """Arbitrary spikes: both paths sum K terms in fp32 in different orders. Against the fp64
    oracle each is within |scale| * K * u * conv(|x|, |W|) (the fp32 summation bound, u = 2^-24)
    plus one rounding each for the scale multiply and the bias add."""
    T, C_in, C_out = 2, 9, 13
    packed = _packed(C_out, C_in, (3, 3), 2)
    x = (torch.rand(T, 2, C_in, 5, 6, device=DEV) * 3).to(x_dtype)
    g = torch.Generator().manual_seed(5)
    scale = (torch.rand(T, C_out, generator=g) + 0.1).to(DEV)
    bias = torch.randn(C_out, generator=g).to(DEV)
    w = decode_ref(packed.words, packed.K).double().reshape(packed.shape)
    x64 = x.double().reshape(T * 2, C_in, 5, 6)
    conv = F.conv2d(x64, w, padding=1).reshape(T, 2, C_out, 5, 6)
    absconv = F.conv2d(x64.abs(), w.abs(), padding=1).reshape(T, 2, C_out, 5, 6)
    s64 = scale.double()[:, None, :, None, None]
    b64 = bias.double()[None, None, :, None, None]
    y64 = conv * s64 + b64
    bound = s64 * packed.K * U32 * absconv + 2 * U32 * (s64 * absconv + b64.abs()) + 1e-30
    for impl in ("triton", "reference"):
        y = binary_conv_neuron(x, packed, scale, bias, padding=1, impl=impl)
        assert y.dtype == torch.float32
        err = (y.double() - y64).abs()
        assert (err <= bound).all(), f"{impl}: worst error/bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("mode", ["native", "tf32_split"])
def test_nan_and_inf_spikes(monkeypatch, mode):
    """NaN propagates to float outputs (and its window) and codes it as 0; +inf is the top code.

    "tf32_split" forces, in the interpreter, the split fp32 dot the GPU uses (where inf - inf once
    made every +inf a NaN, so code 0, on the H200)."""
    if mode == "tf32_split":
        if DEV != "cpu":
            pytest.skip("the GPU uses the split for fp32 spikes on its own")
        import empf_triton.kernels.binary_conv as kc

        monkeypatch.setattr(kc, "dot_mode", lambda x_dtype, in_bits, interpret: kc.DOT_TF32_SPLIT)
    T, C_in, C_out = 2, 3, 17
    packed = _packed(C_out, C_in, (1, 1), 1)
    # spikes on a 1/16 grid: exact in tf32, so the split dot is exact and outputs compare equal
    x = torch.randint(0, 17, (T, 1, C_in, 4, 4), device=DEV) / 16
    x[0, 0, 1, 2, 3] = float("nan")
    x[1, 0, 0, 0, 0] = float("inf")
    scale = torch.ones(C_out, device=DEV)
    decay, threshold = _neuron(T, C_out)
    for kw in (dict(spike_bits=4), dict(spike_bits=None), dict(spike_bits=3, parallel=True)):
        kw = dict(kw, threshold=threshold, decay=None if kw.get("parallel") else decay)
        out, ref = _both(x, packed, scale, None, **kw)
        if out.is_floating_point():
            assert torch.equal(out.isnan(), ref.isnan()) and out[0, 0, :, 2, 3].isnan().all()
            fin = ~ref.isnan()
            assert torch.equal(out[fin], ref[fin])
        else:
            _assert_equal(out, ref, str(kw))
            assert (out[0, 0, :, 2, 3] == 0).all()
            top = 2 ** kw["spike_bits"] - 1
            at_inf = out[1, 0, :, 0, 0]  # +inf or -inf, by the channel's weight sign
            assert ((at_inf == 0) | (at_inf == top)).all() and (at_inf == top).any()


# ---------------------------------------------------------------------- unfused path, public API


def test_matches_unfused_fold_dense_conv_empf_neuron():
    """fold (dense ±α weight) -> F.conv2d -> empf_neuron (scalar λ, θ) gives the same codes."""
    T, N, C_in, C_out = 3, 2, 6, 10
    g = torch.Generator().manual_seed(7)
    w = torch.randn(C_out, C_in, 3, 3, generator=g)
    packed = pack_weight(w, 1, impl="reference").to(DEV)
    # Folded BN scale and bias on a power-of-two grid, so both paths are exact.
    scale = (torch.randint(1, 5, (C_out,), generator=g).float() / 4).to(DEV)
    bias = (torch.randint(-4, 5, (C_out,), generator=g).float() / 8).to(DEV)
    x = torch.randint(0, 16, (T, N, C_in, 8, 8), dtype=torch.uint8, generator=g).to(DEV)
    lam, theta = 0.5, 0.8  # θ off the 1/32 grid of the currents
    fused = binary_conv_neuron(
        x,
        packed,
        scale,
        bias,
        stride=2,
        padding=1,
        in_step=0.25,
        decay=torch.full((T, C_out), lam, device=DEV),
        threshold=torch.full((T, C_out), theta, device=DEV),
        spike_bits=4,
        spike_step=0.25,
        impl="triton",
    )
    sign = unpack_weight(packed, torch.float32) / packed.scale[:, None, None, None]
    w_fold = sign * scale[:, None, None, None]
    spikes_in = x.float().reshape(T * N, C_in, 8, 8) * 0.25
    y = F.conv2d(spikes_in, w_fold, bias, stride=2, padding=1)
    y = y.reshape(T, N, *y.shape[1:])
    spikes, _ = empf_neuron(y, decay=lam, threshold=theta, spike_bits=4, spike_step=0.25)
    unfused = torch.round(spikes / 0.25).to(torch.uint8)
    assert fused.max() > 0
    assert torch.equal(fused, unfused)


def test_auto_runs_triton_on_cuda_and_the_reference_on_cpu(monkeypatch):
    import empf_triton.ops.binary_conv as op

    calls = []
    real_ref = op.binary_conv_neuron_ref
    monkeypatch.setattr(
        op, "binary_conv_neuron_ref", lambda *a, **k: calls.append(1) or real_ref(*a, **k)
    )
    packed = _packed(4, 3, (3, 3), 1)
    x = torch.randint(0, 4, (2, 1, 3, 5, 5), dtype=torch.uint8, device=DEV)
    scale, bias = _params(2, 4, per_step=False, bias=True)
    a = binary_conv_neuron(x, packed, scale, bias, in_step=1.0)
    assert len(calls) == (0 if DEV == "cuda" else 1)
    r = binary_conv_neuron_ref(x, packed, scale, bias, in_step=1.0)
    assert torch.equal(a, r)


def test_empty_batch():
    packed = _packed(4, 3, (3, 3), 1)
    x = torch.zeros(2, 0, 3, 5, 5, dtype=torch.uint8, device=DEV)
    scale, _ = _params(2, 4, per_step=False, bias=False)
    for impl in ("triton", "reference"):
        out = binary_conv_neuron(x, packed, scale, None, in_step=1.0, impl=impl)
        assert out.shape == (2, 0, 4, 3, 3)


# ------------------------------------------------------------------------------------ no autograd


def test_requires_grad_raises_and_no_grad_runs():
    packed = _packed(4, 3, (3, 3), 1)
    x = torch.rand(1, 1, 3, 5, 5, device=DEV)
    scale = torch.ones(4, device=DEV, requires_grad=True)
    for impl in ("triton", "reference"):
        with pytest.raises(ValueError, match="inference only"):
            binary_conv_neuron(x, packed, scale, None, impl=impl)
        with pytest.raises(ValueError, match="inference only"):
            binary_conv_neuron(x.requires_grad_(), packed, scale.detach(), None, impl=impl)
        x = x.detach()
        with torch.no_grad():
            out = binary_conv_neuron(x, packed, scale, None, impl=impl)
        assert not out.requires_grad


# ---------------------------------------------------------------------------------------- bad input


def _good():
    T, C_in, C_out = 2, 4, 6
    return dict(
        x=torch.randint(0, 4, (T, 1, C_in, 5, 5), dtype=torch.uint8, device=DEV),
        packed=_packed(C_out, C_in // 2, (3, 3), 1),
        scale=torch.ones(C_out, device=DEV),
        bias=None,
        groups=2,
        in_step=0.25,
        decay=torch.full((T, C_out), 0.5, device=DEV),
        threshold=torch.full((T, C_out), 0.5, device=DEV),
    )


_C = 6
BAD = [
    ("x", [1, 2], TypeError, "x must be a torch.Tensor"),
    ("x", torch.zeros(2, 1, 4, 5, 5, dtype=torch.int32), TypeError, "x must have dtype"),
    ("x", torch.zeros(2, 4, 5, 5, dtype=torch.uint8), ValueError, r"\[T, N, C_in, H, W\]"),
    ("x", torch.zeros(0, 1, 4, 5, 5, dtype=torch.uint8), ValueError, "T >= 1"),
    ("x", torch.zeros(2, 1, 6, 5, 5, dtype=torch.uint8), ValueError, "input channels per group"),
    ("x", torch.zeros(2, 1, 4, 2, 5, dtype=torch.uint8), ValueError, "larger than the padded"),
    ("packed", torch.zeros(6, 2, 3, 3), TypeError, "PackedWeight"),
    ("groups", 3, ValueError, "groups must be >= 1 and divide"),
    ("groups", 0, ValueError, "groups must be >= 1"),
    ("groups", 2.0, TypeError, "groups must be an int"),
    ("stride", 0, ValueError, "stride must be >= 1"),
    ("stride", (1, 2, 3), TypeError, "stride must be an int or a pair"),
    ("padding", -1, ValueError, "padding must be >= 0"),
    ("padding", 1.5, TypeError, "padding must be an int"),
    ("in_step", None, ValueError, "in_step is required"),
    ("in_step", 0.0, ValueError, "in_step must be a finite float > 0"),
    ("in_step", float("inf"), ValueError, "in_step must be a finite"),
    ("in_step", "0.25", TypeError, "in_step must be a float"),
    ("in_step", 1e-50, ValueError, "finite and > 0 in fp32"),
    ("in_step", 1e39, ValueError, "finite and > 0 in fp32"),
    ("in_step", 10**400, ValueError, "finite and > 0 in fp32"),  # was an OverflowError
    ("in_bits", 0, ValueError, "in_bits must be in 1..8"),
    ("in_bits", 9, ValueError, "in_bits must be in 1..8"),
    ("in_bits", 4.0, TypeError, "in_bits must be an int"),
    ("scale", None, TypeError, "scale must be a torch.Tensor"),
    ("scale", torch.ones(_C + 1), ValueError, "scale must have shape"),
    ("scale", torch.ones(3, _C), ValueError, "scale must have shape"),
    ("scale", torch.ones(_C, dtype=torch.int32), TypeError, "scale must be a floating"),
    ("bias", torch.ones(1, _C), ValueError, "bias must have shape"),
    ("bias", [0.0] * _C, TypeError, "bias must be a torch.Tensor or None"),
    ("decay", torch.full((_C,), 0.5), ValueError, r"decay must have shape \[T, C_out\]"),
    ("decay", None, ValueError, "decay is required"),
    ("threshold", torch.full((2, _C + 1), 0.5), ValueError, "threshold must have shape"),
    ("threshold", torch.ones(2, _C, dtype=torch.int64), TypeError, "threshold must be a floating"),
    ("threshold", None, ValueError, "threshold is None"),
    ("parallel", True, ValueError, "parallel neuron is stateless"),
    ("parallel", 1, TypeError, "parallel must be a bool"),
    ("spike_bits", 9, ValueError, "spike_bits must be in"),
    ("spike_bits", 2.0, TypeError, "spike_bits must be an int"),
    ("spike_step", 0.0, ValueError, "spike_step must be finite and > 0"),
    ("spike_step", 10**400, ValueError, "spike_step must be finite and > 0"),
    ("out_dtype", torch.float64, TypeError, "out_dtype must be one of"),
    ("out_dtype", torch.uint8, TypeError, "out_dtype must be one of"),
    ("impl", "cuda", ValueError, "impl must be one of"),
    ("packed", _packed(0, 2, (3, 3), 1), ValueError, "non-empty conv weight"),  # C_out = 0
    ("packed", _packed(6, 0, (3, 3), 1), ValueError, "non-empty conv weight"),  # C_in = 0
]


@pytest.mark.parametrize(
    "name,value,exc,match", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_bad_input_raises(name, value, exc, match):
    kw = _good()
    kw[name] = value.to(DEV) if isinstance(value, torch.Tensor) else value
    if name == "threshold" and value is None:
        kw["decay"] = torch.full((2, _C), 0.5, device=DEV)  # decay without a threshold
    args = [kw.pop(k) for k in ("x", "packed", "scale", "bias")]
    impls = ("reference",) if name == "impl" else ("triton", "reference")
    for impl in impls:
        kwargs = dict(kw, impl=impl) if name != "impl" else kw
        with pytest.raises(exc, match=match):
            binary_conv_neuron(*args, **kwargs)


def test_bad_combinations_raise():
    kw = _good()
    x, packed, scale = kw["x"], kw["packed"], kw["scale"]
    common = dict(groups=2, in_step=0.25)
    with pytest.raises(ValueError, match="spike_bits needs a neuron"):
        binary_conv_neuron(x, packed, scale, None, spike_bits=4, **common)
    with pytest.raises(ValueError, match="only for uint8 code inputs"):
        binary_conv_neuron(x.float(), packed, scale, None, groups=2, in_step=0.25)
    with pytest.raises(ValueError, match="only for uint8 code inputs"):
        binary_conv_neuron(x.float(), packed, scale, None, groups=2, in_bits=4)
    with pytest.raises(TypeError, match="x must have dtype"):
        binary_conv_neuron(x.double(), packed, scale, None, groups=2, impl="triton")
    linear = pack_weight(torch.randn(6, 18), 1, impl="reference").to(DEV)
    with pytest.raises(ValueError, match="conv weight"):
        binary_conv_neuron(x, linear, scale, None, **common)
    big = pack_weight(torch.randn(2, MAX_CODE_K + 1, 1, 1), 1, impl="reference").to(DEV)
    xb = torch.zeros(1, 1, MAX_CODE_K + 1, 1, 1, dtype=torch.uint8, device=DEV)
    with pytest.raises(ValueError, match="K = C_in/groups"):
        binary_conv_neuron(xb, big, torch.ones(2, device=DEV), None, in_step=1.0)
    # Device mismatches (a meta tensor stands in for another device on a CPU-only machine).
    other = "cpu" if DEV == "cuda" else "meta"
    for impl in ("triton", "reference"):
        with pytest.raises(ValueError, match="packed weight is on"):
            binary_conv_neuron(x, packed.to(other), scale, None, impl=impl, **common)
        with pytest.raises(ValueError, match="scale is on"):
            binary_conv_neuron(x, packed, scale.to(other), None, impl=impl, **common)
        th = kw["threshold"].to(other)
        with pytest.raises(ValueError, match="threshold is on"):
            binary_conv_neuron(x, packed, scale, None, threshold=th, parallel=True, **common)


# -------------------------------------------------------------------------------- sm_90 compilation


def test_kernel_variants_compile_for_sm90():
    """Every constexpr variant of the fused kernel compiles for Hopper (tests/gpu_compile.py)."""
    pytest.importorskip("triton")
    script = Path(__file__).with_name("gpu_compile.py")
    env = {**os.environ, "TRITON_INTERPRET": "0", "EMPF_AUTOTUNE": "1"}
    out = subprocess.run(
        [sys.executable, str(script), "binary_conv"],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK:" in out.stdout


def test_plan_options_are_binary_conv_neurons_keyword_defaults():
    import inspect

    from empf_triton.ops.binary_conv import PLAN_OPTIONS, binary_conv_neuron_plan

    params = inspect.signature(binary_conv_neuron).parameters.values()
    kw = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert kw == PLAN_OPTIONS
    with pytest.raises(TypeError, match="unknown options"):
        binary_conv_neuron_plan(torch.zeros(1, 1, 1, 3, 3), None, None, None, strides=2)


def test_plan_runs_the_checked_call_on_new_inputs(device):
    """`binary_conv_neuron_plan` checks like `binary_conv_neuron` (the same errors) and its
    `run(x2)` gives `binary_conv_neuron(x2, ...)` exactly, on both paths."""
    from empf_triton.ops.binary_conv import binary_conv_neuron_plan

    torch.manual_seed(0)
    w = pack_weight(torch.randn(5, 3, 3, 3, device=device), 1)
    opts = dict(
        padding=1, in_step=0.25, decay=torch.full((2, 5), 0.5, device=device),
        threshold=torch.full((2, 5), 0.6, device=device), spike_bits=4,
    )  # fmt: skip
    scale, bias = torch.rand(5, device=device), torch.rand(5, device=device)
    x = torch.randint(0, 16, (2, 1, 3, 6, 6), dtype=torch.uint8, device=device)
    for impl in ("reference", "triton"):
        run = binary_conv_neuron_plan(x, w, scale, bias, impl=impl, **opts)
        for _ in range(2):
            x2 = torch.randint(0, 16, x.shape, dtype=torch.uint8, device=device)
            expected = binary_conv_neuron(x2, w, scale, bias, impl=impl, **opts)
            assert torch.equal(run(x2), expected), impl
    with pytest.raises(ValueError, match="in_step"):
        binary_conv_neuron_plan(x, w, scale, bias, **dict(opts, in_step=None))


# ------------------------------------------------------------------------------------ residual join


def _grid_residual(shape, dtype, seed):
    """Values on a 1/16 grid in [-2, 2]: exact in every float dtype, so sums stay exact."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(-32, 33, shape, generator=g).float() / 16).to(DEV, dtype)


@pytest.mark.parametrize("res_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("res_steps", ["T", "1"])
@pytest.mark.parametrize("geom", [GEOMS[0], GEOMS[1], GEOMS[4]], ids=["3x3", "s2p0", "dw"])
def test_residual_matches_reference(geom, res_steps, res_dtype):
    """`residual` is added to the currents before the neuron, per step or broadcast over T, in
    each float dtype: every output format equals the reference bit for bit (code inputs and a
    residual on a grid: exact sums), and the currents equal the unfused currents + residual."""
    C_in, C_out, k, stride, padding, groups, H, W = geom
    T = 3
    packed = _packed(C_out, C_in // groups, k, 1)
    decay, threshold = _neuron(T, C_out)
    scale, bias = _params(T, C_out, per_step=True, bias=True)
    x = torch.randint(0, 16, (T, 2, C_in, H, W), dtype=torch.uint8, device=DEV)
    common = dict(stride=stride, padding=padding, groups=groups, in_step=0.125, in_bits=4)
    plain = binary_conv_neuron(x, packed, scale, bias, impl="reference", **common)
    res = _grid_residual((T if res_steps == "T" else 1, *plain.shape[1:]), res_dtype, seed=3)
    cases = {
        "currents": dict(out_dtype=res_dtype),
        "codes": dict(decay=decay, threshold=threshold, spike_bits=4, spike_step=0.25),
        "parallel_float": dict(threshold=threshold, parallel=True),
    }
    for name, kw in cases.items():
        out, ref = _both(x, packed, scale, bias, residual=res, **common, **kw)
        _assert_equal(out, ref, name)
        without = binary_conv_neuron(x, packed, scale, bias, impl="reference", **common, **kw)
        assert not torch.equal(ref, without), f"{name}: the residual changed nothing"
    summed = (plain + res.float()).to(res_dtype)
    fused = binary_conv_neuron(
        x, packed, scale, bias, impl="triton", residual=res, out_dtype=res_dtype, **common
    )
    _assert_equal(fused, summed, "unfused sum")


def test_residual_any_layout_and_float_spikes():
    """A residual whose images are not contiguous (a channel slice, an expanded step) reads the
    same as its contiguous copy; float spike inputs take a residual too."""
    T, C_in, C_out = 2, 4, 6
    packed = _packed(C_out, C_in, (3, 3), 2)
    scale, bias = _params(T, C_out, per_step=False, bias=True)
    x = (torch.randint(0, 8, (T, 2, C_in, 5, 5)).float() / 8).to(DEV)
    wide = _grid_residual((T, 2, C_out + 3, 5, 5), torch.float32, seed=4)
    sliced = wide[:, :, 1 : C_out + 1]
    expanded = _grid_residual((1, 2, C_out, 5, 5), torch.float32, seed=5).expand(T, -1, -1, -1, -1)
    transposed = _grid_residual((T, 2, C_out, 5, 5), torch.float32, seed=7).transpose(-1, -2)
    assert not transposed[0, 0].is_contiguous()  # the launcher copies it to the kernel's layout
    for res in (sliced, expanded, transposed):
        for impl in ("triton", "reference"):
            got = binary_conv_neuron(x, packed, scale, bias, padding=1, residual=res, impl=impl)
            want = binary_conv_neuron(x, packed, scale, bias, padding=1,
                                      residual=res.contiguous(), impl="reference")  # fmt: skip
            _assert_equal(got, want, impl)


def test_bad_residual_raises():
    kw = _good()
    x, packed, scale = kw.pop("x"), kw.pop("packed"), kw.pop("scale")
    kw.pop("bias")
    shape = (2, 1, 6, 3, 3)  # [T, N, C_out, Ho, Wo] of _good()
    other = "cpu" if DEV == "cuda" else "meta"
    bad = [
        ([0.0], TypeError, "residual must be a torch.Tensor or None"),
        (torch.zeros(shape, dtype=torch.int32, device=DEV), TypeError, "residual must have dtype"),
        (torch.zeros(2, 1, 6, 3, 4, device=DEV), ValueError, r"residual must have shape"),
        (torch.zeros(3, 1, 6, 3, 3, device=DEV), ValueError, r"\[T or 1, N, C_out, Ho, Wo\]"),
        (torch.zeros(1, 6, 3, 3, device=DEV), ValueError, "residual must have shape"),
        (torch.zeros(shape, device=other), ValueError, "residual is on"),
    ]
    for res, exc, match in bad:
        for impl in ("triton", "reference"):
            with pytest.raises(exc, match=match):
                binary_conv_neuron(x, packed, scale, None, residual=res, impl=impl, **kw)
    with pytest.raises(TypeError, match="residual must have dtype"):
        binary_conv_neuron(x, packed, scale, None, residual=torch.zeros(shape, dtype=torch.float64,
                           device=DEV), impl="triton", **kw)  # fmt: skip
    res = torch.zeros(shape, device=DEV, requires_grad=True)
    with pytest.raises(ValueError, match="inference only"):
        binary_conv_neuron(x, packed, scale, None, residual=res, **kw)


def test_plan_with_a_residual_takes_each_calls_residual(device):
    """A plan made with a residual runs `run(x2, residual2)` as the op runs it, on both paths,
    also when the plan was made with x itself as the residual (the plan's slots are found by
    identity)."""
    from empf_triton.ops.binary_conv import binary_conv_neuron_plan

    torch.manual_seed(0)
    w = pack_weight(torch.randn(4, 4, 3, 3, device=device), 1)
    scale, bias = torch.rand(4, device=device), torch.rand(4, device=device)
    x = torch.rand(2, 1, 4, 5, 5, device=device)
    for impl in ("reference", "triton"):
        for res0 in (x, torch.rand(1, 1, 4, 5, 5, device=device)):
            run = binary_conv_neuron_plan(x, w, scale, bias, padding=1, residual=res0, impl=impl)
            for _ in range(2):
                x2, r2 = torch.rand_like(x), torch.rand_like(res0)
                want = binary_conv_neuron(x2, w, scale, bias, padding=1, residual=r2, impl=impl)
                assert torch.equal(run(x2, r2), want), impl


def test_plan_with_a_residual_whose_images_are_not_contiguous(device):
    """A plan made with a residual whose [C_out, Ho, Wo] images are not contiguous (a transposed
    view) copies each call's residual to the layout the kernel reads, as the op does: it read
    it as if contiguous before (a silent wrong answer on the Triton path)."""
    from empf_triton.ops.binary_conv import binary_conv_neuron_plan

    torch.manual_seed(0)
    x = torch.rand(2, 1, 2, 5, 5, device=device)
    w = pack_weight(torch.randn(3, 2, 3, 3, device=device), 1)
    scale, bias = torch.ones(3, device=device), torch.zeros(3, device=device)
    res = torch.randn(2, 1, 3, 3, 3, device=device).transpose(3, 4)
    assert not res[0, 0].is_contiguous()
    want = binary_conv_neuron(x, w, scale, bias, residual=res, impl="reference")
    for impl in ("reference", "triton"):
        run = binary_conv_neuron_plan(x, w, scale, bias, residual=res, impl=impl)
        torch.testing.assert_close(run(x, res), want, rtol=1e-5, atol=1e-5)
        r2 = torch.randn(2, 1, 3, 3, 3, device=device).transpose(3, 4)
        want2 = binary_conv_neuron(x, w, scale, bias, residual=r2, impl="reference")
        torch.testing.assert_close(run(x, r2), want2, rtol=1e-5, atol=1e-5)


def test_nan_and_inf_in_the_residual():
    """A NaN in the residual makes that current NaN (code 0 where codes are written, as for a
    NaN spike); +inf and -inf give the top code and 0. Both paths agree."""
    T, C_in, C_out = 2, 3, 5
    packed = _packed(C_out, C_in, (1, 1), 1)
    x = torch.randint(0, 4, (T, 1, C_in, 3, 3), dtype=torch.uint8, device=DEV)
    res = _grid_residual((T, 1, C_out, 3, 3), torch.float32, seed=6)
    res[0, 0, 1, 1, 1] = float("nan")
    res[1, 0, 2, 0, 0] = float("inf")
    res[1, 0, 3, 2, 2] = float("-inf")
    scale = torch.ones(C_out, device=DEV)
    decay, threshold = _neuron(T, C_out)
    common = dict(in_step=0.25, residual=res)
    cur, cur_ref = _both(x, packed, scale, None, **common)
    assert torch.equal(cur.isnan(), cur_ref.isnan()) and cur[0, 0, 1, 1, 1].isnan()
    assert torch.equal(cur.nan_to_num(0.0), cur_ref.nan_to_num(0.0))
    codes, codes_ref = _both(x, packed, scale, None, decay=decay, threshold=threshold,
                             spike_bits=4, **common)  # fmt: skip
    _assert_equal(codes, codes_ref, "codes")
    assert codes[0, 0, 1, 1, 1] == 0 and codes[1, 0, 2, 0, 0] == 15 and codes[1, 0, 3, 2, 2] == 0


def test_fired_membrane_is_exactly_the_threshold():
    """The fused neuron keeps v = min(m, θ) (docs/model.md §1), as `empf_neuron` does: after a
    current of 1e8 or +inf at t = 0 the membrane is θ, not 1e8 - fl(1e8 - θ) = 0 or inf - inf =
    NaN, so step 1 fires as the unfused neuron does (and is finite)."""
    T, N, C_in, C_out = 2, 2, 3, 6
    packed = _packed(C_out, C_in, (3, 3), 1)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 16, (T, N, C_in, 5, 5), dtype=torch.uint8, generator=g).to(DEV)
    scale = torch.full((T, C_out), 0.125, device=DEV)
    bias = torch.zeros(T, C_out, device=DEV)
    bias[0, 1], bias[0, 2] = 1e8, float("inf")
    decay = torch.full((T, C_out), 0.5, device=DEV)
    threshold = torch.full((T, C_out), 0.8125, device=DEV)  # exact products with the 1/32 grid
    cur = binary_conv_neuron(x, packed, scale, bias, padding=1, in_step=0.25, impl="reference")
    want, _ = empf_neuron(cur, decay=decay, threshold=threshold, impl="reference")
    assert torch.isfinite(want[1]).all() and (want[1, :, 1:3] > 0).any()
    for impl in ("triton", "reference"):
        out = binary_conv_neuron(x, packed, scale, bias, padding=1, in_step=0.25, decay=decay,
                                 threshold=threshold, impl=impl)  # fmt: skip
        assert torch.equal(out, want), impl
