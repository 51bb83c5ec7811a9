"""Deployment: folding equals the trained model, export/load round trip, format errors, reports."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DEVICE, randomize
from torch import nn

from empf_triton import reset_net
from empf_triton.deploy import (
    DeployedModel,
    DeployError,
    DeployFormatError,
    export,
    fold,
    load,
    read_header,
)
from empf_triton.deploy.format import FORMAT, META_KEY, payload_sha256
from empf_triton.deploy.report import (
    E_SOP_4BIT_PJ,
    E_SOP_PJ,
    _Recorder,
    energy_report,
    format_energy_table,
    plot_energy,
    state_dict_bytes,
)
from empf_triton.deploy.runtime import Codes, empf_neuron_channels
from empf_triton.models import build_model, set_step_mode
from empf_triton.nn import EMPFNeuron, LIFNeuron

REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def trained_logits(model: nn.Module, x: torch.Tensor, event: bool = False) -> torch.Tensor:
    """What `empf eval` computes: eval mode, all steps at once, logits summed over T."""
    model.eval()
    reset_net(model)
    set_step_mode(model, "m")
    xs = x if event else x.unsqueeze(0).expand(model.T, *x.shape)
    out = model(xs).sum(0)
    reset_net(model)
    set_step_mode(model, "s")
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


CASES = [
    ("mnist1d_cnn", {}, (1, 40)),
    ("mnist1d_cnn", {"mem_bn": True}, (1, 40)),
    ("mnist1d_cnn", {"seca": True, "parallel": True}, (1, 40)),
    ("mnist1d_cnn", {"spike_bits": 4, "mem_bn": True, "seca": True}, (1, 40)),
    ("mnist1d_cnn", {"weight_bits": 1.5, "parallel": True, "spike_bits": 2}, (1, 40)),
    ("mnist1d_cnn", {"weight_bits": 32, "mem_bn": True}, (1, 40)),
    ("digits_mlp", {}, (64,)),
    (
        "digits_mlp",
        {"mem_bn": True, "parallel": True, "spike_bits": 4, "hidden": (32, 24, 16)},
        (64,),
    ),  # fmt: skip
    ("digits_mlp", {"weight_bits": 1.5, "hidden": (32, 24, 16)}, (64,)),
    ("resnet18", {"width": 4}, (3, 12, 12)),
    ("resnet18", {"width": 4, "mem_bn": True, "parallel": True}, (3, 12, 12)),
    ("resnet18", {"width": 4, "seca": True, "spike_bits": 4}, (3, 12, 12)),
    ("resnet18", {"width": 4, "weight_bits": 1.5, "mem_bn": True, "seca": True}, (3, 12, 12)),
    ("resnet18", {"width": 2, "stem": "imagenet", "spike_bits": 4, "parallel": True}, (3, 20, 20)),
    ("resnet19", {"width": 4, "mem_bn": True, "spike_bits": 4}, (3, 8, 8)),
    ("resnet34", {"width": 2, "seca": True, "parallel": True, "mem_bn": True}, (3, 8, 8)),
    ("vgg11", {"width": 4}, (2, 16, 16)),
    (
        "vgg11",
        {"width": 4, "mem_bn": True, "seca": True, "parallel": True, "spike_bits": 4},
        (2, 16, 16),
    ),  # fmt: skip
    ("vgg11", {"width": 4, "weight_bits": 1.5, "spike_bits": 8, "spike_step": 0.125}, (2, 16, 16)),
]


@pytest.mark.parametrize("name,options,in_shape", CASES, ids=lambda v: str(v))
def test_fold_equals_trained_model(name, options, in_shape):
    T = 3 if name == "vgg11" else 4
    model = randomize(build_model(name, in_shape=in_shape, num_classes=7, T=T, **options))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(6, *in_shape)
    ref = trained_logits(model, x)
    deployed = fold(model)
    out = deployed(x)
    assert out.shape == (6, 7) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-5
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    # the trained model is left as it was
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the whole run of steps at once, per step: the same logits as the trained model's steps
    reset_net(model)
    set_step_mode(model, "m")
    with torch.no_grad():
        ref_steps = model(x.unsqueeze(0).expand(T, *x.shape))
    reset_net(model)
    assert rel_err(deployed(x, per_step=True), ref_steps) <= 1e-5
    # binary layers are stored packed: no dense latent weight of theirs is in the deployment
    bits = options.get("weight_bits", 1)
    n_bconv = sum(n["op"] == "bconv" for n in deployed.nodes)
    assert (n_bconv > 0) == (bits != 32)
    for n in deployed.nodes:
        if n["op"] == "bconv":
            assert n["attrs"]["bits"] == (2 if bits == 1.5 else 1)


def test_event_input_equals_trained_model():
    model = randomize(build_model("vgg11", in_shape=(2, 16, 16), num_classes=5, T=3, width=4,
                                  mem_bn=True))  # fmt: skip
    x = torch.rand(3, 4, 2, 16, 16) * 2  # [T, N, *] event frames
    ref = trained_logits(model, x, event=True)
    out = fold(model)(x)
    assert rel_err(out, ref) <= 1e-5


def test_fused_neurons_and_codes_between_layers():
    """In a ResNet block conv1 + neuron2 fuse; with 4-bit spikes conv2 reads uint8 codes."""
    model = randomize(build_model("resnet18", in_shape=(3, 8, 8), num_classes=4, T=2, width=4,
                                  spike_bits=4))  # fmt: skip
    d = fold(model)
    fused = [n for n in d.nodes if n["op"] == "bconv" and n["attrs"]["neuron"]]
    assert len(fused) == 8  # neuron2 of each of the 8 blocks
    seen = []
    d._recorder = lambda m, node, args, out: seen.append(
        (node.op, isinstance(args[0], Codes) if args else False)
    )
    d(torch.randn(2, 3, 8, 8))
    d._recorder = None
    assert sum(1 for op, codes in seen if op == "bconv" and codes) >= 8


@pytest.mark.parametrize("seca", [False, True])
def test_resnet_block_graph(seca):
    """A ResNet block's nodes as docs/deployment.md lists them: conv1 + neuron2 fused without
    SECA; with SECA (between each conv and its reader) neuron2 runs on its own after it."""
    model = build_model("resnet18", in_shape=(3, 8, 8), num_classes=4, T=2, width=4, seca=seca)
    nodes = fold(model.eval()).nodes
    first = next(i for i, n in enumerate(nodes) if n["op"] == "neuron")
    last = next(i for i, n in enumerate(nodes) if n["op"] == "add")
    block = nodes[first : last + 1]
    ops = [n["op"] + ("+neuron" if n["attrs"].get("neuron") else "") for n in block]
    if seca:
        assert ops == ["neuron", "bconv", "seca", "neuron", "bconv", "seca", "add"]
    else:
        assert ops == ["neuron", "bconv+neuron", "bconv", "add"]


def test_mem_bn_folds_into_conv_scale_per_step():
    model = randomize(build_model("digits_mlp", in_shape=(64,), num_classes=3, T=3, mem_bn=True))
    d = fold(model)
    fused = next(n for n in d.nodes if n["op"] == "bconv")
    i = d.nodes.index(fused)
    assert getattr(d, f"n{i}_scale").shape == (3, 128)
    assert getattr(d, f"n{i}_decay").shape == (3, 128)
    standalone = [n for n in d.nodes if n["op"] == "neuron"]
    assert standalone and all(
        getattr(d, f"n{d.nodes.index(n)}_in_scale").shape == (3, 128) for n in standalone
    )


@pytest.mark.parametrize("spike_bits", [None, 4])
def test_standalone_per_channel_neurons_run_the_fused_kernel(monkeypatch, spike_bits):
    """A folded Mem-BN neuron that stays standalone (per-channel decay k λ, here partly > 1)
    runs the fused EM-PF kernel, not a torch loop, and gives the reference path's and the
    trained model's logits."""
    from empf_triton.nn import MemBN
    from empf_triton.ops import neuron as ops_neuron

    model = randomize(build_model("digits_mlp", in_shape=(64,), num_classes=3, T=3,
                                  mem_bn=True, spike_bits=spike_bits))  # fmt: skip
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MemBN):
                m.weight.mul_(4.0)  # k = γ / σ well above 1: k λ leaves [0, 1]
    x = torch.randn(4, 64)
    ref = fold(model, impl="reference").to(DEVICE)
    tri = fold(model, impl="triton").to(DEVICE)
    standalone = [i for i, n in enumerate(tri.nodes) if n["op"] == "neuron"]
    decays = [getattr(tri, f"n{i}_decay") for i in standalone]
    assert decays and all(d.dim() == 2 for d in decays) and any((d > 1).any() for d in decays)
    loaded = []
    real = ops_neuron.load_kernels
    monkeypatch.setattr(ops_neuron, "load_kernels", lambda name: loaded.append(name) or real(name))
    out = tri(x.to(DEVICE))
    assert "neuron" in loaded  # the standalone neurons' plans were made on the EM-PF kernels
    assert rel_err(out, ref(x.to(DEVICE))) <= 1e-5
    assert rel_err(out.cpu(), trained_logits(model, x)) <= 1e-4


