"""Where a call's time goes on this machine, with real launches: the host side of every op.

    python bench/profile_host.py OUT_DIR [--model]

`bench/test_bench_overhead.py` times the Python path with the launches stubbed out (it runs
anywhere). This script keeps the launches and asks, on the machine it runs on:

- what one launch costs: an eager `x.add_(1)`, a tiny Triton kernel through `kernel[grid](...)`,
  through an `Autotuner`, and through the compiled kernel's own `run` (Triton's binder skipped);
- what each fused op's call costs, back to back (the host rate: one sync after all calls) and
  synchronised after each call, next to eager relu's forward+backward on the same 4096 elements;
- a `torch.profiler` table (self CPU time per function) of the online step and the fused op, and
  a cProfile of the online step (Python functions by own time);
- each fused op once more through Triton's own launch path (`kernels/_launch.py` switched off);
- with `--model`: EM-PF ResNet-18 (CIFAR, T=4, B=1, step mode "m") in eager and under
  `torch.compile(mode="reduce-overhead")`, with dynamo's and inductor's counters (CUDA-graph skips,
  graph breaks, recompiles) and the perf-hint log, to see whether the CUDA graphs were taken.

Writes OUT_DIR/profile_host.json, OUT_DIR/profile_host.md and OUT_DIR/profile_*.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from empf_triton import reset_net  # noqa: E402
from empf_triton.nn import EMPFNeuron  # noqa: E402
from empf_triton.ops.binary import binary_matmul, pack_weight  # noqa: E402
from empf_triton.ops.neuron import empf_neuron, empf_neuron_step  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUMEL, T = 4096, 4


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, n: int = 200 if DEVICE == "cuda" else 5) -> dict:
    """µs per call: back to back (one sync at the end) and synchronised after each call."""
    for _ in range(min(n, 10)):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    rate = (time.perf_counter() - t0) / n * 1e6
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"back_to_back_us": rate, "synced_median_us": times[len(times) // 2] * 1e6}


def _leaf(*shape):
    return (torch.randn(*shape, device=DEVICE) + 0.3).requires_grad_()


def launch_cases() -> dict:
    import triton
    import triton.language as tl

    @triton.jit
    def _add_one(p, n, BLOCK: tl.constexpr):
        o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(p + o, tl.load(p + o, mask=o < n) + 1.0, mask=o < n)

    tuned = triton.autotune([triton.Config({"BLOCK": 1024})], key=["n"])(_add_one)
    x = torch.zeros(NUMEL, device=DEVICE)
    cases = {
        "python: empty lambda": lambda: None,
        "torch: x.add_(1) (one launch)": lambda: x.add_(1.0),
        "torch: torch.empty(4096)": lambda: torch.empty(NUMEL, device=DEVICE),
        "triton: kernel[grid](...)": lambda: _add_one[(4,)](x, NUMEL, BLOCK=1024),
        "triton: autotuner[grid](...)": lambda: tuned[(4,)](x, NUMEL),
    }
    if DEVICE == "cuda":
        compiled = _add_one[(4,)](x, NUMEL, BLOCK=1024)  # JITFunction.run returns the kernel
        compiled._init_handles()
        from triton.runtime.driver import driver

        dev = driver.active.get_current_device()
        stream = driver.active.get_current_stream(dev)

        def direct():
            compiled.run(
                4,
                1,
                1,
                stream,
                compiled.function,
                compiled.packed_metadata,
                None,
                None,
                None,
                x,
                NUMEL,
                1024,
            )

        cases["triton: compiled.run(...) (binder skipped)"] = direct
        cases["cuda: current_stream lookup"] = lambda: driver.active.get_current_stream(dev)
    return {name: per_call_us(fn) for name, fn in cases.items()}


def op_cases() -> dict:
    g = torch.ones(NUMEL, device=DEVICE)
    x1 = _leaf(NUMEL)
    xT, gT = _leaf(T, NUMEL // T), torch.ones(T, NUMEL // T, device=DEVICE)
    neuron = EMPFNeuron(T, step_mode="s", impl="triton").to(DEVICE)
    K = 4096 if DEVICE == "cuda" else 64  # the interpreter is slow: a CPU run only checks the code
    w = torch.randn(K, K, device=DEVICE)
    packed = pack_weight(w, 1)
    a16 = torch.randn(1, K, device=DEVICE, dtype=torch.float16)
    a32 = a16.float()
    w16 = w.half()

    def module_steps():
        reset_net(neuron)
        for _ in range(T):
            neuron(x1).backward(g)

    empf_step = _online_step()

    def relu_fb():
        torch.relu(x1).backward(g)

    cases = {
        "relu fwd+bwd (yardstick)": relu_fb,
        "empf_neuron fwd (T=4, float params)": lambda: _nograd(
            lambda: empf_neuron(xT, decay=0.5, threshold=0.5, impl="triton")
        ),
        "empf_neuron fwd+bwd (T=4, float params)": lambda: empf_neuron(
            xT, decay=0.5, threshold=0.5, impl="triton"
        )[0].backward(gT),
        "empf_neuron_step fwd+bwd": empf_step,
        "EMPFNeuron: reset + 4 steps, backward after each": module_steps,
        "binary_matmul M=1 N=K=4096 fp32 (no grad)": lambda: _nograd(
            lambda: binary_matmul(a32, packed, impl="triton")
        ),
        "cuBLAS F.linear M=1 N=K=4096 fp16 (no grad)": lambda: _nograd(
            lambda: torch.nn.functional.linear(a16, w16)
        ),
    }
    from empf_triton.kernels import _launch

    out = {}
    for name, fn in cases.items():
        out[name] = per_call_us(fn)
        if DEVICE == "cuda" and ("empf" in name or "EMPF" in name or "binary" in name):
            _launch.ENABLED = False  # Triton's own launch path, for comparison
            try:
                out[name + " [Triton's launch path]"] = per_call_us(fn)
            finally:
                _launch.ENABLED = True
    return out


def python_profile(out: Path) -> None:
    """cProfile of the online step (fwd+bwd), top functions by own time."""
    import cProfile
    import io
    import pstats

    step = _online_step()
    for _ in range(10):
        step()
    sync()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(200):
        step()
    sync()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(30)
    (out / "profile_cprofile_step.txt").write_text(buf.getvalue())


def _online_step():
    """One online step's call: `empf_neuron_step` forward + backward on 4096 elements."""
    x1, v = _leaf(NUMEL), _leaf(NUMEL)
    g = torch.ones(NUMEL, device=DEVICE)

    def step():
        s, _ = empf_neuron_step(x1, v, decay=0.5, threshold=0.5, impl="triton")
        s.backward(g)

    return step


