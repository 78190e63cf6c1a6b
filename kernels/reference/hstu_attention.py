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
"""
from __future__ import annotations

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
    allowed: deterministic mode on CUDA, torch.compile traces, which need a static output size, and
    CUDA-graph capture, since CUDA's ``bincount`` reads its largest index back to the host).
    The sum is accumulated in float32 (float64 for float64 tables).
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(index)
        ctx.table_size = table.numel()
        ctx.table_dtype = table.dtype
        return table[index]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        acc_dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32
        flat_index = index.reshape(-1)
        flat_grad = grad.reshape(-1).to(acc_dtype)
        use_scatter = torch.compiler.is_compiling() or (grad.is_cuda and (
            torch.are_deterministic_algorithms_enabled() or torch.cuda.is_current_stream_capturing()))
        if use_scatter:
            grad_table = flat_grad.new_zeros(ctx.table_size).scatter_add_(0, flat_index, flat_grad)
        else:
            grad_table = torch.bincount(flat_index, weights=flat_grad, minlength=ctx.table_size)
        return grad_table.to(ctx.table_dtype), None


def relative_attention_bias(
    max_seq_len: int,
    padded_q_ts: torch.Tensor | None,
    padded_k_ts: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    time_weight: torch.Tensor | None,
    device: torch.device,
    query_positions: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """rab as [B or 1, 1, Nq, N] (shared across heads) in the weights' dtype, or None without biases.

    Query row i sits at position i, or at ``query_positions[b, i]`` ([B, Nq]) when given; key j at j.
    """
    bias = None
    if pos_weight is not None:
        position = torch.arange(max_seq_len, device=device)
        if query_positions is None:
            pos_index = max_seq_len - 1 + position[None, :] - position[:, None]  # [N(i), N(j)]
        else:  # padded query rows may sit past the last position: clamped (their rows are dropped)
            pos_index = (max_seq_len - 1 + position - query_positions[..., None]).clamp(min=0)  # [B, Nq, N]
        bias = BiasTableLookup.apply(pos_weight, pos_index)
    if time_weight is not None:
        delta = padded_q_ts[:, :, None] - padded_k_ts[:, None, :]  # int64 [B, N(i), N(j)]
        time_index = time_bucket(delta, time_weight.numel())
        time_bias = BiasTableLookup.apply(time_weight, time_index)
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
) -> torch.Tensor:
    """Jagged causal HSTU attention -> [L, H, dv] in v's dtype; computed in q's dtype.

    q, k [L, H, dqk], v [L, H, dv]; seq_offsets [B+1]; timestamps int64 [L]; pos_weight
    [2*max_seq_len-1]; time_weight [NB]. Each bias term is added only when its weight is given.
    """
    num_tokens = q.shape[0]
    batch = seq_offsets.numel() - 1
    rows = padded_rows(seq_offsets, num_tokens, max_seq_len)

    # [B, N, H, d] -> [B, H, N, d] for batched matmuls over (sequence, head).
    padded_q = to_padded(q, rows, batch, max_seq_len).transpose(1, 2)
    padded_k = to_padded(k, rows, batch, max_seq_len).transpose(1, 2)
    padded_v = to_padded(v, rows, batch, max_seq_len).transpose(1, 2)

    scores = torch.matmul(padded_q, padded_k.transpose(-1, -2)) * alpha  # [B, H, N(i), N(j)]
    use_time = time_weight is not None
    bias = relative_attention_bias(
        max_seq_len,
        to_padded(q_timestamps, rows, batch, max_seq_len) if use_time else None,
        to_padded(k_timestamps, rows, batch, max_seq_len) if use_time else None,
        pos_weight,
        time_weight,
        q.device,
    )
    if bias is not None:
        scores = scores + bias.to(scores.dtype)

    # Keys j <= i only. Padded keys (j >= length) only meet padded queries (i >= j), whose rows are
    # dropped below, so the causal mask alone is exact.
    causal = torch.ones(max_seq_len, max_seq_len, dtype=torch.bool, device=q.device).tril()
    weights = torch.where(causal, F.silu(scores), 0.0) / max_seq_len
    padded_out = torch.matmul(weights.to(v.dtype), padded_v)  # [B, H, N, dv]

    return from_padded(padded_out.transpose(1, 2), rows)


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
) -> torch.Tensor:
    """HSTU attention of new tokens against cached keys and values -> [M, H, dv] in v's dtype.

    Sequence b has n_b cached positions (``cached_k/v[cached_offsets[b]:cached_offsets[b+1]]``) and m_b
    new tokens (``q/k/v[seq_offsets[b]:seq_offsets[b+1]]``) at positions n_b..n_b+m_b-1; new token i
    attends to every cached key and to new keys 0..i, so its row equals row n_b+i of ``hstu_attention``
    over the whole sequence. Timestamps: q_timestamps, k_timestamps [M], cached_k_timestamps [C].
    Queries are padded to ``max_new_len`` rows per sequence (default ``max_seq_len``), keys to
    ``max_seq_len``; no host reads. Inputs are checked by ``hstu_kernels.hstu_attention_delta``.
    """
    batch = seq_offsets.numel() - 1
    query_rows_per_sequence = max_seq_len if max_new_len is None else max_new_len
    num_new, num_cached = q.shape[0], cached_k.shape[0]
    cached_lengths = cached_offsets[1:] - cached_offsets[:-1]  # [B]
    cached_position, _ = token_positions(cached_offsets, num_cached)
    new_index, _ = token_positions(seq_offsets, num_new)
    new_sequence = sequence_index(seq_offsets, num_new)
    key_rows = torch.cat([sequence_index(cached_offsets, num_cached) * max_seq_len + cached_position,
                          new_sequence * max_seq_len + cached_lengths[new_sequence] + new_index])
    query_rows = new_sequence * query_rows_per_sequence + new_index

    def keys(cached: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        return to_padded(torch.cat([cached, new]), key_rows, batch, max_seq_len)

    padded_q = to_padded(q, query_rows, batch, query_rows_per_sequence).transpose(1, 2)  # [B, H, Nq, d]
    padded_k = keys(cached_k, k).transpose(1, 2)  # [B, H, N, d]
    padded_v = keys(cached_v, v).transpose(1, 2)
    scores = torch.matmul(padded_q, padded_k.transpose(-1, -2)) * alpha  # [B, H, Nq, N]

    query_positions = cached_lengths[:, None] + torch.arange(query_rows_per_sequence, device=q.device)  # [B, Nq]
    use_time = time_weight is not None
    bias = relative_attention_bias(
        max_seq_len,
        to_padded(q_timestamps, query_rows, batch, query_rows_per_sequence) if use_time else None,
        keys(cached_k_timestamps, k_timestamps) if use_time else None,
        pos_weight,
        time_weight,
        q.device,
        query_positions=query_positions,
    )
    if bias is not None:
        scores = scores + bias.to(scores.dtype)
    # Keys j <= the query's position: every cached key and the new keys up to the query itself.
    causal = torch.arange(max_seq_len, device=q.device) <= query_positions[..., None]  # [B, Nq, N]
    weights = torch.where(causal.unsqueeze(1), F.silu(scores), 0.0) / max_seq_len
    padded_out = torch.matmul(weights.to(v.dtype), padded_v)  # [B, H, Nq, dv]
    return from_padded(padded_out.transpose(1, 2), query_rows)
