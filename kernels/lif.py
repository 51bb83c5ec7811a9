"""LIF baseline kernels (docs/model.md): fused multi-step forward and reverse-time backward.

Layout: the current is viewed as [T, N] (contiguous); each program owns BLOCK neurons and walks the
T time steps itself, so one launch runs the whole sequence and the membrane stays in registers
(fp32). The single-step op is these kernels with T = 1.

Saved for backward: only h[t] = m[t] - θ_t, [T, N] in the current's dtype. It gives the spike
(h >= 0), the surrogate derivative sg'(h), and the membrane the decay gradient needs:
v[t] = m[t] - s[t] θ_t = h[t] + (1 - s[t]) θ_t, so no membrane history is stored (v[-1] is v0,
which the caller keeps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import cdiv as _cdiv
from ._common import (
    empty,
    empty_like,
    param_inputs,
    pick_configs,
    size_class,
    store_partials,
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
# Parameter-gradient partial sums are taken over fixed SUB-neuron chunks whatever the block size,
# so every config writes the same [T, ⌈N/SUB⌉] buffer completely (autotuning cannot leave stale
# entries) and the final torch sum does not depend on the chosen config.
SUB = min(c.kwargs["BLOCK"] for c in CONFIGS)

#: Surrogate name -> the SURROGATE constexpr of the kernels.
SURROGATE_IDS = {"sigmoid": 0, "atan": 1, "triangle": 2}


@triton.jit
def _surrogate_grad(x, alpha, SURROGATE: tl.constexpr):
    """sg'(x) in fp32: 0 sigmoid `α σ(αx)(1-σ(αx))`, 1 atan `(α/2)/(1+(π/2 α x)^2)`,
    2 triangle `(1/α)^2 max(α-|x|, 0)`."""
    if SURROGATE == 0:
        b_sig = tl.sigmoid(alpha * x)
        b_sg = alpha * b_sig * (1.0 - b_sig)
    elif SURROGATE == 1:
        b_z = 1.5707963267948966 * alpha * x
        b_sg = (alpha * 0.5) / (1.0 + b_z * b_z)
    else:
        b_tri = alpha - tl.abs(x)
        # NaN stays NaN (as torch.clamp(min=0) on the reference): `b_tri < 0` is False for NaN
        b_sg = (1.0 / alpha) * (1.0 / alpha) * tl.where(b_tri < 0.0, 0.0, b_tri)
    return b_sg


@triton.jit
def _per_step(p, c, t, TENSOR: tl.constexpr):
    """A per-step parameter at step t: row t of a [T] fp32 tensor, or the scalar c."""
    if TENSOR:
        b = tl.load(p + t)
    else:
        b = c
    return b


@triton.autotune(configs=CONFIGS, key=["N_CLASS", "T_CLASS", "SAVE_H"])
@triton.jit
def lif_fwd_kernel(
    p_cur,  # [T, N] input current
    p_v0,  # [N] initial membrane (read only if HAS_V0)
    p_decay,  # [T] fp32 (read only if D_TENSOR)
    p_th,  # [T] fp32 (read only if TH_TENSOR)
    p_spk,  # [T, N] out: spikes in {0, 1}
    p_vlast,  # [N] out: membrane after the last step
    p_h,  # [T, N] out: h = m - θ (written only if SAVE_H)
    N,
    T,
    decay_c,  # λ for every step when not D_TENSOR (a kernel scalar)
    th_c,  # θ for every step when not TH_TENSOR
    neg_tiny,  # minus the smallest normal of the storage dtype
    N_CLASS,  # autotune keys (size classes, see _common.size_class)
    T_CLASS,
    HAS_V0: tl.constexpr,
    SAVE_H: tl.constexpr,
    D_TENSOR: tl.constexpr,
    TH_TENSOR: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_n = pid * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N

    if HAS_V0:
        b_v = tl.load(p_v0 + o_n, mask=m_n, other=0.0).to(tl.float32)
    else:
        b_v = tl.zeros([BLOCK], dtype=tl.float32)

    # Row pointers advance by N (int64 pointer arithmetic): no t * N products that could overflow.
    p_cur_t = p_cur + o_n
    p_spk_t = p_spk + o_n
    p_h_t = p_h + o_n
    for t in range(0, T):
        b_lam = _per_step(p_decay, decay_c, t, D_TENSOR)
        b_th = _per_step(p_th, th_c, t, TH_TENSOR)
        b_i = tl.load(p_cur_t, mask=m_n, other=0.0).to(tl.float32)
        # Same two roundings as the eager reference (no FMA, see launch_options): fp32 is bit-exact.
        b_m = b_lam * b_v + b_i
        b_d = b_m - b_th
        b_s = tl.where(b_d >= 0.0, 1.0, 0.0)
        b_v = b_m - b_s * b_th
        tl.store(p_spk_t, b_s.to(p_spk.dtype.element_ty), mask=m_n)
        if SAVE_H:
            # The backward recovers s as (h >= 0): a tiny negative h must not round to -0.0
            # (which compares >= 0) in fp16/bf16, so it is pushed to the smallest normal; sg' is
            # flat there.
            b_hs = tl.where(b_d < 0.0, tl.minimum(b_d, neg_tiny), b_d)
            tl.store(p_h_t, b_hs.to(p_h.dtype.element_ty), mask=m_n)
        p_cur_t += N
        p_spk_t += N
        p_h_t += N
    tl.store(p_vlast + o_n, b_v.to(p_vlast.dtype.element_ty), mask=m_n)


@triton.autotune(configs=CONFIGS, key=["N_CLASS", "T_CLASS", "BPTT", "NEED_DDECAY"])
@triton.jit
def lif_bwd_kernel(
    p_g,  # [T, N] dL/dspikes (read only if HAS_G)
    p_gv,  # [N] dL/dv_last (read only if HAS_GV)
    p_h,  # [T, N] saved h = m - θ
    p_v0,  # [N] initial membrane (read only if NEED_DDECAY and HAS_V0)
    p_decay,  # [T] fp32 (read only if D_TENSOR)
    p_th,  # [T] fp32 (read only if TH_TENSOR)
    p_dcur,  # [T, N] out: dL/dcurrent (written only if NEED_DCUR)
    p_dv0,  # [N] out: dL/dv0 (written only if NEED_DV0)
    p_dth,  # [T, P] out: per-chunk partial sums of dL/dθ_t (only if NEED_DTH)
    p_ddecay,  # [T, P] out: per-chunk partial sums of dL/dλ_t (only if NEED_DDECAY)
    N,
    T,
    P,
    decay_c,  # λ for every step when not D_TENSOR
    th_c,  # θ for every step when not TH_TENSOR
    alpha,
    N_CLASS,
    T_CLASS,
    SURROGATE: tl.constexpr,
    DETACH_RESET: tl.constexpr,
    HAS_G: tl.constexpr,
    HAS_GV: tl.constexpr,
    HAS_V0: tl.constexpr,
    BPTT: tl.constexpr,
    NEED_DCUR: tl.constexpr,
    NEED_DV0: tl.constexpr,
    NEED_DDECAY: tl.constexpr,
    NEED_DTH: tl.constexpr,
    D_TENSOR: tl.constexpr,
    TH_TENSOR: tl.constexpr,
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

    # tl.cast, not .to: T == 1 arrives as a constexpr int (Triton specialises int args equal to 1).
    last = tl.cast(T, tl.int64) - 1
    p_g_t = p_g + last * N + o_n
    p_dcur_t = p_dcur + last * N + o_n
    p_h_t = p_h + last * N + o_n
    # h[t-1] is loaded one step ahead and carried, so every h is read once.
    b_hn = tl.load(p_h_t, mask=m_n, other=0.0).to(tl.float32)
    for i in range(0, T):
        t = T - 1 - i
        b_th = _per_step(p_th, th_c, t, TH_TENSOR)
        b_h = b_hn
        if t > 0:
            b_hn = tl.load(p_h_t - N, mask=m_n, other=0.0).to(tl.float32)
        else:
            b_hn = tl.zeros([BLOCK], dtype=tl.float32)
        b_s = tl.where(b_h >= 0.0, 1.0, 0.0)
        b_sg = _surrogate_grad(b_h, alpha, SURROGATE)
        if HAS_G:
            b_g = tl.load(p_g_t, mask=m_n, other=0.0).to(tl.float32)
        else:
            b_g = tl.zeros([BLOCK], dtype=tl.float32)
        # dL/ds[t]: the output gradient plus, unless detached, the reset's -θ dL/dv[t] where
        # v[t] reaches the loss (the next charge in BPTT, v_last at the last step). A missing
        # path adds nothing, as in the reference's autograd: no 0 * NaN from a NaN sg'(h) or
        # an infinite θ_t.
        if DETACH_RESET:
            b_ds = b_g
        else:
            b_ds = b_g - b_th * b_dv
            if not BPTT:
                if HAS_GV:
                    b_ds = tl.where(t == last, b_ds, b_g)
                else:
                    b_ds = b_g
            elif not HAS_GV:
                b_ds = tl.where(t == last, b_g, b_ds)
        b_dh = b_ds * b_sg
        if not HAS_G:  # then s[t] reaches the loss only through that reset
            if DETACH_RESET:
                b_dh = tl.zeros([BLOCK], dtype=tl.float32)
            elif not BPTT:
                b_dh = tl.where(t == last, b_dh, 0.0)
        b_dm = b_dv + b_dh
        if NEED_DCUR:
            tl.store(p_dcur_t, b_dm.to(p_dcur.dtype.element_ty), mask=m_n)
        if NEED_DTH:
            # θ enters through h = m - θ and through the reset v = m - s θ.
            store_partials(p_dth + t * P, -b_dh - b_dv * b_s, pid, P, BLOCK, SUB)
        if NEED_DDECAY:
            # v[t-1] = h[t-1] + (1 - s[t-1]) θ_{t-1} for t >= 1, v0 (or zeros) for t = 0.
            if t > 0:
                b_thp = _per_step(p_th, th_c, t - 1, TH_TENSOR)
                b_vp = b_hn + tl.where(b_hn >= 0.0, 0.0, b_thp)
            elif HAS_V0:
                b_vp = tl.load(p_v0 + o_n, mask=m_n, other=0.0).to(tl.float32)
            else:
                b_vp = tl.zeros([BLOCK], dtype=tl.float32)
            b_dlam = b_dm * b_vp
            if not HAS_G and not BPTT:
                b_dlam = tl.where(t == last, b_dlam, 0.0)  # no path (as for b_dh above)
            store_partials(p_ddecay + t * P, b_dlam, pid, P, BLOCK, SUB)
        if BPTT:
            b_dv = _per_step(p_decay, decay_c, t, D_TENSOR) * b_dm
        else:
            b_dv = tl.zeros([BLOCK], dtype=tl.float32)
        p_g_t -= N
        p_dcur_t -= N
        p_h_t -= N
    if NEED_DV0:
        tl.store(p_dv0 + o_n, b_dv.to(p_dv0.dtype.element_ty), mask=m_n)


# ----------------------------------------------------------------------------------------------
# Launchers. Inputs are contiguous [T, *] tensors read as [T, N] (one step [*] with
# `step_input=True`); spikes, v_last and dcurrent take the caller's shapes (no reshapes in the ops,
# see kernels/neuron.py); per-step parameters are contiguous fp32 [T] tensors or floats (kernel
# scalars). Launches go through `_launch.launch`, which skips Triton's per-call Python once a
# signature has been launched (host time).


def _partials(T: int, N: int, device) -> torch.Tensor:
    return empty((T, _cdiv(N, SUB)), torch.float32, device)


def lif_fwd(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor | float,
    threshold: torch.Tensor | float,
    save_h: bool,
    *,
    step_input: bool = False,
    bind: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run all T steps. Returns (spikes [T, *], v_last [*], h [T, N] or None), current's dtype;
    with `step_input` the current is one step [*] and spikes and v_last are [*]. decay and
    threshold: contiguous fp32 [T] tensors, or floats (kernel scalars, the same every step)."""
    shape = current.shape
    T = 1 if step_input else shape[0]
    N = current.numel() // T
    dev = current.device
    dense = current.is_contiguous()  # outputs must be contiguous; empty_like is cheaper
    spikes = empty_like(current) if dense else empty(shape, current.dtype, dev)
    v_last = empty_like(spikes) if step_input else empty(shape[1:], current.dtype, dev)
    h = empty((T, N), current.dtype, dev) if save_h else spikes  # dummy pointer when unused
    d_tensor, th_tensor = type(decay) is not float, type(threshold) is not float
    grid = lambda meta: (_cdiv(N, meta["BLOCK"]),)  # noqa: E731
    args = dict(
        p_cur=current,
        p_v0=v0 if v0 is not None else current,
        p_decay=decay if d_tensor else current,  # dummy pointer for a float
        p_th=threshold if th_tensor else current,
        p_spk=spikes,
        p_vlast=v_last,
        p_h=h,
        N=N,
        T=T,
        decay_c=0.0 if d_tensor else decay,
        th_c=0.0 if th_tensor else threshold,
        neg_tiny=-torch.finfo(current.dtype).tiny,
        N_CLASS=size_class(N),
        T_CLASS=size_class(T),
        HAS_V0=v0 is not None,
        SAVE_H=save_h,
        D_TENSOR=d_tensor,
        TH_TENSOR=th_tensor,
    )
    if bind:  # for lif_fwd_plan: the launch's grid and arguments, not run
        return grid, args
    launch(lif_fwd_kernel, grid, args)
    return spikes, v_last, (h if save_h else None)


