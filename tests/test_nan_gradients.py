"""A NaN input current through the forward AND backward of the EM-PF, parallel and LIF neurons:
the Triton kernels put NaN exactly where the reference's autograd does (in spikes, membranes,
input gradients and the [T] parameter gradients), and nowhere else: a NaN in one neuron never
leaks into another neuron's outputs or input gradient."""

from __future__ import annotations

import pytest
import torch

from empf_triton.ops.lif import lif_neuron
from empf_triton.ops.neuron import empf_neuron, parallel_neuron

T, N, BAD_T, BAD_N = 3, 37, 1, 5


def _inputs(device):
    g = torch.Generator().manual_seed(4)
    cur = torch.randn(T, N, generator=g) * 0.6 + 0.4
    cur[BAD_T, BAD_N] = float("nan")
    v0 = torch.rand(N, generator=g) * 0.3
    grad = torch.randn(T, N, generator=g)
    gv = torch.randn(N, generator=g)
    decay = torch.tensor([0.5, 0.6, 0.7])
    th = torch.tensor([0.5, 0.4, 0.45])
    return [x.to(device) for x in (cur, v0, grad, gv, decay, th)]


def _run(op, impl, device, **kw):
    cur, v0, grad, gv, decay, th = _inputs(device)
    leaves = [x.clone().requires_grad_() for x in (cur, v0, decay, th)]
    if op == "parallel":
        s = parallel_neuron(leaves[0], threshold=leaves[3], impl=impl, **kw)
        loss, outs = (s * grad).sum(), [s]
        wrt = [leaves[0], leaves[3]]
    else:
        fn = empf_neuron if op == "empf" else lif_neuron
        s, v = fn(leaves[0], leaves[1], decay=leaves[2], threshold=leaves[3], impl=impl, **kw)
        loss, outs = (s * grad).sum() + (v * gv).sum(), [s, v]
        wrt = leaves
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return [o.detach() for o in outs] + list(grads)


# At a NaN membrane both paths take H = 1[m > θ] = 0 (reference: `reference.neuron.fire`).
CASES = [
    pytest.param("empf", {"grad_mode": "online"}),
    pytest.param("empf", {"grad_mode": "bptt"}),
    pytest.param("empf", {"grad_mode": "bptt", "spike_bits": 4}),
    pytest.param("parallel", {}),
    pytest.param("parallel", {"spike_bits": 4}),
    ("lif", {"grad_mode": "online"}),
    ("lif", {"grad_mode": "bptt"}),
    # each surrogate (the triangle's max(γ - |x|, 0) in the kernel dropped the NaN to 0)
    ("lif", {"grad_mode": "bptt", "surrogate": "atan"}),
    ("lif", {"grad_mode": "bptt", "surrogate": "triangle"}),
    ("lif", {"grad_mode": "online", "surrogate": "triangle"}),
]


@pytest.mark.parametrize(("op", "kw"), CASES, ids=lambda v: str(v))
def test_nan_current_gives_nan_where_the_reference_does(device, op, kw):
    tri = _run(op, "triton", device, **kw)
    ref = _run(op, "reference", device, **kw)
    # EM-PF/parallel spikes carry the NaN; LIF spikes are 0/1 and its membrane carries it.
    carrier = ref[1][BAD_N] if op == "lif" else ref[0][BAD_T, BAD_N]
    assert torch.isnan(carrier), "the NaN current must reach an output"
    n_out = 1 if op == "parallel" else 2
    assert any(r is not None and torch.isnan(r).any() for r in ref[n_out:]) or op == "parallel", (
        "expected the NaN to reach a gradient in the reference"
    )
    for i, (a, b) in enumerate(zip(tri, ref)):
        assert (a is None) == (b is None), f"output {i}: gradient present on one side only"
        if a is None:
            continue
        assert torch.equal(torch.isnan(a), torch.isnan(b)), (
            f"output {i}: NaN at {torch.isnan(a).nonzero().tolist()} (triton) vs "
            f"{torch.isnan(b).nonzero().tolist()} (reference)"
        )
        finite = ~torch.isnan(b)
        torch.testing.assert_close(a[finite], b[finite], rtol=1e-5, atol=1e-5)
    # per-neuron outputs and the input gradient: the NaN stays in its own neuron
    others = torch.ones(N, dtype=torch.bool, device=device)
    others[BAD_N] = False
    assert torch.isfinite(tri[0][:, others]).all(), "NaN leaked into other neurons' spikes"
    d_cur = tri[2] if op != "parallel" else tri[1]
    assert torch.isfinite(d_cur[:, others]).all(), "NaN leaked into other neurons' gradients"
