"""Binary and ternary synapses (docs/model.md §4): quantisers, bit-packed weights, packed GEMM.

Public ops (all take `impl="auto" | "triton" | "reference"`):

- `binarize(w)`, `ternarize(w)`: the quantised weight with the clipped straight-through gradient.
- `pack_weight(w, bits)` -> `PackedWeight`; `unpack_weight(packed, dtype)` -> dense weight.
- `binary_matmul(x, packed, bias)`: `x @ W_q^T + bias` reading the packed words directly;
  differentiable in x and bias. The packed weight is a constant on every path: no gradient
  reaches `packed.scale` even if it requires grad.
- `binary_linear(x, weight, bias, bits)`: the training forward on a latent weight,
  `x @ Q(weight)^T + bias`, differentiable in x, weight (clipped STE) and bias.

Choosing the implementation. `impl="reference"` is the eager twin (reference/binary.py).
`impl="triton"` always runs the packed kernels and never falls back. `impl="auto"` is the
reference on CPU; on CUDA it runs the packed kernels only where `PACKED_MAX_M` (inference) or
`PACKED_MAX_M_TRAIN` (`binary_linear`) lists the GPU and the input has at most that many rows,
and otherwise the dense path: quantise (or unpack) the weight to ±α once per call with the Triton
kernels, then cuBLAS. The tables hold GPU measurements only (bench/test_bench_binary_gemm.py
times both paths per M): today `PACKED_MAX_M` lists the H200 (M <= 256) and `PACKED_MAX_M_TRAIN`
lists no GPU, so training and every other GPU take the dense path.

NaN weights propagate (no path inspects values, which would synchronise with the GPU): binary
weights give NaN rows (α_n is NaN), ternary weights a NaN layer (Δ and α are per layer). Empty
weights work: K = 0 gives the bias (or zeros), N = 0 gives empty outputs.

torch.library: every Triton path is a custom op `torch.ops.empf.binary_*` (see `_OPS`) with a fake
implementation and a registered backward, so `torch.compile(fullgraph=True)` sees one opaque node
per op. Eager calls take a thinner route to the same implementation functions (an
`autograd.Function`), because a custom op's dispatch costs ~10 µs of host time per call; under
`torch.compile` the public functions call the custom ops. With the interpreter off, the ops' CPU
implementation is the reference.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from ..reference.binary import (
    binarize_ref,
    binarize_values_ref,
    binary_linear_ref,
    binary_matmul_ref,
    pack_weight_ref,
    ternarize_ref,
    ternarize_values_ref,
    unpack_weight_ref,
)
from ._common import (
    FUNC_TRANSFORMS,
    TRITON_DTYPES,
    PlanCache,
    TritonUnavailableError,
    _interpreter_flag,
    c_apply,
    check_like,
    check_tensor,
    device_guard,
    grad_wanted,
    load_kernels,
    planned,
    resolve_impl,
    transform_active,
    triton_available,
)
from ._library import register_op

__all__ = [
    "PACKED_MAX_M",
    "PACKED_MAX_M_TRAIN",
    "PackedWeight",
    "binarize",
    "binary_auto_choice",
    "binary_linear",
    "binary_matmul",
    "pack_weight",
    "ternarize",
    "unpack_weight",
]

#: `impl="auto"` on CUDA, inference (`binary_matmul`, packed layers): the largest row count M of
#: x (viewed as [M, K]) for which the packed Triton GEMM runs, keyed by the GPU's name as
#: `torch.cuda.get_device_name()` reports it. A GPU that is not listed runs the dense path (unpack
#: to ±α, cuBLAS). Set from measurements only: the largest M at which the packed GEMM's device
#: time (a CUDA-graph replay) beat unpack + cuBLAS on `bench/test_bench_binary_gemm.py`
#: (N = K = 4096, fp16). H200, 2026-12-04 (bench/results/NVIDIA-H200-20261204-1835): packed
#: 0.018 / 0.019 / 0.045 / 0.050 / 0.096 ms at M = 1 / 16 / 64 / 256 / 1024, dense 0.054 / 0.053 /
#: 0.053 / 0.058 / 0.089 ms.
PACKED_MAX_M: dict[str, int] = {"NVIDIA H200": 256}
#: The same for training on latent weights (`binary_linear`, `BinaryLinear` before `pack()`),
#: where the packed path also packs the weight every step and computes dL/dW densely. Empty: no
#: GPU has measured the training path yet, so `auto` trains on the dense path everywhere.
PACKED_MAX_M_TRAIN: dict[str, int] = {}


# ------------------------------------------------------------------------------------ PackedWeight


def _check_bits(bits: object) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int (1 = binary, 2 = ternary), got {type(bits).__name__}")
    if bits not in (1, 2):
        raise ValueError(f"bits must be 1 (binary) or 2 (ternary), got {bits}")
    return bits


def _shape_tuple(shape: object) -> tuple[int, ...]:
    """A packed weight's shape as a tuple of ints: int-like sizes (numpy ints, 0-d integer
    tensors of a loaded state) are accepted, a float (e.g. 4.5, which `int` truncated) is not."""
    try:
        if isinstance(shape, (str, bytes)) or any(isinstance(s, bool) for s in shape):
            raise TypeError
        return tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"packed shape must be a sequence of ints, got {shape!r}") from None


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
        object.__setattr__(self, "shape", _shape_tuple(self.shape))
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
    # The frozen dataclass checked its fields when it was built.
    if not isinstance(packed, PackedWeight):
        raise TypeError(f"packed must be a PackedWeight, got {type(packed).__name__}")
    return packed


# ------------------------------------------------------------------------------------- size class


@functools.cache
def _cuda_device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


# Under torch.compile the name is a constant, not traced (a traced `get_device_name` is a graph
# break in every layer). This is what `torch.compiler.assume_constant_result` does, set directly:
# calling that would import torch._dynamo (and with it triton) when this module is imported.
# (Set on the cache wrapper and on the function dynamo unwraps it to.)
_cuda_device_name._dynamo_marked_constant = True
_cuda_device_name.__wrapped__._dynamo_marked_constant = True


def binary_auto_choice(M: int, device: torch.device | str, *, training: bool = False) -> str:
    """What `impl="auto"` runs for an input of M rows on `device`.

    Returns "reference" (CPU, or no triton), "triton" (the packed GEMM: the GPU is listed in
    `PACKED_MAX_M` / `PACKED_MAX_M_TRAIN` and M is at most its entry) or "dense" (quantise or
    unpack with Triton, then cuBLAS).
    """
    device = torch.device(device)
    if device.type != "cuda" or not triton_available():
        return "reference"
    table = PACKED_MAX_M_TRAIN if training else PACKED_MAX_M
    if not table:
        return "dense"
    index = device.index if device.index is not None else torch.cuda.current_device()
    limit = table.get(_cuda_device_name(index))
    return "triton" if limit is not None and M <= limit else "dense"


def _route(impl: str, M: int, *tensors: torch.Tensor | None, training: bool = False) -> str:
    """Returns "reference", "triton" or "dense"; an explicit impl is honoured or raises."""
    resolved = resolve_impl(impl, *tensors)
    if impl == "auto" and resolved == "triton":
        device = next(t.device for t in tensors if t is not None and t.is_cuda)
        return binary_auto_choice(M, device, training=training)
    return resolved


# ------------------------------------------------------------------ Triton implementations (raw)
# Unchecked: callers validated shapes, dtypes and devices. Each returns fresh tensors.


def _kb():
    # Not cached here: an imported module costs importlib a dict lookup, and tests patch
    # `load_kernels` to see that the kernels really ran.
    return load_kernels("binary")


#: Launch plans of the weight kernels (quantise, pack, the STE gradient) by call form: a layer
#: calls them with the same weight shape on every step.
_WEIGHT_PLANS = PlanCache()


def _weight_kernels(w: torch.Tensor, bits: int, write_q: bool, write_pack: bool):
    """(out, words, scale) of the weight kernels on a contiguous non-empty w, planned: Q(w)
    with `write_q`, the packed words and scale with `write_pack` (None for what is not asked).
    Binary: one launch of the row kernel; ternary: the three statistics launches (and the pack
    launch)."""
    k = _kb()
    make = k.binary_rows_plan if bits == 1 else k.ternary_plan
    key = (bits, write_q, write_pack, w.shape, w.dtype, w.device)
    return _WEIGHT_PLANS.of(key, lambda: make(w, write_q, write_pack))(w)


def _quantize_impl(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w) of a 2-D [N, K] weight, in w's dtype (statistics computed in the kernels)."""
    w = w.contiguous()
    with device_guard(w):
        if w.numel():
            return _weight_kernels(w, bits, True, False)[0]
        return _kb().quantize_weight(w, bits)


