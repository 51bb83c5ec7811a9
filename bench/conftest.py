"""Shared set-up of the benchmarks: device choice, timing, memory probes, environment info.

Benchmarks time real kernels: Triton runs only on CUDA (the interpreter is not a performance
target), so this conftest never sets `TRITON_INTERPRET`, refuses to run with it on a CUDA device,
and refuses `EMPF_POISON_EMPTY=1` (the tests' NaN-filling of outputs would be timed). Run `bench/`
on its own, never in one pytest call with `tests/`.

Environment knobs (all optional):
    EMPF_BENCH_DEVICE     "cuda" or "cpu" (default: cuda when available).
    EMPF_BENCH_N          elements per time step (default 2^21 on CUDA, 2^14 on CPU).
    EMPF_BENCH_T          comma-separated time steps (default 1,2,4,8,16,32).
    EMPF_BENCH_COMPILE_T  time steps at which torch.compile(reference) runs: "all", "none" or a
                          list (default: all on CUDA, none on CPU, where inductor takes ~30 s to
                          start and seconds per shape).
    EMPF_BENCH_TARGET_S   timed seconds per case (default 0.25 on CUDA, 0.05 on CPU).
    EMPF_BENCH_THREADS    CPU intra-op threads (default 1: stable timings on shared machines).
    EMPF_BENCH_FALLBACK   "1": use the built-in timing runner below instead of pytest-benchmark
                          (automatic when pytest-benchmark is not installed; with it installed,
                          also pass `-p no:benchmark`). It writes the same JSON shape to
                          `--benchmark-json`.
    EMPF_COMMIT           commit id to record when the checkout has no .git (copied trees).

Fixtures: `bench_device` (str) and `bench_tools` (`BenchTools`: sync, saved-for-backward bytes,
CUDA peak memory, and `run`, which times a case with `benchmark.pedantic` and fills extra_info).
"""

from __future__ import annotations

import datetime
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

os.environ.setdefault("EMPF_POISON_EMPTY", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
HAS_CUDA = torch.cuda.is_available()
DEVICE = os.environ.get("EMPF_BENCH_DEVICE", "cuda" if HAS_CUDA else "cpu")
ON_CUDA = DEVICE.startswith("cuda")
USE_FALLBACK = (
    os.environ.get("EMPF_BENCH_FALLBACK", "0") == "1"
    or importlib.util.find_spec("pytest_benchmark") is None
)


# ------------------------------------------------------------------------------- configuration


def env_ints(name: str, default: Iterable[int]) -> list[int]:
    """A comma-separated list of ints from the environment ("" or "none" = empty)."""
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    raw = raw.strip().lower()
    if raw in ("", "none", "0"):
        return []
    return [int(x) for x in raw.split(",") if x.strip()]


BENCH_T: list[int] = env_ints("EMPF_BENCH_T", [1, 2, 4, 8, 16, 32])
BENCH_N: int = int(os.environ.get("EMPF_BENCH_N", 1 << 21 if ON_CUDA else 1 << 14))
_compile_raw = os.environ.get("EMPF_BENCH_COMPILE_T", "all" if ON_CUDA else "none").strip().lower()
COMPILE_T: list[int] = BENCH_T if _compile_raw == "all" else env_ints("EMPF_BENCH_COMPILE_T", [])
TARGET_S: float = float(os.environ.get("EMPF_BENCH_TARGET_S", 0.25 if ON_CUDA else 0.05))
# CPU timings with several intra-op threads on a shared or small machine stall for ~100 ms at
# OpenMP barriers; one thread gives stable numbers (the CPU is not the performance target).
if not ON_CUDA:
    torch.set_num_threads(int(os.environ.get("EMPF_BENCH_THREADS", "1")))


def compile_skip_reason(T: int) -> str | None:
    """Why torch.compile(reference) is not benchmarked at this T (None: it is)."""
    if T in COMPILE_T:
        return None
    if not ON_CUDA and _compile_raw == "none":
        return (
            "torch.compile on CPU works but compiles slowly (~30 s cold, seconds per shape); "
            "set EMPF_BENCH_COMPILE_T to include it"
        )
    return f"torch.compile only at T in EMPF_BENCH_COMPILE_T={COMPILE_T}"


#: On a CPU, Triton cases run only as a harness check under TRITON_INTERPRET=1 (tiny N advised).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
TRITON_SKIP = (
    "Triton benchmarks need CUDA (the interpreter is not a performance target; "
    "TRITON_INTERPRET=1 runs them on the CPU as a harness check)"
)


def triton_skip_reason() -> str | None:
    """Why the Triton cases do not run here (None: they do)."""
    return None if ON_CUDA or INTERPRET else TRITON_SKIP


def raise_recompile_limit(limit: int = 256) -> None:
    """One reference function is compiled for many (T, dtype, mode) keys: without this, dynamo
    gives up after 8 recompiles and silently runs eager."""
    cfg = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(cfg, name):
            setattr(cfg, name, max(getattr(cfg, name), limit))
    if hasattr(cfg, "accumulated_recompile_limit"):
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 4 * limit)


