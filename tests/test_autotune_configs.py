"""Every autotune config of every Triton kernel, run on its own against the reference.

Autotuning picks one config per key on the user's machine, so a config that is wrong (a mask off by
one, a partial-sum buffer it does not fill, a tile the prune function should have dropped) only
shows there. This file finds every `triton.runtime.autotuner.Autotuner` in the
`empf_triton.kernels.*` modules, runs a list of op calls (CASES, each Triton against the reference)
with every autotuner restricted to its first config to learn which calls reach which autotuner,
and then, on a GPU, restricts each autotuner to ONE of its configs at a time (cache cleared) and
re-runs the calls that reach it. It fails when an autotuner is reached by no call: a new kernel
needs a case here.

Also checked: each autotuner's `prune_configs_by` function on the arguments of every real call
(a non-empty subset of the configs), and the parameter-gradient partial sums with BLOCK > SUB
(the chunk size of the per-block partial sums): on a GPU every config with BLOCK > SUB, on the CPU
the pinned config with SUB lowered.

`EMPF_AUTOTUNE=0` pins one config when the kernels are imported, so the GPU test needs
`EMPF_AUTOTUNE=1` (bench/run_gpu.sh runs this file in its own stage with it). On a CPU (the
interpreter, one pinned config) the non-gpu tests check the discovery and the pinned configs.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
from collections.abc import Callable

import pytest
import torch

triton = pytest.importorskip("triton")
from helpers import assert_same_quantization, fresh_launch_caches  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402

from empf_triton import ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"


# ------------------------------------------------------------------------------------ discovery


def discover() -> dict[str, Autotuner]:
    """Every Autotuner defined in an empf_triton.kernels module, as {"module.attr": autotuner}.

    One autotuner imported into several modules is listed once, under the first name found.
    """
    import empf_triton.kernels as kernels

    found: dict[str, Autotuner] = {}
    seen: set[int] = set()
    for info in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for attr, value in sorted(vars(module).items()):
            # An autotuner is a module attribute or a value of a module-level dict (the binary
            # GEMM keeps one per (family, direction) in `_TUNERS`).
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for key, tuner in items:
                if isinstance(tuner, Autotuner) and id(tuner) not in seen:
                    seen.add(id(tuner))
                    found[f"{info.name}.{attr}" + ("" if key is None else f"[{key}]")] = tuner
    return found


def kernel_modules() -> list:
    import empf_triton.kernels as kernels

    return [
        importlib.import_module(f"{kernels.__name__}.{m.name}")
        for m in sorted(pkgutil.iter_modules(kernels.__path__), key=lambda m: m.name)
    ]


# ------------------------------------------------------------------------------------ the cases
# Each case runs one op with impl="triton" and with impl="reference" and asserts they agree.
# Shapes: N past two of the largest block (2048 on a GPU; the pinned 1024 on a CPU) with a tail,
# GEMMs at M = 1 (small-M family) and M = 37
# (large family) with P and R past the largest tiles. A wrong config is off by O(1) or leaves
# NaN (outputs are NaN-poisoned under test), far outside these tolerances.

N_ELEM = 2 * 2048 + 37 if HAS_CUDA else 2 * 1024 + 37


def _close(got, ref, name: str, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    for i, (a, b) in enumerate(zip(got, ref)):
        if a is None and b is None:
            continue
        assert a is not None and b is not None, f"{name}[{i}]: one side has no gradient"
        scale = max(1.0, b.detach().abs().max().item()) if b.numel() else 1.0
        torch.testing.assert_close(
            a.detach().double(),
            b.detach().double(),
            rtol=rtol,
            atol=atol * scale,
            msg=lambda m, i=i: f"{name}[{i}]: {m}",
        )


def _neuron_inputs(T: int):
    g = torch.Generator().manual_seed(1)
    cur = (torch.randn(T, N_ELEM, generator=g) * 0.5 + 0.3).to(DEV)
    v0 = (torch.randn(N_ELEM, generator=g) * 0.2).to(DEV)
    grad = torch.randn(T, N_ELEM, generator=g).to(DEV)
    decay = torch.tensor([0.5, 0.7, 0.6][:T], device=DEV)
    th = torch.tensor([0.4, 0.5, 0.45][:T], device=DEV)
    return cur, v0, grad, decay, th


def case_empf_neuron() -> None:
    cur, v0, grad, decay, th = _neuron_inputs(3)
    for mode in ("online", "bptt"):
        for bits in (None, 4):
            res = {}
            for impl in ("triton", "reference"):
                leaves = [t.clone().requires_grad_() for t in (cur, v0, decay, th)]
                s, v = ops.empf_neuron(
                    leaves[0],
                    leaves[1],
                    decay=leaves[2],
                    threshold=leaves[3],
                    spike_bits=bits,
                    grad_mode=mode,
                    impl=impl,
                )
                loss = (s * grad).sum() + v.sum()
                grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                res[impl] = (s, v, *grads)
            _close(res["triton"], res["reference"], f"empf_neuron[{mode}, bits={bits}]")


def case_empf_neuron_step() -> None:
    cur, v0, grad, decay, th = _neuron_inputs(1)
    res = {}
    for impl in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (cur[0], v0, decay[0], th[0])]
        s, v = ops.empf_neuron_step(
            leaves[0], leaves[1], decay=leaves[2], threshold=leaves[3], impl=impl
        )
        loss = (s * grad[0]).sum() + v.sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        res[impl] = (s, v, *grads)
    _close(res["triton"], res["reference"], "empf_neuron_step")


def case_parallel_neuron() -> None:
    cur, _, grad, _, th = _neuron_inputs(3)
    for bits in (None, 4):
        res = {}
        for impl in ("triton", "reference"):
            leaves = [t.clone().requires_grad_() for t in (cur, th)]
            s = ops.parallel_neuron(leaves[0], threshold=leaves[1], spike_bits=bits, impl=impl)
            res[impl] = (s, *torch.autograd.grad((s * grad).sum(), leaves))
        _close(res["triton"], res["reference"], f"parallel_neuron[bits={bits}]")


def case_lif_neuron() -> None:
    cur, v0, grad, decay, th = _neuron_inputs(3)
    for mode in ("online", "bptt"):
        res = {}
        for impl in ("triton", "reference"):
            leaves = [t.clone().requires_grad_() for t in (cur, v0, decay, th)]
            s, v = ops.lif_neuron(
                leaves[0],
                leaves[1],
                decay=leaves[2],
                threshold=leaves[3],
                grad_mode=mode,
                impl=impl,
            )
            loss = (s * grad).sum() + v.sum()
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            res[impl] = (s, v, *grads)
        _close(res["triton"], res["reference"], f"lif_neuron[{mode}]", rtol=1e-4, atol=1e-4)
    res = {}
    for impl in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (cur[0], v0, decay[0], th[0])]
        s, v = ops.lif_neuron_step(
            leaves[0], leaves[1], decay=leaves[2], threshold=leaves[3], impl=impl
        )
        loss = (s * grad[0]).sum() + v.sum()
        res[impl] = (s, v, *torch.autograd.grad(loss, leaves, allow_unused=True))
    _close(res["triton"], res["reference"], "lif_neuron_step", rtol=1e-4, atol=1e-4)


def case_spikes() -> None:
    step = 0.25
    g = torch.Generator().manual_seed(2)
    for bits in (1, 2, 4, 8):
        s = (torch.rand(N_ELEM, generator=g) * (2**bits + 1) * step - step).to(DEV)
        both = ("triton", "reference")
        q = {impl: ops.quantize_spikes(s, bits, step, impl=impl) for impl in both}
        assert torch.equal(q["triton"], q["reference"]), f"quantize_spikes bits={bits}"
        c = {impl: ops.encode_spikes(s, bits, step, impl=impl) for impl in both}
        assert torch.equal(c["triton"], c["reference"]), f"encode_spikes bits={bits}"
        d = {
            impl: ops.decode_spikes(c["reference"], bits, step, (N_ELEM,), impl=impl)
            for impl in both
        }
        assert torch.equal(d["triton"], d["reference"]), f"decode_spikes bits={bits}"


def case_binary() -> None:
    g = torch.Generator().manual_seed(3)
    N, K = 150, 300
    w = (torch.randn(N, K, generator=g) * 0.8).to(DEV)
    for quant, n in ((ops.binarize, K), (ops.ternarize, N * K)):
        assert_same_quantization(quant(w, impl="triton"), quant(w, impl="reference"), n)
    for bits in (1, 2):
        packed = ops.pack_weight(w, bits, impl="triton")
        ref_packed = ops.pack_weight(w, bits, impl="reference")
        assert torch.equal(packed.words, ref_packed.words), f"pack_weight bits={bits}"
        assert torch.equal(
            ops.unpack_weight(packed, torch.float32, impl="triton"),
            ops.unpack_weight(packed, torch.float32, impl="reference"),
        ), f"unpack_weight bits={bits}"
        dtypes = (torch.float32, torch.float16) if HAS_CUDA else (torch.float32,)
        for dtype in dtypes:
            r = 1e-4 if dtype == torch.float32 else 1e-2
            tol = {"rtol": r, "atol": r}
            for M in (1, 5, 37):  # GEMV, small-M and large-M families
                x = torch.randn(M, K, generator=g).to(DEV, dtype)
                bias = torch.randn(N, generator=g).to(DEV, dtype)
                gout = torch.randn(M, N, generator=g).to(DEV, dtype)
                res = {}
                for impl in ("triton", "reference"):
                    xl = x.clone().requires_grad_()
                    out = ops.binary_matmul(xl, packed, bias, impl=impl)
                    res[impl] = (out, *torch.autograd.grad(out, xl, gout))
                _close(res["triton"], res["reference"], f"binary_matmul[{bits}, M={M}]", **tol)
                res = {}
                for impl in ("triton", "reference"):
                    leaves = [x.clone().requires_grad_(), w.clone().requires_grad_()]
                    out = ops.binary_linear(leaves[0], leaves[1], bias, bits=bits, impl=impl)
                    res[impl] = (out, *torch.autograd.grad(out, leaves, gout))
                _close(res["triton"], res["reference"], f"binary_linear[{bits}, M={M}]", **tol)


def case_binary_conv_neuron() -> None:
    from empf_triton.ops.binary_conv import binary_conv_neuron

    g = torch.Generator().manual_seed(5)
    T, N, Cin, Cout, H, W = 2, 2, 6, 5, 5, 6
    w = torch.randn(Cout, Cin, 3, 3, generator=g)
    packed = ops.pack_weight(w.to(DEV), 1, impl="reference")
    codes = torch.randint(0, 16, (T, N, Cin, H, W), generator=g, dtype=torch.uint8).to(DEV)
    scale = (torch.rand(Cout, generator=g) * 0.05 + 0.01).to(DEV)
    bias = (torch.randn(Cout, generator=g) * 0.1).to(DEV)
    decay = torch.full((T, Cout), 0.5).to(DEV)
    threshold = torch.full((T, Cout), 0.3).to(DEV)
    kw = dict(stride=1, padding=1, in_step=0.25, in_bits=4, decay=decay, threshold=threshold,
              spike_bits=4, spike_step=0.25)  # fmt: skip
    with torch.no_grad():
        out = binary_conv_neuron(codes, packed, scale, bias, impl="triton", **kw)
        ref = binary_conv_neuron(codes, packed, scale, bias, impl="reference", **kw)
    # 4-bit codes times ±1 weights are exact integers on both paths: the codes must be equal.
    assert torch.equal(out, ref), "binary_conv_neuron codes"


CASES: dict[str, Callable[[], None]] = {
    name.removeprefix("case_"): fn
    for name, fn in sorted(globals().items())
    if name.startswith("case_")
}


# ------------------------------------------------------------------------- recording and pinning


class _Recorder:
    """Wraps each autotuner's `run` to record which case reached it and with what arguments."""

    def __init__(self, tuners: dict[str, Autotuner], monkeypatch):
        self.reached: dict[str, set[str]] = {name: set() for name in tuners}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {name: [] for name in tuners}
        self.current: str | None = None
        for name, tuner in tuners.items():
            monkeypatch.setattr(tuner, "run", self._wrap(name, tuner.run), raising=False)

    def _wrap(self, name: str, run):
        def wrapped(*args, **kwargs):
            if self.current is not None:
                self.reached[name].add(self.current)
            if len(self.calls[name]) < 4:
                self.calls[name].append((args, dict(kwargs)))
            return run(*args, **kwargs)

        return wrapped

    def run_case(self, case: str) -> None:
        self.current = case
        try:
            CASES[case]()
        finally:
            self.current = None


