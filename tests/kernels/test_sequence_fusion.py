"""Operator hierarchical_sequence_fusion: the reference against a token-by-token loop, seeded dropout,
gradcheck, torch.compile, and the public function's input checks."""
import math

import pytest
import torch
from cases import offsets_of
from hypothesis import given
from hypothesis import strategies as st

import hstu_kernels
from hstu_kernels.dropout import seeded_dropout_mask
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


@pytest.mark.parametrize(
    "change,message",
    [
        (dict(lengths=[5]), "a sequence of length 5 exceeds max_seq_len=4"),
        (dict(time_tables="short"), "1 time_tables for 2 time_scales"),
        (dict(time_tables="wrong_shape"), r"time_tables\[1\] must be \[5, 3\]"),
        (dict(timestamps="float"), "timestamps must be int64"),
        (dict(offsets="bad_end"), "seq_offsets must start at 0 and end at L=5"),
        (dict(item_ids="out_of_range"), r"item ids must lie in \[0, 9\)"),
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


