"""The wheel ships the top-level kernels/ folder inside the package, and importing the package
does not import triton (the reference path works where triton is missing)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


_NOT_SOURCE = shutil.ignore_patterns(
    ".git", "build", "dist", "*.egg-info", "__pycache__", ".ci-venv", ".venv", "wheels", "runs",
    "results", ".pytest_cache", ".benchmarks", "reports",
)  # fmt: skip


def test_wheel_contains_kernels_and_every_subpackage(tmp_path):
    # Build from a copy, with pip's temporary folders under tmp_path: setuptools writes build/
    # and *.egg-info next to the sources, which must not appear in the checkout, and nothing may
    # be left in the system temp directory.
    had_build = (ROOT / "build").exists()
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=_NOT_SOURCE, symlinks=True)
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    out = tmp_path / "wheel"
    env = dict(os.environ, TMPDIR=str(tmp), TEMP=str(tmp), TMP=str(tmp))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(out)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (ROOT / "build").exists() == had_build, "building the wheel left build/ in the checkout"
    (wheel,) = out.glob("empf_triton-*.whl")
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
