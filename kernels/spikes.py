"""Multi-precision spike kernels (docs/model.md §2): quantise, pack k-bit codes, unpack them.

All three are memory-bound elementwise passes over flattened contiguous tensors. Codes are computed
in fp32 from the input upcast to fp32 (`kernels._common.spike_code`: IEEE division, round half to
even, clamp to 0..2^k-1). Packing puts 8 // k codes in a byte, little-endian inside the byte:
element i lives in byte i // (8 // k) at bit offset (i % (8 // k)) * k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import empty, pick_configs, spike_code
from ._launch import launch, plan

# The first config is the one pinned under the interpreter / EMPF_AUTOTUNE=0: large blocks so few
# interpreted programs run, and a sound GPU default. Encode/decode blocks count bytes (each byte
# holds 8 // k elements), so their element tiles are up to 8x larger for the same BLOCK.
_ELEMENTWISE_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 4096}, num_warps=8),
    triton.Config({"BLOCK": 512}, num_warps=4),
]
_PACK_CONFIGS = [
    triton.Config({"BLOCK": 1024}, num_warps=4),
    triton.Config({"BLOCK": 512}, num_warps=4),
    triton.Config({"BLOCK": 2048}, num_warps=8),
    triton.Config({"BLOCK": 256}, num_warps=2),
]


#: Autotune keys are size classes (next power of two, capped), so a new batch size does not re-tune.
_CLASS_CAP = 1 << 26


def size_class(n: int) -> int:
    """Next power of two of n (1 for n <= 1), capped at 2^26: the autotune key of a size."""
    return min(1 << (n - 1).bit_length() if n > 1 else 1, _CLASS_CAP)


def _cdiv(a: int, b: int) -> int:  # triton.cdiv is a constexpr function: slow on the host
    return -(-a // b)


@triton.autotune(
    configs=pick_configs(_ELEMENTWISE_CONFIGS),
    key=["SIZE_CLASS"],
)
@triton.jit
def _quantize_spikes_fwd_kernel(
    p_s, p_out, n_elements, SIZE_CLASS, step, levels_m1, BLOCK: tl.constexpr
):
    """out[i] = clamp(round(s[i] / step), 0, levels_m1) * step; NaN propagates."""
    pid = tl.program_id(0).to(tl.int64)
    o_elem = pid * BLOCK + tl.arange(0, BLOCK)
    m_elem = o_elem < n_elements
    b_s = tl.load(p_s + o_elem, mask=m_elem, other=0.0).to(tl.float32)
    b_c = spike_code(b_s, step, levels_m1)
    tl.store(p_out + o_elem, (b_c * step).to(p_out.dtype.element_ty), mask=m_elem)


@triton.autotune(
    configs=pick_configs(_PACK_CONFIGS),
    key=["SIZE_CLASS", "BITS"],
)
@triton.jit
def _encode_spikes_kernel(
    p_s,
    p_codes,
    n_elements,
    n_bytes,
    SIZE_CLASS,
    step,
    levels_m1,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """codes[j] = sum_q code(s[j * PER + q]) << (q * BITS) over a [BLOCK, PER] tile of elements.

    Elements past the end read as code 0, so the unused high bits of the last byte are zero.
    NaN spikes get code 0: a float-to-int conversion of NaN is undefined on the GPU.
    """
    pid = tl.program_id(0).to(tl.int64)
    o_byte = pid * BLOCK + tl.arange(0, BLOCK)
    m_byte = o_byte < n_bytes
    o_sub = tl.arange(0, PER)
    o_elem = o_byte[:, None] * PER + o_sub[None, :]
    m_elem = o_elem < n_elements
    b_s = tl.load(p_s + o_elem, mask=m_elem, other=0.0).to(tl.float32)
    b_c = spike_code(b_s, step, levels_m1)
    b_c = tl.where(b_c == b_c, b_c, 0.0).to(tl.int32)
    # Fields are disjoint, so the sum is the bitwise or.
    b_byte = tl.sum(b_c << (o_sub * BITS)[None, :], axis=1)
    tl.store(p_codes + o_byte, b_byte.to(tl.uint8), mask=m_byte)


@triton.autotune(
    configs=pick_configs(_PACK_CONFIGS),
    key=["SIZE_CLASS", "BITS"],
)
@triton.jit
def _decode_spikes_kernel(
    p_codes,
    p_out,
    n_elements,
    n_bytes,
    SIZE_CLASS,
    step,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """out[j * PER + q] = ((codes[j] >> (q * BITS)) & (2^BITS - 1)) * step, for elements < n."""
    pid = tl.program_id(0).to(tl.int64)
    o_byte = pid * BLOCK + tl.arange(0, BLOCK)
    m_byte = o_byte < n_bytes
    o_sub = tl.arange(0, PER)
    o_elem = o_byte[:, None] * PER + o_sub[None, :]
    m_elem = o_elem < n_elements
    b_byte = tl.load(p_codes + o_byte, mask=m_byte, other=0).to(tl.int32)
    b_c = (b_byte[:, None] >> (o_sub * BITS)[None, :]) & ((1 << BITS) - 1)
    b_out = b_c.to(tl.float32) * step
    tl.store(p_out + o_elem, b_out.to(p_out.dtype.element_ty), mask=m_elem)


def _launch_or_plan(kernel, grid, args: dict, inputs: tuple, out: torch.Tensor, bind: bool):
    """Launch and return `out`; with `bind`, the plan of this launch instead (not run):
    `run(*inputs2) -> (out2,)` for later contiguous inputs of the same forms (`_launch.plan`)."""
    if bind:
        return plan(kernel, grid, args, inputs, (out,))
    launch(kernel, grid, args)
    return out


def quantize_spikes_fwd(s: torch.Tensor, bits: int, step: float, bind: bool = False):
    """Q(s) of a contiguous s (fp32/fp16/bf16, any shape); same shape and dtype. `bind` (s not
    empty): the launch's plan instead, `run(s2) -> (out,)`."""
    out = empty(s.shape, s.dtype, s.device)
    n = s.numel()
    if n == 0:
        return out

    def grid(meta):
        return (_cdiv(n, meta["BLOCK"]),)

    args = dict(
        p_s=s,
        p_out=out,
        n_elements=n,
        SIZE_CLASS=size_class(n),
        step=float(step),
        levels_m1=float(2**bits - 1),
    )
    return _launch_or_plan(_quantize_spikes_fwd_kernel, grid, args, (s,), out, bind)


