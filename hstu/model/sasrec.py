"""SASRec (Kang & McAuley 2018) as a baseline inside the same framework, data and metrics.

Pre-LayerNorm self-attention blocks as in the original: Q = LN(x); x = Q + MHA(Q, x, x);
x = x + FFN(LN(x)) with ReLU; a final LayerNorm. Causal softmax attention over padded batches.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hstu_kernels import TritonOperatorManager
from hstu_kernels.jagged import from_padded, padded_rows, to_padded



class SASRecBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.attn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ffn_norm = nn.LayerNorm(dim, eps=1e-8)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        h = self.num_heads
        q_in = self.attn_norm(x)
        wq, wk, wv = self.qkv.weight.chunk(3)
        bq, bk, bv = self.qkv.bias.chunk(3)
        q = F.linear(q_in, wq, bq).view(B, N, h, D // h).transpose(1, 2)
        k = F.linear(x, wk, bk).view(B, N, h, D // h).transpose(1, 2)
        v = F.linear(x, wv, bv).view(B, N, h, D // h).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0)
        x = q_in + self.attn_out(a.transpose(1, 2).reshape(B, N, D))
        x = x + self.ffn(self.ffn_norm(x))
        return x * pad_mask


class SASRecEncoder(nn.Module):
    """Jagged [L, D] embeddings -> [L, D] states, padded internally to max_seq_len.

    ``manager`` is accepted so every encoder is built the same way; SASRec's softmax attention has
    no Triton operator, so it is not used.
    """

    def __init__(self, dim: int, num_blocks: int, num_heads: int, max_seq_len: int, dropout: float,
                 manager: TritonOperatorManager):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"model.encoder.dim={dim} must be divisible by num_heads={num_heads}")
        self.max_seq_len = max_seq_len
        self.blocks = nn.ModuleList(SASRecBlock(dim, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(dim, eps=1e-8)

    def forward(self, x, seq_offsets, timestamps, target_timestamps):
        B, N = seq_offsets.numel() - 1, self.max_seq_len
        rows = padded_rows(seq_offsets, x.shape[0], N)
        h = to_padded(x, rows, B, N)
        lengths = (seq_offsets[1:] - seq_offsets[:-1])
        valid = torch.arange(N, device=x.device)[None, :] < lengths[:, None]  # [B, N]
        causal = torch.ones(N, N, dtype=torch.bool, device=x.device).tril()
        # Padded query rows attend to key 0 only, so no row is fully masked (their output is dropped).
        attn_mask = (causal[None] & valid[:, None, :]) | (~valid[:, :, None] & (torch.arange(N, device=x.device) == 0))
        pad_mask = valid[..., None].to(h.dtype)
        h = h * pad_mask
        for block in self.blocks:
            h = block(h, attn_mask[:, None], pad_mask)
        return from_padded(self.final_norm(h), rows)