def _nograd(fn):
    with torch.no_grad():
        return fn()


def profile_tables(out: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    step = _online_step()
    xT, gT = _leaf(T, NUMEL // T), torch.ones(T, NUMEL // T, device=DEVICE)

    def fused():
        empf_neuron(xT, decay=0.5, threshold=0.5, impl="triton")[0].backward(gT)

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    for name, fn in (("step", step), ("fused", fused)):
        for _ in range(3):
            fn()
        sync()
        with profile(activities=acts) as prof:
            for _ in range(50 if DEVICE == "cuda" else 3):
                fn()
            sync()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        (out / f"profile_{name}.txt").write_text(table)


def model_case(out: Path) -> dict:
    import logging

    from empf_triton.models import build_model, set_step_mode

    res: dict = {}
    log_path = out / "profile_model_compile.txt"
    handler = logging.FileHandler(log_path)
    for name in ("torch._dynamo", "torch._inductor"):
        logging.getLogger(name).addHandler(handler)
    torch._logging.set_logs(perf_hints=True, graph_breaks=True, recompiles=True, cudagraphs=True)
    model = build_model("resnet18", in_shape=(3, 32, 32), num_classes=10, T=T).to(DEVICE).eval()
    set_step_mode(model, "m")
    x = torch.rand(T, 1, 3, 32, 32, device=DEVICE)

    def run(m):
        reset_net(m)
        with torch.no_grad():
            return m(x)

    res["eager"] = per_call_us(lambda: run(model), n=20)
    compiled = torch.compile(model, mode="reduce-overhead")
    t0 = time.perf_counter()
    for _ in range(3):
        run(compiled)
    sync()
    res["compile_s"] = time.perf_counter() - t0
    res["reduce-overhead"] = per_call_us(lambda: run(compiled), n=20)
    from torch._dynamo.utils import counters

    res["counters"] = {k: dict(v) for k, v in counters.items() if v}
    handler.flush()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--model", action="store_true", help="also ResNet-18 B=1 under reduce-overhead")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "torch": torch.__version__,
        "commit": os.environ.get("EMPF_COMMIT", "unknown"),
    }
    import triton

    res["triton"] = triton.__version__

    def save() -> list[str]:
        """Write what is measured so far: the stage's time limit (SIGINT, a KeyboardInterrupt
        that nothing here catches) may stop the run in any later section."""
        (args.out / "profile_host.json").write_text(json.dumps(res, indent=1, default=str))
        lines = [
            f"# Host profile on {res['device']} (torch {res['torch']}, triton {res['triton']})",
            "",
            "| call | back to back µs | synced µs |",
            "|---|---|---|",
        ]
        for group in ("launch", "ops"):
            for name, r in res.get(group, {}).items():
                lines.append(
                    f"| {name} | {r['back_to_back_us']:.1f} | {r['synced_median_us']:.1f} |"
                )
        if "model" in res:
            m = res["model"]
            lines += [
                "",
                f"ResNet-18 B=1 T=4 eager: {m['eager']}",
                f"reduce-overhead: {m['reduce-overhead']} (compile {m['compile_s']:.1f} s)",
                f"counters: {m['counters']}",
            ]
        if "model_error" in res:
            lines += ["", f"model case failed: {res['model_error']}"]
        (args.out / "profile_host.md").write_text("\n".join(lines) + "\n")
        return lines

    res["launch"] = launch_cases()
    save()
    res["ops"] = op_cases()
    print("\n".join(save()), flush=True)
    profile_tables(args.out)
    python_profile(args.out)
    if args.model:
        try:
            res["model"] = model_case(args.out)
        except Exception as e:  # the counters so far are still worth having
            res["model_error"] = f"{type(e).__name__}: {e}"
        print("\n".join(save()[-4:]))


if __name__ == "__main__":
    main()
