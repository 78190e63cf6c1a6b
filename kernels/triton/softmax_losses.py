"""Triton backend of ``sequence_recommendation_interaction``: sampled and full softmax losses over
cosine (or dot-product) logits, with gradients to the states and to the item table.

For row m with state s_m, positive item p_m and scored items n:
    logit(m, n) = (s_m . e_n) * rs_m * re_n / temperature,  rs = 1 / max(|s|, eps), re = 1 / max(|e|, eps)
    loss = mean_m [logsumexp_n logit(m, n) - logit(m, p_m)]
(rs = re = 1 without ``l2_norm``). Sampled losses score the positive and R negatives (per row [M, R] or
shared [R]); a negative equal to its row's positive is masked. The full loss scores every table row.

Layers, after Liger-Kernel: ``@triton.jit`` kernels -> launchers -> one pair of ``torch.library``
custom ops (``hstu_kernels::softmax_loss_fwd`` / ``_bwd``, ``hstu_kernels.custom_op``) -> the
reference's functions, which ``hstu_kernels.sampled_softmax_loss`` / ``full_softmax_loss`` dispatch to.

How it computes, and why:
- Logits are float32 whatever the inputs: raw states and items meet in the dot (bf16/fp16 products
  are exact in float32, accumulated in float32; float32 inputs follow torch's TF32 setting), then the
  float32 inverse norms and 1/temperature scale the sums. Inputs of two dtypes meet in float32.
- Per-row negatives: a program holds a few rows and gathers their R negatives in chunks, keeping an
  online logsumexp (no [M, R, D] tensor). Rows are gathered as aligned 16-byte vectors: a table whose
  rows are not 16-byte aligned (D = 50 in bf16: 100 bytes) is first copied zero-padded to BLOCK_D
  columns, and the items' inverse norms come from the same pre-pass, not from each occurrence. The
  backward regathers them, recomputes the logits from the saved per-row logsumexp and gives the
  states' gradients and each occurrence's table-gradient weight w = g * dlogit * rs_m.
- Shared negatives and the full softmax are matmul-shaped (flash-style): a program holds a block of
  rows and streams blocks of items (gathered through the ids for shared negatives), keeping an online
  logsumexp. No [M, I] tensor exists: the backward recomputes the logits per tile, once in a kernel
  over row blocks (state gradients) and once in a kernel over item blocks (item gradients). Item
  blocks split the rows among several programs when there are too few of them to fill the GPU; the
  split partial sums are added in a fixed order.
- The normalisation is differentiated in closed form: with h_m = sum_n dlogit(m, n) * re_n e_n and
  c_m = sum_n dlogit(m, n) * logit(m, n) = rs_m / T * s_m . h_m,
  d s_m = rs_m / T * h_m - rs_m^2 c_m s_m (the second term vanishes where the norm was clamped at eps),
  and the same for items. c is taken from the accumulated h, not summed from the logits: the second
  term then removes exactly the part of h's rounding along s_m, where the two terms cancel.
- In 16-bit runs the gradient matmuls take 16-bit operands, with float32 accumulation, as flash
  attention's backward does: the probabilities times the inverse norms (bf16), and the streamed rows
  as stored. fp16 cannot hold a probability times an inverse norm (up to 1 / eps = 1e6), so it folds
  only the inverse norm's mantissa into the probabilities and scales the rows by its power of two
  (exact): the only rounding is that of the probabilities, as in bf16. Rounding normalised rows
  instead would put errors of u16 across every row, which the projection cannot remove.
- Table gradients of sampled losses are a scatter, "atomic" (``DEFAULT_SCATTER``) or "sort"
  (``sampled_softmax_loss(scatter=...)`` names one; deterministic algorithms get "sort").
  Per-row negatives: an item's gradient is re / T times a = sum of w * s_m over its occurrences, less
  a's part along the item (c = re / T * e . a), so only a is scattered: "sort" stores w and the item
  per occurrence, sorts the occurrences by item (one stable sort of int16 keys where they fit) and
  sums each item's in that order, split among several programs for popular items; "atomic" adds
  w * s_m with float32 atomics into a zeroed [I, BLOCK_D] buffer. One pass then turns a into the
  gradient. Shared negatives: atomics (their positives from the row programs, the negatives once per
  item block) or one program per item over the sorted occurrences. Sorted sums are in a fixed order:
  the same bits every run. The full softmax's item gradients are deterministic either way.
- Nothing is read back to the host: the upstream gradient is read through a pointer, grids depend
  only on shapes, every output is written whole. Ids are clamped into the table before any read.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from hstu_kernels.custom_op import autograd_custom_op
from hstu_kernels.normalize import NORM_EPS
from hstu_kernels.ops.softmax_losses import SCATTERS
from hstu_kernels.triton.common import KERNELS_INTERPRETED, block_dim, cdiv, dot_precision, load_tile

MAX_DIM = 512
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NORM_EPS_SQUARED = tl.constexpr(NORM_EPS * NORM_EPS)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------
@triton.jit
def _inverse_norm(sum_sq, L2_NORM: tl.constexpr):
    """1 / max(|x|, eps) from |x|^2 (as ``hstu_kernels.normalize.l2_normalize``); 1 without L2_NORM."""
    if L2_NORM:
        r = 1.0 / tl.sqrt(tl.maximum(sum_sq, NORM_EPS_SQUARED))
    else:
        r = sum_sq * 0.0 + 1.0
    return r


@triton.jit
def _projected(inverse_norm, L2_NORM: tl.constexpr):
    """1.0 where the normalisation's gradient has its projection term, else 0.0: the norm was not
    clamped at eps, i.e. the inverse norm (from ``_inverse_norm``) is below 1 / eps."""
    if L2_NORM:
        on = tl.where(inverse_norm < _inverse_norm(inverse_norm * 0.0, True), 1.0, 0.0)
    else:
        on = inverse_norm * 0.0
    return on


@triton.jit
def _exponent_and_mantissa(x):
    """x = exponent * mantissa exactly, for float32 x >= 0 normal or zero: the power of two of x (0 for
    0) and its mantissa in [1, 2). Scaling a 16-bit tile by the exponent is exact, and a probability
    times the mantissa stays below 2: the fp16 gradient matmuls fold the inverse norms in that way."""
    bits = x.to(tl.int32, bitcast=True)
    exponent = (bits & 0x7F800000).to(tl.float32, bitcast=True)
    mantissa = ((bits & 0x007FFFFF) | 0x3F800000).to(tl.float32, bitcast=True)
    return exponent, mantissa


@triton.jit
def _probability(logits, lse):
    """exp(logit - lse), recomputed in the backward. Scored logits never exceed their row's logsumexp
    (beyond rounding), so the clamp only keeps the masked ones (hits, lanes past the end) finite."""
    return tl.exp(tl.minimum(logits - lse, 0.0))


@triton.jit
def _logsumexp_step(m_i, l_i, logits, valid):
    """The online logsumexp over a [rows, items] tile: running max m_i and sum l_i of exp(logit - m_i),
    valid logits only (a row's first tile must hold one, or m_i start finite)."""
    masked = tl.where(valid, logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(masked, axis=1))
    l_new = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(masked - m_new[:, None]), axis=1)
    return m_new, l_new


@triton.jit
def _store_row_results(row_loss, lse_out, rs_out, rows, rows_ok, m_i, l_i, pos_logit, rs):
    """Per row: the loss lse - logit(positive), and for the backward the logsumexp and inverse state norm."""
    lse = m_i + tl.log(l_i)
    tl.store(row_loss + rows, lse - pos_logit, mask=rows_ok)
    tl.store(lse_out + rows, lse, mask=rows_ok)
    tl.store(rs_out + rows, rs, mask=rows_ok)


@triton.jit
def _clamp_ids(ids, num_items):
    return tl.minimum(tl.maximum(ids, 0), num_items - 1).to(tl.int64)


