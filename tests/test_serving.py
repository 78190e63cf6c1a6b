"""Serving: vectorised id mapping, the per-user KV cache, incremental inference against a full
recomputation, and the entry point that picks the path and reports it.

Tolerance: an incremental step (or a batch) sums in another order than a whole-window pass, so
scores may differ by float32 rounding; 1e-5 on cosine scores in [-1, 1] (measured differences are
below 1e-6 here), ids equal except where two scores tie within that.
"""
from __future__ import annotations

import operator

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hstu.data.sequences import REPEAT_POLICIES, build_sequences
from hstu.data.sources import RawInteractions
from hstu.errors import RequestError
from hstu.inference import Recommender
from hstu.model.recommender import SequentialRecommender
from hstu.serving.engine import ServingOptions
from hstu.serving.histories import prepare_histories
from hstu.serving.ids import ItemIdIndex
from hstu.serving.kv_cache import ENTRY_OVERHEAD_BYTES, CacheEntry, KVCache
from hstu_kernels import OPERATORS

HAS_CUDA = torch.cuda.is_available()
ATOL = 1e-5
MAX_SEQ_LEN = 12
NUM_ITEMS = 60


def make_model(num_blocks=2, heads=2, dqk=8, dv=6, dim=16, max_seq_len=MAX_SEQ_LEN, num_items=NUM_ITEMS,
               encoder="hstu", kernels=None, seed=0, **embedding) -> SequentialRecommender:
    torch.manual_seed(seed)
    if encoder == "hstu":
        encoder_config = dict(_target_="hstu.model.hstu.HSTUEncoder", num_blocks=num_blocks, num_heads=heads,
                              dqk=dqk, dv=dv, dropout=0.3, alpha=0.7)
    else:
        encoder_config = dict(_target_="hstu.model.sasrec.SASRecEncoder", num_blocks=num_blocks, num_heads=heads,
                              dropout=0.3)
    model = SequentialRecommender(num_items=num_items, max_seq_len=max_seq_len, dim=dim, input_dropout=0.3,
                                  encoder=encoder_config, loss=dict(kind="sampled", num_negatives=4),
                                  kernels=kernels, **embedding)
    with torch.no_grad():  # trained-looking bias tables: far from zero, so a wrong position or time shows
        for block in getattr(model.encoder, "blocks", []):
            for table in (getattr(block, "pos_weight", None), getattr(block, "time_weight", None)):
                if table is not None:
                    table.normal_(0, 0.5)
    return model


ORIGINAL_IDS = [7 * i + 1000 for i in range(NUM_ITEMS)]


def make_recommender(device="cpu", cache_bytes=1 << 24, ids=ORIGINAL_IDS, **model_kwargs) -> Recommender:
    recommender = Recommender(make_model(**model_kwargs), ids, device=device)
    recommender.serving_engine(ServingOptions(cache_bytes=cache_bytes))
    return recommender


def random_history(length, seed=0, ids=ORIGINAL_IDS, start=1_600_000_000):
    rng = np.random.default_rng(seed)
    items = rng.choice(ids, length).tolist()
    gaps = (10 ** rng.uniform(0, 6, length)).astype(np.int64)  # seconds to ~10 days: many time buckets
    return items, (start + np.cumsum(gaps)).tolist()


def served(recommender, user, items, times, k=8, request_time=None):
    result = recommender.infer_with_optimal_strategy(user, list(zip(items, times)), k, request_time)
    return [(r["item"], r["score"]) for r in result["recommendations"]], result["optimizations_applied"]


def assert_same_top_k(got, want, atol=ATOL):
    assert len(got) == len(want)
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], atol=atol, rtol=0)
    for (got_id, got_score), (want_id, want_score) in zip(got, want):
        assert got_id == want_id or abs(got_score - want_score) < atol


def full_recompute(recommender, items, times, k=8, request_time=None):
    return recommender.recommend([(items, times)], k=k, request_time=request_time)[0]


