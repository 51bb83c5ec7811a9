"""torch.library registration: the shared helper, opcheck of every neuron/LIF op (forward and
backward), and `torch.compile(fullgraph=True)` of the neuron modules (no graph break, no
recompile per step)."""

from __future__ import annotations

import pytest
import torch

from empf_triton.ops._library import NAMESPACE, register_op


def _toy_impl(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x * factor


def _toy_fake(x, factor):
    return torch.empty_like(x)


def _toy_setup(ctx, inputs, output):
    ctx.factor = inputs[1]


def _toy_backward(ctx, g):
    return _TOY(g, ctx.factor), None


_TOY = register_op(
    "_test_toy_scale", _toy_impl, fake=_toy_fake, backward=_toy_backward, setup_context=_toy_setup
)


def test_register_op_defines_a_differentiable_op_that_passes_opcheck():
    x = torch.randn(3, 5, requires_grad=True)
    y = torch.ops.empf._test_toy_scale(x, 3.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((3, 5), 3.0))
    assert NAMESPACE == "empf"
    torch.library.opcheck(_TOY, (torch.randn(4, 2, requires_grad=True), 0.5))


def test_register_op_compiles_without_graph_break():
    fn = torch.compile(lambda x: _TOY(x, 2.0).relu(), fullgraph=True, backend="aot_eager")
    x = torch.randn(7)
    torch.testing.assert_close(fn(x), (2.0 * x).relu())


@pytest.mark.parametrize(
    ("name", "kw"),
    [("empf::bad", {}), ("", {}), ("ok_name", {"setup_context": _toy_setup})],
)
def test_register_op_rejects_bad_arguments(name, kw):
    with pytest.raises(ValueError):
        register_op(name, _toy_impl, fake=_toy_fake, **kw)


# ------------------------------------------------------------------- opcheck of the neuron ops

from empf_triton.nn import EMPFNeuron, LIFNeuron, reset_net  # noqa: E402
from empf_triton.ops import lif as lif_ops  # noqa: E402
from empf_triton.ops import neuron as neuron_ops  # noqa: E402


def _leaf(*shape):
    return (torch.rand(*shape) * 1.5 - 0.2).requires_grad_()


@pytest.mark.parametrize("logits", [False, True])
@pytest.mark.parametrize("bptt", [False, True])
def test_opcheck_neuron_fwd(bptt, logits):
    T, N = 3, 13
    cur, v0 = _leaf(T, N), _leaf(N)
    d, th = torch.rand(T).requires_grad_(), torch.rand(T).requires_grad_()
    flags = neuron_ops._LOGITS * logits + neuron_ops._BPTT * bptt + 4 + 8
    args = (cur, v0, d, th, [0, 1, 1, 4, flags], [0.0, 0.0, 0.25])
    torch.library.opcheck(neuron_ops._NEURON_FWD, args)
    # scalar parameters and no v0
    args = (cur, None, None, None, [0, 1, 1, 0, neuron_ops._BPTT * bptt + 4], [0.5, 0.3, 0.25])
    torch.library.opcheck(neuron_ops._NEURON_FWD, args)


def test_opcheck_neuron_fwd_per_channel_and_step_row():
    N, C, S = 2, 3, 2
    cur = _leaf(2, N * C * S)
    d = torch.rand(2, C).requires_grad_()
    th = torch.rand(2, C).requires_grad_()
    args = (cur, None, d, th, [0, C, S, 0, 2 + 4 + 8], [0.0, 0.0, 0.25])
    torch.library.opcheck(neuron_ops._NEURON_FWD, args)
    # step t0 = 2 of a [4] logit vector: a one-step call
    cur1, a, b = _leaf(1, 9), torch.randn(4).requires_grad_(), torch.randn(4).requires_grad_()
    args = (cur1, _leaf(9), a, b, [2, 1, 1, 0, 1 + 2 + 4 + 8], [0.0, 0.0, 0.25])
    torch.library.opcheck(neuron_ops._NEURON_FWD, args)


def test_opcheck_parallel_ops():
    cur, th = _leaf(3, 11), torch.rand(3).requires_grad_()
    torch.library.opcheck(neuron_ops._PARALLEL_FWD, (cur, th, [0, 1, 1, 4, 4], [0.0, 0.25]))
    torch.library.opcheck(neuron_ops._PARALLEL_FWD, (cur, None, [0, 1, 1, 0, 4], [0.4, 0.25]))
    a = torch.randn(5).requires_grad_()  # logits, step rows 1..3 of 5
    torch.library.opcheck(neuron_ops._PARALLEL_FWD, (cur, a, [1, 1, 1, 0, 1 + 4], [0.0, 0.25]))


@pytest.mark.parametrize("bptt", [False, True])
def test_opcheck_lif_fwd(bptt):
    T, N = 3, 10
    args = (_leaf(T, N), _leaf(N), torch.rand(T).requires_grad_(), torch.rand(T) + 0.5,
            "sigmoid", 4.0, 2 * bptt + 4, 0.0, 0.0)  # fmt: skip
    torch.library.opcheck(lif_ops._LIF_FWD, args)
    # float decay and threshold: None tensors, the values as kernel scalars
    args = (_leaf(T, N), _leaf(N), None, None, "atan", 2.0, 2 * bptt + 4, 0.75, 0.6)
    torch.library.opcheck(lif_ops._LIF_FWD, args)
    # one of each
    args = (_leaf(T, N), None, None, torch.rand(T).requires_grad_(), "sigmoid", 4.0, 4, 0.5, 0.0)
    torch.library.opcheck(lif_ops._LIF_FWD, args)


def _bwd_calls(fwd_op, args, bwd_name: str) -> list[tuple]:
    """The arguments of each call of the backward op `empf::{bwd_name}` that the forward op's
    registered autograd makes when `args`' outputs are backpropagated."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []
    target = getattr(torch.ops.empf, bwd_name).default

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is target:
                calls.append(tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a
                                   for a in args))  # fmt: skip
            return func(*args, **(kwargs or {}))

    outs = fwd_op(*args)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).view_as(o)).sum()
               for o in outs if isinstance(o, torch.Tensor) and o.requires_grad)  # fmt: skip
    with Record():
        loss.backward()
    assert calls, f"no {bwd_name} call"
    return calls


@pytest.mark.parametrize("bptt", [False, True])
def test_opcheck_backward_ops(bptt):
    """The backward custom ops (called by the forward ops' registered autograd, so by every
    compiled graph's backward) pass opcheck too, with the arguments a real backward gives them."""
    T, N = 3, 13
    flags = neuron_ops._BPTT * bptt + 4 + 8
    fwd = (_leaf(T, N), _leaf(N), torch.rand(T).requires_grad_(), torch.rand(T).requires_grad_(),
           [0, 1, 1, 4, flags], [0.0, 0.0, 0.25])  # fmt: skip
    scalars = (_leaf(T, N), None, None, None, [0, 1, 1, 0, neuron_ops._BPTT * bptt + 4],
               [0.5, 0.3, 0.25])  # fmt: skip
    lif = (_leaf(T, N), _leaf(N), torch.rand(T).requires_grad_(), torch.rand(T) + 0.5,
           "sigmoid", 4.0, 2 * bptt + 4, 0.0, 0.0)  # fmt: skip
    par = (_leaf(T, 11), torch.rand(T).requires_grad_(), [0, 1, 1, 4, 4], [0.0, 0.25])
    cases = [
        (neuron_ops._NEURON_FWD, fwd, "neuron_bwd", neuron_ops._NEURON_BWD),
        (neuron_ops._NEURON_FWD, scalars, "neuron_bwd", neuron_ops._NEURON_BWD),
        (lif_ops._LIF_FWD, lif, "lif_bwd", lif_ops._LIF_BWD),
        (neuron_ops._PARALLEL_FWD, par, "parallel_bwd", neuron_ops._PARALLEL_BWD),
    ]
    for fwd_op, args, name, bwd_op in cases:
        for call in _bwd_calls(fwd_op, args, name):
            torch.library.opcheck(bwd_op, call)


def _strided(x):
    """x's values in a non-contiguous tensor (every other element of a buffer twice as long)."""
    buf = torch.zeros(*x.shape[:-1], 2 * x.shape[-1])
    buf[..., ::2] = x.detach()
    return buf[..., ::2].requires_grad_(x.requires_grad)


@pytest.mark.parametrize("op", ["neuron_fwd", "parallel_fwd", "lif_fwd"])
def test_fwd_ops_take_non_contiguous_inputs(op):
    """The ops' kernels read their tensors as contiguous: a direct call with other strides (a
    transposed current, a strided v0 or [T] parameter) gave wrong values, and fake results with
    the current's strides where the real ones are contiguous (opcheck's fake-tensor check)."""
    T, N = 3, 13
    cur, v0 = _leaf(T, N), _leaf(N)
    d, th = torch.rand(T).requires_grad_(), (torch.rand(T) + 0.2).requires_grad_()
    if op == "neuron_fwd":
        fn = neuron_ops._NEURON_FWD
        args = lambda c, v, dd, tt: (c, v, dd, tt, [0, 1, 1, 0, 2 + 4 + 8], [0.0, 0.0, 0.25])
    elif op == "parallel_fwd":
        fn = neuron_ops._PARALLEL_FWD
        args = lambda c, v, dd, tt: (c, tt, [0, 1, 1, 0, 4], [0.0, 0.25])
    else:
        fn = lif_ops._LIF_FWD
        args = lambda c, v, dd, tt: (c, v, dd, tt, "sigmoid", 4.0, 2 + 4, 0.0, 0.0)
    # a transposed current: [T, N] with strides (1, T)
    cur_t = cur.detach().t().contiguous().t().requires_grad_()
    strided = args(cur_t, _strided(v0), _strided(d), _strided(th))
    dense = args(cur, v0, d, th)
    torch.library.opcheck(fn, strided)
    out_s, out_d = fn(*strided), fn(*dense)
    for a, b in zip(out_s, out_d):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert a.is_contiguous()
    ins_s = [t for t in strided if isinstance(t, torch.Tensor)]
    ins_d = [t for t in dense if isinstance(t, torch.Tensor)]
    g = torch.randn_like(out_d[0])
    grads_s = torch.autograd.grad(out_s[0], ins_s, g, allow_unused=True)
    grads_d = torch.autograd.grad(out_d[0], ins_d, g, allow_unused=True)
    for a, b in zip(grads_s, grads_d):
        torch.testing.assert_close(a, b)


def test_parallel_bwd_fake_is_contiguous_for_a_transposed_gradient():
    T, N = 3, 13
    _, mask = neuron_ops._PARALLEL_FWD(torch.rand(T, N), None, [0, 1, 1, 0, 4], [0.4, 0.25])
    g = torch.randn(N, T).t()  # [T, N], strides (1, T): the gradient of a transposed use
    args = (g, mask, None, 0, False, 1, 1, N, False)
    torch.library.opcheck(neuron_ops._PARALLEL_BWD, args)
    dcur, _ = neuron_ops._PARALLEL_BWD(*args)
    torch.testing.assert_close(dcur, neuron_ops._PARALLEL_BWD(g.contiguous(), *args[1:])[0])


# ------------------------------------------------------------- torch.compile of the modules


def _clone(module):
    import copy

    return copy.deepcopy(module)


def _run_steps(m, x, step_mode):
    reset_net(m)
    if step_mode == "m":
        return m(x)
    return torch.stack([m(x[t]) for t in range(x.shape[0])])


def _compare_compiled(make, x, step_mode, backend):
    torch._dynamo.reset()  # compiles of the shared forward code count against one limit
    eager = make()
    comp_mod = _clone(eager)
    comp = torch.compile(comp_mod, fullgraph=True, backend=backend)
    g = torch.randn_like(x)
    outs, grads = [], []
    for m, fn in ((eager, eager), (comp_mod, comp)):
        xi = x.clone().requires_grad_()
        if step_mode == "m":
            reset_net(m)
            out = fn(xi)
        else:
            reset_net(m)
            out = torch.stack([fn(xi[t]) for t in range(x.shape[0])])
        (out * g).sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("step_mode", "grad_mode", "parallel", "mem_bn"),
    [
        ("s", "online", False, False),
        ("s", "bptt", False, False),
        ("m", "online", False, False),
        ("m", "bptt", False, False),
        ("s", "online", True, False),
        ("m", "online", True, False),
        ("s", "online", False, True),
        ("m", "bptt", False, True),
    ],
)
def test_empf_neuron_compiles_fullgraph(step_mode, grad_mode, parallel, mem_bn):
    T = 3
    x = torch.randn(T, 4, 3, 2) + 0.4

    def make():
        m = EMPFNeuron(
            T, spike_bits=4, parallel=parallel, step_mode=step_mode, grad_mode=grad_mode,
            impl="triton", mem_bn=mem_bn, channels=3 if mem_bn else None,
        )  # fmt: skip
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 1:
                    p.copy_(torch.linspace(-0.5, 0.5, p.shape[0]))
        return m

    _compare_compiled(make, x, step_mode, "aot_eager")


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_lif_neuron_compiles_fullgraph(step_mode):
    x = torch.rand(3, 4, 5) * 1.5
    make = lambda: LIFNeuron(step_mode=step_mode, impl="triton")  # noqa: E731
    _compare_compiled(make, x, step_mode, "aot_eager")


@pytest.mark.parametrize("module", ["EMPFNeuron", "LIFNeuron"])
def test_modules_compile_with_inductor(module):
    T = 2
    x = torch.randn(T, 3, 5) + 0.4
    if module == "EMPFNeuron":
        make = lambda: EMPFNeuron(T, step_mode="m", impl="triton")  # noqa: E731
    else:
        make = lambda: LIFNeuron(step_mode="m", impl="triton")  # noqa: E731
    # Inductor's on-disk caches do not key on a custom op's fake function: a cache written by an
    # older version of the op would be reused with wrong output shapes. Compile afresh.
    import torch._inductor.config as inductor_config

    with inductor_config.patch(force_disable_caches=True):
        _compare_compiled(make, x, "m", "inductor")


def test_step_mode_state_does_not_recompile_across_samples():
    """The carried membrane is an input of the compiled graph, not a guard: after the first
    sample's graphs, further samples run without recompiling."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    T = 3
    m = EMPFNeuron(T, step_mode="s", impl="triton")
    cnt = CompileCounter()
    comp = torch.compile(m, fullgraph=True, backend=cnt, dynamic=False)
    x = torch.randn(T, 4, 5)
    m(x[0])  # one eager step first: kernels imported, input checked (as in a real loop)
    counts = []
    for _ in range(4):
        reset_net(m)
        for t in range(T):
            comp(x[t]).sum().backward()
        counts.append(cnt.frame_count)
    # sample 1: one graph per step index t (the step's parameters are read at row t);
    # later samples recompile nothing.
    assert counts[0] <= T, counts
    assert counts[3] == counts[2] == counts[1] == counts[0], f"recompiled: {counts}"
