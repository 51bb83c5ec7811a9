"""Every kernel variant compiles for a Hopper GPU (sm_90), checked on a machine without one.

Runs tests/gpu_compile.py in a subprocess with the interpreter off (see its docstring).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("gpu_compile.py")
OPS = ["neuron", "lif", "spikes", "binary"]


@pytest.mark.parametrize("op", OPS)
def test_kernels_compile_for_sm90(op):
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "0", "EMPF_AUTOTUNE": "1"}
    out = subprocess.run(
        [sys.executable, str(SCRIPT), op], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "OK:" in out.stdout
