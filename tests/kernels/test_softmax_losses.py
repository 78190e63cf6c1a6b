"""Operator sequence_recommendation_interaction: the sampled and full softmax references against row
loops, gradcheck, float32 logits, and the public functions' input checks; then the Triton backend
against the float64 reference through the public API.

Accuracy rule for the Triton backend (``assert_within_rule``, which states the allowances and why):
max|out - ref| <= 2 * max|out_torch - ref| + 1e-6 + (u32 * largest |logit| + 2 u16 for 16-bit gradients)
* max|ref|, where ref is the reference in float64 on the same (rounded) inputs and out_torch the
reference in the test dtype (whose logits are float32). On CPU the kernels run in the interpreter at small sizes in fp32/fp16; tests marked ``gpu``
run bf16 and full sizes on a CUDA machine.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import unittest.mock
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from cases import deterministic_algorithms
from cases import needs_triton as needs_triton_for
from cli import load_script

import hstu_kernels
from hstu_kernels.normalize import l2_normalize
from hstu_kernels.reference.softmax_losses import full_softmax_loss, sampled_softmax_loss

f64 = torch.float64


def sampled_loss_by_loop(states, pos_ids, neg_ids, item_table, temperature, l2_norm):
    """Row by row in float64: -log(e^pos / (e^pos + sum of e^neg over negatives that are not the positive))."""
    states, item_table = states.double(), item_table.double()
    losses = []
    for m in range(states.shape[0]):
        negatives = neg_ids if neg_ids.dim() == 1 else neg_ids[m]

        def logit(item):
            s, e = states[m], item_table[item]
            if l2_norm:
                s, e = s / s.norm().clamp_min(1e-6), e / e.norm().clamp_min(1e-6)
            return (s @ e) / temperature

        pos = logit(int(pos_ids[m]))
        neg = [logit(int(n)) for n in negatives if int(n) != int(pos_ids[m])]
        losses.append(torch.logsumexp(torch.stack([pos, *neg]), 0) - pos)
    return torch.stack(losses).mean()


def test_sampled_softmax_hand_computed():
    states = torch.tensor([[1.0, 0.0]], dtype=f64)
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=f64)
    pos, neg = torch.tensor([0]), torch.tensor([1, 2])
    dot = sampled_softmax_loss(states, pos, neg, table, temperature=1.0, l2_norm=False)
    torch.testing.assert_close(dot, torch.logsumexp(torch.tensor([1.0, 0.0, 2.0], dtype=f64), 0) - 1.0)
    cosine = sampled_softmax_loss(states, pos, neg, table, temperature=0.5, l2_norm=True)
    torch.testing.assert_close(cosine, torch.logsumexp(torch.tensor([2.0, 0.0, 2.0], dtype=f64), 0) - 2.0)


def test_sampled_softmax_masks_accidental_hits():
    states = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=f64)
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=f64)
    pos = torch.tensor([0, 1])
    # Row 0 drew its own positive twice: both copies are masked, leaving only item 2.
    neg = torch.tensor([[0, 2, 0], [0, 2, 2]])
    loss = sampled_softmax_loss(states, pos, neg, table, temperature=1.0, l2_norm=False)
    row0 = torch.logsumexp(torch.tensor([1.0, 2.0], dtype=f64), 0) - 1.0
    row1 = torch.logsumexp(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=f64), 0) - 1.0
    torch.testing.assert_close(loss, (row0 + row1) / 2)
    # Only hits: the positive alone, loss 0.
    alone = sampled_softmax_loss(states, pos, torch.tensor([[0, 0], [1, 1]]), table, temperature=1.0)
    torch.testing.assert_close(alone, torch.tensor(0.0, dtype=f64))


@given(
    rows=st.integers(1, 6), num_neg=st.integers(0, 8), num_items=st.integers(2, 10),
    shared=st.booleans(), l2_norm=st.booleans(), seed=st.integers(0, 2**16),
)
def test_sampled_softmax_matches_loop(rows, num_neg, num_items, shared, l2_norm, seed):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, 5, generator=gen)
    table = torch.randn(num_items, 5, generator=gen)
    pos = torch.randint(0, num_items, (rows,), generator=gen)
    neg = torch.randint(0, num_items, (num_neg,) if shared else (rows, num_neg), generator=gen)
    loss = sampled_softmax_loss(states, pos, neg, table, temperature=0.2, l2_norm=l2_norm)
    expected = sampled_loss_by_loop(states, pos, neg, table, 0.2, l2_norm)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), expected, atol=1e-4, rtol=1e-4)


def test_shared_negatives_equal_broadcast_per_row_negatives():
    gen = torch.Generator().manual_seed(2)
    states, table = torch.randn(5, 4, generator=gen, dtype=f64), torch.randn(8, 4, generator=gen, dtype=f64)
    pos, neg = torch.tensor([0, 3, 3, 7, 1]), torch.tensor([3, 5, 1, 1])
    shared = sampled_softmax_loss(states, pos, neg, table, temperature=0.1)
    per_row = sampled_softmax_loss(states, pos, neg.expand(5, 4), table, temperature=0.1)
    torch.testing.assert_close(shared, per_row)


@pytest.mark.parametrize("l2_norm", [True, False])
def test_full_softmax_matches_cross_entropy_and_sampled_over_all_items(l2_norm):
    gen = torch.Generator().manual_seed(3)
    states, table = torch.randn(6, 4, generator=gen, dtype=f64), torch.randn(9, 4, generator=gen, dtype=f64)
    pos = torch.tensor([0, 8, 3, 3, 5, 1])
    loss = full_softmax_loss(states, pos, table, temperature=0.05, l2_norm=l2_norm)
    if l2_norm:
        logits = F.cosine_similarity(states.unsqueeze(1), table.unsqueeze(0), dim=-1) / 0.05
    else:
        logits = states @ table.T / 0.05
    torch.testing.assert_close(loss, F.cross_entropy(logits, pos))
    # Every item as a shared negative: the positive's own copy is masked, which leaves the full softmax.
    sampled = sampled_softmax_loss(states, pos, torch.arange(9), table, temperature=0.05, l2_norm=l2_norm)
    torch.testing.assert_close(sampled, loss)


@pytest.mark.parametrize("l2_norm", [True, False])
@pytest.mark.parametrize("negatives", ["shared", "per_row", "full"])
def test_softmax_losses_gradcheck(l2_norm, negatives):
    gen = torch.Generator().manual_seed(4)
    states = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
    table = torch.randn(5, 4, generator=gen, dtype=f64, requires_grad=True)
    pos = torch.tensor([0, 2, 2])
    if negatives == "full":
        fn = lambda s, t: full_softmax_loss(s, pos, t, temperature=0.5, l2_norm=l2_norm)  # noqa: E731
    else:
        neg = torch.tensor([2, 1, 4, 1]) if negatives == "shared" else torch.tensor([[2, 1, 4], [2, 0, 3], [3, 3, 0]])
        fn = lambda s, t: sampled_softmax_loss(s, pos, neg, t, temperature=0.5, l2_norm=l2_norm)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (states, table))


def test_l2_norm_of_zero_vectors_gives_no_nan():
    states = torch.zeros(2, 4, requires_grad=True)
    table = torch.randn(5, 4)
    table[1] = 0.0
    table.requires_grad_()
    loss = sampled_softmax_loss(states, torch.tensor([1, 2]), torch.tensor([0, 1, 3]), table, temperature=0.05)
    loss = loss + full_softmax_loss(states, torch.tensor([1, 2]), table, temperature=0.05)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(states.grad).all() and torch.isfinite(table.grad).all()
    assert torch.equal(l2_normalize(torch.zeros(3, dtype=torch.float16)), torch.zeros(3, dtype=torch.float16))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_softmax_losses_low_precision_close_to_float64(dtype):
    gen = torch.Generator().manual_seed(5)
    states, table = torch.randn(16, 32, generator=gen), torch.randn(50, 32, generator=gen)
    pos, neg = torch.randint(0, 50, (16,), generator=gen), torch.randint(0, 50, (16, 10), generator=gen)
    for fn, args in ((sampled_softmax_loss, (pos, neg)), (full_softmax_loss, (pos,))):
        low = fn(states.to(dtype), *args, table.to(dtype), temperature=0.05)
        ref = fn(states.double(), *args, table.double(), temperature=0.05)
        assert low.dtype == torch.float32
        torch.testing.assert_close(low.double(), ref, atol=0.1, rtol=0.02)


def test_softmax_losses_errors():
    states, table = torch.randn(2, 4), torch.randn(5, 4)
    pos = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        hstu_kernels.full_softmax_loss(states, pos, table, temperature=0.0)
    with pytest.raises(ValueError, match="must share D"):
        hstu_kernels.full_softmax_loss(states, pos, torch.randn(5, 3), temperature=1.0)
    with pytest.raises(ValueError, match=r"pos_ids must be integer \[M=2\]"):
        hstu_kernels.sampled_softmax_loss(states, torch.tensor([0]), torch.tensor([1]), table, temperature=1.0)
    with pytest.raises(ValueError, match=r"neg_ids must be integer \[M=2, R\] or \[R\]"):
        hstu_kernels.sampled_softmax_loss(states, pos, torch.tensor([[1, 2]] * 3), table, temperature=1.0)
    with pytest.raises(ValueError, match="M = 0"):
        hstu_kernels.sampled_softmax_loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64), torch.tensor([1]), table, temperature=1.0)
    with pytest.raises(ValueError, match=r"reduction must be one of \('mean', 'none'\), got 'sum'"):
        hstu_kernels.full_softmax_loss(states, pos, table, temperature=1.0, reduction="sum")




# ---------------------------------------------------------------------------------------------
# Float32 logits whatever the input dtype (reference)
# ---------------------------------------------------------------------------------------------
def make_inputs(rows, dim, num_items, negatives, variant, dtype=torch.float32, seed=0, table_dtype=None, device="cpu"):
    """states [M, D], item table [I, D] (dtype, table_dtype), positives [M], negatives ([M, R] per row,
    [R] shared, None for the full softmax); every item id below num_items."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(rows, dim, generator=gen).to(device=device, dtype=dtype)
    table = torch.randn(num_items, dim, generator=gen).to(device=device, dtype=table_dtype or dtype)
    pos = torch.randint(0, num_items, (rows,), generator=gen).to(device)
    neg_shape = {"per-row": (rows, negatives), "shared": (negatives,)}.get(variant)
    neg = torch.randint(0, num_items, neg_shape, generator=gen).to(device) if neg_shape else None
    return states, pos, neg, table


