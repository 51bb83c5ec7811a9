"""Size and energy reports of a deployed model, and their plots.

Operation counts, measured on real inputs by running the `DeployedModel` with a recorder:

- SOPs (synaptic operations) of a layer whose input is spikes, counted event-driven: for each
  non-zero input spike (or non-zero k-bit code), the number of weights it touches (for a
  convolution, the output positions and channels it reaches, padding borders included exactly).
- MACs of a layer whose input is real-valued: the non-spiking first layer (stem) and a classifier
  after global average pooling. The runtime computes a static input's stem once for all T steps,
  and the count is of the MACs actually run.
- NOPs (neuron operations): per neuron, T mul + 2T add for the vanilla EM-PF neuron, T add for a
  parallel neuron.
- Firing rate of each spiking layer: the fraction of non-zero outputs over all steps.

Energy (per sample):

- "paper accounting" (the EM-PF paper's code): SOPs x 0.9 pJ; with 4-bit spikes the paper
  divides by 8 more, SOPs x 0.1125 pJ (other spike widths use 0.9 pJ: the paper gives no rule).
- "usual SNN accounting": the paper's figure plus the MACs x 4.6 pJ of the real-valued layers.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..nn.neuron import unwrap_model
from .runtime import Codes, DeployedModel

__all__ = [
    "E_MAC_PJ",
    "E_SOP_PJ",
    "E_SOP_4BIT_PJ",
    "energy_report",
    "format_energy_table",
    "format_size_report",
    "plot_energy",
    "size_report",
    "state_dict_bytes",
]

#: pJ per synaptic operation (the paper's accounting), per SOP with 4-bit spikes (0.9 / 8),
#: and per multiply-accumulate of a real-valued layer (the usual SNN accounting).
E_SOP_PJ = 0.9
E_SOP_4BIT_PJ = 0.9 / 8
E_MAC_PJ = 4.6


def _label(node, model: DeployedModel) -> str:
    a = node.attrs
    if node.op == "bconv":
        O, I, kh, kw = a["shape"]
        kind = "blinear" if a["linear"] else f"bconv{kh}x{kw}"
        s = f"{node.index}:{kind} {I * a['groups']}->{O}"
        if a["neuron"] is not None:
            s += " +par.neuron" if a["neuron"]["parallel"] else " +neuron"
        return s
    if node.op == "conv":
        w = getattr(model, node.buffers["weight"])
        O, Ig, kh, kw = w.shape
        return f"{node.index}:conv{kh}x{kw} {Ig * a['groups']}->{O}"
    if node.op == "linear":
        w = getattr(model, node.buffers["weight"])
        return f"{node.index}:linear {w.shape[1]}->{w.shape[0]}"
    if node.op == "neuron":
        return f"{node.index}:{'par.' if a['parallel'] else ''}neuron"
    return f"{node.index}:{node.op}"


class _Recorder:
    def __init__(self, model: DeployedModel) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.samples = 0
        # spike width of each spike value (None: float spikes), through max-pools and reshapes
        self.bits: dict[str, int | None] = {}
        for n in model._nodes:
            if n.op == "neuron":
                self.bits[n.output] = n.attrs["spike_bits"]
            elif n.op == "bconv" and n.attrs["neuron"] is not None:
                self.bits[n.output] = n.attrs["neuron"]["spike_bits"]
            elif n.output in model.spike_values:
                self.bits[n.output] = self.bits[n.inputs[0]]

    def row(self, model: DeployedModel, node) -> dict[str, Any]:
        if node.index not in self.rows:
            self.rows[node.index] = {
                "layer": _label(node, model),
                "op": node.op,
                "sops": 0.0,
                "macs": 0.0,
                "nops": 0.0,
                "neurons": 0,
                "nonzero": 0,
                "outputs": 0,
                "spiking_input": False,
                "input_bits": None,
            }
        return self.rows[node.index]

    def __call__(self, model: DeployedModel, node, args, out) -> None:
        T = model.T
        if node.op in ("conv", "linear", "bconv"):
            r = self.row(model, node)
            x = args[0]
            spiking = node.inputs[0] in model.spike_values
            r["spiking_input"] = spiking
            if spiking:
                r["input_bits"] = self.bits.get(node.inputs[0])
                nz = (x.codes if isinstance(x, Codes) else x) != 0
                r["sops"] += float(self._sops(model, node, nz))
            else:
                r["macs"] += float(self._macs(model, node, out))
        spiking_out = node.op == "neuron" or (node.op == "bconv" and node.attrs["neuron"])
        if spiking_out:
            r = self.row(model, node)
            o = out.codes if isinstance(out, Codes) else out
            N = o.shape[1]
            per = math.prod(o.shape[2:])  # neurons per sample (an empty batch has some too)
            parallel = (node.attrs if node.op == "neuron" else node.attrs["neuron"])["parallel"]
            r["neurons"] = per
            r["nops"] += float(per * (T if parallel else 3 * T) * N)
            r["nonzero"] += int((o != 0).sum())
            r["outputs"] += o.numel()

    @staticmethod
    def _sops(model: DeployedModel, node, nz: torch.Tensor) -> torch.Tensor:
        if node.op == "linear":
            w = getattr(model, node.buffers["weight"])
            return nz.sum() * w.shape[0]
        if node.op == "bconv" and node.attrs["linear"]:
            return nz.sum() * node.attrs["shape"][0]
        a = node.attrs
        if node.op == "bconv":
            O, Ig, kh, kw = a["shape"]
            dil = [1, 1]
        else:
            w = getattr(model, node.buffers["weight"])
            O, Ig, kh, kw = w.shape
            dil = a["dilation"]
        g = a["groups"]
        # Σ over output positions of the non-zero inputs in each window = the weights touched
        # per output channel of a group; times that group's output channels.
        ones = torch.ones(g, Ig, kh, kw, dtype=torch.float32, device=nz.device)
        z = nz.flatten(0, 1).to(torch.float32)
        hits = F.conv2d(z, ones, None, a["stride"], a["padding"], dil, g)
        return hits.sum(dtype=torch.float64) * (O // g)

    @staticmethod
    def _macs(model: DeployedModel, node, out) -> int:
        o = out.codes if isinstance(out, Codes) else out
        if node.op == "linear":
            w = getattr(model, node.buffers["weight"])
            return o.numel() * w.shape[1]
        if node.op == "bconv":
            O, Ig, kh, kw = node.attrs["shape"]
        else:
            w = getattr(model, node.buffers["weight"])
            O, Ig, kh, kw = w.shape
        return o.numel() * Ig * kh * kw


def _sop_pj(bits: int | None) -> float:
    return E_SOP_4BIT_PJ if bits == 4 else E_SOP_PJ


@torch.no_grad()
def energy_report(
    model: DeployedModel,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, Any]],
    *,
    max_samples: int | None = None,
) -> dict[str, Any]:
    """Per-layer firing rates and operation counts on real inputs, and the energy per sample.

    Args:
        model: a `DeployedModel`.
        batches: inputs `x` (as `model(x)` takes them) or `(x, y)` pairs.
        max_samples: stop after this many samples (None: all).

    Returns:
        {"samples": n, "T": T, "layers": [{"layer", "op", "firing_rate", "sops", "macs", "nops",
        "neurons", "input_bits", "energy_paper_pj", ...} per sample], "totals": {"sops", "macs",
        "nops", "energy_paper_mj", "energy_usual_mj", "firing_rate"}} with counts per sample.
    """
    if not isinstance(model, DeployedModel):
        raise TypeError(
            f"energy_report needs a DeployedModel (empf_triton.deploy.fold(model) or load(path)), "
            f"got {type(model).__name__}"
        )
    if max_samples is not None and (
        isinstance(max_samples, bool) or not isinstance(max_samples, int)
    ):
        raise TypeError(f"max_samples must be an int or None, got {max_samples!r}")
    rec = _Recorder(model)
    n = 0
    model._recorder = rec
    try:
        for b in batches:
            if max_samples is not None and n >= max_samples:
                break
            x = model.check_input(b[0] if isinstance(b, (tuple, list)) else b)  # [T', N, *]
            if max_samples is not None:
                x = x[:, : max_samples - n]
            model(x if x.shape[0] == model.T else x[0])
            n += x.shape[1]
    finally:
        model._recorder = None
    if n == 0:
        raise ValueError("energy_report needs at least one sample")
    layers = []
    tot = {"sops": 0.0, "macs": 0.0, "nops": 0.0, "energy_paper_pj": 0.0, "energy_mac_pj": 0.0}
    nonzero = outputs = 0
    for i in sorted(rec.rows):
        r = dict(rec.rows[i])
        for k in ("sops", "macs", "nops"):
            r[k] /= n
        r["firing_rate"] = r["nonzero"] / r["outputs"] if r["outputs"] else None
        nonzero, outputs = nonzero + r.pop("nonzero"), outputs + r.pop("outputs")
        r["energy_paper_pj"] = r["sops"] * _sop_pj(r["input_bits"])
        r["energy_mac_pj"] = r["macs"] * E_MAC_PJ
        for k in tot:
            tot[k] += r[k]
        layers.append(r)
    totals = {
        "sops": tot["sops"],
        "macs": tot["macs"],
        "nops": tot["nops"],
        "firing_rate": nonzero / outputs if outputs else None,
        "energy_paper_mj": tot["energy_paper_pj"] * 1e-9,
        "energy_usual_mj": (tot["energy_paper_pj"] + tot["energy_mac_pj"]) * 1e-9,
    }
    return {"samples": n, "T": model.T, "layers": layers, "totals": totals}


def _si(v: float) -> str:
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.3f}{unit}"
    return f"{v:.1f}"


def format_energy_table(report: Mapping[str, Any]) -> str:
    """The energy report as a text table (per sample)."""
    lines = [
        f"operations and energy per sample ({report['samples']} samples, T={report['T']})",
        f"{'layer':<30} {'fire rate':>9} {'SOPs':>10} {'MACs':>10} {'NOPs':>10} {'pJ (paper)':>11}",
    ]
    for r in report["layers"]:
        fr = "-" if r["firing_rate"] is None else f"{r['firing_rate']:.4f}"
        lines.append(
            f"{r['layer']:<30} {fr:>9} {_si(r['sops']):>10} {_si(r['macs']):>10} "
            f"{_si(r['nops']):>10} {r['energy_paper_pj']:>11.1f}"
        )
    t = report["totals"]
    fr = "-" if t["firing_rate"] is None else f"{t['firing_rate']:.4f}"
    lines.append(
        f"{'total':<30} {fr:>9} {_si(t['sops']):>10} {_si(t['macs']):>10} {_si(t['nops']):>10}"
    )
    lines.append(
        f"energy, paper accounting (SOPs x 0.9 pJ; x 0.1125 pJ with 4-bit spikes): "
        f"{t['energy_paper_mj']:.6f} mJ per sample"
    )
    lines.append(
        f"energy, usual SNN accounting (paper + real-valued layers' MACs x 4.6 pJ): "
        f"{t['energy_usual_mj']:.6f} mJ per sample"
    )
    return "\n".join(lines)


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())` with floating tensors in fp32 (in memory)."""
    model = unwrap_model(model)
    sd = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu()
        for k, v in model.state_dict().items()
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    return buf.getbuffer().nbytes


