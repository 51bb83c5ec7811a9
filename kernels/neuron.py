"""EM-PF neuron kernels: the fused multi-step membrane update (forward, backward), parallel neuron.

Layout: the current is viewed as [T, N] (contiguous); each program owns BLOCK neurons and walks
the T time steps itself, so one launch runs the whole sequence and the membrane stays in registers.

Saved for backward (EMPF.md §1): the firing mask H = 1[m > θ] packed 8 neurons per byte, [T, ⌈N/8⌉],
and, only when the decay needs a gradient, the membrane after steps 0..T-2 ([T-1, N]; v[-1] is v0,
which the caller keeps). The single-step op is these kernels with T = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    empty,
    launch_options,
    pack_bits,
    pick_configs,
    spike_code,
    store_partials,
    unpack_bit,
)

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


@triton.autotune(configs=CONFIGS, key=["N", "T", "QUANT", "SAVE_V"])
@triton.jit
def empf_fwd_kernel(
    p_cur,  # [T, N] input current
    p_v0,  # [N] initial membrane (read only if HAS_V0)
    p_decay,  # [T] fp32
    p_th,  # [T] fp32
    p_spk,  # [T, N] out: spikes
    p_vlast,  # [N] out: membrane after the last step
    p_mask,  # [T, NB] out: packed H bits (written only if SAVE_MASK)
    p_vhist,  # [T-1, N] out: membrane after steps 0..T-2 (written only if SAVE_V)
    N,
    NB,
    T,
    step,
    levels_m1,
    HAS_V0: tl.constexpr,
    QUANT: tl.constexpr,
    SAVE_MASK: tl.constexpr,
    SAVE_V: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    o_b = pid * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
    m_b = o_b < NB

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
        b_lam = tl.load(p_decay + t)
        b_th = tl.load(p_th + t)
        b_i = tl.load(p_cur_t, mask=m_n, other=0.0).to(tl.float32)
        b_m = b_lam * b_v + b_i
        b_d = b_m - b_th
        # relu written so NaN propagates (tl.maximum may drop it on the GPU)
        b_s = tl.where(b_d < 0.0, 0.0, b_d)
        b_v = b_m - b_s
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


@triton.autotune(configs=CONFIGS, key=["N", "T", "BPTT", "NEED_DDECAY"])
@triton.jit
def empf_bwd_kernel(
    p_g,  # [T, N] dL/dspikes (read only if HAS_G)
    p_gv,  # [N] dL/dv_last (read only if HAS_GV)
    p_mask,  # [T, NB] packed H bits
    p_vhist,  # [T-1, N] membrane after steps 0..T-2 (read only if NEED_DDECAY)
    p_v0,  # [N] initial membrane (read only if NEED_DDECAY and HAS_V0)
    p_decay,  # [T] fp32
    p_dcur,  # [T, N] out: dL/dcurrent
    p_dv0,  # [N] out: dL/dv0 (written only if NEED_DV0)
    p_dth,  # [T, P] out: per-program partial sums of dL/dθ_t
    p_ddecay,  # [T, P] out: per-program partial sums of dL/dλ_t (only if NEED_DDECAY)
    N,
    NB,
    T,
    P,
    HAS_G: tl.constexpr,
    HAS_GV: tl.constexpr,
    HAS_V0: tl.constexpr,
    BPTT: tl.constexpr,
    NEED_DDECAY: tl.constexpr,
    NEED_DV0: tl.constexpr,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N

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
        store_partials(p_dth + t * P, b_dvh - b_gh, pid, P, BLOCK, SUB)
        if NEED_DDECAY:
            # v[t-1]: the saved history for t >= 1, v0 (or zeros) for t = 0.
            if t > 0:
                b_vp = tl.load(p_vh_t, mask=m_n, other=0.0).to(tl.float32)
            elif HAS_V0:
                b_vp = tl.load(p_v0 + o_n, mask=m_n, other=0.0).to(tl.float32)
            else:
                b_vp = tl.zeros([BLOCK], dtype=tl.float32)
            store_partials(p_ddecay + t * P, b_dm * b_vp, pid, P, BLOCK, SUB)
        if BPTT:
            b_dv = tl.load(p_decay + t) * b_dm
        else:
            b_dv = tl.zeros([BLOCK], dtype=tl.float32)
        p_g_t -= N
        p_dcur_t -= N
        p_vh_t -= N
        p_mask_t -= NB
    if NEED_DV0:
        tl.store(p_dv0 + o_n, b_dv.to(p_dv0.dtype.element_ty), mask=m_n)


@triton.autotune(configs=CONFIGS, key=["N", "QUANT"])
@triton.jit
def parallel_fwd_kernel(
    p_cur,  # [T, N]
    p_th,  # [T] fp32
    p_spk,  # [T, N] out
    p_mask,  # [T, NB] out: packed H bits (only if SAVE_MASK)
    N,
    NB,
    step,
    levels_m1,
    QUANT: tl.constexpr,
    SAVE_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # grid (blocks over N, T): no state, so the time steps run in parallel
    pid = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_th = tl.load(p_th + t)
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


@triton.autotune(configs=CONFIGS, key=["N"])
@triton.jit
def parallel_bwd_kernel(
    p_g,  # [T, N]
    p_mask,  # [T, NB]
    p_dcur,  # [T, N] out
    p_dth,  # [T, P] out: partial sums of dL/dθ_t
    N,
    NB,
    P,
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
    store_partials(p_dth + t * P, -b_gh, pid, P, BLOCK, SUB)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are contiguous [T, N] views; per-step parameters are contiguous fp32 [T].


def _levels_m1(spike_bits: int | None) -> float:
    return float(2**spike_bits - 1) if spike_bits is not None else 0.0


def _partials(T: int, N: int, device) -> torch.Tensor:
    return empty((T, triton.cdiv(N, SUB)), torch.float32, device)


def empf_fwd(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor,
    threshold: torch.Tensor,
    spike_bits: int | None,
    spike_step: float,
    save_mask: bool,
    save_v: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Run all T steps.

    Returns (spikes [T, N], v_last [N], mask [T, ⌈N/8⌉] uint8, vhist [T-1, N]).
    """
    T, N = current.shape
    NB = triton.cdiv(N, 8)
    dev = current.device
    spikes = empty((T, N), current.dtype, dev)
    v_last = empty((N,), current.dtype, dev)
    mask = empty((T, NB), torch.uint8, dev) if save_mask else spikes  # dummy pointer when unused
    save_v = save_v and T > 1
    vhist = empty((T - 1, N), current.dtype, dev) if save_v else spikes
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
    empf_fwd_kernel[grid](
        p_cur=current,
        p_v0=v0 if v0 is not None else current,
        p_decay=decay,
        p_th=threshold,
        p_spk=spikes,
        p_vlast=v_last,
        p_mask=mask,
        p_vhist=vhist,
        N=N,
        NB=NB,
        T=T,
        step=float(spike_step),
        levels_m1=_levels_m1(spike_bits),
        HAS_V0=v0 is not None,
        QUANT=spike_bits is not None,
        SAVE_MASK=save_mask,
        SAVE_V=save_v,
        **launch_options(),
    )
    return spikes, v_last, (mask if save_mask else None), (vhist if save_v else None)


