"""The eager paths' plans (ops/_common.py `planned`): a launch's arguments worked out once per
call form, each call's tensors filled in.

A plan finds the launch slots of a call's tensors by identity. A first call whose tensors alias
(a step's current passed as its own v0, one gradient tensor for both the spikes and the
membrane, a parameter that is also the current, a GEMM's scale passed as its bias) must not
leave a plan that later calls, with distinct tensors, run wrongly; and a plan must read each
call's own tensors (parameters, packed weights, latent weights), never the first call's. Every
call below equals the reference op.
"""

from __future__ import annotations

import pytest
import torch

import empf_triton.ops.lif as ops_lif
import empf_triton.ops.neuron as ops_neuron
from empf_triton.ops.lif import lif_neuron, lif_neuron_step
from empf_triton.ops.neuron import empf_neuron, empf_neuron_step

STEP_OPS = {"empf": empf_neuron_step, "lif": lif_neuron_step}


@pytest.fixture(autouse=True)
def _fresh_plans():
    """Each test starts with empty plan caches, so its first call is the one that plans."""
    for mod in (ops_neuron, ops_lif):
        mod._FWD_PLANS.clear()
        mod._BWD_PLANS.clear()
    yield


def _step(op, x, v, impl, **kw):
    return STEP_OPS[op](x, v, decay=0.5, threshold=0.4, impl=impl, **kw)