# ---- ids -------------------------------------------------------------------------------------------

def dict_lookup(original_ids, items):
    """The per-item mapping the vectorised index replaces (int ids: operator.index, else unknown)."""
    str_ids = isinstance(original_ids[0], str)
    index_of = {original: i + 1 for i, original in enumerate(original_ids)}

    def normalise(item):
        if str_ids:
            return str(item)
        try:
            return operator.index(item)
        except TypeError:
            return item

    return [index_of.get(normalise(item), 0) for item in items]


@pytest.mark.parametrize("kind", ["int-dense", "int-sparse", "str"])
def test_vectorised_id_lookup_equals_the_dict_mapping(kind):
    """Dense table (ids within a small span), hash index (sparse 64-bit ids) and str ids."""
    rng = np.random.default_rng(1)
    catalogue = rng.choice(10**9 if kind != "int-dense" else 2000, 500, replace=False).tolist()
    if kind == "int-sparse":
        catalogue = [c * 2**30 for c in catalogue]
    if kind == "str":
        catalogue = [f"B{c:010d}" for c in catalogue]
    index = ItemIdIndex(catalogue)
    assert (index._dense is not None) == (kind == "int-dense")
    known = rng.choice(catalogue, 300).tolist()
    unknown = ["nope", "B0000000000", 7] if kind == "str" else [-5, 10**9 + 3, 2**62, "12"]
    queries = known + unknown
    rng.shuffle(queries)
    assert index.lookup(queries).tolist() == dict_lookup(catalogue, queries)
    assert index.lookup(np.asarray(known)).tolist() == dict_lookup(catalogue, known)
    for outside in ([-5], [10**9 + 3], [min(catalogue) - 1, max(catalogue) + 1]) if kind != "str" else ():
        ints = known[:3] + outside  # plain ints (the fast conversion) beyond either end of the id span
        assert index.lookup(ints).tolist() == dict_lookup(catalogue, ints)
    assert index.lookup([]).tolist() == []


def test_int_ids_take_numpy_bool_and_integral_float_values_but_not_strings():
    index = ItemIdIndex([0, 1, 5, 2**40])
    queries = [np.int32(5), np.uint8(1), True, 2**40, 5.0, 5.5, "5", None, 2**70]
    assert index.lookup(queries).tolist() == dict_lookup([0, 1, 5, 2**40], queries) == [3, 2, 2, 4, 3, 0, 0, 0, 0]
    assert index.lookup(np.array([5.0, 1.5])).tolist() == [3, 0]
    assert ItemIdIndex(["1", "x"]).lookup([1, "x", 2]).tolist() == [1, 2, 0]  # str ids compare as str


def test_prepare_histories_orders_events_and_names_bad_histories():
    index = ItemIdIndex([10, 20, 30])
    events = prepare_histories(index, [([30, 10, 20], [5, 3, 5]), ([20], [1])])
    assert events.item_ids.tolist() == [1, 3, 2, 2] and events.timestamps.tolist() == [3, 5, 5, 1]  # stable ties
    assert events.offsets.tolist() == [0, 3, 4]
    skipped = prepare_histories(index, [([10, 99], [1, 2]), ([99, 30], [1, 2])], unknown_items="skip")
    assert skipped.item_ids.tolist() == [1, 3] and skipped.offsets.tolist() == [0, 1, 2]
    with pytest.raises(KeyError, match=r"history 1: item id\(s\) \[99\] unknown"):
        prepare_histories(index, [([10], [1]), ([10, 99], [1, 2])])
    with pytest.raises(ValueError, match="history 1: no known items"):
        prepare_histories(index, [([10], [1]), ([99], [2])], unknown_items="skip")
    with pytest.raises(ValueError, match="history 0: timestamps must be integer"):
        prepare_histories(index, [([10], [1.5])])



