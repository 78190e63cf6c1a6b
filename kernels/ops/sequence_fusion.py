"""Operator ``hierarchical_sequence_fusion``: the HSTU input stage over jagged sequences."""
from __future__ import annotations

import math
from typing import Sequence

import torch

from hstu_kernels.arguments import check_flags, check_floating, check_one_device, check_real, is_int
from hstu_kernels.benchmarking import (
    element_size, increasing_timestamps, jagged_lengths, offsets_of, random_values, seeded, triton_function,
)
from hstu_kernels.dropout import check_dropout_p
from hstu_kernels.jagged import check_offsets
from hstu_kernels.manager import implementation
from hstu_kernels.reference.sequence_fusion import sequence_fusion as reference_sequence_fusion
from hstu_kernels.spec import BenchCase, BenchSpec, OperatorSpec
from hstu_kernels.time_buckets import check_timestamp_range

KEY = "hierarchical_sequence_fusion"


def sequence_fusion(
    item_ids: torch.Tensor,
    timestamps: torch.Tensor,
    seq_offsets: torch.Tensor,
    item_table: torch.Tensor,
    pos_table: torch.Tensor,
    time_tables: Sequence[torch.Tensor],
    *,
    scale: float,
    time_scales: Sequence[tuple[int, int]],
    dropout_p: float,
    training: bool,
    seed: int | torch.Tensor | None = None,
    position_from_end: bool = False,
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """[L, D]: item_table[id] * scale + pos_table[p] + sum_s time_tables[s][bucket_s(t_last - t)], then dropout.

    p counts from the sequence's first token (or its most recent one with ``position_from_end``);
    bucket_s = min(floor((t_last - t) / width_s), n_s - 1) for ``time_scales[s] = (width_s, n_s)``, with
    t_last the sequence's last timestamp. ``seed`` as in ``attention_output``.
    ``validate=False`` skips the checks of offsets and ids that read values back from the device.
    """
    check_flags("sequence_fusion", training=training, position_from_end=position_from_end, validate=validate)
    time_tables = list(time_tables)
    check_one_device("sequence_fusion", item_ids=item_ids, timestamps=timestamps, seq_offsets=seq_offsets,
                     item_table=item_table, pos_table=pos_table,
                     **{f"time_tables[{s}]": table for s, table in enumerate(time_tables)})
    check_sequence_fusion(item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, scale, time_scales,
                          dropout_p, validate)
    impl = implementation(KEY, "sequence_fusion", backend, (item_table, pos_table, *time_tables))
    return impl(item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, scale=scale,
                time_scales=time_scales, dropout_p=dropout_p, training=training, seed=seed,
                position_from_end=position_from_end)


def check_sequence_fusion(item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, scale, time_scales,
                          dropout_p, validate):
    if item_ids.dim() != 1 or item_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"sequence_fusion: item_ids must be a 1-D integer tensor [L]; got {item_ids.dtype} {tuple(item_ids.shape)}")
    if timestamps.shape != item_ids.shape or timestamps.dtype != torch.int64:
        raise ValueError(
            f"sequence_fusion: timestamps must be int64 [L={item_ids.shape[0]}] (seconds, differences taken in int64); "
            f"got {timestamps.dtype} {tuple(timestamps.shape)}"
        )
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError("sequence_fusion: seq_offsets must be a 1-D int32/int64 tensor [B+1]")
    if item_table.dim() != 2 or pos_table.dim() != 2 or pos_table.shape[1] != item_table.shape[1]:
        raise ValueError(
            f"sequence_fusion: item_table [N, D] and pos_table [max_seq_len, D] must share D; "
            f"got {tuple(item_table.shape)} and {tuple(pos_table.shape)}"
        )
    check_floating("sequence_fusion", item_table=item_table, pos_table=pos_table)
    check_real("sequence_fusion", "scale", scale)
    time_scales = list(time_scales)
    for s, pair in enumerate(time_scales):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(is_int(value) for value in pair)):
            raise TypeError(f"sequence_fusion: time_scales[{s}] must be a pair of ints (width, buckets), got {pair!r}")
    if len(time_tables) != len(time_scales):
        raise ValueError(f"sequence_fusion: {len(time_tables)} time_tables for {len(time_scales)} time_scales")
    for s, ((width, num_buckets), table) in enumerate(zip(time_scales, time_tables)):
        if width <= 0 or num_buckets <= 0:
            raise ValueError(f"sequence_fusion: time_scales[{s}] = ({width}, {num_buckets}) needs width > 0 and buckets > 0")
        check_floating("sequence_fusion", **{f"time_tables[{s}]": table})
        if table.shape != (num_buckets, item_table.shape[1]):
            raise ValueError(
                f"sequence_fusion: time_tables[{s}] must be [{num_buckets}, {item_table.shape[1]}]; got {tuple(table.shape)}"
            )
    check_dropout_p(dropout_p, "sequence_fusion")
    if not validate or torch.compiler.is_compiling():  # the checks below wait for the GPU
        return
    check_offsets(seq_offsets, item_ids.shape[0], pos_table.shape[0], "sequence_fusion")
    if time_scales:  # the timestamps feed only the time embeddings
        check_timestamp_range("sequence_fusion", timestamps=timestamps)
    if item_ids.numel():
        lowest, highest = torch.stack([item_ids.min(), item_ids.max()]).tolist()
        if lowest < 0 or highest >= item_table.shape[0]:
            raise ValueError(f"sequence_fusion: item ids must lie in [0, {item_table.shape[0]}); got [{lowest}, {highest}]")


