"""Folding a trained EM-PF model into a deployment graph (`fold(model) -> DeployedModel`).

What folds where (inference, eval-mode statistics):

- BatchNorm after a binary convolution/linear layer: `BN(α_c · conv(x, sign W))` is
  `conv(x, sign W) · scale_c + bias_c` with `scale_c = α_c γ_c / σ_c` and
  `bias_c = β_c - μ_c γ_c / σ_c` (σ = sqrt(running_var + eps)). After a full-precision conv or
  linear layer it folds into the weight and a bias instead.
- Mem-BN: in eval mode it is `m -> k_t m + b_t` per step and channel (`MemBN.fold()`), so the
  neuron's charge `k_t (λ_t v + I) + b_t` is a neuron with per-channel decay `k_t λ_t` and current
  `k_t I + b_t`. When the neuron directly follows a binary conv + BN, the current's affine map
  folds further into that conv's scale and bias, which become per step: `[T, C]`.
- A neuron that directly follows a binary conv (+ BN) is fused into it (the `bconv` node runs the
  packed convolution and the neuron in one op). Parallel neurons, k-bit spikes and SECA carry over.

The latent weights are packed (1 bit per binary weight, 2 per ternary weight) and dropped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..nn.binary import BinaryConv2d, BinaryLinear
from ..nn.neuron import EMPFNeuron, unwrap_model
from ..nn.seca import SECA
from ..ops._common import TritonUnavailableError
from ..ops.binary import pack_weight
from .errors import DeployError
from .runtime import DeployedModel


@functools.cache
def _models() -> SimpleNamespace:
    """The model classes, imported on first fold: loading an export must not import them."""
    from ..models.layers import SeqToANN
    from ..models.resnet import EMPFResNet, PreActBlock
    from ..models.small import MNIST1DCNN, DigitsMLP
    from ..models.vgg import EMPFVGG

    return SimpleNamespace(
        SeqToANN=SeqToANN, EMPFResNet=EMPFResNet, PreActBlock=PreActBlock,
        MNIST1DCNN=MNIST1DCNN, DigitsMLP=DigitsMLP, EMPFVGG=EMPFVGG,
    )  # fmt: skip


__all__ = ["fold", "model_info"]

_F32 = torch.float32


class _Node:
    def __init__(self, op: str, inputs: list[str], output: str, attrs: dict, tensors: dict):
        self.op, self.inputs, self.output = op, inputs, output
        self.attrs, self.tensors = attrs, tensors
        self.bn_folded = False


class _Graph:
    def __init__(self, T: int) -> None:
        self.T = T
        self.nodes: list[_Node] = []
        self._n = 0

    def fresh(self) -> str:
        self._n += 1
        return f"v{self._n}"

    def add(self, op: str, inputs: list[str], attrs: dict | None = None, tensors=None) -> str:
        out = self.fresh()
        self.nodes.append(_Node(op, inputs, out, attrs or {}, tensors or {}))
        return out

    def producer(self, name: str) -> _Node | None:
        """The last node, if it produced `name` (only then can a following layer fold into it)."""
        if self.nodes and self.nodes[-1].output == name:
            return self.nodes[-1]
        return None


def _det(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(_F32).contiguous().clone()


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _bn_affine(bn: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, b) with eval-mode BN(x) = x * s + b per channel, computed in fp64."""
    if bn.running_mean is None or bn.running_var is None:
        raise DeployError(f"{path}: a BatchNorm without running statistics cannot be folded")
    var = bn.running_var.detach().double()
    s = 1.0 / torch.sqrt(var + bn.eps)
    if bn.weight is not None:
        s = s * bn.weight.detach().double()
    b = -bn.running_mean.detach().double() * s
    if bn.bias is not None:
        b = b + bn.bias.detach().double()
    return s, b


