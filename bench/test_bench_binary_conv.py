"""Benchmarks of the fused deployment layer `binary_conv_neuron` (packed conv, scale/bias, neuron).

Run: `pytest bench/test_bench_binary_conv.py --benchmark-json=results.json` (on its own, not with
tests/). Timing, checks, memory and CUDA-graph replay: bench/conftest.py (`bench_tools.run`);
knobs there (time per case, CPU threads).

Shapes: the 3x3 convolutions of a CIFAR ResNet-18 (32x32 input), T = 4, batch B = 1 and 64 on
CUDA; on the CPU two tiny layers with B = 1 (a dry run of the harness; Triton cases then run only
under TRITON_INTERPRET=1, as a harness check, not a measurement).

Cases (`test_bench_binary_conv[impl-layer-B]`, `op="binary_conv_neuron"`), each a full deployed
layer for all T steps unless said otherwise; `extra_info` has impl, layer, T, batch (and B), C_in,
C_out, H, W, stride, Ho, Wo, K, what was timed (`timed`), bytes moved and GB/s, MAC-based TFLOP/s
(2 ops per multiply-accumulate, dense count), and the harness's wall time, device time, CUDA peak
memory and CUDA-graph replay times (`graph_wall_time_s`, `graph_device_time_s`: launch overhead
removed). Every Triton case is checked against the reference path before it is timed:
- `triton`: binary_conv_neuron(impl="triton"), uint8 4-bit codes in (in_bits=4: int8 dots), 4-bit
  codes out, EM-PF neuron with [T, C] decay/threshold and [C] scale/bias. Check: the codes equal
  the reference path's exactly (integer sums, as the op documents).
- `triton-fp16`: the same with fp16 float spikes in and fp16 float spikes out (fp16 dots). Check:
  max |out - reference| ≤ 1e-2 · max |reference| (fp32 sums in another order, fp16 output).
- `reference`: binary_conv_neuron(impl="reference"), the unfused eager path of the same layer
  (decode codes, unpack weights, F.conv2d with T folded into the batch, scale/bias, the neuron
  step by step in fp32, encode codes).
- `unfused_lib`: what a user of the library would run without the fused op: fp16 spikes, dense
  F.conv2d with the folded fp16 weight and bias, then the library's `empf_neuron` (scalar decay and
  threshold: it has no per-channel form; Triton on CUDA) with 4-bit quantised spikes.
- `dense_fp16`: only F.conv2d of fp16 spikes with the dense fp16 weight (T folded into the
  batch): the cuDNN convolution the fused layer replaces, without any neuron.

Byte model (the bytes each case must move at least; ds = 2 for fp16): triton reads the codes
T*B*C_in*H*W bytes, the packed words bits*C_out*ceil(K/32)*4 and writes codes T*B*C_out*Ho*Wo
bytes; triton-fp16 the same with 2-byte spikes in and out; dense_fp16 reads x and the dense weight
(2 B per weight) and writes y (ds each); unfused_lib adds the neuron's read of y and write of the
spikes; reference counts as dense_fp16 in fp32 (4 B) plus the neuron's read and write.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import ON_CUDA, triton_skip_reason

from empf_triton.ops.binary import pack_weight, unpack_weight
from empf_triton.ops.binary_conv import binary_conv_neuron
from empf_triton.ops.neuron import empf_neuron

DEVICE = "cuda" if ON_CUDA else "cpu"
T = 4
# name: (C_in, C_out, H, stride), 3x3 kernels, padding 1.
LAYERS = (
    {
        "l1": (64, 64, 32, 1),
        "l2_down": (64, 128, 32, 2),
        "l2": (128, 128, 16, 1),
        "l3_down": (128, 256, 16, 2),
        "l3": (256, 256, 8, 1),
        "l4_down": (256, 512, 8, 2),
        "l4": (512, 512, 4, 1),
    }
    if ON_CUDA
    else {"tiny": (16, 16, 8, 1), "tiny_down": (16, 32, 8, 2)}
)
BATCHES = [1, 64] if ON_CUDA else [1]
IMPLS = ["triton", "triton-fp16", "reference", "unfused_lib", "dense_fp16"]
STEP_IN = STEP_OUT = 0.25


def _check_codes(fn, ref_fn):
    """Before timing: uint8 codes in, integer sums: the codes must equal the reference's."""

    def check() -> dict:
        got, ref = fn(), ref_fn()
        assert got.dtype == ref.dtype == torch.uint8 and got.shape == ref.shape
        diff = (got.int() - ref.int()).abs()
        assert torch.equal(got, ref), (
            f"{int((diff > 0).sum())} codes differ from the reference (max {int(diff.max())})"
        )
        return {"codes_equal_reference": True}

    return check


