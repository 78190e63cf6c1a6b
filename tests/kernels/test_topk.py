"""Operator interaction: the top-k reference against a brute-force sort, chunking, host-sync freedom
and the public function's input checks; then the Triton backend against the float64 truth and the
reference (CPU: the interpreter, fp32 and fp16; ``gpu``: full sizes in bf16, CUDA graphs, Inductor,
AOTInductor, autocast). The tolerance is defined above the Triton tests."""
from __future__ import annotations

import dataclasses
import importlib
import signal
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cases import needs_triton as needs_triton_for
from cases import offsets_of
from hypothesis import given
from hypothesis import strategies as st
from searchsorted_views import SearchsortedDroppingViewOffsets

import hstu_kernels
import hstu_kernels.jagged
from hstu_kernels import TritonOperatorManager, TritonUnavailableError
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
    assert ids.tolist() == [[3, 2], [3, 1]]  # exact ties go to the smaller id
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


@given(
    num_queries=st.integers(1, 6), num_items=st.integers(1, 40), levels=st.integers(1, 4),
    chunk_size=st.sampled_from([None, 1, 4]), seed=st.integers(0, 2**16),
)
def test_topk_exact_ties_go_to_the_smaller_id_whatever_k(num_queries, num_items, levels, chunk_size, seed):
    """Scores of a few levels tie everywhere: every k returns the id-ordered answer, so a larger k only
    appends (serving pages through one list), and excluded items stay out."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (num_queries, num_items), generator=gen).float()
    lengths = torch.randint(0, num_items + 1, (num_queries,), generator=gen).tolist()
    excluded = [set(torch.randperm(num_items, generator=gen)[:n].tolist()) for n in lengths]
    exclude_ids = torch.tensor([i for ex in excluded for i in sorted(ex)], dtype=torch.int64)
    for k in range(num_items + 1):
        top, ids, _ = topk_items(scores, torch.eye(num_items), k, exclude_ids=exclude_ids,
                                 exclude_offsets=offsets_of(lengths), l2_norm=False, chunk_size=chunk_size)
        expected_top, expected_ids = topk_by_sort(scores.double(), k, excluded)
        assert torch.equal(ids, expected_ids), f"k={k}"
        assert torch.equal(top, expected_top.float()), f"k={k}"


def test_topk_without_exact_ties_keeps_the_scores_and_the_answer_where_nothing_ties():
    """``exact_ties=False`` (the benchmarks' plain eager form) returns the same scores and ranks; its ids
    differ from the rule's only among equal scores."""
    gen = torch.Generator().manual_seed(4)
    queries, table = torch.randn(6, 8, generator=gen), torch.randn(40, 8, generator=gen)
    inputs = dict(exclude_ids=torch.randint(0, 40, (12,), generator=gen),
                  exclude_offsets=torch.tensor([0, 2, 2, 5, 9, 9, 12]), target_ids=torch.randint(0, 40, (6,), generator=gen))
    exact, plain = (topk_items(queries, table, 7, **inputs, exact_ties=ties) for ties in (True, False))
    for ours, theirs in zip(exact, plain):  # random scores: no ties, one answer
        assert torch.equal(ours, theirs)
    tied = torch.randint(0, 2, (6, 40), generator=gen).float()
    exact, plain = (topk_items(tied, torch.eye(40), 7, **inputs, l2_norm=False, exact_ties=ties) for ties in (True, False))
    assert torch.equal(exact[0], plain[0]) and torch.equal(exact[2], plain[2])
    scores, ids = plain[0], plain[1]
    assert torch.equal(tied.gather(1, ids.clamp(min=0)).where(ids >= 0, scores), scores)  # each id holds its score


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


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_topk_exclusions_outside_the_catalogue_exclude_nothing(chunk_size):
    """As in the Triton backend: unchecked calls may list ids outside [0, I) (the model's padding id 0
    becomes -1), and those exclude nothing, in every chunk of queries."""
    gen = torch.Generator().manual_seed(9)
    queries, table = torch.randn(4, 8, generator=gen), torch.randn(20, 8, generator=gen)
    lists = [[-1, 3, 20, 7], [], [-5, -1], [25, 0, 19]]
    wild = torch.tensor([i for ids in lists for i in ids])
    within = wild[(wild >= 0) & (wild < 20)]
    targets = torch.tensor([5, 0, 19, 2])
    got = topk_items(queries, table, 20, exclude_ids=wild, exclude_offsets=offsets_of([len(ids) for ids in lists]),
                     target_ids=targets, chunk_size=chunk_size)
    expected = topk_items(queries, table, 20, exclude_ids=within, target_ids=targets, chunk_size=chunk_size,
                          exclude_offsets=offsets_of([sum(0 <= i < 20 for i in ids) for ids in lists]))
    for name, ours, theirs in zip(("scores", "ids", "rank"), got, expected):
        assert torch.equal(ours, theirs), name
    assert (got[1] == 19).sum() == 3  # the last item, where index -1 would land, is excluded for query 3 only


def test_topk_does_not_search_a_sliced_view():
    """The query that owns each excluded id, found over ``offsets[1:]``, was the next query wherever
    Inductor compiled the reference for the GPU: each query masked its predecessor's items."""
    gen = torch.Generator().manual_seed(8)
    queries, table = torch.randn(5, 8, generator=gen), torch.randn(12, 8, generator=gen)
    exclude_ids = torch.randint(0, 12, (14,), generator=gen)
    arguments = dict(exclude_ids=exclude_ids, exclude_offsets=torch.tensor([0, 4, 4, 9, 13, 14]),
                     target_ids=torch.randint(0, 12, (5,), generator=gen))
    expected = topk_items(queries, table, 6, **arguments)
    with SearchsortedDroppingViewOffsets():
        emulated = topk_items(queries, table, 6, **arguments)
    for got, want in zip(emulated, expected):
        assert torch.equal(got, want)

def test_topk_errors():
    queries, table = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"k=5 must lie in \[0, 4\]"):
        hstu_kernels.topk_items(queries, table, 5)
    for k in (2.5, True):
        with pytest.raises(TypeError, match=f"k must be an int, got {k}"):
            hstu_kernels.topk_items(queries, table, k)
    assert hstu_kernels.topk_items(queries, table, np.int64(2))[0].shape == (2, 2)
    for backend in (None, "reference", "triton"):  # named before any backend is chosen
        with pytest.raises(TypeError, match="topk_items: item_table must be a floating-point tensor, got torch.int64"):
            hstu_kernels.topk_items(queries, table.long(), 2, backend=backend)
    with pytest.raises(ValueError, match="exclude_offsets must be an integer tensor"):
        hstu_kernels.topk_items(queries, table, 2, exclude_ids=torch.tensor([1]), exclude_offsets=torch.tensor([0., 1., 1.]))
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
    for offsets in ([0, 2, 1, 1], [0, 2**63 - 1, -2, 1]):  # the second's differences wrap around int64
        with pytest.raises(ValueError, match="exclude_offsets must be non-decreasing"):
            hstu_kernels.topk_items(torch.randn(3, 3), table, 2, exclude_ids=torch.tensor([1]),
                                    exclude_offsets=torch.tensor(offsets))
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