def size_report(
    export_path: str | os.PathLike,
    *,
    checkpoint_bytes: int | None = None,
    fp32_state_dict_bytes: int | None = None,
) -> dict[str, Any]:
    """The export's size beside the training checkpoint's and the fp32 state_dict's.

    Returns:
        {"export_bytes", "checkpoint_bytes", "fp32_state_dict_bytes", "vs_checkpoint",
        "vs_fp32_state_dict"} (ratios: how many times smaller the export is; None when unknown).
    """
    e = Path(export_path).stat().st_size
    return {
        "export_bytes": e,
        "checkpoint_bytes": checkpoint_bytes,
        "fp32_state_dict_bytes": fp32_state_dict_bytes,
        "vs_checkpoint": checkpoint_bytes / e if checkpoint_bytes else None,
        "vs_fp32_state_dict": fp32_state_dict_bytes / e if fp32_state_dict_bytes else None,
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:.3f} MiB ({b} bytes)"


def format_size_report(s: Mapping[str, Any]) -> str:
    out = [f"export size: {_mib(s['export_bytes'])}"]
    if s.get("fp32_state_dict_bytes"):
        out.append(
            f"fp32 state_dict: {_mib(s['fp32_state_dict_bytes'])} "
            f"({s['vs_fp32_state_dict']:.1f}x the export)"
        )
    if s.get("checkpoint_bytes"):
        out.append(
            f"training checkpoint (with optimizer state): {_mib(s['checkpoint_bytes'])} "
            f"({s['vs_checkpoint']:.1f}x the export)"
        )
    return "\n".join(out)


