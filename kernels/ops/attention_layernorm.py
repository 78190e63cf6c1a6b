"""Operator ``fused_attention_layernorm``: the two LayerNorms of the STU block with what surrounds them.

* input side, ``attention_input``: ``SiLU(LayerNorm(x) @ weight)`` -> [u, v, q, k] of every head;
* output side, ``attention_output``: ``x + Dropout(LayerNorm(attn) * u) @ weight.T + bias``.

Both LayerNorms have no affine parameters.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
import torch.nn.functional as F

from hstu_kernels.arguments import check_flags, check_floating, check_one_device, check_real
from hstu_kernels.benchmarking import element_size, random_values, seeded, triton_function
from hstu_kernels.dropout import check_dropout_p, dropout, seed_tensor
from hstu_kernels.layout import aligned_width
from hstu_kernels.manager import implementation
from hstu_kernels.spec import BenchCase, BenchSpec, OperatorSpec

KEY = "fused_attention_layernorm"


def attention_input(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6, backend=None,
                    validate: bool = True) -> torch.Tensor:
    """SiLU(LayerNorm(x) @ weight): x [L, D], weight [D, E] -> [L, E]."""
    check_flags("attention_input", validate=validate)
    check_one_device("attention_input", x=x, weight=weight)
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
    check_flags("attention_output", training=training, validate=validate)
    check_one_device("attention_output", x=x, attn=attn, u=u, weight=weight, bias=bias)
    check_attention_output(x, attn, u, weight, bias, dropout_p, eps)
    impl = implementation(KEY, "attention_output", backend, (x, attn, u, weight))
    return impl(x, attn, u, weight, bias, dropout_p=dropout_p, training=training, eps=eps, seed=seed)


def check_attention_input(x, weight, eps):
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1]:
        raise ValueError(f"attention_input: x [L, D] and weight [D, E] must share D; "
                         f"got {tuple(x.shape)} and {tuple(weight.shape)}")
    check_real("attention_input", "eps", eps, positive=True)
    check_floating("attention_input", x=x, weight=weight)
    check_matmul_dtypes("attention_input", x=x, weight=weight)


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
    check_dropout_p(dropout_p, "attention_output")
    check_real("attention_output", "eps", eps, positive=True)
    check_floating("attention_output", x=x, attn=attn, u=u, weight=weight, bias=bias)
    check_matmul_dtypes("attention_output", attn=attn, u=u, weight=weight, bias=bias)


def check_matmul_dtypes(name, **operands):
    """Outside autocast the projection's operands share a dtype, as torch's matmuls require (under
    autocast each backend casts them to the autocast dtype)."""
    device_type = next(iter(operands.values())).device.type
    dtypes = {key: t.dtype for key, t in operands.items() if t is not None}
    if len(set(dtypes.values())) > 1 and not torch.is_autocast_enabled(device_type):
        listed = ", ".join(f"{key} {str(dtype).removeprefix('torch.')}" for key, dtype in dtypes.items())
        raise TypeError(f"{name}: outside autocast {', '.join(dtypes)} must share a dtype; got {listed}")


# Benchmark variants (``--variant``): a side of the operator, with its per-shape rules or one choice forced,
# or the output side's element-wise part alone. "" is "output".
OUTPUT_VARIANTS = {"output": None, "output-fused": "fused", "output-cublas": "cublas"}
INPUT_VARIANTS = {  # variant -> (keep the pre-activation, where x is normalised); None: the per-shape rule
    "input": (None, None), "input-stored": (True, None), "input-recompute": (False, None),
    "input-prologue": (None, "prologue"), "input-kernel": (None, "kernel"),
}
VARIANTS = (*OUTPUT_VARIANTS, *INPUT_VARIANTS, "gate", "gate-padded")
BENCH_DROPOUT = 0.2
BENCH_EPS = 1e-6


def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """(L, D, HDV) tokens, model dim and H*dv; the input side projects to E = 4 * HDV (dqk = dv).

    ``dtype`` is the activations' (attn, u): in bf16/fp16 the sides run as the model runs them, under
    autocast with x, W and b in fp32; "gate" and "gate-padded" run attn and u in ``dtype`` without autocast. ``work``
    is the minimum bytes moved (each input read once, each output written once; intermediates such
    as the gated rows, which the backward could recompute, not counted).
    """
    variant = getattr(options, "variant", "") or "output"
    if variant not in VARIANTS:
        raise SystemExit(f"--variant {variant!r}: {KEY} has {', '.join(VARIANTS)}")
    rows, model_dim, attn_dim = shape
    g = seeded(options.seed)
    mixed = dtype != torch.float32
    wide = torch.float32  # the residual stream and parameters under autocast
    act_size = element_size(dtype)
    seed = seed_tensor(0, device)
    validate = getattr(options, "validate", True)

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=mixed)

    if variant in ("gate", "gate-padded"):  # gate-padded: attn and u as the model passes them (``_model_layout``)
        if variant == "gate-padded":
            attn, u = _model_layout(g, rows, attn_dim, dtype, device)
        else:
            attn, u = (random_values(g, rows, attn_dim, dtype=dtype, device=device) for _ in range(2))
        elements = rows * attn_dim * act_size
        gate = _triton_entry("attention_gate", "attention_output", (attn, attn, u, attn))

        def call(backend: str) -> torch.Tensor:
            if backend == "triton":
                return gate()(attn, u, dropout_p=BENCH_DROPOUT, training=True, eps=BENCH_EPS, seed=seed)
            return dropout(F.layer_norm(attn, attn.shape[-1:], eps=BENCH_EPS) * u, BENCH_DROPOUT, True, seed)

        def eager() -> torch.Tensor:
            return F.dropout(F.layer_norm(attn, attn.shape[-1:], eps=BENCH_EPS) * u, BENCH_DROPOUT, training=True)

        work = {"fwd": 3.0 * elements, "bwd": 5.0 * elements, "fwd+bwd": 8.0 * elements}
        return BenchCase(tuple(shape), call, [attn, u], work, eager_call=eager)

    if variant in INPUT_VARIANTS:
        cols = 4 * attn_dim
        x = random_values(g, rows, model_dim, dtype=wide if mixed else dtype, device=device)
        weight = random_values(g, model_dim, cols, dtype=wide if mixed else dtype, device=device, scale=0.05)
        keep_pre, normalization = INPUT_VARIANTS[variant]
        forced = _triton_entry("attention_input_with", "attention_input", (x, weight))

        def call(backend: str) -> torch.Tensor:
            with autocast():
                if backend == "triton" and (variant != "input" or options.call == "direct"):
                    return forced()(x, weight, eps=BENCH_EPS, keep_pre=keep_pre, normalization=normalization)
                return attention_input(x, weight, eps=BENCH_EPS, backend=backend, validate=validate)

        def eager() -> torch.Tensor:
            with autocast():
                return F.silu(F.layer_norm(x, x.shape[-1:], eps=BENCH_EPS) @ weight)

        x_bytes, out_bytes = rows * model_dim * x.element_size(), rows * cols * (act_size if mixed else x.element_size())
        weight_bytes = weight.numel() * weight.element_size()
        fwd, bwd = x_bytes + out_bytes + weight_bytes, out_bytes + 2 * x_bytes + weight_bytes
        return BenchCase(tuple(shape), call, [x, weight], {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                         eager_call=eager)

    x = random_values(g, rows, model_dim, dtype=wide if mixed else dtype, device=device)
    attn, u = (random_values(g, rows, attn_dim, dtype=dtype, device=device) for _ in range(2))
    weight = random_values(g, model_dim, attn_dim, dtype=wide if mixed else dtype, device=device, scale=0.02)
    bias_vec = random_values(g, model_dim, dtype=wide if mixed else dtype, device=device, scale=0.02)
    projection = OUTPUT_VARIANTS[variant]
    forced = _triton_entry("attention_output_with", "attention_output", (x, attn, u, weight))
    arguments = dict(dropout_p=BENCH_DROPOUT, training=True, eps=BENCH_EPS, seed=seed)

    def call(backend: str) -> torch.Tensor:
        with autocast():
            if backend == "triton" and (variant != "output" or options.call == "direct"):
                return forced()(x, attn, u, weight, bias_vec, projection=projection, **arguments)
            return attention_output(x, attn, u, weight, bias_vec, backend=backend, validate=validate, **arguments)

    def eager() -> torch.Tensor:
        with autocast():
            gated = F.dropout(F.layer_norm(attn, attn.shape[-1:], eps=BENCH_EPS) * u, BENCH_DROPOUT, training=True)
            return x + F.linear(gated, weight, bias_vec)

    residual_bytes = rows * model_dim * x.element_size()  # x, out and dout alike
    gate_bytes = rows * attn_dim * act_size
    parameter_bytes = (weight.numel() + bias_vec.numel()) * weight.element_size()
    fwd = 2 * gate_bytes + 2 * residual_bytes + parameter_bytes
    bwd = residual_bytes + 4 * gate_bytes + parameter_bytes
    return BenchCase(tuple(shape), call, [x, attn, u, weight, bias_vec], {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd},
                     eager_call=eager)


def _model_layout(g: torch.Generator, rows: int, width: int, dtype: torch.dtype, device) -> tuple:
    """(attn, u) as the STU block passes them to the gate: attn in aligned rows (the Triton attention's
    output, ``hstu_kernels.layout.aligned_rows``), u the first ``width`` columns of the [rows, 4 * width]
    projection."""
    attn = random_values(g, rows, aligned_width(width), dtype=dtype, device=device, requires_grad=False)[:, :width]
    u = random_values(g, rows, 4 * width, dtype=dtype, device=device, requires_grad=False)[:, :width]
    return attn.requires_grad_(), u.requires_grad_()


def _triton_entry(function: str, dispatched_as: str, tensors) -> Callable[[], Callable]:
    """A getter of a function of the Triton module (the variants' entry points), resolved on first use;
    ProviderUnavailable, with the manager's reason for ``dispatched_as`` on these tensors, where the
    Triton kernels cannot run."""
    resolved = []

    def get() -> Callable:
        if not resolved:
            triton_function(KEY, dispatched_as, tensors)
            resolved.append(getattr(importlib.import_module(SPEC.triton_module), function))
        return resolved[0]

    return get


_SHAPES = tuple((rows, dim, dim) for rows in (25_600, 200_000) for dim in (50, 64, 256, 512))

SPEC = OperatorSpec(
    key=KEY,
    summary="the STU block's LayerNorms: SiLU(LayerNorm(x) @ W_uvqk) and x + W_o(Dropout(LayerNorm(attn) * u))",
    module="attention_layernorm",
    functions=("attention_input", "attention_output"),
    triton=True,
    bench=BenchSpec(shape_fields=("L", "D", "HDV"), default_shapes=_SHAPES, build=build_bench_case, rate_unit="GB/s",
                    direct_call=True),
)