# ---------------------------------------------------------------------------------------------
# The Triton backend against the float64 truth and the reference
#
# Tolerance: every fp32 score, ours and the reference's, lies within tol_b = 2 (D + 3) 2^-24
# ||q_b|| max_i ||t_i|| of its float64 value on the same (rounded) inputs (cosine: ||.|| <= 1).
# That bounds a dot product of D terms summed in any order, plus the norm scaling, with the
# tensor cores' truncating accumulation counted twice. Two items whose true scores differ by
# more than 2 tol_b are therefore ordered by both as by the truth; closer pairs ("near-ties") may
# come out either way. Without near-ties ours equals the reference exactly (ids and ranks); with
# them, both must be valid answers under the tolerance (``assert_valid_topk``).
# ---------------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
TRITON_MODULE = "hstu_kernels.triton.topk"
# The interpreter computes bf16 wrongly: bf16 only on the GPU.
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
SELECTIONS = ("stream", "rows")  # the Triton launcher's two ways of keeping each query's best k


needs_triton = needs_triton_for("interaction")


@dataclass(frozen=True)
class Case:
    """One retrieval call described by plain values (hypothesis prints a failing one)."""

    num_queries: int
    num_items: int
    dim: int
    k: int
    seed: int
    dtype: torch.dtype = torch.float32
    l2_norm: bool = True
    exclude: str = "random"  # "none", "empty" (lists of length 0), "random" (lengths 0, 1, any; repeats)
    targets: bool = True
    splits: int | None = None  # the streaming plan's split count (None: its own choice)
    selection: str | None = None  # the Triton launcher's "stream" or "rows" (None: its rule)
    exclusion: str | None = None  # the exclusions as a "bitmap" or sorted "keys" (None: its rule)


