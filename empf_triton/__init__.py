"""empf_triton: Triton kernels for EM-PF spiking neural networks."""

__version__ = "0.1.0"
