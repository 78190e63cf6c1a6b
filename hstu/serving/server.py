"""HTTP server for an export folder, on LitServe (Lightning's serving library).

Endpoints:
  * ``POST /recommend`` ``{"user_id": ..., "events": [[item, ts], ...], "k": 10, "request_time": null}``
    -> ``{"user_id", "recommendations": [{"item", "score"}], "optimizations_applied", "latency_ms"}``;
  * ``GET /health`` (LitServe's: 200 "ok" once every inference worker has loaded the model);
  * ``GET /stats``: per inference worker, ``Recommender.get_comprehensive_stats()`` as last
    published by that worker (each worker has its own model and KV cache, and publishes at most every
    ``STATS_PERIOD_S`` seconds), and their sum. Its counts are of requests that reached a worker: a
    request refused by the HTTP process's checks (a 422) is in neither ``requests`` nor ``errors``.

Why LitServe: it runs the model in inference workers of their own (one or more per device) behind
uvicorn, so this module only says how a request is checked, batched and answered.

Batching (``GreedyBatchLoop``): a worker blocks until a request arrives, takes every request already
queued behind it (up to ``max_batch_size``), and waits at most ``batch_timeout`` seconds after the
first one's arrival for more. With the default ``batch_timeout`` 0 a lone request never waits for
companions that are not coming, and under load batches still form from the requests that queue up
while the previous batch runs. (LitServe's own batched loop waits out a window of ``batch_timeout``
whether or not a second request comes, and with 0 it polls its queue without blocking.)

Hand-offs (``FastLitServer``): the requests go to the workers, and the answers back, through
``multiprocessing`` queues (a pipe each) rather than LitServe's queues of a ``multiprocessing``
manager, where every put and get is a round trip through the manager process; the request needs
no authorisation, and says so with a coroutine, which FastAPI awaits inline (LitServe's default is
a plain function, which FastAPI runs on its thread pool: a thread hop per request). An
``LIT_SERVER_API_KEY`` in the environment keeps LitServe's key check.

``stage_timing=True`` stamps each ``/recommend`` request at every hand-off (``time.perf_counter_ns``,
CLOCK_MONOTONIC: one clock for every process of the host): the HTTP process's stamps come back in
the ``x-stage-ns`` header, the inference worker's in the response's ``stage_ns``. See
``STAGE_STAMPS`` and scripts/bench_http_stages.py, which turns them into a latency breakdown.

Requests are validated in the HTTP process, before they join a batch. The request model (pydantic)
rejects malformed JSON, missing or extra fields, timestamps and request times that are not integers
in [-2**62, 2**62) (any two differ by less than 2**63: their int64 gaps cannot wrap), k out of
[1, num_items], an empty history, a request_time before the last event and items the model never
saw, each with a 422 whose ``detail`` names the field and the problem; the server
keeps serving. A batch that still fails in ``predict`` is served again request by request: a request
that fails alone gets its own error (422 with the message for a ``RequestError``, else 500), the
others their answers. The catalogue the check needs (items.json) is loaded in the main process, so
uvicorn's forked HTTP processes have it.

Each inference worker publishes its stats to a dict shared through a ``multiprocessing`` manager,
at most every ``STATS_PERIOD_S`` seconds and after its first batch; ``/stats`` reads them.

(No ``from __future__ import annotations`` here: LitServe hands ``decode_request``'s annotation to
FastAPI, which needs the request class itself, not its name.)
"""

import logging
import multiprocessing
import os
import signal
import threading
import time
from contextvars import ContextVar
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, Strict, StrictInt, StrictStr, model_validator

from hstu.errors import MissingFileError, MissingPackageError, RequestError

try:
    import litserve as ls
    from fastapi import HTTPException
    from fastapi.responses import JSONResponse
    from litserve.loops.base import _SENTINEL_VALUE, _StopLoopError
    from litserve.loops.simple_loops import BatchedLoop
    from litserve.transport.process_transport import MPQueueTransport
    from litserve.utils import LitAPIStatus, LoopResponseType, PickleableHTTPException
except ModuleNotFoundError as error:
    raise MissingPackageError(f"the HTTP server needs LitServe, the serve extra ({error}): "
                              "pip install -e '.[serve]'") from error

