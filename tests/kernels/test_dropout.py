"""The seeded dropout shared by the operators: the mask's definition bit for bit against Triton's Philox and
the kernels' tile helper, statistics, errors."""
import pytest
import torch

try:
    import triton
    import triton.language as tl

    from hstu_kernels.triton.common import dropout_draws, dropout_keep
except ImportError:  # the reference tests run without Triton
    triton = None

from hstu_kernels.dropout import draw_seed, dropout, keep_threshold, philox_uniform, seed_tensor, seeded_dropout_mask

f64 = torch.float64
WIDTHS = (1, 3, 4, 5, 50, 64, 257)
SEEDS = (0, 7, 2**33 + 5, 2**63 - 1)
needs_triton = pytest.mark.skipif(triton is None, reason="needs triton")

if triton is not None:

    @triton.jit
    def _store_definition_kernel(out_ptr, seed, numel, width, BLOCK: tl.constexpr):
        """The mask's uniforms element by element: half col % 2 of word (col % 8) // 2 of tl.randint4x at the
        column group, over 2^16."""
        index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        row, col = index // width, index % width
        w0, w1, w2, w3 = tl.randint4x(seed, row * ((width + 7) // 8) + col // 8)
        slot = col % 8
        word = tl.where(slot < 2, w0, tl.where(slot < 4, w1, tl.where(slot < 6, w2, w3)))
        draw = tl.where(slot % 2 == 0, word & 0xFFFF, word >> 16)
        tl.store(out_ptr + index, draw.to(tl.float32) / 65536.0, mask=index < numel)

    @triton.jit
    def _store_tiles_kernel(seed_ptr, out_ptr, first_row, rows, width, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                            WIDE_COUNTERS: tl.constexpr):
        local = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        col_start = tl.program_id(1) * BLOCK_C
        cols = col_start + tl.arange(0, BLOCK_C)
        draws = dropout_draws(seed_ptr, first_row + local, col_start, width, BLOCK_C, WIDE_COUNTERS)
        tl.store(out_ptr + local[:, None] * width + cols[None, :], draws.to(tl.float32) / 65536.0,
                 mask=(local[:, None] < rows) & (cols[None, :] < width))

    @triton.jit
    def _store_keep_kernel(seed_ptr, out_ptr, num_rows, width, threshold, BLOCK_M: tl.constexpr,
                           BLOCK_C: tl.constexpr):
        rows = tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        keep = dropout_keep(seed_ptr, rows, 0, width, threshold, BLOCK_C, False)
        tl.store(out_ptr + rows[:, None] * width + cols[None, :], keep.to(tl.int8),
                 mask=(rows[:, None] < num_rows) & (cols[None, :] < width))


@needs_triton
def test_seeded_mask_is_a_16_bit_half_of_randint4x_at_the_column_group(device):
    """The definition, written out element by element with Triton's own generator: element (r, c) of a
    [rows, width] tensor takes half c % 2 (low, then high) of word (c % 8) // 2 of tl.randint4x(seed,
    r * ceil(width / 8) + c // 8), over 2^16. Every width class: below 8, multiples of 8, others."""
    rows = 5
    for width in WIDTHS:
        for seed in SEEDS:
            expected = torch.full((rows, width), float("nan"), device=device)
            grid = (triton.cdiv(rows * width, 2048),)
            _store_definition_kernel[grid](expected, seed, rows * width, width, BLOCK=2048)
            assert torch.equal(philox_uniform(seed, rows, width, device), expected), f"width {width}, seed {seed}"
            keep = seeded_dropout_mask((rows, width), 0.5, seed, device)
            assert torch.equal(keep, expected >= 0.5), f"width {width}, seed {seed}"


def _store_tiles(seed, rows, width, first_row, block_c, wide, device, block_m=4):
    """Rows first_row .. first_row + rows - 1 of a [*, width] tensor as uniforms of dropout_draws (the
    kernels' shared helper), in [block_m, block_c] tiles over a 2-d grid."""
    out = torch.full((rows, width), float("nan"), device=device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(width, block_c))
    _store_tiles_kernel[grid](seed_tensor(seed, device), out, first_row, rows, width, BLOCK_M=block_m,
                              BLOCK_C=block_c, WIDE_COUNTERS=wide)
    return out


@needs_triton
@pytest.mark.parametrize("width", WIDTHS)
def test_kernel_tile_helper_matches_the_reference_bit_for_bit(width, device):
    """dropout_draws (the kernels' shared helper) against the reference: column blocks of 8, 16 and
    64 (several blocks per row where the width allows), rows over two programs, int32 and int64
    counters, seeds above 2^32."""
    for seed, block_c, wide in ((7, 8, False), (2**33 + 5, 16, True), (2**63 - 1, 64, False)):
        got = _store_tiles(seed, 6, width, 0, block_c, wide, device)
        assert torch.equal(got, philox_uniform(seed, 6, width, device)), f"seed {seed}, BLOCK_C {block_c}"


@needs_triton
def test_kernel_tile_helper_with_counters_past_2_31(device):
    """Rows far down a tall tensor (counters r * ceil(width / 8) + c // 8 past 2^31 and 2^32, so the
    counter's high word is not 0) without allocating it: the kernel and the reference both start at a row."""
    for width, first_row in ((50, 2**31 // 7 - 2), (3, 2**32 + 1), (257, 3 * 2**32 // 33 + 5), (4, 2**40)):
        for seed in (11, 2**40 + 3):
            got = _store_tiles(seed, 6, width, first_row, 16, True, device)
            assert torch.equal(got, philox_uniform(seed, 6, width, device, first_row=first_row)), (width, first_row)


@needs_triton
def test_negative_tensor_seeds_are_read_as_uint64_by_kernel_and_reference(device):
    """A tensor seed is any int64: its bits are the key, as Triton's generator reads them. A negative seed's sign
    bits must not reach the key's high word (they give uniforms below 0 and a mask unlike the kernel's)."""
    for seed in (-1, -12345, -(2**63), -(2**40) - 3):
        got = _store_tiles(torch.tensor(seed), 6, 50, 0, 16, False, device)
        expected = philox_uniform(torch.tensor(seed), 6, 50, device)
        assert torch.equal(got, expected), seed
        assert 0.0 <= expected.min() and expected.max() < 1.0, seed


@pytest.mark.gpu
@needs_triton
def test_compiled_tile_helper_matches_the_reference_on_the_gpu():
    """The helper as the GPU compiler lays out its interleave, in kernel-sized tiles, against the reference."""
    for block_c in (8, 16, 64, 256):
        for first_row, wide in ((0, False), (2**32 // 3, True)):
            for width in WIDTHS + (1024,):
                got = _store_tiles(2**40 + 1, 300, width, first_row, block_c, wide, "cuda", block_m=32)
                expected = philox_uniform(2**40 + 1, 300, width, "cuda", first_row=first_row)
                assert torch.equal(got, expected), (block_c, first_row, width)


def test_reference_rows_do_not_depend_on_where_the_block_starts():
    """philox_uniform(first_row=k) is rows k.. of the tensor."""
    whole = philox_uniform(5, 40, 50)
    assert torch.equal(philox_uniform(5, 13, 50, first_row=27), whole[27:])


@needs_triton
def test_launchers_take_int64_counters_from_2_31_groups():
    from hstu_kernels.triton.common import dropout_counters_wide

    assert not dropout_counters_wide(2**31 // 7 - 1, 50) and dropout_counters_wide(2**31 // 7 + 1, 50)
    assert not dropout_counters_wide(2**31 - 1, 3) and dropout_counters_wide(2**31, 1)


def test_philox_custom_op_registration():
    """philox_uniform is an opaque custom op for torch.compile: its fake (meta) kernel must agree with it."""
    torch.library.opcheck(torch.ops.hstu_kernels.philox_uniform.default,
                          (torch.tensor(5), 3, 7, 50, torch.device("cpu")))


def test_philox_uniform_is_uniform_and_seed_dependent():
    u = philox_uniform(3, 2000, 100)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float((u < 0.2).float().mean()) - 0.2) < 0.005
    assert not torch.equal(u[:10], philox_uniform(4, 10, 100))
    assert torch.equal(u[:10], philox_uniform(3, 10, 100))


def test_seeded_mask_keep_rate_and_the_eight_draws_of_a_group():
    """~1e5 elements at p = 0.3: the keep rate overall and in each column class c % 8 (each a different
    half of a Philox word) within 5 binomial standard deviations of 0.7; pairs of a group's draws are kept
    together as often as independent draws would be, and coincide no more often than independent 16-bit
    draws (expected 28 pairs x 12,000 groups / 2^16 = 5.1; a half copied into another would give 12,000)."""
    p, rows, width = 0.3, 1000, 96
    keep = seeded_dropout_mask((rows, width), p, 2**35 + 9).double()
    for sample in (keep, *(keep[:, slot::8] for slot in range(8))):
        n = sample.numel()
        assert abs(float(sample.mean()) - (1 - p)) <= 5 * ((1 - p) * p / n) ** 0.5
    u = philox_uniform(2**35 + 9, rows, width).reshape(rows, width // 8, 8)
    n = rows * width // 8
    coincidences = 0
    for a in range(8):
        for b in range(a + 1, 8):
            coincidences += int((u[..., a] == u[..., b]).sum())
            both = float((keep[:, a::8] * keep[:, b::8]).mean())
            assert abs(both - (1 - p) ** 2) <= 5 * ((1 - p) ** 2 * (1 - (1 - p) ** 2) / n) ** 0.5, (a, b)
    assert coincidences <= 5.1 + 5 * 5.1 ** 0.5


def test_keep_threshold_is_the_float32_comparison_of_the_uniform():
    """draw >= keep_threshold(p) iff draw / 2^16 >= p as float32, at every 16-bit draw: p on and between
    multiples of 2^-16, p whose float32 rounding crosses one, 0 and 1."""
    draws = torch.arange(2**16, dtype=torch.int64)
    for p in (0.0, 0.1, 0.2, 0.3, 1 / 3, 0.5, 0.75, 2**-16, 3 * 2**-16, 2**-16 * (1 + 2**-30), 0.99999, 1.0):
        p32 = torch.tensor(p, dtype=torch.float32)
        assert torch.equal(draws >= keep_threshold(p), draws.to(torch.float32) / 2**16 >= p32), p


@needs_triton
@pytest.mark.parametrize("p", [0.1, 0.5, 1 / 3])
def test_kernel_keep_matches_the_reference_mask(p, device):
    """dropout_keep, as the kernels call it with keep_threshold(p), keeps exactly seeded_dropout_mask's elements."""
    rows, width = 5, 50
    out = torch.full((rows, width), -1, dtype=torch.int8, device=device)
    _store_keep_kernel[(1,)](seed_tensor(21, device), out, rows, width, keep_threshold(p), BLOCK_M=8, BLOCK_C=64)
    assert torch.equal(out.bool(), seeded_dropout_mask((rows, width), p, 21, device))


def test_seeded_mask_views_any_shape_as_rows_of_its_last_dimension():
    assert torch.equal(seeded_dropout_mask((2, 3, 50), 0.5, 9), seeded_dropout_mask((6, 50), 0.5, 9).reshape(2, 3, 50))
    assert torch.equal(seeded_dropout_mask((), 0.5, 9), seeded_dropout_mask((1, 1), 0.5, 9).reshape(()))
    assert seeded_dropout_mask((0, 5), 0.5, 9).shape == (0, 5) and seeded_dropout_mask((3, 0), 0.5, 9).shape == (3, 0)
    x = torch.tensor(2.0, dtype=f64)
    assert dropout(x, 0.5, training=True, seed=9).shape == ()


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_seeded_dropout_scales_kept_and_zeroes_dropped(p):
    x = torch.rand(64, 50, dtype=f64) + 1.0
    out = dropout(x, p, training=True, seed=11)
    keep = seeded_dropout_mask(x.shape, p, 11)
    torch.testing.assert_close(out, torch.where(keep, x / (1 - p), torch.zeros_like(x)))
    assert abs(float(keep.float().mean()) - (1 - p)) < 0.03


def test_dropout_identity_cases_and_unseeded_statistics():
    x = torch.rand(100, 100) + 1.0
    assert dropout(x, 0.5, training=False, seed=None) is x
    assert dropout(x, 0.0, training=True, seed=3) is x
    assert torch.equal(dropout(x, 1.0, training=True, seed=3), torch.zeros_like(x))
    leaf = x.clone().requires_grad_()
    dropout(leaf, 1.0, training=True, seed=3).sum().backward()  # p = 1 keeps the graph, as F.dropout does
    assert torch.equal(leaf.grad, torch.zeros_like(x))
    out = dropout(x, 0.3, training=True, seed=None)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.03
    torch.testing.assert_close(out[kept], x[kept] / 0.7)


def test_dropout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dropout_p must be in"):
        dropout(torch.ones(3), 1.5, training=True, seed=None)
    with pytest.raises(ValueError, match="seed must be in"):
        dropout(torch.ones(3), 0.5, training=True, seed=-1)
    with pytest.raises(ValueError, match="first_row must be >= 0"):
        philox_uniform(1, 3, 4, first_row=-1)


def test_tensor_seed_gives_the_int_seed_mask_and_draw_seed_varies():
    """Training passes int64 device tensors (CUDA-graph safe); they must define the same mask as ints."""
    for seed in (0, 12345, 2**40 + 3):
        assert torch.equal(philox_uniform(torch.tensor(seed), 5, 100), philox_uniform(seed, 5, 100))
    torch.manual_seed(0)
    seeds = {int(draw_seed("cpu")) for _ in range(20)}
    assert len(seeds) == 20 and all(0 <= s < 2**62 for s in seeds)
    with pytest.raises(ValueError, match="one int64 value"):
        dropout(torch.ones(3), 0.5, training=True, seed=torch.tensor([1, 2]))


def test_seeded_dropout_traces_with_a_tensor_seed_without_graph_breaks():
    """A tensor seed flows through torch.compile without a host read (fullgraph) or a recompile per seed."""
    compiled = torch.compile(lambda x, s: dropout(x, 0.5, True, s), backend="eager", fullgraph=True)
    x = torch.ones(64)
    for seed in (1, 2):
        torch.testing.assert_close(compiled(x, torch.tensor(seed)), dropout(x, 0.5, True, seed))


@pytest.mark.gpu
def test_int_seeds_and_the_masks_constants_make_no_host_sync():
    """An int seed and the reference mask's float32 constants are fills on the device: a seeded call, the
    reference's or a Triton operator's, never waits for the GPU (a host-to-device copy would)."""
    import hstu_kernels

    x, weight = torch.randn(300, 50, device="cuda"), torch.randn(50, 50, device="cuda")
    items, positions = torch.randn(40, 50, device="cuda"), torch.randn(200, 50, device="cuda")
    ids, times = torch.randint(0, 40, (300,), device="cuda"), torch.arange(300, device="cuda") * 60
    offsets = torch.tensor([0, 120, 300], device="cuda")
    backends = ("reference", "triton") if triton is not None else ("reference",)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        seed_tensor(2**40 + 3, "cuda")
        dropout(x, 0.2, True, 5)
        for backend in backends:
            hstu_kernels.attention_output(x, x, x, weight, None, dropout_p=0.2, training=True, seed=5,
                                          backend=backend)
            hstu_kernels.sequence_fusion(ids, times, offsets, items, positions, [], scale=1.0, time_scales=[],
                                         dropout_p=0.2, training=True, seed=5, backend=backend, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
