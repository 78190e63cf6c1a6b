"""TrainStep: packed device-side steps train exactly as unpacked eager steps; a non-finite loss sets
the device flag, skips the update and names its step; CUDA-graph replays match eager steps (GPU)."""
import numpy as np
import pytest
import torch

from hstu.data.packing import DeviceSequences, PackingLayout, PlanCollate
from hstu.data.sequences import make_batch
from hstu.guards import NonFiniteLossFlag
from hstu.model.recommender import SequentialRecommender
from hstu.train_step import TrainStep, make_optimizer
from test_packing import HSTU, MAX_LEN, NUM_ITEMS, sequences_of, training_examples

LOSS = {"kind": "full", "temperature": 0.1}


def setup(device="cpu", dropout=0.0, seed=0, kernels=None, loss=LOSS):
    torch.manual_seed(seed)
    model = SequentialRecommender(NUM_ITEMS, MAX_LEN, 8, dropout, {**HSTU, "dropout": dropout}, loss,
                                  kernels=kernels, kernel_fallback="error").to(device)
    optimizer = make_optimizer(model.parameters(), 1e-2, (0.9, 0.98), 0.0, torch.device(device),
                               capturable=device == "cuda")
    return model, optimizer


def epoch_batches(sequences, examples, layout, seed=5):
    order = np.random.default_rng(seed).permutation(len(examples))
    chunks = [order[i:i + layout.batch_size].tolist() for i in range(0, len(order), layout.batch_size)]
    return chunks, [PlanCollate(examples, layout)(chunk) for chunk in chunks]


def test_packed_steps_train_like_unpacked_eager_steps():
    sequences = sequences_of([12, 3, 9, 20, 7, 2, 15, 11, 4, 6], seed=4)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=4, max_seq_len=MAX_LEN, bucket_tokens=8)
    chunks, plans = epoch_batches(sequences, examples, layout)
    model_a, opt_a = setup()
    model_b, opt_b = setup()
    packed_step = TrainStep(model_a, opt_a, NonFiniteLossFlag(), sequences=DeviceSequences.from_sequences(sequences, "cpu"),
                            layout=layout)
    plain_step = TrainStep(model_b, opt_b, NonFiniteLossFlag())
    for chunk, plan in zip(chunks, plans):
        packed_step(plan)
        plain_step(make_batch(sequences, examples.users[chunk], examples.target_positions[chunk],
                              max_seq_len=MAX_LEN, with_seen=False))
    assert packed_step.nonfinite.first_bad() is None and plain_step.nonfinite.first_bad() is None
    assert packed_step.end_epoch() == pytest.approx(plain_step.end_epoch(), rel=1e-5)
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_nonfinite_loss_sets_the_flag_skips_updates_and_names_the_step():
    sequences = sequences_of([12, 3, 9, 20, 7, 2], seed=4)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=2, max_seq_len=MAX_LEN, bucket_tokens=8)
    _, plans = epoch_batches(sequences, examples, layout)
    model, optimizer = setup()
    step = TrainStep(model, optimizer, NonFiniteLossFlag(), sequences=DeviceSequences.from_sequences(sequences, "cpu"),
                     layout=layout)
    step(plans[0])
    with torch.no_grad():
        model.embedding.pos_table[0, 0] = float("nan")  # every later loss is NaN
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    for plan in plans[1:]:
        step(plan)
    assert step.nonfinite.first_bad() == 1 and np.isfinite(step.end_epoch())
    for name, p in model.named_parameters():  # no update once the flag was set
        torch.testing.assert_close(p.detach(), frozen[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["planned", "jagged"])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_captured_steps_match_eager_steps_and_draw_new_dropout_masks(kind, dropout):
    sequences = sequences_of([12, 3, 9, 20, 7, 2, 15, 11, 4, 6, 8, 17], seed=4)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=3, max_seq_len=MAX_LEN, bucket_tokens=8)
    chunks, plans = epoch_batches(sequences, examples, layout)
    if kind == "planned":
        batches = plans
    else:
        batches = [make_batch(sequences, examples.users[c], examples.target_positions[c], max_seq_len=MAX_LEN,
                              with_seen=False).to("cuda") for c in chunks]
    device_sequences = DeviceSequences.from_sequences(sequences, "cuda") if kind == "planned" else None
    results = []
    for capture in (True, False):
        model, optimizer = setup("cuda", dropout=dropout)
        step = TrainStep(model, optimizer, NonFiniteLossFlag(), sequences=device_sequences, layout=layout,
                         capture=capture)
        torch.manual_seed(7)
        for batch in batches + batches:  # every capacity twice: captured once, then replayed
            step(batch)
        results.append((step.end_epoch(), [p.detach().clone() for p in model.parameters()], step))
    (captured_loss, captured_params, captured), (eager_loss, eager_params, _) = results
    assert captured.graphs, "nothing was captured"
    if dropout == 0.0:
        assert captured_loss == pytest.approx(eager_loss, rel=1e-4)
        for a, b in zip(captured_params, eager_params):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    else:  # replays draw fresh masks: two replays of one graph on the same batch give different losses
        batch = batches[0]
        losses = []
        for _ in range(2):
            before = captured.loss_sum.clone()
            captured(batch)
            losses.append(float(captured.loss_sum - before))
        assert losses[0] != losses[1]


