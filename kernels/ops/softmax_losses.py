"""Operator ``sequence_recommendation_interaction``: the training objective, user states scored
against items with a sampled or a full softmax."""
from __future__ import annotations

import torch

from hstu_kernels.arguments import check_flags, check_floating, check_one_device, check_real
from hstu_kernels.benchmarking import ProviderUnavailable, random_values, seeded, triton_function
from hstu_kernels.manager import implementation
from hstu_kernels.reference import softmax_losses as reference
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
    reduction: str = "mean",
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """Mean over rows (``reduction="none"``: each row's) of -log softmax(positive | positive + negatives);
    negatives equal to the positive are masked. neg_ids [M, R] (per row) or [R] (shared by every row). Logits
    are float32 whatever the input dtype. ``validate=False`` skips the check that the ids lie in the table
    (it waits for the device)."""
    check_flags("sampled_softmax_loss", l2_norm=l2_norm, validate=validate)
    check_one_device("sampled_softmax_loss", states=states, pos_ids=pos_ids, neg_ids=neg_ids, item_table=item_table)
    check_sampled_softmax_loss(states, pos_ids, neg_ids, item_table, temperature, reduction, validate)
    impl = implementation(KEY, "sampled_softmax_loss", backend, (states, item_table))
    return impl(states, pos_ids, neg_ids, item_table, temperature=temperature, l2_norm=l2_norm, reduction=reduction)


def full_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    reduction: str = "mean",
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """Mean over rows (``reduction="none"``: each row's) of -log softmax over every row of ``item_table``
    (row 0 included: pass the table to score). Logits are float32 whatever the input dtype; ``validate`` as
    for :func:`sampled_softmax_loss`."""
    check_flags("full_softmax_loss", l2_norm=l2_norm, validate=validate)
    check_one_device("full_softmax_loss", states=states, pos_ids=pos_ids, item_table=item_table)
    check_common("full_softmax_loss", states, pos_ids, item_table, temperature, reduction, validate)
    impl = implementation(KEY, "full_softmax_loss", backend, (states, item_table))
    return impl(states, pos_ids, item_table, temperature=temperature, l2_norm=l2_norm, reduction=reduction)


REDUCTIONS = ("mean", "none")


def check_common(name, states, pos_ids, item_table, temperature, reduction="mean", validate=True):
    if states.dim() != 2 or item_table.dim() != 2 or states.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"{name}: states [M, D] and item_table [N, D] must share D; got {tuple(states.shape)} and {tuple(item_table.shape)}"
        )
    if states.shape[0] == 0 and reduction == "mean":
        raise ValueError(f"{name}: no rows to score (M = 0); the mean over rows is undefined")
    if item_table.shape[0] == 0:
        raise ValueError(f"{name}: item_table has no rows to score")
    if pos_ids.shape != (states.shape[0],) or pos_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: pos_ids must be integer [M={states.shape[0]}]; got {pos_ids.dtype} {tuple(pos_ids.shape)}")
    check_real(name, "temperature", temperature, positive=True)
    check_floating(name, states=states, item_table=item_table)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if validate:
        check_ids_in_table(name, "pos_ids", pos_ids, item_table.shape[0])


def check_sampled_softmax_loss(states, pos_ids, neg_ids, item_table, temperature, reduction="mean", validate=True):
    check_common("sampled_softmax_loss", states, pos_ids, item_table, temperature, reduction, validate)
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
    """Ids must index the table's rows (one read of the device; skipped inside a torch.compile trace)."""
    if ids.numel() and not torch.compiler.is_compiling() and not bool(((ids >= 0) & (ids < num_items)).all()):
        raise ValueError(f"{name}: {field} must lie in [0, {num_items}) (the item_table's rows)")


# ---------------------------------------------------------------------------------------------
# Benchmark cases: (M, D, R, I); options.variant "per-row" (default), "shared" or "full", the sampled
# ones optionally with the Triton table scatter named ("per-row-sort", "shared-atomic", ...)
# ---------------------------------------------------------------------------------------------
SCATTERS = ("sort", "atomic")  # the Triton backend's table scatter of the sampled losses
LOSSES = ("per-row", "shared", "full")
VARIANTS = LOSSES + tuple(f"{loss}-{scatter}" for loss in ("per-row", "shared") for scatter in SCATTERS)
BENCH_TEMPERATURE = 0.05