def make_inputs(case: Case, device=DEVICE) -> dict:
    g = torch.Generator().manual_seed(case.seed)
    queries = torch.randn(case.num_queries, case.dim, generator=g).to(case.dtype)
    table = torch.randn(case.num_items, case.dim, generator=g).to(case.dtype)
    inputs = dict(queries=queries, item_table=table, k=case.k, l2_norm=case.l2_norm)
    if case.targets:
        inputs["target_ids"] = torch.randint(0, max(case.num_items, 1), (case.num_queries,), generator=g)
    if case.exclude != "none":
        lengths = [0] * case.num_queries
        if case.exclude == "random":
            choices = [0, 1, case.num_items // 3, case.num_items + 5]  # the last one holds repeats
            lengths = [choices[i] for i in torch.randint(0, 4, (case.num_queries,), generator=g).tolist()]
        ids = torch.randint(0, max(case.num_items, 1), (sum(lengths),), generator=g)
        if case.targets and case.num_queries and lengths[0]:  # the first query also lists its target
            ids[0] = inputs["target_ids"][0]
        inputs.update(exclude_ids=ids, exclude_offsets=offsets_of(lengths))
    return {name: value.to(device) if torch.is_tensor(value) else value for name, value in inputs.items()}


def truth_of(inputs) -> torch.Tensor:
    """[B, I] float64 scores of the (rounded) inputs."""
    q, t = inputs["queries"].double(), inputs["item_table"].double()
    if inputs["l2_norm"]:
        q, t = F.normalize(q, dim=-1, eps=1e-6), F.normalize(t, dim=-1, eps=1e-6)
    return q @ t.T


def tolerance_of(inputs) -> torch.Tensor:
    """[B] bound on |fp32 score - float64 score| (see the section comment)."""
    q, t = inputs["queries"].double(), inputs["item_table"].double()
    if inputs["l2_norm"]:
        q, t = F.normalize(q, dim=-1, eps=1e-6), F.normalize(t, dim=-1, eps=1e-6)
    largest = t.norm(dim=-1).max() if t.shape[0] else torch.zeros((), dtype=torch.float64, device=t.device)
    return 2 * (q.shape[1] + 3) * 2.0**-24 * q.norm(dim=-1) * largest


def largest_tolerance(inputs) -> float:
    tol = tolerance_of(inputs)
    return float(tol.max()) if tol.numel() else 0.0


def available_of(inputs) -> torch.Tensor:
    """[B, I] bool: items a query may get (not excluded, or its target)."""
    num_queries, num_items = inputs["queries"].shape[0], inputs["item_table"].shape[0]
    device = inputs["queries"].device
    available = torch.ones(num_queries, num_items, dtype=torch.bool, device=device)
    if "exclude_ids" in inputs:
        rows = hstu_kernels.jagged.sequence_index(inputs["exclude_offsets"], inputs["exclude_ids"].shape[0])
        available[rows, inputs["exclude_ids"].long()] = False
    if "target_ids" in inputs:
        available[torch.arange(num_queries, device=device), inputs["target_ids"].long()] = True
    return available


def call(inputs, backend):
    return hstu_kernels.topk_items(**inputs, backend=backend, validate=backend == "reference")


def assert_valid_topk(out, inputs, name=""):
    """``out`` is a right answer on the float64 truth, up to near-ties (vectorised over queries)."""
    scores, ids, rank = out
    truth, tol, available = truth_of(inputs), tolerance_of(inputs), available_of(inputs)
    num_queries, k = inputs["queries"].shape[0], inputs["k"]
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and scores.shape == ids.shape == (num_queries, k)
    position = torch.arange(k, device=ids.device)
    filled = position[None, :] < available.sum(1).clamp(max=k)[:, None]
    assert torch.equal(ids >= 0, filled), f"{name}: ids must fill min(k, items left) slots, then -1"
    assert torch.isneginf(scores[~filled]).all(), f"{name}: empty slots must score -inf"
    safe = ids.clamp(min=0)
    assert available.gather(1, safe)[filled].all(), f"{name}: an excluded item was returned"
    ordered = torch.where(filled, ids, -1 - position[None, :]).sort(1).values  # empty slots made distinct
    assert not (ordered[:, 1:] == ordered[:, :-1]).any(), f"{name}: an item was returned twice"
    got = truth.gather(1, safe)
    error = (scores.double() - got).abs()[filled]
    assert (error <= tol[:, None].expand_as(got)[filled]).all(), f"{name}: score error {error.max():.3g} > tol"
    slack = 2 * tol[:, None]
    assert ((got[:, :-1] >= got[:, 1:] - slack) | ~filled[:, 1:]).all(), f"{name}: out of order beyond near-ties"
    if k and truth.shape[1]:
        spare = truth.shape[1]  # empty slots mark a spare column
        returned = torch.zeros(num_queries, spare + 1, dtype=torch.bool, device=ids.device)
        returned = returned.scatter_(1, torch.where(filled, ids, spare), True)[:, :spare]
        best_left = torch.where(available & ~returned, truth, float("-inf")).max(1).values
        worst_kept = torch.where(filled, got, float("inf")).min(1).values
        assert (best_left <= worst_kept + 2 * tol).all(), f"{name}: a better item was left out beyond near-ties"
    if "target_ids" in inputs:
        assert rank is not None and rank.dtype == torch.int64 and rank.shape == (num_queries,)
        target = inputs["target_ids"].long()
        mine = truth.gather(1, target[:, None])
        rivals = available.clone()
        rivals[torch.arange(num_queries, device=rivals.device), target] = False
        lowest = 1 + (rivals & (truth > mine + 2 * tol[:, None])).sum(1)
        highest = 1 + (rivals & (truth >= mine - 2 * tol[:, None])).sum(1)
        assert ((rank >= lowest) & (rank <= highest)).all(), f"{name}: rank off beyond near-ties"
    else:
        assert rank is None


def near_ties(inputs) -> int:
    """Pairs whose order decides an answer and whose true scores lie within 2 tol: neighbours among
    each query's best k + 1 available items, and rivals of its target."""
    truth, tol, available = truth_of(inputs), tolerance_of(inputs), available_of(inputs)
    best = torch.where(available, truth, float("-inf")).sort(1, descending=True).values[:, :inputs["k"] + 1]
    close = (best[:, :-1] - best[:, 1:] <= 2 * tol[:, None]) & torch.isfinite(best[:, 1:])
    count = int(close.sum())
    if "target_ids" in inputs:
        target = inputs["target_ids"].long()
        mine = truth.gather(1, target[:, None])
        count += int(((truth - mine).abs() <= 2 * tol[:, None]).sum()) - truth.shape[0]  # less the targets
    return count


def check_case(case: Case):
    """Ours is valid on the truth; without near-ties it equals the reference exactly."""
    inputs = make_inputs(case)
    if case.splits is None and case.selection is None and case.exclusion is None:
        ours = call(inputs, "triton")
    else:
        ours = triton_forward(inputs, splits=case.splits, selection=case.selection, exclusion=case.exclusion)
    reference = call(inputs, "reference")
    assert_valid_topk(ours, inputs, "triton")
    assert_valid_topk(reference, inputs, "reference")
    if near_ties(inputs) == 0:
        assert torch.equal(ours[1], reference[1])
        if case.targets:
            assert torch.equal(ours[2], reference[2])
    torch.testing.assert_close(ours[0], reference[0], rtol=0, atol=2 * largest_tolerance(inputs))


def triton_forward(inputs, splits=None, selection=None, exclusion=None):
    """The launcher itself, with a chosen selection, split count and exclusion form (the public path
    follows its rules)."""
    module = importlib.import_module(TRITON_MODULE)
    scores, ids, rank = module.topk_items_forward(
        inputs["queries"], inputs["item_table"], inputs["k"], inputs.get("exclude_ids"), inputs.get("exclude_offsets"),
        inputs.get("target_ids"), inputs["l2_norm"], selection=selection, splits=splits, exclusion=exclusion)
    return scores, ids, rank if "target_ids" in inputs else None


@needs_triton
@given(
    num_queries=st.integers(1, 21), num_items=st.integers(1, 90), dim=st.sampled_from([3, 8, 25]),
    k_fraction=st.floats(0, 1), seed=st.integers(0, 2**16), dtype=st.sampled_from(TRITON_DTYPES[:2]),
    l2_norm=st.booleans(), exclude=st.sampled_from(["none", "empty", "random"]), targets=st.booleans(),
    launch=st.sampled_from([(None, None), ("stream", 1), ("stream", 3), ("rows", None), ("rows", 3)]),
    exclusion=st.sampled_from([None, "keys"]),
)
def test_triton_random_cases(num_queries, num_items, dim, k_fraction, seed, dtype, l2_norm, exclude, targets, launch,
                             exclusion):
    k = min(round(k_fraction * num_items), 40)
    selection, splits = launch
    check_case(Case(num_queries, num_items, dim, k, seed, dtype, l2_norm, exclude, targets, splits, selection,
                    exclusion))


@needs_triton
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("dtype", TRITON_DTYPES[:2], ids=str)
@pytest.mark.parametrize("l2_norm", [True, False])
def test_triton_near_ties_are_the_only_disagreements(dtype, l2_norm, selection):
    """Items repeated exactly and up to one rounding step, a repeated query, targets among the copies:
    ours and the reference may differ only where the truth has near-ties, and both stay valid."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(23, 8, generator=g)
    copies = base[torch.randint(0, 23, (60,), generator=g)]
    nudged = copies * (1 + 2.0**-22 * torch.randint(-1, 2, copies.shape, generator=g))
    table = torch.cat([base, copies, nudged]).to(dtype)
    queries = torch.randn(9, 8, generator=g)
    queries[4] = queries[3]
    targets = torch.randint(0, 23, (9,), generator=g)  # each has copies: tied rivals
    lengths = [0, 3, 1, 7, 0, 2, 9, 4, 1]
    exclude = torch.randint(0, table.shape[0], (sum(lengths),), generator=g)
    inputs = dict(queries=queries.to(dtype).to(DEVICE), item_table=table.to(DEVICE), k=17, l2_norm=l2_norm,
                  exclude_ids=exclude.to(DEVICE), exclude_offsets=offsets_of(lengths).to(DEVICE),
                  target_ids=targets.to(DEVICE))
    assert near_ties(inputs) > 0
    ours, reference = triton_forward(inputs, selection=selection), call(inputs, "reference")
    assert_valid_topk(ours, inputs, "triton")
    assert_valid_topk(reference, inputs, "reference")
    truth, tol = truth_of(inputs), tolerance_of(inputs)
    mine = truth.gather(1, inputs["target_ids"][:, None])
    tied = ((truth - mine).abs() <= 2 * tol[:, None]).sum(1) - 1  # rivals within the tolerance
    assert ((ours[2] - reference[2]).abs() <= tied).all()


@needs_triton
@pytest.mark.parametrize("selection", SELECTIONS)
def test_triton_hand_computed_ties_count_against_the_target(selection):
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.5], [0.9, 0.2, 0.2, 0.4]], device=DEVICE)
    inputs = dict(queries=scores, item_table=torch.eye(4, device=DEVICE), k=2, l2_norm=False,
                  exclude_ids=torch.tensor([1, 0, 2], device=DEVICE), exclude_offsets=torch.tensor([0, 1, 3], device=DEVICE),
                  target_ids=torch.tensor([3, 2], device=DEVICE))
    top, ids, rank = triton_forward(inputs, selection=selection)
    assert rank.tolist() == [1, 3]
    assert ids.tolist() == [[3, 2], [3, 1]]  # exact ties go to the smaller id
    torch.testing.assert_close(top.cpu(), torch.tensor([[0.5, 0.3], [0.4, 0.2]]))
    inputs.update(k=1, exclude_ids=None, exclude_offsets=None)
    _, ids, rank = triton_forward(inputs, selection=selection)
    assert rank.tolist() == [2, 4] and ids.tolist() == [[1], [0]]


@needs_triton
@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("k", [1, 5, 17])
def test_triton_exact_ties_match_the_reference(selection, k):
    """Integer scores tie across whole rows: the kernel and the reference both give ties to the smaller
    id, so their ids, scores and ranks are equal, not only valid."""
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 3, (7, 40), generator=g).float()
    lengths = [0, 3, 40, 1, 7, 12, 5]
    exclude_ids = torch.cat([torch.randperm(40, generator=g)[:n] for n in lengths])
    inputs = dict(queries=scores.to(DEVICE), item_table=torch.eye(40, device=DEVICE), k=k, l2_norm=False,
                  exclude_ids=exclude_ids.to(DEVICE), exclude_offsets=offsets_of(lengths).to(DEVICE),
                  target_ids=torch.randint(0, 40, (7,), generator=g).to(DEVICE))
    ours = triton_forward(inputs, selection=selection)
    reference = topk_items(**inputs)
    for name, got, want in zip(("scores", "ids", "rank"), ours, reference):
        assert torch.equal(got.cpu(), want.cpu()), name


@needs_triton
@pytest.mark.parametrize("block_n", [None, 64, 128])
@pytest.mark.parametrize("segments", [None, 3])
@pytest.mark.parametrize("k, num_items", [(2, 269), (7, 909), (9, 269)])  # 9, 29 and 9 groups (the last of 13)
def test_triton_row_selection_bound_by_group_maxima(monkeypatch, k, num_items, segments, block_n):
    """The row selection drops the keys under each row's k-th largest group maximum (groups of 32 items,
    with at least k of them): with integer scores tying across groups and at the bound itself, rows left
    with fewer than k groups (no bound), rows with no more than k keys left at or above it (no search),
    one segment or three, the interpreter's tiles of 32 items or the GPU's of 64 and 128 (several groups
    a tile): the reference's ids, scores and ranks exactly."""
    module = importlib.import_module(TRITON_MODULE)
    if block_n is not None:
        tile_sizes = module._tile_sizes
        monkeypatch.setattr(module, "_tile_sizes", lambda *shape: (16, block_n, *tile_sizes(*shape)[2:]))
    module._rows_plan.cache_clear()
    assert module._rows_plan(7, num_items, 7, k, torch.float32, module._multiprocessors(0), segments).has_bound
    g = torch.Generator().manual_seed(k)
    scores = torch.randint(0, 4, (7, num_items), generator=g).float()
    scores[1] = torch.arange(num_items).float() % 5  # every group's maximum is 4: the bound ties every group
    scores[2] = 0.0
    scores[2, [3, num_items - 1]] = 1.0  # two keys above the rest
    scores[3] = torch.arange(num_items).float()  # distinct, rising: the bound falls inside the last groups
    scores[5] = 0.0
    scores[5, :6] = torch.tensor([3.0, 1, 1, 1, 1, 1])  # one group left: its best keys lie under its maximum
    whole_groups = list(range(32 * (num_items // 32 - 1)))  # all but the last two groups
    lengths = [0, 5, 0, len(whole_groups), num_items - 3, num_items - 32, 1]  # row 5: only its first group left
    exclude_ids = torch.cat([torch.randint(0, num_items, (5,), generator=g), torch.tensor(whole_groups),
                             torch.randperm(num_items, generator=g)[:num_items - 3], torch.arange(32, num_items),
                             torch.randint(0, num_items, (1,), generator=g)])
    inputs = dict(queries=torch.eye(7, device=DEVICE), item_table=scores.T.contiguous().to(DEVICE), k=k, l2_norm=False,
                  exclude_ids=exclude_ids.to(DEVICE), exclude_offsets=offsets_of(lengths).to(DEVICE),
                  target_ids=torch.randint(0, num_items, (7,), generator=g).index_fill(0, torch.tensor([5]), 4)
                  .to(DEVICE))  # row 5's target in its first group
    try:
        ours = triton_forward(inputs, splits=segments, selection="rows")
    finally:
        module._rows_plan.cache_clear()
    reference = topk_items(**inputs)
    for name, got, want in zip(("scores", "ids", "rank"), ours, reference):
        assert torch.equal(got.cpu(), want.cpu()), name


@needs_triton
@pytest.mark.parametrize("case", [
    Case(0, 7, 4, 3, seed=1),  # no queries
    Case(5, 9, 4, 0, seed=2),  # k = 0: ranks only
    Case(6, 9, 5, 9, seed=3),  # k = I: every query runs out of items
    Case(4, 1, 3, 1, seed=4, exclude="empty"),  # one item
    Case(7, 40, 6, 5, seed=5, exclude="empty", targets=False),  # exclude_ids of length 0
], ids=lambda c: f"B{c.num_queries}-I{c.num_items}-k{c.k}-{c.exclude}")
@pytest.mark.parametrize("selection", SELECTIONS)
def test_triton_edge_cases(case, selection):
    check_case(dataclasses.replace(case, selection=selection))


@needs_triton
@pytest.mark.parametrize("selection", SELECTIONS)
def test_triton_everything_excluded_pads_and_keeps_the_target(selection):
    queries = torch.tensor([[0.3, 0.1, 0.2], [0.0, 0.0, 0.0]], device=DEVICE)  # a zero query scores 0 everywhere
    inputs = dict(queries=queries, item_table=torch.eye(3, device=DEVICE), k=3, l2_norm=True,
                  exclude_ids=torch.tensor([2, 0, 1, 1, 0, 1, 2], device=DEVICE),
                  exclude_offsets=torch.tensor([0, 4, 7], device=DEVICE), target_ids=torch.tensor([1, 2], device=DEVICE))
    top, ids, rank = triton_forward(inputs, selection=selection)
    assert ids.tolist() == [[1, -1, -1], [2, -1, -1]] and rank.tolist() == [1, 1]
    assert torch.isneginf(top[:, 1:]).all() and top[1, 0] == 0
    del inputs["target_ids"]
    _, ids, rank = triton_forward(inputs | dict(k=2), selection=selection)
    assert rank is None and ids.tolist() == [[-1, -1], [-1, -1]]


@needs_triton
@pytest.mark.parametrize("selection", SELECTIONS)
def test_triton_exclusions_outside_the_catalogue_exclude_nothing(selection):
    """Unchecked calls (validate=False) may list ids outside [0, I): those exclude nothing, and the
    in-range ids listed around them still apply in every tile (the row selection's per-tile cursors
    count the negative ones)."""
    inputs = make_inputs(Case(6, 150, 8, 9, seed=23))
    lists = [[-3, 7, 149, 160, -1, 40], [], [150, 151], [-7, -7, 0, 0, 120], [75], [-2, 64, 33, 95, 149, 1000]]
    wild = torch.tensor([i for ids in lists for i in ids], device=DEVICE)
    offsets = offsets_of([len(ids) for ids in lists]).to(DEVICE)
    within = wild[(wild >= 0) & (wild < 150)]
    within_offsets = offsets_of([sum(0 <= i < 150 for i in ids) for ids in lists]).to(DEVICE)
    got = triton_forward(inputs | dict(exclude_ids=wild, exclude_offsets=offsets), selection=selection)
    expected = triton_forward(inputs | dict(exclude_ids=within, exclude_offsets=within_offsets), selection=selection)
    for name, ours, theirs in zip(("scores", "ids", "rank"), got, expected):
        assert torch.equal(ours, theirs), name


@needs_triton
def test_triton_selections_and_splits_agree():
    """Streaming with one split per program or several merged at the end, or the row selection in one
    chunk of queries or several, its rows whole or in segments (of 8 to 150 items, fewer than k or not):
    the same ids, ranks and (within the tolerance: tiles hold other items) scores."""
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(13, 150, 25, 12, seed=8))
    assert near_ties(inputs) == 0
    results = [triton_forward(inputs, splits=s, selection="stream") for s in (1, 2, 5)]
    results += [triton_forward(inputs, splits=s, selection="rows") for s in (None, 2, 19)]
    plan = module._rows_plan(13, 150, 25, 12, inputs["queries"].dtype, module._multiprocessors(0), 19)
    assert (plan.segments, plan.segment_items) == (19, 8)
    module._rows_plan.cache_clear()  # plans are cached per shape: a smaller chunk needs a new one
    with pytest.MonkeyPatch.context() as patch:
        # five queries a chunk (a row's keys: 150 rounded up to 16 slots): three chunks
        patch.setattr(module.reference, "SCORES_PER_CHUNK", 5 * 160)
        plan = module._rows_plan(13, 150, 25, 12, inputs["queries"].dtype, module._multiprocessors(0))
        assert plan.chunk_rows == 5
        results += [triton_forward(inputs, splits=s, selection="rows") for s in (None, 3)]
    module._rows_plan.cache_clear()
    for scores, ids, rank in results[1:]:
        assert torch.equal(ids, results[0][1]) and torch.equal(rank, results[0][2])
        torch.testing.assert_close(scores, results[0][0], rtol=0, atol=2 * largest_tolerance(inputs))


@needs_triton
@pytest.mark.parametrize("selection", SELECTIONS)
def test_triton_exclusion_bitmap_and_int32_and_int64_keys_agree(monkeypatch, selection):
    """The exclusions as a bitmap, as int32 keys where B * (I + 2) fits and as int64 keys beyond: one
    answer, with repeats, ids outside the catalogue, the last word's last bit (item 95 of 96) and the
    last query's keys at the int32 limit."""
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(7, 96, 8, 9, seed=31))
    lists = [[3, 3, 95, -1], [], [0, 96, 45, 31, 32], [7] * 5, [95, 1, 2, 63], [95, 0], [95, 95, 96, 44]]
    inputs |= dict(exclude_ids=torch.tensor([i for ids in lists for i in ids], device=DEVICE),
                   exclude_offsets=offsets_of([len(ids) for ids in lists]).to(DEVICE))
    bitmap = triton_forward(inputs, selection=selection, exclusion="bitmap")
    assert module.exclusion_key_dtype(7, 96) == torch.int32
    monkeypatch.setattr(module, "EXCLUSION_KEY_INT32_LIMIT", 7 * 98)  # the largest key, B * (I + 2), just fits
    assert module.exclusion_key_dtype(7, 96) == torch.int32
    narrow = triton_forward(inputs, selection=selection, exclusion="keys")
    monkeypatch.setattr(module, "EXCLUSION_KEY_INT32_LIMIT", 7 * 98 - 1)
    assert module.exclusion_key_dtype(7, 96) == torch.int64
    wide = triton_forward(inputs, selection=selection, exclusion="keys")
    for form in (narrow, wide):
        for name, ours, theirs in zip(("scores", "ids", "rank"), bitmap, form):
            assert torch.equal(ours, theirs), name
    assert near_ties({name: value for name, value in inputs.items() if not name.startswith("exclude")}) == 0
    expected = hstu_kernels.topk_items(**inputs, backend="reference", validate=False)
    assert torch.equal(bitmap[1], expected[1]) and torch.equal(bitmap[2], expected[2])


@needs_triton
@pytest.mark.parametrize("block_n", [64, 128])
def test_triton_exclusions_at_the_gpu_tile_widths(monkeypatch, block_n):
    """The GPU's item tiles of 64 and 128 columns read 2 and 4 exclusion words a row (the interpreter's
    plans take 32): both selections and both exclusion forms give the 32-column answer."""
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(6, 300, 8, 7, seed=12))
    assert near_ties(inputs) == 0
    expected = triton_forward(inputs, selection="stream", exclusion="keys")
    tile_sizes = module._tile_sizes
    monkeypatch.setattr(module, "_tile_sizes", lambda *shape: (16, block_n, *tile_sizes(*shape)[2:]))
    module._plan.cache_clear()
    module._rows_plan.cache_clear()
    try:
        for selection in SELECTIONS:
            for exclusion in module.EXCLUSION_FORMS:
                plan = module._rows_plan(6, 300, 8, 7, inputs["queries"].dtype, module._multiprocessors(0))
                assert plan.block_n == block_n
                scores, ids, rank = triton_forward(inputs, selection=selection, exclusion=exclusion)
                assert torch.equal(ids, expected[1]) and torch.equal(rank, expected[2]), (selection, exclusion)
                torch.testing.assert_close(scores, expected[0], rtol=0, atol=2 * largest_tolerance(inputs))
    finally:
        module._plan.cache_clear()
        module._rows_plan.cache_clear()


