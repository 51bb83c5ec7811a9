"""Reference EM-PF neurons (EMPF.md §1 and the parallel member of §2).

Written step by step in the current's dtype so that torch autograd yields exactly the gradient
rules of EMPF.md: `s = relu(m - θ)` has derivative H = 1[m > θ] (0 at equality) and `v = m - s`.
"""

from __future__ import annotations

import torch

from .spikes import quantize_spikes_ref


def empf_neuron_ref(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor,
    threshold: torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    grad_mode: str = "online",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step EM-PF neuron.

    Args:
        current: [T, *] input current I.
        v0: [*] initial membrane, or None for zeros.
        decay, threshold: [T] per-step λ_t and θ_t.
        spike_bits, spike_step: the k-bit quantiser Q (None = float spikes).
        grad_mode: "online" detaches v[t-1] in the charge, "bptt" keeps the temporal path.

    Returns:
        (spikes [T, *], v_last [*]) in the current's dtype.
    """
    v = torch.zeros_like(current[0]) if v0 is None else v0
    spikes = []
    for t in range(current.shape[0]):
        v_in = v.detach() if grad_mode == "online" else v
        m = decay[t] * v_in + current[t]
        s = torch.relu(m - threshold[t])
        v = m - s
        spikes.append(s if spike_bits is None else quantize_spikes_ref(s, spike_bits, spike_step))
    return torch.stack(spikes), v


def parallel_neuron_ref(
    current: torch.Tensor,
    threshold: torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
) -> torch.Tensor:
    """Stateless neuron `Q(relu(I[t] - θ_t))` for all T at once; current [T, *], threshold [T]."""
    # Per-step 0-d thresholds, as in empf_neuron_ref: no promotion of a bf16 current to fp32.
    s = torch.stack([torch.relu(current[t] - threshold[t]) for t in range(current.shape[0])])
    return s if spike_bits is None else quantize_spikes_ref(s, spike_bits, spike_step)
