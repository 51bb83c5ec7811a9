"""The deployed model: a small explicit graph of inference nodes over packed weights.

A deployed network is a list of nodes in execution order. Each node reads named values and writes
one named value; the graph input is `"x"`. Every value is time-first, `[T', N, *]`, where T' is T,
or 1 for a value that does not depend on the step yet (a static image through the stem: it is
computed once, and the first neuron broadcasts it over the T steps, which gives exactly what
repeating the input T times gives). Node kinds (`op`), with their attributes and tensors:

- `unsqueeze` (attr `dim`, negative) and `flatten` (every dim after N): reshapes.
- `conv`: full-precision convolution, attrs `stride`, `padding`, `dilation`, `groups`; tensors
  `weight` [O, I/g, kh, kw] (BN folded in) and `bias` [O].
- `linear`: tensors `weight` [O, I], `bias` [O] (optional).
- `bconv`: packed binary/ternary convolution; attrs `bits` (1 binary, 2 ternary), `shape`
  [O, I/g, kh, kw], `stride`, `padding`, `groups`, `linear` (a BinaryLinear run as a 1x1 conv)
  and `neuron` (null, or the fused neuron's `parallel`, `spike_bits`, `spike_step`); tensors
  `words` int32 [bits, O, ceil(K/32)], `scale` and `bias` [O] or [T, O], and for a fused
  neuron `threshold` [T, O] and `decay` [T, O] (none when parallel).
- `neuron`: attrs `parallel`, `spike_bits`, `spike_step`; tensors `threshold` [T], `decay` [T]
  or [T, C] (none when parallel), `in_scale` and `in_bias` [T, C] (folded Mem-BN, optional).
- `seca` (tensor `weight` [1, 1, k]), `maxpool` (attrs `kernel_size`, `stride`, `padding`),
  `avgpool` (global, to 1 x 1), `add` (two inputs: the residual join).

`bconv` runs `empf_triton.ops.binary_conv.binary_conv_neuron` (the fused packed convolution +
neuron: one Triton kernel on CUDA, its eager reference on the CPU); with `neuron` set and k-bit
spikes its output is uint8 codes (`Codes`), which the next `bconv` reads directly. A
standalone `neuron` runs the fused EM-PF kernel too (`empf_neuron_plan`), with a per-step or,
for a folded Mem-BN that could not fold into a convolution, a per-channel decay and the input
map `k I + b` inside the kernel; `empf_neuron_channels` below is the same neuron in plain torch.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..ops._common import check_bool, check_dense, check_spike_step, transform_active
from ..ops.binary import PackedWeight
from ..ops.binary_conv import binary_conv_neuron_plan
from ..ops.neuron import empf_neuron_plan, parallel_neuron_plan
from ..reference.neuron import reset
from .errors import DeployError, DeployFormatError

__all__ = [
    "OPS",
    "Codes",
    "DeployedModel",
    "empf_neuron_channels",
]

#: op -> (required attributes, required tensors, optional tensors)
OPS: dict[str, tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "unsqueeze": (("dim",), (), ()),
    "flatten": ((), (), ()),
    "conv": (("stride", "padding", "dilation", "groups"), ("weight", "bias"), ()),
    "linear": ((), ("weight",), ("bias",)),
    "bconv": (
        ("bits", "shape", "stride", "padding", "groups", "linear", "neuron"),
        ("words", "scale"),
        ("bias", "threshold", "decay"),
    ),
    "neuron": (
        ("parallel", "spike_bits", "spike_step"),
        ("threshold",),
        ("decay", "in_scale", "in_bias"),
    ),
    "seca": ((), ("weight",), ()),
    "maxpool": (("kernel_size", "stride", "padding"), (), ()),
    "avgpool": ((), (), ()),
    "add": ((), (), ()),
}
#: Ops that keep "spikes" spikes (a max-pool of spikes is spikes; reshapes too).
SPIKE_PRESERVING_OPS = ("maxpool", "flatten", "unsqueeze")


class Codes:
    """k-bit spike codes between layers: `codes` uint8 [T, N, *], value = code * step."""

    __slots__ = ("codes", "step", "bits")

    def __init__(self, codes: torch.Tensor, step: float, bits: int) -> None:
        self.codes, self.step, self.bits = codes, float(step), int(bits)

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def decode(self, dtype: torch.dtype) -> torch.Tensor:
        return self.codes.to(dtype) * self.step


def _float(v: torch.Tensor | Codes, dtype: torch.dtype) -> torch.Tensor:
    return v.decode(dtype) if isinstance(v, Codes) else v


def _quantize(s: torch.Tensor, spike_bits: int | None, spike_step: float, codes: bool):
    """The k-bit quantiser Q (round half to even), as floats or as uint8 codes."""
    if spike_bits is None:
        return s
    c = torch.clamp(torch.round(s / spike_step), 0, 2**spike_bits - 1)
    return c.to(torch.uint8) if codes else c * spike_step


def empf_neuron_channels(
    current: torch.Tensor,
    decay: torch.Tensor | None,
    threshold: torch.Tensor,
    *,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
    codes: bool = False,
) -> torch.Tensor:
    """EM-PF neuron (inference) with per-step, per-channel parameters, in torch.

    `m[t] = λ[t, c] v[t-1] + I[t]`, `s = relu(m - θ[t, c])`, `v = m - s = min(m, θ)`, `out = Q(s)`;
    decay None is the parallel (stateless) neuron `Q(relu(I[t] - θ[t, c]))`.

    Args:
        current: [T, N, C, *] input current.
        decay: [T, C] (or [T], broadcast over channels) or None (parallel neuron).
        threshold: [T, C] or [T].
        spike_bits, spike_step: the k-bit quantiser (None: float spikes).
        codes: return uint8 codes instead of Q(s) (needs spike_bits).

    Returns:
        [T, N, C, *] spikes in the current's dtype (uint8 codes with `codes=True`).
    """
    T = current.shape[0]
    view = (-1,) + (1,) * (current.dim() - 3)

    def per_channel(p: torch.Tensor, t: int) -> torch.Tensor:
        return p[t].view(view) if p.dim() == 2 else p[t]

    out = []
    v = None
    for t in range(T):
        i_t = current[t]
        m = i_t if decay is None else (i_t if v is None else per_channel(decay, t) * v + i_t)
        th = per_channel(threshold, t)
        s = torch.relu(m - th)
        if decay is not None:
            v = reset(m, th)  # min(m, θ): exactly θ after firing
        out.append(_quantize(s, spike_bits, spike_step, codes))
    return torch.stack(out)


# ----------------------------------------------------------------------------------------- nodes


class _Node:
    __slots__ = (
        "index", "op", "inputs", "output", "attrs", "buffers", "free_after", "packed", "plans",
        "plan_state", "fits",
    )  # fmt: skip

    def __init__(self, index: int, spec: Mapping[str, Any]) -> None:
        self.index = index
        self.op = spec["op"]
        self.inputs = list(spec["in"])
        self.output = spec["out"]
        self.attrs = copy.deepcopy(dict(spec.get("attrs", {})))  # nothing shared with the caller
        self.buffers: dict[str, str] = {}
        self.free_after: list[str] = []
        self.packed: PackedWeight | None = None  # bconv: built once per words tensor
        self.plans: dict[tuple, Callable] = {}  # checked calls, by input signature
        self.plan_state: tuple | None = None  # ... for the model's tensors in this state
        self.fits: dict[tuple, bool] = {}  # bconv + add: whether a residual fits, by shapes

    _DERIVED = ("packed", "plans", "plan_state", "fits")

    def __getstate__(self) -> dict[str, Any]:
        """Pickle (torch.save of a DeployedModel) and copy the description, not what a forward
        derived from it (plans hold launch closures): those are made again on first use."""
        return {k: getattr(self, k) for k in self.__slots__ if k not in self._DERIVED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.packed, self.plans, self.plan_state, self.fits = None, {}, None, {}


#: The dtypes a deployed model computes in.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fail(msg: str) -> DeployFormatError:
    return DeployFormatError(f"deployed graph: {msg}")


def _int_list(v: object, n: int, what: str, least: int = 0) -> list[int]:
    if (
        not isinstance(v, list)
        or len(v) != n
        or any(isinstance(a, bool) or not isinstance(a, int) or a < least for a in v)
    ):
        kind = "non-negative ints" if least == 0 else f"ints >= {least}"
        raise _fail(f"{what} must be a list of {n} {kind}, got {v!r}")
    return v


class DeployedModel(nn.Module):
    """An EM-PF network for inference, built from a graph description and its tensors.

    Made by `empf_triton.deploy.fold(model)` or `empf_triton.deploy.load(path)`; needs neither the
    training code nor latent weights. Inference only: no gradients, no training mode.

    Args:
        graph: {"nodes": [{"op", "in", "out", "attrs"}, ...], "output": name} (module doc).
        tensors: {f"{node_index}.{name}": tensor} for every node's tensors.
        info: {"T": int, "in_shape": [...], "num_classes": int} and any other plain metadata
            (kept as `self.info`).
        impl: "auto" | "triton" | "reference", passed to the ops (the fused binary conv and the
            neurons); "auto" runs Triton on CUDA and the eager reference on the CPU.

    Raises:
        DeployFormatError: the graph or its tensors are inconsistent (names the node).
    """

    def __init__(
        self,
        graph: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        info: Mapping,
        *,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        if impl not in ("auto", "triton", "reference"):
            raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
        self.impl = impl
        self.info = dict(info)
        try:
            T, in_shape, num_classes = info["T"], info["in_shape"], info["num_classes"]
            nodes = graph["nodes"]
            output = graph["output"]
        except (KeyError, TypeError) as e:
            raise _fail(f"missing entry {e}") from e
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise _fail(f"T must be an int >= 1, got {T!r}")
        if not isinstance(in_shape, (list, tuple)) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in in_shape
        ):
            raise _fail(f"in_shape must be a list of positive ints, got {in_shape!r}")
        self.T, self.in_shape, self.num_classes = T, tuple(in_shape), int(num_classes)
        if not isinstance(nodes, list) or not nodes:
            raise _fail("nodes must be a non-empty list")
        self._nodes: list[_Node] = []
        defined, used = {"x"}, set()
        for i, spec in enumerate(nodes):
            if not isinstance(spec, Mapping) or not {"op", "in", "out"} <= set(spec):
                raise _fail(f"node {i} must be a mapping with op, in, out; got {spec!r}")
            if spec["op"] not in OPS:
                raise _fail(f"node {i} has unknown op {spec['op']!r}")
            node = _Node(i, spec)
            for name in node.inputs:
                if name not in defined:
                    raise _fail(f"node {i} ({node.op}) reads {name!r} before it is computed")
                used.add(name)
            if not isinstance(node.output, str) or node.output in defined:
                raise _fail(f"node {i} writes {node.output!r}, which is not a new name")
            defined.add(node.output)
            self._bind(node, tensors)
            self._nodes.append(node)
        if output not in defined:
            raise _fail(f"output {output!r} is never computed")
        extra = set(tensors) - {f"{n.index}.{k}" for n in self._nodes for k in n.buffers}
        if extra:
            raise _fail(f"tensors not used by any node: {sorted(extra)[:5]}")
        self.graph_output = output
        self._graph = copy.deepcopy({"nodes": nodes, "output": output})
        # Free each value after its last reader (activation memory of a deep net stays small).
        last: dict[str, int] = {}
        for n in self._nodes:
            for name in n.inputs:
                last[name] = n.index
        for name, i in last.items():
            if name != output:
                self._nodes[i].free_after.append(name)
        self.spike_values = self._spike_values()
        self._schedule = self._fused_schedule()
        self._recorder: Callable | None = None
        self.eval()
        self.__dict__["_gen"] = 0  # bumped whenever a buffer may be another tensor
        self.__dict__["_buffer_list"] = None
        self.__dict__["_state"] = None
        self._check_flow()

    # The layers' plans keep what they derived from the model's tensors (fp32 copies of 16-bit
    # parameters, the tensors themselves). They are valid while `_state` is: the generation
    # (bumped by `.to()` and by putting another tensor in a buffer's place) and the sum of the
    # buffers' versions (in-place changes, `load_state_dict`, bump a version). One check per
    # forward instead of one per layer.

    def _new_tensors(self) -> None:
        """A buffer may be another tensor now: the plans and the buffer list are out of date."""
        d = self.__dict__
        d["_gen"] = d.get("_gen", 0) + 1
        d["_buffer_list"] = None  # (and holds no old tensor alive until the next forward)

    def _apply(self, fn, recurse: bool = True):
        # The deployed ops compute in fp32, fp16 or bf16: a conversion to another floating
        # dtype (.double(), .to(torch.float64)) is refused before any buffer changes, as
        # load(dtype=...) refuses it, instead of failing inside a layer at the next forward.
        probe = fn(torch.zeros(()))  # (a CPU scalar: fn may move it to any device)
        if probe.is_floating_point() and probe.dtype not in _DTYPES:
            raise TypeError(
                f"a deployed model runs in torch.float32, float16 or bfloat16, not {probe.dtype}"
            )
        out = super()._apply(fn, recurse)
        self._new_tensors()
        return out

    def _replicate_for_data_parallel(self):
        """A replica for `nn.DataParallel` (one per device): nn.Module's shallow copy would share
        the layer list, so every replica would use the plans and packed weights derived from the
        first device's tensors. Each replica gets its own nodes (with nothing derived yet)."""
        replica = super()._replicate_for_data_parallel()
        d = replica.__dict__
        d["_nodes"] = [copy.copy(n) for n in self._nodes]  # copy drops what was derived
        d["_schedule"] = replica._fused_schedule()
        replica._new_tensors()
        d["_state"] = None
        return replica

    def register_buffer(self, name: str, tensor, persistent: bool = True) -> None:
        # also what `model.<buffer> = tensor` and load_state_dict(assign=True) call
        super().register_buffer(name, tensor, persistent)
        self._new_tensors()

    def _check_state(self) -> None:
        d = self.__dict__
        if d["_buffer_list"] is None:
            self._track_versions()
            d["_buffer_list"] = [b for b in self._buffers.values() if b is not None]
        d["_state"] = (d["_gen"], sum(map(_VERSION, d["_buffer_list"])))

    def _track_versions(self) -> None:
        """Buffers made under `torch.inference_mode()` (a model folded, loaded or converted
        there) have no version counter, so an in-place change to them could not be noticed:
        they become normal tensors (one copy each, once)."""
        for name, b in self._buffers.items():
            if b is not None and b.is_inference():
                with torch.inference_mode(False):
                    self._buffers[name] = b.clone()

    def _fused_schedule(self) -> list[tuple]:
        """What `forward` runs: (run function, node, input names, output name, names to free)
        per step. A `bconv` without a neuron whose currents only feed the next node, an `add`
        (the join of a residual block), runs as one step: the add's other input goes into the
        convolution's epilogue as its residual (`binary_conv_neuron(residual=...)`), which saves
        the add's launch and the currents' round trip through memory."""
        readers: dict[str, int] = {}
        for n in self._nodes:
            for name in n.inputs:
                readers[name] = readers.get(name, 0) + 1
        schedule, i = [], 0
        while i < len(self._nodes):
            n = self._nodes[i]
            nxt = self._nodes[i + 1] if i + 1 < len(self._nodes) else None
            if (
                n.op == "bconv"
                and n.attrs["neuron"] is None
                and not n.attrs["linear"]
                and nxt is not None
                and nxt.op == "add"
                and n.output in nxt.inputs
                and readers.get(n.output) == 1  # (so not both of the add's inputs)
                and n.output != self.graph_output
            ):
                res = nxt.inputs[1] if nxt.inputs[0] == n.output else nxt.inputs[0]
                free = [f for f in n.free_after + nxt.free_after if f != n.output]
                schedule.append((_run_bconv_add, n, [n.inputs[0], res], nxt.output, free))
                i += 2
                continue
            schedule.append((_RUN[n.op], n, n.inputs, n.output, n.free_after))
            i += 1
        return schedule

    # --------------------------------------------------------------------------- construction

    def _bind(self, node: _Node, tensors: Mapping[str, torch.Tensor]) -> None:
        req_attrs, req, opt = OPS[node.op]
        for a in req_attrs:
            if a not in node.attrs:
                raise _fail(f"node {node.index} ({node.op}) lacks attribute {a!r}")
        n_in = 2 if node.op == "add" else 1
        if len(node.inputs) != n_in:
            raise _fail(f"node {node.index} ({node.op}) needs {n_in} input(s)")
        for k in req + opt:
            key = f"{node.index}.{k}"
            if key not in tensors:
                if k in req:
                    raise _fail(f"node {node.index} ({node.op}) lacks tensor {k!r}")
                continue
            t = tensors[key]
            if not isinstance(t, torch.Tensor):
                raise _fail(f"tensor {key} is not a tensor")
            if k != "words" and not t.is_floating_point():  # (words: checked with their shape)
                raise _fail(f"tensor {key} must be floating, got {t.dtype}")
            buf = f"n{node.index}_{k}"
            self.register_buffer(buf, t)
            node.buffers[k] = buf
        getattr(self, f"_check_{node.op}", lambda n: None)(node)

    def _t(self, node: _Node, k: str) -> torch.Tensor | None:
        # straight from the buffer dict (where register_buffer and .to() keep them): getattr
        # would go through nn.Module.__getattr__ on every call of every layer
        b = node.buffers.get(k)
        return None if b is None else self._buffers[b]

    def _check_shape(self, node: _Node, k: str, shapes: list[tuple[int, ...]]) -> None:
        t = self._t(node, k)
        if t is None:
            return
        if tuple(t.shape) not in shapes:
            want = " or ".join(str(list(s)) for s in shapes)
            raise _fail(
                f"node {node.index} ({node.op}) tensor {k!r} has shape {list(t.shape)}, "
                f"expected {want}"
            )
        if k == "words":
            if t.dtype != torch.int32:
                raise _fail(f"node {node.index} words must be int32, got {t.dtype}")
        elif not t.is_floating_point():
            raise _fail(f"node {node.index} tensor {k!r} must be floating, got {t.dtype}")

    def _check_neuron_attrs(self, node: _Node, a: Mapping) -> None:
        for k in OPS["neuron"][0]:  # a fused neuron's mapping needs them as a neuron node does
            if k not in a:
                raise _fail(f"node {node.index} ({node.op}) neuron lacks attribute {k!r}")
        sb = a["spike_bits"]
        if sb is not None and (isinstance(sb, bool) or not isinstance(sb, int) or not 1 <= sb <= 8):
            raise _fail(f"node {node.index}: spike_bits must be null or 1..8, got {sb!r}")
        try:
            check_spike_step(a["spike_step"])  # what the ops require: finite and > 0 in fp32
        except (TypeError, ValueError) as e:
            raise _fail(f"node {node.index}: {e}") from None
        if not isinstance(a["parallel"], bool):
            raise _fail(f"node {node.index}: parallel must be a bool")

    def _check_conv(self, node: _Node) -> None:
        a = node.attrs
        _int_list(a["padding"], 2, f"node {node.index} padding")
        for k in ("stride", "dilation"):
            _int_list(a[k], 2, f"node {node.index} {k}", 1)
        w = self._t(node, "weight")
        if w.dim() != 4:
            raise _fail(f"node {node.index} conv weight must be 4-D, got {list(w.shape)}")
        self._check_shape(node, "bias", [(w.shape[0],)])

    def _check_linear(self, node: _Node) -> None:
        w = self._t(node, "weight")
        if w.dim() != 2:
            raise _fail(f"node {node.index} linear weight must be 2-D, got {list(w.shape)}")
        self._check_shape(node, "bias", [(w.shape[0],)])

    def _check_bconv(self, node: _Node) -> None:
        a, T = node.attrs, self.T
        shape = _int_list(a["shape"], 4, f"node {node.index} shape")
        _int_list(a["stride"], 2, f"node {node.index} stride", 1)
        _int_list(a["padding"], 2, f"node {node.index} padding")
        if a["bits"] not in (1, 2) or isinstance(a["bits"], bool):
            raise _fail(f"node {node.index}: bits must be 1 or 2, got {a['bits']!r}")
        if isinstance(a["groups"], bool) or not isinstance(a["groups"], int) or a["groups"] < 1:
            raise _fail(f"node {node.index}: groups must be an int >= 1")
        O, K = shape[0], math.prod(shape[1:])
        self._check_shape(node, "words", [(a["bits"], O, -(-K // 32))])
        self._check_shape(node, "scale", [(O,), (T, O)])
        self._check_shape(node, "bias", [(O,), (T, O)])
        if a["neuron"] is None:
            if self._t(node, "threshold") is not None or self._t(node, "decay") is not None:
                raise _fail(f"node {node.index}: neuron tensors without a neuron")
            return
        if not isinstance(a["neuron"], Mapping):
            raise _fail(f"node {node.index}: neuron must be null or a mapping")
        self._check_neuron_attrs(node, a["neuron"])
        if self._t(node, "threshold") is None:
            raise _fail(f"node {node.index}: a fused neuron needs a threshold")
        self._check_shape(node, "threshold", [(T, O)])
        if a["neuron"]["parallel"] != (self._t(node, "decay") is None):
            raise _fail(f"node {node.index}: a decay is needed exactly when not parallel")
        self._check_shape(node, "decay", [(T, O)])

    def _check_neuron(self, node: _Node) -> None:
        self._check_neuron_attrs(node, node.attrs)
        T = self.T
        self._check_shape(node, "threshold", [(T,)])
        if node.attrs["parallel"] != (self._t(node, "decay") is None):
            raise _fail(f"node {node.index}: a decay is needed exactly when not parallel")
        ks, kb = self._t(node, "in_scale"), self._t(node, "in_bias")
        if (ks is None) != (kb is None):
            raise _fail(f"node {node.index}: in_scale and in_bias come together")
        d = self._t(node, "decay")
        C = 0
        if ks is not None:
            C = ks.shape[-1]
        elif d is not None and d.dim() == 2:
            C = d.shape[-1]
        shapes = [(T,)] + ([(T, C)] if C else [])
        self._check_shape(node, "decay", shapes)
        self._check_shape(node, "in_scale", [(T, C)])
        self._check_shape(node, "in_bias", [(T, C)])

    def _check_seca(self, node: _Node) -> None:
        w = self._t(node, "weight")
        if w.dim() != 3 or w.shape[:2] != (1, 1) or w.shape[2] % 2 == 0:
            raise _fail(f"node {node.index} seca weight must be [1, 1, odd k], got {list(w.shape)}")

    def _check_maxpool(self, node: _Node) -> None:
        for k in ("kernel_size", "stride"):
            _int_list(node.attrs[k], 2, f"node {node.index} {k}", 1)
        _int_list(node.attrs["padding"], 2, f"node {node.index} padding")

    def _check_unsqueeze(self, node: _Node) -> None:
        d = node.attrs["dim"]
        if isinstance(d, bool) or not isinstance(d, int) or d >= 0:
            raise _fail(f"node {node.index}: unsqueeze dim must be a negative int, got {d!r}")

    def _check_flow(self) -> None:
        """Run the graph once on shapes alone (meta tensors, the reference ops, one sample; the
        neurons, which keep their input's shape, reduced to a check of their channels) so that
        a graph whose tensors do not fit each other (a layer's weight against its input's
        channels, the classifier against the features) fails here, naming the node, and not as
        a torch error at the first forward. Leaves nothing behind: the buffers are put back and
        what the run derived (plans, packed weights) is dropped."""
        d, saved, impl = self.__dict__, dict(self._buffers), self.impl
        try:
            for name, b in saved.items():
                if b is not None:
                    self._buffers[name] = torch.empty_like(b, device="meta")
            d["impl"] = "reference"
            dtype = self.dtype
            env: dict[str, Any] = {
                "x": torch.zeros(1, 1, *self.in_shape, device="meta", dtype=dtype)
            }
            for node in self._nodes:
                args = [env[n] for n in node.inputs]
                try:
                    env[node.output] = _SHAPE_RUN.get(node.op, _RUN[node.op])(
                        self, node, args, dtype
                    )
                except (RuntimeError, ValueError, TypeError, IndexError, ArithmeticError) as e:
                    shapes = ", ".join(str(list(a.shape)) for a in args)
                    raise _fail(
                        f"node {node.index} ({node.op}) does not fit its input of shape {shapes} "
                        f"([T, N, *]): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                    ) from None
            y = _float(env[self.graph_output], dtype)
            if y.dim() != 3 or y.shape[0] not in (1, self.T) or y.shape[2] != self.num_classes:
                raise _fail(
                    f"the output {self.graph_output!r} has shape {list(y.shape)} for one sample, "
                    f"expected [T, 1, num_classes={self.num_classes}]"
                )
        finally:
            self._buffers.update(saved)
            d["impl"] = impl
            for node in self._nodes:
                node.packed, node.plans, node.plan_state, node.fits = None, {}, None, {}

    def _spike_values(self) -> set[str]:
        spikes: set[str] = set()
        for n in self._nodes:
            if n.op == "neuron" or (n.op == "bconv" and n.attrs["neuron"] is not None):
                spikes.add(n.output)
            elif n.op in SPIKE_PRESERVING_OPS and n.inputs[0] in spikes:
                spikes.add(n.output)
        return spikes

    # ------------------------------------------------------------------------------ inference

    def file_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors as stored in an export: `{"{node_index}.{name}": CPU tensor}`, copies
        (on the CPU too): an edit of one changes neither this model nor one built from them."""
        return {
            f"{n.index}.{k}": getattr(self, b).detach().to("cpu", copy=True).contiguous()
            for n in self._nodes
            for k, b in n.buffers.items()
        }

    @property
    def graph(self) -> dict[str, Any]:
        """The graph description (plain data, as exported): a copy, so editing it changes
        neither this model nor what `export` writes of it."""
        return copy.deepcopy(self._graph)

    @property
    def nodes(self) -> list[dict]:
        """The graph's node descriptions (plain data; a copy, see `graph`)."""
        return copy.deepcopy(self._graph["nodes"])

    def train(self, mode: bool = True) -> DeployedModel:
        if mode:
            raise DeployError("a DeployedModel is inference only; it has no training mode")
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (that of the floating tensors; fp32 unless converted)."""
        for b in self.buffers():
            if b.is_floating_point():
                return b.dtype
        return torch.float32

    def check_input(self, x: object) -> torch.Tensor:
        """x must be `[N, *in_shape]` (static: the same input at every step) or
        `[T, N, *in_shape]` (one frame per step, e.g. event data). Returns it as `[T', N, *]`."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"deployed model input must be a torch.Tensor, got {type(x).__name__}")
        check_dense("deployed model input", x)
        if x.is_complex():
            raise TypeError(f"deployed model input must be real (float, int, bool), got {x.dtype}")
        d = len(self.in_shape)
        shp = ", ".join(map(str, self.in_shape))
        if x.dim() == d + 1 and tuple(x.shape[1:]) == self.in_shape:
            return x.unsqueeze(0)
        if x.dim() == d + 2 and x.shape[0] == self.T and tuple(x.shape[2:]) == self.in_shape:
            return x
        raise DeployError(
            f"deployed model input must be [N, {shp}] or [T={self.T}, N, {shp}], "
            f"got {tuple(x.shape)}"
        )

    @torch.no_grad()
    def forward(self, x: torch.Tensor, *, per_step: bool = False) -> torch.Tensor:
        """Logits summed over the T steps `[N, num_classes]` (`per_step=True`: `[T, N, C]`).

        Args:
            x: `[N, *in_shape]` (static input, as the trained model's eval repeats it over T) or
                `[T, N, *in_shape]`; cast to the model's dtype and must be on its device.
        """
        check_bool("per_step", per_step)
        if self.impl == "triton" and torch.compiler.is_compiling():
            raise DeployError(
                "a deployed model with impl='triton' launches its layers' kernels eagerly, which "
                "torch.compile and torch.export cannot trace; trace it with impl='auto' or "
                "'reference' (the graph then holds the reference's torch ops), or replay the "
                "eager model from a CUDA graph for speed (model.graphed(example))"
            )
        dev = x.device.type if isinstance(x, torch.Tensor) else None
        if dev in ("cuda", "cpu") and torch.is_autocast_enabled(dev):
            # The model runs in its own dtype: autocast would change some layers' (those that
            # call torch ops) and not the kernels', so the two impls would disagree.
            with torch.autocast(dev, enabled=False):
                return self.forward(x, per_step=per_step)
        dtype = self.dtype
        x = self.check_input(x)
        if not torch.compiler.is_compiling():  # (for the layer plans, which a trace does not keep)
            self._check_state()
        tensors = self.__dict__["_buffer_list"]
        if tensors and x.device != tensors[0].device:
            raise DeployError(
                f"deployed model input is on {x.device}, the model on {tensors[0].device}: move "
                "one of them (model.to(device) or x.to(device))"
            )
        env: dict[str, Any] = {"x": x.to(dtype)}
        rec = self._recorder
        if rec is not None:  # node by node (a recorder sees every node, the adds included)
            for node in self._nodes:
                args = [env[n] for n in node.inputs]
                out = _RUN[node.op](self, node, args, dtype)
                env[node.output] = out
                rec(self, node, args, out)
                for name in node.free_after:
                    del env[name]
        else:
            for run, node, inputs, output, free in self._schedule:
                env[output] = run(self, node, [env[n] for n in inputs], dtype)
                for name in free:
                    del env[name]
        y = _float(env[self.graph_output], dtype)
        if y.shape[0] != self.T:
            y = y.expand(self.T, *y.shape[1:])
        return y if per_step else y.sum(0)

    def graphed(self, example: torch.Tensor, *, per_step: bool = False) -> GraphedModel:
        """This model's forward captured in a CUDA graph for inputs shaped like `example` (a
        CUDA tensor): see `GraphedModel`. Capture after the model is final (device, dtype,
        weights): the graph keeps the buffers and plans of the moment it was captured."""
        return GraphedModel(self, example, per_step=per_step)

    def extra_repr(self) -> str:
        ops: dict[str, int] = {}
        for n in self._nodes:
            ops[n.op] = ops.get(n.op, 0) + 1
        desc = ", ".join(f"{k}={v}" for k, v in ops.items())
        return (
            f"T={self.T}, in_shape={self.in_shape}, num_classes={self.num_classes}, nodes: {desc}"
        )


class GraphedModel:
    """A `DeployedModel`'s forward for one input shape, replayed from a CUDA graph.

    At batch 1 a deployed network's eager forward is bound by the host (tens of launches, each
    with its Python); replaying a captured graph leaves only the GPU work. Built by
    `DeployedModel.graphed(example)`: two eager forwards on a side stream (they compile the
    kernels and make the layers' plans), then one captured into a `torch.cuda.CUDAGraph`.
    `graphed(x)` copies x into the graph's input buffer, replays, and returns a copy of the
    output (the next replay overwrites the graph's own). x must have the example's shape, dtype
    and device (a `DeployError` otherwise). The graph keeps the model's buffers and plans as
    they were at capture: after changing the model (`.to()`, `load_state_dict`, new weights),
    capture a new one.
    """

    def __init__(self, model: DeployedModel, example: torch.Tensor, *, per_step: bool = False):
        if not isinstance(example, torch.Tensor):
            raise TypeError(f"example must be a torch.Tensor, got {type(example).__name__}")
        if example.device.type != "cuda":
            raise ValueError(
                f"a CUDA graph needs a CUDA example input, got one on {example.device} (move "
                "the model and the input to the GPU first)"
            )
        model.check_input(example)
        self.model = model
        self.per_step = per_step
        self.input = example.detach().clone()
        side = torch.cuda.Stream(example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                model(self.input, per_step=per_step)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = model(self.input, per_step=per_step)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
        ref = self.input
        if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
            raise DeployError(
                f"this graph was captured for inputs {tuple(ref.shape)} {ref.dtype} on "
                f"{ref.device}, got {tuple(x.shape)} {x.dtype} on {x.device}: capture "
                "another with DeployedModel.graphed(x)"
            )
        self.input.copy_(x)
        self.graph.replay()
        return self.output.clone()


def _steps(x: torch.Tensor, T: int) -> torch.Tensor:
    return x if x.shape[0] == T else x.expand(T, *x.shape[1:])


def _run_unsqueeze(m, node, args, dtype):
    x = args[0]
    if isinstance(x, Codes):
        return Codes(x.codes.unsqueeze(node.attrs["dim"]), x.step, x.bits)
    return x.unsqueeze(node.attrs["dim"])


def _run_flatten(m, node, args, dtype):
    x = args[0]
    if isinstance(x, Codes):
        return Codes(x.codes.flatten(2), x.step, x.bits)
    return x.flatten(2)


def _per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    y = fn(x.flatten(0, 1))
    return y.reshape(*x.shape[:2], *y.shape[1:])


def _run_conv(m, node, args, dtype):
    a = node.attrs
    w, b = m._t(node, "weight"), m._t(node, "bias")
    return _per_frame(
        lambda z: F.conv2d(z, w, b, a["stride"], a["padding"], a["dilation"], a["groups"]),
        _float(args[0], dtype),
    )


def _run_linear(m, node, args, dtype):
    return F.linear(_float(args[0], dtype), m._t(node, "weight"), m._t(node, "bias"))


_MAX_PLANS = 8  # per node: input shapes a deployed model is called with


_VERSION = operator.attrgetter("_version")


def _layer_impl(m: DeployedModel) -> str:
    """The impl a layer's plan is made with: the model's, or the reference while torch.compile or
    torch.export traces (the Triton layer plans launch kernels eagerly; forward refuses
    impl='triton' there). Plans are not kept while tracing, so their keys hold `m.impl`."""
    return "reference" if torch.compiler.is_compiling() else m.impl


def _node_plan(m: DeployedModel, node: _Node, key: tuple, make: Callable) -> Callable:
    """The node's plan for inputs of signature `key` (made by `make()` on first use).

    A plan is a call checked once, with its launch arguments built once: a layer's call then
    costs a launch, not the op's checks. The plans are for the model's tensors as they are
    (`DeployedModel._state`): `.to()`, another tensor in a buffer's place, or an in-place change
    (load_state_dict) drops them (a plan keeps fp32 copies of 16-bit parameters, and would keep
    old tensors alive). None is kept while torch.compile or torch.export traces (a plan made there
    holds the trace's fake tensors: the next eager call would return fake outputs) or under a
    torch.func transform (its plan is the reference's; an eager call must not reuse it, and a
    Triton plan made before must not meet the transform's tensors).
    """
    if torch.compiler.is_compiling() or transform_active():
        return make()
    state = m.__dict__["_state"]
    if state != node.plan_state:
        node.plans.clear()
        node.plan_state = state
    plan = node.plans.get(key)
    if plan is None:
        if len(node.plans) >= _MAX_PLANS:
            node.plans.clear()
        plan = node.plans[key] = make()
    return plan


def _run_bconv_add(m, node, args, dtype):
    """A `bconv` (no neuron) and the `add` that reads its currents, as one launch: the add's
    other input is the convolution's residual. Where the two shapes do not meet as the fused
    op needs (a graph that broadcasts otherwise), the two run apart."""
    x, res = args[0], _float(args[1], dtype)
    key = (x.shape, res.shape, res.dtype)
    fits = node.fits.get(key)
    if fits is None:
        fits = node.fits[key] = _residual_fits(node.attrs, x.shape, res, dtype, m.T)
    if not fits:
        return _run_add(m, node, [_run_bconv(m, node, [x], dtype), res], dtype)
    if not res.is_contiguous():
        res = res.contiguous()
    return _run_bconv(m, node, [x], dtype, residual=res)


def _residual_fits(a: Mapping, xs: torch.Size, res: torch.Tensor, dtype, T: int) -> bool:
    """Whether `res` is a residual of the convolution `a` on inputs of shape `xs` [T', N, C, H,
    W]: [T or 1, N, C_out, Ho, Wo] in the model's dtype."""
    if len(xs) != 5 or res.dim() != 5 or res.dtype != dtype:
        return False
    (kh, kw), (sh, sw), (ph, pw) = a["shape"][2:], a["stride"], a["padding"]
    out = (a["shape"][0], (xs[3] + 2 * ph - kh) // sh + 1, (xs[4] + 2 * pw - kw) // sw + 1)
    return tuple(res.shape[1:]) == (xs[1], *out) and res.shape[0] in (1, T)


def _run_bconv(m, node, args, dtype, residual=None):
    a = node.attrs
    x = args[0]
    in_step = in_bits = None
    if isinstance(x, Codes):
        x, in_step, in_bits = x.codes, x.step, x.bits
    if a["linear"]:
        x = x.reshape(*x.shape, 1, 1)
    neuron = a["neuron"]
    scale = m._t(node, "scale")
    if neuron is not None or scale.dim() == 2 or (residual is not None and residual.shape[0] > 1):
        x = _steps(x, m.T)
    words = m._t(node, "words")
    packed = node.packed
    if packed is None or packed.words is not words or packed.scale.device != words.device:
        shape = a["shape"]  # (re)built after .to(): PackedWeight checks its fields once
        alpha = scale if scale.dim() == 1 else scale[0]  # unused by the op: `scale` replaces it
        packed = node.packed = PackedWeight(words, alpha, shape, math.prod(shape[1:]), a["bits"])
    decay, threshold = m._t(node, "decay"), m._t(node, "threshold")
    bias = m._t(node, "bias")
    key = (x.dtype, x.shape, x.stride(), x.device, in_step, in_bits, dtype, m.impl)
    if residual is not None:
        key += (residual.shape, residual.stride())

    def make():
        kw = {}
        if neuron is not None:
            kw = {
                "decay": decay,
                "threshold": threshold,
                "parallel": neuron["parallel"],
                "spike_bits": neuron["spike_bits"],
                "spike_step": neuron["spike_step"],
            }
        return binary_conv_neuron_plan(
            x,
            packed,
            scale,
            bias,
            stride=tuple(a["stride"]),
            padding=tuple(a["padding"]),
            groups=a["groups"],
            in_step=in_step,
            in_bits=in_bits,
            out_dtype=dtype,
            impl=_layer_impl(m),
            residual=residual,
            **kw,
        )

    plan = _node_plan(m, node, key, make)
    y = plan(x) if residual is None else plan(x, residual)
    if a["linear"]:
        y = y.reshape(y.shape[:-2])
    if neuron is not None and neuron["spike_bits"] is not None:
        return Codes(y, neuron["spike_step"], neuron["spike_bits"])
    return y


def _run_neuron(m, node, args, dtype):
    a = node.attrs
    x = _steps(_float(args[0], dtype), m.T)
    k, b = m._t(node, "in_scale"), m._t(node, "in_bias")
    th, decay = m._t(node, "threshold"), m._t(node, "decay")
    # A folded Mem-BN's input map k I + b: inside the EM-PF kernel where it keeps x's dtype, else
    # (the parallel neuron, or parameters of a wider dtype) in torch first
    inside = (
        k is not None
        and decay is not None
        and torch.promote_types(torch.promote_types(k.dtype, b.dtype), x.dtype) == x.dtype
    )
    if k is not None and not inside:
        view = (m.T, 1, -1) + (1,) * (x.dim() - 3)
        x = k.view(view) * x + b.view(view)
        k = b = None
    q = {"spike_bits": a["spike_bits"], "spike_step": a["spike_step"]}
    key = (x.dtype, x.shape, x.device, m.impl)
    if decay is None:
        plan = _node_plan(
            m, node, key, lambda: parallel_neuron_plan(x, threshold=th, impl=_layer_impl(m), **q)
        )
        return plan(x)
    # [T] per step, or [T, C] per channel (a folded Mem-BN's k λ, which may leave [0, 1]): the
    # fused kernel either way
    plan = _node_plan(
        m, node, key,
        lambda: empf_neuron_plan(
            x, decay=decay, threshold=th, decay_range=False, in_scale=k, in_bias=b,
            impl=_layer_impl(m), **q,
        ),
    )  # fmt: skip
    return plan(x)[0]


def _run_seca(m, node, args, dtype):
    w = m._t(node, "weight")
    k = w.shape[-1]

    def attend(z: torch.Tensor) -> torch.Tensor:
        y = z.mean(dim=tuple(range(2, z.dim())))
        y = F.conv1d(y.unsqueeze(1), w.to(y.dtype), padding=k // 2)
        gate = torch.sigmoid(y.squeeze(1))
        return z * gate.view(*gate.shape, *(1,) * (z.dim() - 2))

    return _per_frame(attend, _float(args[0], dtype))


def _run_maxpool(m, node, args, dtype):
    a = node.attrs
    return _per_frame(
        lambda z: F.max_pool2d(z, a["kernel_size"], a["stride"], a["padding"]),
        _float(args[0], dtype),
    )


def _run_avgpool(m, node, args, dtype):
    return _per_frame(lambda z: F.adaptive_avg_pool2d(z, 1), _float(args[0], dtype))


def _run_add(m, node, args, dtype):
    return _float(args[0], dtype) + _float(args[1], dtype)


def _shape_neuron(m, node, args, dtype):
    """`_check_flow`'s neuron: the output's shape (the input's, over T steps) after checking
    that per-channel parameters ([T, C]) have the input's C (dim 2 of [T, N, C, *])."""
    x = _steps(_float(args[0], dtype), m.T)
    for k in ("decay", "in_scale", "in_bias"):
        t = m._t(node, k)
        if t is not None and t.dim() == 2 and (x.dim() < 3 or x.shape[2] != t.shape[1]):
            has = x.shape[2] if x.dim() >= 3 else "none (no channel dim)"
            raise ValueError(f"its {k} has {t.shape[1]} channels, its input {has}")
    return x


def _shape_bconv(m, node, args, dtype):
    """`_check_flow`'s bconv: the convolution alone (the fused neuron keeps its shape and its
    [T, O] tensors were checked against the weight at construction)."""
    if node.attrs["neuron"] is None:
        return _run_bconv(m, node, args, dtype)
    bare = copy.copy(node)
    bare.attrs = {**node.attrs, "neuron": None}
    return _steps(_run_bconv(m, bare, args, dtype), m.T)


#: What `_check_flow` runs instead of `_RUN` where the shape is all it needs.
_SHAPE_RUN: dict[str, Callable] = {"neuron": _shape_neuron, "bconv": _shape_bconv}


_RUN: dict[str, Callable] = {
    "unsqueeze": _run_unsqueeze,
    "flatten": _run_flatten,
    "conv": _run_conv,
    "linear": _run_linear,
    "bconv": _run_bconv,
    "neuron": _run_neuron,
    "seca": _run_seca,
    "maxpool": _run_maxpool,
    "avgpool": _run_avgpool,
    "add": _run_add,
}