def loss_of(states, pos, neg, table, temperature=0.05, l2_norm=True, backend="reference", **kw):
    if neg is None:
        return hstu_kernels.full_softmax_loss(states, pos, table, temperature=temperature, l2_norm=l2_norm,
                                              backend=backend, **kw)
    return hstu_kernels.sampled_softmax_loss(states, pos, neg, table, temperature=temperature, l2_norm=l2_norm,
                                             backend=backend, **kw)


VARIANTS = ["per-row", "shared", "full"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_logits_are_float32_for_low_precision_inputs(dtype, variant):
    """On the same (rounded) inputs, the 16-bit reference agrees with float64 to float32 accuracy: its
    matmuls run in float32. In the input dtype, logits near 1/T = 20 were off by up to 0.06 (bf16)."""
    states, pos, neg, table = make_inputs(40, 24, 30, 16, variant, dtype)
    low = loss_of(states, pos, neg, table)
    exact = loss_of(states.double(), pos, neg, table.double())
    assert low.dtype == torch.float32
    torch.testing.assert_close(low.double(), exact, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_under_autocast_keeps_float32_logits(variant):
    """Under autocast the model hands the loss float32 states and table: the logits stay float32 (the
    loss and both gradients equal those computed without autocast)."""
    states, pos, neg, table = make_inputs(12, 8, 20, 6, variant)
    results = []
    for autocast in (False, True):
        s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_of(s, pos, neg, t)
        loss.backward()
        results.append((loss, s.grad, t.grad))
    assert results[1][0].dtype == torch.float32 and results[1][1].dtype == torch.float32
    for plain, autocast in zip(*results):
        assert torch.equal(autocast, plain)


@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_mixed_dtypes_widen_to_float32(variant):
    """bf16 states against a float32 table (as autocast may produce): float32 logits, each gradient in
    its input's dtype."""
    states, pos, neg, table = make_inputs(10, 8, 20, 6, variant, torch.bfloat16, table_dtype=torch.float32)
    states.requires_grad_(), table.requires_grad_()
    loss = loss_of(states, pos, neg, table)
    loss.backward()
    exact = loss_of(states.double(), pos, neg, table.double())
    torch.testing.assert_close(loss.double(), exact, rtol=2e-6, atol=2e-6)
    assert states.grad.dtype == torch.bfloat16 and table.grad.dtype == torch.float32


def test_ids_outside_the_table_are_named_when_validating():
    states, pos, neg, table = make_inputs(3, 4, 5, 2, "per-row")
    with pytest.raises(ValueError, match=r"neg_ids must lie in \[0, 5\)"):
        hstu_kernels.sampled_softmax_loss(states, pos, neg + 5, table, temperature=1.0)
    with pytest.raises(ValueError, match=r"pos_ids must lie in \[0, 5\)"):
        hstu_kernels.full_softmax_loss(states, pos - 6, table, temperature=1.0)
    with pytest.raises(ValueError, match="item_table has no rows"):
        hstu_kernels.full_softmax_loss(states, pos, table[:0], temperature=1.0)


# ---------------------------------------------------------------------------------------------
# The Triton backend against the float64 reference
# ---------------------------------------------------------------------------------------------
HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
OP = "sequence_recommendation_interaction"
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_CUDA else [])
ATOL = 1e-6


needs_triton = needs_triton_for(OP)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def run_both(states, pos, neg, table, *, temperature=0.05, l2_norm=True, backend="triton", deterministic=False,
             states_grad=True, table_grad=True, upstream=None, scatter=None):
    """(loss, d states, d table) of ``backend`` and of the reference in float64 and in the input dtype,
    all on the same (rounded) inputs, for the upstream gradient 1.7 of the mean or, with ``upstream``
    (float32 [M]), each row's loss (``reduction="none"``) with its own upstream gradient.
    ``deterministic``: the Triton run in deterministic mode (sorted table scatter) with new memory filled
    with NaN, so that an output element left unwritten shows; otherwise the default mode (the table
    scatter ``DEFAULT_SCATTER``). ``scatter``: the Triton run with that table
    scatter (``forced_scatter``: new memory filled with NaN too)."""
    def run(name, s, t):
        s = s.detach().clone().requires_grad_(states_grad)
        t = t.detach().clone().requires_grad_(table_grad)
        if upstream is None:
            loss = loss_of(s, pos, neg, t, temperature=temperature, l2_norm=l2_norm, backend=name)
            (loss * 1.7).backward()
        else:
            loss = loss_of(s, pos, neg, t, temperature=temperature, l2_norm=l2_norm, backend=name, reduction="none")
            (loss * upstream.to(loss.dtype)).sum().backward()
        return loss.detach(), s.grad, t.grad

    with poisoned_memory(deterministic) if scatter is None else forced_scatter(scatter):
        ours = run(backend, states, table)
    exact = run("reference", states.double(), table.double())
    same_dtype = run("reference", states, table)
    return ours, exact, same_dtype


def poisoned_memory(enabled=True):
    """``cases.deterministic_algorithms`` (uninitialised memory NaN, so an unwritten output element
    shows) when ``enabled``, else nothing."""
    return deterministic_algorithms() if enabled else contextlib.nullcontext()


def scatter_as(scatter):
    """The Triton backend's default table scatter made ``scatter`` ("sort" or "atomic")."""
    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    return unittest.mock.patch.object(triton_losses, "DEFAULT_SCATTER", scatter)


@contextlib.contextmanager
def forced_scatter(scatter):
    """``scatter_as(scatter)`` with uninitialised memory NaN (deterministic mode's fill, with the
    kernels told that mode is off, so that "atomic" runs)."""
    with deterministic_algorithms(), scatter_as(scatter), \
            unittest.mock.patch.object(torch, "are_deterministic_algorithms_enabled", lambda: False):
        yield


def largest_logit(states, table, temperature, l2_norm) -> float:
    """An upper bound of |logit| over every (row, item) pair (Cauchy-Schwarz without ``l2_norm``)."""
    if l2_norm:
        return 1.0 / temperature
    return (states.double().norm(dim=1).max() * table.double().norm(dim=1).max()).item() / temperature


def assert_within_rule(results, dtype, logit_bound, names=("loss", "d states", "d table"), upstream_scale=1.0):
    """max|ours - ref64| <= 2 max|ref_dtype - ref64| + ATOL + allowance, per output (for gradients ATOL
    times ``upstream_scale``, the largest upstream gradient: gradients are linear in it), where the
    allowance (in units of the largest |ref| entry for gradients, absolute for the loss) is:

    - u32 * L, L the largest |logit| (at least 1): logits are float32 on both sides, but summed in a
      different order, so each carries its own rounding of u32 * |logit|, which every probability,
      hence the loss and each gradient, inherits in relative terms. The reference's own error can be
      smaller by luck (measured: up to 114 u32 * max|ref| apart at L ~ 500, dot-product logits);
    - for 16-bit gradients, 2 u16 more: the gradient matmuls take 16-bit operands (probabilities times
      inverse norms, or in fp16 times their mantissas, and the streamed rows as stored, or in fp16
      scaled by powers of two), as flash attention's backward does, where the reference keeps float32
      until its final rounding. Only the probabilities are rounded, so each error lies along a row the
      gradient sums, and the projection of the normalisation's gradient removes its part along the
      held row, as it removes that part of the exact sum: the error stays relative to the gradient
      even where the gradient is a small difference of large terms (nearly parallel rows).
    """
    ours, exact, same_dtype = results
    u32 = unit_roundoff(torch.float32)
    for name, got, ref, torch_out in zip(names, ours, exact, same_dtype):
        if ref is None:
            assert got is None, name
            continue
        assert got is not None and got.dtype == torch_out.dtype and got.shape == ref.shape, name
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        if not ref.numel():
            continue
        err = (got.double() - ref).abs().max().item()
        torch_err = (torch_out.double() - ref).abs().max().item()
        largest = ref.abs().max().item()
        if name == "loss":
            allowance = 2 * u32 * max(1.0, logit_bound)
        else:
            allowance = u32 * max(1.0, logit_bound) * largest
            if dtype != torch.float32:
                allowance += 2 * unit_roundoff(dtype) * largest
        bound = 2 * torch_err + ATOL * (1.0 if name == "loss" else upstream_scale) + allowance
        assert err <= bound, (f"{name}: max|ours - ref64| = {err:.3e} > {bound:.3e} (torch in {dtype}: {torch_err:.3e}, "
                              f"max|ref| {largest:.3e}, logits up to {logit_bound:.3g})")


def check(states, pos, neg, table, dtype=torch.float32, *, temperature=0.05, l2_norm=True, upstream=None, **kwargs):
    """The Triton backend against the float64 reference on these inputs (``run_both``), by the rule."""
    results = run_both(states, pos, neg, table, temperature=temperature, l2_norm=l2_norm, upstream=upstream, **kwargs)
    assert_within_rule(results, dtype, largest_logit(states, table, temperature, l2_norm),
                       upstream_scale=1.0 if upstream is None else upstream.abs().max().item())
    return results


def per_row_upstream(rows, scale=1.0, seed=0):
    """float32 [rows] upstream gradients of ``reduction="none"`` losses: uniform in [0, scale), about a
    third of them zero (the padding rows a packed batch leaves out)."""
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.rand(rows, generator=gen) * scale
    return torch.where(torch.rand(rows, generator=gen) < 1 / 3, 0.0, upstream).to(DEVICE)


def assert_close_float32(got, expected):
    """Two float32 computations of the same loss or gradient that sum in different orders: logits up to
    1/T = 20 carry 20 u32 of rounding each, relative to every probability, hence to the largest entry."""
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=40 * unit_roundoff(torch.float32) * expected.abs().max().item())


