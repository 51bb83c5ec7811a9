"""EM-PF network models and their registry.

Every model is an `nn.Module` with attributes `T` and `num_classes` whose spiking neurons are
`empf_triton.nn.StatefulNeuron`s: EM-PF neurons by default, or the LIF baseline with
`neuron="lif"` (options `tau`, `v_threshold`, `surrogate`, `alpha`, `detach_reset`; see
`layers.check_neuron_options` for which options go with which neuron).

Step mode "s": x `[N, *in_shape]` -> logits `[N, num_classes]`
(one time step); step mode "m": x `[T, N, *in_shape]` -> logits `[T, N, num_classes]`. The same
weights work in both; switch with `set_step_mode(model, mode)` and the neurons' gradient mode with
`set_grad_mode(model, "online" | "bptt")`. Reset the neurons between samples with
`empf_triton.reset_net(model)`.

`build_model(name, in_shape=..., num_classes=..., T=..., **options)` builds a registered model
(`MODELS`): resnet18, resnet19, resnet34 (resnet.py), vgg11 (vgg.py) and the small nets of
small.py.
"""

from . import layers, resnet, small, vgg
from .layers import (
    MODELS,
    SeqToANN,
    SpikingModel,
    build_model,
    check_neuron_options,
    count_parameters,
    register_model,
    set_grad_mode,
    set_step_mode,
)
from .resnet import resnet18, resnet19, resnet34
from .vgg import vgg11

MODELS.update(small.SMALL_MODELS)

__all__ = [
    "MODELS",
    "SeqToANN",
    "SpikingModel",
    "build_model",
    "check_neuron_options",
    "count_parameters",
    "layers",
    "register_model",
    "resnet",
    "resnet18",
    "resnet19",
    "resnet34",
    "set_grad_mode",
    "set_step_mode",
    "small",
    "vgg",
    "vgg11",
]
