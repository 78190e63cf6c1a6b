"""Static-shape training batches: the data on the device, each batch packed into a fixed token capacity.

A CUDA graph replays fixed shapes, while a jagged batch of B sequences holds a different number of
tokens L every step. So a batch is laid out in C >= L token slots, C the smallest multiple of
``bucket_tokens`` that holds it (a handful of capacities, hence of captured graphs, per dataset).
The C - L padding tokens form ``num_dummy`` dummy sequences of at most ``dummy_len`` tokens after the
real ones, so ``seq_offsets`` always has B + num_dummy + 1 entries and no dummy is longer than the
model's ``max_seq_len`` (the attention grid covers only that many query rows per sequence). Padding
tokens carry item 0 and timestamp 0; ``token_mask`` marks the real ones, and the loss leaves the rest
out with ``torch.where``. A batch with fewer than B examples (an epoch's last) gets empty rows.

Everything the host decides (which examples, which capacity) comes from host-side lengths before the
epoch starts; everything on the device (gathering each user's last ``max_seq_len`` events, targets,
offsets) has static shapes and reads nothing back, so the whole assembly runs inside a captured graph.
The sequences live on the device when they fit (ML-1M: 1M events, 16 MB); the same code runs on the
CPU, where tests compare it with the CPU loader's batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from hstu_kernels.jagged import sequence_index

from .batch import JaggedBatch
from .sequences import Examples, UserSequences


@dataclass(frozen=True)
class PackingLayout:
    """How batches are packed: B example rows, capacities in steps of ``bucket_tokens``, dummy sequences."""

    batch_size: int
    max_seq_len: int
    bucket_tokens: int

    def __post_init__(self):
        for name in ("batch_size", "max_seq_len", "bucket_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"packing: {name} must be >= 1, got {getattr(self, name)}")

    @property
    def dummy_len(self) -> int:
        return min(self.max_seq_len, self.bucket_tokens)

    @property
    def num_dummy(self) -> int:
        """Dummy sequences that hold the most padding a capacity can leave (< bucket_tokens, or a whole
        bucket for an empty batch)."""
        return math.ceil(self.bucket_tokens / self.dummy_len)

    def capacity(self, real_tokens: int) -> int:
        """The smallest multiple of ``bucket_tokens`` (at least one) that holds ``real_tokens``."""
        return max(1, math.ceil(real_tokens / self.bucket_tokens)) * self.bucket_tokens


@dataclass
class PlannedBatch:
    """One training step as the host plans it: B example rows (user, target position; position 0 marks an
    empty row) and the capacity its tokens are packed into. ``batch_size`` and ``num_tokens`` count the
    real sequences and tokens, so throughput never counts padding."""

    users: torch.Tensor  # int64 [B]
    target_positions: torch.Tensor  # int64 [B]; 0 for empty rows
    capacity: int
    batch_size: int
    num_tokens: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PlannedBatch":
        return replace(self, users=self.users.to(device, non_blocking=non_blocking),
                       target_positions=self.target_positions.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "PlannedBatch":
        return replace(self, users=self.users.pin_memory(), target_positions=self.target_positions.pin_memory())

    def __len__(self) -> int:
        return self.batch_size


class PlanCollate:
    """The DataLoader's collate for device-side batches: example numbers -> :class:`PlannedBatch`, host-side
    numpy only (a class, not a closure, so loader workers can pickle it). Fewer than B examples (an epoch's
    last batch) leave empty rows."""

    def __init__(self, examples: Examples, layout: PackingLayout):
        self.examples = examples
        self.layout = layout

    def __call__(self, indices: list[int]) -> PlannedBatch:
        rows = self.layout.batch_size
        if len(indices) > rows:
            raise ValueError(f"packing: a batch of {len(indices)} examples exceeds batch_size={rows}")
        chosen = np.asarray(indices, dtype=np.int64)
        users = np.zeros(rows, dtype=np.int64)
        positions = np.zeros(rows, dtype=np.int64)
        users[:len(chosen)] = self.examples.users[chosen]
        positions[:len(chosen)] = self.examples.target_positions[chosen]
        tokens = int(np.minimum(positions, self.layout.max_seq_len).sum())
        return PlannedBatch(torch.from_numpy(users), torch.from_numpy(positions), self.layout.capacity(tokens),
                            len(chosen), tokens)


@dataclass
class DeviceSequences:
    """Every user's events as tensors on one device (``UserSequences`` moved as they are)."""

    item_ids: torch.Tensor  # int64 [N]
    timestamps: torch.Tensor  # int64 [N]
    offsets: torch.Tensor  # int64 [U+1]
    num_items: int

    @classmethod
    def from_sequences(cls, sequences: UserSequences, device: torch.device | str) -> "DeviceSequences":
        return cls(torch.from_numpy(sequences.item_ids).to(device), torch.from_numpy(sequences.timestamps).to(device),
                   torch.from_numpy(sequences.offsets).to(device), sequences.num_items)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.item_ids, self.timestamps, self.offsets))


