"""Reference of retrieval: every query scored against the whole item table, each query's seen items
masked, top-k returned, and the rank of a target item among all unmasked items (full-ranking metrics).

Queries are processed in chunks, so at most ``chunk_size x num_items`` float32 scores live at once.
"""
from __future__ import annotations

import torch

from hstu_kernels.reference.losses import l2_normalize

# Default chunk: about this many float32 scores (64 MiB) per chunk of queries.
SCORES_PER_CHUNK = 1 << 24


def _check_inputs(queries, item_table, k, exclude_ids, exclude_offsets, target_ids):
    if queries.dim() != 2 or item_table.dim() != 2 or queries.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"topk_items: queries [B, D] and item_table [N, D] must share D; got {tuple(queries.shape)} and {tuple(item_table.shape)}"
        )
    num_queries, num_items = queries.shape[0], item_table.shape[0]
    if not 0 <= k <= num_items:
        raise ValueError(f"topk_items: k={k} must lie in [0, {num_items}] (the number of items in item_table)")
    if (exclude_ids is None) != (exclude_offsets is None):
        raise ValueError("topk_items: exclude_ids and exclude_offsets are given together")
    if exclude_ids is not None:
        if exclude_ids.dim() != 1 or exclude_offsets.shape != (num_queries + 1,):
            raise ValueError(
                f"topk_items: exclude_ids must be 1-D and exclude_offsets [B+1={num_queries + 1}]; "
                f"got {tuple(exclude_ids.shape)} and {tuple(exclude_offsets.shape)}"
            )
        if int(exclude_offsets[0]) != 0 or int(exclude_offsets[-1]) != exclude_ids.shape[0]:
            raise ValueError(f"topk_items: exclude_offsets must start at 0 and end at len(exclude_ids)={exclude_ids.shape[0]}")
        if num_queries and int((exclude_offsets[1:] - exclude_offsets[:-1]).min()) < 0:
            raise ValueError("topk_items: exclude_offsets must be non-decreasing")
        _check_item_ids("exclude_ids", exclude_ids, num_items)
    if target_ids is not None:
        if target_ids.shape != (num_queries,):
            raise ValueError(f"topk_items: target_ids must be [B={num_queries}]; got {tuple(target_ids.shape)}")
        _check_item_ids("target_ids", target_ids, num_items)


def _check_item_ids(name, ids, num_items):
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_items: {name} must be an integer tensor; got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_items):
        raise ValueError(f"topk_items: {name} must lie in [0, {num_items}); got [{int(ids.min())}, {int(ids.max())}]")


def _check_finite(scores: torch.Tensor, first_query: int) -> None:
    finite_rows = torch.isfinite(scores).all(dim=1)
    if not bool(finite_rows.all()):
        bad = (first_query + torch.nonzero(~finite_rows).flatten()[:5]).tolist()
        raise ValueError(
            f"topk_items: non-finite scores (NaN or inf) for query rows {bad}: the queries or item_table hold NaN/inf"
        )


@torch.no_grad()
def topk_items(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    exclude_ids: torch.Tensor | None = None,
    exclude_offsets: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    l2_norm: bool = True,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(scores [B, k] float32, ids [B, k] int64, target_rank [B] int64 or None).

    scores = queries @ item_table.T in float32 (cosine when ``l2_norm``). Query b's excluded items,
    ``exclude_ids[exclude_offsets[b]:exclude_offsets[b+1]]``, are neither returned nor counted, except
    its target, which is never excluded (returned when it ranks in the top k). target_rank = 1 + the
    number of other unexcluded items scoring >= the target (ties count against the model). When fewer
    than k items remain unexcluded, the missing slots hold id -1 and score -inf. Non-finite scores
    raise. ``chunk_size`` queries are scored at a time (default: about 2**24 scores per chunk).
    """
    _check_inputs(queries, item_table, k, exclude_ids, exclude_offsets, target_ids)
    num_queries, num_items = queries.shape[0], item_table.shape[0]
    device = queries.device
    queries, item_table = queries.float(), item_table.float()
    if l2_norm:
        queries, item_table = l2_normalize(queries), l2_normalize(item_table)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"topk_items: chunk_size must be >= 1, got {chunk_size}")
    chunk_size = chunk_size or max(1, SCORES_PER_CHUNK // max(num_items, 1))
    if exclude_ids is not None:
        exclude_query = torch.searchsorted(
            exclude_offsets[1:].to(torch.int64), torch.arange(exclude_ids.shape[0], device=device), right=True
        )
        exclude_bounds = exclude_offsets.tolist()

    top_scores = torch.empty(num_queries, k, dtype=torch.float32, device=device)
    top_ids = torch.empty(num_queries, k, dtype=torch.int64, device=device)
    target_rank = None if target_ids is None else torch.empty(num_queries, dtype=torch.int64, device=device)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        scores = queries[start:stop] @ item_table.T
        _check_finite(scores, start)
        if target_ids is not None:
            # Read from the score matrix itself: a recomputed dot product may differ in its last bits.
            rows = torch.arange(stop - start, device=device)
            targets = target_ids[start:stop]
            target_scores = scores[rows, targets]
        if exclude_ids is not None:
            lo, hi = exclude_bounds[start], exclude_bounds[stop]
            scores[exclude_query[lo:hi] - start, exclude_ids[lo:hi]] = float("-inf")
        if target_ids is not None:
            scores[rows, targets] = float("-inf")  # the target is not one of the "other" items
            target_rank[start:stop] = 1 + (scores >= target_scores.unsqueeze(1)).sum(dim=1)
            scores[rows, targets] = target_scores  # ... and never excluded from the top k
        chunk_scores, chunk_ids = scores.topk(k, dim=1)
        top_scores[start:stop] = chunk_scores
        top_ids[start:stop] = chunk_ids.masked_fill(chunk_scores == float("-inf"), -1)
    return top_scores, top_ids, target_rank
