"""Training strategies, evaluation, memory behaviour and checkpoints (docs/model.md §6)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pytest
import torch

from empf_triton import reset_net
from empf_triton.models import build_model
from empf_triton.train.checkpoint import (
    CheckpointError,
    capture_rng,
    check_compatible,
    load_checkpoint,
    load_model_state,
    restore_rng,
    save_checkpoint,
)
from empf_triton.train.loop import TrainConfig, run_training
from empf_triton.train.memory import SavedTensorMeter
from empf_triton.train.strategies import (
    STRATEGIES,
    draw_t_star,
    evaluate,
    iterate_batches,
    set_step_mode,
    train_batch,
    train_epoch,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # These nets are tiny: extra OpenMP threads only add overhead, and on a loaded 2-core
    # machine their busy-waiting slows the tests down many times over.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _mlp(T, hidden=(32, 32), seed=0):
    torch.manual_seed(seed)
    return build_model("digits_mlp", in_shape=(64,), num_classes=10, T=T, hidden=hidden)


@pytest.fixture(scope="module")
def digits():
    pytest.importorskip("sklearn")
    from empf_triton.data import load_dataset

    return load_dataset("digits")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_reduces_loss(strategy, digits):
    train, _, _ = digits
    x, y = train.x[:128], train.y[:128]
    T = 3
    model = _mlp(T)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)

    def full_loss():
        ev = evaluate(model, [(x, y)], T)
        return ev["loss"]

    before = full_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        r = train_batch(model, x, y, opt, strategy, T, generator=g)
        assert r.steps == (r.t_star + 1 if strategy == "random_step" else T)
        assert r.logits.shape == (128, 10)
    after = full_loss()
    assert after < 0.7 * before, (strategy, before, after)


def test_random_step_runs_t_star_plus_one_steps():
    T = 5
    model = _mlp(T)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(torch.is_grad_enabled()))
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    for t_star in range(T):
        calls.clear()
        before = [p.detach().clone() for p in model.parameters()]
        r = train_batch(model, x, y, opt, "random_step", T, t_star=t_star)
        assert r.t_star == t_star and r.steps == t_star + 1
        # t* + 1 forward steps, only the last one builds a graph
        assert calls == [False] * t_star + [True]
        # one optimizer step happened (weights moved)
        assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="t_star must be in 0..4"):
        train_batch(model, x, y, opt, "random_step", T, t_star=5)


def test_online_steps_optimizer_every_step():
    T = 3
    model = _mlp(T)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    steps = []
    opt.register_step_post_hook(lambda *a: steps.append(1))
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    train_batch(model, x, y, opt, "online", T)
    assert len(steps) == T
    for strategy in ("accumulate", "bptt", "random_step"):
        steps.clear()
        train_batch(model, x, y, opt, strategy, T)
        assert len(steps) == 1, strategy


def _twin_logits(w, t, x, v, bptt):
    """The net of `test_strategies_give_the_gradients_of_the_model`, written from the model's
    equations: linear -> EM-PF neuron (4-bit spikes, straight-through) -> linear -> parallel
    neuron -> linear. `w` holds its parameters, `v` the membrane carried to step t (updated)."""

    def spikes(m, th):
        s = torch.where(m > th, m - th, torch.zeros_like(m))
        q = torch.clamp(torch.round(s / 0.25), 0, 15) * 0.25
        return s + (q - s).detach()

    m = x @ w["0.weight"].T + w["0.bias"]
    if v:
        m = m + torch.sigmoid(w["1.logits"][1, t]) * (v[0] if bptt else v[0].detach())
    th = torch.sigmoid(w["1.logits"][0, t])
    s = spikes(m, th)
    v[:] = [torch.where(m > th, th, m)]
    m = s @ w["2.weight"].T + w["2.bias"]
    s = spikes(m, torch.sigmoid(w["3.logits"][0, t]))
    return s @ w["4.weight"].T + w["4.bias"]


@pytest.mark.parametrize("T", [1, 2, 3])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_give_the_gradients_of_the_model(strategy, T):
    """Each strategy's parameter gradients (at every optimizer step, learnable decay and
    threshold included) against a twin written from the model's equations: online and
    accumulate cut the membrane's path across steps, random_step differentiates only step t*,
    bptt the mean logits through time."""
    from empf_triton.nn import EMPFNeuron

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 5),
        EMPFNeuron(T, spike_bits=4),
        torch.nn.Linear(5, 4),
        EMPFNeuron(T, spike_bits=4, parallel=True),
        torch.nn.Linear(4, 3),
    )
    with torch.no_grad():  # varied decays and thresholds; weights large enough to fire
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.5 if n.endswith("logits") else p * 3)
    x, y = torch.randn(8, 6) * 2, torch.randint(0, 3, (8,))
    lr = 0.5
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    names = [n for n, _ in model.named_parameters()]
    got = []
    opt.register_step_pre_hook(lambda *a: got.append([p.grad.clone() for p in model.parameters()]))
    w = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    want = []

    def step(loss):
        grads = torch.autograd.grad(loss, list(w.values()))
        want.append(grads)
        with torch.no_grad():
            for p, g in zip(w.values(), grads):
                p -= lr * g

    ce = torch.nn.functional.cross_entropy
    t_star = T - 1 if strategy == "random_step" else None
    v = []
    if strategy == "online":
        for t in range(T):
            step(ce(_twin_logits(w, t, x, v, False), y))
    elif strategy == "random_step":
        with torch.no_grad():
            for t in range(t_star):
                _twin_logits(w, t, x, v, False)
        step(ce(_twin_logits(w, t_star, x, v, False), y))
    elif strategy == "accumulate":
        step(sum(ce(_twin_logits(w, t, x, v, False), y) for t in range(T)) / T)
    else:
        step(ce(torch.stack([_twin_logits(w, t, x, v, True) for t in range(T)]).mean(0), y))
    train_batch(model, x, y, opt, strategy, T, t_star=t_star)
    assert len(got) == len(want) == (T if strategy == "online" else 1)
    for g_got, g_want in zip(got, want):
        for n, a, b in zip(names, g_got, g_want):
            torch.testing.assert_close(a, b, msg=n)
    assert any((g[names.index("1.logits")][1] != 0).any() for g in got) == (T > 1)


def test_t_star_uniform():
    g = torch.Generator().manual_seed(0)
    T, n = 4, 8000
    counts = torch.bincount(torch.tensor([draw_t_star(T, g) for _ in range(n)]), minlength=T)
    # chi-square with 3 dof: 16.3 is the 0.1% quantile
    chi2 = float(((counts - n / T) ** 2 / (n / T)).sum())
    assert chi2 < 16.3, counts
    # identical seeds give identical draws (what keeps DDP ranks in step)
    a = [draw_t_star(T, torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1


def test_train_batch_without_generator_draws_t_star_anew():
    """Without a generator or t_star, each call draws its own t* (from torch's global RNG, so
    torch.manual_seed repeats the draws); a fresh default-seeded generator per call gave every
    batch the same t* (2 of 0..3), so the other steps never trained."""
    T = 4
    model = _mlp(T, hidden=(8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))

    def draws():
        return [train_batch(model, x, y, opt, "random_step", T).t_star for _ in range(24)]

    torch.manual_seed(3)
    first = draws()
    assert set(first) == set(range(T)), first
    torch.manual_seed(3)
    assert draws() == first


def test_train_epoch_counts_t_star(digits):
    train, _, _ = digits
    T = 4
    model = _mlp(T)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    r = train_epoch(
        model,
        iterate_batches(train, 16, shuffle=True, generator=torch.Generator().manual_seed(0)),
        opt,
        "random_step",
        T,
        generator=torch.Generator().manual_seed(1),
    )
    assert r.batches == 90 and r.samples == len(train)
    assert sum(r.t_star_counts) == 90 and min(r.t_star_counts) > 10
    assert 0 <= r.accuracy <= 1 and r.loss > 0


def _peak_saved(strategy: str, T: int, event: bool = False) -> int:
    torch.manual_seed(0)
    model = build_model(
        "mnist1d_cnn", in_shape=(1, 40), num_classes=10, T=T, channels=(8, 8, 16), pool_after=(0,)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 1, 40), torch.randint(0, 10, (16,))
    if event:  # an event batch [N, T, *]: each step reads its slice x[:, t]
        x = x.unsqueeze(1).expand(16, T, 1, 40).contiguous()
    with SavedTensorMeter() as meter:
        # random_step at its costliest draw, t* = T - 1
        train_batch(
            model, x, y, opt, strategy, T, t_star=T - 1 if strategy == "random_step" else None,
            is_event=event,
        )  # fmt: skip
    assert meter.current == 0  # every graph was freed
    return meter.peak


@pytest.mark.parametrize("event", [False, True])
@pytest.mark.parametrize("strategy", ["online", "random_step", "accumulate"])
def test_online_memory_does_not_grow_with_T(strategy, event):
    """Also on event data, whose step inputs are strided slices of the whole [N, T, *] batch:
    the meter counts the slice's elements, not the batch's storage (it reported 21x at T=32)."""
    m1, m8 = _peak_saved(strategy, 1, event), _peak_saved(strategy, 8, event)
    assert m1 > 0
    assert m8 <= 1.1 * m1, (strategy, m1, m8)
    if event:  # exactly what the same step inputs cost as separate tensors
        assert m8 == _peak_saved(strategy, 8, False), (strategy, m8)


def test_bptt_memory_grows_with_T():
    m1, m8 = _peak_saved("bptt", 1), _peak_saved("bptt", 8)
    assert m8 > 4 * m1, (m1, m8)


def test_meter_counts_views_by_what_they_hold():
    """A whole tensor once however often it is saved; a strided slice by its elements; an
    expanded tensor by its storage; a slice adds nothing while its whole storage is saved."""
    w = torch.randn(8, 16, requires_grad=True)
    with SavedTensorMeter() as m:
        a = (w * w).sum()  # w saved twice: counted once
    assert m.peak == 8 * 16 * 4
    base = torch.randn(8, 4, 16)
    with SavedTensorMeter() as m:  # (w * other saves `other` for w's gradient)
        b = (w * base[:, 1]).sum()  # a strided slice [8, 16] of a [8, 4, 16] batch
    assert m.peak == 8 * 16 * 4  # the slice, not the batch
    with SavedTensorMeter() as m:
        c = (w * torch.randn(16).expand(8, 16)).sum()
    assert m.peak == 16 * 4  # an expanded tensor: its storage
    with SavedTensorMeter() as m:
        d = (w * base[:, 1]).sum() + (w.unsqueeze(1) * base).sum()
    assert m.peak == 8 * 4 * 16 * 4  # the slice adds nothing to its whole storage
    del a, b, c, d


class _HostReads:
    """Counts the tensor-to-host reads (each a device sync on a GPU) made while active."""

    NAMES = ("__float__", "__int__", "item", "tolist", "cpu", "numpy")

    def __init__(self, monkeypatch):
        self.count = 0
        for name in self.NAMES:
            orig = getattr(torch.Tensor, name)

            def wrapper(t, *a, _orig=orig, **k):
                self.count += 1
                return _orig(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, wrapper)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_train_batch_reads_nothing_from_the_host(monkeypatch, strategy):
    """A batch makes no host read whatever the strategy (the online strategies once read each
    step's loss, later each batch's: a GPU sync each); reading `loss` is the one read, and gives
    the per-step losses summed as before."""
    T = 4
    model = _mlp(T)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    reads = _HostReads(monkeypatch)
    r = train_batch(model, x, y, opt, strategy, T, t_star=1)
    assert reads.count == 0
    assert isinstance(r.loss, float) and reads.count == 1
    assert r.loss_value.dtype == torch.float64 and r.loss_value.dim() == 0
    monkeypatch.undo()
    if strategy in ("online", "accumulate"):
        reset_net(model)
        with torch.no_grad():
            outs = [model(x).float() for _ in range(T)]
        want = 0.0
        for o in outs:
            want += float(torch.nn.functional.cross_entropy(o, y))
        assert r.loss == want / T


class _Due:
    """A progress callback that asks for numbers on the batches in `want` only."""

    def __init__(self, want):
        self.want, self.calls = set(want), []

    def due(self, i):
        return i in self.want

    def __call__(self, i, loss, acc):
        self.calls.append((i, loss, acc))


@pytest.mark.parametrize("strategy", ["online", "bptt"])
def test_train_epoch_reads_the_host_at_its_end(monkeypatch, digits, strategy):
    """An epoch makes its host reads (the loss sum, the correct count) at its end, not per batch:
    2 reads for 6 batches. A progress callback with `due` costs reads only on its due batches.
    The numbers equal a loop that reads every batch's loss and count."""
    train, _, _ = digits
    T = 2
    batches = list(iterate_batches(train, 64))[:6]
    batches[-1] = (batches[-1][0][:40], batches[-1][1][:40])  # a short last batch
    sizes = [y.shape[0] for _, y in batches]

    def run(progress=None, count=False):
        torch.manual_seed(0)
        model = _mlp(T)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        reads = _HostReads(monkeypatch) if count else None
        r = train_epoch(model, batches, opt, strategy, T, progress=progress)
        n = reads.count if reads else None
        monkeypatch.undo()
        return r, n

    r, n = run(count=True)
    assert n == 2 and r.batches == 6
    due = _Due({3, 6})
    r2, n2 = run(due, count=True)
    assert n2 == 2 + 2 * 2  # loss and count on each of the two due batches
    assert [c[0] for c in due.calls] == [3, 6]
    assert due.calls[-1][2] == r2.accuracy == r.accuracy and r2.loss == r.loss
    every = []
    run(lambda i, loss, acc: every.append((loss, acc)))  # a plain callable: called every batch
    assert len(every) == 6 and every[-1][1] == r.accuracy
    # the mean loss per sample: the batch means weighted by the batch sizes (fp64, in order)
    want = 0.0
    for e, n_b in zip(every, sizes):
        want = want + e[0] * n_b
    assert r.samples == sum(sizes) == 5 * 64 + 40
    assert r.loss == want / r.samples


