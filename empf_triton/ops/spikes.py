"""Multi-precision spikes (docs/model.md §2): the k-bit quantiser Q and k-bit code packing.

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

The step must be finite and > 0 once rounded to fp32, where the kernels use it (1e300 is inf in
fp32 and 1e-50 is 0: both are rejected with a ValueError naming `step`).

torch.library: the Triton paths are the custom ops `torch.ops.empf.quantize_spikes`,
`encode_spikes` and `decode_spikes` (fake implementations; `quantize_spikes` has its
straight-through backward registered), which `torch.compile(fullgraph=True)` keeps as opaque nodes.
Eager calls go to the same implementation functions without the custom-op dispatch (~10 µs of
host time per call). With the interpreter off, the ops' CPU implementation is the reference.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from ..reference.spikes import (
    decode_spikes_ref,
    encode_spikes_ref,
    quantize_spikes_ref,
    spike_codes_ref,
)
from ._common import (
    FUNC_TRANSFORMS,
    REFERENCE_DTYPES,
    TRITON_DTYPES,
    PlanCache,
    TritonUnavailableError,
    _interpreter_flag,
    c_apply,
    check_dense,
    check_spike_step,
    check_tensor,
    device_guard,
    load_kernels,
    resolve_impl,
    transform_active,
)
from ._library import register_op

PACK_BITS = (1, 2, 4, 8)
_QUANT_BITS = range(1, 9)


def _check_bits_step(bits: object, step: object, allowed: Sequence[int]) -> tuple[int, float]:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in {tuple(allowed)}, got {type(bits).__name__}")
    if bits not in allowed:
        raise ValueError(f"bits must be in {tuple(allowed)}, got {bits}")
    return bits, check_spike_step(step, "step")


def _check_spikes(s: object, impl: str) -> tuple[torch.Tensor, str]:
    if not isinstance(s, torch.Tensor):
        raise TypeError(f"s must be a torch.Tensor, got {type(s).__name__}")
    impl = resolve_impl(impl, s)
    return check_tensor("s", s, impl), impl


# ----------------------------------------------------------- Triton implementations (unchecked)


def _ks():
    # Not cached here: an imported module costs importlib a dict lookup, and tests patch
    # `load_kernels` to see that the kernels really ran.
    return load_kernels("spikes")


#: Launch plans of the spike kernels by call form (`ops._common.planned`): a layer's spikes
#: have the same shape on every step.
_PLANS = PlanCache()


def _planned(key: tuple, x: torch.Tensor, launcher, *args) -> torch.Tensor:
    """`launcher(x, *args)` on a contiguous non-empty x, through the plan of `key`."""
    return _PLANS.of(key, lambda: launcher(x, *args, bind=True))(x)[0]


def _quantize_impl(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """Q(s), contiguous, s's shape and dtype."""
    s = s.contiguous()
    with device_guard(s):
        k = _ks()
        if not s.numel():
            return k.quantize_spikes_fwd(s, bits, step)
        key = ("quantize", s.shape, s.dtype, s.device, bits, step)
        return _planned(key, s, k.quantize_spikes_fwd, bits, step)


