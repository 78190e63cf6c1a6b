"""Static-shape packed batches: every real token kept, padding in bounded dummy sequences, and the loss
and gradients of a packed batch equal to the unpacked batch's."""
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from searchsorted_views import SearchsortedDroppingViewOffsets

from hstu.data.packing import DeviceSequences, PackingLayout, PlanCollate, pack_batch, unpacked
from hstu.data.sequences import Examples, UserSequences, make_batch
from hstu.model.recommender import SequentialRecommender

NUM_ITEMS, MAX_LEN = 30, 9
HSTU = {"_target_": "hstu.model.hstu.HSTUEncoder", "num_blocks": 2, "num_heads": 2, "dqk": 4, "dv": 3, "dropout": 0.0}


def sequences_of(lengths, seed=0) -> UserSequences:
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    return UserSequences(
        item_ids=rng.integers(1, NUM_ITEMS + 1, total).astype(np.int64),
        timestamps=np.sort(rng.integers(1_600_000_000, 1_700_000_000, total)).astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        item_original_ids=np.arange(NUM_ITEMS),
        user_original_ids=np.arange(len(lengths)),
    )


def training_examples(sequences: UserSequences) -> Examples:
    lengths = sequences.lengths
    users = np.flatnonzero(lengths >= 2)
    return Examples(users.astype(np.int64), (lengths[users] - 1).astype(np.int64))


def packed(sequences, examples, indices, layout):
    plan = PlanCollate(examples, layout)(indices)
    batch = pack_batch(DeviceSequences.from_sequences(sequences, "cpu"), plan.users, plan.target_positions,
                       plan.capacity, layout)
    return plan, batch


@given(
    lengths=st.lists(st.integers(0, 25), min_size=1, max_size=12),
    batch_size=st.integers(1, 6),
    bucket_tokens=st.sampled_from([1, 4, 7, 16, 64]),
    seed=st.integers(0, 1000),
)
def test_packed_batch_keeps_every_real_token_and_bounds_the_padding(lengths, batch_size, bucket_tokens, seed):
    sequences = sequences_of(lengths, seed)
    examples = training_examples(sequences)
    if len(examples) == 0:
        return
    layout = PackingLayout(batch_size, MAX_LEN, bucket_tokens)
    rng = np.random.default_rng(seed)
    indices = rng.permutation(len(examples))[:batch_size].tolist()
    plan, batch = packed(sequences, examples, indices, layout)
    # The same examples through the CPU loader's batch builder.
    expected = make_batch(sequences, examples.users[indices], examples.target_positions[indices],
                          max_seq_len=MAX_LEN, with_seen=False)
    real = unpacked(batch, len(indices))
    for name in ("item_ids", "timestamps", "seq_offsets", "targets", "target_timestamps", "user_ids"):
        assert torch.equal(getattr(real, name), getattr(expected, name)), name
    assert plan.batch_size == len(indices) and plan.num_tokens == expected.num_tokens
    # Static layout: B + num_dummy sequences, capacity tokens, padding in dummies no longer than max_seq_len.
    offsets = batch.seq_offsets
    assert offsets.shape == (batch_size + layout.num_dummy + 1,) and int(offsets[-1]) == plan.capacity
    assert plan.capacity % bucket_tokens == 0 and plan.capacity - plan.num_tokens < max(bucket_tokens, plan.capacity)
    assert int((offsets[1:] - offsets[:-1]).max()) <= MAX_LEN
    assert int(batch.token_mask.sum()) == plan.num_tokens and bool(batch.token_mask[:plan.num_tokens].all())
    padding = ~batch.token_mask
    assert torch.equal(batch.item_ids[padding], torch.zeros(int(padding.sum()), dtype=torch.int64))
    assert batch.targets.shape == (batch_size + layout.num_dummy,)


def test_packing_does_not_search_a_sliced_view():
    """Each token's row, found over ``real_offsets[1:]``, was the next row wherever Inductor compiled
    the packing for the GPU: tokens read from the wrong user's history."""
    sequences = sequences_of([12, 3, 0, 20, 7, 2, 15], seed=4)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=8, max_seq_len=MAX_LEN, bucket_tokens=16)
    _, expected = packed(sequences, examples, [4, 0, 2, 5, 1], layout)
    with SearchsortedDroppingViewOffsets() as mode:
        _, emulated = packed(sequences, examples, [4, 0, 2, 5, 1], layout)
    for name in ("item_ids", "timestamps", "seq_offsets", "targets", "token_mask"):
        assert torch.equal(getattr(emulated, name), getattr(expected, name)), name
    assert mode.shifted == 0


@pytest.mark.parametrize("loss", [{"kind": "full"}, {"kind": "sampled", "shared_negatives": True, "num_negatives": 7}])
def test_packed_loss_and_gradients_equal_the_unpacked_batch(loss):
    """Dropout 0 and the same negatives: padding reaches neither the loss nor any gradient."""
    sequences = sequences_of([12, 3, 0, 20, 7, 2, 15], seed=3)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=8, max_seq_len=MAX_LEN, bucket_tokens=16)
    indices = [4, 0, 2, 5, 1]
    _, batch = packed(sequences, examples, indices, layout)
    plain = make_batch(sequences, examples.users[indices], examples.target_positions[indices],
                       max_seq_len=MAX_LEN, with_seen=False)
    torch.manual_seed(0)
    model = SequentialRecommender(NUM_ITEMS, MAX_LEN, 8, 0.0, HSTU, {"temperature": 0.1, **loss})
    results = []
    for b in (batch, plain):
        model.zero_grad()
        torch.manual_seed(1)  # the same shared negatives for both
        value = model.training_loss(b)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (packed_loss, packed_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(packed_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, msg=name)


def test_layout_capacity_and_dummies():
    layout = PackingLayout(batch_size=128, max_seq_len=200, bucket_tokens=1024)
    assert layout.dummy_len == 200 and layout.num_dummy == 6
    assert [layout.capacity(n) for n in (0, 1, 1024, 1025, 13_800)] == [1024, 1024, 1024, 2048, 14_336]
    with pytest.raises(ValueError, match="bucket_tokens must be >= 1"):
        PackingLayout(8, 10, 0)


def test_jagged_batches_copied_into_static_buffers_pack_like_planned_ones():
    """A captured step fed JaggedBatch objects (any loader's) packs them exactly as device-side planning
    packs the same examples."""
    from hstu.data.packing import StaticJaggedInput

    sequences = sequences_of([12, 3, 0, 20, 7, 2, 15], seed=3)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=8, max_seq_len=MAX_LEN, bucket_tokens=16)
    static = StaticJaggedInput(layout, NUM_ITEMS, torch.device("cpu"))
    for indices in ([4, 0, 2, 5, 1], [3], [0, 1, 2, 3, 4, 5]):  # later batches overwrite earlier ones
        plan, planned = packed(sequences, examples, indices, layout)
        jagged = make_batch(sequences, examples.users[indices], examples.target_positions[indices],
                            max_seq_len=MAX_LEN, with_seen=False)
        assert static.fill(jagged) == plan.capacity
        copied = static.packed(plan.capacity)
        for name in ("item_ids", "timestamps", "seq_offsets", "targets", "target_timestamps", "token_mask"):
            assert torch.equal(getattr(copied, name), getattr(planned, name)), name
        assert torch.equal(copied.user_ids[:len(indices)], planned.user_ids[:len(indices)])