def test_evaluate_reads_the_host_once_per_call(monkeypatch, digits):
    """Counts and loss sums stay on the device until the end (no sync per batch); the results
    are the per-batch sums taken in order."""
    _, test, _ = digits
    T = 3
    model = _mlp(T)
    batches = list(iterate_batches(test, 100))
    reads = _HostReads(monkeypatch)
    ev = evaluate(model, batches, T)
    assert reads.count == 2  # the counts, the loss sum
    monkeypatch.undo()
    model.eval()
    loss, correct = 0.0, torch.zeros(T, dtype=torch.long)
    with torch.no_grad():
        for x, y in batches:
            reset_net(model)
            set_step_mode(model, "m")
            cum = model(x.unsqueeze(0).expand(T, *x.shape)).float().cumsum(0)
            correct += (cum.argmax(-1) == y).sum(1)
            loss += float(torch.nn.functional.cross_entropy(cum[-1] / T, y, reduction="sum"))
    reset_net(model)
    set_step_mode(model, "s")
    assert ev["anytime_correct"] == correct.tolist()
    assert ev["loss"] == loss / len(test)
    assert evaluate(model, [], T)["samples"] == 0


def test_evaluate_anytime_and_step_modes(digits):
    _, test, _ = digits
    T = 3
    model = _mlp(T)
    batches = list(iterate_batches(test, 100))
    ev_m = evaluate(model, batches, T, step_mode="m")
    ev_s = evaluate(model, batches, T, step_mode="s")
    assert len(ev_m["anytime"]) == T and ev_m["samples"] == len(test)
    assert ev_m["anytime"] == ev_s["anytime"]
    assert ev_m["accuracy"] == ev_m["anytime"][-1] == ev_m["correct"] / len(test)
    assert ev_m["loss"] == pytest.approx(ev_s["loss"], rel=1e-5)
    assert model.training  # restored


