"""Models: registry, topology options, step mode "s" x T == step mode "m", Triton path, and the
same for the LIF baseline (neuron="lif") plus every training strategy and checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from empf_triton import reset_net
from empf_triton.models import (
    MODELS,
    SeqToANN,
    build_model,
    count_parameters,
    register_model,
    set_grad_mode,
    set_step_mode,
)
from empf_triton.models.resnet import PreActBlock
from empf_triton.nn.binary import BinaryConv2d
from empf_triton.nn.neuron import EMPFNeuron, LIFNeuron, StatefulNeuron
from empf_triton.nn.seca import SECA


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tests run many tiny ops; on a small shared CPU one intra-op thread is ~10x faster
    than several (thread hand-off dominates). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


IMG = (3, 16, 16)


def _run(model: nn.Module, x: torch.Tensor, g: torch.Tensor, mode: str):
    """Logits [T, N, K] and the gradients of sum(logits * g) w.r.t. x and every parameter."""
    model.zero_grad(set_to_none=True)
    reset_net(model)
    set_step_mode(model, mode)
    xi = x.clone().requires_grad_()
    if mode == "m":
        out = model(xi)
    else:
        out = torch.stack([model(xi[t]) for t in range(x.shape[0])])
    (out * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), xi.grad, grads


def _calibrate(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Eval-mode statistics from one train-mode pass on x (BN and Mem-BN momentum 1), so that
    the eval-mode net keeps its activations alive, then random Mem-BN gates."""
    moms = [m for m in model.modules() if hasattr(m, "momentum") and hasattr(m, "running_var")]
    for m in moms:
        m.momentum = 1.0
    model.train()
    set_step_mode(model, "m")
    with torch.no_grad():
        model(x)
        for m in model.modules():
            if hasattr(m, "p") and hasattr(m, "running_var"):  # MemBN
                m.p.uniform_(-1, 1)
                m.q.uniform_(-1, 1)
    reset_net(model)
    return model.eval()


# -------------------------------------------------------------------- step "s" x T == step "m"

TINY = [
    ("resnet18", IMG, {"width": 4, "parallel": True, "seca": True, "mem_bn": True}),
    ("resnet18", IMG, {"width": 4, "spike_bits": 4, "weight_bits": 1.5}),
    ("resnet19", IMG, {"width": 4, "parallel": True}),
    ("resnet34", IMG, {"width": 2, "weight_bits": 32, "seca": True}),
    ("vgg11", (2, 16, 16), {"width": 8, "parallel": True, "mem_bn": True, "spike_bits": 2}),
]


@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
@pytest.mark.parametrize(("name", "in_shape", "opts"), TINY, ids=lambda v: str(v))
def test_step_mode_equals_multi_step(name, in_shape, opts, grad_mode):
    """fp64 reference, eval mode (BN uses running statistics in both modes): same logits and the
    same gradients for x and every parameter, in both gradient modes."""
    T, N = 2, 2
    model = build_model(name, in_shape=in_shape, num_classes=5, T=T, grad_mode=grad_mode, **opts)
    x = torch.rand(T, N, *in_shape, dtype=torch.float64) * 2
    model = _calibrate(model.double(), x)
    g = torch.randn(T, N, 5, dtype=torch.float64)
    out_m, gx_m, gp_m = _run(model, x, g, "m")
    out_s, gx_s, gp_s = _run(model, x, g, "s")
    assert out_m.shape == (T, N, 5)
    assert (out_m[:, 0] - out_m[:, 1]).abs().max() > 1e-3 and torch.isfinite(gx_m).all()
    assert (gx_m != 0).float().mean() > 0.2
    torch.testing.assert_close(out_s, out_m, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gx_s, gx_m, rtol=1e-9, atol=1e-10)
    assert gp_s.keys() == gp_m.keys() and len(gp_m) > 0
    for k in gp_m:
        torch.testing.assert_close(gp_s[k], gp_m[k], rtol=1e-8, atol=1e-10, msg=k)
    # The neurons' own parameters learn: θ's logits (row 0 of each neuron's `logits`) get
    # gradients, and λ's (row 1) wherever a neuron has a decay.
    rows = [gp_m[k] for k in gp_m if k.endswith(".logits")]
    assert rows and any((r[0] != 0).any() for r in rows)
    has_decay = any(isinstance(m, EMPFNeuron) and not m.parallel for m in model.modules())
    assert any(r.shape[0] == 2 and (r[1] != 0).any() for r in rows) or not has_decay


