"""Triton kernels for binary and ternary synapses (docs/model.md §4).

Packed layout (shared with `reference/binary.py`): a weight viewed as [N, K] (N output channels,
K the flattened input dimension) becomes int32 words `[planes, N, ceil(K / 32)]`; element k of
row n is bit `k % 32` of word `k // 32`. Plane 0 holds the sign (1 = +1, 0 = -1); ternary weights
add plane 1, the non-zero flag, and decode as `nz ? (sign ? +1 : -1) : 0`. Padding bits past K
are 0. A per-row fp32 scale multiplies the decoded value.

The GEMM family computes `C[M, P] = A[M, R] @ B[R, P]` where B is the decoded packed matrix read in
place: forward (`TRANS=False`) is `out = x @ W^T` with B[k, n] = W[n, k]; the input gradient
(`TRANS=True`) is `grad_x = grad_out @ W` with B[n, k] = W[n, k], so neither direction makes a
dense copy of the weights. Each packed word of a tile is loaded once and expanded to its 32
elements in registers (shift, mask, 2b - 1); the decoded tile is the B operand of `tl.dot`.
Tile offsets are int32 relative to int64 tile bases that the K loop advances, which keeps every
pinned and large config free of register spills on sm_90 (checked with cuobjdump -res-usage).

Dot precision: ±1 and 0 are exact in every float type, so only the activation operand matters.
- interpreter: fp32 tiles, `ieee` (numpy) -- exact products, fp32 sums.
- fp16 activations: fp16 tiles -- exact products, fp32 accumulation.
- bf16 activations: fp32 tiles with `tf32` -- bf16 values are exactly representable in tf32, so
  the products are exact (we never call `tl.dot` on bf16 operands, and casting bf16 to fp16 would
  overflow above 65504 and lose precision below 6e-5).
- fp32 activations: x split into a tf32 high part and a low part, two `tf32` dots (`_dot_acc`):
  about 21 significant bits per product, close to fp32, at tensor-core speed. `ieee` would be
  exact but runs on the FMA units (~16x slower at large M); plain `tf32` keeps only 11 bits;
  `tf32x3` also splits the exact ±1 operand and spilled registers in every config.
The input-gradient kernel scales the gradient by the per-row scale before the dot, so its operand
is never exactly representable in fp16: it always uses fp32 tiles (`tf32` for 16-bit gradients,
which keeps fp16's precision without its range limits; the two-pass split for fp32).

Three config families, each autotuned on size classes (M class, next powers of two of P and R,
so a new batch size or layer width does not re-tune): `GEMV` for M == 1 (one row: no tensor-core
tile, each program decodes a [BLOCK_R, BLOCK_P] sign tile and reduces x * sign with fp32 sums),
`SMALL` for 1 < M <= SMALL_M_MAX (BLOCK_M = 16, the smallest tensor-core tile) and `LARGE`
(tensor-core tiles). Every GEMM is one launch: each program owns one output tile and loops over
the whole reduction, so the result is deterministic (fixed summation order, no atomics, no
split-K partials and no second reduction launch). At small M the grid is N / BLOCK_P programs;
the smallest BLOCK_P (32) gives 128 programs at N = 4096, enough to keep an H200's 132 SMs busy
while the weights (the whole cost at M = 1) are read exactly once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, empty, empty_like, pick_configs
from ._launch import launch, plan

# ------------------------------------------------------------------------------------------ configs

#: Largest M served by the small-M tensor-core family (M == 1 runs the GEMV configs).
SMALL_M_MAX = 16
#: Size classes of the autotune key are capped here (larger sizes share the largest class).
CLASS_CAP = 1 << 16


def _cfg(bm: int, bp: int, br: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": bm, "BLOCK_P": bp, "BLOCK_R": br}, num_warps=warps, num_stages=stages
    )


# The first config of each list is the pinned one (interpreter, EMPF_AUTOTUNE=0).
# GEMV (M == 1): BLOCK_M = 1 and no tl.dot; a [BLOCK_R, BLOCK_P] decoded tile per step, kept at
# <= 64 elements per thread so it stays in registers. BLOCK_P is a multiple of 32 (the input
# gradient reads BLOCK_P // 32 words per row).
GEMV_CONFIGS = [
    _cfg(1, 32, 256, 4, 3),
    _cfg(1, 64, 128, 4, 3),
    _cfg(1, 32, 128, 2, 4),
    _cfg(1, 64, 256, 8, 3),
    _cfg(1, 32, 512, 8, 3),
]
# Small M decodes a [BLOCK_R, BLOCK_P] sign tile per step for very little MMA work: the tiles
# keep it at <= 64 elements per thread so the decoded tile stays in registers.
SMALL_CONFIGS = [
    _cfg(16, 64, 128, 4, 4),
    _cfg(16, 32, 128, 2, 4),
    _cfg(16, 128, 64, 4, 4),
    _cfg(16, 128, 128, 8, 3),
    _cfg(16, 64, 256, 8, 3),
    _cfg(16, 32, 256, 4, 4),
]
LARGE_CONFIGS = [
    _cfg(64, 64, 64, 4, 3),
    _cfg(128, 128, 64, 8, 3),
    _cfg(128, 64, 64, 8, 3),
    _cfg(64, 128, 64, 8, 3),
    _cfg(128, 128, 32, 8, 4),
    _cfg(128, 128, 64, 8, 4),
]
# Register use of the SMALL and LARGE configs was checked by compiling for sm_90 (cuobjdump
# -res-usage): the pinned (first) configs and the large family do not spill for any dtype; the
# last two small configs spill for fp32 activations only (the autotuner then prefers another).
# GEMV configs (checked the same way): 62-80 registers forward, 116-128 for the input gradient,
# no spills for any dtype (a 1 x 128 x 128 tile spilled and was dropped); not yet timed on a GPU.

# Elementwise / packing kernels are not autotuned (one pass over N*K, memory bound).
_ELEM_BLOCK = 1024
_ROW_BLOCK_MAX = 2048  # per-row binarisation: elements per step along a row
_TERN_BLOCK = 4096  # ternary statistics: elements per program
_RED_BLOCK = 1024  # ... and per-block sums reduced per step
_PACK_BLOCK_N = 16
_PACK_BLOCK_W = 16
_UNPACK_BLOCK_N = 16
_UNPACK_BLOCK_K = 256

#: dot modes (see module docstring)
DOT_IEEE, DOT_FP16, DOT_TF32, DOT_TF32_SPLIT = 0, 1, 2, 3


# Host-side helpers in plain Python: triton.cdiv / triton.next_power_of_2 are constexpr functions
# whose host calls cost ~5 µs each.


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length() if n > 1 else 1


def m_class(M: int) -> int:
    """Size class of M for the autotune key: the next power of two, capped at 4096."""
    return min(_pow2(M), 4096)


def size_class(n: int) -> int:
    """Size class of P or R for the autotune key: the next power of two, capped at CLASS_CAP."""
    return min(_pow2(n), CLASS_CAP)


# ------------------------------------------------------------------------------------------ pruning


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (they only waste work); keep at least one."""
    args = {**named_args, **kwargs}
    M, P, R = args["M"], args["P"], args["R"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_M"] <= max(16, _pow2(M))
        and c.kwargs["BLOCK_P"] <= max(32, _pow2(P))
        and c.kwargs["BLOCK_R"] <= max(64, _pow2(R))
    ]
    return keep or configs[:1]