from hstu.host_memory import reuse_freed_host_memory
from hstu.inference import Recommender, check_export_files, check_export_weights, read_export_config, read_item_ids
from hstu.serving.compiled import check_packages
from hstu.serving.engine import DEFAULT_GRAPH_BYTES, Request, ServingOptions, serving_kernel_flags
from hstu.serving.histories import check_k, check_request_times
from hstu.serving.ids import ItemIdIndex
from hstu_kernels.time_buckets import TIMESTAMP_BOUND

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.5

STAGE_HEADER = "x-stage-ns"
# With stage_timing, in the order a request meets them: the HTTP process's (header) and the worker's (body).
HTTP_STAMPS = ("app_in",             # the ASGI app is called: uvicorn has parsed the request line and headers
               "validate_start",     # the body is read and JSON-decoded; pydantic starts on it
               "validate_end",       # the request model, the catalogue checks included, is valid
               "enqueue")            # LitServe puts it on the inference workers' queue
WORKER_STAMPS = ("dequeued",         # a worker took it off the queue
                 "decode_start",     # its batch is formed (the wait for companions is over)
                 "predict_start",    # decode_request done for the batch
                 "predict_end",      # the engine's infer_batch returned
                 "encode_end")       # encode_response done; then it goes back to the HTTP process
RESPONSE_STAMPS = ("response_received",  # the HTTP process has the worker's answer
                   "response_start")     # FastAPI has serialised (and gzipped) it; the headers go out
STAGE_STAMPS = HTTP_STAMPS + WORKER_STAMPS + RESPONSE_STAMPS
_http_stamps: ContextVar[dict | None] = ContextVar("hstu_http_stage_ns", default=None)


def _stamp(stamps: dict | None, name: str) -> None:
    if stamps is not None:
        stamps[name] = time.perf_counter_ns()


class _Catalogue:
    """What request validation needs, set in the process that builds the server (inherited by forks)."""

    index: ItemIdIndex | None = None
    num_items: int = 0


def _check_catalogue_loaded() -> ItemIdIndex:
    if _Catalogue.index is None:
        raise RuntimeError("the item catalogue is not loaded: build the server with build_server()")
    return _Catalogue.index


# Unix seconds whose gaps fit the engine's int64 (hstu_kernels.time_buckets.TIMESTAMP_BOUND).
UnixSeconds = Annotated[int, Strict(), Field(ge=-TIMESTAMP_BOUND, le=TIMESTAMP_BOUND - 1)]


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``. Item ids as in the export's items.json (int or str)."""

    model_config = ConfigDict(extra="forbid")

    user_id: StrictInt | StrictStr
    events: list[tuple[StrictInt | StrictStr, UnixSeconds]] = Field(
        description="[[original item id, Unix seconds], ...], any order (sorted by time, stably)")
    k: StrictInt = 10
    request_time: UnixSeconds | None = Field(None, description="Unix seconds; default: the last event's")
    _stage_ns: dict | None = PrivateAttr(None)  # the worker's stamps, with stage_timing

    @model_validator(mode="before")
    @classmethod
    def _stamp_validation_start(cls, data: Any) -> Any:
        _stamp(_http_stamps.get(), "validate_start")
        return data

    @model_validator(mode="after")
    def _known_to_the_model(self) -> "RecommendRequest":
        index = _check_catalogue_loaded()
        check_k(self.k, _Catalogue.num_items)  # a RequestError is a ValueError: pydantic reports it (422)
        if not self.events:
            raise ValueError("events is empty: at least one [item, timestamp] event is needed")
        check_request_times([self.request_time], [max(timestamp for _, timestamp in self.events)])
        items = [item for item, _ in self.events]
        unknown = np.flatnonzero(index.lookup(items) == 0)
        if unknown.size:
            shown = [items[i] for i in unknown[:10]]
            raise ValueError(f"events: {unknown.size} item id(s) unknown to the model, e.g. {shown} "
                             f"(at positions {unknown[:10].tolist()})")
        http_stamps = _http_stamps.get()
        if http_stamps is not None:
            _stamp(http_stamps, "validate_end")
            self._stage_ns = {}
        return self


