"""Binary and ternary synapses (EMPF.md §2): quantisers, bit-packed weights, packed GEMM.

Public ops (all take `impl="auto" | "triton" | "reference"`):

- `binarize(w)`, `ternarize(w)`: the quantised weight with the clipped straight-through gradient.
- `pack_weight(w, bits)` -> `PackedWeight`; `unpack_weight(packed, dtype)` -> dense weight.
- `binary_matmul(x, packed, bias)`: `x @ W_q^T + bias` reading the packed words directly;
  differentiable in x and bias (the packed weights are constants).
- `binary_linear(x, weight, bias, bits)`: the training forward on a latent weight,
  `x @ Q(weight)^T + bias`, differentiable in x, weight (clipped STE) and bias.

`impl="auto"` on CUDA chooses by size class (`binary_auto_choice`): the packed Triton GEMM while the
row count M of x is small (reading weights dominates, and packed weights are 16x smaller than fp16),
the dense path (quantise or unpack once, then cuBLAS) above it. On CPU `auto` is the reference.
`impl="triton"` always runs the packed kernels; `impl="reference"` is the eager twin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..reference.binary import (
    binarize_ref,
    binary_linear_ref,
    binary_matmul_ref,
    binary_scale_ref,
    pack_weight_ref,
    ternarize_ref,
    ternary_stats_ref,
    unpack_weight_ref,
)
from ._common import (
    TRITON_DTYPES,
    check_like,
    check_tensor,
    load_kernels,
    resolve_impl,
    triton_available,
)

__all__ = [
    "AUTO_PACKED_MAX_M",
    "AUTO_PACKED_MAX_M_TRAIN",
    "PackedWeight",
    "binarize",
    "binary_auto_choice",
    "binary_linear",
    "binary_matmul",
    "pack_weight",
    "ternarize",
    "unpack_weight",
]

#: `impl="auto"` on CUDA: packed Triton GEMM for inputs with at most this many rows (x viewed as
#: [M, K]), dense unpack + cuBLAS above. A first estimate, not yet measured on a GPU: the packed
#: kernel saves weight traffic (memory-bound small M) but decodes every weight in registers, which
#: costs more than cuBLAS saves once the GEMM is compute bound. bench/test_bench_binary_gemm.py
#: records the choice next to both timings so this can be set from measurements.
AUTO_PACKED_MAX_M = 256
#: The same for training on latent weights (`binary_linear`), where the packed path also packs
#: the weight every step and computes the weight gradient densely.
AUTO_PACKED_MAX_M_TRAIN = 64


# ------------------------------------------------------------------------------------ PackedWeight


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int (1 = binary, 2 = ternary), got {type(bits).__name__}")
    if bits not in (1, 2):
        raise ValueError(f"bits must be 1 (binary) or 2 (ternary), got {bits}")
    return bits


@dataclass(frozen=True)
class PackedWeight:
    """A bit-packed binary (bits=1) or ternary (bits=2) weight.

    Attributes:
        words: int32 [bits, N, ceil(K / 32)]; element k of row n is bit k % 32 of word k // 32.
            Plane 0 is the sign (1 = +1, 0 = -1); ternary adds plane 1, the non-zero flag.
            Bits past K are 0. The last dimension must have unit stride.
        scale: floating [N], the per-output-channel α (the ternary α repeated over rows).
        shape: the original weight shape (N, *), e.g. (out, in) or (out, in/groups, kh, kw).
        K: prod(shape[1:]), the packed (input) dimension.
        bits: 1 or 2.
    """

    words: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    K: int
    bits: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        self.check()

    def check(self) -> None:
        """Raise TypeError / ValueError if the fields are inconsistent."""
        bits = _check_bits(self.bits)
        if not isinstance(self.words, torch.Tensor):
            raise TypeError(f"packed words must be a torch.Tensor, got {type(self.words).__name__}")
        if self.words.dtype != torch.int32:
            raise TypeError(f"packed words must have dtype torch.int32, got {self.words.dtype}")
        if not isinstance(self.scale, torch.Tensor) or not self.scale.is_floating_point():
            raise TypeError("packed scale must be a floating torch.Tensor")
        if len(self.shape) < 1 or any(s < 0 for s in self.shape):
            raise ValueError(f"packed shape must be (N, *) with N >= 0, got {self.shape}")
        N, K = self.shape[0], math.prod(self.shape[1:])
        if isinstance(self.K, bool) or not isinstance(self.K, int) or self.K != K:
            raise ValueError(f"packed K must equal prod(shape[1:]) = {K}, got {self.K!r}")
        expected = (bits, N, -(-K // 32))
        if tuple(self.words.shape) != expected:
            raise ValueError(
                f"packed words must have shape (bits, N, ceil(K/32)) = {expected}, "
                f"got {tuple(self.words.shape)}"
            )
        if self.words.numel() and self.words.stride(-1) != 1:
            raise ValueError("packed words must have unit stride along the last dimension")
        if tuple(self.scale.shape) != (N,):
            raise ValueError(f"packed scale must have shape ({N},), got {tuple(self.scale.shape)}")
        if self.scale.device != self.words.device:
            raise ValueError(
                f"packed scale is on {self.scale.device} but the words are on {self.words.device}"
            )

    @property
    def N(self) -> int:
        return self.shape[0]

    @property
    def device(self) -> torch.device:
        return self.words.device

    @property
    def nbytes(self) -> int:
        """Bytes of packed words plus scales (the true storage cost)."""
        return self.words.numel() * 4 + self.scale.numel() * self.scale.element_size()

    def to(self, device: torch.device | str) -> PackedWeight:
        return PackedWeight(
            self.words.to(device), self.scale.to(device), self.shape, self.K, self.bits
        )

    def rows(self, start: int, stop: int) -> PackedWeight:
        """Output channels [start, stop) as a PackedWeight of views (for grouped convolution)."""
        return PackedWeight(
            self.words[:, start:stop],
            self.scale[start:stop],
            (stop - start, *self.shape[1:]),
            self.K,
            self.bits,
        )


def _check_packed(packed: object) -> PackedWeight:
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a PackedWeight, got {type(packed).__name__}")
    packed.check()
    return packed


# ------------------------------------------------------------------------------------- size class


def binary_auto_choice(M: int, device: torch.device | str, *, training: bool = False) -> str:
    """What `impl="auto"` runs for an input of M rows on `device`.

    Returns "triton" (packed GEMM), "dense" (quantise/unpack + cuBLAS) or "reference" (CPU).
    """
    if torch.device(device).type != "cuda" or not triton_available():
        return "reference"
    limit = AUTO_PACKED_MAX_M_TRAIN if training else AUTO_PACKED_MAX_M
    return "triton" if M <= limit else "dense"


def _route(impl: str, M: int, *tensors: torch.Tensor | None, training: bool = False) -> str:
    resolved = resolve_impl(impl, *tensors)
    if impl == "auto" and resolved == "triton":
        limit = AUTO_PACKED_MAX_M_TRAIN if training else AUTO_PACKED_MAX_M
        return "triton" if M <= limit else "dense"
    return resolved


# ---------------------------------------------------------------------------------------- quantise


class _QuantizeTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: torch.Tensor, bits: int) -> torch.Tensor:
        k = load_kernels("binary")
        w2 = w.detach().reshape(w.shape[0], -1).contiguous()
        if bits == 1:
            scale, delta = binary_scale_ref(w2).float().contiguous(), None
        else:
            delta, alpha = ternary_stats_ref(w2)
            scale = alpha.float().expand(w2.shape[0]).contiguous()
            delta = delta.float().reshape(1)
        ctx.save_for_backward(w2)
        return k.quantize(w2, scale, delta).reshape(w.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (w2,) = ctx.saved_tensors
        k = load_kernels("binary")
        return k.ste_grad(g.contiguous().reshape(w2.shape), w2).reshape(g.shape), None


def _quantize(w: object, bits: int, impl: str) -> torch.Tensor:
    impl = resolve_impl(impl, w if isinstance(w, torch.Tensor) else None)
    w = check_tensor("w", w, impl, min_dim=1)
    if impl == "reference":
        return binarize_ref(w) if bits == 1 else ternarize_ref(w)
    return _QuantizeTriton.apply(w, bits)


def binarize(w: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Binary weight `α_n · sign(w)` (EMPF.md §2).

    Args:
        w: [N, *] latent weight, floating; dim 0 is the output channel.
        impl: "auto" | "triton" | "reference".

    Returns:
        [N, *] in w's dtype; α_n = mean(|w[n]|) computed in fp32 (fp64 for fp64), detached;
        sign(0) = +1. Gradient: dL/dw = dL/dout where |w| <= 1, else 0 (clipped STE).
    """
    return _quantize(w, 1, impl)


