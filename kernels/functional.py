"""Public functional API: one function per operator, same signature for every backend.

``backend``: None (the process default manager picks Triton where it can run),
"triton" / "reference" (forced; "triton" raises if it cannot run), or a
``TritonOperatorManager`` (what models pass: flags and fallback policy from config).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from hstu_kernels.manager import TritonOperatorManager, resolve_backend
from hstu_kernels import reference

Backend = Optional[Union[str, TritonOperatorManager]]


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
    backend: Backend = None,
    validate: bool = True,
) -> torch.Tensor:
    """Jagged causal HSTU attention: out[s+i] = sum_{j<=i} SiLU(alpha q.k + rab(i,j)) / max_seq_len * v[s+j].

    q, k [L, H, dqk], v [L, H, dv]; rab = pos_weight[max_seq_len-1+j-i] + time_weight[bucket(|t_q(i)-t_k(j)|)].
    ``validate=False`` skips the checks of the offsets' values, which wait for the GPU: for callers
    that checked their batch once (the model does, see ``JaggedBatch.check``).
    """
    check_attention_inputs(q, k, v, seq_offsets, max_seq_len, q_timestamps, k_timestamps, pos_weight, time_weight,
                           validate)
    choice = resolve_backend("hstu_hierarchical_attention", backend, (q, k, v))
    if choice == "triton":
        from hstu_kernels.triton.hstu_attention import hstu_attention_triton as impl
    else:
        impl = reference.hstu_attention
    return impl(
        q, k, v, seq_offsets, max_seq_len, alpha,
        q_timestamps=q_timestamps, k_timestamps=k_timestamps,
        pos_weight=pos_weight, time_weight=time_weight,
    )


def check_attention_inputs(q, k, v, seq_offsets, max_seq_len, q_timestamps, k_timestamps, pos_weight, time_weight,
                           validate=True):
    """Shape/dtype checks shared by every backend; with ``validate``, the offsets' values too (one host
    sync, eagerly only)."""
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"expected q, k [L, H, dqk] and v [L, H, dv]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError("seq_offsets must be a 1-D int32/int64 tensor [B+1]")
    if (q_timestamps is None) != (k_timestamps is None):
        raise ValueError("q_timestamps and k_timestamps are given together")
    if time_weight is not None and q_timestamps is None:
        raise ValueError("time_weight needs q_timestamps and k_timestamps")
    if q_timestamps is not None:
        if q_timestamps.dtype != torch.int64 or k_timestamps.dtype != torch.int64:
            raise TypeError("timestamps must be int64 (differences are taken in int64)")
        if q_timestamps.shape != (q.shape[0],) or k_timestamps.shape != (q.shape[0],):
            raise ValueError(f"timestamps must be [L={q.shape[0]}]")
    if pos_weight is not None and pos_weight.shape != (2 * max_seq_len - 1,):
        raise ValueError(f"pos_weight must be [2*max_seq_len-1={2 * max_seq_len - 1}], got {tuple(pos_weight.shape)}")
    if time_weight is not None and time_weight.dim() != 1:
        raise ValueError("time_weight must be 1-D [num_buckets]")
    if validate and not torch.compiler.is_compiling():  # one host sync for every offset check
        lengths = seq_offsets[1:] - seq_offsets[:-1]
        if lengths.numel():
            first, last, shortest, longest = torch.stack(
                [seq_offsets[0], seq_offsets[-1], lengths.min(), lengths.max()]).tolist()
        else:
            first = last = int(seq_offsets[0])
            shortest = longest = 0
        if first != 0 or last != q.shape[0]:
            raise ValueError(f"seq_offsets must start at 0 and end at L={q.shape[0]}")
        if shortest < 0:
            raise ValueError("seq_offsets must be non-decreasing")
        if longest > max_seq_len:
            raise ValueError(f"a sequence of length {longest} exceeds max_seq_len={max_seq_len}")


def attention_output(
    x: torch.Tensor,
    attn: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    dropout_p: float,
    training: bool,
    eps: float = 1e-6,
    seed: int | None = None,
    backend: Backend = None,
) -> torch.Tensor:
    """x + Dropout(LayerNorm(attn) * u) @ weight.T + bias (LayerNorm without affine)."""
    resolve_backend("fused_attention_layernorm", backend, (x, attn, u))  # only the reference exists so far
    return reference.attention_output(x, attn, u, weight, bias, dropout_p=dropout_p, training=training, eps=eps, seed=seed)


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
    backend: Backend = None,
    validate: bool = True,
) -> torch.Tensor:
    """Input stage -> [L, D]: item_table[ids] * scale + pos_table[p] + sum_s time_tables[s][bucket_s], dropout.

    ``validate=False`` skips the checks of offsets and ids that wait for the GPU (as in ``hstu_attention``).
    """
    resolve_backend("hierarchical_sequence_fusion", backend, (item_table,))
    return reference.sequence_fusion(
        item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables,
        scale=scale, time_scales=time_scales, dropout_p=dropout_p, training=training,
        seed=seed, position_from_end=position_from_end, validate=validate,
    )


def sampled_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    backend: Backend = None,
) -> torch.Tensor:
    """Mean over rows of -log softmax(positive | positive + negatives); negatives equal to the positive are masked."""
    resolve_backend("sequence_recommendation_interaction", backend, (states, item_table))
    return reference.sampled_softmax_loss(states, pos_ids, neg_ids, item_table, temperature=temperature, l2_norm=l2_norm)


def full_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    backend: Backend = None,
) -> torch.Tensor:
    """Mean over rows of -log softmax over every item of the table."""
    resolve_backend("sequence_recommendation_interaction", backend, (states, item_table))
    return reference.full_softmax_loss(states, pos_ids, item_table, temperature=temperature, l2_norm=l2_norm)


def topk_items(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    exclude_ids: torch.Tensor | None = None,
    exclude_offsets: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    l2_norm: bool = True,
    backend: Backend = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(scores [B, k], ids [B, k], target_rank [B] or None) over the whole table, excluded items masked."""
    resolve_backend("interaction", backend, (queries, item_table))
    return reference.topk_items(
        queries, item_table, k, exclude_ids=exclude_ids, exclude_offsets=exclude_offsets,
        target_ids=target_ids, l2_norm=l2_norm,
    )
