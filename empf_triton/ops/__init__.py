"""Public ops: validation, impl choice and autograd wrappers over kernels/ and reference/."""

from ._common import TritonUnavailableError
from .binary import (
    PackedWeight,
    binarize,
    binary_linear,
    binary_matmul,
    pack_weight,
    ternarize,
    unpack_weight,
)
from .lif import lif_neuron, lif_neuron_step
from .neuron import empf_neuron, empf_neuron_step, parallel_neuron
from .spikes import decode_spikes, encode_spikes, quantize_spikes

__all__ = [
    "PackedWeight",
    "TritonUnavailableError",
    "binarize",
    "binary_linear",
    "binary_matmul",
    "decode_spikes",
    "empf_neuron",
    "empf_neuron_step",
    "encode_spikes",
    "lif_neuron",
    "lif_neuron_step",
    "pack_weight",
    "parallel_neuron",
    "quantize_spikes",
    "ternarize",
    "unpack_weight",
]
