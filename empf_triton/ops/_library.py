"""One-call registration of an op with `torch.library` (namespace `empf`).

Every fused op of the library is a `torch.library` custom op, so `torch.compile(fullgraph=True)`
sees it as one opaque node (no graph break), fake tensors know its output shapes, autograd uses its
registered backward, and CUDA graphs can capture it. `register_op` removes the boilerplate:

    from ._library import register_op

    def _scale_impl(x: torch.Tensor, factor: float) -> torch.Tensor:
        return load_kernels("foo").scale(x, factor)      # kernels imported lazily, at call time

    def _scale_fake(x, factor):
        return torch.empty_like(x)

    def _scale_setup(ctx, inputs, output):
        ctx.factor = inputs[1]

    def _scale_backward(ctx, g):
        return scale_op(g, ctx.factor), None             # one entry per input

    scale_op = register_op(
        "scale", _scale_impl, fake=_scale_fake,
        backward=_scale_backward, setup_context=_scale_setup,
    )
    y = scale_op(x, 2.0)                                 # == torch.ops.empf.scale(x, 2.0)

Conventions the helper relies on:

- `impl` has full type hints (`torch.Tensor`, `torch.Tensor | None`, `int`, `int | None`, `float`,
  `bool`, `str`, `list[int]`; returns `torch.Tensor` or `tuple[torch.Tensor, ...]`), from which
  torch infers the schema; or pass `schema=` explicitly. Outputs must be fresh tensors (never an
  input, a view of one, or None: return an empty tensor for an output that is not needed).
- `impl` is the Triton path. It runs on whatever device its tensors are on: CUDA, or the CPU under
  Triton's interpreter (`TRITON_INTERPRET=1`, as in the tests). It must import the kernels lazily
  (`ops._common.load_kernels`), so registering an op at `import empf_triton` time never imports
  triton. Choosing between Triton and the eager reference stays in the public function (`impl=`);
  the reference path is plain torch, which `torch.compile` traces and inductor compiles.
- `device_impls={"cpu": fn}` optionally registers another implementation for one device type
  (`torch.library.register_kernel`); without it every device runs `impl`.
- `fake` returns tensors of the right shape, dtype and device without computing anything.
- `backward(ctx, *grads)` returns one gradient (or None) per input of `impl`, and must itself be
  made of differentiable-free custom ops or plain torch so that `torch.compile` can trace it.
  `setup_context(ctx, inputs, output)` saves what backward needs (`ctx.save_for_backward`,
  attributes). Output gradients arrive as zeros for unused outputs unless `setup_context` calls
  `ctx.set_materialize_grads(False)`, in which case they may be None.

Why `custom_op` and not `triton_op`: `torch.library.triton_op` hands the kernels to inductor,
which compiles and launches them itself. Tracing works with our launchers (their `bind=True`
mode gives the grid and arguments; traced on fake CUDA tensors, `empf_fwd_kernel` became one
`triton_kernel_wrapper_functional` node and the HOP found the right written outputs). But in
torch 2.13 inductor changes what the kernels compute (seen in the wrapper it generated for that
kernel, 2026-12-06; in torch's source: `_inductor/runtime/triton_heuristics.py`
`_create_compile_options` and `_inductor/codegen/triton_utils.py` `signature_of`):

- It compiles user kernels without the library's `enable_fp_fusion=False`, so Triton's default
  applies: contraction on in Triton 3.9 (its warning says 3.10 turns it off). `λ·v + I` then
  becomes one FMA, and spikes are no longer bit-equal to the eager path and the reference, which
  round twice.
- It types Python float arguments (decay, threshold, spike step) as fp64
  (`inductor.config._use_fp64_for_unbacked_floats`). The membrane update would then run in fp64.
- Under Triton's interpreter, `wrap_triton` returns the raw kernel. The traced path therefore
  cannot run, or be tested, without a GPU.

Switching becomes reasonable once contraction is off by default, the kernels cast their float
scalars to fp32, and a GPU run shows compiled and eager results equal.

An opaque `custom_op` keeps the exact kernels, compiled with the library's options. It runs on
both devices, and it still gives fullgraph compilation and CUDA-graph capture.

Every op registered here should pass `torch.library.opcheck` (see tests/test_library_ops.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

#: The `torch.ops` namespace of every op of the library.
NAMESPACE = "empf"


def register_op(
    name: str,
    impl: Callable,
    *,
    fake: Callable,
    backward: Callable | None = None,
    setup_context: Callable | None = None,
    mutates_args: Sequence[str] = (),
    schema: str | None = None,
    device_impls: dict[str, Callable] | None = None,
):
    """Define `torch.ops.empf.<name>` with its fake (meta) function and, optionally, its autograd.

    Args:
        name: the op's name inside the `empf` namespace (no `::`), e.g. "neuron_fwd".
        impl: the implementation (the Triton path; see the module docstring), type-hinted unless
            `schema` is given.
        fake: shape/dtype/device-only twin of `impl`, used under `torch.compile` and fake tensors.
        backward: `backward(ctx, *grads) -> tuple` with one entry per input of `impl`; None makes
            the op non-differentiable (autograd then raises if a gradient is required through it).
        setup_context: `setup_context(ctx, inputs, output)`; required when `backward` needs saved
            values.
        mutates_args: names of the arguments `impl` writes in place (usually none).
        schema: an explicit schema string such as "(Tensor x, float f) -> Tensor"; None infers
            it from `impl`'s type hints.
        device_impls: extra implementations keyed by device type ("cpu", "cuda").

    Returns:
        The `torch.library.CustomOpDef`; calling it is calling `torch.ops.empf.<name>`.

    Raises:
        ValueError: `name` contains "::", or `setup_context` is given without `backward`.
    """
    if not isinstance(name, str) or not name or "::" in name:
        raise ValueError(f"name must be a bare op name without a namespace, got {name!r}")
    if setup_context is not None and backward is None:
        raise ValueError(f"register_op({name!r}): setup_context given without backward")
    op = torch.library.custom_op(
        f"{NAMESPACE}::{name}", impl, mutates_args=tuple(mutates_args), schema=schema
    )
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    for device_type, fn in (device_impls or {}).items():
        op.register_kernel(device_type, fn)
    return op
