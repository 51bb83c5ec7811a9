"""Neuron modules: `EMPFNeuron` (EM-PF, optionally parallel and/or k-bit spikes) and `LIFNeuron`.

SpikingJelly conventions: multi-step inputs are time-first `[T, N, *]`; `step_mode="s"` takes one
step `[N, *]` per call and keeps the membrane between calls; `reset_net(model)` clears it between
samples and `detach_net(model)` cuts its graph.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..ops._common import (
    REFERENCE_DTYPES,
    TRITON_DTYPES,
    check_bool,
    check_dense,
    check_spike_bits,
    per_step,
    resolve_impl,
    to_float,
    transform_active,
)
from ..ops.lif import _check_surrogate, lif_neuron, lif_neuron_step, lif_neuron_triton
from ..ops.neuron import (
    empf_neuron_step,
    empf_neuron_triton,
    parallel_neuron,
    parallel_neuron_triton,
)
from ..reference.lif import lif_neuron_ref
from ..reference.neuron import empf_neuron_ref, parallel_neuron_ref
from .membn import MemBN, check_input_dtype

STEP_MODES = ("s", "m")


def _getter(name: str):
    """Reads `_name` from the instance dict (an AttributeError, as for any attribute, when it
    is not set yet)."""
    key = "_" + name

    def get(self):
        try:
            return self.__dict__[key]
        except KeyError:
            raise AttributeError(f"{type(self).__name__} has no {name} yet") from None

    return get


def _choice(name: str, choices: tuple[str, ...], say: str) -> property:
    """A setting kept as `_name` that must be one of `choices`, checked whenever it is set."""

    def set_(self, value: str) -> None:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{name} must be {say}, got {value!r}")
        self.__dict__["_" + name] = value

    return property(_getter(name), set_)


class CheckedStepMode:
    """Mixin of the modules that run one step or all steps but hold no state (SeqToANN, SECA,
    the models): `step_mode` is checked whenever it is set, as on the neurons (a direct
    `m.step_mode = "S"` ran as "m"). Pickles that held it as a plain attribute still load."""

    step_mode = _choice("step_mode", STEP_MODES, "'s' or 'm'")

    def __setstate__(self, state: dict) -> None:
        if "step_mode" in state:
            state["_step_mode"] = state.pop("step_mode")
        super().__setstate__(state)


def _fixed(name: str) -> property:
    """A setting kept as `_name` that shapes the parameters: fixed at construction."""

    def set_(self, value) -> None:
        raise AttributeError(
            f"{type(self).__name__}.{name} is fixed at construction (the parameters are shaped "
            f"by it); build a new {type(self).__name__}"
        )

    return property(_getter(name), set_)


def _configured(name: str, doc: str | None = None) -> property:
    """A LIF setting kept as `_name`, set through `_configure` (which checks it with the
    others)."""
    return property(
        _getter(name),
        lambda self, value: self._configure(**{name: value}),
        doc=doc,
    )


class StatefulNeuron(nn.Module):
    """Base of neurons that carry a membrane `v` and a step counter `t` between calls."""

    def __init__(self, step_mode: str, grad_mode: str, impl: str) -> None:
        super().__init__()
        self.step_mode = step_mode
        self.grad_mode = grad_mode
        self.impl = impl
        self.v: torch.Tensor | None = None
        self.t = 0
        # (shape, dtype, device, impl setting, step form) of the last validated input, and the
        # impl it resolved to: validation runs on the first call and whenever these change.
        self._checked: tuple | None = None
        self._resolved_impl = "reference"

    # The settings are checked whenever they are set, at construction or later (a model's
    # set_step_mode / set_grad_mode, a user's `m.impl = ...`): the forward reads them unchecked.
    step_mode = _choice("step_mode", STEP_MODES, "'s' or 'm'")
    grad_mode = _choice("grad_mode", ("online", "bptt"), "'online' or 'bptt'")
    impl = _choice("impl", ("auto", "triton", "reference"), "'auto', 'triton' or 'reference'")

    #: Settings kept as `_name` behind a checking property; pickles made before that held them
    #: as plain `name` attributes (`__setstate__` moves them).
    _SETTINGS = ("step_mode", "grad_mode", "impl")

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        v = state.get("v")
        if v is not None and v.grad_fn is not None:
            # bptt keeps the membrane with its graph until reset_net; a copy (deepcopy, pickle)
            # takes its value (a graph cannot be copied, and torch refuses to deepcopy it)
            state["v"] = v.detach()
        return state

    def __setstate__(self, state: dict) -> None:
        for name in self._SETTINGS:
            if name in state:
                state["_" + name] = state.pop(name)
        super().__setstate__(state)

    def _check_input(self, x: object, min_dim: int) -> str:
        """Validate the input once per (shape, dtype, device, impl, step form, torch.func transform
        or not); returns the resolved impl."""
        key = (
            (x.shape, x.dtype, x.device, self.impl, min_dim, transform_active())
            if isinstance(x, torch.Tensor)
            else None
        )
        if key is not None and key == self._checked:
            return self._resolved_impl
        name = type(self).__name__
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} input must be a torch.Tensor, got {type(x).__name__}")
        check_dense(f"{name} input", x)
        if x.dim() < min_dim or (min_dim == 2 and x.shape[0] == 0):
            form = "[N, *]" if min_dim == 1 else "[T, N, *] with T >= 1"
            raise ValueError(
                f"{name} in step_mode={self.step_mode!r} needs an input {form}, "
                f"got shape {tuple(x.shape)}"
            )
        self._check_device(x)  # here: a new device is a new key
        impl = resolve_impl(self.impl, x)
        allowed = TRITON_DTYPES if impl == "triton" else REFERENCE_DTYPES
        if x.dtype not in allowed:
            raise TypeError(f"{name} input has dtype {x.dtype}, not supported by impl={impl!r}")
        if not torch.compiler.is_compiling():
            # Not while tracing: a cache written by the graph would change the guards of the
            # next trace and cost one recompile.
            self._checked, self._resolved_impl = key, impl
        return impl

    def _apply(self, fn, recurse: bool = True):
        self.__dict__["_checked"] = None  # .to() / .half(): the parameters' device may change
        return super()._apply(fn, recurse)

    def _check_device(self, x: torch.Tensor) -> None:
        v = self.__dict__.get("v")
        if v is not None and v.device != x.device:
            raise ValueError(
                f"{type(self).__name__} holds a membrane on {v.device} but got an input on "
                f"{x.device}; call empf_triton.reset_net(model) after moving the model"
            )
        p = next(iter(self._parameters.values()), None)
        if p is not None and p.device != x.device:
            raise ValueError(
                f"{type(self).__name__} input is on {x.device} but its parameters are on "
                f"{p.device}: move one of them"
            )

    def _check_state(self, step_shape: torch.Size) -> None:
        """The carried membrane must fit this step's input (it does not after a batch change)."""
        if self.v is not None and self.v.shape != step_shape:
            n = self.v.shape[0] if self.v.dim() else 1
            raise ValueError(
                f"{type(self).__name__} still holds the membrane of a batch of N={n} "
                f"(shape {tuple(self.v.shape)}) but got a step input of shape "
                f"{tuple(step_shape)}; call empf_triton.reset_net(model) between batches"
            )

    def reset(self) -> None:
        """Forget the membrane and restart at step 0 (call between samples)."""
        self.v = None
        self.t = 0

    def detach(self) -> None:
        """Cut the membrane's graph, keeping its value."""
        if self.v is not None:
            self._store(self.v.detach(), self.t)

    def _store(self, v: torch.Tensor | None, t: int) -> None:
        """Keep the membrane and the step count. Per step, so straight into the instance dict:
        that is where `nn.Module.__setattr__` puts these plain attributes (never a parameter,
        buffer or module), after checks that cost about 1 µs a write. The regular assignment
        while torch.compile traces."""
        if torch.compiler.is_compiling():
            self.v, self.t = v, t
        else:
            d = self.__dict__
            d["v"], d["t"] = v, t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            self._refuse_recompute()
        if self.step_mode == "s":
            return self.single_step_forward(x)
        return self.multi_step_forward(x)

    def _refuse_recompute(self) -> None:
        """A forward inside a backward pass is activation checkpointing's recompute: it would run
        from the membrane and step count of now, not of the original call, and give other
        saved tensors, hence wrong gradients (or a misleading step-count error)."""
        raise RuntimeError(
            f"{type(self).__name__}.forward ran inside a backward pass (activation checkpointing "
            "recomputes the forward there): the neuron's membrane and step count have moved on "
            "since the original call, so the recomputed step would not be the one that ran. "
            "Checkpoint only stateless layers; online training (grad_mode='online', backward "
            "after each step) keeps the memory flat in T instead"
        )

    def _carried_v(self) -> torch.Tensor | None:
        """The membrane entering this step; online mode sees it as a constant."""
        v = self.v
        if v is None or self.grad_mode == "bptt" or not v.requires_grad:
            return v
        return v.detach()

    def _keep_v(self, v: torch.Tensor, t: int) -> None:
        """Keep the membrane after step t - 1 (t: the step count from now). Online mode never
        back-propagates into the kept membrane: its graph is dropped right away (the fused ops
        hand it over without one already)."""
        self._store(v.detach() if self.grad_mode == "online" and v.requires_grad else v, t)

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def multi_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"step_mode={self.step_mode!r}, grad_mode={self.grad_mode!r}, impl={self.impl!r}"


