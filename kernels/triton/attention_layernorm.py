"""Triton backend of ``fused_attention_layernorm``: the STU block's two LayerNorms (no affine) fused
with what surrounds them.

Output side, ``attention_output``: ``x + Dropout(LayerNorm(attn) * u) @ W.T + b``.
- The gate ``Dropout(LayerNorm(attn) * u)`` is one pass over each row (statistics in fp32 registers);
  the dropout mask is regenerated from a seed held in a device tensor (the mask of
  ``hstu_kernels.dropout.seeded_dropout_mask``: one Philox evaluation per eight columns of a row,
  16-bit draws compared as integers, ``hstu_kernels.triton.common.dropout_keep``), never stored.
- The gated rows are written once, in the matmul dtype, with one extra column of ones (and zero
  padding to a 16-byte row): that column carries the bias through the weight-gradient matmul, so
  ``[dW | db] = dout^T @ [gated | 1]`` is one matmul and the bias needs no pass of its own.
- Two forward projections, chosen per shape by ``output_projection`` (both exposed to the benchmark):
  ``fused`` (D and H*dv <= 64): one Triton kernel computes the gate in registers for a block of rows,
  stores the gated rows (where a weight gradient will need them) and multiplies them by W^T (W one
  register tile) with the residual and bias added in the epilogue; ``cublas``: the gate kernel, then
  ``torch.addmm`` with the residual as its input (beta = 1). The backward is the same for both: dgated
  = dout @ W (where W fits one tile, one Triton kernel that also writes dout in the matmul dtype for
  the weight gradient; else a cast and cuBLAS), the gate's backward kernel, cuBLAS for [dW | db].
Input side, ``attention_input``: ``SiLU(LayerNorm(x) @ W)``, per ``input_normalization``:
- narrow rows: a tiled matmul whose prologue normalises the x rows it loads (per-row mean and rstd
  computed in the program, stored once for the backward) and whose epilogue applies SiLU; the
  backward is one kernel per row block (dz = dy * SiLU'(z) written once for dW, dLN(x) = dz @ W^T in
  registers, then the LayerNorm backward);
- wide rows: a LayerNorm kernel writes LN(x) in the matmul dtype (kept for the backward; rows
  zero-padded to a multiple of 16 elements so that the matmuls load them as vectors), then a
  plain tiled matmul with the SiLU epilogue; the backward is a dz kernel, cuBLAS for dz @ W^T and a
  LayerNorm-backward kernel.
The pre-activation z is recomputed in the backward or kept from the forward (``keep_preactivation``);
dW = LN(x)^T @ dz by cuBLAS.
Autocast: the matmul dtype is autocast's where it is on (the reference's linear runs there), else
the inputs'; LayerNorm statistics, SiLU and every accumulation are fp32; outputs have the
reference's dtypes (``attention_output``: x's promoted with the matmul dtype; ``attention_input``:
the matmul dtype). Kernel notes: kernels/triton/attention_layernorm_notes.md.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from hstu_kernels.custom_op import autograd_custom_op
from hstu_kernels.dropout import draw_seed, kernel_dropout_args, seed_tensor
from hstu_kernels.layout import ROW_ALIGN, aligned_rows, aligned_width
from hstu_kernels.triton.common import (
    KERNELS_INTERPRETED, block_dim, cdiv, dot_precision, dropout_counters_wide, dropout_keep, known_multiple,
    row_alignment, sigmoid, silu,
)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_WIDTH = 8192  # a gate or LayerNorm row is held whole in registers by one program
TAIL_BLOCK = tl.constexpr(ROW_ALIGN)
NORMED_ALIGN = 16  # stored LN(x) rows padded to a multiple of 16 elements (``_normed_width``)

# Per-shape rules (kernel notes, "Choices"; the benchmark variants force each side of them), set from
# GPU kernel times (H200 and H100, bf16 autocast, L = 25,600 and 200,000, D = H*dv in {50, 64, 256, 512}):
# - output side, forward: the fused projection where D and H*dv are at most 64 (W one register tile; the
#   gate, the product, the residual and the bias in one pass), the gate kernel then cuBLAS with the
#   residual and the bias folded in above. At D = H*dv = 50 and 64 the fused forward took 1.25-1.37x
#   less forward+backward time than the cuBLAS one (H100, L = 25,600 and 200,000); wider, W no longer
#   fits one tile, and a fused forward streaming W in tiles measured 1.4-2.3x slower than cuBLAS at 256
#   and 512. The backward is the same for both (dgated, the gate's backward kernel, cuBLAS for the weight
#   gradient): a one-pass fused backward measured slower (kernel notes, Tried and rejected).
# - input side: one LayerNorm kernel writes LN(x) in the matmul dtype, then a tiled matmul with SiLU
#   in its epilogue, cuBLAS for dz @ W^T and a LayerNorm-backward kernel, at every width. LayerNorm in
#   the matmul's prologue with a one-kernel backward measured 1.25-2.8x slower at every shape; it
#   stays as the `input-prologue` variant.
# - input side: the pre-activation is kept from this model width on (0: at every width). Recomputing
#   it costs 2*D*E FLOPs per row against 4*E bytes of storing and reading it, and measured 5-24%
#   slower forward+backward at all eight shapes.
FUSED_OUTPUT_MAX_WIDTH = 64
FUSED_OUTPUT_WIDTH_LIMIT = 64  # D and H*dv of the fused projection (forced variants too): W is one register tile
FUSED_OUTPUT_ROWS, FUSED_OUTPUT_WARPS = 32, 4  # its programs in bf16 and fp16 (an H100 sweep; kernel notes)
PROLOGUE_INPUT_MAX_DIM = 0
PROLOGUE_INPUT_DIM_LIMIT = 512  # above it the one-kernel backward's W tiles outgrow shared memory
KEEP_PREACTIVATION_MIN_DIM = 0
PROJECTIONS = ("fused", "cublas")
NORMALIZATIONS = ("prologue", "kernel")


# --------------------------------------------------------------------------------------------
# Row pieces shared by the kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _row_offsets(rows, stride):
    """Element offsets of row starts, 64-bit (rows * stride may pass 2**31 at long L and wide rows)."""
    return rows.to(tl.int64) * stride


@triton.jit
def _load_rows(ptr, rows, rows_ok, cols, width, load_width, stride):
    """A [BLOCK_M, BLOCK] row tile in fp32, zero past ``width``. ``load_width`` >= width columns are read:
    a multiple of 8 over rows whose padding the launcher knows is readable loads 16 bytes at a time."""
    x = tl.load(ptr + _row_offsets(rows, stride)[:, None] + cols[None, :],
                mask=rows_ok[:, None] & (cols[None, :] < load_width), other=0.0).to(tl.float32)
    return tl.where(cols[None, :] < width, x, 0.0)


@triton.jit
def _centred_rows(ptr, rows, rows_ok, cols, width, load_width, stride, eps):
    """x - mean of [BLOCK_M, BLOCK] row tiles in fp32 (zero outside), with rstd [BLOCK_M]."""
    mask = rows_ok[:, None] & (cols[None, :] < width)
    x = _load_rows(ptr, rows, rows_ok, cols, width, load_width, stride)
    mean = tl.sum(x, axis=1) / width
    centred = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / width + eps)
    return centred, mean, rstd


@triton.jit
def _normalized_rows(ptr, rows, rows_ok, cols, width, load_width, stride, eps):
    """(x - mean) * rstd of [BLOCK_M, BLOCK] row tiles in fp32 (zero outside), with mean and rstd [BLOCK_M]."""
    centred, mean, rstd = _centred_rows(ptr, rows, rows_ok, cols, width, load_width, stride, eps)
    return centred * rstd[:, None], mean, rstd


@triton.jit
def _gate_rows(attn, u, seed_ptr, rows, rows_ok, cols, K, load_k, stride_a, stride_u, eps, keep_from, scale,
               BLOCK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr, WIDE_COUNTERS: tl.constexpr):
    """Dropout(LayerNorm(attn) * u) of a row tile in fp32 (zero outside the tile); ``load_k`` columns read.
    The kept elements' scale is applied once a row, to rstd."""
    centred, _, rstd = _centred_rows(attn, rows, rows_ok, cols, K, load_k, stride_a, eps)
    gate = _load_rows(u, rows, rows_ok, cols, K, load_k, stride_u)
    if HAS_DROPOUT:
        rstd = rstd * scale
    gated = centred * rstd[:, None] * gate
    if HAS_DROPOUT:
        gated = tl.where(dropout_keep(seed_ptr, rows, 0, K, keep_from, BLOCK_K, WIDE_COUNTERS), gated, 0.0)
    return gated