def _pin(tuner: Autotuner, configs: list, monkeypatch) -> None:
    """Restrict `tuner` to `configs`. Its own cache and every launch cache that would bypass it
    (plans, the direct launcher's compiled kernels) start empty, so the next launches really
    go through the autotuner with these configs."""
    monkeypatch.setattr(tuner, "configs", list(configs))
    tuner.cache.clear()
    fresh_launch_caches(monkeypatch)


def _reach_map(monkeypatch) -> tuple[dict[str, Autotuner], dict[str, list], _Recorder]:
    """Run every case with every autotuner pinned to its first config; record who reaches what."""
    tuners = discover()
    assert tuners, "no Autotuner found in empf_triton.kernels: discovery is broken"
    full = {name: list(t.configs) for name, t in tuners.items()}
    for name, tuner in tuners.items():
        _pin(tuner, full[name][:1], monkeypatch)
    rec = _Recorder(tuners, monkeypatch)
    for case in CASES:
        rec.run_case(case)
    unreached = sorted(name for name, cases in rec.reached.items() if not cases)
    assert not unreached, (
        f"autotuners reached by no case in tests/test_autotune_configs.py: {unreached}; "
        "add a case (an op call, Triton against the reference) that launches each"
    )
    return tuners, full, rec


def _check_prune(tuners, full, rec) -> int:
    """Each prune function, on the arguments of real calls: a non-empty subset of the configs."""
    checked = 0
    for name, tuner in tuners.items():
        prune = getattr(tuner, "early_config_prune", None)
        if prune is None:
            continue
        for args, kwargs in rec.calls[name]:
            nargs = dict(zip(tuner.arg_names, args))
            kept = prune(full[name], nargs, **kwargs)
            assert kept, f"{name}: prune_configs_by dropped every config for {sorted(nargs)}"
            assert all(any(c is f for f in full[name]) for c in kept), (
                f"{name}: prune_configs_by returned configs that are not the autotuner's own"
            )
            checked += 1
    return checked


