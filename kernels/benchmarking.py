"""Seeded inputs for the operators' benchmark cases (``BenchSpec.build``), shared by every operator.

Values are drawn on the CPU from a seeded generator and then moved, so every device and every process
(the peer runs in a child process) sees the same inputs.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch


class ProviderUnavailable(Exception):
    """A benchmark provider cannot run this case; the message is the reason shown in the table."""


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_values(g: torch.Generator, *shape, dtype, device, scale=0.5, requires_grad=True) -> torch.Tensor:
    """Seeded normal values drawn on the CPU (identical on every device and in every process)."""
    x = (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


def jagged_lengths(g: torch.Generator, batch: int, max_len: int) -> torch.Tensor:
    """Uniform lengths in [0.5N, N] for N <= 1024 and in [0.9N, N] above."""
    low = math.ceil((0.5 if max_len <= 1024 else 0.9) * max_len)
    return torch.randint(low, max_len + 1, (batch,), generator=g)


def offsets_of(lengths: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)


def increasing_timestamps(g: torch.Generator, lengths: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_timestamps, k_timestamps) int64: per sequence, event times with log-spread gaps; q = next event."""
    count = int(lengths.sum()) + len(lengths)
    magnitude = torch.pow(10.0, torch.randint(0, 7, (count,), generator=g).double())
    gaps = (torch.rand(count, generator=g, dtype=torch.float64) * magnitude).to(torch.int64)
    q_parts, k_parts, start = [], [], 0
    for n in lengths.tolist():
        times = 1_700_000_000 + gaps[start:start + n + 1].cumsum(0)
        k_parts.append(times[:n])
        q_parts.append(times[1:])
        start += n + 1
    return torch.cat(q_parts).to(device), torch.cat(k_parts).to(device)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


def triton_function(op: str, function: str, tensors: Sequence[torch.Tensor]) -> Callable:
    """The Triton function itself (no input checks), or ProviderUnavailable with the manager's reason."""
    from hstu_kernels.manager import TritonOperatorManager, resolve_function

    reason = TritonOperatorManager.unsupported_reason(op, tensors)
    if reason is not None:
        raise ProviderUnavailable(reason)
    return resolve_function(op, function, "triton")
