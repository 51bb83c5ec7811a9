"""Implementation choice and input validation shared by every op.

`impl="auto"` runs Triton when the tensors are on CUDA and triton imports, otherwise the eager
reference. An explicit `impl="triton"` never falls back: it raises `TritonUnavailableError` (a
`ValueError`) when the kernels cannot run, e.g. CPU tensors without `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import os
import struct
from types import ModuleType

import torch

from ..reference._transforms import transform_active

IMPLS = ("auto", "triton", "reference")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class TritonUnavailableError(ValueError):
    """`impl="triton"` was asked for where the Triton kernels cannot run."""


_TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether triton is installed, looked up once at import. A plain global, not a cached
    function: dynamo traces into `functools.cache` wrappers and cannot trace `find_spec`, so on a
    GPU every `impl="auto"` call was a graph break (38 in ResNet-18 under reduce-overhead)."""
    return _TRITON_AVAILABLE


_KERNELS: dict[str, ModuleType] = {}


def load_kernels(name: str) -> ModuleType:
    """Import `empf_triton.kernels.<name>` on first use (this is what imports triton); later
    calls are one dict lookup."""
    mod = _KERNELS.get(name)
    if mod is None:
        mod = _KERNELS[name] = importlib.import_module(f"empf_triton.kernels.{name}")
    return mod


def _interpreter_flag() -> bool:
    """Whether TRITON_INTERPRET=1 is asked for (as the kernels read it at their import)."""
    common = importlib.sys.modules.get("empf_triton.kernels._common")
    if common is not None:  # triton already decided at import time; that decision holds
        return common.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_on() -> bool:
    """Whether kernels run in Triton's interpreter here: asked for, and working (it is not when
    triton was imported before TRITON_INTERPRET=1 was set; tried once, never while
    torch.compile traces: the probe is a launch). `resolve_impl`, its caller, refuses 'triton'
    first under a torch.func transform, where the probe would fail on wrapped tensors."""
    if torch.compiler.is_compiling():
        return _interpreter_flag()
    return _interpreter_flag() and _interpreter_works()


@functools.cache
def _interpreter_works() -> bool:
    from ..kernels import _common as kernels_common

    return kernels_common.interpreter_works()


def resolve_impl(impl: str, *tensors: torch.Tensor | None) -> str:
    """Return "triton" or "reference" for these tensors, or raise if `impl` cannot be honoured."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if transform_active():  # the reference is plain torch: it runs under the transforms
        if impl == "triton":
            raise TritonUnavailableError(FUNC_TRANSFORMS)
        return "reference"
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if impl == "auto":
        return "triton" if on_cuda and triton_available() else "reference"
    if impl == "triton":
        if not triton_available():
            raise TritonUnavailableError("impl='triton' needs the triton package, which is missing")
        # the op's main input decides (another tensor on another device is the op's own
        # device-mismatch error)
        first = next((t for t in tensors if t is not None), None)
        if not on_cuda and first is not None and first.device.type != "cpu":
            dev = first.device
            raise TritonUnavailableError(
                f"impl='triton' runs on CUDA tensors (or CPU tensors in Triton's interpreter), "
                f"not on {dev.type} tensors; use impl='reference' or impl='auto'"
            )
        if not on_cuda and not _interpreter_on():
            if not _interpreter_flag():
                raise TritonUnavailableError(
                    "impl='triton' on CPU tensors needs Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before triton is imported, or move the tensors to CUDA, "
                    "or use impl='auto'"
                )
            raise TritonUnavailableError(
                "impl='triton' on CPU tensors: TRITON_INTERPRET=1 is set, but triton was imported "
                "before it was (by this program or a library it uses, e.g. torch.compile), so "
                "Triton's interpreter is off; set it before anything imports triton, or use "
                "impl='auto'"
            )
    return impl


def check_dense(name: str, x: torch.Tensor) -> None:
    """A strided (dense) tensor: sparse, mkldnn and other layouts are a TypeError naming it."""
    if x.layout is not torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")


def check_tensor(name: str, x: object, impl: str, *, min_dim: int = 0) -> torch.Tensor:
    """A dense floating tensor of a dtype `impl` supports, with at least `min_dim` dimensions."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
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
    """A single-step input: a dense tensor with at least one dimension (dtype checked by the
    op)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    check_dense(name, x)
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least 1 dimension, got shape {tuple(x.shape)}")


def check_like(name: str, x: torch.Tensor | None, ref_name: str, ref: torch.Tensor, shape) -> None:
    """`x` (optional) must match `ref`'s device and dtype and have exactly `shape`."""
    if x is None:
        return
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    check_dense(name, x)
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    if x.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but {ref_name} has dtype {ref.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")


_CONSTANTS: dict[tuple, torch.Tensor] = {}


_FP32_MAX = 3.4028234663852886e38


def contiguous(*tensors: torch.Tensor | None) -> tuple:
    """Each tensor contiguous (None stays None): for the custom ops' implementations, whose
    kernels read their tensors as contiguous (free for a tensor that already is)."""
    return tuple(t.contiguous() if t is not None else None for t in tensors)


def to_float(value: int | float, name: str) -> float:
    """`float(value)` for a checked int or float; an int beyond float range (10**400) is the
    ValueError of a non-finite value, not Python's OverflowError."""
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"{name} must be finite, got an int beyond float range") from None