@given(events=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.integers(0, 3)), min_size=1, max_size=40),
       repeats=st.sampled_from(REPEAT_POLICIES))
def test_prepare_histories_drops_the_events_training_drops(events, repeats):
    """Each user's (item, timestamp) events sent as a request history come out as the training data builder
    (``data.repeats``) keeps them from the same rows: serving sees what the model was trained on."""
    users = sorted({user for user, _, _ in events})
    histories = [([item for u, item, _ in events if u == user], [ts for u, _, ts in events if u == user])
                 for user in users]
    served = prepare_histories(ItemIdIndex(list(range(5))), histories, repeats=repeats)
    columns = (np.asarray(column, dtype=np.int64) for column in zip(*events))
    trained = build_sequences(RawInteractions(*columns), min_events=1, repeats=repeats)
    assert served.offsets.tolist() == trained.offsets.tolist()
    assert served.timestamps.tolist() == trained.timestamps.tolist()
    assert (served.item_ids - 1).tolist() == trained.item_original_ids[trained.item_ids - 1].tolist()


def test_recommendations_follow_the_run_data_repeats():
    """A history with an exact repeat gets the answer of the history without it under the default rule, and
    another answer where the run kept repeats (``data.repeats=keep`` in its config)."""
    model, items, times = make_model(), *random_history(8, seed=3)
    repeated = (items[:5] + [items[4]] + items[5:], times[:5] + [times[4]] + times[5:])
    default = Recommender(model, ORIGINAL_IDS)
    assert default.repeats == "drop_exact"
    assert default.recommend([repeated], k=8) == default.recommend([(items, times)], k=8)
    keep = Recommender(model, ORIGINAL_IDS, config={"data": {"datamodule": {"repeats": "keep"}}})
    assert keep.recommend([repeated], k=8) != keep.recommend([(items, times)], k=8)
    assert default.recommend([repeated], k=8, repeats="keep") == keep.recommend([repeated], k=8)  # per call
    with pytest.raises(ValueError, match=r"^repeats must be one of \[.*\] or None, got 'no'$"):
        default.recommend([repeated], k=8, repeats="no")
    with pytest.raises(ValueError, match=r"^config data\.datamodule\.repeats must be one of \[.*\], got 'no'$"):
        Recommender(model, ORIGINAL_IDS, config={"data": {"datamodule": {"repeats": "no"}}})

# ---- the cache ---------------------------------------------------------------------------------------

def entry(rows, export="e", width=4):
    kv = torch.zeros(2, rows, width)
    return CacheEntry(export=export, num_events=rows + 1, history_len=rows + 1,
                      prefix=b"", kv=kv)


def test_cache_is_bounded_in_bytes_and_evicts_least_recently_used():
    one = entry(8).nbytes
    cache = KVCache(capacity_bytes=3 * one)
    for user in "abc":
        cache.store(user, entry(8))
    cache._entries.move_to_end("a")  # "a" used most recently
    cache.store("d", entry(8))
    assert list(cache._entries) == ["c", "a", "d"] and cache.evictions == 1
    cache.store("e", entry(50))  # larger than the whole capacity: refused, nothing evicted for it
    assert cache.stats()["rejected_too_large"] == 1 and len(cache) == 3
    cache.store("a", entry(1))  # replacing an entry frees its old bytes
    assert cache.stats()["bytes"] == 2 * one + entry(1).nbytes
    assert entry(0).nbytes == ENTRY_OVERHEAD_BYTES