@dataclass(frozen=True)
class Case:
    """One loss call, described by plain values so hypothesis can print a failing example."""

    variant: str
    rows: int
    dim: int
    negatives: int
    num_items: int
    l2_norm: bool = True
    temperature: float = 0.05
    dtype: torch.dtype = torch.float32
    deterministic: bool = False
    seed: int = 0
    upstream: str = "mean"  # or "per-row": reduction="none" with ``per_row_upstream(rows, upstream_scale)``
    upstream_scale: float = 1.0
    scatter: str | None = None  # the Triton table scatter (``forced_scatter``); None: the default

    def inputs(self):
        return make_inputs(self.rows, self.dim, self.num_items, self.negatives, self.variant, self.dtype, self.seed,
                           device=DEVICE)

    def upstream_gradients(self):
        return None if self.upstream == "mean" else per_row_upstream(self.rows, self.upstream_scale, self.seed)


def check_case(case: Case):
    states, pos, neg, table = case.inputs()
    check(states, pos, neg, table, case.dtype, temperature=case.temperature, l2_norm=case.l2_norm,
          deterministic=case.deterministic, upstream=case.upstream_gradients(), scatter=case.scatter)


# The upstream gradient of a mean over 25,000 rows (the benchmark's M): 16-bit operands that carry it
# fall below fp16's normal range (6e-5) unless the kernels rescale them.
MEAN_OF_MANY_ROWS = 4e-5


@st.composite
def cases(draw, dtypes=tuple(TRITON_DTYPES), per_row=False):
    """Up to two blocks of rows and items and two chunks of negatives in the interpreter. D >= 2: at
    D = 1 every cosine is +-1 and the states' gradient is exactly zero, a difference of two terms of
    size rs / T, so its rounding has no scale to be measured against. ``per_row``: reduction="none"
    with per-row upstream gradients of scale 1 or ``MEAN_OF_MANY_ROWS``."""
    variant = draw(st.sampled_from(VARIANTS))
    case = Case(
        variant=variant, rows=draw(st.integers(1, 24)), dim=draw(st.sampled_from([2, 3, 16, 25, 50])),
        negatives=0 if variant == "full" else draw(st.integers(0, 12)), num_items=draw(st.integers(1, 24)),
        l2_norm=draw(st.booleans()), temperature=draw(st.sampled_from([0.05, 0.5, 1.0])),
        dtype=draw(st.sampled_from(dtypes)), deterministic=draw(st.booleans()), seed=draw(st.integers(0, 2**16)),
    )
    if per_row:
        case = dataclasses.replace(case, upstream="per-row",
                                   upstream_scale=draw(st.sampled_from([1.0, MEAN_OF_MANY_ROWS])))
    return case


@contextlib.contextmanager
def item_blocks_split_over_rows(enabled=True):
    """The launch plan of a large GPU: item-block programs split the rows among several programs."""
    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    target = (lambda device: 64) if enabled else triton_losses._programs_target
    with unittest.mock.patch.object(triton_losses, "_programs_target", target):
        yield


@needs_triton
@given(case=cases())
def test_triton_matches_reference_random(case: Case):
    check_case(case)


@needs_triton
@given(case=cases(per_row=True), split=st.booleans())
def test_triton_per_row_gradients_random(case: Case, split: bool):
    """reduction="none" with a random upstream gradient per row (zero for about a third of them), over
    every variant, dtype, mode and logit kind; ``split``: the item-block programs split the rows."""
    with item_blocks_split_over_rows(split):
        check_case(case)


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_several_blocks_and_tiles(variant, dtype):
    """More rows, negatives and items than one block or tile holds (interpreter blocks are 16)."""
    check_case(Case(variant, rows=37, dim=25, negatives=19 if variant != "full" else 0, num_items=45, dtype=dtype))


def clustered_inputs(rows, dim, num_items, negatives, variant, spread, seed=0):
    """fp16 inputs as ``make_inputs`` gives them, with states and items within about ``spread`` of one
    random direction: every cosine is near 1."""
    states, pos, neg, table = make_inputs(rows, dim, num_items, negatives, variant, seed=seed, device=DEVICE)
    direction = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE)
    return (direction + spread * states).half(), pos, neg, (direction + spread * table).half()


@needs_triton
@pytest.mark.parametrize("upstream_scale", [1.0, MEAN_OF_MANY_ROWS], ids=["unit-upstream", "mean-of-many-upstream"])
@pytest.mark.parametrize("variant", ["shared", "full"])
def test_triton_fp16_gradients_of_clustered_states_and_items(variant, upstream_scale):
    """States and items within 5% of one direction (cosine logits 19-20 at T = 0.05): since the
    dlogits of a row sum to zero, a state's gradient is the part of a weighted difference of nearly
    equal unit vectors orthogonal to the state, an order of magnitude below the terms it sums (an
    item's likewise). The fp16 gradient matmuls must round only what this cancellation removes: the
    probabilities (their errors lie along the unit vectors, and the projection, taken from the same
    sum, removes the part along the held row), not the normalised rows. (Per-row negatives take no
    16-bit matmul operands.)"""
    states, pos, neg, table = clustered_inputs(20, 8, 24, 10 if variant == "shared" else 0, variant, spread=0.05)
    check(states, pos, neg, table, torch.float16, upstream=per_row_upstream(20, upstream_scale))


