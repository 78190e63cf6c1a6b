"""Operator hierarchical_sequence_fusion: the reference against a token-by-token loop, seeded dropout,
gradcheck, torch.compile, and the public function's input checks; then the Triton backend (both
backwards) against the float64 reference, its dropout mask, determinism, custom ops, torch.compile,
autocast, dispatch, and on the GPU the target shapes and CUDA-graph capture."""
import argparse
import importlib
import math
from dataclasses import dataclass

import pytest
import torch
from cases import deterministic_algorithms, offsets_of
from cases import needs_triton as needs_triton_for
from hypothesis import given
from hypothesis import strategies as st
from searchsorted_views import SearchsortedDroppingViewOffsets
from test_hstu_attention import assert_within_rule

import hstu_kernels
from hstu_kernels.dropout import seeded_dropout_mask
from hstu_kernels.manager import TritonOperatorManager
from hstu_kernels.ops.sequence_fusion import build_bench_case
from hstu_kernels.reference.sequence_fusion import sequence_fusion

f64 = torch.float64


def sequence_fusion_by_loop(item_ids, timestamps, lengths, item_table, pos_table, time_tables, scale, time_scales, from_end):
    """One token at a time, time differences in Python ints."""
    rows, start = [], 0
    ids, stamps = item_ids.tolist(), timestamps.tolist()
    for length in lengths:
        last = start + length - 1
        for t in range(start, start + length):
            position = last - t if from_end else t - start
            row = item_table[ids[t]].double() * scale + pos_table[position].double()
            for (width, num_buckets), table in zip(time_scales, time_tables):
                row = row + table[min((stamps[last] - stamps[t]) // width, num_buckets - 1)].double()
            rows.append(row)
        start += length
    return torch.stack(rows) if rows else torch.zeros(0, item_table.shape[1], dtype=f64)


def fusion_inputs(lengths, dim, num_items, max_len, time_scales, dtype=f64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    item_ids = torch.randint(0, num_items, (total,), generator=gen)
    # Unix-second timestamps, sorted within each sequence, with ties, beyond float32's exact range.
    gaps = torch.randint(0, 4, (total,), generator=gen) * torch.randint(0, 50_000, (total,), generator=gen)
    timestamps = 1_700_000_000 + gaps.cumsum(0)
    tables = [torch.randn(n, dim, generator=gen, dtype=dtype) for _, n in time_scales]
    return (
        item_ids, timestamps, offsets_of(lengths),
        torch.randn(num_items, dim, generator=gen, dtype=dtype), torch.randn(max_len, dim, generator=gen, dtype=dtype), tables,
    )


def test_sequence_fusion_hand_computed():
    # D = 1 so every term is visible: item i embeds to 10 * i, position p to 100 * p, time bucket b to 1000 * b.
    item_table = torch.tensor([[0.0], [10.0], [20.0], [30.0]], dtype=f64)
    pos_table = torch.tensor([[0.0], [100.0], [200.0]], dtype=f64)
    time_table = torch.tensor([[0.0], [1000.0], [2000.0]], dtype=f64)  # width 60 s, 3 buckets
    item_ids = torch.tensor([3, 1, 2, 2])
    timestamps = torch.tensor([0, 100, 170, 5000])  # sequences [3, 1, 2] (t_last 170) | [] | [2]
    offsets = torch.tensor([0, 3, 3, 4])
    common = dict(scale=2.0, time_scales=[(60, 3)], dropout_p=0.0, training=False)
    out = sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, [time_table], **common)
    # ages 170, 70, 0 -> buckets min(2, 2) = 2, 1, 0; the lone item has age 0.
    expected = [60 + 0 + 2000, 20 + 100 + 1000, 40 + 200 + 0, 40 + 0 + 0]
    torch.testing.assert_close(out.flatten(), torch.tensor(expected, dtype=f64))
    from_end = sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, [time_table], position_from_end=True, **common)
    torch.testing.assert_close(from_end.flatten(), torch.tensor([60 + 200 + 2000, 20 + 100 + 1000, 40 + 0 + 0, 40.0], dtype=f64))


@pytest.mark.parametrize("time_scales", [[], [(3600, 24)], [(3600, 24), (86_400, 30), (604_800, 52)]])
@pytest.mark.parametrize("from_end", [False, True])
@pytest.mark.parametrize("lengths", [[0], [1], [0, 0], [1, 0, 1], [5, 0, 3, 1], [8]])
def test_sequence_fusion_matches_loop(time_scales, from_end, lengths):
    inputs = fusion_inputs(lengths, dim=4, num_items=7, max_len=8, time_scales=time_scales)
    out = sequence_fusion(*inputs, scale=2.0, time_scales=time_scales, dropout_p=0.5, training=False, position_from_end=from_end)
    item_ids, timestamps, _, item_table, pos_table, tables = inputs
    expected = sequence_fusion_by_loop(item_ids, timestamps, lengths, item_table, pos_table, tables, 2.0, time_scales, from_end)
    assert out.shape == (sum(lengths), 4)
    torch.testing.assert_close(out, expected)


@given(
    lengths=st.lists(st.integers(0, 6), min_size=1, max_size=6),
    from_end=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sequence_fusion_random_jagged(lengths, from_end, seed):
    time_scales = [(7, 3), (1000, 5)]
    inputs = fusion_inputs(lengths, dim=3, num_items=9, max_len=6, time_scales=time_scales, dtype=torch.float32, seed=seed)
    out = sequence_fusion(*inputs, scale=math.sqrt(3), time_scales=time_scales, dropout_p=0.0, training=True, position_from_end=from_end)
    item_ids, timestamps, _, item_table, pos_table, tables = inputs
    expected = sequence_fusion_by_loop(item_ids, timestamps, lengths, item_table, pos_table, tables, math.sqrt(3), time_scales, from_end)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_sequence_fusion_seeded_dropout():
    time_scales = [(60, 4)]
    inputs = fusion_inputs([3, 0, 2], dim=5, num_items=6, max_len=4, time_scales=time_scales)
    plain = sequence_fusion(*inputs, scale=1.5, time_scales=time_scales, dropout_p=0.25, training=False)
    dropped = sequence_fusion(*inputs, scale=1.5, time_scales=time_scales, dropout_p=0.25, training=True, seed=42)
    keep = seeded_dropout_mask(plain.shape, 0.25, 42)
    torch.testing.assert_close(dropped, torch.where(keep, plain / 0.75, torch.zeros_like(plain)))


@pytest.mark.parametrize("seed", [None, 4])
def test_sequence_fusion_gradcheck(seed):
    time_scales = [(10, 3), (100, 2)]
    _, _, offsets, item_table, pos_table, tables = fusion_inputs([3, 0, 1, 2], dim=3, num_items=5, max_len=3, time_scales=time_scales)
    item_ids = torch.tensor([1, 4, 1, 0, 2, 4])  # repeated ids: gradients must accumulate
    timestamps = torch.tensor([0, 15, 240, 7, 3, 50])
    p, training = (0.0, False) if seed is None else (0.3, True)

    def fn(item_table, pos_table, *tables):
        return sequence_fusion(
            item_ids, timestamps, offsets, item_table, pos_table, tables,
            scale=1.7, time_scales=time_scales, dropout_p=p, training=training, seed=seed,
        )

    leaves = [t.requires_grad_() for t in (item_table, pos_table, *tables)]
    assert torch.autograd.gradcheck(fn, leaves)


def test_sequence_fusion_empty_batch_has_gradients():
    item_table = torch.randn(4, 3, requires_grad=True)
    pos_table = torch.randn(2, 3, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    out = sequence_fusion(
        empty, empty, torch.tensor([0, 0]), item_table, pos_table, [], scale=1.0, time_scales=[], dropout_p=0.1, training=True
    )
    assert out.shape == (0, 3)
    out.sum().backward()
    assert torch.equal(item_table.grad, torch.zeros(4, 3))


def test_sequence_fusion_compiles_without_graph_breaks():
    time_scales = [(60, 4)]
    compiled = torch.compile(sequence_fusion, backend="aot_eager", fullgraph=True, dynamic=True)
    for lengths in ([3, 0, 2], [1, 4, 4, 0]):
        inputs = fusion_inputs(lengths, dim=5, num_items=6, max_len=4, time_scales=time_scales)
        kwargs = dict(scale=1.5, time_scales=time_scales, dropout_p=0.25, training=True, seed=3)
        torch.testing.assert_close(compiled(*inputs, **kwargs), sequence_fusion(*inputs, **kwargs))



def bench_case(shape, dtype, device):
    """The benchmark harness's case (scripts/bench_kernels.py) at ``shape``, as ``--call api-unchecked`` builds it."""
    return build_bench_case(shape, dtype, device, argparse.Namespace(seed=0, variant="", validate=False))


@pytest.mark.parametrize("shape", [(2560, 200, 16, 3706), (20_000, 1024, 16, 20_000)], ids=str)
def test_bench_case_reference_does_not_search_a_sliced_view(shape):
    """The harness's case at a tenth and a fiftieth of its target tokens. Where Inductor compiled the
    reference for the GPU with ``searchsorted`` over ``offsets[1:]``, the positions fell outside the
    position table (the compiled provider's device-side assert at 25600x200x50x3706)."""
    case = bench_case(shape, torch.float32, torch.device("cpu"))
    expected = case.call("reference")
    with SearchsortedDroppingViewOffsets():
        emulated = case.call("reference")
    assert torch.equal(emulated, expected)

@pytest.mark.parametrize(
    "change,message",
    [
        (dict(lengths=[5]), "a sequence of length 5 exceeds max_seq_len=4"),
        (dict(time_tables="short"), "1 time_tables for 2 time_scales"),
        (dict(time_tables="wrong_shape"), r"time_tables\[1\] must be \[5, 3\]"),
        (dict(timestamps="float"), "timestamps must be int64"),
        (dict(offsets="bad_end"), "seq_offsets must start at 0 and end at L=5"),
        (dict(item_ids="out_of_range"), r"item ids must lie in \[0, 9\)"),
        (dict(timestamps="beyond"), r"^sequence_fusion: timestamps holds 4611686018427387904, which lies outside "
                                    r"\[-2\*\*62, 2\*\*62\) seconds"),
        (dict(time_scales=[(0, 3), (1000, 5)]), r"time_scales\[0\] = \(0, 3\) needs width > 0"),
    ],
)
def test_sequence_fusion_errors(change, message):
    time_scales = change.get("time_scales", [(7, 3), (1000, 5)])
    lengths = change.get("lengths", [2, 3])
    good_scales = [(7, 3), (1000, 5)]
    item_ids, timestamps, offsets, item_table, pos_table, tables = fusion_inputs(lengths, 3, 9, 4, good_scales)
    if change.get("time_tables") == "short":
        tables = tables[:1]
    if change.get("time_tables") == "wrong_shape":
        tables = [tables[0], torch.zeros(4, 3, dtype=f64)]
    if change.get("timestamps") == "float":
        timestamps = timestamps.float()
    if change.get("timestamps") == "beyond":  # its gaps to the others could wrap int64
        timestamps = timestamps.clone()
        timestamps[-1] = 2**62
    if change.get("offsets") == "bad_end":
        offsets = torch.tensor([0, 2, 4])
    if change.get("item_ids") == "out_of_range":
        item_ids = item_ids.clone()
        item_ids[0] = 9
    with pytest.raises(ValueError, match=message):
        hstu_kernels.sequence_fusion(
            item_ids, timestamps, offsets, item_table, pos_table, tables, backend="reference",
            scale=1.0, time_scales=time_scales, dropout_p=0.0, training=False,
        )


# ---------------------------------------------------------------------------------------------
# Triton backend against the float64 reference
#
# Accuracy rule (as for the attention, ``assert_within_rule``): max|out - ref| <= 2 * max|out_torch - ref|
# + 1e-5 + one rounding step of the test dtype, ref the reference in float64 on the same (rounded)
# inputs, out_torch the reference in the test dtype. On CPU the kernels run in the interpreter at tiny
# shapes in fp32 and fp16; tests marked ``gpu`` run the target shapes and bf16.
# ---------------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
OP = "hierarchical_sequence_fusion"
TRITON_MODULE = "hstu_kernels.triton.sequence_fusion"
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
DIMS = [1, 3, 25] + ([50, 256, 300] if HAS_CUDA else [])
MAX_LEN = 64 if HAS_CUDA else 10
SCATTERS = ["sort", "atomic"]
HOUR_DAY_WEEK = ((3600, 24), (86_400, 30), (604_800, 52))


needs_triton = needs_triton_for(OP)


@dataclass(frozen=True)
class Problem:
    """One call, described by plain values so hypothesis can print a failing example."""

    lengths: tuple[int, ...]
    dim: int
    num_items: int
    max_len: int
    time_scales: tuple[tuple[int, int], ...] = ()
    from_end: bool = False
    dropout_p: float = 0.0
    training: bool = True
    dtype: torch.dtype = torch.float32
    scatter: str = "sort"
    timestamps: str = "increasing"  # "increasing", "bursts" (most events in the last bucket), "shuffled", "far"
    ids: str = "uniform"  # "uniform" or "hot" (three ids: long runs of equal keys)
    index_dtype: torch.dtype = torch.int64
    seed: int = 0


def problem_timestamps(lengths, kind: str, generator) -> torch.Tensor:
    parts = []
    for n in lengths:
        if kind == "bursts":  # a few events within the hour, the rest weeks earlier
            gaps = torch.where(torch.rand(n, generator=generator) < 0.8, torch.full((n,), 3_000_000),
                               torch.randint(0, 600, (n,), generator=generator))
        elif kind == "far":  # gaps up to 2^31 s: ages beyond int32, for scales whose last bucket starts there
            gaps = torch.randint(0, 2**31, (n,), generator=generator)
        else:
            magnitude = 10.0 ** torch.randint(0, 7, (n,), generator=generator).double()
            gaps = (torch.rand(n, generator=generator, dtype=f64) * magnitude).to(torch.int64)
        times = 1_700_000_000 + gaps.cumsum(0)
        if kind == "shuffled":
            times = times[torch.randperm(n, generator=generator)]
        parts.append(times)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def problem_inputs(p: Problem, dtype: torch.dtype, device=DEVICE):
    """(item_ids, timestamps, seq_offsets, item_table, pos_table, time_tables): values drawn in float64
    and rounded to ``p.dtype`` before the cast, so every run sees the same numbers."""
    g = torch.Generator().manual_seed(p.seed)
    total = sum(p.lengths)
    if p.ids == "hot":
        item_ids = torch.randint(0, min(3, p.num_items), (total,), generator=g)
    else:
        item_ids = torch.randint(0, p.num_items, (total,), generator=g)
    timestamps = problem_timestamps(p.lengths, p.timestamps, g)

    def table(rows):
        drawn = torch.randn(rows, p.dim, generator=g, dtype=f64)
        return drawn.to(p.dtype).to(dtype).to(device).requires_grad_()

    tables = [table(p.num_items), table(p.max_len)] + [table(n) for _, n in p.time_scales]
    return (item_ids.to(p.index_dtype).to(device), timestamps.to(device),
            offsets_of(list(p.lengths)).to(p.index_dtype).to(device), tables[0], tables[1], tables[2:])


def run(p: Problem, backend: str, dtype: torch.dtype, seed=None) -> dict[str, torch.Tensor]:
    """Output and every table's gradient for one backend (Triton with ``p.scatter``) in one dtype."""
    item_ids, timestamps, offsets, item_table, pos_table, time_tables = problem_inputs(p, dtype)
    kwargs = dict(scale=math.sqrt(p.dim), time_scales=list(p.time_scales), dropout_p=p.dropout_p,
                  training=p.training, seed=p.seed if seed is None else seed, position_from_end=p.from_end)
    if backend == "triton":
        module = importlib.import_module(TRITON_MODULE)
        out = module.sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, time_tables,
                                     scatter=p.scatter, **kwargs)
    else:
        out = hstu_kernels.sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, time_tables,
                                           backend=backend, **kwargs)
    g = torch.Generator().manual_seed(p.seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=f64).to(p.dtype).to(out.dtype).to(out.device)
    leaves = [item_table, pos_table, *time_tables]
    if out.requires_grad:
        grads = torch.autograd.grad(out, leaves, grad_out, allow_unused=True)
    else:  # the reference's dropout with p = 1 returns zeros outside the graph
        grads = [None] * len(leaves)
    grads = [torch.zeros_like(t) if grad is None else grad for t, grad in zip(leaves, grads)]
    names = ["item", "pos"] + [f"time{s}" for s in range(len(time_tables))]
    return {"out": out.detach(), **{f"grad_{name}": grad for name, grad in zip(names, grads)}}


def check_triton_against_reference(p: Problem):
    ref = run(p, "reference", f64)
    torch_same = run(p, "reference", p.dtype)
    got = run(p, "triton", p.dtype)
    assert got["out"].dtype == p.dtype
    for name in ref:
        assert got[name].dtype == p.dtype, f"{name}: dtype {got[name].dtype}, expected the tables' {p.dtype}"
        assert_within_rule(name, got[name], torch_same[name], ref[name])


@st.composite
def problems(draw, dtypes=tuple(TRITON_DTYPES), dims=tuple(DIMS), max_len=MAX_LEN):
    n = draw(st.integers(1, max_len))
    length = st.one_of(st.just(0), st.just(1), st.just(n), st.integers(0, n))
    time_scale = st.tuples(st.sampled_from([1, 7, 3600, 86_400, 10**6, 2**30]), st.integers(1, 6))
    dropout_p = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    return Problem(
        lengths=tuple(draw(st.lists(length, min_size=1, max_size=5))),
        dim=draw(st.sampled_from(dims)),
        num_items=draw(st.integers(1, 40)),
        max_len=n,
        time_scales=tuple(draw(st.lists(time_scale, max_size=4))),
        from_end=draw(st.booleans()),
        dropout_p=dropout_p,
        training=draw(st.booleans()) if dropout_p else True,
        dtype=draw(st.sampled_from(dtypes)),
        scatter=draw(st.sampled_from(SCATTERS)),
        timestamps=draw(st.sampled_from(["increasing", "bursts", "shuffled", "far"])),
        ids=draw(st.sampled_from(["uniform", "hot"])),
        index_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@needs_triton
@given(p=problems())
def test_triton_matches_reference_random_jagged(p: Problem):
    """Forward and every table's gradient over random jagged shapes, both backwards."""
    check_triton_against_reference(p)


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
def test_bench_case_variant_runs_the_scatter_it_names(scatter, monkeypatch):
    """The harness's ``--variant sort|atomic`` (checks on, as ``--call api`` builds it) runs that backward, with
    the reference's output and table gradients."""
    module = importlib.import_module(TRITON_MODULE)
    launched = []
    for name in ("_sort_backward", "_atomic_backward"):
        backward = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _name=name, _backward=backward, **k: (
            launched.append(_name), _backward(*a, **k))[1])
    shape = (40, 16, 5, 11)
    case = build_bench_case(shape, torch.float32, DEVICE, argparse.Namespace(seed=0, variant=scatter, validate=True))
    grad_out = torch.randn(shape[0], shape[2], generator=torch.Generator().manual_seed(1)).to(DEVICE)
    results = {}
    for backend in ("triton", "reference"):
        out = case.call(backend)
        grads = torch.autograd.grad(out, case.leaves, grad_out)
        results[backend] = (out, *grads)
    assert launched == [f"_{scatter}_backward"]
    for got, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
def test_triton_lengths_zero_one_and_full_with_three_time_scales(dtype, scatter):
    p = Problem((0, 1, 9, 0, 4, 9, 1), dim=25, num_items=13, max_len=9, time_scales=HOUR_DAY_WEEK, dropout_p=0.2,
                dtype=dtype, scatter=scatter, timestamps="bursts", seed=3)
    check_triton_against_reference(p)


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
@pytest.mark.parametrize("num_sequences", [65, 9000])
def test_triton_finds_sequences_among_thousands_mostly_empty(num_sequences, scatter):
    """A few hundred tokens in sequences of 1-9 among thousands of empty ones (empty ones first and last), so
    that tiles span many sequences and the search passes runs of equal offsets, and one sequence of 40 that
    holds whole tiles."""
    g = torch.Generator().manual_seed(num_sequences)
    lengths = torch.zeros(num_sequences, dtype=torch.int64)
    filled = torch.randperm(num_sequences - 2, generator=g)[:60] + 1
    lengths[filled] = torch.randint(1, 10, (60,), generator=g)
    lengths[num_sequences // 2] = 40  # whole tiles inside one sequence (16 tokens a tile at D = 25 on CPU)
    p = Problem(tuple(lengths.tolist()), dim=25, num_items=11, max_len=40, time_scales=HOUR_DAY_WEEK,
                dropout_p=0.2, from_end=num_sequences % 2 == 1, scatter=scatter, seed=5)
    check_triton_against_reference(p)


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
def test_triton_int64_ages_and_rows_wider_than_one_column_block(scatter):
    """A scale whose last bucket starts beyond 2^31 s (ages divided in int64) with ages up to 2^33 s,
    and D = 300: two column blocks in every kernel."""
    p = Problem((3, 0, 5), dim=300, num_items=4, max_len=5, time_scales=((2**30, 9), (86_400, 3)), dropout_p=0.3,
                scatter=scatter, timestamps="far", seed=8)
    check_triton_against_reference(p)


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
def test_triton_empty_batch(scatter):
    """No tokens (with and without sequences): an empty output and zero gradients."""
    for lengths in ((), (0, 0)):
        p = Problem(lengths, dim=3, num_items=4, max_len=2, time_scales=((60, 3),), dropout_p=0.5, scatter=scatter)
        got = run(p, "triton", torch.float32)
        assert got["out"].shape == (0, 3)
        for name, grad in got.items():
            assert name == "out" or torch.equal(grad, torch.zeros_like(grad)), name


@pytest.fixture
def small_segment_tiles(monkeypatch):
    """Row tiles of two entries, so that a few hundred tokens need three levels of the reduction."""
    module = importlib.import_module(TRITON_MODULE)
    monkeypatch.setattr(module, "SEGMENT_ELEMENTS", 32)
    module._segment_levels.cache_clear()
    yield module
    module._segment_levels.cache_clear()


@needs_triton
def test_triton_sort_backward_over_three_levels_with_hot_rows(small_segment_tiles):
    """Runs of equal keys spanning many chunks (three item ids, most tokens in one time bucket) are
    carried through every level of the segmented reduction; two runs give the same bits."""
    p = Problem((30, 0, 41, 1), dim=1, num_items=7, max_len=41, time_scales=((3600, 4), (60, 50)), dropout_p=0.25,
                scatter="sort", timestamps="bursts", ids="hot", seed=11)
    _, levels = small_segment_tiles._segment_levels(sum(p.lengths), p.dim, 4)
    assert len(levels) == 3, levels
    got, again = run(p, "triton", p.dtype), run(p, "triton", p.dtype)
    ref, torch_same = run(p, "reference", f64), run(p, "reference", p.dtype)
    for name in ref:
        assert torch.equal(got[name], again[name]), f"{name} differs between two runs"
        assert_within_rule(name, got[name], torch_same[name], ref[name])


def test_segment_levels_shrink_to_one_chunk():
    """Levels depend on shapes only; each passes two rows per chunk on, the last is a single chunk."""
    module = pytest.importorskip(TRITON_MODULE)
    for tokens in (1, 2, 63, 64, 65, 1000, 25_600, 1_000_000, 10**8):
        for dim in (1, 50, 256, 1024):
            block_r, levels = module._segment_levels(tokens, dim, 5)
            assert levels[0][0] == tokens and levels[-1][0] == levels[-1][1]
            for (entries, chunk), (next_entries, _) in zip(levels, levels[1:]):
                assert chunk < entries and next_entries == 2 * -(-entries // chunk) < entries
            assert block_r >= 2 and all(chunk >= block_r for _, chunk in levels[:-1])


@needs_triton
@pytest.mark.parametrize("from_end", [False, True])
def test_triton_dropout_mask_is_the_seeded_reference_mask(from_end):
    """Kept elements are the output without dropout / (1 - p) and dropped ones are 0, at exactly
    the elements of ``seeded_dropout_mask``; an int seed and the same seed as a tensor agree."""
    p = Problem((7, 0, 12, 1), dim=25, num_items=9, max_len=12, time_scales=((60, 4),), from_end=from_end,
                dropout_p=0.3, seed=5)
    module = importlib.import_module(TRITON_MODULE)
    item_ids, timestamps, offsets, item_table, pos_table, time_tables = problem_inputs(p, torch.float32)
    with torch.no_grad():
        for table in (item_table, pos_table, *time_tables):  # every fused value > 0: a zero means dropped
            table.abs_().add_(1.0)
        args = (item_ids, timestamps, offsets, item_table, pos_table, time_tables)
        kwargs = dict(scale=2.0, time_scales=list(p.time_scales), dropout_p=0.3, position_from_end=from_end)
        full = module.sequence_fusion(*args, training=False, **kwargs)
        dropped = module.sequence_fusion(*args, training=True, seed=77, **kwargs)
        from_tensor = module.sequence_fusion(*args, training=True, seed=torch.tensor(77, device=DEVICE), **kwargs)
    keep = seeded_dropout_mask(full.shape, 0.3, 77, DEVICE)
    assert torch.equal(dropped != 0, keep)
    torch.testing.assert_close(dropped, torch.where(keep, full / 0.7, torch.zeros_like(full)), rtol=1e-6, atol=0)
    assert torch.equal(dropped, from_tensor)


@needs_triton
def test_triton_unseeded_dropout_draws_a_new_mask_each_call():
    p = Problem((6, 3), dim=16, num_items=5, max_len=6, dropout_p=0.5)
    module = importlib.import_module(TRITON_MODULE)
    args = problem_inputs(p, torch.float32)
    with torch.no_grad():
        masks = [module.sequence_fusion(*args, scale=1.0, time_scales=[], dropout_p=0.5, training=True) != 0
                 for _ in range(2)]
    assert not torch.equal(masks[0], masks[1])


@needs_triton
def test_triton_deterministic_mode_sorts_writes_every_element_and_repeats_bitwise(monkeypatch):
    """Deterministic algorithms take the sort backward even when the atomic one is asked for. New
    memory is filled with NaN there, which poisons every output and scratch buffer the kernels
    allocate: each element must be written. Two runs give identical bits."""
    module = importlib.import_module(TRITON_MODULE)

    def atomic_backward(*args, **kwargs):
        raise AssertionError("the atomic backward ran in deterministic mode")

    monkeypatch.setattr(module, "_atomic_backward", atomic_backward)
    p = Problem((11, 0, 1, 20, 20), dim=25, num_items=6, max_len=20, time_scales=HOUR_DAY_WEEK, dropout_p=0.2,
                scatter="atomic", timestamps="bursts", ids="hot", seed=4)
    with deterministic_algorithms():
        first = run(p, "triton", p.dtype)
        second = run(p, "triton", p.dtype)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two deterministic runs"
    ref, torch_same = run(p, "reference", f64), run(p, "reference", p.dtype)
    for name in first:
        assert_within_rule(name, first[name], torch_same[name], ref[name])


@needs_triton
def test_default_scatter_is_atomic_unless_its_accumulators_outgrow_the_tokens():
    """fp32 tables take the atomics in their own gradients; a half-precision item table needs an fp32
    copy, allowed up to as many rows as tokens (extra memory O(L D))."""
    module = importlib.import_module(TRITON_MODULE)
    assert module.default_scatter(torch.empty(1000, 4), num_tokens=10) == "atomic"
    assert module.default_scatter(torch.empty(10, 4, dtype=torch.float16), num_tokens=10) == "atomic"
    assert module.default_scatter(torch.empty(11, 4, dtype=torch.float16), num_tokens=10) == "sort"


@needs_triton
def test_triton_without_a_named_scatter_runs_the_default_one(monkeypatch):
    module = importlib.import_module(TRITON_MODULE)

    def sort_backward(*args, **kwargs):
        raise AssertionError("the sort backward ran for fp32 tables")

    monkeypatch.setattr(module, "_sort_backward", sort_backward)
    item_ids, timestamps, offsets, item_table, pos_table, time_tables = problem_inputs(
        Problem((3, 0, 2), dim=3, num_items=4, max_len=3, time_scales=((60, 2),)), torch.float32)
    leaves = [t.detach().requires_grad_() for t in (item_table, pos_table, *time_tables)]
    out = module.sequence_fusion(item_ids, timestamps, offsets, leaves[0], leaves[1], leaves[2:], scale=1.0,
                                 time_scales=[(60, 2)], dropout_p=0.0, training=True)
    out.sum().backward()
    assert all(t.grad is not None for t in leaves)


@needs_triton
def test_triton_rejects_an_unknown_scatter():
    module = importlib.import_module(TRITON_MODULE)
    with pytest.raises(ValueError, match="scatter must be one of"):
        module.sequence_fusion(*problem_inputs(Problem((2,), 3, 4, 2), torch.float32), scale=1.0, time_scales=[],
                               dropout_p=0.0, training=False, scatter="scatter_add")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_triton_autocast_keeps_the_reference_output_dtype(dtype):
    """Embedding lookups are outside autocast's casting lists: the output keeps the tables' dtype
    (fp32 parameters give fp32) under autocast, as in the reference, and so do the gradients."""
    p = Problem((5, 0, 3), dim=16, num_items=6, max_len=5, time_scales=((60, 3),), dropout_p=0.1, dtype=dtype)
    autocast_dtype = torch.bfloat16 if HAS_CUDA else torch.float16
    with torch.autocast(DEVICE.type, dtype=autocast_dtype):
        got, torch_same = run(p, "triton", dtype), run(p, "reference", dtype)
    ref = run(p, "reference", f64)
    for name in ref:
        assert got[name].dtype == torch_same[name].dtype == dtype, name
        assert_within_rule(name, got[name], torch_same[name], ref[name])


@needs_triton
def test_triton_custom_ops_opcheck():
    """torch.library.opcheck on the forward and backward custom ops (schema, fake, autograd, AOT dispatch)."""
    importlib.import_module(TRITON_MODULE)
    ops = torch.ops.hstu_kernels
    for time_scales, p, scatters in (((), 0.0, ["sort"]), (((60, 3), (3600, 2)), 0.4, SCATTERS)):
        problem = Problem((4, 0, 1, 5), dim=3, num_items=5, max_len=5, time_scales=time_scales, timestamps="bursts")
        item_ids, timestamps, offsets, item_table, pos_table, time_tables = problem_inputs(problem, torch.float32)
        slots = time_tables + [None] * (4 - len(time_tables))
        seed = torch.tensor(3, device=DEVICE) if p else None
        widths, counts = [w for w, _ in time_scales], [n for _, n in time_scales]
        inputs = (item_ids, timestamps, offsets, item_table, pos_table, *slots, seed, widths, counts, 1.5, p, False)
        torch.library.opcheck(ops.sequence_fusion_fwd.default, (*inputs, "sort"))
        grad_out = torch.randn(item_ids.shape[0], 3, device=DEVICE)
        detached = [t.detach() if torch.is_tensor(t) and t.is_floating_point() else t for t in inputs]
        for scatter in scatters:
            torch.library.opcheck(ops.sequence_fusion_bwd.default, (grad_out, *detached, scatter))


@needs_triton
def test_triton_eager_path_equals_custom_op():
    """Eager calls skip the custom op's dispatch; the output and every gradient are bitwise the op's."""
    module = importlib.import_module(TRITON_MODULE)
    p = Problem((9, 0, 1, 6), dim=3, num_items=5, max_len=9, time_scales=((60, 3), (3600, 2)), dropout_p=0.3)
    item_ids, timestamps, offsets, *tables = problem_inputs(p, torch.float32)
    leaves = [tables[0], tables[1], *tables[2]]
    seed = torch.tensor(9, device=DEVICE)

    def eager(item_table, pos_table, *time_tables):
        return module.sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, time_tables, scale=1.5,
                                      time_scales=list(p.time_scales), dropout_p=0.3, training=True, seed=seed)

    def custom_op(item_table, pos_table, time0, time1):
        return torch.ops.hstu_kernels.sequence_fusion_fwd(
            item_ids, timestamps, offsets, item_table, pos_table, time0, time1, None, None, seed, [60, 3600], [3, 2],
            1.5, 0.3, False, module.default_scatter(tables[0], item_ids.shape[0]))

    results = []
    for call in (eager, custom_op):
        inputs = [t.detach().requires_grad_() for t in leaves]
        out = call(*inputs)
        results.append((out, *torch.autograd.grad(out.square().sum(), inputs)))
    for name, a, b in zip(["out", "item", "pos", "time0", "time1"], *results):
        assert torch.equal(a, b), f"{name}: eager path and custom op differ"


@needs_triton
def test_triton_compiled_forward_backward_matches_eager():
    """torch.compile(fullgraph=True) through the public function: one graph, a tensor seed that changes
    without a recompile, the same numbers forward and backward."""
    p = Problem((7, 0, 1, 5), dim=3, num_items=6, max_len=7, time_scales=((60, 3),), dropout_p=0.3)
    item_ids, timestamps, offsets, *tables = problem_inputs(p, torch.float32)
    leaves = [tables[0], tables[1], *tables[2]]

    def f(seed, item_table, pos_table, time0):
        return hstu_kernels.sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, [time0], scale=1.5,
                                            time_scales=[(60, 3)], dropout_p=0.3, training=True, seed=seed,
                                            backend="triton", validate=False)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for seed in (1, 2):
        seed = torch.tensor(seed, device=DEVICE)
        eager, got = f(seed, *leaves), compiled(seed, *leaves)
        assert torch.equal(got, eager)
        for a, b in zip(torch.autograd.grad(eager.square().sum(), leaves), torch.autograd.grad(got.square().sum(), leaves)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


@needs_triton
def test_manager_dispatch_keys_on_every_table():
    """The manager decides per (device, dtype, trailing dims) of every table: five time tables, or
    tables of mixed dtypes, fall back to the reference with a reason; three time tables run Triton."""
    manager = TritonOperatorManager({OP: True}, fallback="warn")
    module = importlib.import_module(TRITON_MODULE)

    def call(num_scales, pos_dtype=torch.float32):
        scales = [(60 * (s + 1), 3) for s in range(num_scales)]
        p = Problem((4, 2), dim=3, num_items=5, max_len=4, time_scales=tuple(scales))
        item_ids, timestamps, offsets, item_table, pos_table, time_tables = problem_inputs(p, torch.float32)
        return hstu_kernels.sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table.to(pos_dtype),
                                            time_tables, scale=1.0, time_scales=scales, dropout_p=0.0, training=False,
                                            backend=manager)

    call(3)
    assert manager.get_stats()[OP]["calls"] == {"triton": 1, "reference": 0}
    call(module.MAX_TIME_SCALES + 1)
    assert manager.get_stats()[OP]["calls"] == {"triton": 1, "reference": 1}
    assert "time scales" in manager.fallbacks()[OP]
    call(2, pos_dtype=torch.float64)
    assert "different dtypes" in manager.fallbacks()[OP]
    call(3)
    assert manager.get_stats()[OP]["calls"] == {"triton": 2, "reference": 2}


# ---------------------------------------------------------------------------------------------
# GPU: target shapes, bf16, CUDA graphs
# ---------------------------------------------------------------------------------------------
def gpu_lengths(num_tokens: int, max_len: int, seed: int) -> tuple[int, ...]:
    from hstu_kernels.ops.sequence_fusion import jagged_lengths_totalling

    return tuple(jagged_lengths_totalling(torch.Generator().manual_seed(seed), num_tokens, max_len).tolist())


@pytest.mark.gpu
@needs_triton
@given(p=problems(dtypes=(torch.bfloat16,)))
def test_gpu_random_jagged_bf16(p: Problem):
    """The random shapes above in bf16, which the interpreter cannot compute."""
    check_triton_against_reference(p)


GPU_CASES = [  # (L, N, D, items), dtype: bf16 at the target widths and tables, fp32 (the model's) at its shape
    ((25_600, 200, 50, 3706), torch.bfloat16),
    ((25_600, 200, 256, 1_000_000), torch.bfloat16),
    ((200_000, 1024, 256, 3706), torch.bfloat16),
    ((25_600, 200, 50, 3706), torch.float32),
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c))
def test_gpu_target_shapes(shape, dtype, scatter):
    num_tokens, max_len, dim, num_items = shape
    p = Problem(gpu_lengths(num_tokens, max_len, seed=dim) + (0, 1), dim=dim, num_items=num_items, max_len=max_len,
                time_scales=HOUR_DAY_WEEK, dropout_p=0.2, dtype=dtype, scatter=scatter, seed=dim + num_items)
    check_triton_against_reference(p)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_sort_backward_bitwise_repeatable_with_hot_rows(dtype):
    """No atomics in the sort backward: two runs give the same bits, with rows hot enough (three
    item ids, a time bucket holding most tokens) to take several levels of the reduction."""
    p = Problem(gpu_lengths(1_000_000, 1024, seed=1), dim=50, num_items=3706, max_len=1024, time_scales=HOUR_DAY_WEEK,
                dropout_p=0.2, dtype=dtype, scatter="sort", timestamps="bursts", ids="hot", seed=2)
    first, second = run(p, "triton", dtype), run(p, "triton", dtype)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between two runs"


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
def test_gpu_cuda_graph_replays_forward_and_backward(scatter):
    """Forward + backward captured in one CUDA graph: a replay with new ids, timestamps and seed copied
    into the static inputs matches eager, and seeds drawn inside the graph give a new mask each replay."""
    module = importlib.import_module(TRITON_MODULE)
    p = Problem(gpu_lengths(25_600, 200, seed=3), dim=50, num_items=3706, max_len=200, time_scales=HOUR_DAY_WEEK)
    item_ids, timestamps, offsets, item_table, pos_table, time_tables = problem_inputs(p, torch.float32)
    leaves = [item_table, pos_table, *time_tables]
    seed = torch.tensor(1, device=DEVICE)
    kwargs = dict(scale=math.sqrt(p.dim), time_scales=list(p.time_scales), dropout_p=0.2, training=True,
                  scatter=scatter)

    def step(seed_value):
        out = module.sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, time_tables, seed=seed_value,
                                     **kwargs)
        return (out, *torch.autograd.grad(out.square().sum(), leaves))

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step(seed)
            step(None)
    torch.cuda.current_stream().wait_stream(stream)
    graph, drawn = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = step(seed)
    with torch.cuda.graph(drawn):
        static_drawn = step(None)
    g = torch.Generator().manual_seed(7)
    item_ids.copy_(torch.randint(0, p.num_items, item_ids.shape, generator=g))
    timestamps.copy_(timestamps.flip(0))
    seed.fill_(12345)
    graph.replay()
    expected = step(torch.tensor(12345, device=DEVICE))
    torch.testing.assert_close(static[0], expected[0], rtol=1e-5, atol=1e-5)
    if scatter == "atomic":
        # Atomic adds sum each gradient element's terms in an order that changes from run to run. Two
        # fp32 sums of the same n terms differ by at most 2 (n - 1) u sum|terms| (u = 2^-24); n <= L.
        # sum|terms| is the gradient of sum(|2 out| * out): every d out / d table entry is >= 0. It is
        # itself an fp32 atomic sum; 1e-6 absolute covers its own rounding where it is near zero.
        out = module.sequence_fusion(item_ids, timestamps, offsets, item_table, pos_table, time_tables,
                                     seed=torch.tensor(12345, device=DEVICE), **kwargs)
        term_sums = torch.autograd.grad((2 * out.detach().abs() * out).sum(), leaves)
        bounds = [2 * (item_ids.numel() - 1) * 2.0**-24 * t + 1e-6 for t in term_sums]
    else:  # one fixed order: the replay repeats eager's sums
        bounds = [1e-5 + 1e-5 * e.abs() for e in expected[1:]]
    for name, a, b, bound in zip(["item", "pos", "time0", "time1", "time2"], static[1:], expected[1:], bounds):
        excess = (a - b).abs() - bound
        assert excess.max() <= 0, f"{name}: |replay - eager| exceeds its bound by {excess.max().item():.3e}"
    drawn.replay()
    first = static_drawn[0] != 0
    drawn.replay()
    assert not torch.equal(first, static_drawn[0] != 0)


