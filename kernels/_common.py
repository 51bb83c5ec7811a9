"""Shared pieces of the Triton kernels: allocation, autotune pinning, launch options, jit helpers.

Only `kernels/` imports triton. Whether kernels run in Triton's CPU interpreter or on the GPU is
decided when this package is imported: `TRITON_INTERPRET=1` must already be in the environment.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

#: True when kernels run in Triton's CPU interpreter (read once, at import, as Triton does).
INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _probe_kernel(p, B: tl.constexpr):
    # what every kernel here uses: a program id, a block of offsets, a block of values
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(p + o, tl.zeros([B], dtype=tl.float32) + 1.0)


@functools.cache
def interpreter_works() -> bool:
    """Whether kernels run in Triton's interpreter here: `TRITON_INTERPRET=1` must have been set
    before triton itself was imported (anything may import it first: torch.compile does), or
    every launch fails inside Triton. Tried once, with a two-element kernel."""
    if not INTERPRET:
        return False
    out = torch.zeros(2)
    try:
        _probe_kernel[(1,)](out, B=2)
    except Exception:  # triton's InterpreterError ("... outside of the scope of a kernel")
        return False
    return out.tolist() == [1.0, 1.0]


#: Tests set EMPF_POISON_EMPTY=1: an output a kernel forgets to write reads as NaN (or all ones).
_POISON: bool = os.environ.get("EMPF_POISON_EMPTY", "0") == "1"


def autotune_enabled() -> bool:
    """Autotuning needs a GPU driver: under the interpreter or with EMPF_AUTOTUNE=0, pin one."""
    return not INTERPRET and os.environ.get("EMPF_AUTOTUNE", "1") != "0"


def pick_configs(configs: list[triton.Config]) -> list[triton.Config]:
    """All configs when autotuning, otherwise only the first (the pinned default)."""
    return configs if autotune_enabled() else configs[:1]


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """`torch.empty`, filled with NaN (floats) or all-ones bits (integers) under test."""
    out = torch.empty(shape, dtype=dtype, device=device)
    return poison(out) if _POISON else out


def empty_like(x: torch.Tensor) -> torch.Tensor:
    """`torch.empty_like` of a contiguous tensor (about a third of `torch.empty`'s host time),
    poisoned under test as `empty`."""
    out = torch.empty_like(x)
    return poison(out) if _POISON else out


def poison(out: torch.Tensor) -> torch.Tensor:
    """Fill a new output with NaN (floats) or all-ones bits (integers): under test, an element a
    kernel forgets to write then fails the comparison."""
    if out.is_floating_point():
        out.fill_(float("nan"))
    else:
        out.fill_(-1 if out.dtype.is_signed else torch.iinfo(out.dtype).max)
    return out


@functools.lru_cache(maxsize=256)
def size_class(n: int) -> int:
    """Autotune key for a size: the next power of two, capped at 2^24, so a new batch size reuses
    the tuned config of its class instead of re-tuning."""
    return min(1 << max(int(n) - 1, 0).bit_length(), 1 << 24)


def cdiv(a: int, b: int) -> int:
    """Ceil division on host ints (`triton.cdiv` is a jit function: slow to call from Python)."""
    return -(-a // b)


def launch_options() -> dict:
    """Compile options for every launch.

    `enable_fp_fusion=False` stops `a * b + c` from becoming one FMA, so fp32 results round
    exactly like the eager reference (which multiplies and adds in two steps).
    """
    return {"enable_fp_fusion": False}


@triton.jit
def round_half_even(x):
    """Round to the nearest integer, ties to even (as `torch.round`, which keeps the sign of
    zero: x in [-0.5, 0) gives -0.0, not the +0.0 of floor(x) + 1); NaN stays NaN."""
    r = tl.floor(x)
    d = x - r
    r_odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & r_odd)
    return tl.where(up, tl.where(r == -1.0, -0.0, r + 1.0), r)


@triton.jit
def spike_code(s, step, levels_m1):
    """k-bit spike code `clamp(round(s / step), 0, 2^k - 1)` in fp32; NaN propagates.

    `levels_m1` is 2^k - 1. The division is IEEE round-to-nearest like torch's.
    """
    c = round_half_even(tl.math.div_rn(s, step))
    c = tl.where(c < 0.0, 0.0, c)
    c = tl.where(c > levels_m1, levels_m1, c)
    return c


@triton.jit
def pack_bits(h, BLOCK: tl.constexpr):
    """Pack a [BLOCK] 0/1 int32 vector into [BLOCK // 8] bytes (element i -> bit i % 8)."""
    h8 = tl.reshape(h, [BLOCK // 8, 8])
    shifts = tl.arange(0, 8)
    return tl.sum(h8 << shifts[None, :], axis=1).to(tl.uint8)


@triton.jit
def unpack_bit(p_bits, o_elem, m_elem):
    """Bit `o_elem` of a packed byte array (element i lives in byte i // 8, bit i % 8)."""
    b_byte = tl.load(p_bits + o_elem // 8, mask=m_elem, other=0).to(tl.int32)
    return (b_byte >> (o_elem % 8).to(tl.int32)) & 1


@triton.jit
def store_partials(p_row, b_x, pid, P, BLOCK: tl.constexpr, SUB: tl.constexpr):
    """Store the sum of each SUB-long chunk j of the [BLOCK] vector `b_x` at p_row[pid*BLOCK/SUB+j].

    Parameter gradients are reduced over fixed SUB-element chunks whatever the block size, so every
    autotune config writes the same [T, ⌈N/SUB⌉] buffer completely (no stale entries from another
    config) and the final torch sum is deterministic and config-independent.
    """
    b_part = tl.sum(tl.reshape(b_x, [BLOCK // SUB, SUB]), axis=1)
    o_p = pid * (BLOCK // SUB) + tl.arange(0, BLOCK // SUB)
    tl.store(p_row + o_p, b_part, mask=o_p < P)


@triton.jit
def load_param(p, c_val, row, s_t, s_c, o_ch, m_n, MODE: tl.constexpr, LOGIT: tl.constexpr):
    """A neuron parameter (decay or threshold) at time row `row`, in fp32.

    MODE 0: the scalar `c_val` (a float passed to the kernel: no tensor at all);
    MODE 1: per step, `p[row * s_t]` (a scalar);
    MODE 2: per channel, `p[row * s_t + o_ch * s_c]` gathered for every neuron of the block.
    With LOGIT the stored value is a logit and the parameter is its sigmoid.
    """
    if MODE == 0:
        x = tl.cast(c_val, tl.float32)  # a subnormal float is an fp64 constant in the interpreter
    elif MODE == 1:
        x = tl.load(p + row * s_t).to(tl.float32)
    else:
        x = tl.load(p + row * s_t + o_ch * s_c, mask=m_n, other=0.0).to(tl.float32)
    if LOGIT:
        x = tl.sigmoid(x)
    return x


@triton.jit
def store_param_grad(
    p_d,
    b_x,
    row,
    t,
    pid,
    o_n,
    m_n,
    N,
    P,
    MODE: tl.constexpr,
    BLOCK: tl.constexpr,
    SUB: tl.constexpr,
):
    """Store this block's contribution `b_x` ([BLOCK], fp32) to a parameter's gradient at step t.

    MODE 1 (per step): SUB-chunk partial sums at p_d[row, :], a [TQ, P] buffer (see
    store_partials). MODE 2 (per channel): the per-neuron contributions at p_d[t, :], a [T, N]
    buffer that the launcher reduces per channel. Both reductions are fixed-order: deterministic.
    """
    if MODE == 1:
        store_partials(p_d + row * P, b_x, pid, P, BLOCK, SUB)
    elif MODE == 2:
        tl.store(p_d + t * N + o_n, b_x, mask=m_n)


@triton.jit
def zero_partial_rows(p_d, pid, P, TQ, t0, T, BLOCK: tl.constexpr, SUB: tl.constexpr):
    """Zero this program's columns of the rows of a [TQ, P] partial-sum buffer outside
    [t0, t0 + T) (a step of a longer parameter vector: the other steps get no gradient)."""
    o_p = pid * (BLOCK // SUB) + tl.arange(0, BLOCK // SUB)
    b_zero = tl.zeros([BLOCK // SUB], dtype=tl.float32)
    for r in range(0, TQ):
        # a vector row index: scalar comparisons may specialise to Python bools
        b_r = b_zero.to(tl.int64) + r
        m_out = (o_p < P) & ((b_r < t0) | (b_r >= t0 + T))
        tl.store(p_d + r * P + o_p, b_zero, mask=m_out)


def param_inputs(decay, threshold, stacked: bool = False) -> tuple:
    """A training plan's parameter inputs (kernels/_launch.py `plan`, the tensors each call
    passes): each tensor parameter, None for a float; a `stacked` pair (one [2, TQ] tensor in
    both slots, see neuron.empf_fwd) is one tensor, in the decay slot."""
    d = decay if isinstance(decay, torch.Tensor) else None
    th = threshold if isinstance(threshold, torch.Tensor) and not stacked else None
    return d, th
