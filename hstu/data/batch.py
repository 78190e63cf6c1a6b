"""The jagged batch every model consumes: histories as values + offsets, one target per sequence.

Item ids are contiguous in 1..num_items; 0 is padding and never a real item.
Training, validation and test batches have the same shape: a history (the model's input) and
the item that follows it (``targets``). In training the loss is taken at every history position,
each predicting the next history item and the last one predicting ``targets``; in evaluation only
the last position's state is scored against ``targets``.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class JaggedBatch:
    item_ids: torch.Tensor  # int64 [L]   history items, sequences concatenated, oldest first
    timestamps: torch.Tensor  # int64 [L]   Unix seconds of each history item
    seq_offsets: torch.Tensor  # int64 [B+1] sequence b is values[seq_offsets[b]:seq_offsets[b+1]]
    targets: torch.Tensor  # int64 [B]   the item that follows each history
    target_timestamps: torch.Tensor  # int64 [B] when the target happened (the request time at serving)
    user_ids: torch.Tensor  # int64 [B]   contiguous user index
    seen_ids: torch.Tensor | None = None  # int64 [S] eval only: items to mask when ranking (full history)
    seen_offsets: torch.Tensor | None = None  # int64 [B+1] jagged offsets of seen_ids

    @property
    def batch_size(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.item_ids.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "JaggedBatch":
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return replace(self, **moved)

    def pin_memory(self) -> "JaggedBatch":
        return replace(self, **{f.name: getattr(self, f.name).pin_memory() for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)})

    def __len__(self) -> int:
        return self.batch_size
