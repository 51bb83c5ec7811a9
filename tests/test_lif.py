"""LIF baseline ops: Triton kernels vs the eager reference vs an fp64 oracle, the reference's
surrogate-gradient rule, and equality with SpikingJelly's LIFNode (docs/model.md)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    HALF_DTYPES,
    assert_close_to_oracle,
    assert_half_matches_fp32_oracle,
    carry_forward,
    import_spikingjelly,
    lif_decision_distance,
    near_boundary,
)

import empf_triton.ops._common as common
import empf_triton.reference.lif as ref_lif
from empf_triton.ops.lif import lif_neuron, lif_neuron_step
from empf_triton.reference.lif import SURROGATES, lif_neuron_ref, surrogate_grad_ref

SIZES = [1, 7, 63, 1000, 4097]
NAMES = ["spikes", "v_last", "d_current", "d_v0", "d_decay", "d_threshold"]


def _inputs(T, N, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cur = (torch.randn(T, N, generator=gen) * 0.8 + 0.35).double()
    v0 = (torch.randn(N, generator=gen) * 0.3).double()
    decay = (torch.rand(T, generator=gen) * 0.5 + 0.4).float()  # λ in (0.4, 0.9)
    th = (torch.rand(T, generator=gen) * 0.5 + 0.4).float()  # θ in (0.4, 0.9)
    g = torch.randn(T, N, generator=gen).double()
    gv = torch.randn(N, generator=gen).double()
    return [x.to(device) for x in (cur, v0, decay, th, g, gv)]


def _run(impl, dtype, cur, v0, decay, th, g, gv, *, use_v0=True, **kw):
    """Forward + backward of lif_neuron at `dtype` (params at fp32, or fp64 for the oracle)."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    c = cur.detach().to(dtype).clone().requires_grad_()
    v = v0.detach().to(dtype).clone().requires_grad_() if use_v0 else None
    d = decay.detach().to(pdtype).clone().requires_grad_()
    t = th.detach().to(pdtype).clone().requires_grad_()
    spikes, v_last = lif_neuron(c, v, decay=d, threshold=t, impl=impl, **kw)
    loss = (spikes * g.to(dtype)).sum() + (v_last * gv.to(dtype)).sum()
    loss.backward()
    return dict(
        zip(
            NAMES,
            [spikes.detach(), v_last.detach(), c.grad, v.grad if use_v0 else None, d.grad, t.grad],
        )
    )


def _compare(device, dtype, T, N, seed=0, **kw):
    """Triton and same-dtype reference against the fp64 oracle on the same (rounded) data."""
    cur, v0, decay, th, g, gv = _inputs(T, N, device, seed=seed)
    cur, v0, g, gv = (x.to(dtype).double() for x in (cur, v0, g, gv))
    kern = _run("triton", dtype, cur, v0, decay, th, g, gv, **kw)
    ref = _run("reference", dtype, cur, v0, decay, th, g, gv, **kw)
    oracle = _run("reference", torch.float64, cur, v0, decay, th, g, gv, **kw)
    for name in NAMES:
        assert_close_to_oracle(name, kern[name], ref[name], oracle[name], data_dtype=dtype)
        if name in ("d_decay", "d_threshold"):
            assert kern[name].dtype == torch.float32
        elif kern[name] is not None:
            assert kern[name].dtype == dtype, name
    assert set(kern["spikes"].unique().tolist()) <= {0.0, 1.0}
    if dtype == torch.float32:
        # Same fp32 operations in the same order: the forward is bit-exact.
        assert torch.equal(kern["spikes"], ref["spikes"])
        assert torch.equal(kern["v_last"], ref["v_last"])
    if kw.get("grad_mode") == "online":
        assert kern["d_v0"] is None and ref["d_v0"] is None
    if dtype in HALF_DTYPES:
        # fp32-compute oracle: spikes flip only near θ (and the neuron's later steps with them).
        c32, v32, g32, gv32 = (x.float() for x in (cur, v0, g, gv))
        o32 = _run("reference", torch.float32, c32, v32, decay, th, g32, gv32, **kw)
        dist, m = lif_decision_distance(c32, v32 if kw.get("use_v0", True) else None, decay, th)
        may_flip = carry_forward(near_boundary(dist, m, dtype))
        assert_half_matches_fp32_oracle("spikes", kern["spikes"], o32["spikes"], may_flip)
        assert_half_matches_fp32_oracle("v_last", kern["v_last"], o32["v_last"], may_flip[-1])
    return kern


# ---------------------------------------------------------------------------------------------
# Triton vs reference vs fp64 oracle.


