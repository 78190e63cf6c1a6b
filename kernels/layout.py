"""Row-aligned layouts: [rows, width] views of rows padded to a multiple of ROW_ALIGN elements.

The Triton attention writes its output this way and the LayerNorm gate reads and writes it, so that at
widths such as 50 every row starts on a 16-byte boundary and the kernels move 16 bytes an access.
The layout depends on the width alone, so fake kernels match it. Free of Triton, for the benchmark
cases and tests that build the model's layout.
"""
from __future__ import annotations

import torch

ROW_ALIGN = 8  # elements: 16 bytes in bf16 and fp16


def aligned_width(width: int) -> int:
    """The row stride of an aligned [rows, width] view: ``width`` rounded up to ROW_ALIGN."""
    return -(-width // ROW_ALIGN) * ROW_ALIGN


def aligned_rows(rows: int, width: int, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised [rows, width] view of rows of ``aligned_width(width)`` elements."""
    return torch.empty((rows, aligned_width(width)), dtype=dtype, device=device)[:, :width]
