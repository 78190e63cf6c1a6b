"""Triton backend of ``hierarchical_sequence_fusion``: the HSTU input stage as one gather-and-sum kernel.

For token t of sequence b (tokens s_b .. e_b - 1), position p (from the start, or from the end) and
age a = max(t_last - t, 0) with t_last = timestamps[e_b - 1]:
    out[t] = dropout(item_table[id_t] * scale + pos_table[p] + sum_s time_tables[s][min(a // w_s, n_s - 1)])

Layers, after Liger-Kernel: ``@triton.jit`` kernels -> launchers -> the custom ops
``hstu_kernels::sequence_fusion_fwd`` / ``_bwd`` (``hstu_kernels.custom_op``: opaque to torch.compile,
eager calls skip the dispatcher) -> ``sequence_fusion``, which ``hstu_kernels.sequence_fusion``
dispatches to after its input checks.

How it computes, and why (kernels/triton/sequence_fusion_notes.md has the figures):
- Forward: programs over tiles of BLOCK_T consecutive tokens (and column blocks for wide rows). Each
  token finds its sequence by a branchless binary search over ``seq_offsets`` (bit_length(B) reads of
  an array that stays in L1/L2), so the grid depends only on L: no empty programs for short or
  empty sequences, whatever the length distribution. Position, the sequence's last timestamp and
  the time buckets follow in registers; the 2 + S rows are gathered, summed in fp32, dropped out
  with the seeded Philox mask of ``hstu_kernels.dropout`` (one Philox evaluation per eight columns
  of a token's row, ``hstu_kernels.triton.common.dropout_keep``) and written once.
- Backward, ``scatter="sort"`` (deterministic): one pass writes the sort keys of every table (ids,
  positions, buckets, offset so that the tables' key ranges are disjoint) and, with dropout, the
  masked gradient g'' = grad * keep / (1 - p) (the mask regenerated, not stored). One stable
  ``torch.sort`` groups all tables at once; each table then occupies exactly L sorted entries.
  A segmented reduction over chunks of sorted entries sums each run of equal keys (fp32 segmented
  sums over row tiles, carried from tile to tile) and writes runs inside a chunk straight to the
  table's gradient; each chunk's first and last run go, as partial rows, to a next level that is
  reduced the same way, until one chunk is left. Every row is written once, in a fixed order:
  bitwise repeatable, no atomics, and a hot row (one time bucket holding most tokens) is summed by
  a tree, not by one program.
  Extra memory: keys and permutation O((2 + S) L), g'' O(L D), partial rows O(L D / chunk).
- Backward, ``scatter="atomic"``: one pass over grad tiles adds rows into fp32 gradients with
  relaxed atomics; runs of equal time buckets among consecutive tokens are first summed in the
  tile, as differences of one prefix sum shared by the time tables (a sequence's old events share
  the clamped last bucket, a hot address for atomics). Not deterministic. fp32 tables take the
  atomics in their gradient itself; lower-precision tables need an fp32 gradient of their size
  (extra memory O(N D)).
- ``default_scatter`` picks the backward when the caller names none: "atomic" (the faster one) unless
  its extra memory would exceed O(L D); with ``torch.use_deterministic_algorithms(True)`` the sort
  backward is always used.
- Per-token integer work is kept small: the age is capped at width * (count - 1) and divided in
  int32 when every scale allows it, and the Philox counter is int32 below 2^31 groups of four.
- Indices are clamped into their tables (ids, positions, sequences), so malformed inputs that
  skipped the checks cannot read or write out of bounds.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from hstu_kernels.custom_op import autograd_custom_op
from hstu_kernels.dropout import draw_seed, kernel_dropout_args, seed_tensor
from hstu_kernels.ops.sequence_fusion import SCATTER_VARIANTS
from hstu_kernels.triton.common import KERNELS_INTERPRETED, block_dim, cdiv, dropout_counters_wide, dropout_keep

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TIME_SCALES = 4  # time-table slots of the kernels (the configs use up to three: hour, day, week)

MAX_BLOCK_D = 256  # widest column block; wider rows take several column blocks
# Token tiles [BLOCK_T, BLOCK_D] of each pass (GPU sizes from profiler sweeps on an H100, kernel notes): the
# forward 4096 elements; the atomic backward 32 tokens up to 4096 elements (D = 50: 32, D = 256: 16), where
# longer tiles merge more runs of one time bucket before the atomics (at 1M x 50, 16 and 64 tokens took 1.08x
# and 1.23x longer than 32; wider tiles spill registers at D = 256); the sort backward's keys pass 2048 elements.
# The interpreter's cost is per program and per element: 512-element tiles everywhere.
FORWARD_TILE_ELEMENTS = 512 if KERNELS_INTERPRETED else 4096
KEYS_TILE_ELEMENTS = 512 if KERNELS_INTERPRETED else 2048
ATOMIC_TILE_TOKENS = None if KERNELS_INTERPRETED else 32  # None: KEYS_TILE_ELEMENTS // BLOCK_D
ATOMIC_TILE_ELEMENTS = 4096
SEGMENT_ELEMENTS = 512 if KERNELS_INTERPRETED else 2048  # elements per row tile of the segmented reduction
TARGET_SEGMENT_PROGRAMS = 4096  # level-0 chunks are sized to give about this many programs
MAX_CHUNK = 1024
KEY_PAD = tl.constexpr(2**31 - 1)  # key of rows past the end of a chunk: above every real key


# --------------------------------------------------------------------------------------------
# Per-token context
# --------------------------------------------------------------------------------------------
@triton.jit
def _token_context(seq_offsets, timestamps, tokens, tokens_ok, num_sequences, search_steps, max_position,
                   FROM_END: tl.constexpr, HAS_TIME: tl.constexpr):
    """(position in its sequence, age = max(t_last - t, 0) in int64 seconds) of each token.

    The sequence is the number of offsets[1..B] <= token (searchsorted right), by a branchless binary
    search of ``search_steps`` = bit_length(B) steps: the interval [lo, hi) at least halves each step.
    """
    lo = tl.zeros_like(tokens)
    hi = lo + num_sequences
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        searching = mid < hi
        bound = tl.load(seq_offsets + 1 + mid, mask=searching & tokens_ok, other=0)
        right = searching & (bound <= tokens)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(right, hi, mid)
    sequence = tl.minimum(lo, num_sequences - 1)
    start = tl.load(seq_offsets + sequence, mask=tokens_ok, other=0).to(tl.int32)
    end = tl.load(seq_offsets + sequence + 1, mask=tokens_ok, other=1).to(tl.int32)
    if FROM_END:
        position = end - 1 - tokens
    else:
        position = tokens - start
    position = tl.minimum(tl.maximum(position, 0), max_position - 1)
    age = tl.zeros(tokens.shape, tl.int64)
    if HAS_TIME:
        last = tl.maximum(end - 1, 0)
        t_last = tl.load(timestamps + last, mask=tokens_ok, other=0)
        t = tl.load(timestamps + tokens, mask=tokens_ok, other=0)
        age = tl.maximum(t_last - t, 0)
    return position, age


@triton.jit
def _bucket(age, width, count, SMALL_AGES: tl.constexpr):
    """min(age // width, count - 1) as int32 (age >= 0 and width > 0, so // is the floor).

    SMALL_AGES (width * (count - 1) < 2^31 for every scale): the age is capped at width * (count - 1),
    which leaves the bucket unchanged, and divided in int32 (a 64-bit division is several times dearer).
    """
    if SMALL_AGES:
        capped = tl.minimum(age, (count - 1) * width).to(tl.int32)
        bucket = capped // width
    else:
        bucket = tl.minimum(age // width, count - 1).to(tl.int32)
    return bucket


@triton.jit
def _tile_mask(rows_ok, cols, D: tl.constexpr, EVEN_D: tl.constexpr):
    """Row mask, with a column mask only where the last column block is partial (column masks stop
    loads from being vectorised)."""
    if EVEN_D:
        mask = rows_ok[:, None]
    else:
        mask = rows_ok[:, None] & (cols[None, :] < D)
    return mask


@triton.jit
def _gather_rows(table, rows, cols, mask, D: tl.constexpr):
    """table[rows] for a [T, BLOCK_D] tile, in fp32 (row indices in int64: N * D may pass 2^31)."""
    return tl.load(table + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _kept(values, seed_ptr, tokens, D: tl.constexpr, keep_from, keep_scale, BLOCK_D: tl.constexpr,
          WIDE_COUNTERS: tl.constexpr):
    """Inverted dropout of the tile at column block ``program_id(1)`` of the [L, D] output, with the
    mask of ``hstu_kernels.dropout`` (one Philox evaluation per eight columns of a token's row; the
    column blocks start at multiples of BLOCK_D >= 16, hence of 8); ``keep_from``: the smallest draw kept."""
    keep = dropout_keep(seed_ptr, tokens, tl.program_id(1) * BLOCK_D, D, keep_from, BLOCK_D, WIDE_COUNTERS)
    return tl.where(keep, values * keep_scale, 0.0)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _sequence_fusion_fwd_kernel(
    item_ids, timestamps, seq_offsets, seed_ptr, item_table, pos_table, time0, time1, time2, time3, out,
    num_tokens, num_sequences, search_steps, num_items, max_position,
    width0, count0, width1, count1, width2, count2, width3, count3,
    scale, keep_from, keep_scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    NUM_SCALES: tl.constexpr, SMALL_AGES: tl.constexpr, FROM_END: tl.constexpr, DROPOUT: tl.constexpr,
    WIDE_COUNTERS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tokens_ok = tokens < num_tokens
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = _tile_mask(tokens_ok, cols, D, EVEN_D)
    ids = tl.load(item_ids + tokens, mask=tokens_ok, other=0)
    ids = tl.minimum(tl.maximum(ids, 0), num_items - 1)
    position, age = _token_context(seq_offsets, timestamps, tokens, tokens_ok, num_sequences, search_steps,
                                   max_position, FROM_END, NUM_SCALES > 0)
    acc = _gather_rows(item_table, ids, cols, mask, D) * scale
    acc += _gather_rows(pos_table, position, cols, mask, D)
    if NUM_SCALES > 0:
        acc += _gather_rows(time0, _bucket(age, width0, count0, SMALL_AGES), cols, mask, D)
    if NUM_SCALES > 1:
        acc += _gather_rows(time1, _bucket(age, width1, count1, SMALL_AGES), cols, mask, D)
    if NUM_SCALES > 2:
        acc += _gather_rows(time2, _bucket(age, width2, count2, SMALL_AGES), cols, mask, D)
    if NUM_SCALES > 3:
        acc += _gather_rows(time3, _bucket(age, width3, count3, SMALL_AGES), cols, mask, D)
    if DROPOUT:
        acc = _kept(acc, seed_ptr, tokens, D, keep_from, keep_scale, BLOCK_D, WIDE_COUNTERS)
    tl.store(out + tokens.to(tl.int64)[:, None] * D + cols[None, :], acc.to(out.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Backward, sort-based: keys (+ masked gradient), one stable sort, segmented reduction by levels
# --------------------------------------------------------------------------------------------
@triton.jit
def _scatter_keys_kernel(
    item_ids, timestamps, seq_offsets, seed_ptr, grad_out, grad_kept, keys,
    num_tokens, num_sequences, search_steps, num_items, max_position,
    width0, count0, width1, count1, width2, count2, width3, count3,
    pos_base, time_base0, time_base1, time_base2, time_base3, keep_from, keep_scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    NUM_SCALES: tl.constexpr, SMALL_AGES: tl.constexpr, FROM_END: tl.constexpr, DROPOUT: tl.constexpr,
    WIDE_COUNTERS: tl.constexpr,
):
    """keys[slot, t]: the row of token t in table ``slot`` plus the table's key base (item ids,
    positions, then each time table's buckets); with dropout also grad_kept = grad_out * keep / (1 - p)."""
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tokens_ok = tokens < num_tokens
    if tl.program_id(1) == 0:
        ids = tl.load(item_ids + tokens, mask=tokens_ok, other=0)
        ids = tl.minimum(tl.maximum(ids, 0), num_items - 1).to(tl.int32)
        position, age = _token_context(seq_offsets, timestamps, tokens, tokens_ok, num_sequences, search_steps,
                                       max_position, FROM_END, NUM_SCALES > 0)
        tl.store(keys + tokens, ids, mask=tokens_ok)
        tl.store(keys + num_tokens + tokens, pos_base + position, mask=tokens_ok)
        if NUM_SCALES > 0:
            key = time_base0 + _bucket(age, width0, count0, SMALL_AGES)
            tl.store(keys + 2 * num_tokens + tokens, key, mask=tokens_ok)
        if NUM_SCALES > 1:
            key = time_base1 + _bucket(age, width1, count1, SMALL_AGES)
            tl.store(keys + 3 * num_tokens + tokens, key, mask=tokens_ok)
        if NUM_SCALES > 2:
            key = time_base2 + _bucket(age, width2, count2, SMALL_AGES)
            tl.store(keys + 4 * num_tokens + tokens, key, mask=tokens_ok)
        if NUM_SCALES > 3:
            key = time_base3 + _bucket(age, width3, count3, SMALL_AGES)
            tl.store(keys + 5 * num_tokens + tokens, key, mask=tokens_ok)
    if DROPOUT:
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = _tile_mask(tokens_ok, cols, D, EVEN_D)
        rows = tokens.to(tl.int64)[:, None] * D + cols[None, :]
        grad = tl.load(grad_out + rows, mask=mask, other=0.0).to(tl.float32)
        grad = _kept(grad, seed_ptr, tokens, D, keep_from, keep_scale, BLOCK_D, WIDE_COUNTERS)
        tl.store(grad_kept + rows, grad.to(grad_kept.dtype.element_ty), mask=mask)


@triton.jit
def _segmented_sums(starts, values, ROWS: tl.constexpr, LOG_ROWS: tl.constexpr):
    """Inclusive segmented sums down the rows of ``values`` [ROWS, C] (fp32), a segment starting at
    each row flagged in ``starts`` [ROWS] (int32): log2(ROWS) shift-and-add steps in a fixed order
    (Hillis-Steele), the shifts by ``tl.gather``."""
    rows = tl.arange(0, ROWS)
    open_run = starts
    for step in tl.static_range(LOG_ROWS):
        shift = 1 << step
        source = tl.maximum(rows - shift, 0)
        earlier = tl.gather(values, tl.broadcast_to(source[:, None], values.shape), 0)
        earlier_open = tl.gather(open_run, source, 0)
        take = (rows >= shift) & (open_run == 0)
        values = values + tl.where(take[:, None], earlier, 0.0)
        open_run = tl.where(rows >= shift, open_run | earlier_open, open_run)
    return values


@triton.jit
def _segment_sum_kernel(
    keys, perm, rows, grad0, grad1, grad2, grad3, grad4, grad5, next_keys, next_rows,
    entries, chunk, tokens_per_slot, next_entries,
    base0, base1, base2, base3, base4, base5, scale,
    D: tl.constexpr, BLOCK_R: tl.constexpr, LOG_R: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    GATHER: tl.constexpr, LAST: tl.constexpr,
):
    """One level of the segmented reduction, program (chunk, slot, column block).

    Input: ``entries`` sorted (key, row) pairs per slot: at level 0 rows of ``rows`` (the [L, D]
    gradient) gathered through ``perm`` (GATHER), above it fp32 rows of the previous level. Runs of
    equal keys are summed in fp32 with a carry between row tiles. A run that neither starts nor ends
    the chunk holds every entry of its key, so it is written to the slot's gradient; the chunk's
    first and last runs become two partial rows of the next level (the last as zeros when the chunk
    is a single run). At the last level (one chunk) every run is written.
    """
    c = tl.program_id(0)
    slot = tl.program_id(1)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    grad = grad0
    if slot == 1:
        grad = grad1
    elif slot == 2:
        grad = grad2
    elif slot == 3:
        grad = grad3
    elif slot == 4:
        grad = grad4
    elif slot == 5:
        grad = grad5
    base = tl.where(slot == 1, base1, tl.where(slot == 2, base2, tl.where(slot == 3, base3, tl.where(
        slot == 4, base4, tl.where(slot == 5, base5, base0)))))
    row_scale = tl.where(slot == 0, scale, 1.0)
    slot_keys = keys + slot.to(tl.int64) * entries
    start = c * chunk
    stop = tl.minimum(start + chunk, entries)
    first_key = tl.load(slot_keys + start)
    last_key = tl.load(slot_keys + stop - 1)
    single_run = first_key == last_key
    next_row = slot.to(tl.int64) * next_entries + 2 * c
    if not LAST:
        if tl.program_id(2) == 0:
            pair = tl.arange(0, 2)
            tl.store(next_keys + next_row + pair, tl.where(pair == 0, first_key, last_key))
    carry = tl.zeros([BLOCK_D], tl.float32)
    carry_key = tl.full([], -1, tl.int32)
    for tile_start in range(start, stop, BLOCK_R):
        idx = tile_start + tl.arange(0, BLOCK_R)
        idx_ok = idx < stop
        key = tl.load(slot_keys + idx, mask=idx_ok, other=KEY_PAD)
        following = tl.load(slot_keys + idx + 1, mask=(idx + 1) < stop, other=KEY_PAD)
        mask = _tile_mask(idx_ok, cols, D, EVEN_D)
        if GATHER:
            token = tl.load(perm + slot.to(tl.int64) * entries + idx, mask=idx_ok, other=0)
            token -= slot.to(tl.int64) * tokens_per_slot
            values = tl.load(rows + token[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        else:
            values = tl.load(rows + (slot.to(tl.int64) * entries + idx)[:, None] * D + cols[None, :], mask=mask,
                             other=0.0)
        continues = (idx == tile_start) & (key == carry_key)
        values += tl.where(continues[:, None], carry[None, :], 0.0)
        preceding = tl.load(slot_keys + idx - 1, mask=idx_ok & (idx > tile_start), other=-1)
        sums = _segmented_sums((key != preceding).to(tl.int32), values, BLOCK_R, LOG_R)
        run_end = idx_ok & ((key != following) | (idx == stop - 1))
        if LAST:
            final = run_end
        else:
            final = run_end & (key != first_key) & (key != last_key)
            first_end = run_end & (key == first_key)
            tl.store(next_rows + (next_row + 0 * idx)[:, None] * D + cols[None, :], sums,
                     mask=_tile_mask(first_end, cols, D, EVEN_D))
            last_end = run_end & (idx == stop - 1)
            tl.store(next_rows + (next_row + 1 + 0 * idx)[:, None] * D + cols[None, :],
                     tl.where(single_run, 0.0, sums), mask=_tile_mask(last_end, cols, D, EVEN_D))
        out_rows = (key - base).to(tl.int64)
        tl.store(grad + out_rows[:, None] * D + cols[None, :], (sums * row_scale).to(grad.dtype.element_ty),
                 mask=_tile_mask(final, cols, D, EVEN_D))
        tile_last = tl.minimum(tile_start + BLOCK_R, stop) - 1
        carry = tl.sum(tl.where((idx == tile_last)[:, None], sums, 0.0), axis=0)
        carry_key = tl.max(tl.where(idx == tile_last, key, -1), axis=0)


# --------------------------------------------------------------------------------------------
# Backward, atomic: one pass, fp32 atomics
# --------------------------------------------------------------------------------------------
@triton.jit
def _add_runs(acc, bucket, grad, prefix, tokens_ok, cols, mask, D: tl.constexpr, BLOCK_T: tl.constexpr):
    """acc[bucket] += grad for a tile, by runs of equal buckets among consecutive tokens: the run [a, b]
    sums to prefix[b] - prefix[a - 1] (``prefix``: grad's inclusive sums down the tile, shared by every
    time table), added as prefix[b] at its end and grad[a] - prefix[a] at its start (none at the tile's
    first token); a run of one token adds grad itself. At most two atomics a run."""
    index = tl.arange(0, BLOCK_T)
    bucket = tl.where(tokens_ok, bucket, -1)
    before = tl.gather(bucket, tl.maximum(index - 1, 0), 0)
    after = tl.gather(bucket, tl.minimum(index + 1, BLOCK_T - 1), 0)
    starts = (index > 0) & (bucket != before)
    ends = (index == BLOCK_T - 1) | (bucket != after)
    value = tl.where(ends[:, None], tl.where(starts[:, None], grad, prefix), grad - prefix)
    tl.atomic_add(acc + bucket.to(tl.int64)[:, None] * D + cols[None, :], value,
                  mask=mask & (tokens_ok & (starts | ends))[:, None], sem="relaxed")


@triton.jit
def _scatter_atomic_kernel(
    item_ids, timestamps, seq_offsets, seed_ptr, grad_out, item_acc, pos_acc, acc0, acc1, acc2, acc3,
    num_tokens, num_sequences, search_steps, num_items, max_position,
    width0, count0, width1, count1, width2, count2, width3, count3,
    scale, keep_from, keep_scale,
    D: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
    NUM_SCALES: tl.constexpr, SMALL_AGES: tl.constexpr, FROM_END: tl.constexpr, DROPOUT: tl.constexpr,
    WIDE_COUNTERS: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tokens_ok = tokens < num_tokens
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = _tile_mask(tokens_ok, cols, D, EVEN_D)
    grad = tl.load(grad_out + tokens.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if DROPOUT:
        grad = _kept(grad, seed_ptr, tokens, D, keep_from, keep_scale, BLOCK_D, WIDE_COUNTERS)
    ids = tl.load(item_ids + tokens, mask=tokens_ok, other=0)
    ids = tl.minimum(tl.maximum(ids, 0), num_items - 1)
    position, age = _token_context(seq_offsets, timestamps, tokens, tokens_ok, num_sequences, search_steps,
                                   max_position, FROM_END, NUM_SCALES > 0)
    tl.atomic_add(item_acc + ids.to(tl.int64)[:, None] * D + cols[None, :], grad * scale, mask=mask, sem="relaxed")
    tl.atomic_add(pos_acc + position.to(tl.int64)[:, None] * D + cols[None, :], grad, mask=mask, sem="relaxed")
    if NUM_SCALES > 0:
        prefix = tl.cumsum(grad, axis=0)
        _add_runs(acc0, _bucket(age, width0, count0, SMALL_AGES), grad, prefix, tokens_ok, cols, mask, D,
                  BLOCK_T)
    if NUM_SCALES > 1:
        _add_runs(acc1, _bucket(age, width1, count1, SMALL_AGES), grad, prefix, tokens_ok, cols, mask, D,
                  BLOCK_T)
    if NUM_SCALES > 2:
        _add_runs(acc2, _bucket(age, width2, count2, SMALL_AGES), grad, prefix, tokens_ok, cols, mask, D,
                  BLOCK_T)
    if NUM_SCALES > 3:
        _add_runs(acc3, _bucket(age, width3, count3, SMALL_AGES), grad, prefix, tokens_ok, cols, mask, D,
                  BLOCK_T)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _tile_config(dim: int) -> tuple[int, int, bool]:
    """(BLOCK_D, column blocks, EVEN_D) of the token-tile kernels."""
    block_d = min(block_dim(dim), MAX_BLOCK_D)
    return block_d, cdiv(dim, block_d), dim % block_d == 0


@functools.lru_cache(maxsize=None)
def _tokens_per_tile(block_d: int) -> dict[str, int]:
    """BLOCK_T of each token-tile pass: "forward", "keys" (the sort backward) and "atomic"."""
    keys = max(1, KEYS_TILE_ELEMENTS // block_d)
    atomic = min(ATOMIC_TILE_TOKENS, ATOMIC_TILE_ELEMENTS // block_d) if ATOMIC_TILE_TOKENS else keys
    return {"forward": max(1, FORWARD_TILE_ELEMENTS // block_d), "keys": keys, "atomic": atomic}


@functools.lru_cache(maxsize=None)
def _segment_levels(num_tokens: int, dim: int, slots: int) -> tuple[int, tuple[tuple[int, int], ...]]:
    """(BLOCK_R, levels of (entries per slot, chunk)) of the segmented reduction: level 0 has the L
    sorted entries of each slot in chunks sized for about TARGET_SEGMENT_PROGRAMS programs; each
    level passes two rows per chunk to the next, until one chunk holds them all."""
    block_r = max(2, SEGMENT_ELEMENTS // min(block_dim(dim), MAX_BLOCK_D))
    levels = []
    entries = num_tokens
    chunk = 1 << max(0, (slots * num_tokens // TARGET_SEGMENT_PROGRAMS).bit_length() - 1)
    chunk = min(MAX_CHUNK, max(4 * block_r, chunk))
    while entries > chunk:
        levels.append((entries, chunk))
        entries = 2 * cdiv(entries, chunk)
        chunk = 8 * block_r
    levels.append((entries, entries))
    return block_r, tuple(levels)


def _time_scale_args(time_scales: Sequence[int], counts: Sequence[int]) -> list[int]:
    """width0, count0, ..., width3, count3 (unused slots: 1, 1)."""
    args = []
    for s in range(MAX_TIME_SCALES):
        args += [time_scales[s], counts[s]] if s < len(counts) else [1, 1]
    return args


class _Problem:
    """The shape-derived launch arguments shared by the forward and both backwards."""

    def __init__(self, item_ids, seq_offsets, item_table, pos_table, time_tables, widths, counts, dropout_p):
        self.num_tokens = item_ids.shape[0]
        self.dim = item_table.shape[1]
        self.num_sequences = seq_offsets.shape[0] - 1
        self.num_scales = len(counts)
        self.block_d, self.col_blocks, self.even_d = _tile_config(self.dim)
        self.tokens_per_tile = _tokens_per_tile(self.block_d)
        self.context = (self.num_tokens, self.num_sequences, self.num_sequences.bit_length(), item_table.shape[0],
                        pos_table.shape[0], *_time_scale_args(widths, counts))
        self.small_ages = all(width * (count - 1) < 2**31 for width, count in zip(widths, counts))
        self.dropout = dropout_p > 0.0
        self.dropout_args = kernel_dropout_args(dropout_p)
        tables = [t for t in time_tables if t is not None]
        self.time_slots = tables + [item_table] * (MAX_TIME_SCALES - len(tables))  # unused slots: any pointer

    def grid(self, kernel: str) -> tuple[int, int]:
        """Programs of a token-tile pass (``_tokens_per_tile``'s names)."""
        return cdiv(self.num_tokens, self.tokens_per_tile[kernel]), self.col_blocks

    def constants(self, kernel: str, from_end: bool) -> dict:
        return dict(D=self.dim, BLOCK_T=self.tokens_per_tile[kernel], BLOCK_D=self.block_d, EVEN_D=self.even_d,
                    NUM_SCALES=self.num_scales, SMALL_AGES=self.small_ages, FROM_END=from_end, DROPOUT=self.dropout,
                    WIDE_COUNTERS=dropout_counters_wide(self.num_tokens, self.dim), num_warps=4)

    @property
    def empty(self) -> bool:
        return self.num_tokens == 0 or self.num_sequences <= 0 or self.dim == 0


def sequence_fusion_forward(item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, seed,
                            widths, counts, scale, dropout_p, position_from_end):
    """Launch the forward kernel -> [L, D] in the tables' dtype."""
    problem = _Problem(item_ids, seq_offsets, item_table, pos_table, time_tables, widths, counts, dropout_p)
    out = torch.empty((problem.num_tokens, problem.dim), dtype=item_table.dtype, device=item_table.device)
    if problem.empty:
        return out.zero_()
    _sequence_fusion_fwd_kernel[problem.grid("forward")](
        item_ids, timestamps, seq_offsets, seed if problem.dropout else seq_offsets, item_table, pos_table,
        *problem.time_slots, out, *problem.context, float(scale), *problem.dropout_args,
        **problem.constants("forward", position_from_end),
    )
    return out


def _zero_gradients(item_table, pos_table, time_tables, dtype=None) -> list[torch.Tensor]:
    return [torch.zeros(t.shape, dtype=dtype or t.dtype, device=t.device)
            for t in (item_table, pos_table, *[t for t in time_tables if t is not None])]


def _sort_backward(problem, grad_out, item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables,
                   seed, scale, position_from_end):
    grads = _zero_gradients(item_table, pos_table, time_tables)
    slots = len(grads)
    num_tokens, dim = problem.num_tokens, problem.dim
    row_counts = [g.shape[0] for g in grads]
    bases = [sum(row_counts[:s]) for s in range(slots)]
    if bases[-1] + row_counts[-1] >= 2**31 or slots * num_tokens >= 2**31:
        raise ValueError(f"sequence_fusion: {bases[-1] + row_counts[-1]} table rows and {slots} x {num_tokens} "
                         "sort keys; the sort backward indexes both in int32 (below 2^31)")
    keys = torch.empty((slots, num_tokens), dtype=torch.int32, device=grad_out.device)
    grad_kept = torch.empty_like(grad_out) if problem.dropout else grad_out
    time_bases = bases[2:] + [0] * (MAX_TIME_SCALES - (slots - 2))
    _scatter_keys_kernel[problem.grid("keys")](
        item_ids, timestamps, seq_offsets, seed if problem.dropout else seq_offsets, grad_out, grad_kept, keys,
        *problem.context, bases[1], *time_bases, *problem.dropout_args, **problem.constants("keys", position_from_end),
    )
    sorted_keys, perm = torch.sort(keys.view(-1), stable=True)
    block_r, levels = _segment_levels(num_tokens, dim, slots)
    grad_slots = grads + [grads[0]] * (2 + MAX_TIME_SCALES - slots)
    base_args = bases + [0] * (2 + MAX_TIME_SCALES - slots)
    level_keys, level_rows = sorted_keys, grad_kept
    for depth, (entries, chunk) in enumerate(levels):
        last = depth == len(levels) - 1
        chunks = cdiv(entries, chunk)
        next_entries = 0 if last else 2 * chunks
        next_keys = torch.empty((slots, next_entries), dtype=torch.int32, device=grad_out.device)
        next_rows = torch.empty((slots, next_entries, dim), dtype=torch.float32, device=grad_out.device)
        _segment_sum_kernel[(chunks, slots, problem.col_blocks)](
            level_keys, perm, level_rows, *grad_slots, next_keys, next_rows,
            entries, chunk, num_tokens, next_entries, *base_args, float(scale),
            D=dim, BLOCK_R=block_r, LOG_R=block_r.bit_length() - 1, BLOCK_D=problem.block_d, EVEN_D=problem.even_d,
            GATHER=depth == 0, LAST=last, num_warps=4,
        )
        level_keys, level_rows = next_keys, next_rows
    return grads


def _atomic_backward(problem, grad_out, item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables,
                     seed, scale, position_from_end):
    accumulators = _zero_gradients(item_table, pos_table, time_tables, dtype=torch.float32)
    time_slots = accumulators[2:] + [accumulators[0]] * (MAX_TIME_SCALES - len(accumulators) + 2)
    _scatter_atomic_kernel[problem.grid("atomic")](
        item_ids, timestamps, seq_offsets, seed if problem.dropout else seq_offsets, grad_out, accumulators[0],
        accumulators[1], *time_slots, *problem.context, float(scale), *problem.dropout_args,
        **problem.constants("atomic", position_from_end),
    )
    tables = [item_table, pos_table, *[t for t in time_tables if t is not None]]
    return [acc.to(table.dtype) for acc, table in zip(accumulators, tables)]


def sequence_fusion_backward(grad_out, item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, seed,
                             widths, counts, scale, dropout_p, position_from_end, scatter):
    """Launch the backward (``scatter``: "sort" or "atomic") -> gradients of the item table, the
    position table and each time table, in the tables' dtypes."""
    problem = _Problem(item_ids, seq_offsets, item_table, pos_table, time_tables, widths, counts, dropout_p)
    if problem.empty:
        return _zero_gradients(item_table, pos_table, time_tables)
    grad_out = grad_out.contiguous()
    backward = _atomic_backward if scatter == "atomic" else _sort_backward
    return backward(problem, grad_out, item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables, seed,
                    scale, position_from_end)


# --------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile sees opaque ops with fake shapes and a registered VJP)
# --------------------------------------------------------------------------------------------
def _fusion_fwd(
    item_ids: torch.Tensor, timestamps: torch.Tensor, seq_offsets: torch.Tensor,
    item_table: torch.Tensor, pos_table: torch.Tensor,
    time0: Optional[torch.Tensor], time1: Optional[torch.Tensor],
    time2: Optional[torch.Tensor], time3: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], widths: list[int], counts: list[int],
    scale: float, dropout_p: float, position_from_end: bool, scatter: str,
) -> torch.Tensor:
    return sequence_fusion_forward(item_ids, timestamps, seq_offsets, item_table, pos_table,
                                   (time0, time1, time2, time3), seed, widths, counts, scale, dropout_p,
                                   position_from_end)


def _fusion_fwd_fake(item_ids, timestamps, seq_offsets, item_table, pos_table, time0, time1, time2, time3, seed,
                     widths, counts, scale, dropout_p, position_from_end, scatter):
    return item_table.new_empty((item_ids.shape[0], item_table.shape[1]))


def _fusion_bwd(
    grad_out: torch.Tensor, item_ids: torch.Tensor, timestamps: torch.Tensor, seq_offsets: torch.Tensor,
    item_table: torch.Tensor, pos_table: torch.Tensor,
    time0: Optional[torch.Tensor], time1: Optional[torch.Tensor],
    time2: Optional[torch.Tensor], time3: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], widths: list[int], counts: list[int],
    scale: float, dropout_p: float, position_from_end: bool, scatter: str,
) -> list[torch.Tensor]:
    return sequence_fusion_backward(grad_out, item_ids, timestamps, seq_offsets, item_table, pos_table,
                                    (time0, time1, time2, time3), seed, widths, counts, scale, dropout_p,
                                    position_from_end, scatter)


def _fusion_bwd_fake(grad_out, item_ids, timestamps, seq_offsets, item_table, pos_table, time0, time1, time2, time3,
                     seed, widths, counts, scale, dropout_p, position_from_end, scatter):
    return [t.new_empty(t.shape) for t in (item_table, pos_table, time0, time1, time2, time3) if t is not None]


def _setup_context(ctx, inputs, output):
    (item_ids, timestamps, seq_offsets, item_table, pos_table, time0, time1, time2, time3, seed,
     widths, counts, scale, dropout_p, position_from_end, scatter) = inputs
    ctx.save_for_backward(item_ids, timestamps, seq_offsets, item_table, pos_table, time0, time1, time2, time3, seed)
    ctx.arguments = (widths, counts, scale, dropout_p, position_from_end, scatter)


def _gradients(ctx, grad_outputs, backward):
    (grad_out,) = grad_outputs
    item_ids, timestamps, seq_offsets, item_table, pos_table, time0, time1, time2, time3, seed = ctx.saved_tensors
    grads = iter(backward(grad_out, item_ids, timestamps, seq_offsets, item_table, pos_table, time0, time1, time2,
                          time3, seed, *ctx.arguments))
    table_grads = [next(grads) if table is not None else None
                   for table in (item_table, pos_table, time0, time1, time2, time3)]
    table_grads = [g if needed else None for g, needed in zip(table_grads, ctx.needs_input_grad[3:9])]
    return (None, None, None, *table_grads, None, None, None, None, None, None, None)


_fusion = autograd_custom_op(
    "sequence_fusion", forward=_fusion_fwd, forward_fake=_fusion_fwd_fake, backward=_fusion_bwd,
    backward_fake=_fusion_bwd_fake, setup_context=_setup_context, gradients=_gradients,
)


# --------------------------------------------------------------------------------------------
# The Triton backend of hstu_kernels.sequence_fusion (called through the operator registry)
# --------------------------------------------------------------------------------------------
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
    scatter: str | None = None,
) -> torch.Tensor:
    """The input stage on Triton -> [L, D] in the tables' dtype (inputs checked by the caller).

    ``scatter`` picks the backward ("sort" or "atomic"; None: ``default_scatter``); deterministic
    algorithms (``torch.use_deterministic_algorithms``) always get the sort backward.
    """
    if scatter is not None and scatter not in SCATTER_VARIANTS:
        raise ValueError(f"sequence_fusion: scatter must be one of {SCATTER_VARIANTS}, got {scatter!r}")
    device = item_table.device
    p = float(dropout_p) if training else 0.0
    seed_arg = None
    if p > 0.0:
        seed_arg = draw_seed(device) if seed is None else seed_tensor(seed, device)
    if torch.are_deterministic_algorithms_enabled():
        variant = "sort"
    else:
        variant = scatter or default_scatter(item_table, item_ids.shape[0])
    time_tables = list(time_tables)
    slots = time_tables + [None] * (MAX_TIME_SCALES - len(time_tables))
    widths = [int(width) for width, _ in time_scales]
    counts = [int(count) for _, count in time_scales]
    indices = (item_ids.contiguous(), timestamps.contiguous(), seq_offsets.contiguous())
    tables = [t.contiguous() if t is not None else None for t in (item_table, pos_table, *slots)]
    return _fusion(*indices, *tables, seed_arg, widths, counts, float(scale), p, bool(position_from_end), variant)


def default_scatter(item_table: torch.Tensor, num_tokens: int) -> str:
    """The backward when the caller names none: "atomic", the faster (BENCHMARKS.md), while its fp32
    accumulators add at most O(L D) memory: fp32 tables (autocast training) take the atomics in their own
    gradients, and other dtypes need an fp32 copy of each table, allowed up to L item rows; "sort" beyond."""
    return "atomic" if item_table.dtype == torch.float32 or item_table.shape[0] <= num_tokens else "sort"


def unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the Triton kernels cannot run on (item_table, pos_table, *time_tables); None when they can."""
    dtype = tensors[0].dtype
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} is not supported (float16, bfloat16, float32)"
    if dtype == torch.bfloat16 and KERNELS_INTERPRETED:
        return "bfloat16 under TRITON_INTERPRET (the interpreter computes bf16 wrongly)"
    if any(t.dtype != dtype for t in tensors):
        return f"tables of different dtypes {sorted({str(t.dtype) for t in tensors})}; the kernels take one"
    if len(tensors) - 2 > MAX_TIME_SCALES:
        return f"{len(tensors) - 2} time scales; the kernels take up to {MAX_TIME_SCALES}"
    return None
