"""empf_triton: Triton kernels for EM-PF spiking neural networks.

Ops (each takes `impl="auto" | "triton" | "reference"`) are importable from the top level;
modules live in `empf_triton.nn`, models in `empf_triton.models`, training in `empf_triton.train`,
data sets in `empf_triton.data`, deployment in `empf_triton.deploy`. Importing this package does
not import triton (the kernels load on first use), and `data`, `models`, `train` and `deploy` load
on first access, so a deployed model runs without importing the training code.
"""

import importlib as _importlib

from . import nn, ops
from .nn import detach_net, reset_net
from .ops import *  # noqa: F403
from .ops import __all__ as _ops_all

__version__ = "0.1.0"

_LAZY = ("data", "deploy", "models", "train")

# data, deploy, models and train are lazy attributes (__getattr__ below).
__all__ = [  # noqa: F405
    "data", "deploy", "detach_net", "models", "nn", "ops", "reset_net", "train", *_ops_all
]  # fmt: skip


def __getattr__(name: str):
    if name in _LAZY:
        return _importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