def pack_batch(sequences: DeviceSequences, users: torch.Tensor, target_positions: torch.Tensor, capacity: int,
               layout: PackingLayout) -> JaggedBatch:
    """The packed batch of ``users`` / ``target_positions`` (on the sequences' device) with ``capacity``
    token slots: real sequences first, then ``layout.num_dummy`` dummy ones. Static shapes, no host read;
    the caller guarantees capacity - real tokens <= num_dummy * dummy_len (``PackingLayout.capacity`` does)."""
    device = users.device
    rows, num_dummy = users.shape[0], layout.num_dummy
    begin = sequences.offsets[users]
    target_index = begin + target_positions
    lengths = target_positions.clamp(max=layout.max_seq_len)
    real_offsets = F.pad(lengths.cumsum(0), (1, 0))
    real_tokens = real_offsets[-1]
    seq_offsets = torch.cat([real_offsets, _dummy_offsets(real_tokens, capacity, layout)])

    token = torch.arange(capacity, device=device)
    is_real = token < real_tokens
    row = sequence_index(real_offsets, capacity).clamp(max=rows - 1)
    source = torch.where(is_real, target_index[row] - lengths[row] + token - real_offsets[row], 0)
    has_target = target_positions > 0
    no_dummy = torch.zeros(num_dummy, dtype=torch.int64, device=device)
    return JaggedBatch(
        item_ids=torch.where(is_real, sequences.item_ids[source], 0),
        timestamps=torch.where(is_real, sequences.timestamps[source], 0),
        seq_offsets=seq_offsets,
        targets=torch.cat([torch.where(has_target, sequences.item_ids[target_index], 0), no_dummy]),
        target_timestamps=torch.cat([torch.where(has_target, sequences.timestamps[target_index], 0), no_dummy]),
        user_ids=torch.cat([users, no_dummy - 1]),
        token_mask=is_real,
        extent=(layout.max_seq_len, sequences.num_items),
    )


def _dummy_offsets(real_tokens: torch.Tensor, capacity: int, layout: PackingLayout) -> torch.Tensor:
    """Ends of the dummy sequences that fill ``capacity - real_tokens`` padding tokens (on the device)."""
    steps = torch.arange(layout.num_dummy, device=real_tokens.device) * layout.dummy_len
    return real_tokens + (capacity - real_tokens - steps).clamp(0, layout.dummy_len).cumsum(0)


class StaticJaggedInput:
    """Device buffers a captured step reads when its batches come as ``JaggedBatch`` (the CPU loader's,
    or any caller's): each step copies its batch in (shapes are known on the host), and
    :meth:`packed` builds the packed batch of one capacity from views of the buffers, in the graph."""

    def __init__(self, layout: PackingLayout, num_items: int, device: torch.device):
        rows, tokens = layout.batch_size, layout.capacity(layout.batch_size * layout.max_seq_len)
        self.layout, self.num_items = layout, num_items
        self.item_ids = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.timestamps = torch.zeros(tokens, dtype=torch.int64, device=device)
        self.real_offsets = torch.zeros(rows + 1, dtype=torch.int64, device=device)
        self.targets = torch.zeros(rows, dtype=torch.int64, device=device)
        self.target_timestamps = torch.zeros(rows, dtype=torch.int64, device=device)
        self.user_ids = torch.zeros(rows, dtype=torch.int64, device=device)
        self.real_tokens = torch.zeros((), dtype=torch.int64, device=device)

    def fill(self, batch: JaggedBatch) -> int:
        """Check ``batch`` (free when its loader checked it), copy it in (padding rows and tokens zeroed)
        and return the capacity it needs."""
        batch.check(self.layout.max_seq_len, self.num_items)
        tokens, rows = batch.num_tokens, batch.batch_size
        if rows > self.layout.batch_size:
            raise ValueError(f"packing: a batch of {rows} sequences exceeds batch_size={self.layout.batch_size}")
        for buffer, values, used in ((self.item_ids, batch.item_ids, tokens), (self.timestamps, batch.timestamps, tokens),
                                     (self.targets, batch.targets, rows),
                                     (self.target_timestamps, batch.target_timestamps, rows),
                                     (self.user_ids, batch.user_ids, rows)):
            buffer[:used].copy_(values, non_blocking=True)
            buffer[used:].zero_()
        self.real_offsets[:rows + 1].copy_(batch.seq_offsets, non_blocking=True)
        self.real_offsets[rows + 1:].fill_(tokens)
        self.real_tokens.fill_(tokens)
        return self.layout.capacity(tokens)

    def packed(self, capacity: int) -> JaggedBatch:
        no_dummy = torch.zeros(self.layout.num_dummy, dtype=torch.int64, device=self.item_ids.device)
        return JaggedBatch(
            item_ids=self.item_ids[:capacity],
            timestamps=self.timestamps[:capacity],
            seq_offsets=torch.cat([self.real_offsets, _dummy_offsets(self.real_tokens, capacity, self.layout)]),
            targets=torch.cat([self.targets, no_dummy]),
            target_timestamps=torch.cat([self.target_timestamps, no_dummy]),
            user_ids=torch.cat([self.user_ids, no_dummy - 1]),
            token_mask=torch.arange(capacity, device=self.item_ids.device) < self.real_tokens,
            extent=(self.layout.max_seq_len, self.num_items),
        )


def unpacked(batch: JaggedBatch, real_sequences: int) -> JaggedBatch:
    """The real part of a packed batch (host reads: for tests and debugging, never in the step)."""
    real_tokens = int(batch.seq_offsets[real_sequences])
    per_token = {"item_ids", "timestamps"}
    per_sequence = {"targets", "target_timestamps", "user_ids"}
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if f.name in per_token:
            value = value[:real_tokens]
        elif f.name in per_sequence:
            value = value[:real_sequences]
        elif f.name == "seq_offsets":
            value = value[:real_sequences + 1]
        values[f.name] = value
    values.update(token_mask=None, extent=None)
    return JaggedBatch(**values)