def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """M rows of states against a table of I items, cosine logits at temperature 0.05 as the model
    trains: R negatives per row ("per-row"), R shared by all rows ("shared"), or every item ("full",
    which takes R = 0). A sampled variant with a scatter named ("per-row-sort", "per-row-atomic",
    "shared-sort", "shared-atomic") has the Triton provider sum the table gradient that way (the
    other providers are unchanged); without one it takes the Triton backend's default. Shapes that
    do not fit the variant are reported, not run. Work counts the matmul FLOPs of scoring C items per
    row (C = R + 1, or I): 2*M*C*D forward, twice that backward."""
    variant = getattr(options, "variant", "") or "per-row"
    if variant not in VARIANTS:
        raise SystemExit(f"--variant {variant!r}: {KEY} takes one of {', '.join(VARIANTS)}")
    loss = next(name for name in LOSSES if variant == name or variant.startswith(name + "-"))
    scatter = variant[len(loss) + 1:]
    rows, dim, negatives, num_items = shape
    g = seeded(options.seed)
    states = random_values(g, rows, dim, dtype=dtype, device=device)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device)
    pos_ids = torch.randint(0, num_items, (rows,), generator=g).to(device)
    mismatch = None
    if loss == "full":
        neg_ids, scored = None, num_items
        if negatives:
            mismatch = f"variant full scores every item: its shapes have R = 0 (got R = {negatives})"
    else:
        neg_shape = (rows, negatives) if loss == "per-row" else (negatives,)
        neg_ids, scored = torch.randint(0, num_items, neg_shape, generator=g).to(device), negatives + 1
        if not negatives:
            mismatch = f"variant {variant} samples R >= 1 negatives (R = 0 is the full variant's shape)"
    validate = getattr(options, "validate", True)

    def run(sampled, full, **dispatch) -> torch.Tensor:
        if mismatch:
            raise ProviderUnavailable(mismatch)
        if neg_ids is None:
            return full(states, pos_ids, item_table, temperature=BENCH_TEMPERATURE, **dispatch)
        return sampled(states, pos_ids, neg_ids, item_table, temperature=BENCH_TEMPERATURE, **dispatch)

    def call(backend: str) -> torch.Tensor:
        if backend == "triton" and scatter and not mismatch:  # the Triton function itself, told its scatter
            check_sampled_softmax_loss(states, pos_ids, neg_ids, item_table, BENCH_TEMPERATURE, validate=validate)
            triton_sampled = triton_function(KEY, "sampled_softmax_loss", (states, item_table))
            return triton_sampled(states, pos_ids, neg_ids, item_table, temperature=BENCH_TEMPERATURE, scatter=scatter)
        return run(sampled_softmax_loss, full_softmax_loss, backend=backend, validate=validate)

    forward_flops = 2.0 * rows * scored * dim
    return BenchCase(
        tuple(shape),
        call=call,
        leaves=[states, item_table],
        work={"fwd": forward_flops, "bwd": 2 * forward_flops, "fwd+bwd": 3 * forward_flops},
        # the reference called without dispatch: plain PyTorch ops
        eager_call=lambda: run(reference.sampled_softmax_loss, reference.full_softmax_loss),
    )


SPEC = OperatorSpec(
    key=KEY,
    summary="sampled (per-row / shared negatives) and full softmax losses over float32 cosine logits, "
            "with gradients to the states and the item table",
    module="softmax_losses",
    functions=("sampled_softmax_loss", "full_softmax_loss"),
    triton=True,
    bench=BenchSpec(
        shape_fields=("M", "D", "R", "I"),
        default_shapes=(
            (25000, 50, 128, 3706), (25000, 50, 512, 3706), (25000, 256, 128, 26744), (25000, 256, 512, 26744),
            (25000, 50, 0, 3706), (25000, 50, 0, 26744), (25000, 50, 0, 100_000),
            (25000, 256, 0, 3706), (25000, 256, 0, 26744), (25000, 256, 0, 100_000),
        ),
        build=build_bench_case,
        rate_unit="TFLOP/s",
    ),
)
