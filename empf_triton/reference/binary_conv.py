"""Reference fused deployment layer: packed binary/ternary convolution + scale/bias + EM-PF neuron.

The eager twin of `kernels/binary_conv.py` (docs/model.md, deployment): decode the input spikes,
unpack the ±1 (or ternary -1/0/+1) weights to a dense tensor, `F.conv2d` with the T steps folded
into the batch, `y = scale * conv + bias` per output channel, then the EM-PF neuron over T in fp32.

Arithmetic, chosen so that the Triton kernel reproduces it bit for bit on k-bit codes:
- uint8 codes (only their low `in_bits` bits, default all 8, are read): the convolution runs on
  the integer codes (exact: every partial sum is an integer below 2^24 because K * 255 < 2^24 is
  required) and is multiplied by `in_step` (rounded to fp32) once afterwards, i.e.
  `conv = fp32(acc * in_step)`; mathematically this is the convolution of the decoded spikes
  `code * in_step`.
- float spikes: the convolution of the spikes (converted to fp32) accumulates in fp32 (TF32 off).
- then `y = conv * scale + bias` in fp32 (a multiply and an add, each rounded), and the neuron
  `m = decay * v + y; s = relu(m - threshold); v = m - s` in fp32, one rounding per operation,
  except that v is `min(m, threshold)` exactly (`where(m > θ, θ, m)`, no rounding).
- output codes `clamp(round_half_even(s / spike_step), 0, 2^k - 1)` as uint8; NaN gives code 0.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F

from .binary import decode_ref
from .neuron import reset
from .spikes import spike_codes_ref


def _per_step(p: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """[C] or [T, C] -> fp32 [T, C]."""
    if p is None:
        return None
    p = p.to(torch.float32)
    return p.expand(T, p.shape[-1]) if p.dim() == 1 else p


def _no_tf32(device: torch.device):
    if device.type != "cuda":
        return contextlib.nullcontext()
    return torch.backends.cudnn.flags(enabled=True, allow_tf32=False)


def binary_conv_ref(
    x: torch.Tensor,
    words: torch.Tensor,
    shape: tuple[int, ...],
    *,
    stride: tuple[int, int],
    padding: tuple[int, int],
    groups: int,
    in_step: float | None,
    in_bits: int | None = None,
) -> torch.Tensor:
    """fp32 convolution [T, N, C_out, Ho, Wo] of the spikes x [T, N, C_in, H, W] with the packed
    signs (no scale): codes (their low `in_bits` bits) are convolved as integers and multiplied
    by fp32(in_step) once."""
    T, N = x.shape[:2]
    K = math.prod(shape[1:])
    w = decode_ref(words, K).to(torch.float32).reshape(shape)
    xf = x.reshape(T * N, *x.shape[2:])
    if x.dtype == torch.uint8 and in_bits is not None and in_bits < 8:
        xf = xf & (2**in_bits - 1)
    xf = xf.to(torch.float32)
    with _no_tf32(x.device):
        y = F.conv2d(xf, w, stride=stride, padding=padding, groups=groups)
    if in_step is not None:
        y = y * torch.tensor(in_step, dtype=torch.float32).item()
    return y.reshape(T, N, *y.shape[1:])


def binary_conv_neuron_ref(
    x: torch.Tensor,
    packed,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    groups: int = 1,
    in_step: float | None = None,
    in_bits: int | None = None,
    decay: torch.Tensor | None = None,
    threshold: torch.Tensor | None = None,
    parallel: bool = False,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    out_dtype: torch.dtype = torch.float32,
    residual: torch.Tensor | None = None,
) -> torch.Tensor:
    """Eager twin of `empf_triton.ops.binary_conv.binary_conv_neuron` (same arguments, no impl).

    Inputs are not validated here (the op does that). Returns uint8 codes [T, N, C_out, Ho, Wo]
    when `spike_bits` is given, else float spikes (or the currents y when `threshold` is None) in
    `out_dtype`.
    """
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
    T = x.shape[0]
    conv = binary_conv_ref(
        x,
        packed.words,
        packed.shape,
        stride=stride,
        padding=padding,
        groups=groups,
        in_step=in_step if x.dtype == torch.uint8 else None,
        in_bits=in_bits,
    )
    bshape = (T, 1, -1, 1, 1)
    y = conv * _per_step(scale, T).reshape(bshape)
    if bias is not None:
        y = y + _per_step(bias, T).reshape(bshape)
    if residual is not None:  # [T or 1, N, C_out, Ho, Wo], broadcast over the steps
        y = y + residual.to(torch.float32)
    if threshold is None:
        return y.to(out_dtype)
    th = _per_step(threshold, T).reshape(bshape)
    if parallel:
        spikes = torch.relu(y - th)
    else:
        lam = _per_step(decay, T).reshape(bshape)
        v = torch.zeros_like(y[0])
        out = []
        for t in range(T):
            m = lam[t] * v + y[t]
            s = torch.relu(m - th[t])
            v = reset(m, th[t])  # min(m, θ): exactly θ after firing
            out.append(s)
        spikes = torch.stack(out)
    if spike_bits is None:
        return spikes.to(out_dtype)
    codes = spike_codes_ref(spikes, spike_bits, spike_step)
    return torch.nan_to_num(codes, nan=0.0).to(torch.uint8)  # NaN spikes have no code: 0