class EMPFNeuron(StatefulNeuron):
    """EM-PF neuron with learnable per-step decay λ_t = sigmoid(a_t), threshold θ_t = sigmoid(b_t).

    Args:
        T: number of time steps (length of a and b; both initialised to 0, so λ = θ = 0.5).
        spike_bits: None for float spikes, or k in 1..8 for k-bit quantised spikes.
        spike_step: the quantiser's step Δ.
        parallel: the stateless member `Q(relu(I[t] - θ_t))` (no decay parameter, no membrane).
        step_mode: "s" (one step `[N, *]` per call, at most T calls between resets) or
            "m" (`[T, N, *]` in one call).
        grad_mode: "online" (membrane detached between steps) or "bptt".
        impl: "auto", "triton" or "reference", passed to the ops.
        mem_bn: apply Mem-BN (`empf_triton.nn.MemBN`, docs/model.md) to the membrane each step.
        channels: C, dim 1 of the per-step input `[N, C, *]`; required with mem_bn (None or an
            int >= 1 without it, where it is only recorded).

    Parameters: `logits`, [2, T]: b (θ's logits) in row 0 and a (λ's logits) in row 1; [1, T]
    (b only) for a parallel neuron. `threshold_logit` and `decay_logit` are views of its rows.
    One tensor rather than two because the fused op takes it whole: one autograd input and one
    gradient accumulation per step. State dicts with the former separate `threshold_logit` and
    `decay_logit` entries still load.

    Flags (parallel, mem_bn) must be real bools. State: in step mode "s" the membrane carries over
    between calls (at most T calls) until `empf_triton.reset_net(model)`; in step mode "m" each
    call is a whole sequence from v = 0, and a second call without `reset_net` raises a
    RuntimeError (as `LIFNeuron`). A new batch size without `reset_net` raises a ValueError that
    says so. Inputs are validated (also against the parameters' device) on the first call,
    whenever their shape, dtype or device change, and after `.to()`; the calls in between go
    straight to the kernels (on Triton, the kernels read the logits a and b themselves, apply the
    sigmoid, and return the logits' gradients).

    With mem_bn the charge cannot stay inside the fused kernel, because BN_t needs the batch
    statistics of m[t] before firing. Each step then runs: `m = λ_t v + I` in torch (v detached
    in online mode), `m' = MemBN_t(m)`, and fire/reset through the ops as a neuron with zero
    incoming membrane, `empf_neuron_step(m', None, threshold=θ_t)` (or `parallel_neuron` for a
    parallel neuron, whose m is I), which gives `s = Q(relu(m' - θ_t))` and `v = min(m', θ_t)`.
    Mode "m" loops over the T steps the same way. `fold_mem_bn()` replaces Mem-BN by its
    eval-mode affine map for deployment: `m' = (k_t λ_t) v + (k_t I + b_t)`.
    """

    def __init__(
        self,
        T: int,
        spike_bits: int | None = None,
        spike_step: float = 0.25,
        parallel: bool = False,
        step_mode: str = "s",
        grad_mode: str = "online",
        impl: str = "auto",
        mem_bn: bool = False,
        channels: int | None = None,
    ) -> None:
        super().__init__(step_mode, grad_mode, impl)
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T must be an int >= 1, got {T!r}")
        check_bool("parallel", parallel)
        check_bool("mem_bn", mem_bn)
        count = isinstance(channels, int) and not isinstance(channels, bool) and channels >= 1
        if mem_bn and not count:
            raise ValueError(
                f"EMPFNeuron(mem_bn=True) needs channels, an int >= 1 (dim 1 of its input "
                f"[N, C, *]), got {channels!r}"
            )
        if not (count or channels is None):
            raise ValueError(f"EMPFNeuron channels must be None or an int >= 1, got {channels!r}")
        # Fail at construction, not at the first forward, on a bad quantiser setting.
        check_spike_bits(spike_bits, spike_step)
        d = self.__dict__  # behind properties (see below)
        d["_T"], d["_parallel"], d["_channels"] = T, parallel, channels
        d["_spike_bits"], d["_spike_step"] = spike_bits, spike_step
        # One learnable tensor: the op takes it whole (one autograd input, one gradient).
        self.logits = nn.Parameter(torch.zeros(1 if parallel else 2, T))
        self.mem_bn: MemBN | None = MemBN(channels, T) if mem_bn else None
        # Set by fold_mem_bn(): the eval-mode Mem-BN as a per-step, per-channel affine map.
        self.register_buffer("mem_scale", None)
        self.register_buffer("mem_bias", None)

    _SETTINGS = StatefulNeuron._SETTINGS + ("T", "parallel", "channels", "spike_bits", "spike_step")

    # T, parallel and channels shape the parameters (logits [2, T] or [1, T], Mem-BN's C): fixed
    # at construction. The quantiser's settings may change (checked as at construction).
    T = _fixed("T")
    parallel = _fixed("parallel")
    channels = _fixed("channels")

    @property
    def spike_bits(self) -> int | None:
        """None (float spikes) or k in 1..8 (k-bit spikes)."""
        return self._spike_bits

    @spike_bits.setter
    def spike_bits(self, bits: int | None) -> None:
        check_spike_bits(bits, self._spike_step)
        self.__dict__["_spike_bits"] = bits

    @property
    def spike_step(self) -> float:
        """The quantiser's step Δ."""
        return self._spike_step

    @spike_step.setter
    def spike_step(self, step: float) -> None:
        check_spike_bits(self._spike_bits, step)
        self.__dict__["_spike_step"] = step

    @property
    def threshold_logit(self) -> torch.Tensor:
        """b, [T]: row 0 of `logits` (a view: write into it in place, or into `logits`)."""
        return self.logits[0]

    @property
    def decay_logit(self) -> torch.Tensor | None:
        """a, [T]: row 1 of `logits` (a view, as `threshold_logit`); None for a parallel
        neuron."""
        return None if self.parallel else self.logits[1]

    @property
    def decay(self) -> torch.Tensor | None:
        """λ = sigmoid(a), [T] (None for a parallel neuron)."""
        return None if self.parallel else torch.sigmoid(self.logits[1])

    @property
    def threshold(self) -> torch.Tensor:
        """θ = sigmoid(b), [T]."""
        return torch.sigmoid(self.logits[0])

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # State dicts saved before the logits were one tensor hold `threshold_logit` [T] and
        # (not parallel) `decay_logit` [T]: stacked into `logits` here, so they still load.
        th, dec = prefix + "threshold_logit", prefix + "decay_logit"
        if prefix + "logits" not in state_dict and th in state_dict:
            rows = [state_dict.pop(th)]
            if dec in state_dict:
                rows.append(state_dict.pop(dec))
            if len(rows) == self.logits.shape[0] and all(r.shape == rows[0].shape for r in rows):
                state_dict[prefix + "logits"] = torch.stack(rows)
            else:  # restored as they were: the size-mismatch error names them
                state_dict[th] = rows[0]
                if len(rows) > 1:
                    state_dict[dec] = rows[1]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def has_mem_bn(self) -> bool:
        """Whether the membrane is normalised (by Mem-BN, or by its folded affine map)."""
        return self.mem_bn is not None or self.mem_scale is not None

    @torch.no_grad()
    def fold_mem_bn(self) -> EMPFNeuron:
        """Replace Mem-BN by the per-channel affine map it applies in eval mode (deployment).

        Stores `mem_scale` k and `mem_bias` b (`[T, C]` buffers, from `MemBN.fold()`) and drops
        the MemBN module; the neuron then charges `m' = (k_t λ_t) v + (k_t I + b_t)`, which equals
        the unfolded neuron in eval mode. Idempotent; a no-op without mem_bn. Returns self.
        """
        if self.mem_bn is None:
            return self
        k, b = self.mem_bn.fold()
        self.mem_bn = None
        self.mem_scale, self.mem_bias = k, b
        return self

    def _mem_bn_step(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """One step with the membrane normalised between charge and fire (see the class doc)."""
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != self.channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"EMPFNeuron(mem_bn=True, channels={self.channels}) needs a per-step input "
                f"[N, {self.channels}, *], got {shape}"
            )
        check_input_dtype(
            "EMPFNeuron(mem_bn=True)", x.dtype, self.logits.dtype, self.mem_bn is not None
        )
        self._check_device(x)
        th = torch.sigmoid(self.threshold_logit[t])
        q = {"spike_bits": self.spike_bits, "spike_step": self.spike_step, "impl": self.impl}
        if not self.parallel:
            self._check_state(x.shape)
        v = None if self.parallel else self._carried_v()
        if v is not None and v.dtype != x.dtype:  # the model changed dtype mid-sample: continue
            v = v.to(x.dtype)  # in the input's dtype, as without mem_bn
        # λ_t only where a membrane comes in: an unused sigmoid would leave a graph no backward
        # frees (a leak under saved-tensor hooks that keep the tensor)
        decay = None if v is None else torch.sigmoid(self.decay_logit[t])
        if self.mem_bn is not None:
            m = x if v is None else decay * v + x
            m = self.mem_bn(m, t)
        else:
            view = (1, -1) + (1,) * (x.dim() - 2)
            k = self.mem_scale[t].view(view).to(x.dtype)
            b = self.mem_bias[t].view(view).to(x.dtype)
            m = k * x + b  # I' = k I + b
            if v is not None:
                m = m + (k * decay.to(x.dtype)) * v  # λ' = k λ, per channel
        if self.parallel:
            return parallel_neuron(m.unsqueeze(0), threshold=th, **q)[0]
        # v = None: the fused step sees no incoming membrane, so its decay is unused.
        spike, v_new = empf_neuron_step(m, None, decay=1.0, threshold=th, **q)
        self._keep_v(v_new, self.t)
        return spike

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.t
        if t >= self.T:
            raise RuntimeError(
                f"EMPFNeuron(T={self.T}) was called for step {t + 1} since its last reset; "
                "call empf_triton.reset_net(model) between samples"
            )
        if self.has_mem_bn:
            spike = self._mem_bn_step(x, t)
            self.t = t + 1
            return spike
        impl = self._check_input(x, 1)
        bits, step = self.spike_bits, self.spike_step
        # Hot path: no validation, no sigmoid/indexing launches. On Triton the kernel reads the
        # logits at row t, applies the sigmoid and returns the logits' gradients itself, and the
        # step goes in and out in its own shape (no [1, *] views in the autograd graph).
        if self.parallel:
            if impl == "triton":
                spike = parallel_neuron_triton(
                    x, self.logits, bits, step, t0=t, logits=True, step=True, joint=True
                )
            else:
                th = torch.sigmoid(self.logits[0, t : t + 1])
                spike = parallel_neuron_ref(x.unsqueeze(0), th, bits, step)[0]
        else:
            if self.v is not None and self.v.shape != x.shape:
                self._check_state(x.shape)
            v = self._carried_v()
            if impl == "triton":
                # online: v comes back without history (state=True): _keep_v has nothing to cut
                spike, v = empf_neuron_triton(
                    x, v, self.logits, None, bits, step, True,
                    t0=t, logits=True, step=True, joint=True, state=self.grad_mode == "online",
                )  # fmt: skip
            else:
                decay = torch.sigmoid(self.logits[1, t : t + 1])
                th = torch.sigmoid(self.logits[0, t : t + 1])
                spike, v = empf_neuron_ref(x.unsqueeze(0), v, decay, th, bits, step, "bptt")
                spike = spike[0]
            self._keep_v(v, t + 1)
            return spike
        self._store(self.v, t + 1)
        return spike

    def multi_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[0] != self.T:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"EMPFNeuron(T={self.T}) in step_mode='m' needs [T, N, *], got {shape}"
            )
        if self.t != 0:
            raise RuntimeError(
                "EMPFNeuron in step_mode='m' runs all T steps per call; "
                "call empf_triton.reset_net(model) before the next sample"
            )
        if self.has_mem_bn:
            spikes = torch.stack([self._mem_bn_step(x[t], t) for t in range(self.T)])
            self.t = self.T
            return spikes
        impl = self._check_input(x, 2)
        bits, step = self.spike_bits, self.spike_step
        if self.parallel:
            if impl == "triton":
                spikes = parallel_neuron_triton(x, self.logits, bits, step, logits=True, joint=True)
            else:
                spikes = parallel_neuron_ref(x, self.threshold, bits, step)
        else:
            bptt = self.grad_mode == "bptt"
            if impl == "triton":
                spikes, v = empf_neuron_triton(
                    x, None, self.logits, None, bits, step, bptt, logits=True, joint=True,
                    state=not bptt,
                )  # fmt: skip
            else:
                spikes, v = empf_neuron_ref(
                    x, None, self.decay, self.threshold, bits, step, self.grad_mode
                )
            self._keep_v(v, self.T)
            return spikes
        self.t = self.T
        return spikes

    def extra_repr(self) -> str:
        return (
            f"T={self.T}, spike_bits={self.spike_bits}, spike_step={self.spike_step}, "
            f"parallel={self.parallel}, mem_bn={self.has_mem_bn}, " + super().extra_repr()
        )


