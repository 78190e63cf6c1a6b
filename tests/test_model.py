"""Model forward/backward shapes, flags that keep parameter names, reference vs Triton training curves."""
import importlib
import sys

import pytest
import torch
from hydra.errors import InstantiationException

import hstu_kernels
from hstu.data.batch import JaggedBatch
from hstu.errors import ConfigError
from hstu.model.hstu import SharedLayout
from hstu.model.recommender import SequentialRecommender
from hstu_kernels import OPERATORS
from hstu_kernels.jagged import next_in_sequence

NUM_ITEMS = 40
MAX_LEN = 12

HSTU = {"_target_": "hstu.model.hstu.HSTUEncoder", "num_blocks": 2, "num_heads": 2, "dqk": 6, "dv": 5, "dropout": 0.0}
SASREC = {"_target_": "hstu.model.sasrec.SASRecEncoder", "num_blocks": 2, "num_heads": 2, "dropout": 0.0}
LOSS = {"kind": "sampled", "num_negatives": 16, "temperature": 0.05}


def make_batch(lengths, seed=0, with_seen=False) -> JaggedBatch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    items = torch.randint(1, NUM_ITEMS + 1, (total,), generator=g)
    ts = 1_000_000_000 + torch.randint(0, 10**6, (total,), generator=g).sort().values
    batch = JaggedBatch(
        item_ids=items, timestamps=ts, seq_offsets=offsets,
        targets=torch.randint(1, NUM_ITEMS + 1, (len(lengths),), generator=g),
        target_timestamps=torch.full((len(lengths),), 1_002_000_000), user_ids=torch.arange(len(lengths)),
    )
    if with_seen:
        batch.seen_ids, batch.seen_offsets = items, offsets
    return batch


def build(encoder, kernels=None, dim=8, **kw):
    return SequentialRecommender(NUM_ITEMS, MAX_LEN, dim, 0.0, encoder, {**LOSS, **kw}, kernels=kernels)


@pytest.mark.parametrize("encoder", [HSTU, SASREC], ids=["hstu", "sasrec"])
def test_forward_backward_shapes(encoder):
    torch.manual_seed(0)
    model = build(encoder)
    batch = make_batch([5, 1, MAX_LEN, 3])
    states = model.encode(batch)
    assert states.shape == (batch.num_tokens, 8)
    torch.testing.assert_close(states.norm(dim=-1), torch.ones(batch.num_tokens))
    loss = model.training_loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"no/invalid gradient for {missing}"
    if encoder is HSTU:
        assert model.encoder.blocks[0].time_weight.grad.abs().sum() > 0
        assert model.encoder.blocks[0].pos_weight.grad.abs().sum() > 0


def test_the_blocks_share_one_attention_layout_and_give_what_their_own_layouts_give(monkeypatch):
    """The reference attention's index layout (time buckets of every query-key pair) is built once a batch,
    at the first block, and handed to the others: states and every gradient equal those of blocks that
    each build their own."""
    torch.manual_seed(0)
    model = build({**HSTU, "num_blocks": 3})
    batch = make_batch([5, 1, MAX_LEN, 3, 0])
    x = torch.randn(batch.num_tokens, 8, requires_grad=True)
    builds = []
    build_layout = hstu_kernels.hstu_attention_layout

    def counted_layout(*args, **kwargs):
        builds.append(1)
        return build_layout(*args, **kwargs)

    monkeypatch.setattr(hstu_kernels, "hstu_attention_layout", counted_layout)

    def states_and_gradients(shared: bool):
        encoder = model.encoder
        q_timestamps = next_in_sequence(batch.timestamps, batch.seq_offsets, batch.target_timestamps)
        shared_layout = SharedLayout(batch.seq_offsets, q_timestamps, batch.timestamps) if shared else None
        h = x
        for block in encoder.blocks:
            h = block(h, batch.seq_offsets, q_timestamps, batch.timestamps, shared_layout)
        parameters = [x, *encoder.parameters()]
        return [h, *torch.autograd.grad(h.square().sum(), parameters)]

    own = states_and_gradients(shared=False)
    assert builds == []  # without a shared layout each block's reference attention builds its own inside
    shared = states_and_gradients(shared=True)
    assert builds == [1]
    for mine, theirs in zip(shared, own):
        assert torch.equal(mine, theirs)
    builds.clear()
    model.encoder(x, batch.seq_offsets, batch.timestamps, batch.target_timestamps)
    assert builds == [1]  # the encoder's forward shares one