def ternarize(w: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Ternary (TWN) weight: `α · {+1, 0, -1}` with Δ = 0.7 · mean(|clip(w)|) (EMPF.md §2).

    Args:
        w: [N, *] latent weight, floating. Δ and α are per layer (over all of w).
        impl: "auto" | "triton" | "reference".

    Returns:
        [N, *] in w's dtype. Gradient: the clipped STE, as `binarize`.
    """
    return _quantize(w, 2, impl)


# ------------------------------------------------------------------------------------ pack/unpack


def pack_weight(w: torch.Tensor, bits: int = 1, *, impl: str = "auto") -> PackedWeight:
    """Quantise a weight and pack it along its input dimension into int32 words.

    Args:
        w: [N, *] floating weight (dim 0 = output channel); K = prod(w.shape[1:]), any K >= 0.
        bits: 1 (binary, `binarize`) or 2 (ternary, `ternarize`; sign and non-zero planes).
        impl: "auto" | "triton" | "reference".

    Returns:
        PackedWeight with words int32 [bits, N, ceil(K/32)] and scale [N] (fp32; fp64 for an fp64
        weight on the reference path). `unpack_weight(pack_weight(w, 1), w.dtype)` equals
        `binarize(w)` exactly. Not differentiable.
    """
    bits = _check_bits(bits)
    impl = resolve_impl(impl, w if isinstance(w, torch.Tensor) else None)
    w = check_tensor("w", w, impl, min_dim=1)
    shape = tuple(w.shape)
    w2 = w.detach().reshape(shape[0], -1)
    if impl == "reference":
        words, scale = pack_weight_ref(w2, bits)
    else:
        k = load_kernels("binary")
        if bits == 1:
            scale, delta = binary_scale_ref(w2).float().contiguous(), None
        else:
            delta, alpha = ternary_stats_ref(w2)
            scale = alpha.float().expand(shape[0]).contiguous()
            delta = delta.float().reshape(1)
        words = k.pack(w2, delta)
    return PackedWeight(words, scale, shape, w2.shape[1], bits)


def unpack_weight(
    packed: PackedWeight, dtype: torch.dtype | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """The dense quantised weight `scale[n] · {-1, 0, +1}` of `packed`, in its original shape.

    Args:
        packed: a PackedWeight.
        dtype: output dtype (default: the scale's dtype).
        impl: "auto" | "triton" | "reference".

    Returns:
        [N, *] tensor of `packed.shape`. Exact: α·(±1) rounded once to `dtype`.
    """
    packed = _check_packed(packed)
    dtype = packed.scale.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    impl = resolve_impl(impl, packed.words)
    if impl == "triton" and dtype not in TRITON_DTYPES:
        raise TypeError(f"impl='triton' unpacks to fp32/fp16/bf16, got dtype {dtype}")
    if impl == "reference":
        dense = unpack_weight_ref(packed.words, packed.scale, packed.K, dtype)
    else:
        k = load_kernels("binary")
        dense = k.unpack(packed.words, packed.scale.float().contiguous(), packed.K, dtype)
    return dense.reshape(packed.shape)


# ----------------------------------------------------------------------------------------- matmul


class _BinaryMatmulTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, bias, words, scale, K):
        k = load_kernels("binary")
        ctx.save_for_backward(words, scale)
        ctx.K = K
        return k.binary_gemm(x2, words, scale, bias)

    @staticmethod
    def backward(ctx, g):
        words, scale = ctx.saved_tensors
        k = load_kernels("binary")
        gx = gb = None
        if ctx.needs_input_grad[0]:
            gx = k.binary_gemm_t(g, words, scale, ctx.K)
        if ctx.needs_input_grad[1]:
            gb = g.sum(0, dtype=torch.float32).to(g.dtype)
        return gx, gb, None, None, None


def _check_x_bias(x, K: int, N: int, bias, device: torch.device, impl: str, what: str):
    x = check_tensor("x", x, impl, min_dim=1)
    if x.shape[-1] != K:
        raise ValueError(
            f"x must have shape [*, K] with K = {K} ({what}), got shape {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")
    check_like("bias", bias, "x", x, (N,))
    return x


def binary_matmul(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """`x @ W_q^T + bias` with W_q the dense weight of `packed` (binary or ternary).

    Args:
        x: [*, K] floating activations (any strides).
        packed: PackedWeight of shape (N, *) with K = prod(shape[1:]); same device as x.
        bias: [N] in x's dtype, or None.
        impl: "auto" (CUDA: packed kernel for M <= AUTO_PACKED_MAX_M rows, else dense unpack +
            cuBLAS; CPU: reference), "triton" (packed kernel) or "reference".

    Returns:
        [*, N] in x's dtype. The kernel decodes the bits in registers, accumulates in fp32 and
        applies scale and bias in the epilogue. Gradients: dL/dx = (dL/dout · scale) @ sign
        (computed from the packed words, no dense copy), dL/dbias = Σ dL/dout; none for `packed`.
    """
    packed = _check_packed(packed)
    N, K = packed.N, packed.K
    M = x.numel() // max(K, 1) if isinstance(x, torch.Tensor) else 0
    route = _route(impl, M, x if isinstance(x, torch.Tensor) else None, packed.words)
    x = _check_x_bias(
        x, K, N, bias, packed.device, "triton" if route == "dense" else route, "packed weight"
    )
    if route == "reference":
        return binary_matmul_ref(x, packed.words, packed.scale, K, bias)
    if route == "dense":
        w = unpack_weight(packed, x.dtype, impl="triton").reshape(N, K)
        return F.linear(x, w, bias)
    x2 = x.reshape(-1, K)
    b = bias.contiguous() if bias is not None else None
    scale = packed.scale.float().contiguous()
    out = _BinaryMatmulTriton.apply(x2, b, packed.words, scale, K)
    return out.reshape(*x.shape[:-1], N)


# ------------------------------------------------------------------------------ training (latent W)


class _BinaryLinearTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, bits):
        k = load_kernels("binary")
        w2 = weight.detach().contiguous()
        if bits == 1:
            scale, delta = binary_scale_ref(w2).float().contiguous(), None
        else:
            delta, alpha = ternary_stats_ref(w2)
            scale = alpha.float().expand(w2.shape[0]).contiguous()
            delta = delta.float().reshape(1)
        words = k.pack(w2, delta)
        ctx.save_for_backward(x2, w2, words, scale)
        return k.binary_gemm(x2, words, scale, bias)

    @staticmethod
    def backward(ctx, g):
        x2, w2, words, scale = ctx.saved_tensors
        k = load_kernels("binary")
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = k.binary_gemm_t(g, words, scale, w2.shape[1])
        if ctx.needs_input_grad[1]:
            # dL/dW_q = g^T x is a dense GEMM whatever the weight format: cuBLAS's job.
            gwq = (g.t() @ x2).to(w2.dtype).contiguous()
            gw = k.ste_grad(gwq, w2)
        if ctx.needs_input_grad[2]:
            gb = g.sum(0, dtype=torch.float32).to(g.dtype)
        return gx, gw, gb, None


def binary_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    bits: int = 1,
    impl: str = "auto",
) -> torch.Tensor:
    """Training forward of a binary/ternary linear layer on a latent weight: `x @ Q(w)^T + bias`.

    Args:
        x: [*, K] floating activations.
        weight: [N, K] latent weight (any floating dtype; typically fp32), same device as x.
        bias: [N] in x's dtype, or None.
        bits: 1 (Q = binarize) or 2 (Q = ternarize).
        impl: "auto" (CUDA: pack + packed kernels for M <= AUTO_PACKED_MAX_M_TRAIN rows, else
            quantise + cuBLAS; CPU: reference), "triton" (packed kernels) or "reference".

    Returns:
        [*, N] in x's dtype. Gradients: x and bias as `binary_matmul`; weight through the clipped
        STE, dL/dw = (dL/dout^T x) where |w| <= 1, else 0 (α detached).
    """
    bits = _check_bits(bits)
    M = x.numel() // max(x.shape[-1], 1) if isinstance(x, torch.Tensor) and x.dim() else 0
    tensors = [t if isinstance(t, torch.Tensor) else None for t in (x, weight)]
    route = _route(impl, M, *tensors, training=True)
    kimpl = "triton" if route == "dense" else route
    weight = check_tensor("weight", weight, kimpl)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape
    x = _check_x_bias(x, K, N, bias, weight.device, kimpl, "weight")
    if route == "reference":
        return binary_linear_ref(x, weight, bias, bits)
    if route == "dense":
        wq = _quantize(weight, bits, "triton")
        return F.linear(x, wq.to(x.dtype), bias)
    x2 = x.reshape(-1, K)
    b = bias.contiguous() if bias is not None else None
    return _BinaryLinearTriton.apply(x2, weight, b, bits).reshape(*x.shape[:-1], N)
