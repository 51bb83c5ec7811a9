"""Direct launches: Triton's per-call Python path, taken once per signature, then skipped.

`kernel[grid](...)` (and `Autotuner.run`) redo, on every call, work whose answer only changes when
the call's *signature* changes: the autotuner's key and config lookup, the binder that specialises
each argument, the compile-cache key (a `str` of the options), the globals check and the launch
metadata. With our kernels' 20-30 arguments that path dominated a call's host time on the H200
machine (2026-12-04: a trivial kernel took 15.5 µs through `kernel[grid]`, 21.3 µs through an
autotuner and 6.8 µs through the compiled kernel's own `run`).

`launch(tuner, grid, args)` keeps, per kernel, a dict from the signature key to the compiled kernel
and its autotuned config. The first call of a signature goes through `tuner.run` (compile and
autotune as usual) and records what it launched; later calls build the positional argument list
and call the compiled kernel's launcher directly. The signature key holds everything Triton
specialises on, so a cached kernel is only reused where Triton would have picked the same one:

- constexpr arguments and the autotuner's key arguments: their values and types (True, 1, 1.0);
- tensors: dtype and whether the data pointer is 16-byte aligned;
- ints: whether the value is 1 (compiled as a constant), divisible by 16, and its integer type
  (i32, i64 or u64 by range); bools and None by value; floats are all one fp32 argument;
- the current CUDA device.

`tests/test_launch.py` checks this key against Triton's own binder. The direct path is off under
the interpreter, for kernels whose config has a `pre_hook`, while a launch enter or exit hook (a
profiler such as proton) or a jit pre-run hook is installed, and with `EMPF_FAST_LAUNCH=0`.
"""

from __future__ import annotations

import os
import sys

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

from . import _common
from ._common import INTERPRET, launch_options, poison

#: Off under the interpreter (nothing is compiled) and when the environment says so.
ENABLED: bool = not INTERPRET and os.environ.get("EMPF_FAST_LAUNCH", "1") != "0"

_OPTS = launch_options()
_I32_MIN, _I32_MAX, _U64_MIN = -(2**31), 2**31 - 1, 2**63


def runtime_class(v: object) -> object:
    """The part of a non-constexpr argument that selects the compiled kernel (see module doc)."""
    tv = type(v)
    if tv is float:
        return 0.0
    if tv is _Tensor or isinstance(v, _Tensor):
        return v.dtype, v.data_ptr() & 15 == 0
    if tv is int:
        return v == 1, v & 15 == 0, 0 if _I32_MIN <= v <= _I32_MAX else (2 if v >= _U64_MIN else 1)
    return tv, v  # bool, None, anything else: by value


_Tensor = torch.Tensor


def _triton_path(tuner, grid, args: dict):
    """Triton's own launch (what `kernel[grid](...)` runs); returns the compiled kernel."""
    return tuner.run(grid=grid, warmup=False, **args, **_OPTS)