def lif_bwd(
    g: torch.Tensor | None,
    gv: torch.Tensor | None,
    h: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor | float,
    threshold: torch.Tensor | float,
    surrogate: str,
    alpha: float,
    detach_reset: bool,
    bptt: bool,
    need_dcur: bool,
    need_dv0: bool,
    need_ddecay: bool,
    need_dth: bool,
    *,
    dcur_shape: tuple[int, ...] | None = None,
    dv0_shape: tuple[int, ...] | None = None,
    bind: bool = False,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Reverse-time pass. Returns (dcurrent [T, N] or `dcur_shape`, dv0 [N] or `dv0_shape`,
    ddecay [T], dthreshold [T]), the tensors in h's dtype and the parameter gradients in fp32;
    None for what was not asked."""
    T, N = h.shape
    dev = h.device
    dshape = dcur_shape if dcur_shape is not None else (T, N)
    if not need_dcur:
        dcur = h  # dummy pointers when unused
    elif g is not None and g.shape == dshape and g.dtype == h.dtype and g.is_contiguous():
        dcur = empty_like(g)
    else:
        dcur = empty(dshape, h.dtype, dev)
    dv0 = empty(dv0_shape or (N,), h.dtype, dev) if need_dv0 else h
    dth = _partials(T, N, dev) if need_dth else h
    ddec = _partials(T, N, dev) if need_ddecay else h
    d_tensor, th_tensor = type(decay) is not float, type(threshold) is not float
    grid = lambda meta: (_cdiv(N, meta["BLOCK"]),)  # noqa: E731
    args = dict(
        p_g=g if g is not None else h,
        p_gv=gv if gv is not None else h,
        p_h=h,
        p_v0=v0 if v0 is not None else h,
        p_decay=decay if d_tensor else h,  # dummy pointer for a float
        p_th=threshold if th_tensor else h,
        p_dcur=dcur,
        p_dv0=dv0,
        p_dth=dth,
        p_ddecay=ddec,
        N=N,
        T=T,
        P=_cdiv(N, SUB),
        decay_c=0.0 if d_tensor else decay,
        th_c=0.0 if th_tensor else threshold,
        alpha=float(alpha),
        N_CLASS=size_class(N),
        T_CLASS=size_class(T),
        SURROGATE=SURROGATE_IDS[surrogate],
        DETACH_RESET=detach_reset,
        HAS_G=g is not None,
        HAS_GV=gv is not None,
        HAS_V0=v0 is not None,
        BPTT=bptt,
        NEED_DCUR=need_dcur,
        NEED_DV0=need_dv0,
        NEED_DDECAY=need_ddecay,
        NEED_DTH=need_dth,
        D_TENSOR=d_tensor,
        TH_TENSOR=th_tensor,
        SUB=SUB,
    )
    if bind:  # for lif_bwd_plan
        return grid, args
    launch(lif_bwd_kernel, grid, args)
    return _bwd_result(need_dcur, need_dv0, need_ddecay, need_dth, dcur, dv0, ddec, dth)


def _bwd_result(need_dcur, need_dv0, need_ddecay, need_dth, dcur, dv0, ddec, dth):
    """What `lif_bwd` returns from its buffers after the launch."""
    return (
        dcur if need_dcur else None,
        dv0 if need_dv0 else None,
        ddec.sum(1) if need_ddecay else None,
        dth.sum(1) if need_dth else None,
    )


# Plans (see kernels/neuron.py, "plans"): the launch arguments of a call form worked out once.


def lif_fwd_plan(current, v0, decay, threshold, *args, **kwargs):
    """`run(current2, v02, decay2, threshold2) -> (spikes, v_last, h)`: `lif_fwd(current, v0,
    decay, threshold, *args, **kwargs)` for contiguous inputs and parameters of the same forms
    (not checked): v02 None where v0 is None, decay2 and threshold2 each call's parameter
    tensors (`_common.param_inputs`: None for a float)."""
    grid, args = lif_fwd(current, v0, decay, threshold, *args, bind=True, **kwargs)
    outputs = (args["p_spk"], args["p_vlast"], args["p_h"] if args["SAVE_H"] else None)
    inputs = (current, v0, *param_inputs(decay, threshold))
    return plan(lif_fwd_kernel, grid, args, inputs, outputs)


def lif_bwd_plan(g, gv, h, v0, decay, threshold, *args, **kwargs):
    """`run(g2, gv2, h2, v02, decay2, threshold2) -> lif_bwd(g, gv, h, v0, decay, threshold,
    *args, **kwargs)'s result` for later calls of the same forms (contiguous; the same ones
    None; parameters as in `lif_fwd_plan`; not checked)."""
    grid, args = lif_bwd(g, gv, h, v0, decay, threshold, *args, bind=True, **kwargs)
    need = (args["NEED_DCUR"], args["NEED_DV0"], args["NEED_DDECAY"], args["NEED_DTH"])
    outs = [args[k] for k in ("p_dcur", "p_dv0", "p_ddecay", "p_dth")]
    # unused slots hold h (an input): no buffer of their own
    run = plan(
        lif_bwd_kernel, grid, args, (g, gv, h, v0, *param_inputs(decay, threshold)),
        tuple(o if wanted else None for o, wanted in zip(outs, need)),
    )  # fmt: skip

    def run_result(*ins):
        dcur, dv0, ddec, dth = run(*ins)
        return _bwd_result(*need, dcur, dv0, ddec, dth)

    return run_result
