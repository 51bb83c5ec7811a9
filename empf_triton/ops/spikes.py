"""Multi-precision spikes (EMPF.md §1): the k-bit quantiser Q and k-bit code packing.

`quantize_spikes` is the differentiable quantiser used by the neurons (straight-through gradient);
`encode_spikes` / `decode_spikes` store its integer codes in k bits and read them back, so that
`decode_spikes(encode_spikes(s, k, step), k, step, s.shape, dtype=s.dtype) == quantize_spikes(s, k,
step)` with the same `impl` (NaN excepted: it quantises to NaN but encodes as code 0).

Codes and dtypes. The reference computes `round(s / step)` in s's dtype, as torch does; the Triton
kernels upcast s to fp32 and divide there (IEEE division). For fp32 inputs and for any input with a
power-of-two `step` (0.25 included) the two agree exactly, since s / step is then exact in every
dtype. For fp16/bf16 inputs with another step, the same-dtype reference rounds the quotient to
fp16/bf16 before `round`, so near a .5 tie it can land one code away from the kernel (whose fp32
code is the more accurate one). On CUDA, torch also computes `s / step` as `s * (1 / step)`, which
can differ from IEEE division by one ulp; the kernels follow the CPU reference. (Triton's CPU
interpreter casts fp32 to bf16 by truncation, so bf16 outputs that are not exact, e.g. 0.3 * c,
differ from compiled/torch rounding there; with step 0.25 every level is exact in bf16.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..reference.spikes import decode_spikes_ref, encode_spikes_ref, quantize_spikes_ref
from ._common import (
    REFERENCE_DTYPES,
    TRITON_DTYPES,
    check_tensor,
    device_guard,
    load_kernels,
    resolve_impl,
)

PACK_BITS = (1, 2, 4, 8)


def _check_bits_step(bits: object, step: object, allowed: Sequence[int]) -> tuple[int, float]:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in {tuple(allowed)}, got {type(bits).__name__}")
    if bits not in allowed:
        raise ValueError(f"bits must be in {tuple(allowed)}, got {bits}")
    if isinstance(step, bool) or not isinstance(step, (int, float)):
        raise TypeError(f"step must be a float, got {type(step).__name__}")
    step = float(step)
    if not (math.isfinite(step) and step > 0):
        raise ValueError(f"step must be a finite float > 0, got {step}")
    return bits, step


def _check_spikes(s: object, impl: str) -> tuple[torch.Tensor, str]:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"s must be a torch.Tensor, got {type(s).__name__}")
    impl = resolve_impl(impl, s)
    return check_tensor("s", s, impl), impl


class _QuantizeSpikesTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
        kernels = load_kernels("spikes")
        return kernels.quantize_spikes_fwd(s.contiguous(), bits, step)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None


def quantize_spikes(
    s: torch.Tensor, bits: int, step: float = 0.25, *, impl: str = "auto"
) -> torch.Tensor:
    """k-bit spike quantiser `Q(s) = clamp(round(s / step), 0, 2^bits - 1) * step`.

    Rounding is half to even (as `torch.round`); NaN propagates, +inf gives the top level and
    -inf gives 0.

    Args:
        s: [*] floating spikes (fp32/fp16/bf16; fp64 too with impl="reference").
        bits: k in 1..8 (2^k levels).
        step: the level spacing Δ, a finite float > 0.
        impl: "auto" (Triton on CUDA, else reference), "triton" or "reference".

    Returns:
        [*] tensor of s's shape and dtype (contiguous on the Triton path).

    Gradient:
        Straight-through: dL/ds = dL/dout, unchanged (also outside the clamp range).

    Raises:
        TypeError: s not a floating tensor of a supported dtype, bits not an int, step not a float.
        ValueError: bits outside 1..8, step not finite or <= 0, unknown impl, or impl="triton"
            where Triton cannot run.
    """
    s, impl = _check_spikes(s, impl)
    bits, step = _check_bits_step(bits, step, range(1, 9))
    if impl == "reference":
        return quantize_spikes_ref(s, bits, step)
    with device_guard(s):
        return _QuantizeSpikesTriton.apply(s, bits, step)


def encode_spikes(
    s: torch.Tensor, bits: int, step: float = 0.25, *, impl: str = "auto"
) -> torch.Tensor:
    """Packed k-bit codes `c = clamp(round(s / step), 0, 2^bits - 1)` of the flattened s.

    Element i (row-major order of s) goes to byte i // (8 // bits) at bit offset
    (i % (8 // bits)) * bits; the unused high bits of the last byte are zero. NaN spikes get code
    0 (so they decode to 0, not NaN); +inf gets the top code, -inf code 0.

    Args:
        s: [*] floating spikes (fp32/fp16/bf16; fp64 too with impl="reference").
        bits: k in {1, 2, 4, 8}.
        step: the level spacing Δ, a finite float > 0.
        impl: "auto" (Triton on CUDA, else reference), "triton" or "reference".

    Returns:
        1-D uint8 tensor of ceil(s.numel() * bits / 8) bytes on s's device. Not differentiable.

    Raises:
        TypeError / ValueError: as for `quantize_spikes`, with bits restricted to {1, 2, 4, 8}.
    """
    s, impl = _check_spikes(s, impl)
    bits, step = _check_bits_step(bits, step, PACK_BITS)
    s = s.detach()
    if impl == "reference":
        return encode_spikes_ref(s, bits, step)
    with device_guard(s):
        return load_kernels("spikes").encode_spikes_fwd(s.contiguous(), bits, step)


def _check_shape(shape: object) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, Sequence) or not all(
        isinstance(d, int) and not isinstance(d, bool) for d in shape
    ):
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}")
    if any(d < 0 for d in shape):
        raise ValueError(f"shape must have non-negative sizes, got {tuple(shape)}")
    return tuple(shape)


def decode_spikes(
    codes: torch.Tensor,
    bits: int,
    step: float = 0.25,
    shape: Sequence[int] | int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    impl: str = "auto",
) -> torch.Tensor:
    """Unpack k-bit codes written by `encode_spikes` into spikes `c * step`.

    Args:
        codes: 1-D uint8 tensor of ceil(prod(shape) * bits / 8) bytes.
        bits: k in {1, 2, 4, 8}, as used to encode.
        step: the level spacing Δ, a finite float > 0.
        shape: shape of the result; None means 1-D with every packed slot,
            codes.numel() * (8 // bits) elements.
        dtype: floating result dtype (fp32/fp16/bf16; fp64 too with impl="reference").
        impl: "auto" (Triton on CUDA, else reference), "triton" or "reference".

    Returns:
        Tensor of `shape` and `dtype` on codes' device: c * step, computed in fp32 and rounded
        once to `dtype` (torch does the same for fp16/bf16, so both impls agree). Not
        differentiable.

    Raises:
        TypeError: codes not a uint8 tensor, dtype not a supported floating dtype, bad shape type.
        ValueError: codes not 1-D, length not ceil(prod(shape) * bits / 8), bits not in
            {1, 2, 4, 8}, bad step, unknown impl, or impl="triton" where Triton cannot run.
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    impl = resolve_impl(impl, codes)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must have dtype torch.uint8, got {codes.dtype}")
    if codes.dim() != 1:
        raise ValueError(f"codes must be 1-D, got shape {tuple(codes.shape)}")
    bits, step = _check_bits_step(bits, step, PACK_BITS)
    allowed = TRITON_DTYPES if impl == "triton" else REFERENCE_DTYPES
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"dtype must be one of ({names}) for impl={impl!r}, got {dtype!r}")
    per = 8 // bits
    shape = (codes.numel() * per,) if shape is None else _check_shape(shape)
    n = math.prod(shape)
    n_bytes = -(-n // per)
    if codes.numel() != n_bytes:
        raise ValueError(
            f"codes must hold ceil({n} * {bits} / 8) = {n_bytes} bytes for shape {shape}, "
            f"got {codes.numel()}"
        )
    if impl == "reference":
        return decode_spikes_ref(codes, bits, step, shape, dtype)
    with device_guard(codes):
        out = load_kernels("spikes").decode_spikes_fwd(codes.contiguous(), bits, step, n, dtype)
    return out.reshape(shape)