def test_online_and_bptt_gradients_differ():
    """Sanity of the grad-mode switch: online cuts the temporal path, so the gradients change."""
    T = 3
    model = build_model("resnet18", in_shape=IMG, num_classes=4, T=T, width=2).double()
    x = torch.rand(T, 2, *IMG, dtype=torch.float64) * 2
    _calibrate(model, x)
    g = torch.randn(T, 2, 4, dtype=torch.float64)
    set_grad_mode(model, "bptt")
    out_b, gx_b, _ = _run(model, x, g, "m")
    set_grad_mode(model, "online")
    out_o, gx_o, _ = _run(model, x, g, "m")
    torch.testing.assert_close(out_o, out_b)
    assert not torch.allclose(gx_o, gx_b)


def test_full_resnet18_cifar_step_equals_multi_step():
    T, N = 2, 2
    model = build_model("resnet18", in_shape=(3, 32, 32), num_classes=10, T=T, seca=True)
    x = torch.rand(T, N, 3, 32, 32)
    _calibrate(model, x)
    with torch.no_grad():
        set_step_mode(model, "m")
        out_m = model(x)
        reset_net(model)
        set_step_mode(model, "s")
        out_s = torch.stack([model(x[t]) for t in range(T)])
    assert out_m.shape == (T, N, 10)
    assert (out_m[:, 0] - out_m[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(out_s, out_m, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ Triton path


@pytest.mark.parametrize(
    ("mode", "grad_mode", "mem_bn"), [("m", "bptt", False), ("s", "online", True)]
)
def test_triton_tiny_resnet_matches_reference(device, mode, grad_mode, mem_bn, monkeypatch):
    import empf_triton.ops.binary as ops_binary
    import empf_triton.ops.neuron as ops_neuron

    loaded = []
    for mod in (ops_neuron, ops_binary):
        real = mod.load_kernels
        monkeypatch.setattr(
            mod, "load_kernels", lambda name, real=real: loaded.append(name) or real(name)
        )
    T, N = 2, 2
    opts = {"width": 2, "parallel": True, "seca": True, "spike_bits": 4, "mem_bn": mem_bn}
    kw = {"in_shape": (3, 8, 8), "num_classes": 3, "T": T, "grad_mode": grad_mode, **opts}
    ref = build_model("resnet18", impl="reference", **kw).to(device)
    tri = build_model("resnet18", impl="triton", **kw).to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.rand(T, N, 3, 8, 8, device=device) * 2
    g = torch.randn(T, N, 3, device=device)
    out_r, gx_r, gp_r = _run(ref, x, g, mode)
    assert not loaded
    out_t, gx_t, gp_t = _run(tri, x, g, mode)
    assert {"neuron", "binary"} <= set(loaded)  # the kernels really ran
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_t, gx_r, rtol=1e-4, atol=1e-5)
    assert gp_t.keys() == gp_r.keys()
    for k in gp_r:
        torch.testing.assert_close(gp_t[k], gp_r[k], rtol=1e-4, atol=1e-4, msg=k)


# -------------------------------------------------------------------------- registry, options


def test_registry_names_and_contract_attributes():
    assert {"resnet18", "resnet19", "resnet34", "vgg11"} <= set(MODELS)
    for name, shape in [("resnet19", IMG), ("vgg11", (2, 48, 48))]:
        m = build_model(name, in_shape=shape, num_classes=7, T=3, width=4)
        assert m.T == 3 and m.num_classes == 7
        assert any(isinstance(n, StatefulNeuron) for n in m.modules())


@pytest.mark.parametrize(
    ("name", "lo", "hi"),
    [("resnet18", 11.0e6, 11.3e6), ("resnet19", 12.4e6, 12.7e6), ("resnet34", 21.1e6, 21.5e6)],
)
def test_parameter_counts(name, lo, hi):
    m = build_model(name, in_shape=(3, 32, 32), num_classes=10, T=4)
    assert lo < count_parameters(m) < hi


def test_resnet18_layout():
    m = build_model(
        "resnet18", in_shape=(3, 32, 32), num_classes=10, T=4, parallel=True, seca=True, mem_bn=True
    )
    blocks = [b for b in m.modules() if isinstance(b, PreActBlock)]
    assert len(blocks) == 8
    assert all(b.neuron2.parallel and not b.neuron1.parallel for b in blocks)
    assert sum(b.shortcut is not None for b in blocks) == 3
    assert sum(isinstance(s, SECA) for s in m.modules()) == 16
    neurons = [n for n in m.modules() if isinstance(n, EMPFNeuron)]
    assert len(neurons) == 17 and all(n.has_mem_bn for n in neurons)
    # Full-precision stem (no neuron before the first block) and classifier.
    assert type(m.stem[0]) is nn.Conv2d and m.stem[0].kernel_size == (3, 3)
    assert isinstance(m.classifier[-1], nn.Linear)
    convs = [c for c in m.layers.modules() if isinstance(c, (nn.Conv2d, BinaryConv2d))]
    assert len(convs) == 19 and all(isinstance(c, BinaryConv2d) for c in convs)


@pytest.mark.parametrize("bits", [1.5, 32])
def test_weight_bits_option(bits):
    m = build_model("vgg11", in_shape=(2, 32, 32), num_classes=10, T=2, weight_bits=bits, width=4)
    convs = [c for c in m.modules() if isinstance(c, (nn.Conv2d, BinaryConv2d))]
    assert len(convs) == 8 and type(convs[0]) is nn.Conv2d  # first conv full precision
    if bits == 32:
        assert all(type(c) is nn.Conv2d for c in convs)
    else:
        assert all(isinstance(c, BinaryConv2d) and c.weight_bits == 1.5 for c in convs[1:])


def test_large_inputs_imagenet_stem_and_dvs128():
    r = build_model("resnet34", in_shape=(3, 128, 128), num_classes=4, T=1, width=2)
    assert r.stem_kind == "imagenet"
    assert r(torch.rand(1, 3, 128, 128)).shape == (1, 4)
    v = build_model("vgg11", in_shape=(2, 128, 128), num_classes=11, T=1, width=4)
    assert v(torch.rand(1, 2, 128, 128)).shape == (1, 11)


@pytest.mark.parametrize(
    ("name", "kw", "exc"),
    [
        ("resnet50", {}, ValueError),
        ("resnet18", {"dropout": 0.1}, ValueError),
        ("vgg11", {"foo": 1}, ValueError),
        ("resnet18", {"weight_bits": 2}, ValueError),
        ("resnet18", {"weight_bits": "1"}, TypeError),
        ("resnet18", {"spike_bits": 9}, ValueError),
        ("resnet18", {"spike_step": 0.0}, ValueError),
        ("resnet18", {"grad_mode": "stbp"}, ValueError),
        ("resnet18", {"impl": "cuda"}, ValueError),
        ("resnet18", {"step_mode": "x"}, ValueError),
        ("resnet18", {"parallel": "yes"}, TypeError),
        ("resnet18", {"seca": 1}, TypeError),
        ("resnet18", {"mem_bn": None}, TypeError),
        ("resnet18", {"width": 0}, ValueError),
        ("resnet18", {"stem": "big"}, ValueError),
        ("resnet18", {"in_shape": (3, 32)}, ValueError),
        ("resnet18", {"T": 0}, ValueError),
        ("resnet18", {"num_classes": 0}, ValueError),
        ("vgg11", {"in_shape": (2, 8, 8)}, ValueError),
    ],
)
def test_bad_build_raises(name, kw, exc):
    args = {"in_shape": IMG, "num_classes": 10, "T": 2, "width": 2}
    args.update(kw)
    with pytest.raises(exc):
        build_model(name, **args)


def test_unknown_name_lists_models():
    with pytest.raises(ValueError, match="resnet18"):
        build_model("nope", in_shape=IMG, num_classes=10, T=2)


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda **kw: nn.Identity())


def test_set_modes_switch_everything_and_validate():
    m = build_model("resnet18", in_shape=IMG, num_classes=3, T=2, width=2, seca=True)
    set_step_mode(m, "m")
    set_grad_mode(m, "bptt")
    moded = [x for x in m.modules() if isinstance(x, (StatefulNeuron, SeqToANN, SECA))]
    assert m.step_mode == "m" and len(moded) > 40
    assert all(x.step_mode == "m" for x in moded)
    assert all(n.grad_mode == "bptt" for n in m.modules() if isinstance(n, StatefulNeuron))
    with pytest.raises(ValueError):
        set_step_mode(m, "multi")
    with pytest.raises(ValueError):
        set_grad_mode(m, "stbp")


def test_input_shape_checked():
    m = build_model("resnet18", in_shape=IMG, num_classes=3, T=2, width=2)
    with pytest.raises(ValueError, match=r"\[N, 3, 16, 16\]"):
        m(torch.rand(2, 2, *IMG))
    set_step_mode(m, "m")
    with pytest.raises(ValueError, match=r"T=2"):
        m(torch.rand(3, 2, *IMG))
    with pytest.raises(TypeError):
        m([1.0])


@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        (torch.rand(2, 64, dtype=torch.float64), TypeError, "has dtype torch.float64 but"),
        (torch.rand(2, 64).half(), TypeError, "has dtype torch.float16 but"),
        (torch.ones(2, 64, dtype=torch.uint8), TypeError, "has dtype torch.uint8 but"),
        (torch.ones(2, 64, dtype=torch.complex64), TypeError, "has dtype torch.complex64"),
        (torch.rand(2, 64, device="meta"), ValueError, "is on meta but the model is on cpu"),
    ],
    ids=["fp64", "fp16", "uint8", "complex", "meta"],
)
def test_input_dtype_and_device_checked(x, exc, match):
    """An input of another dtype or device than the model's parameters is named by the model,
    not torch's "expected m1 and m2 to have the same dtype" from inside its first layer; under
    autocast a float input of another dtype still runs (the layers cast it)."""
    m = build_model("digits_mlp", in_shape=(64,), num_classes=3, T=2, impl="reference")
    with pytest.raises(exc, match=f"DigitsMLP input {match}"):
        m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(torch.rand(2, 64, dtype=torch.bfloat16)).shape == (2, 3)


