"""The eager paths' plans (ops/_common.py `planned`) against aliased calls.

A plan finds the launch slots of a call's tensors by identity. A first call whose tensors alias
(a step's current passed as its own v0, one gradient tensor for both the spikes and the
membrane, a parameter that is also the current) must not leave a plan that later calls, with
distinct tensors, run wrongly: every call below equals the reference op.
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
