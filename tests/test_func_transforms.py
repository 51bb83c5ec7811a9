"""torch.func transforms (grad, vjp, jacrev, jvp, jacfwd, vmap) and forward-mode AD
(`torch.autograd.forward_ad`) over the ops and the modules.

The reference is plain torch and runs under every transform: `impl="auto"` resolves to it there
(also on CUDA), and its gradients, batched results and per-sample gradients equal the ones
autograd and a loop over the samples give outside the transform; forward mode gives the same
derivative as reverse mode (the straight-through and surrogate Functions define both).
`impl="triton"` is refused with one clear error (its kernels and autograd Functions take plain
tensors), and a refusal leaves nothing behind: the next plain call runs the kernels as before.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, vjp, vmap

import empf_triton.ops._common as ops_common
from empf_triton import reset_net
from empf_triton.nn import BinaryConv2d, BinaryLinear, EMPFNeuron, LIFNeuron
from empf_triton.ops import TritonUnavailableError
from empf_triton.ops.binary import (
    binarize,
    binary_linear,
    binary_matmul,
    pack_weight,
    ternarize,
    unpack_weight,
)
from empf_triton.ops.lif import lif_neuron, lif_neuron_step
from empf_triton.ops.neuron import empf_neuron, empf_neuron_step, parallel_neuron
from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes

B = 3  # samples mapped over
EXACT = dict(rtol=0, atol=0)
CLOSE = dict(rtol=1e-6, atol=1e-6)  # batched matmuls sum in another order than one sample's


def _params(device):
    g = torch.Generator().manual_seed(1)
    return {
        "decay": torch.tensor([0.3, 0.6, 0.9], device=device),
        "threshold": (torch.rand(3, generator=g) * 0.5 + 0.2).to(device),
        "w": torch.randn(5, 6, generator=g).to(device),
        "packed": pack_weight(torch.randn(5, 6, generator=g), 1, impl="reference"),
    }


def _ops(device):
    """name -> (f(x, impl) -> tensor, shape of one sample). x: one sample, differentiable."""
    p = _params(device)
    d, th, w = p["decay"], p["threshold"], p["w"]
    packed = p["packed"].to(device)
    return {
        "empf_neuron": (lambda x, i: empf_neuron(x, decay=d, threshold=th, impl=i)[0], (3, 4)),
        "empf_neuron[4-bit,online]": (
            lambda x, i: empf_neuron(
                x, decay=d, threshold=th, spike_bits=4, grad_mode="online", impl=i
            )[0],
            (3, 4),
        ),
        "empf_neuron[v_last]": (
            lambda x, i: empf_neuron(x, decay=0.5, threshold=th, impl=i)[1],
            (3, 4),
        ),  # fmt: skip
        "empf_neuron_step": (
            lambda x, i: empf_neuron_step(x, x * 0.5, decay=0.5, threshold=0.3, impl=i)[0],
            (4,),
        ),
        "parallel_neuron": (
            lambda x, i: parallel_neuron(x, threshold=th, spike_bits=2, impl=i),
            (3, 4),
        ),
        "lif_neuron": (lambda x, i: lif_neuron(x, decay=d, threshold=th, impl=i)[0], (3, 4)),
        "lif_neuron_step": (
            lambda x, i: lif_neuron_step(x, x * 0.5, decay=0.5, threshold=0.3, impl=i)[0],
            (4,),
        ),
        "quantize_spikes": (lambda x, i: quantize_spikes(x, 3, 0.25, impl=i), (7,)),
        "binarize": (lambda x, i: binarize(x, impl=i), (2, 5)),
        "ternarize": (lambda x, i: ternarize(x, impl=i), (2, 5)),
        "binary_linear[x]": (lambda x, i: binary_linear(x, w, impl=i), (2, 6)),
        "binary_linear[w]": (lambda x, i: binary_linear(w[:2], x, impl=i), (5, 6)),
        "binary_matmul": (lambda x, i: binary_matmul(x, packed, impl=i), (2, 6)),
    }


NAMES = list(_ops("cpu"))


def _sample(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, *shape, generator=g) * 0.8 + 0.2).to(device)


def _weights(f, x0):
    """Fixed random weights of the output, so that each gradient is a non-trivial vjp."""
    g = torch.Generator().manual_seed(7)
    out = f(x0)
    return torch.randn(out.shape, generator=g).to(out.device)


@pytest.mark.parametrize("name", NAMES)
def test_grad_and_vjp_equal_autograd(name, device):
    """grad / vjp / jacrev of the reference (impl='reference' and 'auto') equal autograd's
    gradient of the same call outside the transform."""
    f, shape = _ops(device)[name]
    x = _sample(shape, device)[0]
    c = _weights(lambda t: f(t, "reference"), x)
    xr = x.clone().requires_grad_()
    (want,) = torch.autograd.grad((f(xr, "reference") * c).sum(), xr)
    for impl in ("reference", "auto"):
        torch.testing.assert_close(
            grad(lambda t, impl=impl: (f(t, impl) * c).sum())(x), want, **EXACT
        )
        out, pullback = vjp(lambda t, impl=impl: f(t, impl), x)
        torch.testing.assert_close(out, f(x, "reference"), **EXACT)
        torch.testing.assert_close(pullback(c)[0], want, **EXACT)
    jac = jacrev(lambda t: f(t, "auto"))(x)
    weighted = (jac * c.reshape(*c.shape, *([1] * x.dim()))).sum(tuple(range(c.dim())))
    torch.testing.assert_close(weighted, want, **CLOSE)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_and_per_sample_grads_equal_a_loop(name, device):
    """vmap(f) and vmap(grad(f)) (per-sample gradients) equal f and autograd one sample at a
    time."""
    f, shape = _ops(device)[name]
    xs = _sample(shape, device)
    c = _weights(lambda t: f(t, "reference"), xs[0])
    got = vmap(lambda t: f(t, "auto"))(xs)
    torch.testing.assert_close(got, torch.stack([f(x, "reference") for x in xs]), **CLOSE)
    per_sample = vmap(grad(lambda t: (f(t, "auto") * c).sum()))(xs)
    want = []
    for x in xs:
        xr = x.clone().requires_grad_()
        want.append(torch.autograd.grad((f(xr, "reference") * c).sum(), xr)[0])
    torch.testing.assert_close(per_sample, torch.stack(want), **CLOSE)


@pytest.mark.parametrize("name", NAMES)
def test_forward_mode_equals_reverse_mode(name, device):
    """jacfwd = jacrev, and torch.func.jvp and a forward_ad dual tensor give the jacobian's
    product with the tangent (the Functions' jvp is their backward's derivative)."""
    f, shape = _ops(device)[name]
    x = _sample(shape, device)[0]
    tangent = _sample(shape, device, seed=9)[0]
    jac = jacrev(lambda t: f(t, "auto"))(x)
    torch.testing.assert_close(jacfwd(lambda t: f(t, "auto"))(x), jac, **CLOSE)
    want = (jac * tangent).sum(tuple(range(jac.dim() - x.dim(), jac.dim())))
    out, got = jvp(lambda t: f(t, "auto"), (x,), (tangent,))
    torch.testing.assert_close(out, f(x, "reference"), **EXACT)
    torch.testing.assert_close(got, want, **CLOSE)
    for impl in ("reference", "auto"):
        with fwad.dual_level():
            primal, dual = fwad.unpack_dual(f(fwad.make_dual(x, tangent), impl))
        torch.testing.assert_close(primal, out, **EXACT)
        torch.testing.assert_close(dual, want, **CLOSE)


@pytest.mark.parametrize("name", NAMES)
def test_triton_is_refused_under_transforms(name, device):
    f, shape = _ops(device)[name]
    xs = _sample(shape, device)
    match = r"impl='triton' does not run under torch\.func transforms"
    with pytest.raises(TritonUnavailableError, match=match):
        grad(lambda t: f(t, "triton").sum())(xs[0])
    with pytest.raises(TritonUnavailableError, match=match):
        vmap(lambda t: f(t, "triton"))(xs)
    with torch.no_grad(), pytest.raises(TritonUnavailableError, match=match):
        vmap(lambda t: f(t, "triton"))(xs)  # no autograd node: straight to the kernels before
    with pytest.raises(TritonUnavailableError, match=match):
        jvp(lambda t: f(t, "triton"), (xs[0],), (xs[1],))
    # forward_ad's dual tensors: most ops ran the kernels and returned no tangent at all
    with fwad.dual_level(), pytest.raises(TritonUnavailableError, match=match):
        f(fwad.make_dual(xs[0], xs[1]), "triton")


def test_spike_codes_under_vmap(device):
    """encode / decode / pack / unpack (no gradient) map over samples like a loop."""
    xs = _sample((2, 6), device).abs()

    def codes(t, impl):
        return decode_spikes(encode_spikes(t, 4, 0.25, impl=impl), 4, 0.25, (2, 6), impl=impl)

    def weights(t, impl):
        return unpack_weight(pack_weight(t, 2, impl=impl), torch.float32, impl=impl)

    for fn in (codes, weights):
        got = vmap(lambda t, fn=fn: fn(t, "auto"))(xs)
        torch.testing.assert_close(got, torch.stack([fn(x, "reference") for x in xs]), **EXACT)
        with pytest.raises(TritonUnavailableError, match="torch.func"):
            vmap(lambda t, fn=fn: fn(t, "triton"))(xs)


def test_refusal_leaves_the_triton_path_working(device):
    """The first Triton call of a process made under a transform used to run the interpreter's
    probe on wrapped tensors: it failed, was cached, and every later Triton call of the process
    raised "triton was imported before TRITON_INTERPRET=1" (on CPU)."""
    x = _sample((3, 4), device)[0]
    ops_common._interpreter_works.cache_clear()
    try:
        with pytest.raises(TritonUnavailableError, match="torch.func"):
            grad(lambda t: empf_neuron(t, decay=0.5, threshold=0.3, impl="triton")[0].sum())(x)
        got = empf_neuron(x, decay=0.5, threshold=0.3, impl="triton")[0]
    finally:
        ops_common._interpreter_works.cache_clear()
    torch.testing.assert_close(got, empf_neuron(x, decay=0.5, threshold=0.3, impl="reference")[0])


# ------------------------------------------------------------------------------------ modules


def _modules(impl, device):
    torch.manual_seed(3)
    return {
        "EMPFNeuron[m]": (EMPFNeuron(3, step_mode="m", impl=impl), (3, 2, 4)),
        "EMPFNeuron[s,online]": (EMPFNeuron(3, grad_mode="online", impl=impl), (3, 2, 4)),
        "EMPFNeuron[parallel]": (
            EMPFNeuron(3, parallel=True, step_mode="m", impl=impl),
            (3, 2, 4),
        ),  # fmt: skip
        "LIFNeuron[s]": (LIFNeuron(3, impl=impl), (3, 2, 4)),
        "BinaryLinear": (BinaryLinear(6, 5, impl=impl), (3, 2, 6)),
        "BinaryConv2d": (BinaryConv2d(2, 3, 3, padding=1, impl=impl), (3, 2, 5, 5)),
    }


def _run(module, params, x):
    """One sample's forward, T steps in the module's step mode; its state reset before and after
    (so no tensor of the transform stays in the module)."""
    reset_net(module)
    try:
        if getattr(module, "step_mode", "m") == "s":
            out = torch.stack([functional_call(module, params, (x[t],)) for t in range(x.shape[0])])
        else:
            out = functional_call(module, params, (x,))
    finally:
        reset_net(module)
    return out


@pytest.mark.parametrize("name", list(_modules("auto", "cpu")))
def test_module_per_sample_grads(name, device):
    """Per-sample gradients of the input and of every parameter, `vmap(grad(functional_call))`,
    equal autograd one sample at a time; impl='triton' modules are refused under the transform,
    and run as before outside it (their cached checks know the difference)."""
    module, shape = _modules("auto", device)[name]
    module = module.to(device)
    params = {k: p.detach() for k, p in module.named_parameters()}
    xs = _sample(shape, device, seed=5)
    c = _weights(lambda t: _run(module, params, t), xs[0])

    def loss(ps, t):
        return (_run(module, ps, t) * c).sum()

    got_p, got_x = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, 0))(params, xs)
    tol = dict(rtol=1e-5, atol=1e-5)  # convolutions' weight gradients sum in another order
    for i, x in enumerate(xs):
        module.zero_grad(set_to_none=True)
        xr = x.clone().requires_grad_()
        (_run(module, dict(module.named_parameters()), xr) * c).sum().backward()
        torch.testing.assert_close(got_x[i], xr.grad, **tol, msg=f"{name} input")
        for k, p in module.named_parameters():
            torch.testing.assert_close(got_p[k][i], p.grad, **tol, msg=f"{name} {k}")

    tri, _ = _modules("triton", device)[name]
    tri = tri.to(device)
    tri_params = {k: p.detach() for k, p in tri.named_parameters()}
    before = _run(tri, tri_params, xs[0])  # a plain call first: its checks are cached
    with pytest.raises(TritonUnavailableError, match="torch.func"):
        vmap(lambda t: _run(tri, tri_params, t))(xs)
    with pytest.raises(TritonUnavailableError, match="torch.func"):
        grad(lambda ps: _run(tri, ps, xs[0]).sum())(tri_params)
    with fwad.dual_level(), pytest.raises(TritonUnavailableError, match="forward-mode"):
        _run(tri, tri_params, fwad.make_dual(xs[0], xs[1]))
    torch.testing.assert_close(_run(tri, tri_params, xs[0]), before, **EXACT)


def test_unchecked_triton_entry_points_refuse_transforms():
    """The unchecked Triton entry points (what the modules call after their checks) refuse a
    transform on their autograd path too, as a guard behind `resolve_impl`."""
    from empf_triton.ops.binary import linear_triton, matmul_triton, quantize_triton
    from empf_triton.ops.lif import lif_neuron_triton
    from empf_triton.ops.neuron import empf_neuron_triton, parallel_neuron_triton
    from empf_triton.ops.spikes import quantize_spikes_triton

    w = torch.randn(5, 6)
    packed = pack_weight(w, 1, impl="reference")
    calls = [
        lambda t: empf_neuron_triton(t, None, 0.5, 0.3, None, 0.25, True)[0],
        lambda t: parallel_neuron_triton(t, 0.3, None, 0.25),
        lambda t: lif_neuron_triton(t, None, 0.5, 0.3, "sigmoid", 4.0, False, True)[0],
        lambda t: quantize_spikes_triton(t, 3, 0.25),
        lambda t: quantize_triton(t, 1),
        lambda t: matmul_triton(t[:, :6], packed.words, packed.scale, None, 5, 6),
        lambda t: linear_triton(t[:, :6], w, None, 1),
    ]
    x = torch.randn(3, 6)
    for call in calls:
        with pytest.raises(TritonUnavailableError, match="torch.func"):
            grad(lambda t, call=call: call(t).sum())(x)