@pytest.mark.parametrize("in_shape", [64, None, "64"], ids=repr)
def test_build_model_names_an_in_shape_that_is_not_a_sequence(in_shape):
    """in_shape=64 (not (64,)) is the ValueError of a bad in_shape, not "'int' object is not
    iterable"."""
    with pytest.raises(ValueError, match="in_shape must be a tuple of positive ints"):
        build_model("digits_mlp", in_shape=in_shape, num_classes=3, T=2)


def test_online_training_step_keeps_no_graph_across_steps():
    """Step mode "s", train mode: per-step backward and optimizer step, as the online strategy."""
    T = 3
    m = build_model("resnet18", in_shape=IMG, num_classes=4, T=T, width=2, mem_bn=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.rand(4, *IMG), torch.tensor([0, 1, 2, 3])
    before = m.classifier[-1].weight.detach().clone()
    for _ in range(T):
        loss = nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert all(
            n.v is None or n.v.grad_fn is None for n in m.modules() if isinstance(n, EMPFNeuron)
        )
    assert not torch.equal(before, m.classifier[-1].weight)
    with pytest.raises(RuntimeError, match="reset_net"):
        m(x)


def test_seq_to_ann_folds_time_into_batch():
    lin = SeqToANN(nn.Linear(6, 3), nn.ReLU())
    x = torch.randn(4, 2, 6)
    want = torch.stack([lin(x[t]) for t in range(4)])
    set_step_mode(lin, "m")
    torch.testing.assert_close(lin(x), want)
    with pytest.raises(ValueError, match=r"\[T, N, \*\]"):
        lin(torch.randn(6))
    with pytest.raises(ValueError):
        SeqToANN(nn.ReLU(), step_mode="x")


# ------------------------------------------------------------------------- LIF baseline models

LIF_TINY = [
    ("resnet18", IMG, {"width": 2, "seca": True, "weight_bits": 1.5}),
    ("resnet19", IMG, {"width": 2, "surrogate": "atan", "detach_reset": True}),
    ("resnet34", IMG, {"width": 2, "weight_bits": 32, "tau": 4.0, "surrogate": "triangle"}),
    ("vgg11", (2, 16, 16), {"width": 4, "v_threshold": 0.5, "alpha": 2.0}),
    ("mnist1d_cnn", (1, 40), {"channels": (4, 6, 8), "seca": True}),
    ("digits_mlp", (64,), {"hidden": (16, 12, 8), "surrogate": "atan", "alpha": 3.0}),
]


def _lif(name, in_shape, T, opts, **kw):
    return build_model(name, in_shape=in_shape, num_classes=5, T=T, neuron="lif", **opts, **kw)


@pytest.mark.parametrize("grad_mode", ["online", "bptt"])
@pytest.mark.parametrize(("name", "in_shape", "opts"), LIF_TINY, ids=lambda v: str(v))
def test_lif_step_mode_equals_multi_step(name, in_shape, opts, grad_mode):
    """LIF in every model: fp64, eval mode, mode "s" x T and mode "m" give the same logits and the
    same gradients for x and every parameter, in both gradient modes."""
    T, N = 3, 2
    model = _lif(name, in_shape, T, opts, grad_mode=grad_mode)
    neurons = [n for n in model.modules() if isinstance(n, StatefulNeuron)]
    assert neurons and all(isinstance(n, LIFNeuron) for n in neurons)
    assert all(n.grad_mode == grad_mode for n in neurons)  # the model's grad_mode reaches them
    x = torch.rand(T, N, *in_shape, dtype=torch.float64) * 2
    model = _calibrate(model.double(), x)
    g = torch.randn(T, N, 5, dtype=torch.float64)
    out_m, gx_m, gp_m = _run(model, x, g, "m")
    out_s, gx_s, gp_s = _run(model, x, g, "s")
    assert out_m.shape == (T, N, 5)
    assert (out_m[:, 0] - out_m[:, 1]).abs().max() > 1e-3
    assert (gx_m != 0).float().mean() > 0.2
    torch.testing.assert_close(out_s, out_m, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gx_s, gx_m, rtol=1e-9, atol=1e-10)
    assert gp_s.keys() == gp_m.keys() and len(gp_m) > 0
    for k in gp_m:
        torch.testing.assert_close(gp_s[k], gp_m[k], rtol=1e-8, atol=1e-10, msg=k)
    # Spikes are binary: the first block convolution sees only 0 and 1.
    seen = []
    first = neurons[0]
    hook = first.register_forward_hook(lambda mod, inp, out: seen.append(out))
    reset_net(model)
    set_step_mode(model, "m")
    with torch.no_grad():
        model(x)
    hook.remove()
    assert set(torch.unique(seen[0]).tolist()) <= {0.0, 1.0} and seen[0].sum() > 0


@pytest.mark.parametrize(("name", "in_shape", "opts"), LIF_TINY[::2], ids=lambda v: str(v))
def test_lif_train_mode_step_equals_multi_step(name, in_shape, opts):
    """Train mode (BN on batch statistics): with T = 1 both step modes normalise over the same
    N samples, so logits, gradients and the BN running statistics they leave must agree. (With
    T > 1 they cannot: mode "m" normalises over T*N samples, mode "s" over N per step.)"""
    T, N = 1, 4
    model = _lif(name, in_shape, T, opts, grad_mode="bptt").double().train()
    twin = _lif(name, in_shape, T, opts, grad_mode="bptt").double().train()
    twin.load_state_dict(model.state_dict())
    x = torch.rand(T, N, *in_shape, dtype=torch.float64) * 2
    g = torch.randn(T, N, 5, dtype=torch.float64)
    out_m, gx_m, gp_m = _run(model, x, g, "m")
    out_s, gx_s, gp_s = _run(twin, x, g, "s")
    torch.testing.assert_close(out_s, out_m, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gx_s, gx_m, rtol=1e-9, atol=1e-10)
    assert gp_s.keys() == gp_m.keys() and len(gp_m) > 0
    for k in gp_m:
        torch.testing.assert_close(gp_s[k], gp_m[k], rtol=1e-8, atol=1e-10, msg=k)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=k)


