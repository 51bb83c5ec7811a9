"""EM-PF neuron ops: multi-step `empf_neuron`, single-step `empf_neuron_step`, `parallel_neuron`.

Kernels: kernels/neuron.py. Reference: reference/neuron.py. Tests: tests/test_neuron.py.
Benchmarks: bench/test_bench_neuron.py.
"""

from __future__ import annotations

import torch

from ..reference.neuron import empf_neuron_ref, parallel_neuron_ref
from ._common import (
    check_grad_mode,
    check_like,
    check_sequence,
    check_spike_bits,
    check_step_input,
    device_guard,
    grad_wanted,
    load_kernels,
    per_step,
)


class EMPFNeuronFunction(torch.autograd.Function):
    """Autograd over the fused kernels; inputs are a contiguous [T, N] current, [N] v0 (or None)
    and contiguous fp32 [T] decay and threshold."""

    @staticmethod
    def forward(ctx, current, v0, decay, threshold, spike_bits, spike_step, bptt):
        k = load_kernels("neuron")
        need_ddecay = ctx.needs_input_grad[2]
        spikes, v_last, mask, vhist = k.empf_fwd(
            current,
            v0,
            decay,
            threshold,
            spike_bits,
            spike_step,
            save_mask=True,
            save_v=need_ddecay,
        )
        # Saved: 1 bit per neuron per step, plus v[0..T-2] (and the caller's v0) if λ learns,
        # plus the T decays for the temporal path in bptt mode.
        ctx.save_for_backward(mask, vhist, v0 if need_ddecay else None, decay if bptt else None)
        ctx.bptt = bptt
        ctx.has_v0 = v0 is not None
        ctx.N = current.shape[1]
        ctx.dtype = current.dtype
        ctx.set_materialize_grads(False)
        return spikes, v_last

    @staticmethod
    def backward(ctx, g, gv):
        mask, vhist, v0, decay = ctx.saved_tensors
        need_dv0 = ctx.bptt and ctx.has_v0 and ctx.needs_input_grad[1]
        need_ddecay = ctx.needs_input_grad[2]
        dcur, dv0, dth, ddecay = load_kernels("neuron").empf_bwd(
            g.contiguous() if g is not None else None,
            gv.contiguous() if gv is not None else None,
            mask,
            vhist,
            v0,
            decay,
            N=ctx.N,
            dtype=ctx.dtype,
            bptt=ctx.bptt,
            need_ddecay=need_ddecay,
            need_dv0=need_dv0,
        )
        return dcur, dv0, ddecay, dth, None, None, None