def test_cache_misses_name_their_reason():
    cache = KVCache(1 << 20)
    items, times = np.arange(1, 6), np.arange(100, 105)
    from hstu.serving.kv_cache import events_fingerprint

    stored = CacheEntry("e", 3, 3, events_fingerprint(items[:3], times[:3]), torch.zeros(1, 2, 4))
    cache.store("u", stored)
    assert cache.lookup("u", "e", items, times, 5, 8) == (stored, "hit")
    assert cache.lookup("v", "e", items, times, 5, 8)[1] == "no entry for this user"
    assert cache.lookup("u", "other", items, times, 5, 8)[1] == "entry from another export"
    assert "window slid" in cache.lookup("u", "e", items, times, 9, 8)[1]
    assert "changed" in cache.lookup("u", "e", items, times + (times == 101), 5, 8)[1]
    assert "shorter" in cache.lookup("u", "e", items[:2], times[:2], 2, 8)[1]
    stats = cache.stats()
    assert stats["hits"] == 1 and stats["misses"] == 5 and stats["hit_rate"] == pytest.approx(1 / 6)


# ---- incremental inference equals a full recomputation ------------------------------------------------

@pytest.mark.parametrize("kernels", [None, {"hstu_hierarchical_attention": True}, dict.fromkeys(OPERATORS, True)],
                         ids=["reference", "triton", "every-triton"])
def test_incremental_steps_equal_full_recomputation(kernels):
    """A user returns again and again: 1 event, +1, +3, +1, the same history at a later time, then past
    max_seq_len (the window slides: recomputed) and the same long history again (one position)."""
    recommender = make_recommender(kernels=kernels)
    items, times = random_history(3 * MAX_SEQ_LEN, seed=2)
    steps = [1, 2, 5, 6, 6, MAX_SEQ_LEN, MAX_SEQ_LEN + 2, MAX_SEQ_LEN + 2]
    expected_paths = ["whole window", "whole window", "incremental", "incremental", "incremental",
                      "incremental", "whole window", "incremental"]
    for step, (n, path) in enumerate(zip(steps, expected_paths)):
        request_time = times[n - 1] + 3600 * step if step == 4 else None
        got, report = served(recommender, "user", items[:n], times[:n], request_time=request_time)
        assert_same_top_k(got, full_recompute(recommender, items[:n], times[:n], request_time=request_time))
        assert report["path"] == path, (n, report)
        if path == "incremental":
            assert report["kv_cache"] == "hit" and report["positions_reused"] + report["positions_computed"] == min(
                n, MAX_SEQ_LEN)
    assert report["positions_computed"] == 1
    assert "hstu_hierarchical_attention" in report["kernels"]
    for op, backend in report["kernels"].items():
        assert backend == ("triton" if (kernels or {}).get(op) else "reference"), report["kernels"]


@pytest.mark.parametrize("kernels", [None, {"hstu_hierarchical_attention": True}], ids=["reference", "triton"])
def test_attention_layout_is_built_once_per_step_and_shared_by_the_blocks(kernels, monkeypatch):
    """A whole window and a cache hit: one layout per step, the same object in each block's call; none
    where the attention runs on Triton (its kernels compute their own indices)."""
    import hstu_kernels

    built, passed = [], []

    def spy(name, record):
        function = getattr(hstu_kernels, name)

        def wrapper(*args, **kwargs):
            out = function(*args, **kwargs)
            record.append(kwargs.get("layout") if record is passed else out)
            return out

        monkeypatch.setattr(hstu_kernels, name, wrapper)

    for name in ("hstu_attention_layout", "hstu_attention_delta_layout"):
        spy(name, built)
    for name in ("hstu_attention", "hstu_attention_delta"):
        spy(name, passed)
    recommender = make_recommender(kernels=kernels, num_blocks=3)
    items, times = random_history(8, seed=5)
    for n, path in ((7, "whole window"), (8, "incremental")):
        built.clear(), passed.clear()
        got, report = served(recommender, "u", items[:n], times[:n])
        assert report["path"] == path and len(passed) == 3
        if kernels:
            assert built == [] and passed == [None] * 3
        else:
            assert len(built) == 1 and all(layout is built[0] for layout in passed)
            assert built[0].form == ("whole" if path == "whole window" else "delta")
        assert_same_top_k(got, full_recompute(recommender, items[:n], times[:n]))


