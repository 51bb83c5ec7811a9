"""Public ops: validation, implementation choice and autograd wrappers over kernels/ and reference/."""
