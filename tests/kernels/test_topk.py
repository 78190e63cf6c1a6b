"""Operator interaction: the top-k reference against a brute-force sort, chunking, host-sync freedom,
and the public function's input checks."""
import pytest
import torch
import torch.nn.functional as F
from cases import offsets_of
from hypothesis import given
from hypothesis import strategies as st

import hstu_kernels
from hstu_kernels.reference.topk import topk_items


def topk_by_sort(scores, k, excluded):
    """Brute force over a float64 score matrix: sort each row descending, drop the excluded ids."""
    ids, values = [], []
    for b in range(scores.shape[0]):
        order = torch.sort(scores[b], descending=True, stable=True).indices.tolist()
        kept = [i for i in order if i not in excluded[b]][:k]
        ids.append(kept + [-1] * (k - len(kept)))
        values.append([float(scores[b, i]) for i in kept] + [float("-inf")] * (k - len(kept)))
    return torch.tensor(values), torch.tensor(ids)


def test_topk_hand_computed():
    # Identity item table: the queries are the score matrix itself.
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5], [0.9, 0.2, 0.2, 0.4]])
    table = torch.eye(4)
    exclude_ids, exclude_offsets = torch.tensor([1, 0, 2]), torch.tensor([0, 1, 3])
    top, ids, rank = topk_items(scores, table, 2, exclude_ids=exclude_ids, exclude_offsets=exclude_offsets,
                                target_ids=torch.tensor([3, 2]), l2_norm=False)
    # Query 0: item 1 (tied with the target) is excluded -> rank 1. Query 1: the target 2 is also in the
    # excluded list, but is still ranked; items 1 (tie, 0.2) and 3 (0.4) count against it -> rank 3.
    assert rank.tolist() == [1, 3]
    assert ids.tolist() == [[3, 2], [3, 1]] or ids.tolist() == [[3, 2], [3, 2]]
    torch.testing.assert_close(top, torch.tensor([[0.5, 0.3], [0.4, 0.2]]))
    _, _, rank_unmasked = topk_items(scores, table, 1, target_ids=torch.tensor([3, 2]), l2_norm=False)
    assert rank_unmasked.tolist() == [2, 4]


def test_topk_all_items_excluded_pads_with_minus_one():
    table = torch.eye(3)
    queries = torch.tensor([[0.3, 0.1, 0.2]])
    top, ids, rank = topk_items(queries, table, 3, exclude_ids=torch.tensor([0, 1, 2]), exclude_offsets=torch.tensor([0, 3]),
                                target_ids=torch.tensor([1]), l2_norm=False)
    assert rank.tolist() == [1]
    assert ids.tolist() == [[1, -1, -1]]  # the target is never excluded
    assert top[0, 0] == 0.1 and torch.isneginf(top[0, 1:]).all()
    _, ids, rank = topk_items(queries, table, 2, exclude_ids=torch.tensor([0, 1, 2]), exclude_offsets=torch.tensor([0, 3]), l2_norm=False)
    assert rank is None and ids.tolist() == [[-1, -1]]


