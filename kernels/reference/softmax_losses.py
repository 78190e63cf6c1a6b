"""Reference of the training objective: user states scored against items, softmax cross-entropy of the
positive, either against sampled negatives (with accidental hits masked) or against the whole table.

Logits are cos(state, item) / temperature when ``l2_norm`` (both sides normalised), else
dot(state, item) / temperature. They are computed in float32 (float64 for float64 inputs) whatever
the input dtype and whether or not autocast is on: at temperature 0.05 a cosine logit reaches 20, where
a bf16 logit is off by up to 0.06. The states and the table are widened before the normalisation and
the matmuls; gradients come back in each input's own dtype.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from hstu_kernels.normalize import l2_normalize


def logit_operands(states: torch.Tensor, item_table: torch.Tensor, l2_norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(states, item_table) widened to at least float32 and, with ``l2_norm``, normalised row by row.

    Call under :func:`full_precision` so that autocast does not narrow the matmuls that follow.
    """
    wide = torch.promote_types(torch.promote_types(states.dtype, item_table.dtype), torch.float32)
    states, item_table = states.to(wide), item_table.to(wide)
    if l2_norm:
        states, item_table = l2_normalize(states), l2_normalize(item_table)
    return states, item_table


def full_precision(device: torch.device):
    """Autocast off on ``device`` (the logits' matmuls run in their operands' dtype), or nothing when it is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


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
    with full_precision(states.device):
        states, items = logit_operands(states, item_table, l2_norm)
        positives = F.embedding(pos_ids, items)
        negatives = F.embedding(neg_ids, items)  # [R, D] shared, [M, R, D] per row
        pos_logits = (states * positives).sum(-1, keepdim=True)
        if shared:
            neg_logits = states @ negatives.T
        else:
            neg_logits = torch.bmm(negatives, states.unsqueeze(-1)).squeeze(-1)
        logits = torch.cat([pos_logits, neg_logits], dim=1) / temperature
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
    with full_precision(states.device):
        states, items = logit_operands(states, item_table, l2_norm)
        logits = states @ items.T / temperature
        return F.cross_entropy(logits, pos_ids.to(torch.int64), reduction=reduction)
