"""Training objective: autoregressive softmax over items at every position with a next item.

Similarity is cos(state, item) / temperature (L2-normalised output and item embeddings).
``sampled``: each row scores its positive against ``num_negatives`` items drawn uniformly from all
items (per row, or one set shared by the batch), accidental hits masked; ``full``: every item.
"""
from __future__ import annotations

import torch
from torch import nn

import hstu_kernels
from hstu_kernels import TritonOperatorManager

LOSS_KINDS = ("sampled", "full")


class RecLoss(nn.Module):
    def __init__(self, manager: TritonOperatorManager, kind: str = "sampled", num_negatives: int = 128,
                 temperature: float = 0.05, shared_negatives: bool = False):
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"model.loss.kind must be one of {LOSS_KINDS}, got {kind!r}")
        self.manager = manager
        self.kind = kind
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.shared_negatives = shared_negatives

    def forward(self, states: torch.Tensor, pos_ids: torch.Tensor, item_table: torch.Tensor,
                row_mask: torch.Tensor | None = None) -> torch.Tensor:
        """states [M, D], pos_ids [M] in 1..num_items, item_table [num_items + 1, D] (row 0 = padding).

        ``row_mask`` [M] (packed batches): the mean is over the rows where it is True. The others are
        scored as zero states against item 1 and left out of the sum, both with ``torch.where``, so that
        whatever a padding row holds (a NaN included) reaches neither the loss nor any gradient: a zero
        upstream gradient alone would not stop a NaN logit (0 * NaN)."""
        reduction = "mean" if row_mask is None else "none"
        if row_mask is not None:
            pos_ids = torch.where(row_mask, pos_ids, 1)
            states = torch.where(row_mask.unsqueeze(-1), states, 0.0)
        if self.kind == "full":
            loss = hstu_kernels.full_softmax_loss(
                states, pos_ids - 1, item_table[1:], temperature=self.temperature, reduction=reduction,
                backend=self.manager, validate=False)
        else:
            num_items = item_table.shape[0] - 1
            shape = (self.num_negatives,) if self.shared_negatives else (states.shape[0], self.num_negatives)
            neg_ids = torch.randint(1, num_items + 1, shape, device=states.device)
            loss = hstu_kernels.sampled_softmax_loss(
                states, pos_ids, neg_ids, item_table, temperature=self.temperature, reduction=reduction,
                backend=self.manager, validate=False)
        if row_mask is None:
            return loss
        return torch.where(row_mask, loss, 0.0).sum() / row_mask.sum().clamp_min(1)
