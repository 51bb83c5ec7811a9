"""Small EM-PF nets for the embedded data sets: `mnist1d_cnn` (1-D conv net) and `digits_mlp`.

Both follow the model contract of `empf_triton.models`: attributes `T` and `num_classes`; in step
mode "s" a call maps x [N, *in_shape] to logits [N, num_classes] and advances every neuron one step;
in step mode "m" it maps [T, N, *in_shape] to [T, N, num_classes]. The same weights serve both.

Layout (docs/model.md, pre-activation): a full-precision stem `BN(conv(x))` with no neuron after it,
then blocks `BN(binary_conv(neuron(x)))`, and a full-precision classifier on the last spikes. The
1-D signal runs as a 2-D map [N, C, 1, L] so the binary synapses (`BinaryConv2d`) and 2-D helpers
(SECA, Mem-BN) apply unchanged. `neuron="lif"` puts LIF neurons (the baseline) in every neuron's
place (see `empf_triton.models.layers.check_neuron_options`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..nn.binary import BinaryConv2d
from .layers import (
    NeuronFactory,
    SeqToANN,
    SpikingModel,
    check_flag,
    check_weight_bits,
    linear,
)

__all__ = ["SMALL_MODELS", "DigitsMLP", "MNIST1DCNN", "digits_mlp", "mnist1d_cnn"]


def _factory(T: int, **kw) -> NeuronFactory:
    spike_bits = kw.get("spike_bits")
    if spike_bits is not None and (
        isinstance(spike_bits, bool) or not isinstance(spike_bits, int) or not 1 <= spike_bits <= 8
    ):
        raise ValueError(f"spike_bits must be None or an int in 1..8, got {spike_bits!r}")
    return NeuronFactory(T, **kw)


class MNIST1DCNN(SpikingModel):
    """1-D EM-PF conv net for MNIST-1D signals x [N, 1, L] (one step) or [T, N, 1, L].

    stem: full-precision conv (kernel 5) + BN, no neuron after it (docs/model.md); then one block
    per width after the first, `neuron -> binary conv (kernel 3) -> BN [-> SECA] [-> 2x max-pool]`;
    then `neuron -> flatten -> full-precision linear` classifier.

    Args:
        in_shape: (C, L), default (1, 40).
        num_classes: classes.
        T: time steps.
        channels: the stem's width, then each block's width.
        pool_after: 0-based indices of the blocks followed by a 2x max-pool, each naming a
            block (0 .. len(channels) - 2). None (default): blocks 0 and 2, those of them that
            exist.
        weight_bits: 1 (binary), 1.5 (ternary) or 32 (full precision) for the block convs.
        spike_bits, spike_step: k-bit spikes (None = float spikes).
        parallel: make every second block's neuron (blocks 1, 3, ...) a parallel (stateless)
            neuron; needs at least two blocks.
        seca: SECA on each block's current (after BN).
        mem_bn: Mem-BN inside each neuron.
        grad_mode, impl: for the neurons (impl also for the binary layers).
        dropout: dropout before the classifier.
        neuron: "empf" (default) or "lif" (LIF baseline neurons; spike_bits, parallel and
            mem_bn must then stay off).
        tau, v_threshold, surrogate, alpha, detach_reset: the LIF neurons' options (only with
            neuron="lif"; see `empf_triton.models.resnet.EMPFResNet`).
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (1, 40),
        num_classes: int = 10,
        T: int = 4,
        *,
        channels: Sequence[int] = (64, 64, 128, 128),
        pool_after: Sequence[int] | None = None,
        weight_bits: float = 1,
        spike_bits: int | None = None,
        spike_step: float = 0.25,
        parallel: bool = False,
        seca: bool = False,
        mem_bn: bool = False,
        grad_mode: str = "online",
        impl: str = "auto",
        neuron: str = "empf",
        tau: float = 2.0,
        v_threshold: float = 1.0,
        surrogate: str = "sigmoid",
        alpha: float | None = None,
        detach_reset: bool = False,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(T, num_classes, in_shape)
        if len(self.in_shape) != 2:
            raise ValueError(f"mnist1d_cnn: in_shape must be (C, L), got {in_shape!r}")
        channels = _widths("mnist1d_cnn", "channels", channels, 2)
        if pool_after is not None and (
            isinstance(pool_after, (str, bytes)) or not isinstance(pool_after, Sequence)
        ):
            raise TypeError(
                f"mnist1d_cnn: pool_after must be a sequence of block indices, got {pool_after!r}"
            )
        n_blocks = len(channels) - 1
        if pool_after is None:
            pool_after = tuple(i for i in (0, 2) if i < n_blocks)
        for i in pool_after:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_blocks:
                raise ValueError(
                    f"mnist1d_cnn: pool_after holds block indices 0..{n_blocks - 1} (one block "
                    f"per width after the first of channels), got {tuple(pool_after)!r}"
                )
        check_weight_bits(weight_bits)
        neuron_of = _factory(
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
        _check_parallel("mnist1d_cnn", "channels", parallel, n_blocks)
        check_flag("seca", seca)
        C0, L = self.in_shape
        self.stem = SeqToANN(
            nn.Conv2d(C0, channels[0], (1, 5), padding=(0, 2), bias=False),
            nn.BatchNorm2d(channels[0]),
        )
        blocks: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(channels[:-1], channels[1:])):
            blocks.append(neuron_of(cin, parallel=i % 2 == 1))
            conv = _conv1x3(cin, cout, weight_bits, impl)
            blocks.append(SeqToANN(conv, nn.BatchNorm2d(cout)))
            if seca:
                from ..nn.seca import SECA

                blocks.append(SECA(cout))
            if i in pool_after:
                if L < 2:
                    raise ValueError(
                        f"mnist1d_cnn: in_shape {self.in_shape} is too short for the pools of "
                        f"pool_after={tuple(pool_after)} (length {L} before block {i}'s pool)"
                    )
                blocks.append(SeqToANN(nn.MaxPool2d((1, 2))))
                L //= 2
        self.blocks = nn.Sequential(*blocks)
        self.head_neuron = neuron_of(channels[-1])
        self.classifier = SeqToANN(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels[-1] * L, num_classes)
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.unsqueeze(-2))  # [*, C, L] -> [*, C, 1, L]
        x = self.blocks(x)
        return self.classifier(self.head_neuron(x))


