"""Property-based tests (hypothesis): the Triton path (the interpreter on a CPU) and the reference
agree on outputs and gradients of the public ops over drawn shapes, strides (transposed,
expanded, sliced views), dtypes, T, spike formats and parameter values; invalid draws raise
ValueError or TypeError naming the argument.

How agreement is judged (as in the per-op tests): both paths are compared with an fp64 oracle run
on exactly the values the low-precision paths see; the Triton error may be at most twice the
same-dtype reference's error plus a few roundings (`assert_close_to_oracle`). fp32 spikes must
match the reference exactly. The neurons' spike and reset are discontinuous in m - θ (and the
k-bit quantiser in s / Δ), so the drawn currents are nudged until every such point lies a
dtype-dependent margin away from its threshold in the fp64 oracle: a rounding difference then
cannot flip a spike, and a disagreement found here is a real one.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_to_oracle

hyp = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from empf_triton.ops import (  # noqa: E402
    binary_matmul,
    decode_spikes,
    empf_neuron,
    empf_neuron_step,
    encode_spikes,
    lif_neuron,
    pack_weight,
    parallel_neuron,
    quantize_spikes,
    unpack_weight,
)
from empf_triton.ops._common import triton_available  # noqa: E402

pytestmark = pytest.mark.skipif(not triton_available(), reason="needs triton (or its interpreter)")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
#: distance kept between m and θ (and s / Δ and the rounding midpoints), by dtype
MARGIN = {torch.float32: 2e-3, torch.float16: 3e-2, torch.float64: 2e-3, torch.bfloat16: 8e-2}
LAYOUTS = ["contiguous", "transposed", "sliced", "expanded"]

SETTINGS = dict(
    max_examples=15,
    deadline=None,
    derandomize=True,  # the same draws on every run: a failure is reproducible, never flaky
    database=None,  # nothing written into the checkout
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# ---- drawing inputs ----------------------------------------------------------------------------


def _leaf_view(base: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, leaf): a leaf tensor requiring grad and a view of it showing `base`'s values with
    the drawn memory layout. "transposed": the last two dims swapped in memory; "sliced": every
    second element of a wider tensor; "expanded": a size-1 dim broadcast over dim -2 (`base`
    must repeat over that dim). Tensors of fewer than 2 dims are always contiguous."""
    shape = tuple(base.shape)
    base = base.detach()
    if layout == "contiguous" or len(shape) < 2:
        leaf = base.clone().requires_grad_()
        return leaf, leaf
    if layout == "transposed":
        leaf = base.transpose(-1, -2).contiguous().requires_grad_()
        view = leaf.transpose(-1, -2)
    elif layout == "sliced":
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], dtype=base.dtype)
        wide[..., ::2] = base
        leaf = wide.requires_grad_()
        view = leaf[..., ::2]
    else:
        assert torch.equal(base, base[..., :1, :].expand(shape)), "expanded base must repeat"
        leaf = base[..., :1, :].clone().requires_grad_()
        view = leaf.expand(*shape)
    assert not view.is_contiguous() or 1 in shape
    return view, leaf


@st.composite
def neuron_case(draw, *, lif: bool = False, parallel: bool = False, step: bool = False):
    T = 1 if step else draw(st.integers(1, 5))
    feat = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(LAYOUTS))
    bits = None if lif else draw(st.sampled_from([None, 1, 2, 4, 8]))
    spike_step = draw(st.sampled_from([0.125, 0.25, 0.5]))
    per_step = draw(st.booleans())
    decay = draw(st.lists(st.floats(0.2, 1.0), min_size=T, max_size=T))
    theta = draw(st.lists(st.floats(0.1, 1.5), min_size=T, max_size=T))
    seed = draw(st.integers(0, 2**16))
    return dict(
        T=T, feat=feat, dtype=dtype, layout=layout, bits=bits, spike_step=spike_step,
        per_step=per_step, decay=decay if per_step else decay[:1] * T,
        theta=theta if per_step else theta[:1] * T, seed=seed,
        grad_mode=draw(st.sampled_from(["online", "bptt"])) if not (parallel or step) else "bptt",
        use_v0=draw(st.booleans()) and not parallel,
    )  # fmt: skip