@needs_triton
@pytest.mark.parametrize("l2_norm", [True, False], ids=["cosine", "dot"])
@pytest.mark.parametrize("variant", ["shared", "full"])
def test_triton_fp16_item_gradients_of_a_mean_over_many_rows(variant, l2_norm):
    """Per-row upstream gradients of the size a mean over 25,000 rows gives (4e-5): the fp16 item
    gradient matmul takes probabilities times them, below fp16's normal range unless rescaled."""
    check_case(Case(variant, rows=37, dim=25, negatives=19 if variant != "full" else 0, num_items=45,
                    dtype=torch.float16, l2_norm=l2_norm, temperature=0.05 if l2_norm else 1.0, upstream="per-row",
                    upstream_scale=MEAN_OF_MANY_ROWS))


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_per_row_losses_take_per_row_gradients(variant, deterministic):
    """reduction="none": each row's loss, and a gradient per row (zero for the padding rows a packed
    batch leaves out), as the reference gives in float64."""
    states, pos, neg, table = make_inputs(37, 25, 45, 19 if variant != "full" else 0, variant, device=DEVICE)
    ours, _, _ = check(states, pos, neg, table, deterministic=deterministic, upstream=per_row_upstream(37))
    assert ours[0].shape == (37,)


@needs_triton
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("variant", ["shared", "full"])
def test_triton_fp16_all_zero_per_row_gradients(variant, deterministic):
    """reduction="none" with every row's upstream gradient zero (a batch that is all padding): the fp16
    item-gradient matmul divides the gradients by their largest magnitude, which is then 0 and must be
    taken as 1 (0 / 0 would make the table's gradient NaN). Both gradients are exactly zero, as the
    reference's (the rule's bound is 0 for gradients here: its upstream scale and max|ref| are 0)."""
    states, pos, neg, table = make_inputs(37, 25, 45, 19 if variant != "full" else 0, variant, torch.float16,
                                          device=DEVICE)
    upstream = torch.zeros(37, device=DEVICE)
    ours, exact, _ = check(states, pos, neg, table, torch.float16, deterministic=deterministic, upstream=upstream)
    for name, got, ref in zip(("d states", "d table"), ours[1:], exact[1:]):
        assert not ref.any() and torch.equal(got, torch.zeros_like(got)), f"{name}: not all zero"


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_one_row_one_item_and_only_hits(variant):
    check_case(Case(variant, rows=1, dim=2, negatives=0 if variant == "full" else 4, num_items=1))
    check_case(Case(variant, rows=5, dim=16, negatives=0 if variant == "full" else 3, num_items=1, l2_norm=False))


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_clamped_norms_zero_and_tiny_vectors(variant):
    """States and items of norm 0 and below eps (the normalisation clamps; its gradient has no projection
    term there) next to ordinary ones."""
    states, pos, neg, table = make_inputs(9, 8, 12, 5, variant, device=DEVICE)
    states[1] = 0.0
    states[2] *= 1e-8
    table[pos[3]] = 0.0
    table[pos[4]] *= 1e-8
    if neg is not None:
        table[neg.reshape(-1)[-1]] *= 3e-8
    check(states, pos, neg, table)


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_strided_inputs_int32_ids_and_a_table_view(variant):
    """States and table as column slices of wider tensors, the table a view past its padding row,
    int32 ids, negatives sliced out of a wider [M, 2R] tensor."""
    states, pos, neg, table = make_inputs(11, 10, 14, 6, variant, device=DEVICE)
    wide_states = torch.randn(11, 16, device=DEVICE)
    wide_states[:, 3:13] = states
    padded_table = torch.randn(15, 12, device=DEVICE)
    padded_table[1:, :10] = table
    if neg is not None:  # every other column (per row) or entry (shared) of a wider tensor
        neg = torch.stack([neg, neg.flip(-1)], dim=-1).flatten(-2).to(torch.int32)[..., ::2]
        assert not neg.is_contiguous()
    check(wide_states[:, 3:13], pos.to(torch.int32), neg, padded_table[1:, :10])


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_mixed_dtypes_use_float32_operands(variant):
    """fp16 states against a float32 table: both meet in float32, gradients in each input's dtype."""
    states, pos, neg, table = make_inputs(13, 25, 17, 7, variant, torch.float16, table_dtype=torch.float32,
                                          device=DEVICE)
    ours, exact, same_dtype = run_both(states, pos, neg, table)
    assert ours[1].dtype == torch.float16 and ours[2].dtype == torch.float32
    bound = largest_logit(states, table, 0.05, True)
    assert_within_rule((ours[:1] + ours[2:], exact[:1] + exact[2:], same_dtype[:1] + same_dtype[2:]), torch.float32,
                       bound, names=("loss", "d table"))
    assert_within_rule((ours[1:2], exact[1:2], same_dtype[1:2]), torch.float16, bound, names=("d states",))


