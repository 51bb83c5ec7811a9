"""The `empf` command line: train / eval / report, and clean errors for bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from empf_triton import cli

pytest.importorskip("sklearn")  # the digits data set drives these tests

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default output folders (runs/, reports/) land in tmp
    monkeypatch.delenv("EMPF_DEBUG", raising=False)


def _train(tmp_path, *extra, out="run"):
    argv = ["train", "--dataset", "digits", "--epochs", "1", "--T", "2", "--batch-size", "128"]
    argv += ["--out", str(tmp_path / out), "--no-progress", *extra]
    return cli.main(argv)


def _error(capsys, argv, match):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert match in err, err
    assert "Traceback" not in err
    return err


def test_train_eval_report(tmp_path, capsys):
    assert _train(tmp_path) == 0
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "test" in out and "anytime" in out
    run = tmp_path / "run"
    for name in ("last.pt", "best.pt", "metrics.json", "metrics.csv", "config.json"):
        assert (run / name).is_file(), name
    hist = json.loads((run / "metrics.json").read_text())
    assert len(hist) == 1
    row = hist[0]
    for key in (
        "train_loss",
        "train_accuracy",
        "test_accuracy",
        "anytime_accuracy",
        "epoch_seconds",
    ):
        assert key in row
    # the memory field depends on the device the run used (auto: CUDA where present)
    assert len(row["anytime_accuracy"]) == 2
    assert ("cuda_peak_mb" in row) != ("peak_rss_mb" in row)
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("epoch,")

    threads = torch.get_num_threads()
    torch.set_num_threads(3)  # the caller's own setting: eval sets 1 on a CPU, then gives it back
    try:
        assert cli.main(["eval", "--checkpoint", str(run / "last.pt"), "--json", "ev.json"]) == 0
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert f"test accuracy {row['test_accuracy'] * 100:.2f}%" in out
    assert "t=1" in out and "t=2" in out
    ev = json.loads(Path("ev.json").read_text())
    assert ev["accuracy"] == pytest.approx(row["test_accuracy"])

    import matplotlib

    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # the caller's (a notebook's) backend: report must not switch it
    try:
        assert cli.main(["report", "--runs", str(run), "--out", "rep"]) == 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert Path("rep/accuracy.png").stat().st_size > 1000
    assert Path("rep/loss.png").is_file()
    Path("list.json").write_text("[1, 2]")
    assert cli.main(["report", "--bench", "list.json", "--out", "rep2"]) == 2
    assert "not a pytest-benchmark JSON file" in capsys.readouterr().err


def test_resume_continues_and_inherits_settings(tmp_path, capsys):
    assert _train(tmp_path, "--strategy", "accumulate", "--lr", "0.01") == 0
    capsys.readouterr()
    # resume needs only the new epoch count; the rest comes from the checkpoint
    assert cli.main(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "resumed at epoch 1" in out and "strategy accumulate" in out and "epoch   2/2" in out
    hist = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2]


@pytest.mark.parametrize(
    "argv,match",
    [
        (["train", "--dataset", "mnist2d"], "unknown dataset 'mnist2d'"),
        (["train", "--dataset", "digits", "--model", "resnet99"], "unknown model 'resnet99'"),
        (["train", "--dataset", "digits", "--strategy", "sltt"], "unknown strategy 'sltt'"),
        (["train", "--dataset", "digits", "--T", "0"], "--T/-T: must be an integer >= 1, got '0'"),
        (["train", "--dataset", "digits", "--epochs", "-1"], "--epochs: must be an integer >= 1"),
        (["train", "--dataset", "digits", "--seed", str(2**64 - 1)], "--seed: must be an integer"),
        (["report", "--runs"], "--runs needs one or more run folders"),
        (["train", "--dataset", "digits", "--device", "tpu"], "device"),
        (["train", "--dataset", "digits", "--weight-bits", "3"], "must be 1, 1.5 or 32, got '3'"),
        (["train", "--dataset", "cifar10", "--data-root", "nowhere"], "nowhere"),
        (["eval", "--checkpoint", "missing.pt"], "checkpoint not found: missing.pt"),
        (["report", "--runs", "norun"], "norun is not a run folder"),
        (["report"], "nothing to report"),
    ],
)
def test_bad_input_clean_error(argv, match, capsys):
    _error(capsys, argv, match)


def test_missing_cifar_folder_names_path(tmp_path, capsys):
    err = _error(
        capsys,
        ["train", "--dataset", "cifar10", "--data-root", str(tmp_path / "data")],
        str(tmp_path / "data" / "cifar-10-batches-py"),
    )
    assert "never" in err and "download" in err


def test_bad_checkpoints_clean_errors(tmp_path, capsys):
    assert _train(tmp_path) == 0
    capsys.readouterr()
    last = tmp_path / "run" / "last.pt"
    good = last.read_bytes()
    data = bytearray(good)
    (tmp_path / "trunc.pt").write_bytes(good[: len(good) // 3])
    data[len(data) // 2] ^= 0x55
    (tmp_path / "corrupt.pt").write_bytes(bytes(data))
    for name in ("trunc.pt", "corrupt.pt"):
        _error(capsys, ["eval", "--checkpoint", str(tmp_path / name)], "corrupt")
        _error(capsys, ["train", "--resume", str(tmp_path / name)], "corrupt")
    # a checkpoint of a different model: other T, other architecture, other data set
    _error(capsys, ["train", "--resume", str(last), "--T", "3"], "T: saved 2 vs requested 3")
    _error(
        capsys,
        ["train", "--resume", str(last), "--model", "mnist1d_cnn"],
        "checkpoint of model 'digits_mlp', not 'mnist1d_cnn'",
    )
    _error(
        capsys,
        ["train", "--resume", str(last), "--model-options", '{"hidden": [16, 16]}'],
        "hidden",
    )
    _error(capsys, ["eval", "--checkpoint", str(last), "--dataset", "mnist1d"], "inputs (64,)")
    # a fresh run into the folder of a good checkpoint is refused
    _error(capsys, ["train", "--dataset", "digits", "--out", str(tmp_path / "run")], "--resume")
    assert last.read_bytes() == good  # never overwritten by any of the above


def test_eval_json_never_replaces_a_file_unasked(tmp_path, capsys, monkeypatch):
    """`empf eval --json FILE` onto an existing file (a checkpoint, the export being evaluated,
    an earlier result) is refused before the evaluation unless --overwrite; a file that appears
    while the evaluation runs is kept too. --checkpoint and --deployed alike."""
    import empf_triton.deploy.report as report
    import empf_triton.train.strategies as strategies

    assert _train(tmp_path) == 0
    run = tmp_path / "run"
    export = tmp_path / "m.safetensors"
    assert cli.main(["export", "--checkpoint", str(run / "best.pt"), "--out", str(export)]) == 0
    capsys.readouterr()
    saved = {p: p.read_bytes() for p in (run / "last.pt", export)}
    late = tmp_path / "late.json"
    for src in (["--checkpoint", str(run / "best.pt")], ["--deployed", str(export)]):
        for target in saved:
            _error(
                capsys, ["eval", *src, "--json", str(target)], "already exists; pass --overwrite"
            )
        assert {p: p.read_bytes() for p in saved} == saved
        _error(capsys, ["eval", *src, "--overwrite"], "--overwrite applies to --json")
        mine = tmp_path / "mine.json"
        mine.write_text('{"mine": 1}\n')
        assert cli.main(["eval", *src, "--json", str(mine), "--overwrite"]) == 0
        assert "mine" not in json.loads(mine.read_text())
        # another process writes the file while this evaluation runs: it is not replaced
        mod, name = (
            (strategies, "evaluate") if src[0] == "--checkpoint" else (report, "energy_report")
        )
        real = getattr(mod, name)

        def while_another_writes(*a, real=real, **k):
            late.write_text("theirs\n")
            return real(*a, **k)

        with monkeypatch.context() as m:
            m.setattr(mod, name, while_another_writes)
            _error(capsys, ["eval", *src, "--json", str(late)], "File exists")
        assert late.read_text() == "theirs\n"
        late.unlink()
        assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_report_out_that_is_a_file_fails_before_the_work(tmp_path, capsys, monkeypatch):
    """`empf report --out FILE` is one error line naming --out, before any plot is drawn or the
    deployed model is evaluated (it failed with "File exists" after all the work), and the
    file is left as it was."""
    import empf_triton.deploy.report as report

    assert _train(tmp_path) == 0
    export = tmp_path / "m.safetensors"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "run/best.pt"), "--out",
                     str(export)]) == 0  # fmt: skip
    capsys.readouterr()

    def no_work(*a, **k):
        raise AssertionError("the report was computed")

    monkeypatch.setattr(report, "energy_report", no_work)
    monkeypatch.setattr(cli, "plot_training_logs", no_work)
    mine = tmp_path / "notes.txt"
    mine.write_text("mine\n")
    for src in (["--runs", str(tmp_path / "run")], ["--deployed", str(export)]):
        _error(capsys, ["report", *src, "--out", str(mine)], f"--out {mine} is a file;")
        below = mine / "reports"
        _error(capsys, ["report", *src, "--out", str(below)], f"{mine} is a file;")
    assert mine.read_text() == "mine\n"


def test_overwrite_and_auto_out(tmp_path, capsys):
    assert _train(tmp_path) == 0
    assert _train(tmp_path, "--overwrite") == 0
    capsys.readouterr()
    base = ["train", "--dataset", "digits", "--epochs", "1", "--T", "2", "--no-progress"]
    assert cli.main(base) == 0 and cli.main(base) == 0
    runs = sorted(p.name for p in Path("runs").iterdir())
    # the second default run does not clobber the first: it gets a suffixed folder
    assert runs == ["digits-digits_mlp-random_step-T2", "digits-digits_mlp-random_step-T2-2"]
    assert cli.main(["report", "--out", "rep"]) == 0  # finds every runs/*/metrics.json
    assert Path("rep/accuracy.png").is_file()


def test_report_calls_bench_report(tmp_path, capsys, monkeypatch):
    calls = []
    fake = types.SimpleNamespace(main=lambda argv: calls.append(list(argv)) or 0)
    monkeypatch.setattr(cli, "_load_bench_report", lambda: fake)
    Path("b.json").write_text("{}")
    assert cli.main(["report", "--bench", "b.json", "--out", "rep"]) == 0
    assert calls == [["b.json", "--out", "rep"]]
    _error(capsys, ["report", "--bench", "none.json"], "no such benchmark file")
    # a results folder instead of its files is named as such (as bench/report.py does)
    Path("results").mkdir()
    _error(capsys, ["report", "--bench", "results"], "results is a folder; pass its files")
    # a file given twice would list its cases twice in every table
    _error(capsys, ["report", "--bench", "b.json", "./b.json"], "given twice: ./b.json")
    assert len(calls) == 1
    if (REPO / "bench" / "report.py").is_file():
        monkeypatch.undo()
        monkeypatch.chdir(REPO)
        mod = cli._load_bench_report()
        assert mod is not None and callable(mod.main)


def test_report_plots_training_bench(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load_bench_report", lambda: None)
    recs = [
        {"extra_info": {"op": "train_step", "strategy": s, "T": T, "model": "m",
                        "device": "cpu", "saved_peak_bytes": 1000 * (T if s == "bptt" else 1),
                        "time_per_step_s": 0.01}}
        for s in ("online", "bptt") for T in (1, 2, 4)
    ]  # fmt: skip
    recs += [
        {"extra_info": {"op": "neuron_step", "neuron": n, "time_median_s": t}}
        for n, t in (("empf", 0.011), ("lif", 0.01))
    ]
    Path("t.json").write_text(json.dumps({"benchmarks": recs}))
    assert cli.main(["report", "--bench", "t.json", "--out", "rep"]) == 0
    assert Path("rep/training_memory_speed.png").stat().st_size > 1000
    assert Path("rep/training_empf_vs_lif.png").is_file()
    # without bench/report.py and without training records there is nothing to plot
    Path("e.json").write_text(json.dumps({"benchmarks": []}))
    _error(capsys, ["report", "--bench", "e.json"], "bench/report.py")


def test_divergence_keeps_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    assert _train(tmp_path) == 0
    capsys.readouterr()
    last = tmp_path / "run" / "last.pt"
    good = last.read_bytes()
    from empf_triton.train import loop

    real = loop.train_epoch

    def nan_epoch(*a, **k):
        r = real(*a, **k)
        r.loss = float("nan")
        return r

    monkeypatch.setattr(loop, "train_epoch", nan_epoch)
    _error(capsys, ["train", "--resume", str(last), "--epochs", "2"], "diverged")
    assert last.read_bytes() == good


def test_subprocess_no_traceback(tmp_path):
    """The installed entry point: a user error prints one line and exits non-zero."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("EMPF_DEBUG", None)
    p = subprocess.run(
        [sys.executable, "-m", "empf_triton.cli", "train", "--strategy", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    assert "unknown strategy 'nope'" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "empf_triton.cli", "train", "--T", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("\n") == 1 and "--T/-T: must be an integer >= 1, got 'x'" in p.stderr


def test_debug_env_shows_traceback(capsys, monkeypatch):
    monkeypatch.setenv("EMPF_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown dataset"):
        cli.main(["train", "--dataset", "nope"])
    assert torch.get_num_threads() >= 1
