"""`empf export`, `empf eval --deployed`, `empf report --deployed`: the main job end to end, and
one-line errors (exit status 2) for bad input."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from empf_triton import cli
from empf_triton.deploy import load

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMPF_DEBUG", raising=False)


def _error(capsys, argv, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def _accuracy(out: str) -> tuple[int, int]:
    m = re.search(r"test accuracy [0-9.]+% \((\d+)/(\d+)\)", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    """The README main job (MNIST-1D, mnist1d_cnn, binary weights, random-step online training),
    one epoch, trained through the CLI."""
    pytest.importorskip("mnist1d")
    run = tmp_path_factory.mktemp("mainjob") / "run"
    assert cli.main(["train", "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    return run


def test_main_job_deployed_gives_the_trained_accuracy(main_job, tmp_path, capsys):
    capsys.readouterr()
    out_file = tmp_path / "model.safetensors"
    ckpt = main_job / "best.pt"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out_file)]) == 0
    out = capsys.readouterr().out
    assert "exported mnist1d_cnn" in out and "export size" in out and "fp32 state_dict" in out
    assert cli.main(["eval", "--checkpoint", str(ckpt)]) == 0
    trained = _accuracy(capsys.readouterr().out)
    js = tmp_path / "ev.json"
    argv = ["eval", "--deployed", str(out_file), "--latency-runs", "2", "--json", str(js)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert _accuracy(out) == trained  # exactly the same number of correct predictions
    assert "paper accounting" in out and "usual SNN accounting" in out
    assert "latency at batch 1:" in out and "latency at batch 500:" in out
    rec = json.loads(js.read_text())
    assert rec["correct"] == trained[0] and rec["samples"] == 1000
    assert rec["sizes"]["vs_checkpoint"] > 1 and rec["energy"]["samples"] == 1000
    assert rec["energy"]["totals"]["sops"] > 0 and rec["energy"]["totals"]["macs"] > 0

    # the same predictions sample by sample, in process
    from empf_triton.data import load_dataset
    from empf_triton.train.checkpoint import load_checkpoint
    from empf_triton.train.loop import build_from_checkpoint
    from empf_triton.train.strategies import seq_inputs

    _, test, _ = load_dataset("mnist1d")
    model = build_from_checkpoint(load_checkpoint(ckpt)).eval()
    from empf_triton import reset_net
    from empf_triton.models import set_step_mode

    set_step_mode(model, "m")
    reset_net(model)
    with torch.no_grad():
        ref = model(seq_inputs(test.x, model.T, False)).float().cumsum(0)[-1].argmax(-1)
    dep = load(out_file)(test.x).argmax(-1)
    assert torch.equal(dep, ref)

    assert cli.main(["report", "--deployed", str(out_file), "--samples", "50", "--out", "r"]) == 0
    out = capsys.readouterr().out
    png = Path("r/model_layers.png")
    assert png.stat().st_size > 1000 and str(png) in out


def test_export_refuses_to_overwrite(main_job, tmp_path, capsys):
    out_file = tmp_path / "m.safetensors"
    out_file.write_bytes(b"keep")
    argv = ["export", "--checkpoint", str(main_job / "best.pt"), "--out", str(out_file)]
    _error(capsys, argv, "already exists")
    assert out_file.read_bytes() == b"keep"
    assert cli.main([*argv, "--overwrite"]) == 0
    assert load(out_file).T == 4


def test_export_never_replaces_its_own_checkpoint(main_job, tmp_path, capsys):
    """`--out` naming the checkpoint being exported (also through another spelling of the
    path, and with --overwrite) is refused before anything is written."""
    ckpt = tmp_path / "best.pt"
    ckpt.write_bytes((main_job / "best.pt").read_bytes())
    before = ckpt.read_bytes()
    for out in (ckpt, tmp_path / "sub" / ".." / "best.pt"):
        (tmp_path / "sub").mkdir(exist_ok=True)
        argv = ["export", "--checkpoint", str(ckpt), "--out", str(out), "--overwrite"]
        _error(capsys, argv, "is the checkpoint being exported")
        assert ckpt.read_bytes() == before


def test_eval_deployed_errors(main_job, tmp_path, capsys):
    good = tmp_path / "m.safetensors"
    assert cli.main(["export", "--checkpoint", str(main_job / "best.pt"), "--out", str(good)]) == 0
    capsys.readouterr()
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    flipped = bytearray(data)
    flipped[-10] ^= 0x10
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    _error(capsys, ["eval", "--deployed", "trunc.safetensors"], "truncated or corrupt")
    _error(capsys, ["eval", "--deployed", "flip.safetensors"], "SHA-256")
    _error(capsys, ["eval", "--deployed", "nothing.safetensors"], "no such file")
    _error(capsys, ["eval", "--deployed", str(main_job / "best.pt")], "not a safetensors")
    _error(capsys, ["eval"], "needs --checkpoint FILE or --deployed FILE")
    _error(
        capsys,
        ["eval", "--deployed", str(good), "--checkpoint", str(main_job / "best.pt")],
        "either --checkpoint or --deployed",
    )
    # options of the other kind of model are refused, not silently ignored
    for opt in (["--precision", "bf16"], ["--compile", "default"], ["--step-mode", "s"]):
        _error(capsys, ["eval", "--deployed", str(good), *opt], f"{opt[0]} applies to --checkpoint")
    ckpt = str(main_job / "best.pt")
    for opt in (["--latency-runs", "2"], ["--energy-samples", "10"]):
        _error(capsys, ["eval", "--checkpoint", ckpt, *opt], f"{opt[0]} applies to --deployed")
    pytest.importorskip("sklearn")
    _error(
        capsys,
        ["eval", "--deployed", str(good), "--dataset", "digits"],
        "inputs (1, 40) with 10 classes; dataset 'digits' has (64,)",
    )
    _error(capsys, ["report", "--deployed", "flip.safetensors"], "SHA-256")


def test_export_unknown_model_and_bad_checkpoint(tmp_path, capsys):
    from empf_triton.models import build_model
    from empf_triton.train.checkpoint import save_checkpoint

    m = build_model("digits_mlp", in_shape=(64,), num_classes=10, T=2)
    cfg = {"in_shape": [64], "num_classes": 10, "T": 2}
    save_checkpoint(tmp_path / "odd.pt", model=m, model_name="no_such_net", model_config=cfg)
    _error(
        capsys,
        ["export", "--checkpoint", str(tmp_path / "odd.pt"), "--out", "x.safetensors"],
        "unknown model 'no_such_net'",
    )
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    _error(
        capsys, ["export", "--checkpoint", str(tmp_path / "bad.pt"), "--out", "x.safetensors"],
        "bad.pt",
    )  # fmt: skip
    assert not Path("x.safetensors").exists()


def test_subprocess_export_error_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "empf_triton.cli", "eval", "--deployed", "missing.safetensors"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "empf eval: error: missing.safetensors: no such file"
    ]


def test_eval_deployed_event_data(tmp_path, capsys, monkeypatch):
    """Event data ([N, T, *] samples) through `empf eval --deployed`: the deployed model sees
    [T, N, *] frames and predicts what the trained model's evaluation predicts."""
    from helpers import randomize

    import empf_triton.data as data
    from empf_triton.data import ArrayDataset, DatasetInfo
    from empf_triton.deploy import export
    from empf_triton.models import build_model
    from empf_triton.train.strategies import evaluate, iterate_batches

    g = torch.Generator().manual_seed(1)
    x = (torch.rand(40, 2, 2, 16, 16, generator=g) < 0.3).float() * 3  # [N, T, C, H, W] counts
    y = torch.randint(0, 4, (40,), generator=g)
    info = DatasetInfo("fake_events", (2, 16, 16), 4, is_event=True)
    monkeypatch.setattr(data, "load_dataset", lambda name, root=None, **kw: (None,
                        ArrayDataset(x, y), info))  # fmt: skip
    model = randomize(build_model("vgg11", in_shape=(2, 16, 16), num_classes=4, T=2, width=4,
                                  spike_bits=4, mem_bn=True))  # fmt: skip
    ref = evaluate(model, iterate_batches(ArrayDataset(x, y), 16), 2, is_event=True)
    p = export(model, tmp_path / "ev.safetensors", meta={"dataset": "fake_events",
                                                          "is_event": True})  # fmt: skip
    argv = ["eval", "--deployed", str(p), "--batch-size", "16", "--latency-runs", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert _accuracy(out) == (ref["correct"], 40)
    assert "latency at batch 16" in out


def test_deployed_eval_batches_data_sets_read_from_files():
    """Event data sets read frames from files (no in-memory .x / .y): the deployed eval's batches
    go through a DataLoader and come out [T, N, *] (before: AttributeError on .x)."""
    from empf_triton.deploy.cli import _batches

    class Frames(torch.utils.data.Dataset):
        def __len__(self):
            return 5

        def __getitem__(self, i):
            return torch.full((3, 2, 4, 4), float(i)), i % 2  # [T, C, H, W], label

    got = list(_batches(Frames(), 2, torch.device("cpu"), is_event=True))
    assert [tuple(x.shape) for x, _ in got] == [(3, 2, 2, 4, 4)] * 2 + [(3, 1, 2, 4, 4)]
    assert torch.equal(got[1][0][0, :, 0, 0, 0], torch.tensor([2.0, 3.0]))
    assert torch.equal(torch.cat([y for _, y in got]), torch.tensor([0, 1, 0, 1, 0]))


def test_eval_json_path_that_cannot_be_written_fails_before_the_evaluation(
    main_job, tmp_path, capsys, monkeypatch
):
    """`--json` into a missing folder or onto a folder is one error line before any work (it
    failed only after the whole evaluation), for --checkpoint and --deployed."""
    import empf_triton.deploy.cli as dcli
    import empf_triton.train.strategies as strategies

    def no_eval(*a, **k):
        raise AssertionError("the evaluation ran")

    monkeypatch.setattr(strategies, "evaluate", no_eval)
    monkeypatch.setattr(dcli, "_load_for_eval", no_eval)
    ckpt = str(main_job / "best.pt")
    for src in (["--checkpoint", ckpt], ["--deployed", str(tmp_path / "m.safetensors")]):
        for bad, what in ((tmp_path / "nowhere" / "e.json", "does not exist"),
                          (tmp_path, "is a folder")):  # fmt: skip
            capsys.readouterr()
            assert cli.main(["eval", *src, "--json", str(bad)]) == 2
            err = capsys.readouterr().err
            assert "--json" in err and what in err and len(err.strip().splitlines()) == 1, err


def test_report_refuses_options_of_the_other_mode(main_job, tmp_path, capsys):
    """`empf report --deployed` with --runs/--bench, or without --deployed with --samples /
    --dataset, is one error line (they were ignored, nonexistent paths included)."""
    out_file = tmp_path / "m.safetensors"
    assert cli.main(["export", "--checkpoint", str(main_job / "best.pt"), "--out",
                     str(out_file)]) == 0  # fmt: skip
    for argv, match in (
        (["--deployed", str(out_file), "--runs", "nowhere"], "--runs report training runs"),
        (["--deployed", str(out_file), "--bench", "x.json"], "--bench report training runs"),
        (["--runs", str(main_job), "--samples", "5"], "--samples applies to --deployed"),
        (["--runs", str(main_job), "--dataset", "digits"], "--dataset applies to --deployed"),
    ):
        capsys.readouterr()
        assert cli.main(["report", *argv, "--out", str(tmp_path / "r")]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