def per_step(
    name: str,
    value: float | torch.Tensor,
    T: int,
    like: torch.Tensor,
    *,
    is_decay: bool = False,
    keep_float: bool = False,
) -> torch.Tensor | float:
    """A per-step parameter (float, 0-d or [T] tensor) as a [T] tensor, differentiable.

    Floats are checked (decay in [0, 1], threshold finite) and become fp32 (fp64 for an fp64
    current) [T] tensors, or with `keep_float` stay floats (for kernels that take them as
    scalars); tensor values are not inspected, so no device sync happens on the hot path.
    Tensors keep their own floating dtype (kernels compute in fp32) but must be on `like`'s
    device.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        check_dense(name, value)
    else:
        value = to_float(value, name)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if is_decay and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if like.dtype != torch.float64 and abs(value) > _FP32_MAX:
            # the kernels take it as an fp32 scalar, the reference as an fp32 tensor
            raise ValueError(f"{name} must fit in fp32 (|value| <= 3.4e38), got {value}")
        if keep_float:
            return value
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if torch.compiler.is_compiling():
            return torch.full((T,), value, dtype=dtype, device=like.device)
        key = (value, T, dtype, like.device)
        const = _CONSTANTS.get(key)
        if const is None:
            if len(_CONSTANTS) >= 256:
                _CONSTANTS.clear()
            # Made once per (value, T, dtype, device): a torch.full per call costs host time.
            # Never handed to the caller, never written, never requires grad.
            # Made outside inference mode: an inference tensor could not be saved for a later
            # backward that reuses it.
            with torch.inference_mode(False):
                const = torch.full((T,), value, dtype=dtype, device=like.device)
            _CONSTANTS[key] = const
        return const
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


def check_spike_step(spike_step: object, name: str = "spike_step") -> float:
    """The quantiser step Δ: a real number that is finite and > 0 once rounded to fp32 (where the
    kernels use it). Returns it as a float.

    Raises:
        TypeError: not an int or float (bools are rejected).
        ValueError: NaN, infinite, <= 0, or out of fp32 range (1e300 is inf in fp32, 1e-50 is 0;
            an int beyond float range, e.g. 10**400, too).
    """
    if isinstance(spike_step, bool) or not isinstance(spike_step, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(spike_step).__name__}")
    try:
        value = float(spike_step)
        as_fp32 = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # an int beyond float range, or a float beyond fp32's
        value = as_fp32 = math.inf
    if not (math.isfinite(value) and math.isfinite(as_fp32) and as_fp32 > 0):
        raise ValueError(f"{name} must be finite and > 0 in fp32, got {spike_step!r}")
    return value


_QUANT_OK: set[tuple] = set()


def check_spike_bits(spike_bits: int | None, spike_step: float, *, allowed=None) -> None:
    """`spike_bits` None or an int in 1..8 (or in `allowed`); `spike_step` as check_spike_step.

    A valid (int or None, float or int) pair is remembered, so repeated calls cost one set lookup.
    """
    cacheable = (
        allowed is None
        and (spike_bits is None or spike_bits.__class__ is int)
        and spike_step.__class__ in (float, int)
    )
    if cacheable and (spike_bits, spike_step) in _QUANT_OK:
        return
    if spike_bits is not None:
        if isinstance(spike_bits, bool) or not isinstance(spike_bits, int):
            raise TypeError(f"spike_bits must be an int or None, got {type(spike_bits).__name__}")
        valid = allowed if allowed is not None else range(1, 9)
        if spike_bits not in valid:
            raise ValueError(f"spike_bits must be in {tuple(valid)}, got {spike_bits}")
    check_spike_step(spike_step)
    if cacheable and len(_QUANT_OK) < 1024:
        _QUANT_OK.add((spike_bits, spike_step))


def check_bool(name: str, value: object) -> bool:
    """A flag that must be a real bool (not "yes", 1 or None)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_grad_mode(grad_mode: str) -> None:
    if grad_mode not in ("online", "bptt"):
        raise ValueError(f"grad_mode must be 'online' or 'bptt', got {grad_mode!r}")