def test_lif_grad_mode_switch_changes_gradients():
    """set_grad_mode reaches the LIF neurons: online cuts the temporal path, BPTT keeps it."""
    T = 3
    model = _lif("mnist1d_cnn", (1, 40), T, {"channels": (4, 6, 8)}).double()
    x = torch.rand(T, 2, 1, 40, dtype=torch.float64) * 2
    _calibrate(model, x)
    g = torch.randn(T, 2, 5, dtype=torch.float64)
    set_grad_mode(model, "bptt")
    assert all(n.grad_mode == "bptt" for n in model.modules() if isinstance(n, LIFNeuron))
    out_b, gx_b, _ = _run(model, x, g, "m")
    set_grad_mode(model, "online")
    assert all(n.grad_mode == "online" for n in model.modules() if isinstance(n, LIFNeuron))
    out_o, gx_o, _ = _run(model, x, g, "m")
    torch.testing.assert_close(out_o, out_b)
    assert not torch.allclose(gx_o, gx_b)


@pytest.mark.parametrize("strategy", ["online", "random_step", "accumulate", "bptt"])
@pytest.mark.parametrize("neuron", ["empf", "lif"])
def test_every_strategy_trains(neuron, strategy):
    """A few steps of every strategy on a tiny separable problem: finite, non-zero gradients in
    every layer, and the loss goes down."""
    from empf_triton.train.strategies import train_batch

    T = 3
    torch.manual_seed(0)
    model = build_model(
        "mnist1d_cnn",
        in_shape=(1, 40),
        num_classes=3,
        T=T,
        channels=(8, 8, 16),
        pool_after=(0,),
        neuron=neuron,
    )
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(3).repeat(16)
    x = torch.randn(48, 1, 40, generator=gen) * 0.3
    x[:, 0, :] += torch.stack([torch.sin(torch.arange(40) * (k + 1) * 0.3) for k in range(3)])[y]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for i in range(15):
        # random_step at a fixed t* = T - 1, so that its losses are comparable across batches
        t_star = T - 1 if strategy == "random_step" else None
        losses.append(train_batch(model, x, y, opt, strategy, T, t_star=t_star).loss)
        if i == 0:
            grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
            for n, gr in grads.items():
                assert gr is not None and torch.isfinite(gr).all(), n
            convs = [gr for n, gr in grads.items() if n.endswith("weight") and gr.dim() == 4]
            assert len(convs) == 3 and all(gr.abs().sum() > 0 for gr in convs)
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], (neuron, strategy, losses)