@pytest.mark.parametrize("N", SIZES)
def test_sizes_fp32(device, N):
    kern = _compare(device, torch.float32, 8, N, seed=N, grad_mode="bptt")
    if N >= 63:  # the inputs exercise both firing and silence
        assert 0.1 < kern["spikes"].mean() < 0.9


@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("grad_mode", ["bptt", "online"])
@pytest.mark.parametrize("surrogate", list(SURROGATES))
def test_surrogates_modes_reset(device, surrogate, grad_mode, detach_reset):
    _compare(
        device,
        torch.float32,
        8,
        63,
        seed=3,
        surrogate=surrogate,
        grad_mode=grad_mode,
        detach_reset=detach_reset,
        use_v0=not detach_reset,
    )


@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("grad_mode", ["bptt", "online"])
def test_time_steps(device, T, grad_mode):
    _compare(
        device, torch.float32, T, 1000, seed=T, surrogate="atan", grad_mode=grad_mode, alpha=3.0
    )


@pytest.mark.parametrize("grad_mode", ["bptt", "online"])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes(device, dtype, T, grad_mode):
    for i, N in enumerate(SIZES):
        surrogate = list(SURROGATES)[i % 3]
        _compare(
            device,
            dtype,
            T,
            N,
            seed=N + T,
            surrogate=surrogate,
            grad_mode=grad_mode,
            detach_reset=i % 2 == 1,
        )


