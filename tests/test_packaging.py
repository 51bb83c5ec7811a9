"""The wheel ships the top-level kernels/ folder inside the package, and importing the package
does not import triton (the reference path works where triton is missing)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_kernels_and_every_subpackage(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("empf_triton-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for kernel in (ROOT / "kernels").glob("*.py"):
        assert f"empf_triton/kernels/{kernel.name}" in names
    for pkg in (ROOT / "empf_triton").rglob("__init__.py"):
        rel = pkg.relative_to(ROOT).as_posix()
        assert rel in names, f"{rel} missing from the wheel (add it to pyproject's packages)"


def test_import_does_not_import_triton():
    code = (
        "import sys, torch, empf_triton;"
        "s, v = empf_triton.empf_neuron(torch.randn(3, 5), decay=0.5, threshold=0.5);"
        "assert 'triton' not in sys.modules, 'triton imported eagerly';"
        "print(s.shape)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([3, 5])" in out.stdout
