"""Inductor's GPU ``searchsorted`` over a sliced boundary tensor, emulated on the CPU.

Inductor's Triton lowering of ``searchsorted`` / ``bucketize`` in torch 2.11 names a boundary tensor
that is a view by its underlying buffer and drops the view's storage offset, so inside a compiled
graph ``searchsorted(offsets[1:], t)`` searches ``offsets[:-1]`` (pytorch/pytorch#160964, fixed
upstream by #184043). Inductor's CPU backend does not lower ``searchsorted`` (it calls ATen), so a CPU
compile cannot show it; this mode runs eager code with the same reading of every boundary tensor.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
# op -> position of its boundary tensor
BOUNDARY_ARGUMENT = {aten.searchsorted.Tensor: 0, aten.searchsorted.Scalar: 0, aten.bucketize.Tensor: 1}


class SearchsortedDroppingViewOffsets(TorchDispatchMode):
    """Every ``searchsorted`` / ``bucketize`` reads its boundaries from their storage's start."""

    def __init__(self):
        super().__init__()
        self.shifted = 0  # calls whose boundaries had a storage offset

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        position = BOUNDARY_ARGUMENT.get(func)
        if position is not None and args[position].storage_offset():
            boundaries = args[position]
            args = list(args)
            args[position] = boundaries.as_strided(boundaries.shape, boundaries.stride(), 0)
            self.shifted += 1
        return func(*args, **kwargs)
