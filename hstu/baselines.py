"""Trivial predictors that a sequential model must clear, ranked by the same full-ranking code.

* ``popularity``: every user gets the items most often seen in training (every event before the
  user's held-out ones, users too short for a training example included), seen items masked.
* ``repeat_last``: the user's last history item first, every other item tied behind it (ties count
  against the predictor). Seen items are masked except the target, so this predictor ranks a target
  that repeats the last event first; on data with many repeated events it shows how far masking
  alone carries a model.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

import hstu_kernels
from hstu.data.batch import JaggedBatch
from hstu.data.datamodule import SequenceDataModule
from hstu.data.sequences import PROTOCOL_HELD_OUT
from hstu.metrics import RetrievalMetrics

BASELINES = ("popularity", "repeat_last")


def training_item_counts(datamodule: SequenceDataModule) -> torch.Tensor:
    """float32 [num_items]: how often item i+1 occurs among the training events: each user's events before
    the ones the protocol holds out (``PROTOCOL_HELD_OUT``)."""
    sequences = datamodule.sequences
    lengths = sequences.lengths - PROTOCOL_HELD_OUT[datamodule.protocol]
    starts = sequences.offsets[:-1]
    ends = np.cumsum(lengths)
    events = np.repeat(starts - (ends - lengths), lengths) + np.arange(ends[-1] if lengths.size else 0)
    counts = np.bincount(sequences.item_ids[events] - 1, minlength=datamodule.num_items)
    return torch.from_numpy(counts.astype(np.float32))


def _ranks(batch: JaggedBatch, item_scores: torch.Tensor) -> torch.Tensor:
    """The target's rank when every user scores item i+1 with ``item_scores[i]``, seen items masked."""
    _, _, rank = hstu_kernels.topk_items(
        torch.ones(batch.batch_size, 1), item_scores[:, None], 0, exclude_ids=batch.seen_ids - 1,
        exclude_offsets=batch.seen_offsets, target_ids=batch.targets - 1, l2_norm=False, backend="reference",
    )
    return rank


@torch.no_grad()
def baseline_metrics(name: str, datamodule: SequenceDataModule, split: str = "test",
                     ks: Sequence[int] = (10, 50, 200)) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of baseline ``name`` (see the module docstring) on ``split`` ("val" or "test")."""
    if name not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {name!r}")
    # Every example of the split, whatever this process's rank, counted on the host without syncing
    # processes (a CUDA-only collective backend cannot gather CPU tensors).
    loader = datamodule.evaluation_dataloader(split, shard=False)
    metrics = RetrievalMetrics(ks=ks, sync_on_compute=False)
    if name == "popularity":
        counts = training_item_counts(datamodule)
        for batch in loader:
            metrics.update(_ranks(batch, counts))
    else:
        tied = torch.zeros(datamodule.num_items)
        for batch in loader:
            last_item = batch.item_ids[batch.seq_offsets[1:] - 1]  # evaluation histories are never empty
            metrics.update(torch.where(batch.targets == last_item, 1, _ranks(batch, tied)))
    return {k: float(v) for k, v in metrics.compute().items()}
