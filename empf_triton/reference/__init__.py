"""Eager PyTorch twins of every op: the oracle the Triton kernels are tested against.

They run anywhere (CPU, CUDA, fp64) and are written so that plain torch autograd gives the
gradients of docs/model.md; custom autograd is used only where the math asks for it
(straight-through quantiser, surrogate spike functions).
"""
