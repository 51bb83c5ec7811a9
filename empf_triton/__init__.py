"""empf_triton: Triton kernels for EM-PF spiking neural networks.

Ops (each takes `impl="auto" | "triton" | "reference"`) are importable from the top level;
modules live in `empf_triton.nn`, models in `empf_triton.models`, training in `empf_triton.train`,
data sets in `empf_triton.data`. Importing this package does not import triton: the kernels load
on first use.
"""

from . import data, models, nn, ops, train
from .nn import detach_net, reset_net
from .ops import *  # noqa: F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"

__all__ = ["data", "detach_net", "models", "nn", "ops", "reset_net", "train", *_ops_all]