def test_bad_strategy_and_T():
    model = _mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 64), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="unknown strategy 'sltt'"):
        train_batch(model, x, y, opt, "sltt", 2)
    with pytest.raises(ValueError, match="T must be an int >= 1"):
        train_batch(model, x, y, opt, "online", 0)
    for field, value, msg in [
        ("T", 0, "T must be an int >= 1"),
        ("strategy", "nope", "unknown strategy"),
        ("epochs", 0, "epochs must be"),
        ("optimizer", "lion", "unknown optimizer"),
        ("lr", -1.0, "lr must be"),
        ("weight_bits", 2, "weight_bits must be"),
        ("weight_bits", True, "weight_bits must be"),  # True == 1, but not a bit width
        ("seed", 2**63, "seed must be at most"),
    ]:
        with pytest.raises(ValueError, match=msg):
            TrainConfig(**{field: value}).validate()


# ----------------------------------------------------------------------------------- checkpoints


def _ckpt_args(model, **kw):
    return dict(
        model=model,
        model_name="digits_mlp",
        model_config={"in_shape": (64,), "num_classes": 10, "T": 2, "hidden": [32, 32]},
        **kw,
    )


def test_checkpoint_roundtrip_and_rng(tmp_path):
    model = _mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 64)).sum().backward()
    opt.step()
    g = torch.Generator().manual_seed(3)
    path = save_checkpoint(
        tmp_path / "c.pt", **_ckpt_args(model, optimizer=opt, epoch=7, generators={"g": g})
    )
    expect_torch, expect_g = torch.rand(3), torch.rand(3, generator=g)
    ckpt = load_checkpoint(path)
    assert ckpt["epoch"] == 7 and ckpt["model_name"] == "digits_mlp"
    model2 = _mlp(2, seed=1)
    load_model_state(model2, ckpt)
    for a, b in zip(model.state_dict().values(), model2.state_dict().values()):
        assert torch.equal(a, b)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(ckpt["optimizer"])
    g2 = torch.Generator()
    restore_rng(ckpt["rng"], {"g": g2})
    assert torch.equal(torch.rand(3), expect_torch)
    assert torch.equal(torch.rand(3, generator=g2), expect_g)
    st = capture_rng()
    assert set(st) >= {"torch", "numpy", "python", "generators"}


