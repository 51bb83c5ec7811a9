"""Host overhead of one call: the Python / autograd / dispatch path of every fused op, GPU work out.

Run: `pytest bench/test_bench_overhead.py --benchmark-json=bench/results/overhead.json`.

What runs in place of the GPU (`extra_info["launch_path"]` says which):

- Triton's interpreter off (the normal case, with or without a GPU): `bench/fake_driver.py` stands
  in for Triton's CUDA driver. Kernels really compile (for sm_90, with ptxas; seconds per variant
  the first time) and every launch runs Triton's own Python and ours — autotuner, argument
  binder, cache lookups, or the direct launcher of `kernels/_launch.py` — up to the compiled
  kernel's launcher, which does nothing. Tensors are CPU tensors. The fused neuron ops are timed
  through both launch paths ("direct", "triton").
- Triton's interpreter on (`TRITON_INTERPRET=1`, as `bench/run_gpu.sh --dry-run` runs): every
  Triton entry point (`Autotuner.run`, `JITFunction.run`, `InterpretedFunction.run`) is patched
  to a no-op, so Triton's own Python is left out ("stubbed").

Either way, what is timed is what a user's Python thread spends per call besides the kernels and
the launch itself: validation, allocation of outputs, autograd bookkeeping, launcher argument
handling, torch ops around the kernels. The outputs are uninitialised memory and are not looked
at. On a GPU machine the launch adds its driver call (about 10 µs per kernel on the H200 machine).

Denormals are flushed to zero while a case runs (`torch.set_flush_denormal`): the outputs are
uninitialised memory, often holding denormal bit patterns, and the CPU's arithmetic on them (the
engine accumulating gradients into `.grad`, the parameter-gradient sums) then runs up to ~100x
slower, which added ~20 µs of noise to a fused op's forward+backward that no GPU run pays (there
that arithmetic is on the device, on real values). Eager relu is timed under the same setting.

The yardstick is eager `torch.relu` forward+backward on a tensor of the same size (4096
elements: arithmetic is negligible): `extra_info["ratio_to_relu"]` is each case's median host
time over relu's. The target is every fused op's fwd+bwd at most 2x relu's.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

import empf_triton.ops._common as ops_common
from empf_triton.nn import EMPFNeuron, LIFNeuron
from empf_triton.ops.binary import binarize, binary_linear, binary_matmul, pack_weight, ternarize
from empf_triton.ops.lif import lif_neuron, lif_neuron_step
from empf_triton.ops.neuron import empf_neuron, empf_neuron_step, parallel_neuron
from empf_triton.ops.spikes import decode_spikes, encode_spikes, quantize_spikes

pytest.importorskip("triton")

# CPU tensors always, also on a GPU machine: the fake driver stands in for the GPU (its kernels
# are compiled for sm_90 and launch nothing), so a CUDA tensor would mix real torch launches
# (relu, allocations) into the host times that the CPU tables compare.
DEVICE = "cpu"
NUMEL = 4096
T = 4
ROUNDS = int(os.environ.get("EMPF_BENCH_OVERHEAD_ROUNDS", "200"))
MODEL_ROUNDS = max(1, ROUNDS // 10)  # whole-network cases take milliseconds a call
_RELU_US: dict[str, float] = {}


from empf_triton.kernels import _launch  # noqa: E402
from empf_triton.kernels._common import INTERPRET  # noqa: E402

LAUNCH_PATHS = ["stubbed"] if INTERPRET else ["direct", "triton"]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread while a case runs: the model cases' CPU convolutions and batch norms
    otherwise wait on idle worker threads when the machine is shared (a ResNet-18 training batch
    took 1.5-6 s instead of 0.2 s under load). The 4096-element ops never use a second thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@contextlib.contextmanager
def no_kernel_launches(path: str = LAUNCH_PATHS[0]):
    """No kernel runs: Triton's driver is faked (`path` "direct" or "triton": which launch path
    the launchers take) or, under the interpreter, Triton's entry points are stubbed."""
    if path != "stubbed":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from fake_driver import fake_gpu

        flushed = torch.set_flush_denormal(True)
        saved = _launch.ENABLED
        _launch.ENABLED = path == "direct"
        try:
            with fake_gpu():
                yield
        finally:
            _launch.ENABLED = saved
            if flushed:
                torch.set_flush_denormal(False)
        return
    from triton.runtime import autotuner, interpreter, jit

    saved = [
        (autotuner.Autotuner, "run", autotuner.Autotuner.run),
        (jit.JITFunction, "run", jit.JITFunction.run),
        (interpreter.InterpretedFunction, "run", interpreter.InterpretedFunction.run),
        (ops_common, "_interpreter_on", ops_common._interpreter_on),
    ]

    def noop(*args, **kwargs):
        return None

    flushed = torch.set_flush_denormal(True)
    try:
        for owner, name, _ in saved[:3]:
            setattr(owner, name, noop)
        ops_common._interpreter_on = lambda: True
        yield
    finally:
        if flushed:
            torch.set_flush_denormal(False)
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _time(
    benchmark, fn, *, case: str, kind: str, path: str = LAUNCH_PATHS[0], rounds: int = ROUNDS
) -> float:
    with no_kernel_launches(path):
        for _ in range(20 if rounds >= 20 else 2):  # warm-up: compile kernels, build caches
            fn()
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=5 if rounds >= 20 else 1, iterations=1)
    us = benchmark.stats.stats.median * 1e6
    benchmark.extra_info.update(
        device=DEVICE, case=case, kind=kind, numel=NUMEL, host_us=us, torch=torch.__version__,
        launch_path=path,
    )  # fmt: skip
    relu = _RELU_US.get(kind)
    if relu is not None:
        benchmark.extra_info["relu_us"] = relu
        benchmark.extra_info["ratio_to_relu"] = us / relu
    return us