_NULL_CONTEXT = contextlib.nullcontext()


def device_guard(x: torch.Tensor):
    """Launch on `x`'s GPU (Triton launches on the current device), a no-op on the CPU and when
    `x` is on the current GPU already."""
    if x.is_cuda and x.device.index != torch.cuda.current_device():
        return torch.cuda.device(x.device)
    return _NULL_CONTEXT


def grad_wanted(*tensors: torch.Tensor | float | None) -> bool:
    """Whether autograd will record an op on these inputs (checked outside Function.forward,
    where grad mode is always off); floats and None record nothing."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in tensors
    )


def c_apply(fn_cls):
    """`fn_cls.apply` without the Python wrapper of `torch.autograd.Function.apply` (its
    setup_context and functorch checks and its unwrapping of dead functorch wrappers cost ~3 µs a
    call). Called only while no torch.func transform is active (`transform_active`): under one,
    impl resolves to the reference (or 'triton' is refused), and the Triton entry points raise."""
    return super(torch.autograd.Function, fn_cls).apply


def refuse_double_backward(op: str) -> None:
    """Called first in a Triton Function's backward: with create_graph=True (grad mode on in
    the backward) its kernel-computed gradient would carry no graph, so a second derivative
    through it would be silently missing. Raise instead."""
    if torch.is_grad_enabled():
        raise NotImplementedError(
            f"{op}: second derivatives (backward with create_graph=True) are not supported on "
            "the Triton path, whose gradients come from a kernel; use impl='reference'"
        )


FUNC_TRANSFORMS = (
    "impl='triton' does not run under torch.func transforms (grad, vjp, jacrev, jvp, vmap, ...) "
    "or forward-mode AD (torch.autograd.forward_ad): its kernels and autograd Functions take "
    "plain tensors and have no forward-mode derivative; use impl='reference', or impl='auto', "
    "which runs the reference there"
)


def neuron_param(
    name: str,
    value: object,
    T: int,
    like: torch.Tensor,
    *,
    channel_dim: int,
    single_step: bool = False,
    is_decay: bool = False,
) -> float | torch.Tensor:
    """Validate a neuron parameter (decay or threshold) and bring it to a form the kernels read.

    Forms accepted (C = like.shape[channel_dim], the channel dimension of the input):
        float: a constant, returned as a float (a kernel scalar: no tensor is made).
        0-d tensor: one value for every step, returned as a [T] view (stride 0).
        multi-step ops (`single_step=False`): [T] per step; [T, C] per step and channel;
            [1, C] per channel, returned as a [T, C] view (stride 0 over time).
        single-step ops (`single_step=True`, T = 1): [C] per channel, returned as a [1, C] view.
    Decay floats must lie in [0, 1]; decay tensors are checked by `check_decay_values`. Tensor
    parameters keep their graph (gradients flow back through the views).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if isinstance(value, torch.Tensor):
        check_dense(name, value)
    else:
        value = to_float(value, name)
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
        if is_decay and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {value}")
        if like.dtype != torch.float64 and abs(value) > _FP32_MAX:
            # the kernels take it as an fp32 scalar (it became ±inf there, and the paths then
            # disagreed); a ±inf tensor is the way to ask for an infinite threshold
            raise ValueError(f"{name} must fit in fp32 (|value| <= 3.4e38), got {value}")
        return value
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor, got dtype {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the current is on {like.device}")
    C = like.shape[channel_dim] if like.dim() > channel_dim else None
    if value.dim() == 0:
        return value.reshape(1).expand(T)
    if single_step:
        if value.dim() == 1 and C is not None and value.shape[0] == C:
            return value.reshape(1, C)
        raise ValueError(
            f"{name} of a single step must be a float, a 0-d tensor or a per-channel [C] tensor "
            f"with C={C} (dim 1 of the input [N, C, *]), got shape {tuple(value.shape)}"
        )
    if value.dim() == 1 and value.shape[0] == T:
        return value
    if value.dim() == 2 and C is not None and value.shape[1] == C and value.shape[0] in (1, T):
        return value.expand(T, C)
    raise ValueError(
        f"{name} must be a float, a 0-d tensor, a [T] tensor with T={T}, or a per-channel "
        f"[T, C] or [1, C] tensor with C={C} (dim 2 of the input [T, N, C, *]), "
        f"got shape {tuple(value.shape)}"
    )


def check_decay_values(decay: object) -> None:
    """Reject a decay tensor with a value outside [0, 1] or NaN (ValueError), where that is free.

    Values are read only on the CPU, where reading them is no device sync: a small tensor (a [T]
    vector) through one `tolist`, a large one through `aminmax`. Tensors on CUDA (or any other
    device) are not inspected, so a public neuron op never makes a host sync and can be captured
    in a CUDA graph; floats are checked where they are converted (`neuron_param`). Skipped while
    torch.compile traces.
    """
    if not isinstance(decay, torch.Tensor) or decay.device.type != "cpu":
        return
    if torch.compiler.is_compiling():
        return
    if decay.numel() <= _TOLIST_MAX:
        values = decay.tolist()
        if decay.dim() > 1:
            values = [v for row in values for v in row]
        elif decay.dim() == 0:
            values = [values]
        if all(0.0 <= v <= 1.0 for v in values):  # False for NaN
            return
        lo, hi = min(values), max(values)
        if any(v != v for v in values):
            lo = hi = math.nan
    else:
        with torch.no_grad():
            lo, hi = torch.aminmax(decay.detach())  # NaN propagates into both
            lo, hi = lo.item(), hi.item()
        if lo >= 0.0 and hi <= 1.0:
            return
    raise ValueError(
        f"decay must lie in [0, 1] (λ, the membrane's leak), got values from {lo} to {hi}"
    )


#: Largest decay tensor whose values are checked through `tolist` (cheaper than a reduction).
_TOLIST_MAX = 256


# ------------------------------------------------------------------------------------- plans


class PlanCache(dict):
    """Plans of the Triton paths by key (the eager autograd Functions, the calls without
    autograd and the custom ops' implementations): a plan is one launcher call with its launch
    arguments worked out once (kernels/_launch.py `plan`), for a module that calls its op again
    and again with the same input and parameter forms. Bounded: past `limit` entries (a long
    run over many shapes) it starts over."""

    def __init__(self, limit: int = 1024):
        super().__init__()
        self.limit = limit

    def add(self, key: tuple, run):
        if len(self) >= self.limit:
            self.clear()
        self[key] = run
        return run

    def of(self, key: tuple, make):
        """The plan of `key`, made by `make()` on first use: for a launch whose only per-call
        tensor is one input, which cannot alias another (else see `planned`)."""
        run = self.get(key)
        return run if run is not None else self.add(key, make())


def planned(cache: PlanCache, key: tuple, inputs: tuple, direct, make):
    """One launcher call of an eager autograd path: the cached plan of `key` (made by `make()`
    on first use) run on `inputs`, the call's tensors (its parameter tensors among them). `direct`
    and `make` are closures over the caller's arguments, so a plan hit builds no argument lists.

    A plan finds the launch slots of its `inputs` by identity (kernels/_launch.py `plan`), so it
    is not made from a call whose inputs hold one tensor twice (a step's current passed as its
    v0, one gradient tensor for spikes and membrane, one tensor as decay and threshold): those
    slots would be ambiguous, and later calls with distinct tensors would read the wrong one.
    Such a call runs `direct()`; a plan made from distinct tensors takes aliased ones
    correctly."""
    run = cache.get(key)
    if run is None:
        if _aliased(inputs):
            return direct()
        run = cache.add(key, make())
    return run(*inputs)


def _aliased(inputs: tuple) -> bool:
    """Whether a tensor appears twice among `inputs` (None skipped)."""
    seen: list[torch.Tensor] = []
    for t in inputs:
        if t is None:
            continue
        if any(t is u for u in seen):
            return True
        seen.append(t)
    return False


def params_key(decay, threshold=None) -> tuple:
    """The parameters' part of a plan key: floats and None as they are, a tensor by its form
    (shape and strides). The plans take each call's parameter tensors as inputs, so every
    tensor form plans: a module's Parameter (trained in place or replaced), a sigmoid computed
    per call, a 0-d tensor expanded over time."""
    return (
        decay if decay is None or type(decay) is float else (decay.shape, decay.stride()),
        threshold
        if threshold is None or type(threshold) is float
        else (threshold.shape, threshold.stride()),
    )
