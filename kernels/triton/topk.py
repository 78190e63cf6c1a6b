"""Triton backend of ``interaction``: ``topk_items``, every query scored against the whole item table,
seen items masked, the top k kept and the target's rank counted, without a [B, I] score matrix
beyond one chunk of queries.

Layers: ``@triton.jit`` kernels -> ``topk_items_forward`` (the launcher: a launch plan cached per
shape, nothing read back) -> the ``torch.library`` op ``hstu_kernels::topk_items``
(a ``triton_op`` on the GPU, so that ``torch.export`` keeps it as one node and AOTInductor compiles
its kernels into the package; under the interpreter a plain custom op with a fake) -> ``topk_items``,
which ``hstu_kernels.topk_items`` dispatches to after its input checks. Forward only: retrieval has
no gradient.

How it computes, and why (kernel notes: ``topk_notes.md``):
- One program per (block of queries, split of the items). It holds its queries in registers (fp32:
  re-read in chunks of D) and streams its split's item tiles through ``tl.dot`` (fp32 accumulation;
  cosine scores are the raw dot scaled by both inverse norms: the inputs are never normalised into
  a copy).
- Exclusions: per tile, one 32-bit word per 32 columns and row masks the scores. A prologue kernel
  sets each query's bits in a bitmap of B * ceil(I / 32) words where that takes at most 64 MiB
  (``exclusion_form``), and a tile loads its words. Beyond, it turns each jagged list into keys
  ``b * (I + 2) + id + 1`` (int32 where B * (I + 2) fits), one ``torch.sort`` puts every list in
  order inside its own segment, and each program walks its rows' sorted lists with one cursor per
  row, reading the keys that fall inside a tile (a window of 16 per row at a time) into its words.
  Repeats cost nothing extra, and nothing is read back on the host.
- The target's score is computed once per row from its own embedding and replaces the target's
  streamed score, so the returned score, the rank and the top-k agree with each other. The rank
  counts unexcluded non-target items scoring >= it (ties count against the model).
- Selection: per row a sorted list of the best KP >= k candidates and an append area of NEW slots.
  A score enters the append area only above the row's current k-th best (positions from a row
  cumsum); when an append area would overflow, the lists are merged (bitonic top-k of the append
  area, then one bitonic merge with the held list) and the thresholds rise. Ties go to the smaller
  item id, which streaming in id order gives for free.
- Splits run side by side; a last kernel merges their lists and sums their rank counts. Extra
  memory is O(B * splits * (KP + NEW)) for the lists plus the sorted keys: never a [B, I] tensor.
- The row selection (where the rule ``selection_for`` sends a call; the streaming kernel is the other
  selection): per chunk of queries (about 2^24 scores, the reference's chunk), one kernel writes
  every score's int32 order key (the same tiles, exclusions and target column as above), per-tile
  rank counts and each group of 32 items' largest key, and one program per (query, segment of at
  most ``ROW_SEGMENT_ITEMS`` keys) holds its keys, leaves out those under the k-th largest group
  maximum (a lower bound on the row's k-th key, searched once a row), builds a threshold bit by bit
  (one count a bit, stopping once exactly k keys are at or above it; no search where no more than k
  are left), gathers the keys above it and the first equal ones (smaller ids first) and sorts those
  k. Several segments' lists go to the streaming kernel's merge (pairwise, up to four lists). Many
  short programs instead of a few long list-merging ones.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from hstu_kernels.normalize import NORM_EPS
from hstu_kernels.reference import topk as reference
from hstu_kernels.triton.common import KERNELS_INTERPRETED, block_dim, cdiv, dot_precision, load_tile

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_DIM = 512
# Above this k the per-row lists outgrow registers: the reference's chunked torch ops run instead.
MAX_TOPK = 2048
# The largest exclusion key (B * (I + 2)) kept in int32 (``exclusion_key_dtype``).
EXCLUSION_KEY_INT32_LIMIT = 2**31 - 1
# Exclusions become a bitmap of B * ceil(I / 32) int32 words where it takes at most this many bytes (the
# reference's chunk of scores: 64 MiB), sorted keys beyond (``exclusion_form``).
EXCLUSION_BITMAP_MAX_BYTES = 2**26
EXCLUSION_FORMS = ("bitmap", "keys")
# Widest merge of the splits' lists (splits rounded up to a power of 2, times KP) per row.
MERGE_WIDTH = 8192
MAX_SPLITS = 64
# The row selection holds at most this many of a query's order keys in one program (a segment of its row);
# a row of more splits into segments whose sorted lists ``_topk_merge_kernel`` merges, up to MERGE_WIDTH
# slots a row (``row_selection_items_limit``).
ROW_SEGMENT_ITEMS = 8192
# The rule's bounds: catalogues of up to four segments (the most its time models were checked at: 26,744
# items; at 100,003 streaming ran faster), batches of at least this many queries (the fewest checked: 16 fp32
# queries, BENCHMARKS.md) may take the row selection; smaller batches (a served user's request) stream, as
# timed in serving.
ROW_SELECT_MAX_ITEMS = 4 * ROW_SEGMENT_ITEMS
ROW_SELECT_MIN_QUERIES = 16
# The rule's time models (ms), fitted to H100 kernel times with bitmap exclusions, bf16, B in {1,024, 6,040},
# I in {3,706, 8,000, 26,744}, k in {10, 200} (BENCHMARKS.md, ``interaction``): the row selection takes a fixed
# part plus a time per score, 14-15 ps with the 64-item score tiles at D <= ``SCORE_TILES_MAX_DIM`` and 17-18 ps
# otherwise at k = 200, 18-29% less at k = 10 (one 16-entry list) and 5-22% less at k = 50 and 100 (eight shapes
# of 512-6,040 queries over 3,706-26,744 items; ``ROWS_MID_LIST_FACTOR`` for lists of 32-128 entries, k = 17-128);
# the streaming kernel a time per unit of its plan's ``_split_cost``, 2.0-2.6e-5 ms at k = 200 and 2.8-4.7e-5 at
# k = 10.
ROWS_FIXED_MS = 0.015
ROWS_MS_PER_SCORE = 1.75e-8
ROWS_SMALL_DIM_MS_PER_SCORE = 1.45e-8
ROWS_SHORT_LIST_FACTOR = 0.75
ROWS_MID_LIST_FACTOR = 0.87
ROWS_MID_LIST_MAX_LENGTH = 128  # the longest list that takes ROWS_MID_LIST_FACTOR
STREAM_MS_PER_COST = 2.25e-5
STREAM_SHORT_LIST_MS_PER_COST = 3.6e-5
# Warps of the row selection's two kernels, timed on an H100: with 8, the 64 x 128 score tiles took 1.05-1.32x
# the time of 4, and the selection 1.32x at k = 10 and at 8,000 items (2-3% less at 3,706 items with k = 200).
ROWS_WARPS = 4
# The score-keys kernel takes two item tiles a program (its queries and targets loaded once) at D <= 64 in
# bf16/fp16 where that still leaves a program a multiprocessor (``_score_tiles``). H100, with 128-item tiles,
# 1,024 x 50 x 26,744 x 200: 161 against 183 us for one tile, 184 for four, 204 for eight; 1,024 x 50 x 3,706 x
# 200: 21 against 23. With the row selection's 64-item tiles below, two against one: 104 against 161 us at
# 1,024 x 50 x 26,744 x 200, 585 against 930 at 6,040 x 50 x 26,744 x 200, 84 against 124 at 6,040 x 50 x 3,706 x
# 10, 16 against 18 at 1,024 x 50 x 3,706 x 200 (four and eight not re-timed).
SCORE_TILES_MAX_DIM = 64
# At those D the row selection's score tiles are 64 items wide on the GPU (128 in the streaming kernel), and each
# row's keys take I rounded up to 16 slots (``_RowsPlan.key_stride``), so every 16-key run of a store is aligned
# and masked as one (149-168 registers a thread at 3,706-26,744 items, against 235-255). The whole call on one
# H100, against 128-item tiles over unpadded rows: 0.417 against 0.475 ms at 1,024 x 50 x 26,744 x 200, 0.254
# against 0.320 at 6,040 x 50 x 3,706 x 10; 12-22% less at the five D = 50 shapes timed.
ROWS_SMALL_DIM_BLOCK_N = 64
SELECTIONS = ("stream", "rows")
INT32_MIN = tl.constexpr(-2**31)  # the order key of no candidate (a -inf, NaN or excluded score)
INT64_MIN = tl.constexpr(-2**63)


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------
@triton.jit
def _inverse_norm(x, EPS_SQUARED: tl.constexpr):
    """1 / max(||row||, eps) of an fp32 tile, as ``hstu_kernels.normalize.l2_normalize`` scales."""
    return tl.rsqrt(tl.maximum(tl.sum(x * x, axis=1), EPS_SQUARED))


@triton.jit
def _ordered_bits(value):
    """int32 that orders as the fp32 ``value`` (for non-NaN values)."""
    bits = value.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _pack_ordered(ordered, index):
    """int64 keys that order as (``_ordered_bits`` of a value, then smaller int32 index first)."""
    return (ordered.to(tl.int64) << 32) | ((~index).to(tl.int64) & 0xFFFFFFFF)


@triton.jit
def _pack(value, index):
    """int64 keys that order as (fp32 value, then smaller int32 index first); index -1 packs lowest."""
    return _pack_ordered(_ordered_bits(value), index)


@triton.jit
def _unpack(key):
    ordered = (key >> 32).to(tl.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), ~(key.to(tl.int32))


# Sorting the rows of [R, N] tiles of int64 keys (R, N powers of 2). Compiled, Triton's own bitonic
# networks (``tl.topk``, ``tl.flip``, ``tl.bitonic_merge``). Interpreted, the same networks built
# from builtins that numpy evaluates at once: Triton's library reads each element's partner with an
# xor-sum, which the interpreter runs element by element in Python, and every jit-function call
# costs it ~10 ms, so these helpers are few and flat.
INTERPRETED = tl.constexpr(KERNELS_INTERPRETED)


@triton.constexpr_function
def _log2(n):
    return int(n).bit_length() - 1


@triton.constexpr_function
def _axis_last(n_dims, axis):
    return [d for d in range(n_dims) if d != axis] + [axis]


@triton.constexpr_function
def _axis_restored(n_dims, axis):
    order = [d for d in range(n_dims) if d != axis] + [axis]
    return [order.index(d) for d in range(n_dims)]


@triton.jit
def _bitonic_stage_interpreted(h, stage: tl.constexpr, order: tl.constexpr):
    """``stage`` rounds of compare-and-swap on the innermost axes of a hypercube [2] * n; order 0
    ascending, 1 descending, 2 alternating between neighbouring runs (the build-up of a sort)."""
    n_dims: tl.constexpr = _log2(h.numel)
    if order == 2:
        flip = tl.reshape(tl.arange(0, 2), [1] * (n_dims - stage - 1) + [2] + [1] * stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        bit: tl.constexpr = stage - 1 - i
        low, high = tl.split(tl.permute(h, _axis_last(n_dims, n_dims - 1 - bit)))
        other = tl.permute(tl.join(high, low), _axis_restored(n_dims, n_dims - 1 - bit))
        right = tl.reshape(tl.arange(0, 2), [1] * (n_dims - bit - 1) + [2] + [1] * bit)
        h = tl.where((h > other) != (flip ^ right).to(tl.int1), other, h)
    return h


@triton.jit
def _top_rows(x, KP: tl.constexpr):
    """[R, KP]: each row's KP largest of x [R, N], N >= KP, sorted descending (bitonic top-k)."""
    if INTERPRETED:
        LOG_N: tl.constexpr = _log2(x.shape[1])
        LOG_K: tl.constexpr = _log2(KP)
        h = tl.reshape(x, [2] * _log2(x.numel))
        for i in tl.static_range(1, LOG_K + 1):
            h = _bitonic_stage_interpreted(h, i, 2 if i < LOG_N else 1)
        for i in tl.static_range(LOG_K + 1, LOG_N + 1):
            n_dims: tl.constexpr = _log2(h.numel)
            low, high = tl.split(tl.permute(h, _axis_last(n_dims, n_dims - 1 - LOG_K)))
            h = _bitonic_stage_interpreted(tl.maximum(low, high), LOG_K, 2 if i < LOG_N else 1)
        top = tl.reshape(h, [x.shape[0], KP])
    else:
        top = tl.topk(x, KP)
    return top