def _leaf(*shape, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(*shape, dtype=dtype, device=DEVICE) + 0.3).requires_grad_()


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
def test_overhead_00_relu(benchmark, kind):
    """The yardstick, timed first (pytest runs the file in order)."""
    x = _leaf(NUMEL)
    if kind == "fwd":
        with torch.no_grad():
            fn = lambda: torch.relu(x)  # noqa: E731
            _time(benchmark, fn, case="relu", kind=kind)
    else:
        g = torch.ones(NUMEL, device=DEVICE)
        _time(benchmark, lambda: torch.relu(x).backward(g), case="relu", kind=kind)
    _RELU_US[kind] = benchmark.stats.stats.median * 1e6


class _EmptyFn(torch.autograd.Function):
    """The floor of a fused op's host path: a Python autograd.Function with two outputs (as the
    neuron ops have) that allocates its outputs and its input gradient and does nothing else."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        return torch.empty_like(x), torch.empty_like(x)

    @staticmethod
    def backward(ctx, g, gv):
        return torch.empty_like(g)


@pytest.mark.parametrize("kind", ["fwd+bwd"])
def test_overhead_01_empty_function(benchmark, kind):
    """What PyTorch alone costs a two-output op (called the way the library calls its Functions:
    the C-level apply), beside relu: the floor under every fused op's fwd+bwd."""
    apply = ops_common.c_apply(_EmptyFn)
    x = _leaf(NUMEL)
    g = torch.ones(NUMEL, device=DEVICE)
    _time(benchmark, lambda: apply(x)[0].backward(g), case="empty 2-output autograd.Function",
          kind=kind)  # fmt: skip


