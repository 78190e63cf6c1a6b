"""Full-ranking retrieval metrics (HR@K, NDCG@K, MRR) from the rank of each query's target item.

The rank comes from ``hstu_kernels.topk_items``: the target scored against every item, the user's seen
items masked, ties counted against the model. Never sampled negatives: ranking the target among ~100
random items inflates NDCG and can reorder models. The metric keeps only sums (one scalar per
statistic), not per-query scores, so it is cheap and adds up across DDP processes: ``compute`` and
``totals`` sum every process's states (torchmetrics' sync; counts in int64, sums in float64).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torchmetrics import Metric


class RetrievalMetrics(Metric):
    """HR@K, NDCG@K for each K in ``ks``, and MRR, over queries with exactly one relevant item.

    ``update(target_rank)`` takes int ranks [B], 1 = best; ``validate=False`` skips the check that
    they are (a host read), as the model does with the ranks ``topk_items`` computes. With one relevant item, HR@K = 1[rank <= K],
    NDCG@K = 1[rank <= K] / log2(rank + 1) and MRR = 1 / rank, each averaged over queries.
    ``compute()`` returns {"hr@10": ..., "ndcg@10": ..., ..., "mrr": ...} as float64 scalars (NaN before
    any update).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, ks: Sequence[int] = (10, 50, 200), validate: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.validate = validate
        if not ks or any(int(k) < 1 for k in ks) or len(set(ks)) != len(ks):
            raise ValueError(f"RetrievalMetrics: ks must be distinct positive cut-offs, got {list(ks)}")
        self.ks = tuple(int(k) for k in ks)
        # Counts in int64 and sums in float64: exact or near-exact however many queries are added.
        self.add_state("count", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
        self.add_state("reciprocal_rank_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for k in self.ks:
            self.add_state(f"hits_{k}", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state(f"ndcg_sum_{k}", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, target_rank: torch.Tensor) -> None:
        if target_rank.dim() != 1 or target_rank.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"RetrievalMetrics.update: target_rank must be an integer tensor [B]; "
                f"got {target_rank.dtype} {tuple(target_rank.shape)}"
            )
        if self.validate and target_rank.numel() and int(target_rank.min()) < 1:  # a host read
            raise ValueError(f"RetrievalMetrics.update: ranks start at 1; got {int(target_rank.min())}")
        rank = target_rank.to(torch.float64)
        self.count += target_rank.numel()
        self.reciprocal_rank_sum += rank.reciprocal().sum()
        discount = torch.log2(rank + 1.0).reciprocal()
        for k in self.ks:
            in_top_k = target_rank <= k
            setattr(self, f"hits_{k}", getattr(self, f"hits_{k}") + in_top_k.sum())
            setattr(self, f"ndcg_sum_{k}", getattr(self, f"ndcg_sum_{k}") + torch.where(in_top_k, discount, 0.0).sum())

    def totals(self) -> dict[str, int | float]:
        """The states summed over processes, as exact Python numbers: ``count``, ``hits_<k>``,
        ``ndcg_sum_<k>``, ``reciprocal_rank_sum`` (a host read; call once per evaluation)."""
        with self.sync_context(should_sync=not self._is_synced):
            return {name: getattr(self, name).item() for name in self._defaults}

    def compute(self) -> dict[str, torch.Tensor]:
        count = self.count.to(torch.float64)
        result = {}
        for k in self.ks:
            result[f"hr@{k}"] = getattr(self, f"hits_{k}") / count
            result[f"ndcg@{k}"] = getattr(self, f"ndcg_sum_{k}") / count
        result["mrr"] = self.reciprocal_rank_sum / count
        return result
