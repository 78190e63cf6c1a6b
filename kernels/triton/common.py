"""Triton pieces shared by the operators' kernels: element-wise math, the seeded dropout draw, table
reads, tile loads, jagged spans, and the host-side integer helpers of the launchers.

``KERNELS_INTERPRETED`` is settled at import: Triton picks interpreter or compiler when a kernel is
defined, and the launchers choose block sizes (and whether PTX inline assembly may be used) from it.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hstu_kernels.manager import interpreter_active

KERNELS_INTERPRETED = interpreter_active()
NEG_LOG2_E = tl.constexpr(-1.4426950408889634)


# --------------------------------------------------------------------------------------------
# Element-wise math
# --------------------------------------------------------------------------------------------
@triton.jit
def sigmoid(x, FAST_SILU: tl.constexpr):
    """sigmoid(x) in fp32; FAST_SILU uses one tanh.approx (one special-function op instead of two)."""
    if FAST_SILU:
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [0.5 * x], dtype=tl.float32, is_pure=True, pack=1
        )
        sig = 0.5 + 0.5 * t
    else:
        sig = 1.0 / (1.0 + tl.exp2(x * NEG_LOG2_E))
    return sig


@triton.jit
def silu(x, FAST_SILU: tl.constexpr):
    """SiLU(x) = x * sigmoid(x) in fp32; FAST_SILU: h + h * tanh(h), h = x / 2 (one tanh.approx)."""
    if FAST_SILU:
        half = 0.5 * x
        t = tl.inline_asm_elementwise(
            "tanh.approx.f32 $0, $1;", "=r,r", [half], dtype=tl.float32, is_pure=True, pack=1
        )
        y = half + half * t
    else:
        y = x / (1.0 + tl.exp2(x * NEG_LOG2_E))
    return y


@triton.jit
def log2(x, PTX_MATH: tl.constexpr):
    """log2 of positive x; on the GPU one lg2.approx (abs. error ~2^-22)."""
    if PTX_MATH:
        y = tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)
    else:
        y = tl.log2(x)
    return y


# --------------------------------------------------------------------------------------------
# Seeded dropout
# --------------------------------------------------------------------------------------------
@triton.jit
def dropout_draws(seed_ptr, rows, col_start, width, BLOCK_C: tl.constexpr, WIDE_COUNTERS: tl.constexpr):
    """int32 [rows, BLOCK_C] 16-bit draws of the seeded dropout mask (``hstu_kernels.dropout``) for columns
    col_start .. col_start + BLOCK_C - 1 of a [*, width] tensor.

    col_start and BLOCK_C must be multiples of 8: each group of eight columns is one Philox evaluation
    (``tl.randint4x`` at counter row * ceil(width / 8) + col // 8), the low and high halves of its four
    words spread back to columns in order. Columns past ``width`` get draws that belong to no element.
    WIDE_COUNTERS: int64 counters, needed once rows * ceil(width / 8) reaches 2^31; below that int32
    counters give the same numbers (the counter's high word is 0 either way).
    """
    tl.static_assert(BLOCK_C % 8 == 0, "dropout_draws: BLOCK_C must be a multiple of 8")
    seed = tl.load(seed_ptr)
    groups = (width + 7) // 8
    group_cols = col_start // 8 + tl.arange(0, BLOCK_C // 8)
    if WIDE_COUNTERS:
        counters = rows.to(tl.int64)[:, None] * groups + group_cols[None, :]
    else:
        counters = rows[:, None] * groups + group_cols[None, :]
    w0, w1, w2, w3 = tl.randint4x(seed, counters)
    # interleave(a, b) alternates a, b along the last axis: the outer pair gives a group's w0, w1, w2, w3
    # (their low halves, then their high halves), the last one low, high, low, high.
    low = tl.interleave(tl.interleave(w0 & 0xFFFF, w2 & 0xFFFF), tl.interleave(w1 & 0xFFFF, w3 & 0xFFFF))
    high = tl.interleave(tl.interleave(w0 >> 16, w2 >> 16), tl.interleave(w1 >> 16, w3 >> 16))
    return tl.interleave(low, high).to(tl.int32)


@triton.jit
def dropout_keep(seed_ptr, rows, col_start, width, threshold, BLOCK_C: tl.constexpr, WIDE_COUNTERS: tl.constexpr):
    """bool [rows, BLOCK_C]: which elements the seeded mask keeps, draw >= ``threshold``
    (``hstu_kernels.dropout.keep_threshold`` of p); columns as ``dropout_draws``."""
    return dropout_draws(seed_ptr, rows, col_start, width, BLOCK_C, WIDE_COUNTERS) >= threshold


def dropout_counters_wide(rows: int, width: int) -> bool:
    """Whether ``dropout_draws`` needs int64 counters for a [rows, width] tensor."""
    return rows * cdiv(width, 8) >= 2**31


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------
@triton.jit
def gather(table, index, PTX_MATH: tl.constexpr):
    """table[index]: element-wise reads of a small read-only table (fp32 / int32 / int64) at int32 indices.

    On the GPU an opaque ``ld.global.nc`` whose address is formed inside the asm from the scalar
    base: the software pipeliner would otherwise turn these gathers into 4-byte async copies that
    bypass L1 (measured ~20x slower attention forward), and a tile of 64-bit addresses would cost two
    registers per element.
    """
    if PTX_MATH:
        base = table + tl.zeros_like(index)  # the same address in every element: one register pair
        if table.dtype.element_ty == tl.int64:
            x = tl.inline_asm_elementwise(
                "{ .reg .u64 a; mad.wide.s32 a, $2, 8, $1; ld.global.nc.b64 $0, [a]; }", "=l,l,r",
                [base, index], dtype=tl.int64, is_pure=True, pack=1)
        else:
            x = tl.inline_asm_elementwise(
                "{ .reg .u64 a; mad.wide.s32 a, $2, 4, $1; ld.global.nc.b32 $0, [a]; }", "=r,l,r",
                [base, index], dtype=table.dtype.element_ty, is_pure=True, pack=1)
    else:
        x = tl.load(table + index)
    return x


@triton.jit
def known_multiple(value, MULTIPLE: tl.constexpr):
    """``value``, a scalar the launcher knows to be a multiple of MULTIPLE, rewritten so that the
    compiler knows it too. Triton notes only divisibility by 16 of integer arguments, and
    ``tl.multiple_of`` leaves scalars unmarked; a row stride and width known to be even let 16-bit rows
    load and store two elements an instruction instead of one (``row_alignment``)."""
    return value // MULTIPLE * MULTIPLE


@triton.jit
def load_tile(ptrs, rows_ok, cols, D: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr):
    """Load a [rows, BLOCK_D] tile, zero-filled outside rows_ok (if CHECK_ROWS) and past column D.

    Masks are only emitted where needed: a column mask on a power-of-2 width would stop the loads
    from being vectorised.
    """
    if CHECK_ROWS:
        if D == BLOCK_D:
            x = tl.load(ptrs, mask=rows_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs, mask=rows_ok[:, None] & (cols[None, :] < D), other=0.0)
    else:
        if D == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < D, other=0.0)
    return x


@triton.jit
def sequence_span(seq_offsets, batch):
    """(first token, as int64 for row offsets; length, as int32) of jagged sequence ``batch``."""
    seq_start = tl.load(seq_offsets + batch).to(tl.int64)
    seq_len = (tl.load(seq_offsets + batch + 1).to(tl.int64) - seq_start).to(tl.int32)
    return seq_start, seq_len


# --------------------------------------------------------------------------------------------
# Launcher helpers (plain ints: Triton's ``cdiv`` and ``next_power_of_2`` cost microseconds a call
# on the host in recent versions, as much as a small kernel)
# --------------------------------------------------------------------------------------------
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_dim(d: int, minimum: int = 16) -> int:
    """The power-of-2 tile width (at least ``minimum``) that holds ``d`` columns."""
    return max(minimum, 1 << (d - 1).bit_length())


def row_alignment(*values: int, cap: int = 16) -> int:
    """The largest power of two, at most ``cap`` (a power of two), that divides every value: the
    MULTIPLE for ``known_multiple`` of a row kernel's width and row strides (at width 50 it is 2)."""
    return math.gcd(cap, *values)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision: IEEE fp32 where fp32 is promised (TF32 off), else TF32."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
