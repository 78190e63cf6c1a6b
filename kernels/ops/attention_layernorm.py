"""Operator ``fused_attention_layernorm``: the two LayerNorms of the STU block with what surrounds them.

* input side, ``attention_input``: ``SiLU(LayerNorm(x) @ weight)`` -> [u, v, q, k] of every head;
* output side, ``attention_output``: ``x + Dropout(LayerNorm(attn) * u) @ weight.T + bias``.

Both LayerNorms have no affine parameters.
"""
from __future__ import annotations

import torch

from hstu_kernels.benchmarking import jagged_lengths, random_values, seeded
from hstu_kernels.dropout import check_dropout_p
from hstu_kernels.manager import implementation
from hstu_kernels.spec import BenchCase, BenchSpec, OperatorSpec

KEY = "fused_attention_layernorm"


def attention_input(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, backend=None,
                    validate: bool = True) -> torch.Tensor:
    """SiLU(LayerNorm(x) @ weight): x [L, D], weight [D, E] -> [L, E]."""
    check_attention_input(x, weight, eps)
    impl = implementation(KEY, "attention_input", backend, (x, weight))
    return impl(x, weight, eps=eps)


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
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """x + Dropout(LayerNorm(attn) * u) @ weight.T + bias; x [L, D], attn and u [L, H*dv], weight [D, H*dv].

    ``seed``: None draws the dropout mask from torch's RNG; an int or an int64 device tensor gives the
    reproducible mask of ``hstu_kernels.dropout.seeded_dropout_mask``.
    """
    check_attention_output(x, attn, u, weight, bias, dropout_p, eps)
    impl = implementation(KEY, "attention_output", backend, (x, attn, u, weight))
    return impl(x, attn, u, weight, bias, dropout_p=dropout_p, training=training, eps=eps, seed=seed)


def check_attention_input(x, weight, eps):
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"attention_input: x [L, D] and weight [D, E] must share D; "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    if not eps > 0:
        raise ValueError(f"attention_input: eps must be > 0, got {eps}")


def check_attention_output(x, attn, u, weight, bias, dropout_p, eps):
    if attn.dim() != 2 or u.shape != attn.shape:
        raise ValueError(f"attention_output: attn and u must both be [L, H*dv]; got {tuple(attn.shape)} and {tuple(u.shape)}")
    if x.dim() != 2 or x.shape[0] != attn.shape[0]:
        raise ValueError(f"attention_output: x must be [L={attn.shape[0]}, D]; got {tuple(x.shape)}")
    if weight.shape != (x.shape[1], attn.shape[1]):
        raise ValueError(
            f"attention_output: weight must be [D={x.shape[1]}, H*dv={attn.shape[1]}]; got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"attention_output: bias must be [D={x.shape[1]}] or None; got {tuple(bias.shape)}")
    check_dropout_p(dropout_p)
    if not eps >= 0:
        raise ValueError(f"attention_output: eps must be >= 0, got {eps}")


def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """(B, N, D, HDV): x + Dropout(LayerNorm(attn) * u) @ W.T + b over the jagged tokens."""
    batch, max_len, model_dim, attn_dim = shape
    g = seeded(options.seed)
    total = int(jagged_lengths(g, batch, max_len).sum())
    x = random_values(g, total, model_dim, dtype=dtype, device=device)
    attn, u = (random_values(g, total, attn_dim, dtype=dtype, device=device) for _ in range(2))
    weight = random_values(g, model_dim, attn_dim, dtype=dtype, device=device, scale=0.02)
    bias_vec = random_values(g, model_dim, dtype=dtype, device=device, scale=0.02)
    leaves = [x, attn, u, weight, bias_vec]

    def call(backend: str) -> torch.Tensor:
        return attention_output(x, attn, u, weight, bias_vec, dropout_p=0.2, training=True, seed=0, backend=backend)

    flops = 2.0 * total * model_dim * attn_dim
    return BenchCase(tuple(shape), call, leaves, {"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops})


SPEC = OperatorSpec(
    key=KEY,
    summary="the STU block's LayerNorms: SiLU(LayerNorm(x) @ W_uvqk) and x + W_o(Dropout(LayerNorm(attn) * u))",
    module="attention_layernorm",
    functions=("attention_input", "attention_output"),
    triton=False,
    bench=BenchSpec(
        shape_fields=("B", "N", "D", "HDV"),
        default_shapes=((128, 200, 50, 50), (64, 1024, 256, 256), (32, 4096, 512, 512)),
        build=build_bench_case,
    ),
)
