"""Triton kernels and their launchers (installed as `empf_triton.kernels`).

Import lazily, from `empf_triton.ops` only: importing this package imports triton, and Triton
decides interpreter-or-GPU at that moment from `TRITON_INTERPRET`.
"""