def _encode_impl(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """Packed codes of the flattened s, 1-D uint8."""
    s = s.contiguous()
    with device_guard(s):
        k = _ks()
        if not s.numel():
            return k.encode_spikes_fwd(s, bits, step)
        key = ("encode", s.numel(), s.dtype, s.device, bits, step)
        return _planned(key, s, k.encode_spikes_fwd, bits, step)


def _decode_impl(
    codes: torch.Tensor, bits: int, step: float, n: int, dtype: torch.dtype
) -> torch.Tensor:
    """The first n decoded spikes, 1-D `dtype`."""
    codes = codes.contiguous()
    with device_guard(codes):
        k = _ks()
        if not n:
            return k.decode_spikes_fwd(codes, bits, step, n, dtype)
        key = ("decode", codes.numel(), codes.device, bits, step, n, dtype)
        return _planned(key, codes, k.decode_spikes_fwd, bits, step, n, dtype)


def _cpu(fn):
    """The reference as the ops' CPU implementation when the interpreter is off."""
    return None if _interpreter_flag() else {"cpu": fn}


def _ref_quantize(s, bits, step):
    return (spike_codes_ref(s, bits, step) * step).contiguous()


_quantize_op = register_op(
    "quantize_spikes",
    _quantize_impl,
    fake=lambda s, bits, step: torch.empty_like(s, memory_format=torch.contiguous_format),
    backward=lambda ctx, g: (g, None, None),  # straight-through
    setup_context=lambda ctx, inputs, output: None,
    device_impls=_cpu(_ref_quantize),
)
_encode_op = register_op(
    "encode_spikes",
    _encode_impl,
    fake=lambda s, bits, step: s.new_empty((-(-s.numel() // (8 // bits)),), dtype=torch.uint8),
    device_impls=_cpu(encode_spikes_ref),
)
_decode_op = register_op(
    "decode_spikes",
    _decode_impl,
    fake=lambda codes, bits, step, n, dtype: codes.new_empty((n,), dtype=dtype),
    device_impls=_cpu(
        lambda codes, bits, step, n, dtype: decode_spikes_ref(codes, bits, step, (n,), dtype)
    ),
)


class _QuantizeSpikesTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
        return _quantize_impl(s, bits, step)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g, None, None


_compiling = torch.compiler.is_compiling


_QUANTIZE_APPLY = c_apply(_QuantizeSpikesTriton)


def quantize_spikes_triton(s: torch.Tensor, bits: int, step: float) -> torch.Tensor:
    """Unchecked Triton `quantize_spikes` (s fp32/fp16/bf16, bits in 1..8, step checked)."""
    if _compiling():
        return _quantize_op(s, bits, step)
    if transform_active():  # the public paths resolve impl before this
        raise TritonUnavailableError(FUNC_TRANSFORMS)
    return _QUANTIZE_APPLY(s, bits, step)


def quantize_spikes(
    s: torch.Tensor, bits: int, step: float = 0.25, *, impl: str = "auto"
) -> torch.Tensor:
    """k-bit spike quantiser `Q(s) = clamp(round(s / step), 0, 2^bits - 1) * step`.

    Rounding is half to even (as `torch.round`); NaN propagates, +inf gives the top level and
    -inf gives 0.

    Args:
        s: [*] floating spikes (fp32/fp16/bf16; fp64 too with impl="reference").
        bits: k in 1..8 (2^k levels).
        step: the level spacing Δ, finite and > 0 in fp32.
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
    bits, step = _check_bits_step(bits, step, _QUANT_BITS)
    if impl == "reference":
        return quantize_spikes_ref(s, bits, step)
    return quantize_spikes_triton(s, bits, step)


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
        step: the level spacing Δ, finite and > 0 in fp32.
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
    return _encode_op(s, bits, step) if _compiling() else _encode_impl(s, bits, step)


def _size(d: object) -> int:
    if isinstance(d, bool):
        raise TypeError
    return operator.index(d)  # an int, a numpy integer or a 0-d integer tensor, as torch takes


def _check_shape(shape: object) -> tuple[int, ...]:
    try:
        try:
            dims = (_size(shape),)
        except TypeError:
            if isinstance(shape, (str, bytes)):
                raise
            dims = tuple(_size(d) for d in shape)
    except TypeError:
        raise TypeError(f"shape must be an int or a sequence of ints, got {shape!r}") from None
    if any(d < 0 for d in dims):
        raise ValueError(f"shape must have non-negative sizes, got {dims}")
    return dims


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
        step: the level spacing Δ, finite and > 0 in fp32.
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
    check_dense("codes", codes)
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
    codes = codes.detach()
    if _compiling():
        return _decode_op(codes, bits, step, n, dtype).reshape(shape)
    return _decode_impl(codes, bits, step, n, dtype).reshape(shape)