def _safe_current(c, lif: bool, parallel: bool, stateless_expand: bool):
    """Currents [T, *feat] (fp64, exactly representable in c["dtype"]) whose m - θ (and, with
    k-bit spikes, s / Δ - 1/2) keep a margin from every discontinuity in the fp64 oracle."""
    gen = torch.Generator().manual_seed(c["seed"])
    T, feat, dtype = c["T"], c["feat"], c["dtype"]
    shape = (T, *feat)
    # expanded layouts repeat the second-to-last dim: draw once and repeat, as the view will
    rows = (T, *feat[:-2], 1, feat[-1]) if stateless_expand else shape
    cur = (torch.randn(rows, generator=gen, dtype=torch.float64) * 0.8 + 0.4).to(dtype).double()
    v0 = (torch.rand(rows[1:], generator=gen, dtype=torch.float64) * 0.5).to(dtype).double()
    if stateless_expand:
        cur, v0 = cur.expand(shape).clone(), v0.expand(shape[1:]).clone()
    margin = MARGIN[dtype]
    delta = 2.5 * margin if c["bits"] is None else min(2.5 * margin, c["spike_step"] / 5)
    v = v0 if c["use_v0"] else torch.zeros(feat, dtype=torch.float64)
    for t in range(T):
        for _ in range(40):
            lam = 0.0 if parallel else c["decay"][t]
            m = lam * v + cur[t]
            d = m - c["theta"][t]
            bad = d.abs() < margin
            if c["bits"] is not None:
                q = d / c["spike_step"]
                bad |= (d > 0) & ((q - q.floor() - 0.5).abs() * c["spike_step"] < margin)
            if not bad.any():
                break
            cur[t] = torch.where(bad, (cur[t] + delta).to(dtype).double(), cur[t])
        assume(not bad.any())
        if lif:
            v = m - (d >= 0).double() * c["theta"][t]
        else:
            v = torch.minimum(m, torch.tensor(c["theta"][t], dtype=torch.float64))
    g = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    gv = torch.randn(feat, generator=gen, dtype=torch.float64).to(dtype).double()
    return cur, v0, g, gv


def _params(c, pdtype, requires_grad=True):
    if c["per_step"]:
        d = torch.tensor(c["decay"], dtype=pdtype)
        t = torch.tensor(c["theta"], dtype=pdtype)
    else:
        d = torch.tensor(c["decay"][0], dtype=pdtype)
        t = torch.tensor(c["theta"][0], dtype=pdtype)
    return d.requires_grad_(requires_grad), t.requires_grad_(requires_grad)


def _compare(kern: dict, ref: dict, oracle: dict, dtype: torch.dtype) -> None:
    for name in kern:
        if kern[name] is None or oracle[name] is None:
            assert kern[name] is None or not torch.any(kern[name] != 0), name
            continue
        assert_close_to_oracle(name, kern[name], ref[name], oracle[name], data_dtype=dtype)
    if dtype == torch.float32:
        assert torch.equal(kern["spikes"], ref["spikes"])


def _run_neuron(op, c, impl, dtype, cur, v0, g, gv, **kw):
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x, leaf = _leaf_view(cur.to(dtype), c["layout"])
    v = v0.to(dtype).clone().requires_grad_() if c["use_v0"] else None
    d, t = _params(c, pdtype)
    if op is parallel_neuron:
        spikes = op(x, threshold=t, impl=impl, **kw)
        v_last = None
        loss = (spikes * g.to(dtype)).sum()
    else:
        spikes, v_last = op(x, v, decay=d, threshold=t, impl=impl, **kw)
        loss = (spikes * g.to(dtype)).sum() + (v_last * gv.to(dtype)).sum()
    loss.backward()
    return {
        "spikes": spikes.detach(),
        "v_last": v_last.detach() if v_last is not None else None,
        "d_current": leaf.grad,
        "d_v0": v.grad if v is not None else None,
        "d_decay": d.grad if op is not parallel_neuron else None,
        "d_threshold": t.grad,
    }


