"""Neuron modules: step mode vs multi-step mode, state handling, SpikingJelly equivalence."""

from __future__ import annotations

import pytest
import torch
from helpers import import_spikingjelly

from empf_triton import detach_net, reset_net
from empf_triton.nn import EMPFNeuron, LIFNeuron


def _grads(module):
    return [p.grad.clone() for p in module.parameters()]


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
@pytest.mark.parametrize("parallel", [False, True])
def test_empf_step_mode_equals_multi_step(device, impl, grad_mode, parallel):
    T = 4
    x = torch.randn(T, 3, 5, device=device) + 0.5
    g = torch.randn(T, 3, 5, device=device)
    ms = EMPFNeuron(
        T, spike_bits=4, parallel=parallel, step_mode="m", grad_mode=grad_mode, impl=impl
    ).to(device)
    ss = EMPFNeuron(
        T, spike_bits=4, parallel=parallel, step_mode="s", grad_mode=grad_mode, impl=impl
    ).to(device)
    with torch.no_grad():
        for p in list(ms.parameters()) + list(ss.parameters()):
            p.copy_(torch.linspace(-0.5, 0.5, T))
    xm = x.clone().requires_grad_()
    out_m = ms(xm)
    (out_m * g).sum().backward()
    xs = x.clone().requires_grad_()
    out_s = torch.stack([ss(xs[t]) for t in range(T)])
    (out_s * g).sum().backward()
    torch.testing.assert_close(out_s, out_m, rtol=0, atol=1e-6)
    torch.testing.assert_close(xs.grad, xm.grad, rtol=0, atol=1e-6)
    for a, b in zip(_grads(ss), _grads(ms)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_empf_initial_parameters_and_state():
    n = EMPFNeuron(3)
    assert torch.equal(n.decay, torch.full((3,), 0.5))
    assert torch.equal(n.threshold, torch.full((3,), 0.5))
    assert EMPFNeuron(3, parallel=True).decay is None
    assert n.v is None and n.t == 0


def test_step_mode_limits_calls_to_T_and_reset_net_restarts():
    net = torch.nn.Sequential(torch.nn.Identity(), EMPFNeuron(2))
    x = torch.ones(4)
    net(x)
    net(x)
    with pytest.raises(RuntimeError, match="reset_net"):
        net(x)
    reset_net(net)
    assert net[1].t == 0 and net[1].v is None
    net(x)


@pytest.mark.parametrize("fn", [reset_net, detach_net], ids=["reset_net", "detach_net"])
@pytest.mark.parametrize("bad", [None, "model", [EMPFNeuron(2)], torch.zeros(3)], ids=repr)
def test_reset_and_detach_net_name_a_non_module(fn, bad):
    """A model that is not an nn.Module (None, a list of modules, ...) is a TypeError naming the
    function, as frozen_weights, not an AttributeError on `.modules`."""
    with pytest.raises(TypeError, match=f"{fn.__name__} needs an nn.Module, got"):
        fn(bad)


def test_multi_step_checks_T_and_fresh_state():
    n = EMPFNeuron(3, step_mode="m")
    with pytest.raises(ValueError, match=r"T=3"):
        n(torch.randn(4, 2))
    n(torch.randn(3, 2))
    with pytest.raises(RuntimeError, match="reset_net"):
        n(torch.randn(3, 2))


def test_online_step_mode_keeps_no_graph_across_steps():
    n = EMPFNeuron(4, grad_mode="online")
    x = torch.randn(6, requires_grad=True)
    n(x)
    assert n.v is not None and n.v.grad_fn is None and not n.v.requires_grad
    b = EMPFNeuron(4, grad_mode="bptt")
    b(x)
    assert b.v.grad_fn is not None
    detach_net(b)
    assert b.v.grad_fn is None and b.v is not None


def test_online_step_mode_per_step_backward_matches_multistep_online():
    """Online training calls backward after every step; the summed gradients equal one online
    multi-step backward (the temporal path is cut either way)."""
    T = 3
    x = torch.randn(T, 10) + 0.4
    ss = EMPFNeuron(T, grad_mode="online")
    ms = EMPFNeuron(T, grad_mode="online", step_mode="m")
    for t in range(T):
        ss(x[t]).sum().backward()
    ms(x).sum().backward()
    for a, b in zip(_grads(ss), _grads(ms)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    ("make", "exc"),
    [
        (lambda: EMPFNeuron(0), ValueError),
        (lambda: EMPFNeuron(2.5), ValueError),
        (lambda: EMPFNeuron(2, spike_bits=9), ValueError),
        (lambda: EMPFNeuron(2, spike_step=0), ValueError),
        (lambda: EMPFNeuron(2, step_mode="x"), ValueError),
        (lambda: EMPFNeuron(2, grad_mode="stbp"), ValueError),
        (lambda: EMPFNeuron(2, impl="gpu"), ValueError),
        (lambda: LIFNeuron(tau=1.0), ValueError),
        (lambda: LIFNeuron(surrogate="erf"), ValueError),
        (lambda: LIFNeuron(alpha=-1.0), ValueError),
        (lambda: LIFNeuron(v_threshold=float("inf")), ValueError),
        # ints beyond float range: ValueErrors, not Python's OverflowError
        (lambda: LIFNeuron(tau=10**400), ValueError),
        (lambda: LIFNeuron(v_threshold=-(10**400)), ValueError),
        (lambda: LIFNeuron(alpha=10**400), ValueError),
        (lambda: EMPFNeuron(2, spike_bits=4, spike_step=10**400), ValueError),
        # channels is checked without mem_bn too (it was recorded unchecked)
        (lambda: EMPFNeuron(2, channels=0), ValueError),
        (lambda: EMPFNeuron(2, channels=-3), ValueError),
        (lambda: EMPFNeuron(2, channels="8"), ValueError),
        (lambda: EMPFNeuron(2, channels=True), ValueError),
    ],
)
def test_bad_construction_raises(make, exc):
    with pytest.raises(exc):
        make()


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("detach_reset", [False, True])
def test_lif_equals_spikingjelly(device, impl, step_mode, detach_reset):
    sj = import_spikingjelly().neuron
    from spikingjelly.activation_based import surrogate

    T, tau, vth = 5, 2.0, 1.0
    x = (torch.rand(T, 4, 6, device=device) * 1.5).requires_grad_()
    ref = sj.LIFNode(
        tau=tau,
        decay_input=False,
        v_reset=None,
        v_threshold=vth,
        surrogate_function=surrogate.Sigmoid(alpha=4.0),
        detach_reset=detach_reset,
        step_mode="m",
    )
    ours = LIFNeuron(
        tau=tau, v_threshold=vth, detach_reset=detach_reset, step_mode=step_mode, impl=impl
    )
    x2 = x.detach().clone().requires_grad_()
    s_ref = ref(x)
    s_ours = ours(x2) if step_mode == "m" else torch.stack([ours(x2[t]) for t in range(T)])
    g = torch.randn_like(s_ref)
    (s_ref * g).sum().backward()
    (s_ours * g).sum().backward()
    torch.testing.assert_close(s_ours, s_ref, rtol=0, atol=0)
    torch.testing.assert_close(ours.v, ref.v, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ robustness


@pytest.mark.parametrize(
    "make",
    [
        lambda: EMPFNeuron(2, parallel="yes"),
        lambda: EMPFNeuron(2, parallel=1),
        lambda: EMPFNeuron(2, mem_bn="no", channels=3),
        lambda: LIFNeuron(detach_reset="true"),
        lambda: EMPFNeuron(2, spike_bits=4, spike_step=1e300),
    ],
)
def test_non_bool_flags_and_bad_steps_are_rejected(make):
    with pytest.raises((TypeError, ValueError)):
        make()


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize(
    "make",
    [lambda i: EMPFNeuron(3, step_mode="m", impl=i), lambda i: LIFNeuron(step_mode="m", impl=i)],
)
def test_multi_step_twice_without_reset_raises_for_both_neurons(device, make, impl):
    n = make(impl).to(device)
    x = torch.rand(3, 2, 4, device=device)
    first = n(x)
    with pytest.raises(RuntimeError, match="reset_net"):
        n(x)
    reset_net(n)
    torch.testing.assert_close(n(x), first)


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize(
    "make",
    [
        lambda i: EMPFNeuron(3, impl=i),
        lambda i: EMPFNeuron(3, impl=i, mem_bn=True, channels=4),
        lambda i: LIFNeuron(impl=i),
    ],
)
def test_batch_change_without_reset_says_what_happened(device, make, impl):
    n = make(impl).to(device)
    n(torch.rand(2, 4, 3, device=device))
    with pytest.raises(ValueError, match=r"membrane of a batch of N=2.*reset_net"):
        n(torch.rand(5, 4, 3, device=device))
    reset_net(n)
    assert n(torch.rand(5, 4, 3, device=device)).shape == (5, 4, 3)


def test_module_revalidates_when_the_input_changes():
    n = EMPFNeuron(4, impl="reference")
    n(torch.rand(2, 3))
    reset_net(n)
    with pytest.raises(TypeError, match="dtype"):
        n(torch.ones(2, 3, dtype=torch.int32))
    with pytest.raises(ValueError, match="step_mode"):
        n(torch.tensor(1.0))


@pytest.mark.parametrize("parallel", [False, True])
def test_logits_are_one_parameter_and_former_state_dicts_load(parallel):
    """`logits` is the neuron's one parameter ([2, T]: θ's logits, λ's; [1, T] parallel);
    `threshold_logit` / `decay_logit` are views of its rows; a state dict saved with the former
    separate entries loads into it (strict), and one that does not fit fails saying why."""
    T = 3
    n = EMPFNeuron(T, parallel=parallel)
    assert [name for name, _ in n.named_parameters()] == ["logits"]
    assert n.logits.shape == (1 if parallel else 2, T)
    b, a = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([-1.0, 0.5, 2.0])
    old = {"threshold_logit": b} if parallel else {"threshold_logit": b, "decay_logit": a}
    n.load_state_dict(old)
    assert torch.equal(n.threshold_logit, b) and torch.equal(n.threshold, torch.sigmoid(b))
    if parallel:
        assert n.decay_logit is None and n.decay is None
    else:
        assert torch.equal(n.logits, torch.stack([b, a])) and torch.equal(n.decay_logit, a)
        assert torch.equal(n.decay, torch.sigmoid(a))
    with torch.no_grad():  # the row views write through to the parameter
        n.threshold_logit.fill_(0.75)
    assert torch.equal(n.logits[0], torch.full((T,), 0.75))
    twin = EMPFNeuron(T, parallel=parallel)
    twin.load_state_dict(n.state_dict())
    assert torch.equal(twin.logits, n.logits)
    bad = {k: torch.zeros(T + 1) for k in old}
    with pytest.raises(RuntimeError, match="size mismatch for logits"):
        EMPFNeuron(T, parallel=parallel).load_state_dict(bad)
    # the former state of the other kind (θ only, or θ and λ): both keys are named
    with pytest.raises(RuntimeError, match='(?s)Missing.*"logits".*Unexpected.*threshold_logit'):
        EMPFNeuron(T, parallel=not parallel).load_state_dict(old)


@pytest.mark.parametrize("parallel", [False, True])
def test_triton_step_has_one_gradient_edge_for_the_logits(parallel):
    """A Triton step's autograd node takes the input and the whole `logits` tensor: one
    gradient accumulation per step for the neuron's parameters (two separate [T] parameters
    cost a second one, a launch on a GPU)."""
    n = EMPFNeuron(3, parallel=parallel, impl="triton")
    x = torch.randn(4, 5, requires_grad=True)
    out = n(x)
    edges = [f for f, _ in out.grad_fn.next_functions if f is not None]
    assert len(edges) == 2
    assert {id(f.variable) for f in edges} == {id(x), id(n.logits)}


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
@pytest.mark.parametrize("kind", ["EMPFNeuron", "LIFNeuron"])
def test_kept_membrane_has_history_only_in_bptt(device, kind, impl, step_mode, grad_mode):
    """Online mode keeps the membrane as a constant (the Triton path hands it out of the
    autograd graph: spikes are the node's only output); bptt keeps its graph. Both paths keep
    the same values, and the online step still back-propagates into the input (and logits)."""
    T = 3
    x = (torch.randn(T, 4, 6, device=device) * 1.5).requires_grad_()

    def make(i):
        if kind == "LIFNeuron":
            return LIFNeuron(step_mode=step_mode, grad_mode=grad_mode, impl=i).to(device)
        return EMPFNeuron(T, step_mode=step_mode, grad_mode=grad_mode, impl=i).to(device)

    n, ref = make(impl), make("reference")
    for m in (n, ref):
        out = torch.stack([m(x[t]) for t in range(T)]) if step_mode == "s" else m(x)
        if m is n:
            assert (n.v.grad_fn is not None) == (grad_mode == "bptt")
            assert n.v.requires_grad == (grad_mode == "bptt")
            out.sum().backward()
            assert x.grad.abs().sum() > 0
            if kind == "EMPFNeuron":
                assert n.logits.grad.abs().sum() > 0
    torch.testing.assert_close(n.v, ref.v, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_inference_calls_are_planned_and_equal_the_reference(device, parallel, step_mode):
    """Without autograd (evaluation) the Triton module path keeps plans too (one per step
    index in step mode "s"), reads in-place parameter updates, and equals the reference."""
    import empf_triton.ops.neuron as ops_neuron

    T = 3
    x = torch.randn(T, 4, 7, device=device) + 0.4
    mods = {i: EMPFNeuron(T, parallel=parallel, step_mode=step_mode, impl=i).to(device)
            for i in ("reference", "triton")}  # fmt: skip
    ops_neuron._FWD_PLANS.clear()

    def sample():
        outs = {}
        for impl, m in mods.items():
            reset_net(m)
            with torch.no_grad():
                outs[impl] = m(x) if step_mode == "m" else torch.stack([m(x[t]) for t in range(T)])
        torch.testing.assert_close(outs["triton"], outs["reference"], rtol=0, atol=1e-6)

    sample()
    assert len(ops_neuron._FWD_PLANS) == (T if step_mode == "s" else 1)
    for m in mods.values():
        with torch.no_grad():
            m.logits.copy_(torch.linspace(-1.5, 1.0, m.logits.numel()).view_as(m.logits))
    sample()
    assert len(ops_neuron._FWD_PLANS) == (T if step_mode == "s" else 1)


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_triton_module_reads_logits_in_kernel_same_as_reference(device, parallel, step_mode):
    """The Triton module path (logits and step index passed to the kernel, which applies the
    sigmoid and returns the logits' gradients) equals the reference module path."""
    T = 3
    x = torch.randn(T, 4, 7, device=device) + 0.4
    mods = []
    for impl in ("reference", "triton"):
        m = EMPFNeuron(T, spike_bits=4, parallel=parallel, step_mode=step_mode, impl=impl)
        m = m.to(device)
        with torch.no_grad():  # θ's and λ's rows differ: a swap of the rows would show
            for p in m.parameters():
                p.copy_(torch.linspace(-0.7, 0.9, p.numel()).view_as(p))
        xi = x.clone().requires_grad_()
        out = m(xi) if step_mode == "m" else torch.stack([m(xi[t]) for t in range(T)])
        (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
        mods.append((out.detach(), xi.grad, [p.grad for p in m.parameters()]))
    (o_r, g_r, p_r), (o_k, g_k, p_k) = mods
    torch.testing.assert_close(o_k, o_r, rtol=0, atol=1e-6)
    torch.testing.assert_close(g_k, g_r, rtol=0, atol=1e-6)
    for a, b in zip(p_k, p_r):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("parallel", [False, True])
def test_planned_steps_follow_parameter_updates_and_replacements(device, parallel):
    """The Triton module path keeps one plan per step index (launch arguments worked out once,
    parameters keyed by form and passed to the launch on every call). Trained in place (an
    optimizer step) the parameters' new values are read; replaced (`.data = ...`, a new
    address) the same plans read the new tensors. Every step's outputs and gradients equal the
    reference module's throughout."""
    import empf_triton.ops.neuron as ops_neuron

    T = 3
    torch.manual_seed(0)
    x = torch.randn(T, 4, 7, device=device) + 0.4
    mods = {
        impl: EMPFNeuron(T, step_mode="s", impl=impl).to(device) for impl in ("reference", "triton")
    }
    opts = {impl: torch.optim.SGD(m.parameters(), lr=0.5) for impl, m in mods.items()}
    ops_neuron._FWD_PLANS.clear()
    ops_neuron._BWD_PLANS.clear()

    def sample():
        res = {}
        for impl, m in mods.items():
            reset_net(m)
            opts[impl].zero_grad()
            outs, grads = [], []
            for t in range(T):
                xi = x[t].clone().requires_grad_()
                out = m(xi)
                (
                    out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)
                ).sum().backward()
                outs.append(out.detach())
                grads.append(xi.grad)
            pgrads = [p.grad.clone() for p in m.parameters()]
            res[impl] = (torch.stack(outs), torch.stack(grads), pgrads)
            opts[impl].step()  # in place: the same tensors, new values
        (o_r, g_r, p_r), (o_k, g_k, p_k) = res["reference"], res["triton"]
        torch.testing.assert_close(o_k, o_r, rtol=0, atol=1e-6)
        torch.testing.assert_close(g_k, g_r, rtol=0, atol=1e-6)
        for a, b in zip(p_k, p_r):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    sample()
    plans = (len(ops_neuron._FWD_PLANS), len(ops_neuron._BWD_PLANS))
    assert plans == (T, T)  # one per step index
    sample()  # after an in-place update: the same plans, the new values
    assert (len(ops_neuron._FWD_PLANS), len(ops_neuron._BWD_PLANS)) == plans
    for m in mods.values():  # replaced storage: new addresses, the same plans
        m.logits.data = m.logits.data.clone() + 0.25
    sample()
    assert (len(ops_neuron._FWD_PLANS), len(ops_neuron._BWD_PLANS)) == plans


def test_lif_module_steps_are_planned_and_equal_the_reference(device):
    """LIFNeuron passes its constant decay and threshold as floats (kernel scalars), so its calls
    are planned (one plan per call form, reused over samples); the results stay the
    reference's."""
    import empf_triton.ops.lif as ops_lif

    torch.manual_seed(0)
    mods = {
        impl: LIFNeuron(step_mode="s", impl=impl).to(device) for impl in ("reference", "triton")
    }
    ops_lif._FWD_PLANS.clear()
    ops_lif._BWD_PLANS.clear()
    for _ in range(3):  # samples
        x = torch.randn(3, 4, 6, device=device) * 2
        res = {}
        for impl, m in mods.items():
            reset_net(m)
            xi = x.clone().requires_grad_()
            out = torch.stack([m(xi[t]) for t in range(3)])
            (out * torch.linspace(-1, 1, out.numel(), device=device).view_as(out)).sum().backward()
            res[impl] = (out.detach(), xi.grad)
        torch.testing.assert_close(res["triton"][0], res["reference"][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(res["triton"][1], res["reference"][1], rtol=1e-6, atol=1e-6)
    # forward: the first step (no membrane yet) and the others; backward: one form
    assert len(ops_lif._FWD_PLANS) == 2 and len(ops_lif._BWD_PLANS) >= 1


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_lif_module_reads_changed_constants(device, impl):
    """A changed `tau` or `v_threshold` takes effect on the next call (nothing kept from the
    values of an earlier call)."""
    x = torch.rand(3, 4, 6, device=device) * 1.5
    m = LIFNeuron(step_mode="m", impl=impl).to(device)
    m(x)
    reset_net(m)
    m.tau, m.v_threshold = 5.0, 0.7
    fresh = LIFNeuron(tau=5.0, v_threshold=0.7, step_mode="m", impl=impl).to(device)
    out, want = m(x), fresh(x)
    assert torch.equal(out, want) and torch.equal(m.v, fresh.v)
    reset_net(m)
    m.tau, m.v_threshold = 3, 1  # ints, as a user may write them
    reset_net(fresh)
    fresh.tau, fresh.v_threshold = 3.0, 1.0
    assert torch.equal(m(x), fresh(x))
    assert not torch.equal(out, LIFNeuron(step_mode="m", impl=impl).to(device)(x))


# ------------------------------------------------- the input-check cache and module edge cases


@pytest.mark.parametrize("cls", [EMPFNeuron, LIFNeuron])
def test_changing_impl_after_a_call_takes_effect(cls, monkeypatch):
    """The validated-input cache is keyed on the impl setting too: `m.impl = "reference"` after
    a Triton call runs the reference from the next call on."""
    import empf_triton.nn.neuron as nn_neuron

    m = cls(T=2, impl="triton") if cls is EMPFNeuron else cls(impl="triton")
    x = torch.rand(3, 4)
    m(x)
    reset_net(m)
    m.impl = "reference"
    for name in ("empf_neuron_triton", "parallel_neuron_triton", "lif_neuron_triton"):
        monkeypatch.setattr(nn_neuron, name, lambda *a, **k: pytest.fail("the Triton path ran"))
    m(x)


@pytest.mark.parametrize("cls", [EMPFNeuron, LIFNeuron])
def test_step_mode_change_rechecks_the_input_form(cls):
    """After calls in step mode "s", the same 1-D input in mode "m" is refused as it is on a
    fresh module (it was run as T scalar steps), and so is T = 0."""
    m = cls(T=5) if cls is EMPFNeuron else cls()
    x = torch.rand(5)
    m(x)
    reset_net(m)
    m.step_mode = "m"
    with pytest.raises(ValueError, match=r"needs (an input )?\[T, N, \*\]"):
        m(x)
    if cls is LIFNeuron:  # EMPFNeuron checks T against its own T
        with pytest.raises(ValueError, match="with T >= 1"):
            m(torch.rand(0, 2, 3))


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_mem_bn_neuron_names_a_bad_input_dtype(dtype):
    m = EMPFNeuron(T=2, mem_bn=True, channels=4)
    with pytest.raises(TypeError, match=f"mem_bn=True\\) input has dtype {dtype}"):
        m(torch.ones(2, 4, 3, dtype=dtype))


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_lif_continues_in_the_inputs_dtype_after_a_dtype_change(impl):
    """A model converted to fp16 mid-sample: the kept fp32 membrane continues in fp16 on both
    impls (the reference returned fp32 spikes and kept fp32, the kernel fp16)."""
    m = LIFNeuron(impl=impl)
    m(torch.rand(3, 4) * 2)
    s = m(torch.rand(3, 4, dtype=torch.float16) * 2)
    assert s.dtype == m.v.dtype == torch.float16


@pytest.mark.parametrize("cls", [EMPFNeuron, LIFNeuron])
def test_a_membrane_on_another_device_than_the_input_is_named(cls):
    """A model moved mid-sample keeps its membrane where it was: the next step says so and how
    to fix it (before: a device error from inside the op). "meta" stands in for a GPU."""
    m = cls(T=3) if cls is EMPFNeuron else cls()
    m(torch.rand(2, 3))
    m.to("meta")
    with pytest.raises(ValueError, match="holds a membrane on cpu but got an input on meta"):
        m(torch.rand(2, 3, device="meta"))
    reset_net(m)
    assert m(torch.rand(2, 3, device="meta")).device.type == "meta"


# ------------------------------------------------------- settings changed after construction


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize(
    ("name", "value", "exc", "match"),
    [
        ("tau", 0.5, ValueError, "tau must be a float > 1"),
        ("tau", float("nan"), ValueError, "tau must be a float > 1"),
        ("v_threshold", float("inf"), ValueError, "v_threshold must be a finite float"),
        ("v_threshold", float("nan"), ValueError, "v_threshold must be a finite float"),
        ("v_threshold", "1.0", ValueError, "v_threshold must be a finite float"),
        ("v_threshold", 1e39, ValueError, "threshold"),  # outside fp32: the op's own check
        ("surrogate", "bogus", ValueError, "surrogate must be one of"),
        ("alpha", -1.0, ValueError, "alpha must be a positive finite float"),
        ("alpha", "2", TypeError, "alpha must be a float or None"),
        ("detach_reset", 1, TypeError, "detach_reset"),
        ("grad_mode", "stbp", ValueError, "grad_mode must be"),
        ("step_mode", "x", ValueError, "step_mode must be"),
        ("impl", "cuda", ValueError, "impl must be"),
    ],
)
def test_lif_settings_are_checked_when_set(impl, name, value, exc, match):
    """A setting changed after construction is checked as at construction, on both impls (the
    Triton path used to run a decay of -1 or a NaN threshold silently), and a refused value
    leaves the module as it was."""
    m = LIFNeuron(step_mode="m", impl=impl)
    x = torch.rand(3, 2, 4) * 2
    want = m(x)
    reset_net(m)
    with pytest.raises(exc, match=match):
        setattr(m, name, value)
    assert torch.equal(m(x), want)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_lif_alpha_and_surrogate_changed_later_take_effect(impl):
    """`m.alpha = 8.0` and `m.surrogate = "atan"` act from the next call, as a fresh module
    with those settings (before, the alpha resolved at construction stayed in use)."""
    x = torch.rand(3, 2, 5) * 2

    def grads(m):
        xi = x.clone().requires_grad_()
        m(xi).sum().backward()
        return xi.grad

    for change, fresh in (
        ({"alpha": 8.0}, {"alpha": 8.0}),
        ({"surrogate": "atan"}, {"surrogate": "atan"}),
        ({"surrogate": "triangle", "alpha": 0.5}, {"surrogate": "triangle", "alpha": 0.5}),
    ):
        m = LIFNeuron(step_mode="m", impl=impl)
        grads(m)
        reset_net(m)
        for k, v in change.items():
            setattr(m, k, v)
        assert torch.equal(grads(m), grads(LIFNeuron(step_mode="m", impl=impl, **fresh)))
        assert m.alpha == fresh.get("alpha")
    assert not torch.equal(
        grads(LIFNeuron(step_mode="m", impl=impl, alpha=8.0)),
        grads(LIFNeuron(step_mode="m", impl=impl)),
    )


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_empf_quantiser_settings_are_checked_when_set(impl):
    """`spike_bits` and `spike_step` set after construction are checked as at construction (a
    2.5-bit or 0-bit quantiser and a zero or NaN step ran silently); valid changes act."""
    m = EMPFNeuron(2, step_mode="m", impl=impl)
    x = torch.rand(2, 3, 4) * 2
    for name, value, exc in (
        ("spike_bits", 2.5, TypeError),
        ("spike_bits", 0, ValueError),
        ("spike_bits", 9, ValueError),
        ("spike_step", 0.0, ValueError),
        ("spike_step", float("nan"), ValueError),
    ):
        with pytest.raises(exc, match=name):
            setattr(m, name, value)
        assert m.spike_bits is None and m.spike_step == 0.25
    m.spike_bits, m.spike_step = 2, 0.5
    want = EMPFNeuron(2, spike_bits=2, spike_step=0.5, step_mode="m", impl=impl)(x)
    assert torch.equal(m(x), want)


@pytest.mark.parametrize("name", ["T", "parallel", "channels"])
def test_empf_shape_settings_are_fixed(name):
    """T, parallel and channels shape the parameters: changing them later is refused (a larger
    T made the Triton kernels read logits past their end)."""
    m = EMPFNeuron(2)
    with pytest.raises(AttributeError, match=f"EMPFNeuron.{name} is fixed at construction"):
        setattr(m, name, 3 if name != "parallel" else True)
    assert (m.T, m.parallel, m.channels) == (2, False, None)


@pytest.mark.parametrize("cls", [EMPFNeuron, LIFNeuron])
def test_deepcopy_and_pickle_after_bptt_forward(cls):
    """A neuron holding a bptt membrane with its graph (until reset_net) deep-copies and
    pickles, keeping the membrane's value (before: torch refused to deepcopy a non-leaf)."""
    import copy
    import pickle

    m = cls(T=2, grad_mode="bptt", step_mode="m") if cls is EMPFNeuron else cls(step_mode="m")
    m(torch.rand(2, 3, 4, requires_grad=True)).sum().backward()
    assert m.v.grad_fn is not None
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.v.grad_fn is None and torch.equal(twin.v, m.v)
        assert (twin.step_mode, twin.grad_mode, twin.t) == (m.step_mode, m.grad_mode, m.t)
    assert m.v.grad_fn is not None  # the original keeps its graph


def test_pickle_from_before_settings_were_properties_loads():
    """A neuron pickled when its settings were plain attributes (`step_mode`, `tau`, `alpha`,
    ...) still loads, with those settings."""
    m = LIFNeuron(tau=3.0, alpha=2.0, step_mode="m")
    state = m.__getstate__()
    for k in ("step_mode", "grad_mode", "impl", "tau", "v_threshold", "surrogate",
              "detach_reset"):  # fmt: skip
        state[k] = state.pop("_" + k)
    state["alpha"] = state.pop("_alpha_arg")
    old = LIFNeuron.__new__(LIFNeuron)
    old.__setstate__(state)
    assert (old.tau, old.alpha, old.step_mode, old.surrogate) == (3.0, 2.0, "m", "sigmoid")
    x = torch.rand(2, 3)
    assert torch.equal(old(x), LIFNeuron(tau=3.0, alpha=2.0, step_mode="m")(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mem_bn_half_module_refuses_a_wider_input(dtype):
    """A Mem-BN neuron in half precision given an fp32 input is a TypeError naming both dtypes
    (it crashed inside batch_norm); its own dtype runs."""
    n = EMPFNeuron(2, mem_bn=True, channels=3, impl="reference").to(dtype)
    with pytest.raises(TypeError, match=r"input has dtype torch.float32, its parameters"):
        n(torch.randn(4, 3, 2))
    assert n(torch.randn(4, 3, 2, dtype=dtype)).dtype == dtype


def test_mem_bn_membrane_on_another_device_is_named():
    """The Mem-BN neuron names a membrane left on another device, as the plain one does."""
    n = EMPFNeuron(3, mem_bn=True, channels=3)
    n(torch.rand(2, 3, 4))
    n.to("meta")
    with pytest.raises(ValueError, match="holds a membrane on cpu but got an input on meta"):
        n(torch.rand(2, 3, 4, device="meta"))


@pytest.mark.parametrize("fold", [False, True])
def test_mem_bn_first_step_builds_no_unused_graph(fold):
    """The first step has no incoming membrane, so λ_0 is not used: it built an orphan graph
    (sigmoid of the decay logit) that no backward frees. A saved-tensor hook that keeps the tensor
    (SavedTensorMeter) made it a reference cycle: a leak per batch and neuron, and a meter that
    never came back to 0."""
    from empf_triton.train.memory import SavedTensorMeter

    n = EMPFNeuron(2, mem_bn=True, channels=3)
    if fold:
        n.fold_mem_bn()
    x = torch.randn(2, 4, 3, 2)
    with SavedTensorMeter() as meter:
        for t in range(2):
            n(x[t]).sum().backward()
    assert meter.peak > 0 and meter.current == 0
    assert n.logits.grad[1, 0] == 0 and n.logits.grad[1, 1] != 0


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("folded", [False, True])
def test_mem_bn_neuron_continues_in_the_inputs_dtype_after_a_dtype_change(impl, folded):
    """As without mem_bn: a model converted to fp16 mid-sample continues in fp16 (the kept fp32
    membrane made Mem-BN refuse the fp16 input, and the folded neuron returned fp32 spikes)."""
    m = EMPFNeuron(T=3, mem_bn=True, channels=4, impl=impl).eval()
    if folded:
        m.fold_mem_bn()
    x = torch.randn(2, 2, 4, 3) * 2
    m(x[0])
    m.half()
    s = m(x[1].half())
    assert s.dtype == m.v.dtype == torch.float16


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("kind", ["plain", "parallel"])
@pytest.mark.parametrize("used", [False, True])
def test_an_input_on_another_device_than_the_parameters_is_named(impl, kind, used):
    """EMPFNeuron's parameters on another device than its input: a ValueError naming both, also
    after a first call validated that input's form (before: an error from inside the op, e.g.
    Triton reading the logits of another device). "meta" stands in for a GPU."""
    m = EMPFNeuron(T=3, parallel=kind == "parallel", impl=impl)
    x = torch.rand(2, 4, 3)
    if used:
        m(x)
        reset_net(m)
    m.to("meta")
    with pytest.raises(ValueError, match="input is on cpu but its parameters are on meta"):
        m(x)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize("make", [lambda: EMPFNeuron(4, grad_mode="online"),
                                  lambda: EMPFNeuron(4, parallel=True),
                                  lambda: LIFNeuron(4, grad_mode="online")],
                         ids=["empf", "parallel", "lif"])  # fmt: skip
def test_activation_checkpointing_is_refused(make, step_mode, reentrant):
    """torch.utils.checkpoint recomputes a forward during backward, from the neuron's state of
    then: a LIF neuron trained online gave other gradients than without checkpointing (max
    difference 1.4, silently); EM-PF failed later with a step-count error telling to reset.
    Now the recompute is one RuntimeError naming the cause; the module runs on after a reset."""
    from torch.utils.checkpoint import checkpoint

    neuron = make()
    neuron.step_mode = step_mode
    lin = torch.nn.Linear(6, 6)
    x = torch.randn(4, 2, 6, requires_grad=True)  # (the reentrant form needs one such input)

    def block(u):
        return neuron(lin(u))

    reset_net(neuron)
    out = checkpoint(block, x if step_mode == "m" else x[0], use_reentrant=reentrant)
    with pytest.raises(RuntimeError, match=r"forward ran inside a backward pass .*checkpoint"):
        out.sum().backward()
    reset_net(neuron)
    if step_mode == "m":
        out = block(x)
    else:
        out = torch.stack([block(x[t]) for t in range(4)])
    out.sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
