"""HSTU encoder (Zhai et al. 2024): a stack of Sequential Transduction Units over jagged sequences.

STU: x_norm = LayerNorm(x); [u, v, q, k] = SiLU(x_norm W_uvqk) split into heads;
A = SiLU(alpha q k^T + rab) / max_seq_len (causal, diagonal included), rab = relative position
bias + log-bucketed time bias; y = x + Linear(Dropout(LayerNorm(A v) * u)).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

import hstu_kernels
from hstu_kernels import AttentionLayout, TritonOperatorManager
from hstu_kernels.jagged import next_in_sequence
from hstu_kernels.ops.hstu_attention import KEY as ATTENTION_OP
from hstu_kernels.time_buckets import DEFAULT_NUM_BUCKETS

LAYER_NORM_EPS = 1e-6


class STULayer(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        dqk: int,
        dv: int,
        max_seq_len: int,
        dropout: float,
        manager: TritonOperatorManager,
        alpha: float = 1.0,
        position_bias: bool = True,
        time_bias: bool = True,
        num_time_buckets: int = DEFAULT_NUM_BUCKETS,
    ):
        super().__init__()
        self.num_heads, self.dqk, self.dv = num_heads, dqk, dv
        self.max_seq_len = max_seq_len
        self.dropout = dropout
        self.alpha = alpha
        self.manager = manager
        self.uvqk = nn.Parameter(torch.empty(dim, num_heads * (2 * dv + 2 * dqk)))
        self.out = nn.Linear(num_heads * dv, dim)
        self.pos_weight = nn.Parameter(torch.empty(2 * max_seq_len - 1)) if position_bias else None
        self.time_weight = nn.Parameter(torch.empty(num_time_buckets)) if time_bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.uvqk, std=0.02)
        for w in (self.pos_weight, self.time_weight):
            if w is not None:
                nn.init.normal_(w, std=0.02)

    def forward(self, x, seq_offsets, q_timestamps, k_timestamps, shared_layout: SharedLayout | None = None):
        uvqk = self.projections(x)
        _, v, q, k = self.split_heads(uvqk)
        attn = hstu_kernels.hstu_attention(
            q, k, v, seq_offsets, self.max_seq_len, self.alpha,
            q_timestamps=q_timestamps if self.time_weight is not None else None,
            k_timestamps=k_timestamps if self.time_weight is not None else None,
            pos_weight=self.pos_weight, time_weight=self.time_weight, backend=self.manager,
            layout=None if shared_layout is None else shared_layout(self, q, k, v),
            validate=False,  # the batch was checked once (SequentialRecommender.encode)
        )
        return self.output(x, attn, uvqk)

    def attention_layout(self, seq_offsets, q_timestamps, k_timestamps, q, k, v) -> AttentionLayout | None:
        """The index layout (padded rows, bias indices, causal mask) that the reference attention derives
        from a batch's offsets and timestamps alone; None where the attention runs on Triton, whose kernel
        computes its indices itself."""
        if self.manager.choice(ATTENTION_OP, (q, k, v)) != "reference":
            return None
        time_bias = self.time_weight is not None
        return hstu_kernels.hstu_attention_layout(
            seq_offsets, self.max_seq_len, q.shape[0], position_bias=self.pos_weight is not None,
            num_time_buckets=self.time_weight.numel() if time_bias else None,
            q_timestamps=q_timestamps if time_bias else None, k_timestamps=k_timestamps if time_bias else None,
            validate=False)  # offsets checked once with the batch

    def projections(self, x: torch.Tensor) -> torch.Tensor:
        """[L, H*(2dv + 2dqk)]: u, v, q, k of every head, side by side (SiLU(LayerNorm(x) W_uvqk))."""
        return hstu_kernels.attention_input(x, self.uvqk, eps=LAYER_NORM_EPS, backend=self.manager)

    def split_heads(self, uvqk: torch.Tensor):
        """(u [L, H*dv], v [L, H, dv], q [L, H, dqk], k [L, H, dqk]) as views of ``projections``' output."""
        L, H = uvqk.shape[0], self.num_heads
        u, v, q, k = torch.split(uvqk, [H * self.dv, H * self.dv, H * self.dqk, H * self.dqk], dim=-1)
        return u, v.view(L, H, self.dv), q.view(L, H, self.dqk), k.view(L, H, self.dqk)

    def output(self, x: torch.Tensor, attn: torch.Tensor, uvqk: torch.Tensor) -> torch.Tensor:
        """x + Linear(Dropout(LayerNorm(attn) * u)) for attn [L, H, dv]."""
        u = uvqk[:, :self.num_heads * self.dv]
        return hstu_kernels.attention_output(
            x, attn.reshape(x.shape[0], -1), u, self.out.weight, self.out.bias,
            dropout_p=self.dropout, training=self.training, eps=LAYER_NORM_EPS, backend=self.manager, validate=False,
        )


class SharedLayout:
    """One batch's attention layout, built at the first block's call and handed to every later block: the
    blocks take the same max_seq_len and biases, and the time buckets of every (query, key) pair cost
    more than a block's matmuls on a CPU."""

    def __init__(self, seq_offsets, q_timestamps, k_timestamps):
        self.inputs = seq_offsets, q_timestamps, k_timestamps
        self.layout: AttentionLayout | None = None
        self.built = False

    def __call__(self, block: STULayer, q, k, v) -> AttentionLayout | None:
        if not self.built:
            self.layout, self.built = block.attention_layout(*self.inputs, q, k, v), True
        return self.layout


class HSTUEncoder(nn.Module):
    """Jagged [L, D] embeddings -> [L, D] states; state i summarises items 0..i of its sequence.

    ``layer_kwargs`` are STULayer's arguments (dim, num_heads, dqk, dv, max_seq_len, dropout, manager, ...).
    """

    def __init__(self, num_blocks: int, **layer_kwargs):
        super().__init__()
        self.blocks = nn.ModuleList(STULayer(**layer_kwargs) for _ in range(num_blocks))
        self.manager = layer_kwargs["manager"]
        self.count_regions = False  # set when the blocks are compiled (SequentialRecommender.compile_parts)

    def forward(self, x, seq_offsets, timestamps, target_timestamps):
        # Position i predicts the event after it: its query time is that event's timestamp.
        q_timestamps = next_in_sequence(timestamps, seq_offsets, target_timestamps)
        # Compiled blocks (count_regions) each trace their own layout: an object argument would be guarded on.
        shared_layout = None if self.count_regions else SharedLayout(seq_offsets, q_timestamps, timestamps)
        for block in self.blocks:
            with self.manager.region("stu_block") if self.count_regions else contextlib.nullcontext():
                x = block(x, seq_offsets, q_timestamps, timestamps, shared_layout)
        return x
