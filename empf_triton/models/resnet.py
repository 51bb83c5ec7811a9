"""Pre-activation EM-PF ResNets (docs/model.md): resnet18, resnet19, resnet34.

Topology (the authors' CIFAR ResNet-18):

- stem: `BN(conv3x3(x))`, full precision, no neuron after it (the image enters as a current).
- block: `s1 = neuron1(x)`; `out = SECA(BN(conv1(s1)))`; `out = SECA(BN(conv2(neuron2(out))))`;
  `return out + shortcut`. The residual stream carries real-valued currents; spikes only feed
  convolutions. conv1 / conv2 are binary (weight_bits=1) or ternary (1.5) 3x3 convolutions
  (`BinaryConv2d`; 32 = full precision for ablations). With `parallel=True`, neuron2 of every
  block is the stateless parallel neuron ("50% parallel").
- shortcut: identity when shape is kept; otherwise `BN(conv1x1_stride(s1))`, a 1x1 convolution
  with the same weight_bits as the block (binary by default) that reads the block's first spikes
  s1 = neuron1(x), as in the pre-activation ResNets of OTTT/SLTT (the shortcut branches after the
  pre-activation). This keeps "spikes only feed convolutions" and matches the paper's parameter
  sizes (2.82 MB for CIFAR-10 ResNet-18 counts the downsampling convs as binary).
- head: a final neuron on the residual stream, global average pool, full-precision linear
  classifier (pre-activation nets end with the activation before the pool).

CIFAR-style for small inputs (3x3 stem, stride 1, no max-pool); for inputs of at least 128 pixels
on a side (ImageNet) `stem="auto"` uses the 7x7 stride-2 stem with a 3x3 stride-2 max-pool.
resnet19 is the SNN literature's (TET/TEBN): stem width 128, three stages of 128/256/512 channels
with 3/3/2 blocks.

BatchNorm in training mode sees one step's batch in step mode "s" and T*N samples in mode "m";
see `empf_triton.models.layers`. With `neuron="lif"` every neuron is a LIF neuron (the paper's
baseline); the topology is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..nn.seca import SECA
from .layers import (
    NeuronFactory,
    SeqToANN,
    SpikingModel,
    check_flag,
    check_weight_bits,
    conv2d,
    register_model,
    set_step_mode,
)

__all__ = ["EMPFResNet", "PreActBlock", "resnet18", "resnet19", "resnet34"]


class PreActBlock(nn.Module):
    """The pre-activation EM-PF basic block (see the module doc).

    Args:
        in_channels, out_channels, stride: as a ResNet basic block.
        neuron: the model's `NeuronFactory`.
        weight_bits, impl: of the binary convolutions.
        seca: SECA after each BN of the residual branch.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        neuron: NeuronFactory,
        *,
        weight_bits: float,
        impl: str,
        seca: bool,
    ) -> None:
        super().__init__()
        cw = {"weight_bits": weight_bits, "impl": impl}
        self.neuron1 = neuron(in_channels)
        self.conv1 = SeqToANN(
            conv2d(in_channels, out_channels, 3, stride, 1, **cw), nn.BatchNorm2d(out_channels)
        )
        self.seca1 = SECA(out_channels) if seca else nn.Identity()
        self.neuron2 = neuron(out_channels, parallel=True)
        self.conv2 = SeqToANN(
            conv2d(out_channels, out_channels, 3, 1, 1, **cw), nn.BatchNorm2d(out_channels)
        )
        self.seca2 = SECA(out_channels) if seca else nn.Identity()
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = SeqToANN(
                conv2d(in_channels, out_channels, 1, stride, 0, **cw), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s1 = self.neuron1(x)
        out = self.seca1(self.conv1(s1))
        out = self.seca2(self.conv2(self.neuron2(out)))
        return out + (x if self.shortcut is None else self.shortcut(s1))


class EMPFResNet(SpikingModel):
    """Pre-activation EM-PF ResNet with basic blocks (see the module doc).

    Args:
        blocks: blocks per stage.
        widths: channels per stage (the first stage has stride 1, the others stride 2).
        stem_width: channels of the stem.
        in_shape: (C, H, W) of one time step.
        num_classes, T: classes and time steps.
        weight_bits: 1 (binary), 1.5 (ternary) or 32 (full precision) for the block and shortcut
            convolutions; stem and classifier are always full precision.
        spike_bits, spike_step: k-bit spikes (None: float spikes).
        parallel: neuron2 of every block is a parallel neuron.
        seca: SECA after every BN of the residual branches.
        mem_bn: Mem-BN inside every neuron.
        grad_mode: "online" or "bptt" (the neurons'; `set_grad_mode` switches it later).
        impl: "auto" | "triton" | "reference" for the neurons and binary convolutions.
        step_mode: "s" or "m" (`set_step_mode` switches it later).
        stem: "cifar" (3x3, stride 1), "imagenet" (7x7 stride 2 + max-pool) or "auto" (imagenet
            when H and W are both >= 128).
        neuron: "empf" (default) or "lif": the LIF baseline (`empf_triton.nn.LIFNeuron`, binary
            spikes, soft reset, surrogate gradient) in every neuron's place; spike_bits,
            parallel and mem_bn must then stay off (`layers.check_neuron_options`).
        tau, v_threshold, surrogate, alpha, detach_reset: the LIF neurons' options (decay
            λ = 1 - 1/tau with tau > 1; threshold; "sigmoid" | "atan" | "triangle"; the
            surrogate's sharpness, None = its default; detach the spike in the reset). Only
            with neuron="lif".

    Shape:
        step mode "s": x [N, C, H, W] -> logits [N, num_classes]; step mode "m":
        x [T, N, C, H, W] -> [T, N, num_classes].
    """

    def __init__(
        self,
        blocks: Sequence[int],
        widths: Sequence[int],
        stem_width: int,
        *,
        in_shape: Sequence[int],
        num_classes: int,
        T: int,
        weight_bits: float = 1,
        spike_bits: int | None = None,
        spike_step: float = 0.25,
        parallel: bool = False,
        seca: bool = False,
        mem_bn: bool = False,
        grad_mode: str = "online",
        impl: str = "auto",
        step_mode: str = "s",
        neuron: str = "empf",
        tau: float = 2.0,
        v_threshold: float = 1.0,
        surrogate: str = "sigmoid",
        alpha: float | None = None,
        detach_reset: bool = False,
        stem: str = "auto",
    ) -> None:
        super().__init__(T, num_classes, in_shape, step_mode)
        if len(self.in_shape) != 3:
            raise ValueError(f"a ResNet needs in_shape (C, H, W), got {self.in_shape}")
        if stem not in ("auto", "cifar", "imagenet"):
            raise ValueError(f"stem must be 'auto', 'cifar' or 'imagenet', got {stem!r}")
        check_weight_bits(weight_bits)
        check_flag("seca", seca)
        neuron = NeuronFactory(
            T,
            spike_bits=spike_bits,
            spike_step=spike_step,
            parallel=parallel,
            mem_bn=mem_bn,
            grad_mode=grad_mode,
            impl=impl,
            neuron=neuron,
            tau=tau,
            v_threshold=v_threshold,
            surrogate=surrogate,
            alpha=alpha,
            detach_reset=detach_reset,
        )
        C, H, W = self.in_shape
        if stem == "auto":
            stem = "imagenet" if min(H, W) >= 128 else "cifar"
        self.stem_kind = stem
        if stem == "cifar":
            layers = [nn.Conv2d(C, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width)]
        else:
            layers = [
                nn.Conv2d(C, stem_width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(stem_width),
                nn.MaxPool2d(3, 2, 1),
            ]
        self.stem = SeqToANN(*layers)
        body: list[nn.Module] = []
        cin = stem_width
        for i, (n, cout) in enumerate(zip(blocks, widths)):
            for j in range(n):
                stride = 2 if i > 0 and j == 0 else 1
                body.append(
                    PreActBlock(
                        cin, cout, stride, neuron, weight_bits=weight_bits, impl=impl, seca=seca
                    )
                )
                cin = cout
        self.layers = nn.Sequential(*body)
        self.final_neuron = neuron(cin)
        self.classifier = SeqToANN(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )
        set_step_mode(self, step_mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.classifier(self.final_neuron(x))


def _width(width: object, default: int) -> int:
    if width is None:
        return default
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1 (the first stage's channels), got {width!r}")
    return width


@register_model("resnet18")
def resnet18(
    *, in_shape=(3, 32, 32), num_classes: int = 10, T: int = 4, width: int | None = None, **options
) -> EMPFResNet:
    """EM-PF ResNet-18: stages of 64/128/256/512 channels with 2/2/2/2 blocks (~11.2M params).

    `width` scales the stages (width, 2w, 4w, 8w; stem = width). Other options: `EMPFResNet`.
    """
    w = _width(width, 64)
    return EMPFResNet(
        (2, 2, 2, 2),
        (w, 2 * w, 4 * w, 8 * w),
        w,
        in_shape=in_shape,
        num_classes=num_classes,
        T=T,
        **options,
    )


@register_model("resnet34")
def resnet34(
    *, in_shape=(3, 32, 32), num_classes: int = 10, T: int = 4, width: int | None = None, **options
) -> EMPFResNet:
    """EM-PF ResNet-34: stages of 64/128/256/512 channels with 3/4/6/3 blocks (~21.3M params)."""
    w = _width(width, 64)
    return EMPFResNet(
        (3, 4, 6, 3),
        (w, 2 * w, 4 * w, 8 * w),
        w,
        in_shape=in_shape,
        num_classes=num_classes,
        T=T,
        **options,
    )


@register_model("resnet19")
def resnet19(
    *, in_shape=(3, 32, 32), num_classes: int = 10, T: int = 4, width: int | None = None, **options
) -> EMPFResNet:
    """EM-PF ResNet-19 (TET/TEBN): stem 128, stages of 128/256/512 channels with 3/3/2 blocks."""
    w = _width(width, 128)
    return EMPFResNet(
        (3, 3, 2),
        (w, 2 * w, 4 * w),
        w,
        in_shape=in_shape,
        num_classes=num_classes,
        T=T,
        **options,
    )
