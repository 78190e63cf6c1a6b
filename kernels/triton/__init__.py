"""Triton backends: one module per operator (jit kernels -> launcher -> torch.library custom op)."""
