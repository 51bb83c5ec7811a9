"""EM-PF neuron ops: Triton kernels vs the eager reference vs an fp64 oracle, and the reference vs
the gradient rules of docs/model.md."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    DEVICE,
    DTYPES,
    HALF_DTYPES,
    assert_close_to_oracle,
    assert_half_matches_fp32_oracle,
    empf_decision_distance,
    near_boundary,
)

import empf_triton.ops._common as common
from empf_triton.ops.neuron import empf_neuron, empf_neuron_step, parallel_neuron
from empf_triton.reference.neuron import empf_neuron_ref

SIZES = [1, 7, 63, 1000, 4097]


def _inputs(T, N, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cur = (torch.randn(T, N, generator=gen) * 0.8 + 0.3).double()
    v0 = (torch.rand(N, generator=gen) * 0.5).double()
    decay = (torch.rand(T, generator=gen) * 0.6 + 0.3).float()  # λ in (0.3, 0.9)
    th = (torch.rand(T, generator=gen) * 0.5 + 0.25).float()
    g = torch.randn(T, N, generator=gen).double()
    gv = torch.randn(N, generator=gen).double()
    return [x.to(device) for x in (cur, v0, decay, th, g, gv)]


def _run_multi(impl, dtype, cur, v0, decay, th, g, gv, bits, grad_mode, *, use_v0=True):
    """Forward + backward at `dtype` (params at fp32, or fp64 for the oracle)."""
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    c = cur.detach().to(dtype).clone().requires_grad_()
    v = v0.detach().to(dtype).clone().requires_grad_() if use_v0 else None
    d = decay.detach().to(pdtype).clone().requires_grad_()
    t = th.detach().to(pdtype).clone().requires_grad_()
    spikes, v_last = empf_neuron(
        c, v, decay=d, threshold=t, spike_bits=bits, grad_mode=grad_mode, impl=impl
    )
    loss = (spikes * g.to(dtype)).sum() + (v_last * gv.to(dtype)).sum()
    loss.backward()
    return {
        "spikes": spikes.detach(),
        "v_last": v_last.detach(),
        "d_current": c.grad,
        "d_v0": v.grad if v is not None else None,
        "d_decay": d.grad,
        "d_threshold": t.grad,
    }


def _check_against_oracle(kern, ref, oracle, dtype):
    for name in kern:
        assert_close_to_oracle(name, kern[name], ref[name], oracle[name], data_dtype=dtype)
        if name in ("d_decay", "d_threshold"):
            assert kern[name].dtype == torch.float32
        elif kern[name] is not None:
            assert kern[name].dtype == dtype, name
    if dtype == torch.float32:
        # Same fp32 operations in the same order: the forward is bit-exact.
        assert torch.equal(kern["spikes"], ref["spikes"])
        assert torch.equal(kern["v_last"], ref["v_last"])


def _oracle_inputs(dtype, cur, v0, g, gv):
    """fp64 copies of exactly what the low-precision run sees."""
    return [x.to(dtype).double() for x in (cur, v0, g, gv)]


@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("T", [1, 3, 8])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empf_neuron_matches_reference(device, dtype, T, bits, grad_mode):
    for N in SIZES:
        cur, v0, decay, th, g, gv = _inputs(T, N, device, seed=N + T)
        kern = _run_multi("triton", dtype, cur, v0, decay, th, g, gv, bits, grad_mode)
        ref = _run_multi("reference", dtype, cur, v0, decay, th, g, gv, bits, grad_mode)
        c64, v64, g64, gv64 = _oracle_inputs(dtype, cur, v0, g, gv)
        oracle = _run_multi(
            "reference", torch.float64, c64, v64, decay, th, g64, gv64, bits, grad_mode
        )
        _check_against_oracle(kern, ref, oracle, dtype)
        if grad_mode == "online":
            assert kern["d_v0"] is None and ref["d_v0"] is None
        if dtype in HALF_DTYPES:
            _check_half_forward(kern, dtype, cur, v0, decay, th, g, gv, bits, grad_mode)


def _check_half_forward(kern, dtype, cur, v0, decay, th, g, gv, bits, grad_mode):
    """Spikes and v_last of a half-precision run against the fp32-compute oracle: one half
    rounding everywhere, flips only next to a decision boundary."""
    c32, v32, g32, gv32 = (x.to(dtype).float() for x in (cur, v0, g, gv))
    o32 = _run_multi("reference", torch.float32, c32, v32, decay, th, g32, gv32, bits, grad_mode)
    dist, m = empf_decision_distance(c32, v32, decay, th, bits)
    may_flip = near_boundary(dist, m, dtype)
    assert_half_matches_fp32_oracle("spikes", kern["spikes"], o32["spikes"], may_flip)
    assert_half_matches_fp32_oracle("v_last", kern["v_last"], o32["v_last"], may_flip[-1])


@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
def test_empf_neuron_without_v0_and_constant_params(device, grad_mode):
    cur, v0, decay, th, g, gv = _inputs(4, 333, device)
    outs = {}
    for impl in ("triton", "reference"):
        c = cur.float().requires_grad_()
        s, vl = empf_neuron(c, decay=0.7, threshold=0.5, grad_mode=grad_mode, impl=impl)
        ((s * g.float()).sum() + (vl * gv.float()).sum()).backward()
        outs[impl] = (s, vl, c.grad)
    for a, b in zip(outs["triton"], outs["reference"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_scalar_tensor_params_get_gradients(device, impl):
    cur, _, _, _, g, _ = _inputs(3, 50, device)
    d = torch.tensor(0.6, device=device, requires_grad=True)
    t = torch.tensor(0.4, device=device, requires_grad=True)
    s, _ = empf_neuron(cur.float(), decay=d, threshold=t, impl=impl)
    (s * g.float()).sum().backward()
    assert d.grad is not None and d.grad.shape == () and t.grad.shape == ()
    d_vec = torch.full((3,), 0.6, device=device, requires_grad=True)
    t_vec = torch.full((3,), 0.4, device=device, requires_grad=True)
    s2, _ = empf_neuron(cur.float(), decay=d_vec, threshold=t_vec, impl=impl)
    (s2 * g.float()).sum().backward()
    torch.testing.assert_close(d.grad, d_vec.grad.sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t.grad, t_vec.grad.sum(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# The reference against docs/model.md, written out by hand.


def _formula_grads(cur, v0, decay, th, g, gv, grad_mode):
    """dL/dI, dL/dv0, dL/dλ, dL/dθ from the equations of docs/model.md (float spikes)."""
    T = cur.shape[0]
    v = [v0]
    H = []
    for t in range(T):
        m = decay[t] * v[-1] + cur[t]
        H.append((m > th[t]).double())
        v.append(torch.minimum(m, th[t].expand_as(m)))
    dI = torch.zeros_like(cur)
    dlam = torch.zeros(T, dtype=torch.float64)
    dth = torch.zeros(T, dtype=torch.float64)
    dv = gv.clone()  # dL/dv[T-1]
    for t in reversed(range(T)):
        dm = g[t] * H[t] + dv * (1 - H[t])
        dI[t] = dm
        dth[t] = -(g[t] * H[t]).sum() + (dv * H[t]).sum()
        dlam[t] = (dm * v[t]).sum()  # v[t] in this list is v[t-1] of the neuron
        dv = decay[t] * dm if grad_mode == "bptt" else torch.zeros_like(dm)
    dv0 = dv if grad_mode == "bptt" else None
    return dI, dv0, dlam, dth


@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
def test_reference_gradients_follow_empf_md(grad_mode):
    cur, v0, decay, th, g, gv = _inputs(6, 40, "cpu", seed=3)
    decay, th = decay.double(), th.double()
    out = _run_multi("reference", torch.float64, cur, v0, decay, th, g, gv, None, grad_mode)
    dI, dv0, dlam, dth = _formula_grads(cur, v0, decay, th, g, gv, grad_mode)
    torch.testing.assert_close(out["d_current"], dI)
    torch.testing.assert_close(out["d_decay"], dlam)
    torch.testing.assert_close(out["d_threshold"], dth)
    if grad_mode == "bptt":
        torch.testing.assert_close(out["d_v0"], dv0)
    else:
        assert out["d_v0"] is None


def test_reference_gradcheck_bptt():
    # Only BPTT is the true derivative; online mode cuts the temporal path on purpose and is
    # pinned by test_reference_gradients_follow_empf_md instead.
    grad_mode = "bptt"
    gen = torch.Generator().manual_seed(1)
    cur = (torch.randn(3, 5, generator=gen, dtype=torch.float64) + 0.4).requires_grad_()
    v0 = (torch.rand(5, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    decay = torch.tensor([0.5, 0.7, 0.6], dtype=torch.float64, requires_grad=True)
    th = torch.tensor([0.3, 0.45, 0.5], dtype=torch.float64, requires_grad=True)

    def f(c, v, d, t):
        return empf_neuron_ref(c, v, d, t, None, 0.25, grad_mode)

    # Finite differences need every m[t] a margin away from θ_t (the kink of the ReLU).
    with torch.no_grad():
        v = v0.clone()
        for t in range(3):
            m = decay[t] * v + cur[t]
            assert (m - th[t]).abs().min() > 1e-3
            v = torch.minimum(m, th[t])
    assert torch.autograd.gradcheck(f, (cur, v0, decay, th))
    # The single-step case of online mode is exact too: v0 enters only through v_last.
    one = (cur[:1].detach().clone().requires_grad_(), decay[:1], th[:1])
    assert torch.autograd.gradcheck(
        lambda c, d, t: empf_neuron_ref(c, None, d, t, None, 0.25, "online"), one
    )


def test_parallel_reference_gradcheck():
    from empf_triton.reference.neuron import parallel_neuron_ref

    cur = torch.tensor([[0.9, -0.2, 0.4], [0.1, 0.8, 1.2]], dtype=torch.float64, requires_grad=True)
    th = torch.tensor([0.3, 0.5], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, t: parallel_neuron_ref(c, t), (cur, th))


def test_quantized_spikes_use_straight_through_gradient(device):
    cur, v0, decay, th, g, gv = _inputs(4, 100, device, seed=5)
    for impl in ("triton", "reference"):
        q = _run_multi(impl, torch.float32, cur * 3, v0, decay, th, g, gv, 4, "bptt")
        f = _run_multi(impl, torch.float32, cur * 3, v0, decay, th, g, gv, None, "bptt")
        # The reset uses the unquantised surplus, so every gradient is the float-spike one.
        for name in ("d_current", "d_v0", "d_decay", "d_threshold"):
            torch.testing.assert_close(q[name], f[name], rtol=0, atol=0)
        codes = q["spikes"] / 0.25
        assert torch.equal(codes, codes.round()) and codes.max() <= 15 and codes.min() >= 0


# ---------------------------------------------------------------------------------------------
# Single step and the parallel neuron.


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [None, 4])
def test_step_matches_multistep_and_reference(device, dtype, bits):
    cur, v0, decay, th, g, gv = _inputs(1, 1000, device, seed=9)
    outs = {}
    for impl, dt in (("triton", dtype), ("reference", dtype), ("oracle", torch.float64)):
        pdt = torch.float64 if dt == torch.float64 else torch.float32
        c = cur[0].to(dtype).to(dt).clone().requires_grad_()
        v = v0.to(dtype).to(dt).clone().requires_grad_()
        d = decay[0].detach().to(pdt).clone().requires_grad_()
        t = th[0].detach().to(pdt).clone().requires_grad_()
        s, vn = empf_neuron_step(
            c,
            v,
            decay=d,
            threshold=t,
            spike_bits=bits,
            impl="reference" if impl == "oracle" else impl,
        )
        ((s * g[0].to(dtype).to(dt)).sum() + (vn * gv.to(dtype).to(dt)).sum()).backward()
        outs[impl] = [s.detach(), vn.detach(), c.grad, v.grad, d.grad, t.grad]
    multi = _run_multi("triton", dtype, cur, v0, decay, th, g, gv, bits, "bptt")
    names = ["spikes", "v_last", "d_current", "d_v0", "d_decay", "d_threshold"]
    for i, name in enumerate(names):
        a = outs["triton"][i]
        b = multi[name][0] if name in ("spikes", "d_current") else multi[name]
        assert torch.equal(a, b.reshape(a.shape)), name  # the step op is the T = 1 kernel
        assert_close_to_oracle(name, a, outs["reference"][i], outs["oracle"][i], data_dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("T", [1, 3, 8])
def test_parallel_neuron_matches_reference(device, dtype, T, bits):
    for N in SIZES:
        cur, _, _, th, g, _ = _inputs(T, N, device, seed=N)
        res = {}
        for impl, dt in (("triton", dtype), ("reference", dtype), ("oracle", torch.float64)):
            c = cur.to(dtype).to(dt).clone().requires_grad_()
            pdt = torch.float64 if dt == torch.float64 else torch.float32
            t = th.detach().to(pdt).clone().requires_grad_()
            s = parallel_neuron(
                c,
                threshold=t,
                spike_bits=bits,
                impl="reference" if impl == "oracle" else impl,
            )
            (s * g.to(dtype).to(dt)).sum().backward()
            res[impl] = {"spikes": s.detach(), "d_current": c.grad, "d_threshold": t.grad}
        for name in res["triton"]:
            assert_close_to_oracle(
                name,
                res["triton"][name],
                res["reference"][name],
                res["oracle"][name],
                data_dtype=dtype,
            )
        if dtype == torch.float32:
            assert torch.equal(res["triton"]["spikes"], res["reference"]["spikes"])
        else:  # stateless: m = I, so the EM-PF distances with λ = 0
            c32 = cur.to(dtype).float()
            o32 = parallel_neuron(c32, threshold=th.float(), spike_bits=bits, impl="reference")
            dist, m = empf_decision_distance(c32, None, torch.zeros(T), th, bits)
            may_flip = near_boundary(dist, m, dtype)
            assert_half_matches_fp32_oracle("spikes", res["triton"]["spikes"], o32, may_flip)


# ---------------------------------------------------------------------------------------------
# Memory saved for backward, NaN, non-contiguous inputs, auto dispatch.


def _saved_bytes(fn):
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(total)


def test_online_saves_one_bit_per_neuron_per_step(device):
    T, N = 8, 1000
    cur = torch.randn(T, N, device=device, requires_grad=True)
    th = torch.full((T,), 0.5, device=device, requires_grad=True)
    saved = _saved_bytes(lambda: empf_neuron(cur, decay=0.5, threshold=th, impl="triton"))
    assert saved == T * ((N + 7) // 8)
    # With a learnable decay the membrane history v[0..T-2] is saved too (v0 = zeros, not saved).
    d = torch.full((T,), 0.5, device=device, requires_grad=True)
    saved = _saved_bytes(lambda: empf_neuron(cur, decay=d, threshold=th, impl="triton"))
    assert saved == T * ((N + 7) // 8) + (T - 1) * N * 4
    # The reference keeps at least one byte per neuron per step (its `m > θ` masks), 8x the
    # kernel's packed bit.
    ref = _saved_bytes(lambda: empf_neuron(cur, decay=0.5, threshold=th, impl="reference"))
    assert ref >= T * N


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_nan_propagates(device, impl):
    cur = torch.full((3, 9), 1.0, device=device)
    cur[1, 4] = float("nan")
    s, v = empf_neuron(cur, decay=0.5, threshold=0.5, spike_bits=4, impl=impl)
    assert torch.isnan(s[1, 4]) and torch.isnan(s[2, 4]) and torch.isnan(v[4])
    assert not torch.isnan(s[0]).any()
    assert not torch.isnan(s[:, :4]).any() and not torch.isnan(v[:4]).any()


def test_non_contiguous_input(device):
    base = torch.randn(20, 4, device=device)  # [N, T] storage, used as a [T, N] view
    cur = base.t()
    assert not cur.is_contiguous()
    for impl in ("triton", "reference"):
        s1, v1 = empf_neuron(cur, decay=0.6, threshold=0.4, impl=impl)
        s2, v2 = empf_neuron(cur.contiguous(), decay=0.6, threshold=0.4, impl=impl)
        assert torch.equal(s1, s2) and torch.equal(v1, v2)


def test_multi_dim_features_keep_shape(device):
    cur = torch.randn(3, 2, 5, 7, device=device)
    s, v = empf_neuron(cur, decay=0.5, threshold=0.5, impl="triton")
    sr, vr = empf_neuron(cur, decay=0.5, threshold=0.5, impl="reference")
    assert s.shape == cur.shape and v.shape == cur.shape[1:]
    assert torch.equal(s, sr) and torch.equal(v, vr)


def test_auto_runs_reference_on_cpu_including_fp64():
    cur = torch.randn(3, 10, dtype=torch.float64)
    s, v = empf_neuron(cur, decay=0.5, threshold=0.5)
    sr, vr = empf_neuron_ref(
        cur,
        None,
        torch.full((3,), 0.5, dtype=torch.float64),
        torch.full((3,), 0.5, dtype=torch.float64),
    )
    assert s.dtype == torch.float64 and torch.equal(s, sr) and torch.equal(v, vr)


def test_no_grad_forward_matches(device):
    cur = torch.randn(4, 77, device=device, requires_grad=True)
    with torch.no_grad():
        s1, v1 = empf_neuron(cur, decay=0.5, threshold=0.4, impl="triton")
    s2, v2 = empf_neuron(cur, decay=0.5, threshold=0.4, impl="triton")
    assert torch.equal(s1, s2) and torch.equal(v1, v2) and not s1.requires_grad


# ---------------------------------------------------------------------------------------------
# Bad input.

KW = {"decay": 0.5, "threshold": 0.5}


@pytest.mark.parametrize(
    ("call", "exc", "match"),
    [
        (lambda: empf_neuron(torch.randn(5), **KW), ValueError, "at least 2"),
        (lambda: empf_neuron(torch.randn(0, 4), **KW), ValueError, "T >= 1"),
        (lambda: empf_neuron([1.0, 2.0], **KW), TypeError, "torch.Tensor"),
        (lambda: empf_neuron(torch.randn(3, 4), torch.randn(5), **KW), ValueError, "v0 must"),
        (lambda: empf_neuron(torch.randn(3, 4), torch.randn(4).half(), **KW), TypeError, "dtype"),
        (
            lambda: empf_neuron(torch.randn(3, 4), decay=torch.rand(2), threshold=0.5),
            ValueError,
            "decay",
        ),
        (
            lambda: empf_neuron(torch.randn(3, 4), decay=0.5, threshold=torch.rand(4)),
            ValueError,
            "threshold",
        ),
        (lambda: empf_neuron(torch.randn(3, 4), decay=1.5, threshold=0.5), ValueError, r"\[0, 1\]"),
        (lambda: empf_neuron(torch.randn(3, 4), decay=-0.1, threshold=0.5), ValueError, r"0, 1\]"),
        (lambda: empf_neuron(torch.randn(3, 4), decay="a", threshold=0.5), TypeError, "decay"),
        (
            lambda: empf_neuron(torch.randn(3, 4), decay=0.5, threshold=float("nan")),
            ValueError,
            "finite",
        ),
        (
            lambda: empf_neuron(
                torch.randn(3, 4), decay=torch.ones(3, dtype=torch.int64), threshold=0.5
            ),
            TypeError,
            "floating",
        ),
        (lambda: empf_neuron(torch.randn(3, 4), spike_bits=0, **KW), ValueError, "spike_bits"),
        (lambda: empf_neuron(torch.randn(3, 4), spike_bits=9, **KW), ValueError, "spike_bits"),
        (lambda: empf_neuron(torch.randn(3, 4), spike_bits=4.0, **KW), TypeError, "spike_bits"),
        (
            lambda: empf_neuron(torch.randn(3, 4), spike_bits=4, spike_step=0.0, **KW),
            ValueError,
            "spike_step",
        ),
        (
            lambda: empf_neuron(torch.randn(3, 4), spike_bits=4, spike_step=-1, **KW),
            ValueError,
            "spike_step",
        ),
        (lambda: empf_neuron(torch.randn(3, 4), grad_mode="stbp", **KW), ValueError, "grad_mode"),
        (lambda: empf_neuron(torch.randn(3, 4), impl="cuda", **KW), ValueError, "impl"),
        (
            lambda: empf_neuron(torch.randint(0, 3, (3, 4), device=DEVICE), impl="triton", **KW),
            TypeError,
            "dtype",
        ),
        (
            lambda: empf_neuron(torch.randint(0, 3, (3, 4)), impl="reference", **KW),
            TypeError,
            "dtype",
        ),
        (
            lambda: empf_neuron(
                torch.randn(3, 4, dtype=torch.float64, device=DEVICE), impl="triton", **KW
            ),
            TypeError,
            "float64",
        ),
        (lambda: empf_neuron_step(torch.tensor(1.0), **KW), ValueError, "at least 1"),
        (
            lambda: empf_neuron_step(torch.randn(4), decay=torch.rand(2), threshold=0.5),
            ValueError,
            "decay",
        ),
        (
            lambda: parallel_neuron(torch.randn(3, 4), threshold=torch.rand(2)),
            ValueError,
            "threshold",
        ),
        (
            lambda: parallel_neuron(torch.randn(3, 4), threshold=0.5, spike_bits=12),
            ValueError,
            "spike_bits",
        ),
    ],
)
def test_bad_input_raises(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_device_mismatch_raises():
    meta_v0 = torch.zeros(4, device="meta")
    with pytest.raises(ValueError, match="device|on meta"):
        empf_neuron(torch.randn(3, 4), meta_v0, **KW)
    with pytest.raises(ValueError, match="decay is on"):
        empf_neuron(torch.randn(3, 4), decay=torch.rand(3, device="meta"), threshold=0.5)


def test_triton_unavailable_raises(monkeypatch):
    monkeypatch.setattr(common, "_interpreter_on", lambda: False)
    with pytest.raises(common.TritonUnavailableError, match="TRITON_INTERPRET"):
        empf_neuron(torch.randn(3, 4), impl="triton", **KW)
    # auto never needs triton on the CPU
    empf_neuron(torch.randn(3, 4), impl="auto", **KW)


_LATE_INTERPRETER = """
import os, sys
import triton  # imported before TRITON_INTERPRET is set: the interpreter stays off
os.environ["TRITON_INTERPRET"] = "1"
import torch
import empf_triton as et
from empf_triton.ops import TritonUnavailableError
x = torch.randn(3, 4)
calls = [
    lambda: et.empf_neuron(x, decay=0.5, threshold=0.5, impl="triton"),
    lambda: et.binarize(x, impl="triton"),
    lambda: et.quantize_spikes(x, bits=2, impl="triton"),
]
for call in calls:
    try:
        call()
    except TritonUnavailableError as e:
        assert "imported before" in str(e), e
    else:
        sys.exit("no error")