@needs_triton
@pytest.mark.parametrize("tiles", [2, 3, 16])
def test_triton_score_keys_over_several_item_tiles(monkeypatch, tiles):
    """A score-keys program looping over 2 or 3 item tiles (the last program's running past the catalogue)
    or over more than the catalogue holds (one program a row block; the launcher takes any count): with
    the exclusions as a bitmap or as sorted keys (a cursor carried from tile to tile) and a bound from
    the group maxima, the ids, ranks and scores of one tile a program, and the reference's ids and ranks."""
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(21, 301, 8, 9, seed=5))
    assert near_ties(inputs) == 0
    module._rows_plan.cache_clear()
    try:
        monkeypatch.setattr(module, "_score_tiles", lambda *shape: 1)
        expected = {exclusion: triton_forward(inputs, selection="rows", exclusion=exclusion)
                    for exclusion in module.EXCLUSION_FORMS}
        monkeypatch.setattr(module, "_score_tiles", lambda *shape: tiles)
        module._rows_plan.cache_clear()
        plan = module._rows_plan(21, 301, 8, 9, inputs["queries"].dtype, module._multiprocessors(0))
        assert plan.score_tiles == tiles
        for exclusion in module.EXCLUSION_FORMS:
            got = triton_forward(inputs, selection="rows", exclusion=exclusion)
            for name, ours, theirs in zip(("scores", "ids", "rank"), got, expected[exclusion]):
                assert torch.equal(ours, theirs), (name, exclusion)
    finally:
        module._rows_plan.cache_clear()
    reference = hstu_kernels.topk_items(**inputs, backend="reference", validate=False)
    assert torch.equal(expected["bitmap"][1], reference[1]) and torch.equal(expected["bitmap"][2], reference[2])


