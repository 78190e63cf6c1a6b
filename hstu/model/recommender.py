"""SequentialRecommender: input embedding -> encoder -> similarity, built from plain config values.

The kernel choice is made here, once, from ``kernels`` flags: one TritonOperatorManager is shared
by every layer. Parameter names do not depend on the flags, so any checkpoint loads under any flags.
"""
from __future__ import annotations

import contextlib
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

import hstu_kernels
from hstu_kernels import TritonOperatorManager
from hstu_kernels.jagged import last_index, next_in_sequence

from hstu.data.batch import JaggedBatch
from hstu.errors import ConfigError
from hstu.model.embedding import InputEmbedding
from hstu.model.loss import RecLoss

# The encoders a model may name (model.encoder._target_). Configs also come from files (an export's
# config.json, a checkpoint's hyper_parameters), and Hydra calls whatever a _target_ names.
ENCODER_TARGETS = ("hstu.model.hstu.HSTUEncoder", "hstu.model.sasrec.SASRecEncoder")


class SequentialRecommender(nn.Module):
    def __init__(
        self,
        num_items: int,
        max_seq_len: int,
        dim: int,
        input_dropout: float,
        encoder: Mapping[str, Any],
        loss: Mapping[str, Any],
        kernels: Mapping[str, bool] | None = None,
        kernel_fallback: str = "warn",
        time_scales: Sequence[Sequence[int]] = (),
        position_from_end: bool = False,
    ):
        super().__init__()
        self.num_items = num_items
        self.max_seq_len = max_seq_len
        self.manager = TritonOperatorManager(kernels, kernel_fallback)
        self.embedding = InputEmbedding(num_items, dim, max_seq_len, input_dropout, self.manager,
                                        time_scales, position_from_end)
        target = encoder.get("_target_")
        if target not in ENCODER_TARGETS:
            raise ConfigError(f"model.encoder._target_={target!r}: must be one of {list(ENCODER_TARGETS)}")
        self.encoder = instantiate(dict(encoder), dim=dim, max_seq_len=max_seq_len, manager=self.manager,
                                   _recursive_=False)
        self.loss = RecLoss(self.manager, **loss)
        self.count_regions = False  # set by compile_parts: operator calls are counted per compiled part

    def compile_parts(self, **compile_kwargs) -> None:
        """torch.compile the embedding, each encoder block and the loss with dynamic shapes (jagged batches
        change the token count every step: compile once, not per shape). Blocks share their code, so one
        block's graph serves them all (regional compilation: compile time does not grow with depth). The
        operator manager's first-call backend decision traces (its imports ran when it was built), so no
        eager call is needed first; its counts follow each compiled part's executions (``region``)."""
        for part in (self.embedding, *self.encoder.blocks, self.loss):
            part.compile(dynamic=True, **compile_kwargs)
        self.encoder.count_regions = True
        self.count_regions = True

    def _region(self, name: str):
        return self.manager.region(name) if self.count_regions else contextlib.nullcontext()

    @property
    def item_table(self) -> torch.Tensor:
        return self.embedding.item_table

    def encode(self, batch: JaggedBatch) -> torch.Tensor:
        """[L, D] L2-normalised states; state i summarises history items 0..i.

        The batch is checked here against the model's limits (``JaggedBatch.check``: no GPU wait when
        the data loader checked it already); the embedding and encoder trust it, so their operators
        skip the per-call checks that would each wait for the GPU.
        """
        batch.check(self.max_seq_len, self.num_items)
        with self._region("embedding"):
            x = self.embedding(batch.item_ids, batch.timestamps, batch.seq_offsets)
        x = self.encoder(x, batch.seq_offsets, batch.timestamps, batch.target_timestamps)
        return F.normalize(x, dim=-1, eps=1e-6)

    def training_loss(self, batch: JaggedBatch) -> torch.Tensor:
        """Every history position predicts the next item; the last one predicts the target."""
        states = self.encode(batch)
        next_items = next_in_sequence(batch.item_ids, batch.seq_offsets, batch.targets)
        with self._region("loss"):
            return self.loss(states, next_items, self.item_table, row_mask=batch.token_mask)

    def user_states(self, batch: JaggedBatch) -> torch.Tensor:
        """[B, D] state after each whole history (zero for an empty history)."""
        states = self.encode(batch)
        nonempty = (batch.seq_offsets[1:] > batch.seq_offsets[:-1]).unsqueeze(-1)
        return states[last_index(batch.seq_offsets)] * nonempty

    @torch.no_grad()
    def recommend(self, batch: JaggedBatch, k: int, with_target_rank: bool = False):
        """Top-k items over the whole catalogue with seen items masked -> (scores, item ids, target rank).
        The target rank is defined for real targets (1..num_items), not for the padding id 0; a user whose
        state is not finite (overflow at evaluation) ranks its target last, num_items, where every
        comparison with NaN would leave it first."""
        queries = self.user_states(batch)
        exclude = batch.seen_ids if batch.seen_ids is not None else batch.item_ids
        exclude_offsets = batch.seen_offsets if batch.seen_ids is not None else batch.seq_offsets
        scores, ids, rank = hstu_kernels.topk_items(
            queries.float(), self.item_table[1:].float(), min(k, self.num_items),
            exclude_ids=exclude - 1, exclude_offsets=exclude_offsets,
            target_ids=batch.targets - 1 if with_target_rank else None, backend=self.manager,
            validate=False,  # the batch was checked once (encode); a padding id 0 excludes nothing
        )
        if rank is not None:
            rank = torch.where(torch.isfinite(queries).all(dim=1), rank, self.num_items)
        return scores, ids + 1, rank
