"""The HTTP server (scripts/serve.py, LitServe) started for real on a free port of 127.0.0.1 and
called with an HTTP client; load stays on loopback, bounded in count and time."""
from __future__ import annotations

import concurrent.futures
import json
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("litserve", reason="the serve extra is not installed (pip install -e .[serve])")
requests = pytest.importorskip("requests")

from hstu.export import write_export  # noqa: E402
from hstu.inference import Recommender  # noqa: E402
from hstu.serving.process import ServerProcess  # noqa: E402
from test_serving import MAX_SEQ_LEN, NUM_ITEMS, ORIGINAL_IDS, make_model, random_history  # noqa: E402

STARTUP_TIMEOUT_S = 240
REQUEST_TIMEOUT_S = 60


def model_config():
    return dict(num_items=NUM_ITEMS, max_seq_len=MAX_SEQ_LEN, dim=16, input_dropout=0.3,
                encoder=dict(_target_="hstu.model.hstu.HSTUEncoder", num_blocks=2, num_heads=2, dqk=8, dv=6,
                             dropout=0.3, alpha=0.7),
                loss=dict(kind="sampled", num_negatives=4), time_scales=[], position_from_end=False)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return write_export(tmp_path_factory.mktemp("export") / "export", make_model(), model_config(), ORIGINAL_IDS,
                        metrics={}, data={"source": "random weights"})


class Server(ServerProcess):
    """scripts/serve.py on the CPU, started at once, with an HTTP client for /recommend."""

    def __init__(self, export_dir: Path, cwd: Path, **overrides):
        super().__init__(export_dir, cwd, cwd.parent / "server.log", STARTUP_TIMEOUT_S, device="cpu", **overrides)
        self.start()

    def recommend(self, body):
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return requests.post(self.url + "/recommend", data=data, timeout=REQUEST_TIMEOUT_S,
                             headers={"Content-Type": "application/json"})


