"""Comparison helpers shared by the op tests."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

_EPS = {
    torch.float32: torch.finfo(torch.float32).eps,
    torch.float16: torch.finfo(torch.float16).eps,
    torch.bfloat16: torch.finfo(torch.bfloat16).eps,
    torch.float64: torch.finfo(torch.float64).eps,
}


def assert_close_to_oracle(
    name: str,
    out: torch.Tensor | None,
    ref: torch.Tensor | None,
    oracle: torch.Tensor | None,
    *,
    factor: float = 2.0,
    allowance: float = 4.0,
    data_dtype: torch.dtype | None = None,
) -> None:
    """The kernel's error against the fp64 oracle is at most `factor` x the same-dtype reference's
    error plus `allowance` roundings at the oracle's scale. Roundings are of `data_dtype` when
    given (an fp32 parameter gradient computed from bf16 data), else of the output's dtype."""
    if oracle is None:
        assert out is None or not torch.any(out != 0), f"{name}: expected no gradient"
        return
    assert out is not None, f"{name}: missing output"
    assert out.shape == oracle.shape, f"{name}: shape {tuple(out.shape)} != {tuple(oracle.shape)}"
    assert ref is not None and ref.dtype == out.dtype, f"{name}: reference dtype mismatch"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    o64 = oracle.double().cpu()
    err_out = (out.double().cpu() - o64).abs().max().item() if out.numel() else 0.0
    err_ref = (ref.double().cpu() - o64).abs().max().item() if ref.numel() else 0.0
    scale = o64.abs().max().item() if o64.numel() else 0.0
    eps = _EPS[data_dtype or out.dtype]
    tol = factor * err_ref + allowance * eps * max(scale, 1.0)
    assert err_out <= tol, (
        f"{name} ({out.dtype}): max error {err_out:.3g} vs oracle exceeds {tol:.3g} "
        f"(same-dtype reference error {err_ref:.3g}, scale {scale:.3g})"
    )


def import_spikingjelly():
    """SpikingJelly's activation_based package, for the LIF equivalence tests.

    Skipped where it is not installed, except under CI (`CI` set), where .ci/run installs it and a
    missing module must fail instead of silently skipping the equivalence checks.
    """
    import os

    import pytest

    if os.environ.get("CI"):
        import spikingjelly.activation_based.neuron  # noqa: F401
        import spikingjelly.activation_based.surrogate  # noqa: F401
    else:
        pytest.importorskip("spikingjelly.activation_based.neuron", exc_type=ImportError)
    import spikingjelly.activation_based as sj

    return sj
