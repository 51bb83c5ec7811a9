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

Fixture API (every file in bench/ uses it; `from conftest import ...` for the constants):

    def test_bench_x(benchmark, bench_tools):
        x = torch.randn(..., device=bench_tools.device)
        bench_tools.run(                       # alias: bench_tools.case
            benchmark,
            lambda: my_op(x, impl="triton"),   # the timed call (forward, or forward + backward)
            check=lambda: check_vs_ref(...),   # REQUIRED when impl starts with "triton": runs once
                                               # before timing, raises AssertionError if wrong;
                                               # its return value: extra_info["check"] (a dict
                                               # is merged into extra_info)
            forward=lambda: my_op(x),          # optional: grad-recording forward -> saved_bytes
            params=(w,),                       # storages left out of saved_bytes
            bytes_moved=..., flops=...,        # optional: -> gbps / tflops
            graph=True,                        # also capture in a CUDA graph and replay it
            op="my_op", impl="triton", T=4,    # anything else -> extra_info (report.py needs
        )                                      # op and impl)

    `run` records in extra_info: wall_time_s (= time_median_s; perf_counter + synchronize per
    call, from pytest-benchmark or, when that is disabled as under xdist, from its own loop),
    device_time_s (CUDA events, L2 flushed before each call), graph_wall_time_s and
    graph_device_time_s (the call captured in a torch.cuda.CUDAGraph and replayed) or
    graph_skip_reason, cuda_peak_bytes, saved_bytes, gbps (+ gbps_basis), tflops, rounds, and
    `measured`: a sentence per recorded number saying how it was measured.
    Other fixtures/helpers: `bench_device` (str); `bench_tools.sync()`, `.device_time(fn, reps)`,
    `.capture_graph(fn)`, `.saved_for_backward(fn, exclude)`, `.cuda_peak_bytes(fn)`;
    `bench_skip(reason)` for a baseline that cannot run here. Skipped cases and their reasons go
    into the JSON as `empf_skipped`, which report.py lists as "not measured".
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


#: L2 flush buffer for device timing: larger than any current GPU's L2 (H200: 60 MiB).
FLUSH_BYTES = 256 << 20
_FLUSH: torch.Tensor | None = None


def release_flush_buffer() -> None:
    """Free the L2 flush buffer (made again by the next device timing): a total-memory
    measurement must not count the harness's 256 MiB."""
    global _FLUSH
    if _FLUSH is not None:
        _FLUSH = None
        torch.cuda.empty_cache()