def _neuron_cases():
    """(name, make) pairs: make() returns (inputs needing grad, call) with call() -> outputs."""
    n = NUMEL // T

    def empf(bits):
        def make():
            x, d, th = _leaf(T, n), _leaf(T), _leaf(T)
            with torch.no_grad():
                d.copy_(torch.full((T,), 0.5))
            return (x, d, th), lambda: empf_neuron(
                x, decay=d, threshold=th, spike_bits=bits, impl="triton"
            )

        return make

    def empf_float():
        x = _leaf(T, n)
        return (x,), lambda: empf_neuron(x, decay=0.5, threshold=0.5, impl="triton")

    def step():
        x, v = _leaf(NUMEL), _leaf(NUMEL)
        return (x, v), lambda: empf_neuron_step(x, v, decay=0.5, threshold=0.5, impl="triton")

    def par():
        x, th = _leaf(T, n), _leaf(T)
        return (x, th), lambda: parallel_neuron(x, threshold=th, spike_bits=4, impl="triton")

    def lif():
        x = _leaf(T, n)
        return (x,), lambda: lif_neuron(x, decay=0.5, threshold=1.0, impl="triton")

    def lif_step():
        x, v = _leaf(NUMEL), _leaf(NUMEL)
        return (x, v), lambda: lif_neuron_step(x, v, decay=0.5, threshold=1.0, impl="triton")

    return [
        ("empf_neuron[T=4,tensor params]", empf(None)),
        ("empf_neuron[T=4,4-bit]", empf(4)),
        ("empf_neuron[T=4,float params]", empf_float),
        ("empf_neuron_step", step),
        ("parallel_neuron[T=4,4-bit]", par),
        ("lif_neuron[T=4]", lif),
        ("lif_neuron_step", lif_step),
    ]