def test_empf_neuron_channels_matches_reference_per_channel():
    from empf_triton.reference.neuron import empf_neuron_ref

    T, N, C = 3, 5, 4
    cur = torch.randn(T, N, C, 2)
    decay = torch.rand(T, C) * 0.9 + 0.05
    th = torch.rand(T, C) + 0.1
    out = empf_neuron_channels(cur, decay, th, spike_bits=3, spike_step=0.25)
    for c in range(C):
        ref, _ = empf_neuron_ref(cur[:, :, c], None, decay[:, c], th[:, c], 3, 0.25)
        assert torch.equal(out[:, :, c], ref)
    codes = empf_neuron_channels(cur, decay, th, spike_bits=3, spike_step=0.25, codes=True)
    assert codes.dtype == torch.uint8 and torch.equal(codes.float() * 0.25, out)
    par = empf_neuron_channels(cur, None, th)
    assert torch.equal(par, torch.relu(cur - th[:, None, :, None]))


def test_empf_neuron_channels_keeps_exactly_the_threshold_after_firing():
    """The deployed layers' torch neuron resets to v = min(m, θ) exactly (docs/model.md §1), as
    `empf_neuron`: after a current of 1e8 or +inf the membrane is θ, not 1e8 - fl(1e8 - θ) = 0
    or inf - inf = NaN, so the next step's spike is that of a membrane at θ."""
    from empf_triton.reference.neuron import empf_neuron_ref

    cur = torch.zeros(2, 1, 3, 1)
    cur[0, 0, :, 0] = torch.tensor([1e8, float("inf"), 0.3])
    cur[1] = 0.5
    decay = torch.full((2, 3), 0.75)
    th = torch.tensor([[0.3, 0.45, 0.2], [0.1, 0.2, 0.3]])
    out = empf_neuron_channels(cur, decay, th)
    want = torch.relu(decay[1] * torch.minimum(cur[0, 0, :, 0], th[0]) + 0.5 - th[1])
    assert torch.isfinite(out[1]).all() and torch.equal(out[1, 0, :, 0], want)
    for c in range(3):
        ref, _ = empf_neuron_ref(cur[:, :, c], None, decay[:, c], th[:, c])
        assert torch.equal(out[:, :, c], ref)


# ------------------------------------------------------------------------------ export and load


def _small(**kw):
    return randomize(build_model("mnist1d_cnn", in_shape=(1, 24), num_classes=5, T=3,
                                 channels=(8, 8, 16), **kw))  # fmt: skip


def test_export_load_round_trip(tmp_path):
    model = _small(mem_bn=True, seca=True, spike_bits=4)
    p = export(model, tmp_path / "m.safetensors", meta={"model_name": "mnist1d_cnn",
                                                         "dataset": "mnist1d"})  # fmt: skip
    x = torch.randn(4, 1, 24)
    folded = fold(model)(x)
    loaded = load(p)
    assert isinstance(loaded, DeployedModel) and not loaded.training
    assert torch.equal(loaded(x), folded)
    assert rel_err(loaded(x), trained_logits(model, x)) <= 1e-5
    doc = read_header(p)
    assert doc["format"] == FORMAT and doc["version"] == 1
    assert doc["model"] == {"T": 3, "in_shape": [1, 24], "num_classes": 5}
    meta = doc["meta"]
    assert meta["model_name"] == "mnist1d_cnn" and meta["dataset"] == "mnist1d"
    assert meta["spike_bits"] == 4 and meta["spike_step"] == 0.25
    assert "library_version" in meta
    assert loaded.info["dataset"] == "mnist1d"
    # one file, no pickle: a safetensors header (JSON) and raw tensor bytes only
    data = p.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    dtypes = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    assert dtypes <= {"I32", "F32"}
    assert b"\x80\x04" not in data[:16] and not data.startswith(b"PK")
    # packed words are int32, 1 bit per weight
    words = [v for k, v in header.items() if k.endswith(".words")]
    assert words and all(w["dtype"] == "I32" for w in words)


def _bconv_nodes(d):
    return [n for n in d._nodes if n.op == "bconv"]


