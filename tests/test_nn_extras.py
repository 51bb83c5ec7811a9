"""Mem-BN and SECA modules, and Mem-BN wired into EMPFNeuron (docs/model.md §4)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from empf_triton import reset_net
from empf_triton.nn.membn import MemBN
from empf_triton.nn.neuron import EMPFNeuron
from empf_triton.nn.seca import SECA


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops; on a small shared CPU one intra-op thread is ~10x faster
    than several (thread hand-off dominates). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise_membn(mb: MemBN) -> None:
    with torch.no_grad():
        for name in ("weight", "bias", "p", "q", "running_mean"):
            getattr(mb, name).copy_(torch.randn_like(getattr(mb, name)))
        mb.running_var.copy_(torch.rand_like(mb.running_var) + 0.5)


# ------------------------------------------------------------------------------------- MemBN


def test_membn_train_forward_is_gated_per_step_batchnorm():
    T, C = 3, 4
    mb = MemBN(C, T)
    _randomise_membn(mb)
    rm0, rv0 = mb.running_mean.clone(), mb.running_var.clone()
    m = torch.randn(5, C, 2, 3) * 2 + 1
    out = mb(m, 1)
    mean = m.mean(dim=(0, 2, 3))
    var = m.var(dim=(0, 2, 3), unbiased=False)
    view = (1, C, 1, 1)
    bn = (m - mean.view(view)) / torch.sqrt(var.view(view) + mb.eps)
    bn = bn * mb.weight[1].view(view) + mb.bias[1].view(view)
    want = torch.sigmoid(mb.p[1]) * bn + torch.sigmoid(mb.q[1]) * m
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    # Only step 1's running statistics move.
    assert torch.equal(mb.running_mean[[0, 2]], rm0[[0, 2]])
    assert torch.equal(mb.running_var[[0, 2]], rv0[[0, 2]])
    torch.testing.assert_close(mb.running_mean[1], 0.9 * rm0[1] + 0.1 * mean)
    torch.testing.assert_close(mb.running_var[1], 0.9 * rv0[1] + 0.1 * m.var(dim=(0, 2, 3)))


def test_membn_initial_gates_and_fold_match_eval():
    T, C = 3, 6
    mb = MemBN(C, T)
    assert torch.equal(mb.p, torch.zeros(T)) and torch.equal(mb.q, torch.zeros(T))
    _randomise_membn(mb)
    mb.eval()
    k, b = mb.fold()
    assert k.shape == (T, C) and b.shape == (T, C) and not k.requires_grad
    m = torch.randn(4, C, 5)
    for t in range(T):
        torch.testing.assert_close(mb(m, t), k[t].view(1, C, 1) * m + b[t].view(1, C, 1))


def test_membn_gradcheck_fp64():
    mb = MemBN(3, 2).double()
    _randomise_membn(mb)
    m = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    params = (mb.weight, mb.bias, mb.p, mb.q)

    def f(m, w, b, p, q):
        bn = F.batch_norm(m, None, None, w[1], b[1], True, 0.1, mb.eps)
        return torch.sigmoid(p[1]) * bn + torch.sigmoid(q[1]) * m

    torch.testing.assert_close(mb(m, 1), f(m, *params))
    assert torch.autograd.gradcheck(lambda m, *ps: mb(m, 1), (m, *params))


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda: MemBN(0, 2), ValueError),
        (lambda: MemBN(3, 0), ValueError),
        (lambda: MemBN(3, True), ValueError),
        (lambda: MemBN(3, 2, eps=0), ValueError),
        (lambda: MemBN(3, 2, eps=10**400), ValueError),  # not an OverflowError
        (lambda: MemBN(3, 2, momentum=2.0), ValueError),
        (lambda: MemBN(3, 2, eps=True), ValueError),  # a bool is not taken as 1.0
        (lambda: MemBN(3, 2, momentum=True), ValueError),
        (lambda: MemBN(3, 2, eps="1e-5"), ValueError),
        (lambda: MemBN(3, 2)(torch.randn(2, 4, 5), 0), ValueError),
        (lambda: MemBN(3, 2)(torch.randn(2, 3), 2), ValueError),
        (lambda: MemBN(3, 2)(torch.randn(2, 3), -1), ValueError),
        (lambda: MemBN(3, 2)([1.0, 2.0], 0), TypeError),
    ],
)
def test_membn_bad_input_raises(make, exc):
    with pytest.raises(exc):
        make()


@pytest.mark.parametrize(
    ("module_dtype", "x", "exc", "match"),
    [
        (torch.float32, torch.ones(2, 3, dtype=torch.int64), TypeError, "dtype torch.int64"),
        (torch.float32, torch.ones(2, 3, dtype=torch.bool), TypeError, "dtype torch.bool"),
        (torch.float32, torch.ones(2, 3, dtype=torch.complex64), TypeError, "dtype torch.complex"),
        (
            torch.float32,
            torch.ones(2, 3, dtype=torch.float64),
            TypeError,
            "parameters torch.float32",
        ),
        (torch.float64, torch.ones(2, 3), TypeError, "parameters torch.float64"),
        (torch.bfloat16, torch.ones(2, 3), TypeError, "parameters torch.bfloat16"),
        (torch.float32, torch.ones(2, 3, device="meta"), ValueError, "on meta but its parameters"),
    ],
)
def test_membn_names_an_input_of_the_wrong_dtype_or_device(module_dtype, x, exc, match):
    """An input batch_norm cannot take (integer, complex, wider than the parameters, another
    device) is a TypeError/ValueError naming MemBN's input, not batch_norm's NotImplementedError
    or RuntimeError; a half-precision input with fp32 parameters (autocast) still runs."""
    mb = MemBN(3, 2).to(module_dtype)
    with pytest.raises(exc, match=f"MemBN input (has|is) .*{match}"):
        mb(x, 0)
    assert MemBN(3, 2)(torch.ones(2, 3, dtype=torch.bfloat16), 0).dtype == torch.bfloat16


# ------------------------------------------------------------------------ EMPFNeuron(mem_bn=True)


def _manual_membn_neuron(n: EMPFNeuron, x: torch.Tensor, grad_mode: str) -> torch.Tensor:
    """Eager twin of the mem_bn neuron: charge, Mem-BN (train-mode batch stats), fire, reset."""
    v, out = None, []
    mb = n.mem_bn
    for t in range(x.shape[0]):
        th = torch.sigmoid(n.threshold_logit[t])
        if n.parallel:
            m = x[t]
        else:
            lam = torch.sigmoid(n.decay_logit[t])
            m = x[t] if v is None else lam * (v.detach() if grad_mode == "online" else v) + x[t]
        bn = F.batch_norm(m, None, None, mb.weight[t], mb.bias[t], True, 0.1, mb.eps)
        m = torch.sigmoid(mb.p[t]) * bn + torch.sigmoid(mb.q[t]) * m
        s = torch.relu(m - th)
        v = torch.where(m > th, th, m)  # min(m, θ) (docs/model.md §1)
        out.append(s)
    return torch.stack(out)


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
@pytest.mark.parametrize("parallel", [False, True])
def test_membn_neuron_step_equals_multi_step_and_manual(device, impl, grad_mode, parallel):
    T, C = 3, 4
    x = torch.randn(T, 5, C, 3, device=device) + 0.3
    g = torch.randn(T, 5, C, 3, device=device)
    kw = {"mem_bn": True, "channels": C, "parallel": parallel, "grad_mode": grad_mode}
    ms = EMPFNeuron(T, step_mode="m", impl=impl, **kw).to(device)
    ss = EMPFNeuron(T, step_mode="s", impl=impl, **kw).to(device)
    man = EMPFNeuron(T, impl="reference", **kw).to(device)
    with torch.no_grad():
        for n in (ms, ss, man):
            for p in n.parameters():
                p.copy_(torch.linspace(-0.6, 0.7, p.numel()).view(p.shape))
    outs, grads_x = [], []
    for n, run in (
        (ms, lambda n, x: n(x)),
        (ss, lambda n, x: torch.stack([n(x[t]) for t in range(T)])),
        (man, lambda n, x: _manual_membn_neuron(n, x, grad_mode)),
    ):
        xi = x.clone().requires_grad_()
        out = run(n, xi)
        (out * g).sum().backward()
        outs.append(out)
        grads_x.append(xi.grad)
    for i in (1, 2):
        torch.testing.assert_close(outs[i], outs[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads_x[i], grads_x[0], rtol=1e-4, atol=1e-5)
        for a, b in zip(_grads([ms, ss, man][i]), _grads(ms)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ss.mem_bn.running_mean, ms.mem_bn.running_mean)
    torch.testing.assert_close(ss.mem_bn.running_var, ms.mem_bn.running_var)
    if not parallel:
        torch.testing.assert_close(ss.v, ms.v, rtol=1e-5, atol=1e-5)
        assert (ss.v.grad_fn is None) == (grad_mode == "online")


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("spike_bits", [None, 4])
def test_membn_neuron_fold_equals_unfolded_eval(parallel, spike_bits):
    T, C = 4, 5
    n = EMPFNeuron(T, mem_bn=True, channels=C, parallel=parallel, spike_bits=spike_bits)
    _randomise_membn(n.mem_bn)
    with torch.no_grad():
        for p in (n.threshold_logit, n.decay_logit):
            if p is not None:
                p.copy_(torch.randn(T))
    n.eval()
    x = torch.randn(T, 3, C, 4, 4)
    n.step_mode = "m"
    want = n(x)
    reset_net(n)
    n.fold_mem_bn()
    assert n.mem_bn is None and n.has_mem_bn
    assert set(n.state_dict()) >= {"mem_scale", "mem_bias"}
    got_m = n(x)
    reset_net(n)
    n.step_mode = "s"
    got_s = torch.stack([n(x[t]) for t in range(T)])
    torch.testing.assert_close(got_m, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_s, want, rtol=1e-5, atol=1e-5)
    assert want.abs().sum() > 0  # some neurons fired
    assert n.fold_mem_bn() is n  # idempotent


def test_membn_neuron_keeps_plain_neuron_untouched():
    n = EMPFNeuron(2)
    assert n.mem_bn is None and not n.has_mem_bn and n.fold_mem_bn() is n
    assert "mem_bn=False" in repr(n)


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda: EMPFNeuron(2, mem_bn=True), ValueError),
        (lambda: EMPFNeuron(2, mem_bn=True, channels=0), ValueError),
        (lambda: EMPFNeuron(2, mem_bn=1, channels=3), TypeError),
        (lambda: EMPFNeuron(2, mem_bn=True, channels=3)(torch.randn(4, 2, 5)), ValueError),
        (lambda: EMPFNeuron(2, mem_bn=True, channels=3)(torch.randn(3)), ValueError),
        (
            lambda: EMPFNeuron(2, mem_bn=True, channels=3, step_mode="m")(torch.randn(2, 4, 5)),
            ValueError,
        ),
    ],
)
def test_membn_neuron_bad_input_raises(make, exc):
    with pytest.raises(exc):
        make()


# -------------------------------------------------------------------------------------- SECA


def _eca(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    N, C = x.shape[:2]
    y = x.reshape(N, C, -1).mean(-1)
    k = w.shape[-1]
    yp = F.pad(y, (k // 2, k // 2))
    z = torch.stack([(yp[:, c : c + k] * w.view(1, k)).sum(-1) for c in range(C)], dim=1)
    return x * torch.sigmoid(z).view(N, C, *(1,) * (x.dim() - 2))


@pytest.mark.parametrize("shape", [(2, 7, 5, 6), (3, 9, 11), (1, 1, 4, 4)])
@pytest.mark.parametrize("kernel_size", [5, 3, 1])
def test_seca_matches_eca_formula(shape, kernel_size):
    seca = SECA(shape[1], kernel_size)
    x = torch.randn(shape, requires_grad=True)
    out = seca(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _eca(x, seca.weight), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert seca.weight.grad is not None and seca.weight.grad.abs().sum() > 0


def test_seca_multi_step_is_per_step_with_shared_weights():
    T, C = 3, 8
    s = SECA(C)
    m = SECA(C, step_mode="m")
    m.load_state_dict(s.state_dict())
    x = torch.randn(T, 2, C, 4, 5)
    x[1] *= 5  # a different pooled current per step
    want = torch.stack([s(x[t]) for t in range(T)])
    torch.testing.assert_close(m(x), want)


def test_seca_keeps_dtype_and_gradcheck():
    s = SECA(6, 3)
    assert s(torch.randn(2, 6, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16
    s = s.double()
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: s(x), (x, s.weight))


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda: SECA(0), ValueError),
        (lambda: SECA(4, kernel_size=4), ValueError),
        (lambda: SECA(4, kernel_size=0), ValueError),
        (lambda: SECA(4, step_mode="x"), ValueError),
        (lambda: SECA(4)(torch.randn(2, 4)), ValueError),
        (lambda: SECA(4)(torch.randn(2, 5, 3)), ValueError),
        (lambda: SECA(4, step_mode="m")(torch.randn(2, 4, 3)), ValueError),
        (lambda: SECA(4)(torch.ones(2, 4, 3, dtype=torch.int64)), ValueError),
    ],
)
def test_seca_bad_input_raises(make, exc):
    with pytest.raises(exc):
        make()