@triton.jit
def _merge_sorted_rows(high, low):
    """Each row's best N of two descending-sorted [R, N] tiles, sorted descending: the elementwise
    max of one against the other reversed is bitonic and holds them; one bitonic merge sorts it."""
    if INTERPRETED:
        LOG_N: tl.constexpr = _log2(high.shape[1])
        n_dims: tl.constexpr = _log2(high.numel)
        h = tl.reshape(low, [2] * n_dims)
        for bit in tl.static_range(LOG_N):  # swapping along every bit of the index reverses a row
            first, second = tl.split(tl.permute(h, _axis_last(n_dims, n_dims - 1 - bit)))
            h = tl.permute(tl.join(second, first), _axis_restored(n_dims, n_dims - 1 - bit))
        h = tl.maximum(tl.reshape(high, [2] * n_dims), h)
        best = tl.reshape(_bitonic_stage_interpreted(h, LOG_N, 1), high.shape)
    else:
        best = tl.bitonic_merge(tl.maximum(high, tl.flip(low, 1)), descending=True)
    return best


@triton.jit
def _merge_sorted_lists(keys, LISTS: tl.constexpr, KP: tl.constexpr):
    """[R, KP]: each row's KP largest of LISTS descending-sorted lists of KP (keys [R, LISTS * KP]),
    sorted descending: a tree of pairwise ``_merge_sorted_rows``."""
    ROWS: tl.constexpr = keys.shape[0]
    lists = tl.reshape(keys, [ROWS * LISTS, KP])
    for level in tl.static_range(_log2(LISTS)):
        pairs = tl.permute(tl.reshape(lists, [ROWS * (LISTS >> (level + 1)), 2, KP]), [0, 2, 1])
        first, second = tl.split(pairs)
        lists = _merge_sorted_rows(first, second)
    return lists


@triton.jit
def _lower_bound(keys, first, last, value):
    """Per row: the first position in [first, last) of the sorted ``keys`` holding a key >= value.
    The loop condition is a scalar carried by the loop (see ``_exclusion_words``)."""
    searching = tl.max(last - first, axis=0) > 0
    while searching:
        active = first < last
        middle = (first + last) // 2
        key = tl.load(keys + middle, mask=active, other=0)
        right = active & (key < value)
        first = tl.where(right, middle + 1, first)
        last = tl.where(active & ~right, middle, last)
        searching = tl.max(last - first, axis=0) > 0
    return first


@triton.jit
def _exclusion_cursor(exclude_keys, exclude_offsets, rows, row_ok, num_items, first_item, KEYS: tl.constexpr):
    """(cursor, segment end, key base) of each row's sorted exclusion keys (``_topk_prologue_kernel``),
    the cursor at its first key of an item >= first_item; without KEYS, zeros that are never read."""
    cursor = tl.zeros_like(rows).to(tl.int64)
    segment_end = cursor
    key_base = cursor
    if KEYS:
        segment_start = tl.load(exclude_offsets + rows, mask=row_ok, other=0).to(tl.int64)
        segment_end = tl.load(exclude_offsets + rows + 1, mask=row_ok, other=0).to(tl.int64)
        key_base = rows.to(tl.int64) * (num_items + 2) + 1
        cursor = _lower_bound(exclude_keys, segment_start, segment_end, key_base + first_item)
    return cursor, segment_end, key_base


@triton.jit
def _exclusion_words(keys, cursor, segment_end, tile_key, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     WINDOW: tl.constexpr):
    """(word0..word3, cursor): bit j of word w is set when column 32 w + j of the tile is excluded for
    that row (BLOCK_N <= 128). Reads each row's sorted keys from its cursor, WINDOW at a time (keys
    below ``tile_key`` were consumed by earlier tiles), and moves the cursor past the tile.
    The loop continues while some row filled its window; that test is computed at the end of the
    body into a scalar the loop carries: triton 3.6's TritonGPURemoveLayoutConversions fails on an
    ``scf.while`` whose condition reduces a loop-carried tensor (``while tl.max(taken) == WINDOW``)."""
    lane = tl.arange(0, WINDOW)
    word0 = tl.full([BLOCK_M], 0, tl.int32)
    word1 = tl.full([BLOCK_M], 0, tl.int32)
    word2 = tl.full([BLOCK_M], 0, tl.int32)
    word3 = tl.full([BLOCK_M], 0, tl.int32)
    window_full = True
    while window_full:
        position = cursor[:, None] + lane[None, :]
        loaded = position < segment_end[:, None]
        key = tl.load(keys + position, mask=loaded, other=0)
        offset = key - tile_key[:, None]
        inside = loaded & (offset < BLOCK_N)
        # A repeated id (sorted lists hold repeats side by side) sets its bit once, so a sum is an OR.
        first = tl.load(keys + position - 1, mask=loaded & (position > 0), other=-1) != key
        column = offset.to(tl.int32)
        bit = tl.where(inside & first, 1 << (column & 31), 0)
        word = column >> 5
        word0 |= tl.sum(tl.where(word == 0, bit, 0), axis=1)
        if BLOCK_N > 32:
            word1 |= tl.sum(tl.where(word == 1, bit, 0), axis=1)
        if BLOCK_N > 64:
            word2 |= tl.sum(tl.where(word == 2, bit, 0), axis=1)
            word3 |= tl.sum(tl.where(word == 3, bit, 0), axis=1)
        taken = tl.sum(inside.to(tl.int32), axis=1)
        cursor += taken
        window_full = tl.max(taken, axis=0) == WINDOW
    return word0, word1, word2, word3, cursor


