"""Triton backend of ``hstu_hierarchical_attention``: jagged causal HSTU attention, biases in-kernel.

For sequence b (tokens s..s+n-1) and 0 <= j <= i < n:
    out[s+i] = sum_j SiLU(alpha * q[s+i].k[s+j] + rab(i, j)) / max_seq_len * v[s+j]
    rab(i, j) = pos_weight[max_seq_len - 1 + j - i] + time_weight[bucket(|q_ts[s+i] - k_ts[s+j]|)]

Layers, after Liger-Kernel: ``@triton.jit`` kernels -> launchers (block sizes per head dim and
dtype) -> ``torch.library`` custom ops ``hstu_kernels::hstu_attention_fwd`` / ``_bwd`` with fake and
autograd registrations (``hstu_kernels.custom_op``: ``torch.compile`` traces through without graph
breaks; eager calls skip the dispatcher) -> ``hstu_attention``, which ``hstu_kernels.hstu_attention``
dispatches to after its input checks.

How it computes, and why:
- No softmax, so no row statistics: the backward recomputes S = alpha q k^T + rab per tile.
- Forward grid (batch*heads, query blocks), last (longest) query blocks launched first; only the
  diagonal tile of each row block is masked, the tiles left of it run without masks.
- The bias is shared across heads: computed once per head, it made the forward 1.9x slower than
  shared by four (H200, kernel notes). With a bias, each program of the forward, dK/dV and dQ
  kernels serves a group of up to four heads (``HEADS``, a divisor of the head count): the bias
  tile is computed once per tile for the group, and each head keeps its own accumulators. Register pressure bounds the group (four
  heads in the forward, two in the backward kernels at head dims <= 64; one above).
- Backward: programs per key block give dK, dV (dS^T Q and P^T dO); programs per query block
  recompute dS and give dQ = alpha dS K. (dQ by fp32 atomics from the key-block programs, 5
  matmuls instead of 7, measured 2-4x slower on an H200: atomic traffic.)
- Bias gradients depend on dS summed over heads only, so a third kind of program, one per
  (sequence, block diagonal), recomputes dS for every head of a tile and reduces the sum once: the
  bias lookup and both reductions run once per tile instead of once per head and tile.
- The three kinds of programs are parts of one kernel. Up to ``MERGED_BACKWARD_MAX_SEQ_LEN`` they
  share one launch (host time per launch is what sets the pace at the model's shapes); above it
  each part has a launch of its own. The time-bias pre-pass runs once per forward and its table is
  kept for the backward.
- Position-bias gradient: the diagonal sums of each dS tile, taken by skewing the tile
  (row i rotated by i, ``tl.gather``) and summing columns. All tiles of a block diagonal cover the
  same two stretches of the position table, so a program sums them in registers.
- Time-bias gradient: a per-tile pass over each bucket present in the tile, into a register
  histogram.
- Each bias-gradient program writes its sums once to its own partial row, and a small kernel adds
  the rows up in a fixed order: no atomics anywhere in the backward, so gradients are the same
  every run, and the extra memory is O(L).
- Time buckets are exact: a float log2 guess, lowered by a margin so that it is the true bucket
  or one below, then corrected by one integer comparison with the shared threshold table. A
  pre-pass flags sequences whose timestamps lie within 2^30 of their first key timestamp: their
  gaps are taken in int32 with a fused [threshold, weight, next weight] table, others in int64.
- Bias tables are read with ``ld.global.nc`` (see ``_gather``; the fused time-table row in one
  16-byte read), SiLU in bf16 with one ``tanh.approx`` (half the special-function work of exp +
  reciprocal; error far below bf16), and the bucket's floor by a rounding add, not a conversion.
- Every bias index is clamped into its table, so malformed inputs cannot read out of bounds.
- Launch plans (grids and compile-time arguments) are cached per problem shape: at the model's
  sizes host time per launch, not the GPU, sets the pace.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from hstu_kernels.custom_op import autograd_custom_op
from hstu_kernels.layout import aligned_rows
from hstu_kernels.triton.common import (
    KERNELS_INTERPRETED, block_dim, cdiv, dot_precision, gather, load_tile, log2, sequence_span, sigmoid, silu,
)
from hstu_kernels.time_buckets import BUCKET_LOG_BASE, bucket_thresholds

MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# bucket(x) = floor(ln(x) / 0.301) = floor(log2(x) * LOG2_TO_BUCKET); the guess is lowered by
# BUCKET_GUESS_MARGIN (far above the float error, ~2e-5) so it is the true bucket or one below.
LOG2_TO_BUCKET = tl.constexpr(math.log(2.0) / float(BUCKET_LOG_BASE))
BUCKET_GUESS_MARGIN = tl.constexpr(1e-3)
# Fused int32 time table: gaps below 2^31 give guesses 0..71 (log2(2^31) * LOG2_TO_BUCKET < 72).
TIME_TABLE_ROWS = 128
TIME_TABLE_WIDTH = tl.constexpr(4)



# --------------------------------------------------------------------------------------------
# Element-wise pieces
# --------------------------------------------------------------------------------------------
@triton.jit
def _gather_time_row(time_table, row, PTX_MATH: tl.constexpr):
    """(threshold, weight below, weight above) of fused time-table rows: one 16-byte read each on the GPU."""
    if PTX_MATH:
        base = time_table + tl.zeros_like(row)
        threshold, below, above = tl.inline_asm_elementwise(
            "{ .reg .u64 a; .reg .b32 pad; mad.wide.s32 a, $4, 16, $3; "
            "ld.global.nc.v4.b32 {$0, $1, $2, pad}, [a]; }",
            "=r,=r,=r,l,r", [base, row], dtype=(tl.int32, tl.int32, tl.int32), is_pure=True, pack=1)
    else:
        entry = time_table + row * TIME_TABLE_WIDTH
        threshold = tl.load(entry)
        below = tl.load(entry + 1)
        above = tl.load(entry + 2)
    return threshold, below.to(tl.float32, bitcast=True), above.to(tl.float32, bitcast=True)


@triton.jit
def _bucket_guess(gap, PTX_MATH: tl.constexpr):
    """max(floor(log2(gap) * LOG2_TO_BUCKET - margin), 0): the exact bucket of the gap or one below it."""
    if PTX_MATH:
        # lg2(0) = -inf clamps to 0 below. The floor is an add of 1.5 * 2^23 rounded toward -inf,
        # which leaves the integer in the low mantissa bits: a full-rate add where a float-to-int
        # conversion would take the 16-per-clock pipe that SiLU's tanh and lg2 already load.
        estimate = log2(gap.to(tl.float32), PTX_MATH) * LOG2_TO_BUCKET - BUCKET_GUESS_MARGIN
        shifted = tl.inline_asm_elementwise("add.rm.f32 $0, $1, 0f4B400000;", "=r,r", [tl.maximum(estimate, 0.0)],
                                            dtype=tl.float32, is_pure=True, pack=1)
        guess = shifted.to(tl.int32, bitcast=True) - 0x4B400000
    else:
        estimate = log2(tl.maximum(gap.to(tl.float32), 1.0), PTX_MATH) * LOG2_TO_BUCKET - BUCKET_GUESS_MARGIN
        guess = estimate.to(tl.int32)
    return guess


@triton.jit
def _time_bias_int64(gap, thresholds, time_weight, num_buckets, PTX_MATH: tl.constexpr):
    """(time bias, bucket) for any int64 gap: guess, then one comparison with the next threshold."""
    guess = tl.minimum(_bucket_guess(gap, PTX_MATH), num_buckets - 1)
    bucket = tl.minimum(guess + (gap >= gather(thresholds, guess + 1, PTX_MATH)).to(tl.int32), num_buckets - 1)
    return gather(time_weight, bucket, PTX_MATH), bucket


@triton.jit
def _time_bias_int32(gap, time_table, num_buckets, PTX_MATH: tl.constexpr):
    """(time bias, bucket) for 0 <= gap < 2^31 from the fused table (see ``_time_table_kernel``):
    one address feeds the threshold and both candidate weights, and guess <= 71 needs no clamp."""
    guess = _bucket_guess(gap, PTX_MATH)
    threshold, below_weight, above_weight = _gather_time_row(time_table, guess, PTX_MATH)
    above = gap >= threshold
    bucket = tl.minimum(guess + above.to(tl.int32), num_buckets - 1)
    return tl.where(above, above_weight, below_weight), bucket


@triton.jit
def _relative_bias(
    q_pos, k_pos, q_ts, k_ts, q_rel, k_rel, gaps_fit_int32,
    pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PTX_MATH: tl.constexpr,
):
    """(rab in fp32, time bucket in int32) on the broadcast of query and key positions/timestamps.

    Positions are clamped to max_seq_len - 1 and buckets to [0, num_buckets - 1], so every table
    read stays in bounds whatever the inputs. Timestamp gaps are taken in int32 from timestamps
    relative to the sequence's first key (q_rel, k_rel) when the pre-pass found that exact
    (``gaps_fit_int32``), else in int64.
    """
    bias = 0.0
    bucket = 0
    if HAS_POS:
        last = max_seq_len - 1
        rel = tl.minimum(k_pos, last) - tl.minimum(q_pos, last) + last
        bias += gather(pos_weight, rel, PTX_MATH)
    if HAS_TIME:
        if gaps_fit_int32:
            time_bias, time_bucket = _time_bias_int32(tl.abs(q_rel - k_rel), time_table, num_buckets, PTX_MATH)
        else:
            time_bias, time_bucket = _time_bias_int64(tl.abs(q_ts - k_ts), thresholds, time_weight, num_buckets, PTX_MATH)
        bias += time_bias
        bucket = time_bucket
    return bias, bucket


@triton.jit
def _time_table_kernel(q_timestamps, k_timestamps, seq_offsets, thresholds, time_weight, num_buckets,
                       gaps_fit, time_table, BLOCK: tl.constexpr, TABLE_ROWS: tl.constexpr):
    """Pre-pass of the time bias.

    Programs 0..B-1: gaps_fit[b] = 1 when every timestamp of sequence b is within 2^30 of its
    first key timestamp, so that gaps between them are exact in int32.
    Program B: the fused int32 table, row g = [T_{g+1} (clamped to int32), bits of
    time_weight[min(g, NB-1)], bits of time_weight[min(g+1, NB-1)], 0], g = 0..TABLE_ROWS-1.
    """
    batch = tl.program_id(0)
    if batch == tl.num_programs(0) - 1:
        g = tl.arange(0, TABLE_ROWS)
        nxt = tl.load(thresholds + tl.minimum(g + 1, num_buckets))
        nxt = tl.minimum(nxt, 2**31 - 1).to(tl.int32)
        below = tl.load(time_weight + tl.minimum(g, num_buckets - 1)).to(tl.float32).to(tl.int32, bitcast=True)
        above = tl.load(time_weight + tl.minimum(g + 1, num_buckets - 1)).to(tl.float32).to(tl.int32, bitcast=True)
        row = time_table + g * TIME_TABLE_WIDTH
        tl.store(row, nxt)
        tl.store(row + 1, below)
        tl.store(row + 2, above)
        tl.store(row + 3, tl.zeros_like(nxt))
    else:
        seq_start = tl.load(seq_offsets + batch).to(tl.int64)
        seq_end = tl.load(seq_offsets + batch + 1).to(tl.int64)
        ref = tl.load(k_timestamps + seq_start, mask=seq_end > seq_start, other=0)
        worst = tl.zeros([BLOCK], dtype=tl.int64)
        for start in range(seq_start, seq_end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            ok = offs < seq_end
            q_gap = tl.abs(tl.load(q_timestamps + offs, mask=ok, other=0) - ref)
            k_gap = tl.abs(tl.load(k_timestamps + offs, mask=ok, other=0) - ref)
            # A wrapped (negative) int64 difference must not pass as small.
            q_gap = tl.where(q_gap < 0, 2**31, q_gap)
            k_gap = tl.where(k_gap < 0, 2**31, k_gap)
            worst = tl.maximum(worst, tl.where(ok, tl.maximum(q_gap, k_gap), 0))
        tl.store(gaps_fit + batch, (tl.max(worst) < 2**30).to(tl.int32))


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_bias(
    q_pos, k_pos, q_ts, q_rel, k_ts_base, ts_ref, gaps_fit_int32, k_ok,
    pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, PTX_MATH: tl.constexpr, KEYS_ON_ROWS: tl.constexpr,
):
    """rab and time buckets of a tile: queries q_pos (1-D) against keys k_pos (1-D, loaded here).

    KEYS_ON_ROWS gives the [keys, queries] orientation of the key-block kernel.
    """
    if KEYS_ON_ROWS:
        q_pos_2d = q_pos[None, :]
        k_pos_2d = k_pos[:, None]
    else:
        q_pos_2d = q_pos[:, None]
        k_pos_2d = k_pos[None, :]
    q_ts_2d = 0
    k_ts_2d = 0
    q_rel_2d = 0
    k_rel_2d = 0
    if HAS_TIME:
        k_ts = tl.load(k_ts_base + k_pos, mask=k_ok, other=0)
        k_rel = (k_ts - ts_ref).to(tl.int32)
        if KEYS_ON_ROWS:
            q_ts_2d, k_ts_2d, q_rel_2d, k_rel_2d = q_ts[None, :], k_ts[:, None], q_rel[None, :], k_rel[:, None]
        else:
            q_ts_2d, k_ts_2d, q_rel_2d, k_rel_2d = q_ts[:, None], k_ts[None, :], q_rel[:, None], k_rel[None, :]
    return _relative_bias(q_pos_2d, k_pos_2d, q_ts_2d, k_ts_2d, q_rel_2d, k_rel_2d, gaps_fit_int32,
                          pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
                          HAS_POS, HAS_TIME, PTX_MATH)


@triton.jit
def _query_time_context(q_timestamps, k_timestamps, gaps_fit, batch, seq_start, offs_m, rows_ok, HAS_TIME: tl.constexpr):
    """(q_ts, q_rel, ts_ref, gaps_fit_int32) for a block of query rows (zeros without time bias)."""
    q_ts = 0
    q_rel = 0
    ts_ref = 0
    gaps_fit_int32 = False
    if HAS_TIME:
        ts_ref = tl.load(k_timestamps + seq_start)
        gaps_fit_int32 = tl.load(gaps_fit + batch) != 0
        q_ts = tl.load(q_timestamps + seq_start + offs_m, mask=rows_ok, other=0)
        q_rel = (q_ts - ts_ref).to(tl.int32)
    return q_ts, q_rel, ts_ref, gaps_fit_int32


@triton.jit
def _forward_head_tile(
    acc, q, q_pos, bias, k_base, v_base, offs_n, cols_ok,
    stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, FAST_SILU: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """acc += SiLU(alpha q k^T + bias) v for one head and key block (causal mask only on the diagonal)."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_tile(k_base + offs_n[:, None] * stride_k_l + offs_dqk[None, :] * stride_k_d,
                   cols_ok, offs_dqk, DQK, BLOCK_DQK, DIAGONAL)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * alpha
    if HAS_BIAS:
        s += bias
    p = silu(s, FAST_SILU)
    if DIAGONAL:
        p = tl.where(offs_n[None, :] <= q_pos[:, None], p, 0.0)
    v = load_tile(v_base + offs_n[:, None] * stride_v_l + offs_dv[None, :] * stride_v_d,
                   cols_ok, offs_dv, DV, BLOCK_DV, DIAGONAL)
    return tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)


