"""Serving on static shapes (hstu.serving.static_shapes) and its CUDA graphs (hstu.serving.graphs).

On the CPU the engine's static steps run without capture: padded to their buckets (or to larger
ones) they must give the eager engine's results and fill the cache with the same keys and values.
The ``gpu`` tests compare replayed graphs with the eager engine at HSTU-large size. Tolerance as in
tests/test_serving.py (1e-5 on cosine scores: a padded step sums in another order).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from hstu.serving.engine import Request, ServingOptions
from hstu.serving.graphs import StaticSteps
from hstu.serving.static_shapes import HostStep, dummy_sequences, fill, round_up
from test_serving import MAX_SEQ_LEN, NUM_ITEMS, assert_same_top_k, make_recommender, random_history


# ---- buckets -----------------------------------------------------------------------------------------

def test_capacities_hold_every_count_with_at_most_a_quarter_of_padding():
    for n in range(1, 5000):
        c = round_up(n)
        assert n <= c <= max(n, 8) * 1.25 and round_up(c) == c
        for longest in (1, 3, 16, 200):
            assert dummy_sequences(c, longest) * longest >= c - n  # the padding fits the dummy sequences
        cap = max(n, 200 * math.ceil(n / 200))  # a capacity capped at users x max_seq_len
        capped = min(c, cap)
        assert dummy_sequences(capped, 200) * 200 >= capped - n


def host_step(rng, num_users, max_seq_len, delta):
    """Random jagged counts of a step (values are irrelevant to the layout)."""
    new = rng.integers(1, (4 if delta else max_seq_len) + 1, num_users)
    cached = rng.integers(1, max_seq_len - new + 1) if delta else np.zeros(num_users, dtype=np.int64)
    seen = rng.integers(1, 3 * max_seq_len, num_users)
    offsets = [np.concatenate([[0], np.cumsum(x)]).astype(np.int64) for x in (new, cached, seen)]
    tokens, num_cached, exclusions = (int(o[-1]) for o in offsets)
    return HostStep(rng.integers(1, 50, tokens), rng.integers(0, 1 << 40, tokens), rng.integers(0, 10, tokens),
                    rng.integers(0, 1 << 40, tokens), offsets[0], offsets[1], rng.integers(0, 1 << 40, num_cached),
                    rng.integers(0, 50, exclusions), offsets[2])


@pytest.mark.parametrize("delta", [False, True], ids=["whole", "delta"])
def test_filled_inputs_put_every_padding_token_in_a_sequence(delta):
    """Real values first, padding in dummy sequences no longer than allowed, padded users empty, the
    extra top-k query owning the padded exclusions, every offset ending at its capacity."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        step = host_step(rng, int(rng.integers(1, 40)), 50, delta)
        shape = step.shape("delta" if delta else "whole", int(rng.integers(1, 300)), 50, 3706)
        packed = np.full(shape.size, -7, dtype=np.int64)
        fill(shape, step, packed)
        views = shape.split(packed)
        u, n = step.num_users, int(step.seq_offsets[-1])
        assert (packed != -7).all()
        np.testing.assert_array_equal(views["item_ids"][:n], step.item_ids)
        assert (views["item_ids"][n:] == 0).all() and (views["positions"][n:] == 0).all()
        offsets, cached_offsets = views["seq_offsets"], views["cached_offsets"]
        np.testing.assert_array_equal(offsets[:u + 1], step.seq_offsets)
        assert offsets[-1] == shape.tokens and cached_offsets[-1] == shape.cached
        lengths, cached_lengths = np.diff(offsets), np.diff(cached_offsets)
        assert (lengths[u:shape.users] == 0).all() and (cached_lengths[u:shape.users] == 0).all()
        assert lengths.max() <= shape.query_rows and (lengths + cached_lengths).max() <= shape.max_seq_len
        np.testing.assert_array_equal(views["last"][:u], step.seq_offsets[1:] - 1)
        assert (views["last"] >= 0).all() and (views["last"] < shape.tokens).all()
        exclude_offsets = views["exclude_offsets"]
        assert exclude_offsets[shape.users] == step.exclude_offsets[-1] and exclude_offsets[-1] == shape.exclusions
        assert shape.k >= 1 and shape.users >= u


# ---- the static engine on the CPU ------------------------------------------------------------------

