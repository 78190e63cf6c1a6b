"""PyTorch references of the five operators: the source of truth; any device, autograd through float inputs.

Module names match the Triton modules (``hstu_kernels.triton.<module>``) and function names match the
public functions; the registry (``hstu_kernels.registry``) maps operators to them.
"""
