"""Reference of ``interaction``: every query scored against the whole item table, each query's seen
items masked, top-k returned, and the rank of a target item among all unmasked items.

Queries are processed in chunks, so at most about ``SCORES_PER_CHUNK`` float32 scores live at once.
Nothing here reads device values on the host (inputs are checked by ``hstu_kernels.topk_items``):
each chunk masks its exclusions with one scatter into a score buffer that has one spare row, where the
exclusions of every other chunk land. That costs O(exclusions) per chunk; the Triton kernel reads
each query's own exclusions instead.
"""
from __future__ import annotations

import torch

from hstu_kernels.jagged import sequence_index
from hstu_kernels.normalize import l2_normalize

# Default chunk: about this many float32 scores (64 MiB) per chunk of queries.
SCORES_PER_CHUNK = 1 << 24


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
    exact_ties: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(scores [B, k] float32, ids [B, k] int64, target_rank [B] int64 or None).

    scores = queries @ item_table.T in float32 (cosine when ``l2_norm``). Query b's excluded items,
    ``exclude_ids[exclude_offsets[b]:exclude_offsets[b+1]]``, are neither returned nor counted, except
    its target, which is never excluded (returned when it ranks in the top k); ids outside [0, N)
    exclude nothing. target_rank = 1 + the number of other unexcluded items scoring >= the target
    (ties count against the model). Items of equal score come in id order, and the k returned are
    the first k of any larger k's. When fewer than k items remain unexcluded, the missing slots
    hold id -1 and score -inf. ``chunk_size`` queries are scored at a time (default: about 2**24
    scores per chunk). ``exact_ties=False`` keeps torch.topk's own pick among equal scores (unspecified,
    and it can change with k): the plain eager form that benchmarks time as the baseline.
    """
    num_queries, num_items = queries.shape[0], item_table.shape[0]
    device = queries.device
    queries, item_table = queries.float(), item_table.float()
    if l2_norm:
        queries, item_table = l2_normalize(queries), l2_normalize(item_table)
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"topk_items: chunk_size must be >= 1, got {chunk_size}")
    chunk_size = chunk_size or max(1, SCORES_PER_CHUNK // max(num_items, 1))
    if num_items == 0:  # nothing to exclude from
        exclude_ids = None
    if exclude_ids is not None:
        exclude_query = sequence_index(exclude_offsets, exclude_ids.shape[0])
        exclude_ids = exclude_ids.to(torch.int64)
        # ids outside the table exclude nothing: their entries go to the spare row
        exclude_query = torch.where((exclude_ids >= 0) & (exclude_ids < num_items), exclude_query, num_queries)
        exclude_ids = exclude_ids.clamp(0, max(num_items - 1, 0))

    top_scores = torch.empty(num_queries, k, dtype=torch.float32, device=device)
    top_ids = torch.empty(num_queries, k, dtype=torch.int64, device=device)
    target_rank = None if target_ids is None else torch.empty(num_queries, dtype=torch.int64, device=device)
    for start in range(0, num_queries, chunk_size):
        stop = min(start + chunk_size, num_queries)
        rows = stop - start
        buffer = torch.empty(rows + 1, num_items, dtype=torch.float32, device=device)
        scores = buffer[:rows]
        torch.matmul(queries[start:stop], item_table.T, out=scores)
        if target_ids is not None:
            # Read from the score matrix itself: a recomputed dot product may differ in its last bits.
            row_index = torch.arange(rows, device=device)
            targets = target_ids[start:stop].to(torch.int64)
            target_scores = scores[row_index, targets]
        if exclude_ids is not None:
            local = exclude_query - start
            local = torch.where((local >= 0) & (local < rows), local, rows)  # other chunks' rows: the spare row
            buffer.index_put_((local, exclude_ids), buffer.new_full((), float("-inf")))  # no host copy: capturable
        if target_ids is not None:
            scores[row_index, targets] = float("-inf")  # the target is not one of the "other" items
            target_rank[start:stop] = 1 + (scores >= target_scores.unsqueeze(1)).sum(dim=1)
            scores[row_index, targets] = target_scores  # ... and never excluded from the top k
        chunk_scores, chunk_ids = top_k_smaller_ids_first(scores, k) if exact_ties else scores.topk(k, dim=1)
        top_scores[start:stop] = chunk_scores
        top_ids[start:stop] = chunk_ids.masked_fill(chunk_scores == float("-inf"), -1)
    return top_scores, top_ids, target_rank


def top_k_smaller_ids_first(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``scores.topk(k, dim=1)`` with exact ties broken by the smaller column, as the Triton kernel
    breaks them: torch.topk's pick among equal scores is unspecified and changes with k.

    Only the scores equal to a row's k-th best can enter or leave the set: the smallest columns
    holding that score replace those topk picked, then equal scores are put in column order.
    Costs a comparison and an int32 running count over the [rows, columns] scores, and a search of it.
    """
    top_scores, top_ids = scores.topk(k, dim=1)
    if k == 0:
        return top_scores, top_ids
    kth = top_scores[:, -1:]
    # The j-th column tied with the k-th best is the first where the running count of ties reaches j + 1.
    ties_so_far = (scores == kth).cumsum(dim=1, dtype=torch.int32)
    wanted = torch.arange(1, k + 1, dtype=torch.int32, device=scores.device).expand(scores.shape[0], k)
    first_tied = torch.searchsorted(ties_so_far, wanted.contiguous())  # ascending columns
    at_kth = top_scores == kth  # the last `tied` of the k slots (scores come sorted)
    tied = at_kth.sum(dim=1, keepdim=True)
    slot = torch.arange(k, device=scores.device) - (k - tied)
    top_ids = torch.where(at_kth, first_tied.gather(1, slot.clamp(min=0)), top_ids)
    # Within the k, equal scores in column order: order by column, then stably by score.
    top_ids, by_column = top_ids.sort(dim=1)
    top_scores = top_scores.gather(1, by_column)
    top_scores, by_score = top_scores.sort(dim=1, descending=True, stable=True)
    return top_scores, top_ids.gather(1, by_score)