def with_static_steps(recommender, enlarge=False, max_bytes=1 << 30):
    """The recommender's engine serving through static steps without capture (what CUDA replays);
    ``enlarge``: buckets larger than needed in every dimension."""
    engine = recommender.serving_engine()
    steps_class = LargerSteps if enlarge else StaticSteps
    engine.static_steps = steps_class(engine.encoder, engine.unit_items, engine.device, capture=False,
                                      max_bytes=max_bytes)
    return engine


class LargerSteps(StaticSteps):
    def shape(self, form, step, k):
        shape = super().shape(form, step, k)
        users = 2 * shape.users
        rows = shape.query_rows if form == "whole" else min(2 * shape.query_rows + 1, shape.max_seq_len)
        tokens = min(shape.tokens + 13, users * rows)
        cached = shape.cached + 11 if form == "delta" else 0
        return dataclasses.replace(
            shape, users=users, query_rows=rows, tokens=tokens, cached=cached, exclusions=2 * shape.exclusions + 3,
            k=min(2 * shape.k + 1, NUM_ITEMS), token_dummies=-(-tokens // rows),
            cached_dummies=-(-cached // shape.max_seq_len))


LENGTHS = (1, 2, 3, 5, MAX_SEQ_LEN - 1, MAX_SEQ_LEN, MAX_SEQ_LEN + 3)


def request_rounds(rounds, seed):
    """Batches of 1..5 users whose histories grow (cache hits), slide past max_seq_len, start over
    (misses) or change (misses), with k from 1 to the catalogue."""
    rng = np.random.default_rng(seed)
    histories = {user: random_history(3 * MAX_SEQ_LEN, seed=100 + user) for user in range(8)}
    length = {user: int(rng.choice(LENGTHS)) for user in histories}
    out = []
    for _ in range(rounds):
        users = rng.choice(len(histories), int(rng.integers(1, 6)), replace=False)
        batch = []
        for user in users:
            grow = rng.random()
            if grow < 0.6:
                length[user] = min(length[user] + int(rng.integers(1, 4)), 3 * MAX_SEQ_LEN)
            elif grow < 0.8:
                length[user] = int(rng.choice(LENGTHS))
            items, times = histories[user]
            k = int(rng.choice([1, 5, 5, 5, 5, 17, NUM_ITEMS]))
            batch.append(Request(int(user), items[:length[user]], times[:length[user]], k))
        out.append(batch)
    return out


def assert_same_results(got, want):
    for result, expected in zip(got, want, strict=True):
        ranked = [(r["item"], r["score"]) for r in result["recommendations"]]
        assert_same_top_k(ranked, [(r["item"], r["score"]) for r in expected["recommendations"]])
        applied, eager = result["optimizations_applied"], expected["optimizations_applied"]
        for key in ("path", "kv_cache", "kv_cache_detail", "positions_reused", "positions_computed"):
            assert applied[key] == eager[key], key


def assert_same_cache(engine, eager):
    assert list(engine.cache._entries) == list(eager.cache._entries)
    for user, entry in engine.cache._entries.items():
        want = eager.cache._entries[user]
        assert (entry.num_events, entry.history_len, entry.prefix) == (want.num_events, want.history_len, want.prefix)
        torch.testing.assert_close(entry.kv, want.kv, atol=1e-5, rtol=1e-5)
        assert entry.kv.is_contiguous() and entry.kv.untyped_storage().nbytes() == entry.kv.nbytes


@pytest.mark.parametrize("kernels, enlarge, rounds", [
    (None, False, 30), (None, True, 30), ({"hstu_hierarchical_attention": True, "interaction": True}, True, 4),
], ids=["reference", "reference-larger-buckets", "triton-larger-buckets"])
def test_static_steps_equal_the_eager_engine(kernels, enlarge, rounds):
    """Random jagged batches (hits and misses mixed, slides, lengths 1, 2 and max_seq_len): the same
    recommendations, reports and cache entries as the eager engine, bucket after bucket."""
    eager = make_recommender(kernels=kernels)
    static = make_recommender(kernels=kernels)
    engine = with_static_steps(static, enlarge)
    shapes = []
    slot = engine.static_steps._slot
    engine.static_steps._slot = lambda shape, keep_kv: shapes.append(shape) or slot(shape, keep_kv)
    outcomes = set()
    for batch in request_rounds(rounds, seed=7 if kernels else 3):
        want = eager.serving_engine().infer_batch(batch)
        got = engine.infer_batch(batch)
        assert_same_results(got, want)
        assert_same_cache(engine, eager.serving_engine())
        for result in got:
            applied = result["optimizations_applied"]
            assert applied["cuda_graph"] is False and applied["cuda_graph_detail"].startswith("static shapes run eagerly")
            outcomes.add((applied["kv_cache"], len(batch) > 1))
    if not kernels:
        assert {("hit", True), ("miss", True), ("hit", False), ("miss", False)} <= outcomes
        assert len(set(shapes)) < len(shapes) == rounds  # buckets met again, with other inputs


class FakeGraphs(StaticSteps):
    """Static steps that "capture" on the CPU: the graph reruns the step into its first outputs, and its
    memory pool counts ``pool_bytes`` (what the CUDA capture measures)."""

    def __init__(self, engine, max_bytes, pool_bytes):
        super().__init__(engine.encoder, engine.unit_items, engine.device, capture=False, max_bytes=max_bytes)
        self.capture, self.pool_bytes, self.captures = True, pool_bytes, 0

    def _capture(self, slot):
        from hstu.serving import static_shapes

        def run():
            return static_shapes.run(self.encoder, self.unit_items, slot.shape, slot.inputs, slot.cached_kv,
                                     slot.keep_kv)

        class Graph:
            def replay(self):
                for output, value in zip(slot.outputs, run()):
                    if output is not None:
                        output.copy_(value)

        slot.graph, slot.outputs = Graph(), run()
        self.captures += 1
        self._account(slot, self.pool_bytes)
        return True


def whole_window_buckets(engine, lengths, user="u"):
    """Serve one user's first n events for each n (each n below its own bucket): the reports."""
    items, times = random_history(MAX_SEQ_LEN, seed=1)
    return [engine.infer_batch([Request(user, items[:n], times[:n], 4)])[0]["optimizations_applied"]
            for n in lengths]


def held(engine):
    return [shape.tokens for shape, _ in engine.static_steps._slots]


@pytest.mark.parametrize("pool_bytes", [0, 5000], ids=["buffers", "buffers-and-graph-pools"])
def test_static_steps_are_bounded_in_bytes_least_recently_used_first_out(pool_bytes):
    """Buckets of 1, 3 and 12 tokens: a bound that holds the two largest evicts the least recently used
    bucket, by bytes (buffers and graph pools), and the stats add them up."""
    probe = make_recommender(cache_bytes=0)
    probe_engine = with_static_steps(probe)
    probe_engine.static_steps = FakeGraphs(probe_engine, 1 << 30, pool_bytes)
    whole_window_buckets(probe_engine, (1, 3, MAX_SEQ_LEN))
    size = {shape.tokens: slot.nbytes for (shape, _), slot in probe_engine.static_steps._slots.items()}
    assert sorted(size) == [1, 3, MAX_SEQ_LEN] and size[MAX_SEQ_LEN] > size[3] > size[1]

    recommender = make_recommender(cache_bytes=0)
    engine = with_static_steps(recommender)
    engine.static_steps = FakeGraphs(engine, size[3] + size[MAX_SEQ_LEN], pool_bytes)
    whole_window_buckets(engine, (1, 3, MAX_SEQ_LEN))
    assert held(engine) == [3, MAX_SEQ_LEN]
    whole_window_buckets(engine, (3, 1))  # 3 used again: 12 is the least recent, and goes
    assert held(engine) == [3, 1]
    assert recommender.get_comprehensive_stats()["cuda_graphs"] == {
        "enabled": True, "buckets": 2, "captured": 2, "bytes": size[3] + size[1], "graph_pool_bytes": 2 * pool_bytes,
        "max_bytes": size[3] + size[MAX_SEQ_LEN], "evictions": 2, "too_large_buckets": 0, "reason": None}
    assert engine.static_steps.captures == 4  # 1, 3, 12, then 1 again after its eviction


@pytest.mark.parametrize("pool_bytes", [0, 5000], ids=["its-buffers", "its-graph-pool"])
def test_a_bucket_above_the_bound_runs_eagerly_and_says_so(pool_bytes):
    """A bucket whose buffers (or buffers and graph pool) exceed the whole bound is not kept: its
    steps run eagerly on its static shapes with the same results, and the report says why."""
    probe = with_static_steps(make_recommender(cache_bytes=0))
    probe.static_steps = FakeGraphs(probe, 1 << 30, pool_bytes)
    whole_window_buckets(probe, (MAX_SEQ_LEN,))
    (slot,) = probe.static_steps._slots.values()
    bound = slot.buffer_bytes + pool_bytes // 2 if pool_bytes else slot.buffer_bytes - 1

    eager = make_recommender(cache_bytes=0).serving_engine()
    recommender = make_recommender(cache_bytes=0)
    engine = with_static_steps(recommender)
    engine.static_steps = FakeGraphs(engine, bound, pool_bytes)
    reports = whole_window_buckets(engine, (MAX_SEQ_LEN, MAX_SEQ_LEN))
    needs = f"the bucket needs {slot.nbytes:,} bytes, more than graph_bytes={bound:,}: run eagerly"
    if pool_bytes:  # captured once (which measures its pool), then dropped
        assert reports[0]["cuda_graph"] is True and reports[0]["cuda_graph_detail"].startswith("captured and replayed")
    else:
        assert reports[0]["cuda_graph"] is False and reports[0]["cuda_graph_detail"].startswith(needs)
    assert reports[1]["cuda_graph"] is False and reports[1]["cuda_graph_detail"].startswith(needs)
    assert engine.static_steps.captures == (1 if pool_bytes else 0)
    assert recommender.get_comprehensive_stats()["cuda_graphs"] == {
        "enabled": True, "buckets": 0, "captured": 0, "bytes": 0, "graph_pool_bytes": 0, "max_bytes": bound,
        "evictions": 0, "too_large_buckets": 1, "reason": None}
    items, times = random_history(MAX_SEQ_LEN, seed=2)
    assert_same_results(engine.infer_batch([Request("v", items, times, 4)]),
                        eager.infer_batch([Request("v", items, times, 4)]))


@pytest.mark.parametrize("delta", [False, True], ids=["whole", "delta"])
def test_a_static_step_reads_no_device_value_on_the_host(delta, monkeypatch):
    """What a CUDA graph captures must not wait for the device: the step (reference attention, its
    layout and the reference top-k) runs with every tensor-to-host read raising."""
    from hstu.serving import static_shapes

    recommender = make_recommender()
    engine = recommender.serving_engine()
    step = host_step(np.random.default_rng(1), 3, MAX_SEQ_LEN, delta)
    step.item_ids = step.item_ids % NUM_ITEMS + 1
    step.positions = np.concatenate([np.arange(n) for n in np.diff(step.seq_offsets)])
    step.exclude_ids = step.exclude_ids % NUM_ITEMS
    shape = step.shape("delta" if delta else "whole", 5, MAX_SEQ_LEN, NUM_ITEMS)
    packed = np.zeros(shape.size, dtype=np.int64)
    fill(shape, step, packed)
    inputs = shape.split(torch.from_numpy(packed))
    cached_kv = torch.randn(2, shape.cached, engine.encoder.kv_width) if delta else None

    def host_read(*args, **kwargs):
        raise AssertionError("a host read of a device value inside the step")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    with torch.no_grad():
        packed_out, new_kv = static_shapes.run(engine.encoder, engine.unit_items, shape, inputs, cached_kv, True)
    monkeypatch.undo()
    assert packed_out.shape == (shape.users + 1, 2 * shape.k) and new_kv.shape[1] == shape.tokens


@pytest.mark.parametrize("options, model_kwargs, reason", [
    (ServingOptions(), {}, "CUDA only (device cpu)"),
    (ServingOptions(cuda_graphs=False), {}, "switched off (cuda_graphs=False)"),
    (ServingOptions(), {"encoder": "sasrec"}, "no static-shape step for this model"),
])
def test_reports_say_why_no_graph_ran(options, model_kwargs, reason):
    recommender = make_recommender(**model_kwargs)
    recommender.serving_engine(options)
    items, times = random_history(5, seed=1)
    applied = recommender.infer_with_optimal_strategy("u", list(zip(items, times)), 3)["optimizations_applied"]
    assert applied["cuda_graph"] is False and applied["cuda_graph_detail"].startswith(reason)
    graphs = recommender.get_comprehensive_stats()["cuda_graphs"]
    assert graphs["enabled"] is False and graphs["reason"].startswith(reason)


def test_batches_above_the_user_cap_run_eagerly_and_say_so(monkeypatch):
    import hstu.serving.engine as engine_module

    monkeypatch.setattr(engine_module, "MAX_GRAPH_USERS", 2)
    engine = with_static_steps(make_recommender())
    histories = [random_history(n, seed=n) for n in (2, 3, 4)]
    for batch in (histories[:2], histories):
        results = engine.infer_batch([Request(user, items, times, 3) for user, (items, times) in enumerate(batch)])
        (detail,) = {r["optimizations_applied"]["cuda_graph_detail"] for r in results}
        assert detail == "batch of 3 users: graphs hold at most 2" if len(batch) == 3 else \
            detail.startswith("static shapes run eagerly: whole users=2 ")


# ---- CUDA graphs -----------------------------------------------------------------------------------

def hstu_large(interaction: bool, cuda_graphs: bool, cache_bytes: int = 1 << 30):
    """ML-1M HSTU-large's shapes (8 blocks, dim 50, 2 heads, max_seq_len 200, 3,706 items) on Triton."""
    from hstu.inference import Recommender
    from hstu.serving.engine import serving_kernel_flags
    from test_serving import make_model

    flags = serving_kernel_flags("cuda")
    flags["interaction"] = interaction
    ids = list(range(10, 3716))
    model = make_model(num_blocks=8, heads=2, dqk=25, dv=25, dim=50, max_seq_len=200, num_items=3706, kernels=flags)
    recommender = Recommender(model, ids, device="cuda")
    recommender.serving_engine(ServingOptions(cache_bytes=cache_bytes, cuda_graphs=cuda_graphs))
    return recommender, ids


@pytest.mark.gpu
@pytest.mark.parametrize("interaction", [True, False], ids=["topk-triton", "topk-reference"])
def test_gpu_graphs_equal_the_eager_engine(interaction):
    """Misses, hits (199+1, 100+1), a slide, batches of several buckets: replayed graphs give the eager
    engine's results and cache entries; a bucket replayed with another user's inputs gives that user's."""
    graphed, ids = hstu_large(interaction, cuda_graphs=True)
    eager, _ = hstu_large(interaction, cuda_graphs=False)
    histories = {user: random_history(260, seed=user, ids=ids) for user in range(6)}

    def request(user, n, k=10):
        items, times = histories[user]
        return Request(user, items[:n], times[:n], k)

    rounds = [[request(0, 200)], [request(1, 200)],  # one bucket, two users' inputs
              [request(0, 201)], [request(1, 201)],  # slides
              [request(2, 199)], [request(2, 200)], [request(3, 100)], [request(3, 101)],  # 199+1, 100+1
              [request(3, 102, k=50)],  # another k bucket
              [request(4, 1), request(5, 2)], [request(4, 3), request(5, 120), request(0, 202)],  # mixed
              [request(1, 202)], [request(2, 203)]]
    replays = 0
    for batch in rounds:
        want = eager.serving_engine().infer_batch(batch)
        got = graphed.serving_engine().infer_batch(batch)
        assert_same_results(got, want)
        assert_same_cache(graphed.serving_engine(), eager.serving_engine())
        for result in got:
            applied = result["optimizations_applied"]
            assert applied["cuda_graph"] is True, applied["cuda_graph_detail"]
            replays += 1
        for result in want:
            assert result["optimizations_applied"]["cuda_graph"] is False
    assert replays == sum(len(b) for b in rounds)
    graphs = graphed.get_comprehensive_stats()["cuda_graphs"]
    assert graphs["enabled"] and graphs["reason"] is None and 1 <= graphs["captured"] == graphs["buckets"] <= len(rounds)
    calls = {op: stats["calls"] for op, stats in graphed.get_comprehensive_stats()["kernels"].items()}
    # every replay counts its operator calls (8 blocks: 8 attention calls a step)
    assert calls["hstu_hierarchical_attention"]["triton"] >= 8 * len(rounds)
    assert calls["fused_attention_layernorm"]["triton"] >= 16 * len(rounds)
    assert calls["interaction"]["triton" if interaction else "reference"] >= len(rounds)
    for result in got:
        assert result["optimizations_applied"]["kernels"]["interaction"] == ("triton" if interaction else "reference")


@pytest.mark.gpu
def test_gpu_second_replay_reads_its_own_inputs():
    """The same bucket replayed for user A, then B, then A again (cache off: every request a whole
    window): each result is that user's own."""
    graphed, ids = hstu_large(True, cuda_graphs=True, cache_bytes=0)
    eager, _ = hstu_large(True, cuda_graphs=False, cache_bytes=0)
    histories = [random_history(150, seed=20 + user, ids=ids) for user in range(2)]
    engine = graphed.serving_engine()
    for user in (0, 1, 0, 1):
        items, times = histories[user]
        (got,) = engine.infer_batch([Request(user, items, times, 10)])
        (want,) = eager.serving_engine().infer_batch([Request(user, items, times, 10)])
        assert got["optimizations_applied"]["cuda_graph"] is True
        assert_same_results([got], [want])
    assert len(engine.static_steps) == 1


@pytest.mark.gpu
def test_gpu_warm_up_captures_the_single_user_buckets_it_meets():
    """The server's warm-up (a whole window, a hit, a one-event history) captures their buckets; the
    same requests afterwards replay them without capturing again."""
    recommender, ids = hstu_large(True, cuda_graphs=True)
    engine = recommender.serving_engine()
    engine.warm_up()
    captured = engine.stats()["cuda_graphs"]["captured"]
    assert captured >= 3 and engine.stats()["serving"]["requests"] == 0
    items, times = random_history(200, seed=3, ids=ids)
    for n in (199, 200, 1):
        (result,) = engine.infer_batch([Request("u", items[:n], times[:n], 10)])
        assert result["optimizations_applied"]["cuda_graph_detail"].startswith("replayed: ")
    assert engine.stats()["cuda_graphs"]["captured"] == captured


@pytest.mark.gpu
def test_gpu_graph_pools_are_measured_bounded_and_released():
    """A captured graph's pool is measured exactly (the allocator's segments of that pool); under a
    bound of 1.5 such buckets, new buckets evict the least recently used, the bytes held stay within
    it and the device's reserved memory does not grow with each capture; a bucket above the bound is
    captured once, then runs eagerly with the same results."""
    recommender, ids = hstu_large(True, cuda_graphs=True, cache_bytes=0)
    eager, _ = hstu_large(True, cuda_graphs=False, cache_bytes=0)
    items, times = random_history(200, seed=4, ids=ids)

    def serve(n):
        request = Request("u", items[:n], times[:n], 10)
        (got,) = recommender.serving_engine().infer_batch([request])
        assert_same_results([got], eager.serving_engine().infer_batch([request]))
        return got["optimizations_applied"]

    serve(200)
    (slot,) = recommender.serving_engine().static_steps._slots.values()
    pool = tuple(slot.graph.pool())
    segments = [s["total_size"] for s in torch.cuda.memory_snapshot() if tuple(s["segment_pool_id"]) == pool]
    assert slot.graph_bytes == sum(segments) > 0

    bound = slot.nbytes * 3 // 2
    recommender.serving_engine(ServingOptions(cache_bytes=0, graph_bytes=bound))
    reserved = []
    for n in (200, 100, 50, 25, 200):  # five whole-window buckets (200, 112, 56, 28 and 200 tokens)
        assert serve(n)["cuda_graph"] is True
        stats = recommender.get_comprehensive_stats()["cuda_graphs"]
        assert 0 < stats["bytes"] <= bound and stats["graph_pool_bytes"] > 0
        reserved.append(torch.cuda.memory_reserved())
    assert stats["evictions"] >= 2 and stats["too_large_buckets"] == 0
    assert reserved[-1] - reserved[0] <= bound, reserved

    recommender.serving_engine(ServingOptions(cache_bytes=0, graph_bytes=slot.buffer_bytes + 1))
    assert serve(200)["cuda_graph_detail"].startswith("captured and replayed")
    report = serve(200)
    assert report["cuda_graph"] is False and report["cuda_graph_detail"].startswith("the bucket needs ")
    assert recommender.get_comprehensive_stats()["cuda_graphs"]["too_large_buckets"] == 1