def test_checkpoint_atomic_on_crash(tmp_path, monkeypatch):
    model = _mlp(2)
    path = save_checkpoint(tmp_path / "last.pt", **_ckpt_args(model, epoch=1))
    good = path.read_bytes()

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    # crash after the temp file is written, before the rename
    monkeypatch.setattr(os, "replace", crash)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, **_ckpt_args(model, epoch=2))
    monkeypatch.undo()
    # crash while the temp file is being written
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, **_ckpt_args(model, epoch=2))
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temp files left


def test_checkpoint_rejects_damaged_files(tmp_path):
    model = _mlp(2)
    path = save_checkpoint(tmp_path / "c.pt", **_ckpt_args(model))
    data = path.read_bytes()
    cases = {
        "trunc.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "garbage.pt": b"not a checkpoint at all" * 10,
    }
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF  # inside the payload: only the checksum notices
    cases["flipped.pt"] = bytes(flipped)
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match="corrupt|truncated|empty|cannot be read"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an empf_triton checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_checkpoint_path_of_a_run_folder_names_its_checkpoints(tmp_path):
    """A run folder given as the checkpoint is refused, and the message names the checkpoint
    files that are in it (none named where it holds none)."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(CheckpointError, match=r"is a folder$"):
        load_checkpoint(run)
    save_checkpoint(run / "best.pt", **_ckpt_args(_mlp(2)))
    (run / "last.pt").write_bytes((run / "best.pt").read_bytes())
    with pytest.raises(
        CheckpointError,
        match=r"is a folder; give a checkpoint file in it, e\.g\. "
        + re.escape(f"{run / 'best.pt'} or {run / 'last.pt'}"),
    ):
        load_checkpoint(run)


def test_checkpoint_of_other_model_rejected(tmp_path):
    model = _mlp(2)
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "c.pt", **_ckpt_args(model)))
    with pytest.raises(CheckpointError, match="model 'digits_mlp', not 'mnist1d_cnn'"):
        check_compatible(ckpt, "mnist1d_cnn")
    with pytest.raises(CheckpointError, match="T: saved 2 vs requested 4"):
        check_compatible(ckpt, "digits_mlp", {"T": 4})
    check_compatible(ckpt, "digits_mlp", {"T": 2})
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_model_state(_mlp(2, hidden=(16, 16)), ckpt)


def test_checkpoint_keys_are_the_plain_models_whatever_the_wrapper(tmp_path):
    """A torch.compile'd (or DataParallel) model saves the plain model's keys (no `_orig_mod.`
    prefix), and any of the three loads any checkpoint."""
    wrappers = {
        "plain": lambda m: m,
        "compiled": torch.compile,  # lazy: nothing compiles, state_dict only
        "data_parallel": torch.nn.DataParallel,
    }
    model = _mlp(2)
    keys = list(model.state_dict())
    for name, wrap in wrappers.items():
        ckpt = load_checkpoint(save_checkpoint(tmp_path / f"{name}.pt", **_ckpt_args(wrap(model))))
        assert list(ckpt["model"]) == keys, name
        for into, wrap_into in wrappers.items():
            other = _mlp(2, seed=1)
            load_model_state(wrap_into(other), ckpt)
            for a, b in zip(model.state_dict().values(), other.state_dict().values()):
                assert torch.equal(a, b), (name, into)


def _state(path):
    return load_checkpoint(path)["model"]


def test_exact_resume(tmp_path, digits):
    """Train 2 epochs == train 1, stop, resume 1 more: bit-identical weights on CPU."""
    common = dict(
        dataset="digits",
        strategy="random_step",
        epochs=2,
        batch_size=64,
        T=3,
        device="cpu",
        progress=False,
        model_options={"hidden": [64, 64]},
    )
    torch.manual_seed(1234)  # the caller's global stream: a run leaves it as it was
    caller = torch.get_rng_state()
    a = run_training(TrainConfig(out=str(tmp_path / "a"), **common), log=lambda s: None)
    assert a["epochs_run"] == 2
    assert torch.equal(torch.get_rng_state(), caller)
    b = run_training(
        TrainConfig(out=str(tmp_path / "b"), stop_after=1, **common), log=lambda s: None
    )
    assert b["epochs_run"] == 1 and _state(tmp_path / "b" / "last.pt")
    c = run_training(TrainConfig(resume=str(tmp_path / "b"), **common), log=lambda s: None)
    assert c["epochs_run"] == 1 and c["epochs_done"] == 2 and c["out"] == str(tmp_path / "b")
    sa, sc = _state(tmp_path / "a" / "last.pt"), _state(tmp_path / "b" / "last.pt")
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert a["final"]["test_accuracy"] == c["final"]["test_accuracy"]
    hist = load_checkpoint(tmp_path / "b" / "last.pt")["history"]
    assert [h["epoch"] for h in hist] == [1, 2]


def test_resume_with_other_model_keeps_checkpoint(tmp_path, digits):
    common = dict(dataset="digits", epochs=1, T=2, device="cpu", progress=False)
    run_training(TrainConfig(out=str(tmp_path / "r"), **common), log=lambda s: None)
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match="T: saved 2 vs requested 3"):
        run_training(
            TrainConfig(**{**common, "T": 3, "epochs": 2}, resume=str(last)), log=lambda s: None
        )
    with pytest.raises(ValueError, match="already holds files of another run"):
        run_training(TrainConfig(out=str(tmp_path / "r"), **common), log=lambda s: None)
    assert last.read_bytes() == before


def test_a_folder_with_any_run_file_is_refused_without_overwrite(tmp_path, digits):
    """best.pt alone (last.pt deleted to save space), or a config.json / metrics.csv of the
    user's own in --out, is not replaced by a new run unless --overwrite."""
    common = dict(dataset="digits", epochs=1, T=2, device="cpu", progress=False)
    for name in ("best.pt", "config.json", "metrics.csv"):
        folder = tmp_path / name.replace(".", "_")
        folder.mkdir()
        (folder / name).write_bytes(b"keep")
        with pytest.raises(ValueError, match=f"already holds files of another run \\({name}\\)"):
            run_training(TrainConfig(out=str(folder), **common), log=lambda s: None)
        assert (folder / name).read_bytes() == b"keep"


