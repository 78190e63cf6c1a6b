"""Input stage: item embedding * sqrt(D) + learned absolute positions (+ optional multi-scale time), dropout."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

import hstu_kernels
from hstu_kernels import TritonOperatorManager


class InputEmbedding(nn.Module):
    """Owns the item table (row 0 = padding, never scored) that the loss and retrieval reuse."""

    def __init__(
        self,
        num_items: int,
        dim: int,
        max_seq_len: int,
        dropout: float,
        manager: TritonOperatorManager,
        time_scales: Sequence[Sequence[int]] = (),
        position_from_end: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.dropout = dropout
        self.manager = manager
        self.position_from_end = position_from_end
        self.time_scales = [(int(w), int(n)) for w, n in time_scales]
        self.item_table = nn.Parameter(torch.empty(num_items + 1, dim))
        self.pos_table = nn.Parameter(torch.empty(max_seq_len, dim))
        self.time_tables = nn.ParameterList([nn.Parameter(torch.empty(n, dim)) for _, n in self.time_scales])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.item_table, std=0.02)
        with torch.no_grad():
            self.item_table[0].zero_()
        nn.init.trunc_normal_(self.pos_table, std=math.sqrt(1.0 / self.dim))
        for table in self.time_tables:
            nn.init.trunc_normal_(table, std=0.02)

    def forward(self, item_ids: torch.Tensor, timestamps: torch.Tensor, seq_offsets: torch.Tensor) -> torch.Tensor:
        return hstu_kernels.sequence_fusion(
            item_ids, timestamps, seq_offsets, self.item_table, self.pos_table, list(self.time_tables),
            scale=math.sqrt(self.dim), time_scales=self.time_scales, dropout_p=self.dropout,
            training=self.training, position_from_end=self.position_from_end, backend=self.manager,
            validate=False,  # the batch was checked once (SequentialRecommender.encode)
        )