@pytest.mark.parametrize("encoder", [HSTU, SASREC], ids=["hstu", "sasrec"])
def test_states_are_causal(encoder):
    """Changing a later item never changes an earlier state."""
    torch.manual_seed(0)
    model = build(encoder).eval()
    batch = make_batch([6, 4])
    before = model.encode(batch)
    batch.item_ids[3] = (batch.item_ids[3] % NUM_ITEMS) + 1
    after = model.encode(batch)
    torch.testing.assert_close(before[:3], after[:3])
    torch.testing.assert_close(before[6:], after[6:])
    assert not torch.allclose(before[3], after[3])


def test_next_in_sequence_targets():
    offsets = torch.tensor([0, 3, 3, 4])
    values = torch.tensor([1, 2, 3, 7])
    out = next_in_sequence(values, offsets, torch.tensor([10, 20, 30]))
    assert out.tolist() == [2, 3, 10, 30]


def test_recommend_masks_seen_and_ranks_target():
    torch.manual_seed(0)
    model = build(HSTU).eval()
    batch = make_batch([5, 3], with_seen=True)
    scores, ids, rank = model.recommend(batch, k=10, with_target_rank=True)
    assert ids.shape == (2, 10) and rank.shape == (2,)
    for b in range(2):
        seen = set(batch.item_ids[batch.seq_offsets[b]:batch.seq_offsets[b + 1]].tolist())
        assert not seen & set(ids[b].tolist())
        assert 0 not in ids[b].tolist()


@pytest.mark.parametrize("interaction", [False, True], ids=["reference", "triton"])
def test_a_user_whose_state_is_not_finite_ranks_its_target_last(interaction, monkeypatch):
    """Every comparison with NaN is false: the count of items scoring >= the target would leave it first (reference)
    or give rank 0 (Triton), a hit at every K in the metrics."""
    torch.manual_seed(0)
    model = build(HSTU, kernels={"interaction": interaction}).eval()
    batch = make_batch([5, 3, 4])
    _, _, finite = model.recommend(batch, k=10, with_target_rank=True)
    user_states = model.user_states
    monkeypatch.setattr(model, "user_states", lambda b: user_states(b) * torch.tensor([[1.0], [float("nan")], [1.0]]))
    _, _, rank = model.recommend(batch, k=10, with_target_rank=True)
    assert rank.tolist() == [finite[0].item(), NUM_ITEMS, finite[2].item()]


def test_flags_do_not_change_parameter_names():
    torch.manual_seed(0)
    off = build(HSTU, kernels={op: False for op in OPERATORS})
    on = build(HSTU, kernels={op: True for op in OPERATORS})
    assert list(off.state_dict()) == list(on.state_dict())
    on.load_state_dict(off.state_dict())