def _grads_of(op, x, v, impl):
    """Outputs and the gradients of current and v for a weighted sum of spikes and membrane."""
    x = x.detach().clone().requires_grad_()
    v = v.detach().clone().requires_grad_()
    s, v_last = _step(op, x, v, impl)
    w = torch.linspace(-1.0, 1.0, s.numel(), device=s.device).view_as(s)
    (s * w + v_last * w.flip(0)).sum().backward()
    return s.detach(), v_last.detach(), x.grad, v.grad


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("op", list(STEP_OPS))
def test_a_plan_is_not_made_from_a_current_passed_as_its_own_v0(device, op, grad):
    x = torch.rand(300, device=device)
    with torch.set_grad_enabled(grad):
        xa = x.clone().requires_grad_(grad)
        first = _step(op, xa, xa, "triton")  # one tensor as current and v0
        ref = _step(op, xa.detach(), xa.detach(), "reference")
        for a, b in zip(first, ref):
            torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)
        x2 = torch.rand(300, device=device).requires_grad_(grad)
        v2 = torch.rand(300, device=device) - 0.5
        out = _step(op, x2, v2, "triton")
    ref = _step(op, x2.detach(), v2, "reference")
    for a, b in zip(out, ref):
        torch.testing.assert_close(a.detach(), b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op", list(STEP_OPS))
def test_a_plan_is_not_made_from_one_gradient_tensor_for_spikes_and_membrane(device, op):
    """`backward([s, v_last], [g, g])` hands backward one tensor as both outputs' gradient."""
    x = (torch.rand(300, device=device) - 0.2).requires_grad_()
    v = (torch.rand(300, device=device) - 0.5).requires_grad_()
    g = torch.linspace(-1.0, 1.0, 300, device=device)
    torch.autograd.backward(list(_step(op, x, v, "triton")), [g, g])
    xr, vr = x.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    torch.autograd.backward(list(_step(op, xr, vr, "reference")), [g, g])
    torch.testing.assert_close(x.grad, xr.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(v.grad, vr.grad, rtol=0, atol=1e-6)
    # then distinct gradients: the call form that planned above must give the reference's
    x2, v2 = torch.rand(300, device=device) - 0.3, torch.rand(300, device=device)
    got = _grads_of(op, x2, v2, "triton")
    want = _grads_of(op, x2, v2, "reference")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("op", ["empf", "lif"])
def test_a_plan_is_not_made_from_a_parameter_that_is_also_the_initial_membrane(device, op):
    """A [T] decay parameter passed as v0 too (bptt), for a current [T, T] (T neurons)."""
    fn = empf_neuron if op == "empf" else lif_neuron
    p = torch.nn.Parameter(torch.tensor([0.2, 0.9, 0.6, 0.3], device=device))
    x = torch.linspace(-0.5, 2.0, 16, device=device).view(4, 4)
    w = torch.linspace(-1.0, 1.0, 16, device=device).view(4, 4)
    for v0 in (p, torch.tensor([0.7, -0.1, 0.4, 1.2], device=device)):
        res = []
        for impl in ("triton", "reference"):
            xi = x.clone().requires_grad_()
            p.grad = None
            s, v_last = fn(xi, v0, decay=p, threshold=0.5, grad_mode="bptt", impl=impl)
            ((s * w).sum() + (v_last * w[0]).sum()).backward()
            res.append((s.detach(), v_last.detach(), xi.grad, p.grad))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def _param_forms(device, T: int, C: int):
    """Tensor parameter forms of a [T, 2, C] current, each made anew per call as a user's code
    would (a sigmoid of logits, a 0-d tensor, a [1, C] per-channel row, a plain [T] tensor):
    name -> make(seed) -> (decay, threshold)."""

    def vals(seed, *shape):
        g = torch.Generator(device="cpu").manual_seed(seed)
        return torch.rand(*shape, generator=g).to(device)

    return {
        "sigmoid[T]": lambda s: (torch.sigmoid(vals(s, T) * 4 - 2), vals(s + 1, T) * 0.8),
        "0-d": lambda s: (vals(s, ()), vals(s + 1, ()) * 0.8),
        "per-channel[1,C]": lambda s: (vals(s, 1, C), vals(s + 1, 1, C) * 0.8),
        "mixed": lambda s: (vals(s, T), 0.3),
    }


_FORM_CASES = [
    (op, form)
    for op in ("empf", "lif", "parallel")
    for form in _param_forms("cpu", 3, 5)
    if not (op == "lif" and form == "per-channel[1,C]")  # LIF parameters are per step only
]


@pytest.mark.parametrize(("op", "form"), _FORM_CASES)
def test_plans_take_each_calls_parameter_tensors(device, op, form):
    """Plans key tensor parameters by form (shape, strides) and take each call's tensors: calls
    with new parameter tensors of one form reuse one plan, and every call's outputs and
    gradients (current and parameters) equal the reference's for its own values."""
    T, C = 3, 5
    make = _param_forms(device, T, C)[form]
    mod = ops_lif if op == "lif" else ops_neuron
    x = torch.linspace(-0.6, 1.8, T * 2 * C, device=device).view(T, 2, C)
    w = torch.linspace(-1.0, 1.0, T * 2 * C, device=device).view(T, 2, C)
    for seed in (0, 10, 20):
        res = []
        for impl in ("triton", "reference"):
            d, th = make(seed)
            d = d.clone().requires_grad_()
            th = th.clone().requires_grad_() if isinstance(th, torch.Tensor) else th
            xi = x.clone().requires_grad_()
            if op == "parallel":
                s = ops_neuron.parallel_neuron(xi, threshold=d, spike_bits=3, impl=impl)
                loss = (s * w).sum()
            else:
                fn = empf_neuron if op == "empf" else lif_neuron
                s, v = fn(xi, decay=d, threshold=th, grad_mode="bptt", impl=impl)
                loss = (s * w).sum() + (v * w[0]).sum()
            loss.backward()
            grads = [t.grad for t in (xi, d, th) if isinstance(t, torch.Tensor)]
            res.append((s.detach(), *grads))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert len(mod._FWD_PLANS) == 1 and len(mod._BWD_PLANS) == 1


@pytest.mark.parametrize("op", ["empf", "lif", "parallel"])
def test_plans_keep_no_tensor_of_the_call_that_made_them(device, op):
    """Plans live as long as the process: the forward and backward plans must not keep the
    current, the parameter tensors or the outputs of the call that made them (a sigmoid of
    logits computed per call, activations)."""
    import gc
    import weakref

    mod = ops_lif if op == "lif" else ops_neuron
    refs = []
    for seed in (0, 1):  # the first call makes the plans, the second runs them
        x = torch.linspace(-0.6, 1.8, 3 * 10, device=device).view(3, 10).requires_grad_()
        d = torch.sigmoid(torch.full((3,), 0.2 * seed, device=device)).requires_grad_()
        th = torch.full((3,), 0.4, device=device).requires_grad_()
        if op == "parallel":
            out = (ops_neuron.parallel_neuron(x, threshold=th, spike_bits=3, impl="triton"),)
        else:
            fn = empf_neuron if op == "empf" else lif_neuron
            out = fn(x, decay=d, threshold=th, grad_mode="bptt", impl="triton")
        sum(o.sum() for o in out).backward()
        assert th.grad is not None
        refs += [weakref.ref(t) for t in (x, d, th, *out, x.grad, th.grad)]
        del x, d, th, out
    assert len(mod._FWD_PLANS) == 1 and len(mod._BWD_PLANS) == 1
    gc.collect()
    assert [r() is None for r in refs] == [True] * len(refs)


@pytest.mark.parametrize("op", ["empf", "lif"])
def test_a_plan_is_not_made_from_one_tensor_as_decay_and_threshold(device, op):
    fn = empf_neuron if op == "empf" else lif_neuron
    x = torch.linspace(-0.5, 2.0, 12, device=device).view(3, 4)
    both = torch.tensor([0.3, 0.6, 0.9], device=device)
    d2 = torch.tensor([0.8, 0.1, 0.5], device=device)
    th2 = torch.tensor([0.2, 0.7, 0.4], device=device)
    for d, th in ((both, both), (d2, th2)):
        res = []
        for impl in ("triton", "reference"):
            xi = x.clone().requires_grad_()  # the autograd path, which plans
            s, v = fn(xi, decay=d, threshold=th, impl=impl)
            (s.sum() + v.sum()).backward()
            res.append((s.detach(), v.detach(), xi.grad))
        for a, b in zip(*res):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(ops_neuron._FWD_PLANS if op == "empf" else ops_lif._FWD_PLANS) == 1


# ------------------------------------------------------------------------- the packed GEMM


def _gemm_case(x, packed, bias, impl):
    """binary_matmul's output and the gradients of x and bias for a fixed weighting."""
    from empf_triton.ops.binary import binary_matmul

    x = x.detach().clone().requires_grad_()
    b = None if bias is None else bias.detach().clone().requires_grad_()
    y = binary_matmul(x, packed, b, impl=impl)
    w = torch.linspace(-1.0, 1.0, y.numel(), device=y.device).view_as(y)
    (y * w).sum().backward()
    return y.detach(), x.grad, None if b is None else b.grad


@pytest.mark.parametrize("bits", [1, 2])
def test_gemm_plans_take_each_calls_tensors(device, bits):
    """One plan per GEMM form (forward and input gradient; with and without bias; each K), and
    every later call, with new activations, new packed words and scales of the same shapes and
    a new bias, equals the reference."""
    import empf_triton.ops.binary as ops_binary
    from empf_triton.ops.binary import pack_weight

    ops_binary._GEMM_PLANS.clear()
    torch.manual_seed(0)
    # K = 70 and 90: the same packed words shape (3 words a row), other input-gradient widths
    for K in (70, 90, 70):
        packed = pack_weight(torch.randn(13, K, device=device), bits)
        for bias in (None, torch.randn(13, device=device)):
            x = torch.randn(5, K, device=device)
            got = _gemm_case(x, packed, bias, "triton")
            ref = _gemm_case(x, packed, bias, "reference")
            for a, b in zip(got, ref):
                if b is not None:
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # per K: forward with bias, forward without, the transposed (input-gradient) GEMM
    assert len(ops_binary._GEMM_PLANS) == 6


def test_a_gemm_plan_is_not_made_from_the_scale_passed_as_bias(device):
    """A first call whose bias is the packed scale itself (one tensor in two slots) runs
    unplanned; a later call with its own bias reads that bias."""
    import empf_triton.ops.binary as ops_binary
    from empf_triton.ops.binary import binary_matmul, pack_weight

    ops_binary._GEMM_PLANS.clear()
    torch.manual_seed(1)
    packed = pack_weight(torch.randn(9, 40, device=device), 1)
    x = torch.randn(3, 40, device=device)
    with torch.no_grad():
        first = binary_matmul(x, packed, packed.scale, impl="triton")
        torch.testing.assert_close(
            first, binary_matmul(x, packed, packed.scale.clone(), impl="reference")
        )
        assert len(ops_binary._GEMM_PLANS) == 0
        bias = torch.randn(9, device=device)
        got = binary_matmul(x, packed, bias, impl="triton")
    torch.testing.assert_close(got, binary_matmul(x, packed, bias, impl="reference"))


@pytest.mark.parametrize("bits", [1, 2])
def test_weight_plans_take_each_calls_weight(device, bits):
    """The weight quantiser, the pack of `binary_linear` and the STE gradient are planned per
    weight form (binary: one row-kernel launch each; ternary: the three statistics launches
    with a scratch buffer new per call, and the pack launch): later calls with new weights (a
    training step's update) equal the reference, one plan per kernel form."""
    import empf_triton.ops.binary as ops_binary
    from empf_triton.ops.binary import binarize, binary_linear, ternarize

    quant = binarize if bits == 1 else ternarize
    ops_binary._WEIGHT_PLANS.clear()
    torch.manual_seed(2)
    for _ in range(3):
        w = (torch.randn(6, 45, device=device) * 0.8).requires_grad_()
        x = torch.randn(4, 45, device=device)
        outs = []
        for impl in ("triton", "reference"):
            w.grad = None
            q = quant(w, impl=impl)
            y = binary_linear(x, w, bits=bits, impl=impl)
            (q * q.detach().sign() + y.sum() * 0.1).sum().backward()
            outs.append((q.detach(), y.detach(), w.grad.clone()))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the quantiser's launches, the packing launches, the STE kernel
    assert len(ops_binary._WEIGHT_PLANS) == 3


# ---------------------------------------------------- the custom ops (what torch.compile calls)


def _op_plans(mod) -> int:
    return sum(1 for cache in (mod._FWD_PLANS, mod._BWD_PLANS) for k in cache if k[0] == "op")


@pytest.mark.parametrize("op", ["empf", "parallel", "lif"])
def test_custom_op_plans_take_each_calls_tensors(device, op, monkeypatch):
    """The torch.library ops' Triton implementations (what a compiled model runs) keep plans
    too: the traced path, run eagerly here (`is_compiling` patched to True), gives the reference
    on every call with new currents, membranes and parameter tensors, from one forward and one
    backward plan."""
    from empf_triton.ops.neuron import parallel_neuron

    mod = ops_lif if op == "lif" else ops_neuron
    mod._FWD_PLANS.clear()
    mod._BWD_PLANS.clear()
    # (tests/conftest.py has dynamo build its rule map before any test patches is_compiling)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.manual_seed(3)
    T, N = 3, 37
    for _ in range(3):
        leaves = [
            torch.randn(T, N, device=device) + 0.4,
            torch.rand(N, device=device) - 0.5,
            torch.rand(T, device=device) * 0.8 + 0.1,
            torch.rand(T, device=device) * 0.5 + 0.2,
        ]
        got, ref = [], []
        for impl, out in (("triton", got), ("reference", ref)):
            x, v0, d, th = (t.detach().clone().requires_grad_() for t in leaves)
            if op == "empf":
                res = empf_neuron(x, v0, decay=d, threshold=th, grad_mode="bptt", impl=impl)
                ins = (x, v0, d, th)
            elif op == "lif":
                res = lif_neuron(x, v0, decay=d, threshold=th, impl=impl)
                ins = (x, v0, d, th)
            else:
                res = (parallel_neuron(x, threshold=th, spike_bits=3, impl=impl),)
                ins = (x, th)
            w = torch.linspace(-1.0, 1.0, x.numel(), device=device).view_as(x)
            loss = (res[0] * w).sum() + (res[1] * w[0].flip(0)).sum() if len(res) > 1 else None
            (loss if loss is not None else (res[0] * w).sum()).backward()
            out.extend([r.detach() for r in res] + [t.grad for t in ins])
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert _op_plans(mod) == 2


def test_spike_plans_take_each_calls_tensor(device):
    """quantize_spikes, encode_spikes and decode_spikes keep one plan per form; later calls
    with new spikes and codes equal the reference."""
    import empf_triton.ops.spikes as ops_spikes
    from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes

    ops_spikes._PLANS.clear()
    torch.manual_seed(4)
    for _ in range(3):
        s = (torch.rand(5, 19, device=device) * 1.2).requires_grad_()
        outs = []
        for impl in ("triton", "reference"):
            s.grad = None
            q = quantize_spikes(s, 2, 0.25, impl=impl)
            (q * torch.arange(q.numel(), device=device).view_as(q)).sum().backward()
            codes = encode_spikes(s.detach(), 2, 0.25, impl=impl)
            back = decode_spikes(codes, 2, 0.25, (5, 19), impl=impl)
            outs.append((q.detach(), s.grad.clone(), codes, back))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(ops_spikes._PLANS) == 3
