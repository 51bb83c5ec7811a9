"""SECA (docs/model.md §4): ECA-style channel attention on the input current of a spiking layer.

`y = sigmoid(conv1d_k(GAP(x)))` over the channel axis (one 1-D kernel of size k, no bias), then
`x * y` per channel. The weights are shared over time; in step mode "m" the attention is computed
per time step (each step's own pooled current), which equals folding T into the batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .neuron import CheckedStepMode

__all__ = ["SECA"]


class SECA(CheckedStepMode, nn.Module):
    """Efficient channel attention on currents `[N, C, *]` (one step) or `[T, N, C, *]`.

    Args:
        channels: C (dim 1 of a step's input).
        kernel_size: odd size k of the 1-D convolution across channels (default 5).
        step_mode: "s" (x `[N, C, *spatial]`) or "m" (x `[T, N, C, *spatial]`); at least one
            spatial dim (`[N, C, L]` or `[N, C, H, W]`).

    Shape:
        Output has x's shape and dtype. Differentiable in x and in the kernel `weight`
        `[1, 1, k]` (ordinary autograd through pool, conv, sigmoid and the product).
    """

    def __init__(self, channels: int, kernel_size: int = 5, step_mode: str = "s") -> None:
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"SECA: channels must be an int >= 1, got {channels!r}")
        if (
            isinstance(kernel_size, bool)
            or not isinstance(kernel_size, int)
            or kernel_size < 1
            or kernel_size % 2 == 0
        ):
            raise ValueError(f"SECA: kernel_size must be an odd int >= 1, got {kernel_size!r}")
        self.channels, self.kernel_size, self.step_mode = channels, kernel_size, step_mode
        self.weight = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # As nn.Conv1d(1, 1, k): U(±1/sqrt(fan_in)), fan_in = k.
        bound = 1.0 / math.sqrt(self.kernel_size)
        nn.init.uniform_(self.weight, -bound, bound)

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=tuple(range(2, x.dim())))  # [N, C]
        y = F.conv1d(y.unsqueeze(1), self.weight.to(y.dtype), padding=self.kernel_size // 2)
        gate = torch.sigmoid(y.squeeze(1))
        return x * gate.view(*gate.shape, *(1,) * (x.dim() - 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = 1 if self.step_mode == "s" else 2
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() < lead + 2
            or x.shape[lead] != self.channels
            or not x.is_floating_point()
        ):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            want = "[N, C, *spatial]" if lead == 1 else "[T, N, C, *spatial]"
            raise ValueError(
                f"SECA(channels={self.channels}) in step_mode={self.step_mode!r} needs a "
                f"floating {want} with C={self.channels} and at least one spatial dim, got {shape}"
            )
        if lead == 1:
            return self._attend(x)
        return self._attend(x.flatten(0, 1)).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, kernel_size={self.kernel_size}, "
            f"step_mode={self.step_mode!r}"
        )