def _widths(model: str, name: str, widths: object, least: int) -> tuple[int, ...]:
    """`widths` as a tuple of at least `least` ints >= 1."""
    if isinstance(widths, (str, bytes)) or not isinstance(widths, Sequence):
        raise TypeError(f"{model}: {name} must be a sequence of ints, got {widths!r}")
    if len(widths) < least or any(
        isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in widths
    ):
        raise ValueError(f"{model}: {name} needs >= {least} widths, ints >= 1, got {widths!r}")
    return tuple(widths)


def _check_parallel(model: str, name: str, parallel: bool, n_blocks: int) -> None:
    """parallel=True makes the neurons of blocks 1, 3, ... parallel: refused where there is no
    such block (it would silently change nothing)."""
    if parallel and n_blocks < 2:
        raise ValueError(
            f"{model}: parallel=True makes the neuron of every second block parallel (blocks 1, "
            f"3, ...), and these {name} give {n_blocks} block(s), so nothing would change; give "
            f"{name} 3 or more widths, or leave parallel off"
        )


def _conv1x3(cin: int, cout: int, weight_bits: float, impl: str) -> nn.Module:
    """A bias-free 1 x 3 convolution along the signal (binary/ternary, or fp for 32 bits)."""
    if weight_bits == 32:
        return nn.Conv2d(cin, cout, (1, 3), padding=(0, 1), bias=False)
    return BinaryConv2d(cin, cout, (1, 3), padding=(0, 1), weight_bits=weight_bits, impl=impl)


class DigitsMLP(SpikingModel):
    """MLP for scikit-learn's 8x8 digits: x [N, 64] (one step) or [T, N, 64].

    stem: full-precision linear + BN (no neuron after it); one block per width after the first,
    `neuron -> binary linear -> BN`; then `neuron -> full-precision linear` classifier.

    Args:
        in_shape: (64,) (any shape; flattened).
        hidden: the stem's width, then each block's width.
        other options: as `MNIST1DCNN` (seca is not available: there are no channels), including
            neuron="lif" and the LIF options.
    """

    def __init__(
        self,
        in_shape: Sequence[int] = (64,),
        num_classes: int = 10,
        T: int = 4,
        *,
        hidden: Sequence[int] = (128, 128),
        weight_bits: float = 1,
        spike_bits: int | None = None,
        spike_step: float = 0.25,
        parallel: bool = False,
        seca: bool = False,
        mem_bn: bool = False,
        grad_mode: str = "online",
        impl: str = "auto",
        neuron: str = "empf",
        tau: float = 2.0,
        v_threshold: float = 1.0,
        surrogate: str = "sigmoid",
        alpha: float | None = None,
        detach_reset: bool = False,
    ) -> None:
        super().__init__(T, num_classes, in_shape)
        if check_flag("seca", seca):
            raise ValueError("digits_mlp: seca needs channels and an MLP has none; use seca=False")
        hidden = _widths("digits_mlp", "hidden", hidden, 1)
        check_weight_bits(weight_bits)
        neuron_of = _factory(
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
        _check_parallel("digits_mlp", "hidden", parallel, len(hidden) - 1)
        d_in = 1
        for d in self.in_shape:
            d_in *= d
        self.stem = SeqToANN(
            nn.Flatten(), nn.Linear(d_in, hidden[0], bias=False), nn.BatchNorm1d(hidden[0])
        )
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(hidden[:-1], hidden[1:])):
            blocks.append(neuron_of(a, parallel=i % 2 == 1))
            lin = linear(a, b, bias=False, weight_bits=weight_bits, impl=impl)
            blocks.append(SeqToANN(lin, nn.BatchNorm1d(b)))
        self.blocks = nn.Sequential(*blocks)
        self.head_neuron = neuron_of(hidden[-1])
        self.classifier = SeqToANN(nn.Linear(hidden[-1], num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        return self.classifier(self.head_neuron(x))


def mnist1d_cnn(*, in_shape=(1, 40), num_classes=10, T=4, **options) -> MNIST1DCNN:
    """Registry factory: `MNIST1DCNN(in_shape, num_classes, T, **options)`."""
    return MNIST1DCNN(in_shape, num_classes, T, **options)


def digits_mlp(*, in_shape=(64,), num_classes=10, T=4, **options) -> DigitsMLP:
    """Registry factory: `DigitsMLP(in_shape, num_classes, T, **options)`."""
    return DigitsMLP(in_shape, num_classes, T, **options)


#: The small nets of this file; models/__init__.py adds them to `MODELS`.
SMALL_MODELS: dict[str, Callable[..., nn.Module]] = {
    "mnist1d_cnn": mnist1d_cnn,
    "digits_mlp": digits_mlp,
}
