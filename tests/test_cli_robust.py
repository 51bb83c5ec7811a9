"""Robustness of `empf train / eval / report`: every bad case gives the right result or one clear
error line (exit status 2, no traceback), and nothing a user saved is overwritten, mixed or lost.
Also the --precision, --compile and LIF options of the command line."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from empf_triton import cli
from empf_triton.train import loop
from empf_triton.train.checkpoint import load_checkpoint
from empf_triton.train.lock import OutputLock

pytest.importorskip("sklearn")  # the digits data set drives these tests

REPO = Path(__file__).resolve().parent.parent
TINY = '{"hidden": [16]}'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EMPF_DEBUG", raising=False)


def _argv(out, *extra, epochs=1):
    return [
        "train", "--dataset", "digits", "--epochs", str(epochs), "--T", "2",
        "--model-options", TINY, "--out", str(out), "--no-progress", *extra,
    ]  # fmt: skip


def _ok(capsys, argv) -> str:
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


def _error(capsys, argv, *match, rc=2) -> str:
    got = cli.main(argv)
    err = capsys.readouterr().err
    assert got == rc, err
    assert "Traceback" not in err
    assert err.count("\n") == 1, f"not one line: {err!r}"
    for m in match:
        assert m in err, err
    return err


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".empf.lock"}


# ---- 1. resume with changed hyper-parameters ---------------------------------------------------


def test_resume_honours_changed_lr_and_records_it(tmp_path, capsys):
    _ok(capsys, _argv("run", "--schedule", "constant"))
    before = load_checkpoint("run/last.pt")
    out = _ok(capsys, ["train", "--resume", "run", "--epochs", "2", "--lr", "1e-12"])
    assert "lr 0.003 -> 1e-12" in out and "epochs 1 -> 2" in out
    conf = json.loads(Path("run/config.json").read_text())
    assert conf["lr"] == 1e-12 and conf["epochs"] == 2
    assert conf["changed_on_resume"]["lr"] == {"saved": 0.003, "now": 1e-12}
    assert conf["resumed_from"]["epoch"] == 1
    after = load_checkpoint("run/last.pt")
    # the optimizer really ran with the new rate: AdamW moves each weight by about lr per step
    assert [g["lr"] for g in after["optimizer"]["param_groups"]] == [1e-12]
    moved = max(
        (after["model"][k].double() - v.double()).abs().max().item()
        for k, v in before["model"].items()
        if v.is_floating_point() and "running" not in k and "num_batches" not in k
    )
    assert moved < 1e-9
    hist = json.loads(Path("run/metrics.json").read_text())
    assert hist[-1]["lr"] == 1e-12
    # a second resume: config.json keeps the first one's changes too, oldest first
    out = _ok(capsys, ["train", "--resume", "run", "--epochs", "3", "--lr", "1e-11"])
    conf = json.loads(Path("run/config.json").read_text())
    assert conf["changed_on_resume"]["lr"] == {"saved": 1e-12, "now": 1e-11}
    assert [r["epoch"] for r in conf["resumes"]] == [1, 2]
    assert [r["changed"]["lr"] for r in conf["resumes"]] == [
        {"saved": 0.003, "now": 1e-12},
        {"saved": 1e-12, "now": 1e-11},
    ]
    assert conf["resumes"][-1]["changed"]["epochs"] == {"saved": 2, "now": 3}


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--optimizer", "sgd"], "optimizer 'adamw'; a resumed run cannot use 'sgd'"),
        (["--batch-size", "64"], "batch_size 128; a resumed run cannot use 64"),
        (["--seed", "5"], "seed 0; a resumed run cannot use 5"),
        (["--neuron", "lif"], "neuron 'empf'; a resumed run cannot use 'lif'"),
    ],
)
def test_resume_refuses_fixed_settings(tmp_path, capsys, extra, match):
    _ok(capsys, _argv("run"))
    saved = _files(tmp_path / "run")
    _error(capsys, ["train", "--resume", "run", "--epochs", "2", *extra], match)
    assert _files(tmp_path / "run") == saved


def test_resume_of_finished_run_prints_header_first(tmp_path, capsys):
    _ok(capsys, _argv("run"))
    out = _ok(capsys, ["train", "--resume", "run"]).splitlines()
    assert out[0].startswith("empf train: digits") and "1 epoch," in out[0]
    assert "already completed 1 epoch of 1; nothing to train" in out[1]


# ---- 2. two runs into one folder ---------------------------------------------------------------


def test_locked_output_folder_refused_at_once(tmp_path, capsys):
    with OutputLock(tmp_path / "run"):
        _error(
            capsys, _argv("run"), "output folder run is in use by another empf train run", "process"
        )
    assert not (tmp_path / "run" / "config.json").exists()
    _ok(capsys, _argv("run"))  # released: the folder is usable again


def test_two_concurrent_runs_one_wins(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("EMPF_DEBUG", None)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "empf_triton.cli", *_argv("run", "--seed", str(seed))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        for seed in (1, 2)
    ]
    res = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    rcs = sorted(r[0] for r in res)
    assert rcs == [0, 2], res
    loser = next(r for r in res if r[0] == 2)
    assert "Traceback" not in loser[2] and loser[2].count("\n") == 1
    assert "in use by another empf train run" in loser[2] or "already holds" in loser[2]
    winner_seed = 1 if res[0][0] == 0 else 2
    run = tmp_path / "run"
    conf = json.loads((run / "config.json").read_text())
    assert conf["seed"] == winner_seed
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(run / name)["extra"]["config"]["seed"] == winner_seed


def test_out_holding_another_run_is_not_resumed_into(tmp_path, capsys):
    _ok(capsys, _argv("a"))
    _ok(capsys, _argv("b", "--seed", "3"))
    saved = _files(tmp_path / "b")
    _error(capsys, ["train", "--resume", "a", "--epochs", "2", "--out", "b"], "already holds")
    assert _files(tmp_path / "b") == saved
    # into a new folder it works, and that folder gets a complete run (best.pt included)
    _ok(capsys, ["train", "--resume", "a", "--epochs", "2", "--out", "c"])
    assert {"last.pt", "best.pt", "config.json", "metrics.json"} <= set(_files(tmp_path / "c"))


# ---- 3. divergence and interrupts say what is true ---------------------------------------------


def _patch_epoch(monkeypatch, fail_on: int, how: str):
    real = loop.train_epoch
    calls = []

    def epoch(*a, **k):
        calls.append(1)
        if len(calls) == fail_on and how == "interrupt":
            raise KeyboardInterrupt
        r = real(*a, **k)
        if len(calls) == fail_on:
            r.loss = float("nan")
        return r

    monkeypatch.setattr(loop, "train_epoch", epoch)


@pytest.mark.parametrize("how", ["nan", "interrupt"])
def test_failure_in_first_epoch_says_no_checkpoint(tmp_path, capsys, monkeypatch, how):
    _patch_epoch(monkeypatch, 1, how)
    err = _error(
        capsys, _argv("run"), "this run saved no checkpoint in run", rc=2 if how == "nan" else 130
    )
    assert "was kept" not in err and "intact" not in err
    assert not (tmp_path / "run" / "last.pt").exists()


@pytest.mark.parametrize("how", ["nan", "interrupt"])
def test_failure_after_a_save_names_the_kept_checkpoint(tmp_path, capsys, monkeypatch, how):
    _patch_epoch(monkeypatch, 2, how)
    _error(
        capsys,
        _argv("run", epochs=3),
        f"the last good checkpoint, {Path('run') / 'last.pt'} (epoch 1), was kept",
        rc=2 if how == "nan" else 130,
    )
    assert load_checkpoint("run/last.pt")["epoch"] == 1
    assert len(json.loads(Path("run/metrics.json").read_text())) == 1


def test_failure_right_after_resume_names_the_resumed_checkpoint(tmp_path, capsys, monkeypatch):
    _ok(capsys, _argv("run"))
    saved = _files(tmp_path / "run")
    _patch_epoch(monkeypatch, 1, "nan")
    _error(
        capsys,
        ["train", "--resume", "run", "--epochs", "2"],
        "the checkpoint it resumed from",
        "(epoch 1), is unchanged",
    )
    assert _files(tmp_path / "run") == saved


def test_overwrite_keeps_old_run_until_first_save(tmp_path, capsys, monkeypatch):
    _ok(capsys, _argv("run"))
    saved = _files(tmp_path / "run")
    _patch_epoch(monkeypatch, 1, "nan")
    err = _error(capsys, _argv("run", "--overwrite", "--seed", "4"), "saved no checkpoint")
    assert "earlier run's" in err
    assert _files(tmp_path / "run") == saved  # config.json too: it still matches last.pt
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _ok(capsys, _argv("run", "--overwrite", "--seed", "4"))
    run = tmp_path / "run"
    assert json.loads((run / "config.json").read_text())["seed"] == 4
    for name in ("last.pt", "best.pt"):
        assert load_checkpoint(run / name)["extra"]["config"]["seed"] == 4


# ---- 5. --out naming a file; 9. file modes ----------------------------------------------------


def test_out_is_a_file(tmp_path, capsys):
    Path("f").write_text("mine")
    _error(capsys, _argv("f"), "--out f exists and is not a folder")
    assert Path("f").read_text() == "mine"
    _error(capsys, _argv("f/sub"), "f/sub")  # a file where a parent folder should be


def test_written_files_respect_umask(tmp_path, capsys):
    old = os.umask(0o027)
    try:
        _ok(capsys, _argv("run"))
    finally:
        os.umask(old)
    for name in ("last.pt", "best.pt", "config.json", "metrics.json", "metrics.csv"):
        mode = stat.S_IMODE((tmp_path / "run" / name).stat().st_mode)
        assert mode == 0o640, (name, oct(mode))


# ---- 6. model options ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options,match",
    [
        ("[1,2]", "--model-options: must be a JSON object"),
        ('"str"', "--model-options: must be a JSON object"),
        ("{bad", "--model-options: is not valid JSON"),
        ('{"hidden": -5}', "model option 'hidden' of 'digits_mlp' must be a list"),
        ('{"hidden": [0]}', "integers >= 1"),
        ('{"hidden": [16, "a"]}', 'got [16, "a"]'),
        ('{"impl": "reference"}', "model_options may not set 'impl': use --impl"),
        ('{"num_classes": 3}', "may not set 'num_classes': the number of classes is fixed"),
        ('{"T": 3}', "may not set 'T': use --T"),
        ('{"depth": 3}', "model 'digits_mlp' does not take the option 'depth'; it takes"),
    ],
)
def test_bad_model_options(tmp_path, capsys, options, match):
    argv = _argv("run")
    argv[argv.index(TINY)] = options
    _error(capsys, argv, match)
    assert not (tmp_path / "run" / "last.pt").exists()


def test_model_that_cannot_run_is_one_error(capsys, monkeypatch):
    """Options that pass the checks but break the forward pass fail before training."""
    from empf_triton.models import MODELS

    def broken(*, in_shape, num_classes, T, **kw):
        return torch.nn.Linear(3, num_classes)  # wrong input width for digits

    monkeypatch.setitem(MODELS, "broken_net", broken)
    _error(capsys, _argv("run", "--model", "broken_net"), "model 'broken_net'", "cannot run")


# ---- 7. numeric ranges, every subcommand -------------------------------------------------------


def _bad_values(dest):
    kind, lo, lo_in, hi, hi_in = cli.NUMERIC_OPTIONS[dest]
    vals = [str(lo - 1 if lo_in else lo), "nan", "x"]
    if hi != math.inf:
        vals.append(str(hi + 1 if hi_in else hi))
    if kind is int:
        vals.append("1.5")
    return vals


#: Numeric options that belong to another subcommand than `train` (the deployment options).
_NOT_TRAIN = {
    "energy_samples": ["eval", "--deployed", "m.safetensors"],
    "latency_runs": ["eval", "--deployed", "m.safetensors"],
    "samples": ["report", "--deployed", "m.safetensors"],
}


@pytest.mark.parametrize("dest", sorted(cli.NUMERIC_OPTIONS))
def test_every_numeric_option_range(capsys, dest):
    flag = "--T" if dest == "T" else "--" + dest.replace("_", "-")
    cmd = _NOT_TRAIN.get(dest, ["train"])
    for v in _bad_values(dest):
        _error(capsys, [*cmd, flag, v], f"argument {flag}", "must be", f"got {v!r}")


def _path_options() -> set[tuple[str, str]]:
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    return {
        (cmd, a.option_strings[0])
        for cmd, p in sub.choices.items()
        for a in p._actions
        if a.type is cli._path
    }


def test_every_path_option_refuses_an_empty_path(capsys):
    """An empty path (an unset shell variable) made `train --out ""` write the run into the
    current folder, `--resume ""` resume the run found there, and `eval --json ""` write no
    file, all without a word; now one error line for each file or folder option."""
    assert _path_options() == {
        ("train", "--data-root"), ("train", "--out"), ("train", "--resume"),
        ("eval", "--checkpoint"), ("eval", "--data-root"), ("eval", "--json"),
        ("eval", "--deployed"),
        ("report", "--runs"), ("report", "--bench"), ("report", "--out"),
        ("report", "--deployed"), ("report", "--data-root"),
        ("export", "--checkpoint"), ("export", "--out"),
    }  # fmt: skip
    given = {"export": ["--checkpoint", "x.pt", "--out", "x.safetensors"]}
    for cmd, flag in sorted(_path_options()):
        for empty in ("", " "):
            _error(capsys, [cmd, *given.get(cmd, []), flag, empty], f"argument {flag}", "path")
    assert os.listdir(".") == []  # nothing written


def test_dataset_and_model_refuse_an_empty_name(capsys):
    """`eval --dataset ""` used the checkpoint's data set without a word, and `train --model ""`
    said the data set had no default model."""
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    named = {
        (cmd, a.option_strings[0])
        for cmd, p in sub.choices.items()
        for a in p._actions
        if a.type is cli._name
    }
    assert named == {("train", "--dataset"), ("train", "--model"), ("eval", "--dataset"),
                     ("report", "--dataset")}  # fmt: skip
    for cmd, flag in sorted(named):
        _error(capsys, [cmd, flag, ""], f"argument {flag}: must be a name, got ''")
    assert os.listdir(".") == []


@pytest.mark.parametrize(
    "flag,value",
    # --threads 100000 reached torch.set_num_threads, which segfaulted
    [("--batch-size", "0"), ("--threads", "-1"), ("--threads", "100000")],
)
def test_eval_numeric_ranges(capsys, flag, value):
    _error(capsys, ["eval", "--checkpoint", "x.pt", flag, value], f"argument {flag}: must be")


def test_config_validate_covers_api_users():
    for kw, match in [
        ({"spike_step": 0.0}, "spike_step"),
        ({"spike_bits": 9}, "spike_bits"),
        ({"lr": float("nan")}, "lr"),
        ({"tau": 0.5, "neuron": "lif"}, "tau"),
        ({"precision": "fp8"}, "precision"),
        ({"compile": "max"}, "compile"),
        ({"model_options": [1, 2]}, "model_options must be a JSON object"),
    ]:
        with pytest.raises(ValueError, match=match):
            loop.TrainConfig(**kw).validate()


# ---- 8. report --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rows,match",
    [
        ([{"epoch": 1, "train_loss": 1.0, "train_accuracy": 0.5}], "row 1 lacks the field"),
        ([{"epoch": 1, "train_loss": 1, "train_accuracy": 0.5, "test_accuracy": "x"}], "number"),
        ([3], "row 1 is not an object"),
        ({}, "holds no epochs"),
    ],
)
def test_report_bad_metrics(tmp_path, capsys, rows, match):
    Path("r").mkdir()
    Path("r/metrics.json").write_text(json.dumps(rows))
    _error(capsys, ["report", "--runs", "r", "--out", "rep"], "r/metrics.json", match)


def test_report_table_and_zoom(tmp_path, capsys):
    for name, acc in (("a", [0.90, 0.92]), ("b", [0.91, 0.935])):
        Path(name).mkdir()
        rows = [
            {"epoch": i + 1, "train_loss": 0.3, "train_accuracy": a, "test_accuracy": a,
             "anytime_accuracy": [a - 0.01, a]}
            for i, a in enumerate(acc)
        ]  # fmt: skip
        Path(name, "metrics.json").write_text(json.dumps(rows))
    out = _ok(capsys, ["report", "--runs", "a", "b", "--out", "rep"])
    assert "| a | 2 | 92.00 | 92.00 (2) | 91.0 / 92.0 |" in out
    assert "| b | 2 | 93.50 | 93.50 (2) | 92.5 / 93.5 |" in out
    assert "| a |" in Path("rep/runs.md").read_text()
    assert Path("rep/accuracy.png").stat().st_size > 1000
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    cli._zoom(ax, [90.0, 93.5])
    lo, hi = ax.get_ylim()
    plt.close(fig)
    assert 85 < lo < 90 and 93.5 < hi < 96  # zoomed to the runs' range, not 0..100


def _log(folder: str, acc: float) -> None:
    Path(folder).mkdir(parents=True)
    row = {"epoch": 1, "train_loss": 0.3, "train_accuracy": acc, "test_accuracy": acc}
    Path(folder, "metrics.json").write_text(json.dumps([row]))


def test_report_refuses_a_run_folder_given_twice(tmp_path, capsys):
    """One folder twice (under two spellings) was reported as two runs, as --bench refuses."""
    _log("a", 0.9)
    _error(capsys, ["report", "--runs", "a", "./a/", "--out", "rep"], "run folder given twice")
    assert not Path("rep").exists()


def test_an_interrupted_report_leaves_the_previous_files_whole(tmp_path, capsys, monkeypatch):
    """Ctrl-C while a PNG was written left a broken file in place of the previous plot."""
    from PIL import Image

    _log("a", 0.9)
    _ok(capsys, ["report", "--runs", "a", "--out", "rep"])
    before = _files(Path("rep"))
    assert set(before) == {"accuracy.png", "loss.png", "runs.md"}

    def write_part_then_interrupt(im, fp, filename, *a, **k):
        fp.write(b"\x89PNG")
        raise KeyboardInterrupt

    monkeypatch.setitem(Image.SAVE, "PNG", write_part_then_interrupt)
    _error(capsys, ["report", "--runs", "a", "--out", "rep"], "interrupted", rc=130)
    assert _files(Path("rep")) == before  # no temporary file left either


def test_report_tells_apart_runs_whose_folders_share_a_name(tmp_path, capsys):
    """x/run and y/run were both labelled "run" in the table, runs.md and the plots' legends."""
    _log("x/run", 0.9)
    _log("y/run", 0.5)
    _log("z", 0.7)
    out = _ok(capsys, ["report", "--runs", "x/run", "y/run", "z", "--out", "rep"])
    for table in (out, Path("rep/runs.md").read_text()):
        assert "| x/run | 1 | 90.00 |" in table and "| y/run | 1 | 50.00 |" in table, table
        assert "| z | 1 | 70.00 |" in table, table