def test_layer_plans_are_reused_per_input_and_renewed_when_tensors_change():
    """Each fused layer checks its call once per input signature and reuses the plan; a new
    batch size gets its own plan; an in-place change of any of the model's tensors
    (load_state_dict) or new tensors (`.to()`, another tensor put in a buffer's place) drop the
    plans (one check per forward covers every layer). Outputs equal a freshly loaded model's
    every time."""
    model = _small(spike_bits=4)
    d = fold(model)
    nodes = _bconv_nodes(d)
    assert nodes
    x, x2 = torch.randn(4, 1, 24), torch.randn(2, 1, 24)
    first = d(x)
    assert [len(n.plans) for n in nodes] == [1] * len(nodes)
    plans = [dict(n.plans) for n in nodes]
    assert torch.equal(d(x), first)
    assert [n.plans for n in nodes] == plans  # the same plan objects
    assert torch.equal(d(x2), fold(model)(x2))
    assert [len(n.plans) for n in nodes] == [2] * len(nodes)
    # an in-place change of one layer's scale: the layers plan again, the output follows
    name = next(k for k, _ in d.named_buffers() if k.endswith("_scale"))
    fresh = fold(model)
    for m in (d, fresh):
        dict(m.named_buffers())[name].mul_(3.0)
    assert torch.equal(d(x), fresh(x)) and not torch.equal(d(x), first)
    assert [len(n.plans) for n in nodes] == [1] * len(nodes)
    assert torch.equal(d(x2), fresh(x2))
    d.load_state_dict(fresh.state_dict())  # copies into every tensor: every layer plans again
    assert torch.equal(d(x), fresh(x))
    assert [len(n.plans) for n in nodes] == [1] * len(nodes)
    # another tensor in a buffer's place: load_state_dict(assign=True), then setattr of a tensor
    # whose version equals the old one's (0): only the replacement itself can tell
    state = {k: v * 2 if k == name else v for k, v in fresh.state_dict().items()}
    for m in (d, fresh):
        m.load_state_dict(state, assign=True)
    assert torch.equal(d(x), fresh(x)) and torch.equal(d(x2), fresh(x2))
    old = dict(d.named_buffers())[name]
    new = old * 0.5
    assert new._version == old._version == 0
    setattr(d, name, new)
    rebuilt = type(d)(d.graph, d.file_tensors(), d.info)  # the same tensors, no plans yet
    assert torch.equal(d(x), rebuilt(x)) and not torch.equal(d(x), fresh(x))
    setattr(d, name, old)  # back: d is fresh's equal again
    assert torch.equal(d(x), fresh(x))
    # new tensors (another dtype): every layer plans again
    d = d.to(torch.bfloat16)
    assert torch.equal(d(x), fresh.to(torch.bfloat16)(x))
    assert [len(n.plans) for n in _bconv_nodes(d)] == [1] * len(nodes)


def test_fold_of_a_packed_model_shares_no_memory_with_it():
    """A packed layer's words go into the deployed model as a copy: a later change to either
    model (the trained one loading another checkpoint, an edit of the deployed one) leaves the
    other as it was."""
    model = _small(spike_bits=4).eval()
    for m in model.modules():
        if hasattr(m, "pack"):
            m.pack()
    x = torch.randn(4, 1, 24)
    d = fold(model)
    before = d(x)
    theirs = {b.untyped_storage().data_ptr() for b in model.buffers() if b.numel()}
    assert not theirs & {b.untyped_storage().data_ptr() for b in d.buffers() if b.numel()}
    words = [m.packed_words for m in model.modules() if hasattr(m, "packed_words")]
    kept = [w.clone() for w in words]
    for w in words:
        w.bitwise_not_()  # the trained model changes: the deployed one does not
    assert torch.equal(d(x), before)
    for b in d.buffers():
        if b.dtype == torch.int32:
            b.bitwise_not_()  # the deployed model changes: the trained one does not
    assert all(torch.equal(w, ~k) for w, k in zip(words, kept))


def test_the_graph_description_is_a_copy():
    """Editing `graph` / `nodes` (or the description the model was made from) changes neither
    the running model nor what it exports."""
    d = fold(_small(spike_bits=4))
    x = torch.randn(4, 1, 24)
    first = d(x)
    want = d.graph
    for desc in (d.graph, {"nodes": d.nodes}):
        for n in desc["nodes"]:
            for v in n["attrs"].values():
                if isinstance(v, list):
                    v.clear()
            n["attrs"]["stride"] = [9, 9]
    assert d.graph == want
    spec = d.graph
    made = type(d)(spec, d.file_tensors(), d.info)
    for n in spec["nodes"]:
        n["attrs"].clear()
    assert torch.equal(d(x), first) and torch.equal(made(x), first)


def test_data_parallel_replicas_have_their_own_layers():
    """`nn.DataParallel` makes one replica per device with nn.Module's shallow copy and puts that
    device's tensors in its buffers. A replica has its own layers (no plan or packed weight made
    from the first device's tensors), and runs on whatever tensors it was given."""
    d = fold(_small(spike_bits=4))
    x = torch.randn(4, 1, 24)
    first = d(x)
    assert any(n.plans for n in d._nodes)
    replica = d._replicate_for_data_parallel()
    assert not {id(n) for n in replica._nodes} & {id(n) for n in d._nodes}
    assert not any(n.plans or n.packed is not None for n in replica._nodes)
    assert all(s[1] in replica._nodes for s in replica._schedule)
    # as DataParallel does: the replica's buffers become other tensors (here: other values)
    name = next(k for k, _ in d.named_buffers() if k.endswith("_scale"))
    for k, b in d.named_buffers():
        setattr(replica, k, b * 3.0 if k == name else b.clone())
    want = type(d)(d.graph, {k: t.clone() for k, t in d.file_tensors().items()}, d.info)
    dict(want.named_buffers())[name].mul_(3.0)
    assert torch.equal(replica(x), want(x)) and not torch.equal(replica(x), first)
    assert torch.equal(d(x), first)  # the original is untouched


def test_fold_unwraps_a_compiled_model():
    """A model wrapped by torch.compile (as `compile_model` returns it) folds as the model
    itself (it was refused as an unknown model type), also inside a DataParallel wrapper."""
    m = _small(spike_bits=4).eval()
    want = fold(m)
    x = torch.randn(3, 1, 24)
    for wrapped in (torch.compile(m), torch.nn.DataParallel(torch.compile(m))):
        d = fold(wrapped)
        assert d.info == want.info and torch.equal(d(x), want(x))
    assert state_dict_bytes(torch.compile(m)) == state_dict_bytes(m)


def test_file_tensors_are_copies_on_the_cpu_too():
    """`file_tensors()` of a CPU model gives copies: a model built from them, or an edit of the
    dict's tensors, leaves the first model as it was."""
    d = fold(_small(spike_bits=4))
    x = torch.randn(4, 1, 24)
    first = d(x)
    tensors = d.file_tensors()
    for k, b in d.named_buffers():
        t = tensors[f"{k[1:].split('_', 1)[0]}.{k.split('_', 1)[1]}"]
        assert t.untyped_storage().data_ptr() != b.untyped_storage().data_ptr(), k
    other = type(d)(d.graph, tensors, d.info)
    for b in other.buffers():
        if b.is_floating_point():
            b.mul_(3.0)
    assert torch.equal(d(x), first) and not torch.equal(other(x), first)


@pytest.mark.parametrize("impl", ["triton", "reference"])
def test_a_deployed_model_pickles_after_it_has_run(impl):
    """torch.save of a DeployedModel works after forwards (the layers' plans, which hold launch
    closures, are left out and made again), and the copy gives the same logits."""
    import io

    d = fold(_small(spike_bits=4), impl=impl)
    x = torch.randn(4, 1, 24)
    first = d(x)
    assert any(n.plans for n in d._nodes)
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    copy = torch.load(buf, weights_only=False)
    assert not any(n.plans for n in copy._nodes)
    assert torch.equal(copy(x), first) and torch.equal(d(x), first)


