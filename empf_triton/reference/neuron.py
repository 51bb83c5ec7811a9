"""Reference EM-PF neurons (docs/model.md: the EM-PF neuron and its parallel member).

Written step by step so that torch autograd yields exactly the model's gradient rules:
`s = relu(m - θ)` has derivative H = 1[m > θ] (0 at equality and at NaN, see `fire`) and
`v = m - s = min(m, θ)`, computed as `where(m > θ, θ, m)` (see `reset`). Like the kernels, it
computes in fp32 (fp64 for fp64 inputs), carrying the membrane in that precision, and stores
spikes and the last membrane in the current's dtype: a half-precision current that overflows when
stored still gives the exact fp32 membrane.
"""

from __future__ import annotations

import torch

from .spikes import quantize_spikes_ref


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def fire(m_minus_theta: torch.Tensor) -> torch.Tensor:
    """The floating-point spike `relu(m - θ)` with derivative H = 1[m > θ]: 0 at equality and
    at a NaN membrane (where the spike itself is NaN), as in the kernels. `torch.relu` alone
    would pass the gradient at NaN (its backward zeroes only where the result is <= 0)."""
    d = m_minus_theta
    return torch.where(d > 0, d, torch.where(torch.isnan(d), d.detach(), torch.zeros_like(d)))


def reset(m: torch.Tensor, theta: float | torch.Tensor) -> torch.Tensor:
    """The membrane after firing, `v = m - s = min(m, θ)`, as `where(m > θ, θ, m)`: a neuron that
    fired keeps exactly θ (the float difference `m - fl(m - θ)` is off by an ulp for most fired
    neurons, 0 for a large m, NaN for an infinite one). Its derivative is that of `m - s`:
    dv/dm = 1 - H, dv/dθ = H, with H = 1[m > θ] (0 at equality and at NaN, where v = m = NaN)."""
    return torch.where(m > theta, theta, m)


def param_at(p: float | torch.Tensor, t: int, like: torch.Tensor) -> float | torch.Tensor:
    """Step t of a parameter: a float, a [T] tensor (-> 0-d) or a [T, C] tensor (-> [C] shaped
    to broadcast over dim 1 of the step `like` [N, C, *])."""
    if not isinstance(p, torch.Tensor):
        return p
    pt = p[t].to(like.dtype)
    if pt.dim() == 0:
        return pt
    return pt.view(pt.shape[0], *([1] * (like.dim() - 2)))


def empf_neuron_ref(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: float | torch.Tensor,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    grad_mode: str = "online",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step EM-PF neuron.

    Args:
        current: [T, *] input current I.
        v0: [*] initial membrane, or None for zeros.
        decay, threshold: λ_t and θ_t: floats, [T] tensors, or per-channel [T, C] tensors
            (C = dim 1 of each step `[N, C, *]`).
        spike_bits, spike_step: the k-bit quantiser Q (None = float spikes).
        grad_mode: "online" detaches v[t-1] in the charge, "bptt" keeps the temporal path.

    Returns:
        (spikes [T, *], v_last [*]) in the current's dtype.
    """
    cdt = _compute_dtype(current.dtype)
    cur = current.to(cdt)
    v = torch.zeros_like(cur[0]) if v0 is None else v0.to(cdt)
    spikes = []
    for t in range(cur.shape[0]):
        v_in = v.detach() if grad_mode == "online" else v
        m = param_at(decay, t, cur[t]) * v_in + cur[t]
        th = param_at(threshold, t, cur[t])
        s = fire(m - th)
        v = reset(m, th)
        spikes.append(s if spike_bits is None else quantize_spikes_ref(s, spike_bits, spike_step))
    return torch.stack(spikes).to(current.dtype), v.to(current.dtype)


def parallel_neuron_ref(
    current: torch.Tensor,
    threshold: float | torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
) -> torch.Tensor:
    """Stateless neuron `Q(relu(I[t] - θ_t))` for all T at once; current [T, *], threshold a
    float, [T] or [T, C] (as in `empf_neuron_ref`); computed in fp32, stored in current's dtype."""
    cur = current.to(_compute_dtype(current.dtype))
    s = torch.stack([fire(cur[t] - param_at(threshold, t, cur[t])) for t in range(cur.shape[0])])
    s = s if spike_bits is None else quantize_spikes_ref(s, spike_bits, spike_step)
    return s.to(current.dtype)
