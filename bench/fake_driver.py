"""A Triton driver with no GPU behind it: kernels really compile (for sm_90), launches do nothing.

With it, a machine without a GPU runs the whole host path of a call as it runs on a GPU machine —
our validation and autograd code, Triton's autotuner, argument binder and cache lookups, and our
direct launcher (`kernels/_launch.py`) — up to the compiled kernel's launcher, which is a no-op
here. `bench/test_bench_overhead.py` uses it (when Triton's interpreter is off) to time what a call
costs the Python thread besides the kernel launch itself.

Only for measurement: the tensors are CPU tensors, outputs are never written, and the first call
of each kernel variant compiles it with ptxas (seconds; cached on disk afterwards).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

# What `CompiledKernel._init_handles` and the autotuner ask of a device (H200 figures).
_PROPS = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
          "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 3201000,
          "mem_bus_width": 6144}  # fmt: skip


class _Utils:
    def get_device_properties(self, device):
        return dict(_PROPS)

    def load_binary(self, name, kernel, shared, device):
        return 1, 1, 32, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module):
        pass


class _NoLaunch:
    def __init__(self, src, metadata):
        pass

    def __call__(self, *args, **kwargs):
        pass


class FakeCudaDriver:
    """The part of Triton's driver interface that compiling and launching uses."""

    def __init__(self):
        self.utils = _Utils()
        self.launcher_cls = _NoLaunch

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def set_current_device(self, device):
        pass

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_benchmarker(self):
        def bench(kernel_call, quantiles=None, **kwargs):
            kernel_call()  # compiles the config; every config then "takes" the same time
            return [1.0, 1.0, 1.0] if quantiles else 1.0

        return bench

    def get_empty_cache_for_benchmark(self):
        return torch.empty(16, dtype=torch.int8)

    def clear_cache(self, cache):
        pass


@contextlib.contextmanager
def fake_gpu() -> Iterator[None]:
    """Triton's driver replaced by `FakeCudaDriver`, CPU tensors accepted by `impl="triton"`, and
    the CUDA device and stream lookups of `kernels/_launch.py` answered with 0."""
    import empf_triton.ops._common as ops_common
    from empf_triton.kernels import _launch

    saved = (driver._active, torch.cuda.current_device, ops_common._interpreter_on, _launch._STREAM)
    driver.set_active(FakeCudaDriver())
    torch.cuda.current_device = lambda: 0
    ops_common._interpreter_on = lambda: True
    _launch._STREAM = lambda device: 0
    try:
        yield
    finally:
        driver._active = saved[0]
        torch.cuda.current_device = saved[1]
        ops_common._interpreter_on = saved[2]
        _launch._STREAM = saved[3]
