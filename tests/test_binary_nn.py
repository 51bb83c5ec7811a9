"""BinaryLinear and BinaryConv2d: training forward, packed path, bookkeeping (docs/model.md §4)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import DTYPES, assert_close_to_oracle

from empf_triton.nn.binary import (
    BinaryConv2d,
    BinaryLinear,
    PackedLayerTrainingError,
    frozen_weights,
)
from empf_triton.ops.binary import binary_linear, binary_matmul, pack_weight
from empf_triton.reference.binary import binarize_ref, ternarize_ref

IMPLS = ["reference", "triton"]


def _quant(bits):
    return binarize_ref if bits == 1 else ternarize_ref


def _spread(layer, scale=0.6):
    # some latent weights outside the STE window |w| <= 1
    with torch.no_grad():
        layer.weight.normal_(0, scale)
    return layer


# ---------------------------------------------------------------------------------- BinaryLinear


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_bits", [1, 1.5])
def test_linear_training_forward_and_grads(device, impl, weight_bits):
    bits = 1 if weight_bits == 1 else 2
    layer = _spread(BinaryLinear(70, 17, weight_bits=weight_bits, impl=impl, device=device))
    x = torch.randn(4, 3, 70, device=device, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y_ref = F.linear(x2, _quant(bits)(w), b)
    rx, rw, rb = torch.autograd.grad(y_ref, (x2, w, b), g)
    tol = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(y, y_ref, **tol)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gw, rw, **tol)
    torch.testing.assert_close(gb, rb, **tol)
    assert (gw[layer.weight.abs() > 1] == 0).all() and (layer.weight.abs() > 1).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_low_precision_input(device, dtype):
    layer = BinaryLinear(33, 9, impl="triton", device=device)
    x = torch.randn(5, 33, device=device).to(dtype)
    y = layer(x)
    y_ref = BinaryLinear(33, 9, impl="reference", device=device)
    y_ref.load_state_dict(layer.state_dict())
    ref = y_ref(x)
    w64 = binarize_ref(layer.weight.detach()).double()
    oracle = x.double() @ w64.T + layer.bias.detach().to(dtype).double()
    assert y.dtype == dtype
    assert_close_to_oracle("out", y, ref, oracle)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_bits", [1, 1.5])
def test_linear_packed_equals_unpacked(device, impl, weight_bits):
    layer = _spread(BinaryLinear(100, 17, weight_bits=weight_bits, impl=impl, device=device))
    layer.eval()
    x = torch.randn(6, 100, device=device)
    with torch.no_grad():
        y0 = layer(x)
    layer.pack()
    assert layer.is_packed and layer.weight is None
    assert layer.packed_words.dtype == torch.int32
    x_req = x.clone().requires_grad_()
    y1 = layer(x_req)  # eval mode: grad w.r.t. the input flows
    # same packed words and the same kernel or formula: identical output
    assert torch.equal(y1.detach(), y0)
    (gx,) = torch.autograd.grad(y1.sum(), x_req)
    w = layer.quantized_weight()
    torch.testing.assert_close(gx, w.sum(0).expand_as(x), atol=1e-5, rtol=1e-5)


def test_packed_layer_refuses_to_train_and_unpack_restores(device):
    layer = _spread(BinaryLinear(40, 8, device=device))
    x = torch.randn(3, 40, device=device)
    layer.eval()
    y_latent = layer(x).detach()
    layer.pack()
    layer.train()
    with pytest.raises(PackedLayerTrainingError, match=r"unpack\(\)"):
        layer(x)
    with torch.no_grad():  # no gradient asked for: fine in train mode too
        assert torch.equal(layer(x), y_latent)
    layer.eval()
    assert torch.equal(layer(x).detach(), y_latent)
    layer.unpack()
    layer.train()
    assert not layer.is_packed and isinstance(layer.weight, torch.nn.Parameter)
    y = layer(x)
    torch.testing.assert_close(y.detach(), y_latent, atol=1e-6, rtol=1e-6)
    y.sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    with pytest.raises(PackedLayerTrainingError):
        layer.pack().reset_parameters()


def test_packed_state_dict_round_trip(device):
    a = _spread(BinaryLinear(50, 12, weight_bits=1.5, device=device)).pack().eval()
    sd = a.state_dict()
    assert set(sd) == {"bias", "packed_words", "packed_scale", "packed_shape"}
    b = BinaryLinear(50, 12, weight_bits=1.5, device=device).pack().eval()
    b.load_state_dict(sd)
    x = torch.randn(2, 50, device=device)
    assert torch.equal(a(x), b(x))


def test_weight_bytes():
    lin = BinaryLinear(1024, 1024)
    fp32 = 1024 * 1024 * 4
    assert lin.weight_bytes() == 1024 * 32 * 4 + 1024 * 4
    assert fp32 / lin.weight_bytes() >= 30
    lin.pack()
    assert lin.weight_bytes() == lin.packed_weight().nbytes
    tern = BinaryLinear(1024, 1024, weight_bits=1.5)
    assert tern.weight_bytes() == 2 * 1024 * 32 * 4 + 1024 * 4
    assert fp32 / tern.weight_bytes() >= 15
    conv = BinaryConv2d(64, 128, 3, groups=2)  # K = 32 * 9 = 288 -> 9 words
    assert conv.weight_bytes() == 128 * 9 * 4 + 128 * 4
    assert conv.pack().weight_bytes() == conv.packed_weight().nbytes


def test_linear_bad_inputs(device):
    with pytest.raises(ValueError, match="weight_bits"):
        BinaryLinear(4, 4, weight_bits=2)
    with pytest.raises(TypeError, match="weight_bits"):
        BinaryLinear(4, 4, weight_bits=True)
    with pytest.raises(ValueError, match="impl"):
        BinaryLinear(4, 4, impl="cuda")
    with pytest.raises(ValueError, match="in_features"):
        BinaryLinear(0, 4)
    for dtype in (torch.int32, torch.bool, "float32"):  # was a RuntimeError from nn.Parameter
        with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
            BinaryLinear(4, 4, dtype=dtype)
    layer = BinaryLinear(8, 4, device=device)
    with pytest.raises(ValueError, match="K = 8"):
        layer(torch.randn(2, 7, device=device))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.ones(2, 8, dtype=torch.int32, device=device))
    layer.pack().eval()
    with pytest.raises(ValueError, match="K = 8"):
        layer(torch.randn(2, 7, device=device))


@pytest.mark.parametrize("cls", [BinaryLinear, BinaryConv2d], ids=["linear", "conv"])
@pytest.mark.parametrize("bias", ["False", 1, None], ids=repr)
def test_bias_flag_must_be_a_bool(cls, bias):
    """bias is a real bool, as the neurons' flags: "False" (truthy) made a bias silently."""
    size = (4, 4) if cls is BinaryLinear else (4, 4, 3)
    with pytest.raises(TypeError, match="bias must be a bool"):
        cls(*size, bias=bias)


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_layers_check_each_call_form_once(device, cls):
    """A layer runs its checks on the first call of each form (input shape, dtype, device;
    packed or not; training; grad mode; impl) and reuses what they resolved after that; a bad
    input, or a form that changed, is checked (and refused) as on a first call."""
    if cls == "linear":
        layer, good, bad = BinaryLinear(8, 4, device=device), (2, 8), (2, 7)
    else:
        layer, good, bad = BinaryConv2d(3, 4, 3, device=device), (1, 3, 6, 6), (1, 2, 6, 6)
    runs = []
    check = layer._check
    layer._check = lambda x: runs.append(tuple(x.shape)) or check(x)
    x = torch.randn(*good, device=device)
    want = layer(x)
    assert torch.equal(layer(x), want) and torch.equal(layer(x.clone()), want)
    assert runs == [good]
    with pytest.raises(ValueError):
        layer(torch.randn(*bad, device=device))
    with pytest.raises(TypeError, match="dtype"):
        layer(x.to(torch.int32))
    layer(x)  # the refused calls left the checked form as it was
    assert runs == [good, bad, good]  # (the int32 input has the good shape)
    with torch.no_grad():  # another grad mode: checked again, the same result
        assert torch.equal(layer(x), want)
    layer.eval()
    layer(x)
    assert len(runs) == 5
    layer.pack()
    layer.train()  # packed and training with grad: refused, on a form seen before packing
    with pytest.raises(PackedLayerTrainingError):
        layer(x)