def test_overwrite_removes_the_earlier_runs_files_before_writing(tmp_path, digits, monkeypatch):
    """With --overwrite, a crash during the first save leaves no file of the earlier run beside
    the new one's (before: the new config.json sat next to the old last.pt, best.pt, metrics)."""
    import empf_triton.train.loop as loop

    common = dict(dataset="digits", epochs=1, T=2, device="cpu", progress=False)
    out = tmp_path / "r"
    run_training(TrainConfig(out=str(out), **common), log=lambda s: None)

    def full_disk(path, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop, "save_checkpoint", full_disk)
    with pytest.raises(OSError, match="No space"):
        run_training(TrainConfig(out=str(out), overwrite=True, lr=0.05, **common),
                     log=lambda s: None)  # fmt: skip
    assert not [n for n in loop.RUN_FILES if (out / n).exists()]


def test_a_branch_keeps_its_best_epoch_as_best_pt(tmp_path, digits):
    """Resuming into a new folder: when the first new epoch is worse than the best inherited one,
    best.pt is the inherited best checkpoint (copied from the folder branched off), not the new
    epoch, so best.pt, the summary and the history agree."""
    common = dict(dataset="digits", T=2, device="cpu", progress=False)
    a = tmp_path / "a"
    run_training(TrainConfig(out=str(a), epochs=2, **common), log=lambda s: None)
    src = load_checkpoint(a / "best.pt")
    hist = load_checkpoint(a / "last.pt")["history"]
    # lr 0 past the branch: the next epoch cannot beat the best one by learning
    r = run_training(
        TrainConfig(resume=str(a / "last.pt"), out=str(tmp_path / "b"), epochs=3, lr=1e-9,
                    **common),
        log=lambda s: None,
    )  # fmt: skip
    best_pt = load_checkpoint(tmp_path / "b" / "best.pt")
    accs = [h["test_accuracy"] for h in r["history"]]
    assert best_pt["history"][-1]["test_accuracy"] == max(accs) == r["best_test_accuracy"]
    assert accs[-1] < max(accs)  # the case under test (seeded: holds on every run)
    assert best_pt["epoch"] == src["epoch"] and best_pt["history"] == hist[: src["epoch"]]


def test_a_branch_without_its_best_checkpoint_says_what_best_pt_holds(tmp_path, digits):
    """The branched-off folder's best.pt is gone: best.pt holds the first new epoch (never
    missing), and the log says the best epoch so far is not there."""
    common = dict(dataset="digits", T=2, device="cpu", progress=False)
    a = tmp_path / "a"
    run_training(TrainConfig(out=str(a), epochs=2, **common), log=lambda s: None)
    (a / "best.pt").unlink()
    lines: list[str] = []
    r = run_training(
        TrainConfig(resume=str(a / "last.pt"), out=str(tmp_path / "b"), epochs=3, lr=1e-9,
                    **common),
        log=lines.append,
    )  # fmt: skip
    accs = [h["test_accuracy"] for h in r["history"]]
    assert accs[-1] < max(accs)  # the case under test (seeded, as in the test above)
    assert load_checkpoint(tmp_path / "b" / "best.pt")["epoch"] == 3
    assert any("best.pt holds epoch 3 until a better one" in s for s in lines)


# ---------------------------------------------------------------------- the small nets (small.py)


@pytest.mark.parametrize(
    "name,in_shape,options",
    [
        ("mnist1d_cnn", (1, 40), {}),
        ("mnist1d_cnn", (1, 40), {"spike_bits": 4, "mem_bn": True, "seca": True}),
        ("mnist1d_cnn", (1, 40), {"parallel": True, "weight_bits": 1.5}),
        ("mnist1d_cnn", (1, 40), {"weight_bits": 32, "channels": (8, 8, 8)}),
        ("digits_mlp", (64,), {}),
        # three widths: two blocks, so block 1's neuron is parallel (one block has none)
        (
            "digits_mlp",
            (64,),
            {"spike_bits": 2, "mem_bn": True, "parallel": True, "hidden": (32, 24, 16)},
        ),  # fmt: skip
    ],
)
def test_small_models_step_modes_agree(name, in_shape, options):
    from empf_triton import reset_net
    from empf_triton.models import set_step_mode
    from empf_triton.nn import EMPFNeuron
    from empf_triton.nn.binary import BinaryConv2d, BinaryLinear

    T = 3
    torch.manual_seed(0)
    model = build_model(name, in_shape=in_shape, num_classes=10, T=T, **options)
    assert model.T == T and model.num_classes == 10
    neurons = [m for m in model.modules() if isinstance(m, EMPFNeuron)]
    assert len(neurons) >= 2
    binary = [m for m in model.modules() if isinstance(m, (BinaryConv2d, BinaryLinear))]
    assert bool(binary) == (options.get("weight_bits", 1) != 32)
    # train a little so BN statistics and thresholds are not at their initial values
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(16, *in_shape), torch.randint(0, 10, (16,))
    for _ in range(2):
        train_batch(model, x, y, opt, "online", T)
    model.eval()
    with torch.no_grad():
        reset_net(model)
        set_step_mode(model, "s")
        s_out = torch.stack([model(x) for _ in range(T)])
        reset_net(model)
        set_step_mode(model, "m")
        m_out = model(x.unsqueeze(0).expand(T, *x.shape))
    assert s_out.shape == (T, 16, 10)
    torch.testing.assert_close(s_out, m_out, rtol=1e-5, atol=1e-5)


