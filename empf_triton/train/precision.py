"""Mixed precision and torch.compile settings of a training or evaluation run.

- precision "fp32": no autocast. "bf16" / "fp16": `torch.autocast` around the forward passes, so
  convolutions and linears run in half precision; the neuron ops take the half-precision currents,
  compute in fp32 and return spikes and membrane in the currents' dtype: in step mode "m" the
  membrane stays fp32 from step to step inside the one call, in step mode "s" (the online
  strategies) the membrane carried between calls is in half precision, so the two modes differ
  by that rounding under autocast (they are equal in fp32). Losses and BN statistics stay in
  fp32 (autocast's rules). "fp16" also uses a `torch.amp.GradScaler` (its small exponent range
  would flush small gradients to zero); bf16 has fp32's exponent range and needs none.
- compile "none": eager. "default": `torch.compile(model)`. "reduce-overhead":
  `torch.compile(model, mode="reduce-overhead")`, which captures CUDA graphs on a GPU; on a CPU
  there are no CUDA graphs and it behaves like "default". Not fullgraph: until every op is
  visible to the compiler, a graph break falls back to eager for that piece.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..nn.neuron import check_module, unwrap_model

__all__ = ["COMPILE_MODES", "PRECISIONS", "autocast", "compile_model", "make_grad_scaler"]

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE_MODES = ("none", "default", "reduce-overhead")


def check_precision(precision: object) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision  # type: ignore[return-value]


def check_compile(mode: object) -> str:
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


def autocast(device: torch.device | str, precision: str = "fp32"):
    """`torch.autocast(device.type, dtype)` for "bf16"/"fp16"; a no-op context for "fp32"."""
    dtype = PRECISIONS[check_precision(precision)]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def make_grad_scaler(device: torch.device | str, precision: str):
    """A `torch.amp.GradScaler` for "fp16" (None otherwise)."""
    if check_precision(precision) != "fp16":
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def _steps(m: nn.Module) -> int | None:
    T = getattr(m, "T", None)
    return T if isinstance(T, int) and not isinstance(T, bool) and T > 0 else None


def compile_model(model: nn.Module, mode: str, *, backend="inductor") -> nn.Module:
    """`model` itself for "none", else `torch.compile(model, mode=..., backend=...)` (not
    fullgraph).

    A spiking model's compiled forward has one graph per time step (each neuron's step counter
    is a Python int the graph is specialised on), per grad mode (random_step's steps before t*
    run without grad), per batch size (a short last batch) and per step mode (evaluation runs
    "m"): for T = 4 more than dynamo's default limit of 8 graphs per function, past which every
    call ran eager again, silently, from the second epoch on. The limit is raised (never
    lowered) to 4 T + 8 for the model's T (a model without one, e.g. a user's container of
    neurons: the largest T of its modules).
    """
    check_module(model, "compile_model")
    if check_compile(mode) == "none":
        return model
    base = unwrap_model(model)
    T = _steps(base)
    if T is None:
        T = max(filter(None, map(_steps, base.modules())), default=None)
    if T is not None:
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 4 * T + 8)
    return torch.compile(model, mode=None if mode == "default" else mode, backend=backend)