# ---------------------------------------------------------------------------- environment info


def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine() or "unknown")


def environment_info() -> dict:
    """Device, versions and commit; goes into the JSON's machine_info["empf"].

    The triton version is read from package metadata so that triton is not imported here.
    """
    commit = os.environ.get("EMPF_COMMIT") or _git("rev-parse", "--short=12", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    info = {
        "device": torch.cuda.get_device_name() if ON_CUDA else _cpu_name(),
        "device_type": "cuda" if ON_CUDA else "cpu",
        "torch": torch.__version__,
        "triton": _version("triton", "pytorch-triton"),
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "commit": commit or "unknown",
        "commit_dirty": bool(dirty) if dirty is not None else None,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "autotune": os.environ.get("EMPF_AUTOTUNE", "1"),
        "triton_interpreter": INTERPRET,
        "torch_threads": torch.get_num_threads(),
        "n_default": BENCH_N,
    }
    if ON_CUDA:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            gpu_memory_bytes=props.total_memory,
        )
    return info


_ENV_INFO: dict | None = None


def env_info() -> dict:
    global _ENV_INFO
    if _ENV_INFO is None:
        _ENV_INFO = environment_info()
    return _ENV_INFO


# --------------------------------------------------------------------------------- measurement


def sync() -> None:
    """Wait for queued CUDA work (no-op on the CPU), so a timer sees the kernels' end."""
    if ON_CUDA:
        torch.cuda.synchronize()


def saved_for_backward(fn: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> dict:
    """Run `fn` (a forward) once and count what autograd saves for backward.

    Storages are counted once each (views of one buffer are one buffer). `saved_bytes` leaves out
    the storages of `exclude` (parameters, which live on anyway), so it is the activation memory
    that backward keeps alive; `saved_bytes_all` counts everything saved.
    """
    excluded = set()
    for t in exclude:
        if isinstance(t, torch.Tensor):
            excluded.add(t.untyped_storage().data_ptr())
    seen: dict[int, int] = {}
    count = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        count[0] += 1
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):  # storage-less tensors (none expected)
            seen[-count[0]] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    sync()
    del out
    return {
        "saved_bytes": sum(n for p, n in seen.items() if p not in excluded),
        "saved_bytes_all": sum(seen.values()),
        "saved_tensors": count[0],
    }


def cuda_peak_bytes(fn: Callable[[], object]) -> int | None:
    """Peak CUDA memory allocated while `fn` runs, above what was allocated before (None on CPU)."""
    if not ON_CUDA:
        return None
    gc.collect()
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    sync()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    return int(peak)


class BenchTools:
    """Helpers handed to the benchmark files through the `bench_tools` fixture."""

    device = DEVICE
    on_cuda = ON_CUDA

    @staticmethod
    def sync() -> None:
        sync()

    saved_for_backward = staticmethod(saved_for_backward)
    cuda_peak_bytes = staticmethod(cuda_peak_bytes)

    @staticmethod
    def run(
        benchmark,
        fn: Callable[[], object],
        *,
        forward: Callable[[], object] | None = None,
        params: Iterable[torch.Tensor] = (),
        bytes_moved: int | None = None,
        flops: int | None = None,
        warmup: int = 2,
        **info,
    ) -> None:
        """Time `fn` with `benchmark.pedantic` and record what the report needs in extra_info.

        `fn` runs one case (the forward, or forward + backward) and returns its outputs; the timed
        call synchronises CUDA before it returns. Before timing, `fn` runs `warmup` times
        (compilation, autotuning), once to size the number of rounds (about `TARGET_S` in all),
        and once more for the CUDA peak memory. `forward` (a grad-recording forward of the same
        case) is run once under saved-tensor hooks; the storages of `params` (learnable
        parameters, kept anyway) are left out of its `saved_bytes`. Saved inputs do count: in a
        network the input current is an activation that only lives on if the neuron saves it.
        `bytes_moved` / `flops` give GB/s and TFLOP/s from the median time.
        """

        def timed() -> None:
            fn()
            sync()

        for _ in range(warmup):
            timed()
        t0 = time.perf_counter()
        timed()
        estimate = max(time.perf_counter() - t0, 1e-6)
        rounds = int(min(500, max(5, TARGET_S / estimate)))

        extra: dict = {"device": env_info()["device"], "device_type": env_info()["device_type"]}
        extra.update(info)
        extra["cuda_peak_bytes"] = cuda_peak_bytes(fn)
        if forward is not None:
            extra.update(saved_for_backward(forward, params))

        sync()
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        median = benchmark.stats.stats.median
        extra["time_median_s"] = median
        if bytes_moved is not None:
            extra["bytes_moved"] = int(bytes_moved)
            extra["gbps"] = bytes_moved / median / 1e9
        if flops is not None:
            extra["flops"] = int(flops)
            extra["tflops"] = flops / median / 1e12
        benchmark.extra_info.update(extra)


