"""Benchmarks of the neuron ops: eager reference vs torch.compile(reference) vs Triton.

Run: `pytest bench/test_bench_neuron.py --benchmark-json=results.json`, then
`python bench/report.py results.json --out DIR`. Knobs (N, T list, compile, time per case): see
bench/conftest.py. Triton cases run only on CUDA; torch.compile by default only on CUDA.

Cases (`extra_info`: impl, op, T, N, dtype, spike_bits, grad_mode, pass, bytes saved for backward,
CUDA peak memory, bytes moved and GB/s):
- `empf_neuron`: the fused multi-step op, T in EMPF_BENCH_T, online and bptt, fp32 float spikes;
  at T=4 also 4-bit spikes and bf16.
- `empf_neuron_step`: T calls of the single-step op, as online training makes them (v detached
  between steps; in fwd+bwd each step's backward runs right after its forward).
- `parallel_neuron`: the stateless member.
- `lif_neuron`: the LIF baseline at the same T (skipped while empf_triton.ops.lif is missing).
- `copy`: a large tensor copy, the device's copy bandwidth that report.py compares GB/s with.

"fwd" is the training forward (inputs and the learnable [T] decay and threshold require grad, so
autograd saves what backward needs); "fwd+bwd" adds `torch.autograd.grad` of the spikes with a
fixed random upstream gradient, for the current, decay and threshold. v_last gets no gradient.

Byte model (the bytes an op must move; ds = element size, B = ceil(N / 8) mask bytes per step;
decay learns, so the EM-PF kernels keep v for its gradient). GB/s = bytes / median time, for every
impl alike, so for eager and compile it is an effective bandwidth, not their real traffic:
- empf_neuron  fwd: read I T*N*ds, write spikes T*N*ds, v_last N*ds, mask T*B, v[0..T-2] (T-1)*N*ds
               bwd: read g T*N*ds, mask T*B, v[0..T-2] (T-1)*N*ds, write dI T*N*ds
- empf_neuron_step, per step t: fwd: read I N*ds and v N*ds (t > 0), write s N*ds, v_new N*ds,
               mask B; bwd: read g N*ds, mask B, v N*ds (t > 0, for dλ), write dI N*ds
- parallel_neuron fwd: read I T*N*ds, write spikes T*N*ds, mask T*B
               bwd: read g T*N*ds, mask T*B, write dI T*N*ds
- lif_neuron   fwd: read I T*N*ds, write spikes T*N*ds, v_last N*ds, h = m - θ T*N*ds (saved)
               bwd: read g T*N*ds, h T*N*ds, write dI T*N*ds
- copy         read + write of the tensor: 2 * numel * ds
"""

from __future__ import annotations

import pytest
import torch

# bench/conftest.py is the `conftest` module of a bench-only pytest run (bench/ has no package).
from conftest import (
    BENCH_N,
    BENCH_T,
    ON_CUDA,
    compile_skip_reason,
    raise_recompile_limit,
    triton_skip_reason,
)

from empf_triton.ops.neuron import empf_neuron, empf_neuron_step, parallel_neuron
from empf_triton.reference.neuron import empf_neuron_ref, parallel_neuron_ref

try:  # written by another helper; benchmarks skip cleanly until it lands
    from empf_triton.ops.lif import lif_neuron
    from empf_triton.reference.lif import lif_neuron_ref

    LIF_SKIP = None
except ImportError as exc:  # pragma: no cover - depends on the checkout
    lif_neuron = lif_neuron_ref = None
    LIF_SKIP = f"empf_triton.ops.lif is not available ({exc})"

DEVICE = "cuda" if ON_CUDA else "cpu"
N = BENCH_N
STEP = 0.25
IMPLS = ("eager", "compile", "triton")
PASSES = ("fwd", "fwd+bwd")
GRAD_MODES = ("online", "bptt")
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
# Copy-bandwidth probe: 1 GiB of fp32 on CUDA (far beyond L2), 64 MiB on the CPU (4 MiB for the
# tiny harness runs of tests/test_bench_report.py).
COPY_NUMEL = 1 << 28 if ON_CUDA else (1 << 24 if N >= 1 << 14 else 1 << 20)


# ------------------------------------------------------------------------------------ byte model


def _mask_bytes(n: int) -> int:
    return (n + 7) // 8


