"""EM-PF neuron ops: multi-step `empf_neuron`, single-step `empf_neuron_step`, `parallel_neuron`.

Kernels: kernels/neuron.py. Reference: reference/neuron.py. Tests: tests/test_neuron.py,
tests/test_neuron_channel.py, tests/test_library_ops.py. Benchmarks: bench/test_bench_neuron.py,
bench/test_bench_overhead.py.

The Triton path is four `torch.library` custom ops (`empf::neuron_fwd`, `empf::neuron_bwd`,
`empf::parallel_fwd`, `empf::parallel_bwd`), so `torch.compile(fullgraph=True)` keeps them in one
graph. In eager mode the same launchers run under two small autograd Functions (`_NeuronFn`,
`_ParallelFn`), which cost far less host time than custom-op dispatch. The public functions
validate their arguments and choose the implementation; modules call the unchecked internal
entries `empf_neuron_triton` / `parallel_neuron_triton` directly. No call reads a CUDA tensor's
values (no host sync): decay values are range-checked for floats and CPU tensors only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..reference.neuron import empf_neuron_ref, parallel_neuron_ref
from ._common import (
    FUNC_TRANSFORMS,
    PlanCache,
    TritonUnavailableError,
    c_apply,
    check_decay_values,
    check_grad_mode,
    check_like,
    check_sequence,
    check_spike_bits,
    check_step_input,
    check_tensor,
    contiguous,
    device_guard,
    load_kernels,
    neuron_param,
    params_key,
    planned,
    refuse_double_backward,
    resolve_impl,
    transform_active,
)
from ._library import register_op


def _kernels():
    """kernels/neuron.py, imported on first use (this is what imports triton). Not cached here:
    `load_kernels` stays the one entry point (tests patch it to see that kernels ran)."""
    return load_kernels("neuron")


def _none_if_empty(x: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return x if wanted else None


# ------------------------------------------------------------------------------ custom op: neuron


# Scalar arguments travel packed in two lists: torch re-reads the schema once per argument on
# every call of an op with an autograd formula (torch/_library/utils.py fill_defaults, quadratic
# in the argument count: ~100 µs for 15 arguments), so the differentiable ops keep few.
# Flag bits of the int list:
_LOGITS, _BPTT, _SAVE_MASK, _SAVE_V = 1, 2, 4, 8
_NEED_DDECAY, _NEED_DTH, _NEED_DV0 = 16, 32, 64


def _neuron_fwd_impl(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor | None,
    threshold: torch.Tensor | None,
    iargs: list[int],
    fargs: list[float],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """iargs = [t0, channels, inner, spike_bits (0: float spikes), flags];
    fargs = [decay_c, threshold_c, spike_step]."""
    t0, channels, inner, bits, flags = iargs
    # the kernels read current and v0 as contiguous [T, N] and [N] (a direct call may pass
    # other strides; the traced path passes contiguous ones, for which this is free)
    current, v0 = contiguous(current, v0)
    k = _kernels()
    key = (
        "op", tuple(iargs), tuple(fargs), current.shape, current.dtype, current.device,
        None if v0 is None else v0.dtype, params_key(decay, threshold),
    )  # fmt: skip

    def call(launcher):
        return launcher(
            current, v0, decay if decay is not None else fargs[0],
            threshold if threshold is not None else fargs[1], bits or None, fargs[2],
            bool(flags & _SAVE_MASK), bool(flags & _SAVE_V),
            t0=t0, logits=bool(flags & _LOGITS), channels=channels, inner=inner,
        )  # fmt: skip

    with device_guard(current):  # planned as the eager path is (see `planned`)
        spikes, v_last, mask, vhist = planned(
            _FWD_PLANS, key, (current, v0, decay, threshold),
            lambda: call(k.empf_fwd), lambda: call(k.empf_fwd_train_plan),
        )  # fmt: skip
    if mask is None:
        mask = current.new_empty((0,), dtype=torch.uint8)
    if vhist is None:
        vhist = current.new_empty((0,))
    return spikes, v_last, mask, vhist


def _neuron_fwd_fake(current, v0, decay, threshold, iargs, fargs):
    T, N = current.shape
    flags = iargs[4]
    mask_shape = (T, (N + 7) // 8) if flags & _SAVE_MASK else (0,)
    mask = current.new_empty(mask_shape, dtype=torch.uint8)
    vhist = current.new_empty((T - 1, N) if flags & _SAVE_V and T > 1 else (0,))
    return current.new_empty((T, N)), current.new_empty((N,)), mask, vhist  # contiguous


def _neuron_setup(ctx, inputs, output):
    current, v0, decay, threshold, iargs, fargs = inputs
    t0, channels, inner, _, flags = iargs
    logits, bptt = bool(flags & _LOGITS), bool(flags & _BPTT)
    _, _, mask, vhist = output
    need_ddecay = decay is not None and ctx.needs_input_grad[2]
    # Saved: the 1-bit mask; v[0..T-2] and v0 only if λ learns; λ itself only where backward
    # reads it (bptt, λ's own gradient with logits); θ only when its logits need σ'.
    keep_decay = decay is not None and (bptt or (logits and need_ddecay))
    keep_th = threshold is not None and logits
    ctx.save_for_backward(
        mask, vhist, v0 if need_ddecay else None, decay if keep_decay else None,
        threshold if keep_th else None,
    )  # fmt: skip
    ctx.shapes = (
        tuple(decay.shape) if decay is not None else None,
        tuple(threshold.shape) if threshold is not None else None,
    )
    ctx.meta = (fargs[0], t0, logits, channels, inner, bptt, current.shape[1], current.dtype)
    ctx.set_materialize_grads(False)


def _stand_in(saved: torch.Tensor | None, shape, like: torch.Tensor) -> torch.Tensor | None:
    """The saved parameter, or an unread placeholder of its shape (the kernels need its form)."""
    if saved is not None or shape is None:
        return saved
    return like.new_empty(shape, dtype=torch.float32)


def _neuron_backward(ctx, g, gv, _gmask, _gvhist):
    mask, vhist, v0, decay, threshold = ctx.saved_tensors
    decay_c, t0, logits, channels, inner, bptt, N, dtype = ctx.meta
    need = ctx.needs_input_grad
    need_dv0 = bptt and need[1]
    need_ddecay = ctx.shapes[0] is not None and need[2]
    need_dth = ctx.shapes[1] is not None and need[3]
    if need_ddecay or bptt:
        decay = _stand_in(decay, ctx.shapes[0], mask)
    threshold = _stand_in(threshold, ctx.shapes[1], mask) if need_dth else None
    flags = (
        _LOGITS * logits + _BPTT * bptt + _NEED_DDECAY * need_ddecay + _NEED_DTH * need_dth
        + _NEED_DV0 * need_dv0
    )  # fmt: skip
    dcur, dv0, dth, ddecay = _NEURON_BWD_OP(
        g, gv, mask, vhist if need_ddecay else None, v0, decay, threshold,
        [t0, channels, inner, N, flags], [decay_c], dtype,
    )  # fmt: skip
    if need_dth and need_ddecay and dth.shape[0] == 2 and ddecay.numel() == 0:
        dth, ddecay = dth[0], dth[1]  # the stacked pair (see _joint)
    return (
        dcur,
        _none_if_empty(dv0, need_dv0),
        _none_if_empty(ddecay, need_ddecay),
        _none_if_empty(dth, need_dth),
        None,
        None,
    )


_NEURON_FWD = register_op(
    "neuron_fwd",
    _neuron_fwd_impl,
    fake=_neuron_fwd_fake,
    backward=_neuron_backward,
    setup_context=_neuron_setup,
)


def _neuron_bwd_impl(
    g: torch.Tensor | None,
    gv: torch.Tensor | None,
    mask: torch.Tensor,
    vhist: torch.Tensor | None,
    v0: torch.Tensor | None,
    decay: torch.Tensor | None,
    threshold: torch.Tensor | None,
    iargs: list[int],
    fargs: list[float],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """iargs = [t0, channels, inner, N, flags]; fargs = [decay_c]."""
    t0, channels, inner, N, flags = iargs
    need_ddecay, need_dth = bool(flags & _NEED_DDECAY), bool(flags & _NEED_DTH)
    g, gv, v0 = contiguous(g, gv, v0)  # v0: the forward's, as the caller gave it
    vhist = vhist if (vhist is not None and vhist.numel()) else None
    k = _kernels()
    key = (
        "op", tuple(iargs), tuple(fargs), dtype, mask.shape, mask.device,
        None if g is None else g.dtype, None if gv is None else gv.dtype, vhist is None,
        None if v0 is None else v0.dtype, params_key(decay, threshold),
    )  # fmt: skip

    def call(launcher):
        return launcher(
            g, gv, mask, vhist, v0, decay if decay is not None else fargs[0], N, dtype,
            bool(flags & _BPTT), need_ddecay, bool(flags & _NEED_DV0),
            threshold=threshold if threshold is not None else 0.0, need_dthreshold=need_dth,
            t0=t0, logits=bool(flags & _LOGITS), channels=channels, inner=inner,
            stack_param_grads=True,  # no aliasing outputs: a joint [2, ...] result comes whole
        )  # fmt: skip

    with device_guard(mask):
        dcur, dv0, dth, ddecay = planned(
            _BWD_PLANS, key, (g, gv, mask, vhist, v0, decay, threshold),
            lambda: call(k.empf_bwd), lambda: call(k.empf_bwd_plan),
        )  # fmt: skip
    # an op's outputs are fresh tensors: an empty one for each gradient not computed
    return (
        dcur,
        dv0 if dv0 is not None else mask.new_empty((0,), dtype=dtype),
        dth if dth is not None else mask.new_empty((0,), dtype=torch.float32),
        ddecay if ddecay is not None else mask.new_empty((0,), dtype=torch.float32),
    )


def _joint(flags: int, decay, threshold) -> bool:
    """Whether the backward returns both parameter gradients stacked (see kernels.empf_bwd)."""
    return bool(
        flags & _NEED_DTH
        and flags & _NEED_DDECAY
        and decay.dim() == threshold.dim()
        and tuple(decay.shape) == tuple(threshold.shape)
    )


def _neuron_bwd_fake(g, gv, mask, vhist, v0, decay, threshold, iargs, fargs, dtype):
    T, N, flags = mask.shape[0], iargs[3], iargs[4]
    f32 = torch.float32
    if _joint(flags, decay, threshold):
        dth = mask.new_empty((2, *threshold.shape), dtype=f32)
        ddecay = mask.new_empty((0,), dtype=f32)
    else:
        dth = mask.new_empty(tuple(threshold.shape) if flags & _NEED_DTH else (0,), dtype=f32)
        ddecay = mask.new_empty(tuple(decay.shape) if flags & _NEED_DDECAY else (0,), dtype=f32)
    return (
        mask.new_empty((T, N), dtype=dtype),
        mask.new_empty((N,) if flags & _NEED_DV0 else (0,), dtype=dtype),
        dth,
        ddecay,
    )


_NEURON_BWD = register_op("neuron_bwd", _neuron_bwd_impl, fake=_neuron_bwd_fake)
# The OpOverloads themselves: calling them skips CustomOpDef.__call__ (~20 µs per call).
_NEURON_FWD_OP = torch.ops.empf.neuron_fwd.default
_NEURON_BWD_OP = torch.ops.empf.neuron_bwd.default


def _neuron_call(current, v0, decay, threshold, iargs, fargs):
    """The custom op (what torch.compile traces): [T, N] current, outputs (spikes, v_last)."""
    return _NEURON_FWD_OP(current, v0, decay, threshold, iargs, fargs)[:2]


# ------------------------------------------------------------------------- eager autograd path
#
# Eager calls skip the custom-op dispatch (~100 µs per forward+backward for a Python custom op
# with an autograd formula) and go through small autograd Functions that call the launchers
# directly. Everything shape-related happens inside Function.forward/backward, where autograd
# records nothing: a reshape or unsqueeze of an input that requires grad outside would add a view
# node to the graph (and ~2 µs forward, more in backward), so the launchers take the caller's
# shapes as they are and return outputs in them. The constants of a call travel as one tuple
# (`plan`). Under torch.compile the custom ops above run instead; both paths call the same
# launchers with the same arguments.


class _NeuronFn(torch.autograd.Function):
    """Eager autograd of the fused EM-PF neuron (see `empf_neuron_triton`).

    plan = (T, t0, C, inner, spike_bits, spike_step, bptt, logits, decay_c, threshold_c, step,
    joint). With `joint` the decay slot holds a module's [2, T] logits (θ's row 0, λ's row 1),
    the threshold slot None, and backward returns their gradient as one [2, T] tensor: one
    autograd input and one gradient accumulation instead of two.

    With a `box` (a list) v_last is appended to it instead of returned: for a caller that keeps
    the membrane only as state and never back-propagates into it (a module in online mode).
    Spikes are then the only output, which saves its wrapping and backward slot (~3 µs a call on
    the CPU) and the caller's detach. Backward returns one more None than there are inputs when
    no box was passed; autograd drops trailing Nones.
    """

    @staticmethod
    def forward(ctx, current, v0, decay, threshold, plan, box=None):
        bptt, logits, joint = plan[6], plan[7], plan[11]
        need = ctx.needs_input_grad
        need_ddecay = need[2]
        if not current.is_contiguous():
            current = current.contiguous()
        if v0 is not None and not v0.is_contiguous():
            v0 = v0.contiguous()
        # v[0..T-2] is saved for λ's gradient; one step (T = 1) has none (v0 stands for it)
        save_v = need_ddecay and plan[0] > 1
        spikes, v_last, mask, vhist = _fwd(current, v0, decay, threshold, plan, True, save_v)
        # Saved: the 1-bit mask; v[0..T-2] and v0 only if λ learns; λ itself only where backward
        # reads it (bptt, λ's own gradient with logits); θ only when its logits need σ'. A
        # parameter whose values backward does not use is kept as a plain reference (`forms`):
        # the kernel needs its form (shape, strides), which an in-place update cannot change.
        keep_decay = decay is not None and (joint or bptt or (logits and need_ddecay))
        keep_th = threshold is not None and logits
        ctx.save_for_backward(
            mask, vhist, v0 if need_ddecay else None, decay if keep_decay else None,
            threshold if keep_th else None,
        )  # fmt: skip
        ctx.forms = (
            decay if (decay is not None and not keep_decay) else None,
            threshold if (threshold is not None and not keep_th) else None,
        )
        ctx.plan = plan
        ctx.shape = current.shape
        ctx.dtype = current.dtype
        ctx.set_materialize_grads(False)
        if box is not None:  # v_last as state only, outside the graph
            box.append(v_last)
            return spikes
        return spikes, v_last

    @staticmethod
    def backward(ctx, g, gv=None):
        refuse_double_backward("empf_neuron")
        mask, vhist, v0, decay, threshold = ctx.saved_tensors
        T, t0, C, inner, _, _, bptt, logits, d_c, _, step, joint = ctx.plan
        need = ctx.needs_input_grad
        form_d, form_th = ctx.forms
        if decay is None:
            decay = form_d
        if threshold is None:
            threshold = form_th
        need_dv0 = bptt and need[1]
        need_ddecay = decay is not None and need[2]
        need_dth = (threshold is not None and need[3]) or (joint and need[2])
        shape = ctx.shape
        N = shape.numel() // T
        g = g.contiguous() if g is not None else None
        gv = gv.contiguous() if gv is not None else None
        vhist = vhist if need_ddecay else None
        # The parameter tensors the launch reads (None: unread, or a float in the plan); the
        # joint [2, T] logits are one tensor, the launcher reads both rows in place.
        if joint:
            d_in, th_in = decay, None
        else:
            d_in = decay if need_ddecay or bptt else None
            th_in = threshold if need_dth else None
        key = (
            ctx.plan, need_dv0, need_ddecay, need_dth, g is None, gv is None, v0 is None, shape,
            ctx.dtype, mask.device, params_key(d_in, th_in),
        )  # fmt: skip

        def call(launcher):
            return launcher(
                g, gv, mask, vhist, v0, d_in if d_in is not None else d_c, N, ctx.dtype, bptt,
                need_ddecay, need_dv0,
                threshold=d_in if joint else (th_in if th_in is not None else 0.0),
                need_dthreshold=need_dth, t0=t0, logits=logits, channels=C, inner=inner,
                dcur_shape=shape, dv0_shape=shape if step else shape[1:],
                stack_param_grads=joint, stacked=joint,
            )  # fmt: skip

        k = _kernels()
        with device_guard(mask):
            dcur, dv0, dth, ddecay = planned(
                _BWD_PLANS, key, (g, gv, mask, vhist, v0, d_in, th_in),
                lambda: call(k.empf_bwd), lambda: call(k.empf_bwd_plan),
            )  # fmt: skip
        if joint:  # dth: the stacked [2, T] gradient of the logits (None when not needed)
            return dcur, dv0, dth, None, None, None
        return dcur, dv0, ddecay, dth, None, None


_NEURON_APPLY = c_apply(_NeuronFn)


def _fwd(current, v0, decay, threshold, plan, save_mask, save_v):
    """The forward launch of an eager call (`_NeuronFn`'s, or one without autograd), planned
    when the parameters allow (see `planned`): (spikes, v_last, mask, vhist). Contiguous
    inputs; decay and threshold tensors, or None for the plan's constants."""
    T, t0, C, inner, bits, spike_step, _, logits, d_c, th_c, step, joint = plan
    key = (
        plan, save_mask, save_v, current.shape, current.dtype, current.device,
        None if v0 is None else v0.dtype, params_key(decay, threshold),
    )  # fmt: skip

    def call(launcher):
        d = decay if decay is not None else d_c
        th = decay if joint else (threshold if threshold is not None else th_c)
        return launcher(
            current, v0, d, th, bits, spike_step, save_mask, save_v,
            t0=t0, logits=logits, channels=C, inner=inner, step_input=step, stacked=joint,
        )  # fmt: skip

    k = _kernels()
    with device_guard(current):  # joint: the logits in the decay slot, threshold None
        return planned(
            _FWD_PLANS, key, (current, v0, decay, threshold),
            lambda: call(k.empf_fwd), lambda: call(k.empf_fwd_train_plan),
        )  # fmt: skip


# Plans of the eager path (see `PlanCache` in ops/_common.py).
_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()


# ---------------------------------------------------------------------------- custom op: parallel


def _parallel_fwd_impl(
    current: torch.Tensor,
    threshold: torch.Tensor | None,
    iargs: list[int],
    fargs: list[float],
) -> tuple[torch.Tensor, torch.Tensor]:
    """iargs = [t0, channels, inner, spike_bits (0: float spikes), flags];
    fargs = [threshold_c, spike_step]."""
    t0, channels, inner, bits, flags = iargs
    current = current.contiguous()  # read as contiguous [T, N] (see _neuron_fwd_impl)
    k = _kernels()
    key = ("op", tuple(iargs), tuple(fargs), current.shape, current.dtype, current.device,
           params_key(threshold))  # fmt: skip

    def call(launcher):
        return launcher(
            current, threshold if threshold is not None else fargs[0], bits or None, fargs[1],
            bool(flags & _SAVE_MASK), t0=t0, logits=bool(flags & _LOGITS), channels=channels,
            inner=inner,
        )  # fmt: skip

    with device_guard(current):
        spikes, mask = planned(
            _FWD_PLANS, key, (current, threshold),
            lambda: call(k.parallel_fwd), lambda: call(k.parallel_fwd_train_plan),
        )  # fmt: skip
    if mask is None:
        mask = current.new_empty((0,), dtype=torch.uint8)
    return spikes, mask


def _parallel_fwd_fake(current, threshold, iargs, fargs):
    T, N = current.shape
    shape = (T, (N + 7) // 8) if iargs[4] & _SAVE_MASK else (0,)
    return current.new_empty((T, N)), current.new_empty(shape, dtype=torch.uint8)


def _parallel_setup(ctx, inputs, output):
    current, threshold, iargs, _ = inputs
    t0, channels, inner, _, flags = iargs
    logits = bool(flags & _LOGITS)
    ctx.save_for_backward(output[1], threshold if logits else None)
    ctx.th_shape = tuple(threshold.shape) if threshold is not None else None
    ctx.meta = (t0, logits, channels, inner, current.shape[1])


def _parallel_backward(ctx, g, _gmask):
    mask, threshold = ctx.saved_tensors
    t0, logits, channels, inner, N = ctx.meta
    need_dth = ctx.th_shape is not None and ctx.needs_input_grad[1]
    threshold = _stand_in(threshold, ctx.th_shape, mask) if need_dth else None
    dcur, dth = _PARALLEL_BWD_OP(g, mask, threshold, t0, logits, channels, inner, N, need_dth)
    return dcur, _none_if_empty(dth, need_dth), None, None


_PARALLEL_FWD = register_op(
    "parallel_fwd",
    _parallel_fwd_impl,
    fake=_parallel_fwd_fake,
    backward=_parallel_backward,
    setup_context=_parallel_setup,
)


def _parallel_bwd_impl(
    g: torch.Tensor,
    mask: torch.Tensor,
    threshold: torch.Tensor | None,
    t0: int,
    logits: bool,
    channels: int,
    inner: int,
    N: int,
    need_dthreshold: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    k = _kernels()
    g = g.contiguous()
    key = ("op", t0, logits, channels, inner, N, need_dthreshold, g.shape, g.dtype, g.device,
           mask.shape, params_key(threshold))  # fmt: skip

    def call(launcher):
        return launcher(
            g, mask, N, threshold=threshold, need_dthreshold=need_dthreshold, t0=t0,
            logits=logits, channels=channels, inner=inner,
        )  # fmt: skip

    with device_guard(g):
        dcur, dth = planned(
            _BWD_PLANS, key, (g, mask, threshold),
            lambda: call(k.parallel_bwd), lambda: call(k.parallel_bwd_plan),
        )  # fmt: skip
    return dcur, (dth if dth is not None else g.new_empty((0,), dtype=torch.float32))


def _parallel_bwd_fake(g, mask, threshold, t0, logits, channels, inner, N, need_dthreshold):
    shape = tuple(threshold.shape) if need_dthreshold else (0,)
    # contiguous, as the implementation's result (it makes g contiguous first)
    return g.new_empty(g.shape), g.new_empty(shape, dtype=torch.float32)


_PARALLEL_BWD = register_op("parallel_bwd", _parallel_bwd_impl, fake=_parallel_bwd_fake)
_PARALLEL_FWD_OP = torch.ops.empf.parallel_fwd.default
_PARALLEL_BWD_OP = torch.ops.empf.parallel_bwd.default


class _ParallelFn(torch.autograd.Function):
    """Eager autograd of the parallel neuron (see `_NeuronFn`).

    plan = (T, t0, C, inner, spike_bits, spike_step, logits, threshold_c, step, joint). With
    `joint` the threshold slot holds a module's [1, T] logits tensor (its row 0 is θ's logits)
    and the gradient comes back in that shape.
    """

    @staticmethod
    def forward(ctx, current, threshold, plan):
        logits = plan[6]
        if not current.is_contiguous():
            current = current.contiguous()
        spikes, mask = _parallel_fwd(current, threshold, plan, True)
        keep_th = threshold is not None and logits
        ctx.save_for_backward(mask, threshold if keep_th else None)
        ctx.form = threshold if (threshold is not None and not keep_th) else None
        ctx.plan = plan
        return spikes

    @staticmethod
    def backward(ctx, g):
        refuse_double_backward("parallel_neuron")
        mask, threshold = ctx.saved_tensors
        T, t0, C, inner, _, _, logits, _, _, joint = ctx.plan
        if threshold is None:
            threshold = ctx.form
        need_dth = threshold is not None and ctx.needs_input_grad[1]
        g = g.contiguous()
        threshold = threshold if need_dth else None
        key = (ctx.plan, need_dth, g.shape, g.dtype, g.device, params_key(threshold))

        def call(launcher):
            return launcher(
                g, mask, g.numel() // T, threshold=threshold, need_dthreshold=need_dth, t0=t0,
                logits=logits, channels=C, inner=inner, stacked=joint,
            )  # fmt: skip

        k = _kernels()
        with device_guard(g):
            dcur, dth = planned(
                _BWD_PLANS, key, (g, mask, threshold),
                lambda: call(k.parallel_bwd), lambda: call(k.parallel_bwd_plan),
            )  # fmt: skip
        if joint and dth is not None:
            dth = dth.view(1, -1)
        return dcur, dth, None


_PARALLEL_APPLY = c_apply(_ParallelFn)


def _parallel_fwd(current, threshold, plan, save_mask):
    """The forward launch of an eager parallel call (as `_fwd`): (spikes, mask)."""
    T, t0, C, inner, bits, spike_step, logits, th_c, step, joint = plan
    th = threshold if threshold is not None else th_c
    key = (plan, save_mask, current.shape, current.dtype, current.device, params_key(th))

    def call(launcher):
        return launcher(
            current, th, bits, spike_step, save_mask,
            t0=t0, logits=logits, channels=C, inner=inner, step_input=step, stacked=joint,
        )  # fmt: skip

    k = _kernels()
    with device_guard(current):
        return planned(
            _FWD_PLANS, key, (current, threshold),
            lambda: call(k.parallel_fwd), lambda: call(k.parallel_fwd_train_plan),
        )  # fmt: skip


# ------------------------------------------------------------------- unchecked internal entries


def _channels(
    current: torch.Tensor, decay, threshold, cdim: int, per_channel: bool = False
) -> tuple[int, int]:
    """(C, inner) for per-channel parameters (or `per_channel`: another per-channel input) of a
    current whose channel dimension is `cdim` ([T, N, C, *]: 2; one step [N, C, *]: 1), else
    (1, 1)."""
    if not (
        per_channel
        or (isinstance(decay, torch.Tensor) and decay.dim() == 2)
        or (isinstance(threshold, torch.Tensor) and threshold.dim() == 2)
    ):
        return 1, 1
    shape = current.shape
    inner = 1
    for d in shape[cdim + 1 :]:
        inner *= d
    return shape[cdim], inner


def _rows(decay, threshold, joint: bool):
    """(decay, threshold) for the custom ops under torch.compile: with `joint`, the rows of the
    logits tensor that travels in the decay slot ([2, T]: θ's row 0, λ's row 1) or, for the
    parallel neuron, in the threshold slot ([1, T]), as traced views. (The eager launchers read
    the rows in place: `stacked`.)"""
    if not joint:
        return decay, threshold
    if decay is None:
        return None, threshold[0]
    return decay[1], decay[0]


def _f32(p):
    """A tensor parameter as fp32 (a differentiable cast when needed), a scalar as None."""
    if isinstance(p, torch.Tensor):
        return p if p.dtype == torch.float32 else p.float()
    return None


def empf_neuron_triton(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    spike_bits: int | None,
    spike_step: float,
    bptt: bool,
    *,
    t0: int = 0,
    logits: bool = False,
    step: bool = False,
    joint: bool = False,
    state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `empf_neuron` without any validation (callers have validated).

    current [T, *] (any strides), or with `step=True` one step [*] (T = 1, outputs [*]); v0 the
    shape of one step, or None (already detached in online mode); decay and threshold a float, a
    1-D tensor read at rows t0..t0+T-1, or a [T, C] tensor (see `neuron_param`; C is dim 2 of
    [T, N, C, *], dim 1 of a step [N, C, *]); `logits=True`: the tensors are logits, the kernel
    applies the sigmoid. `joint=True` (with `logits`): `decay` is a module's [2, TQ] logits
    tensor, θ's logits in row 0 and λ's in row 1, and `threshold` is None; the gradient of the
    logits comes back as one [2, TQ] tensor (one autograd input: one accumulation per call).
    `state=True`: v_last comes back without autograd history, for a caller that keeps it only
    as the next step's constant membrane (online mode); spikes are then the only output in the
    graph.
    """
    d_t = _f32(decay)
    th_t = _f32(threshold)
    T = 1 if step else current.shape[0]
    C, inner = (1, 1) if joint else _channels(current, d_t, th_t, 1 if step else 2)
    if torch.compiler.is_compiling():
        d_t, th_t = _rows(d_t, th_t, joint)  # traced views: no host cost there
        spikes, v_last = _neuron_traced(current, v0, d_t, th_t, decay, threshold, spike_bits,
                                        spike_step, bptt, t0, logits, step, C, inner)  # fmt: skip
        return spikes, (v_last.detach() if state else v_last)
    plan = (
        T, t0, C, inner, spike_bits, float(spike_step), bptt, logits,
        0.0 if d_t is not None else float(decay),
        0.0 if (th_t is not None or joint) else float(threshold),
        step, joint,
    )  # fmt: skip
    if torch.is_grad_enabled() and (
        current.requires_grad
        or (v0 is not None and v0.requires_grad)
        or (d_t is not None and d_t.requires_grad)
        or (th_t is not None and th_t.requires_grad)
    ):
        if transform_active():  # the public paths resolve impl before this
            raise TritonUnavailableError(FUNC_TRANSFORMS)
        if state:
            box = []
            return _NEURON_APPLY(current, v0, d_t, th_t, plan, box), box[0]
        return _NEURON_APPLY(current, v0, d_t, th_t, plan)
    if not current.is_contiguous():
        current = current.contiguous()
    if v0 is not None and not v0.is_contiguous():
        v0 = v0.contiguous()
    spikes, v_last, _, _ = _fwd(current, v0, d_t, th_t, plan, False, False)
    return spikes, v_last


def _neuron_traced(current, v0, d_t, th_t, decay, threshold, spike_bits, spike_step, bptt, t0,
                   logits, step, C, inner):  # fmt: skip
    """Under torch.compile: the custom op on the [T, N] view (the reshapes are traced)."""
    x = current.unsqueeze(0) if step else current
    T, feat = x.shape[0], x.shape[1:]
    cur2 = x.reshape(T, -1).contiguous()
    v02 = v0.reshape(-1).contiguous() if v0 is not None else None
    if torch.is_grad_enabled():
        need_ddecay = d_t is not None and d_t.requires_grad
        save_mask = need_ddecay or x.requires_grad or (v0 is not None and v0.requires_grad)
        save_mask = save_mask or (th_t is not None and th_t.requires_grad)
    else:
        save_mask = need_ddecay = False
    flags = _LOGITS * logits + _BPTT * bptt + _SAVE_MASK * save_mask + _SAVE_V * need_ddecay
    spikes, v_last = _neuron_call(
        cur2, v02, d_t, th_t, [t0, C, inner, spike_bits or 0, flags],
        [0.0 if d_t is not None else float(decay), 0.0 if th_t is not None else float(threshold),
         float(spike_step)],
    )  # fmt: skip
    if step:
        return spikes.view(current.shape), v_last.view(current.shape)
    return spikes.view(current.shape), v_last.view(feat)


def parallel_neuron_triton(
    current: torch.Tensor,
    threshold: float | torch.Tensor,
    spike_bits: int | None,
    spike_step: float,
    *,
    t0: int = 0,
    logits: bool = False,
    step: bool = False,
    joint: bool = False,
) -> torch.Tensor:
    """The Triton path of `parallel_neuron` without validation (see `empf_neuron_triton`).
    `joint=True` (with `logits`): `threshold` is a module's [1, TQ] logits tensor (its row 0 is
    θ's logits), and its gradient comes back in that shape."""
    th_t = _f32(threshold)
    T = 1 if step else current.shape[0]
    C, inner = (1, 1) if joint else _channels(current, None, th_t, 1 if step else 2)
    th_c = 0.0 if th_t is not None else float(threshold)
    if torch.compiler.is_compiling():
        th_t = _rows(None, th_t, joint)[1]  # a traced view
        x = current.unsqueeze(0) if step else current
        cur2 = x.reshape(T, -1).contiguous()
        save_mask = torch.is_grad_enabled() and (
            x.requires_grad or (th_t is not None and th_t.requires_grad)
        )
        flags = _LOGITS * logits + _SAVE_MASK * save_mask
        spikes = _PARALLEL_FWD_OP(
            cur2, th_t, [t0, C, inner, spike_bits or 0, flags], [th_c, float(spike_step)]
        )[0]
        return spikes.view(current.shape)
    plan = (T, t0, C, inner, spike_bits, float(spike_step), logits, th_c, step, joint)
    if torch.is_grad_enabled() and (
        current.requires_grad or (th_t is not None and th_t.requires_grad)
    ):
        if transform_active():  # the public paths resolve impl before this
            raise TritonUnavailableError(FUNC_TRANSFORMS)
        return _PARALLEL_APPLY(current, th_t, plan)
    if not current.is_contiguous():
        current = current.contiguous()
    return _parallel_fwd(current, th_t, plan, False)[0]


# ---------------------------------------------------------------------------------- public API


def _checked_params(
    current, decay, threshold, spike_bits, spike_step, *, parallel=False, decay_range=True
):
    """The parameter checks `empf_neuron`, `parallel_neuron` and their plans share, on a
    checked [T, *] current: decay and threshold in their normal forms (decay None for the
    parallel neuron, which has none). `decay_range=False` skips the [0, 1] check of a decay
    tensor's values (see `empf_neuron_plan`)."""
    T = current.shape[0]
    check_spike_bits(spike_bits, spike_step)
    if parallel:
        return None, neuron_param("threshold", threshold, T, current, channel_dim=2)
    decay = neuron_param("decay", decay, T, current, channel_dim=2, is_decay=True)
    threshold = neuron_param("threshold", threshold, T, current, channel_dim=2)
    if decay_range:
        check_decay_values(decay)
    return decay, threshold


def empf_neuron(
    current: torch.Tensor,
    v0: torch.Tensor | None = None,
    *,
    decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    grad_mode: str = "online",
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step EM-PF neuron (docs/model.md), all T steps in one fused launch.

    `m[t] = λ_t v[t-1] + I[t]`, `s[t] = relu(m[t] - θ_t)`, `v[t] = m[t] - s[t] = min(m[t], θ_t)`
    (exactly θ_t after firing), `out[t] = Q(s[t])`.
    Both paths compute in fp32 (fp64 for an fp64 current on the reference) and store spikes and
    membrane in the current's dtype, so half-precision overflow gives the same result on both.

    Args:
        current: [T, *] input current, fp32/fp16/bf16 (fp64 too on the reference), T >= 1.
        v0: [*] initial membrane in the current's dtype and device; None means zeros.
        decay: λ in [0, 1]: a float, a 0-d tensor, a [T] tensor (per step), or per channel a
            [T, C] or [1, C] tensor, C being dim 2 of the current `[T, N, C, *]` (dim 1 of each
            step). A 1-D tensor always means [T]. Values outside [0, 1] or NaN raise a
            ValueError for floats and CPU tensors; CUDA tensors are not inspected, so a call
            never makes a host sync (and can be captured in a CUDA graph).
        threshold: θ, the same forms as decay (any finite value).
        spike_bits: None for float spikes, or k in 1..8 for the k-bit quantiser Q
            (`clamp(round(s / spike_step), 0, 2^k - 1) * spike_step`, straight-through gradient).
        spike_step: the quantiser's step Δ, finite and > 0 in fp32.
        grad_mode: "online" cuts the temporal path: v[t-1] is a constant in m[t], and v0 is a
            constant (it never receives a gradient: `v0.grad` stays None, on both paths). "bptt"
            back-propagates through time, into v0 too.
        impl: "auto" (Triton on CUDA, else reference), "triton" or "reference".

    Returns:
        (spikes [T, *], v_last [*]), both in the current's dtype. NaN in the current propagates to
        the spikes and membrane as NaN (it never counts as firing). Gradients (docs/model.md) for
        the current, v0 (bptt), and tensor decay/threshold in their own shapes.
    """
    impl = check_sequence("current", current, impl)
    check_like("v0", v0, "current", current, current.shape[1:])
    check_grad_mode(grad_mode)
    decay, threshold = _checked_params(current, decay, threshold, spike_bits, spike_step)
    if v0 is not None and grad_mode == "online":
        v0 = v0.detach()
    if impl == "reference" or current.numel() == 0:
        return empf_neuron_ref(current, v0, decay, threshold, spike_bits, spike_step, grad_mode)
    return empf_neuron_triton(
        current, v0, decay, threshold, spike_bits, spike_step, grad_mode == "bptt"
    )


def empf_neuron_plan(
    current: torch.Tensor,
    *,
    decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    impl: str = "auto",
    decay_range: bool = True,
    in_scale: torch.Tensor | None = None,
    in_bias: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Check an inference call `empf_neuron(current, decay=..., threshold=..., ...)` once and
    return `run(current2) -> (spikes, v_last)`, the same call on another current.

    `decay_range=False` accepts decay tensors with values outside [0, 1]: a deployed network's
    folded Mem-BN charges `m = (k λ) v + (k I + b)` with a per-channel `k λ` that is no leak
    (the kernels compute `λ v + I` for any λ). `in_scale` k and `in_bias` b (both or neither,
    floating [T, C] tensors, C = dim 2 of the current [T, N, C, *], on its device): each step's
    current enters as `k I + b`, computed inside the kernel (fp32, the same two roundings as
    `k * I + b` in torch) instead of two passes over the current before it. The spikes take the
    current's dtype.

    For a layer called again and again (a deployed network): the arguments are checked here as
    `empf_neuron` checks them, and the kernel's launch arguments are built once. `run` takes a
    current of this one's dtype, shape and device (not checked: the caller keys its plans on
    those), with v0 = None, and records no gradient (a current that requires grad under grad
    mode raises a ValueError). The plan keeps what it derived from decay, threshold, in_scale
    and in_bias (fp32 copies of other dtypes): after a change to any, make a new plan.
    """
    impl = check_sequence("current", current, impl)
    if not isinstance(decay_range, bool):
        raise TypeError(f"decay_range must be a bool, got {type(decay_range).__name__}")
    decay, threshold = _checked_params(
        current, decay, threshold, spike_bits, spike_step, decay_range=decay_range
    )
    affine = _checked_affine(current, in_scale, in_bias)
    if impl == "reference" or current.numel() == 0:
        if affine is not None:  # k I + b in fp32 (fp64 for fp64), as the kernel computes it
            view = (current.shape[0], 1, -1) + (1,) * (current.dim() - 3)
            ct = torch.promote_types(current.dtype, torch.float32)
            k, b = (p.to(ct).view(view) for p in affine)

        def run(cur):
            if affine is None:
                return empf_neuron_ref(
                    cur, None, decay, threshold, spike_bits, spike_step, "online"
                )
            s, v = empf_neuron_ref(
                k * cur.to(ct) + b, None, decay, threshold, spike_bits, spike_step, "online"
            )
            return s.to(cur.dtype), v.to(cur.dtype)

        return _inference_only(run)
    d_t, th_t = _f32(decay), _f32(threshold)
    C, inner = _channels(current, d_t, th_t, 2, per_channel=affine is not None)
    if affine is not None:
        affine = tuple(p.float().contiguous() for p in affine)
    with device_guard(current):
        run = _kernels().empf_fwd_plan(
            current.contiguous(), d_t if d_t is not None else float(decay),
            th_t if th_t is not None else float(threshold), spike_bits, float(spike_step),
            channels=C, inner=inner, in_scale=None if affine is None else affine[0],
            in_bias=None if affine is None else affine[1],
        )  # fmt: skip
    return _inference_only(run, on_device=True)


def _checked_affine(current, in_scale, in_bias):
    """(k, b) of `empf_neuron_plan`'s input map, checked, or None."""
    if in_scale is None and in_bias is None:
        return None
    if in_scale is None or in_bias is None:
        raise ValueError("in_scale and in_bias come together (the current enters as k I + b)")
    if current.dim() < 3:
        raise ValueError(
            f"in_scale / in_bias are per channel: the current must be [T, N, C, *], got shape "
            f"{tuple(current.shape)}"
        )
    want = (current.shape[0], current.shape[2])
    for name, p in (("in_scale", in_scale), ("in_bias", in_bias)):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name} must be a floating tensor, got {type(p).__name__}")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got dtype {p.dtype}")
        if tuple(p.shape) != want:
            raise ValueError(
                f"{name} must be [T, C] = {list(want)} (C = dim 2 of the current), got "
                f"{list(p.shape)}"
            )
        if p.device != current.device:
            raise ValueError(f"{name} is on {p.device}, the current on {current.device}")
    return in_scale, in_bias


def parallel_neuron_plan(
    current: torch.Tensor,
    *,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    impl: str = "auto",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """`run(current2) -> spikes`: `parallel_neuron` checked once, as `empf_neuron_plan`."""
    impl = check_sequence("current", current, impl)
    _, threshold = _checked_params(current, None, threshold, spike_bits, spike_step, parallel=True)
    if impl == "reference" or current.numel() == 0:
        return _inference_only(
            lambda cur: parallel_neuron_ref(cur, threshold, spike_bits, spike_step)
        )
    th_t = _f32(threshold)
    C, inner = _channels(current, None, th_t, 2)
    with device_guard(current):
        run = _kernels().parallel_fwd_plan(
            current.contiguous(), th_t if th_t is not None else float(threshold), spike_bits,
            float(spike_step), channels=C, inner=inner,
        )  # fmt: skip
    return _inference_only(run, on_device=True)


def _inference_only(run, *, on_device: bool = False):
    """`run` behind the per-call checks a plan keeps: no gradient wanted, contiguous input (the
    kernels' form), and the input's GPU current (Triton launches on the current device)."""

    def planned(cur: torch.Tensor):
        if cur.requires_grad and torch.is_grad_enabled():
            raise ValueError(
                "a neuron plan is inference only: the current requires grad; call it under "
                "torch.no_grad() or use empf_neuron / parallel_neuron"
            )
        if not on_device:
            return run(cur)
        if not cur.is_contiguous():
            cur = cur.contiguous()
        with device_guard(cur):
            return run(cur)

    return planned


def empf_neuron_step(
    current: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One EM-PF time step: charge, fire, reset and quantise in one fused launch.

    This is what online training calls T times. Backward saves only the 1-bit firing mask, plus
    `v` when the decay needs a gradient. The gradient flows into `v` as well (`λ · dL/dm`); online
    training cuts it by passing `v.detach()`, as `empf_triton.nn.EMPFNeuron` does.

    Args:
        current: [*] input current of this step (at least 1-D), fp32/fp16/bf16.
        v: [*] membrane from the previous step (None means zeros), same dtype and device.
        decay: λ_t in [0, 1]: a float, a 0-d tensor, or per channel a [C] tensor, C being dim 1
            of the current `[N, C, *]` (a 1-D tensor always means [C] here). Values are checked
            for floats and CPU tensors; CUDA tensors are not inspected (no host sync).
        threshold: θ_t, the same forms as decay.
        spike_bits, spike_step, impl: as in `empf_neuron`.

    Returns:
        (spike [*], v_new [*]) in the current's dtype.
    """
    check_step_input("current", current)
    impl = resolve_impl(impl, current)
    check_tensor("current", current, impl, min_dim=1)
    check_like("v", v, "current", current, current.shape)
    check_spike_bits(spike_bits, spike_step)
    decay = neuron_param("decay", decay, 1, current, channel_dim=1, single_step=True, is_decay=True)
    threshold = neuron_param("threshold", threshold, 1, current, channel_dim=1, single_step=True)
    check_decay_values(decay)
    if impl == "reference" or current.numel() == 0:
        x = current.unsqueeze(0)
        spikes, v_new = empf_neuron_ref(x, v, decay, threshold, spike_bits, spike_step, "bptt")
        return spikes[0], v_new
    # One step straight to the kernels (no [1, *] view of the input in the autograd graph).
    return empf_neuron_triton(current, v, decay, threshold, spike_bits, spike_step, True, step=True)


def parallel_neuron(
    current: torch.Tensor,
    *,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    impl: str = "auto",
) -> torch.Tensor:
    """Stateless EM-PF neuron `out[t] = Q(relu(I[t] - θ_t))`, all T steps at once (docs/model.md).

    Args:
        current: [T, *] input current, T >= 1.
        threshold: θ: a float, a 0-d tensor, a [T] tensor, or per channel [T, C] or [1, C]
            (C = dim 2 of `[T, N, C, *]`), as in `empf_neuron`. Differentiable:
            `dL/dθ_t = -Σ g[t] H[t]` (summed per channel for the per-channel forms).
        spike_bits, spike_step, impl: as in `empf_neuron`.

    Returns:
        spikes [T, *] in the current's dtype; `dL/dI = g · 1[I > θ]`.
    """
    impl = check_sequence("current", current, impl)
    _, threshold = _checked_params(current, None, threshold, spike_bits, spike_step, parallel=True)
    if impl == "reference" or current.numel() == 0:
        return parallel_neuron_ref(current, threshold, spike_bits, spike_step)
    return parallel_neuron_triton(current, threshold, spike_bits, spike_step)