@needs_triton
@pytest.mark.parametrize("frozen", ["states", "table"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_one_input_frozen(variant, frozen):
    states, pos, neg, table = make_inputs(10, 8, 12, 5, variant, device=DEVICE)
    check(states, pos, neg, table, states_grad=frozen != "states", table_grad=frozen != "table")


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_deterministic_mode_bitwise_repeatable_and_close_to_atomics(variant):
    """Deterministic mode (sorted scatter, no atomics; uninitialised memory filled with NaN) gives the
    same bits twice, and agrees with the default (atomic) path."""
    states, pos, neg, table = make_inputs(23, 12, 9, 7, variant, device=DEVICE)
    runs = [run_both(states, pos, neg, table, deterministic=deterministic)[0] for deterministic in (True, True, False)]
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    for a, b in zip(runs[0], runs[2]):
        assert_close_float32(a, b)


@needs_triton
@pytest.mark.parametrize("upstream", ["mean", "per-row"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("variant", ["shared", "full"])
def test_triton_item_blocks_split_over_rows(variant, deterministic, upstream):
    """Item-block programs sum over several splits of the rows (few item blocks, a large GPU), each
    split's rows with their own upstream gradients."""
    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    states, pos, neg, table = make_inputs(50, 8, 20, 9, variant, device=DEVICE)
    assert triton_losses._row_splits(50, 20, triton_losses._tiled_config("items", 16, False), 64)[0] > 1
    with item_blocks_split_over_rows():
        check(states, pos, neg, table, deterministic=deterministic,
              upstream=per_row_upstream(50) if upstream == "per-row" else None)


# ---------------------------------------------------------------------------------------------
# Per-row negatives: the table scatters ("atomic", the default; "sort", deterministic mode's), forced
# over random shapes
# ---------------------------------------------------------------------------------------------
SCATTERS = ["sort", "atomic"]


@st.composite
def per_row_cases(draw, dtypes=tuple(TRITON_DTYPES)):
    """Per-row negatives: one row to two blocks, D aligned (8 in fp16, 64) or not (2, 3, 25, 50: a
    zero-padded copy is gathered), few items (each in most rows) or many."""
    return Case(
        "per-row", rows=draw(st.integers(1, 24)), dim=draw(st.sampled_from([2, 3, 8, 25, 50, 64])),
        negatives=draw(st.integers(0, 20)), num_items=draw(st.one_of(st.integers(1, 3), st.integers(4, 64))),
        l2_norm=draw(st.booleans()), temperature=draw(st.sampled_from([0.05, 0.5, 1.0])),
        dtype=draw(st.sampled_from(dtypes)), seed=draw(st.integers(0, 2**16)),
        upstream=draw(st.sampled_from(["mean", "per-row"])))


@needs_triton
@pytest.mark.parametrize("scatter, occurrences_per_program", [("sort", 1024), ("sort", 4), ("atomic", 1024)],
                         ids=["sort", "sort-split", "atomic"])
@given(case=per_row_cases())
def test_triton_per_row_scatters_random(scatter, occurrences_per_program, case: Case):
    """Each table scatter against the float64 reference, forward and backward, new memory NaN;
    "sort-split": the sorted sums of an item split among programs of 4 occurrences."""
    with unittest.mock.patch.object(importlib.import_module("hstu_kernels.triton.softmax_losses"),
                                    "OCCURRENCES_PER_PROGRAM", occurrences_per_program):
        check_case(dataclasses.replace(case, scatter=scatter))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("scatter", SCATTERS)
def test_triton_per_row_heavy_duplication(scatter, dtype):
    """Two items, 300 rows of 20 negatives: each table row gathers about 3,000 occurrences (summed by
    13 programs an item in the sort, piled onto the same addresses by the atomics); the sort gives the
    same bits twice."""
    states, pos, neg, table = make_inputs(300, 50, 2, 20, "per-row", dtype, device=DEVICE)
    ours = check(states, pos, neg, table, dtype, scatter=scatter)[0]
    if scatter == "sort":
        with unittest.mock.patch.object(importlib.import_module("hstu_kernels.triton.softmax_losses"),
                                        "OCCURRENCES_PER_PROGRAM", 256):
            split = run_both(states, pos, neg, table, scatter="sort")[0]
            again = run_both(states, pos, neg, table, scatter="sort")[0]
        for a, b, c in zip(ours, split, again):
            assert_close_float32(b, a)
            assert torch.equal(b, c)


@needs_triton
@pytest.mark.parametrize("frozen", ["states", "table"])
@pytest.mark.parametrize("scatter", SCATTERS)
def test_triton_per_row_one_input_frozen(scatter, frozen):
    """Only the table's (the sort still stores each occurrence's weight) or only the states' gradient."""
    states, pos, neg, table = make_inputs(21, 25, 9, 13, "per-row", device=DEVICE)
    check(states, pos, neg, table, states_grad=frozen != "states", table_grad=frozen != "table", scatter=scatter)


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
def test_triton_per_row_many_items(scatter):
    """400 items for 20 rows of 10 negatives: most table rows occur nowhere and must get zero gradients."""
    states, pos, neg, table = make_inputs(20, 50, 400, 10, "per-row", device=DEVICE)
    ours = check(states, pos, neg, table, scatter=scatter)[0]
    untouched = torch.ones(400, dtype=torch.bool, device=DEVICE)
    untouched[pos] = False
    untouched[neg.reshape(-1)] = False
    assert untouched.sum() > 200 and not ours[2][untouched].any()


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("scatter", SCATTERS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_rows_give_no_losses_and_zero_gradients(variant, scatter, backend):
    """M = 0 with reduction="none" (a mean over no rows is refused): no losses, zero table gradients."""
    if variant == "full" and scatter == "atomic":
        pytest.skip("the full softmax has no table scatter")
    _, _, neg, table = make_inputs(1, 50, 7, 5, variant, device=DEVICE)
    states = torch.randn(0, 50, device=DEVICE, requires_grad=True)
    table.requires_grad_()
    pos = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    if variant == "per-row":
        neg = neg[:0]
    with forced_scatter(scatter):
        losses = loss_of(states, pos, neg, table, backend=backend, reduction="none")
        losses.sum().backward()
    assert losses.shape == (0,) and states.grad.shape == (0, 50)
    assert torch.equal(table.grad, torch.zeros_like(table))


@needs_triton
def test_triton_default_table_scatter_is_atomic_and_deterministic_mode_sorts():
    """Without a named scatter the backward sums the table gradient with atomics, whatever the ids
    (one item everywhere, or spread); deterministic algorithms switch it to the sorted sums."""
    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    states, pos, neg, table = make_inputs(12, 8, 6, 20, "per-row", device=DEVICE)
    chosen = []

    def spy_backward(*args):
        chosen.append(args[-1])
        return backward(*args)

    backward = triton_losses._per_row_backward
    with unittest.mock.patch.object(triton_losses, "_per_row_backward", spy_backward):
        for ids in (neg, torch.full_like(neg, 3), neg[:, :4]):
            s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
            loss_of(s, pos, ids, t, backend="triton").backward()
        with deterministic_algorithms():
            s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
            loss_of(s, pos, neg, t, backend="triton").backward()
    assert chosen == ["atomic", "atomic", "atomic", "sort"]


@needs_triton
@pytest.mark.parametrize("variant", ["per-row", "shared"])
def test_triton_scatter_argument_reaches_the_backward(variant):
    """The Triton function's ``scatter`` picks the backward's table scatter (the benchmark's variants);
    deterministic mode takes "sort" whatever it says; other values are refused."""
    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    states, pos, neg, table = make_inputs(9, 8, 12, 5, variant, device=DEVICE)
    seen = []
    backward = triton_losses.softmax_loss_backward

    def spy(*args):
        seen.append(args[-1])
        return backward(*args)

    results = {}
    with unittest.mock.patch.object(triton_losses, "softmax_loss_backward", spy):
        for scatter, deterministic in (("sort", False), ("atomic", False), (None, False), ("atomic", True)):
            s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
            with poisoned_memory(deterministic):
                loss = triton_losses.sampled_softmax_loss(s, pos, neg, t, temperature=0.05, scatter=scatter)
                loss.backward()
            results[scatter, deterministic] = (loss, s.grad, t.grad)
    assert seen == ["sort", "atomic", "", "atomic"]
    for a, b in zip(results["sort", False], results["atomic", True]):
        assert torch.equal(a, b)  # deterministic: the sort
    for a, b in zip(results["sort", False], results["atomic", False]):
        assert_close_float32(a, b)
    with pytest.raises(ValueError, match="scatter must be one of"):
        triton_losses.sampled_softmax_loss(states, pos, neg, table, temperature=0.05, scatter="segmented")


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
@pytest.mark.parametrize("variant", ["per-row", "shared"])
def test_triton_custom_ops_opcheck_with_scatter(variant, scatter):
    """opcheck on both custom ops with the scatter argument given (it defaults to "" otherwise)."""
    ops = triton_ops()
    states, pos, neg, table = make_inputs(6, 8, 10, 4, variant, device=DEVICE)
    args = (states.requires_grad_(), pos, neg, table.requires_grad_(), 0.05, True, scatter)
    torch.library.opcheck(ops.softmax_loss_fwd.default, args)
    losses, lse, rs, norms = ops.softmax_loss_fwd(*args)
    torch.library.opcheck(ops.softmax_loss_bwd.default,
                          (torch.rand(losses.shape, device=DEVICE), states.detach(), pos, neg, table.detach(), lse, rs,
                           norms, 0.05, True, True, True, False, scatter))


@needs_triton
def test_triton_autocast_sees_the_inputs_as_given():
    """Under autocast (fp16 here: the interpreter cannot run bf16) the float32 inputs stay float32: the
    same bits as without autocast, as the reference keeps its logits float32."""
    for variant in VARIANTS:
        states, pos, neg, table = make_inputs(10, 8, 12, 5, variant, device=DEVICE)
        with torch.autocast(DEVICE.type, dtype=torch.float16):
            inside = loss_of(states, pos, neg, table, backend="triton")
            reference = loss_of(states, pos, neg, table)
        outside = loss_of(states, pos, neg, table, backend="triton")
        assert inside.dtype == torch.float32 and torch.equal(inside, outside)
        assert_close_float32(inside, reference)


def triton_ops():
    importlib.import_module("hstu_kernels.triton.softmax_losses")
    return torch.ops.hstu_kernels


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_custom_ops_opcheck(variant):
    """torch.library.opcheck on the forward and backward custom ops (schema, fake, autograd, AOT dispatch)."""
    ops = triton_ops()
    states, pos, neg, table = make_inputs(6, 8, 10, 4, variant, device=DEVICE)
    args = (states.requires_grad_(), pos, neg, table.requires_grad_(), 0.05, True)
    torch.library.opcheck(ops.softmax_loss_fwd.default, args)
    losses, lse, rs, norms = ops.softmax_loss_fwd(*args)
    torch.library.opcheck(ops.softmax_loss_bwd.default,
                          (torch.rand(losses.shape, device=DEVICE), states.detach(), pos, neg, table.detach(), lse, rs, norms,
                           0.05, True, True, True, False))


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_eager_path_equals_custom_op(variant):
    """Eager calls skip the dispatcher (autograd.Function over the same launchers): bitwise the custom op
    (in deterministic mode: on a GPU the default table scatter adds with atomics, in any order)."""
    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    states, pos, neg, table = make_inputs(9, 8, 12, 5, variant, device=DEVICE)
    outputs = []
    for apply in (triton_losses._softmax_loss, triton_losses._softmax_loss.forward_op):
        s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
        with poisoned_memory():
            losses = apply(s, pos, neg, t, 0.05, True)[0]
            losses.backward(torch.linspace(0.5, 1.5, losses.shape[0], device=DEVICE))
        outputs.append((losses, s.grad, t.grad))
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def eager_and_compiled(states, pos, neg, table, upstream=None, **compile_options):
    """(loss, d states, d table) of the Triton backend called eagerly, then under torch.compile(fullgraph=True),
    in deterministic mode (the default table scatter's atomics add in any order on a GPU); with
    ``upstream``, each row's loss (reduction="none"), its backward fed ``upstream``."""
    import torch._dynamo as dynamo

    def f(s, t):
        return loss_of(s, pos, neg, t, backend="triton", validate=False,
                       reduction="mean" if upstream is None else "none")

    results = []
    for fn in (f, torch.compile(f, fullgraph=True, **compile_options)):
        s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
        with poisoned_memory():
            loss = fn(s, t)
            loss.backward(upstream)
        results.append((loss, s.grad, t.grad))
    dynamo.reset()
    return results


@needs_triton
@pytest.mark.parametrize("upstream", ["mean", "per-row"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_triton_compiled_forward_backward_matches_eager(variant, upstream):
    """torch.compile(fullgraph=True) of a function calling the Triton backend: one graph, same numbers."""
    eager, compiled = eager_and_compiled(*make_inputs(9, 8, 12, 5, variant, device=DEVICE), backend="aot_eager",
                                         upstream=per_row_upstream(9) if upstream == "per-row" else None)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
def test_triton_compiled_with_a_scatter_matches_eager(scatter):
    """torch.compile(fullgraph=True) of the Triton function called with ``scatter``: the string reaches the
    custom ops in the graph, the same numbers as eager (bitwise but for the GPU's atomics, which add in
    any order)."""
    import torch._dynamo as dynamo

    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    states, pos, neg, table = make_inputs(9, 8, 4, 5, "per-row", device=DEVICE)
    seen = []
    backward = triton_losses.softmax_loss_backward

    def spy(*args):
        seen.append(args[-1])
        return backward(*args)

    def f(s, t):
        return triton_losses.sampled_softmax_loss(s, pos, neg, t, temperature=0.05, scatter=scatter)

    results = []
    with unittest.mock.patch.object(triton_losses, "softmax_loss_backward", spy):
        for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
            s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
            loss = fn(s, t)
            loss.backward()
            results.append((loss, s.grad, t.grad))
    dynamo.reset()
    assert seen == [scatter, scatter]
    for a, b in zip(*results):
        if scatter == "sort" or not HAS_CUDA:
            assert torch.equal(a, b)
        else:
            assert_close_float32(a, b)


@needs_triton
def test_manager_falls_back_where_the_kernels_cannot_run():
    from hstu_kernels.manager import TritonOperatorManager

    wide, narrow = torch.randn(2, 513), torch.randn(2, 8)
    assert "embedding dim 513" in TritonOperatorManager.unsupported_reason(OP, (wide, wide))
    assert "float64" in TritonOperatorManager.unsupported_reason(OP, (narrow.double(), narrow))
    assert TritonOperatorManager.unsupported_reason(OP, (narrow.half(), narrow)) is None
    manager = TritonOperatorManager({OP: True})
    states, pos, neg, table = make_inputs(4, 8, 6, 3, "per-row", torch.float64)
    loss_of(states, pos, neg, table, backend=manager)
    assert manager.get_stats()[OP]["calls"] == {"triton": 0, "reference": 1}


@needs_triton
@pytest.mark.parametrize("masked", [False, True], ids=["all-rows", "row-mask"])
@pytest.mark.parametrize("kind, shared", [("sampled", False), ("sampled", True), ("full", False)])
def test_model_loss_runs_triton_and_matches_the_reference(kind, shared, masked):
    """The model's RecLoss (ids from 1, the padding row skipped for the full softmax, negatives drawn
    in the call, validate off) through the manager: the same loss and gradients with the flag on and off;
    ``masked``: a packed batch's row mask (per-row losses, the padding rows left out)."""
    from hstu.model.loss import RecLoss

    states, pos, _, table = make_inputs(14, 8, 11, 0, "full", device=DEVICE)
    row_mask = torch.arange(14, device=DEVICE) % 4 != 1 if masked else None
    results = []
    for flag in (False, True):
        manager = hstu_kernels.TritonOperatorManager({OP: flag})
        loss_fn = RecLoss(manager, kind=kind, num_negatives=6, temperature=0.05, shared_negatives=shared)
        s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
        torch.manual_seed(3)
        loss = loss_fn(s, pos.clamp_min(1), t, row_mask=row_mask)
        loss.backward()
        assert manager.get_stats()[OP]["calls"]["triton" if flag else "reference"] == 1
        if masked:
            assert not s.grad[~row_mask].any()
        results.append((loss, s.grad, t.grad))
    for a, b in zip(*results):
        assert_close_float32(a, b)


@needs_triton
@pytest.mark.parametrize("flag", [False, True], ids=["reference", "triton"])
@pytest.mark.parametrize("kind, shared", [("sampled", False), ("sampled", True), ("full", False)])
def test_model_loss_keeps_non_finite_padding_rows_out(kind, shared, flag):
    """Rows a packed batch's row mask leaves out may hold anything: with NaN states there, the loss and
    both gradients are those with zeros there (the padding rows' state gradients zero)."""
    from hstu.model.loss import RecLoss

    states, pos, _, table = make_inputs(14, 8, 11, 0, "full", device=DEVICE)
    row_mask = torch.arange(14, device=DEVICE) % 4 != 1
    loss_fn = RecLoss(hstu_kernels.TritonOperatorManager({OP: flag}), kind=kind, num_negatives=6, temperature=0.05,
                      shared_negatives=shared)
    results = []
    for padding in (0.0, float("nan")):
        s = torch.where(row_mask.unsqueeze(-1), states, padding).requires_grad_()
        t = table.clone().requires_grad_()
        torch.manual_seed(3)
        loss = loss_fn(s, pos.clamp_min(1), t, row_mask=row_mask)
        loss.backward()
        results.append((loss, s.grad, t.grad))
    assert not results[1][1][~row_mask].any()
    for zeros, nans in zip(*results):
        assert torch.equal(zeros, nans)


@needs_triton
@pytest.mark.parametrize("kind", ["sampled", "full"])
def test_compiled_model_loss_reuses_its_graph_across_row_counts(kind):
    """model.compile=true compiles the loss with dynamic shapes: new row counts (jagged batches) reuse
    the graph, whose custom ops trace with symbolic sizes, without graph breaks."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    from hstu.model.loss import RecLoss

    manager = hstu_kernels.TritonOperatorManager({OP: True})
    loss_fn = RecLoss(manager, kind=kind, num_negatives=6, temperature=0.05)
    states, pos, _, table = make_inputs(4, 8, 11, 0, "full")
    loss_fn(states, pos.clamp_min(1), table)  # one eager call first: the manager's function cache is filled then
    loss_fn.compile(dynamic=True, backend="eager")
    dynamo.reset()
    counters.clear()
    for rows in (5, 9, 17, 23):
        states, pos, _, table = make_inputs(rows, 8, 11, 0, "full", seed=rows)
        states.requires_grad_(), table.requires_grad_()
        loss_fn(states, pos.clamp_min(1), table).backward()
        assert torch.isfinite(states.grad).all() and torch.isfinite(table.grad).all()
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1
    assert manager.get_stats()[OP]["traced"] == {"triton": 1} and not manager.fallbacks()


# ---------------------------------------------------------------------------------------------
# Benchmark cases
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_case_per_variant_and_shapes_that_do_not_fit(variant):
    from hstu_kernels.benchmarking import ProviderUnavailable

    spec = hstu_kernels.REGISTRY[OP].bench
    options = argparse.Namespace(seed=0, variant=variant, validate=True)
    fits, misfits = (5, 4, 0, 7), (5, 4, 3, 7)
    if variant != "full":
        fits, misfits = misfits, fits
    case = spec.build(fits, torch.float32, torch.device("cpu"), options)
    torch.testing.assert_close(case.call("reference"), case.eager_call())
    assert case.work["fwd+bwd"] == 3 * case.work["fwd"] == 3 * 2 * 5 * 4 * (7 if variant == "full" else 4)
    misfit = spec.build(misfits, torch.float32, torch.device("cpu"), options)
    with pytest.raises(ProviderUnavailable, match="R = 0"):
        misfit.call("reference")
    with pytest.raises(SystemExit, match="--variant 'both'"):
        spec.build(fits, torch.float32, torch.device("cpu"), argparse.Namespace(seed=0, variant="both"))


@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_bench_harness_runs_every_variant(variant, tmp_path, monkeypatch, capsys):
    """The harness end to end at a tiny shape: Triton and the reference, fwd+bwd, rows in the CSV."""
    bench = load_script("bench_kernels", monkeypatch)
    shape = "6,8,0,9" if variant == "full" else "6,8,3,9"
    csv_path = tmp_path / "bench.csv"
    bench.main(["--op", OP, "--variant", variant, "--shapes", shape, "--providers", "triton,reference",
                "--mode", "fwd+bwd", "--dtype", "fp32", "--csv", str(csv_path), "--rep", "3", "--warmup", "1"])
    rows = [dict(zip(*(line.split(",") for line in (csv_path.read_text().splitlines()[0], line))))
            for line in csv_path.read_text().splitlines()[1:]]
    assert [(r["provider"], r["variant"]) for r in rows] == [(p, variant) for p in ("reference", "triton")]
    assert all(float(r["ms"]) > 0 and not r["note"] for r in rows)


@needs_triton
@pytest.mark.parametrize("variant", ["per-row-sort", "per-row-atomic", "shared-sort", "shared-atomic"])
def test_bench_case_scatter_variants(variant):
    """A sampled variant with a scatter named: the reference and eager as for the plain variant, the
    Triton provider's backward with that scatter."""
    triton_losses = importlib.import_module("hstu_kernels.triton.softmax_losses")
    spec = hstu_kernels.REGISTRY[OP].bench
    case = spec.build((5, 4, 3, 7), torch.float32, torch.device("cpu"), argparse.Namespace(seed=0, variant=variant))
    reference = case.call("reference")
    torch.testing.assert_close(reference, case.eager_call())
    seen = []
    backward = triton_losses.softmax_loss_backward

    def spy(*args):
        seen.append(args[-1])
        return backward(*args)

    with unittest.mock.patch.object(triton_losses, "softmax_loss_backward", spy):
        loss = case.call("triton")
        loss.backward()
    assert seen == [variant.rsplit("-", 1)[1]]
    assert_close_float32(loss, reference)


@needs_triton
@pytest.mark.parametrize("variant", ["per-row-sort", "per-row-atomic"])
def test_bench_harness_runs_scatter_variants(variant, tmp_path, monkeypatch):
    """The harness end to end with a scatter variant: Triton and the reference, rows in the CSV."""
    bench = load_script("bench_kernels", monkeypatch)
    csv_path = tmp_path / "bench.csv"
    bench.main(["--op", OP, "--variant", variant, "--shapes", "6,8,3,9", "--providers", "triton,reference",
                "--mode", "fwd+bwd", "--dtype", "fp32", "--csv", str(csv_path), "--rep", "3", "--warmup", "1"])
    rows = [dict(zip(*(line.split(",") for line in (csv_path.read_text().splitlines()[0], line))))
            for line in csv_path.read_text().splitlines()[1:]]
    assert [(r["provider"], r["variant"]) for r in rows] == [(p, variant) for p in ("reference", "triton")]
    assert all(float(r["ms"]) > 0 and not r["note"] for r in rows)


# ---------------------------------------------------------------------------------------------
# GPU: bf16 at the benchmark's sizes, CUDA graphs, autocast, no host syncs
# ---------------------------------------------------------------------------------------------
GPU_CASES = [  # the benchmark targets (M = 25,000, D 50 / 256, R 128 / 512, I up to 100,000); M smaller where
    # the float64 reference would hold [M, R, D] or [M, I] of several GB
    Case("per-row", 25000, 50, 128, 3706, dtype=torch.bfloat16),
    Case("per-row", 4096, 256, 512, 26744, dtype=torch.bfloat16),
    Case("per-row", 25000, 50, 512, 3706, dtype=torch.bfloat16, deterministic=True),
    Case("shared", 25000, 50, 128, 3706, dtype=torch.bfloat16),
    Case("shared", 25000, 256, 512, 26744, dtype=torch.bfloat16, deterministic=True),
    Case("full", 25000, 50, 0, 3706, dtype=torch.bfloat16),
    Case("full", 8192, 256, 0, 26744, dtype=torch.bfloat16),
    Case("full", 2048, 50, 0, 100_000, dtype=torch.bfloat16),
    Case("full", 4096, 256, 0, 3706, dtype=torch.float16, l2_norm=False, temperature=1.0),
    Case("per-row", 3000, 50, 128, 3706, dtype=torch.float32, l2_norm=False, temperature=1.0),
    # reduction="none" with per-row upstream gradients, in fp16 at the scale of a mean over 25,000 rows
    Case("per-row", 25000, 50, 128, 3706, dtype=torch.bfloat16, upstream="per-row"),
    Case("shared", 25000, 256, 512, 26744, dtype=torch.bfloat16, deterministic=True, upstream="per-row"),
    Case("full", 25000, 50, 0, 3706, dtype=torch.float16, upstream="per-row", upstream_scale=MEAN_OF_MANY_ROWS),
    Case("full", 8192, 256, 0, 26744, dtype=torch.float16, upstream="per-row", upstream_scale=MEAN_OF_MANY_ROWS),
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c.variant}-{c.rows}x{c.dim}x{c.negatives}x{c.num_items}-"
                         f"{str(c.dtype)[6:]}{'-det' if c.deterministic else ''}"
                         f"{'-rows' if c.upstream == 'per-row' else ''}")
def test_gpu_full_size(case):
    check_case(case)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_edge_cases_bf16(variant):
    """bf16 at the model's widths with one row, one item, no negatives, only hits, and more rows than a block."""
    negatives = 0 if variant == "full" else 5
    for case in (Case(variant, 1, 50, negatives, 1, dtype=torch.bfloat16),
                 Case(variant, 3, 256, 0, 7, dtype=torch.bfloat16),
                 Case(variant, 333, 50, negatives, 2, dtype=torch.bfloat16, deterministic=True),
                 Case(variant, 1000, 256, negatives, 900, dtype=torch.bfloat16, l2_norm=False, temperature=1.0)):
        check_case(case)


def masked_mean(losses, row_mask):
    """The mean over a packed batch's real rows, as ``hstu.model.loss.RecLoss`` takes it."""
    return torch.where(row_mask, losses, 0.0).sum() / row_mask.sum().clamp_min(1)


def padding_mask(rows, seed):
    """bool [rows]: a packed batch's real rows (True), with a padding run at the end and a few inside."""
    gen = torch.Generator().manual_seed(seed)
    return ((torch.arange(rows) < rows - rows // 10) & (torch.rand(rows, generator=gen) > 0.05)).to(DEVICE)


def warm_up_on_a_side_stream(step, *leaves):
    """``step()`` twice on a side stream, the leaves' gradients reset before each: its kernels compile
    before a CUDA graph captures it."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for leaf in leaves:
                leaf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "row-mask"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_cuda_graph_replays_match_eager(variant, deterministic, reduction):
    """Forward and backward captured in one CUDA graph, the negatives drawn in it by torch.randint as the
    model draws them: replays with new inputs copied in match eager calls on the negatives each replay
    drew, and two replays draw different negatives. "row-mask": per-row losses (reduction="none")
    averaged over the rows of a row mask copied in with the inputs, as the model's loss on packed batches."""
    rows, dim, num_items, negatives = 3000, 50, 3706, 128
    shape = {"per-row": (rows, negatives), "shared": (negatives,)}.get(variant)
    states, pos, _, table = make_inputs(rows, dim, num_items, 0, "full", torch.bfloat16, seed=0, device=DEVICE)
    static_states, static_table = states.clone().requires_grad_(), table.clone().requires_grad_()
    static_pos = pos.clone()
    static_mask = padding_mask(rows, seed=0)

    def loss_on(s, p, neg, t, mask, **kw):
        if reduction == "mean":
            return loss_of(s, p, neg, t, backend="triton", **kw)
        return masked_mean(loss_of(s, p, neg, t, backend="triton", reduction="none", **kw), mask)

    def step():
        neg = torch.randint(0, num_items, shape, device=DEVICE) if shape else None
        loss = loss_on(static_states, static_pos, neg, static_table, static_mask, validate=False)
        loss.backward()
        return loss, neg

    with poisoned_memory(deterministic):
        warm_up_on_a_side_stream(step, static_states, static_table)
        static_states.grad = static_table.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss, static_neg = step()
        drawn = []
        for seed in (1, 2):
            new_states, new_pos, _, new_table = make_inputs(rows, dim, num_items, 0, "full", torch.bfloat16, seed=seed,
                                                            device=DEVICE)
            new_mask = padding_mask(rows, seed)
            with torch.no_grad():
                static_states.copy_(new_states)
                static_table.copy_(new_table)
                static_pos.copy_(new_pos)
                static_mask.copy_(new_mask)
            graph.replay()
            neg = static_neg.clone() if static_neg is not None else None
            drawn.append(neg)
            s, t = new_states.clone().requires_grad_(), new_table.clone().requires_grad_()
            loss = loss_on(s, new_pos, neg, t, new_mask)
            loss.backward()
            assert torch.equal(static_loss, loss) and torch.equal(static_states.grad, s.grad)
            if deterministic:
                assert torch.equal(static_table.grad, t.grad)
            else:  # float32 atomics add in another order each run: after the bf16 rounding, one bf16 step apart
                torch.testing.assert_close(static_table.grad, t.grad, rtol=2 ** -7, atol=2 ** -8 * t.grad.abs().max().item())
    if shape:
        assert not torch.equal(drawn[0], drawn[1])


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "row-mask"])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_no_host_sync(variant, deterministic, reduction):
    """Forward and backward with the checks off never wait for the device (sync debug mode raises);
    "row-mask": per-row losses averaged over a packed batch's real rows, as the model takes them."""
    states, pos, neg, table = make_inputs(5000, 50, 3706, 128, variant, torch.bfloat16, device=DEVICE)
    states.requires_grad_(), table.requires_grad_()
    row_mask = padding_mask(5000, seed=0)

    def loss():
        if reduction == "mean":
            return loss_of(states, pos, neg, table, backend="triton", validate=False)
        return masked_mean(loss_of(states, pos, neg, table, backend="triton", validate=False, reduction="none"), row_mask)

    loss().backward()  # compile first
    with poisoned_memory(deterministic):
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss().backward()
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("reduction", ["mean", "row-mask"])
@pytest.mark.parametrize("states_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_bf16_autocast_as_the_model_calls_it(variant, states_dtype, reduction):
    """Under bf16 autocast the model passes float32 (or bf16) states and its float32 table: Triton and
    the reference both keep float32 logits and return each gradient in its input's dtype. "row-mask":
    per-row losses averaged over a packed batch's real rows, as the model's loss takes them."""
    states, pos, neg, table = make_inputs(3000, 50, 3706, 128, variant, states_dtype, table_dtype=torch.float32,
                                          device=DEVICE)
    row_mask = padding_mask(3000, seed=0)
    results = []
    for backend in ("triton", "reference"):
        s, t = states.clone().requires_grad_(), table.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if reduction == "mean":
                loss = loss_of(s, pos, neg, t, backend=backend, validate=False)
            else:
                losses = loss_of(s, pos, neg, t, backend=backend, validate=False, reduction="none")
                assert losses.dtype == torch.float32 and losses.shape == (3000,)
                loss = masked_mean(losses, row_mask)
        loss.backward()
        assert loss.dtype == torch.float32 and s.grad.dtype == states_dtype and t.grad.dtype == torch.float32
        results.append((loss, s.grad, t.grad))
    loss, grad_states, grad_table = results[0]
    assert_close_float32(loss, results[1][0])
    assert_close_float32(grad_table, results[1][2])
    if states_dtype == torch.float32:
        assert_close_float32(grad_states, results[1][1])
    else:  # one bf16 rounding of the output each
        torch.testing.assert_close(grad_states, results[1][1], rtol=2 ** -7, atol=2 ** -8 * results[1][1].abs().max().item())


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("upstream", ["mean", "per-row"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_compiled_matches_eager(variant, upstream):
    """torch.compile (inductor, fullgraph) around the Triton backend: the same per-row losses and
    gradients, bit for bit. The mean of the rows is the one exception: Inductor generates its own
    reduction over the 5,000 float32 row losses, which adds them in another order than eager
    ``Tensor.mean``, so the two means agree to float32 rounding of that sum, not bitwise."""
    inputs = make_inputs(5000, 256, 26744, 128, variant, torch.bfloat16, device=DEVICE)
    (loss, *grads), (compiled_loss, *compiled_grads) = eager_and_compiled(
        *inputs, upstream=per_row_upstream(5000) if upstream == "per-row" else None)
    if upstream == "mean":
        torch.testing.assert_close(compiled_loss, loss, rtol=1e-6, atol=0)
    else:
        assert torch.equal(compiled_loss, loss)
    for a, b in zip(grads, compiled_grads):
        assert torch.equal(a, b)


GPU_SCATTER_CASES = [  # per-row negatives with each table scatter: the training step's shape, heavy duplication
    # (8 items: 400,000 occurrences a table row), a sparse table (4 occurrences per 1,000 rows), fp16 at the
    # upstream gradients of a mean over 25,000 rows
    *(Case("per-row", 25000, 50, 128, 3706, dtype=torch.bfloat16, scatter=s) for s in SCATTERS),
    *(Case("per-row", 25000, 50, 128, 8, dtype=torch.bfloat16, scatter=s) for s in SCATTERS),
    *(Case("per-row", 4096, 50, 128, 1_000_000, dtype=torch.bfloat16, scatter=s) for s in SCATTERS),
    Case("per-row", 4096, 256, 512, 26744, dtype=torch.bfloat16, scatter="atomic"),
    *(Case("per-row", 3000, 50, 128, 3706, dtype=torch.float16, upstream="per-row", upstream_scale=MEAN_OF_MANY_ROWS,
           scatter=s) for s in SCATTERS),
]


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("case", GPU_SCATTER_CASES, ids=lambda c: f"{c.rows}x{c.dim}x{c.negatives}x{c.num_items}-"
                         f"{str(c.dtype)[6:]}-{c.scatter}")
def test_gpu_per_row_scatters_full_size(case):
    check_case(case)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("scatter", SCATTERS)
def test_gpu_per_row_scatters_without_host_sync_and_in_cuda_graphs(scatter):
    """Per-row negatives with each table scatter: an eager forward and backward never waits for the
    device (sync debug mode "error"); captured in one CUDA graph with the negatives drawn in it,
    replays with new inputs match eager calls on the negatives the replay drew (the sort bit for bit,
    the atomics within a bf16 step)."""
    rows, dim, num_items, negatives = 3000, 50, 3706, 128
    inputs = [make_inputs(rows, dim, num_items, 0, "full", torch.bfloat16, seed=seed, device=DEVICE) for seed in (0, 1)]
    states, pos, _, table = inputs[0]
    static_states, static_table, static_pos = states.clone().requires_grad_(), table.clone().requires_grad_(), pos.clone()

    def step():
        neg = torch.randint(0, num_items, (rows, negatives), device=DEVICE)
        loss = loss_of(static_states, static_pos, neg, static_table, backend="triton", validate=False)
        loss.backward()
        return loss, neg

    with scatter_as(scatter):
        warm_up_on_a_side_stream(step, static_states, static_table)
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        static_states.grad = static_table.grad = None
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_loss, static_neg = step()
        new_states, new_pos, _, new_table = inputs[1]
        with torch.no_grad():
            static_states.copy_(new_states)
            static_table.copy_(new_table)
            static_pos.copy_(new_pos)
        graph.replay()
        s, t = new_states.clone().requires_grad_(), new_table.clone().requires_grad_()
        loss = loss_of(s, new_pos, static_neg.clone(), t, backend="triton")
        loss.backward()
    assert torch.equal(static_loss, loss) and torch.equal(static_states.grad, s.grad)
    if scatter == "sort":
        assert torch.equal(static_table.grad, t.grad)
    else:  # float32 atomics add in another order each run: after the bf16 rounding, one bf16 step apart
        torch.testing.assert_close(static_table.grad, t.grad, rtol=2 ** -7, atol=2 ** -8 * t.grad.abs().max().item())


# ---------------------------------------------------------------------------------------------
# Experiments trained with the full softmax
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampled", ["ml1m-hstu", "ml1m-hstu-large"])
@pytest.mark.parametrize("protocol", ["ours", "paper"])
def test_full_softmax_experiments_differ_from_their_sampled_twin_in_the_loss_only(sampled, protocol):
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import hstu.config  # noqa: F401  (registers the config schemas)

    def composed(experiment):
        conf = Path(__file__).resolve().parents[2] / "conf"
        with initialize_config_dir(version_base="1.3", config_dir=str(conf)):
            cfg = compose("train", overrides=[f"experiment={experiment}", f"data.protocol={protocol}"])
        return OmegaConf.to_container(cfg, resolve=False)

    base, full = composed(sampled), composed(f"{sampled}-full")
    assert base["model"]["loss"]["kind"] == "sampled" and full["model"]["loss"]["kind"] == "full"
    full["model"]["loss"]["kind"] = "sampled"
    assert full == base