def empf_bytes(T: int, n: int, ds: int, pass_: str) -> int:
    fwd = T * n * ds + T * n * ds + n * ds + T * _mask_bytes(n) + (T - 1) * n * ds
    bwd = T * n * ds + T * _mask_bytes(n) + (T - 1) * n * ds + T * n * ds
    return fwd + (bwd if pass_ == "fwd+bwd" else 0)


def step_bytes(T: int, n: int, ds: int, pass_: str) -> int:
    total = 0
    for t in range(T):
        v_read = n * ds if t > 0 else 0
        total += n * ds + v_read + 2 * n * ds + _mask_bytes(n)
        if pass_ == "fwd+bwd":
            total += n * ds + _mask_bytes(n) + v_read + n * ds
    return total


def parallel_bytes(T: int, n: int, ds: int, pass_: str) -> int:
    fwd = 2 * T * n * ds + T * _mask_bytes(n)
    bwd = 2 * T * n * ds + T * _mask_bytes(n)
    return fwd + (bwd if pass_ == "fwd+bwd" else 0)


def lif_bytes(T: int, n: int, ds: int, pass_: str) -> int:
    fwd = 3 * T * n * ds + n * ds
    bwd = 3 * T * n * ds
    return fwd + (bwd if pass_ == "fwd+bwd" else 0)


# ------------------------------------------------------------------------------------- set-up

_COMPILED: dict = {}


def compiled(fn):
    """One torch.compile wrapper per reference function (dynamo caches per (T, dtype, mode))."""
    if fn not in _COMPILED:
        raise_recompile_limit()
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def _inputs(T: int, dtype: torch.dtype):
    """Current [T, N] around the threshold (so some neurons fire), learnable fp32 [T] decay and
    threshold (a module's sigmoid(a), sigmoid(b) at init), and an upstream gradient."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    current = torch.randn(T, N, generator=gen, device=DEVICE) * 0.5 + 0.25
    current = current.to(dtype).requires_grad_()
    decay = torch.full((T,), 0.5, device=DEVICE, requires_grad=True)
    threshold = torch.full((T,), 0.5, device=DEVICE, requires_grad=True)
    grad = torch.randn(T, N, generator=gen, device=DEVICE).to(dtype)
    return current, decay, threshold, grad


def _with_backward(forward, pass_: str, wrt, grad):
    """The timed case: the forward alone, or forward + autograd.grad of the spikes."""
    if pass_ == "fwd":
        return forward
    return lambda: torch.autograd.grad(forward()[0], wrt, grad)


def check_against_eager(forward, eager_forward, pass_: str, wrt, grad, dtype) -> float:
    """Largest error of a Triton case's outputs (and gradients, for fwd+bwd) against the eager
    reference, relative to the reference's largest magnitude. Asserted for fp32, where the fused
    kernels follow the reference's rounding; recorded for the other dtypes. A wrong kernel never
    gets a timing."""
    pairs = list(zip(forward(), eager_forward()))
    if pass_ == "fwd+bwd":
        got = torch.autograd.grad(forward()[0], wrt, grad)
        ref = torch.autograd.grad(eager_forward()[0], wrt, grad)
        pairs += list(zip(got, ref))
    worst = 0.0
    for a, b in pairs:
        a, b = a.detach().double(), b.detach().double()
        scale = max(1.0, b.abs().max().item()) if b.numel() else 1.0
        worst = max(worst, ((a - b).abs().max().item() if b.numel() else 0.0) / scale)
    if dtype == torch.float32:
        assert worst <= 1e-4, f"Triton differs from the eager reference: rel. error {worst:.3g}"
    return worst


def _param(impl: str, T: int, *rest, id: str):
    marks = []
    if impl == "triton" and (reason := triton_skip_reason()) is not None:
        marks.append(pytest.mark.skip(reason=reason))
    if impl == "compile" and (reason := compile_skip_reason(T)) is not None:
        marks.append(pytest.mark.skip(reason=reason))
    return pytest.param(impl, T, *rest, id=id, marks=marks)


def _multistep_cases(modes=GRAD_MODES, extra_variants=True):
    variants = [(T, torch.float32, None) for T in BENCH_T]
    if extra_variants and 4 in BENCH_T:  # keep the matrix small: other precisions at T=4 only
        variants += [(4, torch.float32, 4), (4, torch.bfloat16, None)]
    cases = []
    for impl in IMPLS:
        for pass_ in PASSES:
            for mode in modes:
                for T, dtype, bits in variants:
                    spk = "float" if bits is None else f"{bits}bit"
                    name = f"{impl}-{pass_}-{mode}-T{T}-{DTYPE_NAMES[dtype]}-{spk}"
                    cases.append(_param(impl, T, pass_, mode, dtype, bits, id=name))
    return cases


def _info(op, impl, T, pass_, mode, dtype, bits) -> dict:
    return {
        "op": op,
        "impl": impl,
        "T": T,
        "N": N,
        "dtype": DTYPE_NAMES[dtype],
        "spike_bits": bits,
        "grad_mode": mode,
        "pass": pass_,
    }


# ------------------------------------------------------------------------------------ benchmarks


def test_bench_copy_bandwidth(benchmark, bench_tools):
    """The device's copy bandwidth (read + write bytes per second), the ceiling for GB/s plots."""
    src = torch.ones(COPY_NUMEL, device=DEVICE)
    dst = torch.empty_like(src)
    bench_tools.run(
        benchmark,
        lambda: dst.copy_(src),
        bytes_moved=2 * src.numel() * src.element_size(),
        op="copy",
        impl="torch",
        N=src.numel(),
        dtype="fp32",
        **{"pass": "fwd"},
    )