@pytest.mark.slow
def test_compiled_parts_count_each_operator_call_once_per_step():
    """Under regional compilation the manager counts a part's calls per execution from its trace; dynamo
    may analyse a frame more than once (restarts, recompiles), and only the graph it keeps counts."""
    sequences = sequences_of([12, 3, 9, 20, 7, 2, 15, 11, 4, 6, 8, 17, 5, 9, 13, 21], seed=4)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=4, max_seq_len=MAX_LEN, bucket_tokens=8)
    _, plans = epoch_batches(sequences, examples, layout)
    model, optimizer = setup(loss={"kind": "sampled", "num_negatives": 8, "temperature": 0.1})
    model.compile_parts()
    step = TrainStep(model, optimizer, NonFiniteLossFlag(), sequences=DeviceSequences.from_sequences(sequences, "cpu"),
                     layout=layout)
    steps = plans[:3]
    for plan in steps:
        step(plan)
    calls = {op: stats["calls"]["reference"] for op, stats in model.manager.get_stats().items()}
    blocks = HSTU["num_blocks"]
    assert calls == {"hstu_hierarchical_attention": blocks * len(steps), "fused_attention_layernorm": 2 * blocks * len(steps),
                     "hierarchical_sequence_fusion": len(steps), "sequence_recommendation_interaction": len(steps),
                     "interaction": 0}
    torch._dynamo.reset()


def lengths_for_gpu(seed=4, users=60):
    return np.random.default_rng(seed).integers(2, 40, users).tolist()


@pytest.mark.gpu
def test_replayed_steps_never_synchronise_with_the_host():
    """Once each capacity is captured, a step is two async copies and a replay: under
    torch.cuda.set_sync_debug_mode("error") any host-device synchronisation would raise."""
    sequences = sequences_of(lengths_for_gpu(), seed=4)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=8, max_seq_len=MAX_LEN, bucket_tokens=16)
    _, plans = epoch_batches(sequences, examples, layout)
    plans = [p.pin_memory().to("cuda", non_blocking=True) for p in plans]
    model, optimizer = setup("cuda", dropout=0.1)
    step = TrainStep(model, optimizer, NonFiniteLossFlag(), sequences=DeviceSequences.from_sequences(sequences, "cuda"),
                     layout=layout, capture=True)
    for plan in plans:
        step(plan)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for plan in plans:
            step(plan)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.nonfinite.first_bad() is None


