"""Thin nn.Modules over the ops."""

from .binary import BinaryConv2d, BinaryLinear, PackedLayerTrainingError, frozen_weights
from .membn import MemBN
from .neuron import EMPFNeuron, LIFNeuron, StatefulNeuron, detach_net, reset_net
from .seca import SECA

__all__ = [
    "BinaryConv2d",
    "BinaryLinear",
    "EMPFNeuron",
    "LIFNeuron",
    "MemBN",
    "PackedLayerTrainingError",
    "SECA",
    "StatefulNeuron",
    "detach_net",
    "frozen_weights",
    "reset_net",
]