class GreedyBatchLoop(BatchedLoop):
    """LitServe's batched loop with the batch formed as the module docstring says: block for one
    request, take what is queued, wait for more only up to ``batch_timeout`` after the first."""

    def get_batch_requests(self, lit_api: ls.LitAPI, request_queue, transport) -> tuple[list, list]:
        payloads, timed_out = [], []
        item = self.get_request(request_queue, timeout=1.0)  # LitServe's own poll period for its stop signal
        deadline = time.monotonic() + lit_api.batch_timeout
        check_age = lit_api.request_timeout not in (-1, False)
        while item is not None:
            if item == _SENTINEL_VALUE:
                raise _StopLoopError()
            response_queue_id, uid, enqueued_at, request = item
            _stamp(getattr(request, "_stage_ns", None), "dequeued")
            self.put_response(transport, response_queue_id, uid, (), LitAPIStatus.START, LoopResponseType.REGULAR)
            if check_age and time.monotonic() - enqueued_at > lit_api.request_timeout:
                timed_out.append((response_queue_id, uid))
            else:
                payloads.append((response_queue_id, uid, request))
            if len(payloads) + len(timed_out) >= lit_api.max_batch_size:
                break
            remaining = deadline - time.monotonic()
            item = self.get_request(request_queue, block=remaining > 0, timeout=remaining if remaining > 0 else None)
        return payloads, timed_out

    def put_response(self, transport, response_queue_id, uid, response_data, status, response_type) -> None:
        """LitServe's, with an output that is an HTTPException (a request that failed alone, see
        ``RecommendAPI.predict``) sent back as that request's error."""
        if isinstance(response_data, HTTPException):
            response_data, status = PickleableHTTPException.from_exception(response_data), LitAPIStatus.ERROR
        super().put_response(transport, response_queue_id, uid, response_data, status, response_type)


class FastLitServer(ls.LitServer):
    """LitServer with the hand-off queues of the module docstring (LitServe's own otherwise), and SIGTERM
    taken as Ctrl-C (see :meth:`run`)."""

    def run(self, *args, **kwargs) -> None:
        """``LitServer.run``, with SIGTERM to this process (kill, systemd, docker stop) raising
        KeyboardInterrupt as Ctrl-C does: LitServe's shutdown stops the HTTP servers and the inference
        workers and frees the port. While the workers load, before LitServe's shutdown covers the
        interrupt, the same shutdown stops what has started. A second SIGTERM is ignored."""
        main = os.getpid()

        def interrupt(signum, frame):
            if os.getpid() != main:  # a forked child that set no handler of its own: SIGTERM's default
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
                return
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, interrupt)
        try:
            super().run(*args, **kwargs)
        except KeyboardInterrupt:
            if getattr(self, "inference_workers", None):
                self._perform_graceful_shutdown(self.transport_config.manager, {}, "keyboard_interrupt")
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _init_manager(self, num_api_servers: int):
        manager = super()._init_manager(num_api_servers)
        if self.use_zmq:  # LitServe's ZMQ transport (fast_queue) is left as it is
            return manager
        spawn = multiprocessing.get_context("spawn")  # LitServe spawns its inference workers
        for api_path in self.litapi_request_queues:
            self.litapi_request_queues[api_path] = spawn.Queue()
        self._transport = MPQueueTransport(None, [spawn.Queue() for _ in range(num_api_servers)])
        return manager


async def _no_authorisation() -> None:
    """The ``/recommend`` dependency where no API key is set (see the module docstring)."""


class _HandOffStamps(ls.Callback):
    """Stamps, in the HTTP process, the request's hand-off to the workers and the answer's return."""

    def on_request(self, *args, **kwargs) -> None:
        _stamp(_http_stamps.get(), "enqueue")

    def on_response(self, *args, **kwargs) -> None:
        _stamp(_http_stamps.get(), "response_received")


