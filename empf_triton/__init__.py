"""empf_triton: Triton kernels for EM-PF spiking neural networks.

Ops (each takes `impl="auto" | "triton" | "reference"`) are importable from the top level;
modules live in `empf_triton.nn`. Importing this package does not import triton: the kernels load
on first use.
"""

from . import nn, ops
from .nn import detach_net, reset_net
from .ops import (
    TritonUnavailableError,
    decode_spikes,
    empf_neuron,
    empf_neuron_step,
    encode_spikes,
    lif_neuron,
    lif_neuron_step,
    parallel_neuron,
    quantize_spikes,
)

__version__ = "0.1.0"

__all__ = [
    "TritonUnavailableError",
    "decode_spikes",
    "detach_net",
    "empf_neuron",
    "empf_neuron_step",
    "encode_spikes",
    "lif_neuron",
    "lif_neuron_step",
    "nn",
    "ops",
    "parallel_neuron",
    "quantize_spikes",
    "reset_net",
]