@pytest.mark.parametrize(("impl", "T", "pass_", "mode", "dtype", "bits"), _multistep_cases())
def test_bench_empf_neuron(benchmark, bench_tools, impl, T, pass_, mode, dtype, bits):
    current, decay, threshold, grad = _inputs(T, dtype)

    def op(impl_arg):
        return lambda: empf_neuron(
            current,
            decay=decay,
            threshold=threshold,
            spike_bits=bits,
            spike_step=STEP,
            grad_mode=mode,
            impl=impl_arg,
        )

    wrt = (current, decay, threshold)
    info = {}
    if impl == "compile":
        ref = compiled(empf_neuron_ref)
        forward = lambda: ref(current, None, decay, threshold, bits, STEP, mode)  # noqa: E731
    elif impl == "eager":
        forward = op("reference")
    else:
        forward = op("triton")
        info["check"] = lambda: {
            "rel_err_vs_eager": check_against_eager(
                forward, op("reference"), pass_, wrt, grad, dtype
            )
        }
    bench_tools.run(
        benchmark,
        _with_backward(forward, pass_, wrt, grad),
        forward=forward,
        params=wrt[1:],
        bytes_moved=empf_bytes(T, N, current.element_size(), pass_),
        **_info("empf_neuron", impl, T, pass_, mode, dtype, bits),
        check=info.get("check"),
    )


def _op_step(impl_arg: str, decay, threshold, bits):
    def step(x, v, t):
        return empf_neuron_step(
            x, v, decay=decay[t], threshold=threshold[t], spike_bits=bits, impl=impl_arg
        )

    return step


@pytest.mark.parametrize(
    ("impl", "T", "pass_", "mode", "dtype", "bits"),
    _multistep_cases(modes=("online",), extra_variants=False),
)
def test_bench_empf_neuron_step(benchmark, bench_tools, impl, T, pass_, mode, dtype, bits):
    current, decay, threshold, grad = _inputs(T, dtype)
    # One leaf per step, as a layer's output is in online training (no [T, N] grad accumulation).
    steps = [current[t].detach().requires_grad_() for t in range(T)]
    if impl == "compile":
        ref = compiled(empf_neuron_ref)

        def step(x, v, t):
            s, v_new = ref(x[None], v, decay[t : t + 1], threshold[t : t + 1], bits, STEP, "bptt")
            return s[0], v_new
    else:
        step = _op_step("reference" if impl == "eager" else "triton", decay, threshold, bits)

    def forward(step=step):
        v, out = None, []
        for t in range(T):
            s, v = step(steps[t], v, t)
            out.append(s)
            v = v.detach()  # online: the temporal path is cut between steps
        return out

    def forward_backward(step=step):
        v, grads = None, []
        for t in range(T):
            s, v = step(steps[t], v, t)
            grads.append(torch.autograd.grad(s, (steps[t], decay, threshold), grad[t]))
            v = v.detach()
        return grads

    def check():
        ref_step = _op_step("reference", decay, threshold, bits)
        worst = 0.0
        pairs = list(zip(forward(), forward(ref_step)))
        if pass_ == "fwd+bwd":
            for got, ref in zip(forward_backward(), forward_backward(ref_step)):
                pairs += list(zip(got, ref))
        for a, b in pairs:
            a, b = a.detach().double(), b.detach().double()
            scale = max(1.0, b.abs().max().item())
            worst = max(worst, (a - b).abs().max().item() / scale)
        assert worst <= 1e-4, f"Triton step differs from the eager reference: {worst:.3g}"
        return {"rel_err_vs_eager": worst}

    bench_tools.run(
        benchmark,
        forward if pass_ == "fwd" else forward_backward,
        check=check if impl == "triton" else None,
        forward=forward,
        params=(decay, threshold),
        bytes_moved=step_bytes(T, N, current.element_size(), pass_),
        **_info("empf_neuron_step", impl, T, pass_, mode, dtype, bits),
    )


