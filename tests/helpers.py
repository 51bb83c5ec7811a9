"""Comparison helpers shared by the op tests."""

from __future__ import annotations

import math

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

#: Where kernel tests build tensors, for code that runs at collection time (parametrize lambdas):
#: CUDA when present (the interpreter is off there), else the CPU. Same rule as the `device`
#: fixture of tests/conftest.py.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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


# ------------------------------------------------------------------------- half-precision checks

HALF_DTYPES = (torch.float16, torch.bfloat16)
_MANTISSA = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23, torch.float64: 52}


def ulp(x: torch.Tensor | float, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s numbers at |x| (fp64): 2^(e - mantissa bits), e = the exponent of
    |x|, never below the smallest normal's (subnormals are evenly spaced)."""
    x = torch.as_tensor(x, dtype=torch.float64).abs()
    e_min = math.log2(torch.finfo(dtype).tiny)
    e = torch.floor(torch.log2(x.clamp_min(torch.finfo(dtype).tiny))).clamp_min(e_min)
    return torch.pow(2.0, e - _MANTISSA[dtype])


def near_boundary(
    distance: torch.Tensor, scale: torch.Tensor | float, dtype: torch.dtype, ulps: float = 2.0
) -> torch.Tensor:
    """Where a decision (spike or not, which quantisation level) may legitimately flip between two
    correct runs: the oracle's distance to the decision boundary is within `ulps` ulps of `dtype`
    at `scale` (the membrane's magnitude, per element or one number). Returns a bool mask shaped
    like `distance`."""
    return distance.double().abs() <= ulps * ulp(scale, dtype).to(distance.device)


def carry_forward(mask: torch.Tensor) -> torch.Tensor:
    """A [T, *] mask made sticky along time: once a neuron's decision could flip, its later
    steps (and its final membrane) may differ too, since the membrane carries the flip. Needed
    for the LIF neuron (a flip moves v by θ); not for EM-PF, whose reset uses the unquantised
    surplus (a flip at θ moves v by less than the window, a level flip not at all)."""
    return torch.cummax(mask.to(torch.int8), dim=0).values.bool()


def assert_half_matches_fp32_oracle(
    name: str,
    out: torch.Tensor,
    oracle32: torch.Tensor,
    may_flip: torch.Tensor | None,
    *,
    max_flips: int | None = None,
) -> int:
    """A half-precision run's output against an fp32-compute oracle.

    The oracle is the reference run in fp32 on the half inputs upcast (exact), then rounded to
    the half dtype. Everything must match within one rounding of the half dtype (1 ulp at the
    oracle's magnitude: the kernel computes in fp32 too, so only fp32 roundings differ before the
    final store). Elements outside that are "flips" (a spike decision or quantisation level that
    went the other way); they are allowed only where `may_flip` (see `near_boundary`) is True, and
    at most `max_flips` of them (default: 1 in 1000 elements, at least 1). Returns the number of
    flips. Unlike a comparison with the same-dtype reference, whose rounding of m at every step
    makes whole-spike differences look like rounding, this fails on a single wrong spike.
    """
    dtype = out.dtype
    assert dtype in HALF_DTYPES, f"{name}: expected a half-precision output, got {dtype}"
    assert out.shape == oracle32.shape, f"{name}: {tuple(out.shape)} != {tuple(oracle32.shape)}"
    assert oracle32.dtype == torch.float32, f"{name}: the oracle must be computed in fp32"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    target = oracle32.to(dtype).double().cpu()
    got = out.double().cpu()
    bad = (got - target).abs() > ulp(target, dtype)
    flips = int(bad.sum())
    if flips == 0:
        return 0
    allowed = torch.zeros_like(bad) if may_flip is None else may_flip.cpu().expand_as(bad).bool()
    outside = bad & ~allowed
    if outside.any():
        idx = tuple(i.item() for i in outside.nonzero()[0])
        raise AssertionError(
            f"{name} ({dtype}): {int(outside.sum())} element(s) differ from the fp32 oracle by "
            f"more than one {dtype} rounding away from any decision boundary; first at {idx}: "
            f"got {got[idx].item()!r}, oracle {target[idx].item()!r}"
        )
    limit = max_flips if max_flips is not None else max(1, out.numel() // 1000)
    assert flips <= limit, f"{name} ({dtype}): {flips} flips near the threshold (at most {limit})"
    return flips


def empf_decision_distance(
    current: torch.Tensor,
    v0: torch.Tensor | None,
    decay: torch.Tensor,
    threshold: torch.Tensor,
    spike_bits: int | None = None,
    spike_step: float = 0.25,
) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, N] distance, [T, N] m): the distance (fp32 compute) of the EM-PF membrane m[t] to the
    nearest decision boundary (the threshold θ_t, and for k-bit spikes also the rounding points
    θ_t + (j + 1/2)·Δ), and m itself (the scale for `near_boundary`)."""
    cur = current.float()
    T = cur.shape[0]
    lam = torch.as_tensor(decay, dtype=torch.float32, device=cur.device).expand(T)
    th = torch.as_tensor(threshold, dtype=torch.float32, device=cur.device).expand(T)
    v = torch.zeros_like(cur[0]) if v0 is None else v0.float()
    out, ms = [], []
    for t in range(T):
        m = lam[t] * v + cur[t]
        d = (m - th[t]).abs()
        if spike_bits is not None:
            for j in range(2**spike_bits - 1):
                d = torch.minimum(d, (m - th[t] - (j + 0.5) * spike_step).abs())
        out.append(d)
        ms.append(m)
        v = torch.minimum(m, th[t])
    return torch.stack(out), torch.stack(ms)


def lif_decision_distance(
    current: torch.Tensor, v0: torch.Tensor | None, decay: torch.Tensor, threshold: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """([T, N] |m[t] - θ_t|, [T, N] m) of the LIF neuron (soft reset v = m - s·θ), in fp32."""
    cur = current.float()
    T = cur.shape[0]
    lam = torch.as_tensor(decay, dtype=torch.float32, device=cur.device).expand(T)
    th = torch.as_tensor(threshold, dtype=torch.float32, device=cur.device).expand(T)
    v = torch.zeros_like(cur[0]) if v0 is None else v0.float()
    out, ms = [], []
    for t in range(T):
        m = lam[t] * v + cur[t]
        out.append((m - th[t]).abs())
        ms.append(m)
        v = m - (m >= th[t]).float() * th[t]
    return torch.stack(out), torch.stack(ms)


# ------------------------------------------------------------------------------- GEMM rounding


def gemm_error_bound(
    a: torch.Tensor,
    b: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    product_u: float = 0.0,
    acc_u: float = 2.0**-24,
    extra_terms: int = 2,
    out_roundings: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output rounding bound for C = a @ b computed with `acc_u` accumulation (fp32: 2^-24)
    in any order, returned with the exact fp64 product: (exact, bound).

    Sum of K products, each with relative error <= product_u (0 where the products are exact:
    ±1 weights times fp16/bf16 values; 2^-21 for the two-pass tf32 split of fp32 operands; 2^-11
    for one tf32 pass), accumulated in any order: |fl(C) - C| <= (product_u + γ·(1 + product_u))
    · Σ|a||b| with γ = n·u/(1 - n·u), n = K + `extra_terms` (bias add, scale multiply). Each of
    `out_roundings` roundings to `out_dtype` adds u_out·(|C| + that error), u_out = eps/2.
    """
    a64, b64 = a.detach().double(), b.detach().double()
    exact = a64 @ b64
    s = a64.abs() @ b64.abs()
    n = a.shape[-1] + extra_terms
    gamma = n * acc_u / (1 - n * acc_u)
    acc_err = (product_u + gamma * (1 + product_u)) * s
    u_out = 0.0 if out_dtype == torch.float64 else torch.finfo(out_dtype).eps / 2
    bound = acc_err
    for _ in range(out_roundings):
        bound = bound + u_out * (exact.abs() + bound)
    return exact, bound


