"""Reference of the training objective: user states scored against items, softmax cross-entropy of the
positive, either against sampled negatives (with accidental hits masked) or against the whole table.

Logits are cos(state, item) / temperature when ``l2_norm`` (both sides normalised), else
dot(state, item) / temperature. Matmuls run in the input dtype; the softmax runs in at least float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hstu_kernels.normalize import l2_normalize


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def sampled_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over the M rows (or each row's, ``reduction="none"``) of -log softmax of the positive among
    [positive, negatives].

    states [M, D]; pos_ids [M]; neg_ids [M, R] (per row) or [R] (shared by every row: one [M, R]
    matmul, no [M, R, D] gather). A negative equal to its row's positive is masked out (logit -inf);
    a negative drawn twice counts twice.
    """
    shared = neg_ids.dim() == 1
    positives = F.embedding(pos_ids, item_table)
    negatives = F.embedding(neg_ids, item_table)  # [R, D] shared, [M, R, D] per row
    if l2_norm:
        states, positives, negatives = l2_normalize(states), l2_normalize(positives), l2_normalize(negatives)
    pos_logits = (states * positives).sum(-1, keepdim=True)
    if shared:
        neg_logits = states @ negatives.T
    else:
        neg_logits = torch.bmm(negatives, states.unsqueeze(-1)).squeeze(-1)
    logits = torch.cat([pos_logits, neg_logits], dim=1).to(_softmax_dtype(states.dtype)) / temperature
    accidental_hits = neg_ids.unsqueeze(0) == pos_ids.unsqueeze(1) if shared else neg_ids == pos_ids.unsqueeze(1)
    logits = logits.masked_fill(F.pad(accidental_hits, (1, 0), value=False), float("-inf"))
    losses = torch.logsumexp(logits, dim=1) - logits[:, 0]
    return losses.mean() if reduction == "mean" else losses


def full_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over the M rows (or each row's, ``reduction="none"``) of -log softmax of the positive among
    every row of ``item_table``.

    Every row is scored, row 0 included: the caller passes the table it wants scored.
    """
    if l2_norm:
        states, item_table = l2_normalize(states), l2_normalize(item_table)
    logits = (states @ item_table.T).to(_softmax_dtype(states.dtype)) / temperature
    return F.cross_entropy(logits, pos_ids.to(torch.int64), reduction=reduction)
