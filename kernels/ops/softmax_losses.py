"""Operator ``sequence_recommendation_interaction``: the training objective, user states scored
against items with a sampled or a full softmax."""
from __future__ import annotations

import torch

from hstu_kernels.benchmarking import element_size, random_values, seeded
from hstu_kernels.manager import implementation
from hstu_kernels.spec import BenchCase, BenchSpec, OperatorSpec

KEY = "sequence_recommendation_interaction"


def sampled_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """Mean over rows of -log softmax(positive | positive + negatives); negatives equal to the positive
    are masked. neg_ids [M, R] (per row) or [R] (shared by every row). Logits are float32 whatever the
    input dtype. ``validate=False`` skips the check that the ids lie in the table (it waits for the device)."""
    check_sampled_softmax_loss(states, pos_ids, neg_ids, item_table, temperature, validate)
    impl = implementation(KEY, "sampled_softmax_loss", backend, (states, item_table))
    return impl(states, pos_ids, neg_ids, item_table, temperature=temperature, l2_norm=l2_norm)


def full_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """Mean over rows of -log softmax over every row of ``item_table`` (row 0 included: pass the table to score).
    Logits are float32 whatever the input dtype; ``validate`` as for :func:`sampled_softmax_loss`."""
    check_common("full_softmax_loss", states, pos_ids, item_table, temperature, validate)
    impl = implementation(KEY, "full_softmax_loss", backend, (states, item_table))
    return impl(states, pos_ids, item_table, temperature=temperature, l2_norm=l2_norm)


def check_common(name, states, pos_ids, item_table, temperature, validate=True):
    if states.dim() != 2 or item_table.dim() != 2 or states.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"{name}: states [M, D] and item_table [N, D] must share D; got {tuple(states.shape)} and {tuple(item_table.shape)}"
        )
    if states.shape[0] == 0:
        raise ValueError(f"{name}: no rows to score (M = 0); the mean over rows is undefined")
    if item_table.shape[0] == 0:
        raise ValueError(f"{name}: item_table has no rows to score")
    if pos_ids.shape != (states.shape[0],) or pos_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: pos_ids must be integer [M={states.shape[0]}]; got {pos_ids.dtype} {tuple(pos_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    if validate:
        check_ids_in_table(name, "pos_ids", pos_ids, item_table.shape[0])


def check_sampled_softmax_loss(states, pos_ids, neg_ids, item_table, temperature, validate=True):
    check_common("sampled_softmax_loss", states, pos_ids, item_table, temperature, validate)
    shared = neg_ids.dim() == 1
    per_row = neg_ids.dim() == 2 and neg_ids.shape[0] == states.shape[0]
    if neg_ids.dtype not in (torch.int32, torch.int64) or not (shared or per_row):
        raise ValueError(
            f"sampled_softmax_loss: neg_ids must be integer [M={states.shape[0]}, R] or [R]; "
            f"got {neg_ids.dtype} {tuple(neg_ids.shape)}"
        )
    if validate:
        check_ids_in_table("sampled_softmax_loss", "neg_ids", neg_ids, item_table.shape[0])


def check_ids_in_table(name, field, ids, num_items):
    """Ids must index the table's rows (one read of the device)."""
    if ids.numel() and not bool(((ids >= 0) & (ids < num_items)).all()):
        raise ValueError(f"{name}: {field} must lie in [0, {num_items}) (the item_table's rows)")


def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """(M, D, R, items): sampled softmax over M rows with R per-row negatives."""
    rows, dim, negatives, num_items = shape
    g = seeded(options.seed)
    states = random_values(g, rows, dim, dtype=dtype, device=device)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device)
    pos_ids = torch.randint(0, num_items, (rows,), generator=g).to(device)
    neg_ids = torch.randint(0, num_items, (rows, negatives), generator=g).to(device)

    def call(backend: str) -> torch.Tensor:
        return sampled_softmax_loss(states, pos_ids, neg_ids, item_table, temperature=0.05, backend=backend)

    moved = rows * (negatives + 2) * dim * element_size(dtype)  # gathered item rows + states
    return BenchCase(tuple(shape), call, [states, item_table], {"fwd": moved, "bwd": 2 * moved, "fwd+bwd": 3 * moved})


SPEC = OperatorSpec(
    key=KEY,
    summary="sampled / full softmax loss over cosine logits, with gradients to states and item table",
    module="softmax_losses",
    functions=("sampled_softmax_loss", "full_softmax_loss"),
    triton=False,
    bench=BenchSpec(
        shape_fields=("M", "D", "R", "items"),
        default_shapes=((25600, 50, 128, 3706), (65536, 256, 128, 1_000_000)),
        build=build_bench_case,
        rate_unit="GB/s",
    ),
)
