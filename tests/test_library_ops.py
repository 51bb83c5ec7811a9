"""torch.library registration: the shared helper, opcheck of every neuron/LIF op, and
`torch.compile(fullgraph=True)` of the neuron modules (no graph break, no recompile per step)."""

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