def test_a_model_made_under_inference_mode_runs_and_notices_changes(tmp_path):
    """fold, load and `.to()` under `torch.inference_mode()` give tensors without a version
    counter: the model still runs (equal to one made outside), and an in-place change to a
    buffer made inside inference mode later still drops the plans."""
    model = _small(spike_bits=4)
    x = torch.randn(4, 1, 24)
    want = fold(model)(x)
    want16 = fold(model).to(torch.bfloat16)(x)
    p = tmp_path / "m.safetensors"
    export(model, p)
    with torch.inference_mode():
        made = {"fold": fold(model), "load": load(p), "to": fold(model).to(torch.bfloat16)}
        for how, d in made.items():
            assert any(b.is_inference() for b in d.buffers()), how
            assert torch.equal(d(x), want16 if how == "to" else want), how
        d = made["fold"]
        name = next(k for k, _ in d.named_buffers() if k.endswith("_scale"))
        dict(d.named_buffers())[name].mul_(3.0)
        changed = d(x)
    fresh = fold(model)
    dict(fresh.named_buffers())[name].mul_(3.0)
    assert torch.equal(changed, fresh(x)) and not torch.equal(changed, want)


def test_graphed_needs_a_cuda_input():
    d = fold(_small(spike_bits=4))
    with pytest.raises(ValueError, match="CUDA"):
        d.graphed(torch.randn(2, 1, 24))
    with pytest.raises(TypeError, match="torch.Tensor"):
        d.graphed([1.0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spike_bits", [None, 4])
def test_graphed_replays_equal_the_eager_forward(spike_bits):
    """A deployed network captured in a CUDA graph gives the eager forward's logits on every
    new input of the example's shape, returns its own copy each time, and refuses another
    shape with a clear error."""
    model = randomize(build_model("resnet18", in_shape=(3, 8, 8), num_classes=3, T=2, width=2,
                                  spike_bits=spike_bits))  # fmt: skip
    d = fold(model).to("cuda")
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(1, 3, 8, 8, generator=g).cuda() for _ in range(3)]
    graphed = d.graphed(xs[0])
    outs = [graphed(x) for x in xs]
    for x, out in zip(xs, outs):  # earlier results are not overwritten by later replays
        assert torch.equal(out, d(x))
    per_step = d.graphed(xs[0], per_step=True)
    assert torch.equal(per_step(xs[1]), d(xs[1], per_step=True))
    with pytest.raises(DeployError, match="captured for inputs"):
        graphed(torch.randn(2, 3, 8, 8, device="cuda"))


def test_load_to_dtype(tmp_path):
    model = _small(spike_bits=4)
    p = export(model, tmp_path / "m.safetensors")
    x = torch.randn(3, 1, 24)
    ref = trained_logits(model, x)
    for dt in (torch.float16, torch.bfloat16):
        d = load(p, "cpu", dtype=dt)
        assert d.dtype == dt and d(x).dtype == dt
        assert rel_err(d(x).float(), ref) <= 0.1  # half-precision currents, same network
    with pytest.raises(TypeError, match="dtype"):
        load(p, dtype=torch.float64)
    with pytest.raises(ValueError, match="impl"):
        load(p, impl="cuda")


@pytest.mark.parametrize("spike_bits", [None, 4])
def test_triton_path_equals_reference_path(spike_bits):
    """The deployed model on the Triton kernels (the interpreter on a CPU) gives the reference
    path's logits: fused binary conv + neuron, standalone neurons, codes between layers."""
    model = randomize(build_model("resnet18", in_shape=(3, 6, 6), num_classes=3, T=2, width=2,
                                  spike_bits=spike_bits, parallel=True))  # fmt: skip
    model.layers = model.layers[:3]  # keep the interpreter quick: stage 1 and one stride-2 block
    model.final_neuron = EMPFNeuron(2, spike_bits=spike_bits)
    model.classifier[2] = nn.Linear(4, 3)
    x = torch.randn(2, 3, 6, 6)
    # fold() returns a CPU model: both deployed models run on the test device (impl="triton"
    # needs CUDA tensors there); the trained model stays on the CPU.
    xd = x.to(DEVICE)
    ref = fold(model, impl="reference").to(DEVICE)(xd)
    out = fold(model, impl="triton").to(DEVICE)(xd)
    assert rel_err(out, ref) <= 1e-5
    assert rel_err(ref.cpu(), trained_logits(model, x)) <= 1e-5


def _node_by_node(deployed, x):
    """The forward without the fused schedule (a recorder runs every node on its own)."""
    deployed._recorder = lambda *args: None
    try:
        return deployed(x)
    finally:
        deployed._recorder = None


@pytest.mark.parametrize("spike_bits", [None, 4])
def test_residual_adds_run_inside_the_convolution(spike_bits):
    """Each residual join (a `bconv` without a neuron whose currents only feed an `add`) runs as
    the convolution's residual: one launch, no add. The logits equal the node-by-node forward
    exactly (fp32: the same additions), on both paths; every add of a ResNet-18 is fused."""
    full = fold(build_model("resnet18", in_shape=(3, 32, 32), num_classes=10, T=4).eval())
    adds = sum(n.op == "add" for n in full._nodes)
    assert adds == 8 and not any(step[1].op == "add" for step in full._schedule)
    assert len(full._schedule) == len(full._nodes) - adds
    model = randomize(build_model("resnet18", in_shape=(3, 6, 6), num_classes=3, T=2, width=2,
                                  spike_bits=spike_bits))  # fmt: skip
    model.layers = model.layers[:3]  # stage 1 (identity shortcuts) and one stride-2 block
    model.final_neuron = EMPFNeuron(2, spike_bits=spike_bits)
    model.classifier[2] = nn.Linear(4, 3)
    x = torch.randn(2, 3, 6, 6, device=DEVICE)
    outs = {}
    for impl in ("reference", "triton"):
        deployed = fold(model, impl=impl).to(DEVICE)
        fused = [s for s in deployed._schedule if s[0].__name__ == "_run_bconv_add"]
        assert len(fused) == sum(n.op == "add" for n in deployed._nodes) == 3
        outs[impl] = deployed(x)
        assert torch.equal(outs[impl], _node_by_node(deployed, x)), impl
    assert rel_err(outs["triton"], outs["reference"]) <= 1e-5
    # fp16: one rounding of conv + residual instead of two; within fp16's precision
    half = fold(model, impl="reference").to(DEVICE, torch.float16)
    assert rel_err(half(x).float(), _node_by_node(half, x).float()) <= 2e-2


def test_residual_that_does_not_fit_runs_apart():
    """A graph whose add broadcasts a residual the fused op cannot take (here [1, N, C, 1, 1])
    still runs: the convolution and the add run apart and give the node-by-node result."""
    model = randomize(build_model("resnet18", in_shape=(3, 6, 6), num_classes=3, T=2, width=2))
    model.layers = model.layers[:1]
    model.final_neuron = EMPFNeuron(2)
    model.classifier[2] = nn.Linear(2, 3)
    deployed = fold(model, impl="reference")
    graph = json.loads(json.dumps(deployed.graph))
    step = next(s for s in deployed._schedule if s[0].__name__ == "_run_bconv_add")
    res_name = step[2][1]
    # put a global average pool in front of the residual: [T', N, C, 1, 1] broadcasts in the add
    nodes = graph["nodes"]
    at = next(i for i, n in enumerate(nodes) if n["out"] == res_name) + 1
    nodes.insert(at, {"op": "avgpool", "in": [res_name], "out": "pooled", "attrs": {}})
    for n in nodes[at + 1 :]:
        n["in"] = ["pooled" if (v == res_name and n["op"] == "add") else v for v in n["in"]]
    tensors = {}
    for key, t in deployed.file_tensors().items():
        i, name = key.split(".", 1)
        tensors[f"{int(i) + (int(i) >= at)}.{name}"] = t
    changed = type(deployed)(graph, tensors, deployed.info, impl="reference")
    x = torch.randn(2, 3, 6, 6)
    assert any(s[0].__name__ == "_run_bconv_add" for s in changed._schedule)
    assert torch.equal(changed(x), _node_by_node(changed, x))


def test_runtime_modules_do_not_import_training_code():
    """load() builds the model from the file alone: the runtime never imports train/models."""
    for f in ("runtime.py", "format.py", "errors.py", "report.py"):
        tree = ast.parse((REPO / "empf_triton" / "deploy" / f).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert not any(s in mod for s in ("train", "models")), f"{f} imports {mod}"
                if mod == ".":
                    assert all(a.name not in ("train", "models", "fold") for a in node.names)
            if isinstance(node, ast.ImportFrom) and node.module == "fold":
                assert f == "format.py"  # export() folds a trained model; load() never does


def test_load_and_run_import_no_training_code(tmp_path):
    """In a fresh interpreter, loading and running an export imports neither train nor models."""
    p = export(_small(), tmp_path / "m.safetensors")
    code = (
        "import sys, torch;"
        "from empf_triton.deploy import load;"
        f"m = load({str(p)!r}, impl='reference');"
        "m(torch.zeros(2, *m.in_shape));"
        "bad = [k for k in sys.modules"
        " if k.startswith(('empf_triton.train', 'empf_triton.models'))];"
        "assert not bad, bad"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_fold_of_a_triton_model_on_the_cpu_without_the_interpreter():
    """fold() takes a model on any device: a CPU model built with impl="triton" (trained on a GPU,
    then moved) folds where Triton cannot run (its weights were packed with the layer's impl)."""
    code = (
        "import torch;"
        "from empf_triton.deploy import fold;"
        "from empf_triton.models import build_model;"
        "kw = dict(in_shape=(64,), num_classes=3, T=2, hidden=(8, 6));"
        "torch.manual_seed(0); m = build_model('digits_mlp', impl='triton', **kw).eval();"
        "torch.manual_seed(0); r = build_model('digits_mlp', impl='reference', **kw).eval();"
        "x = torch.randn(2, 64);"
        "assert torch.equal(fold(m, impl='reference')(x), fold(r, impl='reference')(x))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr


def test_no_overwrite_unless_told(tmp_path):
    model = _small()
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"precious")
    with pytest.raises(DeployError, match="already exists"):
        export(model, p)
    assert p.read_bytes() == b"precious"
    export(model, p, overwrite=True)
    assert load(p).T == 3
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temp files left


def test_an_unwritable_folder_is_named_not_the_temporary_file(tmp_path, monkeypatch):
    """A folder where no file can be made gave "Permission denied: DIR/.m.safetensors.x7q.tmp"
    (a name the user never gave); the error names the file asked for, and nothing is left."""
    import tempfile

    from empf_triton._files import write_file_atomic

    model = _small()

    def unwritable(prefix="", suffix="", dir=None):  # what mkstemp raises in a read-only folder
        raise PermissionError(13, "Permission denied", os.path.join(dir, f"{prefix}x7q{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", unwritable)
    target = tmp_path / "m.safetensors"
    for write in (lambda: export(model, target), lambda: write_file_atomic(target, b"{}")):
        with pytest.raises(PermissionError) as e:
            write()
        assert e.value.filename == str(target) and ".tmp" not in str(e.value), e.value
    assert os.listdir(tmp_path) == []


def test_export_keeps_a_file_that_appears_while_it_writes(tmp_path, monkeypatch):
    model = _small()
    p = tmp_path / "m.safetensors"
    real_link = os.link

    def another_writer_first(src, dst, *a, **k):
        p.write_bytes(b"theirs")
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", another_writer_first)
    with pytest.raises(DeployError, match="already exists"):
        export(model, p)
    assert p.read_bytes() == b"theirs"
    assert os.listdir(tmp_path) == ["m.safetensors"]  # no temp files left


def test_export_to_a_folder_or_under_a_file_is_named(tmp_path):
    model = _small()
    (tmp_path / "dir").mkdir()
    for overwrite in (False, True):  # the same message either way
        with pytest.raises(DeployError, match="is a folder"):
            export(model, tmp_path / "dir", overwrite=overwrite)
    (tmp_path / "file").write_bytes(b"keep")
    with pytest.raises(DeployError, match="a part of its folder path is a file"):
        export(model, tmp_path / "file" / "m.safetensors")
    assert (tmp_path / "file").read_bytes() == b"keep"


def test_export_respects_umask(tmp_path):
    old = os.umask(0o027)
    try:
        p = export(_small(), tmp_path / "m.safetensors")
        from empf_triton._files import default_file_mode

        assert default_file_mode() == 0o640  # read from /proc where there is one, not set
    finally:
        os.umask(old)
    assert (p.stat().st_mode & 0o777) == 0o640


def test_export_rejects_non_plain_meta(tmp_path):
    with pytest.raises(DeployError, match="plain JSON"):
        export(_small(), tmp_path / "m.safetensors", meta={"x": object()})


@pytest.mark.parametrize("meta", ["mnist1d", [("a", 1)]], ids=["str", "list"])
def test_export_names_meta_that_is_not_a_mapping(tmp_path, meta):
    """meta="..." was "dictionary update sequence element #0 has length 1" (not naming meta)."""
    with pytest.raises(DeployError, match="meta must be a dict of plain JSON data or None"):
        export(_small(), tmp_path / "m.safetensors", meta=meta)


@pytest.mark.parametrize("overwrite", ["False", 1, None], ids=repr)
def test_export_overwrite_must_be_a_bool(tmp_path, overwrite):
    """overwrite="False" (truthy) replaced an existing file; a non-bool is a TypeError and the
    file stays."""
    p = tmp_path / "m.safetensors"
    p.write_bytes(b"precious")
    with pytest.raises(TypeError, match="overwrite must be a bool"):
        export(_small(), p, overwrite=overwrite)
    assert p.read_bytes() == b"precious"


@pytest.fixture
def exported(tmp_path):
    return export(_small(spike_bits=4), tmp_path / "m.safetensors")


@pytest.mark.parametrize("cut", [0, 5, 8, 100, -1000, -4, -1])
def test_truncated_file_is_one_clear_error(exported, cut):
    data = exported.read_bytes()
    exported.write_bytes(data[:cut])
    with pytest.raises(DeployFormatError, match="m.safetensors"):
        load(exported)


@pytest.mark.parametrize("where", ["payload", "payload_end", "header"])
def test_byte_flips_are_caught(exported, where):
    data = bytearray(exported.read_bytes())
    n = int.from_bytes(data[:8], "little")
    pos = {"payload": 8 + n + 37, "payload_end": len(data) - 3, "header": 8 + n // 2}[where]
    data[pos] ^= 0x5A
    exported.write_bytes(bytes(data))
    with pytest.raises(DeployFormatError):
        load(exported)


def test_sha256_mismatch_names_checksum(exported):
    data = bytearray(exported.read_bytes())
    data[-2] ^= 0x01
    exported.write_bytes(bytes(data))
    with pytest.raises(DeployFormatError, match="SHA-256"):
        load(exported)


def load_tensors(path: Path) -> dict:
    from safetensors.torch import load as st_load

    return st_load(path.read_bytes())


def _rewrite_doc(path: Path, change) -> None:
    from safetensors.torch import load as st_load
    from safetensors.torch import save

    data = path.read_bytes()
    doc = read_header(path)
    change(doc)
    path.write_bytes(save(st_load(data), metadata={META_KEY: json.dumps(doc)}))


def test_metadata_edit_is_caught_by_checksum(exported):
    def edit(d):
        d["graph"]["nodes"][2]["attrs"]["spike_step"] = 0.5

    _rewrite_doc(exported, edit)
    with pytest.raises(DeployFormatError, match="SHA-256"):
        load(exported)


def test_other_format_version(exported):
    _rewrite_doc(exported, lambda d: d.update(version=2))
    with pytest.raises(DeployFormatError, match="version 2"):
        load(exported)


def test_inconsistent_graph_is_format_error(exported):
    def bad(d):
        d["graph"]["nodes"][1]["op"] = "frobnicate"
        d["sha256"] = payload_sha256(load_tensors(exported), d)

    _rewrite_doc(exported, bad)
    with pytest.raises(DeployFormatError, match="unknown op 'frobnicate'"):
        load(exported)


def test_wrong_tensor_shape_is_format_error(exported):
    from safetensors.torch import load as st_load
    from safetensors.torch import save

    data = exported.read_bytes()
    doc = read_header(exported)
    tensors = st_load(data)
    key = next(k for k in tensors if k.endswith(".scale"))
    tensors[key] = torch.ones(3)
    doc["sha256"] = payload_sha256(tensors, doc)
    exported.write_bytes(save(tensors, metadata={META_KEY: json.dumps(doc)}))
    with pytest.raises(DeployFormatError, match="scale"):
        load(exported)


def _rewrite_with_checksum(path: Path, change_tensors=None, change_doc=None) -> None:
    """Edit an export's tensors and/or document and store a matching SHA-256 (a deliberately
    edited file, which the checksum alone cannot catch)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save

    tensors, doc = st_load(path.read_bytes()), read_header(path)
    if change_tensors:
        change_tensors(tensors)
    if change_doc:
        change_doc(doc)
    doc["sha256"] = payload_sha256(tensors, doc)
    path.write_bytes(save(tensors, metadata={META_KEY: json.dumps(doc)}))


def _widen(suffix, dim):
    def change(tensors):
        key = next(k for k in tensors if k.endswith(suffix) and tensors[k].dim() == dim)
        w = tensors[key]
        tensors[key] = torch.zeros(w.shape[0], w.shape[1] + 3, *w.shape[2:])

    return change


def _per_channel_decay(tensors):
    key = next(k for k in tensors if k.endswith(".decay") and tensors[k].dim() == 1)
    tensors[key] = torch.full((tensors[key].shape[0], 5), 0.5)  # 5 channels; the input has 8


@pytest.mark.parametrize(
    "change_tensors,change_doc,match",
    [
        (
            _widen(".weight", 2),
            None,
            r"node 8 \(linear\) does not fit its input of shape \[3, 1, 192\]",
        ),
        (_widen(".weight", 4), None, r"node 1 \(conv\) does not fit its input"),
        (_per_channel_decay, None, r"node \d \(neuron\) .*decay has 5 channels, its input 8"),
        (None, lambda d: d["model"].update(num_classes=7), r"expected \[T, 1, num_classes=7\]"),
        (None, lambda d: d["model"].update(in_shape=[1, 2]), r"node 8 \(linear\) does not fit"),
    ],
    ids=["classifier", "conv channels", "neuron channels", "num_classes", "in_shape"],
)
def test_tensors_that_do_not_fit_each_other_are_a_format_error(
    exported, change_tensors, change_doc, match
):
    """A file whose tensors and graph are each well formed but do not fit each other (edited,
    with its checksum made again) fails at load, naming the file and the node, instead of
    loading and then failing inside torch at the first forward."""
    _rewrite_with_checksum(exported, change_tensors, change_doc)
    with pytest.raises(DeployFormatError, match=match) as e:
        load(exported)
    assert "m.safetensors" in str(e.value)


def test_the_shape_check_leaves_nothing_behind():
    """The construction's shape run (meta tensors) puts the model's own tensors back and keeps
    no plan or packed weight made from them."""
    model = _small(spike_bits=4)
    d = fold(model, impl="triton")
    assert d.impl == "triton"
    assert all(b.device.type == "cpu" for b in d.buffers())
    assert not any(n.plans or n.packed is not None or n.fits for n in d._nodes)
    x = torch.randn(2, 1, 24)
    assert torch.equal(d(x), fold(model, impl="reference")(x))


def test_not_an_export(tmp_path):
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(3)}, plain)
    ckpt = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, ckpt)
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(4096))
    for p, msg in [
        (plain, "not an empf_triton deployment export"),
        (ckpt, "truncated or not a safetensors"),
        (empty, "truncated"),
        (garbage, "truncated or not a safetensors"),
        (tmp_path / "missing.safetensors", "no such file"),
        (tmp_path, "not a file"),
    ]:
        with pytest.raises(DeployFormatError, match=msg):
            load(p)


# --------------------------------------------------------------------------------- bad input


def test_mismatched_input_shape_is_clear():
    d = fold(_small())
    with pytest.raises(DeployError, match=r"\[N, 1, 24\] or \[T=3, N, 1, 24\].*\(4, 1, 40\)"):
        d(torch.randn(4, 1, 40))
    with pytest.raises(DeployError, match="got"):
        d(torch.randn(2, 4, 1, 24))  # T=2 steps for a T=3 model
    with pytest.raises(TypeError, match="torch.Tensor"):
        d([1.0, 2.0])
    with pytest.raises(TypeError, match="must be real.*complex64"):
        d(torch.randn(4, 1, 24, dtype=torch.complex64))  # not cast with a warning
    with pytest.raises(DeployError, match="input is on meta, the model on cpu"):
        d(torch.randn(4, 1, 24, device="meta"))


@pytest.mark.parametrize("bad", ["no", 1, None])
def test_per_step_must_be_a_bool(bad):
    """per_step="no" (truthy) returned the per-step logits [T, N, C] instead of the sum."""
    d = fold(_small())
    with pytest.raises(TypeError, match="per_step must be a bool"):
        d(torch.randn(2, 1, 24), per_step=bad)


def test_load_names_a_bad_device(exported):
    with pytest.raises(ValueError, match="device must be.*'gpu'"):
        load(exported, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            load(exported, device="cuda")


def test_inference_only():
    d = fold(_small())
    with pytest.raises(DeployError, match="inference only"):
        d.train()
    assert not d.training


def test_unknown_layers_and_models_are_named():
    model = _small()
    model.blocks[0] = LIFNeuron()
    with pytest.raises(DeployError, match=r"blocks\.0 is a LIFNeuron: the LIF baseline is not"):
        fold(model)
    lif = build_model("mnist1d_cnn", in_shape=(1, 24), num_classes=5, T=3, neuron="lif")
    with pytest.raises(DeployError, match="LIF baseline is not deployable"):
        fold(lif)
    with pytest.raises(DeployError, match="model type Sequential"):
        fold(nn.Sequential(nn.Linear(2, 2)))
    m2 = _small()
    m2.stem[1] = nn.LayerNorm(8)
    with pytest.raises(DeployError, match="stem.1 of type LayerNorm"):
        fold(m2)


def test_fold_after_pack_and_fold_mem_bn():
    """A model whose binary layers are already packed and whose Mem-BN is folded exports too."""
    model = _small(mem_bn=True)
    x = torch.randn(3, 1, 24)
    ref = trained_logits(model, x)
    for m in model.modules():
        if hasattr(m, "pack"):
            m.pack()
        if isinstance(m, EMPFNeuron):
            m.fold_mem_bn()
    assert rel_err(fold(model)(x), ref) <= 1e-5


# ------------------------------------------------------------------------------------ reports


def test_resnet18_cifar_export_is_25x_smaller_than_fp32(tmp_path):
    model = build_model("resnet18", in_shape=(3, 32, 32), num_classes=10, T=4).eval()
    p = export(model, tmp_path / "r18.safetensors")
    ratio = state_dict_bytes(model) / p.stat().st_size
    assert ratio >= 25, ratio


def test_sop_count_equals_brute_force():
    """SOPs of a strided, padded, grouped binary conv: for each non-zero input, the weights it
    touches, counted directly with unfold."""
    from empf_triton.nn import BinaryConv2d

    T, N, C, O, g = 2, 3, 4, 6, 2
    x = (torch.rand(T, N, C, 7, 9) < 0.3).float() * torch.rand(T, N, C, 7, 9)
    conv = BinaryConv2d(C, O, 3, stride=2, padding=1, groups=g)

    class Node:
        op = "bconv"
        attrs = {"shape": [O, C // g, 3, 3], "stride": [2, 2], "padding": [1, 1], "groups": g,
                 "linear": False}  # fmt: skip

    got = _Recorder._sops(None, Node, x != 0)
    cols = F.unfold((x != 0).flatten(0, 1).float(), 3, padding=1, stride=2)  # [TN, C*9, L]
    per_group = cols.reshape(T * N, g, C // g * 9, -1).sum(dim=(0, 2, 3))  # touched per group
    assert got.item() == float((per_group * (O // g)).sum())
    assert conv.groups == g


def test_energy_report_counts_match_the_trained_model():
    model = _small(parallel=True, spike_bits=4)
    x = torch.randn(10, 1, 24)
    rates = []
    hooks = [
        m.register_forward_hook(lambda mod, i, o: rates.append((o != 0).float().mean().item()))
        for m in model.modules()
        if isinstance(m, EMPFNeuron)
    ]
    trained_logits(model, x)
    for h in hooks:
        h.remove()
    d = fold(model)
    rep = energy_report(d, [x[:4], (x[4:], None)])
    assert rep["samples"] == 10
    spiking = [r for r in rep["layers"] if r["firing_rate"] is not None]
    assert [r["firing_rate"] for r in spiking] == pytest.approx(rates, abs=1e-6)
    T = 3
    for r in spiking:
        par = "par." in r["layer"]
        assert r["nops"] == r["neurons"] * (T if par else 3 * T)
    for r in rep["layers"]:
        if r["sops"]:
            assert r["input_bits"] == 4
            assert r["energy_paper_pj"] == pytest.approx(r["sops"] * E_SOP_4BIT_PJ)
    stem = rep["layers"][0]
    assert stem["layer"].startswith("1:conv1x5") and stem["sops"] == 0
    assert stem["macs"] == 8 * 24 * 5  # once per sample: the static stem runs once for all T
    t = rep["totals"]
    assert t["energy_paper_mj"] == pytest.approx(t["sops"] * E_SOP_4BIT_PJ * 1e-9)
    assert t["energy_usual_mj"] == pytest.approx(t["energy_paper_mj"] + t["macs"] * 4.6e-9)
    table = format_energy_table(rep)
    assert "paper accounting" in table and "usual SNN accounting" in table
    assert energy_report(d, [x], max_samples=3)["samples"] == 3


def test_energy_report_names_a_model_that_is_not_deployed_and_a_non_int_max_samples():
    """The trained model (not folded) was an AttributeError on `_nodes`; max_samples=1e4 (a
    float) was "slice indices must be integers"."""
    model = _small()
    x = torch.randn(2, 1, 24)
    with pytest.raises(TypeError, match="energy_report needs a DeployedModel .*got MNIST1DCNN"):
        energy_report(model, [x])
    for bad in (1e4, 2.0, True, "3"):
        with pytest.raises(TypeError, match="max_samples must be an int or None"):
            energy_report(fold(model), [x], max_samples=bad)


def test_energy_report_takes_an_empty_batch():
    """A batch of no samples (the deployed model runs it) adds nothing to the counts."""
    d = fold(_small(parallel=True))
    x = torch.randn(5, 1, 24)
    rep = energy_report(d, [x[:3], x[:0], x[3:]])
    assert rep["samples"] == 5
    assert rep == energy_report(d, [x[:3], x[3:]])


def test_paper_energy_constants_reproduce_its_ablation():
    # 284.49 M SOPs -> 0.26 mJ; 233.84 M SOPs with 4-bit spikes -> 0.03 mJ (the paper's table)
    assert round(284.49e6 * E_SOP_PJ * 1e-9, 2) == 0.26
    assert round(233.84e6 * E_SOP_4BIT_PJ * 1e-9, 2) == 0.03


def test_float_spike_energy_and_plot(tmp_path):
    pytest.importorskip("matplotlib")
    d = fold(_small())
    rep = energy_report(d, [torch.randn(5, 1, 24)])
    sop_layers = [r for r in rep["layers"] if r["sops"]]
    assert sop_layers and all(r["input_bits"] is None for r in sop_layers)
    t = rep["totals"]
    assert t["energy_paper_mj"] == pytest.approx(t["sops"] * E_SOP_PJ * 1e-9)
    png = plot_energy(rep, tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_identical_predictions_on_embedded_test_set():
    """The deployed model predicts exactly what the trained model predicts on the test split."""
    from empf_triton.data import load_dataset

    _, test, info = load_dataset("digits")
    model = randomize(build_model("digits_mlp", in_shape=info.in_shape, num_classes=10, T=4,
                                  mem_bn=True, spike_bits=4))  # fmt: skip
    ref = trained_logits(model, test.x).argmax(-1)
    out = fold(model)(test.x).argmax(-1)
    assert torch.equal(out, ref)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fold_of_a_cuda_model_equals_fold_on_cpu():
    """fold() takes a model on any device (biasless convs once got a CPU zero bias: mismatch)."""
    model = randomize(build_model("resnet18", in_shape=(3, 6, 6), num_classes=3, T=2, width=2))
    x = torch.randn(2, 3, 6, 6)
    ref = fold(model, impl="reference")(x)
    out = fold(model.to("cuda"), impl="reference").to("cpu")(x)
    assert rel_err(out, ref) <= 1e-5


def _node_attrs(op, change):
    """A document edit: `change(attrs)` on the first node of `op`."""

    def edit(doc):
        change(next(n for n in doc["graph"]["nodes"] if n["op"] == op)["attrs"])

    return edit


def _fused_neuron(change):
    def edit(doc):
        n = next(n for n in doc["graph"]["nodes"] if n["op"] == "bconv" and n["attrs"]["neuron"])
        change(n["attrs"]["neuron"])

    return edit


def _int_weight(tensors):
    key = next(k for k in tensors if k.endswith(".weight") and tensors[k].dim() == 4)
    tensors[key] = tensors[key].to(torch.int32)


@pytest.mark.parametrize(
    "change_tensors,change_doc,match",
    [
        (None, _node_attrs("conv", lambda a: a.update(stride=[0, 0])), r"stride must be .* >= 1"),
        (None, _node_attrs("conv", lambda a: a.update(dilation=[1, 0])), "dilation"),
        (None, _node_attrs("bconv", lambda a: a.update(stride=[0, 1])), r"stride must be"),
        (None, _node_attrs("maxpool", lambda a: a.update(kernel_size=[0, 2])), "kernel_size"),
        (None, _fused_neuron(lambda a: a.pop("spike_bits")), "neuron lacks attribute 'spike_bits'"),
        (None, _fused_neuron(lambda a: a.update(spike_step=float("inf"))), "spike_step must be"),
        (None, _node_attrs("neuron", lambda a: a.update(spike_step=1e300)), "spike_step must be"),
        (_int_weight, None, r"weight must be floating, got torch.int32"),
    ],
    ids=[
        "conv stride 0",
        "dilation 0",
        "bconv stride 0",
        "pool size 0",
        "fused neuron keys",
        "fused spike_step inf",
        "spike_step beyond fp32",
        "int conv weight",
    ],  # fmt: skip
)
def test_attributes_the_ops_cannot_run_are_a_format_error(
    exported, change_tensors, change_doc, match
):
    """Hand-edited files (checksum made again) that the ops cannot run fail at load with a
    DeployFormatError naming the node: before, a zero stride crashed load() with a
    ZeroDivisionError, and the others loaded and failed at the first forward (a KeyError,
    a ValueError, a torch dtype error)."""
    _rewrite_with_checksum(exported, change_tensors, change_doc)
    with pytest.raises(DeployFormatError, match=match) as e:
        load(exported)
    assert "m.safetensors" in str(e.value)


@pytest.mark.parametrize("where", ["header", "metadata"])
@pytest.mark.parametrize("what", ["deep", "bigint"])
def test_pathological_header_json_is_a_format_error(tmp_path, where, what):
    """JSON nested 100,000 deep or holding a 5,000-digit integer is a DeployFormatError (it was
    a RecursionError or a plain ValueError)."""
    from safetensors.torch import save

    bad = "[" * 100_000 + "]" * 100_000 if what == "deep" else "1" * 5000
    path = tmp_path / "m.safetensors"
    if where == "metadata":
        path.write_bytes(save({"a": torch.zeros(1)}, metadata={META_KEY: bad}))
    else:
        head = ('{"x": ' + bad + "}").encode()
        path.write_bytes(len(head).to_bytes(8, "little") + head)
    with pytest.raises(DeployFormatError, match="m.safetensors"):
        load(path)


def test_conversion_to_float64_is_refused_before_any_change():
    """`.double()` / `.to(torch.float64)` of a deployed model is a TypeError, as
    load(dtype=torch.float64) is, and leaves the model as it was (it was accepted, and the next
    forward failed inside a layer)."""
    d = fold(_small(spike_bits=4), impl="reference")
    x = torch.randn(2, 1, 24)
    want = d(x)
    for convert in (lambda m: m.double(), lambda m: m.to(torch.float64)):
        with pytest.raises(TypeError, match="not torch.float64"):
            convert(d)
        assert d.dtype == torch.float32 and torch.equal(d(x), want)
    assert d.to(torch.float16).dtype == torch.float16


@pytest.mark.parametrize("options", [{}, {"spike_bits": 4}])
def test_deployed_model_under_vmap(options):
    """A deployed model maps over samples under torch.func.vmap with impl='auto' (the reference
    runs there); impl='triton' is refused there even after a plain call cached its layer plans
    (a cached Triton plan met the transform's batched tensors: 'Cannot access storage of
    BatchedTensorImpl'), and the plain call runs on unchanged afterwards."""
    from torch.func import vmap

    from empf_triton.ops import TritonUnavailableError

    deployed = fold(_small(**options))
    xs = torch.randn(3, 2, 1, 24)
    got = vmap(deployed)(xs)
    torch.testing.assert_close(got, torch.stack([deployed(x) for x in xs]), rtol=1e-6, atol=1e-6)
    deployed.impl = "triton"
    plain = deployed(xs[0])
    with pytest.raises(TritonUnavailableError, match="torch.func"):
        vmap(deployed)(xs)
    assert torch.equal(deployed(xs[0]), plain)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_torch_export_and_compile_of_a_deployed_model(impl):
    """torch.export.export and torch.compile of a deployed model give the eager outputs (the
    layers trace as the reference's torch ops), and leave the model as it was: exported before
    its first eager call, it kept layer plans made of the trace's fake tensors, and its eager
    calls then returned FakeTensors."""
    model, x = _small(spike_bits=4), torch.randn(2, 1, 24)
    want = fold(model, impl=impl)(x)
    deployed = fold(model, impl=impl)  # no eager call before the export
    exported = torch.export.export(deployed, (x,))
    compiled = torch.compile(fold(model, impl=impl), backend="aot_eager")  # (graph breaks)
    for got in (deployed(x), exported.module()(x), deployed(x), compiled(x)):
        assert type(got) is torch.Tensor
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    x2 = torch.randn(2, 1, 24)  # the exported graph computes (it is not the trace's constants)
    torch.testing.assert_close(exported.module()(x2), deployed(x2), rtol=1e-6, atol=1e-6)
    targets = {  # plain torch ops: the exported graph needs no empf_triton op
        str(n.target)
        for gm in exported.graph_module.modules()
        if isinstance(gm, torch.fx.GraphModule)
        for n in gm.graph.nodes
        if n.op == "call_function"
    }
    assert any("conv" in t for t in targets) and not any("empf" in t for t in targets)


def test_torch_export_of_a_triton_deployed_model_is_refused():
    """impl='triton' layers launch their kernels eagerly: tracing them is one DeployError (was
    torch's "Cannot access data pointer of Tensor (e.g. FakeTensor ...)" from inside Triton)."""
    model, x = _small(spike_bits=4), torch.randn(2, 1, 24)
    deployed = fold(model, impl="triton")
    with pytest.raises(DeployError, match="impl='triton'.*torch.export"):
        torch.export.export(deployed, (x,))
    torch.testing.assert_close(deployed(x), fold(model, impl="reference")(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["reference", "triton"])
def test_deployed_model_ignores_autocast(impl):
    """A deployed model runs in the dtype it was exported in, also inside torch.autocast: before,
    autocast turned its torch-op layers (the head, SECA's conv, the reference convolutions) to
    bf16 and not the kernels, and the two impls disagreed (1.1e-3 against 3.2e-4 off the
    fp32 logits)."""
    model, x = _small(mem_bn=True, seca=True), torch.randn(2, 1, 24)
    deployed = fold(model, impl=impl)
    plain = deployed(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = deployed(x)
        per_step = deployed(x, per_step=True)
    assert got.dtype == per_step.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(got, plain, rtol=0, atol=0)
    torch.testing.assert_close(per_step.sum(0), plain, rtol=0, atol=0)
