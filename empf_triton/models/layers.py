"""Building blocks shared by the models: step-mode containers, layer factories, the registry.

Step modes follow SpikingJelly: in step mode "s" a module sees one time step `[N, *]` per call, in
step mode "m" all steps at once `[T, N, *]`. Stateless layers (convolutions, BatchNorm, pooling,
the classifier) do not care about time; `SeqToANN` folds T into the batch for them in mode "m".
Stateful neurons (`empf_triton.nn.StatefulNeuron`) handle both modes themselves.

BatchNorm note: in training mode a BatchNorm inside `SeqToANN` normalises with the statistics of
the batch it sees, i.e. one step's N samples in mode "s" and all T*N samples in mode "m" (the
SpikingJelly convention). Both modes give identical results in eval mode (running statistics).
Mem-BN (`EMPFNeuron(mem_bn=True)`) is per step in both modes.

Neurons: every model takes `neuron="empf"` (the EM-PF neuron, default) or `neuron="lif"` (the
LIF baseline, `empf_triton.nn.LIFNeuron`: binary spikes, soft reset, surrogate gradient) through
the same options, see `NeuronFactory` and `check_neuron_options`.

The registry: `MODELS` maps a name to a factory taking keyword arguments `in_shape`,
`num_classes`, `T` and the model options (see `COMMON_OPTIONS`); `register_model(name)` is the
decorator that adds a factory, `build_model` validates names and options and calls it.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..nn.binary import BinaryConv2d, BinaryLinear
from ..nn.neuron import (
    CheckedStepMode,
    EMPFNeuron,
    LIFNeuron,
    StatefulNeuron,
    check_module,
    set_grad_mode,
    set_step_mode,
)

__all__ = [
    "COMMON_OPTIONS",
    "MODELS",
    "SeqToANN",
    "SpikingModel",
    "NEURONS",
    "NeuronFactory",
    "build_model",
    "check_flag",
    "check_neuron_options",
    "check_weight_bits",
    "conv2d",
    "count_parameters",
    "empf_neuron",
    "linear",
    "register_model",
    "set_grad_mode",
    "set_step_mode",
]

#: Options every registered model accepts (besides in_shape, num_classes and T); the models of
#: resnet.py and vgg.py also take `step_mode` and `width`.
COMMON_OPTIONS = (
    "weight_bits",
    "spike_bits",
    "spike_step",
    "parallel",
    "seca",
    "mem_bn",
    "grad_mode",
    "impl",
    "neuron",
    "tau",
    "v_threshold",
    "surrogate",
    "alpha",
    "detach_reset",
)
#: The neuron kinds a model can be built with.
NEURONS = ("empf", "lif")
#: Options that only mean something for one neuron kind, with the default that leaves them off.
#: A model built with the other kind accepts the default (so a caller may always pass them, as
#: the trainer does) and rejects any other value (it would silently do nothing).
EMPF_ONLY_DEFAULTS: dict[str, object] = {
    "spike_bits": None,
    "spike_step": 0.25,
    "parallel": False,
    "mem_bn": False,
}
LIF_ONLY_DEFAULTS: dict[str, object] = {
    "tau": 2.0,
    "v_threshold": 1.0,
    "surrogate": "sigmoid",
    "alpha": None,
    "detach_reset": False,
}
#: weight_bits values: 1 (binary), 1.5 (ternary), 32 (full precision).
WEIGHT_BITS = (1, 1.5, 32)


class SeqToANN(CheckedStepMode, nn.Sequential):
    """Stateless layers applied to one step `[N, *]` (mode "s") or to all steps `[T, N, *]`
    (mode "m", T folded into the batch: `[T*N, *]` through the layers, then split again).

    Args:
        *modules: stateless modules run in order (as `nn.Sequential`).
        step_mode: "s" or "m"; `set_step_mode(model, mode)` switches it.
    """

    def __init__(self, *modules: nn.Module, step_mode: str = "s") -> None:
        super().__init__(*modules)
        self.step_mode = step_mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.step_mode == "s":
            return super().forward(x)
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SeqToANN in step_mode='m' needs [T, N, *], got {shape}")
        T, N = x.shape[:2]
        y = super().forward(x.flatten(0, 1))
        return y.reshape(T, N, *y.shape[1:])

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode!r}"


def check_weight_bits(weight_bits: object) -> float:
    """1 (binary), 1.5 (ternary) or 32 (full precision)."""
    if isinstance(weight_bits, bool) or not isinstance(weight_bits, (int, float)):
        raise TypeError(f"weight_bits must be 1, 1.5 or 32, got {type(weight_bits).__name__}")
    if weight_bits not in WEIGHT_BITS:
        raise ValueError(f"weight_bits must be 1 (binary), 1.5 (ternary) or 32, got {weight_bits}")
    return weight_bits


def conv2d(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    padding: int = 0,
    *,
    weight_bits: float = 1,
    impl: str = "auto",
) -> nn.Module:
    """A bias-free convolution: `BinaryConv2d` for weight_bits 1 / 1.5, `nn.Conv2d` for 32."""
    if check_weight_bits(weight_bits) == 32:
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False)
    return BinaryConv2d(
        in_channels, out_channels, kernel_size, stride, padding, weight_bits=weight_bits, impl=impl
    )


def linear(
    in_features: int,
    out_features: int,
    bias: bool = True,
    *,
    weight_bits: float = 1,
    impl: str = "auto",
) -> nn.Module:
    """`BinaryLinear` for weight_bits 1 / 1.5, `nn.Linear` for 32."""
    if check_weight_bits(weight_bits) == 32:
        return nn.Linear(in_features, out_features, bias=bias)
    return BinaryLinear(in_features, out_features, bias, weight_bits=weight_bits, impl=impl)


def empf_neuron(
    T: int,
    channels: int | None = None,
    *,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    parallel: bool = False,
    mem_bn: bool = False,
    grad_mode: str = "online",
    impl: str = "auto",
    step_mode: str = "s",
) -> EMPFNeuron:
    """An `EMPFNeuron`; `channels` (dim 1 of its per-step input) is needed with mem_bn."""
    return EMPFNeuron(
        T,
        spike_bits=spike_bits,
        spike_step=spike_step,
        parallel=parallel,
        step_mode=step_mode,
        grad_mode=grad_mode,
        impl=impl,
        mem_bn=mem_bn,
        channels=channels,
    )


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _same(a: object, b: object) -> bool:
    # `True == 1` and `0.25 == 0.25` but `None != 0`; a bool option must be the bool itself.
    if isinstance(b, bool) or b is None:
        return a is b
    return type(a) is not bool and a == b


def check_neuron_options(options: dict) -> str:
    """Check how the neuron options of a model go together; returns the neuron kind.

    `options` holds (some of) a model's keyword options. The rules:

    - `neuron` is "empf" (default) or "lif".
    - With neuron="lif", the EM-PF-only options keep their defaults: `spike_bits=None` (LIF
      spikes are binary by definition, there is nothing to quantise), `spike_step=0.25` (only
      used with spike_bits), `parallel=False` (the parallel neuron is an EM-PF member; a LIF
      without membrane is a plain threshold unit) and `mem_bn=False` (Mem-BN normalises the
      EM-PF membrane between charge and fire and folds into the learnable per-step decay; the
      LIF kernels charge and fire in one fused step with a fixed decay).
    - With neuron="empf", the LIF-only options (`tau`, `v_threshold`, `surrogate`, `alpha`,
      `detach_reset`) keep their defaults: the EM-PF neuron learns its decay and threshold and
      needs no surrogate.

    Passing an option at its default value is always allowed, so a caller (such as the trainer)
    may pass every option. The values themselves (tau > 1, a known surrogate, ...) are checked
    when the neurons are made.

    Raises:
        ValueError: an unknown neuron kind, or an option that has no effect on that kind.
    """
    kind = options.get("neuron", "empf")
    if kind not in NEURONS:
        raise ValueError(f"neuron must be 'empf' or 'lif', got {kind!r}")
    other = EMPF_ONLY_DEFAULTS if kind == "lif" else LIF_ONLY_DEFAULTS
    bad = {k: options[k] for k in other if k in options and not _same(options[k], other[k])}
    if bad:
        given = ", ".join(f"{k}={v!r}" for k, v in bad.items())
        if kind == "lif":
            raise ValueError(
                f"neuron='lif' does not take {given}: k-bit spikes, parallel neurons and Mem-BN "
                "are EM-PF options (LIF spikes are binary, its decay is fixed by tau); use "
                "neuron='empf' or leave them at their defaults"
            )
        verb = "applies" if len(bad) == 1 else "apply"
        raise ValueError(
            f"{given} only {verb} to neuron='lif' (the EM-PF neuron learns its decay and "
            "threshold and needs no surrogate); pass neuron='lif' or leave them at their defaults"
        )
    return kind


class NeuronFactory:
    """Makes the spiking neurons of one model from the model's options (validated here, once).

    `factory(channels, parallel=False)` returns an `EMPFNeuron` (neuron="empf"; a parallel neuron
    only if the call asks for one and the model's `parallel` option is on) or a `LIFNeuron`
    (neuron="lif"; `channels` and `parallel` are ignored, LIF has neither Mem-BN nor a parallel
    form). The model's `grad_mode` reaches both kinds (LIFNeuron's own default is "bptt"; a
    model's is "online"). See `check_neuron_options` for which options go with which kind.
    """

    def __init__(
        self,
        T: int,
        *,
        spike_bits: int | None = None,
        spike_step: float = 0.25,
        parallel: bool = False,
        mem_bn: bool = False,
        grad_mode: str = "online",
        impl: str = "auto",
        neuron: str = "empf",
        tau: float = 2.0,
        v_threshold: float = 1.0,
        surrogate: str = "sigmoid",
        alpha: float | None = None,
        detach_reset: bool = False,
    ) -> None:
        self.parallel = check_flag("parallel", parallel)
        check_flag("mem_bn", mem_bn)
        check_flag("detach_reset", detach_reset)
        self.kind = check_neuron_options(
            {
                "neuron": neuron,
                "spike_bits": spike_bits,
                "spike_step": spike_step,
                "parallel": parallel,
                "mem_bn": mem_bn,
                "tau": tau,
                "v_threshold": v_threshold,
                "surrogate": surrogate,
                "alpha": alpha,
                "detach_reset": detach_reset,
            }
        )
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be an int >= 1, got {T!r}")
        self.T = T
        if self.kind == "empf":
            self.kw = {
                "spike_bits": spike_bits,
                "spike_step": spike_step,
                "mem_bn": mem_bn,
                "grad_mode": grad_mode,
                "impl": impl,
            }
        else:
            if isinstance(v_threshold, bool):
                raise TypeError("v_threshold must be a float, got bool")
            self.kw = {
                "tau": tau,
                "v_threshold": v_threshold,
                "surrogate": surrogate,
                "alpha": alpha,
                "detach_reset": detach_reset,
                "grad_mode": grad_mode,
                "impl": impl,
            }
        self(1)  # validates every neuron option (T, spike_bits, tau, surrogate, ...) now

    def __call__(self, channels: int, parallel: bool = False) -> StatefulNeuron:
        if self.kind == "lif":
            return LIFNeuron(**self.kw)
        return empf_neuron(self.T, channels, parallel=parallel and self.parallel, **self.kw)


_AUTOCAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _first_parameter(module: nn.Module) -> torch.Tensor | None:
    """`next(module.parameters(), None)` without its generators (a few µs a call on a
    ResNet): the model checks its input against it at every forward."""
    for p in module._parameters.values():
        if p is not None:
            return p
    for child in module._modules.values():
        if child is not None:
            p = _first_parameter(child)
            if p is not None:
                return p
    return None


class SpikingModel(CheckedStepMode, nn.Module):
    """Base of the models: holds `T`, `num_classes`, `in_shape` and `step_mode`, checks inputs.

    Subclasses implement `forward_features(x)` (x one step `[N, *in_shape]` or all steps
    `[T, N, *in_shape]`, as `step_mode` says) returning the logits.
    """

    def __init__(
        self, T: int, num_classes: int, in_shape: Sequence[int], step_mode: str = "s"
    ) -> None:
        super().__init__()
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be an int >= 1, got {T!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if not isinstance(in_shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in in_shape
        ):
            raise ValueError(f"in_shape must be a tuple of positive ints, got {in_shape!r}")
        self.T = T
        self.num_classes = num_classes
        self.in_shape = tuple(int(d) for d in in_shape)
        self.step_mode = step_mode

    def check_input(self, x: object) -> torch.Tensor:
        """x must be `[N, *in_shape]` in mode "s" and `[T, N, *in_shape]` in mode "m"."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"model input must be a torch.Tensor, got {type(x).__name__}")
        if self.step_mode == "s":
            ok = x.dim() == len(self.in_shape) + 1 and tuple(x.shape[1:]) == self.in_shape
            want = f"[N, {', '.join(map(str, self.in_shape))}]"
        else:
            ok = (
                x.dim() == len(self.in_shape) + 2
                and x.shape[0] == self.T
                and tuple(x.shape[2:]) == self.in_shape
            )
            want = f"[T={self.T}, N, {', '.join(map(str, self.in_shape))}]"
        if not ok:
            raise ValueError(
                f"{type(self).__name__} in step_mode={self.step_mode!r} needs input {want}, "
                f"got {tuple(x.shape)}"
            )
        p = _first_parameter(self)
        if p is not None:
            # here, not as torch's "expected scalar type Double but found Float" from the first
            # layer (under autocast the layers cast an fp32, fp16 or bf16 input)
            if x.dtype != p.dtype and not (
                x.dtype in _AUTOCAST_DTYPES and torch.is_autocast_enabled(x.device.type)
            ):
                raise TypeError(
                    f"{type(self).__name__} input has dtype {x.dtype} but the model's parameters "
                    f"are {p.dtype}: convert the input (x.to({p.dtype})), or the model"
                )
            if x.device != p.device:
                raise ValueError(
                    f"{type(self).__name__} input is on {x.device} but the model is on {p.device}"
                )
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.check_input(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (
            f"T={self.T}, num_classes={self.num_classes}, in_shape={self.in_shape}, "
            f"step_mode={self.step_mode!r}"
        )


# ---------------------------------------------------------------------------------- the registry

#: name -> factory(*, in_shape, num_classes, T, **options) -> nn.Module
MODELS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding a model factory to `MODELS` under `name` (names are unique)."""

    def deco(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in MODELS and MODELS[name] is not fn:
            raise ValueError(f"model name {name!r} is already registered")
        MODELS[name] = fn
        return fn

    return deco


def build_model(
    name: str, *, in_shape: Sequence[int], num_classes: int, T: int, **options
) -> nn.Module:
    """Build the registered model `name` (see `MODELS`).

    Raises:
        ValueError: unknown name, an option the model does not take (the message lists the
            accepted ones), or neuron options that do not go together (`check_neuron_options`:
            e.g. mem_bn with neuron="lif", or tau with neuron="empf"); the factory itself
            rejects bad option values.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    check_neuron_options(options)
    fn = MODELS[name]
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        accepted = [k for k in params if k not in ("in_shape", "num_classes", "T")]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise ValueError(
                f"model {name!r} does not take option(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {', '.join(accepted)}"
            )
    if not isinstance(in_shape, (tuple, list, torch.Size)):
        raise ValueError(f"in_shape must be a tuple of positive ints, got {in_shape!r}")
    try:
        return fn(in_shape=tuple(in_shape), num_classes=num_classes, T=T, **options)
    except TypeError as e:
        # A factory taking **options passes them on; an unknown one surfaces as a TypeError.
        if "unexpected keyword argument" in str(e):
            raise ValueError(f"model {name!r}: {e}") from e
        raise


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter elements."""
    check_module(model, "count_parameters")
    return sum(math.prod(p.shape) for p in model.parameters() if p.requires_grad)
