"""Fused deployment kernel: packed binary/ternary convolution + scale/bias + EM-PF neuron over T.

One launch runs a deployed spiking convolution layer for all T steps:

- Implicit GEMM, no im2col copy: out[p, co] = Σ_k A[p, k] · B[k, co] with p an output position of
  one image, k = (ci, r, s) flattened in the packed weight's order (K = C_in/groups · kh · kw), A
  gathered from the spikes x[t, n, g·Cg + ci, p_h·stride - pad + r, p_w·stride - pad + s] (zero
  where the window leaves the padded image) and B the packed weight words expanded to -1/0/+1 in
  registers (as `kernels/binary.py` does: each word loaded once, shifted to its 32 elements).
- Program tile = BLOCK_P output positions of one image x BLOCK_CO output channels of one group;
  the program loops over t = 0..T-1 itself, so the neuron's membrane v stays in registers.
- Epilogue per step: `y = acc (* in_step for codes) * scale[t, co] + bias[t, co]` (+ an optional
  residual[t, n, co, p], the join of a residual block, read in its own dtype), then the neuron
  `m = decay·v + y; s = relu(m - θ); v = m - s = min(m, θ)` (exactly θ after firing; or the
  parallel `s = relu(y - θ)`), and the store of uint8 codes
  `clamp(round_half_even(s / step), 0, 2^k - 1)`, float spikes s or the currents y.

Dot precision (±1/0 weights are exact in every format, so only the spike operand matters):
- uint8 codes with `in_bits <= 7` (codes < 128): int8 tensor-core dots, int32 accumulation: exact.
  The interpreter runs int8 dots too, so the tests check this exact path.
- uint8 codes with 8 bits: fp16 dots on the GPU (every integer 0..255 is exact in fp16 and the fp32
  accumulation of integer products stays exact below 2^24 = the op's K limit), fp32 `ieee` dots
  in the interpreter (exact too). Codes are read masked to their low `in_bits` bits.
- fp16 spikes: fp16 dots (exact products, fp32 accumulation); bf16: fp32 tiles with `tf32`
  (bf16 values are exact in tf32); fp32: the two-pass tf32 split of `kernels/binary._dot_acc`
  (about 21 bits per product). The interpreter runs every float case as fp32 `ieee` dots.
Integer accumulators are converted to fp32 exactly (|acc| < 2^24), so code inputs give the same
bits as the reference whatever the dot mode.

Offsets: tile bases (time step, image, group) are int64 pointers; offsets inside one image
(channel, row, column) are int32, which the launcher checks fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import INTERPRET, empty, pick_configs, spike_code
from ._launch import launch, plan
from .binary import DOT_FP16, DOT_IEEE, DOT_TF32, DOT_TF32_SPLIT, _cdiv, _dot_acc, _pow2, _to_out

#: int8 tensor-core dots on int8 tiles with int32 accumulation (codes < 128).
DOT_I8 = 4
#: Neuron modes (the `MODE` constexpr).
MODE_CURRENT, MODE_EMPF, MODE_PARALLEL = 0, 1, 2

# ------------------------------------------------------------------------------------------ configs


def _cfg(bp: int, bc: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_P": bp, "BLOCK_CO": bc, "BLOCK_K": bk}, num_warps=warps, num_stages=stages
    )


# The first config is the pinned one (interpreter, EMPF_AUTOTUNE=0). BLOCK_K is a multiple of 32
# (whole packed words) and every block is >= 16 (the smallest tl.dot tile). Register use was
# checked by compiling for sm_90 (cuobjdump -res-usage): no config spills on the EM-PF/codes
# variant of any input dtype, and the pinned one on none of tests/gpu_compile.py's variants.
# Tiles with more than 16 accumulator elements per thread (e.g. 64x64 on 4 warps, 128x64 on 8)
# spilled hundreds of bytes: the neuron keeps the membrane v beside the accumulator, and the
# gathered spike tile and the expanded weight bits are live in the same loop.
CONFIGS = [
    _cfg(32, 64, 32, 4, 2),
    _cfg(64, 64, 32, 8, 2),
    _cfg(64, 32, 32, 4, 2),
    _cfg(16, 128, 32, 4, 2),
    _cfg(128, 32, 32, 8, 2),
    _cfg(32, 128, 32, 8, 2),
    _cfg(64, 32, 32, 4, 3),
]


def size_class(n: int, cap: int) -> int:
    """Next power of two of n, capped: the autotune key groups shapes by it."""
    return min(_pow2(max(int(n), 1)), cap)


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem; keep at least one."""
    args = {**named_args, **kwargs}
    P, COG, K = args["P_CLASS"], args["COG"], args["K"]
    keep = [
        c
        for c in configs
        if c.kwargs["BLOCK_P"] <= max(16, P)
        and c.kwargs["BLOCK_CO"] <= max(16, _pow2(COG))
        and c.kwargs["BLOCK_K"] <= max(32, _pow2(K))
    ]
    return keep or configs[:1]