_KEY = ["M_CLASS", "P_CLASS", "R_CLASS"]
_PRUNE = {"early_config_prune": _prune}

# -------------------------------------------------------------------------------------- jit kernels


@triton.jit
def _to_out(x, p_out):
    """fp32 `x` cast to `p_out`'s element type, rounding to nearest even for every dtype.

    The interpreter's fp32 -> bf16 cast truncates (the GPU's rounds), so bf16 is rounded here in
    fp32 bits first; the cast that follows is then exact on both. NaN passes unchanged.
    """
    if p_out.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(p_out.dtype.element_ty)


@triton.jit
def _dot_acc(a, b, acc, DOT_MODE: tl.constexpr):
    """acc + a @ b with fp32 accumulation; a, b are fp32 tiles (b holds -1, 0, +1)."""
    if DOT_MODE == 1:
        res = tl.dot(a.to(tl.float16), b.to(tl.float16), acc)
    elif DOT_MODE == 2:
        res = tl.dot(a, b, acc, input_precision="tf32")
    elif DOT_MODE == 3:
        # b is exactly representable in tf32, so only a needs splitting (two passes, not
        # tf32x3's three, and no split of b): a = hi + lo with hi = a rounded to tf32's 10
        # mantissa bits, |lo| <= 2^-11 |a|; the MMA keeps 10 bits of lo, so each product has a
        # relative error <= 2^-21. Non-finite a: ±inf must give lo = 0 (inf - inf would be NaN,
        # a GPU-only bug the interpreter's exact ieee path hid); a finite a that rounds up past
        # the largest float keeps the truncated hi instead. NaN stays NaN in both parts.
        bits = a.to(tl.int32, bitcast=True)
        a_hi = ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
        a_hi = tl.where(a_hi - a_hi == 0, a_hi, (bits & -8192).to(tl.float32, bitcast=True))
        a_lo = tl.where(a_hi == a, 0.0, a - a_hi)
        res = tl.dot(a_hi, b, acc, input_precision="tf32")
        res = tl.dot(a_lo, b, res, input_precision="tf32")
    else:
        res = tl.dot(a, b, acc, input_precision="ieee")
    return res


@triton.jit
def _decode_gather(p_w, stride_wp, shift, m_b, TERNARY: tl.constexpr):
    """Decode the packed elements whose words `p_w` point at (bit `shift`) to fp32 -1 / 0 / +1."""
    b_sign = (tl.load(p_w, mask=m_b, other=0) >> shift) & 1
    b_val = 2 * b_sign - 1
    if TERNARY:
        b_nz = (tl.load(p_w + stride_wp, mask=m_b, other=0) >> shift) & 1
        b_val = b_val * b_nz
    return b_val.to(tl.float32)