def test_lif_model_saves_and_loads(tmp_path):
    """A LIF model round-trips through a training checkpoint: the options rebuild it and the
    weights give the same logits."""
    from empf_triton.train.checkpoint import load_checkpoint, save_checkpoint
    from empf_triton.train.loop import build_from_checkpoint

    T = 2
    cfg = {
        "in_shape": [1, 40],
        "num_classes": 5,
        "T": T,
        "channels": [4, 6, 8],
        "neuron": "lif",
        "tau": 3.0,
        "v_threshold": 0.75,
        "surrogate": "triangle",
        "alpha": 0.5,
        "detach_reset": True,
        "spike_bits": None,
        "parallel": False,
        "mem_bn": False,
    }
    kw = {k: v for k, v in cfg.items() if k not in ("in_shape", "num_classes", "T")}
    model = build_model("mnist1d_cnn", in_shape=(1, 40), num_classes=5, T=T, **kw)
    x = torch.rand(T, 3, 1, 40)
    _calibrate(model, x)
    save_checkpoint(tmp_path / "m.pt", model=model, model_name="mnist1d_cnn", model_config=cfg)
    back = build_from_checkpoint(load_checkpoint(tmp_path / "m.pt")).eval()
    neurons = [n for n in back.modules() if isinstance(n, StatefulNeuron)]
    assert all(
        isinstance(n, LIFNeuron)
        and (n.tau, n.v_threshold, n.surrogate, n.alpha, n.detach_reset)
        == (3.0, 0.75, "triangle", 0.5, True)
        for n in neurons
    )
    with torch.no_grad():
        set_step_mode(model, "m")
        set_step_mode(back, "m")
        reset_net(model)
        want = model(x)
        reset_net(back)
        got = back(x)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"neuron": "lif", "mem_bn": True}, ValueError, "mem_bn=True"),
        ({"neuron": "lif", "spike_bits": 4}, ValueError, "spike_bits=4"),
        ({"neuron": "lif", "spike_step": 0.5}, ValueError, "spike_step=0.5"),
        ({"neuron": "lif", "parallel": True}, ValueError, "parallel=True"),
        ({"tau": 3.0}, ValueError, "tau=3.0 only applies to neuron='lif'"),
        ({"neuron": "empf", "surrogate": "atan"}, ValueError, "surrogate"),
        ({"v_threshold": 0.5}, ValueError, "v_threshold"),
        ({"alpha": 2.0}, ValueError, "alpha"),
        ({"detach_reset": True}, ValueError, "detach_reset"),
        ({"neuron": "LIF"}, ValueError, "neuron must be"),
        ({"neuron": None}, ValueError, "neuron must be"),
        ({"neuron": "lif", "tau": 1.0}, ValueError, "tau"),
        ({"neuron": "lif", "tau": "2"}, ValueError, "tau"),
        ({"neuron": "lif", "v_threshold": float("inf")}, ValueError, "v_threshold"),
        ({"neuron": "lif", "v_threshold": True}, TypeError, "v_threshold"),
        ({"neuron": "lif", "surrogate": "relu"}, ValueError, "surrogate"),
        ({"neuron": "lif", "alpha": 0.0}, ValueError, "alpha"),
        ({"neuron": "lif", "alpha": "4"}, TypeError, "alpha"),
        ({"neuron": "lif", "detach_reset": 1}, TypeError, "detach_reset"),
        ({"neuron": "lif", "grad_mode": "stbp"}, ValueError, "grad_mode"),
        ({"neuron": "lif", "impl": "cuda"}, ValueError, "impl"),
    ],
)
@pytest.mark.parametrize("name", ["resnet18", "vgg11", "mnist1d_cnn", "digits_mlp"])
def test_bad_neuron_options_raise(name, kw, exc, match):
    shapes = {"resnet18": IMG, "vgg11": (2, 16, 16), "mnist1d_cnn": (1, 40), "digits_mlp": (64,)}
    with pytest.raises(exc, match=match):
        build_model(name, in_shape=shapes[name], num_classes=3, T=2, **kw)