@pytest.mark.gpu
@needs_triton
def test_gpu_bf16_autocast_training_step_matches_reference():
    """The model's case: fp32 tables under bf16 autocast give an fp32 output, as the reference does."""
    p = Problem(gpu_lengths(25_600, 200, seed=4), dim=50, num_items=3706, max_len=200, time_scales=HOUR_DAY_WEEK,
                dropout_p=0.2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got, torch_same = run(p, "triton", torch.float32), run(p, "reference", torch.float32)
    ref = run(p, "reference", f64)
    for name in ref:
        assert got[name].dtype == torch.float32
        assert_within_rule(name, got[name], torch_same[name], ref[name])


@pytest.mark.gpu
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("shape", [(25_600, 200, 50, 3706), (1_000_000, 1024, 256, 1_000_000)], ids=str)
def test_gpu_inductor_compiles_the_bench_case_reference(shape, dynamic):
    """The harness's compiled provider at its target shapes: Inductor's compile of the reference (seeded
    dropout, so both draw one mask) gives eager's output, and its table gradients up to the order of
    their scatter-adds: a time bucket sums up to ~10^6 float32 terms, whose rounding in two orders
    differs by ~sqrt(n) * 2^-24 relative, so the bound is 1e-3 of the gradient's norm (a token at a
    wrong row moves whole rows: an O(1) difference)."""
    case = bench_case(shape, torch.float32, DEVICE)
    forward = lambda: case.call("reference")  # noqa: E731
    torch._dynamo.reset()
    compiled = torch.compile(forward, dynamic=dynamic)
    out = compiled()
    torch.cuda.synchronize()
    expected = forward()
    torch.testing.assert_close(out, expected)
    grad = torch.randn(out.shape, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE)
    grads = torch.autograd.grad(out, case.leaves, grad)
    expected_grads = torch.autograd.grad(expected, case.leaves, grad)
    for name, got, want in zip(["item", "pos", "hour", "day", "week"], grads, expected_grads):
        assert (got - want).norm() <= 1e-3 * want.norm(), name
