"""Thin nn.Modules over the ops."""

from .membn import MemBN
from .neuron import EMPFNeuron, LIFNeuron, StatefulNeuron, detach_net, reset_net
from .seca import SECA

__all__ = ["EMPFNeuron", "LIFNeuron", "MemBN", "SECA", "StatefulNeuron", "detach_net", "reset_net"]
