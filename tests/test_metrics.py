"""Full-ranking metrics against a brute-force numpy implementation.

The brute force scores the target against every item, masks the user's seen items (never the target)
and counts ties against the model; ``topk_items``' target_rank fed into ``RetrievalMetrics`` must agree
with it on hand-made cases and random ones, and metric states must add up across instances (DDP).
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hstu.metrics import RetrievalMetrics
from hstu_kernels.reference.topk import topk_items

KS = (10, 50, 200)


def brute_force_rank(scores: np.ndarray, seen: list[int], target: int) -> int:
    """1 + the number of items other than the target, not seen, scoring >= the target."""
    masked = set(seen) - {target}
    return 1 + sum(1 for j in range(len(scores)) if j != target and j not in masked and scores[j] >= scores[target])


def brute_force_metrics(ranks, ks=KS) -> dict[str, float]:
    ranks = np.asarray(ranks, dtype=np.float64)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = float(np.mean(ranks <= k))
        out[f"ndcg@{k}"] = float(np.mean(np.where(ranks <= k, 1.0 / np.log2(ranks + 1.0), 0.0)))
    out["mrr"] = float(np.mean(1.0 / ranks))
    return out


def ranks_from_topk(scores: np.ndarray, seen: list[list[int]], targets: list[int]) -> torch.Tensor:
    """target_rank of topk_items on the exact score matrix (identity item table, no normalisation)."""
    num_items = scores.shape[1]
    offsets = torch.tensor(np.cumsum([0] + [len(s) for s in seen]), dtype=torch.int64)
    exclude_ids = torch.tensor([i for s in seen for i in s], dtype=torch.int64)
    _, _, rank = topk_items(
        torch.from_numpy(scores.astype(np.float32)), torch.eye(num_items), min(5, num_items),
        exclude_ids=exclude_ids, exclude_offsets=offsets, target_ids=torch.tensor(targets), l2_norm=False,
    )
    return rank


def assert_metrics_equal(computed: dict[str, torch.Tensor], expected: dict[str, float]):
    assert set(computed) == set(expected)
    for name, value in expected.items():
        assert math.isclose(float(computed[name]), value, rel_tol=1e-12, abs_tol=1e-12), name


HAND_MADE = [
    # (scores of one query, seen items, target, expected rank)
    ([0.5, 0.5, 0.5, 0.5], [], 2, 4),  # all tied: every other item counts against the model
    ([0.1, 0.9, 0.3, 0.3], [1], 2, 2),  # the better item is seen; the tie with item 3 counts
    ([0.1, 0.9, 0.3, 0.3], [1, 3], 2, 1),
    ([0.1, 0.9, 0.3, 0.3], [2, 1], 2, 2),  # the target is in the seen list: still ranked
    ([0.4, 0.9, 0.3, 0.8], [0, 1, 2, 3], 2, 1),  # every item seen: only the target is left
    ([0.4, 0.9, 0.3, 0.8], [], 2, 4),  # worst item
    ([0.4, 0.9, 0.3, 0.8], [1, 1, 1], 1, 1),  # duplicated seen ids (of the target itself)
]


@pytest.mark.parametrize("scores,seen,target,expected", HAND_MADE)
def test_hand_made_ranks(scores, seen, target, expected):
    scores = np.asarray([scores])
    assert brute_force_rank(scores[0], seen, target) == expected
    assert ranks_from_topk(scores, [seen], [target]).tolist() == [expected]


def test_hand_made_metric_values():
    metric = RetrievalMetrics()
    metric.update(torch.tensor([1, 2, 11, 300]))
    result = metric.compute()
    ndcg_10 = (1 + 1 / math.log2(3)) / 4
    ndcg_50 = (1 + 1 / math.log2(3) + 1 / math.log2(12)) / 4
    expected = {
        "hr@10": 0.5, "ndcg@10": ndcg_10, "hr@50": 0.75, "ndcg@50": ndcg_50, "hr@200": 0.75, "ndcg@200": ndcg_50,
        "mrr": (1 + 1 / 2 + 1 / 11 + 1 / 300) / 4,
    }
    assert_metrics_equal(result, expected)
    assert list(result) == ["hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"]


@given(
    num_queries=st.integers(1, 12),
    num_items=st.integers(1, 300),
    tie_decimals=st.sampled_from([0, 1, 2, 6]),
    seen_fraction=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**32 - 1),
)
def test_random_cases_match_brute_force(num_queries, num_items, tie_decimals, seen_fraction, seed):
    rng = np.random.default_rng(seed)
    # Rounded scores: few decimals give many ties.
    scores = np.round(rng.normal(size=(num_queries, num_items)), tie_decimals).astype(np.float32)
    targets = rng.integers(0, num_items, size=num_queries).tolist()
    seen = [
        rng.choice(num_items, size=rng.integers(0, int(seen_fraction * num_items) + 1), replace=False).tolist()
        for _ in range(num_queries)
    ]
    expected_ranks = [brute_force_rank(scores[b], seen[b], targets[b]) for b in range(num_queries)]
    ranks = ranks_from_topk(scores, seen, targets)
    assert ranks.tolist() == expected_ranks
    metric = RetrievalMetrics()
    metric.update(ranks)
    assert_metrics_equal(metric.compute(), brute_force_metrics(expected_ranks))


def test_merged_states_equal_one_metric_over_all_data():
    rng = np.random.default_rng(0)
    ranks = torch.from_numpy(rng.integers(1, 400, size=101))
    whole = RetrievalMetrics()
    whole.update(ranks[:30])
    whole.update(ranks[30:])
    first, second = RetrievalMetrics(), RetrievalMetrics()
    first.update(ranks[:30])
    second.update(ranks[30:70])
    second.update(ranks[70:])
    # What the DDP all-reduce does with dist_reduce_fx="sum": add every state.
    summed = {name: first.metric_state[name] + second.metric_state[name] for name in first.metric_state}
    for name, value in summed.items():  # counts exactly; float sums up to summation order
        torch.testing.assert_close(value, whole.metric_state[name], rtol=1e-14, atol=0)
    first.merge_state(second)
    assert_metrics_equal(first.compute(), {name: float(v) for name, v in whole.compute().items()})
    assert_metrics_equal(whole.compute(), brute_force_metrics(ranks.numpy()))


def test_custom_cut_offs_reset_and_empty_state():
    metric = RetrievalMetrics(ks=(1, 3))
    metric.update(torch.tensor([1, 3, 4], dtype=torch.int32))
    assert_metrics_equal(metric.compute(), brute_force_metrics([1, 3, 4], ks=(1, 3)))
    metric.reset()
    metric.update(torch.tensor([2]))
    assert_metrics_equal(metric.compute(), brute_force_metrics([2], ks=(1, 3)))
    with pytest.warns(UserWarning, match="before the ``update``"):
        empty = RetrievalMetrics().compute()
    assert all(math.isnan(float(v)) for v in empty.values())


def test_update_and_constructor_errors():
    with pytest.raises(ValueError, match="ranks start at 1"):
        RetrievalMetrics().update(torch.tensor([1, 0]))
    with pytest.raises(ValueError, match=r"integer tensor \[B\]"):
        RetrievalMetrics().update(torch.tensor([1.0]))
    with pytest.raises(ValueError, match="distinct positive cut-offs"):
        RetrievalMetrics(ks=(10, 10))


@pytest.mark.parametrize("protocol, held_out", [("ours", 2), ("paper", 1)])
def test_popularity_counts_every_training_event(protocol, held_out):
    """Each user's events before the held-out ones, users too short for a training example included."""
    from types import SimpleNamespace

    from hstu.baselines import training_item_counts
    from hstu.data.sequences import UserSequences

    histories = [[1, 2, 3], [2, 2, 4, 1, 3], [4, 4, 4]]  # the first and last: no training example under "ours"
    offsets = np.cumsum([0, *map(len, histories)])
    items = np.concatenate(histories).astype(np.int64)
    sequences = UserSequences(item_ids=items, timestamps=np.arange(len(items), dtype=np.int64), offsets=offsets,
                              item_original_ids=np.arange(1, 5), user_original_ids=np.arange(3))
    counts = training_item_counts(SimpleNamespace(sequences=sequences, protocol=protocol, num_items=4))
    expected = np.bincount(np.concatenate([h[:len(h) - held_out] for h in histories]) - 1, minlength=4)
    assert counts.tolist() == expected.tolist()
