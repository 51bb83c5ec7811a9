"""torch.library registration of the binary and spike ops: `opcheck` of every `empf::` op (the
Triton path, kernels in the interpreter on CPU), and `torch.compile(fullgraph=True)` of
`BinaryLinear` / `BinaryConv2d` (latent and packed, forward and backward) against eager."""

from __future__ import annotations

import pytest
import torch

import empf_triton.ops.binary as ob
import empf_triton.ops.spikes as osp
from empf_triton.nn.binary import BinaryConv2d, BinaryLinear
from empf_triton.ops.binary import binarize, binary_matmul, pack_weight, ternarize

OPCHECK_TESTS = (
    "test_schema",
    "test_autograd_registration",
    "test_faketensor",
    "test_aot_dispatch_dynamic",
)


def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=OPCHECK_TESTS)


def _w(N, K, device, dtype=torch.float32):
    w = torch.randn(N, K, device=device) * 0.8
    w[0, 0] = 1.5  # outside the STE window
    return w.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2])
def test_opcheck_binary_ops(device, dtype, bits):
    N, K = 5, 40
    w = _w(N, K, device, dtype)
    words, scale = ob._pack_impl(w, bits)
    x = torch.randn(3, K, device=device, dtype=dtype, requires_grad=True)
    x1 = torch.randn(1, K, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(3, N, device=device, dtype=dtype, requires_grad=True)
    bias = torch.randn(N, device=device, dtype=dtype, requires_grad=True)
    _opcheck(ob._OPS.quantize, (w.clone().requires_grad_(), bits))
    _opcheck(ob._OPS.ste, (torch.randn_like(w).requires_grad_(), w))
    _opcheck(ob._OPS.pack, (w, bits))
    _opcheck(ob._OPS.unpack, (words, scale, K, dtype))
    _opcheck(ob._OPS.gemm, (x, words, scale, bias))
    _opcheck(ob._OPS.gemm, (x1, words, scale, None))
    _opcheck(ob._OPS.gemm_t, (g, words, scale, K))
    wl = w.float().requires_grad_()
    _opcheck(ob._OPS.linear, (x, wl, words, scale, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_opcheck_spike_ops(device, dtype):
    s = (torch.rand(37, device=device) * 5 - 1).to(dtype)
    _opcheck(osp._quantize_op, (s.clone().requires_grad_(), 4, 0.25))
    for bits in (1, 2, 4, 8):
        _opcheck(osp._encode_op, (s, bits, 0.3))
        codes = osp._encode_impl(s, bits, 0.3)
        _opcheck(osp._decode_op, (codes, bits, 0.3, 37, dtype))


def test_opcheck_weight_ops_on_a_transposed_weight(device):
    """A transposed latent weight (`binarize(w.t())` under torch.compile): the ops' results are
    contiguous, and so must their fake results be (binary_ste's fake took w's strides, and
    inductor's stride assertion then failed in the compiled backward)."""
    w = _w(40, 5, device).t()  # [5, 40], strides (1, 5)
    _opcheck(ob._OPS.ste, (torch.randn(5, 40, device=device).requires_grad_(), w))
    _opcheck(ob._OPS.quantize, (w.detach().requires_grad_(), 1))
    out = ob._OPS.ste(torch.randn(5, 40, device=device), w)
    assert out.is_contiguous()


def test_ops_match_reference_and_double_backward(device):
    N, K = 6, 70
    packed = pack_weight(_w(N, K, device), 2)
    x = torch.randn(4, K, device=device, dtype=torch.float64).float().requires_grad_()
    out = torch.ops.empf.binary_gemm(x, packed.words, packed.scale, None)
    ref = binary_matmul(x, packed, impl="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # the registered backward of binary_gemm_t makes grad_x differentiable in the output grad
    g = torch.randn(4, N, device=device, requires_grad=True)
    (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
    (gg,) = torch.autograd.grad(gx.sum(), g)
    w = ob.unpack_weight(packed).reshape(N, K)  # d(sum(g @ W))/dg[m, n] = sum_k W[n, k]
    torch.testing.assert_close(gg, w.sum(1).expand(4, N), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2])
def test_double_backward_matches_reference(device, bits):
    # the eager path's backward switches to the custom ops under create_graph=True, so second
    # derivatives exist on the Triton path as on the reference (all linear in the output grad)
    w0 = _w(6, 40, device)
    packed = pack_weight(w0, bits)
    res = {}
    for impl in ("triton", "reference"):
        x = torch.randn(2, 40, device=device, generator=torch.Generator(device).manual_seed(1))
        x.requires_grad_()
        w = w0.clone().requires_grad_()
        g = torch.ones(2, 6, device=device, requires_grad=True)
        gq = torch.ones(6, 40, device=device, requires_grad=True)
        out = binary_matmul(x, packed, impl=impl)
        (gx,) = torch.autograd.grad(out, x, g, create_graph=True)
        out_l = ob.binary_linear(x, w, bits=bits, impl=impl)
        gx_l, gw_l = torch.autograd.grad(out_l, (x, w), g, create_graph=True)
        q = (binarize if bits == 1 else ternarize)(w, impl=impl)
        (gw_q,) = torch.autograd.grad(q, w, gq, create_graph=True)
        total = (gx**2).sum() + (gx_l**2).sum() + (gw_l**2).sum() + (gw_q**2).sum()
        res[impl] = torch.autograd.grad(total, (g, gq))
    for got, want in zip(res["triton"], res["reference"], strict=True):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("bits", [1, 2])
def test_double_backward_reaches_the_weight(device, bits):
    """With create_graph=True, binary_linear's input gradient g Q(W) depends on the latent
    weight through Q's STE (a gradient penalty on it trains W): the Triton path gives the
    reference's second derivative with respect to W (it gave none before)."""
    w0 = _w(6, 40, device)
    res = {}
    for impl in ("triton", "reference"):
        x = torch.randn(2, 40, device=device, generator=torch.Generator(device).manual_seed(1))
        x.requires_grad_()
        w = w0.clone().requires_grad_()
        out = ob.binary_linear(x, w, bits=bits, impl=impl)
        (gx,) = torch.autograd.grad(out, x, torch.ones_like(out), create_graph=True)
        assert gx.requires_grad, impl
        res[impl] = torch.autograd.grad((gx**2).sum(), w)[0]
    assert res["reference"].abs().sum() > 0
    torch.testing.assert_close(res["triton"], res["reference"], atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------ torch.compile


def _recording(backend, graphs):
    """A dynamo backend that records each captured graph, then compiles it with `backend`."""
    inner = torch._dynamo.lookup_backend(backend)

    def compile_fn(gm, example_inputs):
        graphs.append(gm)
        return inner(gm, example_inputs)

    return compile_fn


def _compare(model, x, backend, *, grads):
    torch._dynamo.reset()
    graphs = []
    compiled = torch.compile(model, fullgraph=True, backend=_recording(backend, graphs))
    xe = x.clone().requires_grad_(grads)
    xc = x.clone().requires_grad_(grads)
    ye, yc = model(xe), compiled(xc)
    torch.testing.assert_close(yc, ye, atol=1e-5, rtol=1e-5)
    assert len(graphs) == 1  # one graph (fullgraph would raise on a break)
    targets = {str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"}
    if model.impl == "triton":  # the Triton path is the custom ops, seen as opaque nodes
        assert any(t.startswith("empf.") for t in targets), targets
    else:
        assert not any(t.startswith("empf.") for t in targets), targets
    if not grads:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.randn_like(ye)
    ge = torch.autograd.grad(ye, [xe, *params], g)
    gc = torch.autograd.grad(yc, [xc, *params], g)
    for a, b in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "reference"])
@pytest.mark.parametrize("weight_bits", [1, 1.5])
def test_compile_binary_linear_latent_and_packed(device, impl, weight_bits):
    layer = BinaryLinear(45, 7, weight_bits=weight_bits, impl=impl, device=device)
    x = torch.randn(3, 45, device=device)
    _compare(layer, x, "aot_eager", grads=True)  # latent: grads of x, weight, bias
    layer.pack().eval()
    _compare(layer, x, "aot_eager", grads=True)  # packed: grad of x (and bias)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_compile_binary_conv_latent_and_packed(device, impl):
    layer = BinaryConv2d(4, 6, 3, padding=1, groups=2, bias=True, impl=impl, device=device)
    x = torch.randn(2, 4, 5, 6, device=device)
    _compare(layer, x, "aot_eager", grads=True)
    layer.pack().eval()
    _compare(layer, x, "aot_eager", grads=True)


def test_compile_inductor_binary_linear_and_spikes(device):
    layer = BinaryLinear(33, 5, weight_bits=1.5, impl="triton", device=device)
    x = torch.randn(2, 33, device=device)
    _compare(layer, x, "inductor", grads=True)

    def f(s):
        q = osp.quantize_spikes(s, 4, 0.25, impl="triton")
        codes = osp.encode_spikes(s, 4, 0.25, impl="triton")
        d = osp.decode_spikes(codes, 4, 0.25, s.shape, dtype=s.dtype, impl="triton")
        return q * 2 + d + binarize(s, impl="triton") + ternarize(s, impl="triton")

    torch._dynamo.reset()
    s = torch.rand(4, 9, device=device) * 4
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="inductor")(s), f(s))
