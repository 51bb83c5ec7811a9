"""Reference multi-precision spike quantiser (EMPF.md §1, "Multi-precision spikes")."""

from __future__ import annotations

import torch


def spike_codes_ref(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """Integer codes `clamp(round(s / step), 0, 2^bits - 1)`, as floats of s's dtype."""
    return torch.clamp(torch.round(s / step), 0, 2**bits - 1)


class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
        return spike_codes_ref(s, bits, step) * step

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None


def quantize_spikes_ref(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """`Q(s) = clamp(round(s / step), 0, 2^bits - 1) * step`; straight-through gradient."""
    return _QuantizeSTE.apply(s, bits, step)
