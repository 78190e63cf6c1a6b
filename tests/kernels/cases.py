"""Small builders shared by the operator tests."""
import contextlib

import pytest
import torch

from hstu_kernels.manager import TritonOperatorManager


def offsets_of(lengths):
    """int64 offsets [B+1] of jagged sequences with these lengths."""
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int64)


def needs_triton(op: str):
    """Skip marker for tests of ``op``'s Triton backend where it cannot run (no CUDA, no interpreter)."""
    ok, why = TritonOperatorManager.availability(op)
    return pytest.mark.skipif(not ok, reason=why)


@contextlib.contextmanager
def deterministic_algorithms():
    """Deterministic mode with uninitialised memory filled with NaN: a kernel that leaves an element
    of its output unwritten shows it."""
    before = torch.are_deterministic_algorithms_enabled()
    fill_before = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)
        torch.utils.deterministic.fill_uninitialized_memory = fill_before