def empf_bwd(
    g: torch.Tensor | None,
    gv: torch.Tensor | None,
    mask: torch.Tensor,
    vhist: torch.Tensor | None,
    v0: torch.Tensor | None,
    decay: torch.Tensor | None,
    N: int,
    dtype: torch.dtype,
    bptt: bool,
    need_ddecay: bool,
    need_dv0: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Reverse-time pass. Returns (dcurrent [T, N], dv0 [N], dthreshold [T], ddecay [T]) in fp32
    for the parameter gradients and `dtype` for the tensors."""
    T = mask.shape[0]
    dev = mask.device
    dcur = empty((T, N), dtype, dev)
    dv0 = empty((N,), dtype, dev) if need_dv0 else dcur
    dth = _partials(T, N, dev)
    ddec = _partials(T, N, dev) if need_ddecay else dth
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK"]),)  # noqa: E731
    empf_bwd_kernel[grid](
        p_g=g if g is not None else dcur,
        p_gv=gv if gv is not None else dcur,
        p_mask=mask,
        p_vhist=vhist if vhist is not None else dcur,
        p_v0=v0 if v0 is not None else dcur,
        p_decay=decay if decay is not None else dth,  # read only in bptt mode
        p_dcur=dcur,
        p_dv0=dv0,
        p_dth=dth,
        p_ddecay=ddec,
        N=N,
        NB=mask.shape[1],
        T=T,
        P=dth.shape[1],
        HAS_G=g is not None,
        HAS_GV=gv is not None,
        HAS_V0=v0 is not None,
        BPTT=bptt,
        NEED_DDECAY=need_ddecay,
        NEED_DV0=need_dv0,
        SUB=SUB,
        **launch_options(),
    )
    return dcur, (dv0 if need_dv0 else None), dth.sum(1), (ddec.sum(1) if need_ddecay else None)


def parallel_fwd(
    current: torch.Tensor,
    threshold: torch.Tensor,
    spike_bits: int | None,
    spike_step: float,
    save_mask: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stateless neuron on [T, N]. Returns (spikes [T, N], mask [T, ⌈N/8⌉] uint8 or None)."""
    T, N = current.shape
    NB = triton.cdiv(N, 8)
    spikes = empty((T, N), current.dtype, current.device)
    mask = empty((T, NB), torch.uint8, current.device) if save_mask else spikes
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK"]), T)  # noqa: E731
    parallel_fwd_kernel[grid](
        p_cur=current,
        p_th=threshold,
        p_spk=spikes,
        p_mask=mask,
        N=N,
        NB=NB,
        step=float(spike_step),
        levels_m1=_levels_m1(spike_bits),
        QUANT=spike_bits is not None,
        SAVE_MASK=save_mask,
        **launch_options(),
    )
    return spikes, (mask if save_mask else None)


def parallel_bwd(g: torch.Tensor, mask: torch.Tensor, N: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (dcurrent [T, N] in g's dtype, dthreshold [T] fp32)."""
    T = mask.shape[0]
    dcur = empty((T, N), g.dtype, g.device)
    dth = _partials(T, N, g.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK"]), T)  # noqa: E731
    parallel_bwd_kernel[grid](
        p_g=g,
        p_mask=mask,
        p_dcur=dcur,
        p_dth=dth,
        N=N,
        NB=mask.shape[1],
        P=dth.shape[1],
        SUB=SUB,
        **launch_options(),
    )
    return dcur, dth.sum(1)