@triton.jit
def _store_ones_column(gated, rows, rows_ok, K, stride_g, tail):
    """Columns K .. K + tail - 1 of the gated rows: 1 (the bias column), then zero padding."""
    extra = tl.arange(0, TAIL_BLOCK)
    values = tl.where((extra[None, :] == 0) & (rows[:, None] >= 0), 1.0, 0.0)  # [rows, TAIL_BLOCK]
    ptrs = gated + _row_offsets(rows, stride_g)[:, None] + K + extra[None, :]
    mask = rows_ok[:, None] & (extra[None, :] < tail)
    tl.store(ptrs, values.to(gated.dtype.element_ty), mask=mask)


@triton.jit
def _marked_gate_widths(K, stride_a, stride_u, stride_g, ALIGN: tl.constexpr, LOAD_K: tl.constexpr):
    """K (where rows are read unpadded, LOAD_K = 0) and the row strides of attn, u and the gated rows,
    restated as multiples of ALIGN (``known_multiple``)."""
    if LOAD_K == 0:
        K = known_multiple(K, ALIGN)
    return K, known_multiple(stride_a, ALIGN), known_multiple(stride_u, ALIGN), known_multiple(stride_g, ALIGN)


@triton.jit
def _store_gated(gated, value, rows, rows_ok, cols, K, stride_g, tail, LOAD_K: tl.constexpr):
    """The gated rows of a tile, [value | 1 | 0 ...] where ``tail`` > 0 (the ones column, then padding):
    LOAD_K > 0 columns (the padded width) in one store, else K columns and the tail apart."""
    ptrs = gated + _row_offsets(rows, stride_g)[:, None] + cols[None, :]
    if LOAD_K > 0:
        value = value.to(tl.float32)
        if tail > 0:
            value = tl.where(cols[None, :] == K, 1.0, value)  # value is 0 past K
        tl.store(ptrs, value.to(gated.dtype.element_ty), mask=rows_ok[:, None] & (cols[None, :] < LOAD_K))
    else:
        tl.store(ptrs, value.to(gated.dtype.element_ty), mask=rows_ok[:, None] & (cols[None, :] < K))
        _store_ones_column(gated, rows, rows_ok, K, stride_g, tail)  # stores nothing where tail = 0


@triton.jit
def _gate_backward_rows(grad, attn, u, seed_ptr, dattn, du, rows, rows_ok, cols, K, load_k,
                        stride_a, stride_u, stride_da, stride_du, eps, keep_from, scale,
                        BLOCK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr, WIDE_COUNTERS: tl.constexpr):
    """Given dL/dgated (fp32 [BLOCK_M, BLOCK_K]), write dL/dattn and dL/du of the row tile: ``load_k``
    columns read and written (past K, the padding of rows the launcher allocated padded)."""
    mask = rows_ok[:, None] & (cols[None, :] < K)
    centred, _, rstd = _centred_rows(attn, rows, rows_ok, cols, K, load_k, stride_a, eps)
    xhat = centred * rstd[:, None]
    gate = _load_rows(u, rows, rows_ok, cols, K, load_k, stride_u)
    # The kept elements' scale multiplies both gradients: it is applied once a row, to rstd.
    rstd_scaled = rstd
    if HAS_DROPOUT:
        mask = mask & dropout_keep(seed_ptr, rows, 0, K, keep_from, BLOCK_K, WIDE_COUNTERS)
        rstd_scaled = rstd * scale
    grad = tl.where(mask, grad, 0.0)
    grad_gate = grad * (centred * rstd_scaled[:, None])
    grad_xhat = grad * gate
    mean_grad = tl.sum(grad_xhat, axis=1) / K
    mean_grad_xhat = tl.sum(grad_xhat * xhat, axis=1) / K
    grad_attn = (grad_xhat - mean_grad[:, None] - xhat * mean_grad_xhat[:, None]) * rstd_scaled[:, None]
    stored = rows_ok[:, None] & (cols[None, :] < load_k)
    tl.store(dattn + _row_offsets(rows, stride_da)[:, None] + cols[None, :], grad_attn.to(dattn.dtype.element_ty),
             mask=stored)
    tl.store(du + _row_offsets(rows, stride_du)[:, None] + cols[None, :], grad_gate.to(du.dtype.element_ty),
             mask=stored)


# --------------------------------------------------------------------------------------------
# Output side kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _gate_fwd_kernel(attn, u, seed_ptr, gated, L, K, stride_a, stride_u, stride_g, tail, eps, keep_from, scale,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     WIDE_COUNTERS: tl.constexpr, ALIGN: tl.constexpr, LOAD_K: tl.constexpr):
    """LOAD_K > 0: rows padded to LOAD_K (a multiple of ALIGN) are read, and the gated row, ones column
    and padding included, is one store of LOAD_K columns; 0: K columns read, the ones column apart
    (``_store_gated``)."""
    K, stride_a, stride_u, stride_g = _marked_gate_widths(K, stride_a, stride_u, stride_g, ALIGN, LOAD_K)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    cols = tl.arange(0, BLOCK_K)
    value = _gate_rows(attn, u, seed_ptr, rows, rows_ok, cols, K, LOAD_K if LOAD_K > 0 else K, stride_a, stride_u, eps,
                       keep_from, scale, BLOCK_K, HAS_DROPOUT, WIDE_COUNTERS)
    _store_gated(gated, value, rows, rows_ok, cols, K, stride_g, tail, LOAD_K)