def _other_cases():
    w = (torch.randn(64, NUMEL // 64, device=DEVICE) * 0.5).requires_grad_()
    packed = pack_weight(w.detach(), 1)
    x = _leaf(64, NUMEL // 64)
    s = (torch.rand(NUMEL, device=DEVICE) * 4).requires_grad_()
    codes = encode_spikes(s.detach(), 4, 0.25, impl="reference")
    return [
        ("quantize_spikes", lambda: ((s,), lambda: quantize_spikes(s, 4, 0.25, impl="triton"))),
        ("encode_spikes", lambda: ((), lambda: encode_spikes(s.detach(), 4, 0.25, impl="triton"))),
        (
            "decode_spikes",
            lambda: ((), lambda: decode_spikes(codes, 4, 0.25, (NUMEL,), impl="triton")),
        ),
        ("binarize", lambda: ((w,), lambda: binarize(w, impl="triton"))),
        ("ternarize", lambda: ((w,), lambda: ternarize(w, impl="triton"))),
        ("binary_matmul[M=64]", lambda: ((x,), lambda: binary_matmul(x, packed, impl="triton"))),
        ("binary_linear[M=64]", lambda: ((x, w), lambda: binary_linear(x, w, impl="triton"))),
    ]


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _bench_case(benchmark, name, make, kind, path=LAUNCH_PATHS[0]):
    with no_kernel_launches(path):
        leaves, call = make()
    if kind == "fwd":

        def fn():
            with torch.no_grad():
                return call()

    else:
        if not leaves:
            pytest.skip(f"{name} has no gradient")
        with no_kernel_launches(path):
            grad = torch.ones_like(_first(call()))  # made once, as relu's case does

        def fn():
            _first(call()).backward(grad)

    _time(benchmark, fn, case=name, kind=kind, path=path)


@pytest.mark.parametrize("path", LAUNCH_PATHS)
@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize(("name", "make"), _neuron_cases(), ids=[c[0] for c in _neuron_cases()])
def test_overhead_neuron_ops(benchmark, name, make, kind, path):
    _bench_case(benchmark, name, make, kind, path)


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("idx", range(7), ids=lambda i: _OTHER_NAMES[i])
def test_overhead_other_ops(benchmark, idx, kind):
    name, make = _other_cases()[idx]
    _bench_case(benchmark, name, make, kind)


_OTHER_NAMES = [
    "quantize_spikes",
    "encode_spikes",
    "decode_spikes",
    "binarize",
    "ternarize",
    "binary_matmul[M=64]",
    "binary_linear[M=64]",
]


@pytest.mark.parametrize("op", ["empf", "lif"])
def test_overhead_custom_ops(benchmark, op):
    """The forward and backward custom ops of a neuron called back to back, as a compiled graph
    calls them (torch.compile's default mode: the graph calls `torch.ops.empf.*` through the
    dispatcher, with no Python autograd around them). A tensor decay and threshold; T = 4."""
    import empf_triton.ops.neuron as on

    n = NUMEL // T
    cur, g = torch.randn(T, n, device=DEVICE), torch.ones(T, n, device=DEVICE)
    d, th = torch.full((T,), 0.5, device=DEVICE), torch.full((T,), 0.5, device=DEVICE)
    if op == "empf":
        fwd, bwd = torch.ops.empf.neuron_fwd.default, torch.ops.empf.neuron_bwd.default
        need = on._NEED_DDECAY | on._NEED_DTH

        def fn():
            _, _, mask, vh = fwd(cur, None, d, th, [0, 1, 1, 0, on._SAVE_MASK | on._SAVE_V],
                                 [0.0, 0.0, 0.25])  # fmt: skip
            bwd(g, None, mask, vh, None, d, th, [0, 1, 1, n, need], [0.0], cur.dtype)
    else:
        fwd, bwd = torch.ops.empf.lif_fwd.default, torch.ops.empf.lif_bwd.default

        def fn():
            _, _, h = fwd(cur, None, d, th, "sigmoid", 4.0, 2 | 4, 0.0, 0.0)
            bwd(g, None, h, None, d, th, "sigmoid", 4.0, False, True, True, False, True, True,
                0.0, 0.0)  # fmt: skip

    with torch.no_grad():
        _time(benchmark, fn, case=f"{op} custom ops fwd+bwd (a compiled graph's calls)",
              kind="fwd+bwd")  # fmt: skip


@pytest.mark.parametrize("module", ["EMPFNeuron", "EMPFNeuron[4-bit]", "LIFNeuron"])
def test_overhead_module_step(benchmark, module):
    """One step of a neuron module in step mode "s" + backward (online mode for EM-PF), reset
    every T steps as a training loop does."""
    if module == "LIFNeuron":
        m = LIFNeuron(step_mode="s", impl="triton").to(DEVICE)
    else:
        bits = 4 if "4-bit" in module else None
        m = EMPFNeuron(T, spike_bits=bits, step_mode="s", impl="triton").to(DEVICE)
    x = _leaf(8, NUMEL // 8)
    g = torch.ones(8, NUMEL // 8, device=DEVICE)

    def fn():
        if m.t == T:
            m.reset()
        m(x).backward(g)
        if module == "LIFNeuron":
            m.detach()

    _time(benchmark, fn, case=f"{module} step", kind="fwd+bwd")


@pytest.mark.parametrize("kind", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("layer", ["BinaryConv2d", "nn.Conv2d"])
def test_overhead_conv_layer(benchmark, layer, kind):
    """A ResNet block's convolution as a layer (8 -> 8 channels, 3x3, batch 2 of 8x8): the
    binary layer (weights quantised by a Triton launch, STE backward) next to `nn.Conv2d`, its
    torch twin. The convolution itself runs on the CPU in both (tiny); their difference is the
    binary layer's host cost."""
    from empf_triton.nn import BinaryConv2d

    torch.manual_seed(0)
    if layer == "BinaryConv2d":
        m = BinaryConv2d(8, 8, 3, padding=1, impl="triton").to(DEVICE)
    else:
        m = torch.nn.Conv2d(8, 8, 3, padding=1, bias=False).to(DEVICE)
    x = _leaf(2, 8, 8, 8)
    if kind == "fwd":

        def fn():
            with torch.no_grad():
                return m(x)

    else:
        g = torch.ones(2, 8, 8, 8, device=DEVICE)

        def fn():
            m(x).backward(g)

    _time(benchmark, fn, case=f"{layer} layer (8->8, 3x3, 2x8x8)", kind=kind)


def test_overhead_resnet18_eval_forward(benchmark):
    """One evaluation forward of the training model (not deployed): EM-PF ResNet-18, T = 4,
    batch 1, width 4 on 32x32 inputs, eval mode under no_grad, step mode "m" (as `evaluate` and
    `empf eval` run it: inside `frozen_weights`, so the binary layers quantise their weights
    once), the Triton launches out as above. Convolutions and batch norms run as torch ops on
    the CPU here; on a GPU they are launches."""
    from empf_triton import reset_net
    from empf_triton.models import build_model, set_step_mode
    from empf_triton.nn import frozen_weights

    torch.manual_seed(0)
    model = build_model("resnet18", in_shape=(3, 32, 32), num_classes=10, T=T, width=4,
                        spike_bits=4, impl="triton").to(DEVICE).eval()  # fmt: skip
    set_step_mode(model, "m")
    x = torch.randn(T, 1, 3, 32, 32, device=DEVICE)

    def fn():
        reset_net(model)
        with torch.no_grad():
            return model(x)

    with frozen_weights(model):
        _time(benchmark, fn, case="ResNet-18 eval forward B=1 (training model)", kind="fwd",
              rounds=MODEL_ROUNDS)  # fmt: skip


@pytest.mark.parametrize("mem_bn", [False, True], ids=["plain", "mem_bn"])
def test_overhead_deployed_resnet18(benchmark, mem_bn):
    """One forward of a deployed EM-PF ResNet-18 (T = 4, batch 1, 4-bit codes between layers,
    width 4 on 32x32 inputs: the host path of the paper's network, small tensors): every layer's
    Python and launches, the GPU work out as above. The stem conv and the classifier run as
    torch ops on the CPU here (on a GPU they are launches too). With Mem-BN, the neurons after
    the residual joins stay standalone with a per-channel decay."""
    from empf_triton.deploy import fold
    from empf_triton.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet18", in_shape=(3, 32, 32), num_classes=10, T=T, width=4,
                        spike_bits=4, mem_bn=mem_bn).eval()  # fmt: skip
    with no_kernel_launches():
        deployed = fold(model, impl="triton").to(DEVICE)
    x = torch.randn(1, 3, 32, 32, device=DEVICE)
    name = "deployed ResNet-18 (Mem-BN) B=1 forward" if mem_bn else "deployed ResNet-18 B=1 forward"
    _time(benchmark, lambda: deployed(x), case=name, kind="fwd", rounds=MODEL_ROUNDS)


@pytest.mark.parametrize("strategy", ["online", "bptt"])
def test_overhead_resnet18_training_step(benchmark, strategy):
    """One training batch of an EM-PF ResNet-18 (T = 4, batch 2, width 4 on 8x8 inputs: the
    paper's network with small tensors), `train_batch` with the strategy: every layer's Python,
    the autograd engine and the optimizer steps (T of them online, one for BPTT), the Triton
    launches out as above. Convolutions, batch norms and the optimizer's arithmetic run as
    torch ops on the CPU here (tiny); on a GPU they are launches."""
    from empf_triton.models import build_model
    from empf_triton.train.strategies import train_batch

    torch.manual_seed(0)
    model = build_model("resnet18", in_shape=(3, 8, 8), num_classes=10, T=T, width=4,
                        impl="triton").to(DEVICE)  # fmt: skip
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.rand(2, 3, 8, 8, device=DEVICE)
    y = torch.randint(0, 10, (2,), device=DEVICE)
    _time(
        benchmark, lambda: train_batch(model, x, y, opt, strategy, T),
        case=f"ResNet-18 training batch, {strategy}", kind="fwd+bwd", rounds=MODEL_ROUNDS,
    )  # fmt: skip