@pytest.mark.parametrize(
    ("impl", "T", "pass_", "mode", "dtype", "bits"),
    _multistep_cases(modes=("none",), extra_variants=False),
)
def test_bench_parallel_neuron(benchmark, bench_tools, impl, T, pass_, mode, dtype, bits):
    current, _, threshold, grad = _inputs(T, dtype)

    def op(impl_arg):
        return lambda: (
            parallel_neuron(current, threshold=threshold, spike_bits=bits, impl=impl_arg),
        )

    wrt = (current, threshold)
    info = {}
    if impl == "compile":
        ref = compiled(parallel_neuron_ref)
        forward = lambda: (ref(current, threshold, bits, STEP),)  # noqa: E731
    elif impl == "eager":
        forward = op("reference")
    else:
        forward = op("triton")
        info["check"] = lambda: {
            "rel_err_vs_eager": check_against_eager(
                forward, op("reference"), pass_, wrt, grad, dtype
            )
        }
    bench_tools.run(
        benchmark,
        _with_backward(forward, pass_, wrt, grad),
        forward=forward,
        params=wrt[1:],
        bytes_moved=parallel_bytes(T, N, current.element_size(), pass_),
        **_info("parallel_neuron", impl, T, pass_, None, dtype, bits),
        check=info.get("check"),
    )


@pytest.mark.skipif(LIF_SKIP is not None, reason=LIF_SKIP or "")
@pytest.mark.parametrize(
    ("impl", "T", "pass_", "mode", "dtype", "bits"), _multistep_cases(extra_variants=False)
)
def test_bench_lif_neuron(benchmark, bench_tools, impl, T, pass_, mode, dtype, bits):
    current, decay, threshold, grad = _inputs(T, dtype)

    def op(impl_arg):
        return lambda: lif_neuron(
            current, decay=decay, threshold=threshold, grad_mode=mode, impl=impl_arg
        )

    wrt = (current, decay, threshold)
    info = {}
    if impl == "compile":
        ref = compiled(lif_neuron_ref)
        forward = lambda: ref(current, None, decay, threshold, "sigmoid", 4.0, False, mode)  # noqa: E731
    elif impl == "eager":
        forward = op("reference")
    else:
        forward = op("triton")
        info["check"] = lambda: {
            "rel_err_vs_eager": check_against_eager(
                forward, op("reference"), pass_, wrt, grad, dtype
            )
        }
    bench_tools.run(
        benchmark,
        _with_backward(forward, pass_, wrt, grad),
        forward=forward,
        params=wrt[1:],
        bytes_moved=lif_bytes(T, N, current.element_size(), pass_),
        **_info("lif_neuron", impl, T, pass_, mode, dtype, bits),
        check=info.get("check"),
    )


# ------------------------------------------------------------------------ external baselines
# SpikingJelly 2.0 on the same inputs: its multi-step LIF (it picks its own CUDA backend) and its
# FlexSN running the EM-PF step itself (BPTT through its generated kernels). Each is checked
# against our reference before it is timed; the harness also replays it from a CUDA graph.


def _spikingjelly():
    """SpikingJelly's neuron module, or None with the reason it cannot be imported."""
    try:
        from spikingjelly.activation_based import functional, neuron
    except Exception as exc:  # noqa: BLE001 - ImportError, or its own import-time failures
        return None, None, f"SpikingJelly is not importable here ({type(exc).__name__}: {exc})"
    return neuron, functional, None