def _neuron_property(op, c, **kw):
    if c["layout"] == "expanded" and len(c["feat"]) < 2:
        c = dict(c, layout="contiguous")  # dim -2 would be T: nothing to broadcast
    lif = op is lif_neuron
    parallel = op is parallel_neuron
    cur, v0, g, gv = _safe_current(
        c, lif, parallel, stateless_expand=c["layout"] == "expanded" and len(c["feat"]) >= 2
    )
    dtype = c["dtype"]
    kern = _run_neuron(op, c, "triton", dtype, cur, v0, g, gv, **kw)
    ref = _run_neuron(op, c, "reference", dtype, cur, v0, g, gv, **kw)
    oracle = _run_neuron(op, c, "reference", torch.float64, cur, v0, g, gv, **kw)
    _compare(kern, ref, oracle, dtype)
    assert kern["spikes"].shape == (c["T"], *c["feat"])
    assert kern["spikes"].dtype == dtype


# ---- the neurons -------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(c=neuron_case())
def test_empf_neuron_triton_matches_reference(c):
    _neuron_property(
        empf_neuron, c, spike_bits=c["bits"], spike_step=c["spike_step"], grad_mode=c["grad_mode"]
    )


@settings(**SETTINGS)
@given(c=neuron_case(parallel=True))
def test_parallel_neuron_triton_matches_reference(c):
    _neuron_property(parallel_neuron, c, spike_bits=c["bits"], spike_step=c["spike_step"])


@settings(**SETTINGS)
@given(
    c=neuron_case(lif=True),
    surrogate=st.sampled_from(["sigmoid", "atan", "triangle"]),
    alpha=st.one_of(st.none(), st.floats(0.5, 6.0)),
    detach_reset=st.booleans(),
)
def test_lif_neuron_triton_matches_reference(c, surrogate, alpha, detach_reset):
    _neuron_property(
        lif_neuron,
        c,
        surrogate=surrogate,
        alpha=alpha,
        detach_reset=detach_reset,
        grad_mode=c["grad_mode"],
    )


@settings(**SETTINGS)
@given(c=neuron_case(step=True))
def test_empf_neuron_step_matches_reference_and_multistep(c):
    c = dict(c, use_v0=True)
    cur, v0, g, gv = _safe_current(c, False, False, stateless_expand=False)
    dtype = c["dtype"]

    def run(impl, dt):
        pdtype = torch.float64 if dt == torch.float64 else torch.float32
        x = cur[0].to(dt).clone().requires_grad_()
        v = v0.to(dt).clone().requires_grad_()
        # One step takes 0-d parameters (a 1-D tensor would mean per-channel [C]).
        d, t = (
            p[0].detach().clone().requires_grad_() if torch.is_tensor(p) and p.dim() == 1 else p
            for p in _params(c, pdtype)
        )
        s, vn = empf_neuron_step(
            x, v, decay=d, threshold=t, spike_bits=c["bits"], spike_step=c["spike_step"],
            impl=impl,
        )  # fmt: skip
        ((s * g[0].to(dt)).sum() + (vn * gv.to(dt)).sum()).backward()
        return {"spikes": s.detach(), "v_last": vn.detach(), "d_current": x.grad,
                "d_v0": v.grad, "d_decay": d.grad, "d_threshold": t.grad}  # fmt: skip

    kern = run("triton", dtype)
    _compare(kern, run("reference", dtype), run("reference", torch.float64), dtype)
    multi, _ = empf_neuron(
        cur[:1].to(dtype), v0.to(dtype), decay=c["decay"][0], threshold=c["theta"][0],
        spike_bits=c["bits"], spike_step=c["spike_step"], grad_mode="bptt", impl="triton",
    )  # fmt: skip
    assert torch.equal(multi[0], kern["spikes"])


# ---- spikes ------------------------------------------------------------------------------------


@st.composite
def spike_case(draw, pack: bool = False):
    shape = tuple(draw(st.lists(st.integers(1, 11), min_size=1, max_size=3)))
    bits = draw(st.sampled_from([1, 2, 4, 8] if pack else list(range(1, 9))))
    step = draw(st.sampled_from([0.125, 0.25, 0.5, 1.0]))  # powers of two: Q is exact
    dtype = draw(st.sampled_from(DTYPES))
    layout = draw(st.sampled_from(["contiguous", "transposed", "sliced"]))
    seed = draw(st.integers(0, 2**16))
    return shape, bits, step, dtype, layout, seed


