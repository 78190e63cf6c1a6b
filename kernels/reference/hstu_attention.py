"""PyTorch reference of the jagged causal HSTU attention (operator ``hstu_hierarchical_attention``).

out[s+i] = sum_{j<=i} SiLU(alpha * q[s+i].k[s+j] + rab(i, j)) / max_seq_len * v[s+j]
rab(i, j) = pos_weight[max_seq_len - 1 + j - i] + time_weight[bucket(|q_ts[s+i] - k_ts[s+j]|)]

Computed padded: the jagged tokens are scattered into a dense [B, max_seq_len, H, d] layout with
index arithmetic (no Python loop over sequences, so torch.compile sees one static graph), attention
runs as batched matmuls under a causal mask, and the valid rows are gathered back. It is the source
of truth for tests (float64 inputs give the float64 reference) and the eager / torch.compile baseline
of ``scripts/bench_kernels.py``. Inputs are checked by ``hstu_kernels.hstu_attention``; a sequence
longer than ``max_seq_len`` must not reach this function.

``hstu_attention_delta`` is the same attention for new queries only: the keys and values of the
earlier positions come from a cache (incremental inference), and only the rows of the new tokens are
computed, padded to ``max_new_len`` rows per sequence instead of ``max_seq_len``.

Everything that depends on the offsets and timestamps only (the padded rows of queries and keys, the
relative-position and time-bucket indices of the biases, the causal mask) is an
:class:`AttentionLayout`. Each call builds one unless it is given one: a model whose blocks attend
over the same batch builds it once (``hstu_attention_layout`` / ``hstu_attention_delta_layout``) and
passes it to every block, which is then left with the work that depends on q, k, v and the bias weights.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from hstu_kernels.jagged import from_padded, padded_rows, sequence_index, to_padded, token_positions
from hstu_kernels.time_buckets import time_bucket


class BiasTableLookup(torch.autograd.Function):
    """``table[index]`` whose backward is a histogram, not PyTorch's generic indexing backward.

    The generic backward of ``table[index]`` accumulates B*N*N gradient entries into a table of
    2N-1 or ~129 weights with ``index_put_(accumulate=True)``; on a GPU that took 98% of an HSTU
    step. The bias is shared across heads, so autograd has already summed the gradient over heads
    (and over the batch for the position bias) through broadcasting before it reaches this
    backward, which then bins it with ``bincount`` (or ``scatter_add_`` where ``bincount`` is not
    allowed: deterministic mode on CUDA, torch.compile traces, which need a static output size,
    CUDA-graph capture, since CUDA's ``bincount`` reads its largest index back to the host, and a
    backward with ``create_graph=True``, since ``bincount`` has no derivative).
    The sum is accumulated in float32 (float64 for float64 tables).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.table_size = table.numel()
        ctx.table_dtype = table.dtype
        return gather_table(table, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        flat_index = index.reshape(-1)
        flat_grad = grad.reshape(-1).to(acc_dtype)
        use_scatter = torch.compiler.is_compiling() or (grad.is_cuda and (
            torch.are_deterministic_algorithms_enabled() or torch.cuda.is_current_stream_capturing())) or (
            torch.is_grad_enabled() and grad.requires_grad)  # create_graph: bincount has no derivative
        if use_scatter:
            grad_table = flat_grad.new_zeros(ctx.table_size).scatter_add_(0, flat_index, flat_grad)
        else:
            grad_table = torch.bincount(flat_index, weights=flat_grad, minlength=ctx.table_size)
        return grad_table.to(ctx.table_dtype), None


def gather_table(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 1-D table, as one ``index_select`` (3-5x faster than advanced indexing
    on the CPU at [200, 200] indices; the same values)."""
    return table.index_select(0, index.reshape(-1)).view(index.shape)


def lookup_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]``, through :class:`BiasTableLookup` when the table needs a gradient (its
    autograd node costs host time that inference does not need)."""
    if torch.is_grad_enabled() and table.requires_grad:
        return BiasTableLookup.apply(table, index)
    return gather_table(table, index)


class AttentionLayout(NamedTuple):
    """Where one batch's tokens sit in the reference's padded layout, and what follows from the offsets
    and timestamps alone: every block of a model that attends over the same batch can share it.

    ``form`` "whole" serves ``hstu_attention`` (queries and keys are the same L tokens, Nq = N =
    max_seq_len); "delta" serves ``hstu_attention_delta`` (M new queries padded to Nq = max_new_len
    rows per sequence, against the C cached keys followed by the M new ones, padded to N = max_seq_len).
    Built by :func:`hstu_attention_layout` / :func:`hstu_attention_delta_layout`; checked against each
    call by ``hstu_kernels.ops.hstu_attention.check_layout``.
    """

    form: str
    max_seq_len: int
    query_rows_per_sequence: int  # Nq
    num_tokens: int  # L or M
    num_cached: int  # C (0 for "whole")
    seq_offsets: torch.Tensor  # the offsets it was built from (checked against each call)
    cached_offsets: torch.Tensor | None
    timestamps: tuple[torch.Tensor, ...]  # (q, k) or (q, k, cached k) timestamps it was built from; () without
    query_rows: torch.Tensor  # int64 [L or M]: row of each query in [B * Nq]
    key_rows: torch.Tensor  # int64 [L or C + M]: row of each key (cached first) in [B * N]
    causal: torch.Tensor  # bool [N, N] or [B, 1, Nq, N]: key j may be attended by query row i
    pos_index: torch.Tensor | None  # int64 [N, N] or [B, Nq, N] into pos_weight; None without the position bias
    time_index: torch.Tensor | None  # int64 [B, Nq, N] into time_weight; None without the time bias
    num_time_buckets: int | None  # time_weight's size the time index was bucketed for

    @property
    def batch(self) -> int:
        return self.seq_offsets.numel() - 1


def hstu_attention_layout(
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    num_tokens: int,
    *,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    position_bias: bool = True,
    num_time_buckets: int | None = None,
) -> AttentionLayout:
    """The layout of ``hstu_attention`` over ``num_tokens`` tokens jagged by ``seq_offsets``; with the
    position-bias index when ``position_bias``, with the time-bucket index when ``num_time_buckets``
    is given (then q_timestamps, k_timestamps [L] too). No host reads."""
    batch = seq_offsets.numel() - 1
    device = seq_offsets.device
    rows = padded_rows(seq_offsets, num_tokens, max_seq_len)
    position = torch.arange(max_seq_len, device=device)
    pos_index = max_seq_len - 1 + position[None, :] - position[:, None] if position_bias else None  # [N(i), N(j)]
    time_index, timestamps = None, ()
    if num_time_buckets is not None:
        timestamps = (q_timestamps, k_timestamps)
        time_index = _time_index(to_padded(q_timestamps, rows, batch, max_seq_len),
                                 to_padded(k_timestamps, rows, batch, max_seq_len), num_time_buckets)
    # Keys j <= i only. Padded keys (j >= length) only meet padded queries (i >= j), whose rows are
    # dropped, so the causal mask alone is exact.
    causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=device).tril()
    return AttentionLayout("whole", max_seq_len, max_seq_len, num_tokens, 0, seq_offsets, None, timestamps,
                           rows, rows, causal, pos_index, time_index, num_time_buckets)


def hstu_attention_delta_layout(
    seq_offsets: torch.Tensor,
    cached_offsets: torch.Tensor,
    max_seq_len: int,
    num_new: int,
    num_cached: int,
    *,
    max_new_len: int | None = None,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    cached_k_timestamps: torch.Tensor | None = None,
    position_bias: bool = True,
    num_time_buckets: int | None = None,
) -> AttentionLayout:
    """The layout of ``hstu_attention_delta`` for ``num_new`` new tokens jagged by ``seq_offsets`` after
    ``num_cached`` cached ones jagged by ``cached_offsets``; bias indices as in
    :func:`hstu_attention_layout` (timestamps q, k [M] and cached k [C]). No host reads."""
    batch = seq_offsets.numel() - 1
    device = seq_offsets.device
    query_rows_per_sequence = max_seq_len if max_new_len is None else max_new_len
    cached_lengths = cached_offsets[1:] - cached_offsets[:-1]  # [B]
    cached_position, _ = token_positions(cached_offsets, num_cached)
    new_index, _ = token_positions(seq_offsets, num_new)
    new_sequence = sequence_index(seq_offsets, num_new)
    key_rows = torch.cat([sequence_index(cached_offsets, num_cached) * max_seq_len + cached_position,
                          new_sequence * max_seq_len + cached_lengths[new_sequence] + new_index])
    query_rows = new_sequence * query_rows_per_sequence + new_index
    # Query row i of sequence b sits at position n_b + i; key j at j.
    position = torch.arange(max_seq_len, device=device)
    query_positions = cached_lengths[:, None] + torch.arange(query_rows_per_sequence, device=device)  # [B, Nq]
    pos_index = None
    if position_bias:  # padded query rows may sit past the last position: clamped (their rows are dropped)
        pos_index = (max_seq_len - 1 + position - query_positions[..., None]).clamp(min=0)  # [B, Nq, N]
    time_index, timestamps = None, ()
    if num_time_buckets is not None:
        timestamps = (q_timestamps, k_timestamps, cached_k_timestamps)
        padded_q_ts = to_padded(q_timestamps, query_rows, batch, query_rows_per_sequence)
        padded_k_ts = to_padded(torch.cat([cached_k_timestamps, k_timestamps]), key_rows, batch, max_seq_len)
        time_index = _time_index(padded_q_ts, padded_k_ts, num_time_buckets)
    # Keys j <= the query's position: every cached key and the new keys up to the query itself.
    causal = (position <= query_positions[..., None]).unsqueeze(1)  # [B, 1, Nq, N]
    return AttentionLayout("delta", max_seq_len, query_rows_per_sequence, num_new, num_cached, seq_offsets,
                           cached_offsets, timestamps, query_rows, key_rows, causal, pos_index, time_index,
                           num_time_buckets)


def _time_index(padded_q_ts: torch.Tensor, padded_k_ts: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """[B, Nq, N] bucket of |t_q(i) - t_k(j)| (int64 differences)."""
    return time_bucket(padded_q_ts[:, :, None] - padded_k_ts[:, None, :], num_buckets)


def relative_attention_bias(layout: AttentionLayout, pos_weight: torch.Tensor | None,
                            time_weight: torch.Tensor | None) -> torch.Tensor | None:
    """rab as [B or 1, 1, Nq, N] (shared across heads) in the weights' dtype, or None without biases."""
    bias = None
    if pos_weight is not None:
        bias = lookup_bias(pos_weight, layout.pos_index)
    if time_weight is not None:
        time_bias = lookup_bias(time_weight, layout.time_index)
        bias = time_bias if bias is None else bias + time_bias
    return None if bias is None else bias.unsqueeze(-3)


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    time_weight: torch.Tensor | None = None,
    layout: AttentionLayout | None = None,
) -> torch.Tensor:
    """Jagged causal HSTU attention -> [L, H, dv] in v's dtype; computed in q's dtype.

    q, k [L, H, dqk], v [L, H, dv]; seq_offsets [B+1]; timestamps int64 [L]; pos_weight
    [2*max_seq_len-1]; time_weight [NB]. Each bias term is added only when its weight is given.
    ``layout``: this batch's :func:`hstu_attention_layout` (built here when None).
    """
    if layout is None:
        layout = hstu_attention_layout(
            seq_offsets, max_seq_len, q.shape[0], q_timestamps=q_timestamps, k_timestamps=k_timestamps,
            position_bias=pos_weight is not None, num_time_buckets=None if time_weight is None else time_weight.numel())
    batch, rows = layout.batch, layout.query_rows

    # [B, N, H, d] -> [B, H, N, d] for batched matmuls over (sequence, head).
    padded_q = to_padded(q, rows, batch, max_seq_len).transpose(1, 2)
    padded_k = to_padded(k, rows, batch, max_seq_len).transpose(1, 2)
    padded_v = to_padded(v, rows, batch, max_seq_len).transpose(1, 2)
    scores = torch.matmul(padded_q, padded_k.transpose(-1, -2)) * alpha  # [B, H, N(i), N(j)]
    padded_out = _weighted_values(scores, padded_v, layout, pos_weight, time_weight)  # [B, H, N, dv]
    return from_padded(padded_out.transpose(1, 2), rows)


def _weighted_values(scores: torch.Tensor, padded_v: torch.Tensor, layout: AttentionLayout,
                     pos_weight: torch.Tensor | None, time_weight: torch.Tensor | None) -> torch.Tensor:
    """SiLU(scores + rab) / max_seq_len under the causal mask, times the padded values: [B, H, Nq, dv]."""
    bias = relative_attention_bias(layout, pos_weight, time_weight)
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    weights = torch.where(layout.causal, F.silu(scores), 0.0) / layout.max_seq_len
    return torch.matmul(weights.to(padded_v.dtype), padded_v)


def hstu_attention_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    cached_k: torch.Tensor,
    cached_v: torch.Tensor,
    cached_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    max_new_len: int | None = None,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    cached_k_timestamps: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    time_weight: torch.Tensor | None = None,
    layout: AttentionLayout | None = None,
) -> torch.Tensor:
    """HSTU attention of new tokens against cached keys and values -> [M, H, dv] in v's dtype.

    Sequence b has n_b cached positions (``cached_k/v[cached_offsets[b]:cached_offsets[b+1]]``) and m_b
    new tokens (``q/k/v[seq_offsets[b]:seq_offsets[b+1]]``) at positions n_b..n_b+m_b-1; new token i
    attends to every cached key and to new keys 0..i, so its row equals row n_b+i of ``hstu_attention``
    over the whole sequence. Timestamps: q_timestamps, k_timestamps [M], cached_k_timestamps [C].
    Queries are padded to ``max_new_len`` rows per sequence (default ``max_seq_len``), keys to
    ``max_seq_len``; no host reads. Inputs are checked by ``hstu_kernels.hstu_attention_delta``.
    ``layout``: this batch's :func:`hstu_attention_delta_layout` (built here when None).
    """
    if layout is None:
        layout = hstu_attention_delta_layout(
            seq_offsets, cached_offsets, max_seq_len, q.shape[0], cached_k.shape[0], max_new_len=max_new_len,
            q_timestamps=q_timestamps, k_timestamps=k_timestamps, cached_k_timestamps=cached_k_timestamps,
            position_bias=pos_weight is not None, num_time_buckets=None if time_weight is None else time_weight.numel())
    batch, query_rows_per_sequence = layout.batch, layout.query_rows_per_sequence

    def keys(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return to_padded(torch.cat([cached, new]), layout.key_rows, batch, max_seq_len)

    padded_q = to_padded(q, layout.query_rows, batch, query_rows_per_sequence).transpose(1, 2)  # [B, H, Nq, d]
    padded_k = keys(cached_k, k).transpose(1, 2)  # [B, H, N, d]
    padded_v = keys(cached_v, v).transpose(1, 2)
    scores = torch.matmul(padded_q, padded_k.transpose(-1, -2)) * alpha  # [B, H, Nq, N]
    padded_out = _weighted_values(scores, padded_v, layout, pos_weight, time_weight)  # [B, H, Nq, dv]
    return from_padded(padded_out.transpose(1, 2), layout.query_rows)