@triton.jit
def _bitmap_words(exclusion_bits, rows, row_ok, words_per_row, start, BLOCK_N: tl.constexpr):
    """The words of ``_exclusion_words`` for the tile at item ``start`` (a multiple of 32), read from
    each row's exclusion bitmap (``_topk_prologue_kernel``)."""
    word = start // 32 + tl.arange(0, 4)
    inside = row_ok[:, None] & ((word < words_per_row) & (word < start // 32 + BLOCK_N // 32))[None, :]
    words = tl.load(exclusion_bits + rows.to(tl.int64)[:, None] * words_per_row + word[None, :], mask=inside, other=0)
    lane = tl.arange(0, 4)[None, :]
    return (tl.sum(tl.where(lane == 0, words, 0), axis=1), tl.sum(tl.where(lane == 1, words, 0), axis=1),
            tl.sum(tl.where(lane == 2, words, 0), axis=1), tl.sum(tl.where(lane == 3, words, 0), axis=1))


@triton.jit
def _exclude_columns(s, word0, word1, word2, word3, BLOCK_N: tl.constexpr):
    """s with -inf at the columns whose bits are set."""
    column = tl.arange(0, BLOCK_N)[None, :]
    chosen = tl.where(column < 32, word0[:, None], word1[:, None])
    if BLOCK_N > 64:
        chosen = tl.where(column < 64, chosen, tl.where(column < 96, word2[:, None], word3[:, None]))
    return tl.where(((chosen >> (column & 31)) & 1) != 0, float("-inf"), s)


@triton.jit
def _clear_lists(cand_values, cand_ids, row_block, split, num_queries, KP: tl.constexpr, NEW: tl.constexpr,
                 SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, FLUSH_ROWS: tl.constexpr):
    """Every slot of this program's lists: score -inf, id -1."""
    held = tl.arange(0, KP)
    fresh = tl.arange(0, NEW)
    for first in range(0, BLOCK_M, FLUSH_ROWS):
        rows = row_block * BLOCK_M + first + tl.arange(0, FLUSH_ROWS)
        ok = (rows < num_queries)[:, None]
        base = (rows.to(tl.int64) * SPLITS + split) * (KP + NEW)
        tl.store(cand_values + base[:, None] + held[None, :], tl.full([FLUSH_ROWS, KP], float("-inf"), tl.float32),
                 mask=ok)
        tl.store(cand_ids + base[:, None] + held[None, :], tl.full([FLUSH_ROWS, KP], -1, tl.int32), mask=ok)
        tl.store(cand_values + base[:, None] + KP + fresh[None, :], tl.full([FLUSH_ROWS, NEW], float("-inf"), tl.float32),
                 mask=ok)
        tl.store(cand_ids + base[:, None] + KP + fresh[None, :], tl.full([FLUSH_ROWS, NEW], -1, tl.int32), mask=ok)


@triton.jit
def _merge_lists(cand_values, cand_ids, top_scores, top_ids, row_block, split, num_queries,
                 K: tl.constexpr, KP: tl.constexpr, NEW: tl.constexpr, SPLITS: tl.constexpr, BLOCK_M: tl.constexpr,
                 FLUSH_ROWS: tl.constexpr, FINAL: tl.constexpr):
    """Merge each row's append area into its held list (the best KP, sorted, ties to the smaller id)
    and empty the append area; FINAL with one split writes the first k to the outputs instead."""
    tl.debug_barrier()  # the append stores of every thread are visible from here on
    held = tl.arange(0, KP)
    fresh = tl.arange(0, NEW)
    for first in range(0, BLOCK_M, FLUSH_ROWS):
        rows = row_block * BLOCK_M + first + tl.arange(0, FLUSH_ROWS)
        ok = (rows < num_queries)[:, None]
        base = (rows.to(tl.int64) * SPLITS + split) * (KP + NEW)
        held_at = base[:, None] + held[None, :]
        fresh_at = base[:, None] + KP + fresh[None, :]
        old = _pack(tl.load(cand_values + held_at, mask=ok, other=float("-inf")),
                    tl.load(cand_ids + held_at, mask=ok, other=-1))
        new = _pack(tl.load(cand_values + fresh_at, mask=ok, other=float("-inf")),
                    tl.load(cand_ids + fresh_at, mask=ok, other=-1))
        value, index = _unpack(_merge_sorted_rows(old, _top_rows(new, KP)))
        if FINAL and SPLITS == 1:
            out = rows.to(tl.int64)[:, None] * K + held[None, :]
            keep = ok & (held[None, :] < K)
            tl.store(top_scores + out, value, mask=keep)
            tl.store(top_ids + out, index.to(tl.int64), mask=keep)
        else:
            tl.store(cand_values + held_at, value, mask=ok)
            tl.store(cand_ids + held_at, index, mask=ok)
            if not FINAL:
                tl.store(cand_values + fresh_at, tl.full([FLUSH_ROWS, NEW], float("-inf"), tl.float32), mask=ok)
                tl.store(cand_ids + fresh_at, tl.full([FLUSH_ROWS, NEW], -1, tl.int32), mask=ok)
    tl.debug_barrier()  # the merged lists are visible to every thread


@triton.jit
def _query_rows(queries, items, item_inverse_norms, target_ids, rows, row_ok, num_items, stride_query, stride_item,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, L2_NORM: tl.constexpr,
                HAS_TARGET: tl.constexpr, EPS_SQUARED: tl.constexpr):
    """(queries [BLOCK_M, BLOCK_D], their inverse norms (1 without L2_NORM), target ids (-1 without
    targets), the targets' scores): each target scored once from its own row of the table."""
    dims = tl.arange(0, BLOCK_D)
    q = load_tile(queries + rows.to(tl.int64)[:, None] * stride_query + dims[None, :], row_ok, dims, D, BLOCK_D, True)
    query_scale = tl.full([BLOCK_M], 1.0, tl.float32)
    if L2_NORM:
        query_scale = _inverse_norm(q.to(tl.float32), EPS_SQUARED)
    target = tl.full([BLOCK_M], -1, tl.int64)
    target_score = tl.full([BLOCK_M], 0.0, tl.float32)
    if HAS_TARGET:
        target = tl.load(target_ids + rows, mask=row_ok, other=-1).to(tl.int64)
        safe = tl.minimum(tl.maximum(target, 0), num_items - 1)
        target_row = load_tile(items + safe[:, None] * stride_item + dims[None, :], row_ok, dims, D, BLOCK_D, True)
        target_score = tl.sum(q.to(tl.float32) * target_row.to(tl.float32), axis=1)
        if L2_NORM:
            target_score = target_score * query_scale * tl.load(item_inverse_norms + safe)
    return q, query_scale, target, target_score


@triton.jit
def _tile_scores(queries, items, item_inverse_norms, exclusions, q, query_scale, target, target_score, rows, row_ok,
                 start, cols, col_ok, stride_query, stride_item, words_per_row, cursor, segment_end, key_base,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_CHUNK: tl.constexpr, WINDOW: tl.constexpr, L2_NORM: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
                 BITMAP: tl.constexpr, HAS_TARGET: tl.constexpr, PRECISION: tl.constexpr):
    """(fp32 scores [BLOCK_M, BLOCK_N] of the rows against the item columns ``cols`` = start.. start +
    BLOCK_N, the exclusion cursor moved past them): -inf outside the problem and at the excluded columns
    (``exclusions``: the bitmap, or the sorted keys read from ``_exclusion_cursor``'s cursor), the
    target's own score at its column (never excluded)."""
    zero = tl.full([BLOCK_M], 0, tl.int32)
    word0, word1, word2, word3 = zero, zero, zero, zero
    if HAS_EXCLUDE:  # the words before the scores exist: fewer values live at once
        if BITMAP:
            word0, word1, word2, word3 = _bitmap_words(exclusions, rows, row_ok, words_per_row, start, BLOCK_N)
        else:
            word0, word1, word2, word3, cursor = _exclusion_words(exclusions, cursor, segment_end, key_base + start,
                                                                  BLOCK_M, BLOCK_N, WINDOW)
    dims = tl.arange(0, BLOCK_D)
    if DOT_CHUNK == BLOCK_D:  # the queries stay in registers
        tile = load_tile(items + cols.to(tl.int64)[:, None] * stride_item + dims[None, :], col_ok, dims, D, BLOCK_D, True)
        s = tl.dot(q, tl.trans(tile), input_precision=PRECISION, out_dtype=tl.float32)
    else:  # fp32 dots run on FMA units: D in chunks, the queries re-read from L1, so nothing spills
        s = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for first in tl.static_range(0, BLOCK_D, DOT_CHUNK):
            chunk = first + tl.arange(0, DOT_CHUNK)
            q_part = tl.load(queries + rows.to(tl.int64)[:, None] * stride_query + chunk[None, :],
                             mask=row_ok[:, None] & (chunk < D)[None, :], other=0.0)
            tile = tl.load(items + cols.to(tl.int64)[:, None] * stride_item + chunk[None, :],
                           mask=col_ok[:, None] & (chunk < D)[None, :], other=0.0)
            s = tl.dot(q_part, tl.trans(tile), s, input_precision=PRECISION)
    if L2_NORM:
        item_scale = tl.load(item_inverse_norms + cols, mask=col_ok, other=0.0)
        s = s * query_scale[:, None] * item_scale[None, :]
    s = tl.where(row_ok[:, None] & col_ok[None, :], s, float("-inf"))
    if HAS_EXCLUDE:
        if tl.max(((word0 | word1 | word2 | word3) != 0).to(tl.int32), axis=0) > 0:
            s = _exclude_columns(s, word0, word1, word2, word3, BLOCK_N)
    if HAS_TARGET:
        s = tl.where((cols[None, :] == target[:, None]) & col_ok[None, :], target_score[:, None], s)
    return s, cursor


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _topk_prologue_kernel(
    items, item_inverse_norms, exclude_ids, exclude_offsets, exclude_keys, exclusion_bits,
    num_items, stride_item, norm_programs, words_per_row,
    D: tl.constexpr, BLOCK_D: tl.constexpr, NORM_ROWS: tl.constexpr, KEY_BLOCK: tl.constexpr,
    BITMAP: tl.constexpr, EPS_SQUARED: tl.constexpr,
):
    """Programs [0, norm_programs): inverse norms of NORM_ROWS item rows each. Then one program per
    query: with BITMAP, its exclusions' bits set in its row of ``exclusion_bits`` (zeroed by the caller;
    ids outside [0, I) set none); else the keys b * (I + 2) + clamp(id, -1, I) + 1 of its exclusions,
    which sort inside the query's own segment whatever the ids (an id outside [0, I) matches no column)."""
    pid = tl.program_id(0)
    if pid < norm_programs:
        rows = pid * NORM_ROWS + tl.arange(0, NORM_ROWS)
        ok = rows < num_items
        dims = tl.arange(0, BLOCK_D)
        x = load_tile(items + rows.to(tl.int64)[:, None] * stride_item + dims[None, :], ok, dims, D, BLOCK_D, True)
        tl.store(item_inverse_norms + rows, _inverse_norm(x.to(tl.float32), EPS_SQUARED), mask=ok)
    else:
        query = pid - norm_programs
        start = tl.load(exclude_offsets + query).to(tl.int64)
        end = tl.load(exclude_offsets + query + 1).to(tl.int64)
        if BITMAP:
            row_bits = exclusion_bits + query.to(tl.int64) * words_per_row
        else:
            key_base = query.to(tl.int64) * (num_items + 2) + 1
        for first in range(start, end, KEY_BLOCK):
            position = first + tl.arange(0, KEY_BLOCK)
            ok = position < end
            ids = tl.load(exclude_ids + position, mask=ok, other=0).to(tl.int64)
            if BITMAP:  # an OR: repeated ids set their bit once
                column = tl.minimum(tl.maximum(ids, 0), num_items - 1).to(tl.int32)
                tl.atomic_or(row_bits + (column >> 5), 1 << (column & 31), mask=ok & (ids >= 0) & (ids < num_items))
            else:
                tl.store(exclude_keys + position, key_base + tl.minimum(tl.maximum(ids, -1), num_items), mask=ok)


@triton.jit
def _topk_kernel(
    queries, items, item_inverse_norms, exclusions, exclude_offsets, target_ids,
    cand_values, cand_ids, rank_partials, top_scores, top_ids, target_rank,
    num_queries, num_items, stride_query, stride_item, words_per_row, items_per_split, row_blocks,
    D: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, NEW: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_CHUNK: tl.constexpr,
    FLUSH_ROWS: tl.constexpr, WINDOW: tl.constexpr, L2_NORM: tl.constexpr, HAS_EXCLUDE: tl.constexpr,
    BITMAP: tl.constexpr, HAS_TARGET: tl.constexpr, PRECISION: tl.constexpr, EPS_SQUARED: tl.constexpr,
):
    """One (block of BLOCK_M queries, split of items_per_split items): stream the split's tiles, keep
    each row's best KP (>= K) and count the items at or above each target's score. ``exclusions``: the
    bitmap (BITMAP) or the sorted keys of ``_topk_prologue_kernel``."""
    pid = tl.program_id(0)
    split = pid // row_blocks  # consecutive programs share a split: its item tiles stay in L2
    row_block = pid % row_blocks
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_queries
    q, query_scale, target, target_score = _query_rows(
        queries, items, item_inverse_norms, target_ids, rows, row_ok, num_items, stride_query, stride_item,
        D, BLOCK_M, BLOCK_D, L2_NORM, HAS_TARGET, EPS_SQUARED)
    rank_count = tl.full([BLOCK_M], 0, tl.int32)
    lo = split * items_per_split
    hi = tl.minimum(lo + items_per_split, num_items)
    cursor, segment_end, key_base = _exclusion_cursor(exclusions, exclude_offsets, rows, row_ok, num_items, lo,
                                                      HAS_EXCLUDE and not BITMAP)
    if K > 0:
        list_base = (rows.to(tl.int64) * SPLITS + split) * (KP + NEW)
        # Appends address the program's own lists with 32-bit offsets from one base pointer.
        first_row = row_block * BLOCK_M
        program_values = cand_values + (first_row.to(tl.int64) * SPLITS + split) * (KP + NEW) + KP
        program_ids = cand_ids + (first_row.to(tl.int64) * SPLITS + split) * (KP + NEW) + KP
        row_offset = tl.arange(0, BLOCK_M) * (SPLITS * (KP + NEW))
        _clear_lists(cand_values, cand_ids, row_block, split, num_queries, KP, NEW, SPLITS, BLOCK_M, FLUSH_ROWS)
        tl.debug_barrier()
        appended = tl.full([BLOCK_M], 0, tl.int32)
        threshold = tl.full([BLOCK_M], float("-inf"), tl.float32)

    columns = tl.arange(0, BLOCK_N)
    for start in range(lo, hi, BLOCK_N):
        cols = start + columns
        col_ok = cols < hi
        s, cursor = _tile_scores(queries, items, item_inverse_norms, exclusions, q, query_scale, target, target_score,
                                 rows, row_ok, start, cols, col_ok, stride_query, stride_item, words_per_row, cursor,
                                 segment_end, key_base, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_CHUNK, WINDOW, L2_NORM,
                                 HAS_EXCLUDE, BITMAP, HAS_TARGET, PRECISION)
        if HAS_TARGET:  # the items at or above the target's score, less the target itself
            here = (target >= start) & (target < tl.minimum(start + BLOCK_N, hi))
            rank_count += tl.sum((s >= target_score[:, None]).to(tl.int32), axis=1) - here.to(tl.int32)
        if K > 0:
            candidate = s > threshold[:, None]
            fresh = tl.sum(candidate.to(tl.int32), axis=1)
            if tl.max(appended + fresh, axis=0) > NEW:
                _merge_lists(cand_values, cand_ids, top_scores, top_ids, row_block, split, num_queries,
                             K, KP, NEW, SPLITS, BLOCK_M, FLUSH_ROWS, False)
                threshold = tl.load(cand_values + list_base + (K - 1), mask=row_ok, other=float("-inf"))
                appended = tl.full([BLOCK_M], 0, tl.int32)
                candidate = s > threshold[:, None]
                fresh = tl.sum(candidate.to(tl.int32), axis=1)
            if tl.max(fresh, axis=0) > 0:
                at = row_offset[:, None] + appended[:, None] + tl.cumsum(candidate.to(tl.int32), axis=1) - 1
                tl.store(program_values + at, s, mask=candidate)
                tl.store(program_ids + at, cols[None, :] + at * 0, mask=candidate)
                appended += fresh

    if K > 0:
        _merge_lists(cand_values, cand_ids, top_scores, top_ids, row_block, split, num_queries,
                     K, KP, NEW, SPLITS, BLOCK_M, FLUSH_ROWS, True)
    if HAS_TARGET:
        if SPLITS == 1:
            tl.store(target_rank + rows, (rank_count + 1).to(tl.int64), mask=row_ok)
        else:
            tl.store(rank_partials + rows.to(tl.int64) * SPLITS + split, rank_count, mask=row_ok)


@triton.jit
def _topk_merge_kernel(
    cand_values, cand_ids, rank_partials, top_scores, top_ids, target_rank, num_queries,
    K: tl.constexpr, KP: tl.constexpr, NEW: tl.constexpr, SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr,
    MERGE_ROWS: tl.constexpr, HAS_TARGET: tl.constexpr,
):
    """The splits' sorted lists of each row -> its top k; their rank counts -> the target's rank."""
    rows = tl.program_id(0) * MERGE_ROWS + tl.arange(0, MERGE_ROWS)
    ok = rows < num_queries
    if K > 0:
        slot = tl.arange(0, SPLITS_POW2 * KP)
        split = slot // KP
        at = (rows.to(tl.int64)[:, None] * SPLITS + split[None, :]) * (KP + NEW) + (slot % KP)[None, :]
        present = ok[:, None] & (split < SPLITS)[None, :]
        keys = _pack(tl.load(cand_values + at, mask=present, other=float("-inf")),
                     tl.load(cand_ids + at, mask=present, other=-1))
        # The row selection's few segment lists merge pairwise (H100, 1,024 x 26,744 x 200: 42 against 58 us);
        # the streaming splits keep one top-k: no gain there, and triton 3.6 failed to compile the tree for 32
        # lists of 16 (300 x 100,003 x 256, k = 10).
        if NEW == 0 and SPLITS_POW2 <= 4:
            top = _merge_sorted_lists(keys, SPLITS_POW2, KP)
        else:
            top = _top_rows(keys, KP)
        value, index = _unpack(top)
        first = tl.arange(0, KP)
        out = rows.to(tl.int64)[:, None] * K + first[None, :]
        keep = ok[:, None] & (first[None, :] < K)
        tl.store(top_scores + out, value, mask=keep)
        tl.store(top_ids + out, index.to(tl.int64), mask=keep)
    if HAS_TARGET:
        part = tl.arange(0, SPLITS_POW2)
        counts = tl.load(rank_partials + rows.to(tl.int64)[:, None] * SPLITS + part[None, :],
                         mask=ok[:, None] & (part < SPLITS)[None, :], other=0)
        tl.store(target_rank + rows, (tl.sum(counts, axis=1) + 1).to(tl.int64), mask=ok)


@triton.jit
def _score_keys_kernel(
    queries, items, item_inverse_norms, exclusions, exclude_offsets, target_ids, keys, group_maxima, rank_partials,
    first_row, num_rows, num_items, key_stride, stride_query, stride_item, words_per_row, row_blocks, col_tiles,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_CHUNK: tl.constexpr,
    WINDOW: tl.constexpr, L2_NORM: tl.constexpr, HAS_EXCLUDE: tl.constexpr, BITMAP: tl.constexpr,
    HAS_TARGET: tl.constexpr, PRECISION: tl.constexpr, EPS_SQUARED: tl.constexpr, HAS_BOUND: tl.constexpr,
    TILES: tl.constexpr,
):
    """TILES consecutive [BLOCK_M queries, BLOCK_N items] tiles of rows first_row.. first_row + num_rows,
    the queries, their norms and target scores loaded once: the order keys of their scores
    (``_ordered_bits``; INT32_MIN where a score is -inf, NaN or excluded) into ``keys`` [num_rows, key_stride]
    (the columns from I on: INT32_MIN);
    with HAS_BOUND, the largest key of each group of 32 items into ``group_maxima`` [num_rows,
    ceil(I / 32)]; per row and tile the count of items at or above the target's score, less the target
    itself, into ``rank_partials`` [num_rows, col_tiles]."""
    pid = tl.program_id(0)
    tile_group = pid // row_blocks  # consecutive programs share item tiles: they stay in L2
    local = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = local < num_rows
    rows = first_row + local
    q, query_scale, target, target_score = _query_rows(
        queries, items, item_inverse_norms, target_ids, rows, row_ok, num_items, stride_query, stride_item,
        D, BLOCK_M, BLOCK_D, L2_NORM, HAS_TARGET, EPS_SQUARED)
    cursor, segment_end, key_base = _exclusion_cursor(exclusions, exclude_offsets, rows, row_ok, num_items,
                                                      tile_group * TILES * BLOCK_N, HAS_EXCLUDE and not BITMAP)
    for step in tl.range(0, TILES):
        tile = tile_group * TILES + step
        start = tile * BLOCK_N
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < num_items
        s, cursor = _tile_scores(queries, items, item_inverse_norms, exclusions, q, query_scale, target, target_score,
                                 rows, row_ok, start, cols, col_ok, stride_query, stride_item, words_per_row, cursor,
                                 segment_end, key_base, D, BLOCK_M, BLOCK_N, BLOCK_D, DOT_CHUNK, WINDOW, L2_NORM,
                                 HAS_EXCLUDE, BITMAP, HAS_TARGET, PRECISION)
        at = local[:, None] * key_stride + cols[None, :]  # int32: a chunk holds at most 2^24 keys (``_rows_plan``)
        key = tl.where(s > float("-inf"), _ordered_bits(s), INT32_MIN)
        tl.store(keys + at, key, mask=row_ok[:, None] & (cols < key_stride)[None, :])
        if HAS_BOUND:
            groups = tl.cdiv(num_items, 32)
            group = start // 32 + tl.arange(0, BLOCK_N // 32)
            largest = tl.max(tl.reshape(key, [BLOCK_M, BLOCK_N // 32, 32]), axis=2)
            tl.store(group_maxima + local[:, None] * groups + group[None, :], largest,
                     mask=row_ok[:, None] & (group < groups)[None, :])
        if HAS_TARGET:
            here = (target >= start) & (target < tl.minimum(start + BLOCK_N, num_items))
            count = tl.sum((s >= target_score[:, None]).to(tl.int32), axis=1) - here.to(tl.int32)
            inside = local * 0 + tile < col_tiles  # the last program's tiles may run past the catalogue
            tl.store(rank_partials + local.to(tl.int64) * col_tiles + tile, count, mask=row_ok & inside)


@triton.jit
def _threshold(key, wanted, low):
    """The largest int32 T with at least ``wanted`` (>= 1) of ``key`` >= T, given ``low`` <= T: built bit
    by bit from the highest bit where ``low`` and the largest key differ (the bits above it are theirs),
    one count a bit, stopping once exactly ``wanted`` keys are >= T."""
    # T runs over [0, 2^32) with int32 key k standing for k + 2^31: the comparisons stay in int32.
    high = tl.max(key, axis=0).to(tl.int64) + 2147483648
    differ = (low.to(tl.int64) + 2147483648) ^ high
    bit = ((differ.to(tl.float64).to(tl.int64, bitcast=True) >> 52) - 1023).to(tl.int32)  # exact below 2^53
    threshold = tl.where(differ == 0, high, high & ~((tl.full([], 2, tl.int64) << bit) - 1))
    searching = differ != 0
    while searching:  # the test is carried as a scalar (see ``_exclusion_words``)
        candidate = threshold | (tl.full([], 1, tl.int64) << bit)
        count = tl.sum((key >= (candidate - 2147483648).to(tl.int32)).to(tl.int32), axis=0)
        threshold = tl.where(count >= wanted, candidate, threshold)
        bit -= 1
        searching = (bit >= 0) & (count != wanted)
    return (threshold - 2147483648).to(tl.int32)


@triton.jit
def _row_bound(group_maxima, local, num_items, K: tl.constexpr, GROUPS_POW2: tl.constexpr):
    """The K-th largest of row ``local``'s group maxima (K groups each hold a key at or above it: a lower
    bound on the row's K-th key), or INT32_MIN where fewer than K groups hold a key."""
    bound = tl.full([], -2**31, tl.int32)  # INT32_MIN: no bound
    groups = tl.cdiv(num_items, 32)
    group = tl.arange(0, GROUPS_POW2)
    largest = tl.load(group_maxima + local * groups + group, mask=group < groups, other=INT32_MIN)
    if tl.sum((largest > INT32_MIN).to(tl.int32), axis=0) >= K:
        lowest = tl.min(tl.where(largest > INT32_MIN, largest, 2**31 - 1), axis=0)
        bound = _threshold(largest, K, lowest)
    return bound


@triton.jit
def _row_bound_kernel(group_maxima, row_bounds, num_items, K: tl.constexpr, GROUPS_POW2: tl.constexpr):
    """Row ``program_id(0)``'s bound (``_row_bound``) into ``row_bounds``: searched once for all its segments."""
    local = tl.program_id(0)
    tl.store(row_bounds + local, _row_bound(group_maxima, local, num_items, K, GROUPS_POW2))


@triton.jit
def _select_rows_kernel(
    keys, group_maxima, row_bounds, rank_partials, scratch, cand_values, cand_ids, top_scores, top_ids, target_rank,
    first_row, num_items, key_stride, segment_items, col_tiles,
    K: tl.constexpr, KP: tl.constexpr, BLOCK_I: tl.constexpr, SEGMENTS: tl.constexpr, HAS_BOUND: tl.constexpr,
    GROUPS_POW2: tl.constexpr, TILES_POW2: tl.constexpr, HAS_TARGET: tl.constexpr,
):
    """One (query: row first_row + program id 0, segment of segment_items of its keys: program id 1):
    the segment's top K from its keys held at once. With HAS_BOUND, keys under the row's bound
    (``_row_bound``: searched here with one segment, else read from ``row_bounds``) are left out. With
    W = min(K, the keys left), the keys above the W-th largest T (``_threshold``, not searched when no
    more than K are left) and the first of those equal to it (smaller ids first), W in all, are
    gathered into ``scratch`` [rows, SEGMENTS, KP] and sorted there: the row's top k with one segment,
    else the segment's sorted list of KP slots (``cand_values``, ``cand_ids`` [B, SEGMENTS, KP]) for
    ``_topk_merge_kernel``. Then, in segment 0, the rank: the row's partial counts summed."""
    local = tl.program_id(0)
    segment = tl.program_id(1)
    row = first_row + local
    if K > 0:
        bound = tl.full([], -2**31, tl.int32)  # INT32_MIN: no bound
        if HAS_BOUND:
            if SEGMENTS == 1:
                bound = _row_bound(group_maxima, local, num_items, K, GROUPS_POW2)
            else:
                bound = tl.load(row_bounds + local)
        first = segment * segment_items
        offset = tl.arange(0, BLOCK_I)
        key = tl.load(keys + local * key_stride + first + offset,
                      mask=offset < tl.minimum(segment_items, num_items - first), other=INT32_MIN)
        # At least min(K, left) keys are at or above the bound, so the keys taken above T never
        # include one under it: counting those out of ``left`` is enough, with no rewrite.
        left = tl.sum(((key >= bound) & (key > INT32_MIN)).to(tl.int32), axis=0)
        wanted = tl.minimum(left, K)
        kth = bound  # with no more than K left, all of them
        if left > wanted:
            kth = _threshold(key, wanted, bound)
        above = key > kth
        equal = (key == kth) & (key > INT32_MIN)
        # One scan counts both before each key: those above T in the low 16 bits, those equal to it in
        # the high 16 (a segment holds at most ``ROW_SEGMENT_ITEMS`` of each).
        before = tl.cumsum(above.to(tl.int32) | (equal.to(tl.int32) << 16), axis=0) - (above.to(tl.int32) |
                                                                                        (equal.to(tl.int32) << 16))
        equal_before = before >> 16
        ties = wanted - tl.sum(above.to(tl.int32), axis=0)  # the equal keys taken: the first ``ties``
        taken = above | (equal & (equal_before < ties))
        position = (before & 0xFFFF) + tl.minimum(equal_before, ties)
        base = scratch + (local.to(tl.int64) * SEGMENTS + segment) * KP
        tl.store(base + position, _pack_ordered(key, first + offset), mask=taken)
        tl.debug_barrier()  # every thread's gathered keys are visible from here on
        slot = tl.arange(0, KP)
        gathered = tl.load(base + slot, mask=slot < wanted, other=0)
        value, index = _unpack(_top_rows(tl.where(slot < wanted, gathered, INT64_MIN)[None, :], KP))
        value = tl.reshape(value, [KP])
        index = tl.reshape(index, [KP])
        filled = slot < wanted
        value = tl.where(filled, value, float("-inf"))
        index = tl.where(filled, index, -1)
        if SEGMENTS == 1:
            out = row.to(tl.int64) * K + slot
            tl.store(top_scores + out, value, mask=slot < K)
            tl.store(top_ids + out, index.to(tl.int64), mask=slot < K)
        else:  # every slot: the merge reads KP of them
            out = (row.to(tl.int64) * SEGMENTS + segment) * KP + slot
            tl.store(cand_values + out, value)
            tl.store(cand_ids + out, index)
    if HAS_TARGET:
        if segment == 0:
            part = tl.arange(0, TILES_POW2)
            counts = tl.load(rank_partials + local.to(tl.int64) * col_tiles + part, mask=part < col_tiles, other=0)
            tl.store(target_rank + row, (tl.sum(counts, axis=0) + 1).to(tl.int64))


# --------------------------------------------------------------------------------------------
# Launch plan
# --------------------------------------------------------------------------------------------
class _Plan(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    dot_chunk: int  # the D columns per tl.dot: all of them, or (fp32) 32 at a time
    kp: int  # held list length: k rounded up to a power of 2 (at least 16)
    new: int  # append area: max(KP, BLOCK_N), so one tile always fits after a merge
    splits: int
    items_per_split: int
    row_blocks: int
    flush_rows: int
    window: int
    num_warps: int
    num_stages: int
    merge_rows: int
    merge_warps: int
    splits_pow2: int


def _split_cost(items_per_split: int, waves: int, kp: int) -> float:
    """Relative time of a plan: waves of programs, each streaming its split plus the cost of growing
    its lists (about k * (1 + ln(n / k)) appends, each paying a share of a bitonic merge)."""
    list_work = 40 * kp * (1 + math.log(max(items_per_split, kp) / kp))
    return waves * (items_per_split + list_work + 1024)


def _tile_sizes(num_queries: int, dim: int, dtype: torch.dtype) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, DOT_CHUNK, WINDOW, warps) of the score tiles, in both selections (the row
    selection's BLOCK_N on the GPU at D <= ``SCORE_TILES_MAX_DIM``: ``ROWS_SMALL_DIM_BLOCK_N``)."""
    block_d = block_dim(dim)
    element = torch.empty(0, dtype=dtype).element_size()
    dot_chunk = block_d
    if KERNELS_INTERPRETED:
        block_m, block_n, window, num_warps = 16, 32, 8, 4
        if dtype == torch.float32:
            dot_chunk = min(block_d, 16)
    elif dtype == torch.float32:
        # IEEE fp32 dots run on FMA units, whose operands live in registers: small tiles, D in chunks.
        block_m, block_n, window, num_warps = (32 if num_queries > 16 else 16), 32, 16, 4
        dot_chunk = min(block_d, 32)
    else:
        block_m = 64 if num_queries > 32 else (32 if num_queries > 16 else 16)
        # An item tile of at most 64 KB keeps two pipeline stages in shared memory at any D <= 512.
        block_n = max(32, min(128, (64 * 1024) // (block_d * element)))
        window = 16
        num_warps = 8 if block_m == 64 else 4
    return block_m, block_n, block_d, dot_chunk, window, num_warps


def _list_length(k: int) -> int:
    """KP: k rounded up to a power of 2, at least 16."""
    return max(16, 1 << max(k - 1, 0).bit_length())


@functools.lru_cache(maxsize=256)
def _plan(num_queries: int, num_items: int, dim: int, k: int, dtype: torch.dtype, multiprocessors: int,
          splits: int | None = None) -> _Plan:
    """Block sizes and the split count for one problem shape (plain ints: no host helpers per call)."""
    block_m, block_n, block_d, dot_chunk, window, num_warps = _tile_sizes(num_queries, dim, dtype)
    kp = _list_length(k)
    new = max(kp, block_n)
    row_blocks = cdiv(num_queries, block_m)
    if splits is None:
        largest = max(1, min(MAX_SPLITS, cdiv(num_items, 4 * block_n), MERGE_WIDTH // kp))
        best = None
        for candidate in range(1, largest + 1):
            per_split = cdiv(cdiv(num_items, candidate), block_n) * block_n
            cost = _split_cost(per_split, cdiv(row_blocks * cdiv(num_items, per_split), multiprocessors), kp)
            if best is None or cost < best[0]:
                best = (cost, candidate)
        splits = best[1]
    items_per_split = cdiv(cdiv(max(num_items, 1), splits), block_n) * block_n
    splits = cdiv(max(num_items, 1), items_per_split)
    splits_pow2, merge_rows, merge_warps = _merge_shape(splits, kp)
    return _Plan(
        block_m=block_m, block_n=block_n, block_d=block_d, dot_chunk=dot_chunk, kp=kp, new=new, splits=splits,
        items_per_split=items_per_split, row_blocks=row_blocks,
        flush_rows=max(1, min(block_m, 1024 // max(kp, new))), window=window, num_warps=num_warps,
        num_stages=2, merge_rows=merge_rows, merge_warps=merge_warps, splits_pow2=splits_pow2,
    )


def _merge_shape(splits: int, kp: int) -> tuple[int, int, int]:
    """(splits rounded up to a power of 2, rows a program, warps) of ``_topk_merge_kernel``."""
    splits_pow2 = 1 << (splits - 1).bit_length()
    merge_rows = max(1, min(16, 4096 // (splits_pow2 * kp)))
    return splits_pow2, merge_rows, 4 if splits_pow2 * kp * merge_rows <= 2048 else 8


class _RowsPlan(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    dot_chunk: int
    window: int
    num_warps: int
    kp: int
    chunk_rows: int  # queries scored per launch pair: their keys [chunk_rows, key_stride] are the chunk
    key_stride: int  # key slots a row: I rounded up to 16
    col_tiles: int
    tiles_pow2: int
    segments: int  # per row; with more than one, ``_topk_merge_kernel`` merges their lists
    segment_items: int
    block_i: int  # a segment of keys, padded to a power of 2
    segments_pow2: int
    merge_rows: int
    merge_warps: int
    has_bound: bool  # the group maxima bound each row's k-th key: at least k groups of 32 items, at most a segment's
    groups: int  # of 32 items a row: the group maxima [chunk_rows, groups]
    groups_pow2: int
    score_tiles: int  # item tiles a score-keys program


@functools.lru_cache(maxsize=256)
def _rows_plan(num_queries: int, num_items: int, dim: int, k: int, dtype: torch.dtype, multiprocessors: int,
               segments: int | None = None) -> _RowsPlan:
    """Tiles, chunks and segments of the row selection for one problem shape (``segments``: None for the
    fewest of at most ``ROW_SEGMENT_ITEMS`` keys)."""
    block_m, block_n, block_d, dot_chunk, window, _ = _tile_sizes(num_queries, dim, dtype)
    if _small_dim_tiles(dim, dtype) and not KERNELS_INTERPRETED:
        block_n = ROWS_SMALL_DIM_BLOCK_N
    kp = _list_length(k)
    if k == 0:  # no selection: one segment program per row counts the rank
        segments = 1
    elif segments is None:
        segments = cdiv(num_items, ROW_SEGMENT_ITEMS)
    segment_items = cdiv(num_items, segments)
    segments = cdiv(num_items, segment_items)
    col_tiles = cdiv(num_items, block_n)
    segments_pow2, merge_rows, merge_warps = _merge_shape(segments, kp)
    groups = cdiv(num_items, 32)
    key_stride = cdiv(num_items, 16) * 16
    chunk_rows = min(num_queries, max(1, reference.SCORES_PER_CHUNK // key_stride))
    return _RowsPlan(
        block_m=block_m, block_n=block_n, block_d=block_d, dot_chunk=dot_chunk, window=window, num_warps=ROWS_WARPS,
        kp=kp, chunk_rows=chunk_rows, key_stride=key_stride,
        col_tiles=col_tiles, tiles_pow2=1 << (col_tiles - 1).bit_length(), segments=segments,
        segment_items=segment_items, block_i=max(16, 1 << (segment_items - 1).bit_length()),
        segments_pow2=segments_pow2, merge_rows=merge_rows, merge_warps=merge_warps,
        has_bound=0 < k <= groups <= ROW_SEGMENT_ITEMS, groups=groups, groups_pow2=1 << (groups - 1).bit_length(),
        score_tiles=_score_tiles(cdiv(chunk_rows, block_m), col_tiles, dim, dtype, multiprocessors),
    )


def _small_dim_tiles(dim: int, dtype: torch.dtype) -> bool:
    """Whether the row selection's score tiles take their small-D form: D <= ``SCORE_TILES_MAX_DIM`` in bf16/fp16."""
    return dim <= SCORE_TILES_MAX_DIM and dtype != torch.float32


def _score_tiles(row_blocks: int, col_tiles: int, dim: int, dtype: torch.dtype, multiprocessors: int) -> int:
    """Item tiles a score-keys program loops over: 2 in the small-D form (``_small_dim_tiles``) where a
    program a multiprocessor remains, else 1 (fp32 tiles and larger D are untimed or slower with more)."""
    two = _small_dim_tiles(dim, dtype) and row_blocks * cdiv(col_tiles, 2) >= multiprocessors
    return 2 if two else 1


def row_selection_items_limit(k: int) -> int:
    """The largest catalogue the row selection takes at ``k``: segments of ``ROW_SEGMENT_ITEMS`` keys whose
    lists of KP fill the merge's MERGE_WIDTH slots."""
    return MERGE_WIDTH // _list_length(k) * ROW_SEGMENT_ITEMS


def selection_for(num_queries: int, num_items: int, dim: int, k: int, dtype: torch.dtype, multiprocessors: int) -> str:
    """The rule: "rows" (``_score_keys_kernel`` then ``_select_rows_kernel``) for catalogues of at most
    ``ROW_SELECT_MAX_ITEMS`` items and batches of at least ``ROW_SELECT_MIN_QUERIES`` queries where its
    time model beats the streaming plan's, else "stream" (``_topk_kernel``)."""
    if not 0 < num_items <= ROW_SELECT_MAX_ITEMS or num_queries < ROW_SELECT_MIN_QUERIES:
        return "stream"
    plan = _plan(num_queries, num_items, dim, k, dtype, multiprocessors)
    waves = cdiv(plan.row_blocks * plan.splits, multiprocessors)
    short_list = plan.kp == _list_length(1)
    stream_ms = (STREAM_SHORT_LIST_MS_PER_COST if short_list else STREAM_MS_PER_COST) * _split_cost(
        plan.items_per_split, waves, plan.kp)
    per_score = ROWS_SMALL_DIM_MS_PER_SCORE if _small_dim_tiles(dim, dtype) else ROWS_MS_PER_SCORE
    if short_list:
        list_factor = ROWS_SHORT_LIST_FACTOR
    else:
        list_factor = ROWS_MID_LIST_FACTOR if plan.kp <= ROWS_MID_LIST_MAX_LENGTH else 1.0
    rows_ms = ROWS_FIXED_MS + per_score * list_factor * num_queries * num_items
    return "rows" if rows_ms < stream_ms else "stream"


@functools.lru_cache(maxsize=16)
def _multiprocessors(device_index: int) -> int:
    if KERNELS_INTERPRETED or not torch.cuda.is_available():
        return 4
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def topk_items_forward(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    exclude_ids: Optional[torch.Tensor],
    exclude_offsets: Optional[torch.Tensor],
    target_ids: Optional[torch.Tensor],
    l2_norm: bool,
    selection: Optional[str] = None,
    splits: Optional[int] = None,
    traced: bool = False,
    exclusion: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the prologue, then the streaming kernel and (with more than one split) its merge, or the
    row selection's two kernels per chunk of queries (and, with more than one segment a row, the merge)
    -> (scores [B, k] fp32, ids [B, k] int64, target rank [B] int64, or [0] without targets).
    ``queries`` and ``item_table`` share a dtype and have unit stride in D; ``selection`` "stream" or
    "rows" (None: ``selection_for``); ``splits`` and ``exclusion`` ("bitmap" or "keys") override the
    plan's split count (streaming) or segment count (rows) and ``exclusion_form`` (tests); ``traced``:
    called inside the op, whose trace must see the kernels."""
    num_queries, dim = queries.shape
    num_items = item_table.shape[0]
    device = queries.device
    if selection is None:
        selection = selection_for(num_queries, num_items, dim, k, queries.dtype, _multiprocessors(device.index or 0))
    elif selection not in SELECTIONS:
        raise ValueError(f"topk.py: selection must be one of {SELECTIONS}, got {selection!r}")
    elif selection == "rows" and num_items > row_selection_items_limit(k):
        raise ValueError(f"topk.py: the row selection takes at most {row_selection_items_limit(k)} items at k={k}, "
                         f"got {num_items}")
    scores = torch.empty((num_queries, k), dtype=torch.float32, device=device)
    ids = torch.empty((num_queries, k), dtype=torch.int64, device=device)
    has_target = target_ids is not None
    rank = torch.empty((num_queries if has_target else 0,), dtype=torch.int64, device=device)
    if num_queries == 0:
        return scores, ids, rank
    if num_items == 0:  # nothing to rank: empty lists, every target first
        return scores, ids, rank.fill_(1)
    has_exclude = exclude_ids is not None and exclude_ids.shape[0] > 0
    if exclusion is None:
        exclusion = exclusion_form(num_queries, num_items)
    elif exclusion not in EXCLUSION_FORMS:
        raise ValueError(f"topk.py: exclusion must be one of {EXCLUSION_FORMS}, got {exclusion!r}")
    bitmap = has_exclude and exclusion == "bitmap"
    words_per_row = cdiv(num_items, 32) if bitmap else 0
    # Inside the op a trace must record the launches (``wrap_triton`` hands back the kernel itself
    # where the op runs for real); torch reads these calls to key its caches on the kernels' source.
    wrap = traced and not KERNELS_INTERPRETED
    prologue_kernel = wrap_triton(_topk_prologue_kernel) if wrap else _topk_prologue_kernel
    eps_squared = NORM_EPS * NORM_EPS
    item_inverse_norms = torch.empty((num_items if l2_norm else 0,), dtype=torch.float32, device=device)
    exclude_keys = torch.empty((exclude_ids.shape[0] if has_exclude and not bitmap else 0,),
                               dtype=exclusion_key_dtype(num_queries, num_items), device=device)
    exclusion_bits = torch.zeros((num_queries * words_per_row,), dtype=torch.int32, device=device)
    norm_programs = cdiv(num_items, 32) if l2_norm else 0
    if l2_norm or has_exclude:
        prologue_kernel[(norm_programs + (num_queries if has_exclude else 0),)](
            item_table, item_inverse_norms, exclude_ids if has_exclude else exclude_keys,
            exclude_offsets if has_exclude else exclude_keys, exclude_keys, exclusion_bits,
            num_items, item_table.stride(0), norm_programs, words_per_row,
            D=dim, BLOCK_D=block_dim(dim), NORM_ROWS=32, KEY_BLOCK=256, BITMAP=bitmap, EPS_SQUARED=eps_squared,
            num_warps=4,
        )
    if has_exclude and not bitmap:
        exclude_keys = torch.sort(exclude_keys).values
    inputs = (queries, item_table, item_inverse_norms, exclusion_bits if bitmap else exclude_keys,
              exclude_offsets if has_exclude else exclude_keys, target_ids if has_target else exclude_keys)
    flags = dict(L2_NORM=l2_norm, HAS_EXCLUDE=has_exclude, BITMAP=bitmap, HAS_TARGET=has_target,
                 PRECISION=dot_precision(queries.dtype), EPS_SQUARED=eps_squared)
    if selection == "rows":
        kernels = (wrap_triton(_score_keys_kernel) if wrap else _score_keys_kernel,
                   wrap_triton(_row_bound_kernel) if wrap else _row_bound_kernel,
                   wrap_triton(_select_rows_kernel) if wrap else _select_rows_kernel,
                   wrap_triton(_topk_merge_kernel) if wrap else _topk_merge_kernel)
        _launch_row_selection(kernels, inputs, words_per_row, flags, scores, ids, rank, k, splits)
    else:
        kernels = (wrap_triton(_topk_kernel) if wrap else _topk_kernel,
                   wrap_triton(_topk_merge_kernel) if wrap else _topk_merge_kernel)
        _launch_streaming(kernels, inputs, words_per_row, flags, scores, ids, rank, k, splits)
    return scores, ids, rank


def exclusion_form(num_queries: int, num_items: int) -> str:
    """"bitmap" (one bit per query and item, set by the prologue: no sort, and a tile reads its words
    instead of walking a sorted list) where it takes at most ``EXCLUSION_BITMAP_MAX_BYTES``, else "keys"."""
    return "bitmap" if num_queries * cdiv(num_items, 32) * 4 <= EXCLUSION_BITMAP_MAX_BYTES else "keys"


def exclusion_key_dtype(num_queries: int, num_items: int) -> torch.dtype:
    """The exclusion keys reach B * (I + 2): int32 where that fits, so their sort makes 4 radix passes
    instead of int64's 8."""
    return torch.int32 if num_queries * (num_items + 2) <= EXCLUSION_KEY_INT32_LIMIT else torch.int64


def _launch_streaming(kernels, inputs, words_per_row, flags, scores, ids, rank, k, splits):
    """``_topk_kernel`` over (row block, split) programs, then ``_topk_merge_kernel`` with several splits
    (``kernels``: the two, wrapped for a trace or not)."""
    main_kernel, merge_kernel = kernels
    queries, item_table = inputs[:2]
    (num_queries, dim), num_items, device = queries.shape, item_table.shape[0], queries.device
    plan = _plan(num_queries, num_items, dim, k, queries.dtype, _multiprocessors(device.index or 0), splits)
    list_slots = num_queries * plan.splits * (plan.kp + plan.new) if k > 0 else 0
    cand_values = torch.empty((list_slots,), dtype=torch.float32, device=device)
    cand_ids = torch.empty((list_slots,), dtype=torch.int32, device=device)
    has_target = flags["HAS_TARGET"]
    rank_partials = torch.empty((num_queries * plan.splits if has_target and plan.splits > 1 else 0,),
                                dtype=torch.int32, device=device)
    main_kernel[(plan.row_blocks * plan.splits,)](
        *inputs, cand_values, cand_ids, rank_partials, scores, ids, rank,
        num_queries, num_items, queries.stride(0), item_table.stride(0), words_per_row, plan.items_per_split,
        plan.row_blocks,
        D=dim, K=k, KP=plan.kp, NEW=plan.new, SPLITS=plan.splits, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        BLOCK_D=plan.block_d, DOT_CHUNK=plan.dot_chunk, FLUSH_ROWS=plan.flush_rows, WINDOW=plan.window,
        num_warps=plan.num_warps, num_stages=plan.num_stages, **flags,
    )
    if plan.splits > 1 and (k > 0 or has_target):
        merge_kernel[(cdiv(num_queries, plan.merge_rows),)](
            cand_values, cand_ids, rank_partials, scores, ids, rank, num_queries,
            K=k, KP=plan.kp, NEW=plan.new, SPLITS=plan.splits, SPLITS_POW2=plan.splits_pow2,
            MERGE_ROWS=plan.merge_rows, HAS_TARGET=has_target, num_warps=plan.merge_warps,
        )


def _launch_row_selection(kernels, inputs, words_per_row, flags, scores, ids, rank, k, segments):
    """Per chunk of queries: ``_score_keys_kernel`` writes the chunk's order keys [rows, I], then
    ``_select_rows_kernel`` selects the top k of each (row, segment) and sums each row's rank counts; with
    several segments, ``_row_bound_kernel`` searches each row's bound once before them and
    ``_topk_merge_kernel`` merges their lists at the end (``kernels``: the four, wrapped for a trace or not)."""
    score_kernel, bound_kernel, select_kernel, merge_kernel = kernels
    queries, item_table = inputs[:2]
    (num_queries, dim), num_items, device = queries.shape, item_table.shape[0], queries.device
    plan = _rows_plan(num_queries, num_items, dim, k, queries.dtype, _multiprocessors(device.index or 0), segments)
    if plan.segment_items > ROW_SEGMENT_ITEMS or plan.segments_pow2 * plan.kp > MERGE_WIDTH:
        raise ValueError(f"topk.py: {plan.segments} segments of {plan.segment_items} items at k={k}: the row "
                         f"selection takes at most {ROW_SEGMENT_ITEMS} items a segment and "
                         f"{MERGE_WIDTH // plan.kp} segments")
    keys = torch.empty((plan.chunk_rows * plan.key_stride,), dtype=torch.int32, device=device)
    group_maxima = torch.empty((plan.chunk_rows * plan.groups if plan.has_bound else 0,), dtype=torch.int32,
                               device=device)
    row_bounds = torch.empty((plan.chunk_rows if plan.has_bound and plan.segments > 1 else 0,), dtype=torch.int32,
                             device=device)
    scratch = torch.empty((plan.chunk_rows * plan.segments * plan.kp if k > 0 else 0,), dtype=torch.int64,
                          device=device)
    list_slots = num_queries * plan.segments * plan.kp if plan.segments > 1 else 0
    cand_values = torch.empty((list_slots,), dtype=torch.float32, device=device)
    cand_ids = torch.empty((list_slots,), dtype=torch.int32, device=device)
    rank_partials = torch.empty((plan.chunk_rows * plan.col_tiles if flags["HAS_TARGET"] else 0,), dtype=torch.int32,
                                device=device)
    for first_row in range(0, num_queries, plan.chunk_rows):
        rows = min(plan.chunk_rows, num_queries - first_row)
        row_blocks = cdiv(rows, plan.block_m)
        score_kernel[(row_blocks * cdiv(plan.col_tiles, plan.score_tiles),)](
            *inputs, keys, group_maxima, rank_partials, first_row, rows, num_items, plan.key_stride, queries.stride(0),
            item_table.stride(0), words_per_row, row_blocks, plan.col_tiles, D=dim, BLOCK_M=plan.block_m,
            BLOCK_N=plan.block_n, BLOCK_D=plan.block_d, DOT_CHUNK=plan.dot_chunk, WINDOW=plan.window,
            HAS_BOUND=plan.has_bound, TILES=plan.score_tiles, num_warps=plan.num_warps, num_stages=2, **flags,
        )
        if plan.has_bound and plan.segments > 1:
            bound_kernel[(rows,)](group_maxima, row_bounds, num_items, K=k, GROUPS_POW2=plan.groups_pow2,
                                  num_warps=plan.num_warps)
        select_kernel[(rows, plan.segments)](
            keys, group_maxima, row_bounds, rank_partials, scratch, cand_values, cand_ids, scores, ids, rank, first_row,
            num_items, plan.key_stride, plan.segment_items, plan.col_tiles, K=k, KP=plan.kp, BLOCK_I=plan.block_i,
            SEGMENTS=plan.segments, HAS_BOUND=plan.has_bound, GROUPS_POW2=plan.groups_pow2, TILES_POW2=plan.tiles_pow2,
            HAS_TARGET=flags["HAS_TARGET"], num_warps=plan.num_warps,
        )
    if plan.segments > 1:
        merge_kernel[(cdiv(num_queries, plan.merge_rows),)](
            cand_values, cand_ids, rank_partials, scores, ids, rank, num_queries,
            K=k, KP=plan.kp, NEW=0, SPLITS=plan.segments, SPLITS_POW2=plan.segments_pow2,
            MERGE_ROWS=plan.merge_rows, HAS_TARGET=False, num_warps=plan.merge_warps,
        )


def _topk_items_op(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    exclude_ids: Optional[torch.Tensor],
    exclude_offsets: Optional[torch.Tensor],
    target_ids: Optional[torch.Tensor],
    l2_norm: bool,
    selection: Optional[str],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return topk_items_forward(queries, item_table, k, exclude_ids, exclude_offsets, target_ids, l2_norm, selection,
                              traced=True)


if KERNELS_INTERPRETED:  # interpreted kernels cannot run on fake tensors: an opaque op with a fake
    _topk_op = torch.library.custom_op("hstu_kernels::topk_items", _topk_items_op, mutates_args=())

    @_topk_op.register_fake
    def _topk_items_fake(queries, item_table, k, exclude_ids, exclude_offsets, target_ids, l2_norm, selection):
        rows = queries.shape[0]
        return (queries.new_empty((rows, k), dtype=torch.float32), queries.new_empty((rows, k), dtype=torch.int64),
                queries.new_empty((rows if target_ids is not None else 0,), dtype=torch.int64))
else:  # export keeps one node; torch.compile and AOTInductor see (and compile) the kernels inside
    _topk_op = torch.library.triton_op("hstu_kernels::topk_items", _topk_items_op, mutates_args=())


# --------------------------------------------------------------------------------------------
# The Triton backend of hstu_kernels.topk_items (called through the operator registry)
# --------------------------------------------------------------------------------------------
def topk_items(
    queries: torch.Tensor,
    item_table: torch.Tensor,
    k: int,
    *,
    exclude_ids: torch.Tensor | None = None,
    exclude_offsets: torch.Tensor | None = None,
    target_ids: torch.Tensor | None = None,
    l2_norm: bool = True,
    selection: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(scores [B, k] fp32, ids [B, k] int64, target_rank [B] int64 or None), as the reference defines
    them (inputs checked by the caller, k at most ``MAX_TOPK``: ``unsupported_reason``). Scores in fp32
    whatever the input dtype and autocast. ``selection``: "stream" or "rows" (None: the rule
    ``selection_for``)."""
    k = int(k)
    if k > MAX_TOPK:
        raise ValueError(f"topk_items: k={k} > {MAX_TOPK}, the largest the Triton kernel keeps")
    dtype = torch.promote_types(queries.dtype, item_table.dtype)
    queries, item_table = (_rows_of(x.to(dtype)) for x in (queries, item_table))
    if exclude_ids is None:
        exclude_offsets = None
    # Eager calls on plain tensors skip the dispatcher (tens of microseconds a call); traces (compile,
    # export, fake or functional tensors) must see the op.
    traced = (torch.compiler.is_compiling() or torch.compiler.is_exporting()
              or type(queries) not in (torch.Tensor, torch.nn.Parameter))
    arguments = (queries, item_table, k, exclude_ids, exclude_offsets, target_ids, bool(l2_norm), selection)
    scores, ids, rank = _topk_op(*arguments) if traced else topk_items_forward(*arguments)
    return scores, ids, rank if target_ids is not None else None


def _rows_of(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along D (what the kernels' tile loads assume)."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def unsupported_reason(tensors: Sequence[torch.Tensor], k: int | None = None) -> str | None:
    """Why the Triton kernel cannot run on (queries, item_table) and ``k``; None when it can."""
    if k is not None and k > MAX_TOPK:
        return f"k={k} > {MAX_TOPK}, the largest the kernel keeps"
    for tensor in tensors[:2]:
        if tensor.dtype not in SUPPORTED_DTYPES:
            return f"dtype {tensor.dtype} is not supported (float16, bfloat16, float32)"
        if tensor.dtype == torch.bfloat16 and KERNELS_INTERPRETED:
            return "bfloat16 under TRITON_INTERPRET (the interpreter computes bf16 wrongly)"
    if tensors[0].dim() == 2 and tensors[0].shape[-1] > MAX_DIM:
        return f"embedding dim {tensors[0].shape[-1]} > {MAX_DIM}"
    return None