def _ste_impl(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """g where |w| <= 1, else 0, in w's dtype (g, w of the same shape)."""
    g, w = g.contiguous(), w.contiguous()
    with device_guard(w):
        k = _kb()
        if not w.numel():
            return k.ste_grad(g, w)
        return planned(
            _WEIGHT_PLANS, ("ste", w.shape, w.dtype, g.dtype, w.device), (g, w),
            lambda: (k.ste_grad(g, w),), lambda: k.ste_grad_plan(g, w),
        )[0]  # fmt: skip


def _pack_impl(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(words int32 [bits, N, ceil(K/32)], fp32 scale [N]) of a 2-D [N, K] weight."""
    w = w.contiguous()
    with device_guard(w):
        if w.numel():
            _, words, scale = _weight_kernels(w, bits, False, True)
            return words, scale
        return _kb().pack_with_stats(w, bits)


def _unpack_impl(
    words: torch.Tensor, scale: torch.Tensor, K: int, dtype: torch.dtype
) -> torch.Tensor:
    """Dense [N, K] = scale[n] · decode(words) in `dtype`."""
    with device_guard(words):
        return _kb().unpack(words, scale.float().contiguous(), K, dtype)


#: The packed GEMM's launch plans by call form: a layer calls it again and again with the same
#: shapes, so its launch arguments are worked out once (`ops._common.planned`).
_GEMM_PLANS = PlanCache()


def _bgemm(a, words, scale, bias, P: int, R: int, trans: bool) -> torch.Tensor:
    """The packed GEMM launch (kernels/binary.py `_bgemm`) through its plan."""
    # P and R in the key: the input gradient's width K is not the words' (ceil(K / 32) words)
    key = (trans, P, R, a.shape, a.stride(), a.dtype, a.device, words.shape, words.stride(),
           None if bias is None else bias.dtype)  # fmt: skip
    k = _kb()
    return planned(
        _GEMM_PLANS, key, (a, words, scale, bias),
        lambda: (k._bgemm(a, words, scale, bias, P, R, trans),),
        lambda: k.bgemm_plan(a, words, scale, bias, P, R, trans),
    )[0]  # fmt: skip


def _gemm_impl(
    x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """x [M, K] @ decode(words)^T * scale + bias, [M, N] in x's dtype."""
    with device_guard(x):
        bias = None if bias is None else bias.contiguous()
        return _bgemm(x, words, scale.float().contiguous(), bias, words.shape[1], x.shape[1], False)


def _gemm_t_impl(g: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, K: int) -> torch.Tensor:
    """(g [M, N] * scale) @ decode(words), [M, K] in g's dtype."""
    with device_guard(g):
        return _bgemm(g, words, scale.float().contiguous(), None, K, words.shape[1], True)


def _linear_impl(
    x: torch.Tensor,
    weight: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Training forward on packed words of `weight` (which only the backward uses)."""
    return _gemm_impl(x, words, scale, bias)


# ---------------------------------------------------------------- shared backward rules
# `f` is the namespace of callees: the raw implementations (eager autograd.Function) or the
# custom ops (their registered autograd, which torch.compile traces).


def _bias_grad(g: torch.Tensor) -> torch.Tensor:
    return g.sum(0, dtype=torch.float32).to(g.dtype)


def _gemm_backward(f, ctx, g):
    words, scale = ctx.saved_tensors
    gx = f.gemm_t(g, words, scale, ctx.K) if ctx.needs_input_grad[0] else None
    gb = _bias_grad(g) if ctx.needs_input_grad[3] else None
    return gx, None, None, gb


def _linear_backward(f, ctx, g):
    x, weight, words, scale = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[0]:
        if torch.is_grad_enabled() and ctx.needs_input_grad[1]:
            # create_graph=True with a learning weight: dL/dx = g Q(W) must reach W too (through
            # Q's STE, as on the reference); the packed words are constants, so a dense GEMM
            gx = g @ f.quantize(weight, words.shape[0]).to(g.dtype)
        else:
            gx = f.gemm_t(g, words, scale, x.shape[1])
    gw = None
    if ctx.needs_input_grad[1]:
        # dL/dW_q = g^T x is a dense GEMM whatever the weight format: cuBLAS's job.
        gw = f.ste((g.t() @ x).to(weight.dtype), weight)
    gb = _bias_grad(g) if ctx.needs_input_grad[4] else None
    return gx, gw, None, None, gb


def _quantize_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _gemm_setup(ctx, inputs, output):
    x, words, scale, _ = inputs
    ctx.save_for_backward(words, scale)
    ctx.K = x.shape[1]


def _gemm_t_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _linear_setup(ctx, inputs, output):
    x, weight, words, scale, _ = inputs
    ctx.save_for_backward(x, weight, words, scale)


# ------------------------------------------------------------------------- torch.library ops


def _cpu(fn):
    """The reference as the ops' CPU implementation when the interpreter is off."""
    return None if _interpreter_flag() else {"cpu": fn}


def _fake_like_x(x, words, scale, bias):
    return x.new_empty((x.shape[0], words.shape[1]))


def _fake_gemm_t(g, words, scale, K):
    return g.new_empty((g.shape[0], K))


def _fake_pack(w, bits):
    N, K = w.shape
    words = w.new_empty((bits, N, -(-K // 32)), dtype=torch.int32)
    dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
    return words, w.new_empty((N,), dtype=dtype)


def _ref_quantize(w: torch.Tensor, bits: int) -> torch.Tensor:
    return binarize_values_ref(w) if bits == 1 else ternarize_values_ref(w)


def _ref_ste(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.where(w.abs() <= 1, g, torch.zeros_like(g)).to(w.dtype)


def _ref_pack(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    words, scale = pack_weight_ref(w, bits)
    return words, scale.clone()


def _ref_gemm(x, words, scale, bias):
    return binary_matmul_ref(x, words, scale, x.shape[1], bias)


def _ref_gemm_t(g, words, scale, K):
    return g @ unpack_weight_ref(words, scale, K, g.dtype)


def _ref_linear(x, weight, words, scale, bias):
    return binary_matmul_ref(x, words, scale, x.shape[1], bias)


_OPS = SimpleNamespace()
_OPS.ste = register_op(
    "binary_ste",
    _ste_impl,
    # contiguous, as `_ste_impl`'s result (a transposed 2-D weight must not give w's strides)
    fake=lambda g, w: torch.empty_like(w, memory_format=torch.contiguous_format),
    backward=lambda ctx, gg: (_OPS.ste(gg, ctx.saved_tensors[0]), None),
    setup_context=lambda ctx, inputs, output: ctx.save_for_backward(inputs[1]),
    device_impls=_cpu(_ref_ste),
)
_OPS.quantize = register_op(
    "binary_quantize",
    _quantize_impl,
    fake=lambda w, bits: torch.empty_like(w, memory_format=torch.contiguous_format),
    backward=lambda ctx, g: (_OPS.ste(g, ctx.saved_tensors[0]), None),
    setup_context=_quantize_setup,
    device_impls=_cpu(_ref_quantize),
)
_OPS.pack = register_op("binary_pack", _pack_impl, fake=_fake_pack, device_impls=_cpu(_ref_pack))
_OPS.unpack = register_op(
    "binary_unpack",
    _unpack_impl,
    fake=lambda words, scale, K, dtype: words.new_empty((words.shape[1], K), dtype=dtype),
    device_impls=_cpu(lambda words, scale, K, dtype: unpack_weight_ref(words, scale, K, dtype)),
)
_OPS.gemm_t = register_op(
    "binary_gemm_t",
    _gemm_t_impl,
    fake=_fake_gemm_t,
    # d/dg of (g * scale) @ S is the forward GEMM: double backward works
    backward=lambda ctx, gg: (_OPS.gemm(gg, *ctx.saved_tensors, None), None, None, None),
    setup_context=_gemm_t_setup,
    device_impls=_cpu(_ref_gemm_t),
)
_OPS.gemm = register_op(
    "binary_gemm",
    _gemm_impl,
    fake=_fake_like_x,
    backward=lambda ctx, g: _gemm_backward(_OPS, ctx, g),
    setup_context=_gemm_setup,
    device_impls=_cpu(_ref_gemm),
)
_OPS.linear = register_op(
    "binary_linear",
    _linear_impl,
    fake=lambda x, weight, words, scale, bias: x.new_empty((x.shape[0], words.shape[1])),
    backward=lambda ctx, g: _linear_backward(_OPS, ctx, g),
    setup_context=_linear_setup,
    device_impls=_cpu(_ref_linear),
)

# ------------------------------------------------------------- eager autograd (thin host path)

_RAW = SimpleNamespace(gemm_t=_gemm_t_impl, ste=_ste_impl)


def _callees():
    """The raw implementations, or (backward with create_graph=True, where grad mode is on) the
    custom ops, whose registered backward makes this backward differentiable in turn."""
    return _OPS if torch.is_grad_enabled() else _RAW


def _quantize_nd(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Q(w) of w [N, *] in w's shape (viewed as [N, K] for the kernels)."""
    if w.dim() == 2:
        return _quantize_impl(w, bits)
    w2 = w.reshape(w.shape[0], math.prod(w.shape[1:]))
    return _quantize_impl(w2, bits).view(w.shape)


class _QuantizeFn(torch.autograd.Function):
    """Takes w [N, *] in its own shape: the [N, K] view is made in here, where autograd records
    nothing (a view of a Parameter outside would add two view nodes per call to the graph). The
    STE backward is elementwise, so the gradient needs no view either."""

    @staticmethod
    def forward(ctx, w, bits):
        out = _quantize_nd(w, bits)
        ctx.save_for_backward(w)
        return out

    @staticmethod
    def backward(ctx, g):
        return _callees().ste(g, ctx.saved_tensors[0]), None


_QUANTIZE_APPLY = c_apply(_QuantizeFn)


class _GemmFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, words, scale, bias):
        out = _gemm_impl(x, words, scale, bias)
        _gemm_setup(ctx, (x, words, scale, bias), out)
        return out

    @staticmethod
    def backward(ctx, g):
        return _gemm_backward(_callees(), ctx, g)


class _LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, words, scale, bias):
        out = _gemm_impl(x, words, scale, bias)
        _linear_setup(ctx, (x, weight, words, scale, bias), out)
        return out

    @staticmethod
    def backward(ctx, g):
        return _linear_backward(_callees(), ctx, g)


_GEMM_APPLY = c_apply(_GemmFn)
_LINEAR_APPLY = c_apply(_LinearFn)


_compiling = torch.compiler.is_compiling


def quantize_triton(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Unchecked Triton `binarize` (bits=1) / `ternarize` (bits=2) of w [N, *]. Eager: straight
    to the kernels when no gradient is recorded (evaluation), else one autograd node."""
    if _compiling():
        w2 = w.reshape(w.shape[0], math.prod(w.shape[1:]))
        return _OPS.quantize(w2, bits).reshape(w.shape)
    if not grad_wanted(w):
        return _quantize_nd(w, bits)
    if transform_active():  # the public paths resolve impl before this
        raise TritonUnavailableError(FUNC_TRANSFORMS)
    return _QUANTIZE_APPLY(w, bits)


#: The devices the kernels run on, where autocast may be on (asking about "meta" raises).
_AUTOCAST = ("cuda", "cpu")


def autocast_inputs(
    x: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x and bias as autocast hands them to `F.linear` (which the reference and the dense route
    call): in the autocast dtype when autocast is on for x's device and x is fp32, else as they
    are. The packed kernels then run in that dtype too, and return it."""
    dev = x.device.type
    if x.dtype is not torch.float32 or dev not in _AUTOCAST or not torch.is_autocast_enabled(dev):
        return x, bias
    dtype = torch.get_autocast_dtype(dev)
    return x.to(dtype), (bias.to(dtype) if bias is not None else None)


def matmul_triton(
    x: torch.Tensor,
    words: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    N: int,
    K: int,
) -> torch.Tensor:
    """Unchecked packed GEMM `x [*, K] -> [*, N]` (the entry point of the packed layers)."""
    x, bias = autocast_inputs(x, bias)
    x2 = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), K)
    if _compiling():
        out = _OPS.gemm(x2, words, scale, bias)
    elif not grad_wanted(x, bias):  # the packed weight (words, scale) is a constant
        out = _gemm_impl(x2, words, scale, bias)  # no graph to record: straight to the kernel
    elif transform_active():  # the public paths resolve impl before this
        raise TritonUnavailableError(FUNC_TRANSFORMS)
    else:
        out = _GEMM_APPLY(x2, words, scale, bias)
    return out if x.dim() == 2 else out.reshape(*x.shape[:-1], N)


def pack_triton(w2d: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unchecked Triton pack of a 2-D [N, K] weight: (words, scale), as `_pack_impl` (eager)."""
    return _pack_impl(w2d, bits)


def linear_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bits: int
) -> torch.Tensor:
    """Unchecked Triton `binary_linear` (pack the latent weight, packed GEMM)."""
    x, bias = autocast_inputs(x, bias)
    N, K = weight.shape
    flat = x.dim() != 2  # a 2-D x as it is (a reshape would add a view node to the graph)
    x2 = x.reshape(math.prod(x.shape[:-1]), K) if flat else x
    if _compiling():
        words, scale = _OPS.pack(weight.detach(), bits)
        out = _OPS.linear(x2, weight, words, scale, bias)
    else:
        record = grad_wanted(x, weight, bias)
        if record and transform_active():  # (before the packing, whose outputs it would wrap)
            raise TritonUnavailableError(FUNC_TRANSFORMS)  # the public paths resolve impl first
        words, scale = _pack_impl(weight.detach(), bits)
        if not record:
            out = _gemm_impl(x2, words, scale, bias)  # no graph to record
        else:
            out = _LINEAR_APPLY(x2, weight, words, scale, bias)
    return out.reshape(*x.shape[:-1], N) if flat else out


def unpack_triton(
    words: torch.Tensor, scale: torch.Tensor, K: int, dtype: torch.dtype
) -> torch.Tensor:
    """Unchecked Triton unpack to a dense [N, K] weight."""
    return (
        _OPS.unpack(words, scale, K, dtype)
        if _compiling()
        else _unpack_impl(words, scale, K, dtype)
    )


# ---------------------------------------------------------------------------------------- quantise


def _quantize(w: object, bits: int, impl: str) -> torch.Tensor:
    impl = resolve_impl(impl, w if isinstance(w, torch.Tensor) else None)
    w = check_tensor("w", w, impl, min_dim=1)
    if impl == "reference":
        return binarize_ref(w) if bits == 1 else ternarize_ref(w)
    return quantize_triton(w, bits)


def binarize(w: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Binary weight `α_n · sign(w)` (docs/model.md §4).

    Args:
        w: [N, *] latent weight, floating; dim 0 is the output channel. N = 0 or K = 0 is fine.
        impl: "auto" | "triton" | "reference".

    Returns:
        [N, *] in w's dtype; α_n = mean(|w[n]|) computed in fp32 (fp64 for fp64), detached;
        sign(0) = +1; α_n = 0 for an empty row. A NaN in row n makes row n NaN. Gradient:
        dL/dw = dL/dout where |w| <= 1, else 0 (clipped STE). The Triton path sums in its
        kernel in a fixed order: its α_n equals the reference's up to rounding.
    """
    return _quantize(w, 1, impl)


def ternarize(w: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Ternary (TWN) weight: `α · {+1, 0, -1}` with Δ = 0.7 · mean(|clip(w)|) (docs/model.md §4).

    Args:
        w: [N, *] latent weight, floating. Δ and α are per layer (over all of w).
        impl: "auto" | "triton" | "reference".

    Returns:
        [N, *] in w's dtype. A NaN anywhere in w makes Δ and α NaN and so the whole result NaN
        (on both paths; the values are not inspected). Gradient: the clipped STE, as `binarize`.
        The Triton path computes Δ and α in its kernels (fixed-order sums): they equal the
        reference's up to rounding.
    """
    return _quantize(w, 2, impl)


# ------------------------------------------------------------------------------------ pack/unpack


def pack_weight(w: torch.Tensor, bits: int = 1, *, impl: str = "auto") -> PackedWeight:
    """Quantise a weight and pack it along its input dimension into int32 words.

    Args:
        w: [N, *] floating weight (dim 0 = output channel); K = prod(w.shape[1:]), any N, K >= 0.
        bits: 1 (binary, `binarize`) or 2 (ternary, `ternarize`; sign and non-zero planes).
        impl: "auto" | "triton" | "reference".

    Returns:
        PackedWeight with words int32 [bits, N, ceil(K/32)] and scale [N] (fp32; fp64 for an fp64
        weight on the reference path). `unpack_weight(pack_weight(w, 1), w.dtype)` equals
        `binarize(w)` exactly (NaN included). Not differentiable.
    """
    bits = _check_bits(bits)
    impl = resolve_impl(impl, w if isinstance(w, torch.Tensor) else None)
    w = check_tensor("w", w, impl, min_dim=1)
    shape = tuple(w.shape)
    K = math.prod(shape[1:])
    w2 = w.detach().reshape(shape[0], K)
    if impl == "reference":
        words, scale = pack_weight_ref(w2, bits)
    elif _compiling():
        words, scale = _OPS.pack(w2, bits)
    else:
        words, scale = _pack_impl(w2, bits)
    return PackedWeight(words, scale, shape, K, bits)


def unpack_weight(
    packed: PackedWeight, dtype: torch.dtype | None = None, *, impl: str = "auto"
) -> torch.Tensor:
    """The dense quantised weight `scale[n] · {-1, 0, +1}` of `packed`, in its original shape.

    Args:
        packed: a PackedWeight.
        dtype: output dtype (default: the scale's dtype).
        impl: "auto" | "triton" | "reference".

    Returns:
        [N, *] tensor of `packed.shape`. Exact: α·(±1) rounded once to `dtype`. No gradient.
    """
    packed = _check_packed(packed)
    dtype = packed.scale.dtype if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    if impl == "auto" and dtype not in TRITON_DTYPES:
        impl = "reference"  # e.g. fp64, for error analysis: the kernel writes fp32/fp16/bf16 only
    impl = resolve_impl(impl, packed.words)
    if impl == "triton" and dtype not in TRITON_DTYPES:
        raise TypeError(f"impl='triton' unpacks to fp32/fp16/bf16, got dtype {dtype}")
    if impl == "reference":
        dense = unpack_weight_ref(packed.words, packed.scale.detach(), packed.K, dtype)
    else:
        dense = unpack_triton(packed.words, packed.scale, packed.K, dtype)
    return dense.reshape(packed.shape)


# ----------------------------------------------------------------------------------------- matmul


def check_x(x: object, K: int, device: torch.device, impl: str, what: str) -> torch.Tensor:
    """x: a floating tensor of a dtype `impl` supports, [*, K], on `device`."""
    x = check_tensor("x", x, impl, min_dim=1)
    if x.shape[-1] != K:
        raise ValueError(
            f"x must have shape [*, K] with K = {K} ({what}), got shape {tuple(x.shape)}"
        )
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the weight is on {device}")
    return x


def _rows(x: object) -> int:
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        return 0
    return x.shape[0] if x.dim() == 2 else math.prod(x.shape[:-1])


def binary_matmul(
    x: torch.Tensor,
    packed: PackedWeight,
    bias: torch.Tensor | None = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """`x @ W_q^T + bias` with W_q the dense weight of `packed` (binary or ternary).

    Args:
        x: [*, K] floating activations (any strides); K = 0 gives the bias (or zeros).
        packed: PackedWeight of shape (N, *) with K = prod(shape[1:]); same device as x.
        bias: [N] in x's dtype, or None.
        impl: "auto" (CPU: reference; CUDA: the packed kernel where `PACKED_MAX_M` says so, else
            dense unpack + cuBLAS), "triton" (packed kernel, never a fallback) or "reference".

    Returns:
        [*, N] in x's dtype. The kernel decodes the bits in registers, accumulates in fp32 and
        applies scale and bias in the epilogue, in one launch. Gradients: dL/dx = (dL/dout ·
        scale) @ sign (computed from the packed words, no dense copy), dL/dbias = Σ dL/dout;
        none for `packed` (its scale gets no gradient on any path).
    """
    packed = _check_packed(packed)
    N, K = packed.N, packed.K
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    route = _route(impl, _rows(x), x, packed.words)
    kimpl = "triton" if route == "dense" else route
    x = check_x(x, K, packed.device, kimpl, "packed weight")
    check_like("bias", bias, "x", x, (N,))
    if route == "reference":
        return binary_matmul_ref(x, packed.words, packed.scale, K, bias)
    if route == "dense":
        w = unpack_triton(packed.words, packed.scale, K, x.dtype)
        return F.linear(x, w, bias)
    return matmul_triton(x, packed.words, packed.scale, bias, N, K)


# ------------------------------------------------------------------------------ training (latent W)


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
        x: [*, K] floating activations; K = 0 gives the bias (or zeros).
        weight: [N, K] latent weight (fp32, fp16 or bf16 for the Triton path, any floating dtype
            for the reference; typically fp32), same device as x.
        bias: [N] in x's dtype, or None.
        bits: 1 (Q = binarize) or 2 (Q = ternarize).
        impl: "auto" (CPU: reference; CUDA: pack + packed kernels where `PACKED_MAX_M_TRAIN` says
            so, else Triton quantise + cuBLAS), "triton" (packed kernels) or "reference".

    Returns:
        [*, N] in x's dtype. Gradients: x and bias as `binary_matmul`; weight through the clipped
        STE, dL/dw = (dL/dout^T x) where |w| <= 1, else 0 (α detached).
    """
    bits = _check_bits(bits)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    w_t = weight if isinstance(weight, torch.Tensor) else None
    route = _route(impl, _rows(x), x, w_t, training=True)
    kimpl = "triton" if route == "dense" else route
    weight = check_tensor("weight", weight, kimpl)
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [N, K], got {tuple(weight.shape)}")
    N, K = weight.shape
    x = check_x(x, K, weight.device, kimpl, "weight")
    check_like("bias", bias, "x", x, (N,))
    if route == "reference":
        return binary_linear_ref(x, weight, bias, bits)
    if route == "dense":
        return F.linear(x, quantize_triton(weight, bits).to(x.dtype), bias)
    return linear_triton(x, weight, bias, bits)