def _flush_l2() -> None:
    """Overwrite a 256 MiB buffer so the next kernel starts with a cold L2 (as do_bench does)."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(FLUSH_BYTES, dtype=torch.int8, device="cuda")
    _FLUSH.zero_()


def device_time(fn: Callable[[], object], reps: int, *, flush: bool = True) -> float | None:
    """Median GPU seconds of one call of `fn`: CUDA events recorded around each call, L2 flushed
    before each (outside the events). None on the CPU. Host overhead shows only where the GPU
    waits for the host (the events measure the GPU stream, not the Python call)."""
    if not ON_CUDA:
        return None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush:
            _flush_l2()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def wall_times(fn: Callable[[], object], rounds: int) -> list[float]:
    """Wall seconds of `rounds` calls of `fn`, each followed by a CUDA synchronise."""
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def capture_graph(fn: Callable[[], object]) -> tuple[object | None, str | None]:
    """Capture one call of `fn` in a `torch.cuda.CUDAGraph` (after warm-up on a side stream).

    Returns (graph, None), or (None, reason) where the case cannot be captured (CPU, host syncs,
    data-dependent shapes, ...). The reason is recorded in extra_info, never hidden.
    """
    if not ON_CUDA:
        return None, "no CUDA device (CUDA graphs need one)"
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graph.replay()
        torch.cuda.synchronize()
        return graph, None
    except Exception as exc:  # noqa: BLE001 - any capture failure is a recorded result
        torch.cuda.synchronize()
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


MEASURED = {
    "wall_time_s": (
        "median wall seconds of one call including Python dispatch and launch: "
        "time.perf_counter() around fn() + torch.cuda.synchronize()"
    ),
    "device_time_s": (
        "median GPU seconds of one call: CUDA events around fn(), L2 flushed before each "
        "call by zeroing a 256 MiB buffer outside the events"
    ),
    "graph_wall_time_s": (
        "median wall seconds of one CUDAGraph.replay() + synchronize of the captured call "
        "(launch overhead removed)"
    ),
    "graph_device_time_s": "median GPU seconds of one replay (CUDA events, L2 flushed before each)",
    "gbps": "bytes_moved / device_time_s on CUDA, / wall_time_s on the CPU (see gbps_basis)",
    "saved_bytes": (
        "storages saved for backward in one grad-recording forward "
        "(torch.autograd.graph.saved_tensors_hooks), parameters left out"
    ),
    "cuda_peak_bytes": "torch.cuda.max_memory_allocated during one call, above the level before it",
}


def _rounds(estimate_s: float) -> int:
    return int(min(500, max(5, TARGET_S / max(estimate_s, 1e-6))))


class BenchTools:
    """Helpers handed to the benchmark files through the `bench_tools` fixture."""

    device = DEVICE
    on_cuda = ON_CUDA

    @staticmethod
    def sync() -> None:
        sync()

    saved_for_backward = staticmethod(saved_for_backward)
    cuda_peak_bytes = staticmethod(cuda_peak_bytes)
    device_time = staticmethod(device_time)
    capture_graph = staticmethod(capture_graph)

    @staticmethod
    def run(
        benchmark,
        fn: Callable[[], object],
        *,
        check: Callable[[], object] | None = None,
        forward: Callable[[], object] | None = None,
        params: Iterable[torch.Tensor] = (),
        bytes_moved: int | None = None,
        flops: int | None = None,
        graph: bool = True,
        warmup: int = 2,
        **info,
    ) -> dict:
        """Check, then time one case and record everything in `benchmark.extra_info`.

        Order: `check()` (must raise AssertionError on a wrong result; what it returns is stored
        as extra_info["check"], or merged into extra_info if a dict; required when info["impl"]
        starts with "triton"), `warmup` calls
        of `fn` (compile, autotune), one call to size the rounds (about TARGET_S of timing),
        wall time (pytest-benchmark's pedantic when enabled, else the same loop here: xdist or
        --benchmark-disable leave pytest-benchmark's stats empty), device time (CUDA events,
        L2 flushed), CUDA peak memory, saved-for-backward bytes of `forward` (a grad-recording
        forward; storages of `params` left out), then the case captured in a CUDA graph and
        replayed (`graph=False` for cases that must not be, e.g. a whole optimizer loop).
        `bytes_moved` / `flops` give GB/s and TFLOP/s. Returns the extra_info dict.
        """
        impl = str(info.get("impl", ""))
        if impl.startswith("triton") and check is None:
            raise ValueError(
                f"bench case with impl={impl!r} has no check: every Triton case is compared with "
                "the reference before it is timed"
            )
        extra: dict = {"device": env_info()["device"], "device_type": env_info()["device_type"]}
        extra.update(info)
        if check is not None:
            result = check()
            if isinstance(result, dict):
                extra.update(result)
                result = None
            extra["check"] = result if result is not None else "passed"
            sync()

        def timed() -> None:
            fn()
            sync()

        for _ in range(warmup):
            timed()
        t0 = time.perf_counter()
        timed()
        rounds = _rounds(time.perf_counter() - t0)

        sync()
        benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        meta = getattr(benchmark, "stats", None)
        if meta is not None and getattr(meta, "stats", None) is not None:
            wall = meta.stats.median
            extra["wall_time_source"] = "pytest-benchmark"
        else:
            wall = statistics.median(wall_times(fn, rounds))
            extra["wall_time_source"] = "bench/conftest.py (pytest-benchmark disabled)"
        extra["time_median_s"] = wall
        extra["wall_time_s"] = wall
        extra["rounds"] = rounds
        dev = device_time(fn, rounds)
        extra["device_time_s"] = dev
        extra["cuda_peak_bytes"] = cuda_peak_bytes(fn)
        if forward is not None:
            extra.update(saved_for_backward(forward, params))

        if graph:
            g, reason = capture_graph(fn)
            if g is not None:
                extra["graph_wall_time_s"] = statistics.median(wall_times(g.replay, rounds))
                extra["graph_device_time_s"] = device_time(g.replay, rounds)
                del g
            else:
                extra["graph_skip_reason"] = reason
        else:
            extra["graph_skip_reason"] = "not captured: the case asked for graph=False"

        basis = dev if dev is not None else wall
        extra["gbps_basis"] = "device_time_s" if dev is not None else "wall_time_s"
        if bytes_moved is not None:
            extra["bytes_moved"] = int(bytes_moved)
            extra["gbps"] = bytes_moved / basis / 1e9
            extra["gbps_wall"] = bytes_moved / wall / 1e9
        if flops is not None:
            extra["flops"] = int(flops)
            extra["tflops"] = flops / basis / 1e12
        extra["measured"] = {k: v for k, v in MEASURED.items() if extra.get(k) is not None}
        benchmark.extra_info.update(extra)
        _TIMED.append(extra)
        return extra

    case = run


def bench_skip(reason: str) -> None:
    """Skip a case with a reason that report.py lists (a baseline whose package is missing)."""
    pytest.skip(reason)


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
    else:
        config.pluginmanager.register(_UnfinishedCases(), "empf-unfinished-cases")


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_generate_machine_info(config):
    """pytest-benchmark's own version asks py-cpuinfo, whose helper subprocess hung for over 20 s
    at the end of every stage on the GPU machine (2026-12-04): the platform module says enough."""
    return {
        "node": platform.node(),
        "processor": platform.processor(),
        "machine": platform.machine(),
        "python_implementation": platform.python_implementation(),
        "python_version": platform.python_version(),
        "release": platform.release(),
        "system": platform.system(),
        "cpu": {"count": os.cpu_count()},
    }


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["empf"] = env_info()


_SKIPPED: list[dict] = []
_TIMED: list[dict] = []  # the cases timed in this session (pytest-benchmark then writes the JSON)


def pytest_runtest_logreport(report):
    """Remember every skipped case and why, so the JSON (and report.py) can say what was not
    measured instead of silently leaving it out."""
    if report.skipped:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPPED.append({"nodeid": report.nodeid, "reason": reason.removeprefix("Skipped: ")})


_JSON_WRITTEN: list[bool] = []  # pytest-benchmark wrote the session's JSON (something was timed)


@pytest.hookimpl(optionalhook=True)
def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["empf_skipped"] = list(_SKIPPED)
    _JSON_WRITTEN.append(True)


class _UnfinishedCases:
    """A plugin (registered in pytest_configure: conftest.py has its own sessionfinish) whose
    wrapper runs before pytest-benchmark writes its JSON. A stage stopped by its time limit
    (SIGINT) may stop a case before its first timed round: that case has no data, and
    pytest-benchmark then fails on it (`min()` of an empty sequence) and writes no JSON at all,
    losing every finished case of the stage. Such cases are dropped; a case stopped after some
    rounds keeps them and says so in its extra_info (which the harness fills only when a case
    finishes)."""

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_sessionfinish(self, session, exitstatus):
        bs = getattr(session.config, "_benchmarksession", None)
        if bs is not None:
            bs.benchmarks[:] = [b for b in bs.benchmarks if b]
            for b in bs.benchmarks:
                if not b.extra_info:
                    b.extra_info["interrupted"] = "stopped by the time limit before it finished"
        yield


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    """pytest-benchmark writes no JSON when every case was skipped: write one with no benchmarks,
    so the skipped cases and their reasons still reach the report."""
    if USE_FALLBACK:
        _write_fallback_json(session)
        return
    try:
        path = session.config.getoption("benchmark_json")
    except ValueError:
        return
    # pytest-benchmark writes the file only when a case was timed (by bench_tools or by its own
    # `benchmark` fixture): then it is left alone. The option is a path in some versions and an
    # open file in others.
    if path and _SKIPPED and not (_TIMED or _JSON_WRITTEN):
        target = path if isinstance(path, (str, os.PathLike)) else path.name
        _write_doc(Path(target), [], "empf-skipped-only-1")


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


def _write_fallback_json(session) -> None:
    path = session.config.getoption("--benchmark-json")
    if path:
        _write_doc(Path(path), session.config._empf_fallback_results, "empf-fallback-1")


def _write_doc(path: Path, benchmarks: list, version: str) -> None:
    doc = {
        "machine_info": {
            "node": platform.node(),
            "processor": platform.processor(),
            "machine": platform.machine(),
            "python_version": platform.python_version(),
            "empf": env_info(),
        },
        "commit_info": {"id": env_info()["commit"], "dirty": env_info()["commit_dirty"]},
        "benchmarks": benchmarks,
        "empf_skipped": list(_SKIPPED),
        "datetime": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "version": version,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2))


def randomize_model(model: torch.nn.Module) -> torch.nn.Module:
    """Trained-looking BN statistics and neuron parameters, so that spikes are neither all zero
    nor everywhere (a freshly built net's BN is the identity)."""
    from empf_triton.nn import EMPFNeuron

    g = torch.Generator().manual_seed(0)

    def u(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                u(m.running_mean, -0.3, 0.3)
                u(m.running_var, 0.5, 2.0)
                u(m.weight, 0.5, 1.5)
                u(m.bias, -0.2, 0.5)
            elif isinstance(m, EMPFNeuron):
                u(m.threshold_logit, -1, 1)
                if m.decay_logit is not None:
                    u(m.decay_logit, -1, 1)
    return model.eval()
