"""Reference of the HSTU input stage: item embedding * scale + position embedding + multi-scale time
embeddings, then dropout, over jagged sequences (values + ``seq_offsets``, no padding).

Every token finds its sequence with one ``searchsorted`` over the offsets, so there is no Python loop
over sequences, zero-length sequences need no special case, and shapes never depend on data (friendly
to ``torch.compile``). Lookups go through ``F.embedding``, whose backward accumulates rows with a
scatter-add rather than a per-element autograd graph.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from hstu_kernels.reference.attention_output import dropout


def token_positions(seq_offsets: torch.Tensor, num_tokens: int, from_end: bool = False):
    """(position in its sequence [L], index of its sequence's last token [L]) of every token, int64.

    Position 0 is the oldest token, or the most recent one when ``from_end``.
    """
    offsets = seq_offsets.to(torch.int64)
    token = torch.arange(num_tokens, dtype=torch.int64, device=offsets.device)
    # Sequence b holds tokens offsets[b] <= t < offsets[b+1]: count the ends at or before t.
    sequence = torch.searchsorted(offsets[1:], token, right=True)
    start = offsets[sequence]
    last = offsets[sequence + 1] - 1
    position = last - token if from_end else token - start
    return position, last


def time_scale_buckets(
    timestamps: torch.Tensor, last_token: torch.Tensor, width_seconds: int, num_buckets: int
) -> torch.Tensor:
    """min(floor((t_last - t) / width), num_buckets - 1) in int64; an event after its sequence's last falls in bucket 0."""
    age = (timestamps[last_token] - timestamps).clamp_min(0)
    return torch.div(age, width_seconds, rounding_mode="floor").clamp_max(num_buckets - 1)


def _check_inputs(item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, time_scales, validate):
    if item_ids.dim() != 1 or item_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sequence_fusion: item_ids must be a 1-D integer tensor [L]; got {item_ids.dtype} {tuple(item_ids.shape)}")
    if timestamps.shape != item_ids.shape or timestamps.dtype != torch.int64:
        raise ValueError(
            f"sequence_fusion: timestamps must be int64 [L={item_ids.shape[0]}] (seconds, differences taken in int64); "
            f"got {timestamps.dtype} {tuple(timestamps.shape)}"
        )
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError("sequence_fusion: seq_offsets must be a 1-D int32/int64 tensor [B+1]")
    if item_table.dim() != 2 or pos_table.dim() != 2 or pos_table.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"sequence_fusion: item_table [N, D] and pos_table [max_seq_len, D] must share D; "
            f"got {tuple(item_table.shape)} and {tuple(pos_table.shape)}"
        )
    if len(time_tables) != len(time_scales):
        raise ValueError(f"sequence_fusion: {len(time_tables)} time_tables for {len(time_scales)} time_scales")
    for s, ((width, num_buckets), table) in enumerate(zip(time_scales, time_tables)):
        if width <= 0 or num_buckets <= 0:
            raise ValueError(f"sequence_fusion: time_scales[{s}] = ({width}, {num_buckets}) needs width > 0 and buckets > 0")
        if table.shape != (num_buckets, item_table.shape[1]):
            raise ValueError(
                f"sequence_fusion: time_tables[{s}] must be [{num_buckets}, {item_table.shape[1]}]; got {tuple(table.shape)}"
            )
    if not validate or torch.compiler.is_compiling():  # the checks below wait for the GPU
        return
    if int(seq_offsets[0]) != 0 or int(seq_offsets[-1]) != item_ids.shape[0]:
        raise ValueError(f"sequence_fusion: seq_offsets must start at 0 and end at L={item_ids.shape[0]}")
    lengths = seq_offsets[1:] - seq_offsets[:-1]
    if lengths.numel() and int(lengths.min()) < 0:
        raise ValueError("sequence_fusion: seq_offsets must be non-decreasing")
    if lengths.numel() and int(lengths.max()) > pos_table.shape[0]:
        raise ValueError(
            f"sequence_fusion: a sequence of length {int(lengths.max())} exceeds pos_table's {pos_table.shape[0]} positions"
        )
    if item_ids.numel() and (int(item_ids.min()) < 0 or int(item_ids.max()) >= item_table.shape[0]):
        raise ValueError(
            f"sequence_fusion: item ids must lie in [0, {item_table.shape[0]}); got [{int(item_ids.min())}, {int(item_ids.max())}]"
        )


def sequence_fusion(
    item_ids: torch.Tensor,
    timestamps: torch.Tensor,
    seq_offsets: torch.Tensor,
    item_table: torch.Tensor,
    pos_table: torch.Tensor,
    time_tables: Sequence[torch.Tensor],
    *,
    scale: float,
    time_scales: Sequence[tuple[int, int]],
    dropout_p: float,
    training: bool,
    seed: int | None = None,
    position_from_end: bool = False,
    validate: bool = True,
) -> torch.Tensor:
    """[L, D]: item_table[id] * scale + pos_table[p] + sum_s time_tables[s][bucket_s(t_last - t)], then dropout.

    p counts from the sequence's first token (or its most recent one with ``position_from_end``);
    bucket_s = min(floor((t_last - t) / width_s), n_s - 1) for ``time_scales[s] = (width_s, n_s)``, with
    t_last the sequence's last timestamp. ``seed`` as in ``attention_output`` (None: torch's RNG).
    ``validate=False`` skips the checks of offsets and ids that read values back from the device.
    """
    _check_inputs(item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, time_scales, validate)
    position, last_token = token_positions(seq_offsets, item_ids.shape[0], position_from_end)
    fused = F.embedding(item_ids, item_table) * scale + F.embedding(position, pos_table)
    for (width, num_buckets), table in zip(time_scales, time_tables):
        fused = fused + F.embedding(time_scale_buckets(timestamps, last_token, width, num_buckets), table)
    return dropout(fused, dropout_p, training, seed)