def _fold_bn(g: _Graph, bn: nn.Module, cur: str, path: str) -> str:
    prod = g.producer(cur)
    if (
        prod is None
        or prod.op not in ("conv", "linear", "bconv")
        or prod.bn_folded
        or prod.attrs.get("neuron") is not None
    ):
        raise DeployError(
            f"{path}: the exporter folds a BatchNorm only directly after a convolution or "
            "linear layer"
        )
    s, b = _bn_affine(bn, path)
    t = prod.tensors
    old_b = t.get("bias")
    old_b = torch.zeros_like(s) if old_b is None else old_b.double()
    if prod.op == "bconv":
        t["scale"] = (t["scale"].double() * s).to(_F32)
        t["bias"] = (old_b * s + b).to(_F32)
    else:
        w = t["weight"].double()
        t["weight"] = (w * s.view(-1, *(1,) * (w.dim() - 1))).to(_F32).contiguous()
        t["bias"] = (old_b * s + b).to(_F32)
    prod.bn_folded = True
    return cur


def _neuron_params(n: EMPFNeuron) -> dict[str, torch.Tensor | None]:
    th = torch.sigmoid(n.threshold_logit.detach().to(_F32))
    lam = None if n.parallel else torch.sigmoid(n.decay_logit.detach().to(_F32))
    k = b = None
    if n.mem_bn is not None:
        k, b = n.mem_bn.fold()
    elif n.mem_scale is not None:
        k, b = n.mem_scale, n.mem_bias
    if k is not None:
        k, b = _det(k), _det(b)
    return {"threshold": th, "decay": lam, "k": k, "b": b}


def _neuron(g: _Graph, n: EMPFNeuron, cur: str, path: str) -> str:
    if n.T != g.T:
        raise DeployError(f"{path}: neuron has T={n.T} but the model has T={g.T}")
    p = _neuron_params(n)
    attrs = {"parallel": bool(n.parallel), "spike_bits": n.spike_bits,
             "spike_step": float(n.spike_step)}  # fmt: skip
    T = g.T
    prod = g.producer(cur)
    if prod is not None and prod.op == "bconv" and prod.attrs["neuron"] is None:
        # Fuse into the conv; Mem-BN's current affine folds into its per-step scale and bias.
        t = prod.tensors
        C = prod.attrs["shape"][0]
        scale = t["scale"]
        bias = t.get("bias")
        if bias is None:
            bias = torch.zeros(C, dtype=_F32, device=scale.device)
        k = p["k"].double() if p["k"] is not None else None  # fp64 arithmetic, stored fp32
        if k is not None:
            t["scale"] = (k * scale.double()[None]).to(_F32).contiguous()
            t["bias"] = (k * bias.double()[None] + p["b"].double()).to(_F32).contiguous()
        if p["decay"] is not None:
            lam = p["decay"][:, None]
            decay = (k * lam.double()).to(_F32) if k is not None else lam.expand(T, C)
            t["decay"] = decay.contiguous()
        t["threshold"] = p["threshold"][:, None].expand(T, C).contiguous()
        prod.attrs["neuron"] = attrs
        prod.output = g.fresh()
        return prod.output
    tensors = {"threshold": p["threshold"]}
    if p["k"] is not None:
        tensors["in_scale"], tensors["in_bias"] = p["k"], p["b"]
        if p["decay"] is not None:
            tensors["decay"] = (p["k"].double() * p["decay"][:, None].double()).to(_F32)
    elif p["decay"] is not None:
        tensors["decay"] = p["decay"]
    return g.add("neuron", [cur], attrs, tensors)


def _packed(layer: BinaryConv2d | BinaryLinear):
    """The layer's packed weight. A latent weight that the layer's `impl="triton"` cannot pack
    where it is (a CPU model without Triton's interpreter) is packed by the reference: the same
    signs and α, and folding works on any device as documented."""
    try:
        return layer.packed_weight()
    except TritonUnavailableError:
        return pack_weight(layer.weight.detach(), layer.bits, impl="reference")