# ------------------------------------------------------------------------------------- jit kernel


@triton.autotune(
    configs=pick_configs(CONFIGS),
    key=["P_CLASS", "N_CLASS", "COG", "K", "T", "MODE", "DOT_MODE", "TERNARY", "QUANT"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _bconv_neuron_kernel(
    p_x,  # [T, N, C_in, H, W] spikes (uint8 codes or float), any strides
    p_words,  # int32 [planes, C_out, ceil(K / 32)], unit last stride
    p_scale,  # fp32 [T or 1, C_out]
    p_bias,  # fp32 [T or 1, C_out] (read only if HAS_BIAS)
    p_decay,  # fp32 [T, C_out] contiguous (read only if MODE == EMPF)
    p_th,  # fp32 [T, C_out] contiguous (read only if MODE != CURRENT)
    p_res,  # [T or 1, N, C_out, Ho * Wo], unit position stride (read only if HAS_RES)
    p_out,  # [T, N, C_out, Ho * Wo] contiguous
    T,
    COG,  # output channels per group
    CG,  # input channels per group
    C_out,
    H,
    W,
    Wo,
    HWo,
    K,
    KHW,
    KW,
    SH,
    SW,
    PH,
    PW,
    stride_xt,
    stride_xn,
    stride_xc,
    stride_xh,
    stride_xw,
    stride_wp,
    stride_wn,
    stride_st,
    stride_bt,
    stride_ot,
    stride_on,
    stride_rt,  # 0 for a residual broadcast over the steps
    stride_rn,
    in_step,
    spike_step,
    levels_m1,
    P_CLASS,
    N_CLASS,
    MODE: tl.constexpr,
    QUANT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    CODES: tl.constexpr,
    IN_MASK: tl.constexpr,
    TERNARY: tl.constexpr,
    DOT_MODE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_CO: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # Axis 0 enumerates (image, position block): grid axis 0 allows 2^31 - 1 programs, axes
    # 1 and 2 only 65535, so the batch does not get an axis of its own.
    n_pblk = tl.cdiv(HWo, BLOCK_P)
    pid_n = tl.program_id(0) // n_pblk
    pid_p = tl.program_id(0) % n_pblk
    pid_c = tl.program_id(1)
    n_cblk = tl.cdiv(COG, BLOCK_CO)
    g = pid_c // n_cblk
    c0 = (pid_c % n_cblk) * BLOCK_CO

    # Output positions of this tile and the top-left corner of their input windows.
    o_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    m_p = o_p < HWo
    ih0 = (o_p // Wo) * SH - PH
    iw0 = (o_p % Wo) * SW - PW
    # Output channels (global index) of this tile.
    o_cg = c0 + tl.arange(0, BLOCK_CO)
    m_c = o_cg < COG
    o_co = g * COG + o_cg

    o_kk = tl.arange(0, BLOCK_K)
    o_wr = tl.arange(0, BLOCK_K // 32)
    o_bit = tl.arange(0, 32)
    p_xg = p_x + pid_n.to(tl.int64) * stride_xn + (g * CG).to(tl.int64) * stride_xc
    p_wg = p_words + o_co.to(tl.int64)[None, :] * stride_wn + o_wr[:, None]

    p_out_t = p_out + pid_n.to(tl.int64) * stride_on
    p_res_t = p_res + pid_n.to(tl.int64) * stride_rn
    off_out = o_co[None, :] * HWo + o_p[:, None]
    m_out = m_p[:, None] & m_c[None, :]
    p_sc_t = p_scale + o_co
    p_b_t = p_bias + o_co
    p_lam_t = p_decay + o_co
    p_th_t = p_th + o_co

    b_v = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
    for _t in range(0, T):
        if DOT_MODE == 4:
            acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.int32)
        else:
            acc = tl.zeros([BLOCK_P, BLOCK_CO], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            # Gather the [BLOCK_P, BLOCK_K] spike tile: k -> (ci, r, s) in the packed order.
            o_k = k0 + o_kk
            m_k = o_k < K
            ci = o_k // KHW
            rem = o_k % KHW
            ih = ih0[:, None] + (rem // KW)[None, :]
            iw = iw0[:, None] + (rem % KW)[None, :]
            m_a = m_p[:, None] & m_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            off_a = ci[None, :] * stride_xc + ih * stride_xh + iw * stride_xw
            b_a = tl.load(p_xg + off_a, mask=m_a, other=0)
            if CODES:
                b_a = b_a.to(tl.int32) & IN_MASK
            # Expand the [BLOCK_K // 32, BLOCK_CO] words to the [BLOCK_K, BLOCK_CO] -1/0/+1 tile.
            # Elements past K decode to -1 (padding bits are 0) but meet A's zeros.
            m_w = ((k0 + o_wr * 32) < K)[:, None] & m_c[None, :]
            b_w = tl.load(p_wg + k0 // 32, mask=m_w, other=0)
            b_s = 2 * ((b_w[:, None, :] >> o_bit[None, :, None]) & 1) - 1
            if TERNARY:
                b_nz = tl.load(p_wg + stride_wp + k0 // 32, mask=m_w, other=0)
                b_s = b_s * ((b_nz[:, None, :] >> o_bit[None, :, None]) & 1)
            b_b = tl.reshape(b_s, [BLOCK_K, BLOCK_CO])
            if DOT_MODE == 4:
                acc = tl.dot(b_a.to(tl.int8), b_b.to(tl.int8), acc, out_dtype=tl.int32)
            else:
                acc = _dot_acc(b_a.to(tl.float32), b_b.to(tl.float32), acc, DOT_MODE)

        # Epilogue: scale/bias, neuron, store step t.
        b_y = acc.to(tl.float32)
        if CODES:
            b_y = b_y * in_step
        b_y = b_y * tl.load(p_sc_t, mask=m_c, other=0.0)[None, :]
        if HAS_BIAS:
            b_y = b_y + tl.load(p_b_t, mask=m_c, other=0.0)[None, :]
        if HAS_RES:  # the residual join of a deployed block, before the neuron
            b_y = b_y + tl.load(p_res_t + off_out, mask=m_out, other=0.0).to(tl.float32)
        if MODE == 0:
            b_o = b_y
        else:
            b_th = tl.load(p_th_t, mask=m_c, other=0.0)[None, :]
            if MODE == 1:
                b_m = tl.load(p_lam_t, mask=m_c, other=0.0)[None, :] * b_v + b_y
            else:
                b_m = b_y
            b_d = b_m - b_th
            # relu written so NaN propagates (tl.maximum may drop it on the GPU)
            b_o = tl.where(b_d < 0.0, 0.0, b_d)
            if MODE == 1:  # v = m - s = min(m, θ): exactly θ after firing, NaN stays NaN
                b_v = tl.where(b_m > b_th, b_th, b_m)
            if QUANT:
                b_o = spike_code(b_o, spike_step, levels_m1)
                b_o = tl.where(b_o != b_o, 0.0, b_o)  # NaN has no code: 0, as the reference
        if QUANT:
            tl.store(p_out_t + off_out, b_o.to(tl.uint8), mask=m_out)
        else:
            tl.store(p_out_t + off_out, _to_out(b_o, p_out), mask=m_out)
        p_xg += stride_xt
        p_out_t += stride_ot
        p_res_t += stride_rt
        p_sc_t += stride_st
        p_b_t += stride_bt
        p_lam_t += C_out
        p_th_t += C_out


# ---------------------------------------------------------------------------------------- launcher


def dot_mode(x_dtype: torch.dtype, in_bits: int, interpret: bool) -> int:
    """The dot mode for spikes of `x_dtype` (see the module docstring)."""
    if x_dtype == torch.uint8:
        if in_bits <= 7:
            return DOT_I8
        return DOT_IEEE if interpret else DOT_FP16
    if interpret:
        return DOT_IEEE
    return {torch.float16: DOT_FP16, torch.bfloat16: DOT_TF32}.get(x_dtype, DOT_TF32_SPLIT)


def _fp32_rows(p: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[C] or [T, C] floating -> (fp32 with unit last stride, row stride: 0 for [C])."""
    if p.dtype != torch.float32 or p.stride(-1) != 1:
        p = p.to(torch.float32).contiguous()
    return p, (p.stride(0) if p.dim() == 2 else 0)


def _bconv_setup(
    x: torch.Tensor,
    words: torch.Tensor,
    wshape: tuple[int, int, int, int],
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    decay: torch.Tensor | None,
    threshold: torch.Tensor | None,
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
    in_step: float | None,
    in_bits: int = 8,
    parallel: bool,
    spike_bits: int | None,
    spike_step: float,
    out_dtype: torch.dtype,
    residual: torch.Tensor | None = None,
) -> tuple[tuple[int, ...], torch.dtype, object, dict | None]:
    """(output shape, output dtype, grid, kernel arguments but p_x / p_res / p_out) of a launch
    on validated inputs; the arguments are None when the output is empty (nothing to launch).
    A residual [T or 1, N, C_out, Ho, Wo] must have unit strides inside one image's
    [C_out, Ho * Wo] (see `_res_inner`); only its form is read here."""
    T, N, C_in, H, W = x.shape
    C_out, CG, kh, kw = wshape
    sh, sw = stride
    ph, pw = padding
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    HWo = Ho * Wo
    K = CG * kh * kw
    codes = x.dtype == torch.uint8
    quant = spike_bits is not None
    shape, odtype = (T, N, C_out, Ho, Wo), torch.uint8 if quant else out_dtype
    if T * N * C_out * HWo == 0:
        return shape, odtype, None, None
    if K == 0:
        raise ValueError("binary_conv_neuron: the packed weight has K = 0 input elements")
    # int32 offsets inside one image (input) and one (t, n) output slice.
    x_span = (C_in - 1) * x.stride(2) + (H - 1) * x.stride(3) + (W - 1) * x.stride(4)
    if x_span >= 2**31 or C_out * HWo >= 2**31:
        raise ValueError(
            f"one image is too large for int32 offsets (input span {x_span}, "
            f"output {C_out * HWo} elements)"
        )
    COG = C_out // groups
    # Grid axis 1 holds groups x channel blocks (at least 16 channels per block): at most 65535.
    if groups * _cdiv(COG, 16) > 65535:
        raise ValueError(f"too many channel blocks for one launch: groups={groups}, C_out={C_out}")
    if words.shape[-1] and words.stride(-1) != 1:
        words = words.contiguous()
    scale32, stride_st = _fp32_rows(scale)
    if bias is not None:
        bias32, stride_bt = _fp32_rows(bias)
    else:
        bias32, stride_bt = scale32, 0
    if threshold is None:
        mode = MODE_CURRENT
        th32 = lam32 = scale32
    else:
        th32 = threshold.to(torch.float32).contiguous()
        if parallel:
            mode, lam32 = MODE_PARALLEL, th32
        else:
            mode, lam32 = MODE_EMPF, decay.to(torch.float32).contiguous()

    def grid(meta):
        return (N * _cdiv(HWo, meta["BLOCK_P"]), groups * _cdiv(COG, meta["BLOCK_CO"]))

    args = dict(
        p_words=words,
        p_scale=scale32,
        p_bias=bias32,
        p_decay=lam32,
        p_th=th32,
        T=T,
        COG=COG,
        CG=CG,
        C_out=C_out,
        H=H,
        W=W,
        Wo=Wo,
        HWo=HWo,
        K=K,
        KHW=kh * kw,
        KW=kw,
        SH=sh,
        SW=sw,
        PH=ph,
        PW=pw,
        stride_xt=x.stride(0),
        stride_xn=x.stride(1),
        stride_xc=x.stride(2),
        stride_xh=x.stride(3),
        stride_xw=x.stride(4),
        stride_wp=words.stride(0),
        stride_wn=words.stride(1),
        stride_st=stride_st,
        stride_bt=stride_bt,
        stride_ot=N * C_out * HWo,
        stride_on=C_out * HWo,
        stride_rt=residual.stride(0) if residual is not None and residual.shape[0] > 1 else 0,
        stride_rn=residual.stride(1) if residual is not None else 0,
        in_step=float(in_step) if codes else 1.0,
        spike_step=float(spike_step),
        levels_m1=float(2**spike_bits - 1) if quant else 0.0,
        P_CLASS=size_class(HWo, 1024),
        N_CLASS=size_class(N, 64),
        MODE=mode,
        QUANT=quant,
        HAS_BIAS=bias is not None,
        HAS_RES=residual is not None,
        CODES=codes,
        IN_MASK=(1 << in_bits) - 1,
        TERNARY=words.shape[0] == 2,
        DOT_MODE=dot_mode(x.dtype, in_bits if codes else 8, INTERPRET),
    )
    return shape, odtype, grid, args


def _res_inner(residual: torch.Tensor | None) -> torch.Tensor | None:
    """The residual with the layout the kernel reads: each [C_out, Ho, Wo] image contiguous."""
    if residual is not None and residual.numel() and not residual[0, 0].is_contiguous():
        residual = residual.contiguous()
    return residual


def binary_conv_neuron_fwd(
    x: torch.Tensor, *args, residual: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """Launch the fused kernel on validated inputs (see `ops.binary_conv.binary_conv_neuron`;
    arguments as `_bconv_setup`).

    x: [T, N, C_in, H, W] uint8 codes (`in_step` given, codes read masked to `in_bits` bits) or
    float spikes; words: int32 [planes, C_out, ceil(K / 32)]; scale, bias: [C] or [T, C];
    decay, threshold: [T, C_out] or None; residual: None or a float [T or 1, N, C_out, Ho, Wo]
    added to the currents. Returns [T, N, C_out, Ho, Wo] contiguous.
    """
    residual = _res_inner(residual)
    shape, dtype, grid, args_ = _bconv_setup(x, *args, residual=residual, **kwargs)
    out = empty(shape, dtype, x.device)
    if args_ is not None:
        p_res = residual if residual is not None else out
        launch(_bconv_neuron_kernel, grid, dict(args_, p_x=x, p_res=p_res, p_out=out))
    return out


def binary_conv_neuron_plan(x: torch.Tensor, *args, residual: torch.Tensor | None = None, **kwargs):
    """`run(x2, residual2=None) -> out`, the same launch as `binary_conv_neuron_fwd(x, ...,
    residual=residual)` for inputs x2 (and residual2, given exactly when `residual` was) of the
    same dtype, shape, strides and device (the caller's promise: not checked). A residual whose
    images are not contiguous is copied to the layout the kernel reads on every call, as the
    op does (`_res_inner`). The arguments are built once (a `plan`, kernels/_launch.py)."""
    given = residual
    residual = _res_inner(residual)
    copy_res = residual is not given  # strides are promised equal: decided once, here
    shape, dtype, grid, args_ = _bconv_setup(x, *args, residual=residual, **kwargs)
    out = empty(shape, dtype, x.device)
    if args_ is None:  # nothing to launch: an empty output of the same form
        return lambda x2, residual2=None: empty(shape, dtype, x.device)
    if residual is None:
        run = plan(_bconv_neuron_kernel, grid, dict(args_, p_x=x, p_res=out, p_out=out), (x,),
                   (out,))  # fmt: skip
        return lambda x2, residual2=None: run(x2)[0]
    # a slot holder of the residual's form (the plan finds its slots by identity: x itself
    # may have been passed as the residual)
    res = torch.empty_strided(residual.shape, residual.stride(), dtype=residual.dtype,
                              device=residual.device)  # fmt: skip
    run2 = plan(_bconv_neuron_kernel, grid, dict(args_, p_x=x, p_res=res, p_out=out),
                (x, res), (out,))  # fmt: skip
    if copy_res:
        return lambda x2, residual2: run2(x2, residual2.contiguous())[0]
    return lambda x2, residual2: run2(x2, residual2)[0]