def test_small_models_bad_options():
    with pytest.raises(ValueError, match="does not take option|unexpected keyword"):
        build_model("mnist1d_cnn", in_shape=(1, 40), num_classes=10, T=2, width=3)
    with pytest.raises(ValueError, match="seca"):
        build_model("digits_mlp", in_shape=(64,), num_classes=10, T=2, seca=True)
    with pytest.raises(ValueError, match="weight_bits"):
        build_model("digits_mlp", in_shape=(64,), num_classes=10, T=2, weight_bits=2)
    with pytest.raises(ValueError, match="in_shape must be"):
        build_model("mnist1d_cnn", in_shape=(40,), num_classes=10, T=2)
    with pytest.raises(ValueError, match="spike_bits"):
        build_model("mnist1d_cnn", in_shape=(1, 40), num_classes=10, T=2, spike_bits=9)
    model = build_model("mnist1d_cnn", in_shape=(1, 40), num_classes=10, T=2)
    with pytest.raises(ValueError, match=r"needs input \[N, 1, 40\]"):
        model(torch.randn(4, 40))


def test_fp16_scaler_path_with_grad_clip_steps_every_strategy():
    """fp16 autocast with a GradScaler (CPU): every strategy trains, the scaler is stepped,
    parameters stay fp32 and finite."""
    from empf_triton.train.precision import make_grad_scaler

    x, y = torch.randn(16, 64), torch.randint(0, 10, (16,))
    for strategy in STRATEGIES:
        model = _mlp(2, hidden=(16,))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = make_grad_scaler("cpu", "fp16")
        before = [p.detach().clone() for p in model.parameters()]
        r = train_batch(
            model, x, y, opt, strategy, 2, precision="fp16", scaler=scaler, grad_clip=1.0,
            t_star=1,
        )  # fmt: skip
        assert torch.isfinite(torch.tensor(r.loss)), strategy
        assert scaler.get_scale() > 0
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), strategy
        assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert make_grad_scaler("cpu", "bf16") is None and make_grad_scaler("cpu", "fp32") is None
    with pytest.raises(ValueError, match="precision"):
        train_batch(_mlp(2), x, y, opt, "online", 2, precision="fp8")


def test_compiled_and_ddp_wrappers_are_unwrapped():
    from empf_triton.nn.neuron import unwrap_model
    from empf_triton.train.precision import compile_model

    model = _mlp(2, hidden=(8,))
    assert compile_model(model, "none") is model
    compiled = compile_model(model, "default")  # lazy: nothing compiles until it is called
    assert unwrap_model(compiled) is model
    with pytest.raises(ValueError, match="compile"):
        compile_model(model, "fast")


def test_resume_changes_and_hyperparameters_applied():
    from empf_triton.train.loop import _apply_hyperparameters, _make_scheduler, resume_changes

    cfg = TrainConfig(lr=0.5, epochs=4, schedule="cosine", optimizer="sgd", momentum=0.5)
    saved = {"lr": 0.1, "epochs": 2, "optimizer": "sgd", "momentum": 0.9, "batch_size": 128}
    assert resume_changes(cfg, saved) == {
        "lr": (0.1, 0.5), "epochs": (2, 4), "momentum": (0.9, 0.5),
    }  # fmt: skip
    with pytest.raises(ValueError, match="optimizer 'adamw'; a resumed run cannot use 'sgd'"):
        resume_changes(cfg, {**saved, "optimizer": "adamw"})
    model = _mlp(2, hidden=(8,))
    old = TrainConfig(lr=0.1, epochs=2, optimizer="sgd")
    opt = torch.optim.SGD(model.parameters(), lr=old.lr, momentum=0.9)
    sched = _make_scheduler(old, opt, steps_per_epoch=10)
    for _ in range(10):
        opt.step()
        sched.step()
    state_o, state_s = opt.state_dict(), sched.state_dict()
    opt2 = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    sched2 = _make_scheduler(cfg, opt2, steps_per_epoch=10)
    opt2.load_state_dict(state_o)
    sched2.load_state_dict(state_s)
    _apply_hyperparameters(cfg, opt2, sched2)
    g = opt2.param_groups[0]
    # step 10 of a 40-step cosine from 0.5: 0.5 * (1 + cos(pi / 4)) / 2
    assert g["lr"] == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert g["momentum"] == 0.5 and g["nesterov"] is True
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.25 * (1 + math.cos(math.pi * 11 / 40)))