class LIFNeuron(StatefulNeuron):
    """LIF baseline with binary spikes and soft reset, equal to SpikingJelly's
    `LIFNode(tau, decay_input=False, v_reset=None)` (decay λ = 1 - 1/tau).

    Args:
        tau: membrane time constant, > 1.
        v_threshold: firing threshold θ.
        surrogate: "sigmoid" (α=4), "atan" (α=2) or "triangle" (γ=1).
        alpha: the surrogate's sharpness (γ for the triangle); None takes the default.
        detach_reset: detach the spike in the reset (a bool).
        step_mode, grad_mode, impl: as in `EMPFNeuron` (grad_mode defaults to "bptt" here).

    State, as `EMPFNeuron`: in step mode "s" the membrane carries over between calls until
    `reset_net`; in step mode "m" each call is a whole sequence starting from v = 0, and a second
    call without `reset_net` raises a RuntimeError (it never silently continues from the old
    membrane). A new batch size without `reset_net` raises a ValueError that says so.
    """

    def __init__(
        self,
        tau: float = 2.0,
        v_threshold: float = 1.0,
        surrogate: str = "sigmoid",
        alpha: float | None = None,
        detach_reset: bool = False,
        step_mode: str = "s",
        grad_mode: str = "bptt",
        impl: str = "auto",
    ) -> None:
        super().__init__(step_mode, grad_mode, impl)
        self._configure(tau=tau, v_threshold=v_threshold, surrogate=surrogate, alpha=alpha)
        self.detach_reset = detach_reset

    _SETTINGS = StatefulNeuron._SETTINGS + ("tau", "v_threshold", "surrogate", "detach_reset")

    def __setstate__(self, state: dict) -> None:
        if "alpha" in state:  # a pickle from before the settings were properties
            state["_alpha_arg"] = state.pop("alpha")
        super().__setstate__(state)

    def _configure(self, **change) -> None:
        """Check the neuron's settings with `change` applied, as the ops would check them, and
        keep them (all or none). Every setting is checked when it is set, at construction or
        later (`m.tau = 5.0`), so the forward reads them unchecked on both impls."""
        d = self.__dict__
        cfg = {k: d.get("_" + k) for k in ("tau", "v_threshold", "surrogate")}
        cfg["alpha"] = d.get("_alpha_arg")
        cfg.update(change)
        tau, th, surrogate, alpha = cfg["tau"], cfg["v_threshold"], cfg["surrogate"], cfg["alpha"]
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not tau > 1:
            raise ValueError(f"tau must be a float > 1 (decay = 1 - 1/tau in (0, 1)), got {tau!r}")
        if isinstance(th, bool) or not isinstance(th, (int, float)):
            raise ValueError(f"v_threshold must be a finite float, got {th!r}")
        tau, th = to_float(tau, "tau"), to_float(th, "v_threshold")
        if not math.isfinite(th):
            raise ValueError(f"v_threshold must be a finite float, got {th!r}")
        resolved = _check_surrogate(surrogate, alpha)
        # The op's own checks too (fp32 range of the constants; an unknown surrogate must never
        # silently give zero gradients).
        lif_neuron_step(
            torch.zeros(1), decay=1.0 - 1.0 / tau, threshold=th,
            surrogate=surrogate, alpha=alpha, impl="reference",
        )  # fmt: skip
        d["_tau"], d["_v_threshold"], d["_surrogate"] = tau, th, surrogate
        d["_alpha_arg"], d["_alpha"] = alpha, resolved

    tau = _configured("tau", "The membrane time constant (> 1); decay λ = 1 - 1/tau.")
    v_threshold = _configured("v_threshold")
    surrogate = _configured("surrogate")
    alpha = property(
        lambda self: self._alpha_arg,
        lambda self, value: self._configure(alpha=value),
        doc="The surrogate's sharpness as given (None: the surrogate's default).",
    )

    @property
    def detach_reset(self) -> bool:
        return self._detach_reset

    @detach_reset.setter
    def detach_reset(self, flag: bool) -> None:
        self.__dict__["_detach_reset"] = check_bool("detach_reset", flag)

    @property
    def decay(self) -> float:
        return 1.0 - 1.0 / self.tau

    def _kw(self) -> dict:
        return {
            "decay": self.decay,
            "threshold": self.v_threshold,
            "surrogate": self.surrogate,
            "alpha": self.alpha,
            "detach_reset": self.detach_reset,
            "impl": self.impl,
        }

    def _run(self, x: torch.Tensor, v: torch.Tensor | None, bptt: bool, step: bool = False):
        """Eager hot path: input validated once per (shape, dtype, device) by the caller. Triton
        takes decay and threshold as kernel scalars; the reference as constant [T] tensors
        (`per_step`'s, made once per value, T, dtype and device). With `step`, x is one step
        [N, *] and the outputs are [N, *]."""
        if self._resolved_impl == "triton":
            return lif_neuron_triton(
                x, v, self.decay, self.v_threshold, self.surrogate, self._alpha,
                self.detach_reset, bptt, step=step, state=self.grad_mode == "online",
            )  # fmt: skip
        T = 1 if step else x.shape[0]
        d = per_step("decay", self.decay, T, x, is_decay=True)
        th = per_step("threshold", self.v_threshold, T, x)
        args = (v, d, th, self.surrogate, self._alpha, self.detach_reset)
        if step:
            spikes, v = lif_neuron_ref(x.unsqueeze(0), *args, "bptt" if bptt else "online")
            return spikes[0], v
        return lif_neuron_ref(x, *args, "bptt" if bptt else "online")

    def single_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():  # traced: the public op (validation is free there)
            spike, v = lif_neuron_step(x, self._carried_v(), **self._kw())
        else:
            self._check_input(x, 1)
            self._check_state(x.shape)
            v = self._carried_v()
            if v is not None and v.dtype != x.dtype:  # the model changed dtype mid-sample
                v = v.to(x.dtype)  # both impls continue in the input's dtype
            spike, v = self._run(x, v, True, step=True)
        self._keep_v(v, self.t + 1)
        return spike

    def multi_step_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.t != 0:
            raise RuntimeError(
                "LIFNeuron in step_mode='m' runs a whole sequence per call and does not continue "
                "from the previous call's membrane; call empf_triton.reset_net(model) before the "
                "next sample"
            )
        if torch.compiler.is_compiling():
            spikes, v = lif_neuron(x, None, grad_mode=self.grad_mode, **self._kw())
        else:
            self._check_input(x, 2)
            spikes, v = self._run(x, None, self.grad_mode == "bptt")
        self._keep_v(v, self.t + x.shape[0])
        return spikes

    def extra_repr(self) -> str:
        return (
            f"tau={self.tau}, v_threshold={self.v_threshold}, surrogate={self.surrogate!r}, "
            f"alpha={self.alpha}, detach_reset={self.detach_reset}, " + super().extra_repr()
        )


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside torch.compile's wrapper (`_orig_mod`) and DDP's / DataParallel's
    (`module`), in any nesting."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None:
            inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def check_module(model: object, who: str) -> None:
    """TypeError naming `who` when `model` is not an nn.Module (None, a list of modules, ...)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who} needs an nn.Module, got {type(model).__name__}")


def set_step_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set `step_mode` on every module of `model` that has one (neurons, SeqToANN, SECA, the
    model itself), through a torch.compile or DDP wrapper. Returns `model`. Reset the neurons
    (`reset_net`) before switching mid-sample."""
    check_module(model, "set_step_mode")
    if mode not in STEP_MODES:
        raise ValueError(f"step_mode must be 's' or 'm', got {mode!r}")
    for m in unwrap_model(model).modules():
        if isinstance(m, StatefulNeuron) or hasattr(m, "step_mode"):
            m.step_mode = mode
    return model


def set_grad_mode(model: nn.Module, mode: str) -> nn.Module:
    """Set `grad_mode` ("online" or "bptt") on every module of `model` that has one, through a
    torch.compile or DDP wrapper. Returns `model`."""
    check_module(model, "set_grad_mode")
    if mode not in ("online", "bptt"):
        raise ValueError(f"grad_mode must be 'online' or 'bptt', got {mode!r}")
    for m in unwrap_model(model).modules():
        if isinstance(m, StatefulNeuron) or hasattr(m, "grad_mode"):
            m.grad_mode = mode
    return model


def reset_net(model: nn.Module) -> None:
    """Reset every stateful neuron in `model` (membrane cleared, step counter 0)."""
    check_module(model, "reset_net")
    for m in model.modules():
        if isinstance(m, StatefulNeuron):
            m.reset()


def detach_net(model: nn.Module) -> None:
    """Detach the membrane of every stateful neuron in `model` from its graph."""
    check_module(model, "detach_net")
    for m in model.modules():
        if isinstance(m, StatefulNeuron):
            m.detach()
