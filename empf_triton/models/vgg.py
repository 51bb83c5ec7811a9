"""EM-PF VGG-11 for event data (DVS frames, e.g. 2x48x48 or 2x128x128 per step).

Layout (the VGG-11 of the online-training literature on DVS-CIFAR10: OTTT, SLTT, NDOT):
eight 3x3 convolutions `64, 128, M, 256, 256, M, 512, 512, M, 512, 512, M` (M = 2x2 max-pool),
each `conv -> BN [-> SECA] -> EM-PF neuron`, then global average pool and a full-precision linear
classifier. The first convolution (on the raw event frames, which are counts rather than spikes)
is full precision; the other seven are binary/ternary (`weight_bits`). Max-pooling comes after
the neuron, so the next convolution still reads k-bit spikes. With `parallel=True` every second
neuron (the 2nd, 4th, ...) is a parallel neuron.

BatchNorm in training mode sees one step's batch in step mode "s" and T*N samples in mode "m";
see `empf_triton.models.layers`.
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

__all__ = ["EMPFVGG", "VGG11_CFG", "vgg11"]

#: Channels per convolution; "M" is a 2x2 max-pool after the preceding neuron.
VGG11_CFG: tuple[int | str, ...] = (64, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class EMPFVGG(SpikingModel):
    """EM-PF VGG (see the module doc).

    Args:
        cfg: channels per convolution and "M" for pools (`VGG11_CFG` scaled by `width / 64`).
        in_shape: (C, H, W) of one time step (H, W divisible by 2^pools is not required:
            pooling floors and the classifier pools globally).
        num_classes, T, weight_bits, spike_bits, spike_step, parallel, seca, mem_bn, grad_mode,
            impl, step_mode, neuron, tau, v_threshold, surrogate, alpha, detach_reset: as
            `empf_triton.models.resnet.EMPFResNet` (neuron="lif" builds the LIF baseline).

    Shape:
        step mode "s": x [N, C, H, W] -> [N, num_classes]; "m": [T, N, C, H, W] -> [T, N, classes].
    """

    def __init__(
        self,
        cfg: Sequence[int | str],
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
    ) -> None:
        super().__init__(T, num_classes, in_shape, step_mode)
        if len(self.in_shape) != 3:
            raise ValueError(f"vgg11 needs in_shape (C, H, W), got {self.in_shape}")
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
        features: list[nn.Module] = []
        cin, n_conv = C, 0
        for item in cfg:
            if item == "M":
                if min(H, W) < 2:
                    raise ValueError(f"vgg11: in_shape {self.in_shape} is too small to pool")
                features.append(SeqToANN(nn.MaxPool2d(2)))
                H, W = H // 2, W // 2
                continue
            bits = 32 if n_conv == 0 else weight_bits
            features.append(
                SeqToANN(
                    conv2d(cin, item, 3, 1, 1, weight_bits=bits, impl=impl), nn.BatchNorm2d(item)
                )
            )
            if seca:
                features.append(SECA(item))
            features.append(neuron(item, parallel=n_conv % 2 == 1))
            cin, n_conv = item, n_conv + 1
        self.features = nn.Sequential(*features)
        self.classifier = SeqToANN(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)
        )
        set_step_mode(self, step_mode)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@register_model("vgg11")
def vgg11(
    *, in_shape=(2, 48, 48), num_classes: int = 10, T: int = 10, width: int | None = None, **options
) -> EMPFVGG:
    """EM-PF VGG-11 for event frames; `width` is the first layer's channels (default 64; all
    layers scale with it). Other options: `EMPFVGG`."""
    if width is None:
        width = 64
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise ValueError(f"width must be an int >= 1, got {width!r}")
    cfg = tuple(c if c == "M" else max(1, c * width // 64) for c in VGG11_CFG)
    return EMPFVGG(cfg, in_shape=in_shape, num_classes=num_classes, T=T, **options)