@triton.jit
def _state_block(states, rows, rows_ok, cols, stride_sm, stride_sd, inv_temperature,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, L2_NORM: tl.constexpr):
    """A block of states -> (rows [BLOCK_M, BLOCK_D] in their dtype, the same in fp32, |s|^2, rs, rs / T)."""
    s = load_tile(states + rows.to(tl.int64)[:, None] * stride_sm + cols[None, :] * stride_sd, rows_ok, cols,
                  D, BLOCK_D, True)
    s32 = s.to(tl.float32)
    sum_sq = tl.sum(s32 * s32, axis=1)
    rs = _inverse_norm(sum_sq, L2_NORM)
    return s, s32, sum_sq, rs, rs * inv_temperature


@triton.jit
def _block_positives(s32, table, pos, rows_ok, num_items, stride_ti, stride_td, cols, row_scale,
                     D: tl.constexpr, BLOCK_D: tl.constexpr, L2_NORM: tl.constexpr):
    """A row block's positives -> (clamped ids, rows fp32, |e|^2, inverse norms, logits)."""
    items = _clamp_ids(pos, num_items)
    e = load_tile(table + items[:, None] * stride_ti + cols[None, :] * stride_td, rows_ok, cols, D, BLOCK_D, True)
    e = e.to(tl.float32)
    sum_sq = tl.sum(e * e, axis=1)
    re = _inverse_norm(sum_sq, L2_NORM)
    logits = tl.sum(s32 * e, axis=1) * row_scale * re
    return items, e, sum_sq, re, logits


@triton.jit
def _add_positive_grads(grad_table, items, s32, e, g_dl, row_scale, re, logits, rows_ok, cols,
                        D: tl.constexpr, L2_NORM: tl.constexpr):
    """Float32 atomics of the positives' item gradients into ``grad_table`` [I, D] (contiguous):
    g * dlogit * (re * rs / T * s - [norm not clamped] * re^2 * logit * e), per row."""
    grad = g_dl[:, None] * (s32 * (re * row_scale)[:, None]
                            - e * (_projected(re, L2_NORM) * re * re * logits)[:, None])
    tl.atomic_add(grad_table + items[:, None] * D + cols[None, :], grad,
                  mask=rows_ok[:, None] & (cols < D)[None, :], sem="relaxed")


# --------------------------------------------------------------------------------------------
# Per-row negatives: a program per block of rows gathers each row's negatives, BLOCK_R at a time
# --------------------------------------------------------------------------------------------
@triton.jit
def _negative_chunk(neg_ids, rows, rows_ok, r0, num_neg, stride_nm, stride_nr, pos, table, item_inv_norms, num_items,
                    stride_ti, stride_td, cols, s32, row_scale,
                    D: tl.constexpr, BLOCK_D: tl.constexpr, LOAD_D: tl.constexpr, BLOCK_R: tl.constexpr,
                    L2_NORM: tl.constexpr):
    """Negatives r0 .. r0 + BLOCK_R of each row -> (r, in range, table rows [BLOCK_M, BLOCK_R], valid (in
    range, not the row's positive), item rows [BLOCK_M, BLOCK_R, BLOCK_D] fp32 (zero where not valid),
    inverse norms (from ``item_inv_norms``; 0 where not valid), logits). LOAD_D: the columns a row read
    takes (BLOCK_D from a zero-padded table: no column mask, so the reads are 16-byte vectors)."""
    r = r0 + tl.arange(0, BLOCK_R)
    in_range = rows_ok[:, None] & (r < num_neg)[None, :]
    ids = tl.load(neg_ids + rows.to(tl.int64)[:, None] * stride_nm + r[None, :] * stride_nr, mask=in_range, other=0)
    valid = in_range & (ids != pos[:, None])
    items = _clamp_ids(ids, num_items)
    if LOAD_D == BLOCK_D:
        mask = valid[:, :, None]
    else:
        mask = valid[:, :, None] & (cols < LOAD_D)[None, None, :]
    e = tl.load(table + items[:, :, None] * stride_ti + cols[None, None, :] * stride_td, mask=mask,
                other=0.0).to(tl.float32)
    if L2_NORM:
        re = tl.load(item_inv_norms + items, mask=valid, other=0.0)
    else:
        re = tl.where(valid, 1.0, 0.0)
    logits = tl.sum(e * s32[:, None, :], axis=2) * row_scale[:, None] * re
    return r, in_range, items, valid, e, re, logits