def encode_spikes_fwd(s: torch.Tensor, bits: int, step: float, bind: bool = False):
    """Packed k-bit codes of a contiguous s: 1-D uint8 of length ceil(numel * bits / 8).

    `bits` in {1, 2, 4, 8}. `bind` (s not empty): the launch's plan, `run(s2) -> (codes,)`.
    """
    per = 8 // bits
    n = s.numel()
    n_bytes = -(-n // per)
    codes = empty((n_bytes,), torch.uint8, s.device)
    if n_bytes == 0:
        return codes

    def grid(meta):
        return (_cdiv(n_bytes, meta["BLOCK"]),)

    args = dict(
        p_s=s,
        p_codes=codes,
        n_elements=n,
        n_bytes=n_bytes,
        SIZE_CLASS=size_class(n_bytes),
        step=float(step),
        levels_m1=float(2**bits - 1),
        BITS=bits,
        PER=per,
    )
    return _launch_or_plan(_encode_spikes_kernel, grid, args, (s,), codes, bind)


def decode_spikes_fwd(
    codes: torch.Tensor,
    bits: int,
    step: float,
    n_elements: int,
    dtype: torch.dtype,
    bind: bool = False,
):
    """`n_elements` values code * step (1-D, `dtype`) from contiguous packed uint8 `codes`.

    `codes` must hold ceil(n_elements * bits / 8) bytes; `bits` in {1, 2, 4, 8}. `bind`
    (n_elements > 0): the launch's plan, `run(codes2) -> (out,)`.
    """
    per = 8 // bits
    n_bytes = codes.numel()
    out = empty((n_elements,), dtype, codes.device)
    if n_elements == 0:
        return out

    def grid(meta):
        return (_cdiv(n_bytes, meta["BLOCK"]),)

    args = dict(
        p_codes=codes,
        p_out=out,
        n_elements=n_elements,
        n_bytes=n_bytes,
        SIZE_CLASS=size_class(n_bytes),
        step=float(step),
        BITS=bits,
        PER=per,
    )
    return _launch_or_plan(_decode_spikes_kernel, grid, args, (codes,), out, bind)
