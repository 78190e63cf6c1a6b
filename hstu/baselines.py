"""Popularity baseline: every user gets the items most often seen in training, seen items masked.

The floor a sequential model must clear; ranked by the same full-ranking code as the models.
"""
from __future__ import annotations

import torch

import hstu_kernels
from hstu.data.datamodule import SequenceDataModule
from hstu.metrics import RetrievalMetrics


@torch.no_grad()
def popularity_metrics(datamodule: SequenceDataModule, split: str = "test", ks=(10, 50, 200)) -> dict[str, float]:
    train = datamodule.train_dataloader()
    counts = torch.zeros(datamodule.num_items, dtype=torch.float32)
    for batch in train:  # every training example contributes its history and its target
        counts += torch.bincount(batch.item_ids - 1, minlength=datamodule.num_items).float()
        counts += torch.bincount(batch.targets - 1, minlength=datamodule.num_items).float()
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    metrics = RetrievalMetrics(ks=ks)
    table = counts[:, None]
    for batch in loader:
        _, _, rank = hstu_kernels.topk_items(
            torch.ones(batch.batch_size, 1), table, 1, exclude_ids=batch.seen_ids - 1,
            exclude_offsets=batch.seen_offsets, target_ids=batch.targets - 1, l2_norm=False, backend="reference",
        )
        metrics.update(rank)
    return {k: float(v) for k, v in metrics.compute().items()}