class StageTimestampMiddleware:
    """ASGI middleware: stamps ``/recommend`` requests on arrival and when the response starts, and
    sends the HTTP process's stamps in the ``x-stage-ns`` header (``name=ns,name=ns,...``)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != "/recommend":
            await self.app(scope, receive, send)
            return
        stamps = {"app_in": time.perf_counter_ns()}
        token = _http_stamps.set(stamps)

        async def send_with_stamps(message):
            if message["type"] == "http.response.start":
                _stamp(stamps, "response_start")
                header = ",".join(f"{name}={ns}" for name, ns in stamps.items()).encode()
                message = {**message, "headers": [*message.get("headers", []), (STAGE_HEADER.encode(), header)]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_stamps)
        finally:
            _http_stamps.reset(token)


class RecommendAPI(ls.LitAPI):
    """One inference worker: a Recommender with its own ServingEngine (and KV cache)."""

    def __init__(self, export_dir: str, kernels: dict[str, bool] | None, cache_bytes: int, shared_stats,
                 max_batch_size: int, batch_timeout: float, warm_up: bool = True, cuda_graphs: bool = True,
                 graph_bytes: int = DEFAULT_GRAPH_BYTES, compiled: bool = True):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/recommend",
                         loop=GreedyBatchLoop())
        self.export_dir = export_dir
        self.kernels = kernels
        self.cache_bytes = cache_bytes
        self.cuda_graphs = cuda_graphs
        self.graph_bytes = graph_bytes
        self.compiled = compiled
        self.shared_stats = shared_stats
        self.warm_up = warm_up

    def setup(self, device: str) -> None:
        self.worker = f"worker {os.environ.get('LITSERVE_WORKER_ID', os.getpid())} ({device}, pid {os.getpid()})"
        if device == "cpu":  # a spawned worker: the server process's setting does not reach it
            reuse_freed_host_memory()
        self.recommender = Recommender.from_export(self.export_dir, device=device, kernels=self.kernels)
        self.engine = self.recommender.serving_engine(ServingOptions(
            cache_bytes=self.cache_bytes, cuda_graphs=self.cuda_graphs, graph_bytes=self.graph_bytes,
            compiled=self.compiled))
        if self.warm_up:
            self.engine.warm_up()
        self._published = -1
        self._publish()
        threading.Thread(target=self._publish_periodically, name="stats-publisher", daemon=True).start()

    def decode_request(self, request: RecommendRequest) -> tuple[Request, dict | None]:
        """The engine's request, and the stage stamps it carries (None: stage_timing is off)."""
        stamps = request._stage_ns
        _stamp(stamps, "decode_start")
        items, timestamps = zip(*request.events)  # events is not empty (validated)
        return Request(request.user_id, items, timestamps, request.k, request.request_time), stamps

    def predict(self, batch: list[tuple[Request, dict | None]]) -> list[dict[str, Any] | HTTPException]:
        """Each request's result dict, or the HTTPException it failed with (see :meth:`_infer`)."""
        requests, stamps = zip(*batch)
        started = time.perf_counter_ns()
        outputs = self._infer(list(requests))
        if stamps[0] is None:
            return outputs
        ended = time.perf_counter_ns()
        for output, request_stamps in zip(outputs, stamps):
            if isinstance(output, dict):
                output["stage_ns"] = {**request_stamps, "predict_start": started, "predict_end": ended}
        return outputs

    def _infer(self, requests: list[Request]) -> list[dict[str, Any] | HTTPException]:
        """The engine's results for the batch; if it fails, each request served alone, so that a request
        that fails fails alone."""
        try:
            return self.engine.infer_batch(requests, count_errors=len(requests) == 1)
        except Exception as error:
            if len(requests) == 1:
                return [_http_error(error)]
        return [self._infer([request])[0] for request in requests]

    def encode_response(self, output: dict[str, Any] | HTTPException):
        """The output as it is (no return annotation: FastAPI would take it for the response model)."""
        if isinstance(output, dict):
            _stamp(output.get("stage_ns"), "encode_end")
        return output

    def _publish(self) -> None:
        stats = self.recommender.get_comprehensive_stats()
        if stats["serving"]["requests"] != self._published:
            self.shared_stats[self.worker] = {**stats, "published_at": time.time()}
            self._published = stats["serving"]["requests"]

    def _publish_periodically(self) -> None:
        while True:
            time.sleep(STATS_PERIOD_S)
            try:
                self._publish()
            except (EOFError, BrokenPipeError, ConnectionError):  # the server is shutting down
                return


def _http_error(error: Exception) -> HTTPException:
    """A request's failure in the worker: 422 with the message of a RequestError, else 500 (logged)."""
    if isinstance(error, RequestError):
        return HTTPException(422, detail=str(error))
    log.error("a request failed in the inference worker", exc_info=error)
    return HTTPException(500, detail="Internal server error")