def _hooks_active() -> bool:
    """A launch enter or exit hook is installed (a `HookChain` with calls, or a plain callable)."""
    rt = triton.knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class Launcher:
    """The direct launcher of one `@triton.autotune` or `@triton.jit` kernel (see module doc)."""

    def __init__(self, tuner: Autotuner | JITFunction):
        self.tuner = tuner
        fn = tuner.fn if isinstance(tuner, Autotuner) else tuner
        if not isinstance(fn, JITFunction):
            raise TypeError(f"expected a jit kernel under the autotuner, got {type(fn).__name__}")
        keys = set(tuner.keys) if isinstance(tuner, Autotuner) else set()
        self.names = list(fn.arg_names)
        self.defaults = {p.name: p.default for p in fn.params if p.has_default}
        # by value: constexprs and the autotuner's key; the rest by runtime_class
        self.by_value = [p.is_constexpr or p.name in keys for p in fn.params]
        self.pre_run_hooks = getattr(fn, "pre_run_hooks", [])  # the jit fn's list: later adds too
        self.cache: dict[tuple, tuple] = {}
        self.signature, self.direct = self._generate()

    def _generate(self):
        """Two generated functions over one key expression (a Python loop over 20-30 arguments
        cost as much as the lookups themselves):

        - `signature(args) -> tuple`, the cache key;
        - `direct(args, grid)`: the key, the cache lookup, and on a hit the compiled kernel's
          launch with the arguments in parameter order (the values the key read, the config's
          for the tuned names); on a miss `_first`.
        """
        tuned = set()  # set by the autotuner's config: follows from its key, not in `args`
        if isinstance(self.tuner, Autotuner):
            tuned = {k for c in self.tuner.configs for k in c.kwargs}
        items, values = [], []
        for i, (name, by_value) in enumerate(zip(self.names, self.by_value)):
            if name in tuned:
                values.append(f"cfg[{name!r}]")
                continue
            get = f"a[{name!r}]" if name not in self.defaults else f"a.get({name!r}, d{i})"
            # by value *and type*: True == 1 == 1.0 as dict keys, but Triton's compile-cache key
            # (`str` of the specialisation) tells them apart and compiles each separately
            if by_value:
                items.append(f"(v{i} := {get}), v{i}.__class__")
                values.append(f"v{i}")
            else:  # runtime_class inlined for floats, plain tensors and ints (most arguments)
                x, c = f"x{i}", f"c{i}"
                items.append(
                    f"(0.0 if ({c} := ({x} := {get}).__class__) is float "
                    f"else ({x}.dtype, {x}.data_ptr() & 15 == 0) if {c} is T or {c} is P "
                    f"else ({x} == 1, {x} & 15 == 0, 0 if {_I32_MIN} <= {x} <= {_I32_MAX} "
                    f"else (2 if {x} >= {_U64_MIN} else 1)) if {c} is int "
                    f"else rc({x}))"
                )
                values.append(x)
        key = f"(torch.cuda.current_device(), {', '.join(items)})"
        src = (
            f"def signature(a):\n    return {key}\n"
            f"def direct(a, grid):\n"
            f"    key = {key}\n"
            f"    hit = cache.get(key)\n"
            f"    if hit is None:\n"
            f"        return first(grid, a, key)\n"
            f"    kernel, cfg = hit\n"
            f"    g = grid({{**dflt, **a, **cfg}}) if callable(grid) else grid\n"
            f"    kernel.run(g[0], g[1] if len(g) > 1 else 1, g[2] if len(g) > 2 else 1,\n"
            f"               stream(key[0]), kernel.function, kernel.packed_metadata,\n"
            f"               None, None, None, {', '.join(values)})\n"
        )
        scope = {
            "rc": runtime_class, "torch": torch, "T": _Tensor, "P": torch.nn.Parameter,
            "cache": self.cache,
            "first": self._first, "stream": _stream, "dflt": self.defaults,
        }  # fmt: skip
        scope.update(
            {f"d{i}": self.defaults[n] for i, n in enumerate(self.names) if n in self.defaults}
        )
        exec(compile(src, f"<direct launch of {self.names[0]}...>", "exec"), scope)
        return scope["signature"], scope["direct"]

    def __call__(self, grid, args: dict) -> None:
        if self.pre_run_hooks or _hooks_active():
            _triton_path(self.tuner, grid, args)
            return
        self.direct(args, grid)

    def _first(self, grid, args: dict, key: tuple) -> None:
        """Launch through Triton and remember what it compiled, when that is safe to reuse."""
        kernel = _triton_path(self.tuner, grid, args)
        config = getattr(self.tuner, "best_config", None)
        if config is not None and config.pre_hook is not None:
            return
        if kernel is None or not hasattr(kernel, "packed_metadata"):
            return
        self.cache[key] = (kernel, dict(config.kwargs) if config is not None else {})


class BoundLaunch:
    """One launch called again and again with every argument fixed but the tensors named in
    `dynamic` (a deployed network's layer: same weights, same input shape, new activations).

    `bound(*tensors)` launches `tuner` on `grid` with `args` and the given tensors in the
    `dynamic` slots. The first call goes through `launch` (Triton compiles and autotunes as
    usual); after it, each call checks only what the dynamic tensors can change in the launch
    signature (dtype, 16-byte alignment) and the current device, and calls the compiled kernel
    with the positional arguments built once. Anything else (another signature, a launch hook,
    the interpreter, a kernel the direct launcher does not take) goes through `launch`.
    """

    def __init__(self, tuner, grid, args: dict, dynamic: tuple[str | tuple[str, ...], ...]):
        # per tensor of a call: the parameter it fills, or the names of several (one tensor in
        # several slots, e.g. as the dummy of unused pointers: checked once per call)
        self.tuner, self.grid = tuner, grid
        self.dynamic = tuple((d,) if isinstance(d, str) else tuple(d) for d in dynamic)
        names = {n for group in self.dynamic for n in group}
        self.args = {k: v for k, v in args.items() if k not in names}
        self._fast: tuple | None = None

    def __call__(self, *tensors: torch.Tensor) -> None:
        fast = self._fast
        if fast is not None and fast(*tensors):
            return
        args = {**self.args, **{n: t for group, t in zip(self.dynamic, tensors) for n in group}}
        launch(self.tuner, self.grid, args)
        if fast is None:
            self._fast = self._prepare(args, tensors)

    def _prepare(self, args: dict, tensors) -> object | None:
        """The direct path, from the launcher's cache entry of this signature: a function
        generated for this launch, `fast(*tensors) -> bool`, which launches and returns True when
        the tensors have the first call's dtypes and alignments, the device is the first call's,
        direct launches are on (`ENABLED`, read per call: tests and benches switch it) and no
        hook is installed; else returns False. It holds no tensor of a call (a plan lives as
        long as its layer and must not keep activations alive)."""
        launcher = _LAUNCHERS.get(id(self.tuner))
        if not ENABLED or launcher is None:
            return None
        key = launcher.signature(args)
        hit = launcher.cache.get(key)
        if hit is None:
            return None
        kernel, config = hit
        full = {**launcher.defaults, **args, **config}
        g = tuple(self.grid(full) if callable(self.grid) else self.grid)
        g = g + (1,) * (3 - len(g))
        slots = {launcher.names.index(n): j for j, group in enumerate(self.dynamic) for n in group}
        scope = {
            "L": _module, "torch": torch, "hooks": _hooks_active, "stream": _stream,
            "run": kernel.run, "fn": kernel.function, "meta": kernel.packed_metadata,
            "pre": launcher.pre_run_hooks, "dev": key[0], "g0": g[0], "g1": g[1], "g2": g[2],
        }  # fmt: skip
        names = [f"t{j}" for j in range(len(tensors))]
        checks, values = [], []
        for j, t in enumerate(tensors):
            scope[f"dt{j}"] = t.dtype
            aligned = "" if t.data_ptr() & 15 == 0 else "not "
            checks.append(f"t{j}.dtype is dt{j} and {aligned}(t{j}.data_ptr() & 15 == 0)")
        for i, n in enumerate(launcher.names):
            if i in slots:
                values.append(f"t{slots[i]}")
            else:
                scope[f"v{i}"] = full[n]
                values.append(f"v{i}")
        src = (
            f"def fast({', '.join(names)}):\n"
            f"    if not (L.ENABLED and {' and '.join(checks) or 'True'}\n"
            f"            and torch.cuda.current_device() == dev and not (pre or hooks())):\n"
            f"        return False\n"
            f"    run(g0, g1, g2, stream(dev), fn, meta, None, None, None, {', '.join(values)})\n"
            f"    return True\n"
        )
        exec(compile(src, f"<bound launch of {launcher.names[0]}...>", "exec"), scope)
        return scope["fast"]


