"""Operator ``interaction``: retrieval, every query scored against the whole item table, seen items
masked, top-k returned, and the target's rank for full-ranking metrics."""
from __future__ import annotations

import numbers

import torch

from hstu_kernels.arguments import check_flags, check_floating, check_one_device
from hstu_kernels.benchmarking import random_values, seeded, triton_function
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
    (host reads); without it nothing here reads device values, and exclusion ids outside [0, N)
    exclude nothing.
    """
    check_flags("topk_items", l2_norm=l2_norm, validate=validate)
    check_one_device("topk_items", queries=queries, item_table=item_table, exclude_ids=exclude_ids,
                     exclude_offsets=exclude_offsets, target_ids=target_ids)
    check_topk_items(queries, item_table, k, exclude_ids, exclude_offsets, target_ids, validate)
    impl = implementation(KEY, "topk_items", backend, (queries, item_table), (("k", int(k)),))
    return impl(queries, item_table, int(k), exclude_ids=exclude_ids, exclude_offsets=exclude_offsets,
                target_ids=target_ids, l2_norm=l2_norm)


def check_topk_items(queries, item_table, k, exclude_ids, exclude_offsets, target_ids, validate):
    if queries.dim() != 2 or item_table.dim() != 2 or queries.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"topk_items: queries [B, D] and item_table [N, D] must share D; got {tuple(queries.shape)} and {tuple(item_table.shape)}"
        )
    check_floating("topk_items", queries=queries, item_table=item_table)
    num_queries, num_items = queries.shape[0], item_table.shape[0]
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"topk_items: k must be an int, got {k!r}")
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
        _check_id_dtype("exclude_offsets", exclude_offsets)
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
        if bool((exclude_offsets[1:] < exclude_offsets[:-1]).any()):  # differences could wrap
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


SELECTION_VARIANTS = ("stream", "rows")  # --variant: the Triton launcher's selection ("" = its rule)


def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """(B, D, items, K): B queries scored against every item, each query's seen items masked, the top
    K kept and its target ranked. Seen lists have ML-1M's spread of user history lengths (log-normal,
    median 96, mean 165, clipped to ML-1M's 20..2314 and below the catalogue size; ids drawn with
    repeats); targets are uniform. "eager" is the reference's ops over all queries at once: one
    [B, I] fp32 score matrix, matmul + mask + rank + torch.topk (its own pick among exact ties, without
    the reference's smaller-id rule). ``options.variant`` names the Triton
    selection ("stream" or "rows"; "" for its rule)."""
    num_queries, dim, num_items, top = shape
    variant = getattr(options, "variant", "")
    if variant not in ("", *SELECTION_VARIANTS):
        raise SystemExit(f"--variant {variant!r}: {KEY} takes '' or one of {', '.join(SELECTION_VARIANTS)}")
    g = seeded(options.seed)
    queries = random_values(g, num_queries, dim, dtype=dtype, device=device, requires_grad=False)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device, requires_grad=False)
    longest = max(0, min(2314, num_items - 1))
    lengths = torch.exp(4.605 + 0.99 * torch.randn(num_queries, generator=g)).round().long().clamp(min(20, longest), longest)
    exclude_ids = torch.randint(0, num_items, (int(lengths.sum()),), generator=g).to(device)
    exclude_offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)
    target_ids = torch.randint(0, num_items, (num_queries,), generator=g).to(device)
    inputs = dict(exclude_ids=exclude_ids, exclude_offsets=exclude_offsets, target_ids=target_ids)

    def call(backend: str) -> torch.Tensor:
        if backend == "triton" and variant:  # the Triton function itself, told which selection to use
            check_topk_items(queries, item_table, top, *inputs.values(), options.validate)
            triton_topk = triton_function(KEY, "topk_items", (queries, item_table))
            return triton_topk(queries, item_table, top, **inputs, selection=variant)[0]
        scores, _, _ = topk_items(queries, item_table, top, **inputs, backend=backend, validate=options.validate)
        return scores

    def eager_call() -> torch.Tensor:
        from hstu_kernels.reference.topk import topk_items as reference_topk_items

        return reference_topk_items(queries, item_table, top, **inputs, chunk_size=max(num_queries, 1),
                                    exact_ties=False)[0]

    return BenchCase(tuple(shape), call, [], {"fwd": 2.0 * num_queries * num_items * dim}, eager_call=eager_call)


# The targets: B in {1024, 6040}, I in {3706, 26744, 1M}, D in {50, 256}, K in {10, 200}. The cases
# run are the hardest corner for the speed-up at every (B, I) (D = 50: the matmul that our kernel
# does on tensor cores is the smallest share of eager's time; K = 200: the most list merging), plus
# D = 256 and K = 10 at both ends of the range (see kernels/triton/topk_notes.md).
SPEC = OperatorSpec(
    key=KEY,
    summary="top-K over the whole item table with seen items masked, and the target's rank",
    module="topk",
    functions=("topk_items",),
    triton=True,
    bench=BenchSpec(
        shape_fields=("B", "D", "items", "K"),
        default_shapes=(
            (1024, 50, 3706, 200), (6040, 50, 3706, 200), (1024, 50, 26744, 200), (6040, 50, 26744, 200),
            (1024, 50, 1_000_000, 200), (6040, 50, 1_000_000, 200),
            (1024, 256, 26744, 200), (6040, 256, 1_000_000, 200),
            (1024, 50, 3706, 10), (6040, 256, 1_000_000, 10),
        ),
        build=build_bench_case,
        modes=("fwd",),
    ),
)
