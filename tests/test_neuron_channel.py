"""Per-channel neuron parameters (deployment folding): decay/threshold of shape [T, C] or [1, C]
for the multi-step ops, [C] for the single-step op, broadcast along dim 1 of each step
`[N, C, *]`. Triton kernels vs the eager reference vs an fp64 oracle, forward and backward."""

from __future__ import annotations

import pytest
import torch
from helpers import DTYPES, assert_close_to_oracle

from empf_triton.ops.neuron import empf_neuron, empf_neuron_step, parallel_neuron

# (T, per-step shape [N, C, *]): odd sizes, with and without trailing dims
SHAPES = [(1, (3, 5)), (3, (2, 7, 3)), (4, (5, 3, 2, 3)), (2, (1, 33, 31))]


def _params(T, C, rows, seed):
    gen = torch.Generator().manual_seed(seed)
    decay = (torch.rand(rows, C, generator=gen) * 0.6 + 0.3).double()
    th = (torch.rand(rows, C, generator=gen) * 0.5 + 0.25).double()
    return decay, th


def _run(op, impl, dtype, cur, decay, th, g, gv, **kw):
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    c = cur.to(dtype).clone().requires_grad_()
    d = decay.to(pdtype).clone().requires_grad_()
    t = th.to(pdtype).clone().requires_grad_()
    if op == "parallel":
        spikes = parallel_neuron(c, threshold=t, impl=impl, **kw)
        v_last = None
        loss = (spikes * g.to(dtype)).sum()
    else:
        spikes, v_last = empf_neuron(c, decay=d, threshold=t, impl=impl, **kw)
        loss = (spikes * g.to(dtype)).sum() + (v_last * gv.to(dtype)).sum()
    loss.backward()
    return {
        "spikes": spikes.detach(),
        "v_last": v_last.detach() if v_last is not None else None,
        "d_current": c.grad,
        "d_decay": d.grad if op != "parallel" else None,
        "d_threshold": t.grad,
    }


@pytest.mark.parametrize("rows", ["T", "1"])
@pytest.mark.parametrize("op", ["online", "bptt", "parallel"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_channel_matches_reference(device, dtype, op, rows):
    for i, (T, step_shape) in enumerate(SHAPES):
        C = step_shape[1]
        gen = torch.Generator().manual_seed(i)
        cur = (torch.randn(T, *step_shape, generator=gen) * 0.8 + 0.3).double().to(device)
        g = torch.randn(T, *step_shape, generator=gen).double().to(device)
        gv = torch.randn(*step_shape, generator=gen).double().to(device)
        decay, th = (p.to(device) for p in _params(T, C, T if rows == "T" else 1, seed=i))
        kw = {"spike_bits": 4} if op == "parallel" else {"grad_mode": op}
        kern = _run(op, "triton", dtype, cur, decay, th, g, gv, **kw)
        ref = _run(op, "reference", dtype, cur, decay, th, g, gv, **kw)
        c64, g64, gv64 = (x.to(dtype).double() for x in (cur, g, gv))
        oracle = _run(op, "reference", torch.float64, c64, decay, th, g64, gv64, **kw)
        for name in kern:
            if kern[name] is None:
                assert ref[name] is None
                continue
            assert_close_to_oracle(
                f"{name} {T}x{step_shape}", kern[name], ref[name], oracle[name], data_dtype=dtype
            )
        assert kern["d_threshold"].shape == th.shape
        if dtype == torch.float32:
            assert torch.equal(kern["spikes"], ref["spikes"])


def test_per_channel_equals_per_step_when_channels_agree(device):
    """A [T, C] parameter whose columns are equal gives exactly the [T] result."""
    T, C = 3, 4
    cur = torch.randn(T, 2, C, 5, device=device)
    d = torch.rand(T, device=device) * 0.5 + 0.3
    th = torch.rand(T, device=device) * 0.5
    for impl in ("reference", "triton"):
        a = empf_neuron(cur, decay=d, threshold=th, impl=impl)
        b = empf_neuron(
            cur, decay=d[:, None].expand(T, C), threshold=th[:, None].repeat(1, C), impl=impl
        )
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_step_op_takes_per_channel_1d(device, impl):
    N, C = 3, 6
    x = torch.randn(N, C, 2, device=device) + 0.3
    v = torch.rand(N, C, 2, device=device)
    d = (torch.rand(C, device=device) * 0.6 + 0.3).requires_grad_()
    th = (torch.rand(C, device=device) * 0.5).requires_grad_()
    s, v1 = empf_neuron_step(x, v, decay=d, threshold=th, spike_bits=4, impl=impl)
    m = d.detach()[:, None] * v + x
    ref_s = torch.clamp(torch.round((m - th.detach()[:, None]).clamp(min=0) / 0.25), 0, 15) * 0.25
    torch.testing.assert_close(s, ref_s)
    (s.sum() + v1.sum()).backward()
    assert d.grad.shape == (C,) and th.grad.shape == (C,)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: empf_neuron(torch.randn(3, 2, 4), decay=torch.rand(3, 5), threshold=0.5), "C=4"),
        (lambda: empf_neuron(torch.randn(3, 2, 4), decay=torch.rand(2, 4), threshold=0.5), "decay"),
        (lambda: empf_neuron(torch.randn(3, 4), decay=torch.rand(3, 4), threshold=0.5), "decay"),
        (lambda: empf_neuron(torch.randn(3, 2, 4), decay=0.5, threshold=torch.rand(4)), r"\[T\]"),
        (lambda: parallel_neuron(torch.randn(3, 2, 4), threshold=torch.rand(3, 2)), "C=4"),
        (lambda: empf_neuron_step(torch.randn(2, 4), decay=torch.rand(3), threshold=0.5), r"\[C\]"),
        (lambda: empf_neuron_step(torch.randn(2, 4), decay=torch.rand(1, 4), threshold=0.5),
         r"\[C\]"),
        (lambda: empf_neuron(torch.randn(3, 2, 4), decay=torch.rand(3, 4) + 1, threshold=0.5),
         r"\[0, 1\]"),
    ],
)  # fmt: skip
def test_bad_per_channel_shapes_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_deployment_call_under_no_grad(device):
    """What deployment calls: [T, C] folded decay and threshold, 4-bit spikes, no autograd."""
    T, C = 4, 3
    x = torch.randn(T, 2, C, 4, 4, device=device) + 0.2
    D = torch.rand(T, C, device=device) * 0.9
    Th = torch.rand(T, C, device=device) * 0.6
    with torch.no_grad():
        a = empf_neuron(x, decay=D, threshold=Th, spike_bits=4, spike_step=0.25, impl="triton")
        b = empf_neuron(x, decay=D, threshold=Th, spike_bits=4, spike_step=0.25, impl="reference")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
