"""Fused deployment layer: packed binary/ternary convolution + folded scale/bias + EM-PF neuron.

`binary_conv_neuron` runs one deployed spiking convolution layer (docs/model.md, deployment) in one
launch: an implicit-GEMM convolution (no im2col copy) that reads the previous layer's spikes
(uint8 k-bit codes or float spikes) and the bit-packed weights directly, applies the folded
per-channel scale and bias, and runs the EM-PF neuron over the T steps of the same output
positions in registers, writing uint8 spike codes, float spikes, or the currents.

Inference only: no gradients. Calling it with autograd recording (grad mode on and an input that
requires grad) raises a ValueError instead of silently dropping gradients; wrap deployment code in
`torch.no_grad()` or `torch.inference_mode()`.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable

import torch

from ..reference.binary_conv import binary_conv_neuron_ref
from ._common import (
    TRITON_DTYPES,
    check_spike_bits,
    device_guard,
    grad_wanted,
    load_kernels,
    resolve_impl,
)
from .binary import PackedWeight, _check_packed

__all__ = ["MAX_CODE_K", "binary_conv_neuron"]

#: Largest reduction length K = C_in/groups * kh * kw for uint8 code inputs: every partial sum
#: K * 255 stays below 2^24, so the sums are exact in fp32 (and in the kernel's accumulators).
MAX_CODE_K = (2**24 - 1) // 255

_X_DTYPES = (torch.uint8, torch.float16, torch.float32, torch.bfloat16)
_X_DTYPES_REF = (*_X_DTYPES, torch.float64)


def _fp32(value: float) -> float:
    """`value` rounded to fp32 (as the kernel receives it), as a Python float."""
    try:
        return struct.unpack("f", struct.pack("f", float(value)))[0]
    except OverflowError:
        return math.inf


def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair."""
    items = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return items


def _check_param(
    name: str, p: object, T: int, C: int, device: torch.device, *, optional: bool
) -> torch.Tensor | None:
    """A floating [C] or [T, C] tensor on `device` (None allowed when `optional`)."""
    if p is None:
        if optional:
            return None
        raise TypeError(f"{name} must be a torch.Tensor, got None")
    if not isinstance(p, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {p.dtype}")
    if p.device != device:
        raise ValueError(f"{name} is on {p.device} but x is on {device}")
    if tuple(p.shape) not in ((C,), (T, C)):
        raise ValueError(
            f"{name} must have shape [C_out] = ({C},) or [T, C_out] = ({T}, {C}), "
            f"got {tuple(p.shape)}"
        )
    return p


def _check_step_param(name: str, p: object, T: int, C: int, device: torch.device) -> torch.Tensor:
    """A floating [T, C_out] tensor on `device`."""
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(p).__name__}")
    if not p.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {p.dtype}")
    if p.device != device:
        raise ValueError(f"{name} is on {p.device} but x is on {device}")
    if tuple(p.shape) != (T, C):
        raise ValueError(f"{name} must have shape [T, C_out] = ({T}, {C}), got {tuple(p.shape)}")
    return p


