"""The yardstick: a plain padded PyTorch HSTU that the project's training step is measured against.

It computes the math of :class:`~hstu.model.recommender.SequentialRecommender` with an
``HSTUEncoder`` and the sampled softmax loss, written the way a PyTorch user writes a model for
``torch.compile``: dense ``[B, N]`` batches with a padding mask, static shapes, plain PyTorch ops,
no Triton kernels of this project.

* Input: item embedding * sqrt(D) + learned absolute positions, dropout.
* Each block: u, v, q, k = split(SiLU(LayerNorm(x) @ W_uvqk)); attention
  SiLU(alpha q.k + rab) / max_seq_len over the causal triangle, rab = relative-position bias (2N - 1
  weights) + time bias (log buckets of |t_q - t_k|, t_q the NEXT event's time, the target's for the
  last event); x + Linear(Dropout(LayerNorm(attn) * u)). LayerNorms have no affine, eps 1e-6.
* States L2-normalised; sampled softmax over cosine logits / temperature with per-row negatives
  drawn on the device every step, accidental hits masked, mean over real positions only.

The relative-bias index and the time buckets depend only on the batch, so they are computed once per
step and shared by the blocks. Bias-table gradients are binned with ``BiasTableLookup`` (a
``bincount``; PyTorch's generic indexing backward is a scatter that dominated an eager HSTU step).
Parameter names match SequentialRecommender's, so a model's state dict loads into the yardstick;
``tests/test_bench_e2e.py`` checks that both give the same loss and gradients.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from hstu.data.batch import JaggedBatch
from hstu_kernels.jagged import padded_rows, to_padded
from hstu_kernels.reference.hstu_attention import BiasTableLookup
from hstu_kernels.time_buckets import DEFAULT_NUM_BUCKETS, bucket_thresholds

LAYER_NORM_EPS = 1e-6
NORM_EPS = 1e-6
ENCODER_TARGET = "hstu.model.hstu.HSTUEncoder"


@dataclass
class PaddedBatch:
    """Histories left-aligned in ``[B, N]`` (zeros after each one), one target per sequence."""

    item_ids: torch.Tensor  # int64 [B, N]
    timestamps: torch.Tensor  # int64 [B, N]
    lengths: torch.Tensor  # int64 [B]
    targets: torch.Tensor  # int64 [B]
    target_timestamps: torch.Tensor  # int64 [B]

    @classmethod
    def from_jagged(cls, batch: JaggedBatch, max_seq_len: int) -> "PaddedBatch":
        offsets = batch.seq_offsets.to(torch.int64)
        rows = padded_rows(offsets, batch.num_tokens, max_seq_len)
        size = batch.batch_size
        return cls(
            item_ids=to_padded(batch.item_ids, rows, size, max_seq_len),
            timestamps=to_padded(batch.timestamps, rows, size, max_seq_len),
            lengths=offsets[1:] - offsets[:-1],
            targets=batch.targets,
            target_timestamps=batch.target_timestamps,
        )

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f.name) for f in fields(self))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PaddedBatch":
        return replace(self, **{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


class PaddedEmbedding(nn.Module):
    def __init__(self, num_items: int, max_seq_len: int, dim: int, dropout: float):
        super().__init__()
        self.dim, self.dropout = dim, dropout
        self.item_table = nn.Parameter(torch.empty(num_items + 1, dim))
        self.pos_table = nn.Parameter(torch.empty(max_seq_len, dim))
        nn.init.trunc_normal_(self.item_table, std=0.02)
        with torch.no_grad():
            self.item_table[0].zero_()
        nn.init.trunc_normal_(self.pos_table, std=math.sqrt(1.0 / dim))

    def forward(self, item_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(item_ids, self.item_table) * math.sqrt(self.dim) + self.pos_table[: item_ids.shape[1]]
        return F.dropout(x, self.dropout, self.training)


class PaddedSTU(nn.Module):
    def __init__(self, dim: int, num_heads: int, dqk: int, dv: int, max_seq_len: int, dropout: float, alpha: float,
                 position_bias: bool, time_bias: bool, num_time_buckets: int):
        super().__init__()
        self.num_heads, self.dqk, self.dv = num_heads, dqk, dv
        self.max_seq_len, self.dropout, self.alpha = max_seq_len, dropout, alpha
        self.uvqk = nn.Parameter(torch.empty(dim, num_heads * (2 * dv + 2 * dqk)))
        self.out = nn.Linear(num_heads * dv, dim)
        self.pos_weight = nn.Parameter(torch.empty(2 * max_seq_len - 1)) if position_bias else None
        self.time_weight = nn.Parameter(torch.empty(num_time_buckets)) if time_bias else None
        for w in (self.uvqk, self.pos_weight, self.time_weight):
            if w is not None:
                nn.init.normal_(w, std=0.02)

    def forward(self, x: torch.Tensor, causal: torch.Tensor, pos_index: torch.Tensor,
                time_index: torch.Tensor | None) -> torch.Tensor:
        batch, length, _ = x.shape
        heads, hdv, hdqk = self.num_heads, self.num_heads * self.dv, self.num_heads * self.dqk
        uvqk = F.silu(F.layer_norm(x, x.shape[-1:], eps=LAYER_NORM_EPS) @ self.uvqk)
        u, v, q, k = torch.split(uvqk, [hdv, hdv, hdqk, hdqk], dim=-1)
        q = q.reshape(batch, length, heads, self.dqk).transpose(1, 2)  # [B, H, N, d]
        k = k.reshape(batch, length, heads, self.dqk).transpose(1, 2)
        v = v.reshape(batch, length, heads, self.dv).transpose(1, 2)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.alpha  # [B, H, N(i), N(j)]
        bias = None
        if self.pos_weight is not None:
            bias = BiasTableLookup.apply(self.pos_weight, pos_index)  # [N, N]
        if self.time_weight is not None:
            time_bias = BiasTableLookup.apply(self.time_weight, time_index)  # [B, N, N]
            bias = time_bias if bias is None else bias + time_bias
        if bias is not None:
            scores = scores + bias.unsqueeze(-3).to(scores.dtype)
        weights = torch.where(causal, F.silu(scores), 0.0) / self.max_seq_len
        attn = torch.matmul(weights.to(v.dtype), v).transpose(1, 2).reshape(batch, length, hdv)
        gated = F.layer_norm(attn, attn.shape[-1:], eps=LAYER_NORM_EPS) * u
        return x + self.out(F.dropout(gated, self.dropout, self.training))


class PaddedEncoder(nn.Module):
    def __init__(self, num_blocks: int, **block_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(PaddedSTU(**block_kwargs) for _ in range(num_blocks))


class PaddedHSTU(nn.Module):
    """``forward(item_ids, timestamps, lengths, targets, target_timestamps[, negatives])`` -> the training loss.

    ``negatives`` [B, N, R] (item ids) replaces the per-row draw, for tests that compare losses.
    """

    def __init__(self, num_items: int, max_seq_len: int, dim: int, input_dropout: float, *, num_blocks: int,
                 num_heads: int, dqk: int, dv: int, dropout: float, alpha: float = 1.0, position_bias: bool = True,
                 time_bias: bool = True, num_time_buckets: int = DEFAULT_NUM_BUCKETS, num_negatives: int = 128,
                 temperature: float = 0.05):
        super().__init__()
        self.num_items, self.max_seq_len = num_items, max_seq_len
        self.num_negatives, self.temperature = num_negatives, temperature
        self.embedding = PaddedEmbedding(num_items, max_seq_len, dim, input_dropout)
        self.encoder = PaddedEncoder(
            num_blocks, dim=dim, num_heads=num_heads, dqk=dqk, dv=dv, max_seq_len=max_seq_len, dropout=dropout,
            alpha=alpha, position_bias=position_bias, time_bias=time_bias, num_time_buckets=num_time_buckets)
        # A lookup table built once, before any capture; not a parameter, not saved.
        self.register_buffer("time_thresholds", bucket_thresholds(num_time_buckets), persistent=False)

    @classmethod
    def from_model_config(cls, model: Mapping[str, Any], num_items: int) -> "PaddedHSTU":
        """The yardstick of a model config (``conf/model/*.yaml``, composed); settings it does not
        implement are refused with the key named."""
        encoder, loss = dict(model["encoder"]), dict(model["loss"])
        unsupported = {
            "model.encoder._target_": (encoder.get("_target_"), ENCODER_TARGET),
            "model.loss.kind": (loss.get("kind", "sampled"), "sampled"),
            "model.loss.shared_negatives": (bool(loss.get("shared_negatives", False)), False),
            "model.time_scales": (list(model.get("time_scales") or []), []),
            "model.position_from_end": (bool(model.get("position_from_end", False)), False),
        }
        for key, (value, supported) in unsupported.items():
            if value != supported:
                raise ValueError(f"{key}={value!r}: the padded yardstick implements only {supported!r}")
        return cls(
            num_items, int(model["max_seq_len"]), int(model["dim"]), float(model["input_dropout"]),
            num_blocks=int(encoder["num_blocks"]), num_heads=int(encoder["num_heads"]), dqk=int(encoder["dqk"]),
            dv=int(encoder["dv"]), dropout=float(encoder["dropout"]), alpha=float(encoder.get("alpha", 1.0)),
            position_bias=bool(encoder.get("position_bias", True)), time_bias=bool(encoder.get("time_bias", True)),
            num_time_buckets=int(encoder.get("num_time_buckets", DEFAULT_NUM_BUCKETS)),
            num_negatives=int(loss.get("num_negatives", 128)), temperature=float(loss.get("temperature", 0.05)),
        )

    @property
    def item_table(self) -> torch.Tensor:
        return self.embedding.item_table

    def forward(self, item_ids: torch.Tensor, timestamps: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor,
                target_timestamps: torch.Tensor, negatives: torch.Tensor | None = None) -> torch.Tensor:
        batch, length = item_ids.shape
        position = torch.arange(length, device=item_ids.device)
        valid = position < lengths[:, None]  # [B, N]
        is_last = position == lengths[:, None] - 1
        # Position i predicts the event after it, and that event's time is its attention query time.
        next_items = torch.where(is_last, targets[:, None], item_ids.roll(-1, dims=1))
        q_timestamps = torch.where(is_last, target_timestamps[:, None], timestamps.roll(-1, dims=1))

        causal = torch.ones(length, length, dtype=torch.bool, device=item_ids.device).tril()
        pos_index = self.max_seq_len - 1 + position[None, :] - position[:, None]  # [N(i), N(j)]
        delta = (q_timestamps[:, :, None] - timestamps[:, None, :]).abs()  # [B, N(i), N(j)]
        time_index = torch.bucketize(delta, self.time_thresholds, right=True)

        x = self.embedding(item_ids)
        for block in self.encoder.blocks:
            x = block(x, causal, pos_index, time_index)
        states = F.normalize(x, dim=-1, eps=NORM_EPS)
        return self.sampled_softmax(states, next_items, valid, negatives)

    def sampled_softmax(self, states: torch.Tensor, next_items: torch.Tensor, valid: torch.Tensor,
                        negatives: torch.Tensor | None) -> torch.Tensor:
        """Mean over real positions of -log softmax of the next item among itself and R negatives."""
        if negatives is None:
            negatives = torch.randint(1, self.num_items + 1, (*next_items.shape, self.num_negatives),
                                      device=next_items.device)
        positives = F.normalize(F.embedding(next_items, self.item_table), dim=-1, eps=NORM_EPS)
        negative_rows = F.normalize(F.embedding(negatives, self.item_table), dim=-1, eps=NORM_EPS)  # [B, N, R, D]
        pos_logits = (states * positives).sum(-1, keepdim=True)
        neg_logits = torch.matmul(negative_rows, states.unsqueeze(-1)).squeeze(-1)
        logits = torch.cat([pos_logits, neg_logits], dim=-1).float() / self.temperature
        hits = F.pad(negatives == next_items.unsqueeze(-1), (1, 0), value=False)
        logits = logits.masked_fill(hits, float("-inf"))
        per_position = torch.logsumexp(logits, dim=-1) - logits[..., 0]
        return torch.where(valid, per_position, 0.0).sum() / valid.sum().clamp_min(1)
