"""Stateful EM-PF models under CUDA graphs and torch.compile give the eager results.

The neurons carry a membrane `v` and a step counter between calls and are reset between samples
(`reset_net`); a captured or compiled model must keep that state right over several samples:

- `gpu`: a `torch.cuda.CUDAGraph` captured by hand, (a) of one neuron step whose membrane lives in
  a static buffer across replays (zeroed between samples), and (b) of a whole sample (reset, T
  steps) of a small model; and `torch.compile(mode="reduce-overhead")` (inductor + CUDA graphs)
  of a small model in step modes "s" and "m" over several samples with reset_net in between.
- CPU: `torch.compile` (default mode, backend "aot_eager") of a small stateful model over 3
  samples with reset_net in between equals eager, compiles the whole sample into one graph and
  does not recompile after the first sample (`torch._dynamo.testing.CompileCounterWithBackend`).
"""

from __future__ import annotations

import pytest
import torch
from helpers import randomize
from torch import nn

from empf_triton import reset_net
from empf_triton.models import build_model, set_step_mode
from empf_triton.nn import EMPFNeuron
from empf_triton.ops.neuron import empf_neuron_step

T = 3


def _small_model(device: str, step_mode: str) -> nn.Module:
    """A small stateful net: the MNIST-1D CNN (binary convs, EM-PF neurons, T steps)."""
    torch.manual_seed(0)
    model = build_model("mnist1d_cnn", in_shape=(1, 40), num_classes=10, T=T, channels=(4, 4, 8, 8))
    return set_step_mode(randomize(model).to(device), step_mode)


def _sample(model: nn.Module, step_mode: str):
    """All T steps of one sample x [B, 1, 40] -> logits summed over T (no reset inside)."""
    if step_mode == "m":
        return lambda x: model(x.unsqueeze(0).expand(T, *x.shape)).sum(0)

    def steps(x: torch.Tensor) -> torch.Tensor:
        out = model(x)
        for _ in range(T - 1):
            out = out + model(x)
        return out

    return steps


def _eager(model: nn.Module, step_mode: str, x: torch.Tensor) -> torch.Tensor:
    reset_net(model)
    with torch.no_grad():
        return _sample(model, step_mode)(x)


def _inputs(device: str, n: int = 3, B: int = 5) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(B, 1, 40, generator=g).to(device) for _ in range(n)]


def _assert_nontrivial(model: nn.Module, step_mode: str, x: torch.Tensor) -> None:
    """The logits are not all zero and the stateful neurons carried a membrane between steps."""
    ref = _eager(model, step_mode, x)
    assert bool(ref.abs().max() > 0), "logits are all zero: the test would prove nothing"
    n = [m for m in model.modules() if isinstance(m, EMPFNeuron) and not m.parallel]
    assert n and all(m.v is not None for m in n), "no neuron carried a membrane"


# ------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_compile_matches_eager_without_recompiling(step_mode):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    model = _small_model("cpu", step_mode)
    xs = _inputs("cpu")
    _assert_nontrivial(model, step_mode, xs[0])
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_sample(model, step_mode), backend=counter)
    frames = []
    for x in xs:
        want = _eager(model, step_mode, x)
        reset_net(model)  # between samples, outside the compiled region
        with torch.no_grad():
            got = compiled(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        frames.append(counter.frame_count)
    # the whole sample (T steps with their state updates) is one graph, compiled once
    assert frames == [1, 1, 1], frames
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_cuda_graph_neuron_step_with_state_across_replays():
    """One `empf_neuron_step` captured; the membrane lives in a static buffer that each replay
    reads and overwrites; zeroing it between samples is the reset. Equals the eager steps."""
    dev = "cuda"
    shape = (6, 37)
    decay, threshold = 0.6, 0.4
    x_static = torch.zeros(shape, device=dev)
    v_static = torch.zeros(shape, device=dev)

    def step():
        s, v = empf_neuron_step(x_static, v_static, decay=decay, threshold=threshold)
        v_static.copy_(v)
        return s

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        s_static = step()

    g = torch.Generator().manual_seed(2)
    for _sample_i in range(3):
        frames = torch.randn(T, *shape, generator=g).to(dev)
        v_static.zero_()  # reset between samples
        v = None
        for t in range(T):
            x_static.copy_(frames[t])
            graph.replay()
            want, v = empf_neuron_step(frames[t], v, decay=decay, threshold=threshold)
            torch.testing.assert_close(s_static, want, rtol=0, atol=0)
            torch.testing.assert_close(v_static, v, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_cuda_graph_whole_sample_matches_eager(step_mode):
    """reset_net and the T steps of a small model captured as one graph; replayed for several
    samples (new inputs copied into the static input) it gives the eager logits."""
    model = _small_model("cuda", step_mode)
    xs = _inputs("cuda")
    _assert_nontrivial(model, step_mode, xs[0])
    run = _sample(model, step_mode)
    x_static = xs[0].clone()

    def sample():
        reset_net(model)
        with torch.no_grad():
            return run(x_static)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            sample()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = sample()
    for x in xs:
        x_static.copy_(x)
        graph.replay()
        got = out_static.clone()
        torch.testing.assert_close(got, _eager(model, step_mode, x), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("step_mode", ["s", "m"])
def test_compile_reduce_overhead_matches_eager(step_mode):
    """torch.compile(mode="reduce-overhead") of the sample function (CUDA graphs via cudagraph
    trees) over several samples with reset_net between them equals eager and never recompiles
    after the first sample (dynamo's error_on_recompile)."""
    torch._dynamo.reset()
    model = _small_model("cuda", step_mode)
    xs = _inputs("cuda", n=4)
    _assert_nontrivial(model, step_mode, xs[0])
    compiled = torch.compile(_sample(model, step_mode), mode="reduce-overhead")
    for i, x in enumerate(xs):
        want = _eager(model, step_mode, x)
        reset_net(model)  # between samples, outside the compiled region
        with torch._dynamo.config.patch(error_on_recompile=i > 0), torch.no_grad():
            got = compiled(x).clone()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()