def _binary(g: _Graph, layer: BinaryConv2d | BinaryLinear, cur: str, path: str) -> str:
    packed = _packed(layer)
    if isinstance(layer, BinaryConv2d):
        if layer.dilation != (1, 1):
            raise DeployError(f"{path}: dilated binary convolutions are not deployable")
        shape = list(packed.shape)
        attrs = {"stride": list(layer.stride), "padding": list(layer.padding),
                 "groups": layer.groups, "linear": False}  # fmt: skip
    else:
        shape = [packed.shape[0], packed.shape[1], 1, 1]
        attrs = {"stride": [1, 1], "padding": [0, 0], "groups": 1, "linear": True}
    attrs.update({"bits": packed.bits, "shape": shape, "neuron": None})
    tensors = {"words": packed.words.detach().cpu().contiguous(), "scale": _det(packed.scale)}
    if layer.bias is not None:
        tensors["bias"] = _det(layer.bias)
    return g.add("bconv", [cur], attrs, tensors)


def _leaf(g: _Graph, mod: nn.Module, cur: str, path: str) -> str:
    if isinstance(mod, (BinaryConv2d, BinaryLinear)):
        return _binary(g, mod, cur, path)
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return _fold_bn(g, mod, cur, path)
    if isinstance(mod, EMPFNeuron):
        return _neuron(g, mod, cur, path)
    if isinstance(mod, (nn.Identity, nn.Dropout)):
        return cur  # identity in eval mode
    if isinstance(mod, nn.Conv2d):
        if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
            raise DeployError(f"{path}: only zero, explicit padding is deployable")
        t = {"weight": _det(mod.weight)}
        t["bias"] = (
            _det(mod.bias)
            if mod.bias is not None
            else torch.zeros(mod.out_channels, device=mod.weight.device)
        )
        attrs = {"stride": _pair(mod.stride), "padding": _pair(mod.padding),
                 "dilation": _pair(mod.dilation), "groups": mod.groups}  # fmt: skip
        return g.add("conv", [cur], attrs, t)
    if isinstance(mod, nn.Linear):
        t = {"weight": _det(mod.weight)}
        if mod.bias is not None:
            t["bias"] = _det(mod.bias)
        return g.add("linear", [cur], {}, t)
    if isinstance(mod, SECA):
        return g.add("seca", [cur], {}, {"weight": _det(mod.weight)})
    if isinstance(mod, nn.MaxPool2d):
        if mod.dilation not in (1, (1, 1)) or mod.ceil_mode or mod.return_indices:
            raise DeployError(f"{path}: only plain max-pooling is deployable")
        stride = mod.stride if mod.stride is not None else mod.kernel_size
        attrs = {"kernel_size": _pair(mod.kernel_size), "stride": _pair(stride),
                 "padding": _pair(mod.padding)}  # fmt: skip
        return g.add("maxpool", [cur], attrs)
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        if _pair(mod.output_size) != [1, 1]:
            raise DeployError(f"{path}: only global average pooling (output 1) is deployable")
        return g.add("avgpool", [cur])
    if isinstance(mod, nn.Flatten):
        if mod.start_dim != 1 or mod.end_dim != -1:
            raise DeployError(f"{path}: only nn.Flatten() of everything after the batch")
        return g.add("flatten", [cur])
    if type(mod).__name__ == "LIFNeuron":
        raise DeployError(
            f"{path} is a LIFNeuron: the LIF baseline is not deployable (deployed models run "
            "EM-PF neurons only); train with EM-PF neurons (the default, --neuron empf) to export"
        )
    raise DeployError(
        f"the exporter does not know layer {path} of type {type(mod).__name__}; deployable "
        "layers: binary/full-precision conv and linear, BatchNorm (folded), EMPFNeuron, SECA, "
        "MaxPool2d, AdaptiveAvgPool2d(1), Flatten, Dropout, Identity, PreActBlock"
    )


