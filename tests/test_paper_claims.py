"""bench/paper_claims.py: the verdict rules on synthetic results, and one real tiny grid run
through the library's trainer (digits, 1 epoch, 1 seed, 4 configurations)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pc():
    path = ROOT / "bench" / "paper_claims.py"
    spec = importlib.util.spec_from_file_location("paper_claims", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _runs(acc: dict[str, list[float]]) -> list[dict]:
    """Run records from {config: [final accuracy in % per seed]} (best = final + 1 pt)."""
    return [
        {
            "config": name,
            "seed": s,
            "final": a / 100,
            "best": (a + 1) / 100,
            "epoch_seconds": 1.0,
        }
        for name, accs in acc.items()
        for s, a in enumerate(accs)
    ]


def _memory(growth: dict[str, float]) -> list[dict]:
    rows = []
    for neuron in ("empf", "lif"):
        for strat in ("online", "random_step", "accumulate", "bptt"):
            for T in (2, 4, 8):
                g = growth.get(strat, 1.0)
                rows.append(
                    {
                        "neuron": neuron,
                        "strategy": strat,
                        "T": T,
                        "saved_bytes": int(1000 * g ** (T.bit_length() - 2)),  # x g per doubling
                    }
                )
    return rows


def test_mean_std_and_verdict_rules(pc):
    m, s = pc.mean_std([1.0, 2.0, 3.0])
    assert m == 2.0 and s == pytest.approx(1.0)
    assert pc.mean_std([5.0]) == (5.0, 0.0)
    assert all(math.isnan(v) for v in pc.mean_std([]))
    # d <= 0.5: mean + std inside -> holds; mean - std outside -> fails; else inconclusive
    assert pc.verdict_at_most([0.1, 0.3], 0.5) == "holds"
    assert pc.verdict_at_most([1.0, 1.2], 0.5) == "does not hold"
    assert pc.verdict_at_most([0.0, 1.0], 0.5) == "inconclusive"
    assert pc.verdict_at_most([], 0.5) == "not run"
    assert pc.verdict_greater([1.0, 2.0]) == "holds"
    assert pc.verdict_greater([-1.0, -2.0]) == "does not hold"
    assert pc.verdict_greater([-1.0, 1.5]) == "inconclusive"
    assert pc.combine("holds", "holds") == "holds"
    assert pc.combine("holds", "inconclusive") == "inconclusive"
    assert pc.combine("inconclusive", "does not hold") == "does not hold"
    assert pc.combine("holds", "not run") == "not run"


def test_claims_from_synthetic_results(pc):
    acc = {
        # (a): EM-PF online loses 0.2 pt vs BPTT, LIF online loses 3 pt -> holds
        "empf-bptt": [90.0, 91.0, 92.0],
        "empf-online": [89.8, 90.8, 91.8],
        "lif-bptt": [88.0, 89.0, 90.0],
        "lif-online": [85.0, 86.0, 87.0],
        # (a'): EM-PF random_step loses 2 pt -> does not hold
        "empf-random_step": [88.0, 89.0, 90.0],
        "lif-random_step": [80.0, 81.0, 82.0],
        # (b): full precision 3 pt better than binary -> does not hold
        "empf-online-fp32w": [92.8, 93.8, 94.8],
        # (c): 4-bit loses 0, 0.3, 1.5 pt: mean 0.6 ± 0.79 around 0.5 -> inconclusive
        "empf-online-4bit": [89.8, 90.5, 90.3],
    }
    runs = _runs(acc)
    claims = {c["id"]: c for c in pc.evaluate_claims(runs, _memory({"bptt": 2.0}))}
    assert claims["a"]["verdict"] == "holds"
    assert claims["a"]["parts"][0]["d"] == pytest.approx([0.2, 0.2, 0.2])
    assert claims["a"]["parts"][2]["d"] == pytest.approx([2.8, 2.8, 2.8])
    assert claims["a'"]["verdict"] == "does not hold"
    assert claims["b"]["verdict"] == "does not hold"
    assert claims["b"]["parts"][0]["d"] == pytest.approx([3.0, 3.0, 3.0])
    assert claims["c"]["verdict"] == "inconclusive"
    assert claims["d"]["verdict"] == "holds"
    # memory that grows for an online strategy breaks (d); BPTT growth alone does not
    grown = {c["id"]: c for c in pc.evaluate_claims(runs, _memory({"online": 1.2}))}
    assert grown["d"]["verdict"] == "does not hold"
    # missing configurations: the claims that need them are "not run"
    part = {c["id"]: c for c in pc.evaluate_claims(_runs({"empf-online": [90.0]}), [])}
    assert {c["verdict"] for c in part.values()} == {"not run"}
    # the report shows the tables, every verdict and the unpaired config note
    meta = {"dataset": "synthetic", "seeds": [0, 1, 2], "configs": list(pc.CONFIGS)}
    text = pc.build_report({"meta": meta, "runs": runs[:-1], "memory": _memory({"bptt": 2.0})})
    assert "requested but not finished: empf-online-4bit (2 of 3 seeds)." in text
    assert "| empf-online | empf | online | binary | float | 3 | 90.80 ± 1.00 |" in text
    assert "**claim (b)** | | | | **does not hold**" in text
    assert "**claim (a)** | | | | **holds**" in text
    assert "| empf | bptt | 1.0 | 2.0 | 3.9 |" in text  # KiB at T = 2, 4, 8
    assert "On the best test accuracy" in text


def test_parse_args_rejects_bad_values(pc):
    for argv in (
        ["--out", "x", "--configs", "empf-online,nope"],
        ["--out", "x", "--epochs", "0"],
        ["--out", "x", "--memory-T", "2,x"],
        ["--out", "x", "--seeds", "0"],
    ):
        with pytest.raises(SystemExit):
            pc.parse_args(argv)
    a = pc.parse_args(["--out", "x", "--memory-T", "none", "--configs", "lif-bptt"])
    assert a.memory_Ts == [] and a.config_list == ["lif-bptt"]


def test_real_tiny_grid_end_to_end(pc, tmp_path, capsys):
    """Four real trainer runs (digits, 1 epoch) and a memory table at T = 1, 2, then a rerun that
    reuses the finished runs and a report-only rebuild."""
    pytest.importorskip("sklearn")
    pytest.importorskip("matplotlib")
    out = tmp_path / "claims"
    argv = [
        "--dataset", "digits", "--epochs", "1", "--seeds", "1", "--out", str(out),
        "--configs", "empf-online,empf-bptt,lif-online,lif-bptt", "--memory-T", "1,2",
        "--memory-batch", "32",
    ]  # fmt: skip
    assert pc.main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    names = ["empf-online", "empf-bptt", "lif-online", "lif-bptt"]
    assert [r["config"] for r in res["runs"]] == names
    for r in res["runs"]:
        assert 0.0 <= r["final"] <= r["best"] <= 1.0 and r["model"] == "digits_mlp"
        assert (out / "runs" / f"{r['config']}-s0" / "last.pt").exists()
    # the online runs learn something in one epoch (10 classes: chance is 10%)
    assert all(r["final"] > 0.3 for r in res["runs"] if r["strategy"] == "online")
    assert len(res["memory"]) == 2 * 4 * 2
    mem = {(m["neuron"], m["strategy"], m["T"]): m["saved_bytes"] for m in res["memory"]}
    assert mem[("empf", "online", 2)] == mem[("empf", "online", 1)] > 0
    assert mem[("lif", "bptt", 2)] > 1.3 * mem[("lif", "bptt", 1)]  # the graph grows with T
    text = (out / "claims.md").read_text()
    assert "python bench/paper_claims.py --dataset digits" in text
    assert "- (a) online EM-PF" in text and "- (b) binary weights" in text
    claims = {c["id"]: c for c in pc.evaluate_claims(res["runs"], res["memory"])}
    assert claims["a"]["verdict"] in ("holds", "does not hold")  # one seed: never inconclusive
    assert claims["b"]["verdict"] == "not run" and claims["d"]["verdict"] == "holds"
    assert "Configurations not requested (`--configs`): empf-random_step, " in text
    assert "requested but not finished" not in text
    assert (out / "claims.png").stat().st_size > 10_000
    capsys.readouterr()
    assert pc.main(argv) == 0  # everything reused, nothing retrained
    assert capsys.readouterr().out.count("reused") == 4
    (out / "claims.md").unlink()
    assert pc.main(["--out", str(out), "--report-only"]) == 0
    assert (out / "claims.md").read_text().startswith("# Paper claims on digits")
