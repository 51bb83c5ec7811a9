"""Implementation choice and input validation shared by every op.

`impl="auto"` runs Triton when the tensors are on CUDA and triton imports, otherwise the eager
reference. An explicit `impl="triton"` never falls back: it raises `TritonUnavailableError` (a
`ValueError`) when the kernels cannot run, e.g. CPU tensors without `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
import os
from types import ModuleType

import torch

IMPLS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TritonUnavailableError(ValueError):
    """`impl="triton"` was asked for where the Triton kernels cannot run."""


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def load_kernels(name: str) -> ModuleType:
    """Import `empf_triton.kernels.<name>` on first use (this is what imports triton)."""
    return importlib.import_module(f"empf_triton.kernels.{name}")


def _interpreter_on() -> bool:
    common = importlib.sys.modules.get("empf_triton.kernels._common")
    if common is not None:  # triton already decided at import time; that decision holds
        return common.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str, *tensors: torch.Tensor | None) -> str:
    """Return "triton" or "reference" for these tensors, or raise if `impl` cannot be honoured."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if impl == "triton":
        if not triton_available():
            raise TritonUnavailableError("impl='triton' needs the triton package, which is missing")
        if not on_cuda and not _interpreter_on():
            raise TritonUnavailableError(
                "impl='triton' on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before triton is imported, or move the tensors to CUDA, or use impl='auto'"
            )
    return impl


def check_tensor(name: str, x: object, impl: str, *, min_dim: int = 0) -> torch.Tensor:
    """A floating tensor of a dtype `impl` supports, with at least `min_dim` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    allowed = TRITON_DTYPES if impl == "triton" else REFERENCE_DTYPES
    if x.dtype not in allowed:
        names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
        raise TypeError(f"{name} must have dtype in ({names}) for impl={impl!r}, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}"
        )
    return x


def check_sequence(name: str, x: object, impl: str) -> str:
    """Resolve `impl` for a multi-step input and check it is a [T, *] tensor with T >= 1."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    impl = resolve_impl(impl, x)
    check_tensor(name, x, impl, min_dim=2)
    if x.shape[0] == 0:
        raise ValueError(f"{name} must be [T, *] with T >= 1, got shape {tuple(x.shape)}")
    return impl


def check_step_input(name: str, x: object) -> None:
    """A single-step input: a tensor with at least one dimension (dtype checked by the op)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got shape {tuple(x.shape)}")


def check_like(name: str, x: torch.Tensor | None, ref_name: str, ref: torch.Tensor, shape) -> None:
    """`x` (optional) must match `ref`'s device and dtype and have exactly `shape`."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


def per_step(
    name: str, value: float | torch.Tensor, T: int, like: torch.Tensor, *, is_decay: bool = False
) -> torch.Tensor:
    """A per-step parameter (float, 0-d or [T] tensor) as a [T] tensor, differentiable.

    Floats become fp32 (fp64 for an fp64 current) and are checked (decay in (0, 1], threshold
    finite); tensor values are not inspected, so no device sync happens on the hot path. Tensors
    keep their own floating dtype (kernels compute in fp32) but must be on `like`'s device.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if is_decay and not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must lie in (0, 1], got {value}")
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        return torch.full((T,), value, dtype=dtype, device=like.device)
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the current is on {like.device}")
    if value.dim() == 0:
        return value.expand(T)
    if value.shape != (T,):
        raise ValueError(
            f"{name} must be a float, a 0-d tensor or a [T] tensor with T={T}, "
            f"got shape {tuple(value.shape)}"
        )
    return value


def check_spike_bits(spike_bits: int | None, spike_step: float, *, allowed=None) -> None:
    """`spike_bits` None or an int in 1..8 (or in `allowed`), `spike_step` a finite float > 0."""
    if spike_bits is not None:
        if isinstance(spike_bits, bool) or not isinstance(spike_bits, int):
            raise TypeError(f"spike_bits must be an int or None, got {type(spike_bits).__name__}")
        valid = allowed if allowed is not None else range(1, 9)
        if spike_bits not in valid:
            raise ValueError(f"spike_bits must be in {tuple(valid)}, got {spike_bits}")
    if isinstance(spike_step, bool) or not isinstance(spike_step, (int, float)):
        raise TypeError(f"spike_step must be a float, got {type(spike_step).__name__}")
    if not (math.isfinite(spike_step) and spike_step > 0):
        raise ValueError(f"spike_step must be a finite float > 0, got {spike_step}")


def check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in ("online", "bptt"):
        raise ValueError(f"grad_mode must be 'online' or 'bptt', got {grad_mode!r}")


def device_guard(x: torch.Tensor):
    """Launch on `x`'s GPU (Triton launches on the current device), a no-op on the CPU."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def grad_wanted(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on these inputs (checked outside Function.forward,
    where grad mode is always off)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
