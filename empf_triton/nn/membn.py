"""Mem-BN (docs/model.md): a BatchNorm per time step on the membrane, with sigmoid-gated ratios.

`m <- sigmoid(p_t) * BN_t(m) + sigmoid(q_t) * m`, p, q in R^T initialised to 0 (both gates start at
0.5). `BN_t` is an ordinary affine BatchNorm over the channel dimension (dim 1 of `[N, C, *]`),
with its own statistics and affine parameters per step t.

In eval mode each `BN_t` is a per-channel affine map, so the whole Mem-BN is `m <- k_t * m + b_t`
(`fold()`); deployed, it disappears into the neuron: with `m = λ_t v + I`,
`k_t m + b_t = (k_t λ_t) v + (k_t I + b_t)`, i.e. a per-channel decay `λ'_t = k_t λ_t` and a
current `I' = k_t I + b_t` (which itself folds into the BN before the neuron).

This is plain torch (no kernel): BatchNorm needs the batch statistics of m at every step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import check_dense, to_float

__all__ = ["MemBN"]


def check_input_dtype(
    who: str, dtype: torch.dtype, param_dtype: torch.dtype, batch_norm: bool = True
) -> None:
    """batch_norm takes an input of its parameters' dtype, or a half-precision input with fp32
    parameters (autocast), never a wider input than its parameters: a TypeError naming `who`
    otherwise. Without `batch_norm` (a folded Mem-BN: a per-channel affine map), half-precision
    parameters take a wider input too."""
    if (
        not dtype.is_floating_point
        or (dtype == torch.float64) != (param_dtype == torch.float64)
        or (batch_norm and param_dtype in (torch.float16, torch.bfloat16) and dtype != param_dtype)
    ):
        raise TypeError(
            f"{who} input has dtype {dtype}, its parameters {param_dtype}: give a floating "
            "input of the parameters' dtype (a half-precision input also fits fp32 "
            "parameters; float64 only with a float64 module, `.double()`)"
        )


class MemBN(nn.Module):
    """Per-step BatchNorm on the membrane with learnable mixing gates.

    Args:
        channels: C, the size of dim 1 of the membrane `[N, C, *]`.
        T: number of time steps (one BatchNorm per step).
        eps, momentum: as `nn.BatchNorm2d`.

    Parameters and buffers (all `[T, C]` unless noted): `weight` (γ, init 1), `bias` (β, init
    0), `running_mean`, `running_var`; `p`, `q` `[T]` (init 0).

    Shape:
        `forward(m, t)`: m `[N, C, *]` at step t -> `[N, C, *]`, m's dtype (statistics in fp32
        for half inputs, as `F.batch_norm`). Gradients: those of torch's batch_norm (training
        mode: through the batch statistics; eval mode: the affine map).
    """

    def __init__(self, channels: int, T: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        for name, v in (("channels", channels), ("T", T)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"MemBN: {name} must be an int >= 1, got {v!r}")
        real = (int, float)  # bools excluded below: eps=True would pass as 1.0
        if (
            isinstance(eps, bool)
            or not isinstance(eps, real)
            or not 0 < to_float(eps, "MemBN: eps") < math.inf
        ):
            raise ValueError(f"MemBN: eps must be a finite float > 0, got {eps!r}")
        if isinstance(momentum, bool) or not (isinstance(momentum, real) and 0 < momentum <= 1):
            raise ValueError(f"MemBN: momentum must be a float in (0, 1], got {momentum!r}")
        self.channels, self.T = channels, T
        self.eps, self.momentum = float(eps), float(momentum)
        self.weight = nn.Parameter(torch.ones(T, channels))
        self.bias = nn.Parameter(torch.zeros(T, channels))
        self.p = nn.Parameter(torch.zeros(T))
        self.q = nn.Parameter(torch.zeros(T))
        self.register_buffer("running_mean", torch.zeros(T, channels))
        self.register_buffer("running_var", torch.ones(T, channels))

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    def _check(self, m: object, t: object) -> None:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.T:
            raise ValueError(f"MemBN(T={self.T}): step t must be an int in [0, T), got {t!r}")
        if not isinstance(m, torch.Tensor):
            raise TypeError(f"MemBN input must be a torch.Tensor, got {type(m).__name__}")
        check_dense("MemBN input", m)
        if m.dim() < 2 or m.shape[1] != self.channels:
            raise ValueError(
                f"MemBN(channels={self.channels}) needs a membrane [N, {self.channels}, *], "
                f"got {tuple(m.shape)}"
            )
        p = self.weight
        check_input_dtype("MemBN", m.dtype, p.dtype)
        if m.device != p.device:
            raise ValueError(f"MemBN input is on {m.device} but its parameters are on {p.device}")

    def forward(self, m: torch.Tensor, t: int) -> torch.Tensor:
        self._check(m, t)
        # Slices of the [T, C] buffers are views: batch_norm updates step t's statistics in place.
        bn = F.batch_norm(
            m,
            self.running_mean[t],
            self.running_var[t],
            self.weight[t],
            self.bias[t],
            self.training,
            self.momentum,
            self.eps,
        )
        return torch.sigmoid(self.p[t]) * bn + torch.sigmoid(self.q[t]) * m

    @torch.no_grad()
    def fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-step, per-channel affine map that eval-mode Mem-BN applies: `m -> k m + b`.

        Returns:
            (k, b), both `[T, C]`, fp32 (fp64 for an fp64 module), detached:
            `k_t = σ(p_t) γ_t / sqrt(var_t + eps) + σ(q_t)` and
            `b_t = σ(p_t) (β_t - mean_t γ_t / sqrt(var_t + eps))`. At inference the neuron's
            decay becomes `λ'_t = k_t λ_t` per channel and its current `I' = k_t I + b_t`.
        """
        dt = torch.promote_types(self.weight.dtype, torch.float32)
        a = self.weight.to(dt) / torch.sqrt(self.running_var.to(dt) + self.eps)
        sp = torch.sigmoid(self.p.to(dt))[:, None]
        sq = torch.sigmoid(self.q.to(dt))[:, None]
        k = sp * a + sq
        b = sp * (self.bias.to(dt) - self.running_mean.to(dt) * a)
        return k, b

    def extra_repr(self) -> str:
        return f"channels={self.channels}, T={self.T}, eps={self.eps}, momentum={self.momentum}"
