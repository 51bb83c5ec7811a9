"""Binary / ternary synapse ops: quantisers, packing, the packed GEMM (docs/model.md §4)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DTYPES,
    assert_close_to_oracle,
    assert_same_quantization,
    assert_within_gemm_bound,
    fresh_launch_caches,
    gemm_error_bound,
    stat_rtol,
)

import empf_triton.ops._common as ops_common
import empf_triton.ops.binary as ops_binary
from empf_triton.ops._common import TritonUnavailableError
from empf_triton.ops.binary import (
    PackedWeight,
    binarize,
    binary_auto_choice,
    binary_linear,
    binary_matmul,
    pack_weight,
    ternarize,
    unpack_weight,
)
from empf_triton.reference.binary import (
    binary_linear_ref,
    binary_matmul_ref,
    unpack_weight_ref,
)


def _oracle_matmul(x, packed, bias, g):
    """fp64 forward and gradients of x @ unpack(p).T + bias."""
    x64 = x.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    w64 = unpack_weight_ref(packed.words, packed.scale, packed.K, torch.float64)
    y = F.linear(x64, w64.reshape(packed.N, packed.K), b64)
    grads = torch.autograd.grad(y, [t for t in (x64, b64) if t is not None], g.double())
    return y, grads[0], grads[1] if bias is not None else None


# Relative error of one product inside the GEMM kernels (kernels/binary.py, "Dot precision"): the
# weights are ±1 (exact) times the activation operand, which is exact for fp16/bf16 activations
# in the forward; fp32 activations use two tf32 passes (<= 2^-21). The input-gradient kernel
# multiplies the gradient by the row scale in fp32 first (one fp32 rounding, 2^-24) and then uses
# one tf32 pass for 16-bit gradients (<= 2^-11) or two for fp32 (<= 2^-21). The interpreter's
# `ieee` dots are exact, so these bounds hold there too.
def _product_u(dtype, direction: str) -> float:
    if direction == "forward":
        return 2.0**-21 if dtype == torch.float32 else 0.0
    return 2.0**-24 + (2.0**-21 if dtype == torch.float32 else 2.0**-11)


def _check_gemm(x, packed, bias, g, out, gx, dtype):
    """out = x @ W^T + b and grad_x = g @ W, each output within its own rounding bound."""
    w = unpack_weight_ref(packed.words, packed.scale, packed.K, torch.float64)
    w = w.reshape(packed.N, packed.K)
    a = x.detach().reshape(-1, packed.K).double()
    b = w.T
    if bias is not None:  # the bias as one more term of the sum: a column of ones times b
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
        b = torch.cat([b, bias.detach().double()[None]], 0)
    exact, bound = gemm_error_bound(a, b, dtype, product_u=_product_u(dtype, "forward"))
    assert_within_gemm_bound("out", out.reshape(exact.shape), exact, bound)
    exact, bound = gemm_error_bound(
        g.reshape(-1, packed.N), w, dtype, product_u=_product_u(dtype, "backward")
    )
    assert_within_gemm_bound("grad_x", gx.reshape(exact.shape), exact, bound)


def _weight(N, K, device, dtype=torch.float32, scale=0.7):
    return (torch.randn(N, K, device=device) * scale).to(dtype)


# -------------------------------------------------------------------------------- binarize / STE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (63, 17), (1, 4097), (4, 3, 3, 3)])
def test_binarize_matches_reference_and_formula(device, dtype, shape):
    w = (torch.randn(shape, device=device) * 0.8).to(dtype)
    w.view(-1)[0] = 0.0  # sign(0) = +1
    if w.numel() > 1:
        w.view(-1)[1] = -0.0
    alpha = w.float().abs().reshape(shape[0], -1).mean(1).reshape(-1, *[1] * (w.dim() - 1))
    expected = torch.where(w >= 0, alpha, -alpha).to(dtype)
    ref = binarize(w, impl="reference")
    out = binarize(w, impl="triton")
    assert torch.equal(ref, expected)
    # the kernel sums |w| in its own fixed order: the same signs, α equal up to rounding
    K = w[0].numel()
    assert_same_quantization(out, expected, K)
    mag = out.abs().reshape(shape[0], K)
    assert torch.equal(mag, mag[:, :1].expand_as(mag))  # one α per row
    assert (out.reshape(-1)[:2] >= 0).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant", [binarize, ternarize])
def test_clipped_ste_gradient(device, dtype, quant):
    w = (torch.randn(7, 63, device=device) * 1.2).to(dtype)
    w[0, :4] = torch.tensor([1.0, -1.0, 1.0078125, -1.0078125], dtype=dtype)  # |w| = 1 passes
    g = torch.randn(7, 63, device=device).to(dtype)
    expected = torch.where(w.abs() <= 1, g, torch.zeros_like(g))
    for impl in ("reference", "triton"):
        wr = w.clone().requires_grad_()
        (gw,) = torch.autograd.grad(quant(wr, impl=impl), wr, g)
        # α is detached: the gradient is exactly g, masked, with no α-term
        assert torch.equal(gw, expected), impl
    assert torch.equal(expected[0, :4] != 0, torch.tensor([True, True, False, False]).to(device))


# ------------------------------------------------------------------------------------- ternarize


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (7, 9), (17, 100), (1, 4097), (6, 2, 3, 3)])
def test_ternarize_matches_twn_rule(device, dtype, shape):
    w = (torch.randn(shape, device=device) * 0.9).to(dtype)
    wc = w.float().clamp(-1, 1)
    delta = 0.7 * wc.abs().mean()
    big = wc.abs() > delta
    alpha = wc.abs()[big].mean() if big.any() else torch.zeros(())
    pattern = (wc > delta).to(torch.int8) - (wc < -delta).to(torch.int8)
    ref = ternarize(w, impl="reference")
    out = ternarize(w, impl="triton")
    assert_same_quantization(out, ref, w.numel())
    for q in (ref, out):
        assert torch.equal(torch.sign(q).to(torch.int8), pattern)
        nz = q[pattern != 0].float().abs()
        if nz.numel():  # one α for the whole layer, equal to mean(|Wc| > Δ) up to rounding
            assert torch.all(nz == nz[0])
            torch.testing.assert_close(
                nz[0], alpha.to(dtype).float(), rtol=2 * torch.finfo(dtype).eps, atol=0
            )


def test_ternarize_all_zero_weight_is_zero(device):
    w = torch.zeros(5, 7, device=device)
    for impl in ("reference", "triton"):
        out = ternarize(w, impl=impl)
        assert torch.equal(out, torch.zeros_like(w)), impl
        p = pack_weight(w, 2, impl=impl)
        assert torch.equal(unpack_weight(p, impl=impl).reshape(5, 7), torch.zeros_like(w)), impl


# ----------------------------------------------------------------------------------- pack/unpack


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("N", [1, 17, 64])
@pytest.mark.parametrize("K", [1, 31, 32, 33, 100, 1000])
def test_pack_unpack_round_trip(device, bits, N, K):
    w = _weight(N, K, device)
    quant = binarize if bits == 1 else ternarize
    expected = quant(w, impl="reference")
    pr = pack_weight(w, bits, impl="reference")
    pt = pack_weight(w, bits, impl="triton")
    assert pr.words.shape == (bits, N, -(-K // 32)) and pr.words.dtype == torch.int32
    assert torch.equal(pr.words, pt.words)
    # Each path's scale against the formula (docs/model.md, §4), computed here in fp64.
    w64 = w.double()
    if bits == 1:  # α_c = mean |W| over each output channel
        alpha = w64.abs().mean(1)
    else:  # clip to [-1, 1]; Δ = 0.7 mean|W| (layer); α = mean(|W| where |W| > Δ)
        a = w64.clamp(-1, 1).abs()
        alpha = a[a > 0.7 * a.mean()].mean().expand(N)
    for packed in (pr, pt):
        rtol = stat_rtol(K if bits == 1 else N * K, torch.float32)
        torch.testing.assert_close(packed.scale.double(), alpha, rtol=rtol, atol=0)
    assert (pr.K, pr.bits, pr.shape) == (K, bits, (N, K))
    # unpack(pack(w)) is Q(w) exactly on each path (each packs with its own statistics)
    assert torch.equal(unpack_weight(pr, impl="reference"), expected)
    assert torch.equal(unpack_weight(pt, impl="triton"), quant(w, impl="triton"))
    assert_same_quantization(unpack_weight(pt, impl="triton"), expected, K if bits == 1 else N * K)
    if K % 32:  # padding bits are zero
        tail = pr.words[..., -1].to(torch.int64) & ~((1 << (K % 32)) - 1) & 0xFFFFFFFF
        assert not tail.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("N", "K"), [(3, 1), (5, 31), (2, 64), (3, 2100), (2, 4127)])
def test_fused_binary_pack_equals_stats_then_pack(device, dtype, N, K):
    """The one-launch binary pack (row statistics and sign bits in one kernel, as `binary_linear`
    packs on every training call) gives the words and scale of the two-kernel path and the
    reference's words, over several row blocks (K > 2048), padding bits, zeros (sign +1) and a
    NaN row."""
    from empf_triton.kernels import binary as kb
    from empf_triton.reference.binary import pack_weight_ref

    w = (torch.randn(N, K, device=device) * 0.5).to(dtype)
    w[0, : min(K, 5)] = 0.0
    if N > 2:
        w[2, K // 2] = float("nan")
    words, scale = kb.pack_with_stats(w, 1)
    s2, delta = kb.weight_stats(w, 1)
    assert delta is None
    assert torch.equal(words, kb.pack(w, None))
    torch.testing.assert_close(scale, s2, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(words, pack_weight_ref(w, 1)[0])
    assert words.shape == (1, N, -(-K // 32)) and words.dtype == torch.int32
    if N > 2:
        assert torch.isnan(scale[2]) and not torch.isnan(scale[:2]).any()


def test_pack_bit_layout(device):
    # element k of row n is bit k % 32 of word k // 32; bit set = +1
    w = -torch.ones(2, 33, device=device)
    w[0, 0] = 1.0
    w[0, 31] = 0.0  # sign(0) = +1 -> bit 31 (the int32 sign bit)
    w[1, 32] = 2.0
    for impl in ("reference", "triton"):
        p = pack_weight(w, 1, impl=impl)
        assert p.words[0].tolist() == [[1 - 2**31, 0], [0, 1]], impl


@pytest.mark.parametrize("dtype", DTYPES)
def test_pack_4d_and_dtypes(device, dtype):
    w = (torch.randn(6, 3, 3, 3, device=device) * 0.5).to(dtype)
    for bits, quant in ((1, binarize), (2, ternarize)):
        p = pack_weight(w, bits, impl="triton")
        assert p.shape == (6, 3, 3, 3) and p.K == 27
        assert torch.equal(unpack_weight(p, dtype, impl="triton"), quant(w, impl="triton"))
        assert torch.equal(unpack_weight(p, dtype, impl="reference"), quant(w, impl="triton"))
        n = 27 if bits == 1 else w.numel()
        assert_same_quantization(quant(w, impl="triton"), quant(w, impl="reference"), n)


def test_pack_non_contiguous_weight(device):
    base = _weight(40, 17, device)
    w = base.t()  # [17, 40], non-contiguous
    for bits in (1, 2):
        assert torch.equal(
            pack_weight(w, bits, impl="triton").words,
            pack_weight(w.contiguous(), bits, impl="reference").words,
        )


def test_packed_weight_nbytes_and_rows(device):
    p = pack_weight(_weight(64, 100, device), 1)
    assert p.nbytes == 64 * 4 * 4 + 64 * 4
    r = p.rows(16, 48)
    assert r.shape == (32, 100) and torch.equal(r.words, p.words[:, 16:48])
    p2 = pack_weight(_weight(64, 100, device), 2)
    assert p2.nbytes == 2 * 64 * 4 * 4 + 64 * 4


# ---------------------------------------------------------------------------------- packed GEMM

GEMM_SHAPES = [(1, 17, 300), (5, 64, 33), (64, 17, 100), (130, 64, 70)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("M,N,K", GEMM_SHAPES)
def test_binary_matmul_vs_reference(device, dtype, bits, M, N, K):
    packed = pack_weight(_weight(N, K, device), bits)
    x = torch.randn(M, K, device=device).to(dtype).requires_grad_()
    bias = torch.randn(N, device=device).to(dtype).requires_grad_() if M != 64 else None
    params = [t for t in (x, bias) if t is not None]
    g = torch.randn(M, N, device=device).to(dtype)

    out = binary_matmul(x, packed, bias, impl="triton")
    grads = torch.autograd.grad(out, params, g)
    ref = binary_matmul(x, packed, bias, impl="reference")
    ref_grads = torch.autograd.grad(ref, params, g)
    _, _, o_gb = _oracle_matmul(x, packed, bias, g)

    assert out.dtype == dtype and grads[0].dtype == dtype
    _check_gemm(x, packed, bias, g, out, grads[0], dtype)
    if bias is not None:
        assert_close_to_oracle("grad_bias", grads[1], ref_grads[1], o_gb)


def _count_launches(monkeypatch):
    """Record the name of every kernel launch (interpreter or GPU) made through the launchers."""
    k = pytest.importorskip("empf_triton.kernels.binary")
    launched = []
    for key, tuner in k._TUNERS.items():
        orig = tuner.run

        def run(*args, _orig=orig, _key=key, **kwargs):
            launched.append(_key)
            return _orig(*args, **kwargs)

        monkeypatch.setattr(tuner, "run", run)
    return launched


@pytest.mark.parametrize(("M", "family"), [(1, "gemv"), (5, "small"), (17, "large")])
def test_gemm_is_one_launch_per_direction(device, monkeypatch, M, family):
    # small M used to run split-K plus a reduction launch; now one program per output tile
    # loops over all of K: one launch forward, one for the input gradient, deterministic
    launched = _count_launches(monkeypatch)
    N, K = 40, 1100
    packed = pack_weight(_weight(N, K, device), 1)
    x = torch.randn(M, K, device=device, requires_grad=True)
    bias = torch.randn(N, device=device)
    out = binary_matmul(x, packed, bias, impl="triton")
    assert launched == [(family, False)]
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert launched == [(family, False), (family, True)]
    again = binary_matmul(x, packed, bias, impl="triton")
    assert torch.equal(again, out)  # deterministic: fixed summation order
    w = unpack_weight(packed).double()
    tol = {"atol": 1e-4, "rtol": 1e-5}
    torch.testing.assert_close(out.double(), x.detach().double() @ w.T + bias.double(), **tol)
    torch.testing.assert_close(gx.double(), torch.ones(M, N, dtype=torch.float64) @ w, **tol)


def test_autotune_key_is_a_size_class():
    k = pytest.importorskip("empf_triton.kernels.binary")
    assert [k.m_class(m) for m in (0, 1, 2, 3, 17, 5000)] == [1, 1, 2, 4, 32, 4096]
    assert [k.size_class(n) for n in (1, 33, 64, 4097)] == [1, 64, 64, 8192]
    assert k.size_class(10**9) == k.CLASS_CAP
    assert k._KEY == ["M_CLASS", "P_CLASS", "R_CLASS"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("M", [1, 6, 33])
def test_gemm_error_bound(device, dtype, bits, M):
    """Forward and input gradient within the bound of their accumulation order.

    Products x·(±1) are exact; the kernels add them in fp32 (any order), then multiply by the
    scale and add the bias, each rounded in fp32, and round once to the output dtype. Recursive
    summation of K terms has |err| <= (K - 1)·u·Σ|x_k w_k| with u = eps32 / 2, so with the
    epilogue roundings (and the input gradient's g·scale rounding) |err| <= K·eps32·Σ|x_k||w_k|
    + |bias|·eps32 + u_out·|out|. The interpreter and the M = 1 GEMV multiply in fp32 exactly.
    On a GPU the tensor-core families (M > 1) add a per-product term: fp32 splits its operand
    into two tf32 parts (relative 2^-21); 16-bit forward operands are exact in fp16/tf32, but the
    input gradient's g·scale is rounded to tf32 for 16-bit dtypes (relative 2^-11).
    """
    N, K = 37, 1000
    packed = pack_weight(_weight(N, K, device), bits)
    x = torch.randn(M, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).to(dtype)
    g = torch.randn(M, N, device=device).to(dtype)
    xr = x.clone().requires_grad_()
    out = binary_matmul(xr, packed, bias, impl="triton")
    (gx,) = torch.autograd.grad(out, xr, g)
    w = unpack_weight(packed, torch.float64).reshape(N, K)
    x64, g64 = x.double(), g.double()
    oracle = x64 @ w.T + bias.double()
    oracle_gx = g64 @ w
    eps32 = torch.finfo(torch.float32).eps
    u_out = torch.finfo(dtype).eps / 2
    mma = x.is_cuda and M > 1
    tf32_split = 2.0**-21 if dtype == torch.float32 else 2.0**-11
    rel = K * eps32 + (2.0**-21 if mma and dtype == torch.float32 else 0.0)
    rel_gx = K * eps32 + (tf32_split if mma else 0.0)
    bound = rel * (x64.abs() @ w.abs().T) + bias.double().abs() * eps32 + u_out * oracle.abs()
    assert ((out.double() - oracle).abs() <= bound).all()
    bound_gx = rel_gx * (g64.abs() @ w.abs()) + u_out * oracle_gx.abs()
    assert ((gx.double() - oracle_gx).abs() <= bound_gx).all()


def test_non_contiguous_and_transposed_x(device):
    N, K, M = 33, 70, 9
    packed = pack_weight(_weight(N, K, device), 1)
    bias = torch.randn(N, device=device)
    x = torch.randn(M, K, device=device)
    expected = binary_matmul(x, packed, bias, impl="triton")
    x_t = x.t().contiguous().t()  # transposed storage, strides (1, M)
    assert not x_t.is_contiguous()
    assert torch.equal(binary_matmul(x_t, packed, bias, impl="triton"), expected)
    x_s = torch.randn(M, 2 * K, device=device)[:, ::2]
    x_s.copy_(x)
    assert torch.equal(binary_matmul(x_s, packed, bias, impl="triton"), expected)
    x3 = x.reshape(3, 3, K)
    out3 = binary_matmul(x3, packed, bias, impl="triton")
    assert out3.shape == (3, 3, N) and torch.equal(out3.reshape(M, N), expected)
    # gradient through the transposed input lands in the right place
    xg = x_t.clone().requires_grad_()
    (gx,) = torch.autograd.grad(binary_matmul(xg, packed, bias, impl="triton").sum(), xg)
    torch.testing.assert_close(gx, unpack_weight(packed).sum(0).expand(M, K))


def test_gradcheck_reference_fp64():
    packed = pack_weight(torch.randn(5, 7, dtype=torch.float64), 2)
    x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    fn = lambda x, b: binary_matmul_ref(x, packed.words, packed.scale, 7, b)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, b))
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    fn2 = lambda x, b: binary_linear_ref(x, w.detach(), b, 1)  # noqa: E731
    assert torch.autograd.gradcheck(fn2, (x, b))


# ----------------------------------------------------------------- training op (latent weights)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("M,N,K", [(1, 17, 300), (130, 64, 70)])
def test_binary_linear_vs_reference(device, dtype, bits, M, N, K):
    w = (torch.randn(N, K, device=device) * 0.8).requires_grad_()  # fp32 latent, some |w| > 1
    x = torch.randn(M, K, device=device).to(dtype).requires_grad_()
    b = torch.randn(N, device=device).to(dtype).requires_grad_()
    g = torch.randn(M, N, device=device).to(dtype)
    out = binary_linear(x, w, b, bits=bits, impl="triton")
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    ref = binary_linear(x, w, b, bits=bits, impl="reference")
    rx, rw, rb = torch.autograd.grad(ref, (x, w, b), g)

    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_()
    wq = (binarize if bits == 1 else ternarize)(w.detach(), impl="reference").double()
    o = x64 @ wq.T + b64
    ox, ob = torch.autograd.grad(o, (x64, b64), g.double())
    ow = (g.double().T @ x64.detach()) * (w64.detach().abs() <= 1)

    packed = pack_weight(w.detach(), bits, impl="reference")
    _check_gemm(x, packed, b, g, out, gx, dtype)
    assert_close_to_oracle("grad_bias", gb, rb, ob)
    assert gw.dtype == torch.float32
    scale = ow.abs().max().item()
    torch.testing.assert_close(
        gw.double(),
        ow,
        atol=4 * (rw.double() - ow).abs().max().item() + 8 * torch.finfo(dtype).eps * scale,
        rtol=0,
    )
    assert torch.equal(gw == 0, (w.abs() > 1) | (ow == 0))


def test_auto_rule(monkeypatch):
    assert binary_auto_choice(1, "cpu") == "reference"
    assert binary_auto_choice(10**6, "cpu") == "reference"
    # measured GPUs only (the H200's inference entry); training measured on none yet
    assert ops_binary.PACKED_MAX_M == {"NVIDIA H200": 256} and ops_binary.PACKED_MAX_M_TRAIN == {}
    monkeypatch.setattr(ops_binary, "_cuda_device_name", lambda index: "NVIDIA H200")
    assert binary_auto_choice(256, "cuda:0") == "triton"
    assert binary_auto_choice(257, "cuda:0") == "dense"
    monkeypatch.setattr(ops_binary, "_cuda_device_name", lambda index: "Some Other GPU")
    for M in (1, 16, 4096):  # a GPU nobody measured: dense (cuBLAS on ±α) at every M
        assert binary_auto_choice(M, "cuda:0") == "dense"
        assert binary_auto_choice(M, "cuda:0", training=True) == "dense"
    # a measured GPU: packed up to its entry, dense above; other GPUs stay dense
    monkeypatch.setattr(ops_binary, "_cuda_device_name", lambda index: f"GPU{index}")
    monkeypatch.setitem(ops_binary.PACKED_MAX_M, "GPU0", 64)
    monkeypatch.setitem(ops_binary.PACKED_MAX_M_TRAIN, "GPU0", 8)
    assert binary_auto_choice(1, "cuda:0") == "triton"
    assert binary_auto_choice(64, "cuda:0") == "triton"
    assert binary_auto_choice(65, "cuda:0") == "dense"
    assert binary_auto_choice(8, "cuda:0", training=True) == "triton"
    assert binary_auto_choice(9, "cuda:0", training=True) == "dense"
    assert binary_auto_choice(1, "cuda:1") == "dense"


def test_route_keeps_explicit_impl(device):
    x = torch.randn(3, 10, device=device)
    assert ops_binary._route("triton", 10**6, x) == "triton"
    assert ops_binary._route("reference", 1, x) == "reference"
    assert ops_binary._route("auto", 1, x) == ("dense" if x.is_cuda else "reference")


def test_auto_on_cpu_is_reference():
    packed = pack_weight(torch.randn(6, 10), 1)
    x = torch.randn(3, 10)
    assert torch.equal(binary_matmul(x, packed), binary_matmul(x, packed, impl="reference"))


# --------------------------------------------------------------------- robustness (issue 10)

IMPLS = ["reference", "triton"]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_weight_propagates_binary_per_row(device, impl, dtype):
    w = _weight(5, 40, device, dtype)
    w[2, 7] = float("nan")
    q = binarize(w, impl=impl)
    assert torch.isnan(q[2]).all()
    assert not torch.isnan(q[[0, 1, 3, 4]]).any()
    assert torch.equal(q[[0, 1, 3, 4]], binarize(w[[0, 1, 3, 4]], impl="reference"))
    p = pack_weight(w, 1, impl=impl)
    dense = unpack_weight(p, dtype, impl=impl)
    assert torch.equal(torch.isnan(dense), torch.isnan(q))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_weight_propagates_ternary_whole_layer(device, impl, dtype):
    # Δ and α are per layer: one NaN used to give an all-zero layer; now the layer is NaN
    w = _weight(5, 40, device, dtype)
    w[3, 1] = float("nan")
    assert torch.isnan(ternarize(w, impl=impl)).all()
    p = pack_weight(w, 2, impl=impl)
    assert torch.isnan(unpack_weight(p, dtype, impl=impl)).all()
    x = torch.randn(2, 40, device=device).to(dtype)
    assert torch.isnan(binary_matmul(x, p, impl=impl)).all()
    assert torch.isnan(binary_linear(x, w.float(), bits=2, impl=impl)).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_scale_gets_no_gradient_on_any_path(device, impl):
    p = pack_weight(_weight(6, 40, device), 1)
    scale = p.scale.clone().requires_grad_()
    p = PackedWeight(p.words, scale, p.shape, p.K, p.bits)
    x = torch.randn(3, 40, device=device, requires_grad=True)
    out = binary_matmul(x, p, impl=impl)
    out.sum().backward()
    assert scale.grad is None
    assert x.grad is not None
    alone = binary_matmul(x.detach(), p, impl=impl)  # only the constant scale requires grad
    assert not alone.requires_grad and alone.grad_fn is None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_k_zero_gives_bias(device, impl, bits, dtype):
    # K = 0: no inputs, the output is the bias (or zeros) and grad_x is empty
    p = pack_weight(torch.randn(4, 0, device=device), bits, impl=impl)
    assert p.words.shape == (bits, 4, 0) and torch.equal(p.scale, torch.zeros(4, device=device))
    x = torch.randn(3, 0, device=device).to(dtype).requires_grad_()
    bias = torch.randn(4, device=device).to(dtype).requires_grad_()
    out = binary_matmul(x, p, bias, impl=impl)
    assert torch.equal(out, bias.detach().expand(3, 4))
    gx, gb = torch.autograd.grad(out, (x, bias), torch.ones_like(out))
    assert gx.shape == (3, 0) and torch.equal(gb, torch.full_like(bias, 3))
    assert torch.equal(
        binary_matmul(x, p, impl=impl), torch.zeros(3, 4, device=device, dtype=dtype)
    )
    w = torch.randn(4, 0, device=device, requires_grad=True)
    out = binary_linear(x, w, bias, bits=bits, impl=impl)
    assert torch.equal(out, bias.detach().expand(3, 4))
    gw = torch.autograd.grad(out.sum(), w)[0]
    assert gw.shape == (4, 0)
    # whatever the scale holds: the packed kernel scaled its empty sum, 0 · inf = NaN
    scale = torch.tensor([math.inf, -math.inf, math.nan, 1.0], device=device)
    odd = PackedWeight(p.words, scale, p.shape, 0, bits)
    for M in (1, 3):  # the GEMV and the tensor-core kernels
        out = binary_matmul(x[:M].detach(), odd, bias.detach(), impl=impl)
        assert torch.equal(out, bias.detach().expand(M, 4))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bits", [1, 2])
def test_n_zero_works(device, impl, bits):
    w = torch.randn(0, 3, 2, device=device, requires_grad=True)
    quant = binarize if bits == 1 else ternarize
    q = quant(w, impl=impl)
    assert q.shape == (0, 3, 2)
    p = pack_weight(w, bits, impl=impl)
    assert p.words.shape == (bits, 0, 1) and p.shape == (0, 3, 2)
    assert unpack_weight(p, impl=impl).shape == (0, 3, 2)
    x = torch.randn(5, 6, device=device, requires_grad=True)
    out = binary_matmul(x, p, impl=impl)
    assert out.shape == (5, 0)
    (gx,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(gx, torch.zeros_like(x))


def _forbid_reference(monkeypatch):
    """Make every reference entry point of the binary ops raise."""

    def boom(*args, **kwargs):
        raise AssertionError("impl='triton' fell back to the reference")

    for name in (
        "binarize_ref",
        "ternarize_ref",
        "binary_matmul_ref",
        "binary_linear_ref",
        "pack_weight_ref",
        "unpack_weight_ref",
        "binarize_values_ref",
        "ternarize_values_ref",
    ):
        monkeypatch.setattr(ops_binary, name, boom)
    monkeypatch.setattr(ops_binary.F, "linear", boom)


@pytest.mark.parametrize("bits", [1, 2])
def test_explicit_triton_never_falls_back(device, monkeypatch, bits):
    _forbid_reference(monkeypatch)
    w = _weight(6, 40, device).requires_grad_()
    x = torch.randn(1000, 40, device=device, requires_grad=True)  # large M: still packed
    quant = binarize if bits == 1 else ternarize
    quant(w, impl="triton").sum().backward()
    p = pack_weight(w, bits, impl="triton")
    unpack_weight(p, impl="triton")
    binary_matmul(x, p, impl="triton").sum().backward()
    binary_linear(x, w, bits=bits, impl="triton").sum().backward()


def test_explicit_triton_raises_where_triton_cannot_run(monkeypatch):
    monkeypatch.setattr(ops_common, "_interpreter_on", lambda: False)
    w = torch.randn(6, 40)
    p = pack_weight(w, 1, impl="reference")
    x = torch.randn(2, 40)
    for call in (
        lambda: binarize(w, impl="triton"),
        lambda: ternarize(w, impl="triton"),
        lambda: pack_weight(w, 1, impl="triton"),
        lambda: unpack_weight(p, impl="triton"),
        lambda: binary_matmul(x, p, impl="triton"),
        lambda: binary_linear(x, w, impl="triton"),
    ):
        with pytest.raises(TritonUnavailableError, match="TRITON_INTERPRET"):
            call()


# ------------------------------------------------------------------------------------ bad input


def _packed(device, N=6, K=40, bits=1):
    return pack_weight(_weight(N, K, device), bits)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_bad_inputs_binary_matmul(device, impl):
    p = _packed(device)
    x = torch.randn(3, 40, device=device)
    with pytest.raises(ValueError, match="K = 40"):
        binary_matmul(torch.randn(3, 41, device=device), p, impl=impl)
    with pytest.raises(TypeError, match="dtype"):
        binary_matmul(torch.randint(0, 2, (3, 40), device=device), p, impl=impl)
    with pytest.raises(ValueError, match=r"bias must have shape \(6,\)"):
        binary_matmul(x, p, torch.zeros(5, device=device), impl=impl)
    with pytest.raises(TypeError, match="bias has dtype"):
        binary_matmul(x, p, torch.zeros(6, dtype=torch.float16, device=device), impl=impl)
    with pytest.raises(TypeError, match="PackedWeight"):
        binary_matmul(x, p.words, impl=impl)
    with pytest.raises(ValueError, match="impl"):
        binary_matmul(x, p, impl="cuda")
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        binary_matmul(x.tolist(), p, impl=impl)
    # device mismatch (the meta device stands in for a second device here)
    p_meta = p.to("meta")
    with pytest.raises(ValueError, match="is on"):
        binary_matmul(x, p_meta, impl=impl)


def test_bad_packed_weight_fields(device):
    p = _packed(device)
    with pytest.raises(TypeError, match="int32"):
        dataclasses.replace(p, words=p.words.float())
    with pytest.raises(TypeError, match="int32"):
        dataclasses.replace(p, words=p.words.to(torch.int64))
    with pytest.raises(ValueError, match="ceil"):
        dataclasses.replace(p, words=p.words[:, :, :1].contiguous())
    with pytest.raises(ValueError, match="ceil"):
        dataclasses.replace(p, words=p.words[:, :5])
    with pytest.raises(ValueError, match="bits"):
        dataclasses.replace(p, bits=3)
    with pytest.raises(ValueError, match="ceil"):  # bits=2 needs two planes
        dataclasses.replace(p, bits=2)
    with pytest.raises(ValueError, match="K must equal"):
        dataclasses.replace(p, K=41)
    with pytest.raises(ValueError, match="scale must have shape"):
        dataclasses.replace(p, scale=p.scale[:3])
    with pytest.raises(ValueError, match="unit stride"):
        PackedWeight(p.words.repeat(1, 1, 2)[:, :, ::2], p.scale, p.shape, p.K, 1)
    # a non-integer shape is refused, not truncated by int() (4.5 rows read as 4) or failing
    # inside it (a string) or in iteration (None)
    N, K = p.shape
    for shape in ((N + 0.5, K), (float(N), K), "ab", None, (True, K)):
        with pytest.raises(TypeError, match="packed shape must be a sequence of ints"):
            dataclasses.replace(p, shape=shape)
    for shape in ([N, K], torch.Size([N, K]), (N, torch.tensor(K))):  # int-like sizes too
        assert dataclasses.replace(p, shape=shape).shape == (N, K)


def test_bad_bits_and_dtypes(device):
    w = _weight(6, 40, device)
    for bits in (0, 3, 32):
        with pytest.raises(ValueError, match="bits"):
            pack_weight(w, bits)
    with pytest.raises(TypeError, match="bits"):
        pack_weight(w, True)
    with pytest.raises(TypeError, match="bits"):
        pack_weight(w, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        pack_weight(torch.ones(6, 40, dtype=torch.int32, device=device))
    with pytest.raises(TypeError, match="dtype"):
        binarize(torch.ones(6, 4, dtype=torch.int64, device=device))
    with pytest.raises(TypeError, match="dtype"):
        unpack_weight(_packed(device), torch.int32)
    with pytest.raises(TypeError, match="float64"):
        binarize(w.double(), impl="triton")
    with pytest.raises(ValueError, match="at least 1"):
        binarize(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match=r"weight must have shape \[N, K\]"):
        binary_linear(torch.randn(2, 4, device=device), torch.randn(3, 2, 2, device=device))
    with pytest.raises(ValueError, match="K = 4"):
        binary_linear(torch.randn(2, 5, device=device), torch.randn(3, 4, device=device))
    with pytest.raises(ValueError, match="bits"):
        binary_linear(torch.randn(2, 4, device=device), torch.randn(3, 4, device=device), bits=3)


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M", [1, 16, 17, 300])
def test_large_shapes_gpu(dtype, M):
    N, K = 1024, 2048
    packed = pack_weight(_weight(N, K, "cuda"), 1)
    x = torch.randn(M, K, device="cuda").to(dtype).requires_grad_()
    g = torch.randn(M, N, device="cuda").to(dtype)
    out = binary_matmul(x, packed, impl="triton")
    (gx,) = torch.autograd.grad(out, x, g)
    _check_gemm(x, packed, None, g, out, gx, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("M", [4, 200])
def test_binary_linear_auto_gpu(bits, M):
    # auto: Triton quantise + cuBLAS (PACKED_MAX_M_TRAIN lists no GPU yet)
    N, K = 512, 1000
    w = (torch.randn(N, K, device="cuda") * 0.8).requires_grad_()
    x = torch.randn(M, K, device="cuda", dtype=torch.float16, requires_grad=True)
    b = torch.randn(N, device="cuda", dtype=torch.float16, requires_grad=True)
    g = torch.randn(M, N, device="cuda", dtype=torch.float16)
    out = binary_linear(x, w, b, bits=bits)
    gx, gw, gb = torch.autograd.grad(out, (x, w, b), g)
    ref = binary_linear(x, w, b, bits=bits, impl="reference")
    rx, rw, rb = torch.autograd.grad(ref, (x, w, b), g)
    wq = (binarize if bits == 1 else ternarize)(w.detach(), impl="reference").double()
    x64, b64 = x.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    o = x64 @ wq.T + b64
    ox, ob = torch.autograd.grad(o, (x64, b64), g.double())
    assert_close_to_oracle("out", out, ref, o)
    assert_close_to_oracle("grad_x", gx, rx, ox)
    assert_close_to_oracle("grad_bias", gb, rb, ob)
    torch.testing.assert_close(gw, rw, atol=5e-2, rtol=1e-2)  # both fp16 GEMMs of g^T x


@pytest.mark.parametrize("mode", ["native", "tf32_split"])
def test_non_finite_and_huge_inputs_match_reference(device, monkeypatch, mode):
    """±inf, NaN and the largest floats in x give the reference's ±inf / NaN / finite outputs.

    On a GPU, fp32 at M > 1 splits x into tf32 hi + lo parts; inf - inf in that split once turned
    every +inf into NaN there (found on the H200, missed by the interpreter's exact dot).
    "tf32_split" forces that split in the interpreter too.
    """
    import empf_triton.kernels.binary as kb

    if mode == "tf32_split":
        if device != "cpu":
            pytest.skip("the GPU uses the split for fp32 on its own")
        monkeypatch.setattr(kb, "_dot_mode", lambda dtype, scaled_a: kb.DOT_TF32_SPLIT)
        fresh_launch_caches(monkeypatch)  # a GEMM plan of an earlier test holds its dot mode
    N, K = 7, 40
    packed = pack_weight(_weight(N, K, device), 1)
    x = torch.randn(5, K, device=device)
    x[0, 3] = float("inf")
    x[1, 5] = float("-inf")
    x[2, 0] = float("nan")
    x[3, 1] = torch.finfo(torch.float32).max  # rounds up past the largest float in a naive split
    out = binary_matmul(x, packed, impl="triton")
    ref = binary_matmul(x, packed, impl="reference")
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.equal(out.isinf(), ref.isinf()) and torch.equal(out[out.isinf()], ref[ref.isinf()])
    assert out[0].isinf().all() and out[2].isnan().all() and out[3].isfinite().all()
    fin = ref.isfinite()
    torch.testing.assert_close(out[fin], ref[fin], rtol=1e-5, atol=1e-3)


def test_auto_route_is_traced_without_graph_break(monkeypatch):
    """`impl="auto"` on CUDA looks the GPU's name up in PACKED_MAX_M: under torch.compile that
    lookup is a constant (a traced `get_device_name` would break the graph in every layer).
    The stand-in breaks the graph if dynamo traces it: only a call made as a constant passes."""
    calls = []

    def device_name(index=None):
        calls.append(index)
        torch._dynamo.graph_break()
        return "NVIDIA H200"

    monkeypatch.setattr(torch.cuda, "get_device_name", device_name)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    ops_binary._cuda_device_name.cache_clear()
    try:

        def route(x):
            return x * (2.0 if binary_auto_choice(64, "cuda:0") == "triton" else 3.0)

        torch._dynamo.reset()
        out = torch.compile(route, fullgraph=True, backend="eager")(torch.ones(2))
        assert torch.equal(out, torch.full((2,), 2.0))
        assert calls == [0]  # looked up once, at compile time
    finally:
        ops_binary._cuda_device_name.cache_clear()
        torch._dynamo.reset()


def test_triton_available_is_traced_without_graph_break(monkeypatch):
    """`impl="auto"` asks `triton_available()` on CUDA tensors. It was a `functools.cache` around
    `importlib.util.find_spec`, which torch 2.11's dynamo cannot trace: 38 graph breaks in
    ResNet-18 on the H200. It is a plain global now. torch 2.13 traces find_spec, so a stand-in
    that breaks the graph takes its place here: a call-time lookup would fail this test."""
    import importlib.util

    from empf_triton.ops._common import triton_available

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "triton" and torch.compiler.is_compiling():  # traced from user code
            torch._dynamo.graph_break()
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    torch._dynamo.reset()
    try:
        f = torch.compile(
            lambda x: x * (2.0 if triton_available() else 3.0), fullgraph=True, backend="eager"
        )
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0 if triton_available() else 3.0))
    finally:
        torch._dynamo.reset()


_ALLOC_AND_VIEW_OPS = {"empty", "empty_strided", "view", "reshape", "_reshape_alias", "alias"}


@pytest.mark.parametrize(
    ("quant", "expected"),
    [
        (binarize, ["_binarize_rows_kernel"]),
        (ternarize, ["_ternary_pass_kernel", "_ternary_pass_kernel", "_ternary_finish_kernel"]),
    ],
    ids=["binarize", "ternarize"],
)
def test_quantiser_statistics_are_computed_in_its_kernels(device, monkeypatch, quant, expected):
    """A binary layer quantises its weight on every training forward: one launch for binarize,
    three for ternarize, and no torch op around them but allocations and views (each reduction
    or elementwise op would be one more launch on a GPU). The launches are recorded, not run."""
    from torch.utils._python_dispatch import TorchDispatchMode

    kb = pytest.importorskip("empf_triton.kernels.binary")
    from empf_triton.kernels import _common as kernels_common
    from empf_triton.kernels import _launch

    monkeypatch.setattr(kernels_common, "_POISON", False)  # the tests' NaN fill of outputs
    launched = []

    def record(tuner, grid, args):
        launched.append(getattr(tuner, "__name__", None) or tuner.fn.__name__)

    monkeypatch.setattr(kb, "launch", record)
    # planned launches (ops/binary.py `_WEIGHT_PLANS`) go through kernels/_launch.py's `launch`;
    # a fresh cache, so that no plan made under the tests' NaN fill is reused
    monkeypatch.setattr(_launch, "launch", record)
    monkeypatch.setattr(ops_binary, "_WEIGHT_PLANS", ops_common.PlanCache())
    aten = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            aten.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    w = _weight(17, 3 * 3 * 5, device).reshape(17, 5, 3, 3).requires_grad_()
    with Ops():
        out = quant(w, impl="triton")
    assert out.shape == w.shape and out.dtype == w.dtype
    assert launched == expected
    assert set(aten) <= _ALLOC_AND_VIEW_OPS, sorted(set(aten) - _ALLOC_AND_VIEW_OPS)