def assert_within_gemm_bound(
    name: str, out: torch.Tensor, exact: torch.Tensor, bound: torch.Tensor
) -> None:
    """Every output within its own rounding bound (see `gemm_error_bound`), not a max-norm."""
    assert out.shape == exact.shape, f"{name}: shape {tuple(out.shape)} != {tuple(exact.shape)}"
    assert not torch.isnan(out).any(), f"{name}: NaN in output"
    err = (out.double() - exact.to(out.device)).abs()
    excess = err - bound.to(out.device)
    worst = excess.argmax()
    assert excess.max().item() <= 0, (
        f"{name} ({out.dtype}): error {err.flatten()[worst].item():.3g} exceeds its rounding bound "
        f"{bound.flatten()[worst].item():.3g} at flat index {worst.item()}"
    )


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Trained-looking state: BN / Mem-BN statistics and affine, neuron logits, all non-trivial."""
    from empf_triton.nn import EMPFNeuron, MemBN

    g = torch.Generator().manual_seed(seed)

    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                u(m.running_mean, -0.3, 0.3)
                u(m.running_var, 0.5, 2.0)
                u(m.weight, 0.5, 1.5)
                u(m.bias, -0.2, 0.5)
            elif isinstance(m, MemBN):
                u(m.running_mean, -0.3, 0.3)
                u(m.running_var, 0.5, 2.0)
                u(m.weight, 0.5, 1.5)
                u(m.bias, -0.2, 0.2)
                u(m.p, -1, 1)
                u(m.q, -1, 1)
            elif isinstance(m, EMPFNeuron):
                u(m.threshold_logit, -1, 1)
                if m.decay_logit is not None:
                    u(m.decay_logit, -1, 1)
    return model.eval()


def stat_rtol(n: int, dtype: torch.dtype) -> float:
    """How far two quantisations of the same n weights may differ in magnitude: α (or Δ) is a
    mean of n terms summed in fp32 in different orders (the kernels' fixed chunked sums against
    torch's), each within about (depth + sequential steps) roundings of the exact value, then
    rounded once more to the output dtype."""
    rtol = 2 * (n.bit_length() + n // 2048 + 2) * 2.0**-24
    if dtype in (torch.float16, torch.bfloat16):
        rtol += torch.finfo(dtype).eps
    return rtol


def assert_same_quantization(out: torch.Tensor, ref: torch.Tensor, n: int) -> None:
    """The same pattern (NaN, sign and zeros exactly) and magnitudes within `stat_rtol(n)`."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(torch.sign(out[~nan]), torch.sign(ref[~nan]))
    torch.testing.assert_close(
        out[~nan].double().abs(), ref[~nan].double().abs(), rtol=stat_rtol(n, out.dtype), atol=0
    )


def fresh_launch_caches(monkeypatch) -> None:
    """Empty launch caches for the rest of a test: every ops module's plan caches and the direct
    launcher's compiled-kernel cache (kernels/_launch.py). A test that changes what a launch
    should be (a module constant such as SUB, a patched dot mode, an autotuner's configs) needs
    this: a plan or a cached launcher made by an earlier test, keyed without that change, would
    otherwise run the old launch and the test would check nothing."""
    import importlib

    from empf_triton.ops._common import PlanCache

    for name in ("binary", "binary_conv", "lif", "neuron", "spikes"):
        mod = importlib.import_module(f"empf_triton.ops.{name}")
        for attr, value in list(vars(mod).items()):
            if isinstance(value, PlanCache):
                monkeypatch.setattr(mod, attr, PlanCache(value.limit))
    launch = importlib.import_module("empf_triton.kernels._launch")
    monkeypatch.setattr(launch, "_LAUNCHERS", {})