def test_neuron_options_at_defaults_are_accepted_either_way():
    """The trainer passes every option; defaults never conflict with the neuron kind."""
    lif_defaults = {"tau": 2.0, "v_threshold": 1.0, "surrogate": "sigmoid", "alpha": None}
    empf_defaults = {"spike_bits": None, "spike_step": 0.25, "parallel": False, "mem_bn": False}
    both = {**lif_defaults, **empf_defaults, "detach_reset": False}
    e = build_model("digits_mlp", in_shape=(64,), num_classes=3, T=2, neuron="empf", **both)
    lif = build_model("digits_mlp", in_shape=(64,), num_classes=3, T=2, neuron="lif", **both)
    assert all(isinstance(n, EMPFNeuron) for n in e.modules() if isinstance(n, StatefulNeuron))
    lifs = [n for n in lif.modules() if isinstance(n, StatefulNeuron)]
    assert len(lifs) == 2 and all(isinstance(n, LIFNeuron) and n.decay == 0.5 for n in lifs)
    assert all(n.grad_mode == "online" for n in lifs)  # the model's default, not LIFNeuron's


def test_triton_tiny_lif_resnet_matches_reference(device, monkeypatch):
    import empf_triton.ops.binary as ops_binary
    import empf_triton.ops.lif as ops_lif

    loaded = []
    for mod in (ops_lif, ops_binary):
        real = mod.load_kernels
        monkeypatch.setattr(
            mod, "load_kernels", lambda name, real=real: loaded.append(name) or real(name)
        )
    T, N = 2, 2
    kw = {"in_shape": (3, 8, 8), "num_classes": 3, "T": T, "grad_mode": "bptt", "width": 2}
    kw.update(neuron="lif", surrogate="atan", v_threshold=0.5)
    ref = build_model("resnet18", impl="reference", **kw).to(device)
    tri = build_model("resnet18", impl="triton", **kw).to(device)
    tri.load_state_dict(ref.state_dict())
    x = torch.rand(T, N, 3, 8, 8, device=device) * 2
    g = torch.randn(T, N, 3, device=device)
    out_r, gx_r, gp_r = _run(ref, x, g, "m")
    assert not loaded
    out_t, gx_t, gp_t = _run(tri, x, g, "m")
    assert {"lif", "binary"} <= set(loaded)  # the kernels really ran
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_t, gx_r, rtol=1e-4, atol=1e-5)
    assert gp_t.keys() == gp_r.keys()
    for k in gp_r:
        torch.testing.assert_close(gp_t[k], gp_r[k], rtol=1e-4, atol=1e-4, msg=k)