def test_score_tiles_rule():
    """Two item tiles a score-keys program in bf16/fp16 at D <= 64 while a program a multiprocessor remains
    (H100: 132): at 627 queries x 26,744 items (10 row blocks of 418 64-item tiles) and 1,024 x 3,706 (16 of
    58), not at D = 256, in fp32, or with fewer programs than multiprocessors."""
    module = importlib.import_module(TRITON_MODULE)
    assert module._score_tiles(10, 418, 50, torch.bfloat16, 132) == 2
    assert module._score_tiles(16, 58, 64, torch.float16, 132) == 2
    assert module._score_tiles(10, 209, 256, torch.bfloat16, 132) == 1  # 128-item tiles at D = 256
    assert module._score_tiles(16, 116, 50, torch.float32, 132) == 1  # 32-item tiles in fp32
    assert module._score_tiles(2, 116, 50, torch.bfloat16, 132) == 1


def test_exclusion_form_takes_the_bitmap_up_to_its_byte_limit(monkeypatch):
    """One bit per query and item, in whole int32 words a row, while it fits EXCLUSION_BITMAP_MAX_BYTES."""
    module = importlib.import_module(TRITON_MODULE)
    assert module.exclusion_form(6040, 3706) == module.exclusion_form(1024, 26744) == "bitmap"
    assert module.exclusion_form(1024, 1_000_000) == "keys"  # 128 MB of bits
    monkeypatch.setattr(module, "EXCLUSION_BITMAP_MAX_BYTES", 7 * 3 * 4)  # 7 rows of 3 words: 65..96 items
    assert module.exclusion_form(7, 96) == "bitmap" and module.exclusion_form(7, 97) == "keys"
    assert module.exclusion_form(8, 64) == "bitmap" and module.exclusion_form(8, 65) == "keys"


