"""Binary and ternary synaptic layers (docs/model.md §4): `BinaryLinear` and `BinaryConv2d`.

Training: a latent fp32 weight; the forward uses `binarize(W)` (weight_bits=1) or `ternarize(W)`
(weight_bits=1.5) with the clipped straight-through gradient. `BinaryLinear` trains through
`ops.binary_linear`, whose `impl="auto"` on CUDA is Triton quantise + cuBLAS unless
`ops.binary.PACKED_MAX_M_TRAIN` lists the GPU (then the packed kernels for small inputs).
`BinaryConv2d` always trains through quantise + `F.conv2d` (cuDNN): its GEMM has M = batch x
output pixels rows, far above any size where the packed kernel wins; `impl` selects the
quantiser's implementation. `impl="triton"` never falls back to the reference.

Validation happens once: the layer's own parameters at construction, the input's dtype, last
dimension (channels) and device per call with a few attribute reads; the forward then calls the
ops' unchecked entry points (`ops.binary.matmul_triton`, `linear_triton`, `quantize_triton`).

Deployment: `layer.pack()` replaces the latent weight by a `PackedWeight` (int32 words + per-channel
scale, stored as buffers `packed_words` and `packed_scale`, so `.to()` and `state_dict()` carry it;
the scale stays fp32 under `.half()` / `.to(torch.bfloat16)`)
and the forward then runs the packed GEMM of `ops.binary_matmul` (convolution: `F.unfold` im2col,
one GEMM per group; `impl="auto"` on CUDA: unpack + cuBLAS/cuDNN unless `ops.binary.PACKED_MAX_M`
lists the GPU),
reproducing the training forward up to float rounding. The latent weight is discarded (that is the
point of packing). A packed layer cannot train its weight: a forward in training mode with grad
enabled raises `PackedLayerTrainingError`; use `.eval()` / `torch.no_grad()` for inference (grad
w.r.t. the input still flows in eval mode), or `.unpack()` to train again, which restores a latent
weight equal to the dequantised one (±α, so training resumes from the deployed weights, not from the
discarded latent values). `unpack()` puts the values back into the same `nn.Parameter` object
the layer had before `pack()` (its storage is freed while packed), so an optimizer built before
`pack()` keeps updating the weight the layer uses (except after a move to or from the meta device,
`.to("meta")` / `.to_empty()`, which makes a new Parameter, as it does for any nn.Module).

To load a packed checkpoint, build the layer, call `pack()`, then `load_state_dict()`. A packed
state records the logical weight shape (buffer `packed_shape`); loading it into a layer of
another shape fails with a clear error even where the packed words happen to have the same size
(e.g. in_features 20 and 30 both pack into one word per row).
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import (
    IMPLS,
    TRITON_DTYPES,
    check_bool,
    check_dense,
    check_tensor,
    resolve_impl,
    transform_active,
)
from ..ops.binary import (
    PackedWeight,
    _route,
    check_x,
    linear_triton,
    matmul_triton,
    pack_triton,
    pack_weight,
    quantize_triton,
    unpack_triton,
    unpack_weight,
)
from ..reference.binary import (
    binary_linear_ref,
    binary_matmul_ref,
    quantize_ref,
    unpack_weight_ref,
)

__all__ = ["BinaryConv2d", "BinaryLinear", "PackedLayerTrainingError", "frozen_weights"]


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


@contextlib.contextmanager
def frozen_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block the binary layers of `model` (latent, not packed) quantise their weight
    once and reuse it in every eval-mode call that sends no gradient into the weight: an
    evaluation pass then costs one convolution or GEMM per layer and call, not a quantisation
    too, and no pass over the latent weights. `evaluate` and `empf eval` run inside it.

    The weights are expected not to change inside the block. In-place updates through the
    parameter itself (an optimizer step, `load_state_dict`, `p.mul_()`) and new storage (`.data =
    ...`, `.to()`) are noticed and the weight is quantised again; writes through `p.data` (e.g.
    `p.data.clamp_()`) cannot be noticed. Leaving the block frees what was kept (one weight's
    worth per layer, in the input's dtype). Nests; yields `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen_weights needs an nn.Module, got {type(model).__name__}")
    layers = [m for m in model.modules() if isinstance(m, _BinaryLayer)]
    for m in layers:
        _FROZEN[m] = _FROZEN.get(m, 0) + 1
    try:
        yield model
    finally:
        for m in layers:
            depth = _FROZEN.pop(m, 1) - 1
            if depth:
                _FROZEN[m] = depth
            else:
                m.__dict__.pop("_derived_value", None)


#: The layers inside a `frozen_weights` block and how deeply nested. Kept here, not on the
#: layers: a copy (deepcopy, pickle) made inside a block is not in one.
_FROZEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _BinaryLayer(nn.Module):
    """Shared latent/packed bookkeeping of BinaryLinear and BinaryConv2d."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    def _setup(self, shape: tuple[int, ...], bias: bool, weight_bits, impl, device, dtype):
        self.weight_bits = weight_bits
        self.impl = _check_impl(impl)
        check_bool("bias", bias)  # a truthy "False" or 0.0 would silently add a bias
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            # (an integer dtype would fail inside nn.Parameter: it cannot require grad)
            raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
        factory = {"device": device, "dtype": dtype if dtype is not None else torch.float32}
        self.weight = nn.Parameter(torch.empty(shape, **factory))
        self.bias = nn.Parameter(torch.empty(shape[0], **factory)) if bias else None
        self._packed_shape: tuple[int, ...] | None = None
        self.reset_parameters()

    @property
    def weight_bits(self) -> float:
        """1 (binary) or 1.5 (ternary). May change on a latent layer (its weight is quantised
        the new way from the next call on); a packed layer's words are of one kind: unpack()
        first."""
        return self._weight_bits

    @weight_bits.setter
    def weight_bits(self, value: float) -> None:
        bits = _weight_bits(value)
        d = self.__dict__
        if d.get("_packed_shape") is not None and bits != d["_bits"]:
            raise ValueError(
                f"{type(self).__name__} is packed with weight_bits={self.weight_bits}: its packed "
                "words cannot change kind; unpack() first"
            )
        d.pop("_derived_value", None)  # quantised the old way
        d["_weight_bits"], d["_bits"] = (1.5 if bits == 2 else 1), bits

    @property
    def bits(self) -> int:
        """Packed bits per weight: 1 (binary) or 2 (ternary); follows `weight_bits`."""
        return self._bits

    def __setstate__(self, state: dict) -> None:
        if "weight_bits" in state:  # a pickle from before weight_bits was a checked property
            state["_weight_bits"], state["_bits"] = state.pop("weight_bits"), state.pop("bits")
        super().__setstate__(state)

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

    def _keeps(self) -> bool:
        """Whether this forward may keep what it derives from the latent weight: inside
        `frozen_weights`, and no graph needs it (eval mode, no autograd through the weight, not
        under torch.compile, which is asked first so that tracing reads no module state)."""
        return (
            not torch.compiler.is_compiling()
            and self in _FROZEN
            and not self.training
            and not (self.weight.requires_grad and torch.is_grad_enabled())
        )

    def _derived(self, tag: tuple, make):
        """`make()`: what a forward derives from the latent weight (its quantised weight, or its
        packed words and scales), kept between calls where `_keeps()`. The kept value belongs to
        the weight's storage (held, so its address is not reused), its version (in-place changes
        through the tensor bump it; changes through `.data` do not, which is why keeping is
        opt-in), shape and dtype, the inference mode and `tag` (the route, the input dtype);
        leaving `frozen_weights`, `train()`, `pack()`, `unpack()` and `.to()` drop it."""
        w = self.weight
        key = (tag, w._version, w.data_ptr(), w.shape, w.dtype, torch.is_inference_mode_enabled())
        hit = self.__dict__.get("_derived_value")
        if hit is not None and hit[0] == key:
            return hit[2]
        value = make()
        self.__dict__["_derived_value"] = (key, w.detach(), value)
        return value

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_derived_value", None)  # a copy derives its own (deepcopy, pickle)
        return state

    def train(self, mode: bool = True) -> _BinaryLayer:
        if mode:
            self.__dict__.pop("_derived_value", None)  # training changes the weight: free it
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_derived_value", None)  # .to() / .cuda() / .half(): new tensors
        latent = self.__dict__.get("_latent_param")
        if latent is not None:  # packed: the kept (empty) Parameter follows dtype and device,
            new = fn(latent.data)  # so unpack() gives the weight the layer's dtype now
            if torch._has_compatible_shallow_copy_type(latent, new):
                latent.data = new
            else:  # to or from "meta" (.to_empty()): a new Parameter, as nn.Module._apply makes
                self.__dict__["_latent_param"] = nn.Parameter(new, latent.requires_grad)
        scale = self._buffers.get("packed_scale")
        out = super()._apply(fn, recurse)
        new = self._buffers.get("packed_scale")
        if scale is not None and new is not None and new.dtype in (torch.float16, torch.bfloat16):
            # α stays at least fp32, as packing makes it (the kernels apply it in fp32):
            # `.half()` moves it, from its own values (no round trip through fp16)
            self._buffers["packed_scale"] = scale.to(new.device, torch.float32)
        return out

    def quantized_weight(self) -> torch.Tensor:
        """The weight the forward uses (binarised or ternarised), with its STE gradient."""
        if self.is_packed:
            return unpack_weight(self.packed_weight(), torch.float32, impl=self.impl)
        w = self.weight
        if resolve_impl(self.impl, w) == "reference":
            return quantize_ref(w, self.bits)
        check_tensor("weight", w, "triton")
        return quantize_triton(w, self.bits)

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
        """Store the weight bit-packed and free the latent weight's storage (idempotent).

        The `nn.Parameter` object itself is kept (outside `parameters()` and the state dict) with
        an empty storage and no gradient, so that `unpack()` can give it back.
        """
        if self.is_packed:
            return self
        self.__dict__.pop("_derived_value", None)  # it would keep the latent storage alive
        packed = pack_weight(self.weight, self.bits, impl=self.impl)
        param = self.weight
        self.register_buffer("packed_words", packed.words)
        self.register_buffer("packed_scale", packed.scale)
        self.register_buffer(
            "packed_shape", torch.tensor(packed.shape, dtype=torch.int64, device=packed.device)
        )
        self._packed_shape = packed.shape
        self.register_parameter("weight", None)
        param.grad = None
        param.data = torch.empty(0, dtype=param.dtype, device=param.device)
        self.__dict__["_latent_param"] = param
        return self

    @torch.no_grad()
    def unpack(self) -> _BinaryLayer:
        """Restore a trainable latent weight equal to the dequantised packed weight.

        The values go back into the Parameter object the layer had before `pack()`, so optimizers
        that hold it keep working; in the dtype the layer has now (`.half()` / `.to()` of the
        packed layer apply to it too), on the packed weight's device.
        """
        if not self.is_packed:
            return self
        self.__dict__.pop("_derived_value", None)
        param = self.__dict__.pop("_latent_param")
        # α·(±1) in fp32 rounds once to param's dtype, exactly as unpacking into that dtype
        param.data = unpack_weight(self.packed_weight(), torch.float32, impl=self.impl).to(
            param.dtype
        )
        del self.packed_words, self.packed_scale, self.packed_shape
        self._packed_shape = None
        self.weight = param
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, *rest):
        key = prefix + "packed_shape"
        if self.is_packed and key in state_dict:
            theirs = tuple(int(v) for v in state_dict[key].tolist())  # loading, not a hot path
            if theirs != self._packed_shape:
                rest[-1].append(  # error_msgs: load_state_dict raises with every message
                    f"{prefix or type(self).__name__}: the packed checkpoint holds a weight of "
                    f"shape {theirs}, this packed layer has {self._packed_shape}; build the layer "
                    "with the checkpoint's shape"
                )
                return
        elif not self.is_packed and prefix + "packed_words" in state_dict:
            rest[-1].append(
                f"{prefix or type(self).__name__}: the checkpoint is of a packed layer; call "
                "pack() on this layer before load_state_dict()"
            )
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, *rest)

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

    def _check_x(self, x: object) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        check_dense("x", x)

    def _checked(self, x: object, check):
        """`check(x)`: a call's checks, raising on bad input, and what they resolve (the route,
        the output size). Run once per call form, then reused: the form is everything the
        checks read (the input's shape, dtype and device; the weight's form; packed or not;
        training or not; grad mode; impl; a torch.func transform or not). Not cached while
        torch.compile traces (a cache written by the graph would change the next trace's
        guards)."""
        if not isinstance(x, torch.Tensor):
            return check(x)
        wt = self.packed_words if self.is_packed else self.weight
        key = (
            x.shape, x.dtype, x.device, wt.shape, wt.dtype, wt.device, self.is_packed,
            self.training, torch.is_grad_enabled(), self.impl, transform_active(),
        )  # fmt: skip
        hit = self.__dict__.get("_checked_form")
        if hit is not None and hit[0] == key:
            return hit[1]
        out = check(x)
        if not torch.compiler.is_compiling():
            self.__dict__["_checked_form"] = (key, out)
        return out