def test_cli_progress_bar_asks_for_numbers_only_when_it_draws(monkeypatch, digits):
    """The CLI's bar draws at most ten times a second and on the last batch, only on a
    terminal; `train_epoch` reads the device only for the batches it draws."""
    import sys

    from empf_triton.train import loop

    assert not loop._Progress(5, "e", True).due(5)  # stderr is not a terminal here
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert not loop._Progress(5, "e", False).due(5)  # --no-progress
    bar = loop._Progress(5, "e", True)
    bar.last = float("inf")  # as if it had just drawn
    assert bar.due(5) and not bar.due(1)  # the last batch always; others 0.1 s after a draw
    bar.last = -1e9  # long ago
    assert bar.due(2)
    train, _, _ = digits
    model = _mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = list(iterate_batches(train, 64))[:6]
    drawn = []
    bar = loop._Progress(6, "e", True)
    bar.last = float("inf")  # as if it had just drawn, whatever the machine's speed
    real_call = loop._Progress.__call__
    monkeypatch.setattr(
        loop._Progress,
        "__call__",
        lambda self, i, loss, acc: (drawn.append(i), real_call(self, i, loss, acc)),
    )
    reads = _HostReads(monkeypatch)
    train_epoch(model, batches, opt, "online", 2, progress=bar)
    assert drawn == [6] and reads.count == 2 + 2  # the epoch's 2 reads, the last batch's 2


def test_resume_refuses_a_model_option_left_out(tmp_path, digits):
    """A resume whose model configuration leaves out a saved entry (a LIF surrogate alpha of 8
    -> the default 4) is a different model and refused, naming the entry (before: only the
    requested keys were compared, so the run went on with alpha 4 and recorded no change)."""
    common = dict(dataset="digits", epochs=2, T=2, device="cpu", progress=False, neuron="lif")
    run_training(
        TrainConfig(out=str(tmp_path / "r"), stop_after=1, surrogate_alpha=8.0, **common),
        log=lambda s: None,
    )
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(CheckpointError, match=r"alpha: saved 8.0 vs requested \(not set\)"):
        run_training(TrainConfig(resume=str(last), **common), log=lambda s: None)
    assert last.read_bytes() == before
    ckpt = load_checkpoint(last)
    check_compatible(ckpt, "digits_mlp", {"T": 2})  # a partial expectation still works
    cfg = {k: v for k, v in ckpt["model_config"].items() if k != "alpha"}
    check_compatible(ckpt, "digits_mlp", cfg)
    with pytest.raises(CheckpointError, match=r"alpha: saved 8.0 vs requested \(not set\)"):
        check_compatible(ckpt, "digits_mlp", cfg, exact=True)
    check_compatible(ckpt, "digits_mlp", ckpt["model_config"], exact=True)


def test_resume_with_another_world_size_is_refused(tmp_path, digits, monkeypatch):
    """A run trained on 2 processes resumed on 1 is refused (its schedule and data order are
    counted in joint batches of 2 processes); before, it went on with a wrong schedule."""
    import empf_triton.train.loop as loop

    real = loop.save_checkpoint

    def as_two_processes(path, **kw):  # what rank 0 of a 2-process run writes
        return real(path, **{**kw, "extra": {**kw["extra"], "world_size": 2}})

    common = dict(dataset="digits", epochs=2, T=2, device="cpu", progress=False)
    monkeypatch.setattr(loop, "save_checkpoint", as_two_processes)
    run_training(TrainConfig(out=str(tmp_path / "r"), stop_after=1, **common), log=lambda s: None)
    monkeypatch.undo()
    last = tmp_path / "r" / "last.pt"
    before = last.read_bytes()
    with pytest.raises(ValueError, match="trained with world size 2 .*cannot use 1"):
        run_training(TrainConfig(resume=str(last), **common), log=lambda s: None)
    assert last.read_bytes() == before
    # a 1-process run records 1 and resumes
    run_training(TrainConfig(out=str(tmp_path / "s"), stop_after=1, **common), log=lambda s: None)
    assert load_checkpoint(tmp_path / "s" / "last.pt")["extra"]["world_size"] == 1
    r = run_training(TrainConfig(resume=str(tmp_path / "s"), **common), log=lambda s: None)
    assert r["epochs_done"] == 2


def test_overwrite_without_out_replaces_only_the_default_folder(tmp_path, digits, monkeypatch):
    """--overwrite with no --out takes the default folder; while another run uses it, that is
    an error, and the run kept in the suffixed folder -2 is left alone (before, it was
    replaced)."""
    from empf_triton.train.lock import OutputLock

    monkeypatch.chdir(tmp_path)
    common = dict(dataset="digits", epochs=1, T=2, device="cpu", progress=False)
    a = run_training(TrainConfig(seed=1, **common), log=lambda s: None)
    b = run_training(TrainConfig(seed=2, **common), log=lambda s: None)
    assert Path(b["out"]).name == Path(a["out"]).name + "-2"
    kept = (Path(b["out"]) / "last.pt").read_bytes()
    with OutputLock(Path(a["out"])):  # a run in progress holds the default folder
        with pytest.raises(ValueError, match="is in use by another empf train run"):
            run_training(TrainConfig(seed=3, overwrite=True, **common), log=lambda s: None)
    assert (Path(b["out"]) / "last.pt").read_bytes() == kept
    c = run_training(TrainConfig(seed=3, overwrite=True, **common), log=lambda s: None)
    assert c["out"] == a["out"] and (Path(b["out"]) / "last.pt").read_bytes() == kept


def test_a_training_batch_of_one_sample_is_refused_up_front(tmp_path, digits):
    """A batch size that leaves a last batch of 1 sample stops the run before training (batch
    norm cannot train on one sample): before, the first epoch ran and died at its last batch
    without a checkpoint."""
    n = len(digits[0])
    common = dict(dataset="digits", epochs=1, T=2, device="cpu", progress=False)
    bs = next(b for b in range(200, n) if n % b == 1)
    with pytest.raises(ValueError, match=f"--batch-size {bs} leaves a training batch of 1 sample"):
        run_training(TrainConfig(out=str(tmp_path / "a"), batch_size=bs, **common), log=print)
    assert not (tmp_path / "a" / "last.pt").exists()
    with pytest.raises(ValueError, match="--batch-size 1 leaves a training batch of 1 sample"):
        run_training(TrainConfig(out=str(tmp_path / "b"), batch_size=1, **common), log=print)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"momentum": 0.5}, "momentum is an SGD setting"),
        ({"spike_step": 0.5}, "spike_step is the k-bit spike quantiser's step"),
        ({"model_options": {"grad_mode": "bptt"}}, "model_options may not set 'grad_mode'"),
        ({"model_options": {"step_mode": "m"}}, "model_options may not set 'step_mode'"),
    ],
)
def test_settings_that_would_do_nothing_are_refused(kw, match):
    """Momentum with AdamW, a spike step without k-bit spikes and a grad_mode the strategy
    overrides changed nothing in training; they are refused instead of accepted."""
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()
    TrainConfig(optimizer="sgd", momentum=0.5).validate()  # where they apply, they are fine
    TrainConfig(spike_bits=2, spike_step=0.5).validate()


