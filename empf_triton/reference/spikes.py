"""Reference multi-precision spike quantiser (docs/model.md §2)."""

from __future__ import annotations

import torch

from ._transforms import transform_active


def spike_codes_ref(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """Integer codes `clamp(round(s / step), 0, 2^bits - 1)`, as floats of s's dtype."""
    return torch.clamp(torch.round(s / step), 0, 2**bits - 1)


class _QuantizeSTE(torch.autograd.Function):
    """Q(s) forward, the identity backward. Written as forward / setup_context with a generated
    vmap rule, so it runs under torch.func transforms (forward mode: `_QuantizeSTEForward`)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
        return spike_codes_ref(s, bits, step) * step

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None


class _QuantizeSTEForward(_QuantizeSTE):
    """`_QuantizeSTE` with forward mode too (see `_transforms`)."""

    @staticmethod
    def jvp(ctx, s_t: torch.Tensor, *_) -> torch.Tensor:
        return s_t  # the same straight-through identity


def quantize_spikes_ref(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """`Q(s) = clamp(round(s / step), 0, 2^bits - 1) * step`; straight-through gradient."""
    return (_QuantizeSTEForward if transform_active() else _QuantizeSTE).apply(s, bits, step)


def encode_spikes_ref(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """Pack the k-bit codes of flattened `s` (bits in {1, 2, 4, 8}) into a 1-D uint8 tensor.

    Codes are `spike_codes_ref` in s's dtype (as `quantize_spikes_ref` computes them); NaN gets
    code 0. Element i goes to byte i // (8 // bits) at bit offset (i % (8 // bits)) * bits; the
    result has ceil(numel * bits / 8) bytes and unused high bits of the last byte are zero.
    """
    per = 8 // bits
    codes = spike_codes_ref(s.detach().reshape(-1), bits, step)
    codes = torch.where(torch.isnan(codes), torch.zeros_like(codes), codes).to(torch.int32)
    pad = (-codes.numel()) % per
    codes = torch.nn.functional.pad(codes, (0, pad)).reshape(-1, per)
    shifts = torch.arange(per, device=s.device, dtype=torch.int32) * bits
    return (codes << shifts).sum(dim=1).to(torch.uint8)


def decode_spikes_ref(
    codes: torch.Tensor,
    bits: int,
    step: float,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unpack 1-D uint8 `codes` (bits in {1, 2, 4, 8}) into `code * step` of `shape` and `dtype`.

    The first prod(shape) packed codes are used; the product is taken in `dtype`.
    """
    per = 8 // bits
    n = 1
    for d in shape:
        n *= d
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    c = (codes.to(torch.int32)[:, None] >> shifts) & (2**bits - 1)
    return (c.reshape(-1)[:n].to(dtype) * step).reshape(shape)
