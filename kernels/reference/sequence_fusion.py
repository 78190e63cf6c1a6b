"""Reference of the HSTU input stage: item embedding * scale + position embedding + multi-scale time
embeddings, then dropout, over jagged sequences (values + ``seq_offsets``, no padding).

Every token finds its sequence with one ``searchsorted`` over the offsets (``hstu_kernels.jagged``), so there is no Python loop
over sequences, zero-length sequences need no special case, and shapes never depend on data (friendly
to ``torch.compile``). Lookups go through ``F.embedding``, whose backward accumulates rows with a
scatter-add rather than a per-element autograd graph.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from hstu_kernels.dropout import dropout
from hstu_kernels.jagged import token_positions


def time_scale_buckets(
    timestamps: torch.Tensor, last_token: torch.Tensor, width_seconds: int, num_buckets: int
) -> torch.Tensor:
    """min(floor((t_last - t) / width), num_buckets - 1) in int64; an event after its sequence's last falls in bucket 0."""
    age = (timestamps[last_token] - timestamps).clamp_min(0)
    return torch.div(age, width_seconds, rounding_mode="floor").clamp_max(num_buckets - 1)


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
    seed: int | torch.Tensor | None = None,
    position_from_end: bool = False,
) -> torch.Tensor:
    """[L, D]: item_table[id] * scale + pos_table[p] + sum_s time_tables[s][bucket_s(t_last - t)], then dropout.

    p counts from the sequence's first token (or its most recent one with ``position_from_end``);
    bucket_s = min(floor((t_last - t) / width_s), n_s - 1) for ``time_scales[s] = (width_s, n_s)``, with
    t_last the sequence's last timestamp. ``seed`` as in ``attention_output`` (None: torch's RNG).
    Inputs are checked by ``hstu_kernels.sequence_fusion``.
    """
    position, last_token = token_positions(seq_offsets, item_ids.shape[0], position_from_end)
    fused = F.embedding(item_ids, item_table) * scale + F.embedding(position, pos_table)
    for (width, num_buckets), table in zip(time_scales, time_tables):
        fused = fused + F.embedding(time_scale_buckets(timestamps, last_token, width, num_buckets), table)
    return dropout(fused, dropout_p, training, seed)