def test_evaluate_gives_back_the_step_and_grad_modes(digits):
    """evaluate leaves a caller's bptt / step mode "m" setup as it was (it left every neuron
    online in step mode "s", so a user's own BPTT loop trained with cut gradients after an
    evaluation) and refuses an unknown step mode (it ran "s")."""
    from empf_triton.nn.neuron import StatefulNeuron

    model = _mlp(2, hidden=(8, 8))
    set_step_mode(model, "m")
    for m in model.modules():
        if isinstance(m, StatefulNeuron):
            m.grad_mode = "bptt"
    x, y = digits[1].x[:20], digits[1].y[:20]
    for mode in ("s", "m"):
        evaluate(model, [(x, y)], 2, step_mode=mode)
        neurons = [m for m in model.modules() if isinstance(m, StatefulNeuron)]
        assert neurons and all(n.grad_mode == "bptt" and n.step_mode == "m" for n in neurons)
        assert model.step_mode == "m"
    with pytest.raises(ValueError, match="step_mode must be 's' or 'm'"):
        evaluate(model, [(x, y)], 2, step_mode="bogus")


def test_compiled_training_stays_compiled_after_the_first_epoch():
    """compile_model raises dynamo's per-function graph limit for the model's T: at T=4 a spiking
    model needs more than the default 8 graphs (one per step and grad mode, a short last batch,
    evaluation's step mode), past which every call ran eager again from the second epoch on."""
    import torch._dynamo

    from empf_triton.nn import EMPFNeuron
    from empf_triton.train.precision import compile_model

    calls = {"compiled": 0}

    def counting(gm, example_inputs):
        def run(*args):
            calls["compiled"] += 1
            return gm.forward(*args)

        return run

    T = 4
    torch._dynamo.reset()
    saved = torch._dynamo.config.recompile_limit
    try:
        torch._dynamo.config.recompile_limit = 8  # the default
        model = _mlp(T, hidden=(8, 8))
        cm = compile_model(model, "default", backend=counting)
        assert torch._dynamo.config.recompile_limit >= 4 * T + 8
        X, Y = torch.randn(40, 64), torch.randint(0, 10, (40,))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for epoch in range(2):
            calls["compiled"] = 0
            batches = [(X[i : i + 16], Y[i : i + 16]) for i in range(0, 40, 16)]  # 16, 16, 8
            gen = torch.Generator().manual_seed(epoch)
            train_epoch(cm, batches, opt, "online", T, generator=gen)
            evaluate(cm, batches, T)
            # online: T calls per batch (graphs per step x 2 batch sizes), evaluate one per batch
            assert calls["compiled"] == 3 * T + 3, (epoch, calls)
        # a user's own container (no T of its own) gets the limit of its neurons' largest T
        torch._dynamo.config.recompile_limit = 8
        own = torch.nn.Sequential(torch.nn.Linear(4, 4), EMPFNeuron(6, step_mode="s"))
        compile_model(own, "default")
        assert torch._dynamo.config.recompile_limit == 4 * 6 + 8
    finally:
        torch._dynamo.config.recompile_limit = saved
        torch._dynamo.reset()


def _model_calls():
    """Each public function that takes a model, called with `bad` in the model's place."""
    from empf_triton import models, train
    from empf_triton.train.precision import compile_model

    x, y = torch.zeros(2, 64), torch.zeros(2, dtype=torch.long)
    return {
        "set_step_mode": lambda bad: train.set_step_mode(bad, "s"),
        "set_grad_mode": lambda bad: models.set_grad_mode(bad, "online"),
        "count_parameters": models.count_parameters,
        "save_checkpoint": lambda bad: train.save_checkpoint(
            "unused.pt", model=bad, model_name="digits_mlp", model_config={}
        ),
        "evaluate": lambda bad: train.evaluate(bad, [(x, y)], 2),
        "train_batch": lambda bad: train.train_batch(bad, x, y, None, "online", 2),
        "train_epoch": lambda bad: train.train_epoch(bad, [(x, y)], None, "online", 2),
        "compile_model": lambda bad: compile_model(bad, "default"),
    }


@pytest.mark.parametrize("name", sorted(_model_calls()))
@pytest.mark.parametrize("bad", [None, "model", [torch.nn.Linear(2, 2)]], ids=repr)
def test_functions_taking_a_model_name_a_non_module(name, bad, tmp_path, monkeypatch):
    """A model that is not an nn.Module is a TypeError naming the function, not an
    AttributeError from deep inside (`'NoneType' object has no attribute 'modules'`)."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=f"^{name} needs an nn.Module, got {type(bad).__name__}$"):
        _model_calls()[name](bad)
    assert not any(tmp_path.iterdir())  # save_checkpoint wrote nothing


def test_step_and_grad_mode_setters_are_one_function_everywhere():
    """models.set_step_mode and train.set_step_mode (once two copies that differed: only one
    unwrapped a compiled model) are the same function, as are the set_grad_mode twins."""
    from empf_triton import models, train

    assert models.set_step_mode is train.set_step_mode
    assert models.set_grad_mode is train.set_grad_mode