@pytest.mark.parametrize(
    ("name", "in_shape"),
    [
        ("mnist1d_cnn", (1, 40)),
        ("digits_mlp", (64,)),
        ("resnet18", (3, 8, 8)),
        ("vgg11", (2, 16, 16)),
    ],
)
def test_seca_flag_must_be_a_bool(name, in_shape):
    """`seca="False"` is a TypeError in every model (mnist1d_cnn took any truthy value)."""
    with pytest.raises(TypeError, match="seca must be a bool, got str"):
        build_model(name, in_shape=in_shape, num_classes=3, T=2, seca="False")


@pytest.mark.parametrize(
    ("kw", "exc", "match"),
    [
        ({"in_shape": (1, 3)}, ValueError, "too short for the pools"),  # 3 -> 1 -> pool of 1
        ({"in_shape": (1, 1)}, ValueError, "too short for the pools"),
        ({"pool_after": (5, 9)}, ValueError, "pool_after holds block indices 0..2"),
        ({"pool_after": (True,)}, ValueError, "pool_after holds block indices"),
        ({"pool_after": 0}, TypeError, "pool_after must be a sequence"),
        ({"channels": "ab"}, TypeError, "channels must be a sequence of ints"),
        ({"channels": (4, 0, 4)}, ValueError, "ints >= 1"),
        ({"channels": (4,)}, ValueError, ">= 2 widths"),
    ],
)
def test_mnist1d_cnn_bad_layout_raises_at_construction(kw, exc, match):
    """Pools that shrink the signal to nothing, pool indices of no block and widths that are
    not ints are refused at construction, naming the option (before: a Linear(0, ...) and a
    crash inside max_pool2d at the first forward, or indices silently ignored)."""
    args = {"in_shape": (1, 8), "num_classes": 3, "T": 2, "channels": (4, 4, 4, 4)}
    args.update(kw)
    with pytest.raises(exc, match=match):
        build_model("mnist1d_cnn", **args)