# ------------------------------------------------------------------------------- pytest hooks


def pytest_configure(config):
    if ON_CUDA and not HAS_CUDA:
        raise pytest.UsageError("EMPF_BENCH_DEVICE=cuda but torch sees no CUDA device")
    if ON_CUDA and os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise pytest.UsageError(
            "TRITON_INTERPRET=1 with a CUDA device: benchmarks must time compiled kernels; unset it"
        )
    if os.environ.get("EMPF_POISON_EMPTY", "0") == "1":
        raise pytest.UsageError(
            "EMPF_POISON_EMPTY=1 (set by tests/conftest.py) would be timed: run bench/ in its own "
            "pytest call, not together with tests/"
        )
    if USE_FALLBACK:
        config._empf_fallback_results = []


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["empf"] = env_info()


@pytest.fixture(autouse=True)
def _free_memory():
    """Each case allocates up to a few GB on CUDA: free it before the next case starts."""
    yield
    if ON_CUDA:
        gc.collect()
        torch.cuda.empty_cache()


@pytest.fixture(scope="session")
def bench_device() -> str:
    return DEVICE


@pytest.fixture(scope="session")
def bench_tools() -> BenchTools:
    return BenchTools()


# ------------------------------------------------------------- fallback without pytest-benchmark


class _Stats:
    """The subset of pytest-benchmark's Stats the benchmark files and report.py read."""

    def __init__(self, data: list[float]):
        self.data = data
        srt = sorted(data)
        n = len(srt)
        self.rounds = n
        self.min, self.max = srt[0], srt[-1]
        self.mean = statistics.fmean(srt)
        self.median = statistics.median(srt)
        self.stddev = statistics.stdev(srt) if n > 1 else 0.0
        q = statistics.quantiles(srt, n=4) if n > 1 else [srt[0]] * 3
        self.q1, self.q3 = q[0], q[2]
        self.iqr = self.q3 - self.q1
        self.total = sum(srt)
        self.ops = 1.0 / self.mean if self.mean > 0 else math.inf

    def as_dict(self) -> dict:
        keys = ("min", "max", "mean", "stddev", "rounds", "median", "iqr", "q1", "q3", "total")
        d = {k: getattr(self, k) for k in keys}
        d.update(ops=self.ops, iterations=1, data=self.data)
        return d


class _Metadata:
    def __init__(self, stats: _Stats):
        self.stats = stats


class FallbackBenchmark:
    """A stand-in for pytest-benchmark's `benchmark` fixture: `pedantic`, `__call__`,
    `extra_info` and `stats.stats.median`, with perf_counter timing of each round."""

    def __init__(self, node):
        self.node = node
        self.name = node.name
        self.extra_info: dict = {}
        self.stats: _Metadata | None = None

    def pedantic(
        self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1
    ):
        kwargs = kwargs or {}
        result = None
        for _ in range(warmup_rounds):
            result = target(*args, **kwargs)
        data = []
        for _ in range(rounds):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            for _ in range(iterations):
                result = target(*args, **kwargs)
            data.append((time.perf_counter() - t0) / iterations)
        self.stats = _Metadata(_Stats(data))
        return result

    def __call__(self, fn, *args, **kwargs):
        return self.pedantic(fn, args, kwargs, rounds=10, warmup_rounds=1)

    def as_json(self) -> dict:
        callspec = getattr(self.node, "callspec", None)
        params = (
            {
                k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
                for k, v in callspec.params.items()
            }
            if callspec is not None
            else None
        )
        return {
            "group": None,
            "name": self.node.name,
            "fullname": self.node.nodeid,
            "params": params,
            "param": callspec.id if callspec is not None else None,
            "extra_info": self.extra_info,
            "options": {"timer": "perf_counter", "runner": "empf fallback"},
            "stats": self.stats.stats.as_dict(),
        }


if USE_FALLBACK:

    def pytest_addoption(parser):
        group = parser.getgroup("empf benchmark fallback")
        group.addoption("--benchmark-json", action="store", default=None, metavar="PATH")

    @pytest.fixture
    def benchmark(request):
        bm = FallbackBenchmark(request.node)
        yield bm
        if bm.stats is not None:
            request.config._empf_fallback_results.append(bm.as_json())

    def pytest_sessionfinish(session, exitstatus):
        path = session.config.getoption("--benchmark-json")
        if not path:
            return
        doc = {
            "machine_info": {
                "node": platform.node(),
                "processor": platform.processor(),
                "machine": platform.machine(),
                "python_version": platform.python_version(),
                "empf": env_info(),
            },
            "commit_info": {"id": env_info()["commit"], "dirty": env_info()["commit_dirty"]},
            "benchmarks": session.config._empf_fallback_results,
            "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "version": "empf-fallback-1",
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(doc, indent=2))
