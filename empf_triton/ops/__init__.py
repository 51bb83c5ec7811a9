"""Public ops: validation, impl choice and autograd wrappers over kernels/ and reference/."""
