"""Thin nn.Modules over the ops."""

from .neuron import EMPFNeuron, LIFNeuron, StatefulNeuron, detach_net, reset_net

__all__ = ["EMPFNeuron", "LIFNeuron", "StatefulNeuron", "detach_net", "reset_net"]
