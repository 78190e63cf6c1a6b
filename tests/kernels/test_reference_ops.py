"""Tests of the PyTorch references of attention_output, sequence_fusion, the softmax losses and topk_items.

Each reference is checked against hand-computed values, against a plainer float64 formulation (loops,
explicit formulas), by ``torch.autograd.gradcheck`` in float64 at tiny sizes, and on its error paths.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from hstu_kernels.reference.attention_output import attention_output, dropout, philox_uniform, seeded_dropout_mask
from hstu_kernels.reference.losses import full_softmax_loss, l2_normalize, sampled_softmax_loss
from hstu_kernels.reference.sequence_fusion import sequence_fusion
from hstu_kernels.reference.topk import topk_items

f64 = torch.float64


def offsets_of(lengths):
    return torch.tensor([0] + list(torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()), dtype=torch.int64)


# --------------------------------------------------------------------------- seeded dropout


def test_philox_uniform_matches_triton_rand(device):
    """The seeded mask is defined as Triton's tl.rand(seed, index) >= p: check it bit for bit."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    @triton.jit
    def store_rand(out_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, tl.rand(seed, offsets), mask=offsets < n)

    n = 3000
    for seed in (0, 7, 2**33 + 5, 2**63 - 1):
        from_triton = torch.empty(n, dtype=torch.float32, device=device)
        store_rand[(triton.cdiv(n, 1024),)](from_triton, seed, n, BLOCK=1024)
        assert torch.equal(philox_uniform(seed, n, device), from_triton), f"seed {seed}"


def test_philox_custom_op_registration():
    """philox_uniform is an opaque custom op for torch.compile: its fake (meta) kernel must agree with it."""
    torch.library.opcheck(torch.ops.hstu_kernels.philox_uniform.default, (5, 100, torch.device("cpu")))


def test_philox_uniform_is_uniform_and_seed_dependent():
    u = philox_uniform(3, 200_000)
    assert u.dtype == torch.float32 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005
    assert abs(float((u < 0.2).float().mean()) - 0.2) < 0.005
    assert not torch.equal(u[:1000], philox_uniform(4, 1000))
    assert torch.equal(u[:1000], philox_uniform(3, 1000))


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
    out = dropout(x, 0.3, training=True, seed=None)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.7) < 0.03
    torch.testing.assert_close(out[kept], x[kept] / 0.7)


def test_dropout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dropout_p must be in"):
        dropout(torch.ones(3), 1.5, training=True, seed=None)
    with pytest.raises(ValueError, match="seed must be in"):
        dropout(torch.ones(3), 0.5, training=True, seed=-1)


# --------------------------------------------------------------------------- attention_output


def test_attention_output_hand_computed():
    # LayerNorm([1, 3]) = [-1, 1] (eps 0); times u = [2, 5] -> [-2, 5]; W rows [1, 0] and [1, 1] -> [-2, 3].
    x = torch.tensor([[10.0, 20.0]], dtype=f64)
    attn = torch.tensor([[1.0, 3.0]], dtype=f64)
    u = torch.tensor([[2.0, 5.0]], dtype=f64)
    weight = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=f64)
    bias = torch.tensor([0.5, -1.0], dtype=f64)
    out = attention_output(x, attn, u, weight, bias, dropout_p=0.2, training=False, eps=0.0)
    torch.testing.assert_close(out, torch.tensor([[8.5, 22.0]], dtype=f64))


def attention_output_by_formula(x, attn, u, weight, bias, eps, keep=None, p=0.0):
    """Float64 restatement: explicit mean / biased variance, explicit dropout mask, explicit matmul."""
    x, attn, u, weight = x.double(), attn.double(), u.double(), weight.double()
    mean = attn.mean(-1, keepdim=True)
    var = ((attn - mean) ** 2).mean(-1, keepdim=True)
    gated = (attn - mean) / torch.sqrt(var + eps) * u
    if keep is not None:
        gated = gated * keep / (1 - p)
    out = x + gated @ weight.T
    return out if bias is None else out + bias.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 4, 3), (7, 16, 5), (33, 50, 50), (0, 8, 4)])
def test_attention_output_matches_formula(dtype, tol, with_bias, shape):
    rows, width, dim = shape
    gen = torch.Generator().manual_seed(rows * 100 + width)
    x, attn, u = (torch.randn(rows, n, generator=gen, dtype=dtype) for n in (dim, width, width))
    weight = torch.randn(dim, width, generator=gen, dtype=dtype) / math.sqrt(width)
    bias = torch.randn(dim, generator=gen, dtype=dtype) if with_bias else None
    out = attention_output(x, attn, u, weight, bias, dropout_p=0.0, training=True)
    expected = attention_output_by_formula(x, attn, u, weight, bias, 1e-6)
    assert out.dtype == dtype and out.shape == (rows, dim)
    torch.testing.assert_close(out.double(), expected, atol=tol * 10, rtol=tol)


