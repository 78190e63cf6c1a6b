"""Operator ``interaction``: retrieval, every query scored against the whole item table, seen items
masked, top-k returned, and the target's rank for full-ranking metrics."""
from __future__ import annotations

import torch

from hstu_kernels.benchmarking import random_values, seeded
from hstu_kernels.manager import implementation
from hstu_kernels.spec import BenchCase, BenchSpec, OperatorSpec

KEY = "interaction"


def topk_items(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    exclude_ids: torch.Tensor | None = None,
    exclude_offsets: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    l2_norm: bool = True,
    backend=None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(scores [B, k] float32, ids [B, k] int64, target_rank [B] int64 or None) over the whole table.

    Query b's excluded items, ``exclude_ids[exclude_offsets[b]:exclude_offsets[b+1]]``, are neither
    returned nor counted, except its target, which is never excluded. target_rank = 1 + the number of
    other unexcluded items scoring >= the target (ties count against the model). Missing slots (fewer
    than k items left) hold id -1 and score -inf. ``validate`` checks offsets, ids and finiteness
    (host reads); without it nothing here reads device values.
    """
    check_topk_items(queries, item_table, k, exclude_ids, exclude_offsets, target_ids, validate)
    impl = implementation(KEY, "topk_items", backend, (queries, item_table))
    return impl(queries, item_table, k, exclude_ids=exclude_ids, exclude_offsets=exclude_offsets,
                target_ids=target_ids, l2_norm=l2_norm)


def check_topk_items(queries, item_table, k, exclude_ids, exclude_offsets, target_ids, validate):
    if queries.dim() != 2 or item_table.dim() != 2 or queries.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"topk_items: queries [B, D] and item_table [N, D] must share D; got {tuple(queries.shape)} and {tuple(item_table.shape)}"
        )
    num_queries, num_items = queries.shape[0], item_table.shape[0]
    if not 0 <= k <= num_items:
        raise ValueError(f"topk_items: k={k} must lie in [0, {num_items}] (the number of items in item_table)")
    if (exclude_ids is None) != (exclude_offsets is None):
        raise ValueError("topk_items: exclude_ids and exclude_offsets are given together")
    if exclude_ids is not None:
        if exclude_ids.dim() != 1 or exclude_offsets.shape != (num_queries + 1,):
            raise ValueError(
                f"topk_items: exclude_ids must be 1-D and exclude_offsets [B+1={num_queries + 1}]; "
                f"got {tuple(exclude_ids.shape)} and {tuple(exclude_offsets.shape)}"
            )
        _check_id_dtype("exclude_ids", exclude_ids)
    if target_ids is not None:
        if target_ids.shape != (num_queries,):
            raise ValueError(f"topk_items: target_ids must be [B={num_queries}]; got {tuple(target_ids.shape)}")
        _check_id_dtype("target_ids", target_ids)
    if not validate or torch.compiler.is_compiling():  # the checks below wait for the device
        return
    if exclude_ids is not None:
        first, last = exclude_offsets[0].item(), exclude_offsets[-1].item()
        if first != 0 or last != exclude_ids.shape[0]:
            raise ValueError(f"topk_items: exclude_offsets must start at 0 and end at len(exclude_ids)={exclude_ids.shape[0]}")
        if num_queries and int((exclude_offsets[1:] - exclude_offsets[:-1]).min()) < 0:
            raise ValueError("topk_items: exclude_offsets must be non-decreasing")
        _check_id_range("exclude_ids", exclude_ids, num_items)
    if target_ids is not None:
        _check_id_range("target_ids", target_ids, num_items)
    for name, tensor in (("queries", queries), ("item_table", item_table)):
        if not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"topk_items: {name} holds NaN or inf")


def _check_id_dtype(name, ids):
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_items: {name} must be an integer tensor; got {ids.dtype}")


def _check_id_range(name, ids, num_items):
    if ids.numel():
        lowest, highest = torch.stack([ids.min(), ids.max()]).tolist()
        if lowest < 0 or highest >= num_items:
            raise ValueError(f"topk_items: {name} must lie in [0, {num_items}); got [{lowest}, {highest}]")


def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """(B, D, items, K): score every item for B queries, mask 50 seen items each, keep the top K."""
    queries_n, dim, num_items, top = shape
    g = seeded(options.seed)
    queries = random_values(g, queries_n, dim, dtype=dtype, device=device, requires_grad=False)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device, requires_grad=False)
    seen = min(50, num_items - 1)
    exclude_ids = torch.randint(0, num_items, (queries_n * seen,), generator=g).to(device)
    exclude_offsets = torch.arange(0, queries_n * seen + 1, seen).to(device)
    target_ids = torch.randint(0, num_items, (queries_n,), generator=g).to(device)

    def call(backend: str) -> torch.Tensor:
        scores, _, _ = topk_items(queries, item_table, top, exclude_ids=exclude_ids, exclude_offsets=exclude_offsets,
                                  target_ids=target_ids, backend=backend, validate=options.validate)
        return scores

    return BenchCase(tuple(shape), call, [], {"fwd": 2.0 * queries_n * num_items * dim})


SPEC = OperatorSpec(
    key=KEY,
    summary="top-K over the whole item table with seen items masked, and the target's rank",
    module="topk",
    functions=("topk_items",),
    triton=True,
    bench=BenchSpec(
        shape_fields=("B", "D", "items", "K"),
        default_shapes=((128, 50, 3706, 200), (1024, 256, 1_000_000, 200)),
        build=build_bench_case,
        modes=("fwd",),
    ),
)