TIME_SCALES = ((3600, 24), (86400, 30), (604800, 52))  # hour x 24, day x 30, week x 52
SCATTER_VARIANTS = ("sort", "atomic")  # --variant: the Triton backward's scatter ("" = its default)
DROPOUT_P = 0.2


def jagged_lengths_totalling(g: torch.Generator, num_tokens: int, max_len: int) -> torch.Tensor:
    """Lengths of ``jagged_lengths`` (uniform in [N/2, N] up to N = 1024) until they hold exactly
    ``num_tokens`` tokens: the last sequence is cut short."""
    batch = -(-num_tokens // max(1, max_len // 2)) + 1
    lengths = jagged_lengths(g, batch, max_len)
    ends = lengths.cumsum(0)
    count = int((ends < num_tokens).sum()) + 1
    lengths = lengths[:count].clone()
    lengths[-1] -= int(ends[count - 1]) - num_tokens
    return lengths


def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """(L, N, D, items): L tokens in jagged sequences of lengths in [N/2, N], item table [items, D],
    position table [N, D], hour/day/week time tables, dropout 0.2; every table (a model parameter) in
    ``dtype``.

    Bytes counted: the forward reads the 2 + S gathered rows of every token and writes its output
    row; the backward, its mirror image, reads every output-gradient row, scatters 2 + S rows per
    token into the tables' gradients and writes each gradient row once (they are dense); both also
    read each token's id and timestamp. ``options.variant`` names the Triton backward's scatter
    ("sort" or "atomic"; "" for the default). ``eager_call`` is the reference's plain PyTorch ops with
    torch's own dropout (``F.dropout``) in place of the seeded mask.
    """
    num_tokens, max_len, dim, num_items = shape
    variant = getattr(options, "variant", "")
    if variant not in ("", *SCATTER_VARIANTS):
        raise SystemExit(f"--variant {variant!r}: {KEY} takes '' or one of {', '.join(SCATTER_VARIANTS)}")
    g = seeded(options.seed)
    lengths = jagged_lengths_totalling(g, num_tokens, max_len)
    item_ids = torch.randint(0, num_items, (num_tokens,), generator=g).to(device)
    _, timestamps = increasing_timestamps(g, lengths, device)
    offsets = offsets_of(lengths, device)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device)
    pos_table = random_values(g, max_len, dim, dtype=dtype, device=device)
    time_tables = [random_values(g, n, dim, dtype=dtype, device=device) for _, n in TIME_SCALES]
    tables = [item_table, pos_table, *time_tables]
    arguments = (item_ids, timestamps, offsets, item_table, pos_table, time_tables)
    options_ = dict(scale=math.sqrt(dim), time_scales=TIME_SCALES, dropout_p=DROPOUT_P, training=True)

    def call(backend: str) -> torch.Tensor:
        if backend == "triton" and variant:  # the Triton function itself, told which scatter to use
            check_sequence_fusion(*arguments, options_["scale"], TIME_SCALES, DROPOUT_P, options.validate)
            triton_fusion = triton_function(KEY, "sequence_fusion", tables)
            return triton_fusion(*arguments, **options_, seed=0, scatter=variant)
        return sequence_fusion(*arguments, **options_, seed=0, backend=backend, validate=options.validate)

    def eager_call() -> torch.Tensor:
        return reference_sequence_fusion(*arguments, **options_, seed=None)

    row = dim * element_size(dtype)
    indices = num_tokens * (item_ids.element_size() + timestamps.element_size())
    slots = 2 + len(TIME_SCALES)
    table_rows = num_items + max_len + sum(n for _, n in TIME_SCALES)
    forward = num_tokens * (slots + 1) * row + indices
    backward = num_tokens * (1 + slots) * row + table_rows * row + indices
    return BenchCase(tuple(shape), call, tables, {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward},
                     eager_call=eager_call)


SPEC = OperatorSpec(
    key=KEY,
    summary="input stage: item gather * sqrt(D) + position (+ multi-scale time) embeddings, dropout",
    module="sequence_fusion",
    functions=("sequence_fusion",),
    triton=True,
    bench=BenchSpec(
        shape_fields=("L", "N", "D", "items"),
        default_shapes=tuple((tokens, max_len, dim, items)
                             for tokens, max_len in ((25_600, 200), (1_000_000, 1024))
                             for dim in (50, 256) for items in (3706, 1_000_000)),
        build=build_bench_case,
        rate_unit="GB/s",
    ),
)