def test_request_time_moves_the_last_position_only():
    """The cached positions hold; the last one's query time is the request time: a later request time
    changes the scores, as it does in a full recomputation."""
    recommender = make_recommender()
    items, times = random_history(8, seed=3)
    served(recommender, "u", items, times)
    later = times[-1] + 30 * 86_400
    got, report = served(recommender, "u", items, times, request_time=later)
    assert report["kv_cache"] == "hit" and report["positions_computed"] == 1
    want = full_recompute(recommender, items, times, request_time=later)
    assert_same_top_k(got, want)
    assert [s for _, s in want] != [s for _, s in full_recompute(recommender, items, times)]


def test_a_request_time_before_the_history_is_refused():
    """The engine's entry points, like recommend() and the HTTP model, name a request time that precedes
    the user's last event (the time bias would take it for as long after the events)."""
    recommender = make_recommender()
    items, times = random_history(8, seed=3)
    with pytest.raises(RequestError, match=r"^request_time=\d+ is before the last event of user 'u' \(\d+\)"):
        served(recommender, "u", items, times, request_time=times[-1] - 1)
    served(recommender, "u", items, times, request_time=times[-1])  # the same second is no earlier


def test_out_of_order_event_recomputes():
    recommender = make_recommender()
    items, times = random_history(9, seed=4)
    served(recommender, "u", items[:6], times[:6])
    late_items = items[:6] + [items[8]]
    late_times = times[:6] + [times[2] - 1]  # an event that happened before the third one
    got, report = served(recommender, "u", late_items, late_times)
    assert report["kv_cache"] == "miss" and "changed" in report["kv_cache_detail"]
    assert_same_top_k(got, full_recompute(recommender, late_items, late_times))


def test_batch_of_hits_and_misses_equals_single_requests():
    from hstu.serving.engine import Request

    recommender = make_recommender()
    histories = [random_history(n, seed=10 + n) for n in (3, 7, 1, MAX_SEQ_LEN + 4, 9)]
    for user, (items, times) in enumerate(histories[:3]):  # a one-event history leaves nothing to cache
        served(recommender, user, items[:-1] or items, times[:-1] or times)
    engine = recommender.serving_engine()
    results = engine.infer_batch([Request(user, items, times, 5) for user, (items, times) in enumerate(histories)])
    assert [r["optimizations_applied"]["kv_cache"] for r in results] == ["hit", "hit", "miss", "miss", "miss"]
    for result, (items, times) in zip(results, histories):
        got = [(r["item"], r["score"]) for r in result["recommendations"]]
        assert_same_top_k(got, full_recompute(recommender, items, times, k=5))
        assert result["optimizations_applied"]["batch_size"] == 5