def _check_float(fn, ref_fn, rel: float = 1e-2):
    """Before timing: float spikes against the reference path, relative to their largest value."""

    def check() -> dict:
        got, ref = fn().double(), ref_fn().double()
        assert got.shape == ref.shape
        err = ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
        assert err <= rel, f"float spikes differ from the reference: rel. error {err:.3g}"
        return {"rel_err_vs_reference": err}

    return check


@pytest.mark.parametrize("B", BATCHES)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_binary_conv(benchmark, bench_tools, impl, layer, B):
    if impl.startswith("triton") and triton_skip_reason():
        pytest.skip(triton_skip_reason())
    C_in, C_out, H, stride = LAYERS[layer]
    W = H
    Ho = Wo = (H + 2 - 3) // stride + 1
    K = C_in * 9
    bits = 1
    g = torch.Generator().manual_seed(0)
    w = torch.randn(C_out, C_in, 3, 3, generator=g)
    packed = pack_weight(w, bits, impl="reference").to(DEVICE)
    codes = torch.randint(0, 16, (T, B, C_in, H, W), generator=g, dtype=torch.uint8).to(DEVICE)
    scale = (torch.rand(C_out, generator=g) * 0.05 + 0.01).to(DEVICE)
    bias = (torch.randn(C_out, generator=g) * 0.1).to(DEVICE)
    decay = torch.full((T, C_out), 0.5, device=DEVICE)
    threshold = torch.full((T, C_out), 0.5, device=DEVICE)
    x16 = (codes.float() * STEP_IN).to(torch.float16 if ON_CUDA else torch.float32)
    sign = unpack_weight(packed, torch.float32) / packed.scale[:, None, None, None]
    w_fold = (sign * scale[:, None, None, None]).to(x16.dtype)
    bias_fold = bias.to(x16.dtype)
    ds = x16.element_size()

    n_in, n_out = T * B * C_in * H * W, T * B * C_out * Ho * Wo
    words_b = bits * C_out * math.ceil(K / 32) * 4
    dense_io = n_in * ds + C_out * K * ds + n_out * ds
    neuron = dict(decay=decay, threshold=threshold, spike_bits=4, spike_step=STEP_OUT)
    conv = dict(stride=stride, padding=1)

    check = None
    if impl == "triton":
        kw = {**conv, **neuron}

        def fn(impl="triton"):
            return binary_conv_neuron(
                codes, packed, scale, bias, in_step=STEP_IN, in_bits=4, impl=impl, **kw
            )

        check = _check_codes(fn, lambda: fn("reference"))

        moved = n_in + words_b + n_out
        timed = "fused op: uint8 4-bit codes in, int8 dots, EM-PF over T, 4-bit codes out"
    elif impl == "triton-fp16":
        xin = x16.to(torch.float16)

        def fn(impl="triton"):
            return binary_conv_neuron(
                xin,
                packed,
                scale,
                bias,
                decay=decay,
                threshold=threshold,
                out_dtype=torch.float16,
                impl=impl,
                **conv,
            )

        check = _check_float(fn, lambda: fn("reference"))

        moved = 2 * n_in + words_b + 2 * n_out
        timed = "fused op: fp16 float spikes in, fp16 dots, EM-PF over T, fp16 float spikes out"
    elif impl == "reference":

        def fn():
            return binary_conv_neuron(
                codes, packed, scale, bias, in_step=STEP_IN, impl="reference", **conv, **neuron
            )

        moved = n_in + words_b + 4 * (n_in + C_out * K + n_out) + 2 * 4 * n_out + n_out
        timed = "reference path: decode, unpack, fp32 F.conv2d, scale/bias, eager neuron, codes"
    elif impl == "unfused_lib":
        xb = x16.reshape(T * B, C_in, H, W)

        def fn():
            y = F.conv2d(xb, w_fold, bias_fold, **conv).reshape(T, B, C_out, Ho, Wo)
            s, _ = empf_neuron(y, decay=0.5, threshold=0.5, spike_bits=4, spike_step=STEP_OUT)
            return s

        moved = dense_io + 2 * n_out * ds
        timed = "dense fp16 F.conv2d (folded weight, bias) + library empf_neuron (4-bit spikes)"
    else:
        xb = x16.reshape(T * B, C_in, H, W)

        def fn():
            return F.conv2d(xb, w_fold, None, **conv)

        moved = dense_io
        timed = "dense fp16 F.conv2d only (T folded into the batch), no scale/bias or neuron"

    bench_tools.run(
        benchmark,
        fn,
        check=check,
        bytes_moved=moved,
        flops=2 * T * B * C_out * Ho * Wo * K,
        op="binary_conv_neuron",
        impl=impl,
        layer=layer,
        T=T,
        batch=B,
        B=B,
        C_in=C_in,
        C_out=C_out,
        H=H,
        W=W,
        stride=stride,
        Ho=Ho,
        Wo=Wo,
        K=K,
        weight_bits=bits,
        timed=timed,
        dtype=str(x16.dtype).removeprefix("torch."),
    )
