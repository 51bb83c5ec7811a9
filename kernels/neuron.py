"""EM-PF neuron kernels: the fused multi-step membrane update (forward, backward), parallel neuron.

Layout: the current is viewed as [T, N] (contiguous); each program owns BLOCK neurons and walks
the T time steps itself, so one launch runs the whole sequence and the membrane stays in registers.

Parameters (decay λ, threshold θ) come in one of three forms, chosen per parameter (MODE):
0, a float passed as a kernel scalar (no tensor); 1, per step, a [TQ] tensor read at row t0 + t
(any stride: a 0-d parameter arrives expanded with stride 0, and a module's step t passes its
whole [T] vector with t0 = t); 2, per channel, a [T, C] tensor (strides as given; [1, C] arrives
expanded) where neuron n of a step belongs to channel (n // inner) % C, i.e. dim 1 of [N, C, *].
With LOGITS the tensors hold logits and the kernels apply the sigmoid, and the gradients they
return are the logits' gradients. A module's two logit vectors can travel as one stacked [2, TQ]
tensor (the launchers' `stacked`): both pointers are that tensor, the decay read at element
offset `d_off` (its row 1), so a call makes no view of either row.

Saved for backward (docs/model.md): the firing mask H = 1[m > θ] packed 8 neurons per byte,
[T, ⌈N/8⌉], and, only when the decay needs a gradient, the membrane after steps 0..T-2
([T-1, N]; v[-1] is v0, which the caller keeps). The single-step op is these kernels with T = 1.

Parameter gradients: per step, SUB-chunk partial sums [TQ, P] summed by one torch reduction (θ and
λ share one buffer and one reduction when both learn and have the same form); per
channel, per-neuron contributions [T, N] reduced per channel by one torch reduction. Both are
fixed-order, hence deterministic and independent of the autotuned block size.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import (
    cdiv as _cdiv,
)
from ._common import (
    empty,
    empty_like,
    load_param,
    pack_bits,
    param_inputs,
    pick_configs,
    size_class,
    spike_code,
    store_param_grad,
    unpack_bit,
    zero_partial_rows,
)
from ._launch import launch, plan

# Memory-bound elementwise kernels: the block size trades registers for fewer programs. The first
# config is the pinned one (interpreter / EMPF_AUTOTUNE=0): large, so the interpreter runs few
# programs.
CONFIGS = pick_configs(
    [
        triton.Config({"BLOCK": 1024}, num_warps=4),
        triton.Config({"BLOCK": 512}, num_warps=4),
        triton.Config({"BLOCK": 2048}, num_warps=8),
        triton.Config({"BLOCK": 256}, num_warps=2),
    ]
)
# Chunk size of the parameter-gradient partial sums (see _common.store_partials).
SUB = min(c.kwargs["BLOCK"] for c in CONFIGS)


@triton.autotune(
    configs=CONFIGS, key=["N_CLASS", "T_CLASS", "QUANT", "SAVE_V", "D_MODE", "TH_MODE"]
)
@triton.jit
def empf_fwd_kernel(
    p_cur,  # [T, N] input current
    p_v0,  # [N] initial membrane (read only if HAS_V0)
    p_decay,  # decay tensor (MODE 1 / 2)
    p_th,  # threshold tensor (MODE 1 / 2)
    p_ink,  # [T, C] input scale k (read only if AFFINE): the step's current is k I + b
    p_inb,  # [T, C] input bias b (read only if AFFINE), the strides of p_ink
    p_spk,  # [T, N] out: spikes
    p_vlast,  # [N] out: membrane after the last step
    p_mask,  # [T, NB] out: packed H bits (written only if SAVE_MASK)
    p_vhist,  # [T-1, N] out: membrane after steps 0..T-2 (written only if SAVE_V)
    N,
    NB,
    T,
    t0,
    d_off,  # element offset of the decay in p_decay (row 1 of a stacked [2, TQ] pair), or 0
    decay_c,
    th_c,
    sd_t,
    sd_c,
    sth_t,
    sth_c,
    sk_t,
    sk_c,
    C,
    INNER,
    step,
    levels_m1,
    N_CLASS,
    T_CLASS,
    HAS_V0: tl.constexpr,
    QUANT: tl.constexpr,
    SAVE_MASK: tl.constexpr,
    SAVE_V: tl.constexpr,
    D_MODE: tl.constexpr,
    TH_MODE: tl.constexpr,
    LOGITS: tl.constexpr,
    AFFINE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    o_b = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    m_b = o_b < NB
    if D_MODE == 2 or TH_MODE == 2 or AFFINE:
        o_ch = (o_n // INNER) % C
    else:
        o_ch = o_n
    p_decay += tl.cast(d_off, tl.int64)

    if HAS_V0:
        b_v = tl.load(p_v0 + o_n, mask=m_n, other=0.0).to(tl.float32)
    else:
        b_v = tl.zeros([BLOCK], dtype=tl.float32)

    # Row pointers advance by N (int64 pointer arithmetic): no t * N products that could overflow.
    p_cur_t = p_cur + o_n
    p_spk_t = p_spk + o_n
    p_vh_t = p_vhist + o_n
    p_mask_t = p_mask + o_b
    for t in range(0, T):
        b_lam = load_param(p_decay, decay_c, t0 + t, sd_t, sd_c, o_ch, m_n, D_MODE, LOGITS)
        b_th = load_param(p_th, th_c, t0 + t, sth_t, sth_c, o_ch, m_n, TH_MODE, LOGITS)
        b_i = tl.load(p_cur_t, mask=m_n, other=0.0).to(tl.float32)
        if AFFINE:  # k I + b (a deployed Mem-BN's affine map), the same two roundings as torch
            b_k = load_param(p_ink, 0.0, t0 + t, sk_t, sk_c, o_ch, m_n, 2, False)
            b_b = load_param(p_inb, 0.0, t0 + t, sk_t, sk_c, o_ch, m_n, 2, False)
            b_i = b_k * b_i + b_b
        b_m = b_lam * b_v + b_i
        b_d = b_m - b_th
        # relu written so NaN propagates (tl.maximum may drop it on the GPU)
        b_s = tl.where(b_d < 0.0, 0.0, b_d)
        # v = m - s = min(m, θ), exactly θ after firing (m - s would round); NaN stays NaN
        b_v = tl.where(b_m > b_th, b_th, b_m)
        if QUANT:
            b_out = spike_code(b_s, step, levels_m1) * step
        else:
            b_out = b_s
        tl.store(p_spk_t, b_out.to(p_spk.dtype.element_ty), mask=m_n)
        if SAVE_MASK:
            b_h = ((b_m > b_th) & m_n).to(tl.int32)
            tl.store(p_mask_t, pack_bits(b_h, BLOCK), mask=m_b)
        if SAVE_V:
            if t < T - 1:
                tl.store(p_vh_t, b_v.to(p_vhist.dtype.element_ty), mask=m_n)
        p_cur_t += N
        p_spk_t += N
        p_vh_t += N
        p_mask_t += NB
    tl.store(p_vlast + o_n, b_v.to(p_vlast.dtype.element_ty), mask=m_n)


@triton.autotune(
    configs=CONFIGS, key=["N_CLASS", "T_CLASS", "BPTT", "NEED_DDECAY", "D_MODE", "TH_MODE"]
)
@triton.jit
def empf_bwd_kernel(
    p_g,  # [T, N] dL/dspikes (read only if HAS_G)
    p_gv,  # [N] dL/dv_last (read only if HAS_GV)
    p_mask,  # [T, NB] packed H bits
    p_vhist,  # [T-1, N] membrane after steps 0..T-2 (read only if NEED_DDECAY)
    p_v0,  # [N] initial membrane (read only if NEED_DDECAY and HAS_V0)
    p_decay,  # decay tensor (MODE 1 / 2)
    p_th,  # threshold tensor (MODE 1 / 2; read only with LOGITS)
    p_dcur,  # [T, N] out: dL/dcurrent
    p_dv0,  # [N] out: dL/dv0 (written only if NEED_DV0)
    p_dth,  # out: dL/dθ partials [TQ, P] (MODE 1) or contributions [T, N] (MODE 2)
    p_ddecay,  # out: the same for dL/dλ (only if NEED_DDECAY), at element offset dd_off
    dd_off,  # 0, or where λ's half starts when both share one [2, ...] buffer (p_ddecay = p_dth)
    N,
    NB,
    T,
    P,
    t0,
    d_off,  # element offset of the decay in p_decay (row 1 of a stacked [2, TQ] pair), or 0
    TQ_D,
    TQ_TH,
    decay_c,
    sd_t,
    sd_c,
    sth_t,
    sth_c,
    C,
    INNER,
    N_CLASS,
    T_CLASS,
    HAS_G: tl.constexpr,
    HAS_GV: tl.constexpr,
    HAS_V0: tl.constexpr,
    BPTT: tl.constexpr,
    NEED_DDECAY: tl.constexpr,
    NEED_DTH: tl.constexpr,
    NEED_DV0: tl.constexpr,
    D_MODE: tl.constexpr,
    TH_MODE: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    if D_MODE == 2 or TH_MODE == 2:
        o_ch = (o_n // INNER) % C
    else:
        o_ch = o_n
    p_ddecay += tl.cast(dd_off, tl.int64)
    p_decay += tl.cast(d_off, tl.int64)

    # dL/dv[t], carried backwards in time. Online mode keeps only the v_last term at t = T-1.
    if HAS_GV:
        b_dv = tl.load(p_gv + o_n, mask=m_n, other=0.0).to(tl.float32)
    else:
        b_dv = tl.zeros([BLOCK], dtype=tl.float32)

    # tl.cast: an integer argument equal to 1 is specialised to a Python int (no .to()).
    last = tl.cast(T, tl.int64) - 1
    p_g_t = p_g + last * N + o_n
    p_dcur_t = p_dcur + last * N + o_n
    p_vh_t = p_vhist + (last - 1) * N + o_n
    p_mask_t = p_mask + last * NB
    for i in range(0, T):
        t = T - 1 - i
        b_h = unpack_bit(p_mask_t, o_n, m_n).to(tl.float32)
        if HAS_G:
            b_g = tl.load(p_g_t, mask=m_n, other=0.0).to(tl.float32)
        else:
            b_g = tl.zeros([BLOCK], dtype=tl.float32)
        b_gh = b_g * b_h
        b_dvh = b_dv * b_h
        b_dm = b_gh + (b_dv - b_dvh)
        tl.store(p_dcur_t, b_dm.to(p_dcur.dtype.element_ty), mask=m_n)
        if NEED_DTH:
            b_dth = b_dvh - b_gh
            if LOGITS:
                b_thv = load_param(p_th, 0.0, t0 + t, sth_t, sth_c, o_ch, m_n, TH_MODE, True)
                b_dth = b_dth * (b_thv * (1.0 - b_thv))
            store_param_grad(p_dth, b_dth, t0 + t, t, pid, o_n, m_n, N, P, TH_MODE, BLOCK, SUB)
        if NEED_DDECAY or BPTT:
            b_lam = load_param(p_decay, decay_c, t0 + t, sd_t, sd_c, o_ch, m_n, D_MODE, LOGITS)
        if NEED_DDECAY:
            # v[t-1]: the saved history for t >= 1, v0 (or zeros) for t = 0.
            if t > 0:
                b_vp = tl.load(p_vh_t, mask=m_n, other=0.0).to(tl.float32)
            elif HAS_V0:
                b_vp = tl.load(p_v0 + o_n, mask=m_n, other=0.0).to(tl.float32)
            else:
                b_vp = tl.zeros([BLOCK], dtype=tl.float32)
            b_dlam = b_dm * b_vp
            if not HAS_G and not BPTT:
                # online without dL/dspikes only the last step reaches the loss (through
                # v_last); elsewhere λ_t has no path, and 0 * an infinite v[t-1] is no NaN
                b_dlam = tl.where(t == last, b_dlam, 0.0)
            if LOGITS:
                b_dlam = b_dlam * (b_lam * (1.0 - b_lam))
            store_param_grad(p_ddecay, b_dlam, t0 + t, t, pid, o_n, m_n, N, P, D_MODE, BLOCK, SUB)
        if BPTT:
            b_dv = b_lam * b_dm
        else:
            b_dv = tl.zeros([BLOCK], dtype=tl.float32)
        p_g_t -= N
        p_dcur_t -= N
        p_vh_t -= N
        p_mask_t -= NB
    if NEED_DV0:
        tl.store(p_dv0 + o_n, b_dv.to(p_dv0.dtype.element_ty), mask=m_n)
    if NEED_DTH and TH_MODE == 1:
        zero_partial_rows(p_dth, pid, P, TQ_TH, t0, T, BLOCK, SUB)
    if NEED_DDECAY and D_MODE == 1:
        zero_partial_rows(p_ddecay, pid, P, TQ_D, t0, T, BLOCK, SUB)


@triton.autotune(configs=CONFIGS, key=["N_CLASS", "QUANT", "TH_MODE"])
@triton.jit
def parallel_fwd_kernel(
    p_cur,  # [T, N]
    p_th,  # threshold tensor (MODE 1 / 2)
    p_spk,  # [T, N] out
    p_mask,  # [T, NB] out: packed H bits (only if SAVE_MASK)
    N,
    NB,
    t0,
    th_c,
    sth_t,
    sth_c,
    C,
    INNER,
    step,
    levels_m1,
    N_CLASS,
    QUANT: tl.constexpr,
    SAVE_MASK: tl.constexpr,
    TH_MODE: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid (blocks over N, T): no state, so the time steps run in parallel
    pid = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    if TH_MODE == 2:
        o_ch = (o_n // INNER) % C
    else:
        o_ch = o_n
    b_th = load_param(p_th, th_c, t0 + t, sth_t, sth_c, o_ch, m_n, TH_MODE, LOGITS)
    b_i = tl.load(p_cur + t * N + o_n, mask=m_n, other=0.0).to(tl.float32)
    b_d = b_i - b_th
    b_s = tl.where(b_d < 0.0, 0.0, b_d)
    if QUANT:
        b_s = spike_code(b_s, step, levels_m1) * step
    tl.store(p_spk + t * N + o_n, b_s.to(p_spk.dtype.element_ty), mask=m_n)
    if SAVE_MASK:
        o_b = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        b_h = ((b_i > b_th) & m_n).to(tl.int32)
        tl.store(p_mask + t * NB + o_b, pack_bits(b_h, BLOCK), mask=o_b < NB)


@triton.autotune(configs=CONFIGS, key=["N_CLASS", "TH_MODE"])
@triton.jit
def parallel_bwd_kernel(
    p_g,  # [T, N]
    p_mask,  # [T, NB]
    p_th,  # threshold tensor (read only with LOGITS)
    p_dcur,  # [T, N] out
    p_dth,  # out: dL/dθ partials [TQ, P] (MODE 1) or contributions [T, N] (MODE 2)
    N,
    NB,
    P,
    T,
    t0,
    TQ,
    sth_t,
    sth_c,
    C,
    INNER,
    N_CLASS,
    NEED_DTH: tl.constexpr,
    TH_MODE: tl.constexpr,
    LOGITS: tl.constexpr,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_h = unpack_bit(p_mask + t * NB, o_n, m_n).to(tl.float32)
    b_gh = tl.load(p_g + t * N + o_n, mask=m_n, other=0.0).to(tl.float32) * b_h
    tl.store(p_dcur + t * N + o_n, b_gh.to(p_dcur.dtype.element_ty), mask=m_n)
    if NEED_DTH:
        b_dth = -b_gh
        if LOGITS:
            if TH_MODE == 2:
                o_ch = (o_n // INNER) % C
            else:
                o_ch = o_n
            b_thv = load_param(p_th, 0.0, t0 + t, sth_t, sth_c, o_ch, m_n, TH_MODE, True)
            b_dth = b_dth * (b_thv * (1.0 - b_thv))
        store_param_grad(p_dth, b_dth, t0 + t, t, pid, o_n, m_n, N, P, TH_MODE, BLOCK, SUB)
        if TH_MODE == 1:
            # program (pid, 0) zeroes the rows outside [t0, t0 + T) of its columns
            if t == 0:
                zero_partial_rows(p_dth, pid, P, TQ, t0, T, BLOCK, SUB)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are contiguous [T, *] tensors, read as [T, N] (N = numel / T); with
# `step_input=True` the current is one step [*] (T = 1). Outputs take the input's shape, so the
# ops need no reshape (a view of a tensor that requires grad is a node in the autograd graph).
# A parameter is a float (MODE 0), a 1-D tensor read at row t0 + t (MODE 1) or a 2-D [T, C]
# tensor read per channel (MODE 2), any strides.
#
# Host time (the GPU runs showed the calls, not the kernels, cost the time): launches go through
# `_launch.launch`, which skips Triton's per-call Python once a signature has been launched, and
# nothing is allocated that is not written.


def _levels_m1(spike_bits: int | None) -> float:
    return float(2**spike_bits - 1) if spike_bits is not None else 0.0


def _param(p, name: str, row: int | None = None) -> tuple[int, float, int, int, int, int]:
    """(MODE, scalar value, stride over time, stride over channels, element offset, TQ) of a
    parameter; TQ is the number of per-step rows of a MODE 1 tensor. With `row`, p is a stacked
    [R, TQ] tensor (a module's logits) and the parameter is its row `row`, read per step where
    it lies (no view of the row is made)."""
    if not isinstance(p, torch.Tensor):
        return 0, float(p), 0, 0, 0, 0
    if row is not None and p.dim() == 2:
        return 1, 0.0, p.stride(1), 0, row * p.stride(0), p.shape[1]
    if p.dim() == 1:
        return 1, 0.0, p.stride(0), 0, 0, p.shape[0]
    if p.dim() == 2:
        return 2, 0.0, (p.stride(0) if p.shape[0] > 1 else 0), p.stride(1), 0, 0
    raise ValueError(f"{name} must be a float, a 1-D or a 2-D tensor, got shape {tuple(p.shape)}")


def _grad_shape(tq: int, mode: int, T: int, N: int, P: int) -> tuple[int, int]:
    return (tq, P) if mode == 1 else (T, N)


def _grad_buffer(tq: int, mode: int, T: int, N: int, P: int, device) -> torch.Tensor:
    return empty(_grad_shape(tq, mode, T, N, P), torch.float32, device)


def _finish_grad(buf: torch.Tensor, mode: int, C: int, inner: int):
    """The [TQ] (MODE 1) or [T, C] (MODE 2) fp32 gradient from the kernel's buffer, [2, ...] for
    a stacked pair (one fixed-order torch reduction)."""
    lead = buf.shape[:-2]  # () or (2,) for two parameters reduced together
    if mode == 1:
        return buf.sum(-1)
    T, N = buf.shape[-2:]
    return buf.view(*lead, T, N // (C * inner), C, inner).sum((-3, -1))


def empf_fwd(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor | float,
    threshold: torch.Tensor | float,
    spike_bits: int | None,
    spike_step: float,
    save_mask: bool,
    save_v: bool,
    *,
    t0: int = 0,
    logits: bool = False,
    channels: int = 1,
    inner: int = 1,
    step_input: bool = False,
    bind: bool = False,
    in_scale: torch.Tensor | None = None,
    in_bias: torch.Tensor | None = None,
    stacked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run all T steps (see the module docstring for the parameter forms).

    `stacked`: decay and threshold are one [2, TQ] tensor (a module's logits), θ's row 0 and
    λ's row 1, each read per step in place.

    Returns (spikes [T, *], v_last [*], mask [T, ⌈N/8⌉] uint8, vhist [T-1, N]) for a contiguous
    current [T, *]; with `step_input` the current is one step [*] and spikes and v_last are [*].
    `in_scale`, `in_bias`: per-channel [T, C] tensors of the same strides (`channels` = C): each
    step's current enters as `k I + b` (inference: no gradient flows to k or b).
    """
    shape = current.shape
    T = 1 if step_input else shape[0]
    N = current.numel() // T
    NB = _cdiv(N, 8)
    dev = current.device
    d_mode, d_c, sd_t, sd_c, d_off, _ = _param(decay, "decay", 1 if stacked else None)
    th_mode, th_c, sth_t, sth_c, _, _ = _param(threshold, "threshold", 0 if stacked else None)
    affine = in_scale is not None
    sk_t, sk_c = _param(in_scale, "in_scale")[2:4] if affine else (0, 0)
    # empty_like where the shape matches (cheaper than empty); outputs must be contiguous.
    dense = current.is_contiguous()
    spikes = empty_like(current) if dense else empty(shape, current.dtype, dev)
    if step_input:
        v_last = empty_like(spikes)
    elif v0 is not None and v0.dtype == current.dtype and v0.is_contiguous():
        v_last = empty_like(v0)
    else:
        v_last = empty(shape[1:], current.dtype, dev)
    mask = empty((T, NB), torch.uint8, dev) if save_mask else spikes  # dummy pointer when unused
    save_v = save_v and T > 1
    vhist = empty((T - 1, N), current.dtype, dev) if save_v else spikes
    grid = lambda meta: (_cdiv(N, meta["BLOCK"]),)  # noqa: E731
    args = dict(
        p_cur=current,
        p_v0=v0 if v0 is not None else current,
        p_decay=decay if d_mode else current,
        p_th=threshold if th_mode else current,
        p_ink=in_scale if affine else current,
        p_inb=in_bias if affine else current,
        p_spk=spikes,
        p_vlast=v_last,
        p_mask=mask,
        p_vhist=vhist,
        N=N,
        NB=NB,
        T=T,
        t0=t0,
        d_off=d_off,
        decay_c=d_c,
        th_c=th_c,
        sd_t=sd_t,
        sd_c=sd_c,
        sth_t=sth_t,
        sth_c=sth_c,
        sk_t=sk_t,
        sk_c=sk_c,
        C=channels,
        INNER=inner,
        step=float(spike_step),
        levels_m1=_levels_m1(spike_bits),
        N_CLASS=size_class(N),
        T_CLASS=size_class(T),
        HAS_V0=v0 is not None,
        QUANT=spike_bits is not None,
        SAVE_MASK=save_mask,
        SAVE_V=save_v,
        D_MODE=d_mode,
        TH_MODE=th_mode,
        LOGITS=logits,
        AFFINE=affine,
    )
    if bind:  # for empf_fwd_plan: the launch's grid and arguments, not run
        return grid, args
    launch(empf_fwd_kernel, grid, args)
    return spikes, v_last, (mask if save_mask else None), (vhist if save_v else None)


def empf_bwd(
    g: torch.Tensor | None,
    gv: torch.Tensor | None,
    mask: torch.Tensor,
    vhist: torch.Tensor | None,
    v0: torch.Tensor | None,
    decay: torch.Tensor | float | None,
    N: int,
    dtype: torch.dtype,
    bptt: bool,
    need_ddecay: bool,
    need_dv0: bool,
    *,
    threshold: torch.Tensor | float | None = None,
    need_dthreshold: bool = True,
    t0: int = 0,
    logits: bool = False,
    channels: int = 1,
    inner: int = 1,
    stack_param_grads: bool = False,
    dcur_shape: tuple[int, ...] | None = None,
    dv0_shape: tuple[int, ...] | None = None,
    bind: bool = False,
    stacked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reverse-time pass. Returns (dcurrent [T, N], dv0 [N], dthreshold, ddecay): the tensors in
    `dtype`, the parameter gradients fp32 in the parameter's shape ([TQ] or [T, C]).

    `decay` is needed in bptt mode, for its gradient and with logits (else a float or None);
    `threshold` is a tensor when its gradient is needed, else a float. A None threshold is the
    old positional form: a [T] per-step gradient comes back whatever `need_dthreshold` says.
    When both parameter gradients are needed and the parameters have the same form and shape (a
    module's two [T] logit vectors), both partial-sum buffers share one allocation and one
    reduction (one launch less); with `stack_param_grads` the result then comes back as one
    [2, *shape] tensor (θ's gradient, λ's gradient) in the dthreshold slot and None for ddecay,
    else as two views of it.
    dcurrent has the shape `dcur_shape` (any shape of T * N elements; default [T, N]), dv0 the
    shape `dv0_shape` (N elements; default [N]).
    `stacked`: decay and threshold are one [2, TQ] tensor, as in `empf_fwd` (both gradients
    wanted then come back as the stacked pair too)."""
    T = mask.shape[0]
    dev = mask.device
    need_dthreshold = need_dthreshold and isinstance(threshold, torch.Tensor)
    if threshold is None:  # the old positional form: a [T] per-step gradient
        threshold, need_dthreshold = torch.empty((T,), device="meta"), True
    d_row, th_row = (1, 0) if stacked else (None, None)
    d_mode, d_c, sd_t, sd_c, d_off, tq_d = _param(
        decay if decay is not None else 0.0, "decay", d_row
    )
    th_mode, _, sth_t, sth_c, _, tq_th = _param(threshold, "threshold", th_row)
    P = _cdiv(N, SUB)
    dshape = dcur_shape if dcur_shape is not None else (T, N)
    if g is not None and g.dtype == dtype and g.shape == dshape and g.is_contiguous():
        dcur = empty_like(g)
    else:
        dcur = empty(dshape, dtype, dev)
    dv0 = empty(dv0_shape or (N,), dtype, dev) if need_dv0 else dcur
    joint = need_dthreshold and need_ddecay and th_mode == d_mode
    joint = joint and (stacked or threshold.shape == decay.shape)
    dd_off = 0
    if joint:  # one buffer, λ's half at dd_off (a view per call would cost as much as a buffer)
        both = empty((2, *_grad_shape(tq_d, d_mode, T, N, P)), torch.float32, dev)
        dth = ddec = both
        dd_off = both.numel() // 2
    else:
        dth = _grad_buffer(tq_th, th_mode, T, N, P, dev) if need_dthreshold else dcur
        ddec = _grad_buffer(tq_d, d_mode, T, N, P, dev) if need_ddecay else dcur
    grid = lambda meta: (_cdiv(N, meta["BLOCK"]),)  # noqa: E731
    args = dict(
        p_g=g if g is not None else dcur,
        p_gv=gv if gv is not None else dcur,
        p_mask=mask,
        p_vhist=vhist if vhist is not None else dcur,
        p_v0=v0 if v0 is not None else dcur,
        p_decay=decay if d_mode else dcur,
        p_th=threshold if (th_mode and threshold.device == dev) else dcur,
        p_dcur=dcur,
        p_dv0=dv0,
        p_dth=dth,
        p_ddecay=ddec,
        dd_off=dd_off,
        N=N,
        NB=mask.shape[1],
        T=T,
        P=P,
        t0=t0,
        d_off=d_off,
        TQ_D=tq_d if d_mode else T,
        TQ_TH=tq_th if th_mode else T,
        decay_c=d_c,
        sd_t=sd_t,
        sd_c=sd_c,
        sth_t=sth_t,
        sth_c=sth_c,
        C=channels,
        INNER=inner,
        N_CLASS=size_class(N),
        T_CLASS=size_class(T),
        HAS_G=g is not None,
        HAS_GV=gv is not None,
        HAS_V0=v0 is not None,
        BPTT=bptt,
        NEED_DDECAY=need_ddecay,
        NEED_DTH=need_dthreshold,
        NEED_DV0=need_dv0,
        D_MODE=d_mode,
        TH_MODE=th_mode,
        LOGITS=logits,
        SUB=SUB,
    )
    # no tensors in `form`: a plan keeps it, and it must not hold the first call's parameters
    form = (joint, need_dv0, need_dthreshold, need_ddecay, d_mode, th_mode, channels, inner,
            stack_param_grads)  # fmt: skip
    if bind:  # for empf_bwd_plan: the launch's grid and arguments and the finish, not run
        return grid, args, functools.partial(_bwd_finish, *form), (both if joint else None)
    launch(empf_bwd_kernel, grid, args)
    return _bwd_finish(*form, dcur, dv0, dth, ddec, both if joint else None)


def _bwd_finish(joint, need_dv0, need_dth, need_ddecay, d_mode, th_mode, C, inner, stack, dcur,
                dv0, dth, ddec, both):  # fmt: skip
    """What `empf_bwd` returns from its buffers after the launch: dv0 where wanted, and the
    parameter gradients reduced from their partial sums (one [2, ...] pair when joint)."""
    dv0 = dv0 if need_dv0 else None
    if joint:
        sums = _finish_grad(both, d_mode, C, inner)
        if stack:
            return dcur, dv0, sums, None
        dthr, ddecay = sums.unbind(0)
        return dcur, dv0, dthr, ddecay
    dthr = _finish_grad(dth, th_mode, C, inner) if need_dth else None
    ddecay = _finish_grad(ddec, d_mode, C, inner) if need_ddecay else None
    return dcur, dv0, dthr, ddecay


def parallel_fwd(
    current: torch.Tensor,
    threshold: torch.Tensor | float,
    spike_bits: int | None,
    spike_step: float,
    save_mask: bool,
    *,
    t0: int = 0,
    logits: bool = False,
    channels: int = 1,
    inner: int = 1,
    step_input: bool = False,
    bind: bool = False,
    stacked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stateless neuron on a contiguous [T, *] current (one step [*] with `step_input`).
    Returns (spikes in the current's shape, mask [T, ⌈N/8⌉] uint8 or None). `stacked`: the
    threshold is a [1, TQ] tensor (a module's logits) read per step from its row 0."""
    T = 1 if step_input else current.shape[0]
    N = current.numel() // T
    NB = _cdiv(N, 8)
    th_mode, th_c, sth_t, sth_c, _, _ = _param(threshold, "threshold", 0 if stacked else None)
    dense = current.is_contiguous()
    spikes = empty_like(current) if dense else empty(current.shape, current.dtype, current.device)
    mask = empty((T, NB), torch.uint8, current.device) if save_mask else spikes
    grid = lambda meta: (_cdiv(N, meta["BLOCK"]), T)  # noqa: E731
    args = dict(
        p_cur=current,
        p_th=threshold if th_mode else current,
        p_spk=spikes,
        p_mask=mask,
        N=N,
        NB=NB,
        t0=t0,
        th_c=th_c,
        sth_t=sth_t,
        sth_c=sth_c,
        C=channels,
        INNER=inner,
        step=float(spike_step),
        levels_m1=_levels_m1(spike_bits),
        N_CLASS=size_class(N),
        QUANT=spike_bits is not None,
        SAVE_MASK=save_mask,
        TH_MODE=th_mode,
        LOGITS=logits,
    )
    if bind:  # for parallel_fwd_plan
        return grid, args
    launch(parallel_fwd_kernel, grid, args)
    return spikes, (mask if save_mask else None)


def parallel_bwd(
    g: torch.Tensor,
    mask: torch.Tensor,
    N: int,
    *,
    threshold: torch.Tensor | None = None,
    need_dthreshold: bool = True,
    t0: int = 0,
    logits: bool = False,
    channels: int = 1,
    inner: int = 1,
    bind: bool = False,
    stacked: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns (dcurrent in g's shape and dtype, dthreshold fp32 in the threshold's shape or
    None; [TQ] for a `stacked` [1, TQ] threshold, see `parallel_fwd`). g is contiguous, [T, N]
    or any shape of T * N elements."""
    T = mask.shape[0]
    if threshold is None:  # the old form: a [T] per-step gradient
        threshold = torch.empty((T,), device="meta")
    th_mode, _, sth_t, sth_c, _, tq = _param(threshold, "threshold", 0 if stacked else None)
    need_dthreshold = need_dthreshold and th_mode > 0
    P = _cdiv(N, SUB)
    dcur = empty_like(g) if g.is_contiguous() else empty(g.shape, g.dtype, g.device)
    dth = _grad_buffer(tq, th_mode, T, N, P, g.device) if need_dthreshold else dcur
    grid = lambda meta: (_cdiv(N, meta["BLOCK"]), T)  # noqa: E731
    args = dict(
        p_g=g,
        p_mask=mask,
        p_th=threshold if threshold.device == g.device else dcur,
        p_dcur=dcur,
        p_dth=dth,
        N=N,
        NB=mask.shape[1],
        P=P,
        T=T,
        t0=t0,
        TQ=tq if th_mode else T,
        sth_t=sth_t,
        sth_c=sth_c,
        C=channels,
        INNER=inner,
        N_CLASS=size_class(N),
        NEED_DTH=need_dthreshold,
        TH_MODE=th_mode,
        LOGITS=logits,
        SUB=SUB,
    )
    form = (need_dthreshold, th_mode, channels, inner)  # no tensors: a plan keeps it
    if bind:  # for parallel_bwd_plan
        return grid, args, functools.partial(_parallel_finish, *form)
    launch(parallel_bwd_kernel, grid, args)
    return _parallel_finish(*form, dcur, dth)


def _parallel_finish(need_dth, th_mode, C, inner, dcur, dth):
    """What `parallel_bwd` returns from its buffers after the launch."""
    return dcur, (_finish_grad(dth, th_mode, C, inner) if need_dth else None)


# ---------------------------------------------------------------------------------------- plans
#
# A plan is one launcher call with everything but its tensors worked out once: the launcher runs
# with `bind=True` (arguments built, nothing launched), and each later call of the same form
# allocates the outputs, puts its tensors in the slots the first call's tensors held (the inputs,
# the parameter tensors of a training plan, the outputs, and the unused pointer slots the
# launcher filled with one of them) and launches through a `BoundLaunch`. Callers key plans on
# everything else (shapes, dtypes, flags, the parameters' forms: a float by value, a tensor by
# shape and strides); a training plan takes each call's parameter tensors, an inference plan
# keeps the ones it was made with.


def empf_fwd_plan(
    current: torch.Tensor,
    decay: torch.Tensor | float,
    threshold: torch.Tensor | float,
    spike_bits: int | None,
    spike_step: float,
    *,
    channels: int = 1,
    inner: int = 1,
    in_scale: torch.Tensor | None = None,
    in_bias: torch.Tensor | None = None,
):
    """`run(current2) -> (spikes, v_last)`: `empf_fwd(current, None, decay, threshold, ...)`
    with nothing saved for backward (inference), for contiguous inputs of current's shape,
    dtype and device (not checked); the parameters are the ones given here."""
    grid, args = empf_fwd(
        current, None, decay, threshold, spike_bits, spike_step, False, False, bind=True,
        channels=channels, inner=inner, in_scale=in_scale, in_bias=in_bias,
    )  # fmt: skip
    return plan(empf_fwd_kernel, grid, args, (current,), (args["p_spk"], args["p_vlast"]))


def empf_fwd_train_plan(current, v0, decay, threshold, *args, stacked: bool = False, **kwargs):
    """`run(current2, v02, decay2, threshold2) -> (spikes, v_last, mask, vhist)`:
    `empf_fwd(current, v0, decay, threshold, *args, **kwargs)` for contiguous inputs and
    parameters of the same forms (not checked): v02 None where v0 is None, decay2 and threshold2
    each call's parameter tensors (see `_common.param_inputs`: None for a float)."""
    grid, args = empf_fwd(current, v0, decay, threshold, *args, bind=True, stacked=stacked,
                          **kwargs)  # fmt: skip
    outputs = (
        args["p_spk"],
        args["p_vlast"],
        args["p_mask"] if args["SAVE_MASK"] else None,
        args["p_vhist"] if args["SAVE_V"] else None,
    )
    inputs = (current, v0, *param_inputs(decay, threshold, stacked))
    return plan(empf_fwd_kernel, grid, args, inputs, outputs)


def empf_bwd_plan(g, gv, mask, vhist, v0, decay, *args, stacked: bool = False, **kwargs):
    """`run(g2, gv2, mask2, vhist2, v02, decay2, threshold2) -> empf_bwd(g, gv, mask, vhist,
    v0, decay, *args, **kwargs)'s result` for later calls of the same forms (contiguous; the
    same ones None; not checked); decay2 and threshold2 as in `empf_fwd_train_plan`."""
    grid, args, finish, both = empf_bwd(g, gv, mask, vhist, v0, decay, *args, bind=True,
                                        stacked=stacked, **kwargs)  # fmt: skip
    need_dv0 = args["NEED_DV0"]
    dcur, dv0, dth, ddec = args["p_dcur"], args["p_dv0"], args["p_dth"], args["p_ddecay"]
    inputs = (g, gv, mask, vhist, v0, *param_inputs(decay, kwargs.get("threshold"), stacked))
    # The per-call buffers: dcur, dv0 when wanted, and the partial sums (each wanted one, or
    # one [2, ...] buffer in both slots when joint); the unwanted slots hold dcur.
    if both is None:
        launch_run = plan(
            empf_bwd_kernel, grid, args, inputs,
            (dcur, dv0 if need_dv0 else None, _own(dth, dcur), _own(ddec, dcur)),
        )  # fmt: skip

        def run(*ins):
            dcur2, dv02, dth2, ddec2 = launch_run(*ins)
            return finish(dcur2, dv02, dth2, ddec2, None)

        return run
    joint_run = plan(empf_bwd_kernel, grid, args, inputs, (dcur, dv0 if need_dv0 else None, both))

    def run_joint(*ins):
        dcur2, dv02, both2 = joint_run(*ins)
        return finish(dcur2, dv02, None, None, both2)

    return run_joint


def _own(t: torch.Tensor, dummy: torch.Tensor) -> torch.Tensor | None:
    """t, unless it is the dummy (an unused slot): None, so the plan does not allocate it."""
    return None if t is dummy else t


def parallel_fwd_plan(
    current: torch.Tensor,
    threshold: torch.Tensor | float,
    spike_bits: int | None,
    spike_step: float,
    *,
    channels: int = 1,
    inner: int = 1,
):
    """`run(current2) -> spikes`, as `empf_fwd_plan` for `parallel_fwd` (inference)."""
    grid, args = parallel_fwd(current, threshold, spike_bits, spike_step, False, bind=True,
                              channels=channels, inner=inner)  # fmt: skip
    run = plan(parallel_fwd_kernel, grid, args, (current,), (args["p_spk"],))
    return lambda cur: run(cur)[0]


def parallel_fwd_train_plan(
    current: torch.Tensor,
    threshold: torch.Tensor | float,
    spike_bits: int | None,
    spike_step: float,
    save_mask: bool,
    **kwargs,
):
    """`run(current2, threshold2) -> (spikes, mask)`: `parallel_fwd` with these arguments for a
    contiguous current and a threshold of the same forms (not checked; threshold2 each call's
    threshold tensor, None for a float). kwargs: parallel_fwd's keyword arguments."""
    grid, args = parallel_fwd(
        current, threshold, spike_bits, spike_step, save_mask, bind=True, **kwargs
    )
    outputs = (args["p_spk"], args["p_mask"] if args["SAVE_MASK"] else None)
    inputs = (current, param_inputs(threshold, None, False)[0])
    return plan(parallel_fwd_kernel, grid, args, inputs, outputs)


def parallel_bwd_plan(g: torch.Tensor, mask: torch.Tensor, N: int, **kwargs):
    """`run(g2, mask2, threshold2) -> (dcurrent, dthreshold)`: `parallel_bwd` for later calls of
    the same forms (not checked; threshold2 as in `parallel_fwd_train_plan`). kwargs:
    parallel_bwd's keyword arguments."""
    grid, args, finish = parallel_bwd(g, mask, N, bind=True, **kwargs)
    dcur, dth = args["p_dcur"], args["p_dth"]
    inputs = (g, mask, param_inputs(kwargs.get("threshold"), None, False)[0])
    run = plan(parallel_bwd_kernel, grid, args, inputs, (dcur, _own(dth, dcur)))

    def run_finish(g2, mask2, th2):
        dcur2, dth2 = run(g2, mask2, th2)
        return finish(dcur2, dth2)

    return run_finish
