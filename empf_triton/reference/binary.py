"""Reference binary and ternary synapses (docs/model.md §4), and the packed-weight format.

A weight of shape [N, *] is viewed as [N, K] (N output channels, K = prod of the rest).

- Binary: `W_b = α_n · sign(W)`, α_n = mean(|W[n]|) (detached), sign(0) = +1.
- Ternary (TWN): `Wc = clip(W, -1, 1)`, Δ = 0.7 · mean(|Wc|) over the whole layer,
  α = mean(|Wc| where |Wc| > Δ) (0 when no element passes), `W_t = α · {+1 if Wc > Δ,
  0 if |Wc| <= Δ, -1 if Wc < -Δ}`.
- Both use the clipped straight-through estimator: dL/dW = dL/dW_q where |W| <= 1, else 0.
- NaN: a NaN weight propagates. Binary: its row's α is NaN, so the whole row is NaN. Ternary: Δ and
  α are per layer, so the whole layer is NaN (the weight is `α · t`, and NaN · 0 is NaN). The Triton
  kernels do the same; no path checks the values (that would synchronise with the device).
- Empty weights: with K = 0 (or N = 0) the statistics are 0 (not the NaN of an empty mean), so a
  layer with no inputs outputs its bias.

Statistics (α, Δ) are computed in fp32 (fp64 for fp64 weights) and the quantised weight is rounded
once to W's dtype, so `unpack(pack(W))` reproduces `binarize(W)` exactly.

Packed format: int32 words `[planes, N, ceil(K / 32)]`; element k of row n is bit `k % 32` of word
`k // 32`. Plane 0 is the sign (1 -> +1); ternary weights add plane 1, the non-zero flag. Bits past
K are 0. The scale is one value per row (the ternary α repeated over rows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._transforms import transform_active

_SHIFTS = torch.arange(32, dtype=torch.int64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the statistics: fp64 for fp64 weights, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_2d(w: torch.Tensor) -> torch.Tensor:
    """W [N, *] viewed as [N, K], K = prod(shape[1:]) (also when N or K is 0)."""
    return w.reshape(w.shape[0], math.prod(w.shape[1:]))


def binary_scale_ref(w: torch.Tensor) -> torch.Tensor:
    """α_n = mean(|W[n]|) over everything but dim 0, as [N] in `acc_dtype` (0 when K = 0)."""
    w2 = as_2d(w.detach()).to(acc_dtype(w.dtype))
    if w2.shape[1] == 0:
        return w2.new_zeros(w2.shape[0])
    return w2.abs().mean(dim=1)


def ternary_stats_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Δ, α) of the TWN rule as 0-d tensors in `acc_dtype` (both 0 for an empty W).

    A NaN in W makes both NaN (α is forced to NaN: no element passes a NaN threshold).
    """
    a = w.detach().to(acc_dtype(w.dtype)).clamp(-1.0, 1.0).abs()
    if a.numel() == 0:
        zero = a.new_zeros(())
        return zero, zero
    delta = 0.7 * a.mean()
    keep = a > delta
    alpha = (a * keep).sum() / keep.sum().clamp_min(1) + 0.0 * delta
    return delta, alpha


def _bshape(w: torch.Tensor) -> tuple[int, ...]:
    return (w.shape[0],) + (1,) * (w.dim() - 1)


def binarize_values_ref(w: torch.Tensor) -> torch.Tensor:
    """α_n · sign(W) (sign(0) = +1) in W's dtype, no gradient."""
    alpha = binary_scale_ref(w).reshape(_bshape(w))
    return torch.where(w.detach() >= 0, alpha, -alpha).to(w.dtype)


def ternarize_values_ref(w: torch.Tensor) -> torch.Tensor:
    """The TWN ternary weight in W's dtype, no gradient."""
    delta, alpha = ternary_stats_ref(w)
    wc = w.detach().to(delta.dtype).clamp(-1.0, 1.0)
    t = (wc > delta).to(delta.dtype) - (wc < -delta).to(delta.dtype)
    return (alpha * t).to(w.dtype)  # α · t, so a NaN α gives NaN everywhere (not 0)