@given(
    num_queries=st.integers(1, 9), num_items=st.integers(1, 12), k_fraction=st.floats(0, 1),
    chunk_size=st.sampled_from([None, 1, 4]), l2_norm=st.booleans(), seed=st.integers(0, 2**16),
)
def test_topk_matches_sort_brute_force(num_queries, num_items, k_fraction, chunk_size, l2_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    queries, table = torch.randn(num_queries, 6, generator=gen), torch.randn(num_items, 6, generator=gen)
    k = round(k_fraction * num_items)
    lengths = torch.randint(0, num_items + 1, (num_queries,), generator=gen).tolist()
    excluded = [set(torch.randperm(num_items, generator=gen)[:n].tolist()) for n in lengths]
    exclude_ids = torch.tensor([i for ex in excluded for i in sorted(ex)], dtype=torch.int64)
    top, ids, rank = topk_items(queries, table, k, exclude_ids=exclude_ids, exclude_offsets=offsets_of(lengths),
                                l2_norm=l2_norm, chunk_size=chunk_size)
    if l2_norm:
        scores = F.normalize(queries.double(), dim=-1) @ F.normalize(table.double(), dim=-1).T
    else:
        scores = queries.double() @ table.double().T
    expected_top, expected_ids = topk_by_sort(scores, k, excluded)
    assert rank is None and top.dtype == torch.float32 and ids.dtype == torch.int64
    assert top.shape == ids.shape == (num_queries, k)
    assert torch.equal(ids, expected_ids)  # random scores: no ties, a unique answer
    torch.testing.assert_close(top, expected_top.float(), atol=1e-5, rtol=1e-5)


def test_topk_chunking_does_not_change_results():
    gen = torch.Generator().manual_seed(6)
    queries, table = torch.randn(10, 8, generator=gen), torch.randn(30, 8, generator=gen)
    targets = torch.randint(0, 30, (10,), generator=gen)
    exclude_ids = torch.randint(0, 30, (25,), generator=gen)
    exclude_offsets = torch.tensor([0, 0, 3, 3, 10, 12, 12, 20, 21, 25, 25])
    results = [
        topk_items(queries, table, 5, exclude_ids=exclude_ids, exclude_offsets=exclude_offsets, target_ids=targets, chunk_size=c)
        for c in (None, 1, 3, 10)
    ]
    (top, ids, rank), others = results[0], results[1:]
    for other_top, other_ids, other_rank in others:
        # A matmul over fewer rows may round differently in the last bit; ids and ranks must not move.
        torch.testing.assert_close(other_top, top)
        assert torch.equal(other_ids, ids) and torch.equal(other_rank, rank)


def test_topk_errors():
    queries, table = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"k=5 must lie in \[0, 4\]"):
        hstu_kernels.topk_items(queries, table, 5)
    bad = queries.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match="queries holds NaN or inf"):
        hstu_kernels.topk_items(bad, table, 2)
    inf_table = table.clone()
    inf_table[2, 1] = float("inf")
    with pytest.raises(ValueError, match="item_table holds NaN or inf"):
        hstu_kernels.topk_items(queries, inf_table, 2, l2_norm=False)
    with pytest.raises(ValueError, match="given together"):
        hstu_kernels.topk_items(queries, table, 2, exclude_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"exclude_offsets \[B\+1=3\]"):
        hstu_kernels.topk_items(queries, table, 2, exclude_ids=torch.tensor([1]), exclude_offsets=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must start at 0 and end at len"):
        hstu_kernels.topk_items(queries, table, 2, exclude_ids=torch.tensor([1]), exclude_offsets=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"exclude_ids must lie in \[0, 4\)"):
        hstu_kernels.topk_items(queries, table, 2, exclude_ids=torch.tensor([4]), exclude_offsets=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, 4\)"):
        hstu_kernels.topk_items(queries, table, 2, target_ids=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="must share D"):
        hstu_kernels.topk_items(queries, torch.randn(4, 2), 2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        topk_items(queries, table, 2, chunk_size=-1)


def test_topk_without_validation_reads_nothing_on_the_host():
    """validate=False: the whole public path traces in one graph (a .item() or .tolist() would break it),
    so it can run inside a CUDA graph or torch.export."""
    gen = torch.Generator().manual_seed(7)
    queries, table = torch.randn(6, 4, generator=gen), torch.randn(11, 4, generator=gen)
    exclude_ids, exclude_offsets = torch.tensor([1, 2, 2, 7, 0, 10]), torch.tensor([0, 2, 2, 3, 3, 6, 6])
    targets = torch.tensor([1, 0, 3, 4, 5, 6])

    def run(q, t):
        return hstu_kernels.topk_items(q, t, 3, exclude_ids=exclude_ids, exclude_offsets=exclude_offsets,
                                       target_ids=targets, backend="reference", validate=False)

    compiled = torch.compile(run, backend="eager", fullgraph=True)
    for got, want in zip(compiled(queries, table), run(queries, table)):
        assert torch.equal(got, want)
