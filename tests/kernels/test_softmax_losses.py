"""Operator sequence_recommendation_interaction: the sampled and full softmax references against row
loops, gradcheck, float32 logits, and the public functions' input checks.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

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