et.empf_neuron(x, decay=0.5, threshold=0.5)  # auto runs the reference
print("ok")
"""


def test_interpreter_set_after_triton_import_is_a_clear_error():
    """TRITON_INTERPRET=1 set after triton was imported leaves Triton's interpreter off (every
    launch would fail inside Triton): impl='triton' on the CPU says so with
    TritonUnavailableError (a ValueError), for every op."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p] + [str(root)]
    env["PYTHONPATH"] = os.pathsep.join(path)
    proc = subprocess.run(
        [sys.executable, "-c", _LATE_INTERPRETER], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_triton_on_meta_tensors_is_a_clear_error():
    """impl='triton' on tensors of a device Triton cannot run on (meta) is a
    TritonUnavailableError naming it, for every kind of op (it was an internal error from
    inside Triton under the interpreter); the reference runs on meta."""
    import empf_triton as et

    x = torch.randn(3, 4, 8, device="meta")
    calls = {
        "empf_neuron": lambda i: et.empf_neuron(x, decay=0.5, threshold=0.5, impl=i),
        "parallel_neuron": lambda i: et.parallel_neuron(x, threshold=0.5, impl=i),
        "lif_neuron": lambda i: et.lif_neuron(x, decay=0.5, threshold=0.5, impl=i),
        "quantize_spikes": lambda i: et.quantize_spikes(x, bits=2, impl=i),
        "binarize": lambda i: et.binarize(x[0], impl=i),
    }
    for name, call in calls.items():
        with pytest.raises(common.TritonUnavailableError, match="not on meta tensors"):
            call("triton")
        out = call("reference")
        assert (out[0] if isinstance(out, tuple) else out).device.type == "meta", name


@pytest.mark.parametrize("op", ["empf_neuron", "empf_neuron_step", "parallel_neuron", "lif"])
def test_second_derivatives_are_refused_on_the_triton_path(device, op):
    """The Triton path's gradients come from a kernel and carry no graph: a backward with
    create_graph=True raises instead of silently giving a gradient with no second derivative.
    The reference supports it."""
    from empf_triton.ops.lif import lif_neuron

    def run(impl):
        x = torch.randn(3, 16, device=device, requires_grad=True)
        if op == "empf_neuron":
            out = empf_neuron(x, decay=0.5, threshold=0.2, grad_mode="bptt", impl=impl)[0]
        elif op == "empf_neuron_step":
            out = empf_neuron_step(x[0], decay=0.5, threshold=0.2, impl=impl)[0]
        elif op == "parallel_neuron":
            out = parallel_neuron(x, threshold=0.2, impl=impl)
        else:
            out = lif_neuron(x, decay=0.5, threshold=0.2, impl=impl)[0]
        g = torch.ones_like(out, requires_grad=True)
        (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
        return gx, g

    gx, g = run("reference")
    assert gx.requires_grad
    with pytest.raises(NotImplementedError, match="create_graph=True.*impl='reference'"):
        run("triton")


# ------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize(
    "decay",
    [
        torch.tensor([0.5, 1.5, 0.5]),
        torch.tensor([0.5, -0.1, 0.5]),
        torch.tensor([0.5, float("nan"), 0.5]),
        torch.tensor(2.0),
        float("nan"),
    ],
    ids=["above1", "below0", "nan", "0d", "float-nan"],
)
def test_decay_outside_unit_interval_or_nan_raises(device, impl, decay):
    # Decay tensors are value-checked only on the CPU (a CUDA decay is never read: no host sync),
    # and a decay must be on the current's device: tensor cases run on the CPU.
    cpu_only = isinstance(decay, torch.Tensor)
    if cpu_only and impl == "triton" and device != "cpu":
        pytest.skip(
            "CPU-only check: impl='triton' needs a CUDA current here, which rejects a CPU decay "
            "(device mismatch) and never reads a CUDA decay's values; the reference param covers it"
        )
    x = torch.randn(3, 4, device="cpu" if cpu_only else device)
    with pytest.raises(ValueError, match="decay"):
        empf_neuron(x, decay=decay, threshold=0.5, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("bad", [1.5, -0.5, float("nan")], ids=["1.5", "-0.5", "nan"])
def test_cpu_decay_tensors_are_checked_in_every_form(device, impl, bad):
    """CPU tensors are checked (reading them is no device sync): 0-d, [T], [T, C] and [1, C]
    forms of the multi-step ops, 0-d and [C] forms of the step op, small and large."""
    if impl == "triton" and device != "cpu":
        pytest.skip(
            "CPU-only behaviour: impl='triton' needs a CUDA current there, and a CUDA current "
            "rejects a CPU decay (device mismatch) while CUDA decays are never value-checked"
        )
    x = torch.randn(3, 5, 2)  # [T, N, C]
    T, C = 3, 2
    forms = [torch.tensor(bad), torch.tensor([0.5, bad, 0.5])]
    per_channel = torch.full((T, C), 0.5)
    per_channel[1, 1] = bad
    forms += [per_channel]
    forms += [torch.tensor([[0.5, bad]])]
    values = r"decay must lie in \[0, 1\]"
    for d in forms:
        with pytest.raises(ValueError, match=values):
            empf_neuron(x, decay=d, threshold=0.5, impl=impl)
    big = torch.full((3, 2, 400), 0.1)  # a [T, C] decay above the tolist size limit
    d_big = torch.full((3, 400), 0.5)
    d_big[2, 399] = bad
    with pytest.raises(ValueError, match=values):
        empf_neuron(big, decay=d_big, threshold=0.5, impl=impl)
    empf_neuron(big, decay=d_big.clamp(0, 1).nan_to_num(0.5), threshold=0.5, impl=impl)
    for d in (torch.tensor(bad), torch.tensor([0.5, bad])):
        with pytest.raises(ValueError, match=values):
            empf_neuron_step(x[0], decay=d, threshold=0.5, impl=impl)


@pytest.mark.gpu
def test_cuda_decay_tensors_make_no_host_sync():
    """On CUDA the public ops never read a decay tensor's values: no device sync (CUDA-graph
    capturable), forward and backward."""
    x = torch.randn(3, 8, 4, device="cuda", requires_grad=True)
    d = torch.full((3,), 0.5, device="cuda", requires_grad=True)
    th = torch.full((3,), 0.3, device="cuda", requires_grad=True)
    dc = torch.full((4,), 0.5, device="cuda")
    calls = [
        lambda: empf_neuron(x, decay=d, threshold=th, impl="triton")[0],
        lambda: empf_neuron(x, decay=d, threshold=th, grad_mode="bptt", impl="triton")[0],
        lambda: empf_neuron_step(x[0].detach(), decay=dc, threshold=0.3, impl="triton")[0],
        lambda: parallel_neuron(x, threshold=th, spike_bits=4, impl="triton"),
    ]
    for call in calls:  # warm-up: the first launch compiles (and autotunes, which syncs)
        out = call()
        if out.requires_grad:
            out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for call in calls:
            out = call()
            if out.requires_grad:
                out.backward(torch.ones_like(out))
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_decay_bounds_zero_and_one_are_allowed(device):
    x = torch.randn(3, 4, device=device)
    for d in (0.0, 1.0, torch.tensor([0.0, 1.0, 0.5], device=device)):
        s_r, v_r = empf_neuron(x, decay=d, threshold=0.5, impl="reference")
        s_k, v_k = empf_neuron(x, decay=d, threshold=0.5, impl="triton")
        assert torch.equal(s_r, s_k) and torch.equal(v_r, v_k)


@pytest.mark.parametrize("step", [1e300, float("inf"), float("nan"), 1e-50, 0.0, -0.25])
def test_spike_step_must_be_finite_and_positive_in_fp32(step):
    for call in (
        lambda: empf_neuron(torch.randn(2, 3), decay=0.5, threshold=0.5, spike_bits=4,
                            spike_step=step),
        lambda: empf_neuron_step(torch.randn(3), decay=0.5, threshold=0.5, spike_bits=4,
                                 spike_step=step),
        lambda: parallel_neuron(torch.randn(2, 3), threshold=0.5, spike_bits=4, spike_step=step),
    ):  # fmt: skip
        with pytest.raises(ValueError, match="spike_step"):
            call()


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_fp16_overflow_is_computed_in_fp32_on_both_paths(device, impl):
    """6e4 currents, decay 1, threshold -6e4: the first surplus (1.2e5) overflows fp16 when
    stored, but the fp32 membrane is exact (v = θ after firing), so the next steps fire 6e4."""
    x = torch.full((4, 1), 6e4, dtype=torch.float16, device=device)
    s, v = empf_neuron(x, decay=1.0, threshold=-6e4, impl=impl)
    assert s[:, 0].tolist() == [float("inf"), 6e4, 6e4, 6e4]
    assert v.tolist() == [-6e4]
    p = parallel_neuron(x, threshold=-6e4, impl=impl)
    assert p[:, 0].tolist() == [float("inf")] * 4


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_online_mode_gives_v0_no_gradient_on_both_paths(device, impl):
    x = torch.randn(3, 5, device=device)
    v0 = torch.randn(5, device=device, requires_grad=True)
    s, v = empf_neuron(x, v0, decay=0.5, threshold=0.3, grad_mode="online", impl=impl)
    assert not s.requires_grad and not v.requires_grad  # v0 is a constant in online mode
    xg = x.clone().requires_grad_()
    s, v = empf_neuron(xg, v0, decay=0.5, threshold=0.3, grad_mode="online", impl=impl)
    (s.sum() + v.sum()).backward()
    assert v0.grad is None and xg.grad is not None


def test_reference_impl_of_step_and_multistep_ops_never_loads_kernels(monkeypatch):
    import empf_triton.ops.neuron as ops_neuron

    def boom(name):
        raise AssertionError(f"impl='reference' loaded kernels/{name}.py")

    monkeypatch.setattr(ops_neuron, "load_kernels", boom)
    x = torch.randn(3, 5, 2, requires_grad=True)
    d = torch.full((3,), 0.5, requires_grad=True)
    s, v = empf_neuron(x, decay=d, threshold=0.3, impl="reference")
    s.sum().backward()
    s, v = empf_neuron_step(
        x[0], v.detach(), decay=0.5, threshold=torch.tensor([0.3, 0.2]), impl="reference"
    )
    (s.sum() + v.sum()).backward()
    parallel_neuron(x, threshold=0.3, spike_bits=4, impl="reference").sum().backward()


@pytest.mark.parametrize(
    "params",
    ["floats", "per step", "per channel"],
)
def test_inference_plans_equal_the_ops_on_new_currents(params):
    """`empf_neuron_plan` / `parallel_neuron_plan` (a deployed layer's checked-once call) give
    `empf_neuron` / `parallel_neuron` exactly on every later current, on both paths."""
    from empf_triton.ops.neuron import empf_neuron_plan, parallel_neuron_plan

    torch.manual_seed(0)
    T, N, C = 3, 2, 5
    if params == "floats":
        decay, th = 0.6, 0.4
    elif params == "per step":
        decay, th = torch.rand(T, device=DEVICE), torch.rand(T, device=DEVICE)
    else:
        decay, th = torch.rand(T, C, device=DEVICE), torch.rand(T, C, device=DEVICE)
    x = torch.randn(T, N, C, 4, device=DEVICE)
    for impl in ("reference", "triton"):
        q = dict(spike_bits=4, spike_step=0.25, impl=impl)
        run = empf_neuron_plan(x, decay=decay, threshold=th, **q)
        prun = parallel_neuron_plan(x, threshold=th, **q)
        with torch.no_grad():
            for _ in range(2):
                x2 = torch.randn_like(x) * 2
                s, v = run(x2)
                s_ref, v_ref = empf_neuron(x2, decay=decay, threshold=th, **q)
                assert torch.equal(s, s_ref) and torch.equal(v, v_ref), impl
                assert torch.equal(prun(x2), parallel_neuron(x2, threshold=th, **q)), impl
        # the same checks as the ops, once; and no gradient is recorded
        with pytest.raises(ValueError, match="decay"):
            empf_neuron_plan(x, decay=1.5, threshold=th, **q)
        with pytest.raises(ValueError, match="inference only"):
            run(x.clone().requires_grad_())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("params", ["per step", "per channel"])
@pytest.mark.parametrize("shape", [(3, 2, 5, 3, 4), (2, 7, 9)], ids=["conv", "linear"])
def test_inference_plan_input_affine(dtype, params, shape):
    """`empf_neuron_plan(in_scale=k, in_bias=b)` (a deployed Mem-BN neuron): each step's current
    enters as k I + b inside the kernel, equal to `empf_neuron` on `k * I + b` computed in fp32
    first (bit-exact in fp32, the same two roundings), on both paths; a decay outside [0, 1]
    with `decay_range=False`."""
    from empf_triton.ops.neuron import empf_neuron_plan

    torch.manual_seed(1)
    T, C = shape[0], shape[2]
    if params == "per step":
        decay, th = torch.rand(T, device=DEVICE), torch.rand(T, device=DEVICE) + 0.2
    else:
        decay = torch.rand(T, C, device=DEVICE) * 1.6  # k λ of a folded Mem-BN: partly above 1
        th = torch.rand(T, C, device=DEVICE) + 0.2
    k = torch.randn(T, C, device=DEVICE) * 1.5
    b = torch.randn(T, C, device=DEVICE) * 0.5
    x = torch.randn(*shape, device=DEVICE).to(dtype)
    view = (T, 1, C) + (1,) * (len(shape) - 3)
    want_in = k.view(view) * x.float() + b.view(view)
    q = dict(spike_bits=4, spike_step=0.25)
    outs = {}
    for impl in ("reference", "triton"):
        run = empf_neuron_plan(
            x, decay=decay, threshold=th, decay_range=False, in_scale=k, in_bias=b, impl=impl, **q
        )
        with torch.no_grad():
            s, v = run(x)
        assert s.dtype == dtype and v.dtype == dtype and s.shape == x.shape
        outs[impl] = (s, v)
    s_ref, v_ref = empf_neuron_ref(want_in, None, decay, th, 4, 0.25, "online")
    if dtype == torch.float32:
        for impl, (s, v) in outs.items():
            assert torch.equal(s, s_ref) and torch.equal(v, v_ref), impl
    else:  # computed in fp32 and rounded to the current's dtype at the end (the interpreter's
        # bf16 rounding is not torch's: one unit in the last place apart)
        for impl, (s, v) in outs.items():
            assert torch.equal(s, s_ref.to(dtype)), impl
            torch.testing.assert_close(v, v_ref.to(dtype))


def test_inference_plan_input_affine_bad_arguments():
    from empf_triton.ops.neuron import empf_neuron_plan

    x = torch.randn(2, 3, 4, device=DEVICE)
    k = torch.ones(2, 4, device=DEVICE)
    q = dict(decay=0.5, threshold=0.5, impl="triton")
    with pytest.raises(ValueError, match="come together"):
        empf_neuron_plan(x, in_scale=k, **q)
    with pytest.raises(ValueError, match=r"\[T, C\] = \[2, 4\]"):
        empf_neuron_plan(x, in_scale=k, in_bias=torch.ones(4, device=DEVICE), **q)
    with pytest.raises(TypeError, match="floating"):
        empf_neuron_plan(x, in_scale=k, in_bias=torch.ones(2, 4, dtype=torch.long), **q)
    with pytest.raises(ValueError, match="per channel"):
        empf_neuron_plan(torch.randn(2, 3, device=DEVICE), in_scale=k, in_bias=k, **q)


def test_neuron_plan_names_bad_decay_range_and_affine_dtype():
    from empf_triton.ops.neuron import empf_neuron_plan

    cur = torch.rand(2, 3, 4, 5)
    with pytest.raises(TypeError, match="decay_range must be a bool, got int"):
        empf_neuron_plan(cur, decay=0.5, threshold=0.5, decay_range=1)
    k, b = torch.ones(2, 4, dtype=torch.int32), torch.ones(2, 4)
    with pytest.raises(TypeError, match="in_scale must be a floating tensor, got dtype torch.int"):
        empf_neuron_plan(cur, decay=0.5, threshold=0.5, in_scale=k, in_bias=b)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_float_threshold_outside_fp32_is_refused(impl):
    """A float threshold that does not fit fp32 is a ValueError on every EM-PF op, as on the LIF
    ops (the kernels took it as an fp32 scalar, ±inf, and the two paths then disagreed: inf
    spikes against NaN); an infinite threshold is still possible as a tensor. fp64 currents on
    the reference take fp64 values."""
    x = torch.tensor([[0.5], [0.25], [1.0]])
    for th in (-1e39, 1e300):
        with pytest.raises(ValueError, match="threshold must fit in fp32"):
            empf_neuron(x, decay=0.5, threshold=th, impl=impl)
        with pytest.raises(ValueError, match="threshold must fit in fp32"):
            parallel_neuron(x, threshold=th, impl=impl)
        with pytest.raises(ValueError, match="threshold must fit in fp32"):
            empf_neuron_step(x[0], None, decay=0.5, threshold=th, impl=impl)
    for kw in ({"threshold": 10**400}, {"decay": 10**400}):  # not an OverflowError
        with pytest.raises(ValueError, match="must be finite, got an int beyond float range"):
            empf_neuron(x, **{"decay": 0.5, "threshold": 0.5, **kw}, impl=impl)
    with pytest.raises(ValueError, match="must be finite, got an int beyond float range"):
        parallel_neuron(x, threshold=-(10**400), impl=impl)
    inf = torch.full((3,), float("-inf"))
    s, v = empf_neuron(x, decay=0.5, threshold=inf, impl=impl)
    ref_s, ref_v = empf_neuron(x, decay=0.5, threshold=inf, impl="reference")
    torch.testing.assert_close(s, ref_s, equal_nan=True)
    torch.testing.assert_close(v, ref_v, equal_nan=True)
    if impl == "reference":
        empf_neuron(x.double(), decay=0.5, threshold=1e300, impl=impl)


@pytest.mark.parametrize(
    "op, param",
    [(op, p) for op in ("empf_neuron", "empf_neuron_step") for p in ("decay", "threshold")]
    + [("parallel_neuron", "threshold")],
)
def test_subnormal_float_params_match_reference_with_codes(device, op, param):
    """A float decay or threshold below fp32's smallest normal (1e-39, or 1e-50 which is 0 in
    fp32) is a valid value: the Triton path quantising to codes gives the reference's spikes. (In
    Triton's interpreter such a float was an fp64 constant, and the spike quantiser then raised
    an InterpreterError: "Expected dtype ['fp32'] but got fp64".)"""
    x = torch.tensor([[0.5, 0.0, 1e-39], [0.25, -1.0, 2.0]], device=device)
    for value in (1e-39, -1e-39 if param == "threshold" else 0.0, 1e-50):
        kw = {"decay": 0.5, "threshold": 0.25, param: value, "spike_bits": 4}
        if op == "empf_neuron":
            out = [empf_neuron(x[:, None], **kw, impl=impl)[0] for impl in ("triton", "reference")]
        elif op == "empf_neuron_step":
            out = [empf_neuron_step(x, **kw, impl=impl)[0] for impl in ("triton", "reference")]
        else:
            kw.pop("decay")
            out = [parallel_neuron(x[:, None], **kw, impl=impl) for impl in ("triton", "reference")]
        torch.testing.assert_close(out[0], out[1], rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fired_membrane_is_exactly_the_threshold(device, impl, dtype):
    """v[t] = min(m[t], θ_t) (docs/model.md §1): a neuron that fires keeps exactly θ_t. Computed as
    m - (m - θ) it would not: that rounds (off by an ulp for most fired neurons in fp32), drops to
    0 for a large m (1e8 - fl(1e8 - 0.3) = 0) and is NaN for an infinite current (inf - inf),
    which then poisons every later step of that neuron."""
    gen = torch.Generator().manual_seed(0)
    cur = (torch.randn(2, 4096, generator=gen) * 2).to(dtype)
    cur[0, :3] = torch.tensor([1e8 if dtype == torch.float32 else 6e4, float("inf"), 3.0])
    cur = cur.to(device)
    th = torch.tensor([0.3, 0.45], device=device)
    lam = torch.tensor([0.5, 0.75], device=device)
    for mode in ("online", "bptt"):
        s1, v1 = empf_neuron(cur[:1], decay=lam[:1], threshold=th[:1], grad_mode=mode, impl=impl)
        m = cur[0].float()  # v0 = 0: m[0] = I[0] exactly
        fired = m > th[0]
        assert fired.sum() > 1000
        want = torch.where(fired, th[0], m).to(dtype)
        assert torch.equal(v1, want)
        # the infinite current fires an infinite spike, and the neuron carries on from θ
        s, v = empf_neuron(cur, decay=lam, threshold=th, grad_mode=mode, impl=impl)
        assert s[0, 1] == float("inf")
        assert torch.isfinite(s[1, :3]).all() and torch.isfinite(v[:3]).all()
        m1 = lam[1] * th[0] + cur[1, :3].float()
        assert torch.equal(s[1, :3], torch.relu(m1 - th[1]).to(dtype))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_online_v_last_gradient_reaches_the_last_threshold(device, impl):
    """docs/model.md §3, online mode: dL/dv_last reaches θ_{T-1} (+ Σ gv · H[T-1]) and λ_{T-1}
    (Σ gv · (1 - H[T-1]) · v[T-2]), and no earlier step; the spikes' gradient is 0 here."""
    cur, v0, decay, th, g, gv = _inputs(3, 500, device, seed=11)
    out = _run_multi(impl, torch.float32, cur, v0, decay, th, g * 0, gv, None, "online")
    v, H = v0.float(), []
    vs = [v]
    for t in range(3):
        m = decay[t] * v + cur[t].float()
        H.append((m > th[t]).float())
        v = torch.where(m > th[t], th[t], m)
        vs.append(v)
    gv = gv.float()
    assert 0 < H[2].sum() < 500
    want_th = torch.stack([torch.zeros(()), torch.zeros(()), (gv * H[2]).sum().cpu()])
    want_lam = torch.stack(
        [torch.zeros(()), torch.zeros(()), (gv * (1 - H[2]) * vs[2]).sum().cpu()]
    )
    torch.testing.assert_close(out["d_threshold"].cpu(), want_th, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["d_decay"].cpu(), want_lam, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [float("nan"), float("-inf")])
def test_online_v_last_gradient_skips_an_earlier_nonfinite_membrane(device, bad):
    """Online with a loss on v_last only, λ_t of an earlier step has no path to the loss: its
    gradient is 0 even where v[t-1] is NaN or infinite (the kernel once multiplied the missing
    dL/dm[t], 0, by v[t-1]: NaN)."""
    res = {}
    for impl in ("triton", "reference"):
        c = torch.tensor([[bad, 0.2], [0.3, 0.1], [0.2, 0.4]], device=device, requires_grad=True)
        d = torch.tensor([0.5, 0.6, 0.7], device=device, requires_grad=True)
        _, v = empf_neuron(c, decay=d, threshold=0.5, grad_mode="online", impl=impl)
        v.sum().backward()
        res[impl] = (c.grad, d.grad)
    for a, b in zip(res["triton"], res["reference"]):
        torch.testing.assert_close(a, b, equal_nan=True)
    assert res["triton"][1][1] == 0


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
def test_nan_threshold_never_fires_and_keeps_the_charge(device, impl, grad_mode):
    """A NaN threshold (a tensor's values are not all inspected) gives NaN spikes at its step but
    never fires: H = 0, so v = where(m > θ, θ, m) keeps m (the former m - s made the membrane NaN
    for good), dv/dm = 1 and dL/dθ = 0 there (docs/model.md §1); both impls agree."""
    cur, v0, decay, th, g, gv = _inputs(3, 64, device, seed=5)
    th[1] = float("nan")
    out = _run_multi(impl, torch.float32, cur, v0, decay, th, g, gv, None, grad_mode)
    ref = _run_multi("reference", torch.float64, cur, v0, decay, th, g, gv, None, grad_mode)
    assert torch.isnan(out["spikes"][1]).all()
    assert torch.isfinite(out["spikes"][[0, 2]]).all() and torch.isfinite(out["v_last"]).all()
    assert out["d_threshold"][1] == 0
    for k in ("spikes", "v_last", "d_current", "d_v0", "d_decay", "d_threshold"):
        if ref[k] is None:  # online mode: no gradient for v0
            assert out[k] is None, k
            continue
        torch.testing.assert_close(out[k].double(), ref[k], rtol=1e-5, atol=1e-5, equal_nan=True)