@pytest.mark.parametrize("cache_bytes", [0, 1 << 24], ids=["cache-off", "cache-on"])
@pytest.mark.parametrize("form", ["lists", "arrays", "tuples"])
def test_batch_equals_each_request_alone(form, cache_bytes):
    """A batch of histories given as lists, numpy arrays or tuples (events out of time order, repeated
    items, k and request times per request, a slid window, hits and misses): each user's result equals
    the same request served alone, and its report says the same except the batch size."""
    from hstu.serving.engine import Request

    convert = {"lists": list, "arrays": np.asarray, "tuples": tuple}[form]
    histories = [random_history(n, seed=40 + n) for n in (1, 2, 5, MAX_SEQ_LEN, MAX_SEQ_LEN + 5, 7)]
    histories[2][1][3] -= 10 ** 6  # an event that happened before the ones given before it
    histories[5][0][4] = histories[5][0][1]
    requests = [Request(f"u{b}", convert(items), convert(times), k, request_time)
                for b, ((items, times), k, request_time) in enumerate(zip(
                    histories, (1, 5, NUM_ITEMS, 8, 3, 5),
                    (None, None, 1_700_000_000, None, None, max(histories[5][1]) + 1)))]
    batched, alone = make_recommender(cache_bytes=cache_bytes), make_recommender(cache_bytes=cache_bytes)
    for recommender in (batched, alone):  # the cache holds a prefix of three users' histories
        for request in (requests[1], requests[3], requests[4]):
            served(recommender, request.user_id, list(request.items)[:-1], list(request.timestamps)[:-1])
    results = batched.serving_engine().infer_batch(requests)
    outcomes = set()
    for result, request in zip(results, requests, strict=True):
        want = alone.infer_with_optimal_strategy(request.user_id, list(zip(request.items, request.timestamps)),
                                                 request.k, request.request_time)
        assert_same_top_k([(r["item"], r["score"]) for r in result["recommendations"]],
                          [(r["item"], r["score"]) for r in want["recommendations"]])
        assert len(result["recommendations"]) == min(request.k, NUM_ITEMS - len(set(request.items)))  # seen: out
        applied = result["optimizations_applied"]
        assert applied == {**want["optimizations_applied"], "batch_size": len(requests)}
        outcomes.add(applied["kv_cache"])
        assert result["latency_ms"] > 0
    assert outcomes == ({"hit", "miss"} if cache_bytes else {"off"})
    assert len({id(result["optimizations_applied"]) for result in results}) == len(results)  # each its own
    stats = batched.get_comprehensive_stats()["serving"]
    assert stats["requests"] == 3 + len(requests) and sum(stats["paths"].values()) == stats["requests"]


def python_calls(call) -> int:
    """Python function calls (and generator resumptions) made while ``call()`` runs."""
    import sys

    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event == "call"

    sys.setprofile(profile)
    try:
        call()
    finally:
        sys.setprofile(None)
    return count


@pytest.mark.parametrize("static", [False, True], ids=["eager", "static-shapes"])
@pytest.mark.parametrize("form", ["lists", "arrays"])
def test_a_batch_costs_no_python_call_per_user_or_event(form, static):
    """With the cache off, a batch's host work is array operations and comprehensions: 64 users make
    as many Python function calls as 4 (a per-user check, plan, report or result helper, or a per-event
    conversion, would add one per user or event). The eager and the static-shape (CUDA-graph) paths."""
    from hstu.serving.engine import Request
    from hstu.serving.graphs import StaticSteps

    recommender = make_recommender(cache_bytes=0)
    engine = recommender.serving_engine()
    if static:
        engine.static_steps = StaticSteps(engine.encoder, engine.unit_items, engine.device, capture=False)
    convert = list if form == "lists" else np.asarray
    histories = [random_history(3 + b % MAX_SEQ_LEN, seed=b) for b in range(64)]

    def batch(num_users):
        return [Request(b, convert(items), convert(times), 5) for b, (items, times) in enumerate(histories[:num_users])]

    small, large = batch(4), batch(64)
    engine.infer_batch(small), engine.infer_batch(large)  # first calls: lazy imports, caches
    calls = [python_calls(lambda: engine.infer_batch(requests)) for requests in (small, large)]
    assert calls[1] - calls[0] < 20, calls



def test_item_table_is_normalised_once_per_engine_not_per_request(monkeypatch):
    """The served weights never change: each request normalises only its queries, and the scores are the
    model's own cosine scores (``full_recompute`` normalises the table itself)."""
    import hstu.serving.engine as engine_module

    recommender = make_recommender()
    rows = []
    real = engine_module.l2_normalize
    monkeypatch.setattr(engine_module, "l2_normalize", lambda x, *a, **kw: rows.append(x.shape[0]) or real(x, *a, **kw))
    items, times = random_history(9, seed=3)
    for user in range(3):
        got, _ = served(recommender, user, items, times)
        assert_same_top_k(got, full_recompute(recommender, items, times))
    assert rows == [1, 1, 1]  # one query per request, never the table