@triton.jit
def _gate_bwd_kernel(grad, attn, u, seed_ptr, dattn, du, L, K, stride_grad, stride_a, stride_u, stride_da, stride_du,
                     eps, keep_from, scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                     WIDE_COUNTERS: tl.constexpr, ALIGN: tl.constexpr, LOAD_K: tl.constexpr):
    """LOAD_K > 0: rows padded to LOAD_K (a multiple of ALIGN) are read and written; 0: K columns."""
    if LOAD_K == 0:
        K = known_multiple(K, ALIGN)
    stride_grad = known_multiple(stride_grad, ALIGN)
    stride_a = known_multiple(stride_a, ALIGN)
    stride_u = known_multiple(stride_u, ALIGN)
    stride_da = known_multiple(stride_da, ALIGN)
    stride_du = known_multiple(stride_du, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    cols = tl.arange(0, BLOCK_K)
    load_k = LOAD_K if LOAD_K > 0 else K
    g = _load_rows(grad, rows, rows_ok, cols, K, load_k, stride_grad)
    _gate_backward_rows(g, attn, u, seed_ptr, dattn, du, rows, rows_ok, cols, K, load_k, stride_a, stride_u,
                        stride_da, stride_du, eps, keep_from, scale, BLOCK_K, HAS_DROPOUT, WIDE_COUNTERS)


@triton.jit
def _output_fwd_kernel(x, attn, u, seed_ptr, w, bias, gated, out, L, D, K, stride_x, stride_a, stride_u, stride_w,
                       stride_g, stride_o, tail, eps, keep_from, scale, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                       BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                       WIDE_COUNTERS: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr,
                       LOAD_K: tl.constexpr, ALIGN_D: tl.constexpr, STORE_GATED: tl.constexpr):
    """out = x + gate @ W^T + b for a block of rows, W whole in one [BLOCK_D, BLOCK_K] tile and the gate in
    registers; with STORE_GATED the gated rows are stored as ``_gate_fwd_kernel`` stores them (LOAD_K
    likewise) for the backward's weight-gradient matmul."""
    K, stride_a, stride_u, stride_g = _marked_gate_widths(K, stride_a, stride_u, stride_g, ALIGN, LOAD_K)
    D = known_multiple(D, ALIGN_D)
    stride_x = known_multiple(stride_x, ALIGN_D)
    stride_o = known_multiple(stride_o, ALIGN_D)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    cols = tl.arange(0, BLOCK_K)
    outs = tl.arange(0, BLOCK_D)
    outs_ok = outs < D
    value = _gate_rows(attn, u, seed_ptr, rows, rows_ok, cols, K, LOAD_K if LOAD_K > 0 else K, stride_a, stride_u,
                       eps, keep_from, scale, BLOCK_K, HAS_DROPOUT, WIDE_COUNTERS).to(w.dtype.element_ty)
    if STORE_GATED:
        _store_gated(gated, value, rows, rows_ok, cols, K, stride_g, tail, LOAD_K)
    w_tile = tl.load(w + outs[:, None] * stride_w + cols[None, :], mask=outs_ok[:, None] & (cols[None, :] < K),
                     other=0.0)
    acc = tl.dot(value, tl.trans(w_tile), input_precision=DOT_PRECISION)
    mask = rows_ok[:, None] & outs_ok[None, :]
    acc += tl.load(x + _row_offsets(rows, stride_x)[:, None] + outs[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + outs, mask=outs_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out + _row_offsets(rows, stride_o)[:, None] + outs[None, :], acc.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _output_grad_gated_kernel(grad_out, w, grad_mm, grad_gated, L, D, K, stride_g, stride_w, stride_mm, stride_gg,
                              BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                              STORE_GRAD_MM: tl.constexpr, DOT_PRECISION: tl.constexpr, ALIGN_D: tl.constexpr,
                              STORE_K: tl.constexpr):
    """dgated = dout @ W for a block of rows, W whole in one [BLOCK_D, BLOCK_K] tile: dout rounded to the
    matmul dtype first, as the reference's linear backward rounds it, and with STORE_GRAD_MM written out in
    that dtype for the weight-gradient matmul. STORE_K columns of dgated are written (K, or K's padded
    width in rows allocated padded: the columns past K are zero)."""
    D = known_multiple(D, ALIGN_D)
    stride_g = known_multiple(stride_g, ALIGN_D)
    stride_mm = known_multiple(stride_mm, ALIGN_D)
    stride_gg = known_multiple(stride_gg, TAIL_BLOCK)  # padded rows (``aligned_rows``)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    cols = tl.arange(0, BLOCK_K)
    outs = tl.arange(0, BLOCK_D)
    outs_ok = outs < D
    mask = rows_ok[:, None] & outs_ok[None, :]
    g = tl.load(grad_out + _row_offsets(rows, stride_g)[:, None] + outs[None, :], mask=mask, other=0.0)
    g = g.to(w.dtype.element_ty)
    if STORE_GRAD_MM:
        tl.store(grad_mm + _row_offsets(rows, stride_mm)[:, None] + outs[None, :], g, mask=mask)
    w_tile = tl.load(w + outs[:, None] * stride_w + cols[None, :], mask=outs_ok[:, None] & (cols[None, :] < K),
                     other=0.0)
    acc = tl.dot(g, w_tile, input_precision=DOT_PRECISION)
    tl.store(grad_gated + _row_offsets(rows, stride_gg)[:, None] + cols[None, :], acc.to(grad_gated.dtype.element_ty),
             mask=rows_ok[:, None] & (cols[None, :] < STORE_K))


# --------------------------------------------------------------------------------------------
# Input side kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _tile_position(L, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row block, column block) of this program, row blocks grouped so that neighbours share W tiles in L2."""
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(L, BLOCK_M)
    blocks_n = tl.cdiv(E, BLOCK_N)
    per_group = GROUP_M * blocks_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    return pid_m, pid_n


@triton.jit
def _input_product(x, w, mean, rstd, rows, rows_ok, cols_n, cols_ok, D, W_ROWS, stride_x, stride_w,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NORMALIZE: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """LN(x) @ W for a [BLOCK_M, BLOCK_N] tile: x normalised chunk by chunk as it is loaded (NORMALIZE),
    or x already LN(x) in the matmul dtype. x rows hold D values, W has W_ROWS rows: LN(x) rows padded
    with zeros past W_ROWS to a 16-element multiple D load as unmasked vectors."""
    x_rows = _row_offsets(rows, stride_x)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = rows_ok[:, None] & (dims[None, :] < D)
        chunk = tl.load(x + x_rows[:, None] + dims[None, :], mask=mask, other=0.0)
        if NORMALIZE:
            chunk = tl.where(mask, (chunk.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
        w_tile = tl.load(w + dims[:, None] * stride_w + cols_n[None, :],
                         mask=(dims[:, None] < W_ROWS) & cols_ok[None, :], other=0.0)
        acc = tl.dot(chunk.to(w.dtype.element_ty), w_tile, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _row_statistics(x, rows, rows_ok, D, stride_x, eps, BLOCK_D: tl.constexpr):
    """Per-row mean and rstd over D in chunks: sums shifted by each row's first value (no cancellation
    when the rows carry a large common offset)."""
    x_rows = _row_offsets(rows, stride_x)
    shift = tl.load(x + x_rows, mask=rows_ok, other=0.0).to(tl.float32)
    total = tl.zeros_like(shift)
    squares = tl.zeros_like(shift)
    for d0 in range(0, D, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        mask = rows_ok[:, None] & (dims[None, :] < D)
        chunk = tl.load(x + x_rows[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        centred = tl.where(mask, chunk - shift[:, None], 0.0)
        total += tl.sum(centred, axis=1)
        squares += tl.sum(centred * centred, axis=1)
    shifted_mean = total / D
    var = tl.maximum(squares / D - shifted_mean * shifted_mean, 0.0)
    return shift + shifted_mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _input_fwd_kernel(x, w, out, pre, mean_out, rstd_out, L, D, W_ROWS, E, stride_x, stride_w, stride_o, stride_p, eps,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_M: tl.constexpr,
                      NORMALIZE: tl.constexpr, STORE_PRE: tl.constexpr, FAST_SILU: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """SiLU(LN(x) @ W) for one [BLOCK_M, BLOCK_N] tile. NORMALIZE: x is the raw input, normalised in the
    prologue (the first column block stores mean and rstd); else x holds LN(x) already, its rows padded
    to D >= W_ROWS. ALIGN divides E and the strides of the E-wide rows (W, out, pre)."""
    E = known_multiple(E, ALIGN)
    stride_w = known_multiple(stride_w, ALIGN)
    stride_o = known_multiple(stride_o, ALIGN)
    stride_p = known_multiple(stride_p, ALIGN)
    pid_m, pid_n = _tile_position(L, E, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols_n < E
    if NORMALIZE:
        mean, rstd = _row_statistics(x, rows, rows_ok, D, stride_x, eps, BLOCK_D)
        if pid_n == 0:
            tl.store(mean_out + rows, mean, mask=rows_ok)
            tl.store(rstd_out + rows, rstd, mask=rows_ok)
    else:
        mean = tl.zeros((BLOCK_M,), dtype=tl.float32)
        rstd = mean
    z = _input_product(x, w, mean, rstd, rows, rows_ok, cols_n, cols_ok, D, W_ROWS, stride_x, stride_w,
                       BLOCK_M, BLOCK_N, BLOCK_D, NORMALIZE, DOT_PRECISION)
    mask = rows_ok[:, None] & cols_ok[None, :]
    if STORE_PRE:
        tl.store(pre + _row_offsets(rows, stride_p)[:, None] + cols_n[None, :], z.to(pre.dtype.element_ty), mask=mask)
    tl.store(out + _row_offsets(rows, stride_o)[:, None] + cols_n[None, :], silu(z, FAST_SILU).to(out.dtype.element_ty),
             mask=mask)


@triton.jit
def _layer_norm_fwd_kernel(x, normed, mean_out, rstd_out, L, D, D_OUT, stride_x, stride_n, eps,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """Wide rows: LN(x) in the matmul dtype, zero-padded to D_OUT <= BLOCK_D columns, with per-row mean
    and rstd, for the matmuls that follow."""
    D = known_multiple(D, ALIGN)
    stride_x = known_multiple(stride_x, ALIGN)
    stride_n = known_multiple(stride_n, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    dims = tl.arange(0, BLOCK_D)
    xhat, mean, rstd = _normalized_rows(x, rows, rows_ok, dims, D, D, stride_x, eps)
    tl.store(normed + _row_offsets(rows, stride_n)[:, None] + dims[None, :], xhat.to(normed.dtype.element_ty),
             mask=rows_ok[:, None] & (dims[None, :] < D_OUT))
    tl.store(mean_out + rows, mean, mask=rows_ok)
    tl.store(rstd_out + rows, rstd, mask=rows_ok)


@triton.jit
def _silu_grad(grad_y, z, FAST_SILU: tl.constexpr):
    """dL/dz = dL/dy * SiLU'(z), SiLU'(z) = s * (1 + z * (1 - s)), s = sigmoid(z)."""
    s = sigmoid(z, FAST_SILU)
    return grad_y * s * (1.0 + z * (1.0 - s))


@triton.jit
def _input_dz_kernel(normed, w, pre, grad_y, dz, L, D, W_ROWS, E, stride_n, stride_w, stride_p, stride_gy, stride_gyn,
                     stride_dz, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     GROUP_M: tl.constexpr, LOAD_PRE: tl.constexpr, FAST_SILU: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, ALIGN: tl.constexpr):
    """Wide rows: dz = dy * SiLU'(z) for one tile, z = LN(x) @ W recomputed from the stored LN(x) (rows
    padded to D >= W_ROWS), or read back. ALIGN divides E and the strides of the E-wide rows."""
    E = known_multiple(E, ALIGN)
    stride_w = known_multiple(stride_w, ALIGN)
    stride_p = known_multiple(stride_p, ALIGN)
    stride_gy = known_multiple(stride_gy, ALIGN)
    stride_dz = known_multiple(stride_dz, ALIGN)
    pid_m, pid_n = _tile_position(L, E, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols_n < E
    mask = rows_ok[:, None] & cols_ok[None, :]
    if LOAD_PRE:
        z = tl.load(pre + _row_offsets(rows, stride_p)[:, None] + cols_n[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        unused = tl.zeros((BLOCK_M,), dtype=tl.float32)
        z = _input_product(normed, w, unused, unused, rows, rows_ok, cols_n, cols_ok, D, W_ROWS, stride_n, stride_w,
                           BLOCK_M, BLOCK_N, BLOCK_D, False, DOT_PRECISION)
    gy = tl.load(grad_y + _row_offsets(rows, stride_gy)[:, None] + cols_n[None, :] * stride_gyn, mask=mask,
                 other=0.0).to(tl.float32)
    tl.store(dz + _row_offsets(rows, stride_dz)[:, None] + cols_n[None, :],
             _silu_grad(gy, z, FAST_SILU).to(dz.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_rows(grad_xn, x, mean, rstd, dx, xn_out, rows, rows_ok, dims, D, stride_x, stride_dx, stride_xn,
                         STORE_NORMED: tl.constexpr):
    """dx of LayerNorm (no affine) from dL/dLN(x) (fp32 tile); STORE_NORMED: also writes LN(x) in the
    matmul dtype (for the weight gradient)."""
    mask = rows_ok[:, None] & (dims[None, :] < D)
    xt = tl.load(x + _row_offsets(rows, stride_x)[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (xt - mean[:, None]) * rstd[:, None], 0.0)
    if STORE_NORMED:
        tl.store(xn_out + _row_offsets(rows, stride_xn)[:, None] + dims[None, :], xhat.to(xn_out.dtype.element_ty),
                 mask=mask)
    grad_xn = tl.where(mask, grad_xn, 0.0)
    mean_grad = tl.sum(grad_xn, axis=1) / D
    mean_grad_xhat = tl.sum(grad_xn * xhat, axis=1) / D
    grad_x = (grad_xn - mean_grad[:, None] - xhat * mean_grad_xhat[:, None]) * rstd[:, None]
    tl.store(dx + _row_offsets(rows, stride_dx)[:, None] + dims[None, :], grad_x.to(dx.dtype.element_ty), mask=mask)


@triton.jit
def _input_bwd_fused_kernel(x, w, pre, grad_y, mean_in, rstd_in, dz, dx, xn_out, L, D, E,
                            stride_x, stride_w, stride_p, stride_gy, stride_gyn, stride_dz, stride_dx, stride_xn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            LOAD_PRE: tl.constexpr, FAST_SILU: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Narrow rows (D <= BLOCK_D): per row block, for each BLOCK_N columns of W: z (recomputed or read),
    dz (written for dW), dLN(x) += dz @ W^T in registers; then the LayerNorm backward."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    dims = tl.arange(0, BLOCK_D)
    dims_ok = dims < D
    mean = tl.load(mean_in + rows, mask=rows_ok, other=0.0)
    rstd = tl.load(rstd_in + rows, mask=rows_ok, other=0.0)
    x_mask = rows_ok[:, None] & dims_ok[None, :]
    xt = tl.load(x + _row_offsets(rows, stride_x)[:, None] + dims[None, :], mask=x_mask, other=0.0).to(tl.float32)
    normed = tl.where(x_mask, (xt - mean[:, None]) * rstd[:, None], 0.0).to(w.dtype.element_ty)
    grad_xn = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    gy_rows = _row_offsets(rows, stride_gy)
    dz_rows = _row_offsets(rows, stride_dz)
    for n0 in range(0, E, BLOCK_N):
        cols_n = n0 + tl.arange(0, BLOCK_N)
        cols_ok = cols_n < E
        mask = rows_ok[:, None] & cols_ok[None, :]
        w_tile = tl.load(w + dims[:, None] * stride_w + cols_n[None, :], mask=dims_ok[:, None] & cols_ok[None, :],
                         other=0.0)
        if LOAD_PRE:
            z = tl.load(pre + _row_offsets(rows, stride_p)[:, None] + cols_n[None, :], mask=mask,
                        other=0.0).to(tl.float32)
        else:
            z = tl.dot(normed, w_tile, input_precision=DOT_PRECISION)
        gy = tl.load(grad_y + gy_rows[:, None] + cols_n[None, :] * stride_gyn, mask=mask, other=0.0).to(tl.float32)
        grad_z = tl.where(mask, _silu_grad(gy, z, FAST_SILU), 0.0).to(w.dtype.element_ty)
        tl.store(dz + dz_rows[:, None] + cols_n[None, :], grad_z, mask=mask)
        grad_xn = tl.dot(grad_z, tl.trans(w_tile), grad_xn, input_precision=DOT_PRECISION)
    _layer_norm_bwd_rows(grad_xn, x, mean, rstd, dx, xn_out, rows, rows_ok, dims, D, stride_x, stride_dx, stride_xn,
                         True)


@triton.jit
def _layer_norm_bwd_kernel(grad_xn, x, mean_in, rstd_in, dx, L, D, stride_g, stride_x, stride_dx,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ALIGN: tl.constexpr):
    """Wide rows: the LayerNorm backward of dLN(x) = dz @ W^T computed by cuBLAS."""
    D = known_multiple(D, ALIGN)
    stride_g = known_multiple(stride_g, ALIGN)
    stride_x = known_multiple(stride_x, ALIGN)
    stride_dx = known_multiple(stride_dx, ALIGN)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_ok = rows < L
    dims = tl.arange(0, BLOCK_D)
    mask = rows_ok[:, None] & (dims[None, :] < D)
    g = tl.load(grad_xn + _row_offsets(rows, stride_g)[:, None] + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(mean_in + rows, mask=rows_ok, other=0.0)
    rstd = tl.load(rstd_in + rows, mask=rows_ok, other=0.0)
    _layer_norm_bwd_rows(g, x, mean, rstd, dx, dx, rows, rows_ok, dims, D, stride_x, stride_dx, 0, False)


# --------------------------------------------------------------------------------------------
# Launch plans (cached per shape: at the model's sizes host time per launch sets the pace)
# --------------------------------------------------------------------------------------------
def output_projection(dim: int, width: int) -> str:
    """The projection the output side uses for model width ``dim`` (D) and gate width ``width`` (H*dv)."""
    return "fused" if max(dim, width) <= FUSED_OUTPUT_MAX_WIDTH else "cublas"


def keep_preactivation(dim: int) -> bool:
    """Whether the input side keeps SiLU's input for its backward (else it recomputes it)."""
    return dim >= KEEP_PREACTIVATION_MIN_DIM


def input_normalization(dim: int) -> str:
    """Where the input side normalises x of model width ``dim``: in the matmul's prologue, or in a kernel of its own."""
    return "prologue" if dim <= PROLOGUE_INPUT_MAX_DIM else "kernel"


def _normed_width(dim: int) -> int:
    """Row width of the stored LN(x): D zero-padded to a multiple of NORMED_ALIGN, so that the matmuls
    reading it load unmasked 16-element vectors (at D = 50 the 100-byte rows would load two bytes at a
    time and stall their software pipeline)."""
    return cdiv(dim, NORMED_ALIGN) * NORMED_ALIGN


def _padded_width(width: int) -> int:
    """Gated row width: the values, the ones column, zero padding to ROW_ALIGN."""
    return aligned_width(width + 1)


def _load_width(width: int, *rows: torch.Tensor) -> int:
    """Columns the gate kernels read from each of ``rows`` (unit column stride, at least one row):
    ``width`` rounded up to ROW_ALIGN where every row stride is a multiple of ROW_ALIGN and the storage
    holds the padding (``aligned_rows``, or u followed by v in the STU projection), else ``width``."""
    load = aligned_width(width)
    if load == width:
        return width
    for t in rows:
        if t.stride(0) % ROW_ALIGN or t.stride(0) < load:
            return width
        end = t.storage_offset() + (t.shape[0] - 1) * t.stride(0) + load
        if end * t.element_size() > t.untyped_storage().nbytes():
            return width
    return load


# Block sizes below: registers and spills from an AOT compile for sm_90 (kernel notes), about 16 fp32
# values a thread per row tile. The gate on padded rows (the model's layout) takes at most 16 rows a
# program: 11% less fwd+bwd time than 32 at width 50 in a profiler sweep on an H100 (kernel notes).
PADDED_GATE_MAX_ROWS = 16


@functools.lru_cache(maxsize=1024)
def _row_plan(rows: int, width: int, max_rows: int = 64) -> tuple[tuple[int], dict]:
    """Row kernels (gate forward/backward, LayerNorm forward/backward): whole rows, about 2048
    elements and at most ``max_rows`` rows a program."""
    block = block_dim(width)
    if KERNELS_INTERPRETED:  # few, large programs: the interpreter's cost is per program and per nested call
        block_m = max(1, min(64, 4096 // block))
        return (cdiv(rows, block_m),), dict(BLOCK_M=block_m, num_warps=4)
    block_m = max(1, min(max_rows, 2048 // block))
    return (cdiv(rows, block_m),), dict(BLOCK_M=block_m, num_warps=4 if block <= 512 else 8)


def _gate_plan(rows: int, width: int, load: int) -> tuple[tuple[int], dict]:
    """The gate kernels' row plan: ``_row_plan``, capped at PADDED_GATE_MAX_ROWS rows where ``load`` > width
    columns (padded rows) are read."""
    return _row_plan(rows, width, PADDED_GATE_MAX_ROWS) if load > width else _row_plan(rows, width)


@functools.lru_cache(maxsize=1024)
def _fused_output_plan(dim: int, width: int, dtype: torch.dtype) -> dict:
    """The fused projection's tiles: [BLOCK_M, BLOCK_K] gate rows in registers, W whole as one [BLOCK_D, BLOCK_K]
    tile. fp32 (``dtype``, the matmul's) takes half the rows, as its IEEE dots hold more registers."""
    block_m = 16 if KERNELS_INTERPRETED or dtype == torch.float32 else FUSED_OUTPUT_ROWS
    return dict(BLOCK_M=block_m, BLOCK_K=block_dim(width), BLOCK_D=block_dim(dim),
                num_warps=4 if KERNELS_INTERPRETED else FUSED_OUTPUT_WARPS)


@functools.lru_cache(maxsize=1024)
def _input_tile_plan(rows: int, dim: int, cols: int, dtype: torch.dtype, normalized: bool) -> tuple[tuple[int], dict]:
    """Tiles of the input side's forward and dz kernels: [BLOCK_M, BLOCK_N] outputs, x or LN(x) read in
    BLOCK_D chunks (``normalized``: LN(x) given in the matmul dtype, else x normalised in the prologue)."""
    if KERNELS_INTERPRETED:
        cfg = dict(BLOCK_M=64, BLOCK_N=min(64, block_dim(cols)), BLOCK_D=min(32, block_dim(dim)), num_warps=4,
                   num_stages=1)
    elif dtype == torch.float32:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_D=min(32, block_dim(dim)), num_warps=4, num_stages=2)
    elif not normalized:
        cfg = dict(BLOCK_M=64, BLOCK_N=min(128, block_dim(cols)), BLOCK_D=min(128, block_dim(dim)), num_warps=8,
                   num_stages=2)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_N=min(128, block_dim(cols)), BLOCK_D=min(64, block_dim(dim)), num_warps=8,
                   num_stages=3)
    grid = (cdiv(rows, cfg["BLOCK_M"]) * cdiv(cols, cfg["BLOCK_N"]),)
    return grid, dict(cfg, GROUP_M=8)


@functools.lru_cache(maxsize=1024)
def _fused_input_backward_plan(rows: int, dim: int, cols: int) -> tuple[tuple[int], dict]:
    """Narrow rows: a [BLOCK_M, BLOCK_D] block of x and of dLN(x) in registers, W in [BLOCK_D, BLOCK_N] tiles."""
    block_d = block_dim(dim)
    if KERNELS_INTERPRETED:
        cfg = dict(BLOCK_M=64, BLOCK_N=min(32, block_dim(cols)), num_warps=4, num_stages=1)
    else:
        cfg = dict(BLOCK_M=max(16, min(64, 8192 // block_d)), BLOCK_N=min(64, block_dim(cols)), num_warps=8,
                   num_stages=2)
    return (cdiv(rows, cfg["BLOCK_M"]),), dict(cfg, BLOCK_D=block_d)


def _use_fast_silu(dtype: torch.dtype) -> bool:
    """tanh.approx SiLU for bf16 on the GPU (error far under bf16 rounding); exact elsewhere."""
    return dtype == torch.bfloat16 and not KERNELS_INTERPRETED


def _dropout_args(seed: Optional[torch.Tensor], dropout_p: float, rows: int, width: int) -> tuple:
    """(the smallest draw kept, 1 / (1 - p), HAS_DROPOUT, WIDE_COUNTERS); no dropout without a seed."""
    if seed is None:
        return 0, 1.0, False, False
    return *kernel_dropout_args(dropout_p), True, dropout_counters_wide(rows, width)


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    """The kernels step rows by a stride and columns by one element."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


@functools.lru_cache(maxsize=None)
def _addmm_takes_fp32_input(device: torch.device, mm_dtype: torch.dtype) -> bool:
    """Whether this torch's cuBLAS addmm adds an fp32 input to a 16-bit product (``out_dtype``);
    torch versions differ, so it is tried once per device."""
    if device.type != "cuda":
        return False
    try:
        a = torch.zeros(16, 16, dtype=mm_dtype, device=device)
        torch.addmm(torch.zeros(16, 16, device=device), a, a, out_dtype=torch.float32)
    except (RuntimeError, TypeError):
        return False
    return True


def _project_with_residual(x: torch.Tensor, gated: torch.Tensor, weight_ext: torch.Tensor) -> torch.Tensor:
    """x + gated @ weight_ext^T by cuBLAS, the residual as addmm's input (beta = 1) where the dtypes allow."""
    if x.dtype == gated.dtype:
        return torch.addmm(x, gated, weight_ext.t())
    if x.dtype == torch.float32 and _addmm_takes_fp32_input(x.device, gated.dtype):
        return torch.addmm(x, gated, weight_ext.t(), out_dtype=torch.float32)
    return torch.add(x, torch.mm(gated, weight_ext.t()))  # promotes to the output dtype


def _extended_weight(weight: torch.Tensor, bias: Optional[torch.Tensor], padded: int) -> torch.Tensor:
    """[W | b | 0] of shape [D, padded] in W's dtype: W^T with the bias row for the ones column."""
    extended = torch.nn.functional.pad(weight, (0, padded - weight.shape[1]))
    if bias is not None:
        extended[:, weight.shape[1]] = bias
    return extended


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------
def gate_forward(attn, u, seed, dropout_p: float, eps: float, out_dtype: torch.dtype, padded: int = 0):
    """Dropout(LayerNorm(attn) * u) -> [L, padded or K] in out_dtype (with ``padded``: the ones column
    and zero padding after the K values)."""
    rows, width = attn.shape
    gated = (torch.empty((rows, padded), dtype=out_dtype, device=attn.device) if padded
             else aligned_rows(rows, width, out_dtype, attn.device))
    if rows == 0:
        return gated
    attn, u = _unit_column_stride(attn), _unit_column_stride(u)
    load = _load_width(width, attn, u)
    keep_from, scale, has_dropout, wide = _dropout_args(seed, dropout_p, rows, width)
    grid, constants = _gate_plan(rows, width, load)
    _gate_fwd_kernel[grid](
        attn, u, attn if seed is None else seed, gated, rows, width, attn.stride(0), u.stride(0), gated.stride(0),
        (padded - width) if padded else 0, eps, keep_from, scale,
        BLOCK_K=block_dim(width), HAS_DROPOUT=has_dropout, WIDE_COUNTERS=wide,
        ALIGN=row_alignment(load, attn.stride(0), u.stride(0), gated.stride(0)), LOAD_K=0 if load == width else load,
        **constants,
    )
    return gated


def gate_backward(grad, attn, u, seed, dropout_p: float, eps: float):
    """dL/dattn, dL/du of the gate from dL/dgated [L, >= K] (any row stride)."""
    rows, width = attn.shape
    dattn, du = aligned_rows(rows, width, attn.dtype, attn.device), aligned_rows(rows, width, u.dtype, u.device)
    if rows == 0:
        return dattn, du
    grad, attn, u = _unit_column_stride(grad), _unit_column_stride(attn), _unit_column_stride(u)
    load = _load_width(width, grad, attn, u)
    keep_from, scale, has_dropout, wide = _dropout_args(seed, dropout_p, rows, width)
    grid, constants = _gate_plan(rows, width, load)
    _gate_bwd_kernel[grid](
        grad, attn, u, attn if seed is None else seed, dattn, du, rows, width, grad.stride(0), attn.stride(0),
        u.stride(0), dattn.stride(0), du.stride(0), eps, keep_from, scale,
        BLOCK_K=block_dim(width), HAS_DROPOUT=has_dropout, WIDE_COUNTERS=wide,
        ALIGN=row_alignment(load, grad.stride(0), attn.stride(0), u.stride(0), dattn.stride(0), du.stride(0)),
        LOAD_K=0 if load == width else load, **constants,
    )
    return dattn, du


def output_forward(x, attn, u, weight, bias, seed, dropout_p: float, eps: float, projection: str, keep_gated: bool):
    """x + Dropout(LayerNorm(attn) * u) @ weight^T + bias, weight in the matmul dtype
    -> (out in x's dtype promoted with the matmul's, gated rows [L, padded K] for the backward's weight
    gradient; the fused projection stores none, [0, padded K], without ``keep_gated``)."""
    rows, width = attn.shape
    dim = x.shape[1]
    padded = _padded_width(width)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    if projection == "cublas":
        gated = gate_forward(attn, u, seed, dropout_p, eps, weight.dtype, padded)
        if rows == 0:
            return x.new_empty((0, dim), dtype=out_dtype), gated
        return _project_with_residual(x, gated, _extended_weight(weight, bias, padded)), gated
    gated = torch.empty((rows if keep_gated else 0, padded), dtype=weight.dtype, device=attn.device)
    out = torch.empty((rows, dim), dtype=out_dtype, device=x.device)
    if rows == 0:
        return out, gated
    x, attn, u = _unit_column_stride(x), _unit_column_stride(attn), _unit_column_stride(u)
    load = _load_width(width, attn, u)
    keep_from, scale, has_dropout, wide = _dropout_args(seed, dropout_p, rows, width)
    constants = _fused_output_plan(dim, width, weight.dtype)
    _output_fwd_kernel[(cdiv(rows, constants["BLOCK_M"]),)](
        x, attn, u, attn if seed is None else seed, weight, x if bias is None else bias, gated, out, rows, dim, width,
        x.stride(0), attn.stride(0), u.stride(0), weight.stride(0), gated.stride(0), out.stride(0), padded - width,
        eps, keep_from, scale, HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, WIDE_COUNTERS=wide,
        DOT_PRECISION=dot_precision(weight.dtype),
        ALIGN=row_alignment(load, attn.stride(0), u.stride(0), gated.stride(0)), LOAD_K=0 if load == width else load,
        ALIGN_D=row_alignment(dim, x.stride(0), out.stride(0)), STORE_GATED=keep_gated, **constants,
    )
    return out, gated


def _grad_gated_in_one_kernel(grad_out, weight, weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(dout in the matmul dtype, or None without ``weight_grad``; dgated = dout @ W in padded rows) from one
    pass over dout (``_output_grad_gated_kernel``), where W [D, H*dv] fits one tile."""
    rows, (dim, width) = grad_out.shape[0], weight.shape
    grad_out = _unit_column_stride(grad_out)
    grad_gated = aligned_rows(rows, width, weight.dtype, grad_out.device)
    store_grad_mm = weight_grad and grad_out.dtype != weight.dtype
    grad_mm = torch.empty((rows, dim), dtype=weight.dtype, device=grad_out.device) if store_grad_mm else grad_out
    constants = _fused_output_plan(dim, width, weight.dtype)
    _output_grad_gated_kernel[(cdiv(rows, constants["BLOCK_M"]),)](
        grad_out, weight, grad_mm, grad_gated, rows, dim, width, grad_out.stride(0), weight.stride(0),
        grad_mm.stride(0), grad_gated.stride(0), STORE_GRAD_MM=store_grad_mm, DOT_PRECISION=dot_precision(weight.dtype),
        ALIGN_D=row_alignment(dim, grad_out.stride(0), grad_mm.stride(0)), STORE_K=grad_gated.stride(0), **constants,
    )
    return (grad_mm if weight_grad else None), grad_gated


def output_backward(grad_out, attn, u, weight, gated, seed, dropout_p: float, eps: float, weight_grad: bool):
    """Both projections' backward: dgated = dout @ W (one Triton kernel where W fits one tile, else dout's
    cast and cuBLAS), the gate's backward kernel, cuBLAS [dW | db] = dout^T @ [gated | 1] -> (dattn, du,
    [dW | db | 0] of shape [D, padded K] in the matmul dtype, or [0, 0] without ``weight_grad``)."""
    rows, width = attn.shape
    dim = weight.shape[0]
    if max(dim, width) <= FUSED_OUTPUT_WIDTH_LIMIT and rows > 0:
        grad_mm, grad_gated = _grad_gated_in_one_kernel(grad_out, weight, weight_grad)
    else:
        grad_mm = grad_out.to(weight.dtype)
        grad_gated = torch.mm(grad_mm, weight, out=aligned_rows(rows, width, weight.dtype, grad_mm.device))
    dattn, du = gate_backward(grad_gated, attn, u, seed, dropout_p, eps)
    if not weight_grad:
        return dattn, du, weight.new_empty((0, 0))
    return dattn, du, torch.mm(grad_mm.t(), gated)


def input_forward(x, weight, eps: float, keep_pre: bool, normalization: str):
    """SiLU(LayerNorm(x) @ weight) in weight's (the matmul) dtype -> (out, mean [L], rstd [L] in fp32,
    pre-activation [L, E] if ``keep_pre`` else [0], LN(x) [L, D] in the matmul dtype if ``normalization``
    is "kernel" else [0])."""
    rows, dim = x.shape
    cols = weight.shape[1]
    dtype = weight.dtype
    out = torch.empty((rows, cols), dtype=dtype, device=x.device)
    mean = torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    pre = torch.empty((rows, cols) if keep_pre else (0,), dtype=dtype, device=x.device)
    by_kernel = normalization == "kernel"
    normed = torch.empty((rows, _normed_width(dim)) if by_kernel else (0,), dtype=dtype, device=x.device)
    if rows == 0:
        return out, mean, rstd, pre, normed
    if cols == 0:  # nothing to project, and a backward of zeros
        return out, mean.zero_(), rstd.zero_(), pre, normed.zero_()
    x = _unit_column_stride(x)
    if by_kernel:
        grid, constants = _row_plan(rows, dim)
        _layer_norm_fwd_kernel[grid](
            x, normed, mean, rstd, rows, dim, normed.shape[1], x.stride(0), normed.stride(0), eps,
            BLOCK_D=block_dim(dim), ALIGN=row_alignment(dim, x.stride(0), normed.stride(0)), **constants,
        )
    source = normed if by_kernel else x
    grid, constants = _input_tile_plan(rows, dim, cols, dtype, by_kernel)
    _input_fwd_kernel[grid](
        source, weight, out, pre, mean, rstd, rows, source.shape[1], dim, cols, source.stride(0), weight.stride(0),
        out.stride(0), pre.stride(0) if keep_pre else 0, eps,
        NORMALIZE=not by_kernel, STORE_PRE=keep_pre, FAST_SILU=_use_fast_silu(dtype), DOT_PRECISION=dot_precision(dtype),
        ALIGN=row_alignment(cols, weight.stride(0), out.stride(0), pre.stride(0) if keep_pre else 0), **constants,
    )
    return out, mean, rstd, pre, normed


def input_backward(grad_y, x, weight, mean, rstd, pre, normed, keep_pre: bool, normalization: str, weight_grad: bool):
    """-> (dx in x's dtype, dW [D, E] in weight's dtype, or [0, 0] without ``weight_grad``). ``normed``:
    LN(x) from the forward ("kernel" normalisation) or [0]."""
    rows, dim = x.shape
    cols = weight.shape[1]
    dtype = weight.dtype
    dx = torch.empty((rows, dim), dtype=x.dtype, device=x.device)
    if rows == 0 or cols == 0:
        return dx.zero_(), (weight.new_zeros(weight.shape) if weight_grad else weight.new_empty((0, 0)))
    x = _unit_column_stride(x)
    dz = torch.empty((rows, cols), dtype=dtype, device=x.device)
    fast_silu, precision = _use_fast_silu(dtype), dot_precision(dtype)
    pre_stride = pre.stride(0) if keep_pre else 0
    if normalization == "prologue":
        normed = torch.empty((rows, dim), dtype=dtype, device=x.device)
        grid, constants = _fused_input_backward_plan(rows, dim, cols)
        _input_bwd_fused_kernel[grid](
            x, weight, pre, grad_y, mean, rstd, dz, dx, normed, rows, dim, cols, x.stride(0), weight.stride(0),
            pre_stride, grad_y.stride(0), grad_y.stride(1), dz.stride(0), dx.stride(0), normed.stride(0),
            LOAD_PRE=keep_pre, FAST_SILU=fast_silu, DOT_PRECISION=precision, **constants,
        )
    else:
        grid, constants = _input_tile_plan(rows, dim, cols, dtype, True)
        _input_dz_kernel[grid](
            normed, weight, pre, grad_y, dz, rows, normed.shape[1], dim, cols, normed.stride(0), weight.stride(0),
            pre_stride, grad_y.stride(0), grad_y.stride(1), dz.stride(0),
            LOAD_PRE=keep_pre, FAST_SILU=fast_silu, DOT_PRECISION=precision,
            ALIGN=row_alignment(cols, weight.stride(0), pre_stride, grad_y.stride(0), dz.stride(0)), **constants,
        )
        grad_normed = torch.mm(dz, weight.t())
        grid, constants = _row_plan(rows, dim)
        _layer_norm_bwd_kernel[grid](
            grad_normed, x, mean, rstd, dx, rows, dim, grad_normed.stride(0), x.stride(0), dx.stride(0),
            BLOCK_D=block_dim(dim), ALIGN=row_alignment(dim, grad_normed.stride(0), x.stride(0), dx.stride(0)),
            **constants,
        )
    return dx, (torch.mm(normed[:, :dim].t(), dz) if weight_grad else weight.new_empty((0, 0)))


# --------------------------------------------------------------------------------------------
# torch.library custom ops (torch.compile sees opaque ops with fake shapes and a registered VJP)
# --------------------------------------------------------------------------------------------
def _output_fwd(
    x: torch.Tensor, attn: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    seed: Optional[torch.Tensor], dropout_p: float, eps: float, projection: str, keep_gated: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return output_forward(x, attn, u, weight, bias, seed, dropout_p, eps, projection, keep_gated)


def _output_fwd_fake(x, attn, u, weight, bias, seed, dropout_p, eps, projection, keep_gated):
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    gated_rows = attn.shape[0] if projection == "cublas" or keep_gated else 0
    return (x.new_empty((x.shape[0], x.shape[1]), dtype=out_dtype),
            attn.new_empty((gated_rows, _padded_width(attn.shape[1])), dtype=weight.dtype))


def _output_bwd(
    grad_out: torch.Tensor, attn: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, gated: torch.Tensor,
    seed: Optional[torch.Tensor], dropout_p: float, eps: float, weight_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return output_backward(grad_out, attn, u, weight, gated, seed, dropout_p, eps, weight_grad)


def _output_bwd_fake(grad_out, attn, u, weight, gated, seed, dropout_p, eps, weight_grad):
    grad_ext = weight.new_empty((weight.shape[0], gated.shape[1]) if weight_grad else (0, 0))
    return (aligned_rows(*attn.shape, attn.dtype, attn.device), aligned_rows(*u.shape, u.dtype, u.device), grad_ext)


def _output_setup_context(ctx, inputs, output):
    x, attn, u, weight, bias, seed, dropout_p, eps, projection, keep_gated = inputs
    _, gated = output
    ctx.mark_non_differentiable(gated)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(attn, u, weight, gated, seed)
    ctx.dropout_p, ctx.eps = dropout_p, eps
    ctx.x_dtype = x.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


def _output_gradients(ctx, grad_outputs, backward):
    grad_out = grad_outputs[0]
    attn, u, weight, gated, seed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    if grad_out is None:
        return (None,) * 10
    weight_grad = bool(needs[3] or needs[4])
    dattn, du, grad_ext = backward(grad_out, attn, u, weight, gated, seed, ctx.dropout_p, ctx.eps, weight_grad)
    width = attn.shape[1]
    return (grad_out.to(ctx.x_dtype) if needs[0] else None,
            dattn if needs[1] else None,
            du if needs[2] else None,
            grad_ext[:, :width] if needs[3] else None,
            grad_ext[:, width].to(ctx.bias_dtype) if needs[4] else None,
            None, None, None, None, None)


_output = autograd_custom_op(
    "attention_output", forward=_output_fwd, forward_fake=_output_fwd_fake, backward=_output_bwd,
    backward_fake=_output_bwd_fake, setup_context=_output_setup_context, gradients=_output_gradients,
)


def _input_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float, keep_pre: bool, normalization: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return input_forward(x, weight, eps, keep_pre, normalization)


def _input_fwd_fake(x, weight, eps, keep_pre, normalization):
    rows, dim, cols = x.shape[0], x.shape[1], weight.shape[1]
    stats = x.new_empty((rows,), dtype=torch.float32)
    return (x.new_empty((rows, cols), dtype=weight.dtype), stats, stats.new_empty((rows,)),
            x.new_empty((rows, cols) if keep_pre else (0,), dtype=weight.dtype),
            x.new_empty((rows, _normed_width(dim)) if normalization == "kernel" else (0,), dtype=weight.dtype))


def _input_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
               pre: torch.Tensor, normed: torch.Tensor, keep_pre: bool, normalization: str, weight_grad: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    return input_backward(grad_y, x, weight, mean, rstd, pre, normed, keep_pre, normalization, weight_grad)


def _input_bwd_fake(grad_y, x, weight, mean, rstd, pre, normed, keep_pre, normalization, weight_grad):
    return x.new_empty(x.shape), weight.new_empty(weight.shape if weight_grad else (0, 0))


def _input_setup_context(ctx, inputs, output):
    x, weight, eps, keep_pre, normalization = inputs
    _, mean, rstd, pre, normed = output
    ctx.mark_non_differentiable(mean, rstd, pre, normed)
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(x, weight, mean, rstd, pre, normed)
    ctx.keep_pre, ctx.normalization = keep_pre, normalization


def _input_gradients(ctx, grad_outputs, backward):
    grad_y = grad_outputs[0]
    if grad_y is None:
        return None, None, None, None, None
    x, weight, mean, rstd, pre, normed = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dx, dweight = backward(grad_y, x, weight, mean, rstd, pre, normed, ctx.keep_pre, ctx.normalization, bool(needs[1]))
    return (dx if needs[0] else None), (dweight if needs[1] else None), None, None, None


_input = autograd_custom_op(
    "attention_input", forward=_input_fwd, forward_fake=_input_fwd_fake, backward=_input_bwd,
    backward_fake=_input_bwd_fake, setup_context=_input_setup_context, gradients=_input_gradients,
)


def _gate_fwd(attn: torch.Tensor, u: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float, eps: float
              ) -> torch.Tensor:
    return gate_forward(attn, u, seed, dropout_p, eps, torch.promote_types(attn.dtype, u.dtype))


def _gate_fwd_fake(attn, u, seed, dropout_p, eps):
    return aligned_rows(*attn.shape, torch.promote_types(attn.dtype, u.dtype), attn.device)


def _gate_bwd(grad: torch.Tensor, attn: torch.Tensor, u: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float,
              eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return gate_backward(grad, attn, u, seed, dropout_p, eps)


def _gate_bwd_fake(grad, attn, u, seed, dropout_p, eps):
    return aligned_rows(*attn.shape, attn.dtype, attn.device), aligned_rows(*u.shape, u.dtype, u.device)


def _gate_setup_context(ctx, inputs, output):
    attn, u, seed, dropout_p, eps = inputs
    ctx.save_for_backward(attn, u, seed)
    ctx.dropout_p, ctx.eps = dropout_p, eps


def _gate_gradients(ctx, grad_outputs, backward):
    attn, u, seed = ctx.saved_tensors
    dattn, du = backward(grad_outputs[0], attn, u, seed, ctx.dropout_p, ctx.eps)
    return dattn, du, None, None, None


_gate = autograd_custom_op(
    "attention_gate", forward=_gate_fwd, forward_fake=_gate_fwd_fake, backward=_gate_bwd,
    backward_fake=_gate_bwd_fake, setup_context=_gate_setup_context, gradients=_gate_gradients,
)


# --------------------------------------------------------------------------------------------
# The Triton backends of hstu_kernels.attention_input / attention_output (through the registry)
# --------------------------------------------------------------------------------------------
def _matmul_dtype(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype the reference's matmul runs in: autocast's where it is on, else ``dtype``."""
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
    if dtype == torch.bfloat16 and KERNELS_INTERPRETED:
        raise RuntimeError("attention_layernorm.py: bfloat16 matmuls (autocast) cannot run under TRITON_INTERPRET, "
                           "which computes bfloat16 wrongly; use float16 or float32 there")
    return dtype


def _dropout_seed(dropout_p: float, training: bool, seed, device) -> Optional[torch.Tensor]:
    """The seed tensor of an active dropout (drawn on the device when None), else None."""
    if not training or dropout_p == 0.0:
        return None
    return draw_seed(device) if seed is None else seed_tensor(seed, device)


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
) -> torch.Tensor:
    """x + Dropout(LayerNorm(attn) * u) @ weight.T + bias on Triton (inputs checked by the caller)."""
    return attention_output_with(x, attn, u, weight, bias, dropout_p=dropout_p, training=training, eps=eps, seed=seed)


def attention_output_with(x, attn, u, weight, bias, *, dropout_p: float, training: bool, eps: float = 1e-6,
                          seed=None, projection: str | None = None) -> torch.Tensor:
    """``attention_output`` with the projection forced ("fused" or "cublas"; None: ``output_projection``)."""
    if projection is None:
        projection = output_projection(x.shape[1], attn.shape[1])
    elif projection not in PROJECTIONS:
        raise ValueError(f"attention_layernorm.py: projection must be one of {PROJECTIONS}, got {projection!r}")
    elif projection == "fused" and max(x.shape[1], attn.shape[1]) > FUSED_OUTPUT_WIDTH_LIMIT:
        raise ValueError(f"attention_layernorm.py: the fused projection takes D and H*dv <= "
                         f"{FUSED_OUTPUT_WIDTH_LIMIT}, got D = {x.shape[1]}, H*dv = {attn.shape[1]}")
    mm_dtype = _matmul_dtype(x.device.type, torch.promote_types(attn.dtype, u.dtype))
    seed = _dropout_seed(dropout_p, training, seed, attn.device)
    # The gated rows serve the weight gradient alone: inference and a frozen projection need none.
    keep_gated = torch.is_grad_enabled() and (weight.requires_grad or (bias is not None and bias.requires_grad))
    out, _ = _output(x, attn, u, weight.to(mm_dtype).contiguous(), bias, seed,
                     float(dropout_p) if seed is not None else 0.0, float(eps), projection, keep_gated)
    return out


def attention_input(x: torch.Tensor, weight: torch.Tensor, *, eps: float = 1e-6) -> torch.Tensor:
    """SiLU(LayerNorm(x) @ weight) on Triton (inputs checked by the caller)."""
    return attention_input_with(x, weight, eps=eps)


def attention_input_with(x, weight, *, eps: float = 1e-6, keep_pre: bool | None = None,
                         normalization: str | None = None) -> torch.Tensor:
    """``attention_input`` with the pre-activation kept (True) or recomputed (False) in the backward,
    and x normalised in the matmul's "prologue" or by a LayerNorm "kernel" (None: the per-shape rules
    ``keep_preactivation`` and ``input_normalization``)."""
    if keep_pre is None:
        keep_pre = keep_preactivation(x.shape[1])
    if normalization is None:
        normalization = input_normalization(x.shape[1])
    elif normalization not in NORMALIZATIONS:
        raise ValueError(f"attention_layernorm.py: normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    elif normalization == "prologue" and x.shape[1] > PROLOGUE_INPUT_DIM_LIMIT:
        raise ValueError(f"attention_layernorm.py: the prologue normalisation takes D <= {PROLOGUE_INPUT_DIM_LIMIT}, "
                         f"got {x.shape[1]}")
    mm_dtype = _matmul_dtype(x.device.type, x.dtype)
    out, *_ = _input(x, weight.to(mm_dtype).contiguous(), float(eps), bool(keep_pre), normalization)
    return out


def attention_gate(attn: torch.Tensor, u: torch.Tensor, *, dropout_p: float, training: bool, eps: float = 1e-6,
                   seed=None) -> torch.Tensor:
    """Dropout(LayerNorm(attn) * u) alone, in attn's and u's promoted dtype: the output side's
    element-wise part, which the benchmark times on its own."""
    seed = _dropout_seed(dropout_p, training, seed, attn.device)
    return _gate(attn, u, seed, float(dropout_p) if seed is not None else 0.0, float(eps))


def unsupported_reason(tensors: Sequence[torch.Tensor]) -> str | None:
    """Why the Triton kernels cannot run on (x, weight) of the input side or (x, attn, u, weight) of
    the output side; None when they can."""
    for t in tensors:
        if t.dtype not in SUPPORTED_DTYPES:
            return f"dtype {t.dtype} is not supported (float16, bfloat16, float32)"
        if t.dtype == torch.bfloat16 and KERNELS_INTERPRETED:
            return "bfloat16 under TRITON_INTERPRET (the interpreter computes bf16 wrongly)"
    normalized = tensors[0] if len(tensors) == 2 else tensors[1]  # x (input side) or attn (output side)
    width = normalized.shape[-1]
    if not 1 <= width <= MAX_WIDTH:
        return f"LayerNorm width {width} outside [1, {MAX_WIDTH}] (a row is held whole in registers)"
    return None