def plan(kernel, grid, args: dict, inputs: tuple, outputs: tuple):
    """run(*inputs2) -> outputs2: new outputs of the forms of `outputs` (None stays None), and
    the launch of `args` with inputs2 and them in the slots that held `inputs` and `outputs`
    (found by identity: the inputs must be distinct tensors, see ops/_common.py `planned`)."""
    held = (*inputs, *outputs)
    slots: dict[int, list[str]] = {}  # held index -> the parameters it fills
    for name, value in args.items():
        for i, t in enumerate(held):
            if t is not None and value is t:
                slots.setdefault(i, []).append(name)
                break
    which = sorted(slots)
    static = {k: v for k, v in args.items() if not any(k in slots[i] for i in which)}
    bound = BoundLaunch(kernel, grid, static, tuple(tuple(slots[i]) for i in which))
    device = next(t for t in held if t is not None).device
    # generated: a loop over the outputs and slots cost more than the allocations themselves;
    # `empty_strided` with tuples is the cheapest allocation call (a torch.Size shape costs
    # ~0.6 µs more in torch.empty here)
    scope = {"empty_strided": torch.empty_strided, "poison": poison, "bound": bound,
             "device": device}  # fmt: skip
    ins = [f"i{j}" for j in range(len(inputs))]
    outs, body = [], []
    for j, o in enumerate(outputs):
        if o is None:
            outs.append("None")
            continue
        scope[f"s{j}"], scope[f"st{j}"], scope[f"d{j}"] = tuple(o.shape), o.stride(), o.dtype
        body.append(f"    o{j} = empty_strided(s{j}, st{j}, dtype=d{j}, device=device)\n")
        if _common._POISON:  # read at plan time (tests switch it)
            body.append(f"    poison(o{j})\n")
        outs.append(f"o{j}")
    new = ins + outs
    src = (
        f"def run({', '.join(ins)}):\n{''.join(body)}"
        f"    bound({', '.join(new[i] for i in which)})\n"
        f"    return ({''.join(o + ', ' for o in outs)})\n"
    )
    exec(compile(src, "<plan run>", "exec"), scope)
    return scope["run"]


def _stream(device: int):
    """The current stream's handle (read `_STREAM` at call time: tests replace it)."""
    return torch.cuda.current_stream(device).cuda_stream if _STREAM is None else _STREAM(device)


def _stream_getter():
    try:
        from triton.runtime.driver import driver

        return driver.active.get_current_stream
    except Exception:  # no active driver (no GPU): the torch lookup above is used instead
        return None


_STREAM = _stream_getter() if ENABLED else None
_module = sys.modules[__name__]
_LAUNCHERS: dict[int, Launcher | None] = {}
_MISSING = object()


def launch(tuner: Autotuner | JITFunction, grid, args: dict) -> None:
    """Launch `tuner` (an autotuned or plain jit kernel) on `grid` with keyword `args` (kernel
    parameters only; the compile options are `launch_options()`)."""
    if not ENABLED:  # the interpreter's kernels are not JITFunctions: Triton's own path
        _triton_path(tuner, grid, args)
        return
    launcher = _LAUNCHERS.get(id(tuner), _MISSING)
    if launcher is _MISSING:
        try:
            launcher = Launcher(tuner)
        except TypeError:  # e.g. heuristics between autotuner and jit: Triton's own path
            launcher = None
        _LAUNCHERS[id(tuner)] = launcher
    if launcher is None:
        _triton_path(tuner, grid, args)
    else:
        launcher(grid, args)