@pytest.fixture
def two_cpu_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_small_cpu_steps_run_on_one_thread_and_restore_the_count(two_cpu_threads, monkeypatch):
    """A cache hit (two positions) and a short whole window run the encoder on one intra-op thread,
    and torch's count is back afterwards; a step at the element bound keeps torch's threads."""
    from hstu.serving import engine

    recommender = make_recommender()
    encoder = recommender.serving_engine().encoder
    seen = []
    encode = encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda *a, **kw: (seen.append(torch.get_num_threads()), encode(*a, **kw))[1])
    items, times = random_history(MAX_SEQ_LEN, seed=6)
    reports = [served(recommender, "u", items[:n], times[:n])[1] for n in (MAX_SEQ_LEN - 1, MAX_SEQ_LEN)]
    assert [r["kv_cache"] for r in reports] == ["miss", "hit"] and reports[1]["positions_computed"] == 2
    assert seen == [1, 1] and [r["intra_op_threads"] for r in reports] == [1, 1]
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(engine, "SINGLE_THREAD_ELEMENTS", 16)  # one token of dim 16 reaches the bound
    report = served(recommender, "u", items, times, request_time=times[-1] + 60)[1]
    assert report["kv_cache"] == "hit" and seen[-1] == 2 and report["intra_op_threads"] == 2

@pytest.mark.parametrize("config, reason", [
    (dict(time_scales=[[3600, 24], [86400, 30]]), "time_scales"),
    (dict(position_from_end=True), "position_from_end"),
    (dict(encoder="sasrec", dim=16, heads=2), "SASRecEncoder has no incremental path"),
])
def test_configurations_without_an_incremental_path_report_the_cache_off(config, reason):
    recommender = make_recommender(**config)
    items, times = random_history(7, seed=5)
    for _ in range(2):
        got, report = served(recommender, "u", items, times)
        assert report["kv_cache"] == "off" and reason in report["kv_cache_detail"]
        assert report["path"] == "whole window"
        assert_same_top_k(got, full_recompute(recommender, items, times))
    assert reason in recommender.get_comprehensive_stats()["kv_cache"]["reason"]


def test_cache_switched_off_and_evictions_reported():
    off = make_recommender(cache_bytes=0)
    items, times = random_history(6, seed=6)
    served(off, "u", items, times)
    _, report = served(off, "u", items, times)
    assert report["kv_cache"] == "off" and "cache_bytes=0" in report["kv_cache_detail"]

    small = make_recommender(cache_bytes=1)  # every entry is larger than the cache
    served(small, "u", items, times)
    assert served(small, "u", items, times)[1]["kv_cache"] == "miss"
    assert small.get_comprehensive_stats()["kv_cache"]["rejected_too_large"] == 2

    one_user = make_recommender(cache_bytes=ENTRY_OVERHEAD_BYTES + 2 * 5 * 2 * (6 + 8) * 4)  # one 6-event entry
    for user in ("a", "b", "a"):
        served(one_user, user, items, times)
    stats = one_user.get_comprehensive_stats()["kv_cache"]
    assert stats["evictions"] == 2 and stats["hits"] == 0 and stats["entries"] == 1


def test_comprehensive_stats_count_requests_hits_and_latency():
    recommender = make_recommender(kernels={"hstu_hierarchical_attention": True})
    items, times = random_history(5, seed=7)
    for n in (3, 4, 5):
        result = recommender.infer_with_optimal_strategy("u", list(zip(items[:n], times[:n])), 4)
        assert result["latency_ms"] > 0
    stats = recommender.get_comprehensive_stats()
    assert stats["serving"]["requests"] == 3 and stats["serving"]["paths"] == {"whole window": 1, "incremental": 2}
    assert stats["kv_cache"]["hits"] == 2 and stats["kv_cache"]["hit_rate"] == pytest.approx(2 / 3)
    latency = stats["serving"]["latency_ms"]
    assert latency["count"] == 3 and 0 < latency["p50"] <= latency["p99"] <= latency["max"]
    assert stats["kernels"]["hstu_hierarchical_attention"]["calls"]["triton"] > 0
    assert stats["kernel_availability"]["hstu_hierarchical_attention"]["requested"] == "triton"