@triton.jit
def _sampled_rows_fwd_kernel(
    states, pos_ids, neg_ids, table, item_inv_norms, row_loss, lse_out, rs_out,
    num_rows, num_items, num_neg,
    stride_sm, stride_sd, stride_nm, stride_nr, stride_ti, stride_td,
    inv_temperature,
    D: tl.constexpr, BLOCK_D: tl.constexpr, LOAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    L2_NORM: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    s, s32, sum_sq_s, rs, row_scale = _state_block(states, rows, rows_ok, cols, stride_sm, stride_sd, inv_temperature,
                                                   D, BLOCK_D, L2_NORM)
    pos = tl.load(pos_ids + rows, mask=rows_ok, other=-1)
    pos_items, e_pos, sum_sq_pos, re_pos, pos_logit = _block_positives(
        s32, table, pos, rows_ok, num_items, stride_ti, stride_td, cols, row_scale, D, BLOCK_D, L2_NORM)
    m_i = pos_logit
    l_i = pos_logit * 0.0 + 1.0
    for r0 in range(0, num_neg, BLOCK_R):
        r, in_range, items, valid, e, re, logits = _negative_chunk(
            neg_ids, rows, rows_ok, r0, num_neg, stride_nm, stride_nr, pos, table, item_inv_norms, num_items,
            stride_ti, stride_td, cols, s32, row_scale, D, BLOCK_D, LOAD_D, BLOCK_R, L2_NORM)
        m_i, l_i = _logsumexp_step(m_i, l_i, logits, valid)
    _store_row_results(row_loss, lse_out, rs_out, rows, rows_ok, m_i, l_i, pos_logit, rs)


@triton.jit
def _sampled_rows_bwd_kernel(
    grad_rows, states, pos_ids, neg_ids, table, item_inv_norms, lse, grad_states, item_sums, weights, keys,
    num_rows, num_items, num_neg,
    stride_sm, stride_sd, stride_nm, stride_nr, stride_ti, stride_td, stride_gm, stride_gd,
    inv_temperature,
    D: tl.constexpr, BLOCK_D: tl.constexpr, LOAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
    L2_NORM: tl.constexpr, STATES_GRAD: tl.constexpr, TABLE_SCATTER: tl.constexpr,
):
    """State gradients of a block of rows and each occurrence's table-gradient weight w = g * dlogit * rs:
    an item's gradient is re / T times the sum of w * s over its occurrences, less that sum's part along
    the item (``_item_grads_kernel``). TABLE_SCATTER "atomic": float32 atomics add w * s into
    ``item_sums`` [I, BLOCK_D]; "sort": w and the sort key (the table row) are stored at occurrence
    m * (R + 1) + j (j = 0 the positive, 1 + r negative r; a masked hit has w = 0); "none": neither."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    g = tl.load(grad_rows + rows, mask=rows_ok, other=0.0).to(tl.float32)  # each row's loss gradient
    s, s32, sum_sq_s, rs, row_scale = _state_block(states, rows, rows_ok, cols, stride_sm, stride_sd,
                                                   inv_temperature, D, BLOCK_D, L2_NORM)
    pos = tl.load(pos_ids + rows, mask=rows_ok, other=-1)
    lse_rows = tl.load(lse + rows, mask=rows_ok, other=0.0)
    pos_items, e_pos, sum_sq_pos, re_pos, pos_logit = _block_positives(
        s32, table, pos, rows_ok, num_items, stride_ti, stride_td, cols, row_scale, D, BLOCK_D, L2_NORM)
    dl = tl.exp(pos_logit - lse_rows) - 1.0
    h = e_pos * (dl * re_pos)[:, None]  # sum over scored items of dlogit * re * e
    c = dl * pos_logit  # sum of dlogit * logit
    g_rs = g * rs
    first = rows.to(tl.int64) * (num_neg + 1)  # the row's first occurrence (its positive)
    if TABLE_SCATTER == "atomic":
        tl.atomic_add(item_sums + pos_items[:, None] * BLOCK_D + cols[None, :], (g_rs * dl)[:, None] * s32,
                      mask=rows_ok[:, None], sem="relaxed")
    if TABLE_SCATTER == "sort":
        tl.store(weights + first, g_rs * dl, mask=rows_ok)
        tl.store(keys + first, pos_items.to(keys.dtype.element_ty), mask=rows_ok)
    for r0 in range(0, num_neg, BLOCK_R):
        r, in_range, items, valid, e, re, logits = _negative_chunk(
            neg_ids, rows, rows_ok, r0, num_neg, stride_nm, stride_nr, pos, table, item_inv_norms, num_items,
            stride_ti, stride_td, cols, s32, row_scale, D, BLOCK_D, LOAD_D, BLOCK_R, L2_NORM)
        p = tl.where(valid, _probability(logits, lse_rows[:, None]), 0.0)
        h += tl.sum(e * (p * re)[:, :, None], axis=1)
        c += tl.sum(p * logits, axis=1)
        w = g_rs[:, None] * p
        if TABLE_SCATTER == "atomic":
            tl.atomic_add(item_sums + items[:, :, None] * BLOCK_D + cols[None, None, :], w[:, :, None] * s32[:, None, :],
                          mask=valid[:, :, None], sem="relaxed")
        if TABLE_SCATTER == "sort":
            occurrence = first[:, None] + 1 + r[None, :]
            tl.store(weights + occurrence, w, mask=in_range)
            tl.store(keys + occurrence, items.to(keys.dtype.element_ty), mask=in_range)
    if STATES_GRAD:
        ds = g[:, None] * (h * row_scale[:, None] - s32 * (_projected(rs, L2_NORM) * rs * rs * c)[:, None])
        tl.store(grad_states + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gd,
                 ds.to(grad_states.dtype.element_ty), mask=rows_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _item_sums_kernel(order, bounds, weights, states, item_sums, num_items, occurrences_per_row, splits,
                      stride_sm, stride_sd,
                      BLOCK_D: tl.constexpr, LOAD_D: tl.constexpr, BLOCK_K: tl.constexpr, WIDE_INDEX: tl.constexpr):
    """item_sums[split, item] = sum of w * s over part ``split`` (of ``splits`` equal parts) of the item's
    occurrences, taken in sorted order (``order[bounds[item]:bounds[item + 1]]``): no atomics, the
    same bits every run. Occurrence k is of row k // occurrences_per_row (int32 unless WIDE_INDEX)."""
    item = tl.program_id(0)
    split = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    start = tl.load(bounds + item)
    end = tl.load(bounds + item + 1)
    per_split = (end - start + splits - 1) // splits
    lo = tl.minimum(start + split * per_split, end)
    hi = tl.minimum(lo + per_split, end)
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)  # summed over the tile's rows after the loop
    for k0 in range(lo, hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < hi
        occurrence = tl.load(order + k, mask=k_ok, other=0)
        w = tl.load(weights + occurrence, mask=k_ok, other=0.0)
        if WIDE_INDEX:
            row = occurrence // occurrences_per_row
        else:
            row = (occurrence.to(tl.int32) // occurrences_per_row).to(tl.int64)
        s = load_tile(states + row[:, None] * stride_sm + cols[None, :] * stride_sd, k_ok, cols, LOAD_D, BLOCK_D, True)
        acc += w[:, None] * s.to(tl.float32)
    tl.store(item_sums + (split.to(tl.int64) * num_items + item) * BLOCK_D + cols, tl.sum(acc, axis=0))


@triton.jit
def _item_grads_kernel(item_sums, table, item_inv_norms, grad_table, num_items, splits,
                       stride_ti, stride_td, stride_gi, stride_gd, inv_temperature,
                       D: tl.constexpr, BLOCK_D: tl.constexpr, LOAD_D: tl.constexpr, BLOCK_I: tl.constexpr,
                       L2_NORM: tl.constexpr):
    """Table gradient rows from a = sum of w * s over each item's occurrences (``item_sums`` [splits, I,
    BLOCK_D], the splits added in order): d e = re / T * a - [norm not clamped] re^2 c e, with
    c = re / T * e . a the sum of dlogit * logit (taken from a, as the tiled kernels take it)."""
    items = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    ok = items < num_items
    cols = tl.arange(0, BLOCK_D)
    acc = tl.zeros([BLOCK_I, BLOCK_D], dtype=tl.float32)
    for split in range(0, splits):
        acc += tl.load(item_sums + (items.to(tl.int64) + split * num_items)[:, None] * BLOCK_D + cols[None, :],
                       mask=ok[:, None], other=0.0)
    e = load_tile(table + items.to(tl.int64)[:, None] * stride_ti + cols[None, :] * stride_td, ok, cols, LOAD_D,
                  BLOCK_D, True).to(tl.float32)
    if L2_NORM:
        re = tl.load(item_inv_norms + items, mask=ok, other=0.0)
    else:
        re = tl.where(ok, 1.0, 0.0)
    scale = re * inv_temperature
    c = scale * tl.sum(e * acc, axis=1)
    grad = acc * scale[:, None] - e * (_projected(re, L2_NORM) * re * re * c)[:, None]
    tl.store(grad_table + items.to(tl.int64)[:, None] * stride_gi + cols[None, :] * stride_gd,
             grad.to(grad_table.dtype.element_ty), mask=ok[:, None] & (cols < D)[None, :])


# --------------------------------------------------------------------------------------------
# Shared negatives and the full softmax: row blocks against streamed item blocks
# --------------------------------------------------------------------------------------------
@triton.jit
def _prepare_rows_kernel(x, ids, norms_out, rows_out, num_out, num_items, stride_r, stride_c,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, GATHER: tl.constexpr,
                         NORMS: tl.constexpr, COPY: tl.constexpr):
    """For rows r (of x, or x's rows ``ids[r]`` with GATHER): NORMS: norms_out[r] = 1 / max(|x_r|, eps);
    COPY: rows_out[r] = x_r zero-padded to BLOCK_D columns (contiguous [num_out, BLOCK_D]), so that
    gathers of whole rows read aligned 16-byte vectors without a column mask."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = r < num_out
    if GATHER:
        rows = _clamp_ids(tl.load(ids + r, mask=ok, other=0), num_items)
    else:
        rows = r.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    t = load_tile(x + rows[:, None] * stride_r + cols[None, :] * stride_c, ok, cols, D, BLOCK_D, True)
    if NORMS:
        t32 = t.to(tl.float32)
        tl.store(norms_out + r, _inverse_norm(tl.sum(t32 * t32, axis=1), True), mask=ok)
    if COPY:
        tl.store(rows_out + r.to(tl.int64)[:, None] * BLOCK_D + cols[None, :], t, mask=ok[:, None])


@triton.jit
def _item_block(table, item_ids, item_inv_norms, n, n_ok, num_items, stride_ti, stride_td, cols,
                D: tl.constexpr, BLOCK_D: tl.constexpr, L2_NORM: tl.constexpr, SHARED: tl.constexpr):
    """Scored items n (a block) -> (their ids: table rows, or the shared negatives' ids as given; their
    table rows; item rows [BLOCK_N, BLOCK_D] in the table's dtype, zero past the end; inverse norms)."""
    if SHARED:
        ids = tl.load(item_ids + n, mask=n_ok, other=-1)
        rows = _clamp_ids(ids, num_items)
    else:
        ids = n
        rows = n.to(tl.int64)
    e = load_tile(table + rows[:, None] * stride_ti + cols[None, :] * stride_td, n_ok, cols, D, BLOCK_D, True)
    if L2_NORM:
        re = tl.load(item_inv_norms + n, mask=n_ok, other=0.0)
    else:
        re = tl.where(n_ok, 1.0, 0.0)
    return ids, rows, e, re


@triton.jit
def _tiled_fwd_kernel(
    states, pos_ids, table, item_ids, item_inv_norms, row_loss, lse_out, rs_out,
    num_rows, num_cols, num_items,
    stride_sm, stride_sd, stride_ti, stride_td,
    inv_temperature,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    L2_NORM: tl.constexpr, SHARED: tl.constexpr, WIDEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Per row: logsumexp over the scored items (SHARED: the positive and the negatives ``item_ids``,
    hits masked; else every table row) and the loss lse - logit(positive)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    s, s32, sum_sq_s, rs, row_scale = _state_block(states, rows, rows_ok, cols, stride_sm, stride_sd, inv_temperature,
                                            D, BLOCK_D, L2_NORM)
    pos = tl.load(pos_ids + rows, mask=rows_ok, other=-1)
    if WIDEN:
        s = s32
    if SHARED:
        pos_items, e_pos, sum_sq_pos, re_pos, pos_logit = _block_positives(s32, table, pos, rows_ok, num_items, stride_ti, stride_td, cols,
                                                 row_scale, D, BLOCK_D, L2_NORM)
        m_i = pos_logit
        l_i = pos_logit * 0.0 + 1.0
    else:
        pos_logit = tl.zeros([BLOCK_M], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for n0 in range(0, num_cols, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < num_cols
        ids, table_rows, e, re = _item_block(table, item_ids, item_inv_norms, n, n_ok, num_items, stride_ti, stride_td, cols,
                                    D, BLOCK_D, L2_NORM, SHARED)
        if WIDEN:
            e = e.to(tl.float32)
        logits = tl.dot(s, tl.trans(e), input_precision=DOT_PRECISION) * row_scale[:, None] * re[None, :]
        if SHARED:
            valid = n_ok[None, :] & (ids[None, :] != pos[:, None])
        else:
            valid = n_ok[None, :]
            pos_logit += tl.sum(tl.where(n[None, :] == pos[:, None], logits, 0.0), axis=1)
        m_i, l_i = _logsumexp_step(m_i, l_i, logits, valid)
    _store_row_results(row_loss, lse_out, rs_out, rows, rows_ok, m_i, l_i, pos_logit, rs)


@triton.jit
def _tiled_bwd_rows_kernel(
    grad_rows, states, pos_ids, table, item_ids, item_inv_norms, lse, rs_saved, grad_states, grad_table,
    num_rows, num_cols, num_items,
    stride_sm, stride_sd, stride_ti, stride_td, stride_gm, stride_gd,
    inv_temperature,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    L2_NORM: tl.constexpr, SHARED: tl.constexpr, WIDEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOLD_NORMS: tl.constexpr, STATES_GRAD: tl.constexpr, POSITIVES_GRAD: tl.constexpr,
):
    """State gradients of a row block; with POSITIVES_GRAD (shared negatives), float32 atomics of
    the positives' item gradients into ``grad_table`` [I, D] (contiguous). The float32 copy of the
    states and the positives are made after the item loop, so that they hold no registers through it.
    c = sum dlogit * logit is taken from h after the loop (see the module docstring)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    g = tl.load(grad_rows + rows, mask=rows_ok, other=0.0).to(tl.float32)  # each row's loss gradient
    s = load_tile(states + rows.to(tl.int64)[:, None] * stride_sm + cols[None, :] * stride_sd, rows_ok, cols,
                  D, BLOCK_D, True)
    if WIDEN:
        s = s.to(tl.float32)
    rs = tl.load(rs_saved + rows, mask=rows_ok, other=0.0)
    row_scale = rs * inv_temperature
    pos = tl.load(pos_ids + rows, mask=rows_ok, other=-1)
    lse_rows = tl.load(lse + rows, mask=rows_ok, other=0.0)
    h = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)  # sum over scored items of dlogit * re * e
    if STATES_GRAD:
        for n0 in range(0, num_cols, BLOCK_N):
            n = n0 + tl.arange(0, BLOCK_N)
            n_ok = n < num_cols
            ids, table_rows, e, re = _item_block(table, item_ids, item_inv_norms, n, n_ok, num_items, stride_ti,
                                                 stride_td, cols, D, BLOCK_D, L2_NORM, SHARED)
            if WIDEN:
                e = e.to(tl.float32)
            logits = tl.dot(s, tl.trans(e), input_precision=DOT_PRECISION) * row_scale[:, None] * re[None, :]
            p = _probability(logits, lse_rows[:, None])
            if SHARED:
                p = tl.where(n_ok[None, :] & (ids[None, :] != pos[:, None]), p, 0.0)
            else:
                p = tl.where(n_ok[None, :], p, 0.0) - tl.where(n[None, :] == pos[:, None], 1.0, 0.0)
            if FOLD_NORMS:
                h += tl.dot((p * re[None, :]).to(s.dtype), e, input_precision=DOT_PRECISION)
            else:
                re_exponent, re_mantissa = _exponent_and_mantissa(re)
                e_scaled = (e.to(tl.float32) * re_exponent[:, None]).to(s.dtype)
                h += tl.dot((p * re_mantissa[None, :]).to(s.dtype), e_scaled, input_precision=DOT_PRECISION)
    s32 = s.to(tl.float32)
    if SHARED:  # the positive, scored apart from the negatives
        pos_items, e_pos, sum_sq_pos, re_pos, pos_logit = _block_positives(
            s32, table, pos, rows_ok, num_items, stride_ti, stride_td, cols, row_scale, D, BLOCK_D, L2_NORM)
        dl = tl.exp(pos_logit - lse_rows) - 1.0
        h += e_pos * (dl * re_pos)[:, None]
        if POSITIVES_GRAD:
            _add_positive_grads(grad_table, pos_items, s32, e_pos, g * dl, row_scale, re_pos, pos_logit,
                                rows_ok, cols, D, L2_NORM)
    if STATES_GRAD:
        c = row_scale * tl.sum(s32 * h, axis=1)  # sum of dlogit * logit, from h itself
        ds = g[:, None] * (h * row_scale[:, None] - s32 * (_projected(rs, L2_NORM) * rs * rs * c)[:, None])
        tl.store(grad_states + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :] * stride_gd,
                 ds.to(grad_states.dtype.element_ty), mask=rows_ok[:, None] & (cols < D)[None, :])


@triton.jit
def _tiled_bwd_items_kernel(
    grad_rows, grad_scale, states, pos_ids, table, item_ids, item_inv_norms, lse, rs_saved, out,
    num_rows, num_cols, num_items, row_blocks_per_split,
    stride_sm, stride_sd, stride_ti, stride_td, stride_os, stride_on, stride_od,
    inv_temperature,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    L2_NORM: tl.constexpr, SHARED: tl.constexpr, WIDEN: tl.constexpr, DOT_PRECISION: tl.constexpr,
    FOLD_NORMS: tl.constexpr, ATOMIC: tl.constexpr,
):
    """Gradients of a block of scored items, summed over the rows of split ``program_id(1)``:
    written to ``out[split, n]`` (strides os, on, od), or with ATOMIC added (float32 atomics) into the
    table-shaped ``out`` at each item's table row.

    Each row's upstream gradient g scales its probabilities before the gradient matmul. With fp16
    operands (not FOLD_NORMS) they take g / ``grad_scale`` (max |g|, a device scalar), at most 1 in
    magnitude, and the sums are multiplied back after the loop: the mean over 25,000 rows gives
    g = 4e-5, and p * g would fall below fp16's normal range (6e-5) and lose its digits. c = sum
    dlogit * logit is taken from acc after the loop (see the module docstring)."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(1)
    n_ok = n < num_cols
    cols = tl.arange(0, BLOCK_D)
    ids, table_rows, e, re = _item_block(table, item_ids, item_inv_norms, n, n_ok, num_items, stride_ti, stride_td,
                                         cols, D, BLOCK_D, L2_NORM, SHARED)
    if WIDEN:
        e = e.to(tl.float32)
    if FOLD_NORMS:
        g_scale = 1.0
    else:
        g_scale = tl.load(grad_scale)
        g_scale = tl.where(g_scale > 0, g_scale, 1.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)  # sum over rows of dlogit * rs * s
    first_row = split * row_blocks_per_split * BLOCK_M
    last_row = tl.minimum(first_row + row_blocks_per_split * BLOCK_M, num_rows)
    for m0 in range(first_row, last_row, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rows_ok = rows < num_rows
        s = load_tile(states + rows.to(tl.int64)[:, None] * stride_sm + cols[None, :] * stride_sd, rows_ok, cols,
                      D, BLOCK_D, True)
        rs = tl.load(rs_saved + rows, mask=rows_ok, other=0.0)
        lse_rows = tl.load(lse + rows, mask=rows_ok, other=float("inf"))
        pos = tl.load(pos_ids + rows, mask=rows_ok, other=-1)
        g = tl.load(grad_rows + rows, mask=rows_ok, other=0.0).to(tl.float32)  # each row's loss gradient
        if WIDEN:
            s = s.to(tl.float32)
        logits = tl.dot(e, tl.trans(s), input_precision=DOT_PRECISION) * (rs * inv_temperature)[None, :] * re[:, None]
        p = _probability(logits, lse_rows[None, :])
        if SHARED:
            p = tl.where(ids[:, None] != pos[None, :], p, 0.0)
        else:
            p = p - tl.where(n[:, None] == pos[None, :], 1.0, 0.0)
        p = p * (g / g_scale)[None, :]
        if FOLD_NORMS:
            acc += tl.dot((p * rs[None, :]).to(s.dtype), s, input_precision=DOT_PRECISION)
        else:
            rs_exponent, rs_mantissa = _exponent_and_mantissa(rs)
            s_scaled = (s.to(tl.float32) * rs_exponent[:, None]).to(s.dtype)
            acc += tl.dot((p * rs_mantissa[None, :]).to(s.dtype), s_scaled, input_precision=DOT_PRECISION)
    e32 = e.to(tl.float32)
    c = re * inv_temperature * tl.sum(e32 * acc, axis=1)  # sum of dlogit * logit, from acc itself
    de = g_scale * (acc * (re * inv_temperature)[:, None] - e32 * (_projected(re, L2_NORM) * re * re * c)[:, None])
    mask = n_ok[:, None] & (cols < D)[None, :]
    if ATOMIC:
        tl.atomic_add(out + table_rows[:, None] * D + cols[None, :], de, mask=mask, sem="relaxed")
    else:
        tl.store(out + split.to(tl.int64) * stride_os + n.to(tl.int64)[:, None] * stride_on + cols[None, :] * stride_od,
                 de.to(out.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------
# Sorted table gradient of shared negatives: one program per item, occurrences sorted
# --------------------------------------------------------------------------------------------
@triton.jit
def _table_grad_by_item_kernel(
    grad_rows, order, bounds, states, table, lse, rs_saved, neg_grads, grad_table,
    num_rows,
    stride_sm, stride_sd, stride_ti, stride_td, stride_gi, stride_gd,
    inv_temperature,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, L2_NORM: tl.constexpr,
):
    """Row ``item`` of the table gradient of shared negatives, summed over its occurrences in sorted
    order: occurrence k (``order[bounds[item]:bounds[item+1]]``) is the positive of row k for k < M
    (gradient recomputed here), else shared negative k - M, whose gradient row ``neg_grads[k - M]``
    the item-block kernel wrote.
    """
    item = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    cols_ok = cols < D
    e = tl.load(table + item.to(tl.int64) * stride_ti + cols * stride_td, mask=cols_ok, other=0.0).to(tl.float32)
    sum_sq_e = tl.sum(e * e, axis=0)
    re = _inverse_norm(sum_sq_e, L2_NORM)
    start = tl.load(bounds + item)
    end = tl.load(bounds + item + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum over recomputed occurrences of dlogit * rs * s
    c = tl.sum(acc, axis=0)  # sum of dlogit * logit
    given = tl.zeros([BLOCK_D], dtype=tl.float32)  # sum of the shared negatives' gradient rows
    for k0 in range(start, end, BLOCK_K):  # tiles read with plain loads: no jit calls in the loop (interpreter)
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < end
        occurrence = tl.load(order + k, mask=k_ok, other=0)
        positive = occurrence < num_rows
        row = tl.where(positive, occurrence, 0)
        scored = k_ok & positive
        negative = (occurrence - num_rows).to(tl.int64)
        given += tl.sum(tl.load(neg_grads + negative[:, None] * D + cols[None, :],
                                mask=(k_ok & ~positive)[:, None] & cols_ok[None, :], other=0.0), axis=0)
        s = tl.load(states + row.to(tl.int64)[:, None] * stride_sm + cols[None, :] * stride_sd,
                    mask=scored[:, None] & cols_ok[None, :], other=0.0).to(tl.float32)
        rs = tl.load(rs_saved + row, mask=scored, other=0.0)
        lse_rows = tl.load(lse + row, mask=scored, other=float("inf"))
        logits = tl.sum(s * e[None, :], axis=1) * (rs * inv_temperature) * re
        p = _probability(logits, lse_rows)
        dl = p - 1.0
        dl = tl.where(scored, dl * tl.load(grad_rows + row, mask=scored, other=0.0).to(tl.float32), 0.0)
        acc += tl.sum(s * (dl * rs)[:, None], axis=0)
        c += tl.sum(dl * logits, axis=0)
    grad = acc * (re * inv_temperature) - e * (_projected(re, L2_NORM) * re * re * c) + given
    tl.store(grad_table + item.to(tl.int64) * stride_gi + cols * stride_gd,
             grad.to(grad_table.dtype.element_ty), mask=cols_ok)


# --------------------------------------------------------------------------------------------
# Launch plans
# --------------------------------------------------------------------------------------------
# Block sizes for H100/H200-sized shared memory and register files, checked by an AOT compile for
# sm_90 (registers and spills in the kernel notes), not yet timed on a GPU.
def _tiled_config(kind: str, block_d: int, widen: bool, shared: bool = False) -> dict:
    """kind: "fwd" (BLOCK_M rows held, BLOCK_N items streamed), "rows" (the same, with a [BLOCK_M,
    BLOCK_D] float32 accumulator), "items" (BLOCK_N items held with their accumulator, BLOCK_M rows
    streamed). ``shared``: the rows kernel also scores the positives after its loop (64 rows a program
    where 128 spill)."""
    if KERNELS_INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)
    if widen:  # float32 operands: half the tile of 16-bit ones
        held, streamed = (64, 32) if block_d <= 128 else (32, 32) if block_d <= 256 else (16, 16)
        cfg = dict(num_warps=4, num_stages=2)
    elif kind == "fwd":
        held, streamed = (128, 128) if block_d <= 64 else (128, 64) if block_d <= 256 else (64, 32)
        cfg = dict(num_warps=8, num_stages=3 if block_d <= 128 else 2)
    else:
        held, streamed = (128, 64) if block_d <= 64 else (64, 64) if block_d <= 256 else (32, 32)
        if kind == "rows" and shared:
            held = min(held, 64)
        cfg = dict(num_warps=8, num_stages=3 if block_d <= 64 else 2)
    if kind == "items":
        return dict(cfg, BLOCK_N=held, BLOCK_M=streamed)
    return dict(cfg, BLOCK_M=held, BLOCK_N=streamed)


def _item_sums_block(block_d: int) -> int:
    """Occurrences a step of ``_item_sums_kernel``: a [BLOCK_K, BLOCK_D] float32 accumulator of 4K
    elements (64 at D = 50; 64 x 256 took 226 registers, 64 x 512 spilled)."""
    return 16 if KERNELS_INTERPRETED else max(8, 4096 // block_d)


def _item_grads_block(block_d: int) -> int:
    """Table rows a program of ``_item_grads_kernel``: tiles of 2K elements (32 rows at D = 50; 32 x 512
    spilled)."""
    return max(4, 2048 // block_d)


def _rows_config(block_d: int, num_neg: int) -> dict:
    """Per-row kernels: BLOCK_M rows a program, their negatives gathered BLOCK_R at a time into
    [BLOCK_M, BLOCK_R, BLOCK_D] float32 tiles of 4K elements (8K spilled in the backward at D = 50)."""
    if KERNELS_INTERPRETED:
        return dict(BLOCK_M=16, BLOCK_R=8, num_warps=4)
    block_r = max(8, min(block_dim(max(num_neg, 1), 8), 4096 // block_d))
    return dict(BLOCK_M=max(1, 4096 // (block_r * block_d)), BLOCK_R=block_r, num_warps=4)


# Item-block programs split the rows when there are fewer blocks than this many programs per SM.
ITEM_PROGRAMS_PER_SM = 2
PREPARE_BLOCK_R = 32  # rows a program of ``_prepare_rows_kernel``
SORTED_BLOCK_K = 32  # occurrences a step of the shared negatives' by-item kernel
# The sampled losses' table scatter when the caller names none and deterministic algorithms are off:
# float32 atomics beat the sorted sums at the training steps' shapes on an H200 (kernels/triton/
# softmax_losses_notes.md); "sort" is the bitwise-repeatable one.
DEFAULT_SCATTER = "atomic"
OCCURRENCES_PER_PROGRAM = 1024  # an item's sorted occurrences are split among programs of about this many
MAX_GRID_Y = 65535


@functools.lru_cache(maxsize=None)
def _programs_target(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return ITEM_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def _row_splits(num_rows: int, num_cols: int, cfg: dict, target: int) -> tuple[int, int]:
    """(splits, row blocks per split) of the item-block kernel: enough programs to fill the GPU."""
    row_blocks = cdiv(num_rows, cfg["BLOCK_M"])
    splits = min(row_blocks, max(1, cdiv(target, cdiv(num_cols, cfg["BLOCK_N"]))))
    per_split = cdiv(row_blocks, splits)
    return cdiv(row_blocks, per_split), per_split


def _launch_options(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k in ("num_warps", "num_stages")}


def _widen(states: torch.Tensor, item_table: torch.Tensor) -> bool:
    """Whether the dots take float32 operands: float32 inputs, or inputs of two dtypes."""
    return states.dtype != item_table.dtype or states.dtype == torch.float32


def _precision(states: torch.Tensor, item_table: torch.Tensor) -> str:
    return dot_precision(torch.float32 if _widen(states, item_table) else states.dtype)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def _item_inverse_norms(item_table: torch.Tensor, neg_ids: torch.Tensor | None, l2_norm: bool) -> torch.Tensor:
    """float32 [columns]: 1 / max(|e|, eps) of each scored item (the shared negatives, or every row);
    [0] without ``l2_norm``."""
    num_items, dim = item_table.shape
    num_cols = neg_ids.numel() if neg_ids is not None else num_items
    if not l2_norm:
        return item_table.new_empty(0, dtype=torch.float32)
    out = torch.empty(num_cols, dtype=torch.float32, device=item_table.device)
    if num_cols:
        _prepare_rows_kernel[(cdiv(num_cols, PREPARE_BLOCK_R),)](
            item_table, neg_ids if neg_ids is not None else out, out, out, num_cols, num_items, *item_table.stride(),
            D=dim, BLOCK_D=block_dim(dim), BLOCK_R=PREPARE_BLOCK_R, GATHER=neg_ids is not None, NORMS=True,
            COPY=False, num_warps=4)
    return out


def _gather_source(x: torch.Tensor, norms: bool) -> tuple[torch.Tensor, int, torch.Tensor]:
    """What the per-row kernels gather rows from: (x itself where its rows are 16-byte aligned, else a
    zero-padded contiguous copy [N, BLOCK_D] (D = 50 in bf16 is 100 bytes a row: reads of 2 bytes a
    lane otherwise); the columns a row read takes, D or BLOCK_D for the copy; with ``norms``,
    1 / max(|x_r|, eps) of every row (float32 [N]), else [0]). One launch, or none."""
    num, dim = x.shape
    block_d = block_dim(dim)
    size = x.element_size()
    aligned = (x.stride(1) == 1 and (x.stride(0) * size) % 16 == 0 and (dim * size) % 16 == 0
               and x.data_ptr() % 16 == 0)
    inv_norms = torch.empty(num if norms else 0, dtype=torch.float32, device=x.device)
    rows = x if aligned else torch.empty((num, block_d), dtype=x.dtype, device=x.device)
    if num and (norms or not aligned):
        _prepare_rows_kernel[(cdiv(num, PREPARE_BLOCK_R),)](
            x, x, inv_norms, rows, num, num, *x.stride(), D=dim, BLOCK_D=block_d, BLOCK_R=PREPARE_BLOCK_R,
            GATHER=False, NORMS=norms, COPY=not aligned, num_warps=4)
    return rows, dim if aligned else block_d, inv_norms


def _id_vectors(pos_ids, neg_ids):
    """The kernels index id vectors densely: positives and shared negatives made contiguous (a no-op
    for the model's); per-row negatives keep their strides."""
    if neg_ids is not None and neg_ids.dim() == 1:
        neg_ids = neg_ids.contiguous()
    return pos_ids.contiguous(), neg_ids


def softmax_loss_forward(states, pos_ids, neg_ids, item_table, temperature, l2_norm):
    """-> (per-row losses [M], per-row logsumexp [M], per-row inverse state norms [M], inverse norms
    of the scored items ([R] shared negatives, [I] every table row for per-row negatives and the full
    softmax; [0] without ``l2_norm``))."""
    num_rows, dim = states.shape
    num_items = item_table.shape[0]
    pos_ids, neg_ids = _id_vectors(pos_ids, neg_ids)
    f32 = dict(dtype=torch.float32, device=states.device)
    row_loss, lse, rs = (torch.empty(num_rows, **f32) for _ in range(3))
    inv_temperature = 1.0 / temperature
    block_d = block_dim(dim)
    if neg_ids is not None and neg_ids.dim() == 2:
        table_rows, load_d, inv_norms = _gather_source(item_table, l2_norm)
        cfg = _rows_config(block_d, neg_ids.shape[1])
        if num_rows:
            _sampled_rows_fwd_kernel[(cdiv(num_rows, cfg["BLOCK_M"]),)](
                states, pos_ids, neg_ids, table_rows, inv_norms if l2_norm else lse, row_loss, lse, rs, num_rows,
                num_items, neg_ids.shape[1], *states.stride(), *neg_ids.stride(), *table_rows.stride(),
                inv_temperature, D=dim, BLOCK_D=block_d, LOAD_D=load_d, BLOCK_M=cfg["BLOCK_M"],
                BLOCK_R=cfg["BLOCK_R"], L2_NORM=l2_norm, **_launch_options(cfg))
        return row_loss, lse, rs, inv_norms
    inv_norms = _item_inverse_norms(item_table, neg_ids, l2_norm)
    num_cols = neg_ids.numel() if neg_ids is not None else num_items
    widen = _widen(states, item_table)
    cfg = _tiled_config("fwd", block_d, widen)
    _tiled_fwd_kernel[(cdiv(num_rows, cfg["BLOCK_M"]),)](
        states, pos_ids, item_table, neg_ids if neg_ids is not None else pos_ids, inv_norms, row_loss, lse, rs,
        num_rows, num_cols, num_items, *states.stride(), *item_table.stride(), inv_temperature,
        D=dim, BLOCK_D=block_d, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], L2_NORM=l2_norm,
        SHARED=neg_ids is not None, WIDEN=widen, DOT_PRECISION=_precision(states, item_table), **_launch_options(cfg))
    return row_loss, lse, rs, inv_norms


def softmax_loss_backward(grad_rows, states, pos_ids, neg_ids, item_table, lse, rs, inv_norms, temperature,
                          l2_norm, states_grad, table_grad, deterministic, scatter=""):
    """-> (d states or [0], d item_table or [0]). Sampled losses scatter into the table with float32
    atomics ("atomic") or through one stable sort of the occurrences by item ("sort"): ``scatter``,
    or ``DEFAULT_SCATTER`` when it is ""; "sort" whenever ``deterministic``."""
    num_rows, dim = states.shape
    num_items = item_table.shape[0]
    if num_rows == 0:  # reduction="none" over no rows
        return (torch.empty_like(states) if states_grad else states.new_empty(0),
                torch.zeros_like(item_table) if table_grad else item_table.new_empty(0))
    pos_ids, neg_ids = _id_vectors(pos_ids, neg_ids)
    per_row = neg_ids is not None and neg_ids.dim() == 2
    shared = neg_ids is not None and neg_ids.dim() == 1
    grad_rows = grad_rows.to(torch.float32).contiguous()  # [M]: a mean's gradient, or each row's
    inv_temperature = 1.0 / temperature
    if neg_ids is not None:
        scatter = "sort" if deterministic else scatter or DEFAULT_SCATTER
    if per_row:
        return _per_row_backward(grad_rows, states, pos_ids, neg_ids, item_table, lse, inv_norms, inv_temperature,
                                 l2_norm, states_grad, table_grad, scatter)
    atomic = table_grad and shared and scatter == "atomic"
    grad_states = torch.empty_like(states) if states_grad else states.new_empty(0)
    grad_table = None
    table32 = torch.zeros((num_items, dim), dtype=torch.float32, device=states.device) if atomic else None
    neg_grads = None  # shared negatives' gradient rows [R, D] for the sorted scatter
    block_d = block_dim(dim)
    widen = _widen(states, item_table)
    precision = _precision(states, item_table)
    num_cols = neg_ids.numel() if shared else num_items
    item_ids = neg_ids if shared else pos_ids
    # The gradient matmuls take the inverse norms folded into the probabilities; in fp16 that
    # product could overflow (inverse norms reach 1 / eps), so fp16 folds only their mantissas and
    # scales the streamed rows by their powers of two.
    fold_norms = widen or states.dtype != torch.float16
    common = dict(D=dim, BLOCK_D=block_d, L2_NORM=l2_norm, SHARED=shared, WIDEN=widen, DOT_PRECISION=precision,
                  FOLD_NORMS=fold_norms)
    if states_grad or atomic:
        cfg = _tiled_config("rows", block_d, widen, shared)
        _tiled_bwd_rows_kernel[(cdiv(num_rows, cfg["BLOCK_M"]),)](
            grad_rows, states, pos_ids, item_table, item_ids, inv_norms, lse, rs, grad_states,
            table32 if atomic else grad_states, num_rows, num_cols, num_items,
            *states.stride(), *item_table.stride(), *_strides2(grad_states), inv_temperature,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], STATES_GRAD=states_grad,
            POSITIVES_GRAD=atomic, **common, **_launch_options(cfg))
    if table_grad and num_cols:
        cfg = _tiled_config("items", block_d, widen)
        splits, per_split = _row_splits(num_rows, num_cols, cfg, _programs_target(states.device))
        if atomic:
            out = table32
        elif splits == 1:  # written whole: the table's gradient, or the shared negatives' rows
            out = (torch.empty((1, num_cols, dim), dtype=torch.float32, device=states.device) if shared
                   else torch.empty((1, num_items, dim), dtype=item_table.dtype, device=states.device))
        else:
            out = torch.empty((splits, num_cols, dim), dtype=torch.float32, device=states.device)
        grad_scale = grad_rows if fold_norms else grad_rows.abs().amax()  # fp16 operands: max |g|
        _tiled_bwd_items_kernel[(cdiv(num_cols, cfg["BLOCK_N"]), splits)](
            grad_rows, grad_scale, states, pos_ids, item_table, item_ids, inv_norms, lse, rs, out,
            num_rows, num_cols, num_items, per_split, *states.stride(), *item_table.stride(),
            *(out.stride() if out.dim() == 3 else (0, *out.stride())), inv_temperature,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], ATOMIC=atomic, **common, **_launch_options(cfg))
        if not atomic:
            summed = out[0] if splits == 1 else out.sum(0)  # the splits in a fixed order
            if shared:
                neg_grads = summed
            else:
                grad_table = summed.to(item_table.dtype)
    if table_grad and shared:
        if atomic:
            grad_table = table32 if item_table.dtype == torch.float32 else table32.to(item_table.dtype)
        else:
            grad_table = _sorted_table_grad(grad_rows, states, pos_ids, neg_ids, item_table, lse, rs, neg_grads,
                                            inv_temperature, l2_norm)
    return grad_states, grad_table if table_grad else item_table.new_empty(0)


def _per_row_backward(grad_rows, states, pos_ids, neg_ids, item_table, lse, inv_norms, inv_temperature, l2_norm,
                      states_grad, table_grad, scatter):
    """Per-row negatives: one row-block kernel (state gradients, and the occurrences' weights as
    atomics or stored for the sort), then for "sort" a stable sort of the occurrences by item and
    their sums per item, and one pass that turns the per-item sums into the table's gradient."""
    num_rows, dim = states.shape
    num_items, num_neg = item_table.shape[0], neg_ids.shape[1]
    device = states.device
    block_d = block_dim(dim)
    f32 = dict(dtype=torch.float32, device=device)
    table_rows, load_d, _ = _gather_source(item_table, norms=False)
    grad_states = torch.empty_like(states) if states_grad else states.new_empty(0)
    mode = scatter if table_grad else "none"
    num_occurrences = num_rows * (num_neg + 1)
    item_sums = weights = keys = None
    if mode == "atomic":
        item_sums = torch.zeros((1, num_items, block_d), **f32)
    elif mode == "sort":
        weights = torch.empty(num_occurrences, **f32)
        keys = torch.empty(num_occurrences, dtype=_key_dtype(num_items), device=device)
    cfg = _rows_config(block_d, num_neg)
    if num_rows and (states_grad or table_grad):
        spare = lse  # stands in for the pointers a mode does not use
        _sampled_rows_bwd_kernel[(cdiv(num_rows, cfg["BLOCK_M"]),)](
            grad_rows, states, pos_ids, neg_ids, table_rows, inv_norms if l2_norm else spare, lse, grad_states,
            spare if item_sums is None else item_sums, spare if weights is None else weights,
            spare if keys is None else keys, num_rows, num_items, num_neg,
            *states.stride(), *neg_ids.stride(), *table_rows.stride(), *_strides2(grad_states),
            inv_temperature, D=dim, BLOCK_D=block_d, LOAD_D=load_d, BLOCK_M=cfg["BLOCK_M"], BLOCK_R=cfg["BLOCK_R"],
            L2_NORM=l2_norm, STATES_GRAD=states_grad, TABLE_SCATTER=mode, **_launch_options(cfg))
    if not table_grad:
        return grad_states, item_table.new_empty(0)
    if mode == "sort":
        sorted_keys, order = torch.sort(keys, stable=True)
        bounds = torch.searchsorted(sorted_keys, torch.arange(num_items + 1, dtype=keys.dtype, device=device))
        state_rows, states_load_d, _ = _gather_source(states, norms=False)
        splits = _item_splits(num_occurrences, num_items)
        item_sums = torch.empty((splits, num_items, block_d), **f32)
        _item_sums_kernel[(num_items, splits)](
            order, bounds, weights, state_rows, item_sums, num_items, num_neg + 1, splits, *state_rows.stride(),
            BLOCK_D=block_d, LOAD_D=states_load_d, BLOCK_K=_item_sums_block(block_d), WIDE_INDEX=num_occurrences >= 2**31,
            num_warps=4)
    grad_table = torch.empty((num_items, dim), dtype=item_table.dtype, device=device)
    block_i = _item_grads_block(block_d)
    _item_grads_kernel[(cdiv(num_items, block_i),)](
        item_sums, table_rows, inv_norms if l2_norm else item_sums, grad_table, num_items, item_sums.shape[0],
        *table_rows.stride(), *grad_table.stride(), inv_temperature, D=dim, BLOCK_D=block_d, LOAD_D=load_d,
        BLOCK_I=block_i, L2_NORM=l2_norm, num_warps=4)
    return grad_states, grad_table


def _key_dtype(num_items: int) -> torch.dtype:
    """Sort keys (table rows; ``searchsorted`` looks up 0 .. I) in int16 where they fit: a radix sort
    then makes two passes over the keys, not four."""
    return torch.int16 if num_items < 2**15 else torch.int32


def _item_splits(num_occurrences: int, num_items: int) -> int:
    """How many programs sum one item's sorted occurrences: about OCCURRENCES_PER_PROGRAM each at the
    average count (from shapes; a popular item still lands on its item's programs)."""
    return max(1, min(MAX_GRID_Y, cdiv(num_occurrences, num_items * OCCURRENCES_PER_PROGRAM)))


def _strides2(t: torch.Tensor) -> tuple[int, int]:
    return tuple(t.stride()) if t.dim() == 2 else (0, 0)


def _sorted_table_grad(grad_rows, states, pos_ids, neg_ids, item_table, lse, rs, neg_grads, inv_temperature,
                       l2_norm):
    """Shared negatives' table gradient without atomics: occurrences (positives, then the negatives'
    gradient rows) stably sorted by item, one program per table row summing its own in that order."""
    num_rows, dim = states.shape
    num_items = item_table.shape[0]
    device = states.device
    keys = torch.cat([pos_ids.reshape(-1), neg_ids.reshape(-1)]).clamp(0, num_items - 1).to(torch.int32)
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.searchsorted(sorted_keys, torch.arange(num_items + 1, dtype=torch.int32, device=device))
    grad_table = torch.empty_like(item_table)
    _table_grad_by_item_kernel[(num_items,)](
        grad_rows, order, bounds, states, item_table, lse, rs, neg_grads if neg_grads is not None else rs,
        grad_table, num_rows,
        *states.stride(), *item_table.stride(), *grad_table.stride(), inv_temperature,
        D=dim, BLOCK_D=block_dim(dim), BLOCK_K=SORTED_BLOCK_K, L2_NORM=l2_norm, num_warps=4)
    return grad_table


# --------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile sees opaque ops with fake shapes and a registered VJP)
# --------------------------------------------------------------------------------------------
def _loss_fwd(
    states: torch.Tensor, pos_ids: torch.Tensor, neg_ids: Optional[torch.Tensor], item_table: torch.Tensor,
    temperature: float, l2_norm: bool, scatter: str = "",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``scatter`` (the sampled losses' table scatter, "" for ``DEFAULT_SCATTER``) is kept for the backward."""
    return softmax_loss_forward(states, pos_ids, neg_ids, item_table, temperature, l2_norm)


def _loss_fwd_fake(states, pos_ids, neg_ids, item_table, temperature, l2_norm, scatter=""):
    rows = states.shape[0]
    if not l2_norm:
        columns = 0
    elif neg_ids is not None and neg_ids.dim() == 1:
        columns = neg_ids.numel()
    else:
        columns = item_table.shape[0]
    f32 = torch.float32
    return (states.new_empty((rows,), dtype=f32), states.new_empty((rows,), dtype=f32),
            states.new_empty((rows,), dtype=f32), states.new_empty((columns,), dtype=f32))


def _loss_bwd(
    grad_rows: torch.Tensor, states: torch.Tensor, pos_ids: torch.Tensor, neg_ids: Optional[torch.Tensor],
    item_table: torch.Tensor, lse: torch.Tensor, rs: torch.Tensor, inv_norms: torch.Tensor,
    temperature: float, l2_norm: bool, states_grad: bool, table_grad: bool, deterministic: bool, scatter: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    return softmax_loss_backward(grad_rows, states, pos_ids, neg_ids, item_table, lse, rs, inv_norms, temperature,
                                 l2_norm, states_grad, table_grad, deterministic, scatter)


def _loss_bwd_fake(grad_rows, states, pos_ids, neg_ids, item_table, lse, rs, inv_norms, temperature, l2_norm,
                   states_grad, table_grad, deterministic, scatter=""):
    return (states.new_empty(states.shape) if states_grad else states.new_empty(0),
            item_table.new_empty(item_table.shape) if table_grad else item_table.new_empty(0))


def _setup_context(ctx, inputs, output):
    states, pos_ids, neg_ids, item_table, temperature, l2_norm, *scatter = inputs  # scatter may be left to its default
    _, lse, rs, inv_norms = output
    ctx.save_for_backward(states, pos_ids, neg_ids, item_table, lse, rs, inv_norms)
    ctx.temperature = temperature
    ctx.l2_norm = l2_norm
    ctx.scatter = scatter[0] if scatter else ""
    ctx.num_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, rs, inv_norms)


def _gradients(ctx, grad_outputs, backward):
    states, pos_ids, neg_ids, item_table, lse, rs, inv_norms = ctx.saved_tensors
    states_grad, table_grad = bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[3])
    grad_states, grad_table = backward(
        grad_outputs[0], states, pos_ids, neg_ids, item_table, lse, rs, inv_norms, ctx.temperature, ctx.l2_norm,
        states_grad, table_grad, torch.are_deterministic_algorithms_enabled(), ctx.scatter)
    return (grad_states if states_grad else None, None, None, grad_table if table_grad else None,
            *(None,) * (ctx.num_inputs - 4))


_softmax_loss = autograd_custom_op(
    "softmax_loss", forward=_loss_fwd, forward_fake=_loss_fwd_fake, backward=_loss_bwd,
    backward_fake=_loss_bwd_fake, setup_context=_setup_context, gradients=_gradients,
)


# --------------------------------------------------------------------------------------------
# The Triton backend of hstu_kernels.sampled_softmax_loss / full_softmax_loss (through the registry)
# --------------------------------------------------------------------------------------------
def sampled_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    neg_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    reduction: str = "mean",
    scatter: str | None = None,
) -> torch.Tensor:
    """Mean over rows (``reduction="none"``: each row's) of -log softmax(positive | positive + negatives),
    float32 (inputs checked by the caller). ``scatter`` picks how the table's gradient is summed: "sort"
    (no atomics, bitwise repeatable) or "atomic"; None: ``DEFAULT_SCATTER``.
    Deterministic algorithms (``torch.use_deterministic_algorithms``) always get "sort"."""
    if scatter is not None and scatter not in SCATTERS:
        raise ValueError(f"sampled_softmax_loss: scatter must be one of {SCATTERS}, got {scatter!r}")
    rows = _softmax_loss(states, pos_ids, neg_ids, item_table, float(temperature), bool(l2_norm), scatter or "")[0]
    return rows.mean() if reduction == "mean" else rows


def full_softmax_loss(
    states: torch.Tensor,
    pos_ids: torch.Tensor,
    item_table: torch.Tensor,
    *,
    temperature: float,
    l2_norm: bool = True,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean over rows (``reduction="none"``: each row's) of -log softmax over every row of ``item_table``,
    float32 (inputs checked by the caller)."""
    rows = _softmax_loss(states, pos_ids, None, item_table, float(temperature), bool(l2_norm))[0]
    return rows.mean() if reduction == "mean" else rows


def unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the Triton kernels cannot run on (states, item_table); None when they can."""
    for name, t in zip(("states", "item_table"), tensors):
        if t.dtype not in SUPPORTED_DTYPES:
            return f"{name} dtype {t.dtype} is not supported (float16, bfloat16, float32)"
        if t.dtype == torch.bfloat16 and KERNELS_INTERPRETED:
            return "bfloat16 under TRITON_INTERPRET (the interpreter computes bf16 wrongly)"
        if t.dim() != 2:
            return f"expected {name} [rows, D], got {t.dim()} dims"
    if tensors[0].shape[-1] > MAX_DIM:
        return f"embedding dim {tensors[0].shape[-1]} > {MAX_DIM}"
    return None
