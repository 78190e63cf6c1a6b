"""Index helpers for jagged (values + offsets) sequences; vectorised, torch.compile friendly."""
from __future__ import annotations

import torch


def segment_ids(seq_offsets: torch.Tensor, total: int) -> torch.Tensor:
    """[L] index of the sequence each value belongs to."""
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=seq_offsets.device), lengths, output_size=total)


def positions(seq_offsets: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """[L] position of each value inside its sequence, 0 = oldest."""
    return torch.arange(seg.numel(), device=seg.device) - seq_offsets[seg]


def last_index(seq_offsets: torch.Tensor) -> torch.Tensor:
    """[B] index of each sequence's last value (clamped to 0 for empty sequences)."""
    return (seq_offsets[1:] - 1).clamp(min=0)


def next_in_sequence(values: torch.Tensor, seq_offsets: torch.Tensor, last_values: torch.Tensor) -> torch.Tensor:
    """values shifted one step left inside each sequence, each sequence's last slot taking last_values[b].

    Gives the next-item targets and the query timestamps t_q(i) of the HSTU time bias. No boolean
    indexing, so shapes stay symbolic under torch.compile.
    """
    seg = segment_ids(seq_offsets, values.shape[0])
    is_last = torch.arange(values.shape[0], device=values.device) == seq_offsets[1:][seg] - 1
    return torch.where(is_last, last_values[seg], torch.roll(values, -1))


def to_padded(values: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, batch_size: int, max_len: int) -> torch.Tensor:
    """[L, ...] -> [B, max_len, ...], zeros where padded."""
    out = values.new_zeros((batch_size, max_len) + tuple(values.shape[1:]))
    return out.index_put((seg, pos), values)