def test_mnist1d_cnn_shortest_signal_for_its_pools_runs():
    """The check is not stricter than the pools: length 2 with one pool runs."""
    m = build_model(
        "mnist1d_cnn", in_shape=(1, 2), num_classes=3, T=2, channels=(4, 4), pool_after=(0,),
        impl="reference",
    ).eval()  # fmt: skip
    assert m(torch.rand(2, 1, 2)).shape == (2, 3)


def test_digits_mlp_bad_hidden_raises():
    with pytest.raises(TypeError, match="hidden must be a sequence of ints"):
        build_model("digits_mlp", in_shape=(64,), num_classes=3, T=2, hidden=8)
    with pytest.raises(ValueError, match="ints >= 1"):
        build_model("digits_mlp", in_shape=(64,), num_classes=3, T=2, hidden=(8, 2.5))


@pytest.mark.parametrize(
    "name,in_shape,options",
    [
        ("digits_mlp", (64,), {}),  # the default hidden=(128, 128): one block
        ("digits_mlp", (64,), {"hidden": (16,)}),  # no block
        ("mnist1d_cnn", (1, 40), {"channels": (8, 8)}),
    ],
)
def test_parallel_without_a_second_block_is_refused(name, in_shape, options):
    """parallel=True makes blocks 1, 3, ... parallel; with fewer than two blocks it silently
    changed nothing (a digits run with --parallel trained the plain net)."""
    with pytest.raises(ValueError, match=f"{name}: parallel=True .* so nothing would change"):
        build_model(name, in_shape=in_shape, num_classes=10, T=2, parallel=True, **options)
    build_model(name, in_shape=in_shape, num_classes=10, T=2, **options)  # fine without it


@pytest.mark.parametrize(
    "name,in_shape,options",
    [
        ("digits_mlp", (64,), {"hidden": (16, 16, 16)}),
        ("mnist1d_cnn", (1, 40), {"channels": (8, 8, 8)}),
    ],
)
def test_parallel_makes_block_1_parallel(name, in_shape, options):
    from empf_triton.nn import EMPFNeuron

    model = build_model(name, in_shape=in_shape, num_classes=10, T=2, parallel=True, **options)
    assert [n.parallel for n in model.modules() if isinstance(n, EMPFNeuron)] == [
        False,
        True,
        False,
    ]


def _step_mode_holders():
    from empf_triton.models.layers import SeqToANN

    return {
        "SECA": lambda: SECA(4),
        "SeqToANN": lambda: SeqToANN(nn.Identity()),
        "digits_mlp": lambda: build_model("digits_mlp", in_shape=(64,), num_classes=10, T=2),
    }


@pytest.mark.parametrize("name", sorted(_step_mode_holders()))
def test_step_mode_set_directly_is_checked(name):
    """`m.step_mode = "S"` on a stateless module or a model (not through set_step_mode) was
    kept as it was, and every value but "s" then ran as "m"."""
    m = _step_mode_holders()[name]()
    for bad in ("S", "multi", None, 1):
        with pytest.raises(ValueError, match="step_mode must be 's' or 'm'"):
            m.step_mode = bad
        assert m.step_mode == "s"
    m.step_mode = "m"
    assert m.step_mode == "m"


@pytest.mark.parametrize("name", sorted(_step_mode_holders()))
def test_step_mode_of_an_older_pickle_still_loads(name):
    """A module pickled when step_mode was a plain attribute loads with it."""
    m = _step_mode_holders()[name]()
    m.step_mode = "m"
    state = dict(m.__getstate__())
    state["step_mode"] = state.pop("_step_mode")  # the former layout
    old = type(m).__new__(type(m))
    old.__setstate__(state)
    assert old.step_mode == "m" and "step_mode" not in vars(old)
