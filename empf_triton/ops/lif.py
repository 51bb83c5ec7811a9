"""LIF baseline ops (docs/model.md): multi-step `lif_neuron` and single-step `lif_neuron_step`.

Kernels: kernels/lif.py. Reference: reference/lif.py. Tests: tests/test_lif.py.
"""

from __future__ import annotations

import math

import torch

from ..reference.lif import SURROGATES, lif_neuron_ref
from ._common import (
    _FP32_MAX,
    FUNC_TRANSFORMS,
    PlanCache,
    TritonUnavailableError,
    c_apply,
    check_decay_values,
    check_grad_mode,
    check_like,
    check_sequence,
    check_step_input,
    check_tensor,
    contiguous,
    device_guard,
    grad_wanted,
    load_kernels,
    params_key,
    per_step,
    planned,
    refuse_double_backward,
    resolve_impl,
    to_float,
    transform_active,
)
from ._library import register_op


def _kernels():
    """kernels/lif.py, imported on first use (this is what imports triton). Not cached here:
    `load_kernels` stays the one entry point (tests patch it to see that kernels ran)."""
    return load_kernels("lif")


def _lif_fwd_impl(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor | None,
    threshold: torch.Tensor | None,
    surrogate: str,
    alpha: float,
    flags: int,
    decay_c: float,
    th_c: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """flags: bit 0 detach_reset, bit 1 bptt, bit 2 save h (few arguments: see ops/neuron.py).
    decay / threshold None: the constants decay_c / th_c (kernel scalars)."""
    save_h = bool(flags & 4)
    # the kernels read current, v0 and the [T] parameters as contiguous tensors (a direct call
    # may pass other strides; the traced path passes contiguous ones, for which this is free)
    current, v0, decay, threshold = contiguous(current, v0, decay, threshold)
    d, th = _consts(decay, threshold, decay_c, th_c)
    k = _kernels()
    key = ("op", save_h, current.shape, current.dtype, current.device,
           None if v0 is None else v0.dtype, params_key(d, th))  # fmt: skip
    with device_guard(current):  # planned as the eager path is (see `planned`)
        spikes, v_last, h = planned(
            _FWD_PLANS, key, (current, v0, decay, threshold),
            lambda: k.lif_fwd(current, v0, d, th, save_h),
            lambda: k.lif_fwd_plan(current, v0, d, th, save_h),
        )  # fmt: skip
    return spikes, v_last, (h if h is not None else current.new_empty((0,)))


def _consts(decay, threshold, decay_c, th_c):
    """The launchers' decay and threshold: each tensor, or its float where it is None."""
    return (decay if decay is not None else decay_c, threshold if threshold is not None else th_c)


def _lif_fwd_fake(current, v0, decay, threshold, surrogate, alpha, flags, decay_c, th_c):
    T, N = current.shape
    h = current.new_empty((T, N)) if flags & 4 else current.new_empty((0,))
    return current.new_empty((T, N)), current.new_empty((N,)), h  # contiguous


def _lif_setup(ctx, inputs, output):
    current, v0, decay, threshold, surrogate, alpha, flags, decay_c, th_c = inputs
    detach_reset, bptt = bool(flags & 1), bool(flags & 2)
    need_ddecay = ctx.needs_input_grad[2]
    # Saved: h = m - θ per step (current's dtype), plus the caller's v0 if λ learns.
    ctx.save_for_backward(output[2], v0 if need_ddecay else None, decay, threshold)
    ctx.meta = (surrogate, alpha, detach_reset, bptt, v0 is not None, decay_c, th_c)
    ctx.set_materialize_grads(False)


def _lif_backward(ctx, g, gv, _gh):
    h, v0, decay, threshold = ctx.saved_tensors
    surrogate, alpha, detach_reset, bptt, has_v0, decay_c, th_c = ctx.meta
    need = ctx.needs_input_grad
    flags = (need[0], bptt and has_v0 and need[1], need[2], need[3])
    dcur, dv0, ddecay, dth = _LIF_BWD_OP(
        g, gv, h, v0, decay, threshold, surrogate, alpha, detach_reset, bptt, *flags,
        decay_c, th_c,
    )  # fmt: skip
    out = [x if f else None for x, f in zip((dcur, dv0, ddecay, dth), flags)]
    return (*out, None, None, None, None, None)


_LIF_FWD = register_op(
    "lif_fwd", _lif_fwd_impl, fake=_lif_fwd_fake, backward=_lif_backward, setup_context=_lif_setup
)


def _lif_bwd_impl(
    g: torch.Tensor | None,
    gv: torch.Tensor | None,
    h: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor | None,
    threshold: torch.Tensor | None,
    surrogate: str,
    alpha: float,
    detach_reset: bool,
    bptt: bool,
    need_dcur: bool,
    need_dv0: bool,
    need_ddecay: bool,
    need_dth: bool,
    decay_c: float,
    th_c: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # the forward's v0 and parameters as the caller gave them: contiguous, as the kernels read
    g, gv, v0, decay, threshold = contiguous(g, gv, v0, decay, threshold)
    d, th = _consts(decay, threshold, decay_c, th_c)
    need = (need_dcur, need_dv0, need_ddecay and decay is not None,
            need_dth and threshold is not None)  # fmt: skip
    k = _kernels()
    key = (
        "op", surrogate, alpha, detach_reset, bptt, need, h.shape, h.dtype, h.device,
        None if g is None else g.dtype, None if gv is None else gv.dtype,
        None if v0 is None else v0.dtype, params_key(d, th),
    )  # fmt: skip

    def call(launcher):
        return launcher(g, gv, h, v0, d, th, surrogate, alpha, detach_reset, bptt, *need)

    with device_guard(h):
        dcur, dv0, ddecay, dth = planned(
            _BWD_PLANS, key, (g, gv, h, v0, decay, threshold),
            lambda: call(k.lif_bwd), lambda: call(k.lif_bwd_plan),
        )  # fmt: skip
    # an op's outputs are fresh tensors: an empty one for each gradient not computed
    f32 = torch.float32
    return (
        dcur if dcur is not None else h.new_empty((0,)),
        dv0 if dv0 is not None else h.new_empty((0,)),
        ddecay if ddecay is not None else h.new_empty((0,), dtype=f32),
        dth if dth is not None else h.new_empty((0,), dtype=f32),
    )


def _lif_bwd_fake(
    g, gv, h, v0, decay, threshold, surrogate, alpha, detach_reset, bptt,
    need_dcur, need_dv0, need_ddecay, need_dth, decay_c, th_c,
):  # fmt: skip
    T, N = h.shape
    f32 = torch.float32
    return (
        h.new_empty((T, N) if need_dcur else (0,)),
        h.new_empty((N,) if need_dv0 else (0,)),
        h.new_empty((T,) if need_ddecay and decay is not None else (0,), dtype=f32),
        h.new_empty((T,) if need_dth and threshold is not None else (0,), dtype=f32),
    )


_LIF_BWD = register_op("lif_bwd", _lif_bwd_impl, fake=_lif_bwd_fake)
_LIF_FWD_OP = torch.ops.empf.lif_fwd.default
_LIF_BWD_OP = torch.ops.empf.lif_bwd.default


class _LIFFn(torch.autograd.Function):
    """Eager autograd of the fused LIF neuron: the same launchers as `empf::lif_fwd`/`lif_bwd`,
    called directly (a Python custom op's autograd dispatch costs ~100 µs per call in eager).
    Shapes are handled inside forward/backward, where autograd records no view nodes (see
    ops/neuron.py). Under torch.compile the custom op runs instead.

    plan = (surrogate, alpha, detach_reset, bptt, step). decay and threshold: fp32 [T] tensors or
    floats (kernel scalars; a float gets no gradient and is kept in the plan key as a value).
    With a `box`, v_last goes into it, outside the graph (see ops/neuron.py `_NeuronFn`).
    """

    @staticmethod
    def forward(ctx, current, v0, decay, threshold, plan, box=None):
        if not current.is_contiguous():
            current = current.contiguous()
        if v0 is not None and not v0.is_contiguous():
            v0 = v0.contiguous()
        key = (
            plan, current.shape, current.dtype, current.device,
            None if v0 is None else v0.dtype, params_key(decay, threshold),
        )  # fmt: skip
        d_t = decay if type(decay) is not float else None  # the tensor parameters, or None
        th_t = threshold if type(threshold) is not float else None
        k = _kernels()
        with device_guard(current):
            spikes, v_last, h = planned(
                _FWD_PLANS, key, (current, v0, d_t, th_t),
                lambda: k.lif_fwd(current, v0, decay, threshold, True, step_input=plan[4]),
                lambda: k.lif_fwd_plan(current, v0, decay, threshold, True, step_input=plan[4]),
            )  # fmt: skip
        # Saved: h = m - θ per step (current's dtype), plus the caller's v0 if λ learns; a float
        # parameter travels as a value.
        ctx.save_for_backward(h, v0 if ctx.needs_input_grad[2] else None, d_t, th_t)
        ctx.consts = (None if d_t is not None else decay, None if th_t is not None else threshold)
        ctx.plan = plan
        ctx.shape = current.shape
        ctx.has_v0 = v0 is not None
        ctx.set_materialize_grads(False)
        if box is not None:  # v_last as state only
            box.append(v_last)
            return spikes
        return spikes, v_last

    @staticmethod
    def backward(ctx, g, gv=None):
        refuse_double_backward("lif_neuron")
        h, v0, d_t, th_t = ctx.saved_tensors
        surrogate, alpha, detach_reset, bptt, step = ctx.plan
        d_c, th_c = ctx.consts
        decay = d_t if d_c is None else d_c
        threshold = th_t if th_c is None else th_c
        need = ctx.needs_input_grad
        need_dv0 = bptt and ctx.has_v0 and need[1]
        shape = ctx.shape
        g = g.contiguous() if g is not None else None
        gv = gv.contiguous() if gv is not None else None
        key = (
            ctx.plan, need[:4], need_dv0, g is None, gv is None, v0 is None, shape, h.dtype,
            h.device, params_key(decay, threshold),
        )  # fmt: skip

        def call(launcher):
            return launcher(
                g, gv, h, v0, decay, threshold, surrogate, alpha, detach_reset, bptt, need[0],
                need_dv0, need[2], need[3], dcur_shape=shape,
                dv0_shape=shape if step else shape[1:],
            )  # fmt: skip

        k = _kernels()
        with device_guard(h):
            dcur, dv0, ddecay, dth = planned(
                _BWD_PLANS, key, (g, gv, h, v0, d_t, th_t),
                lambda: call(k.lif_bwd), lambda: call(k.lif_bwd_plan),
            )  # fmt: skip
        return dcur, dv0, ddecay, dth, None, None  # one more None than inputs without a box


_LIF_APPLY = c_apply(_LIFFn)
_FWD_PLANS = PlanCache()  # see PlanCache in ops/_common.py
_BWD_PLANS = PlanCache()


def _f32(p: torch.Tensor | float) -> torch.Tensor | float:
    """A [T] parameter as a contiguous fp32 tensor (a differentiable cast), a float as it is."""
    if type(p) is float:
        return p
    if p.dtype != torch.float32:
        p = p.float()
    return p if p.is_contiguous() else p.contiguous()


def _learns(p: torch.Tensor | float) -> bool:
    return type(p) is not float and p.requires_grad


def lif_neuron_triton(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor | float,
    threshold: torch.Tensor | float,
    surrogate: str,
    alpha: float,
    detach_reset: bool,
    bptt: bool,
    *,
    step: bool = False,
    state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `lif_neuron` without validation: current [T, *] (or one step [*] with
    `step=True`, T = 1), v0 in the shape of one step or None, decay and threshold [T] tensors
    (any floating dtype) or floats (passed to the kernels as scalars: no tensor is made), alpha
    resolved. `state=True`: v_last comes back without autograd history (for online callers,
    as `empf_neuron_triton`)."""
    decay32, th32 = _f32(decay), _f32(threshold)
    if torch.compiler.is_compiling():
        x = current.unsqueeze(0) if step else current
        T, feat = x.shape[0], x.shape[1:]
        cur2 = x.reshape(T, -1).contiguous()
        v02 = v0.reshape(-1).contiguous() if v0 is not None else None
        save_h = grad_wanted(current, v0, decay32, th32)
        flags = 1 * detach_reset + 2 * bptt + 4 * save_h
        d_float, th_float = type(decay32) is float, type(th32) is float
        spikes, v_last, _ = _LIF_FWD_OP(
            cur2, v02, None if d_float else decay32, None if th_float else th32, surrogate,
            float(alpha), flags, decay32 if d_float else 0.0, th32 if th_float else 0.0,
        )  # fmt: skip
        v_last = v_last.view(current.shape if step else feat)
        return spikes.view(current.shape), (v_last.detach() if state else v_last)
    if torch.is_grad_enabled() and (
        current.requires_grad
        or (v0 is not None and v0.requires_grad)
        or _learns(decay32)
        or _learns(th32)
    ):
        plan = (surrogate, float(alpha), detach_reset, bptt, step)
        if transform_active():  # the public paths resolve impl before this
            raise TritonUnavailableError(FUNC_TRANSFORMS)
        if state:
            box = []
            return _LIF_APPLY(current, v0, decay32, th32, plan, box), box[0]
        return _LIF_APPLY(current, v0, decay32, th32, plan)
    if not current.is_contiguous():
        current = current.contiguous()
    if v0 is not None and not v0.is_contiguous():
        v0 = v0.contiguous()
    with device_guard(current):
        spikes, v_last, _ = _kernels().lif_fwd(current, v0, decay32, th32, False, step_input=step)
    return spikes, v_last


def _check_surrogate(surrogate: str, alpha: float | None) -> float:
    """Validate the surrogate name and alpha; returns alpha (its default when None)."""
    if not isinstance(surrogate, str) or surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}, got {surrogate!r}")
    if alpha is None:
        return SURROGATES[surrogate]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a float or None, got {type(alpha).__name__}")
    alpha = to_float(alpha, "alpha")
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite float, got {alpha}")
    if alpha > _FP32_MAX or alpha * alpha * _FP32_MAX < 1.0:
        # the surrogates use alpha and 1 / alpha^2 (triangle) in fp32
        raise ValueError(f"alpha must lie in [5.5e-20, 3.4e38] (fp32 range), got {alpha}")
    return alpha


def lif_neuron(
    current: torch.Tensor,
    v0: torch.Tensor | None = None,
    *,
    decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    surrogate: str = "sigmoid",
    alpha: float | None = None,
    detach_reset: bool = False,
    grad_mode: str = "bptt",
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step LIF neuron with soft reset and a surrogate gradient (docs/model.md), one launch.

    `m[t] = λ_t v[t-1] + I[t]`, `s[t] = 1[m[t] - θ_t >= 0]`, `v[t] = m[t] - s[t] θ_t`.
    Equals SpikingJelly's `LIFNode(tau, decay_input=False, v_reset=None)` with λ = 1 - 1/tau.

    Gradient: ds/dm = sg'(m - θ) and ds/dθ = -sg'(m - θ), with sg' the surrogate's derivative:
    "sigmoid" `α σ(αx)(1 - σ(αx))` (α = 4), "atan" `(α/2) / (1 + (π/2 α x)^2)` (α = 2),
    "triangle" `(1/γ)^2 max(γ - |x|, 0)` (γ = alpha = 1). Everything else is exact autograd of the
    forward: `detach_reset` drops the path through s in the reset, "online" treats v[t-1] in m[t]
    as a constant (λ still learns; no gradient to v0).

    Args:
        current: [T, *] input current, fp32/fp16/bf16 (fp64 too on the reference), T >= 1.
        v0: [*] initial membrane in the current's dtype and device; None means zeros.
        decay: λ in [0, 1]: a float, a 0-d tensor or a [T] tensor (differentiable). A CPU
            tensor's values are checked; a CUDA tensor's are not (that would wait for the GPU).
        threshold: θ, a float, a 0-d tensor or a [T] tensor (differentiable).
        surrogate: "sigmoid", "atan" or "triangle".
        alpha: the surrogate's sharpness (γ for "triangle"), a positive float; None = default.
        detach_reset: detach the spike in the reset term.
        grad_mode: "bptt" (back-propagation through time) or "online".
        impl: "auto" (Triton on CUDA, else reference), "triton" or "reference".

    Returns:
        (spikes [T, *] in {0, 1}, v_last [*]), both in the current's dtype.
    """
    impl = check_sequence("current", current, impl)
    T, feat = current.shape[0], current.shape[1:]
    check_like("v0", v0, "current", current, feat)
    alpha = _check_surrogate(surrogate, alpha)
    check_grad_mode(grad_mode)
    if not isinstance(detach_reset, bool):
        raise TypeError(f"detach_reset must be a bool, got {type(detach_reset).__name__}")
    ref = impl == "reference" or current.numel() == 0
    # Triton takes a float as a kernel scalar; the reference a [T] tensor.
    decay_t = per_step("decay", decay, T, current, is_decay=True, keep_float=not ref)
    th_t = per_step("threshold", threshold, T, current, keep_float=not ref)
    check_decay_values(decay_t)  # a CPU tensor's values (floats are checked by per_step)
    if v0 is not None and grad_mode == "online":
        v0 = v0.detach()  # a constant in online mode, on both paths (as in empf_neuron)
    if ref:
        return lif_neuron_ref(current, v0, decay_t, th_t, surrogate, alpha, detach_reset, grad_mode)

    return lif_neuron_triton(
        current, v0, decay_t, th_t, surrogate, alpha, detach_reset, grad_mode == "bptt"
    )


def lif_neuron_step(
    current: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    surrogate: str = "sigmoid",
    alpha: float | None = None,
    detach_reset: bool = False,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LIF time step: charge, fire and soft reset in one fused launch.

    The gradient flows into `v` as well (`λ · dL/dm`); online training cuts it by passing
    `v.detach()` between steps.

    Args:
        current: [*] input current of this step (at least 1-D), fp32/fp16/bf16.
        v: [*] membrane from the previous step (None means zeros), same dtype and device.
        decay: λ in [0, 1], a float or a 0-d tensor (values checked as in `lif_neuron`).
        threshold: θ, a float or a 0-d tensor.
        surrogate, alpha, detach_reset, impl: as in `lif_neuron`.

    Returns:
        (spike [*], v_new [*]) in the current's dtype.
    """
    check_step_input("current", current)
    impl = resolve_impl(impl, current)
    check_tensor("current", current, impl, min_dim=1)
    check_like("v", v, "current", current, current.shape)
    alpha = _check_surrogate(surrogate, alpha)
    if not isinstance(detach_reset, bool):
        raise TypeError(f"detach_reset must be a bool, got {type(detach_reset).__name__}")
    ref = impl == "reference" or current.numel() == 0
    decay_t = per_step("decay", decay, 1, current, is_decay=True, keep_float=not ref)
    th_t = per_step("threshold", threshold, 1, current, keep_float=not ref)
    check_decay_values(decay_t)
    if ref:
        spikes, v_new = lif_neuron_ref(
            current.unsqueeze(0), v, decay_t, th_t, surrogate, alpha, detach_reset, "bptt"
        )
        return spikes[0], v_new
    # One step straight to the kernels (no [1, *] view of the input in the autograd graph).
    return lif_neuron_triton(
        current, v, decay_t, th_t, surrogate, alpha, detach_reset, True, step=True
    )