def _spikes(shape, bits, step, dtype, seed):
    """Spikes from -1 to past the top level, in dtype, never within a margin of a rounding
    midpoint (so round-half-to-even ties are not what is tested here)."""
    gen = torch.Generator().manual_seed(seed)
    top = (2**bits - 1) * step
    s = (torch.rand(shape, generator=gen, dtype=torch.float64) * (top + 2) - 1).to(dtype)
    q = s.double() / step
    near = (q - q.floor() - 0.5).abs() < 0.05
    return torch.where(near, (s.double() + 0.2 * step).to(dtype), s)


@settings(**SETTINGS)
@given(case=spike_case())
def test_quantize_spikes_triton_matches_reference(case):
    shape, bits, step, dtype, layout, seed = case
    base = _spikes(shape, bits, step, dtype, seed)
    out, grads = {}, {}
    for impl in ("triton", "reference"):
        x, leaf = _leaf_view(base, layout)
        q = quantize_spikes(x, bits, step, impl=impl)
        g = torch.arange(q.numel(), dtype=torch.float64).reshape(q.shape).to(dtype)
        (q * g).sum().backward()
        out[impl], grads[impl] = q.detach(), leaf.grad
    assert out["triton"].dtype == dtype and out["triton"].shape == shape
    assert torch.equal(out["triton"], out["reference"])
    assert torch.equal(grads["triton"], grads["reference"])  # straight-through: g itself
    levels = out["triton"].double() / step
    assert torch.equal(levels, levels.round()) and levels.min() >= 0 and levels.max() <= 2**bits - 1


@settings(**SETTINGS)
@given(case=spike_case(pack=True))
def test_encode_decode_roundtrip_and_agree(case):
    shape, bits, step, dtype, layout, seed = case
    base = _spikes(shape, bits, step, dtype, seed)
    x = _leaf_view(base, layout)[0].detach()
    codes = {impl: encode_spikes(x, bits, step, impl=impl) for impl in ("triton", "reference")}
    assert codes["triton"].dtype == torch.uint8
    assert codes["triton"].numel() == math.ceil(math.prod(shape) * bits / 8)
    assert torch.equal(codes["triton"], codes["reference"])
    dec = {
        impl: decode_spikes(codes["reference"], bits, step, shape, dtype=dtype, impl=impl)
        for impl in ("triton", "reference")
    }
    assert torch.equal(dec["triton"], dec["reference"])
    assert torch.equal(dec["triton"], quantize_spikes(x, bits, step, impl="reference"))


# ---- binary GEMM -------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(
    lead=st.lists(st.integers(1, 6), min_size=1, max_size=2),
    K=st.integers(1, 70),
    N=st.integers(1, 9),
    wbits=st.sampled_from([1, 2]),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_binary_matmul_triton_matches_reference(lead, K, N, wbits, dtype, layout, bias, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=gen)
    packed = pack_weight(w, wbits, impl="reference")
    shape = (*lead, K)
    base = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if layout == "expanded" and len(shape) >= 2:
        base = base[..., :1, :].expand(shape).clone()
    b0 = torch.randn(N, generator=gen, dtype=torch.float64).to(dtype) if bias else None
    g = torch.randn(*lead, N, generator=gen, dtype=torch.float64).to(dtype)

    def run(impl, dt):
        x, leaf = _leaf_view(base.to(dt), layout)
        bb = b0.to(dt).clone().requires_grad_() if b0 is not None else None
        if impl == "oracle":
            wq = unpack_weight(packed, torch.float64, impl="reference").reshape(N, K)
            y = torch.nn.functional.linear(x, wq, bb)
        else:
            y = binary_matmul(x, packed, bb, impl=impl)
        (y * g.to(dt)).sum().backward()
        return {"out": y.detach(), "d_x": leaf.grad, "d_bias": bb.grad if bb is not None else None}

    kern, ref, oracle = run("triton", dtype), run("reference", dtype), run("oracle", torch.float64)
    for name in kern:
        if oracle[name] is None:
            continue
        # K products are summed: allow roundings in proportion to sqrt(K) at the output's scale
        assert_close_to_oracle(
            name, kern[name], ref[name], oracle[name], allowance=4.0 * math.sqrt(K)
        )
        assert kern[name].dtype == dtype