@needs_triton
def test_triton_writes_every_output_and_clears_its_lists(monkeypatch):
    """Every buffer the launcher allocates starts as garbage (NaN, -77): outputs and the kernels'
    candidate lists must all be written before they are read."""
    inputs = make_inputs(Case(19, 70, 8, 6, seed=9, splits=None))
    expected = call(inputs, "triton")
    empty = torch.empty

    def poisoned(*args, **kwargs):
        tensor = empty(*args, **kwargs)
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(-77)

    monkeypatch.setattr(torch, "empty", poisoned)
    for selection, splits in (("stream", 1), ("stream", 3), ("rows", None), ("rows", 3)):
        got = triton_forward(inputs, splits=splits, selection=selection)
        assert torch.equal(got[1], expected[1]) and torch.equal(got[2], expected[2])
        assert not torch.isnan(got[0]).any()


@needs_triton
def test_k_above_the_kernels_limit_is_a_counted_fallback_to_the_reference():
    """The manager decides on k as on the tensors: the reference runs and is counted as the one that ran."""
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(2, module.MAX_TOPK + 3, 4, module.MAX_TOPK + 1, seed=10), device=torch.device("cpu"))
    manager = TritonOperatorManager({"interaction": True})
    ours = call(inputs, manager)
    reference = call(inputs, "reference")
    assert torch.equal(ours[1], reference[1]) and torch.equal(ours[2], reference[2])
    stats = manager.get_stats()["interaction"]
    assert stats["calls"]["reference"] == 1 and not stats["calls"]["triton"] and stats["fallback_reason"] == f"k={inputs['k']} > 2048, the " \
        "largest the kernel keeps"
    with pytest.raises(TritonUnavailableError, match=f"k={inputs['k']} > 2048"):
        call(inputs, "triton")
    with pytest.raises(ValueError, match=f"k={inputs['k']} > 2048, the largest the Triton kernel keeps"):
        module.topk_items(**inputs)


@needs_triton
def test_triton_selection_is_named_and_bounded(monkeypatch):
    """An unknown selection, a catalogue too large for the row selection and segments too long or too
    many for it are refused with the reason; the largest segment it takes runs."""
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(2, 5, 4, 3, seed=17))
    with pytest.raises(ValueError, match="selection must be one of"):
        triton_forward(inputs, selection="heap")
    assert module.row_selection_items_limit(1000) == module.MERGE_WIDTH // 1024 * module.ROW_SEGMENT_ITEMS
    monkeypatch.setattr(module, "ROW_SEGMENT_ITEMS", 32)
    monkeypatch.setattr(module, "MERGE_WIDTH", 4 * 128)  # k = 100 keeps lists of 128: 4 segments of 32 items
    module._rows_plan.cache_clear()
    try:
        wide = make_inputs(Case(2, 129, 4, 100, seed=18, exclude="none"))
        with pytest.raises(ValueError, match="takes at most 128 items at k=100, got 129"):
            triton_forward(wide, selection="rows")
        check_case(Case(2, 128, 4, 100, seed=18, exclude="none", selection="rows"))
        whole = wide | dict(item_table=wide["item_table"][:128], target_ids=wide["target_ids"] % 128)
        with pytest.raises(ValueError, match="1 segments of 128 items at k=100: the row selection takes at most 32 "
                                             "items a segment and 4 segments"):
            triton_forward(whole, selection="rows", splits=1)
    finally:
        monkeypatch.undo()
        module._rows_plan.cache_clear()
    check_case(Case(2, module.ROW_SEGMENT_ITEMS, 4, 7, seed=19, selection="rows", splits=1))
    assert module.ROW_SELECT_MAX_ITEMS <= module.row_selection_items_limit(module.MAX_TOPK)  # the rule's bound
    assert module.selection_for(1024, module.ROW_SELECT_MAX_ITEMS + 1, 50, 200, torch.bfloat16, 132) == "stream"
    fewer = module.ROW_SELECT_MIN_QUERIES - 1  # below the batches its time model was checked at
    assert module.selection_for(fewer, 3706, 50, 200, torch.bfloat16, 132) == "stream"


# The faster selection by H100 kernel time (BENCHMARKS.md, `interaction`) at each measured (B, D, I, k);
# "either" where the two ran within 5%: 1024 x 50 x 26744 x 10 (2%), 6040 x 50 x 26744 x 200 (3%), 1024 x 50 x
# 30000 x 16 (2%), and in fp32 256 x 50 x 30000 x 16 (1%), 6040 x 50 x 26744 x 50 (3%) and 1024 x 50 x 26744 x 100
# (0.5%). Not listed: two fp32 shapes where the rule picks the row selection and streaming ran faster, 1024 x 50 x
# 26744 x 50 (6%) and 1024 x 50 x 30000 x 16 (11%).
FASTER_SELECTION_MEASURED = {
    torch.bfloat16: {
        (1024, 50, 3706, 10): "rows", (1024, 50, 3706, 200): "rows", (1024, 256, 3706, 10): "rows",
        (1024, 256, 3706, 200): "rows", (6040, 50, 3706, 10): "rows", (6040, 50, 3706, 200): "rows",
        (6040, 256, 3706, 10): "rows", (6040, 256, 3706, 200): "rows", (6040, 50, 8000, 200): "rows",
        (6040, 256, 8000, 200): "rows", (1024, 50, 26744, 200): "rows", (1024, 256, 26744, 200): "rows",
        (1024, 50, 26744, 10): "either", (1024, 256, 26744, 10): "stream", (6040, 50, 26744, 200): "either",
        (6040, 50, 26744, 10): "stream",
        (1024, 50, 3706, 50): "rows", (6040, 50, 3706, 100): "rows", (1024, 50, 26744, 50): "rows",
        (1024, 50, 26744, 100): "rows", (6040, 50, 26744, 50): "stream", (512, 50, 26744, 100): "rows",
        (2048, 256, 8000, 50): "rows", (6040, 256, 26744, 100): "stream", (256, 50, 30000, 16): "rows",
        (1024, 50, 30000, 16): "either",
    },
    torch.float32: {
        (16, 50, 3706, 10): "rows", (128, 50, 3706, 10): "rows", (256, 50, 3706, 10): "rows",
        (512, 50, 3706, 10): "rows", (512, 50, 3706, 200): "rows",
        (1024, 50, 3706, 50): "rows", (6040, 50, 3706, 100): "rows", (6040, 50, 26744, 50): "either",
        (512, 50, 26744, 100): "rows", (2048, 256, 8000, 50): "rows", (6040, 256, 26744, 100): "rows",
        (256, 50, 30000, 16): "either", (1024, 50, 26744, 100): "either",
    },
}


