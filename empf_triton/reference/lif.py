"""Reference LIF baseline neuron with surrogate gradients (docs/model.md, "LIF baseline").

Written step by step in fp32 (fp64 for an fp64 current), as the kernels compute, and returned in
the current's dtype. The Heaviside spike is a custom autograd Function
(forward `x >= 0`, backward `g * sg'(x)`); everything else is plain torch, so autograd yields the
gradients for the current, v0, decay and threshold in both grad modes, with or without
`detach_reset`. This equals SpikingJelly's `LIFNode(tau, decay_input=False, v_reset=None)` with
`decay = 1 - 1/tau`.
"""

from __future__ import annotations

import math

import torch

from ._transforms import transform_active

#: Surrogate name -> default alpha (for "triangle" alpha is the half-width γ).
SURROGATES: dict[str, float] = {"sigmoid": 4.0, "atan": 2.0, "triangle": 1.0}


def surrogate_grad_ref(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """sg'(x), the surrogate derivative of the Heaviside step at `x = m - θ`, in x's dtype.

    sigmoid: `α σ(αx) (1 - σ(αx))`; atan: `(α/2) / (1 + (π/2 α x)^2)`;
    triangle: `(1/γ)^2 max(γ - |x|, 0)` with γ = alpha.
    """
    if surrogate == "sigmoid":
        sg = torch.sigmoid(alpha * x)
        return alpha * sg * (1.0 - sg)
    if surrogate == "atan":
        return (alpha / 2.0) / (1.0 + (math.pi / 2.0 * alpha * x) ** 2)
    if surrogate == "triangle":
        return (1.0 / alpha) ** 2 * torch.clamp(alpha - x.abs(), min=0.0)
    raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}, got {surrogate!r}")


def _fire(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """The spike's forward value, H(x) = 1[x >= 0] (a module-level hook so that tests can swap in
    the surrogate's smooth primitive and gradcheck the gradient composition)."""
    return (x >= 0).to(x.dtype)


class _SpikeFunction(torch.autograd.Function):
    """H(x) forward, the surrogate's derivative backward. Written as forward / setup_context with
    a generated vmap rule, so it runs under torch.func transforms (forward mode:
    `_SpikeFunctionForward`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
        return _fire(x, surrogate, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.surrogate, ctx.alpha = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (x,) = ctx.saved_tensors
        return g * surrogate_grad_ref(x, ctx.surrogate, ctx.alpha), None, None


class _SpikeFunctionForward(_SpikeFunction):
    """`_SpikeFunction` with forward mode too (see `_transforms`)."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _SpikeFunction.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, x_t: torch.Tensor, *_) -> torch.Tensor:
        """The tangent times the same surrogate derivative."""
        (x,) = ctx.saved_tensors
        return x_t * surrogate_grad_ref(x, ctx.surrogate, ctx.alpha)


def spike_ref(x: torch.Tensor, surrogate: str = "sigmoid", alpha: float | None = None):
    """Heaviside spike `1[x >= 0]` with the surrogate gradient `sg'(x)`."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {tuple(SURROGATES)}, got {surrogate!r}")
    fn = _SpikeFunctionForward if transform_active() else _SpikeFunction
    return fn.apply(x, surrogate, SURROGATES[surrogate] if alpha is None else alpha)


def lif_neuron_ref(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor,
    threshold: torch.Tensor,
    surrogate: str = "sigmoid",
    alpha: float | None = None,
    detach_reset: bool = False,
    grad_mode: str = "bptt",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-step LIF neuron with soft reset.

    `m = λ_t v + I[t]`, `s = 1[m - θ_t >= 0]`, `v = m - s θ_t` (s detached there if `detach_reset`).

    Args:
        current: [T, *] input current I.
        v0: [*] initial membrane, or None for zeros.
        decay, threshold: [T] per-step λ_t and θ_t.
        surrogate, alpha: the surrogate gradient of the spike (alpha None = its default).
        detach_reset: cut the gradient through s in the reset.
        grad_mode: "online" detaches v[t-1] in the charge, "bptt" keeps the temporal path.

    Returns:
        (spikes [T, *], v_last [*]) in the current's dtype. Like the kernel, the membrane is
        carried in fp32 (fp64 for an fp64 current): a half-precision current gives the spikes of
        the fp32 membrane.
    """
    cdt = torch.float64 if current.dtype == torch.float64 else torch.float32
    cur = current.to(cdt)
    decay, threshold = decay.to(cdt), threshold.to(cdt)
    v = torch.zeros_like(cur[0]) if v0 is None else v0.to(cdt)
    spikes = []
    for t in range(cur.shape[0]):
        v_in = v.detach() if grad_mode == "online" else v
        m = decay[t] * v_in + cur[t]
        s = spike_ref(m - threshold[t], surrogate, alpha)
        v = m - (s.detach() if detach_reset else s) * threshold[t]
        spikes.append(s)
    return torch.stack(spikes).to(current.dtype), v.to(current.dtype)
