"""The README's API tour runs as written, so it cannot drift from the library. Without CUDA its
"cuda" device becomes the CPU and the CUDA-graph lines (which need a GPU) are left out."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def _api_tour() -> str:
    section = README.read_text(encoding="utf-8").split("\n## API tour\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_api_tour(tmp_path, monkeypatch):
    code = _api_tour()
    cuda = torch.cuda.is_available()
    if not cuda:
        code = code.replace('device="cuda"', 'device="cpu"').replace(".cuda()", "")
        code = "\n".join(
            line for line in code.splitlines() if "graphed(" not in line and "fast(" not in line
        )
    monkeypatch.chdir(tmp_path)  # the tour writes model.safetensors into the working folder
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)
    # decode(encode(spikes)) gives the 4-bit spikes back exactly
    assert torch.equal(ns["same"], ns["spikes"])
    assert ns["spikes"].shape == ns["x"].shape
    assert (tmp_path / "model.safetensors").is_file()
    assert ns["logits"].shape == ((1, 10) if cuda else (2, 10))
