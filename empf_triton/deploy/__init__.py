"""Deployment: fold a trained EM-PF network, export it to one `.safetensors` file, load and run it.

    from empf_triton.deploy import fold, export, load
    deployed = fold(model)                      # DeployedModel: packed weights, BN/Mem-BN folded
    export(model, "model.safetensors", meta={"dataset": "mnist1d"})
    deployed = load("model.safetensors")        # needs no training code, runs no pickled code
    logits = deployed(x)                        # x [N, *in_shape] or [T, N, *in_shape]
    fast = deployed.cuda().graphed(x.cuda())    # the same forward replayed from a CUDA graph

See docs/deployment.md for the format, the folding math and the energy accounting.
"""

from .errors import DeployError, DeployFormatError
from .fold import fold
from .format import export, load, read_header
from .runtime import DeployedModel, GraphedModel

__all__ = [
    "DeployError",
    "DeployFormatError",
    "DeployedModel",
    "GraphedModel",
    "export",
    "fold",
    "load",
    "read_header",
]