def aggregate_stats(per_worker: dict[str, dict]) -> dict[str, Any]:
    """Sums over workers of the request and cache counters and the bytes their caches and CUDA-graph
    buckets hold (percentiles stay per worker)."""
    requests = sum(w["serving"]["requests"] for w in per_worker.values())
    hits = sum(w["kv_cache"].get("hits", 0) for w in per_worker.values())
    misses = sum(w["kv_cache"].get("misses", 0) for w in per_worker.values())
    return {
        "workers": len(per_worker),
        "requests": requests,
        "errors": sum(w["serving"]["errors"] for w in per_worker.values()),
        "kv_cache_hits": hits,
        "kv_cache_misses": misses,
        "kv_cache_hit_rate": hits / (hits + misses) if hits + misses else None,
        "kv_cache_evictions": sum(w["kv_cache"].get("evictions", 0) for w in per_worker.values()),
        "kv_cache_bytes": sum(w["kv_cache"].get("bytes", 0) for w in per_worker.values()),
        "cuda_graph_buckets": sum(w["cuda_graphs"].get("buckets", 0) for w in per_worker.values()),
        "cuda_graph_bytes": sum(w["cuda_graphs"].get("bytes", 0) for w in per_worker.values()),
    }


def build_server(export_dir: str | Path, *, device: str = "cpu", workers: int = 1, max_batch_size: int = 32,
                 batch_timeout: float = 0.0, cache_bytes: int = 1 << 30, kernels: dict[str, bool] | None = None,
                 timeout: float = 30.0, warm_up: bool = True, cuda_graphs: bool = True,
                 graph_bytes: int = DEFAULT_GRAPH_BYTES, compiled: bool = True,
                 stage_timing: bool = False) -> ls.LitServer:
    """A LitServer for ``export_dir`` (not started: call ``.run(host=..., port=...)``).

    ``workers`` inference workers on ``device`` ("cpu" or "cuda"), each with its own KV cache of
    ``cache_bytes``; batches of up to ``max_batch_size`` requests, formed as ``GreedyBatchLoop`` says
    with ``batch_timeout`` seconds; ``kernels``: operator flags (None: Triton where it can run, see
    ``hstu.serving.engine.serving_kernel_flags``); ``cuda_graphs``, ``graph_bytes`` (per worker) and
    ``compiled`` (False: never load the export's compiled scoring package): the ``ServingOptions``
    fields; ``stage_timing``: stamp every ``/recommend`` request at each hand-off (module docstring).
    """
    if not Path(export_dir).is_dir():
        raise MissingFileError(f"export_dir={export_dir}: no such directory (scripts/export.py writes one)")
    export_dir = str(Path(export_dir).resolve())
    config = read_export_config(export_dir)
    # The export's checks, in this process: a worker's failure would be a traceback
    check_export_weights(export_dir, config)
    num_items = config["model"]["num_items"]
    item_ids = read_item_ids(export_dir, num_items)
    check_export_files(export_dir, config)
    if compiled:
        check_packages(export_dir, config)
    _Catalogue.index, _Catalogue.num_items = ItemIdIndex(item_ids), num_items
    stats_manager = multiprocessing.Manager()
    shared_stats = stats_manager.dict()
    kernels = serving_kernel_flags(device) if kernels is None else kernels
    api = RecommendAPI(export_dir, kernels, cache_bytes, shared_stats, max_batch_size, batch_timeout, warm_up,
                       cuda_graphs, graph_bytes, compiled)
    if not ls.server.LIT_SERVER_API_KEY:
        api.authorize = _no_authorisation
    server = FastLitServer(api, accelerator=device, devices=1, workers_per_device=workers, timeout=timeout,
                           model_metadata={"export_dir": export_dir, "num_items": num_items},
                           callbacks=[_HandOffStamps()] if stage_timing else None)
    if stage_timing:
        server.app.add_middleware(StageTimestampMiddleware)  # outermost: it sees the gzipped response
    server.stats_manager = stats_manager  # kept alive as long as the server

    async def stats() -> JSONResponse:
        per_worker = dict(shared_stats)
        return JSONResponse({
            "note": "each inference worker has its own model and KV cache; requests go to any worker",
            "aggregate": aggregate_stats(per_worker),
            "workers": per_worker,
        })

    server.app.add_api_route("/stats", stats, methods=["GET"])
    return server