@pytest.mark.parametrize("behaviors, k, message", [
    ([], 3, "history is empty"),
    ([(ORIGINAL_IDS[0], 10)], 0, "k must be an integer in"),
    ([(ORIGINAL_IDS[0], 10)], NUM_ITEMS + 1, "k must be an integer in"),
    ([(ORIGINAL_IDS[0], 10.5)], 3, "timestamps must be integer"),
    ([(ORIGINAL_IDS[0], 10), (12345, 11)], 3, "12345"),
    ([(ORIGINAL_IDS[0], 10, 3)], 3, r"user_behaviors\[0\] must be an \(item, timestamp\) pair"),
])
def test_bad_requests_are_named(behaviors, k, message):
    recommender = make_recommender()
    with pytest.raises((ValueError, KeyError), match=message):
        recommender.infer_with_optimal_strategy("u", behaviors, k)
    assert recommender.get_comprehensive_stats()["serving"]["requests"] == 0


@pytest.mark.parametrize("k, request_time, message", [
    ("ten", None, r"^k must be an integer in \[1, \d+\] \(the number of items\), got 'ten'$"),
    (3, "yesterday", r"^request_time='yesterday': must be Unix seconds \(an int\) or a list of them, one per history$"),
    (3, [1_700_000_000, "a"], r"^request_time\[1\]='a': must be Unix seconds \(an int\) or None$"),
    (3, [1_700_000_000, 1_500_000_000], r"^request_time=1500000000 is before the last event of history 1 \(\d+\)"),
    (3, [1_700_000_000, 2**62], r"^request_time=4611686018427387904 of history 1 lies outside \[-2\*\*62, 2\*\*62\) "
                                r"seconds, where the gaps between times \(int64\) cannot wrap$"),
])
def test_bad_recommend_arguments_are_named(k, request_time, message):
    """Recommender.recommend names k or request_time (a string is not read character by character, a
    time before the history is refused) instead of failing inside or ranking for that time."""
    histories = [random_history(4, seed=seed) for seed in (1, 2)]  # events in 2020, before 1_700_000_000
    with pytest.raises(RequestError, match=message):
        make_recommender().recommend(histories, k=k, request_time=request_time)


@pytest.mark.parametrize("extreme", [2**62, -(2**62) - 1, 2**64 - 1])
def test_history_times_outside_the_range_are_named(extreme):
    """Times whose gaps could wrap in int64 (the time bias would bucket the wrapped gap) are refused."""
    items, times = random_history(4, seed=2)
    with pytest.raises(RequestError, match=rf"^history 1: timestamp {extreme} lies outside \[-2\*\*62, 2\*\*62\)"):
        make_recommender().recommend([random_history(4, seed=1), (items, [*times[:-1], extreme])], k=3)


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", [None, "all"])
def test_gpu_incremental_equals_full_at_hstu_large_size(kernels):
    """HSTU-large ML-1M shapes on CUDA (random weights): incremental steps equal a full recomputation."""
    flags = {op: True for op in OPERATORS} if kernels == "all" else None
    ids = list(range(1, 3707))
    recommender = make_recommender(device="cuda", num_blocks=8, heads=2, dqk=25, dv=25, dim=50, max_seq_len=200,
                                   num_items=len(ids), ids=ids, kernels=flags)
    items, times = random_history(230, seed=8, ids=ids)
    for n in (100, 101, 150, 199, 200, 201, 201):
        got, report = served(recommender, "u", items[:n], times[:n], k=20)
        assert_same_top_k(got, full_recompute(recommender, items[:n], times[:n], k=20), atol=1e-4)
    assert report["kv_cache"] == "hit" and report["positions_computed"] == 1