# ---- invalid draws -----------------------------------------------------------------------------

_CUR = torch.randn(3, 5)


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    which=st.sampled_from(
        ["spike_bits", "spike_step", "decay_len", "decay_range", "threshold_len", "v0_shape",
         "current_dtype", "current_dim", "grad_mode"]
    ),
    bad=st.integers(-3, 20),
    impl=st.sampled_from(["triton", "reference"]),
)  # fmt: skip
def test_invalid_neuron_arguments_are_named(which, bad, impl):
    kw = dict(decay=0.5, threshold=0.5, impl=impl)
    cur, v0 = _CUR, None
    if which == "spike_bits":
        assume(not 1 <= bad <= 8)
        kw["spike_bits"] = bad
    elif which == "spike_step":
        kw["spike_step"] = -abs(bad) * 0.1
    elif which == "decay_len":
        assume(bad not in (1, 3) and bad >= 0)
        kw["decay"] = torch.full((bad,), 0.5)
    elif which == "decay_range":
        kw["decay"] = 1.0 + abs(bad) + 0.5
    elif which == "threshold_len":
        assume(bad not in (1, 3) and bad >= 0)
        kw["threshold"] = torch.full((bad,), 0.5)
    elif which == "v0_shape":
        assume(bad != 5 and bad >= 0)
        v0 = torch.zeros(bad)
    elif which == "current_dtype":
        cur = _CUR.to(torch.int32 if bad % 2 else torch.int64)
    elif which == "current_dim":
        cur = torch.tensor(0.5)
    else:
        kw["grad_mode"] = f"mode{bad}"
    name = {
        "decay_len": "decay", "decay_range": "decay", "threshold_len": "threshold",
        "v0_shape": "v0", "current_dtype": "current", "current_dim": "current",
    }.get(which, which)  # fmt: skip
    for op in (empf_neuron, lif_neuron):
        if which in ("spike_bits", "spike_step") and op is lif_neuron:
            continue
        with pytest.raises((ValueError, TypeError), match=name):
            op(cur, v0, **kw)


@settings(max_examples=20, deadline=None, derandomize=True, database=None)
@given(
    bits=st.integers(-2, 12),
    step=st.sampled_from([0.25, 0.0, -1.0, math.inf, math.nan]),
    impl=st.sampled_from(["triton", "reference"]),
)
def test_invalid_spike_arguments_are_named(bits, step, impl):
    s = torch.rand(7)
    bits_ok = 1 <= bits <= 8
    step_ok = step == 0.25
    assume(not (bits_ok and step_ok))
    match = "bits" if not bits_ok else "step"
    with pytest.raises((ValueError, TypeError), match=match):
        quantize_spikes(s, bits, step, impl=impl)
    if bits not in (1, 2, 4, 8) or not step_ok:
        with pytest.raises(
            (ValueError, TypeError), match="bits" if bits not in (1, 2, 4, 8) else "step"
        ):
            encode_spikes(s, bits, step, impl=impl)


@settings(max_examples=15, deadline=None, derandomize=True, database=None)
@given(K=st.integers(1, 40), dK=st.integers(1, 5), impl=st.sampled_from(["triton", "reference"]))
def test_binary_matmul_bad_x_is_named(K, dK, impl):
    packed = pack_weight(torch.randn(3, K), 1, impl="reference")
    with pytest.raises(ValueError, match="x must have shape"):
        binary_matmul(torch.randn(2, K + dK), packed, impl=impl)
    with pytest.raises(TypeError, match="x"):
        binary_matmul(torch.ones(2, K, dtype=torch.int32), packed, impl=impl)
    with pytest.raises(ValueError, match="bias"):
        binary_matmul(torch.randn(2, K), packed, torch.zeros(4), impl=impl)