@pytest.mark.gpu
def test_captured_steps_refuse_gradients_freed_after_capture():
    """A zero_grad that frees the gradients (set_to_none, as Lightning does before validation) would leave
    the graphs accumulating into freed memory: the next captured step refuses to run."""
    sequences = sequences_of(lengths_for_gpu(), seed=4)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=8, max_seq_len=MAX_LEN, bucket_tokens=16)
    _, plans = epoch_batches(sequences, examples, layout)
    model, optimizer = setup("cuda", dropout=0.1)
    step = TrainStep(model, optimizer, NonFiniteLossFlag(), sequences=DeviceSequences.from_sequences(sequences, "cuda"),
                     layout=layout, capture=True)
    step(plans[0].to("cuda"))
    model.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="gradient was replaced or freed"):
        step(plans[0].to("cuda"))


@pytest.mark.gpu
def test_compiled_steps_do_not_recompile_across_capacities():
    """Regional compilation with dynamic shapes: 50 steps over every capacity of an epoch compile each
    part once, captured or not."""
    from torch._dynamo.utils import counters

    sequences = sequences_of(lengths_for_gpu(seed=9, users=200), seed=9)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=4, max_seq_len=MAX_LEN, bucket_tokens=8)
    _, plans = epoch_batches(sequences, examples, layout)
    plans = [p.pin_memory().to("cuda", non_blocking=True) for p in plans][:50]
    assert len({p.capacity for p in plans}) >= 3
    for capture in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model, optimizer = setup("cuda", dropout=0.1)
        model.compile_parts()
        step = TrainStep(model, optimizer, NonFiniteLossFlag(), sequences=DeviceSequences.from_sequences(sequences, "cuda"),
                         layout=layout, capture=capture)
        for plan in plans[:5]:
            step(plan)
        graphs = counters["stats"]["unique_graphs"]
        for plan in plans[5:]:
            step(plan)
        assert counters["stats"]["unique_graphs"] == graphs, f"capture={capture}: recompiled"
        assert not counters["graph_break"], dict(counters["graph_break"])


TRAINING_OPERATORS = ["hstu_hierarchical_attention", "fused_attention_layernorm", "hierarchical_sequence_fusion",
                      "sequence_recommendation_interaction"]


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("flags", [*TRAINING_OPERATORS, "all"])
def test_captured_steps_with_triton_operators_match_eager_steps(flags, compiled):
    """Each Triton operator of the training step, and all of them, inside captured steps (regional
    compilation or not), bf16 autocast as the trainer runs them: the same losses and weights as eager
    steps (dropout 0, the full softmax: nothing random)."""
    kernels = {op: flags in (op, "all") for op in TRAINING_OPERATORS}
    sequences = sequences_of(lengths_for_gpu(seed=6, users=40), seed=6)
    examples = training_examples(sequences)
    layout = PackingLayout(batch_size=8, max_seq_len=MAX_LEN, bucket_tokens=16)
    _, plans = epoch_batches(sequences, examples, layout)
    plans = [p.pin_memory().to("cuda", non_blocking=True) for p in plans]
    results = []
    for capture in (True, False):
        model, optimizer = setup("cuda", kernels=kernels)
        if compiled:
            model.compile_parts()
        step = TrainStep(model, optimizer, NonFiniteLossFlag(), sequences=DeviceSequences.from_sequences(sequences, "cuda"),
                         layout=layout, capture=capture)
        torch.manual_seed(11)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for plan in plans + plans:
                step(plan)
        results.append((step.end_epoch(), [p.detach().clone() for p in model.parameters()], step))
        torch._dynamo.reset()
    (captured_loss, captured_params, captured), (eager_loss, eager_params, _) = results
    assert captured.graphs and captured.nonfinite.first_bad() is None
    # The loss kernel's table gradient adds with float32 atomics in any order, and 20 Adam steps carry
    # those last-bit differences into the weights: close, not bitwise equal.
    assert captured_loss == pytest.approx(eager_loss, rel=1e-2)
    for a, b in zip(captured_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)