def plot_energy(report: Mapping[str, Any], out: str | os.PathLike, *, title: str = "") -> Path:
    """PNG with the firing rate and the SOPs (and MACs) per layer; returns its path.

    Args:
        report: an `energy_report` result.
        out: a folder (writes `deployed_layers.png` there) or a `.png` path.
    """
    from .._plot import save_png, subplots

    out = Path(out)
    path = out if out.suffix == ".png" else out / "deployed_layers.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    layers = report["layers"]
    names = [r["layer"] for r in layers]
    x = range(len(layers))
    fig, (ax1, ax2) = subplots(2, 1, figsize=(max(8.0, 0.45 * len(layers) + 2), 8))
    fr = [r["firing_rate"] if r["firing_rate"] is not None else math.nan for r in layers]
    ax1.bar(x, fr, color="tab:blue")
    ax1.set(ylabel="firing rate", title="firing rate per spiking layer (non-zero outputs)")
    ax1.set_xticks(list(x), [])
    ax1.grid(axis="y", alpha=0.3)
    ax2.bar(x, [r["sops"] / 1e6 for r in layers], color="tab:orange", label="SOPs")
    ax2.bar(x, [r["macs"] / 1e6 for r in layers], color="tab:gray", label="MACs (real input)")
    ax2.set(ylabel="M ops per sample", title="synaptic operations per layer")
    ax2.set_xticks(list(x), names, rotation=70, ha="right", fontsize=7)
    ax2.grid(axis="y", alpha=0.3)
    ax2.legend(fontsize=8)
    t = report["totals"]
    fig.suptitle(
        (title + "\n" if title else "")
        + f"paper accounting {t['energy_paper_mj']:.4g} mJ/sample; usual SNN accounting "
        f"{t['energy_usual_mj']:.4g} mJ/sample\n({report['samples']} samples, T={report['T']})",
        fontsize=9,
    )
    fig.tight_layout()
    save_png(fig, path)
    return path
