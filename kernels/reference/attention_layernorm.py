"""Reference of ``fused_attention_layernorm``: the STU block's two LayerNorms (no affine parameters)
with what surrounds them. Inputs are checked by ``hstu_kernels.attention_input`` / ``attention_output``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hstu_kernels.dropout import dropout


def attention_input(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """SiLU(LayerNorm(x) @ weight): x [L, D], weight [D, E] -> [L, E]."""
    return F.silu(F.layer_norm(x, x.shape[-1:], eps=eps) @ weight)


def attention_output(
    x: torch.Tensor,
    attn: torch.Tensor,
    u: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    dropout_p: float,
    training: bool,
    eps: float = 1e-6,
    seed: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """x + Dropout(LayerNorm(attn) * u) @ weight.T + bias; x [L, D], attn and u [L, H*dv], weight [D, H*dv].

    ``seed`` None draws the dropout mask from torch's RNG; an int or int64 tensor gives the
    reproducible mask of ``hstu_kernels.dropout.seeded_dropout_mask``.
    """
    gated = F.layer_norm(attn, attn.shape[-1:], eps=eps) * u
    gated = dropout(gated, dropout_p, training, seed)
    return x + F.linear(gated, weight, bias)