def _checked(
    x, packed, scale, bias, *, stride, padding, groups, in_step, decay, threshold, parallel,
    spike_bits, spike_step, out_dtype, impl, in_bits, residual,
) -> tuple[str, PackedWeight, dict]:  # fmt: skip
    """Every check of `binary_conv_neuron`; returns (resolved impl, packed weight, the keyword
    arguments both paths take after x and packed, normalised)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    packed = _check_packed(packed)
    impl = resolve_impl(impl, x, packed.words)
    allowed = _X_DTYPES if impl == "triton" else _X_DTYPES_REF
    if x.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"x must have dtype in ({names}) for impl={impl!r}, got {x.dtype}")
    if x.dim() != 5:
        raise ValueError(f"x must have shape [T, N, C_in, H, W], got {tuple(x.shape)}")
    T, N, C_in, H, W = x.shape
    if T < 1:
        raise ValueError(f"x must have T >= 1 time steps, got shape {tuple(x.shape)}")
    if packed.device != x.device:
        raise ValueError(f"packed weight is on {packed.device} but x is on {x.device}")
    if len(packed.shape) != 4:
        raise ValueError(
            f"packed must hold a conv weight (C_out, C_in // groups, kh, kw), got shape "
            f"{packed.shape}"
        )
    C_out, Cg, kh, kw = packed.shape
    if C_out * Cg * kh * kw == 0:  # both paths: no convolution of an empty weight
        raise ValueError(
            f"packed must hold a non-empty conv weight (C_out, C_in // groups, kh, kw), got "
            f"shape {packed.shape}"
        )
    if isinstance(groups, bool) or not isinstance(groups, int):
        raise TypeError(f"groups must be an int, got {type(groups).__name__}")
    if groups < 1 or C_in % groups or C_out % groups:
        raise ValueError(
            f"groups must be >= 1 and divide C_in = {C_in} and C_out = {C_out}, got {groups}"
        )
    if Cg != C_in // groups:
        raise ValueError(
            f"packed weight has {Cg} input channels per group but x has C_in // groups = "
            f"{C_in} // {groups} = {C_in // groups}"
        )
    sh, sw = _pair("stride", stride, 1)
    ph, pw = _pair("padding", padding, 0)
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"kernel ({kh}, {kw}) is larger than the padded input ({H + 2 * ph}, {W + 2 * pw})"
        )

    if x.dtype == torch.uint8:
        if in_step is None:
            raise ValueError("in_step is required when x holds uint8 spike codes")
        if isinstance(in_step, bool) or not isinstance(in_step, (int, float)):
            raise TypeError(f"in_step must be a float, got {type(in_step).__name__}")
        if not 0 < in_step < math.inf:  # (not math.isfinite: it overflows on an int like 10**400)
            raise ValueError(f"in_step must be a finite float > 0, got {in_step}")
        if in_bits is None:
            in_bits = 8
        if isinstance(in_bits, bool) or not isinstance(in_bits, int):
            raise TypeError(f"in_bits must be an int or None, got {type(in_bits).__name__}")
        if not 1 <= in_bits <= 8:
            raise ValueError(f"in_bits must be in 1..8, got {in_bits}")
        in_step32 = _fp32(in_step)
        if not (math.isfinite(in_step32) and in_step32 > 0):
            raise ValueError(f"in_step must be finite and > 0 in fp32, got {in_step}")
        if packed.K > MAX_CODE_K:
            raise ValueError(
                f"uint8 inputs need K = C_in/groups*kh*kw <= {MAX_CODE_K} (exact fp32 sums), "
                f"got K = {packed.K}"
            )
    else:
        if in_step is not None or in_bits is not None:
            raise ValueError(
                f"in_step and in_bits are only for uint8 code inputs; x has dtype {x.dtype}"
            )
        in_step32 = None

    scale = _check_param("scale", scale, T, C_out, x.device, optional=False)
    bias = _check_param("bias", bias, T, C_out, x.device, optional=True)
    if not isinstance(parallel, bool):
        raise TypeError(f"parallel must be a bool, got {type(parallel).__name__}")
    if threshold is None:
        if decay is not None or parallel:
            raise ValueError(
                "threshold is None (return the currents) but decay or parallel was given"
            )
        if spike_bits is not None:
            raise ValueError("spike_bits needs a neuron: threshold is None (currents are float)")
    else:
        threshold = _check_step_param("threshold", threshold, T, C_out, x.device)
        if parallel:
            if decay is not None:
                raise ValueError("the parallel neuron is stateless: decay must be None")
        else:
            if decay is None:
                raise ValueError("decay is required for the EM-PF neuron (or pass parallel=True)")
            decay = _check_step_param("decay", decay, T, C_out, x.device)
    check_spike_bits(spike_bits, spike_step)
    if out_dtype not in TRITON_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in TRITON_DTYPES)
        raise TypeError(f"out_dtype must be one of ({names}), got {out_dtype!r}")
    if residual is not None:
        if not isinstance(residual, torch.Tensor):
            raise TypeError(
                f"residual must be a torch.Tensor or None, got {type(residual).__name__}"
            )
        r_dtypes = TRITON_DTYPES if impl == "triton" else (*TRITON_DTYPES, torch.float64)
        if residual.dtype not in r_dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in r_dtypes)
            raise TypeError(
                f"residual must have dtype in ({names}) for impl={impl!r}, got {residual.dtype}"
            )
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
        if (
            residual.dim() != 5
            or tuple(residual.shape[1:]) != (N, C_out, Ho, Wo)
            or (residual.shape[0] not in (1, T))
        ):
            raise ValueError(
                f"residual must have shape [T or 1, N, C_out, Ho, Wo] = [{T} or 1, {N}, "
                f"{C_out}, {Ho}, {Wo}], got {tuple(residual.shape)}"
            )
    tensors = (x, scale, bias, decay, threshold, residual)
    if grad_wanted(*tensors):
        raise ValueError(
            "binary_conv_neuron is inference only (no gradients): an input requires grad; "
            "call it under torch.no_grad() or torch.inference_mode()"
        )

    return (
        impl,
        packed,
        dict(
            scale=scale,
            bias=bias,
            stride=(sh, sw),
            padding=(ph, pw),
            groups=groups,
            in_step=in_step32,
            in_bits=in_bits,
            decay=decay,
            threshold=threshold,
            parallel=parallel,
            spike_bits=spike_bits,
            spike_step=spike_step,
            out_dtype=out_dtype,
            residual=residual,
        ),
    )


def _kernel_call(kw: dict) -> tuple[tuple, dict]:
    """The fused kernel launcher's arguments after x, from `_checked`'s keyword arguments."""
    return (kw["scale"], kw["bias"], kw["decay"], kw["threshold"]), dict(
        stride=kw["stride"],
        padding=kw["padding"],
        groups=kw["groups"],
        in_step=kw["in_step"],
        in_bits=kw["in_bits"] if kw["in_bits"] is not None else 8,
        parallel=kw["parallel"],
        spike_bits=kw["spike_bits"],
        spike_step=kw["spike_step"],
        out_dtype=kw["out_dtype"],
        residual=kw["residual"],
    )


def binary_conv_neuron(
    x: torch.Tensor,
    packed: PackedWeight,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    in_step: float | None = None,
    decay: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    parallel: bool = False,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    out_dtype: torch.dtype = torch.float32,
    impl: str = "auto",
    in_bits: int | None = None,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Packed binary/ternary convolution, folded scale/bias and EM-PF neuron in one fused op.

    Per output element (step t, image n, channel c, position (i, j)):
    `y[t] = scale[t, c] * conv(x[t], W)[c, i, j] + bias[t, c] (+ residual[t, n, c, i, j])` with
    W the packed ±1 (binary) or -1/0/+1 (ternary) weight, then, over t = 0..T-1 with v = 0 at
    the start, `m = decay[t, c] * v + y[t]; s = max(m - threshold[t, c], 0); v = m - s =
    min(m, θ)` (exactly θ after firing); the parallel neuron is
    `s = max(y[t] - threshold[t, c], 0)`. The output is `code(s) =
    clamp(round_half_even(s / spike_step), 0, 2^k - 1)` as uint8 when `spike_bits = k` is given,
    `s` in `out_dtype` otherwise, or `y` in `out_dtype` when `threshold` is None.

    Args:
        x: [T, N, C_in, H, W] input spikes (any strides), T >= 1: uint8 codes (value =
            code * in_step, codes 0..255) or float spikes (fp32/fp16/bf16; fp64 on the
            reference). A 1-D convolution is H = 1 with kernel height 1.
        packed: PackedWeight of shape (C_out, C_in // groups, kh, kw), bits 1 or 2, on x's
            device. `packed.scale` is not used: `scale` replaces it.
        scale: [C_out] or [T, C_out] floating per-channel scale (the folded α · BN scale).
        bias: [C_out] or [T, C_out] floating bias, or None.
        stride, padding: int or (h, w) pair, as `nn.Conv2d` (stride >= 1, padding >= 0).
        groups: channel groups (dividing C_in and C_out); groups = C_in is depthwise.
        in_step: the input spike step Δ_in, a finite float > 0; required iff x is uint8
            (rounded to fp32). For uint8 x, K = C_in/groups·kh·kw must be <= MAX_CODE_K.
        decay: [T, C_out] floating λ (required for the EM-PF neuron, None when `parallel`).
        threshold: [T, C_out] floating θ; None (with decay None) returns the currents y.
        parallel: the stateless parallel neuron (decay must be None).
        spike_bits: 1..8: output uint8 codes; None: float spikes in `out_dtype`.
        spike_step: the output spike step Δ > 0 (codes only).
        out_dtype: fp32, fp16 or bf16: dtype of float spikes or currents.
        impl: "auto" (Triton on CUDA, else the reference), "triton" (the fused kernel; on CPU
            only under TRITON_INTERPRET=1) or "reference". No silent fallback.
        in_bits: uint8 inputs only: the codes' bit width k_in in 1..8 (default 8). Only the low
            k_in bits of each byte are read (both paths mask them), and with k_in <= 7 the GPU
            kernel uses int8 tensor-core dots (codes < 128); 8 uses exact fp16 dots.
        residual: None, or a float tensor [T or 1, N, C_out, Ho, Wo] (fp32, fp16 or bf16; fp64
            on the reference; a leading 1 is the same at every step) added to the currents y
            in fp32 before the neuron: the join of a residual block, which then costs no
            separate add (and no round trip of the currents through memory).

    Returns:
        [T, N, C_out, Ho, Wo]: uint8 codes, float spikes or currents (see above), contiguous.
        Ho = (H + 2·pad_h - kh) // stride_h + 1, likewise Wo.

    NaN in float spikes propagates to float outputs and currents and gives code 0; +inf gives
    the top code. All arithmetic is fp32: for uint8 codes the convolution is exact (integer sums)
    and the result `fp32(acc * in_step)`, so the Triton and reference paths give identical codes;
    float spikes accumulate in fp32 (the summation order differs between paths). Not
    differentiable: raises a ValueError when autograd would record it (grad mode on and an input
    requiring grad).
    """
    impl, packed, kw = _checked(
        x, packed, scale, bias, stride=stride, padding=padding, groups=groups, in_step=in_step,
        decay=decay, threshold=threshold, parallel=parallel, spike_bits=spike_bits,
        spike_step=spike_step, out_dtype=out_dtype, impl=impl, in_bits=in_bits, residual=residual,
    )  # fmt: skip
    if impl == "reference":
        return binary_conv_neuron_ref(x, packed, **kw)
    params, options = _kernel_call(kw)
    k = load_kernels("binary_conv")
    with device_guard(x):
        return k.binary_conv_neuron_fwd(x, packed.words, packed.shape, *params, **options)