@triton.jit
def _forward_key_block(
    acc0, acc1, acc2, acc3, q0, q1, q2, q3, q_pos, q_ts, q_rel, k_base, v_base, k_ts_base, ts_ref,
    gaps_fit_int32, n_start, seq_len, stride_k_l, stride_k_h, stride_k_d, stride_v_l, stride_v_h, stride_v_d,
    alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """One key block for the program's HEADS heads (1-4); the bias tile is computed once for all."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    cols_ok = offs_n < seq_len
    bias = 0.0
    if HAS_POS or HAS_TIME:
        bias, _ = _tile_bias(q_pos, offs_n, q_ts, q_rel, k_ts_base, ts_ref, gaps_fit_int32, cols_ok,
                             pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
                             HAS_POS, HAS_TIME, PTX_MATH, False)
    acc0 = _forward_head_tile(acc0, q0, q_pos, bias, k_base, v_base, offs_n, cols_ok,
                              stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK, BLOCK_DV,
                              HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 1:
        acc1 = _forward_head_tile(acc1, q1, q_pos, bias, k_base + stride_k_h, v_base + stride_v_h, offs_n, cols_ok,
                                  stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK, BLOCK_DV,
                                  HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 2:
        acc2 = _forward_head_tile(acc2, q2, q_pos, bias, k_base + 2 * stride_k_h, v_base + 2 * stride_v_h, offs_n,
                                  cols_ok, stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK,
                                  BLOCK_DV, HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 3:
        acc3 = _forward_head_tile(acc3, q3, q_pos, bias, k_base + 3 * stride_k_h, v_base + 3 * stride_v_h, offs_n,
                                  cols_ok, stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK,
                                  BLOCK_DV, HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    return acc0, acc1, acc2, acc3


@triton.jit
def _store_head_rows(base, acc, offs_m, rows_ok, stride_l, stride_d, scale, D: tl.constexpr, BLOCK_D: tl.constexpr):
    """Store rows offs_m of one head's [rows, D] result, scaled, in the destination's dtype."""
    offs_d = tl.arange(0, BLOCK_D)
    ptrs = base + offs_m[:, None] * stride_l + offs_d[None, :] * stride_d
    tl.store(ptrs, (acc * scale).to(base.dtype.element_ty), mask=rows_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _load_head_slots(ptrs, stride_h, rows_ok, cols, D: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr):
    """The [rows, BLOCK_D] tile of each head of the program's group (``HEADS`` of the four slots;
    slots past it repeat slot 0 and are never used)."""
    t0 = load_tile(ptrs, rows_ok, cols, D, BLOCK_D, True)
    t1 = t0
    t2 = t0
    t3 = t0
    if HEADS > 1:
        t1 = load_tile(ptrs + stride_h, rows_ok, cols, D, BLOCK_D, True)
    if HEADS > 2:
        t2 = load_tile(ptrs + 2 * stride_h, rows_ok, cols, D, BLOCK_D, True)
    if HEADS > 3:
        t3 = load_tile(ptrs + 3 * stride_h, rows_ok, cols, D, BLOCK_D, True)
    return t0, t1, t2, t3


@triton.jit
def _load_head_slot_pairs(a_ptrs, a_stride_h, a_cols, DA: tl.constexpr, BLOCK_A: tl.constexpr,
                          b_ptrs, b_stride_h, b_cols, DB: tl.constexpr, BLOCK_B: tl.constexpr,
                          rows_ok, HEADS: tl.constexpr):
    """Two tiles per head of the group (k and v, or q and dO), head by head, as ``_load_head_slots``."""
    a0 = load_tile(a_ptrs, rows_ok, a_cols, DA, BLOCK_A, True)
    b0 = load_tile(b_ptrs, rows_ok, b_cols, DB, BLOCK_B, True)
    a1 = a0
    b1 = b0
    a2 = a0
    b2 = b0
    a3 = a0
    b3 = b0
    if HEADS > 1:
        a1 = load_tile(a_ptrs + a_stride_h, rows_ok, a_cols, DA, BLOCK_A, True)
        b1 = load_tile(b_ptrs + b_stride_h, rows_ok, b_cols, DB, BLOCK_B, True)
    if HEADS > 2:
        a2 = load_tile(a_ptrs + 2 * a_stride_h, rows_ok, a_cols, DA, BLOCK_A, True)
        b2 = load_tile(b_ptrs + 2 * b_stride_h, rows_ok, b_cols, DB, BLOCK_B, True)
    if HEADS > 3:
        a3 = load_tile(a_ptrs + 3 * a_stride_h, rows_ok, a_cols, DA, BLOCK_A, True)
        b3 = load_tile(b_ptrs + 3 * b_stride_h, rows_ok, b_cols, DB, BLOCK_B, True)
    return a0, b0, a1, b1, a2, b2, a3, b3


@triton.jit
def _store_head_slots(base, stride_h, acc0, acc1, acc2, acc3, offs_m, rows_ok, stride_l, stride_d, scale,
                      D: tl.constexpr, BLOCK_D: tl.constexpr, HEADS: tl.constexpr):
    """Store the group's per-head results (slot s at head offset s), scaled, in the destination's dtype."""
    _store_head_rows(base, acc0, offs_m, rows_ok, stride_l, stride_d, scale, D, BLOCK_D)
    if HEADS > 1:
        _store_head_rows(base + stride_h, acc1, offs_m, rows_ok, stride_l, stride_d, scale, D, BLOCK_D)
    if HEADS > 2:
        _store_head_rows(base + 2 * stride_h, acc2, offs_m, rows_ok, stride_l, stride_d, scale, D, BLOCK_D)
    if HEADS > 3:
        _store_head_rows(base + 3 * stride_h, acc3, offs_m, rows_ok, stride_l, stride_d, scale, D, BLOCK_D)


@triton.jit
def _hstu_attention_fwd_kernel(
    Q, K, V, Out, seq_offsets,
    pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
    stride_q_l, stride_q_h, stride_q_d,
    stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d,
    stride_o_l, stride_o_h, stride_o_d,
    num_heads, max_seq_len, num_buckets, alpha, inv_max_seq_len,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Grid (batch * head groups, query blocks); axis 1 counts down so that the last query blocks
    # (most key blocks) start first. A program serves HEADS consecutive heads.
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    num_groups = num_heads // HEADS
    batch = tl.program_id(0) // num_groups
    head = (tl.program_id(0) % num_groups) * HEADS
    seq_start, seq_len = sequence_span(seq_offsets, batch)
    m_start = pid_m * BLOCK_M
    if m_start >= seq_len:
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < seq_len
    offs_dqk = tl.arange(0, BLOCK_DQK)
    q_ptrs = (Q + seq_start * stride_q_l + head * stride_q_h
              + offs_m[:, None] * stride_q_l + offs_dqk[None, :] * stride_q_d)
    q0, q1, q2, q3 = _load_head_slots(q_ptrs, stride_q_h, rows_ok, offs_dqk, DQK, BLOCK_DQK, HEADS)
    q_ts, q_rel, ts_ref, gaps_fit_int32 = _query_time_context(
        q_timestamps, k_timestamps, gaps_fit, batch, seq_start, offs_m, rows_ok, HAS_TIME)
    k_base = K + seq_start * stride_k_l + head * stride_k_h
    v_base = V + seq_start * stride_v_l + head * stride_v_h
    k_ts_base = k_timestamps + seq_start

    acc0 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    for n_start in range(0, m_start, BLOCK_N):
        acc0, acc1, acc2, acc3 = _forward_key_block(
            acc0, acc1, acc2, acc3, q0, q1, q2, q3, offs_m, q_ts, q_rel, k_base, v_base, k_ts_base, ts_ref,
            gaps_fit_int32, n_start, seq_len, stride_k_l, stride_k_h, stride_k_d, stride_v_l, stride_v_h, stride_v_d,
            alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, False)
    for n_start in range(m_start, tl.minimum(m_start + BLOCK_M, seq_len), BLOCK_N):
        acc0, acc1, acc2, acc3 = _forward_key_block(
            acc0, acc1, acc2, acc3, q0, q1, q2, q3, offs_m, q_ts, q_rel, k_base, v_base, k_ts_base, ts_ref,
            gaps_fit_int32, n_start, seq_len, stride_k_l, stride_k_h, stride_k_d, stride_v_l, stride_v_h, stride_v_d,
            alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, True)

    _store_head_slots(Out + seq_start * stride_o_l + head * stride_o_h, stride_o_h, acc0, acc1, acc2, acc3,
                      offs_m, rows_ok, stride_o_l, stride_o_d, inv_max_seq_len, DV, BLOCK_DV, HEADS)


# --------------------------------------------------------------------------------------------
# Delta-query forward: new tokens against cached keys and values (incremental inference)
# --------------------------------------------------------------------------------------------
@triton.jit
def _hstu_attention_delta_fwd_kernel(
    Q, K, V, CK, CV, Out, seq_offsets, cached_offsets,
    pos_weight, time_weight, q_timestamps, k_timestamps, cached_k_timestamps, thresholds,
    stride_q_l, stride_q_h, stride_q_d,
    stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d,
    stride_ck_l, stride_ck_h, stride_ck_d,
    stride_cv_l, stride_cv_h, stride_cv_d,
    stride_o_l, stride_o_h, stride_o_d,
    num_heads, max_seq_len, num_buckets, alpha, inv_max_seq_len,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Grid (batch * head groups, blocks of new tokens). New token r of sequence b sits at position
    n_b + r; it attends to the n_b cached keys (all earlier: no causal mask, masked loads only in the
    last partial block) and to new keys 0..r. Key tiles go through ``_forward_key_block`` with
    absolute positions; the new keys' base pointers are moved back by n_b rows so that position
    n_b + t addresses new row t. Time gaps are taken in int64 (no pre-pass: the delta form serves a
    few queries, where the int32 path's pre-pass would cost more than it saves)."""
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    num_groups = num_heads // HEADS
    batch = tl.program_id(0) // num_groups
    head = (tl.program_id(0) % num_groups) * HEADS
    seq_start, new_len = sequence_span(seq_offsets, batch)
    cached_start, cached_len = sequence_span(cached_offsets, batch)
    m_start = pid_m * BLOCK_M
    if m_start >= new_len:
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < new_len
    q_pos = cached_len + offs_m
    offs_dqk = tl.arange(0, BLOCK_DQK)
    q_ptrs = (Q + seq_start * stride_q_l + head * stride_q_h
              + offs_m[:, None] * stride_q_l + offs_dqk[None, :] * stride_q_d)
    q0, q1, q2, q3 = _load_head_slots(q_ptrs, stride_q_h, rows_ok, offs_dqk, DQK, BLOCK_DQK, HEADS)
    q_ts = 0
    q_rel = 0  # the int32 gap path's relative timestamps: unused here (int64 gaps)
    if HAS_TIME:
        q_ts = tl.load(q_timestamps + seq_start + offs_m, mask=rows_ok, other=0)
        q_rel = tl.zeros([BLOCK_M], dtype=tl.int32)

    acc0 = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    # Cached keys: full blocks without masks, then the partial block with them.
    ck_base = CK + cached_start * stride_ck_l + head * stride_ck_h
    cv_base = CV + cached_start * stride_cv_l + head * stride_cv_h
    cached_ts_base = cached_k_timestamps + cached_start
    full_end = (cached_len // BLOCK_N) * BLOCK_N
    for n_start in range(0, full_end, BLOCK_N):
        acc0, acc1, acc2, acc3 = _forward_key_block(
            acc0, acc1, acc2, acc3, q0, q1, q2, q3, q_pos, q_ts, q_rel, ck_base, cv_base, cached_ts_base, 0,
            False, n_start, cached_len, stride_ck_l, stride_ck_h, stride_ck_d, stride_cv_l, stride_cv_h, stride_cv_d,
            alpha, pos_weight, time_weight, thresholds, thresholds, max_seq_len, num_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, False)
    for n_start in range(full_end, cached_len, BLOCK_N):
        acc0, acc1, acc2, acc3 = _forward_key_block(
            acc0, acc1, acc2, acc3, q0, q1, q2, q3, q_pos, q_ts, q_rel, ck_base, cv_base, cached_ts_base, 0,
            False, n_start, cached_len, stride_ck_l, stride_ck_h, stride_ck_d, stride_cv_l, stride_cv_h, stride_cv_d,
            alpha, pos_weight, time_weight, thresholds, thresholds, max_seq_len, num_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, True)
    # New keys up to this block's last query, causal.
    k_base = K + (seq_start - cached_len) * stride_k_l + head * stride_k_h
    v_base = V + (seq_start - cached_len) * stride_v_l + head * stride_v_h
    new_ts_base = k_timestamps + seq_start - cached_len
    total_len = cached_len + new_len
    for n_start in range(cached_len, tl.minimum(cached_len + m_start + BLOCK_M, total_len), BLOCK_N):
        acc0, acc1, acc2, acc3 = _forward_key_block(
            acc0, acc1, acc2, acc3, q0, q1, q2, q3, q_pos, q_ts, q_rel, k_base, v_base, new_ts_base, 0,
            False, n_start, total_len, stride_k_l, stride_k_h, stride_k_d, stride_v_l, stride_v_h, stride_v_d,
            alpha, pos_weight, time_weight, thresholds, thresholds, max_seq_len, num_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, True)

    _store_head_slots(Out + seq_start * stride_o_l + head * stride_o_h, stride_o_h, acc0, acc1, acc2, acc3,
                      offs_m, rows_ok, stride_o_l, stride_o_d, inv_max_seq_len, DV, BLOCK_DV, HEADS)


# --------------------------------------------------------------------------------------------
# Backward, part 1: dK and dV per key block
# --------------------------------------------------------------------------------------------
@triton.jit
def _key_head_tile(
    dk, dv, k, v, k_pos, bias_t, q_base, do_base, offs_m, rows_ok,
    stride_q_l, stride_q_d, stride_do_l, stride_do_d, alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, FAST_SILU: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """One head: a query block against this key block, in transposed form (rows = keys)."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    # Query rows past the sequence load as zeros: with dO = 0 they add nothing to dK, dV.
    q = load_tile(q_base + offs_m[:, None] * stride_q_l + offs_dqk[None, :] * stride_q_d,
                   rows_ok, offs_dqk, DQK, BLOCK_DQK, True)
    do = load_tile(do_base + offs_m[:, None] * stride_do_l + offs_dv[None, :] * stride_do_d,
                    rows_ok, offs_dv, DV, BLOCK_DV, True)
    s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * alpha  # [keys, queries]
    if HAS_BIAS:
        s_t += bias_t
    sig = sigmoid(s_t, FAST_SILU)
    p_t = s_t * sig
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
    ds_t = dp_t * (sig + p_t * (1.0 - sig))  # SiLU'(s) = sig * (1 + s * (1 - sig))
    if DIAGONAL:
        causal = offs_m[None, :] >= k_pos[:, None]
        p_t = tl.where(causal, p_t, 0.0)
        ds_t = tl.where(causal, ds_t, 0.0)
    dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
    dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _key_query_block(
    dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3, k0, v0, k1, v1, k2, v2, k3, v3,
    k_pos, cols_ok, q_base, do_base, m_start, seq_len, q_ts_base, k_ts_base, ts_ref, gaps_fit_int32,
    stride_q_l, stride_q_h, stride_q_d, stride_do_l, stride_do_h, stride_do_d,
    alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, HEADS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """One query block for the program's HEADS heads; the bias tile is computed once for all."""
    offs_m = m_start + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < seq_len
    bias_t = 0.0
    if HAS_POS or HAS_TIME:
        q_ts = 0
        q_rel = 0
        if HAS_TIME:
            q_ts = tl.load(q_ts_base + offs_m, mask=rows_ok, other=0)
            q_rel = (q_ts - ts_ref).to(tl.int32)
        bias_t, _ = _tile_bias(offs_m, k_pos, q_ts, q_rel, k_ts_base, ts_ref, gaps_fit_int32, cols_ok,
                               pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
                               HAS_POS, HAS_TIME, PTX_MATH, True)
    dk0, dv0 = _key_head_tile(dk0, dv0, k0, v0, k_pos, bias_t, q_base, do_base, offs_m, rows_ok,
                              stride_q_l, stride_q_d, stride_do_l, stride_do_d, alpha, DQK, DV, BLOCK_DQK, BLOCK_DV,
                              HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 1:
        dk1, dv1 = _key_head_tile(dk1, dv1, k1, v1, k_pos, bias_t, q_base + stride_q_h, do_base + stride_do_h,
                                  offs_m, rows_ok, stride_q_l, stride_q_d, stride_do_l, stride_do_d, alpha,
                                  DQK, DV, BLOCK_DQK, BLOCK_DV, HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 2:
        dk2, dv2 = _key_head_tile(dk2, dv2, k2, v2, k_pos, bias_t, q_base + 2 * stride_q_h,
                                  do_base + 2 * stride_do_h, offs_m, rows_ok,
                                  stride_q_l, stride_q_d, stride_do_l, stride_do_d, alpha,
                                  DQK, DV, BLOCK_DQK, BLOCK_DV, HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 3:
        dk3, dv3 = _key_head_tile(dk3, dv3, k3, v3, k_pos, bias_t, q_base + 3 * stride_q_h,
                                  do_base + 3 * stride_do_h, offs_m, rows_ok,
                                  stride_q_l, stride_q_d, stride_do_l, stride_do_d, alpha,
                                  DQK, DV, BLOCK_DQK, BLOCK_DV, HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    return dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3


@triton.jit
def _dkdv_program(
    group_pid, pid_n, Q, K, V, dO, dK, dV, seq_offsets,
    pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
    stride_q_l, stride_q_h, stride_q_d,
    stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d,
    stride_do_l, stride_do_h, stride_do_d,
    stride_dk_l, stride_dk_h, stride_dk_d,
    stride_dv_l, stride_dv_h, stride_dv_d,
    num_heads, max_seq_len, num_buckets, alpha, inv_max_seq_len,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dK and dV of key block ``pid_n`` for (sequence, group of HEADS consecutive heads) ``group_pid``.
    Programs run key block 0 of every group first: it sees every query block, so the heaviest
    start first."""
    num_groups = num_heads // HEADS
    batch = group_pid // num_groups
    head = (group_pid % num_groups) * HEADS
    seq_start, seq_len = sequence_span(seq_offsets, batch)
    n_start = pid_n * BLOCK_N
    if n_start >= seq_len:
        return

    offs_n = n_start + tl.arange(0, BLOCK_N)
    cols_ok = offs_n < seq_len
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptrs = (K + seq_start * stride_k_l + head * stride_k_h
              + offs_n[:, None] * stride_k_l + offs_dqk[None, :] * stride_k_d)
    v_ptrs = (V + seq_start * stride_v_l + head * stride_v_h
              + offs_n[:, None] * stride_v_l + offs_dv[None, :] * stride_v_d)
    k0, v0, k1, v1, k2, v2, k3, v3 = _load_head_slot_pairs(k_ptrs, stride_k_h, offs_dqk, DQK, BLOCK_DQK,
                                                           v_ptrs, stride_v_h, offs_dv, DV, BLOCK_DV, cols_ok, HEADS)
    ts_ref = 0
    gaps_fit_int32 = False
    if HAS_TIME:
        ts_ref = tl.load(k_timestamps + seq_start)
        gaps_fit_int32 = tl.load(gaps_fit + batch) != 0
    q_base = Q + seq_start * stride_q_l + head * stride_q_h
    do_base = dO + seq_start * stride_do_l + head * stride_do_h
    q_ts_base = q_timestamps + seq_start
    k_ts_base = k_timestamps + seq_start

    dk0 = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    dk1 = dk0
    dv1 = dv0
    dk2 = dk0
    dv2 = dv0
    dk3 = dk0
    dv3 = dv0
    for m_start in range(n_start, tl.minimum(n_start + BLOCK_N, seq_len), BLOCK_M):
        dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3 = _key_query_block(
            dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3, k0, v0, k1, v1, k2, v2, k3, v3,
            offs_n, cols_ok, q_base, do_base, m_start, seq_len, q_ts_base, k_ts_base, ts_ref, gaps_fit_int32,
            stride_q_l, stride_q_h, stride_q_d, stride_do_l, stride_do_h, stride_do_d,
            alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, True)
    for m_start in range(n_start + BLOCK_N, seq_len, BLOCK_M):
        dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3 = _key_query_block(
            dk0, dv0, dk1, dv1, dk2, dv2, dk3, dv3, k0, v0, k1, v1, k2, v2, k3, v3,
            offs_n, cols_ok, q_base, do_base, m_start, seq_len, q_ts_base, k_ts_base, ts_ref, gaps_fit_int32,
            stride_q_l, stride_q_h, stride_q_d, stride_do_l, stride_do_h, stride_do_d,
            alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_M, HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, False)

    dk_base = dK + seq_start * stride_dk_l + head * stride_dk_h
    dv_base = dV + seq_start * stride_dv_l + head * stride_dv_h
    dk_scale = alpha * inv_max_seq_len
    _store_head_rows(dk_base, dk0, offs_n, cols_ok, stride_dk_l, stride_dk_d, dk_scale, DQK, BLOCK_DQK)
    _store_head_rows(dv_base, dv0, offs_n, cols_ok, stride_dv_l, stride_dv_d, inv_max_seq_len, DV, BLOCK_DV)
    if HEADS > 1:
        _store_head_rows(dk_base + stride_dk_h, dk1, offs_n, cols_ok, stride_dk_l, stride_dk_d, dk_scale,
                         DQK, BLOCK_DQK)
        _store_head_rows(dv_base + stride_dv_h, dv1, offs_n, cols_ok, stride_dv_l, stride_dv_d, inv_max_seq_len,
                         DV, BLOCK_DV)
    if HEADS > 2:
        _store_head_rows(dk_base + 2 * stride_dk_h, dk2, offs_n, cols_ok, stride_dk_l, stride_dk_d, dk_scale,
                         DQK, BLOCK_DQK)
        _store_head_rows(dv_base + 2 * stride_dv_h, dv2, offs_n, cols_ok, stride_dv_l, stride_dv_d,
                         inv_max_seq_len, DV, BLOCK_DV)
    if HEADS > 3:
        _store_head_rows(dk_base + 3 * stride_dk_h, dk3, offs_n, cols_ok, stride_dk_l, stride_dk_d, dk_scale,
                         DQK, BLOCK_DQK)
        _store_head_rows(dv_base + 3 * stride_dv_h, dv3, offs_n, cols_ok, stride_dv_l, stride_dv_d,
                         inv_max_seq_len, DV, BLOCK_DV)


# --------------------------------------------------------------------------------------------
# Backward, part 2: dQ per query block
# --------------------------------------------------------------------------------------------
@triton.jit
def _score_grad(q, do, k, v, bias, alpha,
                HAS_BIAS: tl.constexpr, FAST_SILU: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """dS = dP * SiLU'(S) with S = alpha q k^T + bias and dP = dO v^T (unmasked, unscaled)."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * alpha
    if HAS_BIAS:
        s += bias
    sig = sigmoid(s, FAST_SILU)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    return dp * (sig + s * sig * (1.0 - sig))


@triton.jit
def _query_head_tile(
    dq, q, do, q_pos, bias, k_base, v_base, offs_n, cols_ok,
    stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, FAST_SILU: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """dq += dS k for one head and key block."""
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_tile(k_base + offs_n[:, None] * stride_k_l + offs_dqk[None, :] * stride_k_d,
                   cols_ok, offs_dqk, DQK, BLOCK_DQK, DIAGONAL)
    v = load_tile(v_base + offs_n[:, None] * stride_v_l + offs_dv[None, :] * stride_v_d,
                   cols_ok, offs_dv, DV, BLOCK_DV, DIAGONAL)
    ds = _score_grad(q, do, k, v, bias, alpha, HAS_BIAS, FAST_SILU, DOT_PRECISION)
    if DIAGONAL:
        ds = tl.where(offs_n[None, :] <= q_pos[:, None], ds, 0.0)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)


@triton.jit
def _query_key_block(
    dq0, dq1, dq2, dq3, q0, q1, q2, q3, do0, do1, do2, do3, q_pos, q_ts, q_rel, k_base, v_base, k_ts_base,
    ts_ref, gaps_fit_int32, n_start, seq_len, stride_k_l, stride_k_h, stride_k_d, stride_v_l, stride_v_h,
    stride_v_d, alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """One key block for the program's HEADS heads; the bias tile is computed once for all."""
    offs_n = n_start + tl.arange(0, BLOCK_N)
    cols_ok = offs_n < seq_len
    bias = 0.0
    if HAS_POS or HAS_TIME:
        bias, _ = _tile_bias(q_pos, offs_n, q_ts, q_rel, k_ts_base, ts_ref, gaps_fit_int32, cols_ok,
                             pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
                             HAS_POS, HAS_TIME, PTX_MATH, False)
    dq0 = _query_head_tile(dq0, q0, do0, q_pos, bias, k_base, v_base, offs_n, cols_ok,
                           stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK, BLOCK_DV,
                           HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 1:
        dq1 = _query_head_tile(dq1, q1, do1, q_pos, bias, k_base + stride_k_h, v_base + stride_v_h, offs_n, cols_ok,
                               stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK, BLOCK_DV,
                               HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 2:
        dq2 = _query_head_tile(dq2, q2, do2, q_pos, bias, k_base + 2 * stride_k_h, v_base + 2 * stride_v_h, offs_n,
                               cols_ok, stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK,
                               BLOCK_DV, HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    if HEADS > 3:
        dq3 = _query_head_tile(dq3, q3, do3, q_pos, bias, k_base + 3 * stride_k_h, v_base + 3 * stride_v_h, offs_n,
                               cols_ok, stride_k_l, stride_k_d, stride_v_l, stride_v_d, alpha, DQK, DV, BLOCK_DQK,
                               BLOCK_DV, HAS_POS or HAS_TIME, FAST_SILU, DOT_PRECISION, DIAGONAL)
    return dq0, dq1, dq2, dq3


@triton.jit
def _dq_program(
    group_pid, block_pid, num_blocks, Q, K, V, dO, dQ, seq_offsets,
    pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
    stride_q_l, stride_q_h, stride_q_d,
    stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d,
    stride_do_l, stride_do_h, stride_do_d,
    stride_dq_l, stride_dq_h, stride_dq_d,
    num_heads, max_seq_len, num_buckets, alpha, dq_scale,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEADS: tl.constexpr, HAS_POS: tl.constexpr,
    HAS_TIME: tl.constexpr, FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """dQ of a query block (BLOCK_M rows; key blocks of BLOCK_N, which divides BLOCK_M) for
    (sequence, group of HEADS consecutive heads) ``group_pid``; block_pid counts from the last of
    ``num_blocks`` query blocks (most key blocks), so the heaviest start first."""
    pid_m = num_blocks - 1 - block_pid
    num_groups = num_heads // HEADS
    batch = group_pid // num_groups
    head = (group_pid % num_groups) * HEADS
    seq_start, seq_len = sequence_span(seq_offsets, batch)
    m_start = pid_m * BLOCK_M
    if m_start >= seq_len:
        return

    offs_m = m_start + tl.arange(0, BLOCK_M)
    rows_ok = offs_m < seq_len
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ts, q_rel, ts_ref, gaps_fit_int32 = _query_time_context(
        q_timestamps, k_timestamps, gaps_fit, batch, seq_start, offs_m, rows_ok, HAS_TIME)
    q_ptrs = (Q + seq_start * stride_q_l + head * stride_q_h
              + offs_m[:, None] * stride_q_l + offs_dqk[None, :] * stride_q_d)
    do_ptrs = (dO + seq_start * stride_do_l + head * stride_do_h
               + offs_m[:, None] * stride_do_l + offs_dv[None, :] * stride_do_d)
    q0, do0, q1, do1, q2, do2, q3, do3 = _load_head_slot_pairs(q_ptrs, stride_q_h, offs_dqk, DQK, BLOCK_DQK,
                                                               do_ptrs, stride_do_h, offs_dv, DV, BLOCK_DV,
                                                               rows_ok, HEADS)
    k_base = K + seq_start * stride_k_l + head * stride_k_h
    v_base = V + seq_start * stride_v_l + head * stride_v_h
    k_ts_base = k_timestamps + seq_start

    dq0 = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    dq1 = dq0
    dq2 = dq0
    dq3 = dq0
    for n_start in range(0, m_start, BLOCK_N):
        dq0, dq1, dq2, dq3 = _query_key_block(
            dq0, dq1, dq2, dq3, q0, q1, q2, q3, do0, do1, do2, do3, offs_m, q_ts, q_rel, k_base, v_base,
            k_ts_base, ts_ref, gaps_fit_int32, n_start, seq_len, stride_k_l, stride_k_h, stride_k_d,
            stride_v_l, stride_v_h, stride_v_d, alpha, pos_weight, time_weight, thresholds, time_table,
            max_seq_len, num_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HEADS, HAS_POS, HAS_TIME,
            FAST_SILU, PTX_MATH, DOT_PRECISION, False)
    for n_start in range(m_start, tl.minimum(m_start + BLOCK_M, seq_len), BLOCK_N):
        dq0, dq1, dq2, dq3 = _query_key_block(
            dq0, dq1, dq2, dq3, q0, q1, q2, q3, do0, do1, do2, do3, offs_m, q_ts, q_rel, k_base, v_base,
            k_ts_base, ts_ref, gaps_fit_int32, n_start, seq_len, stride_k_l, stride_k_h, stride_k_d,
            stride_v_l, stride_v_h, stride_v_d, alpha, pos_weight, time_weight, thresholds, time_table,
            max_seq_len, num_buckets, DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK_N, HEADS, HAS_POS, HAS_TIME,
            FAST_SILU, PTX_MATH, DOT_PRECISION, True)

    _store_head_slots(dQ + seq_start * stride_dq_l + head * stride_dq_h, stride_dq_h, dq0, dq1, dq2, dq3,
                      offs_m, rows_ok, stride_dq_l, stride_dq_d, dq_scale, DQK, BLOCK_DQK, HEADS)


# --------------------------------------------------------------------------------------------
# Backward, part 3: bias gradients from the head-summed dS, per (sequence, block diagonal)
# --------------------------------------------------------------------------------------------
@triton.jit
def _head_summed_score_grad(
    q_base, do_base, k_base, v_base, q_pos, rows_ok, q_ts, q_rel, k_ts_base, ts_ref, gaps_fit_int32,
    n_start, seq_len, num_heads,
    stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
    alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """(sum over heads of dS, time buckets) of one tile; the bias is computed once for all heads."""
    offs_n = n_start + tl.arange(0, BLOCK)
    cols_ok = offs_n < seq_len
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    bias, bucket = _tile_bias(q_pos, offs_n, q_ts, q_rel, k_ts_base, ts_ref, gaps_fit_int32, cols_ok,
                              pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
                              HAS_POS, HAS_TIME, PTX_MATH, False)
    ds_sum = tl.zeros([BLOCK, BLOCK], dtype=tl.float32)
    for head in range(num_heads):
        q = load_tile(q_base + head * stride_q_h + q_pos[:, None] * stride_q_l + offs_dqk[None, :] * stride_q_d,
                       rows_ok, offs_dqk, DQK, BLOCK_DQK, True)
        do = load_tile(do_base + head * stride_do_h + q_pos[:, None] * stride_do_l + offs_dv[None, :] * stride_do_d,
                        rows_ok, offs_dv, DV, BLOCK_DV, True)
        k = load_tile(k_base + head * stride_k_h + offs_n[:, None] * stride_k_l + offs_dqk[None, :] * stride_k_d,
                       cols_ok, offs_dqk, DQK, BLOCK_DQK, DIAGONAL)
        v = load_tile(v_base + head * stride_v_h + offs_n[:, None] * stride_v_l + offs_dv[None, :] * stride_v_d,
                       cols_ok, offs_dv, DV, BLOCK_DV, DIAGONAL)
        ds_sum += _score_grad(q, do, k, v, bias, alpha, True, FAST_SILU, DOT_PRECISION)
    if DIAGONAL:
        ds_sum = tl.where(offs_n[None, :] <= q_pos[:, None], ds_sum, 0.0)
    return ds_sum, bucket


@triton.jit
def _diagonal_sums(ds, BLOCK: tl.constexpr):
    """(lower, upper) sums of a tile's diagonals r = j - i: lower[c] of r = c - BLOCK, upper[c] of
    r = c. Rotating row i left by i puts diagonal c in column c of rows i < BLOCK - c, and
    diagonal c - BLOCK in the other rows of that column."""
    rows = tl.arange(0, BLOCK)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    skewed = tl.gather(ds, (rows + cols) & (BLOCK - 1), axis=1)
    lower = tl.sum(tl.where(rows + cols >= BLOCK, skewed, 0.0), axis=0)
    return lower, tl.sum(skewed, axis=0) - lower


@triton.jit
def _accumulate_time_grads(hist, ds, bucket, valid, num_buckets, NB_BLOCK: tl.constexpr):
    """hist[t] += sum of ds over the tile's elements in bucket t, one pass per bucket present.

    (Run-length sums along rows with one atomic per run were tried: 3x slower from contention on
    the few buckets, and less exact, since runs come out as differences of prefix sums.)"""
    lowest = tl.min(tl.where(valid, bucket, num_buckets))
    highest = tl.max(tl.where(valid, bucket, -1))
    bins = tl.arange(0, NB_BLOCK)
    for t in range(lowest, highest + 1):
        total = tl.sum(tl.where(bucket == t, ds, 0.0))
        hist += tl.where(bins == t, total, 0.0)
    return hist


@triton.jit
def _bias_grad_tile(
    lower, upper, hist, m_start, n_start, q_base, do_base, k_base, v_base, q_ts_base, k_ts_base, ts_ref,
    gaps_fit_int32, seq_len, num_heads,
    stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
    alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, NB_BLOCK: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr,
    FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr, DIAGONAL: tl.constexpr,
):
    """Query block m_start against key block n_start: its diagonal sums added to (lower, upper),
    its time-bucket sums to hist."""
    offs_m = m_start + tl.arange(0, BLOCK)
    rows_ok = offs_m < seq_len
    q_ts = 0
    q_rel = 0
    if HAS_TIME:
        q_ts = tl.load(q_ts_base + offs_m, mask=rows_ok, other=0)
        q_rel = (q_ts - ts_ref).to(tl.int32)
    ds, bucket = _head_summed_score_grad(
        q_base, do_base, k_base, v_base, offs_m, rows_ok, q_ts, q_rel, k_ts_base, ts_ref, gaps_fit_int32,
        n_start, seq_len, num_heads,
        stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
        stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
        alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
        DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH, DOT_PRECISION, DIAGONAL)
    if POS_GRAD:
        tile_lower, tile_upper = _diagonal_sums(ds, BLOCK)
        lower += tile_lower
        upper += tile_upper
    if TIME_GRAD:
        valid = rows_ok[:, None]
        if DIAGONAL:
            valid = valid & (tl.arange(0, BLOCK)[None, :] <= tl.arange(0, BLOCK)[:, None])
        hist = _accumulate_time_grads(hist, ds, bucket, valid, num_buckets, NB_BLOCK)
    return lower, upper, hist


@triton.jit
def _bias_grad_program(
    batch, offset, num_offsets, Q, K, V, dO, seq_offsets,
    pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
    dpos_part, dtime_part,
    stride_q_l, stride_q_h, stride_q_d,
    stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d,
    stride_do_l, stride_do_h, stride_do_d,
    num_heads, max_seq_len, num_buckets, alpha, bias_grad_scale,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK: tl.constexpr, NB_BLOCK: tl.constexpr, HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr,
    POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr,
    FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Bias gradients from the tiles on block diagonal ``offset`` of sequence ``batch``: every
    query block m against key block m - offset (offset 0, the longest, first). dS is summed over
    the heads, so the bias and both reductions run once per tile, not once per head. All tiles of
    a block diagonal add to the same two BLOCK-long stretches of the position table, so the program
    sums them in registers and writes them once, with its time-bucket histogram, to its own partial
    row (written whole, even without tiles): no atomics, the same result every run, O(L) memory.
    ``_bias_grad_sum_kernel`` adds the rows up."""
    seq_start, seq_len = sequence_span(seq_offsets, batch)
    ts_ref = 0
    gaps_fit_int32 = False
    if HAS_TIME:
        ts_ref = tl.load(k_timestamps + seq_start, mask=seq_len > 0, other=0)
        gaps_fit_int32 = tl.load(gaps_fit + batch) != 0
    q_base = Q + seq_start * stride_q_l
    do_base = dO + seq_start * stride_do_l
    k_base = K + seq_start * stride_k_l
    v_base = V + seq_start * stride_v_l
    q_ts_base = q_timestamps + seq_start
    k_ts_base = k_timestamps + seq_start
    lower = tl.zeros([BLOCK], dtype=tl.float32)
    upper = tl.zeros([BLOCK], dtype=tl.float32)
    hist = tl.zeros([NB_BLOCK], dtype=tl.float32)
    if offset == 0:
        for m_start in range(0, seq_len, BLOCK):
            lower, upper, hist = _bias_grad_tile(
                lower, upper, hist, m_start, m_start, q_base, do_base, k_base, v_base, q_ts_base, k_ts_base, ts_ref,
                gaps_fit_int32, seq_len, num_heads,
                stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
                stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
                alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
                DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK, NB_BLOCK, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD,
                FAST_SILU, PTX_MATH, DOT_PRECISION, True)
    else:
        for m_start in range(offset * BLOCK, seq_len, BLOCK):
            lower, upper, hist = _bias_grad_tile(
                lower, upper, hist, m_start, m_start - offset * BLOCK, q_base, do_base, k_base, v_base, q_ts_base,
                k_ts_base, ts_ref, gaps_fit_int32, seq_len, num_heads,
                stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
                stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
                alpha, pos_weight, time_weight, thresholds, time_table, max_seq_len, num_buckets,
                DQK, DV, BLOCK_DQK, BLOCK_DV, BLOCK, NB_BLOCK, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD,
                FAST_SILU, PTX_MATH, DOT_PRECISION, False)
    row = (batch * num_offsets + offset).to(tl.int64)
    if POS_GRAD:
        cols = tl.arange(0, BLOCK)
        tl.store(dpos_part + row * (2 * BLOCK) + cols, lower * bias_grad_scale)
        tl.store(dpos_part + row * (2 * BLOCK) + BLOCK + cols, upper * bias_grad_scale)
    if TIME_GRAD:
        bins = tl.arange(0, NB_BLOCK)
        tl.store(dtime_part + row * num_buckets + bins, hist * bias_grad_scale, mask=bins < num_buckets)


@triton.jit
def _bias_grad_sum_kernel(dpos_part, dtime_part, dpos, dtime, num_sequences, num_offsets, max_seq_len, num_buckets,
                          POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr, BLOCK: tl.constexpr,
                          CHUNK: tl.constexpr, ROWS: tl.constexpr, NB_BLOCK: tl.constexpr):
    """The bias gradients from the partial rows of ``_bias_grad_program``, summed over sequences in
    a fixed order. Programs 0, 1, ..: CHUNK entries each of dpos, whose index x holds diagonal
    r = x - (max_seq_len - 1) = -offset * BLOCK + c: the upper stretch of block diagonal ``offset``
    and the lower stretch of ``offset - 1``. The last program: dtime."""
    pid = tl.program_id(0)
    if TIME_GRAD and pid == tl.num_programs(0) - 1:
        bins = tl.arange(0, NB_BLOCK)
        rows = tl.arange(0, ROWS)
        bucket_sums = tl.zeros([NB_BLOCK], dtype=tl.float32)
        for start in range(0, num_sequences * num_offsets, ROWS):
            row = (start + rows).to(tl.int64)
            part = tl.load(dtime_part + row[:, None] * num_buckets + bins[None, :],
                           mask=(row[:, None] < num_sequences * num_offsets) & (bins[None, :] < num_buckets), other=0.0)
            bucket_sums += tl.sum(part, axis=0)
        tl.store(dtime + bins, bucket_sums, mask=bins < num_buckets)
    elif POS_GRAD:
        x = pid * CHUNK + tl.arange(0, CHUNK)
        r = x - (max_seq_len - 1)
        causal = r <= 0  # diagonals j > i do not occur
        offset = tl.where(causal, (BLOCK - 1 - r) // BLOCK, 0)
        c = r + offset * BLOCK
        upper_at = offset * (2 * BLOCK) + BLOCK + c
        lower_at = (offset - 1) * (2 * BLOCK) + c
        has_upper = causal & (offset < num_offsets)
        has_lower = causal & (offset >= 1) & (offset - 1 < num_offsets)
        rows = tl.arange(0, ROWS)
        diagonal_sums = tl.zeros([CHUNK], dtype=tl.float32)
        for start in range(0, num_sequences, ROWS):
            sequence = start + rows
            base = (sequence * num_offsets).to(tl.int64)[:, None] * (2 * BLOCK)
            ok = (sequence < num_sequences)[:, None]
            stretch = tl.load(dpos_part + base + upper_at[None, :], mask=ok & has_upper[None, :], other=0.0)
            stretch += tl.load(dpos_part + base + lower_at[None, :], mask=ok & has_lower[None, :], other=0.0)
            diagonal_sums += tl.sum(stretch, axis=0)
        tl.store(dpos + x, diagonal_sums, mask=x < 2 * max_seq_len - 1)


# --------------------------------------------------------------------------------------------
# Backward: one kernel, three kinds of programs
# --------------------------------------------------------------------------------------------
@triton.jit
def _grid_position(local_pid, num_columns, num_rows, SHARED_LAUNCH: tl.constexpr):
    """(column, row, number of rows) of a program in its part's (groups x blocks) grid: from its
    index within the part when parts share a 1-D launch, else the launch's own 2-D grid."""
    if SHARED_LAUNCH:
        column = local_pid % num_columns
        row = local_pid // num_columns
        rows = num_rows
    else:
        column = tl.program_id(0)
        row = tl.program_id(1)
        rows = tl.num_programs(1)
    return column, row, rows


@triton.jit
def _hstu_attention_bwd_kernel(
    Q, K, V, dO, dQ, dK, dV, seq_offsets,
    pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
    dpos_part, dtime_part,
    stride_q_l, stride_q_h, stride_q_d,
    stride_k_l, stride_k_h, stride_k_d,
    stride_v_l, stride_v_h, stride_v_d,
    stride_do_l, stride_do_h, stride_do_d,
    stride_dq_l, stride_dq_h, stride_dq_d,
    stride_dk_l, stride_dk_h, stride_dk_d,
    stride_dv_l, stride_dv_h, stride_dv_d,
    num_sequences, num_heads, max_seq_len, num_buckets, alpha, inv_max_seq_len, dq_scale,
    dkdv_programs, dq_programs,
    DQK: tl.constexpr, DV: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    RUN_DKDV: tl.constexpr, DKDV_BLOCK_M: tl.constexpr, DKDV_BLOCK_N: tl.constexpr, DKDV_HEADS: tl.constexpr,
    RUN_DQ: tl.constexpr, DQ_BLOCK_M: tl.constexpr, DQ_BLOCK_N: tl.constexpr, DQ_HEADS: tl.constexpr,
    RUN_BIAS_GRAD: tl.constexpr, BIAS_BLOCK: tl.constexpr, NB_BLOCK: tl.constexpr,
    HAS_POS: tl.constexpr, HAS_TIME: tl.constexpr, POS_GRAD: tl.constexpr, TIME_GRAD: tl.constexpr,
    FAST_SILU: tl.constexpr, PTX_MATH: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """The parts of the backward that RUN_* select. One part: a 2-D grid (groups x blocks) of its
    own. Several (they read the same inputs and write disjoint outputs): a 1-D grid where the first
    ``dkdv_programs`` programs compute dK, dV, the next ``dq_programs`` dQ, the rest the bias
    gradients."""
    SHARED_LAUNCH: tl.constexpr = RUN_DKDV + RUN_DQ + RUN_BIAS_GRAD > 1
    pid = tl.program_id(0)
    if SHARED_LAUNCH:
        dq_start = dkdv_programs
        bias_start = dkdv_programs + dq_programs
        in_dkdv = pid < dq_start
        in_dq = (pid >= dq_start) & (pid < bias_start)
    else:  # no runtime branch around the part
        dq_start = 0
        bias_start = 0
        in_dkdv = RUN_DKDV
        in_dq = RUN_DQ
    if RUN_DKDV and in_dkdv:
        group, block, _ = _grid_position(pid, num_sequences * (num_heads // DKDV_HEADS), 0, SHARED_LAUNCH)
        _dkdv_program(
            group, block, Q, K, V, dO, dK, dV, seq_offsets,
            pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
            stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
            stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
            stride_dk_l, stride_dk_h, stride_dk_d, stride_dv_l, stride_dv_h, stride_dv_d,
            num_heads, max_seq_len, num_buckets, alpha, inv_max_seq_len,
            DQK, DV, BLOCK_DQK, BLOCK_DV, DKDV_BLOCK_M, DKDV_BLOCK_N, DKDV_HEADS, HAS_POS, HAS_TIME,
            FAST_SILU, PTX_MATH, DOT_PRECISION)
    elif RUN_DQ and in_dq:
        group, block, blocks = _grid_position(pid - dq_start, num_sequences * (num_heads // DQ_HEADS),
                                              tl.cdiv(max_seq_len, DQ_BLOCK_M), SHARED_LAUNCH)
        _dq_program(
            group, block, blocks, Q, K, V, dO, dQ, seq_offsets,
            pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
            stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
            stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
            stride_dq_l, stride_dq_h, stride_dq_d,
            num_heads, max_seq_len, num_buckets, alpha, dq_scale,
            DQK, DV, BLOCK_DQK, BLOCK_DV, DQ_BLOCK_M, DQ_BLOCK_N, DQ_HEADS, HAS_POS, HAS_TIME, FAST_SILU, PTX_MATH,
            DOT_PRECISION)
    elif RUN_BIAS_GRAD:
        sequence, block, blocks = _grid_position(pid - bias_start, num_sequences, tl.cdiv(max_seq_len, BIAS_BLOCK),
                                                 SHARED_LAUNCH)
        _bias_grad_program(
            sequence, block, blocks, Q, K, V, dO, seq_offsets,
            pos_weight, time_weight, q_timestamps, k_timestamps, thresholds, time_table, gaps_fit,
            dpos_part, dtime_part,
            stride_q_l, stride_q_h, stride_q_d, stride_k_l, stride_k_h, stride_k_d,
            stride_v_l, stride_v_h, stride_v_d, stride_do_l, stride_do_h, stride_do_d,
            num_heads, max_seq_len, num_buckets, alpha, inv_max_seq_len,
            DQK, DV, BLOCK_DQK, BLOCK_DV, BIAS_BLOCK, NB_BLOCK, HAS_POS, HAS_TIME, POS_GRAD, TIME_GRAD,
            FAST_SILU, PTX_MATH, DOT_PRECISION)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
# Block sizes, warps, pipeline depth and heads per program (HEADS, an upper bound: see
# ``_heads_per_program``) per kernel, from H200 timings (kernels/triton/hstu_attention_notes.md).
# Without a bias: bf16 at d=128 the forward runs 128x64 tiles with 3 stages (407-431 TFLOP/s); up
# to d=128 the key-block kernel holds 64 keys and streams 32 queries, and the query-block kernel,
# when launched alone, holds 128 queries and streams 64 keys (64x64 in the shared launch); one head
# per program. With a bias, a program serves up to four heads so that the bias tile is computed once
# for all of them (at (16,4096,4,64) the forward with both biases took 4.5x / 3.5x / 2.4x the no-bias
# time with one / two / four heads a program); the extra accumulators bound the group at wider heads.
def _forward_config(block_d: int, dtype: torch.dtype, has_bias: bool) -> dict:
    if KERNELS_INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, HEADS=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2, HEADS=1)
    if has_bias and block_d <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2, HEADS=4)
    if block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, HEADS=1)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2, HEADS=1)


def _dkdv_config(block_d: int, dtype: torch.dtype, has_bias: bool) -> dict:
    if KERNELS_INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, HEADS=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2, HEADS=1)
    if has_bias and block_d <= 64:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2, HEADS=2)
    if has_bias and block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2, HEADS=1)
    if block_d <= 128:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3, HEADS=1)
    return dict(BLOCK_M=32, BLOCK_N=64, num_warps=8, num_stages=2, HEADS=1)


def _dq_config(block_d: int, dtype: torch.dtype, has_bias: bool, own_launch: bool) -> dict:
    """``own_launch``: the dQ part is launched alone (long sequences); its taller query blocks
    would otherwise split the one launch that short sequences share (different warps)."""
    if KERNELS_INTERPRETED:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1, HEADS=4)
    if dtype == torch.float32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=2, HEADS=1)
    if has_bias and block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, HEADS=2)
    if own_launch and not has_bias and block_d <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, HEADS=1)
    if block_d <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, HEADS=1)
    if block_d <= 128:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, HEADS=1)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2, HEADS=1)


def _bias_grad_config(block_d: int, dtype: torch.dtype, own_launch: bool) -> dict:
    """``own_launch``: as for ``_dq_config``. A third stage (backward with both biases 2-4% faster at
    N >= 1024, H200) would otherwise take the bias-gradient part out of the one launch short sequences share."""
    if KERNELS_INTERPRETED:
        return dict(BLOCK=32, num_warps=4, num_stages=1)
    if dtype == torch.float32 or block_d > 128:
        return dict(BLOCK=32, num_warps=4, num_stages=2)
    return dict(BLOCK=64, num_warps=4 if block_d <= 64 else 8, num_stages=3 if own_launch else 2)


# The backward's parts share one launch up to this max_seq_len. H200, bf16: at N = 200 (d = 25-64) one
# launch took 0.06-0.23 ms against 0.09-0.49 ms for separate launches (host-bound); at N >= 1024
# (d = 64, 128) it ran 4-17% slower on the GPU (kernel notes, "One launch for the backward").
MERGED_BACKWARD_MAX_SEQ_LEN = 512

# The bias-gradient sum: dpos entries per program, and partial rows read per step.
BIAS_SUM_CHUNK = 128
BIAS_SUM_ROWS = 16


def _heads_per_program(num_heads: int, limit: int) -> int:
    """The largest group of at most ``limit`` (<= 4) heads that divides num_heads."""
    return next(g for g in (4, 3, 2, 1) if g <= limit and num_heads % g == 0)


@functools.lru_cache(maxsize=None)
def _threshold_table(num_buckets: int, device: torch.device) -> torch.Tensor:
    """int64 [NB + 1]: 0, T_1 .. T_{NB-1}, INT64_MAX (so that index guess + 1 is always valid)."""
    table = torch.cat([torch.zeros(1, dtype=torch.int64), bucket_thresholds(num_buckets),
                       torch.full((1,), torch.iinfo(torch.int64).max, dtype=torch.int64)])
    return table.to(device)


def _use_fast_silu(dtype: torch.dtype) -> bool:
    """tanh.approx SiLU for bf16 on the GPU (error far under bf16 rounding); exact elsewhere."""
    return dtype == torch.bfloat16 and not KERNELS_INTERPRETED


def _check_index_range(max_seq_len: int, row_strides: Sequence[int]) -> None:
    # In-sequence offsets are 32-bit in the kernels: row * row_stride must fit.
    widest = max(map(abs, row_strides))
    if max_seq_len * widest >= 2**31:
        raise ValueError(f"hstu_attention.py: max_seq_len {max_seq_len} x row stride {widest} overflows 32-bit offsets")


def time_bias_context(q_timestamps, k_timestamps, seq_offsets, time_weight):
    """The time-bias pre-pass (``_time_table_kernel``) -> (fused int32 time table, per-sequence
    int32-gaps flags). Run once per forward and kept for the backward."""
    thresholds = _threshold_table(time_weight.numel(), time_weight.device)
    batch = seq_offsets.numel() - 1
    gaps_fit = torch.empty(max(batch, 0), dtype=torch.int32, device=seq_offsets.device)
    time_table = torch.empty((TIME_TABLE_ROWS, 4), dtype=torch.int32, device=time_weight.device)
    _time_table_kernel[(max(batch, 0) + 1,)](
        q_timestamps.contiguous(), k_timestamps.contiguous(), seq_offsets.contiguous(), thresholds,
        time_weight.float().contiguous(), time_weight.numel(), gaps_fit, time_table,
        BLOCK=1024, TABLE_ROWS=TIME_TABLE_ROWS, num_warps=4,
    )
    return time_table, gaps_fit


class _BiasArgs:
    """Kernel arguments for the optional biases (placeholders where a bias is absent). The time
    table and flags come from ``time_bias_context`` (computed here when not given)."""

    def __init__(self, seq_offsets, q_timestamps, k_timestamps, pos_weight, time_weight,
                 time_table=None, gaps_fit=None):
        placeholder = seq_offsets
        self.has_pos = pos_weight is not None
        self.has_time = time_weight is not None
        self.num_buckets = time_weight.numel() if self.has_time else 1
        # The kernels gather fp32 table entries (a no-op for fp32 parameters).
        self.pos_weight = pos_weight.float().contiguous() if self.has_pos else placeholder
        if self.has_time:
            self.time_weight = time_weight.float().contiguous()
            self.q_timestamps = q_timestamps.contiguous()
            self.k_timestamps = k_timestamps.contiguous()
            self.thresholds = _threshold_table(self.num_buckets, time_weight.device)
            if time_table is None or gaps_fit is None:
                time_table, gaps_fit = time_bias_context(q_timestamps, k_timestamps, seq_offsets, time_weight)
            self.time_table, self.gaps_fit = time_table, gaps_fit
        else:
            self.time_weight = self.q_timestamps = self.k_timestamps = placeholder
            self.thresholds = self.time_table = self.gaps_fit = placeholder

    def pointers(self):
        return (self.pos_weight, self.time_weight, self.q_timestamps, self.k_timestamps,
                self.thresholds, self.time_table, self.gaps_fit)


@functools.lru_cache(maxsize=1024)
def _forward_plan(batch: int, num_heads: int, max_seq_len: int, dqk: int, dv: int, dtype: torch.dtype,
                  has_pos: bool, has_time: bool, precision: str) -> tuple[tuple[int, int], dict]:
    """(grid, compile-time arguments) of the forward launch, settled once per problem shape: at the
    model's sizes the host time of a launch, not the GPU, sets the pace."""
    block_dqk, block_dv = block_dim(dqk), block_dim(dv)
    cfg = _forward_config(max(block_dqk, block_dv), dtype, has_pos or has_time)
    heads = _heads_per_program(num_heads, cfg["HEADS"])
    grid = (batch * (num_heads // heads), cdiv(max_seq_len, cfg["BLOCK_M"]))
    return grid, dict(
        DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEADS=heads, HAS_POS=has_pos, HAS_TIME=has_time,
        FAST_SILU=_use_fast_silu(dtype), PTX_MATH=not KERNELS_INTERPRETED, DOT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def hstu_attention_forward(q, k, v, seq_offsets, max_seq_len, alpha,
                           q_timestamps=None, k_timestamps=None, pos_weight=None, time_weight=None,
                           time_table=None, gaps_fit=None):
    """Launch the forward kernel -> out [L, H, dv] in v's dtype, its rows of H*dv padded (``output_rows``)
    (time_table, gaps_fit: see ``time_bias_context``; computed here when absent)."""
    num_tokens, num_heads, dqk = q.shape
    dv = v.shape[-1]
    out = output_rows(num_tokens, num_heads, dv, v.dtype, v.device)
    batch = seq_offsets.numel() - 1
    if num_tokens == 0 or batch <= 0 or num_heads == 0 or max_seq_len <= 0:
        return out
    strides = (*q.stride(), *k.stride(), *v.stride(), *out.stride())
    _check_index_range(max_seq_len, strides[::3])
    seq_offsets = seq_offsets.contiguous()
    bias = _BiasArgs(seq_offsets, q_timestamps, k_timestamps, pos_weight, time_weight, time_table, gaps_fit)
    grid, constants = _forward_plan(batch, num_heads, max_seq_len, dqk, dv, q.dtype, bias.has_pos, bias.has_time,
                                    dot_precision(q.dtype))
    _hstu_attention_fwd_kernel[grid](
        q, k, v, out, seq_offsets, *bias.pointers(), *strides,
        num_heads, max_seq_len, bias.num_buckets, float(alpha), 1.0 / max_seq_len, **constants,
    )
    return out


def output_rows(num_tokens: int, num_heads: int, dv: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The forward's output [L, H, dv]: a view of rows of H*dv padded to ROW_ALIGN (``aligned_rows``), so
    that the LayerNorm gate reading it as [L, H*dv] loads 16 bytes at a time at H*dv such as 50."""
    return aligned_rows(num_tokens, num_heads * dv, dtype, device).view(num_tokens, num_heads, dv)


# Delta-query forward with at most this many new tokens per sequence: query blocks of 16 rows
# (the smallest tl.dot tile); above it, the forward's configuration.
DELTA_SMALL_BLOCK_M = 16


@functools.lru_cache(maxsize=1024)
def _delta_forward_plan(batch: int, num_heads: int, max_new_len: int, dqk: int, dv: int, dtype: torch.dtype,
                        has_pos: bool, has_time: bool, precision: str) -> tuple[tuple[int, int], dict]:
    """(grid, compile-time arguments) of the delta-query forward, per problem shape."""
    block_dqk, block_dv = block_dim(dqk), block_dim(dv)
    cfg = _forward_config(max(block_dqk, block_dv), dtype, has_pos or has_time)
    if max_new_len <= DELTA_SMALL_BLOCK_M:
        cfg = dict(cfg, BLOCK_M=DELTA_SMALL_BLOCK_M)
        if not KERNELS_INTERPRETED:
            cfg.update(BLOCK_N=64, num_warps=4, num_stages=2)
    heads = _heads_per_program(num_heads, cfg["HEADS"])
    grid = (batch * (num_heads // heads), max(1, cdiv(max_new_len, cfg["BLOCK_M"])))
    return grid, dict(
        DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], HEADS=heads, HAS_POS=has_pos, HAS_TIME=has_time,
        FAST_SILU=_use_fast_silu(dtype), PTX_MATH=not KERNELS_INTERPRETED, DOT_PRECISION=precision,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def hstu_attention_delta_forward(q, k, v, seq_offsets, cached_k, cached_v, cached_offsets, max_seq_len, alpha,
                                 max_new_len=None, q_timestamps=None, k_timestamps=None, cached_k_timestamps=None,
                                 pos_weight=None, time_weight=None):
    """Launch the delta-query forward -> out [M, H, dv] in v's dtype."""
    num_tokens, num_heads, dqk = q.shape
    dv = v.shape[-1]
    out = torch.empty((num_tokens, num_heads, dv), dtype=v.dtype, device=v.device)
    batch = seq_offsets.numel() - 1
    max_new_len = max_seq_len if max_new_len is None else max_new_len
    if num_tokens == 0 or batch <= 0 or num_heads == 0 or max_new_len <= 0:
        return out
    strides = (*q.stride(), *k.stride(), *v.stride(), *cached_k.stride(), *cached_v.stride(), *out.stride())
    _check_index_range(max_seq_len, strides[::3])
    seq_offsets, cached_offsets = seq_offsets.contiguous(), cached_offsets.contiguous()
    has_pos, has_time = pos_weight is not None, time_weight is not None
    placeholder = seq_offsets
    num_buckets = time_weight.numel() if has_time else 1
    tables = (
        pos_weight.float().contiguous() if has_pos else placeholder,
        time_weight.float().contiguous() if has_time else placeholder,
        q_timestamps.contiguous() if has_time else placeholder,
        k_timestamps.contiguous() if has_time else placeholder,
        cached_k_timestamps.contiguous() if has_time else placeholder,
        _threshold_table(num_buckets, q.device) if has_time else placeholder,
    )
    grid, constants = _delta_forward_plan(batch, num_heads, max_new_len, dqk, dv, q.dtype, has_pos, has_time,
                                          dot_precision(q.dtype))
    _hstu_attention_delta_fwd_kernel[grid](
        q, k, v, cached_k, cached_v, out, seq_offsets, cached_offsets, *tables, *strides,
        num_heads, max_seq_len, num_buckets, float(alpha), 1.0 / max_seq_len, **constants,
    )
    return out


@functools.lru_cache(maxsize=1024)
def _backward_plan(batch: int, num_heads: int, max_seq_len: int, dqk: int, dv: int, dtype: torch.dtype,
                   has_pos: bool, has_time: bool, pos_grad: bool, time_grad: bool, num_buckets: int,
                   precision: str, merged_max_seq_len: int):
    """The backward's launches, settled once per problem shape -> (launches, block size and block
    diagonals of the bias-gradient part). Each launch is (grid, programs of the dK/dV part, programs of the dQ part,
    compile-time arguments). Parts with the same warps and stages share a launch when max_seq_len <=
    ``merged_max_seq_len`` (all of them at head dims <= 64); otherwise each part has its own."""
    block_dqk, block_dv = block_dim(dqk), block_dim(dv)
    block_d = max(block_dqk, block_dv)
    has_bias = has_pos or has_time
    dkdv_cfg = _dkdv_config(block_d, dtype, has_bias)
    dkdv_heads = _heads_per_program(num_heads, dkdv_cfg["HEADS"])
    dq_cfg = _dq_config(block_d, dtype, has_bias, max_seq_len > merged_max_seq_len)
    dq_heads = _heads_per_program(num_heads, dq_cfg["HEADS"])
    bias_cfg = _bias_grad_config(block_d, dtype, max_seq_len > merged_max_seq_len)
    bias_blocks = cdiv(max_seq_len, bias_cfg["BLOCK"])
    parts = {  # part -> (its config, its grid: (groups, blocks))
        "DKDV": (dkdv_cfg, (batch * (num_heads // dkdv_heads), cdiv(max_seq_len, dkdv_cfg["BLOCK_N"]))),
        "DQ": (dq_cfg, (batch * (num_heads // dq_heads), cdiv(max_seq_len, dq_cfg["BLOCK_M"]))),
    }
    if pos_grad or time_grad:
        parts["BIAS_GRAD"] = (bias_cfg, (batch, bias_blocks))
    constants = dict(
        DQK=dqk, DV=dv, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
        DKDV_BLOCK_M=dkdv_cfg["BLOCK_M"], DKDV_BLOCK_N=dkdv_cfg["BLOCK_N"], DKDV_HEADS=dkdv_heads,
        DQ_BLOCK_M=dq_cfg["BLOCK_M"], DQ_BLOCK_N=dq_cfg["BLOCK_N"], DQ_HEADS=dq_heads, BIAS_BLOCK=bias_cfg["BLOCK"],
        NB_BLOCK=1 << (num_buckets - 1).bit_length(),
        HAS_POS=has_pos, HAS_TIME=has_time, POS_GRAD=pos_grad, TIME_GRAD=time_grad,
        FAST_SILU=_use_fast_silu(dtype), PTX_MATH=not KERNELS_INTERPRETED,
        DOT_PRECISION=precision,
    )
    shared: dict[tuple[int, int, str], list[str]] = {}
    for name, (cfg, _) in parts.items():
        alone = "" if max_seq_len <= merged_max_seq_len else name
        shared.setdefault((cfg["num_warps"], cfg["num_stages"], alone), []).append(name)
    launches = []
    for (num_warps, num_stages, _), names in shared.items():
        programs = {name: math.prod(parts[name][1]) if name in names else 0 for name in ("DKDV", "DQ", "BIAS_GRAD")}
        grid = parts[names[0]][1] if len(names) == 1 else (sum(programs.values()),)
        launches.append((grid, programs["DKDV"], programs["DQ"], dict(
            constants, RUN_DKDV="DKDV" in names, RUN_DQ="DQ" in names, RUN_BIAS_GRAD="BIAS_GRAD" in names,
            num_warps=num_warps, num_stages=num_stages)))
    return tuple(launches), bias_cfg["BLOCK"], bias_blocks


def hstu_attention_backward(grad_out, q, k, v, seq_offsets, max_seq_len, alpha,
                            q_timestamps=None, k_timestamps=None, pos_weight=None, time_weight=None,
                            pos_grad=False, time_grad=False, time_table=None, gaps_fit=None):
    """Launch the backward's parts (together up to ``MERGED_BACKWARD_MAX_SEQ_LEN``, else one launch each)
    -> (dq, dk, dv, dpos [2N-1] or [0], dtime [NB] or [0]). No atomics: the same result every run."""
    num_tokens, num_heads, dqk = q.shape
    dv_dim = v.shape[-1]
    batch = seq_offsets.numel() - 1
    pos_grad = pos_grad and pos_weight is not None
    time_grad = time_grad and time_weight is not None
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if num_tokens == 0 or batch <= 0 or num_heads == 0 or max_seq_len <= 0:
        return (torch.zeros(q.shape, dtype=q.dtype, device=q.device), dk.zero_(), dv.zero_(),
                pos_weight.new_zeros(pos_weight.shape) if pos_grad else q.new_empty(0),
                time_weight.new_zeros(time_weight.shape) if time_grad else q.new_empty(0))
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *dk.stride(), *dv.stride())
    _check_index_range(max_seq_len, strides[::3])
    seq_offsets = seq_offsets.contiguous()
    bias = _BiasArgs(seq_offsets, q_timestamps, k_timestamps, pos_weight, time_weight, time_table, gaps_fit)
    launches, bias_block, bias_blocks = _backward_plan(
        batch, num_heads, max_seq_len, dqk, dv_dim, q.dtype, bias.has_pos, bias.has_time, pos_grad, time_grad,
        bias.num_buckets, dot_precision(q.dtype), MERGED_BACKWARD_MAX_SEQ_LEN)
    # One partial row per (sequence, block diagonal), each written whole by its program.
    f32 = dict(dtype=torch.float32, device=q.device)
    dpos_part = dtime_part = dpos = dtime = seq_offsets  # placeholders without bias gradients
    if pos_grad:
        dpos_part = torch.empty((batch * bias_blocks, 2 * bias_block), **f32)
        dpos = torch.empty(2 * max_seq_len - 1, **f32)
    if time_grad:
        dtime_part = torch.empty((batch * bias_blocks, bias.num_buckets), **f32)
        dtime = torch.empty(bias.num_buckets, **f32)
    alpha, inv_max_seq_len = float(alpha), 1.0 / max_seq_len
    for grid, dkdv_programs, dq_programs, constants in launches:
        _hstu_attention_bwd_kernel[grid](
            q, k, v, grad_out, dq, dk, dv, seq_offsets, *bias.pointers(), dpos_part, dtime_part, *strides,
            batch, num_heads, max_seq_len, bias.num_buckets, alpha, inv_max_seq_len, alpha * inv_max_seq_len,
            dkdv_programs, dq_programs, **constants,
        )
    if not (pos_grad or time_grad):
        return dq, dk, dv, q.new_empty(0), q.new_empty(0)

    pos_programs = cdiv(2 * max_seq_len - 1, BIAS_SUM_CHUNK) if pos_grad else 0
    _bias_grad_sum_kernel[(pos_programs + int(time_grad),)](
        dpos_part, dtime_part, dpos, dtime, batch, bias_blocks, max_seq_len, bias.num_buckets,
        POS_GRAD=pos_grad, TIME_GRAD=time_grad, BLOCK=bias_block, CHUNK=BIAS_SUM_CHUNK, ROWS=BIAS_SUM_ROWS,
        NB_BLOCK=1 << (bias.num_buckets - 1).bit_length(), num_warps=4,
    )
    return (dq, dk, dv,
            dpos.to(pos_weight.dtype) if pos_grad else q.new_empty(0),
            dtime.to(time_weight.dtype) if time_grad else q.new_empty(0))


# --------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile sees opaque ops with fake shapes and a registered VJP)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("hstu_kernels::hstu_attention_time_context", mutates_args=())
def hstu_attention_time_context(
    q_timestamps: torch.Tensor, k_timestamps: torch.Tensor, seq_offsets: torch.Tensor, time_weight: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    return time_bias_context(q_timestamps, k_timestamps, seq_offsets, time_weight)


@hstu_attention_time_context.register_fake
def _hstu_attention_time_context_fake(q_timestamps, k_timestamps, seq_offsets, time_weight):
    return (seq_offsets.new_empty((TIME_TABLE_ROWS, 4), dtype=torch.int32),
            seq_offsets.new_empty((seq_offsets.shape[0] - 1,), dtype=torch.int32))


def _attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_offsets: torch.Tensor,
    max_seq_len: int, alpha: float,
    q_timestamps: Optional[torch.Tensor], k_timestamps: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor], time_weight: Optional[torch.Tensor],
    time_table: Optional[torch.Tensor], gaps_fit: Optional[torch.Tensor],
) -> torch.Tensor:
    return hstu_attention_forward(q, k, v, seq_offsets, max_seq_len, alpha,
                                  q_timestamps, k_timestamps, pos_weight, time_weight, time_table, gaps_fit)


def _attention_fwd_fake(q, k, v, seq_offsets, max_seq_len, alpha,
                        q_timestamps, k_timestamps, pos_weight, time_weight, time_table, gaps_fit):
    return output_rows(q.shape[0], q.shape[1], v.shape[2], v.dtype, v.device)


def _attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_offsets: torch.Tensor,
    max_seq_len: int, alpha: float,
    q_timestamps: Optional[torch.Tensor], k_timestamps: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor], time_weight: Optional[torch.Tensor],
    pos_grad: bool, time_grad: bool,
    time_table: Optional[torch.Tensor], gaps_fit: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return hstu_attention_backward(grad_out, q, k, v, seq_offsets, max_seq_len, alpha,
                                   q_timestamps, k_timestamps, pos_weight, time_weight,
                                   pos_grad, time_grad, time_table, gaps_fit)


def _attention_bwd_fake(grad_out, q, k, v, seq_offsets, max_seq_len, alpha,
                        q_timestamps, k_timestamps, pos_weight, time_weight,
                        pos_grad, time_grad, time_table, gaps_fit):
    dpos = pos_weight.new_empty(pos_weight.shape) if pos_grad and pos_weight is not None else q.new_empty(0)
    dtime = time_weight.new_empty(time_weight.shape) if time_grad and time_weight is not None else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dpos, dtime


def _setup_context(ctx, inputs, output):
    (q, k, v, seq_offsets, max_seq_len, alpha, q_timestamps, k_timestamps, pos_weight, time_weight,
     time_table, gaps_fit) = inputs
    ctx.save_for_backward(q, k, v, seq_offsets, q_timestamps, k_timestamps, pos_weight, time_weight,
                          time_table, gaps_fit)
    ctx.max_seq_len = max_seq_len
    ctx.alpha = alpha


def _gradients(ctx, grad_outputs, backward):
    (grad_out,) = grad_outputs
    q, k, v, seq_offsets, q_timestamps, k_timestamps, pos_weight, time_weight, time_table, gaps_fit = ctx.saved_tensors
    needs = ctx.needs_input_grad
    pos_grad, time_grad = bool(needs[8]), bool(needs[9])
    dq, dk, dv, dpos, dtime = backward(
        grad_out, q, k, v, seq_offsets, ctx.max_seq_len, ctx.alpha,
        q_timestamps, k_timestamps, pos_weight, time_weight,
        pos_grad, time_grad, time_table, gaps_fit,
    )
    return (dq, dk, dv, None, None, None, None, None,
            dpos if pos_grad else None, dtime if time_grad else None, None, None)


_attention = autograd_custom_op(
    "hstu_attention", forward=_attention_fwd, forward_fake=_attention_fwd_fake, backward=_attention_bwd,
    backward_fake=_attention_bwd_fake, setup_context=_setup_context, gradients=_gradients,
)


# --------------------------------------------------------------------------------------------
# The Triton backend of hstu_kernels.hstu_attention (called through the operator registry)
# --------------------------------------------------------------------------------------------
def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    time_weight: torch.Tensor | None = None,
    layout=None,
) -> torch.Tensor:
    """Jagged causal HSTU attention on Triton -> [L, H, dv] in v's dtype (inputs checked by the caller).
    ``layout`` (the reference's padded layout) is not used: the kernel computes its indices per tile."""
    compiling = torch.compiler.is_compiling()
    time_table = gaps_fit = None
    if time_weight is None:
        q_timestamps = k_timestamps = None
    else:  # the time-bias pre-pass, once for the forward and the backward
        context = hstu_attention_time_context if compiling else time_bias_context
        time_table, gaps_fit = context(q_timestamps, k_timestamps, seq_offsets, time_weight.detach())
    return _attention(q, k, v, seq_offsets, int(max_seq_len), float(alpha), q_timestamps, k_timestamps, pos_weight,
                      time_weight, time_table, gaps_fit)


@torch.library.custom_op("hstu_kernels::hstu_attention_delta_fwd", mutates_args=())
def _attention_delta_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_offsets: torch.Tensor,
    cached_k: torch.Tensor, cached_v: torch.Tensor, cached_offsets: torch.Tensor,
    max_seq_len: int, alpha: float, max_new_len: Optional[int],
    q_timestamps: Optional[torch.Tensor], k_timestamps: Optional[torch.Tensor],
    cached_k_timestamps: Optional[torch.Tensor],
    pos_weight: Optional[torch.Tensor], time_weight: Optional[torch.Tensor],
) -> torch.Tensor:
    return hstu_attention_delta_forward(q, k, v, seq_offsets, cached_k, cached_v, cached_offsets, max_seq_len, alpha,
                                        max_new_len, q_timestamps, k_timestamps, cached_k_timestamps, pos_weight,
                                        time_weight)


@_attention_delta_fwd.register_fake
def _attention_delta_fwd_fake(q, k, v, seq_offsets, cached_k, cached_v, cached_offsets, max_seq_len, alpha,
                              max_new_len, q_timestamps, k_timestamps, cached_k_timestamps, pos_weight, time_weight):
    return v.new_empty((q.shape[0], q.shape[1], v.shape[2]))


def hstu_attention_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    cached_k: torch.Tensor,
    cached_v: torch.Tensor,
    cached_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    max_new_len: int | None = None,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    cached_k_timestamps: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    time_weight: torch.Tensor | None = None,
    layout=None,
) -> torch.Tensor:
    """New tokens against cached keys and values on Triton -> [M, H, dv] in v's dtype (inputs checked by
    the caller). Forward only: it serves inference, so inputs that need gradients are refused.
    ``layout`` (the reference's padded layout) is not used: the kernel computes its indices per tile."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (q, k, v, cached_k, cached_v, pos_weight, time_weight)):
        raise RuntimeError("hstu_attention_delta on Triton is forward only (inference); "
                           "run it under torch.no_grad() or use the reference for gradients")
    if time_weight is None:
        q_timestamps = k_timestamps = cached_k_timestamps = None
    args = (q, k, v, seq_offsets, cached_k, cached_v, cached_offsets, int(max_seq_len), float(alpha),
            None if max_new_len is None else int(max_new_len), q_timestamps, k_timestamps, cached_k_timestamps,
            pos_weight, time_weight)
    if torch.compiler.is_compiling():
        return _attention_delta_fwd(*args)
    return hstu_attention_delta_forward(*args)  # eager: skip the dispatcher (host time)


def unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the Triton kernel cannot run on (q, k, v); None when it can."""
    q, k, v = tensors[:3]
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32)"
    if q.dtype == torch.bfloat16 and KERNELS_INTERPRETED:
        return "bfloat16 under TRITON_INTERPRET (the interpreter computes bf16 wrongly)"
    if q.dim() != 3 or v.dim() != 3:
        return "expected q, k [L, H, dqk] and v [L, H, dv]"
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        return f"head dim {max(q.shape[-1], v.shape[-1])} > {MAX_HEAD_DIM}"
    return None