class _ClippedSTE(torch.autograd.Function):
    """Forward returns the precomputed quantised weight; backward passes g where |w| <= 1.
    Written as forward / setup_context with a generated vmap rule, so it runs under torch.func
    transforms (forward mode: `_ClippedSTEForward`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return q

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (w,) = ctx.saved_tensors
        return torch.where(w.abs() <= 1, g, torch.zeros_like(g)), None


class _ClippedSTEForward(_ClippedSTE):
    """`_ClippedSTE` with forward mode too (see `_transforms`)."""

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _ClippedSTE.setup_context(ctx, inputs, output)
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def jvp(ctx, w_t: torch.Tensor, q_t: torch.Tensor | None) -> torch.Tensor:
        """The same straight-through derivative, `1[|w| <= 1]`."""
        (w,) = ctx.saved_tensors
        return torch.where(w.abs() <= 1, w_t, torch.zeros_like(w_t))


def _clipped_ste(w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (_ClippedSTEForward if transform_active() else _ClippedSTE).apply(w, q)


def binarize_ref(w: torch.Tensor) -> torch.Tensor:
    """Binary weight `α_n · sign(W)` with the clipped straight-through gradient."""
    return _clipped_ste(w, binarize_values_ref(w))


def ternarize_ref(w: torch.Tensor) -> torch.Tensor:
    """Ternary (TWN) weight with the clipped straight-through gradient."""
    return _clipped_ste(w, ternarize_values_ref(w))


def quantize_ref(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`binarize_ref` for bits=1, `ternarize_ref` for bits=2."""
    return binarize_ref(w) if bits == 1 else ternarize_ref(w)


def _pack_plane(bits: torch.Tensor) -> torch.Tensor:
    """[N, K] bool -> [N, ceil(K/32)] int32, element k at bit k % 32 of word k // 32."""
    N, K = bits.shape
    KW = -(-K // 32)
    padded = torch.nn.functional.pad(bits.to(torch.int64), (0, KW * 32 - K))  # (vmap: no in-place)
    words = (padded.reshape(N, KW, 32) << _SHIFTS.to(bits.device)).sum(dim=-1)
    # Values are in [0, 2^32); reinterpret as int32 two's complement.
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_weight_ref(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise and pack W [N, *] into (words int32 [bits, N, ceil(K/32)], scale [N]).

    The scale is in `acc_dtype(W.dtype)`.
    """
    w2 = as_2d(w.detach())
    if bits == 1:
        scale = binary_scale_ref(w2)
        return _pack_plane(w2 >= 0).unsqueeze(0), scale
    delta, alpha = ternary_stats_ref(w2)
    wc = w2.to(delta.dtype).clamp(-1.0, 1.0)
    planes = torch.stack([_pack_plane(wc > delta), _pack_plane(wc.abs() > delta)])
    return planes, alpha.expand(w2.shape[0]).clone()


def decode_ref(words: torch.Tensor, K: int) -> torch.Tensor:
    """Words [planes, N, KW] -> int8 [N, K] of -1 / 0 / +1."""
    bits = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 1
    bits = bits.reshape(*words.shape[:2], words.shape[2] * 32)[..., :K].to(torch.int8)
    val = 2 * bits[0] - 1
    return val * bits[1] if words.shape[0] == 2 else val


def unpack_weight_ref(
    words: torch.Tensor, scale: torch.Tensor, K: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense [N, K] = scale[n] · decode(words) in `dtype` (product in scale's dtype)."""
    return (decode_ref(words, K).to(scale.dtype) * scale[:, None]).to(dtype)


def binary_matmul_ref(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    K: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ unpack(words, scale).T + bias` in x's dtype; x [*, K], result [*, N].

    The packed weight is a constant: no gradient reaches `scale` (as on the Triton path).
    """
    return F.linear(x, unpack_weight_ref(words, scale.detach(), K, x.dtype), bias)


def binary_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Training forward `x @ Q(W).T + bias` with Q = binarize (bits=1) or ternarize (bits=2)."""
    return F.linear(x, quantize_ref(weight, bits).to(x.dtype), bias)
