"""The HTTP server (scripts/serve.py, LitServe) started for real on a free port of 127.0.0.1 and
called with an HTTP client; load stays on loopback, bounded in count and time."""
from __future__ import annotations

import concurrent.futures
import inspect
import json
import multiprocessing.queues
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("litserve", reason="the serve extra is not installed (pip install -e .[serve])")
requests = pytest.importorskip("requests")

from cli import load_script, run_script  # noqa: E402
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
    server = Server(export_dir, cwd, max_batch_size=8)  # batch_timeout: the default, 0
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
    "k zero": ({**GOOD, "k": 0}, f"k must be an integer in [1, {NUM_ITEMS}] (the number of items), got 0"),
    "k above items": ({**GOOD, "k": NUM_ITEMS + 1}, f"k must be an integer in [1, {NUM_ITEMS}] (the number of items), "
                                                    f"got {NUM_ITEMS + 1}"),
    "request_time before the events": ({**GOOD, "request_time": 1_600_000_059},
                                       "request_time=1600000059 is before the last event (1600000060)"),
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


def mixed_load(server, bad_bodies, every, seed):
    """The responses to 48 requests from 12 threads: every ``every``-th one of ``bad_bodies`` in turn,
    the others good."""
    bodies = []
    for i in range(48):
        if i % every == every - 1:
            bodies.append(bad_bodies[i // every % len(bad_bodies)])
        else:
            items, times = random_history(1 + i % MAX_SEQ_LEN, seed=seed + i)
            bodies.append({"user_id": f"load-{seed + i}", "events": events_of(items, times), "k": 4})
    with concurrent.futures.ThreadPoolExecutor(max_workers=12) as pool:
        return list(pool.map(server.recommend, bodies, timeout=180))


def test_concurrent_requests_are_batched_and_bad_ones_fail_alone(server):
    """48 requests from 12 threads, a third of them bad: every good one succeeds, every bad one gets a
    4xx, and some good ones shared a batch (with batch_timeout 0: those that queued while one ran)."""
    responses = mixed_load(server, [BAD_REQUESTS["unknown item"][0]], every=3, seed=100)
    statuses = [r.status_code for r in responses]
    assert statuses == [422 if i % 3 == 2 else 200 for i in range(48)], statuses
    batch_sizes = [r.json()["optimizations_applied"]["batch_size"] for r in responses if r.status_code == 200]
    assert max(batch_sizes) > 1, batch_sizes


def test_times_outside_the_range_get_a_422_naming_the_field_and_fail_alone(server):
    """Timestamps and request times outside [-2**62, 2**62) (where two of them could be more than int64 apart)
    are rejected by the request model, in 48 concurrent requests as alone: the requests batched with them
    succeed."""
    too_late, too_early, beyond_int64 = 2**62, -(2**62) - 1, 2**64
    bad = [({**GOOD, "events": [[ORIGINAL_IDS[0], 1_600_000_000], [ORIGINAL_IDS[1], too_late]]},
            ["body", "events", 1, 1], "less than or equal to 4611686018427387903"),
           ({**GOOD, "request_time": beyond_int64}, ["body", "request_time"],
            "less than or equal to 4611686018427387903"),
           ({**GOOD, "events": [[ORIGINAL_IDS[0], too_early]]}, ["body", "events", 0, 1],
            "greater than or equal to -4611686018427387904")]
    for body, location, message in bad:
        response = server.recommend(body)
        assert response.status_code == 422, response.text
        (error,) = response.json()["detail"]
        assert error["loc"] == location and message in error["msg"], error
    responses = mixed_load(server, [body for body, _, _ in bad], every=4, seed=300)
    statuses = [r.status_code for r in responses]
    assert statuses == [422 if i % 4 == 3 else 200 for i in range(48)], statuses


def test_a_request_that_fails_in_predict_fails_alone(export_dir):
    """The inference worker's loop with a batch of five where two requests fail inside the engine (past
    the HTTP checks): those two get their own error, 422 naming the problem for a RequestError, 500
    for anything else, and the other three the answers they get alone."""
    from queue import Queue

    from litserve.callbacks import CallbackRunner
    from litserve.loops.base import _SENTINEL_VALUE
    from litserve.utils import LitAPIStatus

    from hstu.serving.server import GreedyBatchLoop, RecommendAPI, RecommendRequest

    items, times = random_history(5, seed=9)
    good = {"user_id": "good", "events": events_of(items, times), "k": 3}
    bodies = [good,
              {**good, "user_id": "timestamp", "events": [[items[0], times[0]], [items[1], 2**64]]},
              {**good, "user_id": "second"},
              {**good, "user_id": ["unhashable"]},  # an id no cache can key on: an error nobody expected
              {**good, "user_id": "third"}]
    # One batch of all five (then the stop signal behind them).
    api = RecommendAPI(str(export_dir), None, 1 << 20, {}, max_batch_size=len(bodies), batch_timeout=0.0,
                       warm_up=False)
    api.engine = Recommender.from_export(export_dir).serving_engine()
    api.request_timeout = REQUEST_TIMEOUT_S
    api.pre_setup()  # as LitServer does
    queue = Queue()
    for i, body in enumerate(bodies):  # past the request model's checks, as a request that fails only in predict
        queue.put((0, f"uid-{i}", time.monotonic(), RecommendRequest.model_construct(**body)))
    queue.put(_SENTINEL_VALUE)

    class Transport:
        sent = {}

        def send(self, item, consumer_id):
            uid, (response, status, _, _) = item
            if status != LitAPIStatus.START:
                self.sent[uid] = (response, status)

    GreedyBatchLoop().run_batched_loop(api, queue, Transport(), CallbackRunner())
    statuses = {uid: status for uid, (_, status) in Transport.sent.items()}
    assert statuses == {"uid-0": LitAPIStatus.OK, "uid-1": LitAPIStatus.ERROR, "uid-2": LitAPIStatus.OK,
                        "uid-3": LitAPIStatus.ERROR, "uid-4": LitAPIStatus.OK}, statuses
    batch_sizes = {Transport.sent[uid][0]["optimizations_applied"]["batch_size"] for uid in ("uid-0", "uid-2", "uid-4")}
    assert batch_sizes == {1}, batch_sizes
    served = api.engine.stats()["serving"]
    assert (served["errors"], served["requests"]) == (1, 3), served  # the timestamp's was refused as a bad request
    want = [r["item"] for r in api.engine.infer_batch([api.decode_request(RecommendRequest.model_construct(**good))[0]])
            [0]["recommendations"]]
    assert [r["item"] for r in Transport.sent["uid-2"][0]["recommendations"]] == want
    timestamp_error, unexpected_error = Transport.sent["uid-1"][0], Transport.sent["uid-3"][0]
    assert timestamp_error.status_code == 422
    assert "timestamp 18446744073709551616 lies outside" in timestamp_error.detail
    assert unexpected_error.status_code == 500 and unexpected_error.detail == "Internal server error"
    # A batch that fails while the engine serves it counts as errors only the requests that fail alone.
    api.engine = Recommender.from_export(export_dir).serving_engine()
    outputs = api._infer([api.decode_request(RecommendRequest.model_construct(**body))[0] for body in bodies[2:]])
    served = api.engine.stats()["serving"]
    assert [isinstance(output, dict) for output in outputs] == [True, False, True]
    assert (served["errors"], served["requests"]) == (1, 2), served


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


def test_localhost_binds_loopback(export_dir, monkeypatch):
    """host=localhost is taken as 127.0.0.1 (LitServe binds only to addresses)."""
    ran = {}

    class NotStarted:
        def run(self, **kwargs):
            ran.update(kwargs)

    monkeypatch.setattr("hstu.serving.server.build_server", lambda *args, **kwargs: NotStarted())
    result = run_script("serve", f"export_dir={export_dir}", "host=localhost")
    assert result.code == 0, result.stderr
    assert ran["host"] == "127.0.0.1" and "on http://127.0.0.1:8000 " in result.stdout


def session_processes(session: int) -> list[int]:
    """The live (not zombie) processes of a session."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # state, ppid, pgrp, session, ...
        except OSError:  # gone meanwhile
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def test_sigterm_to_the_main_process_stops_the_server_as_ctrl_c_does(export_dir, tmp_path):
    """kill, systemd and docker stop send SIGTERM to the main process: it shuts the server down as on
    Ctrl-C, with exit status 0, no process of the server's session left and the port free."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = Server(export_dir, cwd)
    session = server.process.pid  # started in a session of its own
    try:
        assert len(session_processes(session)) > 1
        os.kill(server.process.pid, signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0, server.log()
        deadline = time.monotonic() + 30
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(session) == [], server.log()
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            probe.bind(("127.0.0.1", server.port))
    finally:
        for pid in session_processes(session):
            os.kill(pid, signal.SIGKILL)


def test_a_port_in_use_is_named_before_anything_loads(export_dir, monkeypatch):
    """A port something listens on fails the config check: one line naming port=, before the export is
    loaded or the "serving ..." line printed."""
    def build_server(*args, **kwargs):
        raise AssertionError("the server was built")

    monkeypatch.setattr("hstu.serving.server.build_server", build_server)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_script("serve", f"export_dir={export_dir}", f"port={port}")
    assert result.code == 1 and result.stdout == "", result
    hydra_line, *lines = result.error_lines
    assert hydra_line.startswith("Error executing job with overrides") and "Traceback" not in result.stderr
    assert lines == [f"port={port}: cannot listen on 127.0.0.1:{port} (Address already in use); "
                     "stop what listens there or pick another port"], result.stderr


def worker_pid(server) -> int:
    (name,) = requests.get(server.url + "/stats", timeout=10).json()["workers"]
    return int(name.rsplit("pid ", 1)[1].rstrip(")"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_idle_worker_blocks_on_its_queue_instead_of_polling(server):
    """Between requests the inference worker sleeps in one blocking get: LitServe's own batched loop
    polls its queue, without pause when batch_timeout is 0 and every millisecond otherwise."""
    assert server.recommend(GOOD).status_code == 200
    pid = worker_pid(server)
    before, start = cpu_seconds(pid), time.monotonic()
    time.sleep(2.0)
    busy = (cpu_seconds(pid) - before) / (time.monotonic() - start)
    assert busy < 0.02, f"the idle worker used {busy:.0%} of a core"


@pytest.mark.slow
def test_lone_request_waits_batch_timeout_from_its_own_arrival(export_dir, tmp_path):
    """With batch_timeout 50 ms a request that arrives alone waits the 50 ms for companions, counted
    from its arrival whatever the worker did before (LitServe's loop counts from the start of its
    polling window, so a lone request waits anywhere between 0 and 50 ms)."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    server = Server(export_dir, cwd, max_batch_size=8, batch_timeout=0.05)
    try:
        latencies = []
        for pause in (0.013, 0.031, 0.007, 0.044, 0.022):  # the arrival falls anywhere in a 50 ms window
            time.sleep(pause)
            start = time.perf_counter()
            assert server.recommend(GOOD).status_code == 200
            latencies.append(time.perf_counter() - start)
    finally:
        server.stop()
    assert min(latencies) >= 0.05, latencies


def test_requests_and_answers_cross_pipes_not_a_manager_process(export_dir):
    """FastLitServer's queues replace LitServe's manager queues (this fails, rather than the server
    quietly keeping the slower queues, if a LitServe release renames what FastLitServer overrides)."""
    from hstu.serving.server import build_server

    server = build_server(export_dir, warm_up=False)
    manager = server._init_manager(1)
    try:
        queues = [*server.litapi_request_queues.values(), *server._transport._queues]
        assert len(queues) == 2 and all(isinstance(q, multiprocessing.queues.Queue) for q in queues), queues
    finally:
        manager.shutdown()
        server.stats_manager.shutdown()


@pytest.mark.parametrize("api_key", [None, "secret"])
def test_recommend_dependency_is_a_coroutine_unless_an_api_key_is_set(export_dir, monkeypatch, api_key):
    """Without LIT_SERVER_API_KEY, /recommend's one dependency is a coroutine (awaited inline, no
    thread hop); with it, LitServe's key check stays."""
    import litserve.server

    from hstu.serving.server import build_server

    monkeypatch.setattr(litserve.server, "LIT_SERVER_API_KEY", api_key)
    server = build_server(export_dir, warm_up=False)
    try:
        (route,) = [r for r in server.app.routes if getattr(r, "path", None) == "/recommend"]
        (dependency,) = [d.call for d in route.dependant.dependencies]
    finally:
        server.stats_manager.shutdown()
    if api_key is None:
        assert inspect.iscoroutinefunction(dependency), dependency
    else:
        assert dependency is litserve.server.api_key_auth


def test_stage_breakdown_covers_every_stage_and_adds_up_to_the_client_latency(tmp_path, monkeypatch):
    """scripts/bench_http_stages.py against the default batching (max_batch_size 32, batch_timeout 0):
    every stage is there, stamps come in order (no negative stage), the stages add up to the latency
    timed around each call, and a lone request does not wait for companions."""
    stages = load_script("bench_http_stages", monkeypatch)
    rows = stages.main(["--configs", "tiny", "--devices", "cpu", "--variants", "32:0", "--clients", "requests",
                        "--requests", "30", "--warmup", "3", "--no-control", "--out", str(tmp_path / "stages")])
    in_process, *http = rows
    assert in_process["stage"] == "total (in process)" and in_process["requests"] == 30
    by_stage = {row["stage"]: row for row in http}
    assert list(by_stage) == [*stages.STAGES, "total (client)"]
    assert all(row["requests"] == 30 and row["variant"] == "max_batch_size 32, batch_timeout 0" for row in http)
    assert all(by_stage[stage]["min_ms"] >= 0 for stage in stages.STAGES), {s: by_stage[s]["min_ms"] for s in by_stage}
    stage_sum = sum(by_stage[stage]["mean_ms"] for stage in stages.STAGES)
    total = by_stage["total (client)"]["mean_ms"]
    assert abs(stage_sum - total) <= 0.02 * total, (stage_sum, total)  # the timer's own call is all that differs
    assert by_stage["batch_wait"]["p50_ms"] < 0.5 * by_stage["predict"]["p50_ms"], by_stage["batch_wait"]
    written = json.loads((tmp_path / "stages.json").read_text())
    assert written["rows"] == rows and written["meta"]["stages"] == list(stages.STAGES)
    assert (tmp_path / "stages.csv").read_text().count("\n") == len(rows) + 1


@pytest.mark.parametrize("args, message", [
    (["--variants", "0:0"], "--variants: '0:0': max_batch_size must be >= 1 and batch_timeout >= 0 seconds"),
    (["--requests", "0"], "error: --requests: at least 1, got 0"),
    (["--devices", "gpu"], "error: --devices: a comma-separated subset of cuda,cpu, got 'gpu'"),
    (["--out", "{tmp}/taken"], "error: --out {tmp}/taken: {tmp}/taken.json already there (another run's results)"),
])
def test_stage_breakdown_refuses_bad_options_before_anything_runs(args, message, tmp_path, monkeypatch, capsys):
    stages = load_script("bench_http_stages", monkeypatch)
    (tmp_path / "taken.json").write_text("{}")
    args = [arg.format(tmp=tmp_path) for arg in args]
    with pytest.raises(SystemExit) as exit_:
        stages.main(["--configs", "tiny", "--out", str(tmp_path / "stages"), *args])
    said = str(exit_.value.code) if isinstance(exit_.value.code, str) else capsys.readouterr().err.splitlines()[-1]
    assert message.format(tmp=tmp_path) in said
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.json"]


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
