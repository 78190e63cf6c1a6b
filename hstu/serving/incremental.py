"""Incremental HSTU inference: the states of new positions, given the cached keys and values of earlier ones.

An STU block mixes positions only in its attention; everything else (LayerNorm, the u/v/q/k
projection, the output) is per position. So when a history of n events, whose positions 0..n-2
were computed before, gains m events, positions n-1..n+m-1 are computed alone, block by block:
their projections, then ``hstu_kernels.hstu_attention_delta`` of their queries against the cached
keys and values plus their own, then the block output. Position n-1 is among them because its
query time (the time of the next event, or the request time for the last position) changed.
Relative position and time biases stay exact: positions are absolute window positions and every
key keeps its own timestamp. What the attention derives from the offsets and timestamps alone (padded
rows, bias indices, causal mask: ``hstu_kernels.AttentionLayout``) is built once per batch and shared
by the blocks, where the attention runs on the PyTorch reference (the Triton kernels compute their
indices in-kernel).

Configurations where a new event changes every position's input cannot be served this way (see
:func:`unsupported_reason`). Dropout is off: the model is in eval mode.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import hstu_kernels
from hstu.model.hstu import HSTUEncoder
from hstu_kernels.ops.hstu_attention import KEY as ATTENTION_OP
from hstu.model.recommender import SequentialRecommender


def unsupported_reason(model: SequentialRecommender) -> str | None:
    """Why this model's histories cannot be computed incrementally (None: they can)."""
    if not isinstance(model.encoder, HSTUEncoder):
        return f"{type(model.encoder).__name__} has no incremental path (HSTU encoders only)"
    if model.embedding.time_scales:
        return "time_scales: every position's embedding depends on the latest event's time"
    if model.embedding.position_from_end:
        return "position_from_end: every position moves when an event arrives"
    return None


@dataclass
class DeltaBatch:
    """New tokens of B users (jagged by ``seq_offsets``) and their cached prefixes (jagged by ``cached_offsets``)."""

    item_ids: torch.Tensor  # int64 [M]
    timestamps: torch.Tensor  # int64 [M] each new token's event time (its key time)
    positions: torch.Tensor  # int64 [M] window positions, n_b .. n_b + m_b - 1
    query_timestamps: torch.Tensor  # int64 [M] the next event's time; the request time for a user's last token
    seq_offsets: torch.Tensor  # int64 [B+1]
    cached_offsets: torch.Tensor  # int64 [B+1]
    cached_timestamps: torch.Tensor  # int64 [C] event times of the cached positions
    cached_kv: torch.Tensor | None  # [num_blocks, C, W] or None when C == 0
    max_new_len: int  # the most new tokens of one user


class IncrementalEncoder:
    """Runs a SequentialRecommender's HSTU blocks over new positions only (see the module docstring).

    Cached keys and values of a block are stored side by side per position, W = H*dv + H*dqk
    columns: [v of every head | k of every head].
    """

    def __init__(self, model: SequentialRecommender):
        reason = unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"incremental inference: {reason}")
        self.model = model
        self.blocks = list(model.encoder.blocks)
        first = self.blocks[0]
        self.num_heads, self.dqk, self.dv = first.num_heads, first.dqk, first.dv
        self.value_width = self.num_heads * self.dv
        self.kv_width = self.value_width + self.num_heads * self.dqk

    @torch.no_grad()
    def encode(self, batch: DeltaBatch, keep_kv: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(L2-normalised states [M, D] of the new tokens, their keys and values [num_blocks, M, W] or None)."""
        model = self.model
        embedding = model.embedding
        # The input stage (hstu_kernels.sequence_fusion without time scales, dropout off) at window positions.
        x = embedding.item_table[batch.item_ids] * math.sqrt(embedding.dim) + embedding.pos_table[batch.positions]
        num_new = x.shape[0]
        new_kv = layout = None
        for index, block in enumerate(self.blocks):
            uvqk = block.projections(x)
            _, v, q, k = block.split_heads(uvqk)
            if keep_kv:
                if new_kv is None:
                    new_kv = uvqk.new_empty((len(self.blocks), num_new, self.kv_width))
                torch.cat([v.reshape(num_new, -1), k.reshape(num_new, -1)], dim=1, out=new_kv[index])
            if index == 0:
                layout = self._layout(batch, q, k, v)
            attn = self._attention(block, index, q, k, v, batch, layout)
            x = block.output(x, attn, uvqk)
        return F.normalize(x, dim=-1, eps=1e-6), new_kv

    def _layout(self, batch: DeltaBatch, q, k, v) -> hstu_kernels.AttentionLayout | None:
        """The attention's index layout of this batch, shared by every block (they are built from one
        set of arguments: same max_seq_len and biases); None where the attention runs on Triton."""
        first = self.blocks[0]
        if batch.cached_kv is None:
            return first.attention_layout(batch.seq_offsets, batch.query_timestamps, batch.timestamps, q, k, v)
        if first.manager.choice(ATTENTION_OP, (q, k, v)) != "reference":
            return None
        use_time = first.time_weight is not None
        bias = dict(position_bias=first.pos_weight is not None,
                    num_time_buckets=first.time_weight.numel() if use_time else None,
                    q_timestamps=batch.query_timestamps if use_time else None,
                    k_timestamps=batch.timestamps if use_time else None)
        # validate=False: the engine built the offsets (checking their values would wait for the device)
        return hstu_kernels.hstu_attention_delta_layout(
            batch.seq_offsets, batch.cached_offsets, first.max_seq_len, q.shape[0], batch.cached_kv.shape[1],
            max_new_len=batch.max_new_len, cached_k_timestamps=batch.cached_timestamps if use_time else None,
            validate=False, **bias)

    def _attention(self, block, index: int, q, k, v, batch: DeltaBatch, layout) -> torch.Tensor:
        use_time = block.time_weight is not None
        if batch.cached_kv is None:  # nothing cached: the model's own attention over whole windows
            return hstu_kernels.hstu_attention(
                q, k, v, batch.seq_offsets, block.max_seq_len, block.alpha,
                q_timestamps=batch.query_timestamps if use_time else None,
                k_timestamps=batch.timestamps if use_time else None,
                pos_weight=block.pos_weight, time_weight=block.time_weight, layout=layout, backend=block.manager,
                validate=False)
        cached = batch.cached_kv[index]
        num_cached = cached.shape[0]
        cached_v = cached[:, :self.value_width].view(num_cached, self.num_heads, self.dv)
        cached_k = cached[:, self.value_width:].view(num_cached, self.num_heads, self.dqk)
        return hstu_kernels.hstu_attention_delta(
            q, k, v, batch.seq_offsets, cached_k, cached_v, batch.cached_offsets, block.max_seq_len, block.alpha,
            max_new_len=batch.max_new_len,
            q_timestamps=batch.query_timestamps if use_time else None,
            k_timestamps=batch.timestamps if use_time else None,
            cached_k_timestamps=batch.cached_timestamps if use_time else None,
            pos_weight=block.pos_weight, time_weight=block.time_weight, layout=layout, backend=block.manager,
            validate=False)