def _empf_core(x, v, lam, theta):
    """The EM-PF step as FlexSN's pure single-step core: (spike, new v)."""
    m = lam * v + x
    s = torch.relu(m - theta)
    return s, m - s


def _sj_cases():
    return [
        pytest.param(pass_, T, id=f"{pass_}-bptt-T{T}-fp32-float")
        for pass_ in PASSES
        for T in BENCH_T
    ]


@pytest.mark.parametrize(("pass_", "T"), _sj_cases())
def test_bench_sj_lif(benchmark, bench_tools, pass_, T):
    """SpikingJelly's `LIFNode(decay_input=False, v_reset=None, step_mode="m")`, tau = 2
    (λ = 0.5), θ = 0.5 (scalars: its LIF has no per-step parameters), gradient for the input."""
    sj_neuron, functional, reason = _spikingjelly()
    if reason:
        pytest.skip(reason)
    current, _, _, grad = _inputs(T, torch.float32)
    node = sj_neuron.LIFNode(
        tau=2.0, decay_input=False, v_threshold=0.5, v_reset=None, step_mode="m"
    ).to(DEVICE)

    def forward():
        functional.reset_net(node)
        return (node(current),)

    def check():
        s_sj = forward()[0]
        s_ref, _ = lif_neuron(current, decay=0.5, threshold=0.5, grad_mode="bptt", impl="reference")
        assert torch.equal(s_sj.detach(), s_ref.detach()), "SpikingJelly LIF != lif_neuron_ref"
        return {"backend": getattr(node, "backend", None) or type(node).__name__}

    bench_tools.run(
        benchmark,
        _with_backward(forward, pass_, (current,), grad),
        check=check,
        forward=forward,
        bytes_moved=lif_bytes(T, N, 4, pass_),
        **_info("lif_neuron", "spikingjelly", T, pass_, "bptt", torch.float32, None),
        baseline="spikingjelly.LIFNode(decay_input=False, v_reset=None, step_mode='m')",
    )


@pytest.mark.parametrize(("pass_", "T"), _sj_cases())
def test_bench_sj_flexsn(benchmark, bench_tools, pass_, T):
    """SpikingJelly's FlexSN with the EM-PF step as its core (`m = λv + x; s = relu(m - θ);
    v = m - s`), λ and θ learnable 0-d parameters (one per layer, not per step), BPTT."""
    sj_neuron, functional, reason = _spikingjelly()
    if reason:
        pytest.skip(reason)
    if not hasattr(sj_neuron, "FlexSN"):
        pytest.skip("this SpikingJelly has no FlexSN (needs 2.0)")
    current, _, _, grad = _inputs(T, torch.float32)
    lam = torch.nn.Parameter(torch.tensor(0.5, device=DEVICE))
    theta = torch.nn.Parameter(torch.tensor(0.5, device=DEVICE))
    node = sj_neuron.FlexSN(_empf_core, 1, static_inputs=(lam, theta), step_mode="m")

    def forward():
        functional.reset_net(node)
        return (node(current),)

    def ref():
        return empf_neuron_ref(current, None, lam.expand(T), theta.expand(T), None, STEP, "bptt")

    def check():
        s_sj = forward()[0]
        s_ref, _ = ref()
        torch.testing.assert_close(s_sj, s_ref, rtol=1e-5, atol=1e-6)
        (g_sj,) = torch.autograd.grad(forward()[0], (current,), grad)
        (g_ref,) = torch.autograd.grad(ref()[0], (current,), grad)
        torch.testing.assert_close(g_sj, g_ref, rtol=1e-5, atol=1e-6)
        return {"backend": "FlexSN (SpikingJelly picks Triton on CUDA, torch otherwise)"}

    bench_tools.run(
        benchmark,
        _with_backward(forward, pass_, (current, lam, theta), grad),
        check=check,
        forward=forward,
        params=(lam, theta),
        bytes_moved=empf_bytes(T, N, 4, pass_),
        **_info("empf_neuron", "flexsn", T, pass_, "bptt", torch.float32, None),
        baseline="spikingjelly FlexSN(EM-PF core, num_states=1, step_mode='m')",
    )