def _walk(g: _Graph, mod: nn.Module, cur: str, path: str) -> str:
    if isinstance(mod, (_models().SeqToANN, nn.Sequential)):
        for name, child in mod.named_children():
            cur = _walk(g, child, cur, f"{path}.{name}")
        return cur
    if isinstance(mod, _models().PreActBlock):
        x = cur
        s1 = _walk(g, mod.neuron1, x, f"{path}.neuron1")
        out = _walk(g, mod.conv1, s1, f"{path}.conv1")
        out = _walk(g, mod.seca1, out, f"{path}.seca1")
        out = _walk(g, mod.neuron2, out, f"{path}.neuron2")
        out = _walk(g, mod.conv2, out, f"{path}.conv2")
        out = _walk(g, mod.seca2, out, f"{path}.seca2")
        sc = x if mod.shortcut is None else _walk(g, mod.shortcut, s1, f"{path}.shortcut")
        return g.add("add", [out, sc])
    return _leaf(g, mod, cur, path)


def _parts(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    if isinstance(model, (_models().MNIST1DCNN, _models().DigitsMLP)):
        names = ("stem", "blocks", "head_neuron", "classifier")
    elif isinstance(model, _models().EMPFResNet):
        names = ("stem", "layers", "final_neuron", "classifier")
    elif isinstance(model, _models().EMPFVGG):
        names = ("features", "classifier")
    else:
        raise DeployError(
            f"the exporter does not know model type {type(model).__name__}; it folds "
            "MNIST1DCNN, DigitsMLP, EMPFResNet and EMPFVGG (the registered models)"
        )
    for n in names:
        yield n, getattr(model, n)


def model_info(model: nn.Module) -> dict:
    """T, in_shape and num_classes of a registered model (unwraps DDP and torch.compile)."""
    model = unwrap_model(model)
    return {"T": int(model.T), "in_shape": list(model.in_shape),
            "num_classes": int(model.num_classes)}  # fmt: skip


@torch.no_grad()
def fold(model: nn.Module, *, impl: str = "auto") -> DeployedModel:
    """Fold a trained EM-PF model into a `DeployedModel` (inference only, packed weights).

    The model itself is not changed. Its logits in eval mode, summed over T, equal the deployed
    model's up to float rounding (BN, Mem-BN and α are applied as folded per-channel scales).

    Args:
        model: a model of the registry (`mnist1d_cnn`, `digits_mlp`, `resnet18/19/34`,
            `vgg11`), possibly DDP-wrapped or compiled, on any device (the result is on the
            CPU; `.to()` it).
        impl: "auto" | "triton" | "reference" for the deployed model's ops.

    Raises:
        DeployError: a model type or layer the exporter does not know (the message names it).
    """
    model = unwrap_model(model)
    parts = list(_parts(model))  # refuses an unknown model type first
    info = model_info(model)
    neurons = [m for m in model.modules() if isinstance(m, EMPFNeuron)]
    info["model_class"] = type(model).__name__
    if neurons:
        info["spike_bits"] = neurons[0].spike_bits
        info["spike_step"] = float(neurons[0].spike_step)
    g = _Graph(info["T"])
    cur = "x"
    if isinstance(model, _models().MNIST1DCNN):
        cur = g.add("unsqueeze", [cur], {"dim": -2})  # [*, C, L] -> [*, C, 1, L]
    for name, part in parts:
        cur = _walk(g, part, cur, name)
    nodes, tensors = [], {}
    for i, n in enumerate(g.nodes):
        nodes.append({"op": n.op, "in": n.inputs, "out": n.output, "attrs": n.attrs})
        for k, t in n.tensors.items():
            # a copy: the deployed model shares no memory with `model` (a packed layer's words)
            tensors[f"{i}.{k}"] = t.detach().to("cpu", copy=True).contiguous()
    return DeployedModel({"nodes": nodes, "output": cur}, tensors, info, impl=impl)