class BinaryLinear(_BinaryLayer):
    """Linear layer with binary (weight_bits=1) or ternary (weight_bits=1.5) weights.

    Args:
        in_features, out_features: K and N.
        bias: add a learnable bias (full precision).
        weight_bits: 1 (α_n·sign(W)) or 1.5 (TWN ternary), docs/model.md §4.
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

    def _check(self, x: object) -> str:
        """Every check of a call; returns the route ("triton", "dense" or "reference")."""
        self._check_x(x)
        M = math.prod(x.shape[:-1]) if x.dim() else 0
        K = self.in_features
        if self.is_packed:
            self._check_packed_use()
            words = self.packed_words
            route = _route(self.impl, M, x, words)
            check_x(x, K, words.device, "triton" if route == "dense" else route, "in_features")
            return route
        w = self.weight
        route = _route(self.impl, M, x, w, training=True)
        kimpl = "triton" if route == "dense" else route
        check_x(x, K, w.device, kimpl, "in_features")
        if kimpl == "triton" and w.dtype not in TRITON_DTYPES:
            check_tensor("weight", w, kimpl)
        return route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self._checked(x, self._check)
        K, N = self.in_features, self.out_features
        bias = self._bias_as(x)
        if self.is_packed:
            words, scale = self.packed_words, self.packed_scale
            if route == "triton":
                return matmul_triton(x, words, scale, bias, N, K)
            if route == "dense":
                return F.linear(x, unpack_triton(words, scale, K, x.dtype), bias)
            return binary_matmul_ref(x, words, scale, K, bias)
        w, bits = self.weight, self.bits
        if self._keeps():  # evaluation: the weight's packed / quantised form is kept
            if route == "triton":
                words, scale = self._derived(("pack",), lambda: pack_triton(w.detach(), bits))
                return matmul_triton(x, words, scale, bias, self.out_features, K)
            if route == "dense":
                q = self._derived(("q", x.dtype), lambda: quantize_triton(w, bits).to(x.dtype))
            else:
                q = self._derived(("ref", x.dtype), lambda: quantize_ref(w, bits).to(x.dtype))
            return F.linear(x, q, bias)
        if route == "triton":
            return linear_triton(x, w, bias, bits)
        if route == "dense":
            return F.linear(x, quantize_triton(w, bits).to(x.dtype), bias)
        return binary_linear_ref(x, w, bias, bits)

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

    def _packed_im2col(self, x: torch.Tensor, bias: torch.Tensor | None, Ho: int, Wo: int):
        B = x.shape[0]
        G, O = self.groups, self.out_channels
        Ng, Kg = O // G, self.in_channels // G * math.prod(self.kernel_size)
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        cols = cols.reshape(B, G, Kg, Ho * Wo)
        words, scale = self.packed_words, self.packed_scale
        outs = []
        for g in range(G):
            rows = slice(g * Ng, (g + 1) * Ng)
            b_g = None if bias is None else bias[rows]
            x_g = cols[:, g].transpose(1, 2)  # [B, L, Kg]
            outs.append(matmul_triton(x_g, words[:, rows], scale[rows], b_g, Ng, Kg))
        y = outs[0] if G == 1 else torch.cat(outs, dim=-1)  # [B, L, O]
        y = y.transpose(1, 2).reshape(B, O, Ho, Wo)  # channels-last strides
        # in the input's memory format, as nn.Conv2d and the other paths give it (a contiguous
        # input gives a contiguous output, which a caller's .view() relies on)
        last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        return y.contiguous(memory_format=torch.channels_last if last else torch.contiguous_format)

    def _check(self, x: object) -> tuple[int, int, str]:
        """Every check of a call; returns (H_out, W_out, route): the route is the packed
        layer's ("triton", "dense" or "reference"), the latent layer's quantiser impl."""
        self._check_x(x)
        if x.dim() not in (3, 4, 5) or x.shape[-3] != self.in_channels:
            raise ValueError(
                f"x must have shape [B, {self.in_channels}, H, W] ([C, H, W] or [T, B, C, H, W] "
                f"also accepted), got {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        H, W = x.shape[-2:]
        Ho, Wo = self._out_hw(H, W)
        if Ho <= 0 or Wo <= 0:
            k = tuple(d * (n - 1) + 1 for d, n in zip(self.dilation, self.kernel_size, strict=True))
            raise ValueError(
                f"x has spatial size ({H}, {W}) with padding {self.padding}, smaller than the "
                f"(dilated) kernel {k}: the output would be {Ho} x {Wo}"
            )
        wt = self.packed_words if self.is_packed else self.weight
        if wt.device != x.device:
            raise ValueError(f"x is on {x.device} but the weight is on {wt.device}")
        if not self.is_packed:
            impl = resolve_impl(self.impl, wt)
            if impl == "triton":
                check_tensor("weight", wt, "triton")
            return Ho, Wo, impl
        self._check_packed_use()
        # auto: by GEMM rows M = B * H_out * W_out, as binary_matmul
        route = _route(self.impl, math.prod(x.shape[:-3]) * Ho * Wo, x, wt)
        check_tensor("x", x, "triton" if route == "dense" else route)
        return Ho, Wo, route

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        Ho, Wo, route = self._checked(x, self._check)
        # [N, C, H, W] as it is (a reshape would add a view node to the graph each call)
        flat = x.dim() != 4
        x4 = x.reshape(-1, *x.shape[-3:]) if flat else x
        bias = self._bias_as(x)
        if not self.is_packed:
            w, bits = self.weight, self.bits
            ref = route == "reference"

            def quantized() -> torch.Tensor:
                return (quantize_ref(w, bits) if ref else quantize_triton(w, bits)).to(x.dtype)

            q = self._derived((ref, x.dtype), quantized) if self._keeps() else quantized()
            y = self._conv(x4, q, bias)
        else:
            wt = self.packed_words
            if route == "triton":
                y = self._packed_im2col(x4, bias, Ho, Wo)
            else:
                K = math.prod(self._packed_shape[1:])
                if route == "dense":
                    w = unpack_triton(wt, self.packed_scale, K, x.dtype)
                else:
                    w = unpack_weight_ref(wt, self.packed_scale, K, x.dtype)
                y = self._conv(x4, w.reshape(self._packed_shape), bias)
        return y.reshape(*x.shape[:-3], *y.shape[1:]) if flat else y

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
