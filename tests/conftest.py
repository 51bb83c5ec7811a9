"""Test set-up. The first lines must run before torch or triton is imported.

Without a CUDA device the Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1), and
library outputs allocated with `empty` are poisoned with NaN so an unwritten element fails a test.
"""

import os


def _has_cuda_device() -> bool:
    # Decided without importing torch (which must not import triton before this is set).
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


if not _has_cuda_device():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("EMPF_POISON_EMPTY", "1")
os.environ.setdefault("EMPF_AUTOTUNE", "0" if os.environ.get("TRITON_INTERPRET") == "1" else "1")

import pytest  # noqa: E402
import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# fp32 comparisons are against fp32/fp64 oracles: cuBLAS/cuDNN must not silently use TF32 (10-bit
# mantissa products) in the references and oracles the kernels are compared with.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_sessionstart(session):
    """Have dynamo map torch's functions to its tracing rules now, before any test patches one.
    It builds that map once per process (cached, keyed by the function objects): built while a
    test has `torch.compiler.is_compiling` or `torch.cuda.current_device` patched, it would miss
    the real function, and every later compile in the process would graph-break on it."""
    torch.compile(lambda t: t + torch.compiler.is_compiling(), backend="eager")(torch.zeros(1))


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def device() -> str:
    """Where kernel tests run: CUDA when present, else the CPU (kernels in the interpreter)."""
    return "cuda" if HAS_CUDA else "cpu"
