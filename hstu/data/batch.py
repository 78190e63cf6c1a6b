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
    token_mask: torch.Tensor | None = None  # bool [L] packed batches only: True for real tokens (hstu.data.packing)
    extent: tuple[int, int] | None = None  # (longest sequence, largest id), read by check()

    def check(self, max_seq_len: int, num_items: int) -> "JaggedBatch":
        """The batch with its ``extent``, or a ValueError naming the field that breaks the layout
        or the limits. The first call reads a few numbers back from the batch's device (free on the
        CPU, where the data loader calls it); later calls only compare the recorded extent, so the
        model can check every batch without waiting for the GPU.
        """
        batch = self if self.extent is not None else self._read_extent()
        longest, highest = batch.extent
        if longest > max_seq_len:
            raise ValueError(f"JaggedBatch.seq_offsets: a sequence of {longest} items exceeds max_seq_len={max_seq_len}")
        if highest > num_items:
            raise ValueError(f"JaggedBatch.{self._id_fields()}: ids must lie in [0, {num_items}]; the largest is {highest}")
        return batch

    def _read_extent(self) -> "JaggedBatch":
        num_tokens, batch_size = self.item_ids.shape[0], self.seq_offsets.shape[0] - 1
        for name, t, size in (("timestamps", self.timestamps, num_tokens), ("targets", self.targets, batch_size),
                              ("target_timestamps", self.target_timestamps, batch_size),
                              ("user_ids", self.user_ids, batch_size)):
            if t.shape != (size,):
                raise ValueError(f"JaggedBatch.{name}: expected shape ({size},), got {tuple(t.shape)}")
        if (self.seen_ids is None) != (self.seen_offsets is None):
            raise ValueError("JaggedBatch.seen_ids/seen_offsets: give both or neither")
        seen = self.seen_ids is not None
        if seen and (self.seen_ids.dim() != 1 or self.seen_offsets.shape != (batch_size + 1,)):
            raise ValueError(f"JaggedBatch.seen_ids/seen_offsets: expected shapes (S,) and ({batch_size + 1},), "
                             f"got {tuple(self.seen_ids.shape)} and {tuple(self.seen_offsets.shape)}")
        none = torch.zeros((), dtype=torch.int64, device=self.seq_offsets.device)
        ids = torch.cat([self.item_ids, self.targets, *([self.seen_ids] if seen else [])]).long()
        layouts = [("seq_offsets", self.seq_offsets, num_tokens)]
        if seen:
            layouts.append(("seen_offsets", self.seen_offsets, self.seen_ids.shape[0]))
        # per offsets tensor: first, last, shortest, longest (0 and 0 for an empty batch); then the id range
        values = torch.stack([value for _, offsets, _ in layouts for lengths in [offsets[1:] - offsets[:-1]]
                              for value in (offsets[0].long(), offsets[-1].long(),
                                            lengths.min().long() if batch_size else none,
                                            lengths.max().long() if batch_size else none)]
                             + [ids.min() if ids.numel() else none, ids.max() if ids.numel() else none])
        *extents, lowest, highest = values.tolist()  # the one host read
        for index, (name, _, size) in enumerate(layouts):
            first, last, shortest, _ = extents[4 * index:4 * index + 4]
            if first != 0 or last != size or shortest < 0:
                raise ValueError(f"JaggedBatch.{name}: must start at 0, end at {size} and not decrease; "
                                 f"got first {first}, last {last}, shortest sequence {shortest}")
        if lowest < 0:
            raise ValueError(f"JaggedBatch.{self._id_fields()}: ids must be >= 0; the smallest is {lowest}")
        return replace(self, extent=(extents[3], highest))

    def _id_fields(self) -> str:
        return "item_ids/targets" + ("/seen_ids" if self.seen_ids is not None else "")

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