@pytest.fixture(scope="module")
def server(export_dir, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("server") / "cwd"
    cwd.mkdir()
    server = Server(export_dir, cwd, max_batch_size=8, batch_timeout=0.05)
    yield server
    server.stop()


def events_of(items, times):
    return [[item, ts] for item, ts in zip(items, times)]


def test_recommend_matches_in_process_and_reports_what_ran(server, export_dir):
    items, times = random_history(9, seed=1)
    response = server.recommend({"user_id": 7, "events": events_of(items, times), "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    want = Recommender.from_export(export_dir).recommend([(items, times)], k=5)[0]
    assert [r["item"] for r in body["recommendations"]] == [item for item, _ in want]
    torch.testing.assert_close([r["score"] for r in body["recommendations"]], [s for _, s in want], atol=1e-5, rtol=0)
    applied = body["optimizations_applied"]
    assert applied["device"] == "cpu" and applied["dtype"] == "float32" and applied["kv_cache"] == "miss"
    assert applied["kernels"]["hstu_hierarchical_attention"] == "reference"
    assert body["latency_ms"] > 0


def test_returning_user_hits_the_cache(server):
    items, times = random_history(MAX_SEQ_LEN - 1, seed=2)
    first = server.recommend({"user_id": "returning", "events": events_of(items[:-1], times[:-1]), "k": 3}).json()
    second = server.recommend({"user_id": "returning", "events": events_of(items, times), "k": 3}).json()
    assert first["optimizations_applied"]["kv_cache"] == "miss"
    assert second["optimizations_applied"]["kv_cache"] == "hit"
    assert second["optimizations_applied"]["positions_computed"] == 2


GOOD = {"user_id": 1, "events": [[ORIGINAL_IDS[0], 1_600_000_000], [ORIGINAL_IDS[1], 1_600_000_060]], "k": 3}
BAD_REQUESTS = {
    "unknown item": ({**GOOD, "events": [[ORIGINAL_IDS[0], 1_600_000_000], [424242, 1_600_000_060]]}, "424242"),
    "empty history": ({**GOOD, "events": []}, "events is empty"),
    "k zero": ({**GOOD, "k": 0}, "k=0 is out of range"),
    "k above items": ({**GOOD, "k": NUM_ITEMS + 1}, f"k={NUM_ITEMS + 1} is out of range"),
    "float timestamp": ({**GOOD, "events": [[ORIGINAL_IDS[0], 1_600_000_000.5]]}, "int"),
    "string timestamp": ({**GOOD, "events": [[ORIGINAL_IDS[0], "yesterday"]]}, "int"),
    "missing events": ({"user_id": 1, "k": 3}, "events"),
    "extra field": ({**GOOD, "limit": 3}, "limit"),
    "malformed JSON": ('{"user_id": 1, "events": [[1000, 16', "JSON"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(server, name):
    body, message = BAD_REQUESTS[name]
    response = server.recommend(body)
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert message in response.text, response.text
    assert server.recommend(GOOD).status_code == 200


def test_concurrent_requests_are_batched_and_bad_ones_fail_alone(server):
    """48 requests from 12 threads, a third of them bad: every good one succeeds, every bad one gets a
    4xx, and some good ones shared a batch (batch_timeout 50 ms)."""
    bodies = []
    for i in range(48):
        if i % 3 == 2:
            bodies.append(BAD_REQUESTS["unknown item"][0])
        else:
            items, times = random_history(1 + i % MAX_SEQ_LEN, seed=100 + i)
            bodies.append({"user_id": f"load-{i}", "events": events_of(items, times), "k": 4})
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(server.recommend, bodies, timeout=180))
    statuses = [r.status_code for r in responses]
    assert statuses == [422 if i % 3 == 2 else 200 for i in range(48)], statuses
    batch_sizes = [r.json()["optimizations_applied"]["batch_size"] for r in responses if r.status_code == 200]
    assert max(batch_sizes) > 1, batch_sizes


def test_stats_endpoint_counts_requests_per_worker(server):
    before = requests.get(server.url + "/stats", timeout=10).json()["aggregate"]["requests"]
    for n in (3, 4):
        items, times = random_history(n, seed=5)
        assert server.recommend({"user_id": "stats", "events": events_of(items, times), "k": 2}).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # workers publish every 0.5 s
        stats = requests.get(server.url + "/stats", timeout=10).json()
        if stats["aggregate"]["requests"] >= before + 2:
            break
        time.sleep(0.2)
    assert stats["aggregate"]["requests"] >= before + 2 and stats["aggregate"]["workers"] == 1
    assert "own model and KV cache" in stats["note"]
    (worker,) = stats["workers"].values()
    assert worker["kv_cache"]["hits"] >= 1 and worker["serving"]["latency_ms"]["p99"] > 0
    assert stats["aggregate"]["kv_cache_bytes"] == worker["kv_cache"]["bytes"] > 0
    assert stats["aggregate"]["cuda_graph_bytes"] == stats["aggregate"]["cuda_graph_buckets"] == 0  # CPU: no graphs


def test_binds_loopback_and_writes_nothing_into_the_working_directory(server):
    listening = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, port = local.split(":")
        if state == "0A" and int(port, 16) == server.port:  # 0A: LISTEN
            listening.add(address)
    assert listening == {"0100007F"}  # 127.0.0.1, little-endian hex
    assert list(server.cwd.iterdir()) == []


@pytest.mark.slow
def test_two_workers_each_have_their_own_cache(export_dir, tmp_path):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = Server(export_dir, cwd, workers=2, max_batch_size=4, batch_timeout=0.01)
    try:
        for i in range(6):
            items, times = random_history(4, seed=200 + i)
            assert server.recommend({"user_id": i, "events": events_of(items, times), "k": 2}).status_code == 200
        stats = requests.get(server.url + "/stats", timeout=10).json()
        assert stats["aggregate"]["workers"] == 2 and len(stats["workers"]) == 2
        assert all(w["kv_cache"]["enabled"] for w in stats["workers"].values())
    finally:
        server.stop()
    assert list(cwd.iterdir()) == []