# ---------------------------------------------------------------------------------- BinaryConv2d

CONV_CASES = [
    # in, out, kernel, stride, padding, dilation, groups, bias
    (4, 6, 3, 1, 1, 1, 1, False),
    (4, 6, (3, 2), 2, (1, 0), (1, 2), 1, True),
    (4, 6, 3, 1, 1, 1, 2, True),
    (4, 8, 3, 2, 1, 1, 4, False),  # depthwise-style
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("weight_bits", [1, 1.5])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_vs_f_conv2d(device, impl, weight_bits, case):
    cin, cout, k, s, p, d, g, bias = case
    bits = 1 if weight_bits == 1 else 2
    layer = BinaryConv2d(cin, cout, k, s, p, d, g, bias, weight_bits, impl=impl, device=device)
    _spread(layer)
    x = torch.randn(2, cin, 7, 8, device=device, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    grads = torch.autograd.grad(y, params, gy)

    w = layer.weight.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_() if bias else None
    y_ref = F.conv2d(x2, _quant(bits)(w), b, layer.stride, layer.padding, layer.dilation, g)
    ref_grads = torch.autograd.grad(y_ref, [x2, w] + ([b] if bias else []), gy)
    torch.testing.assert_close(y, y_ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("weight_bits", [1, 1.5])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_packed_equals_unpacked(device, weight_bits, case):
    cin, cout, k, s, p, d, g, bias = case
    layer = BinaryConv2d(cin, cout, k, s, p, d, g, bias, weight_bits, impl="triton", device=device)
    _spread(layer).eval()
    x = torch.randn(2, cin, 7, 8, device=device)
    y0 = layer(x).detach()
    layer.pack()
    x_req = x.clone().requires_grad_()
    y1 = layer(x_req)  # im2col + packed Triton GEMM per group
    torch.testing.assert_close(y1.detach(), y0, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y1)
    (gx,) = torch.autograd.grad(y1, x_req, gy)
    x2 = x.clone().requires_grad_()
    w = layer.quantized_weight()
    y2 = F.conv2d(x2, w, layer.bias, layer.stride, layer.padding, layer.dilation, g)
    (gx2,) = torch.autograd.grad(y2, x2, gy)
    torch.testing.assert_close(gx, gx2, atol=1e-5, rtol=1e-5)
    # the reference route of a packed layer agrees too
    layer.impl = "reference"
    torch.testing.assert_close(layer(x), y0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_packed_dtypes(device, dtype):
    layer = BinaryConv2d(3, 5, 3, padding=1, bias=True, impl="triton", device=device).eval()
    x = torch.randn(2, 3, 5, 6, device=device).to(dtype)
    ref = layer(x)  # training forward: quantise + F.conv2d in x's dtype
    oracle = F.conv2d(
        x.double(),
        layer.quantized_weight().double(),
        layer.bias.detach().to(dtype).double(),
        padding=1,
    )
    layer.pack()
    out = layer(x)
    assert out.dtype == dtype
    assert_close_to_oracle("out", out, ref.detach(), oracle)


def test_conv_multistep_and_unbatched_and_channels_last(device):
    layer = BinaryConv2d(3, 4, 3, padding=1, device=device).eval()
    x = torch.randn(2, 3, 3, 5, 5, device=device)  # [T, B, C, H, W]
    y = layer(x)
    assert y.shape == (2, 3, 4, 5, 5)
    torch.testing.assert_close(y, layer(x.flatten(0, 1)).reshape(2, 3, 4, 5, 5))
    torch.testing.assert_close(layer(x[0, 0]), y[0, 0])
    layer.impl = "triton"
    layer.pack()
    xc = x[0].contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(layer(xc), y[0], atol=1e-5, rtol=1e-5)


def test_conv_bad_inputs(device):
    with pytest.raises(ValueError, match="groups=3 must divide"):
        BinaryConv2d(4, 6, 3, groups=3)
    with pytest.raises(ValueError, match="groups=4 must divide"):
        BinaryConv2d(8, 6, 3, groups=4)
    with pytest.raises(ValueError, match="groups"):
        BinaryConv2d(4, 4, 3, groups=0)
    with pytest.raises(ValueError, match="weight_bits"):
        BinaryConv2d(4, 4, 3, weight_bits=2)
    with pytest.raises(ValueError, match="padding"):
        BinaryConv2d(4, 4, 3, padding="same")
    with pytest.raises(ValueError, match="kernel_size"):
        BinaryConv2d(4, 4, 0)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        BinaryConv2d(4, 4, 3, dtype=torch.int64)
    layer = BinaryConv2d(4, 4, 3, device=device)
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        layer(torch.randn(1, 3, 8, 8, device=device))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(1, 4, 8, 8, dtype=torch.int64, device=device))
    layer.pack()
    with pytest.raises(PackedLayerTrainingError):
        layer(torch.randn(1, 4, 8, 8, device=device))
    layer.eval()
    with pytest.raises(ValueError, match="is on"):
        layer(torch.randn(1, 4, 8, 8, device="meta"))


# --------------------------------------------------------------------- robustness (issue 10)


def test_packed_state_of_another_shape_is_refused(device):
    # in_features 20 and 30 both pack into one int32 word per row: the words alone match
    src = BinaryLinear(20, 4, device=device).pack()
    dst = BinaryLinear(30, 4, device=device).pack()
    assert src.packed_words.shape == dst.packed_words.shape
    with pytest.raises(RuntimeError, match=r"shape \(4, 20\).*has \(4, 30\)"):
        dst.load_state_dict(src.state_dict())
    conv3 = BinaryConv2d(2, 4, 3, device=device).pack()  # K = 18: one word
    conv2 = BinaryConv2d(2, 4, 2, device=device).pack()  # K = 8: one word
    assert conv3.packed_words.shape == conv2.packed_words.shape
    with pytest.raises(RuntimeError, match=r"\(4, 2, 2, 2\).*\(4, 2, 3, 3\)"):
        conv3.load_state_dict(conv2.state_dict())
    # a packed checkpoint into a layer that is not packed: say what to do
    with pytest.raises(RuntimeError, match=r"call pack\(\)"):
        BinaryLinear(20, 4, device=device).load_state_dict(src.state_dict())
    # the matching shape still loads
    BinaryLinear(20, 4, device=device).pack().load_state_dict(src.state_dict())


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_unpack_gives_back_the_same_parameter(device, cls):
    if cls == "linear":
        layer = _spread(BinaryLinear(12, 5, device=device))
        x = torch.randn(3, 12, device=device)
    else:
        layer = _spread(BinaryConv2d(2, 3, 3, padding=1, device=device))
        x = torch.randn(2, 2, 5, 5, device=device)
    param = layer.weight
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    layer(x).sum().backward()
    opt.step()
    layer.pack()
    assert param.numel() == 0 and param.grad is None  # storage freed while packed
    assert all(p is not param for p in layer.parameters())
    with torch.no_grad():
        opt.step()  # no gradient: the packed layer's latent weight is left alone
    deployed = layer.quantized_weight()  # ±α of the packed weight
    layer.unpack()
    assert layer.weight is param and isinstance(param, torch.nn.Parameter)
    assert torch.equal(param.detach(), deployed)
    before = param.detach().clone()
    opt.zero_grad()
    layer(x).sum().backward()
    opt.step()  # the optimizer built before pack() updates the weight the layer uses
    assert not torch.equal(param.detach(), before)


@pytest.mark.parametrize("cls", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_change_while_packed_carries_to_the_unpacked_weight(device, cls, dtype):
    """`.to(dtype)` / `.half()` of a packed layer applies to the latent weight it keeps: unpack()
    gives the weight in the layer's dtype now, like its bias (not the dtype before packing)."""
    layer = (
        BinaryLinear(12, 5, device=device)
        if cls == "linear"
        else BinaryConv2d(2, 3, 3, bias=True, device=device)
    )
    param = layer.weight
    want = layer.pack().quantized_weight().to(dtype)
    layer.to(dtype).unpack()
    assert layer.weight is param
    assert layer.weight.dtype == layer.bias.dtype == dtype
    assert layer.weight.device == layer.bias.device
    assert torch.equal(layer.weight.detach(), want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("packed", [False, True])
def test_conv_input_smaller_than_kernel_same_error(device, impl, packed):
    layer = BinaryConv2d(3, 4, 5, padding=1, impl=impl, device=device).eval()
    if packed:
        layer.pack()
    with pytest.raises(ValueError, match=r"spatial size \(2, 6\).*kernel \(5, 5\)"):
        layer(torch.randn(1, 3, 2, 6, device=device))
    dil = BinaryConv2d(3, 4, 3, dilation=3, impl=impl, device=device).eval()  # spans 7
    if packed:
        dil.pack()
    with pytest.raises(ValueError, match=r"kernel \(7, 7\)"):
        dil(torch.randn(1, 3, 6, 9, device=device))
    assert dil(torch.randn(1, 3, 7, 7, device=device)).shape == (1, 4, 1, 1)


def _forbid_reference(monkeypatch):
    import empf_triton.nn.binary as nnb
    import empf_triton.ops.binary as ob

    def boom(*args, **kwargs):
        raise AssertionError("impl='triton' fell back to the reference")

    for mod in (nnb, ob):
        for name in (
            "binary_linear_ref",
            "binary_matmul_ref",
            "quantize_ref",
            "unpack_weight_ref",
            "binarize_ref",
            "ternarize_ref",
            "pack_weight_ref",
        ):
            if hasattr(mod, name):
                monkeypatch.setattr(mod, name, boom)


@pytest.mark.parametrize("weight_bits", [1, 1.5])
def test_modules_with_triton_never_fall_back(device, monkeypatch, weight_bits):
    _forbid_reference(monkeypatch)
    lin = BinaryLinear(20, 6, weight_bits=weight_bits, impl="triton", device=device)
    conv = BinaryConv2d(2, 4, 3, groups=2, bias=True, weight_bits=weight_bits, impl="triton")
    conv = conv.to(device)
    x = torch.randn(300, 20, device=device, requires_grad=True)  # large M: still packed
    xc = torch.randn(2, 2, 5, 5, device=device, requires_grad=True)
    lin(x).sum().backward()
    conv(xc).sum().backward()
    lin.pack().eval()
    conv.pack().eval()
    lin(x).sum().backward()
    conv(xc).sum().backward()
    lin.unpack()
    conv.unpack()


def test_modules_with_triton_raise_where_triton_cannot_run(monkeypatch):
    import empf_triton.ops._common as ops_common
    from empf_triton.ops._common import TritonUnavailableError

    monkeypatch.setattr(ops_common, "_interpreter_on", lambda: False)
    lin = BinaryLinear(8, 3, impl="triton")
    conv = BinaryConv2d(2, 3, 3, impl="triton")
    for layer, x in ((lin, torch.randn(2, 8)), (conv, torch.randn(1, 2, 4, 4))):
        with pytest.raises(TritonUnavailableError):
            layer(x)
    monkeypatch.undo()
    for layer in (lin, conv):  # packed by the reference: a GPU machine has no interpreter
        layer.impl = "reference"
        layer.pack().eval()
        layer.impl = "triton"
    monkeypatch.setattr(ops_common, "_interpreter_on", lambda: False)
    for layer, x in ((lin, torch.randn(2, 8)), (conv, torch.randn(1, 2, 4, 4))):
        with pytest.raises(TritonUnavailableError):
            layer(x)


def _graph_node_names(y: torch.Tensor) -> list[str]:
    names, seen, stack = [], set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.append(type(node).__name__)
        stack.extend(f for f, _ in node.next_functions)
    return names


@pytest.mark.parametrize("weight_bits", [1, 1.5])
@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_layers_add_no_view_nodes_and_no_graph_without_grad(device, cls, weight_bits):
    """A [N, K] input to BinaryLinear and an [N, C, H, W] input to BinaryConv2d go to the ops as
    they are, and the weight's [N, K] view is made inside the quantiser's autograd node: the
    graph holds no view nodes (each costs host time forward and backward). Without grad the
    layers launch the kernels directly: the same values, no graph."""
    if cls == "linear":
        layer = BinaryLinear(40, 9, weight_bits=weight_bits, impl="triton", device=device)
        x = torch.randn(5, 40, device=device, requires_grad=True)
    else:
        layer = BinaryConv2d(3, 6, 3, padding=1, weight_bits=weight_bits, impl="triton",
                             device=device)  # fmt: skip
        x = torch.randn(2, 3, 5, 6, device=device, requires_grad=True)
    _spread(layer)
    y = layer(x)
    names = _graph_node_names(y)
    assert not [n for n in names if "View" in n or "Reshape" in n], names
    assert len(names) <= 6, names  # op, quantiser (conv), AccumulateGrad x3
    gx, gw = torch.autograd.grad(y.sum(), (x, layer.weight))
    with torch.no_grad():
        y2 = layer(x)
    assert y2.grad_fn is None
    torch.testing.assert_close(y2, y.detach(), rtol=0, atol=0)
    ref = BinaryLinear if cls == "linear" else BinaryConv2d
    twin = copy.deepcopy(layer)
    twin.impl = "reference"
    twin._checked_form = None
    yr = twin(x)
    rx, rw = torch.autograd.grad(yr.sum(), (x, twin.weight))
    assert isinstance(twin, ref)
    torch.testing.assert_close(y, yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [1, 2])
def test_quantizer_on_a_conv_weight_is_one_node(device, bits):
    """binarize / ternarize of a 4-D weight: one autograd node (the [N, K] view inside it), the
    STE gradient in the weight's shape; without grad no node at all."""
    from empf_triton.ops import binarize, ternarize

    op = binarize if bits == 1 else ternarize
    w = (torch.randn(6, 3, 3, 3, device=device) * 0.8).requires_grad_()
    q = op(w, impl="triton")
    assert _graph_node_names(q) == ["_QuantizeFnBackward", "AccumulateGrad"]
    g = torch.randn_like(q)
    (gw,) = torch.autograd.grad(q, w, g)
    w2 = w.detach().clone().requires_grad_()
    (rw,) = torch.autograd.grad(_quant(bits)(w2), w2, g)
    torch.testing.assert_close(gw, rw, rtol=0, atol=0)
    torch.testing.assert_close(q, _quant(bits)(w2), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        q2 = op(w, impl="triton")
    assert q2.grad_fn is None and torch.equal(q2, q.detach())


# ----------------------------------------------------------------- evaluation keeps the weight form


def _counting(monkeypatch):
    """Counts the calls that derive a layer's weight form (quantise or pack) from the latent
    weight: the layers' own, and those inside `binary_linear`'s reference and Triton paths."""
    import empf_triton.nn.binary as nb
    import empf_triton.ops.binary as ob
    import empf_triton.reference.binary as rb

    calls = []
    for module, name in ((nb, "quantize_ref"), (nb, "quantize_triton"), (ob, "_pack_impl"),
                         (rb, "quantize_ref")):  # fmt: skip
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _r=real, **k: calls.append(1) or _r(*a, **k))
    return calls


@pytest.mark.parametrize("bits", [1, 1.5], ids=["binary", "ternary"])
@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_frozen_weights_keep_the_weight_form_until_it_can_change(monkeypatch, layer, impl, bits):
    """Inside `frozen_weights`, in eval mode without autograd through the weight, a layer
    quantises (or packs) its latent weight once and reuses it: the same outputs as a fresh
    derivation, derived again after an in-place change or a `.data` swap, never kept where a
    gradient reaches the weight, dropped by `train()`, `pack()` and by leaving the block.
    Outside the block nothing is kept."""
    torch.manual_seed(0)
    if layer == "linear":
        m, x = BinaryLinear(40, 7, weight_bits=bits, impl=impl), torch.randn(5, 40)
    else:
        m, x = (
            BinaryConv2d(3, 5, 3, padding=1, weight_bits=bits, impl=impl),
            torch.randn(2, 3, 5, 5),
        )
    m.eval()
    calls = _counting(monkeypatch)

    def fresh():
        with torch.no_grad():
            return m(x)  # outside the block: derived anew

    def derivations(fn):
        n = len(calls)
        out = fn()
        return len(calls) - n, out

    want = fresh()
    assert derivations(fresh)[0] == 1 and "_derived_value" not in m.__dict__
    with frozen_weights(m) as same, torch.no_grad():
        assert same is m
        count, outs = derivations(lambda: [m(x) for _ in range(3)])
        assert count == 1 and all(torch.equal(o, want) for o in outs)  # once for three calls
        m.weight.mul_(-0.5)  # in place: an optimizer step, load_state_dict
        count, changed = derivations(lambda: m(x))
        assert count == 1 and not torch.equal(changed, want)
    assert "_derived_value" not in m.__dict__ and torch.equal(changed, fresh())
    with frozen_weights(m):
        with torch.no_grad():
            m(x)
            m.weight.data = torch.randn_like(m.weight)  # another storage
            swapped = m(x)
        assert torch.equal(swapped, fresh())
        # a gradient through the weight: the STE gradient of train mode arrives
        grads = []
        for mode in (False, False, True):
            m.train(mode)
            m.weight.grad = None
            m(x).square().sum().backward()
            grads.append(m.weight.grad)
        m.eval()
        assert grads[0].abs().sum() > 0 and all(torch.equal(g, grads[2]) for g in grads[:2])
        # a frozen weight: kept under inference mode and, separately, for an input gradient
        m.weight.requires_grad_(False)
        with torch.inference_mode():
            m(x)
        xg = x.clone().requires_grad_()
        m(xg).sum().backward()
        assert xg.grad is not None and xg.grad.abs().sum() > 0
        m.weight.requires_grad_(True)
        with torch.no_grad():
            m(x)
        assert "_derived_value" in m.__dict__
        m.train()
        assert "_derived_value" not in m.__dict__
        m.eval()
        with torch.no_grad():
            m(x)
        m.pack()
        assert "_derived_value" not in m.__dict__ and m.__dict__["_latent_param"].numel() == 0


def test_frozen_weights_nest_and_reach_every_binary_layer():
    """The block covers every binary layer of a model; an inner block leaves the outer one's
    keeping in place; leaving the outer one frees every layer's copy."""
    model = torch.nn.Sequential(BinaryLinear(8, 8, impl="reference"), torch.nn.ReLU(),
                                BinaryLinear(8, 3, impl="reference")).eval()  # fmt: skip
    x = torch.randn(2, 8)
    kept = lambda: [("_derived_value" in m.__dict__) for m in (model[0], model[2])]  # noqa: E731
    with frozen_weights(model), torch.no_grad():
        model(x)
        with frozen_weights(model):
            model(x)
        assert kept() == [True, True]
        model(x)
    assert kept() == [False, False]
    with pytest.raises(TypeError, match="frozen_weights needs an nn.Module"):
        with frozen_weights([model]):
            pass


def test_eval_input_gradient_equals_the_uncached_one():
    """A frozen weight in eval mode with an input that needs a gradient: the kept weight gives
    the input gradient of the uncached path exactly (Triton, packed GEMM backward)."""
    torch.manual_seed(1)
    m = BinaryLinear(40, 6, impl="triton").eval()
    m.weight.requires_grad_(False)
    x = torch.randn(3, 40)
    grads = []
    with frozen_weights(m):
        for _ in range(2):  # the first call derives, the second reuses
            xg = x.clone().requires_grad_()
            m(xg).square().sum().backward()
            grads.append(xg.grad)
    m.train()
    xg = x.clone().requires_grad_()
    m(xg).square().sum().backward()
    assert torch.equal(grads[0], xg.grad) and torch.equal(grads[1], xg.grad)


def test_moving_a_layer_drops_the_kept_weight_form():
    """`.to()` (here to fp64) drops what was kept; the next call derives it again in the new
    dtype and equals the fresh derivation."""
    m = BinaryConv2d(2, 3, 3, impl="reference").eval()
    x = torch.randn(1, 2, 4, 4)
    with frozen_weights(m), torch.no_grad():
        m(x)
        assert "_derived_value" in m.__dict__
        m.to(torch.float64)
        assert "_derived_value" not in m.__dict__
        out = m(x.double())
    assert out.dtype == torch.float64 and torch.equal(out, m(x.double()).detach())


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_made_inside_frozen_weights_is_not_frozen(how):
    """A copy of a model taken inside the block (an EMA or snapshot during evaluation) neither
    keeps the original's quantised weight nor goes on keeping its own after the block: a later
    change of its weight through `.data` shows in its output."""
    import io

    model = torch.nn.Sequential(BinaryLinear(8, 3, bias=False, impl="reference")).eval()
    x = torch.randn(2, 8)
    with frozen_weights(model), torch.no_grad():
        model(x)
        if how == "deepcopy":
            c = copy.deepcopy(model)
        else:
            buf = io.BytesIO()
            torch.save(model, buf)
            buf.seek(0)
            c = torch.load(buf, weights_only=False)
        assert "_derived_value" not in c[0].__dict__
    with torch.no_grad():
        before = c(x)
        c[0].weight.data.neg_()  # not noticed by a kept form: only right if nothing is kept
        assert torch.equal(c(x), -before)
        assert torch.equal(c(x), c[0](x)) and "_derived_value" not in c[0].__dict__


def test_evaluate_runs_inside_frozen_weights(monkeypatch):
    """`evaluate` quantises each binary layer once per pass, not once per batch."""
    from empf_triton.models import build_model
    from empf_triton.train.strategies import evaluate

    torch.manual_seed(0)
    model = build_model("digits_mlp", in_shape=(64,), num_classes=10, T=2, impl="reference")
    layers = sum(isinstance(m, BinaryLinear) for m in model.modules())
    calls = _counting(monkeypatch)
    batches = [(torch.randn(4, 64), torch.randint(0, 10, (4,))) for _ in range(3)]
    ev = evaluate(model, batches, 2)
    assert layers > 0 and len(calls) == layers and ev["samples"] == 12
    assert not any("_derived_value" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("impl", ["reference", "triton"])
@pytest.mark.parametrize("packed", [False, True])
def test_conv_output_follows_the_input_memory_format(impl, packed):
    """Every path gives a contiguous output for a contiguous input (the packed Triton path gave
    channels-last strides, so `.view(N, -1)` failed there only) and a channels-last output for a
    channels-last input, as nn.Conv2d."""
    layer = BinaryConv2d(4, 6, 3, padding=1, impl=impl)
    if packed:
        layer.pack()
    x = torch.rand(2, 4, 5, 5)
    with torch.no_grad():
        y = layer(x)
        assert y.is_contiguous() and y.view(2, -1).shape == (2, 150)
        y_cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, y)


@pytest.mark.parametrize("cls", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_scale_stays_fp32_under_half(device, cls, dtype):
    """`.half()` / `.to(bf16)` of a packed layer keeps α in fp32, from its own values: the
    forward equals the one with the scale it was packed with (α rounded to fp16 it did not)."""
    layer = (
        BinaryLinear(40, 6, device=device)
        if cls == "linear"
        else BinaryConv2d(3, 6, 3, bias=True, device=device)
    ).eval()
    with torch.no_grad():
        layer.weight.mul_(
            1.0 + 1e-3 * torch.arange(layer.weight.numel(), device=device).view_as(layer.weight)
        )  # α values that fp16 cannot hold exactly
    layer.pack()
    scale = layer.packed_scale.clone()
    assert scale.dtype == torch.float32
    assert not torch.equal(scale.to(dtype).float(), scale)  # the test would show a rounding
    layer.to(dtype)
    assert layer.packed_scale.dtype == torch.float32
    assert torch.equal(layer.packed_scale, scale)
    assert layer.packed_words.dtype == torch.int32 and layer.bias.dtype == dtype
    layer.to(torch.float64)  # a wider dtype is exact either way
    assert layer.packed_scale.dtype == torch.float64 and torch.equal(
        layer.packed_scale, scale.double()
    )
    layer.float()
    assert torch.equal(layer.packed_scale, scale)


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_packed_layer_moves_to_and_from_meta(cls):
    """`.to("meta")` and `.to_empty()` of a packed layer: its kept latent Parameter cannot take a
    meta tensor in place (a RuntimeError from set_data), so it is replaced, as nn.Module does."""
    make = (
        (lambda: BinaryLinear(12, 5, impl="reference"))
        if cls == "linear"
        else (lambda: BinaryConv2d(2, 3, 3, impl="reference"))
    )
    src = make().pack()
    layer = copy.deepcopy(src).to("meta")
    assert layer.packed_words.is_meta
    layer.to_empty(device="cpu").load_state_dict(src.state_dict())
    x = torch.randn(2, 12) if cls == "linear" else torch.randn(2, 2, 5, 5)
    with torch.no_grad():
        assert torch.equal(layer.eval()(x), src.eval()(x))
    assert torch.equal(layer.unpack().weight.detach(), src.quantized_weight())
    assert layer.weight.device.type == "cpu"


@pytest.mark.parametrize("cls", ["linear", "conv"])
def test_weight_bits_set_later_changes_the_quantiser(cls):
    """`layer.weight_bits = 1.5` on a latent layer makes it ternary (before: repr said 1.5 while
    the forward stayed binary, `bits` unchanged), also inside frozen_weights; a packed layer
    refuses another kind (its words are of one kind)."""
    if cls == "linear":
        make, x = (lambda wb: BinaryLinear(12, 5, weight_bits=wb)), torch.randn(3, 12)
    else:
        make, x = (lambda wb: BinaryConv2d(2, 3, 3, weight_bits=wb)), torch.randn(2, 2, 5, 5)
    layer, ternary = _spread(make(1)).eval(), make(1.5).eval()
    ternary.load_state_dict(layer.state_dict())
    with torch.no_grad(), frozen_weights(layer):
        assert not torch.equal(layer(x), ternary(x))
        layer.weight_bits = 1.5
        assert layer.bits == 2 and "weight_bits=1.5" in repr(layer)
        assert torch.equal(layer(x), ternary(x))
    layer.pack()
    with pytest.raises(ValueError, match=r"packed with weight_bits=1.5.*unpack\(\) first"):
        layer.weight_bits = 1
    layer.weight_bits = 1.5  # the same kind: nothing changes
    assert layer.packed_weight().bits == 2
    layer.unpack().weight_bits = 1
    assert layer.bits == 1 and layer.pack().packed_words.shape[0] == 1


def test_binary_layer_pickled_with_plain_weight_bits_still_loads():
    """A pickle made when weight_bits and bits were plain attributes still loads."""
    layer = BinaryLinear(12, 5, weight_bits=1.5)
    state = layer.__getstate__()
    state["weight_bits"], state["bits"] = state.pop("_weight_bits"), state.pop("_bits")
    old = BinaryLinear.__new__(BinaryLinear)
    old.__setstate__(state)
    assert old.weight_bits == 1.5 and old.bits == 2
    x = torch.randn(3, 12)
    assert torch.equal(old(x), layer(x))


def _autocast_cases():
    torch.manual_seed(4)
    w = (torch.randn(5, 12) * 0.7).requires_grad_()
    b = torch.randn(5).requires_grad_()
    packed = pack_weight(w.detach(), 1, impl="reference")
    lin, conv = BinaryLinear(12, 5), BinaryConv2d(3, 4, 3, padding=1)
    packed_lin = BinaryLinear(12, 5).pack().eval()

    def bias(x):  # the ops take a bias of x's dtype (autocast casts both)
        return b if x.dtype == torch.float32 else b.to(x.dtype)

    return {
        "binary_linear": (lambda x, i: binary_linear(x, w, bias(x), impl=i), (3, 12), [w, b]),
        "binary_matmul": (lambda x, i: binary_matmul(x, packed, bias(x), impl=i), (3, 12), [b]),
        "BinaryLinear": (lambda x, i: _with_impl(lin, i)(x), (2, 3, 12), [*lin.parameters()]),
        "BinaryLinear packed": (lambda x, i: _with_impl(packed_lin, i)(x), (3, 12), []),
        "BinaryConv2d": (lambda x, i: _with_impl(conv, i)(x), (2, 3, 5, 5), [*conv.parameters()]),
    }


def _with_impl(module, impl):
    module.impl = impl
    return module


@pytest.mark.parametrize("name", list(_autocast_cases()))
def test_packed_paths_follow_autocast(name):
    """Under autocast the packed Triton path takes x (and the bias) in the autocast dtype, as
    F.linear does on the reference and dense paths: the output has the reference's dtype and
    equals the Triton call on inputs cast by hand, and gradients keep the parameters' dtypes.
    (It ran in fp32 and returned fp32 where the reference returned bf16.)"""
    f, shape, params = _autocast_cases()[name]
    x = torch.randn(*shape).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = f(x, "reference")
        got = f(x, "triton")
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want)  # bf16 tolerances (α applied in fp32 by the kernels)
    grads = torch.autograd.grad(got.float().sum(), [x, *params])
    assert [g.dtype for g in grads] == [p.dtype for p in [x, *params]]
    x16 = x.detach().bfloat16().requires_grad_()
    by_hand = f(x16, "triton")
    torch.testing.assert_close(got, by_hand, rtol=0, atol=0)
    (gx16,) = torch.autograd.grad(by_hand.float().sum(), [x16])
    torch.testing.assert_close(grads[0], gx16.float(), rtol=0, atol=0)
