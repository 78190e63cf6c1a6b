"""The aligned-row layout shared by the attention's output and the LayerNorm gate."""
import torch

from hstu_kernels.layout import ROW_ALIGN, aligned_rows, aligned_width


def test_aligned_rows_start_every_row_on_16_bytes_and_keep_the_width():
    for width in [1, 7, 8, 9, 25, 50, 56, 64, 100, 257]:
        stride = aligned_width(width)
        assert stride % ROW_ALIGN == 0 and width <= stride < width + ROW_ALIGN, width
        for dtype in (torch.float16, torch.bfloat16):
            view = aligned_rows(5, width, dtype, "cpu")
            assert view.shape == (5, width) and view.stride() == (stride, 1)
            assert (view.stride(0) * view.element_size()) % 16 == 0
            assert view.untyped_storage().nbytes() == 5 * stride * view.element_size()
    assert aligned_rows(0, 50, torch.float32, "cpu").shape == (0, 50)
