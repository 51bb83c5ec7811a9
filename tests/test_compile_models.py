"""`torch.compile(model, fullgraph=True)` of every registered model: no graph break, in step modes
"s" and "m", in evaluation, in the per-step training form online training uses (one step's
forward, its loss, backward) and in BPTT training (all steps at once in step mode "m"), with the
same logits and gradients as eager.

The ops run their Triton path (`impl="triton"`: the kernels in the interpreter on a CPU, compiled
on a GPU), so the graphs hold the `empf::` custom ops. `backend="aot_eager"` traces forward and
backward through AOTAutograd like inductor does, without inductor's C++ compile time; one model
also goes through inductor. The membrane state carried between steps lives on the neuron modules
and `reset_net` runs outside the compiled region, as a user's loop does.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import DEVICE

from empf_triton import reset_net
from empf_triton.models import build_model, set_grad_mode, set_step_mode

T, N, CLASSES = 2, 2, 3
MODELS = [
    ("mnist1d_cnn", (1, 16), {"channels": (4, 4, 8, 8), "spike_bits": 4}),
    ("digits_mlp", (64,), {"hidden": (8, 8)}),
    ("resnet18", (3, 8, 8), {"width": 2, "parallel": True, "seca": True}),
    ("resnet19", (3, 8, 8), {"width": 2, "mem_bn": True}),
    ("resnet34", (3, 8, 8), {"width": 2, "weight_bits": 1.5}),
    ("vgg11", (2, 16, 16), {"width": 4}),
]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Every model shares SpikingModel.forward's code object: without a reset, the models of this
    # file would add up past dynamo's per-code-object recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _model(name, in_shape, opts, step_mode):
    torch.manual_seed(0)
    m = build_model(name, in_shape=in_shape, num_classes=CLASSES, T=T, impl="triton", **opts)
    set_step_mode(m, step_mode)
    return m.to(DEVICE)


def _eval(model, x, step_mode):
    reset_net(model)
    with torch.no_grad():
        if step_mode == "m":
            return model(x)
        return torch.stack([model(x[t]) for t in range(T)])


def _train_steps(model, x):
    """The online strategy's per-step form: forward step t, loss_t, backward (grads accumulate)."""
    reset_net(model)
    losses = []
    for t in range(T):
        loss = model(x[t]).square().mean()
        loss.backward()
        losses.append(loss.detach())
    grads = {
        k.removeprefix("_orig_mod."): p.grad.clone()  # a compiled model prefixes the names
        for k, p in model.named_parameters()
        if p.grad is not None
    }
    return torch.stack(losses), grads


@pytest.mark.parametrize("step_mode", ["s", "m"])
@pytest.mark.parametrize(("name", "in_shape", "opts"), MODELS, ids=[m[0] for m in MODELS])
def test_model_compiles_fullgraph_in_eval(name, in_shape, opts, step_mode):
    model = _model(name, in_shape, opts, step_mode).eval()
    x = torch.rand(T, N, *in_shape, device=DEVICE) * 2
    eager = _eval(model, x, step_mode)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # a second sample after reset_net: same result, state handled
        torch.testing.assert_close(_eval(compiled, x, step_mode), eager, rtol=1e-5, atol=1e-5)
    assert eager.abs().max() > 0


@pytest.mark.parametrize(("name", "in_shape", "opts"), MODELS, ids=[m[0] for m in MODELS])
def test_model_compiles_fullgraph_per_step_training(name, in_shape, opts):
    model = _model(name, in_shape, opts, "s").train()
    twin = copy.deepcopy(model)
    x = torch.rand(T, N, *in_shape, device=DEVICE) * 2
    loss_e, grads_e = _train_steps(model, x)
    compiled = torch.compile(twin, fullgraph=True, backend="aot_eager")
    loss_c, grads_c = _train_steps(compiled, x)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-4, atol=1e-5, msg=k)
    # The neurons' own parameters learn through the compiled graph too.
    assert any(k.endswith(".logits") and (grads_c[k] != 0).any() for k in grads_c)


@pytest.mark.parametrize(("name", "in_shape", "opts"), MODELS, ids=[m[0] for m in MODELS])
def test_model_compiles_fullgraph_bptt_training(name, in_shape, opts):
    """The BPTT strategy's form: step mode "m", grad mode "bptt", one forward over all T steps
    and one backward through time."""
    model = set_grad_mode(_model(name, in_shape, opts, "m").train(), "bptt")
    twin = copy.deepcopy(model)
    x = torch.rand(T, N, *in_shape, device=DEVICE) * 2

    def run(m):
        reset_net(m)
        loss = m(x).mean(0).square().mean()
        loss.backward()
        grads = {k.removeprefix("_orig_mod."): p.grad.clone()
                 for k, p in m.named_parameters() if p.grad is not None}  # fmt: skip
        return loss.detach(), grads

    loss_e, grads_e = run(model)
    loss_c, grads_c = run(torch.compile(twin, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) > 0
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-4, atol=1e-5, msg=k)
    assert any(k.endswith(".logits") and (grads_c[k] != 0).any() for k in grads_c)


def test_model_compiles_with_inductor():
    name, in_shape, opts = MODELS[0]
    model = _model(name, in_shape, opts, "m").eval()
    x = torch.rand(T, N, *in_shape, device=DEVICE) * 2
    eager = _eval(model, x, "m")
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    torch.testing.assert_close(_eval(compiled, x, "m"), eager, rtol=1e-5, atol=1e-5)