def test_selection_rule_picks_the_selection_measured_faster(monkeypatch):
    """The rule's time models pick the selection that ran faster on an H100 (132 multiprocessors) at every
    measured shape where the two were more than 5% apart."""
    module = importlib.import_module(TRITON_MODULE)
    monkeypatch.setattr(module, "KERNELS_INTERPRETED", False)  # the GPU's tiles, not the interpreter's
    module._plan.cache_clear()
    try:
        for dtype, measured in FASTER_SELECTION_MEASURED.items():
            for (num_queries, dim, num_items, k), faster in measured.items():
                picked = module.selection_for(num_queries, num_items, dim, k, dtype, 132)
                assert picked == faster or (faster == "either" and picked in module.SELECTIONS), (
                    dtype, num_queries, dim, num_items, k)
    finally:
        module._plan.cache_clear()


def test_triton_unsupported_inputs_are_named():
    module = importlib.import_module(TRITON_MODULE)
    assert module.unsupported_reason((torch.randn(2, 4), torch.randn(5, 4))) is None
    assert "int64" in module.unsupported_reason((torch.ones(2, 4, dtype=torch.int64), torch.randn(5, 4)))
    assert f"> {module.MAX_DIM}" in module.unsupported_reason((torch.randn(2, 513), torch.randn(5, 513)))
    if module.KERNELS_INTERPRETED:
        assert "interpreter" in module.unsupported_reason((torch.randn(2, 4).bfloat16(), torch.randn(5, 4)))


@needs_triton
def test_triton_mixed_dtypes_and_strided_inputs():
    """fp16 queries against an fp32 table (computed in fp32), a table sliced from a wider one."""
    case = Case(9, 60, 8, 7, seed=11)
    inputs = make_inputs(case)
    wide = torch.randn(60, 20, device=DEVICE)
    wide[:, 3:11] = inputs["item_table"]
    inputs.update(queries=inputs["queries"].half(), item_table=wide[:, 3:11])
    assert not inputs["item_table"].is_contiguous()
    ours = call(inputs, "triton")
    reference = call(inputs, "reference")
    assert_valid_topk(ours, inputs, "triton")
    assert torch.equal(ours[1], reference[1]) and torch.equal(ours[2], reference[2])


@needs_triton
@pytest.mark.parametrize("selection", [None, *SELECTIONS])
def test_triton_custom_op_opcheck(selection):
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(5, 30, 8, 4, seed=12))
    arguments = (inputs["queries"], inputs["item_table"], 4, inputs["exclude_ids"], inputs["exclude_offsets"],
                 inputs["target_ids"], True, selection)
    torch.library.opcheck(torch.ops.hstu_kernels.topk_items.default, arguments)
    assert all(torch.equal(a, b) for a, b in zip(module._topk_op(*arguments), module.topk_items_forward(*arguments)))


@needs_triton
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("selection", [None, "rows"])
def test_triton_compiled_matches_eager(compile_backend, selection):
    """torch.compile(fullgraph=True) of the public call (checks off), or of the Triton function with
    the row selection named: one graph, the same results."""
    module = importlib.import_module(TRITON_MODULE)
    inputs = make_inputs(Case(7, 50, 8, 5, seed=13))

    def retrieve(queries, item_table):
        if selection is not None:
            return module.topk_items(queries, item_table, 5, exclude_ids=inputs["exclude_ids"],
                                     exclude_offsets=inputs["exclude_offsets"], target_ids=inputs["target_ids"],
                                     selection=selection)
        return hstu_kernels.topk_items(queries, item_table, 5, exclude_ids=inputs["exclude_ids"],
                                       exclude_offsets=inputs["exclude_offsets"], target_ids=inputs["target_ids"],
                                       backend="triton", validate=False)

    eager = retrieve(inputs["queries"], inputs["item_table"])
    compiled = torch.compile(retrieve, fullgraph=True, backend=compile_backend)(inputs["queries"], inputs["item_table"])
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


class Retrieval(torch.nn.Module):
    """What a serving package embeds: the item table as a buffer, top-k with seen items masked."""

    def __init__(self, item_table: torch.Tensor, k: int):
        super().__init__()
        self.register_buffer("item_table", item_table)
        self.k = k

    def forward(self, queries, exclude_ids, exclude_offsets, target_ids):
        return hstu_kernels.topk_items(queries, self.item_table, self.k, exclude_ids=exclude_ids,
                                       exclude_offsets=exclude_offsets, target_ids=target_ids, backend="triton",
                                       validate=False)


@needs_triton
def test_triton_export_keeps_one_op():
    inputs = make_inputs(Case(6, 40, 8, 5, seed=14))
    model = Retrieval(inputs["item_table"], 5)
    arguments = (inputs["queries"], inputs["exclude_ids"], inputs["exclude_offsets"], inputs["target_ids"])
    exported = torch.export.export(model, arguments)
    assert "torch.ops.hstu_kernels.topk_items" in exported.graph_module.code
    for got, want in zip(exported.module()(*arguments), model(*arguments)):
        assert torch.equal(got, want)