#: The keyword options of `binary_conv_neuron` and their defaults (`binary_conv_neuron_plan`
#: takes the same; tests/test_binary_conv.py checks the two agree).
PLAN_OPTIONS = dict(
    stride=1, padding=0, groups=1, in_step=None, decay=None, threshold=None, parallel=False,
    spike_bits=None, spike_step=0.25, out_dtype=torch.float32, impl="auto", in_bits=None,
    residual=None,
)  # fmt: skip


def binary_conv_neuron_plan(
    x: torch.Tensor,
    packed: PackedWeight,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    **options,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Check a `binary_conv_neuron` call once; return `run(x2)`, the same call on another input.

    For a layer called again and again with the same weights (a deployed network): the
    arguments (`options`: the keyword arguments of `binary_conv_neuron`, same defaults) are
    checked here as `binary_conv_neuron` checks them, and the kernel's launch arguments are
    built once. `run(x2)` takes an input of x's dtype, shape, strides and device and does not
    check it (the caller keys its plans on those). A plan made with a `residual` is
    `run(x2, residual2)`, residual2 likewise of the residual's form, with each image's
    [C_out, Ho, Wo] block contiguous. The plan keeps what it derived from the
    weights and parameters (fp32 copies of 16-bit parameters, their strides): after a change to
    any of them, in place or not, make a new plan. Returns what `binary_conv_neuron(x2, ...)`
    returns.
    """
    unknown = sorted(set(options) - set(PLAN_OPTIONS))
    if unknown:
        raise TypeError(f"binary_conv_neuron_plan got unknown options {unknown}")
    options = {**PLAN_OPTIONS, **options}
    impl, packed, kw = _checked(x, packed, scale, bias, **options)
    if impl == "reference":

        def run_ref(x2: torch.Tensor, residual2: torch.Tensor | None = None) -> torch.Tensor:
            return binary_conv_neuron_ref(x2, packed, **{**kw, "residual": residual2})

        return run_ref
    params, options = _kernel_call(kw)
    k = load_kernels("binary_conv")
    with device_guard(x):
        run = k.binary_conv_neuron_plan(x, packed.words, packed.shape, *params, **options)

    def run_on_device(x2: torch.Tensor, residual2: torch.Tensor | None = None) -> torch.Tensor:
        with device_guard(x2):
            return run(x2, residual2)

    return run_on_device