def test_attention_output_seeded_dropout_is_reproducible_and_matches_mask():
    gen = torch.Generator().manual_seed(0)
    x, attn, u = (torch.randn(6, n, generator=gen, dtype=f64) for n in (4, 8, 8))
    weight, bias = torch.randn(4, 8, generator=gen, dtype=f64), torch.randn(4, generator=gen, dtype=f64)
    out = attention_output(x, attn, u, weight, bias, dropout_p=0.4, training=True, seed=5)
    again = attention_output(x, attn, u, weight, bias, dropout_p=0.4, training=True, seed=5)
    other = attention_output(x, attn, u, weight, bias, dropout_p=0.4, training=True, seed=6)
    keep = seeded_dropout_mask((6, 8), 0.4, 5).double()
    assert torch.equal(out, again) and not torch.equal(out, other)
    torch.testing.assert_close(out, attention_output_by_formula(x, attn, u, weight, bias, 1e-6, keep, 0.4))


@pytest.mark.parametrize("seed", [None, 9])
def test_attention_output_gradcheck(seed):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, generator=gen, dtype=f64, requires_grad=True)
    attn = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
    u = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
    weight = torch.randn(3, 4, generator=gen, dtype=f64, requires_grad=True)
    bias = torch.randn(3, generator=gen, dtype=f64, requires_grad=True)
    p, training = (0.0, False) if seed is None else (0.5, True)
    fn = lambda *args: attention_output(*args, dropout_p=p, training=training, seed=seed)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, attn, u, weight, bias))
    assert torch.autograd.gradgradcheck(fn, (x, attn, u, weight, bias))


def test_attention_output_rejects_bad_shapes():
    x, attn = torch.zeros(2, 3), torch.zeros(2, 4)
    with pytest.raises(ValueError, match="attn and u must both be"):
        attention_output(x, attn, torch.zeros(2, 5), torch.zeros(3, 4), None, dropout_p=0.0, training=False)
    with pytest.raises(ValueError, match=r"weight must be \[D=3, H\*dv=4\]"):
        attention_output(x, attn, attn, torch.zeros(4, 3), None, dropout_p=0.0, training=False)
    with pytest.raises(ValueError, match="bias must be"):
        attention_output(x, attn, attn, torch.zeros(3, 4), torch.zeros(4), dropout_p=0.0, training=False)
    with pytest.raises(ValueError, match="x must be"):
        attention_output(torch.zeros(3, 3), attn, attn, torch.zeros(3, 4), None, dropout_p=0.0, training=False)


# --------------------------------------------------------------------------- sequence_fusion


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
        (dict(lengths=[5]), "a sequence of length 5 exceeds pos_table's 4 positions"),
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
        sequence_fusion(
            item_ids, timestamps, offsets, item_table, pos_table, tables,
            scale=1.0, time_scales=time_scales, dropout_p=0.0, training=False,
        )


# --------------------------------------------------------------------------- softmax losses


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
        full_softmax_loss(states, pos, table, temperature=0.0)
    with pytest.raises(ValueError, match="must share D"):
        full_softmax_loss(states, pos, torch.randn(5, 3), temperature=1.0)
    with pytest.raises(ValueError, match=r"pos_ids must be integer \[M=2\]"):
        sampled_softmax_loss(states, torch.tensor([0]), torch.tensor([1]), table, temperature=1.0)
    with pytest.raises(ValueError, match=r"neg_ids must be integer \[M=2, R\] or \[R\]"):
        sampled_softmax_loss(states, pos, torch.tensor([[1, 2]] * 3), table, temperature=1.0)
    with pytest.raises(ValueError, match="M = 0"):
        sampled_softmax_loss(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64), torch.tensor([1]), table, temperature=1.0)


# --------------------------------------------------------------------------- topk_items


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
        topk_items(queries, table, 5)
    bad = queries.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite scores \(NaN or inf\) for query rows \[1\]"):
        topk_items(bad, table, 2)
    inf_table = table.clone()
    inf_table[2, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite scores"):
        topk_items(queries, inf_table, 2, l2_norm=False)
    with pytest.raises(ValueError, match="given together"):
        topk_items(queries, table, 2, exclude_ids=torch.tensor([1]))
    with pytest.raises(ValueError, match=r"exclude_offsets \[B\+1=3\]"):
        topk_items(queries, table, 2, exclude_ids=torch.tensor([1]), exclude_offsets=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="must start at 0 and end at len"):
        topk_items(queries, table, 2, exclude_ids=torch.tensor([1]), exclude_offsets=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"exclude_ids must lie in \[0, 4\)"):
        topk_items(queries, table, 2, exclude_ids=torch.tensor([4]), exclude_offsets=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"target_ids must lie in \[0, 4\)"):
        topk_items(queries, table, 2, target_ids=torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="must share D"):
        topk_items(queries, torch.randn(4, 2), 2)
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        topk_items(queries, table, 2, chunk_size=-1)
