"""Binary and ternary synaptic layers (EMPF.md §2): `BinaryLinear` and `BinaryConv2d`.

Training: a latent fp32 weight; the forward uses `binarize(W)` (weight_bits=1) or `ternarize(W)`
(weight_bits=1.5) with the clipped straight-through gradient. `BinaryLinear` trains through
`ops.binary_linear`, whose `impl="auto"` takes the packed Triton kernels for small inputs on CUDA
and quantise + cuBLAS otherwise (`ops.binary.AUTO_PACKED_MAX_M_TRAIN`). `BinaryConv2d` always
trains through quantise + `F.conv2d` (cuDNN): its GEMM has M = batch x output pixels rows, far
above any size where the packed kernel wins; `impl` selects the quantiser's implementation.

Deployment: `layer.pack()` replaces the latent weight by a `PackedWeight` (int32 words + per-channel
scale, stored as buffers `packed_words` and `packed_scale`, so `.to()` and `state_dict()` carry it)
and the forward then runs `ops.binary_matmul` (convolution: `F.unfold` im2col, one GEMM per group),
reproducing the training forward up to float rounding. The latent weight is discarded (that is the
point of packing). A packed layer cannot train its weight: a forward in training mode with grad
enabled raises `PackedLayerTrainingError`; use `.eval()` / `torch.no_grad()` for inference (grad
w.r.t. the input still flows in eval mode), or `.unpack()` to train again, which restores a latent
weight equal to the dequantised one (±α, so training resumes from the deployed weights, not from the
discarded latent values). To load a packed checkpoint, build the layer, call `pack()`, then
`load_state_dict()`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import IMPLS
from ..ops.binary import (
    PackedWeight,
    binarize,
    binary_auto_choice,
    binary_linear,
    binary_matmul,
    pack_weight,
    ternarize,
    unpack_weight,
)

__all__ = ["BinaryConv2d", "BinaryLinear", "PackedLayerTrainingError"]


class PackedLayerTrainingError(RuntimeError):
    """A `pack()`ed binary layer was asked to train its (discarded) latent weight."""


def _weight_bits(weight_bits: object) -> int:
    """weight_bits 1 -> 1 packed bit, 1.5 (ternary) -> 2 packed bits."""
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, (int, float)):
        raise TypeError(f"weight_bits must be 1 or 1.5, got {type(weight_bits).__name__}")
    if weight_bits == 1:
        return 1
    if weight_bits == 1.5:
        return 2
    raise ValueError(f"weight_bits must be 1 (binary) or 1.5 (ternary), got {weight_bits}")


def _check_impl(impl: object) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


class _BinaryLayer(nn.Module):
    """Shared latent/packed bookkeeping of BinaryLinear and BinaryConv2d."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def _setup(self, shape: tuple[int, ...], bias: bool, weight_bits, impl, device, dtype):
        self.weight_bits = 1.5 if _weight_bits(weight_bits) == 2 else 1
        self.bits = _weight_bits(weight_bits)
        self.impl = _check_impl(impl)
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.float32}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(shape[0], **factory)) if bias else None
        self._packed_shape: tuple[int, ...] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As nn.Linear / nn.Conv2d: kaiming-uniform(a=√5) weight, U(±1/√fan_in) bias.

        The range is inside the STE's clip window |w| <= 1, so every weight starts trainable.
        """
        if self.weight is None:
            raise PackedLayerTrainingError("reset_parameters() on a packed layer: unpack() first")
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = math.prod(self.weight.shape[1:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    @property
    def is_packed(self) -> bool:
        return self._packed_shape is not None

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (binarised or ternarised), with its STE gradient."""
        if self.is_packed:
            return unpack_weight(self.packed_weight(), torch.float32)
        q = binarize if self.bits == 1 else ternarize
        return q(self.weight, impl=self.impl)

    def packed_weight(self) -> PackedWeight:
        """The packed layer's PackedWeight (its buffers), or a fresh packing of the latent one."""
        if not self.is_packed:
            return pack_weight(self.weight.detach(), self.bits, impl=self.impl)
        shape = self._packed_shape
        return PackedWeight(
            self.packed_words, self.packed_scale, shape, math.prod(shape[1:]), self.bits
        )

    @torch.no_grad()
    def pack(self) -> _BinaryLayer:
        """Store the weight bit-packed and discard the latent fp32 weight (idempotent)."""
        if self.is_packed:
            return self
        packed = pack_weight(self.weight, self.bits, impl=self.impl)
        self.register_buffer("packed_words", packed.words)
        self.register_buffer("packed_scale", packed.scale)
        self._packed_shape = packed.shape
        self.register_parameter("weight", None)
        return self

    @torch.no_grad()
    def unpack(self) -> _BinaryLayer:
        """Restore a trainable latent fp32 weight equal to the dequantised packed weight."""
        if not self.is_packed:
            return self
        dense = unpack_weight(self.packed_weight(), torch.float32)
        del self.packed_words, self.packed_scale
        self._packed_shape = None
        self.weight = nn.Parameter(dense)
        return self

    def weight_bytes(self) -> int:
        """True packed storage: 1 bit (ternary: 2) per weight in int32 words, plus fp32 scales.

        Rows are padded to whole 32-bit words; the bias is not counted. The same number whether
        or not the layer is packed yet (it is what `pack()` stores).
        """
        shape = self._packed_shape if self.is_packed else tuple(self.weight.shape)
        N, K = shape[0], math.prod(shape[1:])
        return self.bits * N * (-(-K // 32)) * 4 + N * 4

    def _check_packed_use(self) -> None:
        if self.is_packed and self.training and torch.is_grad_enabled():
            raise PackedLayerTrainingError(
                f"{type(self).__name__} is packed: pack() discarded its latent weight, so it "
                "cannot train it. Call .eval() or run under torch.no_grad() to use the packed "
                "weight, or .unpack() to train again (the latent weight restarts from ±α)."
            )

    def _bias_as(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)


class BinaryLinear(_BinaryLayer):
    """Linear layer with binary (weight_bits=1) or ternary (weight_bits=1.5) weights.

    Args:
        in_features, out_features: K and N.
        bias: add a learnable bias (full precision).
        weight_bits: 1 (α_n·sign(W)) or 1.5 (TWN ternary), EMPF.md §2.
        impl: "auto" | "triton" | "reference", passed to the ops.
        device, dtype: of the latent parameters (fp32 by default).

    Shape:
        x [*, in_features] -> [*, out_features], in x's dtype (the quantised weight and the
        bias are cast to it, gradients flow back in fp32).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_bits: float = 1,
        impl: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self._setup((out_features, in_features), bias, weight_bits, impl, device, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._bias_as(x) if isinstance(x, torch.Tensor) else self.bias
        if self.is_packed:
            self._check_packed_use()
            return binary_matmul(x, self.packed_weight(), bias, impl=self.impl)
        return binary_linear(x, self.weight, bias, bits=self.bits, impl=self.impl)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, weight_bits={self.weight_bits}, impl={self.impl!r}, "
            f"packed={self.is_packed}"
        )


def _pair(name: str, v: object, minimum: int) -> tuple[int, int]:
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, (tuple, list))
        or len(vals) != 2
        or any(isinstance(a, bool) or not isinstance(a, int) or a < minimum for a in vals)
    ):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {v!r}")
    return int(vals[0]), int(vals[1])


class BinaryConv2d(_BinaryLayer):
    """2-D convolution with binary (weight_bits=1) or ternary (weight_bits=1.5) weights.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups: as nn.Conv2d
            (integer / pair forms; groups must divide both channel counts).
        bias: add a learnable bias (default False: EM-PF convolutions are followed by BN).
        weight_bits: 1 or 1.5. α is per output channel (binary) or per layer (ternary).
        impl: "auto" | "triton" | "reference".
        device, dtype: of the latent parameters (fp32 by default).

    Shape:
        x [B, C, H, W], [C, H, W], or multi-step [T, B, C, H, W] (time folded into the batch)
        -> the same leading dims with [out_channels, H_out, W_out], in x's dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        weight_bits: float = 1,
        impl: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        for name, v in (("in_channels", in_channels), ("out_channels", out_channels)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if isinstance(groups, bool) or not isinstance(groups, int) or groups <= 0:
            raise ValueError(f"groups must be a positive int, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"groups={groups} must divide in_channels={in_channels} and "
                f"out_channels={out_channels}"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self._setup(shape, bias, weight_bits, impl, device, dtype)

    def _conv(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def _out_hw(self, H: int, W: int) -> tuple[int, int]:
        k, s, p, d = self.kernel_size, self.stride, self.padding, self.dilation
        return tuple(
            (n + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i, n in enumerate((H, W))
        )

    def _packed_im2col(self, x: torch.Tensor, bias: torch.Tensor | None, impl: str):
        B, _, H, W = x.shape
        Ho, Wo = self._out_hw(H, W)
        G, O = self.groups, self.out_channels
        Ng, Kg = O // G, self.in_channels // G * math.prod(self.kernel_size)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = cols.reshape(B, G, Kg, -1)
        packed = self.packed_weight()
        outs = []
        for g in range(G):
            b_g = None if bias is None else bias[g * Ng : (g + 1) * Ng]
            outs.append(
                binary_matmul(
                    cols[:, g].transpose(1, 2), packed.rows(g * Ng, (g + 1) * Ng), b_g, impl=impl
                )
            )
        y = outs[0] if G == 1 else torch.cat(outs, dim=-1)  # [B, L, O]
        return y.transpose(1, 2).reshape(B, O, Ho, Wo)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() not in (3, 4, 5) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, H, W] ([C, H, W] or [T, B, C, H, W] "
                f"also accepted), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        lead = x.shape[:-3]
        x4 = x.reshape(-1, *x.shape[-3:])
        bias = self._bias_as(x)
        if not self.is_packed:
            y = self._conv(x4, self.quantized_weight().to(x.dtype), bias)
        else:
            self._check_packed_use()
            wdev = self.packed_words.device
            if wdev != x.device:
                raise ValueError(f"x is on {x.device} but the weight is on {wdev}")
            route = self.impl
            if route == "auto":  # by GEMM rows M = B * H_out * W_out, as binary_matmul
                route = binary_auto_choice(
                    x4.shape[0] * math.prod(self._out_hw(*x4.shape[2:])), wdev
                )
            if route == "triton":
                y = self._packed_im2col(x4, bias, "triton")
            else:
                w = unpack_weight(
                    self.packed_weight(), x.dtype, impl="triton" if route == "dense" else route
                )
                y = self._conv(x4, w, bias)
        return y.reshape(*lead, *y.shape[1:])

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s + (
            f", bias={self.bias is not None}, weight_bits={self.weight_bits}, "
            f"impl={self.impl!r}, packed={self.is_packed}"
        )