# ---- wording, help -----------------------------------------------------------------------------


def test_truncated_checkpoint_message_is_whole(tmp_path, capsys):
    _ok(capsys, _argv("run"))
    data = Path("run/last.pt").read_bytes()
    Path("t.pt").write_bytes(data[: len(data) // 3])
    for cut in (len(data) // 3, 10):
        Path("t.pt").write_bytes(data[:cut])
        err = _error(capsys, ["eval", "--checkpoint", "t.pt"], "corrupt or truncated")
        assert err.rstrip().endswith(")"), err
    # torch's long zip-reader message is cut after its first sentence, not mid-way
    from empf_triton.train.checkpoint import _first_sentence

    long = (
        "PytorchStreamReader failed reading zip archive: failed finding central directory. "
        "This is an internal miniz error. If you are seeing this error, there is a high "
        "likelihood that your checkpoint file is corrupted."
    )
    assert _first_sentence(long) == long.split(". ")[0] + "."
    assert _first_sentence("word " * 100).endswith("word ...")


def test_every_option_and_subcommand_has_help():
    import argparse

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subs.choices) >= {"train", "eval", "report"}
    for name in ("train", "eval", "report"):
        p = subs.choices[name]
        assert p.description, name
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and len(action.help) > 8, (name, action.option_strings)
    step = next(a for a in subs.choices["train"]._actions if a.dest == "spike_step")
    assert "round(s / step)" in step.help and "default 0.25" in step.help


# ---- LIF options: the mapping to model options (not the models) -------------------------------


def _captured_cfg(monkeypatch, argv) -> loop.TrainConfig:
    seen = {}

    def fake(cfg, log=print):
        cfg.validate()
        seen["cfg"] = cfg
        return {"epochs_run": 0, "final": {}}

    monkeypatch.setattr(loop, "run_training", fake)
    assert cli.main(argv) == 0
    return seen["cfg"]


def test_lif_options_map_to_model_options(monkeypatch):
    cfg = _captured_cfg(monkeypatch, ["train", "--neuron", "lif"])
    mc = cfg.model_config((64,), 10)
    assert {k: mc[k] for k in ("neuron", "tau", "v_threshold", "surrogate", "detach_reset")} == {
        "neuron": "lif", "tau": 2.0, "v_threshold": 1.0, "surrogate": "sigmoid",
        "detach_reset": False,
    }  # fmt: skip
    assert "alpha" not in mc  # the surrogate's own default applies
    argv = ["train", "--neuron", "lif", "--tau", "4", "--v-threshold", "0.5", "--surrogate",
            "atan", "--surrogate-alpha", "3", "--detach-reset"]  # fmt: skip
    mc = _captured_cfg(monkeypatch, argv).model_config((64,), 10)
    assert (mc["tau"], mc["v_threshold"], mc["surrogate"], mc["alpha"], mc["detach_reset"]) == (
        4.0, 0.5, "atan", 3.0, True,
    )  # fmt: skip
    # EM-PF runs pass none of them, so models without LIF support still build
    mc = _captured_cfg(monkeypatch, ["train"]).model_config((64,), 10)
    assert not {"neuron", "tau", "v_threshold", "surrogate", "alpha", "detach_reset"} & set(mc)


@pytest.mark.parametrize(
    "extra", [["--tau", "3"], ["--surrogate", "atan"], ["--detach-reset"], ["--v-threshold", "2"]]
)
def test_lif_options_need_neuron_lif(capsys, extra):
    _error(capsys, ["train", "--dataset", "digits", *extra], "LIF option", "--neuron lif")


def test_lif_bad_values(capsys):
    _error(capsys, ["train", "--neuron", "lif", "--tau", "1"], "--tau: must be a number > 1")
    _error(capsys, ["train", "--neuron", "lif", "--surrogate", "relu"], "invalid choice")


# ---- precision ---------------------------------------------------------------------------------


def test_autocast_reaches_linears():
    from empf_triton.models import build_model
    from empf_triton.train.strategies import train_batch

    torch.manual_seed(0)
    model = build_model("digits_mlp", in_shape=(64,), num_classes=10, T=2, hidden=(16,))
    dtypes = []
    model.classifier.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    r = train_batch(model, x, y, opt, "online", 2, precision="bf16")
    assert dtypes == [torch.bfloat16] * 2 and math.isfinite(r.loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_bf16_trains_within_noise_of_fp32(tmp_path, capsys):
    """digits, digits_mlp (hidden 128), T=2, 3 epochs: measured here fp32 96.10%, bf16 95.54%.
    The test set has 359 samples; the binomial standard error of an accuracy near 95% is
    sqrt(0.95 * 0.05 / 359) = 1.15 points, so two independent runs differ by up to
    3 * sqrt(2) * 1.15 = 4.9 points by chance alone; we allow 5."""
    acc = {}
    for prec in ("fp32", "bf16"):
        argv = ["train", "--dataset", "digits", "--epochs", "3", "--T", "2", "--out", prec,
                "--no-progress", "--precision", prec]  # fmt: skip
        _ok(capsys, argv)
        acc[prec] = json.loads(Path(prec, "metrics.json").read_text())[-1]["test_accuracy"]
        assert json.loads(Path(prec, "config.json").read_text())["precision"] == prec
    assert acc["fp32"] > 0.85 and acc["bf16"] > 0.85, acc
    assert abs(acc["fp32"] - acc["bf16"]) <= 0.05, acc
    out = _ok(capsys, ["eval", "--checkpoint", "bf16/last.pt", "--precision", "bf16"])
    assert f"{acc['bf16'] * 100:.2f}%" in out


def test_seed_beyond_32_bits_is_refused(tmp_path, capsys):
    """torch's CPU generator keeps a seed's low 32 bits, so --seed 2^32 trained seed 0's run
    again (same init, order and t*); it is refused at the start, 2^32 - 1 still runs."""
    a = torch.Generator().manual_seed(0)
    b = torch.Generator().manual_seed(2**32)
    assert torch.equal(torch.randn(4, generator=a), torch.randn(4, generator=b))
    _error(capsys, _argv("big", "--seed", str(2**32)), "--seed", "[0, 4294967295]")
    assert not Path("big").exists()
    with pytest.raises(ValueError, match="seed must be at most 2"):
        loop.TrainConfig(seed=2**32).validate()
    _ok(capsys, _argv("top", "--seed", str(2**32 - 1)))
    assert json.loads(Path("top/config.json").read_text())["seed"] == 2**32 - 1


def test_eval_checkpoint_defaults_to_the_runs_precision(tmp_path, capsys):
    """`empf eval --checkpoint` of a bf16 run evaluates in bf16, as the run's own evaluation
    did, so it prints the run's logged test accuracy (it ran fp32 and could differ)."""
    _ok(capsys, _argv("run", "--precision", "bf16"))
    acc = json.loads(Path("run/metrics.json").read_text())[-1]["test_accuracy"]
    out = _ok(capsys, ["eval", "--checkpoint", "run/last.pt", "--json", "e.json"])
    assert "bf16 autocast" in out and f"{acc * 100:.2f}%" in out
    rec = json.loads(Path("e.json").read_text())
    assert rec["precision"] == "bf16" and rec["accuracy"] == acc
    _ok(capsys, ["eval", "--checkpoint", "run/last.pt", "--precision", "fp32", "--json", "f.json"])
    assert json.loads(Path("f.json").read_text())["precision"] == "fp32"


def test_fp16_uses_grad_scaler_and_resumes(tmp_path, capsys):
    _ok(capsys, _argv("run", "--precision", "fp16"))
    ck = load_checkpoint("run/last.pt")
    assert ck["extra"]["grad_scaler"]["scale"] > 0
    assert ck["extra"]["config"]["precision"] == "fp16"
    _ok(capsys, ["train", "--resume", "run", "--epochs", "2"])
    hist = json.loads(Path("run/metrics.json").read_text())
    assert len(hist) == 2 and all(math.isfinite(h["train_loss"]) for h in hist)


# ---- compile -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_default_equals_eager(tmp_path, capsys):
    """torch.compile (default mode, CPU) gives the eager run's metrics, training and eval."""
    import torch._dynamo

    try:
        base = _argv("eager", "--strategy", "online")
        _ok(capsys, base)
        comp = _argv("comp", "--strategy", "online", "--compile", "default")
        _ok(capsys, comp)
        a = json.loads(Path("eager/metrics.json").read_text())[0]
        b = json.loads(Path("comp/metrics.json").read_text())[0]
        for k in ("train_loss", "test_loss"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
        for k in ("train_accuracy", "test_accuracy"):
            assert abs(b[k] - a[k]) <= 2 / 359, k  # at most a couple of borderline samples
        assert json.loads(Path("comp/config.json").read_text())["compile"] == "default"
        ev = ["eval", "--checkpoint", "eager/last.pt", "--json"]
        _ok(capsys, [*ev, "e.json"])
        _ok(capsys, [*ev, "c.json", "--compile", "default"])
        e, c = (json.loads(Path(f).read_text()) for f in ("e.json", "c.json"))
        assert c["compile"] == "default"
        assert c["correct"] == e["correct"] and c["anytime_correct"] == e["anytime_correct"]
        assert c["loss"] == pytest.approx(e["loss"], rel=1e-5)
    finally:
        torch._dynamo.reset()


def test_lif_options_reach_the_model_factory(tmp_path, capsys, monkeypatch):
    """End to end through run_training, with a stand-in model that takes the LIF keywords (the
    real models get them on another branch): they arrive under exactly these names, and are
    saved in the checkpoint's model config and in config.json."""
    from empf_triton.models import MODELS
    from empf_triton.models.small import DigitsMLP

    seen = []

    def lif_mlp(
        *, in_shape, num_classes, T, neuron="empf", tau=2.0, v_threshold=1.0,
        surrogate="sigmoid", alpha=None, detach_reset=False, **options,
    ) -> DigitsMLP:  # fmt: skip
        seen.append(dict(neuron=neuron, tau=tau, v_threshold=v_threshold, surrogate=surrogate,
                         alpha=alpha, detach_reset=detach_reset))  # fmt: skip
        return DigitsMLP(in_shape, num_classes, T, **options)

    monkeypatch.setitem(MODELS, "lif_mlp", lif_mlp)
    argv = _argv("run", "--model", "lif_mlp", "--neuron", "lif", "--tau", "3", "--surrogate",
                 "triangle", "--surrogate-alpha", "0.5", "--detach-reset")  # fmt: skip
    _ok(capsys, argv)
    want = dict(neuron="lif", tau=3.0, v_threshold=1.0, surrogate="triangle", alpha=0.5,
                detach_reset=True)  # fmt: skip
    assert seen and all(s == want for s in seen)
    mc = load_checkpoint("run/last.pt")["model_config"]
    assert {k: mc[k] for k in want} == want
    conf = json.loads(Path("run/config.json").read_text())
    assert (conf["neuron"], conf["tau"], conf["surrogate_alpha"]) == ("lif", 3.0, 0.5)
    # a resume keeps them without repeating the flags, and refuses a changed tau
    seen.clear()
    _ok(capsys, ["train", "--resume", "run", "--epochs", "2"])
    assert seen and all(s == want for s in seen)
    _error(capsys, ["train", "--resume", "run", "--epochs", "3", "--tau", "5"], "tau: saved 3.0")
    _error(
        capsys,
        ["train", "--resume", "run", "--epochs", "3", "--neuron", "empf"],
        "neuron 'lif'; a resumed run cannot use 'empf'",
    )


def test_lif_on_a_model_without_lif_is_one_error(capsys, monkeypatch):
    from empf_triton.models import MODELS
    from empf_triton.models.small import DigitsMLP

    def plain(*, in_shape, num_classes, T, hidden=(16,)) -> DigitsMLP:
        return DigitsMLP(in_shape, num_classes, T, hidden=hidden)

    monkeypatch.setitem(MODELS, "plain_mlp", plain)
    argv = ["train", "--dataset", "digits", "--model", "plain_mlp", "--neuron", "lif"]
    _error(capsys, argv, "model 'plain_mlp' cannot build LIF neurons")


def test_resume_from_best_does_not_replace_a_later_last(tmp_path, capsys):
    _ok(capsys, _argv("run", epochs=2))
    # make best.pt an earlier epoch than last.pt, as after a late drop in accuracy
    import shutil

    _ok(capsys, _argv("one", epochs=1))
    shutil.copy("one/last.pt", "run/best.pt")
    saved = _files(tmp_path / "run")
    _error(
        capsys,
        ["train", "--resume", "run/best.pt", "--epochs", "3"],
        "would replace",
        "a later checkpoint of this run",
    )
    assert _files(tmp_path / "run") == saved
    _ok(capsys, ["train", "--resume", "run/best.pt", "--epochs", "3", "--out", "branch"])
    assert load_checkpoint("branch/last.pt")["epoch"] == 3
    assert _files(tmp_path / "run") == saved


def test_resume_refused_when_checkpoint_changes_meanwhile(tmp_path, capsys, monkeypatch):
    _ok(capsys, _argv("run"))
    real = loop.load_checkpoint

    def load_then_touch(path, *a, **k):
        ck = real(path, *a, **k)
        st = os.stat(path)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # another run saved it
        return ck

    monkeypatch.setattr(loop, "load_checkpoint", load_then_touch)
    _error(capsys, ["train", "--resume", "run", "--epochs", "2"], "changed while this run started")