def test_triton_attention_flag_gives_the_same_loss_curve():
    """Training with hstu_hierarchical_attention on and off follows the same curve (interpreter on CPU)."""
    curves = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = build(HSTU, kernels={"hstu_hierarchical_attention": flag}, shared_negatives=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for step in range(4):
            torch.manual_seed(100 + step)
            loss = model.training_loss(make_batch([7, 2, 5], seed=step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        expected = "triton" if flag else "reference"
        assert model.manager.get_stats()["hstu_hierarchical_attention"]["calls"][expected] > 0
        curves.append(curve)
    torch.testing.assert_close(torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5)


# fp16 autocast: the two backends round to fp16 at different points (a fused kernel keeps fp32 inside
# itself, the reference's ops round their fp16 outputs one by one): after four steps of lr 1e-2 the
# losses part by about 3e-4 relative and the scores (cosines, |s| <= 1, of states that went through fp16)
# by about 1e-3 absolute, a few fp16 roundings; in fp32 both agree to 1e-6.
@pytest.mark.parametrize("encoder, precision, rtol, score_atol", [
    (HSTU, "fp32", 1e-4, 1e-5), (HSTU, "fp16 autocast", 2e-3, 3e-3), (SASREC, "fp32", 1e-4, 1e-5),
], ids=["hstu-fp32", "hstu-fp16-autocast", "sasrec-fp32"])
def test_every_triton_operator_on_gives_the_reference_models_curve_and_ranking(encoder, precision, rtol, score_atol):
    """The whole model with all five flags on (interpreter on CPU; H*dv = 10, so the attention writes
    aligned rows that the gate reads) against all off: the same loss curve over four steps with empty and
    length-1 sequences, each operator the encoder uses counted on Triton (SASRec's blocks are torch's, so
    the embedding, loss and top-k only), and the same top-k and target ranks afterwards (in fp16, up to
    swaps of items scored within the tolerance)."""
    used = set(OPERATORS) if encoder is HSTU else {
        "hierarchical_sequence_fusion", "sequence_recommendation_interaction", "interaction"}
    runs = {}
    for flag in (False, True):
        torch.manual_seed(0)
        model = build(encoder, kernels={op: flag for op in OPERATORS}, shared_negatives=True)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        curve = []
        for step in range(4):
            torch.manual_seed(100 + step)
            with torch.autocast("cpu", dtype=torch.float16, enabled=precision != "fp32"):
                loss = model.training_loss(make_batch([7, 0, 1, 5], seed=step))
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16, enabled=precision != "fp32"):
            scores, ids, rank = model.eval().recommend(make_batch([6, 1, 4], seed=9, with_seen=True), k=10,
                                                        with_target_rank=True)
        runs[flag] = curve, scores, ids, rank
        calls = {op: stats["calls"] for op, stats in model.manager.get_stats().items()}
        expected = "triton" if flag else "reference"
        assert {op for op, count in calls.items() if count[expected] == sum(count.values()) > 0} == used, calls
    (curve_off, scores_off, ids_off, rank_off), (curve_on, scores_on, ids_on, rank_on) = runs[False], runs[True]
    torch.testing.assert_close(torch.tensor(curve_on), torch.tensor(curve_off), rtol=rtol, atol=1e-5)
    torch.testing.assert_close(scores_on.float(), scores_off.float(), rtol=0, atol=score_atol)
    if precision == "fp32":
        assert torch.equal(ids_on, ids_off) and torch.equal(rank_on, rank_off)
        return
    # fp16: two items whose scores lie within the tolerance may swap places (the target's rank may move
    # across such items too, so it is not compared)
    for row_on, row_off, reference_scores in zip(ids_on.tolist(), ids_off.tolist(), scores_off.tolist()):
        reference = dict(zip(row_off, reference_scores))
        for place, item in enumerate(row_on):
            if item != row_off[place]:  # the item the reference scored, or its top-k's last score, is as close
                closest = reference.get(item, reference_scores[-1])
                assert abs(closest - reference_scores[place]) <= 2 * score_atol, (row_on, row_off)


@pytest.mark.parametrize("triton_attention", [False, True])
def test_compiled_model_does_not_recompile_per_jagged_shape(triton_attention):
    """model.compile=true compiles with dynamic shapes and no graph break: new batch sizes and token
    counts reuse the graphs."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build(HSTU, kernels={"hstu_hierarchical_attention": triton_attention}, shared_negatives=True)
    model.training_loss(make_batch([4, 2], seed=9)).backward()  # one eager step first; the case without it is the test below
    model.compile_parts(backend="eager")  # RecModule uses the default backend; eager keeps CI fast
    dynamo.reset()
    counters.clear()
    for seed, lengths in enumerate([[5, 3], [7, 1, 4], [MAX_LEN, 2, 6, 9], [3, 3, 3, 3, 3]]):
        model.training_loss(make_batch(lengths, seed=seed)).backward()
    frames = counters["stats"]["unique_graphs"]
    assert 0 < frames <= 6, f"{frames} graphs compiled for 4 batches: shapes are being specialised"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"


def test_every_triton_operator_traces_into_the_compiled_parts():
    """model.compile=true with all five flags on (AOTAutograd, interpreter on CPU): no graph break, a graph
    per part that new jagged shapes (an empty sequence among them) reuse, and the losses and every
    parameter's accumulated gradient bitwise those of the same model run eagerly."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build(HSTU, kernels={op: True for op in OPERATORS}, shared_negatives=True)
        model.training_loss(make_batch([4, 2], seed=9)).backward()
        if compiled:
            model.compile_parts(backend="aot_eager")
        dynamo.reset()
        counters.clear()
        losses = []
        for seed, lengths in enumerate([[5, 3], [7, 1, 4], [MAX_LEN, 2, 6, 9], [3, 0, 3, 1]]):
            torch.manual_seed(50 + seed)
            loss = model.training_loss(make_batch(lengths, seed=seed))
            loss.backward()
            losses.append(loss.item())
        runs.append((losses, [p.grad for p in model.parameters()]))
        calls = {op: stats["calls"] for op, stats in model.manager.get_stats().items() if op != "interaction"}
        assert all(c["triton"] > 0 and c["reference"] == 0 for c in calls.values()), calls
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert 0 < counters["stats"]["unique_graphs"] <= 6
    (eager_losses, eager_grads), (compiled_losses, compiled_grads) = runs
    assert compiled_losses == eager_losses
    assert all(torch.equal(a, b) for a, b in zip(compiled_grads, eager_grads))


def test_rec_module_compiles_its_parts_when_built():
    from hstu.module import RecModule

    module = RecModule(NUM_ITEMS, MAX_LEN, 8, 0.0, HSTU, LOSS, {"lr": 1e-3}, compile=True)
    parts = (module.model.embedding, *module.model.encoder.blocks, module.model.loss)
    assert all(p._compiled_call_impl is not None for p in parts)


@pytest.mark.parametrize("on_caller_thread", [False, True])
def test_rec_module_backward_thread_follows_its_flag(on_caller_thread):
    """``backward_on_caller_thread`` turns autograd's worker threads off for the module's training step
    only: the flag is seen inside the backward and restored after it; each step advances global_step."""
    import lightning as L

    from hstu.module import RecModule

    module = RecModule(NUM_ITEMS, MAX_LEN, 8, 0.0, HSTU, LOSS, {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.0},
                       backward_on_caller_thread=on_caller_thread)
    seen = []
    module.model.embedding.item_table.register_hook(lambda grad: seen.append(torch._C._is_multithreading_enabled()))
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    loader = torch.utils.data.DataLoader([make_batch([4, 2, 5], seed=3), make_batch([3, 1], seed=4)], batch_size=None)
    trainer.fit(module, loader)
    assert seen == [not on_caller_thread] * 2 and trainer.global_step == 2
    assert torch._C._is_multithreading_enabled()


@pytest.mark.parametrize("capture", [True, False], ids=["captured", "eager"])
def test_validation_keeps_the_gradients_of_captured_steps(capture):
    """Lightning frees the gradients before validation; captured steps have their addresses in the
    graphs, so a module whose steps are captured keeps them (an eager one lets Lightning free them)."""
    from hstu.module import RecModule

    module = RecModule(NUM_ITEMS, MAX_LEN, 8, 0.0, HSTU, LOSS, {"lr": 1e-3, "betas": [0.9, 0.98], "weight_decay": 0.0})
    module.capture = capture
    gradients = []
    for p in module.parameters():
        p.grad = torch.ones_like(p)
        gradients.append(p.grad)
    module.on_validation_model_zero_grad()
    kept = [p.grad is g for p, g in zip(module.parameters(), gradients)]
    assert kept == [capture] * len(kept)


def test_model_compiled_before_its_first_call_runs_triton_without_graph_break(monkeypatch):
    """The manager decides the attention backend on the first call, inside the trace here: the
    decision must trace (imports and environment were settled when the manager was built)."""
    import torch._dynamo as dynamo
    from torch._dynamo.utils import counters

    kernel_module = importlib.import_module("hstu_kernels.triton.hstu_attention")
    launches = []
    launcher = kernel_module.hstu_attention_forward
    monkeypatch.setattr(kernel_module, "hstu_attention_forward", lambda *a: launches.append(1) or launcher(*a))
    torch.manual_seed(0)
    model = build(HSTU, kernels={"hstu_hierarchical_attention": True}, shared_negatives=True)
    model.compile_parts(backend="eager")
    dynamo.reset()
    counters.clear()
    model.training_loss(make_batch([4, 2, 5], seed=3)).backward()
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert launches, "the compiled model did not run the Triton attention"
    assert not model.manager.fallbacks()


def test_batch_check_names_the_broken_field():
    from dataclasses import replace

    good, seen = make_batch([3, 0, 2]), make_batch([3, 0, 2], with_seen=True)
    checked = good.check(MAX_LEN, NUM_ITEMS)
    assert seen.check(MAX_LEN, NUM_ITEMS).extent == checked.extent
    assert checked.extent == (3, int(torch.cat([good.item_ids, good.targets]).max())) and good.extent is None
    broken = {
        "seq_offsets: must start at 0": replace(good, seq_offsets=torch.tensor([0, 3, 3, 4])),
        "seq_offsets: must start at 0, end at 5 and not decrease": replace(good, seq_offsets=torch.tensor([0, 3, 2, 5])),
        "exceeds max_seq_len=2": good,
        "item_ids/targets: ids must lie in": replace(good, targets=torch.tensor([1, NUM_ITEMS + 1, 2])),
        "item_ids/targets: ids must be >= 0": replace(good, targets=torch.tensor([1, -1, 2])),
        "JaggedBatch.timestamps: expected shape": replace(good, timestamps=good.timestamps[:-1]),
        "seen_ids/seen_offsets: give both or neither": replace(good, seen_ids=good.item_ids),
        "seen_ids/seen_offsets: expected shapes": replace(seen, seen_offsets=seen.seen_offsets[1:]),
        "seen_offsets: must start at 0, end at 5 and not decrease": replace(seen, seen_offsets=torch.tensor([0, 4, 3, 5])),
        "seen_offsets: must start at 0, end at 5": replace(seen, seen_offsets=torch.tensor([0, 3, 3, 6])),
        "item_ids/targets/seen_ids: ids must lie in": replace(seen, seen_ids=torch.tensor([1, 2, 3, NUM_ITEMS + 1, 1])),
        "item_ids/targets/seen_ids: ids must be >= 0": replace(seen, seen_ids=torch.tensor([1, 2, -1, 4, 1])),
    }
    for message, batch in broken.items():
        with pytest.raises(ValueError, match=message):
            batch.check(2 if "max_seq_len" in message else MAX_LEN, NUM_ITEMS)
    # A checked batch is held to each caller's limits from its recorded extent alone.
    with pytest.raises(ValueError, match="exceeds max_seq_len=2"):
        checked.check(2, NUM_ITEMS)


def test_model_checks_each_batch_and_its_operators_skip_their_checks(monkeypatch):
    """encode() checks every batch against the model's limits; its operators then read nothing on the host."""
    import hstu_kernels.jagged as jagged

    model = build(HSTU, shared_negatives=True)
    with pytest.raises(ValueError, match="JaggedBatch.seq_offsets"):
        model.training_loss(make_batch([MAX_LEN + 1, 2]))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):  # checked for a looser limit elsewhere
        model.training_loss(make_batch([MAX_LEN + 1, 2]).check(MAX_LEN + 1, NUM_ITEMS))
    reads = []
    for module in (jagged, *(sys.modules[name] for name in list(sys.modules) if name.startswith("hstu_kernels.ops."))):
        if hasattr(module, "check_offsets"):
            monkeypatch.setattr(module, "check_offsets", lambda *a, **k: reads.append(a[-1]))
    model.training_loss(make_batch([4, 2]))
    model.recommend(make_batch([4, 2]), k=3, with_target_rank=True)
    assert reads == []
    q = torch.randn(3, 1, 4)
    hstu_kernels.hstu_attention(q, q, q, torch.tensor([0, 3]), 4, 1.0, backend="reference")  # a checked call
    assert reads == ["hstu_attention"]


def test_compiled_parts_count_every_operator_call():
    """With regional compilation one traced block serves every block: the manager still counts one
    attention call per block and step, and one embedding and loss call per step."""
    model = build(HSTU, kernels={"hstu_hierarchical_attention": True}, shared_negatives=True)
    model.compile_parts(backend="eager")
    steps = 3
    for seed in range(steps):
        model.training_loss(make_batch([4, 2, 5], seed=seed)).backward()
    calls = {op: sum(s["calls"].values()) for op, s in model.manager.get_stats().items()}
    blocks = HSTU["num_blocks"]
    assert calls["hstu_hierarchical_attention"] == steps * blocks
    assert calls["fused_attention_layernorm"] == steps * blocks * 2  # attention_input and attention_output
    assert calls["hierarchical_sequence_fusion"] == steps and calls["sequence_recommendation_interaction"] == steps


def test_the_encoder_config_builds_only_the_framework_encoders(tmp_path):
    """An encoder config comes from files too (config.json, a checkpoint's hyper_parameters): a _target_
    outside ENCODER_TARGETS is refused, and nested _target_ entries are passed on, never called."""
    planted = {"_target_": "hstu.files.write_text_atomically", "path": str(tmp_path / "planted.txt"), "text": "ran"}
    with pytest.raises(ConfigError, match=r"^model\.encoder\._target_='hstu\.files\.write_text_atomically': must be"):
        build(planted)
    with pytest.raises(InstantiationException, match="unexpected keyword argument 'planted'"):  # passed on as data
        build({**HSTU, "planted": planted})
    assert not (tmp_path / "planted.txt").exists()