class ParallelNeuronFunction(torch.autograd.Function):
    """Autograd over the parallel-neuron kernels; [T, N] contiguous current, fp32 [T] threshold."""

    @staticmethod
    def forward(ctx, current, threshold, spike_bits, spike_step):
        spikes, mask = load_kernels("neuron").parallel_fwd(
            current, threshold, spike_bits, spike_step, save_mask=True
        )
        ctx.save_for_backward(mask)
        ctx.N = current.shape[1]
        return spikes

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        dcur, dth = load_kernels("neuron").parallel_bwd(g.contiguous(), mask, ctx.N)
        return dcur, dth, None, None


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
    """Multi-step EM-PF neuron (EMPF.md §1), all T steps in one fused launch.

    `m[t] = λ_t v[t-1] + I[t]`, `s[t] = relu(m[t] - θ_t)`, `v[t] = m[t] - s[t]`, `out[t] = Q(s[t])`.

    Args:
        current: [T, *] input current, fp32/fp16/bf16 (fp64 too on the reference), T >= 1.
        v0: [*] initial membrane in the current's dtype and device; None means zeros.
        decay: λ, a float in (0, 1], a 0-d tensor or a [T] tensor (differentiable).
        threshold: θ, a float, a 0-d tensor or a [T] tensor (differentiable).
        spike_bits: None for float spikes, or k in 1..8 for the k-bit quantiser Q
            (`clamp(round(s / spike_step), 0, 2^k - 1) * spike_step`, straight-through gradient).
        spike_step: the quantiser's step Δ > 0.
        grad_mode: "online" cuts the temporal path (v[t-1] is a constant in m[t]; no gradient to
            v0), "bptt" back-propagates through time. Gradients follow EMPF.md §1 exactly.
        impl: "auto" (Triton on CUDA, else reference), "triton" or "reference".

    Returns:
        (spikes [T, *], v_last [*]), both in the current's dtype. NaN in the current propagates to
        the spikes and membrane as NaN (it never counts as firing).
    """
    impl = check_sequence("current", current, impl)
    T, feat = current.shape[0], current.shape[1:]
    check_like("v0", v0, "current", current, feat)
    check_spike_bits(spike_bits, spike_step)
    check_grad_mode(grad_mode)
    decay_t = per_step("decay", decay, T, current, is_decay=True)
    th_t = per_step("threshold", threshold, T, current)
    if impl == "reference" or current.numel() == 0:
        return empf_neuron_ref(current, v0, decay_t, th_t, spike_bits, spike_step, grad_mode)

    cur2 = current.reshape(T, -1).contiguous()
    v02 = v0.reshape(-1).contiguous() if v0 is not None else None
    decay32 = decay_t.to(torch.float32).contiguous()
    th32 = th_t.to(torch.float32).contiguous()
    with device_guard(current):
        if grad_wanted(current, v0, decay_t, th_t):
            spikes, v_last = EMPFNeuronFunction.apply(
                cur2, v02, decay32, th32, spike_bits, spike_step, grad_mode == "bptt"
            )
        else:
            spikes, v_last, _, _ = load_kernels("neuron").empf_fwd(
                cur2, v02, decay32, th32, spike_bits, spike_step, save_mask=False, save_v=False
            )
    return spikes.view(current.shape), v_last.view(feat)


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
        decay: λ_t, a float in (0, 1] or a 0-d tensor.
        threshold: θ_t, a float or a 0-d tensor.
        spike_bits, spike_step, impl: as in `empf_neuron`.

    Returns:
        (spike [*], v_new [*]) in the current's dtype.
    """
    check_step_input("current", current)
    spikes, v_new = empf_neuron(
        current.unsqueeze(0),
        v,
        decay=decay,
        threshold=threshold,
        spike_bits=spike_bits,
        spike_step=spike_step,
        grad_mode="bptt",
        impl=impl,
    )
    return spikes[0], v_new


def parallel_neuron(
    current: torch.Tensor,
    *,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    impl: str = "auto",
) -> torch.Tensor:
    """Stateless EM-PF neuron `out[t] = Q(relu(I[t] - θ_t))`, all T steps at once (EMPF.md §2).

    Args:
        current: [T, *] input current, T >= 1.
        threshold: θ, a float, a 0-d tensor or a [T] tensor (differentiable:
            `dL/dθ_t = -Σ g[t] H[t]`).
        spike_bits, spike_step, impl: as in `empf_neuron`.

    Returns:
        spikes [T, *] in the current's dtype; `dL/dI = g · 1[I > θ]`.
    """
    impl = check_sequence("current", current, impl)
    T = current.shape[0]
    check_spike_bits(spike_bits, spike_step)
    th_t = per_step("threshold", threshold, T, current)
    if impl == "reference" or current.numel() == 0:
        return parallel_neuron_ref(current, th_t, spike_bits, spike_step)
    cur2 = current.reshape(T, -1).contiguous()
    th32 = th_t.to(torch.float32).contiguous()
    with device_guard(current):
        if grad_wanted(current, th_t):
            spikes = ParallelNeuronFunction.apply(cur2, th32, spike_bits, spike_step)
        else:
            spikes, _ = load_kernels("neuron").parallel_fwd(
                cur2, th32, spike_bits, spike_step, save_mask=False
            )
    return spikes.view(current.shape)