@triton.jit
def _bgemm_kernel(
    p_a,
    p_words,
    p_scale,
    p_bias,
    p_out,
    M,
    P,
    R,
    M_CLASS,
    P_CLASS,
    R_CLASS,
    stride_am,
    stride_ar,
    stride_wp,
    stride_wn,
    stride_om,
    stride_op,
    TRANS: tl.constexpr,
    TERNARY: tl.constexpr,
    SCALE_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """C[M, P] = A[M, R] @ B[R, P], B decoded from packed words (module docstring).

    Program (m, p) owns a [BLOCK_M, BLOCK_P] tile and reduces over all of R. `SCALE_A`
    multiplies A's columns by scale[r] (input gradient); otherwise the epilogue multiplies C's
    columns by scale[p] (forward). `USE_DOT=False` (GEMV, BLOCK_M = 1) sums a * b with fp32
    adds instead of `tl.dot`. M_CLASS, P_CLASS, R_CLASS only key the autotuner.
    """
    pid_m = tl.program_id(0)
    pid_p = tl.program_id(1)
    o_tm = tl.arange(0, BLOCK_M)
    o_tp = tl.arange(0, BLOCK_P)
    o_i = tl.arange(0, BLOCK_R)
    o_bit = tl.arange(0, 32)
    m0 = pid_m * BLOCK_M
    p0 = pid_p * BLOCK_P
    m_m = (m0 + o_tm) < M
    m_p = (p0 + o_tp) < P

    # Scalar int64 tile bases that the loop advances, and loop-invariant int32 offsets inside
    # the tile (the launcher checks they fit): few registers per element. BLOCK_R and BLOCK_P
    # are multiples of 32, so every tile starts on a word boundary and the words are loaded
    # once each, then expanded to 32 elements in registers.
    p_a_t = p_a + m0.to(tl.int64) * stride_am
    off_a = o_tm[:, None] * stride_am + o_i[None, :] * stride_ar
    step_a = tl.full([], BLOCK_R, tl.int64) * stride_ar
    if TRANS:  # B[r, p] = W[n = r, k = p]: words [BLOCK_R, BLOCK_P // 32], rows advance with r
        o_wc = tl.arange(0, BLOCK_P // 32)
        p_b = p_words + p0 // 32
        off_b = o_i[:, None] * stride_wn + o_wc[None, :]
        m_wc = (p0 + o_wc * 32) < P
        step_b = tl.full([], BLOCK_R, tl.int64) * stride_wn
    else:  # B[r, p] = W[n = p, k = r]: words [BLOCK_R // 32, BLOCK_P], word rows advance with r
        o_wr = tl.arange(0, BLOCK_R // 32)
        p_b = p_words + p0.to(tl.int64) * stride_wn
        off_b = o_tp[None, :] * stride_wn + o_wr[:, None]
        step_b = BLOCK_R // 32
    p_sa = p_scale

    acc = tl.zeros([BLOCK_M, BLOCK_P], dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        m_r = (r0 + o_i) < R
        b_a = tl.load(p_a_t + off_a, mask=m_m[:, None] & m_r[None, :], other=0.0).to(tl.float32)
        if SCALE_A:
            b_a = b_a * tl.load(p_sa + o_i, mask=m_r, other=0.0)[None, :]
            p_sa += BLOCK_R
        # Elements past R decode to -1 (padding bits are 0) but meet A's zeros.
        if TRANS:
            m_b = m_r[:, None] & m_wc[None, :]
            b_w = tl.load(p_b + off_b, mask=m_b, other=0)
            b_v = 2 * ((b_w[:, :, None] >> o_bit[None, None, :]) & 1) - 1
            if TERNARY:
                b_w = tl.load(p_b + stride_wp + off_b, mask=m_b, other=0)
                b_v = b_v * ((b_w[:, :, None] >> o_bit[None, None, :]) & 1)
        else:
            m_b = ((r0 + o_wr * 32) < R)[:, None] & m_p[None, :]
            b_w = tl.load(p_b + off_b, mask=m_b, other=0)
            b_v = 2 * ((b_w[:, None, :] >> o_bit[None, :, None]) & 1) - 1
            if TERNARY:
                b_w = tl.load(p_b + stride_wp + off_b, mask=m_b, other=0)
                b_v = b_v * ((b_w[:, None, :] >> o_bit[None, :, None]) & 1)
        b_b = tl.reshape(b_v, [BLOCK_R, BLOCK_P]).to(tl.float32)
        if USE_DOT:
            acc = _dot_acc(b_a, b_b, acc, DOT_MODE)
        else:  # exact products (b is -1, 0 or +1), fp32 sums
            acc += tl.sum(b_a[:, :, None] * b_b[None, :, :], axis=1)
        p_a_t += step_a
        p_b += step_b

    o_m = (m0 + o_tm).to(tl.int64)
    o_p = (p0 + o_tp).to(tl.int64)
    if not SCALE_A:
        b_sc = tl.load(p_scale + o_p, mask=m_p, other=0.0)
        acc = acc * b_sc[None, :]
    if HAS_BIAS:
        b_bias = tl.load(p_bias + o_p, mask=m_p, other=0.0).to(tl.float32)
        acc = acc + b_bias[None, :]
    p_c = p_out + o_m[:, None] * stride_om + o_p[None, :] * stride_op
    tl.store(p_c, _to_out(acc, p_out), mask=m_m[:, None] & m_p[None, :])


def _tuned(configs):
    return triton.autotune(configs=pick_configs(configs), key=_KEY, prune_configs_by=_PRUNE)(
        _bgemm_kernel
    )


# One tuner (one cache) per family and direction: their best tiles differ.
_TUNERS = {
    (family, trans): _tuned(configs)
    for family, configs in (
        ("gemv", GEMV_CONFIGS),
        ("small", SMALL_CONFIGS),
        ("large", LARGE_CONFIGS),
    )
    for trans in (False, True)
}


@triton.jit
def _binarize_rows_kernel(
    p_w, p_scale, p_out, p_words, K, KW,
    WRITE_Q: tl.constexpr, WRITE_PACK: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """One program per row n of a contiguous [N, K] w (K >= 1; fp32/fp16/bf16, as the Triton
    path takes): α_n = mean(|w[n]|) summed in fp32 in a fixed order, stored in scale[n]; with
    WRITE_Q also the row's α_n · sign(w[n, k]) (sign(0) = +1, compared in fp32) in out; with
    WRITE_PACK (BLOCK_K a multiple of 32) the row's sign bits in words[n, 0:KW] as `_pack_kernel`
    packs them (bit k % 32 of word k // 32 set for w >= 0, padding bits 0): statistics and
    packing in one launch."""
    n = tl.program_id(0).to(tl.int64)
    p_row = p_w + n * K
    o = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        acc += tl.abs(tl.load(p_row + k0 + o, mask=k0 + o < K, other=0.0).to(tl.float32))
    sc = tl.sum(acc, axis=0) / K
    tl.store(p_scale + n, sc)
    if WRITE_Q:
        p_orow = p_out + n * K
        for k0 in range(0, K, BLOCK_K):
            m = k0 + o < K
            b_w = tl.load(p_row + k0 + o, mask=m, other=0.0).to(tl.float32)
            tl.store(p_orow + k0 + o, _to_out(tl.where(b_w >= 0.0, sc, -sc), p_out), mask=m)
    if WRITE_PACK:
        o_w = tl.arange(0, BLOCK_K // 32)
        o_bit = tl.arange(0, 32)
        o_k = o_w[:, None] * 32 + o_bit[None, :]  # [BLOCK_K // 32, 32]
        p_wrow = p_words + n * KW
        for k0 in range(0, K, BLOCK_K):
            m = k0 + o_k < K
            b_w = tl.load(p_row + k0 + o_k, mask=m, other=0.0).to(tl.float32)
            b_sign = (b_w >= 0.0) & m
            # distinct powers of two: the int32 sum is their bitwise OR (as in _pack_kernel)
            word = tl.sum(b_sign.to(tl.int32) << o_bit[None, :], axis=1)
            w0 = k0 // 32
            tl.store(p_wrow + w0 + o_w, word, mask=w0 + o_w < KW)


@triton.jit
def _clip_abs(b):
    """|clip(b, -1, 1)|, NaN kept (tl.minimum / tl.maximum may drop it on the GPU)."""
    return tl.abs(tl.where(b > 1.0, 1.0, tl.where(b < -1.0, -1.0, b)))


@triton.jit
def _sum_rows(p, P, RBLOCK: tl.constexpr):
    """p[0:P] summed in fp32 in a fixed order (the same value in every program that asks)."""
    o = tl.arange(0, RBLOCK)
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    for r0 in range(0, P, RBLOCK):
        acc += tl.load(p + r0 + o, mask=r0 + o < P, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _ternary_delta(p_part, NK, P, RBLOCK: tl.constexpr):
    """Δ = 0.7 · mean(|clip(w)|) from the first pass's per-block sums."""
    return 0.7 * (_sum_rows(p_part, P, RBLOCK) / NK)


@triton.jit
def _ternary_pass_kernel(
    p_w, p_part, NK, P, PASS: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr
):
    """The TWN statistics of a contiguous w with NK >= 1 elements, as per-block sums in the
    [3, P] buffer p_part (P = programs): PASS 1 writes row 0, Σ|clip(w)|; PASS 2 reads row 0
    for Δ and writes row 1, Σ|clip(w)| over |clip(w)| > Δ, and row 2, how many such elements."""
    pid = tl.program_id(0)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < NK
    b_a = _clip_abs(tl.load(p_w + o, mask=m, other=0.0).to(tl.float32))
    if PASS == 1:
        tl.store(p_part + pid, tl.sum(b_a, axis=0))
    else:
        delta = _ternary_delta(p_part, NK, P, RBLOCK)
        keep = (b_a > delta) & m
        # a * keep, not a select: a NaN element makes the sum (and so α) NaN, as the reference
        tl.store(p_part + P + pid, tl.sum(b_a * keep.to(tl.float32), axis=0))
        tl.store(p_part + 2 * P + pid, tl.sum(keep.to(tl.int32), axis=0).to(tl.float32))


@triton.jit
def _ternary_finish_kernel(
    p_w, p_part, p_scale, p_delta, p_out, NK, N, P, WRITE_Q: tl.constexpr,
    WRITE_STATS: tl.constexpr, BLOCK: tl.constexpr, RBLOCK: tl.constexpr,
):  # fmt: skip
    """Every program reduces the [3, P] sums to Δ and α = Σ / max(count, 1) (+ 0 · Δ: NaN
    passes); with WRITE_STATS program 0 stores Δ (fp32) and the programs together store α in
    scale[0:N]; with WRITE_Q each stores its block of α · t(w), t = +1 / 0 / -1 by the rule
    (compared in fp32, as the pack kernel does)."""
    pid = tl.program_id(0)
    delta = _ternary_delta(p_part, NK, P, RBLOCK)
    o_r = tl.arange(0, RBLOCK)
    count = tl.zeros([RBLOCK], dtype=tl.int64)
    for r0 in range(0, P, RBLOCK):
        b_c = tl.load(p_part + 2 * P + r0 + o_r, mask=r0 + o_r < P, other=0.0)
        count += b_c.to(tl.int64)
    n_keep = tl.maximum(tl.sum(count, axis=0), 1)
    alpha = _sum_rows(p_part + P, P, RBLOCK) / n_keep.to(tl.float32) + 0.0 * delta
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if WRITE_STATS:
        tl.store(p_delta + pid * 0, delta, mask=pid == 0)
        tl.store(p_scale + o, tl.zeros([BLOCK], dtype=tl.float32) + alpha, mask=o < N)
    if WRITE_Q:
        m = o < NK
        b_w = tl.load(p_w + o, mask=m, other=0.0).to(tl.float32)
        b_wc = tl.minimum(tl.maximum(b_w, -1.0), 1.0)
        # α · t (not a select of ±α and 0): a NaN statistic gives NaN everywhere
        b_q = alpha * tl.where(b_wc > delta, 1.0, tl.where(b_wc < -delta, -1.0, 0.0))
        tl.store(p_out + o, _to_out(b_q, p_out), mask=m)


@triton.jit
def _ste_kernel(p_g, p_w, p_out, NUMEL, BLOCK: tl.constexpr):
    """Clipped straight-through gradient: out = g where |w| <= 1, else 0."""
    pid = tl.program_id(0)
    o = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < NUMEL
    b_g = tl.load(p_g + o, mask=m, other=0.0)
    b_w = tl.load(p_w + o, mask=m, other=0.0).to(tl.float32)
    tl.store(p_out + o, tl.where(tl.abs(b_w) <= 1.0, b_g, 0.0).to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _pack_kernel(
    p_w,
    p_delta,
    p_words,
    N,
    K,
    KW,
    stride_wn,
    stride_wk,
    stride_pn,
    stride_pp,
    TERNARY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Pack a [BLOCK_N, BLOCK_W * 32] tile of w into [BLOCK_N, BLOCK_W] words per plane."""
    pid_n = tl.program_id(0)
    pid_w = tl.program_id(1)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_w = pid_w.to(tl.int64) * BLOCK_W + tl.arange(0, BLOCK_W)
    o_bit = tl.arange(0, 32)
    o_k = o_w[:, None] * 32 + o_bit[None, :]  # [BLOCK_W, 32]
    m_n = o_n < N
    m_e = m_n[:, None, None] & (o_k < K)[None, :, :]
    b_w = tl.load(
        p_w + o_n[:, None, None] * stride_wn + o_k[None, :, :] * stride_wk, mask=m_e, other=0.0
    ).to(tl.float32)
    if TERNARY:
        delta = tl.load(p_delta)
        b_wc = tl.minimum(tl.maximum(b_w, -1.0), 1.0)
        b_sign = (b_wc > delta) & m_e
        b_nz = (tl.abs(b_wc) > delta) & m_e
    else:
        b_sign = (b_w >= 0.0) & m_e
    # Distinct powers of two: the int32 sum is their bitwise OR (bit 31 wraps to the sign bit).
    shifts = o_bit[None, None, :]
    m_out = m_n[:, None] & (o_w < KW)[None, :]
    p_out = p_words + o_n[:, None] * stride_pn + o_w[None, :]
    tl.store(p_out, tl.sum(b_sign.to(tl.int32) << shifts, axis=2), mask=m_out)
    if TERNARY:
        tl.store(p_out + stride_pp, tl.sum(b_nz.to(tl.int32) << shifts, axis=2), mask=m_out)


@triton.jit
def _unpack_kernel(
    p_words,
    p_scale,
    p_out,
    N,
    K,
    stride_pp,
    stride_pn,
    TERNARY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = scale[n] * decode(words[:, n, k // 32] bit k % 32), out contiguous [N, K]."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    o_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    o_k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m = (o_n < N)[:, None] & (o_k < K)[None, :]
    p_w = p_words + o_n[:, None] * stride_pn + (o_k // 32)[None, :]
    shift = (o_k % 32).to(tl.int32)[None, :]
    b_val = _decode_gather(p_w, stride_pp, shift, m, TERNARY)
    b_sc = tl.load(p_scale + o_n, mask=o_n < N, other=0.0)
    b_out = _to_out(b_val * b_sc[:, None], p_out)
    tl.store(p_out + o_n[:, None] * K + o_k[None, :], b_out, mask=m)


# ---------------------------------------------------------------------------------------- launchers


def _dot_mode(dtype: torch.dtype, scaled_a: bool) -> int:
    if INTERPRET:
        return DOT_IEEE
    if dtype == torch.float32:
        return DOT_TF32_SPLIT
    if dtype == torch.float16 and not scaled_a:
        return DOT_FP16
    return DOT_TF32


def _bgemm(
    a: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    P: int,
    R: int,
    trans: bool,
    bind: bool = False,
):
    """out [M, P] of the packed GEMM (`binary_gemm`, or `binary_gemm_t` with `trans`). With
    `bind` (for `bgemm_plan`): (tuner, grid, args) of the launch, not run, or None where no
    launch of `a` itself would be made (an empty output, or `a` copied for its strides)."""
    M = a.shape[0]
    out = empty((M, P), a.dtype, a.device)
    if M == 0 or P == 0:
        return None if bind else out
    if R == 0:  # an empty sum is 0: the kernel's epilogue would scale it (0 · inf is NaN)
        if bind:
            return None
        return out.copy_(bias.expand(M, P)) if bias is not None else out.zero_()
    s_am, s_ar = a.stride()
    # The kernel keeps int32 offsets inside a tile (largest tile: 128 x 256, 256 x 256 words).
    if 127 * abs(s_am) + 255 * abs(s_ar) >= 2**31:
        if bind:
            return None
        a = a.contiguous()
        s_am, s_ar = a.stride()
    s_wp, s_wn, _ = words.stride()
    if 256 * s_wn + 8 >= 2**31:
        raise ValueError(f"packed rows too long for int32 tile offsets: {s_wn} words")
    family = "gemv" if M == 1 else "small" if M <= SMALL_M_MAX else "large"

    def grid(meta):
        return (_cdiv(M, meta["BLOCK_M"]), _cdiv(P, meta["BLOCK_P"]))

    args = dict(
        p_a=a,
        p_words=words,
        p_scale=scale,
        p_bias=bias if bias is not None else scale,
        p_out=out,
        M=M,
        P=P,
        R=R,
        M_CLASS=m_class(M),
        P_CLASS=size_class(P),
        R_CLASS=size_class(R),
        stride_am=s_am,
        stride_ar=s_ar,
        stride_wp=s_wp,
        stride_wn=s_wn,
        stride_om=P,
        stride_op=1,
        TRANS=trans,
        TERNARY=words.shape[0] == 2,
        SCALE_A=trans,
        HAS_BIAS=bias is not None,
        USE_DOT=family != "gemv",
        DOT_MODE=_dot_mode(a.dtype, scaled_a=trans),
    )
    tuner = _TUNERS[family, trans]
    if bind:
        return tuner, grid, args
    launch(tuner, grid, args)
    return out


def bgemm_plan(a, words, scale, bias, P: int, R: int, trans: bool):
    """`run(a2, words2, scale2, bias2) -> (out,)`: `_bgemm` of these arguments for later calls
    with tensors of the same forms (shapes, strides, dtypes; bias None or not; not checked),
    their launch arguments worked out once (`_launch.plan`). The tensors must be distinct (the
    plan finds their slots by identity). Where `_bgemm` makes no plain launch of `a`, `run`
    calls it each time."""
    bound = _bgemm(a, words, scale, bias, P, R, trans, bind=True)
    if bound is None:
        return lambda a2, w2, s2, b2: (_bgemm(a2, w2, s2, b2, P, R, trans),)
    tuner, grid, args = bound
    return plan(tuner, grid, args, (a, words, scale, bias), (args["p_out"],))


def binary_gemm(
    x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """out[M, N] = (x @ decode(words)^T) * scale + bias, in x's dtype, in one launch.

    x: [M, K] (any strides); words: int32 [planes, N, ceil(K/32)] with unit last stride;
    scale: fp32 [N] contiguous; bias: [N] contiguous or None. K = 0 gives bias (or zeros).
    """
    return _bgemm(x, words, scale, bias, words.shape[1], x.shape[1], False)


def binary_gemm_t(
    g: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, K: int
) -> torch.Tensor:
    """grad_x[M, K] = (g * scale) @ decode(words), in g's dtype; g: [M, N] (any strides)."""
    return _bgemm(g, words, scale, None, K, words.shape[1], True)


def _row_block(K: int) -> int:
    return max(16, min(_ROW_BLOCK_MAX, _pow2(K)))


def _rows_args(w2d: torch.Tensor, write_q: bool, write_pack: bool):
    """(args, (out, words, scale)) of one `_binarize_rows_kernel` launch over a contiguous
    [N, K] w with N, K >= 1: scale [N] fp32 always; out (Q(w), w's dtype) with `write_q`,
    words (int32 [1, N, ceil(K/32)]) with `write_pack`, else None."""
    N, K = w2d.shape
    dev = w2d.device
    KW = _cdiv(K, 32) if write_pack else 0
    scale = empty((N,), torch.float32, dev)
    out = empty((N, K), w2d.dtype, dev) if write_q else None
    words = empty((1, N, KW), torch.int32, dev) if write_pack else None
    args = dict(
        p_w=w2d, p_scale=scale, p_out=out if write_q else w2d,
        p_words=words if write_pack else scale, K=K, KW=KW, WRITE_Q=write_q,
        WRITE_PACK=write_pack, BLOCK_K=max(32, _row_block(K)) if write_pack else _row_block(K),
    )  # fmt: skip
    return args, (out, words, scale)


def _binary_rows(w2d: torch.Tensor, write_q: bool, write_pack: bool):
    """(out, words, scale) of `_rows_args`, launched: one pass of the row kernel."""
    args, outputs = _rows_args(w2d, write_q, write_pack)
    launch(_binarize_rows_kernel, (w2d.shape[0],), args)
    return outputs


def binary_rows_plan(w2d: torch.Tensor, write_q: bool, write_pack: bool):
    """`run(w2) -> (out, words, scale)`: `_binary_rows` for later contiguous weights of w2d's
    shape and dtype, its launch arguments worked out once (`_launch.plan`)."""
    args, outputs = _rows_args(w2d, write_q, write_pack)
    return plan(_binarize_rows_kernel, (w2d.shape[0],), args, (w2d,), outputs)


def _ternary_launches(w2d: torch.Tensor, out: torch.Tensor | None, stats: bool):
    """The three launches of `_ternary` as (kernel, grid, args) triples, and (part, scale,
    delta): the per-block sums' scratch buffer and the statistics' outputs (None without
    `stats`)."""
    N, K = w2d.shape
    NK = N * K
    P = _cdiv(NK, _TERN_BLOCK)
    part = empty((3, P), torch.float32, w2d.device)
    common = dict(p_w=w2d, p_part=part, NK=NK, P=P)
    blocks = dict(BLOCK=_TERN_BLOCK, RBLOCK=_RED_BLOCK)
    scale = empty((N,), torch.float32, w2d.device) if stats else None
    delta = empty((1,), torch.float32, w2d.device) if stats else None
    finish = dict(
        common,
        p_scale=scale if stats else part,
        p_delta=delta if stats else part,
        p_out=out if out is not None else w2d,
        N=N,
        WRITE_Q=out is not None,
        WRITE_STATS=stats,
        **blocks,
    )
    launches = [
        (_ternary_pass_kernel, (P,), dict(common, PASS=1, **blocks)),
        (_ternary_pass_kernel, (P,), dict(common, PASS=2, **blocks)),
        (_ternary_finish_kernel, (P,), finish),
    ]
    return launches, (part, scale, delta)


def _ternary(w2d: torch.Tensor, out: torch.Tensor | None, stats: bool):
    """(scale [N] fp32 filled with α, Δ [1] fp32) of a contiguous w with N * K >= 1 elements
    (with `stats`; else (None, None)); ternarised w into `out` when given. Three launches: two
    passes of per-block sums, then every program reduces them the same fixed way (no atomics,
    no torch reduction: deterministic)."""
    launches, (_, scale, delta) = _ternary_launches(w2d, out, stats)
    for kernel, grid, args in launches:
        launch(kernel, grid, args)
    return scale, delta


def ternary_plan(w2d: torch.Tensor, write_q: bool, write_pack: bool):
    """`run(w2) -> (out, words, scale)` for later contiguous weights of w2d's shape and dtype
    (N * K >= 1): `quantize_weight(w2, 2)` in out (with `write_q`), `pack_with_stats(w2, 2)`
    in words and scale (with `write_pack`), None for what is not asked; each launch's
    arguments worked out once (`_launch.plan`), the scratch buffer new per call."""
    N, K = w2d.shape
    out = empty((N, K), w2d.dtype, w2d.device) if write_q else None
    launches, (part, scale, delta) = _ternary_launches(w2d, out, write_pack)
    (k1, g1, a1), (k2, g2, a2), (k3, g3, a3) = launches
    pass1 = plan(k1, g1, a1, (w2d, part), ())
    pass2 = plan(k2, g2, a2, (w2d, part), ())
    finish = plan(k3, g3, a3, (w2d, part), (out, scale, delta))
    pack_run = None
    if write_pack:
        grid, args, words = _pack_args(w2d, delta)
        pack_run = plan(_pack_kernel, grid, args, (w2d, delta), (words,))
    part_shape, dev = tuple(part.shape), w2d.device

    def run(w2):
        part2 = empty(part_shape, torch.float32, dev)
        pass1(w2, part2)
        pass2(w2, part2)
        out2, scale2, delta2 = finish(w2, part2)
        words2 = pack_run(w2, delta2)[0] if pack_run is not None else None
        return out2, words2, scale2

    return run


def quantize_weight(w2d: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w) of a contiguous [N, K] w in its dtype: α_n · sign(w) (bits 1: one launch) or the
    TWN rule (bits 2: three launches), statistics computed in the kernels."""
    N, K = w2d.shape
    if N * K and bits == 1:
        return _binary_rows(w2d, True, False)[0]
    out = empty((N, K), w2d.dtype, w2d.device)
    if out.numel():
        _ternary(w2d, out, stats=False)
    return out


def weight_stats(w2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The statistics `quantize_weight` uses, for packing: fp32 scale [N] (α_n; ternary: α in
    every row) and, ternary, Δ as fp32 [1]. An empty w gives zeros."""
    N, K = w2d.shape
    dev = w2d.device
    if N * K == 0:
        return torch.zeros((N,), device=dev), (None if bits == 1 else torch.zeros((1,), device=dev))
    if bits == 1:
        return _binary_rows(w2d, False, False)[2], None
    return _ternary(w2d, None, stats=True)


def pack_with_stats(w2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(words int32 [bits, N, ceil(K/32)], fp32 scale [N]) of a contiguous [N, K] w: what
    `weight_stats` then `pack` give. Binary weights take one launch (the row kernel sums |w| and
    packs the signs: w read by one kernel, not two); ternary ones the four of those two."""
    N, K = w2d.shape
    if bits != 1 or N * K == 0:
        scale, delta = weight_stats(w2d, bits)
        return pack(w2d, delta), scale
    _, words, scale = _binary_rows(w2d, False, True)
    return words, scale


def _ste_args(g: torch.Tensor, w: torch.Tensor):
    out = empty_like(w)
    grid = (_cdiv(w.numel(), _ELEM_BLOCK),)
    return grid, dict(p_g=g, p_w=w, p_out=out, NUMEL=w.numel(), BLOCK=_ELEM_BLOCK), out


def ste_grad(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g where |w| <= 1 else 0; g and w contiguous, same shape."""
    grid, args, out = _ste_args(g, w)
    if out.numel():
        launch(_ste_kernel, grid, args)
    return out


def ste_grad_plan(g: torch.Tensor, w: torch.Tensor):
    """`run(g2, w2) -> (out,)`: `ste_grad` for later distinct contiguous tensors of these
    shapes and dtypes (not empty), its launch arguments worked out once."""
    grid, args, out = _ste_args(g, w)
    return plan(_ste_kernel, grid, args, (g, w), (out,))


def _pack_args(w2d: torch.Tensor, delta: torch.Tensor | None):
    """(grid, args, words) of the `_pack_kernel` launch of `pack`."""
    N, K = w2d.shape
    KW = _cdiv(K, 32)
    planes = 1 if delta is None else 2
    words = empty((planes, N, KW), torch.int32, w2d.device)
    grid = (_cdiv(N, _PACK_BLOCK_N), _cdiv(KW, _PACK_BLOCK_W))
    args = dict(
        p_w=w2d,
        p_delta=delta if delta is not None else w2d,
        p_words=words,
        N=N,
        K=K,
        KW=KW,
        stride_wn=w2d.stride(0),
        stride_wk=w2d.stride(1),
        stride_pn=words.stride(1),
        stride_pp=words.stride(0),
        TERNARY=delta is not None,
        BLOCK_N=_PACK_BLOCK_N,
        BLOCK_W=_PACK_BLOCK_W,
    )
    return grid, args, words


def pack(w2d: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """Sign (and, with `delta`, non-zero) planes of w [N, K] as int32 [planes, N, ceil(K/32)]."""
    grid, args, words = _pack_args(w2d, delta)
    if words.numel():
        launch(_pack_kernel, grid, args)
    return words


def unpack(words: torch.Tensor, scale: torch.Tensor, K: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense [N, K] = scale[n] * decode(words) in `dtype`."""
    N = words.shape[1]
    out = empty((N, K), dtype, words.device)
    if out.numel():
        grid = (_cdiv(N, _UNPACK_BLOCK_N), _cdiv(K, _UNPACK_BLOCK_K))
        launch(
            _unpack_kernel,
            grid,
            dict(
                p_words=words,
                p_scale=scale,
                p_out=out,
                N=N,
                K=K,
                stride_pp=words.stride(0),
                stride_pn=words.stride(1),
                TERNARY=words.shape[0] == 2,
                BLOCK_N=_UNPACK_BLOCK_N,
                BLOCK_K=_UNPACK_BLOCK_K,
            ),
        )
    return out