# ------------------------------------------------------------------------------------------ tests


def test_every_autotuner_is_reached_and_pinned_configs_match(monkeypatch):
    """CPU and GPU: discovery lists the autotuners of every kernel module, every one is reached
    by a case, the cases pass with the first (pinned) config, and the prune functions hold."""
    tuners, full, rec = _reach_map(monkeypatch)
    modules = {name.split(".")[0] for name in tuners}
    for module in ("neuron", "lif", "spikes", "binary"):
        assert module in modules, f"no autotuner found in kernels/{module}.py ({sorted(tuners)})"
    for name in tuners:
        assert full[name], f"{name} has no configs"
    assert any(getattr(t, "early_config_prune", None) for t in tuners.values()), (
        "no autotuner has a prune function (the binary GEMM's prune_configs_by was expected)"
    )
    assert _check_prune(tuners, full, rec) > 0


def test_partial_sums_with_block_larger_than_sub(monkeypatch):
    """The parameter-gradient partial sums are taken over SUB-long chunks of each BLOCK. With one
    pinned config BLOCK == SUB, so lower SUB (module constant read by the launchers) to a quarter
    and re-run the cases of the modules that define it: BLOCK = 4 * SUB must give the same
    gradients (every [T, ceil(N/SUB)] entry written, summed in the same order)."""
    tuners = discover()
    lowered = []
    for module in kernel_modules():
        sub = getattr(module, "SUB", None)
        if isinstance(sub, int) and sub >= 4:
            blocks = [c.kwargs.get("BLOCK") for c in getattr(module, "CONFIGS", [])]
            assert all(b is None or b % (sub // 4) == 0 for b in blocks)
            monkeypatch.setattr(module, "SUB", sub // 4)
            lowered.append(module.__name__)
    assert lowered, "no kernel module defines SUB: update this test with the new chunking"
    for tuner in tuners.values():
        _pin(tuner, tuner.configs[:1], monkeypatch)
    for case in ("empf_neuron", "empf_neuron_step", "parallel_neuron", "lif_neuron"):
        CASES[case]()


def _gpu_params():
    """(autotuner, config index) pairs, known at collection on a GPU with EMPF_AUTOTUNE=1."""
    if not HAS_CUDA or os.environ.get("EMPF_AUTOTUNE", "1") == "0":
        return [pytest.param("pinned", 0, id="needs-EMPF_AUTOTUNE=1")]
    return [
        pytest.param(name, i, id=f"{name}-{i}")
        for name, tuner in discover().items()
        for i in range(len(tuner.configs))
    ]


@pytest.mark.gpu
@pytest.mark.parametrize(("tuner_name", "index"), _gpu_params())
def test_each_config_on_gpu(monkeypatch, tuner_name, index):
    """GPU: autotuner `tuner_name` restricted to its config `index` (cache cleared), every case
    that reaches it re-run against the reference; the others stay on their first config."""
    if tuner_name == "pinned":
        pytest.fail(
            "EMPF_AUTOTUNE=0 pinned one config per kernel at import: run this file with "
            "EMPF_AUTOTUNE=1 (bench/run_gpu.sh does, in its own stage)"
        )
    tuners, full, rec = _reach_map(monkeypatch)
    tuner = tuners[tuner_name]
    config = full[tuner_name][index]
    _pin(tuner, [config], monkeypatch)
    for case in sorted(rec.reached[tuner_name]):
        rec.run_case(case)
    assert rec.reached[tuner_name], f"{tuner_name}: no case reaches it"
    assert tuner.best_config is config, f"{tuner_name}: ran {tuner.best_config}, not {config}"