def test_partial_gradients(device):
    """Only some inputs need a gradient: the kernel skips the rest and the others stay right."""
    cur, v0, decay, th, g, gv = _inputs(4, 300, device, seed=11)
    one_each = [tuple(i == k for i in range(4)) for k in range(4)]
    for wants in one_each:
        got = {}
        for impl in ("triton", "reference"):
            leaves = [
                x.float().clone().requires_grad_(w) for x, w in zip((cur, v0, decay, th), wants)
            ]
            s, v = lif_neuron(leaves[0], leaves[1], decay=leaves[2], threshold=leaves[3], impl=impl)
            ((s * g.float()).sum() + (v * gv.float()).sum()).backward()
            got[impl] = [x.grad for x in leaves]
        for a, b, w in zip(got["triton"], got["reference"], wants):
            assert (a is not None) == w and (b is not None) == w
            if w:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_only_spike_or_only_v_last_gradient(device):
    cur, v0, decay, th, g, gv = _inputs(3, 200, device, seed=2)
    for use in ("spikes", "v_last"):
        res = {}
        for impl in ("triton", "reference"):
            c = cur.float().requires_grad_()
            t = th.clone().requires_grad_()
            s, v = lif_neuron(c, v0.float(), decay=decay, threshold=t, impl=impl)
            ((s * g.float()).sum() if use == "spikes" else (v * gv.float()).sum()).backward()
            res[impl] = (c.grad, t.grad)
        for a, b in zip(res["triton"], res["reference"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("grad_mode", "detach_reset"), [("online", True), ("online", False), ("bptt", True)]
)
def test_nan_current_with_only_a_v_last_loss(device, grad_mode, detach_reset):
    """With no gradient for the spikes, a spike outside the graph (detached reset, or an earlier
    step online) gets none, nor does λ_t at an earlier step online: a NaN current's sg'(NaN) and
    NaN membrane must not reach the gradients (the kernel once multiplied the missing dL/ds, 0,
    by sg'(NaN), and online the missing dL/dm[t], 0, by v[t-1])."""
    nan = float("nan")
    res = {}
    for impl in ("triton", "reference"):
        c = torch.tensor([[nan, 0.2], [0.1, 0.3], [0.4, 0.2]], device=device, requires_grad=True)
        d = torch.tensor([0.5, 0.6, 0.7], device=device, requires_grad=True)
        t = torch.tensor(0.5, device=device, requires_grad=True)
        _, v = lif_neuron(
            c, decay=d, threshold=t, detach_reset=detach_reset, grad_mode=grad_mode, impl=impl
        )
        v.sum().backward()
        res[impl] = (c.grad, d.grad, t.grad)
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isfinite(res["triton"][0][0, 0]) and res["triton"][1][0] == 0


@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
def test_infinite_threshold_reset_term_only_where_v_reaches_the_loss(device, grad_mode):
    """The reset's -θ dL/dv[t] exists only where v[t] reaches the loss (online: not before the
    last step; without a v_last loss: not at the last step). An infinite θ_t elsewhere must not
    make it 0 * inf = NaN (it did, in the kernel)."""
    inf = float("inf")
    res = {}
    for impl in ("triton", "reference"):
        c = torch.tensor([[0.3, 0.2], [0.2, 0.5]], device=device, requires_grad=True)
        t = torch.tensor([inf, -0.25], device=device) if grad_mode == "online" else None
        t = torch.tensor([0.4, inf], device=device) if t is None else t
        s, _ = lif_neuron(c, decay=0.5, threshold=t, grad_mode=grad_mode, impl=impl)
        s.sum().backward()
        res[impl] = c.grad
    torch.testing.assert_close(res["triton"], res["reference"], equal_nan=True)
    assert torch.isfinite(res["triton"][1 if grad_mode == "bptt" else 0]).all()


def test_fp16_tiny_negative_margin_is_not_a_spike(device):
    """m - θ = -1e-8 underflows to -0.0 in fp16; the kernel must still treat it as silent in the
    backward (the saved h keeps its sign), as the fp64 oracle does."""
    cur = torch.zeros(1, 16, device=device, dtype=torch.float16)
    gv = torch.ones(16, device=device, dtype=torch.float16)
    res = {}
    for impl, dt in (("triton", torch.float16), ("oracle", torch.float64)):
        c = cur.to(dt).clone().requires_grad_()
        t = torch.tensor(
            1e-8, device=device, dtype=torch.float32 if impl == "triton" else dt, requires_grad=True
        )
        s, v = lif_neuron(c, decay=0.5, threshold=t, impl="reference" if impl == "oracle" else impl)
        (v * gv.to(dt)).sum().backward()
        res[impl] = (s.detach().double(), t.grad.double(), c.grad.double())
    assert torch.equal(res["triton"][0], res["oracle"][0]) and res["oracle"][0].sum() == 0
    for a, b in zip(res["triton"][1:], res["oracle"][1:]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)


def test_fires_at_equality(device):
    # H(0) = 1: m == θ exactly fires, and the soft reset leaves 0.
    cur = torch.tensor([[0.5, 0.25, 0.75]], device=device)
    for impl in ("triton", "reference"):
        s, v = lif_neuron(cur, decay=0.5, threshold=0.5, impl=impl)
        assert s.tolist() == [[1.0, 0.0, 1.0]] and v.tolist() == [0.0, 0.25, 0.25]


# ---------------------------------------------------------------------------------------------
# The reference: surrogate rule and gradient composition.


def _primitive(x, surrogate, alpha):
    """A smooth stand-in for H whose derivative is exactly the surrogate sg'."""
    if surrogate == "sigmoid":
        return torch.sigmoid(alpha * x)
    if surrogate == "atan":
        return torch.atan(math.pi / 2 * alpha * x) / math.pi + 0.5
    lo = (x + alpha).clamp(min=0, max=alpha) ** 2 / (2 * alpha**2)
    hi = 1 - (alpha - x).clamp(min=0, max=alpha) ** 2 / (2 * alpha**2)
    return torch.where(x < 0, lo, hi)


@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("grad_mode", ["bptt", "online"])
@pytest.mark.parametrize("surrogate", list(SURROGATES))
def test_reference_gradcheck_with_smooth_spike(monkeypatch, surrogate, grad_mode, detach_reset):
    """Swap H for the surrogate's smooth primitive P (P' = sg'): the reference's gradient must then
    be the true derivative (gradcheck, BPTT without detach), or, where a detach cuts a path on
    purpose (online, detach_reset), equal plain autograd through P with the same detaches. This
    pins sg' and the way the reference composes it; the kernels are checked against it."""
    monkeypatch.setattr(ref_lif, "_fire", _primitive)
    gen = torch.Generator().manual_seed(4)
    cur = (torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.8 + 0.4).requires_grad_()
    v0 = (torch.randn(6, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    decay = torch.tensor([0.5, 0.7, 0.6], dtype=torch.float64, requires_grad=True)
    th = torch.tensor([0.3, 0.45, 0.5], dtype=torch.float64, requires_grad=True)
    alpha = {"sigmoid": 3.0, "atan": 2.0, "triangle": 0.8}[surrogate]

    def f(c, v, d, t):
        return lif_neuron_ref(c, v, d, t, surrogate, alpha, detach_reset, grad_mode)

    if detach_reset or grad_mode == "online":
        # The detaches make the gradient differ from the forward's derivative, so no gradcheck.
        def g_plain(c, v, d, t):
            vv, out = v, []
            for k in range(c.shape[0]):
                m = d[k] * (vv.detach() if grad_mode == "online" else vv) + c[k]
                s = _primitive(m - t[k], surrogate, alpha)
                vv = m - (s.detach() if detach_reset else s) * t[k]
                out.append(s)
            return torch.stack(out), vv

        ws = torch.randn(3, 6, generator=gen, dtype=torch.float64)
        wv = torch.randn(6, generator=gen, dtype=torch.float64)
        leaves = (cur, v0, decay, th)
        a = torch.autograd.grad(
            sum((o * w).sum() for o, w in zip(f(*leaves), (ws, wv))), leaves, allow_unused=True
        )
        b = torch.autograd.grad(
            sum((o * w).sum() for o, w in zip(g_plain(*leaves), (ws, wv))),
            leaves,
            allow_unused=True,
        )
        for x, y in zip(a, b):
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
        # P' = sg' (the custom backward is P's true derivative).
        x = torch.linspace(-2, 2, 100, dtype=torch.float64).requires_grad_()  # misses 0, ±α
        assert torch.autograd.gradcheck(lambda z: ref_lif.spike_ref(z, surrogate, alpha), (x,))
    else:
        assert torch.autograd.gradcheck(f, (cur, v0, decay, th))


def test_reference_forward_is_heaviside_and_surrogate_formulas():
    x = torch.tensor([-1.0, -1e-12, 0.0, 1e-12, 0.3], dtype=torch.float64)
    s = lif_neuron_ref(x[None] + 0.5, None, torch.tensor([0.5]), torch.tensor([0.5]))[0]
    assert s.tolist() == [[0.0, 0.0, 1.0, 1.0, 1.0]]
    xs = torch.linspace(-3, 3, 61, dtype=torch.float64)
    sig = torch.sigmoid(4 * xs)
    torch.testing.assert_close(surrogate_grad_ref(xs, "sigmoid", 4.0), 4 * sig * (1 - sig))
    torch.testing.assert_close(surrogate_grad_ref(xs, "atan", 2.0), 1.0 / (1 + (math.pi * xs) ** 2))
    torch.testing.assert_close(surrogate_grad_ref(xs, "triangle", 1.0), (1 - xs.abs()).clamp(min=0))
    torch.testing.assert_close(
        surrogate_grad_ref(xs, "triangle", 2.0), (2 - xs.abs()).clamp(min=0) / 4
    )
    with pytest.raises(ValueError, match="surrogate"):
        surrogate_grad_ref(xs, "relu", 1.0)


# ---------------------------------------------------------------------------------------------
# Single step, non-contiguous input, no-grad path, dispatch.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_step_matches_multistep_t1(device, dtype):
    cur, v0, decay, th, g, gv = _inputs(1, 1000, device, seed=9)
    outs = {}
    for impl, dt in (("triton", dtype), ("reference", dtype), ("oracle", torch.float64)):
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        c = cur[0].to(dtype).to(dt).requires_grad_()
        v = v0.to(dtype).to(dt).requires_grad_()
        d = decay[0].to(pdt).requires_grad_()
        t = th[0].to(pdt).requires_grad_()
        s, vn = lif_neuron_step(
            c,
            v,
            decay=d,
            threshold=t,
            surrogate="atan",
            impl="reference" if impl == "oracle" else impl,
        )
        ((s * g[0].to(dtype).to(dt)).sum() + (vn * gv.to(dtype).to(dt)).sum()).backward()
        outs[impl] = [s.detach(), vn.detach(), c.grad, v.grad, d.grad, t.grad]
    multi = _run("triton", dtype, cur, v0, decay, th, g, gv, surrogate="atan", grad_mode="bptt")
    for i, name in enumerate(NAMES):
        a = outs["triton"][i]
        b = multi[name][0] if name in ("spikes", "d_current") else multi[name]
        assert torch.equal(a, b.reshape(a.shape)), name  # the step op is the T = 1 kernel
        assert_close_to_oracle(name, a, outs["reference"][i], outs["oracle"][i], data_dtype=dtype)


def test_online_steps_equal_online_sequence(device):
    """T calls of the step op with v detached between steps = the multi-step op in online mode."""
    cur, v0, decay, th, g, gv = _inputs(3, 63, device, seed=6)
    cur, v0, g, gv = cur.float(), v0.float(), g.float(), gv.float()
    d1, t1 = decay.clone().requires_grad_(), th.clone().requires_grad_()
    c1 = cur.clone().requires_grad_()
    s, v = lif_neuron(c1, v0, decay=d1, threshold=t1, grad_mode="online", impl="triton")
    ((s * g).sum() + (v * gv).sum()).backward()
    d2, t2 = decay.clone().requires_grad_(), th.clone().requires_grad_()
    c2 = cur.clone().requires_grad_()
    vk, loss = v0, 0.0
    for k in range(3):
        sk, vk = lif_neuron_step(c2[k], vk.detach(), decay=d2[k], threshold=t2[k], impl="triton")
        loss = loss + (sk * g[k]).sum()
        assert torch.equal(sk, s[k])
    (loss + (vk * gv).sum()).backward()
    assert torch.equal(vk, v)
    for a, b in ((c1.grad, c2.grad), (d1.grad, d2.grad), (t1.grad, t2.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_contiguous_input(device):
    base = torch.randn(2, 30, 3, device=device) + 0.4  # used as a [T=3, 2, 30] view
    cur = base.permute(2, 0, 1)
    assert not cur.is_contiguous()
    g = torch.randn(3, 2, 30, device=device)
    res = []
    for c in (cur, cur.contiguous()):
        c = c.detach().requires_grad_()
        s, v = lif_neuron(c, decay=0.6, threshold=0.5, impl="triton")
        (s * g).sum().backward()
        assert s.shape == cur.shape and v.shape == cur.shape[1:]
        res.append((s, v, c.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)
    sr, vr = lif_neuron(cur, decay=0.6, threshold=0.5, impl="reference")
    assert torch.equal(res[0][0], sr) and torch.equal(res[0][1], vr)


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saves_only_h_per_step(device, dtype):
    """h = m - θ in the current's dtype, plus the [T] fp32 parameters given as tensors (a float
    is a kernel scalar: nothing saved); a learnable decay adds nothing (the membrane is
    recomputed from h), v0 only when it exists and λ learns."""
    T, N = 8, 1000
    cur = torch.randn(T, N, device=device, dtype=dtype, requires_grad=True)
    d = torch.full((T,), 0.5, device=device, requires_grad=True)
    th = torch.full((T,), 0.5, device=device, requires_grad=True)
    v0 = torch.randn(N, device=device, dtype=dtype)
    h_bytes = T * N * cur.element_size()
    assert _saved_bytes(lambda: lif_neuron(cur, decay=0.5, threshold=th, impl="triton")) == (
        h_bytes + T * 4
    )
    assert _saved_bytes(lambda: lif_neuron(cur, decay=0.5, threshold=0.5, impl="triton")) == (
        h_bytes
    )
    assert _saved_bytes(lambda: lif_neuron(cur, v0, decay=d, threshold=th, impl="triton")) == (
        h_bytes + 2 * T * 4 + N * cur.element_size()
    )
    ref = _saved_bytes(lambda: lif_neuron(cur, decay=d, threshold=th, impl="reference"))
    assert ref > 2 * h_bytes


def test_no_grad_forward_matches(device):
    cur = torch.randn(4, 77, device=device, requires_grad=True)
    with torch.no_grad():
        s1, v1 = lif_neuron(cur, decay=0.5, threshold=0.4, impl="triton")
    s2, v2 = lif_neuron(cur, decay=0.5, threshold=0.4, impl="triton")
    assert torch.equal(s1, s2) and torch.equal(v1, v2) and not s1.requires_grad
    assert s2.requires_grad


def test_scalar_tensor_params_get_gradients(device):
    cur, _, _, _, g, _ = _inputs(3, 50, device)
    for impl in ("triton", "reference"):
        d = torch.tensor(0.6, device=device, requires_grad=True)
        t = torch.tensor(0.4, device=device, requires_grad=True)
        s, _ = lif_neuron(cur.float(), decay=d, threshold=t, impl=impl)
        (s * g.float()).sum().backward()
        d_vec = torch.full((3,), 0.6, device=device, requires_grad=True)
        t_vec = torch.full((3,), 0.4, device=device, requires_grad=True)
        s2, _ = lif_neuron(cur.float(), decay=d_vec, threshold=t_vec, impl=impl)
        (s2 * g.float()).sum().backward()
        assert d.grad.shape == () and t.grad.shape == ()
        torch.testing.assert_close(d.grad, d_vec.grad.sum(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(t.grad, t_vec.grad.sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("step", [False, True])
@pytest.mark.parametrize("forms", ["ff", "ft", "tf"])
@pytest.mark.parametrize("grad_mode", ["bptt", "online"])
def test_float_params_are_kernel_scalars_equal_to_tensors(device, forms, step, grad_mode, dtype):
    """A float decay or threshold reaches the kernels as a scalar (no [T] tensor): the results
    and gradients are those of the same values as [T] tensors, and the reference's."""
    T, N = (1 if step else 4), 37
    cur, v0, decay, th, g, gv = _inputs(T, N, device, seed=3)
    d_f, th_f = 0.75, 0.55
    kw = dict(surrogate="atan")

    def run(impl, d, t):
        c = cur[0].to(dtype) if step else cur.to(dtype)
        c = c.detach().requires_grad_()
        v = v0.to(dtype).detach().requires_grad_()
        if step:
            s, vl = lif_neuron_step(c, v, decay=d, threshold=t, impl=impl, **kw)
        else:
            s, vl = lif_neuron(c, v, decay=d, threshold=t, grad_mode=grad_mode, impl=impl, **kw)
        loss = (s.float() * (g[0] if step else g).float()).sum() + (vl.float() * gv.float()).sum()
        params = [p for p in (d, t) if isinstance(p, torch.Tensor) and p.requires_grad]
        grads = torch.autograd.grad(loss, [c, v, *params], allow_unused=True)
        return (s, vl, *grads)

    def tensor(value, learn):
        return torch.full(() if step else (T,), value, device=device, requires_grad=learn)

    d = d_f if forms[0] == "f" else tensor(d_f, True)
    t = th_f if forms[1] == "f" else tensor(th_f, True)
    kern = run("triton", d, t)
    # the same values as tensors that do not learn: the same gradients for what learns
    d_t = tensor(d_f, False) if forms[0] == "f" else d
    t_t = tensor(th_f, False) if forms[1] == "f" else t
    as_tensors = run("triton", d_t, t_t)
    ref = run("reference", d, t)
    for a, b, r in zip(kern, as_tensors, ref):
        if a is None:
            assert b is None and r is None
            continue
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(a.float(), r.float(), rtol=tol, atol=tol)


def test_auto_runs_reference_on_cpu_including_fp64():
    cur = torch.randn(3, 10, dtype=torch.float64)
    s, v = lif_neuron(cur, decay=0.5, threshold=0.5)
    p = torch.full((3,), 0.5, dtype=torch.float64)
    sr, vr = lif_neuron_ref(cur, None, p, p)
    assert s.dtype == torch.float64 and torch.equal(s, sr) and torch.equal(v, vr)


def test_empty_features(device):
    s, v = lif_neuron(torch.randn(3, 0, device=device), decay=0.5, threshold=0.5, impl="triton")
    assert s.shape == (3, 0) and v.shape == (0,)


# ---------------------------------------------------------------------------------------------
# SpikingJelly's LIFNode(tau, decay_input=False, v_reset=None) is the same neuron.


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("detach_reset", [False, True])
@pytest.mark.parametrize("surrogate", ["sigmoid", "atan", "triangle"])
def test_matches_spikingjelly(device, impl, surrogate, detach_reset):
    sj = import_spikingjelly()
    from spikingjelly.activation_based import neuron as sj_neuron
    from spikingjelly.activation_based import surrogate as sj_surrogate

    # The triangle (1/γ)^2 max(γ - |x|, 0) is SpikingJelly's PiecewiseQuadratic with α = 1/γ.
    sj_fn = {
        "sigmoid": sj_surrogate.Sigmoid(alpha=4.0),
        "atan": sj_surrogate.ATan(alpha=2.0),
        "triangle": sj_surrogate.PiecewiseQuadratic(alpha=1.0),
    }
    del sj
    gen = torch.Generator().manual_seed(7)
    for tau, v_th in ((2.0, 1.0), (5.0, 0.6)):
        x = (torch.randn(6, 4, 33, generator=gen) * 0.8 + 0.5).to(device)
        g = torch.randn(6, 4, 33, generator=gen).to(device)
        node = sj_neuron.LIFNode(
            tau=tau,
            decay_input=False,
            v_threshold=v_th,
            v_reset=None,
            step_mode="m",
            surrogate_function=sj_fn[surrogate],
            detach_reset=detach_reset,
        )
        x1 = x.clone().requires_grad_()
        s1 = node(x1)
        v1 = node.v
        (s1 * g).sum().backward()
        x2 = x.clone().requires_grad_()
        s2, v2 = lif_neuron(
            x2,
            decay=1.0 - 1.0 / tau,
            threshold=v_th,
            surrogate=surrogate,
            detach_reset=detach_reset,
            impl=impl,
        )
        (s2 * g).sum().backward()
        assert s1.sum() > 0 and s1.sum() < s1.numel()
        assert torch.equal(s1, s2)
        torch.testing.assert_close(v2, v1.detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input.

KW = {"decay": 0.5, "threshold": 0.5}


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: lif_neuron(torch.randn(5), **KW), ValueError, "at least 2"),
        (lambda: lif_neuron(torch.randn(0, 4), **KW), ValueError, "T >= 1"),
        (lambda: lif_neuron([1.0, 2.0], **KW), TypeError, "torch.Tensor"),
        (lambda: lif_neuron(torch.randn(3, 4), torch.randn(5), **KW), ValueError, "v0 must"),
        (lambda: lif_neuron(torch.randn(3, 4), torch.randn(4).half(), **KW), TypeError, "dtype"),
        (
            lambda: lif_neuron(torch.randn(3, 4), decay=torch.rand(2), threshold=0.5),
            ValueError,
            "decay",
        ),
        (
            lambda: lif_neuron(torch.randn(3, 4), decay=0.5, threshold=torch.rand(4)),
            ValueError,
            "threshold",
        ),
        (lambda: lif_neuron(torch.randn(3, 4), decay=1.5, threshold=0.5), ValueError, r"\[0, 1\]"),
        (lambda: lif_neuron(torch.randn(3, 4), decay=-0.1, threshold=0.5), ValueError, r"\[0, 1\]"),
        (lambda: lif_neuron(torch.randn(3, 4), decay=-0.2, threshold=0.5), ValueError, r"\[0, 1\]"),
        (lambda: lif_neuron(torch.randn(3, 4), decay="a", threshold=0.5), TypeError, "decay"),
        (
            lambda: lif_neuron(torch.randn(3, 4), decay=0.5, threshold=float("inf")),
            ValueError,
            "finite",
        ),
        (lambda: lif_neuron(torch.randn(3, 4), surrogate="relu", **KW), ValueError, "surrogate"),
        (lambda: lif_neuron(torch.randn(3, 4), surrogate=None, **KW), ValueError, "surrogate"),
        (lambda: lif_neuron(torch.randn(3, 4), alpha=0.0, **KW), ValueError, "alpha"),
        (lambda: lif_neuron(torch.randn(3, 4), alpha=-2.0, **KW), ValueError, "alpha"),
        (lambda: lif_neuron(torch.randn(3, 4), alpha=float("nan"), **KW), ValueError, "alpha"),
        (lambda: lif_neuron(torch.randn(3, 4), alpha=float("inf"), **KW), ValueError, "alpha"),
        (lambda: lif_neuron(torch.randn(3, 4), alpha="4", **KW), TypeError, "alpha"),
        (lambda: lif_neuron(torch.randn(3, 4), alpha=True, **KW), TypeError, "alpha"),
        (
            lambda: lif_neuron(torch.randn(3, 4), detach_reset="yes", **KW),
            TypeError,
            "detach_reset",
        ),
        (lambda: lif_neuron(torch.randn(3, 4), grad_mode="stbp", **KW), ValueError, "grad_mode"),
        (lambda: lif_neuron(torch.randn(3, 4), impl="cuda", **KW), ValueError, "impl"),
        (
            lambda: lif_neuron(torch.randint(0, 3, (3, 4), device=DEVICE), impl="triton", **KW),
            TypeError,
            "dtype",
        ),
        (
            lambda: lif_neuron(torch.randint(0, 3, (3, 4)), impl="reference", **KW),
            TypeError,
            "dtype",
        ),
        (
            lambda: lif_neuron(
                torch.randn(3, 4, dtype=torch.float64, device=DEVICE), impl="triton", **KW
            ),
            TypeError,
            "float64",
        ),
        (lambda: lif_neuron_step(torch.tensor(1.0), **KW), ValueError, "at least 1"),
        (lambda: lif_neuron_step([1.0], **KW), TypeError, "torch.Tensor"),
        (
            lambda: lif_neuron_step(torch.randn(4), decay=torch.rand(2), threshold=0.5),
            ValueError,
            "decay",
        ),
        (lambda: lif_neuron_step(torch.randn(4), torch.randn(3), **KW), ValueError, r"^v must"),
        (
            lambda: lif_neuron_step(torch.randn(4), decay=1.01, threshold=0.5),
            ValueError,
            r"\[0, 1\]",
        ),
        (lambda: lif_neuron_step(torch.randn(4), surrogate="sigm", **KW), ValueError, "surrogate"),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_device_mismatch_raises():
    with pytest.raises(ValueError, match="on meta"):
        lif_neuron(torch.randn(3, 4), torch.zeros(4, device="meta"), **KW)
    with pytest.raises(ValueError, match="decay is on"):
        lif_neuron(torch.randn(3, 4), decay=torch.rand(3, device="meta"), threshold=0.5)
    with pytest.raises(ValueError, match="threshold is on"):
        lif_neuron(torch.randn(3, 4), decay=0.5, threshold=torch.rand(3, device="meta"))


def test_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(common, "_interpreter_on", lambda: False)
    with pytest.raises(common.TritonUnavailableError, match="TRITON_INTERPRET"):
        lif_neuron(torch.randn(3, 4), impl="triton", **KW)
    with pytest.raises(common.TritonUnavailableError, match="TRITON_INTERPRET"):
        lif_neuron_step(torch.randn(4), impl="triton", **KW)


def test_reference_impl_of_lif_ops_never_loads_kernels(monkeypatch):
    import empf_triton.ops.lif as ops_lif

    def boom(name):
        raise AssertionError(f"impl='reference' loaded kernels/{name}.py")

    monkeypatch.setattr(ops_lif, "load_kernels", boom)
    x = torch.randn(3, 7, requires_grad=True)
    s, v = lif_neuron(x, decay=0.5, threshold=0.3, impl="reference")
    s.sum().backward()
    s, v = lif_neuron_step(x[0], v.detach(), decay=0.5, threshold=0.3, impl="reference")
    (s.sum() + v.sum()).backward()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_spikes_are_those_of_the_fp32_membrane(device, dtype):
    """Both paths carry the membrane in fp32 for a half-precision current (the reference used to
    compute in the current's dtype, so spikes near the threshold flipped: 5 of 16,000 in fp16)."""
    g = torch.Generator().manual_seed(0)
    cur = (torch.randn(8, 2000, generator=g) * 0.8 + 0.3).to(device, dtype)
    want_s, want_v = lif_neuron(cur.float(), decay=0.9, threshold=0.7, impl="reference")
    for impl in ("triton", "reference"):
        s, v = lif_neuron(cur, decay=0.9, threshold=0.7, impl=impl)
        assert s.dtype == v.dtype == dtype
        assert torch.equal(s.float(), want_s), impl
        # one rounding to the dtype (the interpreter truncates fp32 -> bf16: up to one ulp)
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(v.float(), want_v.to(dtype).float(), rtol=ulp, atol=0)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan")], ids=["1.5", "-0.5", "nan"])
def test_cpu_decay_tensors_are_range_checked(impl, bad):
    """As the EM-PF ops: a CPU decay tensor's values must lie in [0, 1], on both paths, for the
    0-d and [T] forms of `lif_neuron` and the 0-d form of `lif_neuron_step`."""
    x = torch.randn(3, 4)
    values = r"decay must lie in \[0, 1\]"
    for d in (torch.tensor(bad), torch.tensor([0.5, bad, 0.5])):
        with pytest.raises(ValueError, match=values):
            lif_neuron(x, decay=d, threshold=0.5, impl=impl)
    with pytest.raises(ValueError, match=values):
        lif_neuron_step(x[0], decay=torch.tensor(bad), threshold=0.5, impl=impl)
    ok = torch.tensor([0.0, 1.0, 0.5])  # the ends are allowed
    assert torch.equal(
        lif_neuron(x, decay=ok, threshold=0.5, impl=impl)[0],
        lif_neuron(x, decay=ok, threshold=0.5, impl="reference")[0],
    )


@pytest.mark.parametrize("impl", ["reference", "auto"])
def test_float_parameters_after_a_call_under_inference_mode(impl):
    """Float decay/threshold become cached constant tensors on the reference path: one made
    under torch.inference_mode() must still serve a later training call (it could not be saved
    for backward), for the op and the module."""
    from empf_triton.nn import LIFNeuron

    x = torch.randn(3, 4)
    with torch.inference_mode():
        lif_neuron(x, decay=0.25, threshold=0.375, impl=impl)
    xg = x.clone().requires_grad_()
    s, _ = lif_neuron(xg, decay=0.25, threshold=0.375, impl=impl)
    s.sum().backward()
    assert xg.grad is not None
    m = LIFNeuron(step_mode="m", impl="reference")
    with torch.inference_mode():
        m(x)
    m.reset()
    m(xg).sum().backward()


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_parameters_outside_fp32_are_refused(impl):
    """A float threshold or decay that does not fit fp32, and an alpha whose surrogate needs
    more than fp32 (1 / alpha^2 for the triangle), are ValueErrors on both paths (they were an
    internal torch error or an OverflowError on the reference, inf/NaN on Triton)."""
    x = torch.randn(3, 4, requires_grad=True)
    with pytest.raises(ValueError, match="threshold must fit in fp32"):
        lif_neuron(x, decay=0.5, threshold=1e300, impl=impl)
    with pytest.raises(ValueError, match="threshold must fit in fp32"):
        lif_neuron_step(x[0], decay=0.5, threshold=-1e39, impl=impl)
    for alpha in (1e-200, 1e-20, 1e39):
        with pytest.raises(ValueError, match="alpha must lie in"):
            lif_neuron(x, decay=0.5, threshold=0.5, surrogate="triangle", alpha=alpha, impl=impl)
    for kw in ({"threshold": 10**400}, {"decay": -(10**400)}, {"alpha": 10**400}):
        # an int beyond float range: the ValueError of an infinite value, not an OverflowError
        with pytest.raises(ValueError, match="must be finite, got an int beyond float range"):
            lif_neuron(x, **{"decay": 0.5, "threshold": 0.5, **kw}, impl=impl)
    s, _ = lif_neuron(x, decay=0.5, threshold=3e38, surrogate="triangle", alpha=1e-19, impl=impl)
    s.sum().backward()
    assert torch.isfinite(x.grad).all()