@needs_triton
def test_interaction_flag_routes_the_model_to_triton():
    """With the flag on, the model's recommend (full-ranking metrics, inference) runs the Triton kernel
    through its manager, with the reference's results."""
    from hstu.data.batch import JaggedBatch
    from hstu.model.recommender import SequentialRecommender

    encoder = {"_target_": "hstu.model.sasrec.SASRecEncoder", "num_blocks": 1, "num_heads": 2, "dropout": 0.0}
    loss = {"kind": "sampled", "num_negatives": 4, "temperature": 0.05}
    g = torch.Generator().manual_seed(16)
    offsets = torch.tensor([0, 5, 6, 9])
    batch = JaggedBatch(item_ids=torch.randint(1, 41, (9,), generator=g), timestamps=torch.arange(9) + 1_000_000,
                        seq_offsets=offsets, targets=torch.randint(1, 41, (3,), generator=g),
                        target_timestamps=torch.full((3,), 2_000_000), user_ids=torch.arange(3))
    results = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = SequentialRecommender(40, 8, 8, 0.0, encoder, loss, kernels={"interaction": flag}).eval()
        results[flag] = model.recommend(batch, k=7, with_target_rank=True)
        calls = model.manager.get_stats()["interaction"]["calls"]
        assert calls == ({"triton": 1, "reference": 0} if flag else {"triton": 0, "reference": 1})
    for got, want in zip(results[True], results[False]):
        assert torch.equal(got, want) if not got.is_floating_point() else torch.allclose(got, want, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 and fp16 at full size, CUDA graphs, Inductor, AOTInductor, autocast
# ---------------------------------------------------------------------------------------------
GPU_CASES = [
    Case(1024, 26744, 50, 200, seed=21, dtype=torch.bfloat16),
    Case(300, 100_003, 256, 10, seed=22, dtype=torch.bfloat16),
    Case(77, 3706, 64, 100, seed=23, dtype=torch.float16, l2_norm=False),
    Case(200, 5000, 50, 20, seed=24, dtype=torch.float32),
    Case(6040, 3706, 50, 200, seed=25, dtype=torch.bfloat16, selection="rows"),
    Case(77, 3706, 64, 100, seed=23, dtype=torch.float16, l2_norm=False, selection="rows"),
    Case(200, 8192, 256, 10, seed=26, dtype=torch.bfloat16, selection="rows"),
    Case(200, 5000, 50, 20, seed=24, dtype=torch.float32, selection="rows"),
    Case(1024, 26744, 50, 200, seed=21, dtype=torch.bfloat16, selection="rows"),  # 4 segments a row
    Case(300, 100_003, 256, 10, seed=22, dtype=torch.bfloat16, selection="rows"),  # 13
    Case(500, 8000, 512, 200, seed=27, dtype=torch.bfloat16, selection="rows"),  # 64-item tiles at the widest D
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("case", GPU_CASES,
                         ids=lambda c: f"{c.num_queries}x{c.num_items}x{c.dim}-k{c.k}-{c.dtype}-{c.selection or 'rule'}")
def test_gpu_full_size(case):
    inputs = make_inputs(case)
    ours = call(inputs, "triton") if case.selection is None else triton_forward(inputs, selection=case.selection)
    reference = call(inputs, "reference")
    assert_valid_topk(ours, inputs, "triton")
    assert_valid_topk(reference, inputs, "reference")
    truth, tol = truth_of(inputs), tolerance_of(inputs)
    mine = truth.gather(1, inputs["target_ids"][:, None])
    tied = ((truth - mine).abs() <= 2 * tol[:, None]).sum(1) - 1
    assert ((ours[2] - reference[2]).abs() <= tied).all()


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("num_items, selection",
                         [(26744, None), (26744, "stream"), (26744, "rows"), (3706, "rows")])
def test_gpu_cuda_graph_replays_new_inputs(num_items, selection):
    """Captured once (no host reads in the launch path), replayed on new values copied into the inputs:
    the rule's selection, streaming, the row selection in 4 segments a row and in one."""

    def retrieve(inputs):  # the public call (checks off) where the rule decides
        if selection is None:
            return hstu_kernels.topk_items(**inputs, backend="triton", validate=False)
        return triton_forward(inputs, selection=selection)

    first, second = (make_inputs(Case(1024, num_items, 50, 200, seed=s, dtype=torch.bfloat16)) for s in (31, 32))
    # a replay reads new values into the captured buffers, so the second exclusion list keeps the first's total
    # length: its rows' lengths rotated one place, its ids drawn afresh
    lengths = first["exclude_offsets"].diff().roll(1)
    second["exclude_offsets"] = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    second["exclude_ids"] = torch.randint_like(first["exclude_ids"], num_items)
    static = {name: value.clone() if torch.is_tensor(value) else value for name, value in first.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        retrieve(static)  # warm-up: compilation and the launch plan outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = retrieve(static)
    for new in (second, first):
        for name, value in new.items():
            if torch.is_tensor(value):
                static[name].copy_(value)
        graph.replay()
        expected = retrieve(new)
        for got, want in zip(captured, expected):
            assert torch.equal(got, want)


@pytest.mark.gpu
@needs_triton
def test_gpu_inductor_compiles_the_kernels_into_the_graph():
    """On the GPU the op is a triton_op: Inductor sees (and compiles) its kernels, and torch's compile
    caches key on their source."""
    importlib.import_module(TRITON_MODULE)
    kernels_of = getattr(torch._library.triton, "get_triton_kernels_for_op", None)  # newer torch only
    if kernels_of is not None:
        assert sorted(kernel.fn.__name__ for kernel in kernels_of("hstu_kernels::topk_items")) == [
            "_row_bound_kernel", "_score_keys_kernel", "_select_rows_kernel", "_topk_kernel", "_topk_merge_kernel",
            "_topk_prologue_kernel"]
    inputs = make_inputs(GPU_CASES[0])

    def retrieve(queries, item_table):
        return hstu_kernels.topk_items(queries, item_table, 200, exclude_ids=inputs["exclude_ids"],
                                       exclude_offsets=inputs["exclude_offsets"], target_ids=inputs["target_ids"],
                                       backend="triton", validate=False)

    eager = retrieve(inputs["queries"], inputs["item_table"])
    compiled = torch.compile(retrieve, fullgraph=True)(inputs["queries"], inputs["item_table"])
    for got, want in zip(compiled, eager):
        assert torch.equal(got, want)


LOAD_AND_RUN_PACKAGE = """
import sys, torch
package, inputs = sys.argv[1:]
outputs = torch._inductor.aoti_load_package(package)(*torch.load(inputs, weights_only=True))
torch.save([output.cpu() for output in outputs], inputs + '.out')
"""


@pytest.mark.gpu
@needs_triton
def test_gpu_aot_inductor_package_runs_the_kernels(tmp_path):
    """torch.export keeps one hstu_kernels::topk_items node; AOTInductor compiles its Triton kernels
    into the package, which runs without this Python code's launchers (loaded in a fresh process: a crash
    of the loader there does not take the test session down)."""
    importlib.import_module(TRITON_MODULE)  # export traces the public function, which cannot import there
    inputs = make_inputs(GPU_CASES[0])  # the kernels compiled for test_gpu_full_size: no new variant
    model = Retrieval(inputs["item_table"], GPU_CASES[0].k)
    arguments = (inputs["queries"], inputs["exclude_ids"], inputs["exclude_offsets"], inputs["target_ids"])
    exported = torch.export.export(model, arguments)
    assert "torch.ops.hstu_kernels.topk_items" in exported.graph_module.code
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "retrieval.pt2"))
    saved = tmp_path / "inputs.pt"
    torch.save(arguments, saved)
    result = subprocess.run([sys.executable, "-c", LOAD_AND_RUN_PACKAGE, package, str(saved)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    if result.returncode == -signal.SIGSEGV:
        pytest.xfail("aoti_load_package crashes on CUDA packages under torch 2.11+cu130 (README, Known problems)")
    assert result.returncode == 0, result.stderr[-3000:]
    for got, want in zip(torch.load(f"{saved}.out", weights_only=True), model(*arguments)):
        assert torch.equal(got, want.cpu())


@pytest.mark.gpu
@needs_triton
def test_gpu_autocast_leaves_scores_in_fp32():
    """Under bf16 autocast (as the model evaluates) the scores stay fp32 from fp32 inputs, as the reference's."""
    inputs = make_inputs(GPU_CASES[3])
    plain = call(inputs, "triton")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        autocast = call(inputs, "triton")
        reference = call(inputs, "reference")
    assert autocast[0].dtype == reference[0].dtype == torch.float32
    for got, want in zip(autocast, plain):
        assert torch.equal(got, want)
    assert_valid_topk(reference, inputs, "reference under autocast")  # fp32 as well: within the fp32 tolerance
