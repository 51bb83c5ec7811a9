"""Non-dense inputs (sparse COO / CSR, mkldnn) are one TypeError naming the argument and its
layout, on both implementations, at every entry point. They were torch errors from deep inside
the ops ("unsupported memory format option Contiguous", "Cannot access data pointer of Tensor
that doesn't have storage", "reshape is not implemented for sparse tensors"), and the reference
of `lif_neuron` silently took a sparse threshold.
"""

from __future__ import annotations

import pytest
import torch
from test_deploy import _small

from empf_triton.deploy import fold
from empf_triton.nn import BinaryConv2d, BinaryLinear, EMPFNeuron, LIFNeuron, MemBN
from empf_triton.ops.binary import binarize, binary_linear, binary_matmul, pack_weight, ternarize
from empf_triton.ops.lif import lif_neuron, lif_neuron_step
from empf_triton.ops.neuron import empf_neuron, empf_neuron_step, parallel_neuron
from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes

LAYOUTS = {
    "sparse_coo": lambda t: t.to_sparse(),
    "sparse_csr": lambda t: t.to_sparse_csr(),  # 2-D only: a COO tensor for other shapes
    "mkldnn": lambda t: t.to_mkldnn(),  # floating only: a COO tensor for the uint8 codes
}


def _dense(*shape):
    return torch.rand(*shape) + 0.1


def _cases():
    """name -> (argument named in the message, call(make, impl)), make(t): t in the layout."""
    w = torch.randn(5, 8)
    packed = pack_weight(w, 1, impl="reference")
    codes = encode_spikes(_dense(8), 4, impl="reference")
    half = torch.full((3,), 0.5)
    return {
        "empf_neuron": ("current", lambda m, i: empf_neuron(
            m(_dense(3, 4)), decay=half, threshold=0.5, impl=i)),
        "empf_neuron v0": ("v0", lambda m, i: empf_neuron(
            _dense(3, 4), m(_dense(4)), decay=0.5, threshold=0.5, impl=i)),
        "empf_neuron decay": ("decay", lambda m, i: empf_neuron(
            _dense(3, 4), decay=m(half), threshold=0.5, impl=i)),
        "empf_neuron_step": ("current", lambda m, i: empf_neuron_step(
            m(_dense(2, 4)), None, decay=0.5, threshold=0.5, impl=i)),
        "parallel_neuron": ("current", lambda m, i: parallel_neuron(
            m(_dense(3, 4)), threshold=0.5, impl=i)),
        "lif_neuron threshold": ("threshold", lambda m, i: lif_neuron(
            _dense(3, 4), decay=0.5, threshold=m(half), impl=i)),
        "lif_neuron_step": ("current", lambda m, i: lif_neuron_step(
            m(_dense(2, 4)), decay=0.5, threshold=0.5, impl=i)),
        "quantize_spikes": ("s", lambda m, i: quantize_spikes(m(_dense(2, 4)), 4, impl=i)),
        "encode_spikes": ("s", lambda m, i: encode_spikes(m(_dense(2, 4)), 4, impl=i)),
        "decode_spikes": ("codes", lambda m, i: decode_spikes(m(codes), 4, impl=i)),
        "binarize": ("w", lambda m, i: binarize(m(torch.randn(5, 8)), impl=i)),
        "ternarize": ("w", lambda m, i: ternarize(m(torch.randn(5, 8)), impl=i)),
        "pack_weight": ("w", lambda m, i: pack_weight(m(torch.randn(5, 8)), 1, impl=i)),
        "binary_matmul": ("x", lambda m, i: binary_matmul(m(_dense(2, 8)), packed, impl=i)),
        "binary_linear": ("x", lambda m, i: binary_linear(m(_dense(2, 8)), w, impl=i)),
        "EMPFNeuron": ("EMPFNeuron input", lambda m, i: EMPFNeuron(3, impl=i)(m(_dense(2, 4)))),
        "LIFNeuron": ("LIFNeuron input", lambda m, i: LIFNeuron(3, impl=i)(m(_dense(2, 4)))),
        "BinaryLinear": ("x", lambda m, i: BinaryLinear(8, 5, impl=i)(m(_dense(2, 8)))),
        "BinaryConv2d": ("x", lambda m, i: BinaryConv2d(3, 2, 3, impl=i)(m(_dense(1, 3, 5, 5)))),
        "MemBN": ("MemBN input", lambda m, i: MemBN(3, 2)(m(_dense(2, 3, 4)), 0)),
        "deployed model": ("deployed model input", lambda m, i: fold(_small(), impl=i)(
            m(_dense(2, 1, 24)))),
    }  # fmt: skip


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("name", list(_cases()))
def test_non_dense_inputs_are_a_type_error(name, layout):
    arg, call = _cases()[name]

    def make(t):
        try:
            return LAYOUTS[layout](t)
        except (RuntimeError, IndexError):  # no tensor of t's shape or dtype in this layout
            return t.to_sparse()

    for impl in ("reference", "triton"):
        with pytest.raises(TypeError, match=rf"{arg} must be a dense \(strided\) tensor, got "):
            call(make, impl)
