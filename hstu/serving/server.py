"""HTTP server for an export folder, on LitServe (Lightning's serving library).

Endpoints:
  * ``POST /recommend`` ``{"user_id": ..., "events": [[item, ts], ...], "k": 10, "request_time": null}``
    -> ``{"user_id", "recommendations": [{"item", "score"}], "optimizations_applied", "latency_ms"}``;
  * ``GET /health`` (LitServe's: 200 "ok" once every inference worker has loaded the model);
  * ``GET /stats``: per inference worker, ``Recommender.get_comprehensive_stats()`` as last
    published by that worker (each worker has its own model and KV cache), and their sum.

Why LitServe: it runs the model in inference workers of their own (one or more per device) behind
uvicorn, with dynamic batching (``max_batch_size`` requests or ``batch_timeout`` seconds, whichever
comes first), so this module only says how a request is checked, batched and answered.

Requests are validated in the HTTP process, before they join a batch: an error raised inside a
batched ``predict`` would fail every request of that batch. The request model (pydantic) rejects
malformed JSON, missing or extra fields, non-integer timestamps, k out of [1, num_items], an empty
history and items the model never saw, each with a 422 whose ``detail`` names the field and the
problem; the server keeps serving. The catalogue the check needs (items.json) is loaded in the
main process, so uvicorn's forked HTTP processes have it.

Each inference worker publishes its stats to a dict shared through a ``multiprocessing`` manager,
at most every ``STATS_PERIOD_S`` seconds and after its first batch; ``/stats`` reads them.

(No ``from __future__ import annotations`` here: LitServe hands ``decode_request``'s annotation to
FastAPI, which needs the request class itself, not its name.)
"""

import logging
import multiprocessing
import os
import threading
import time
from pathlib import Path
from typing import Any

import litserve as ls
import numpy as np
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_validator

from hstu.inference import Recommender, read_export_config, read_item_ids
from hstu.serving.engine import DEFAULT_GRAPH_BYTES, Request, ServingOptions, serving_kernel_flags
from hstu.serving.ids import ItemIdIndex

log = logging.getLogger(__name__)

STATS_PERIOD_S = 0.5
HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds to; loopback unless told otherwise


class _Catalogue:
    """What request validation needs, set in the process that builds the server (inherited by forks)."""

    index: ItemIdIndex | None = None
    num_items: int = 0


def _check_catalogue_loaded() -> ItemIdIndex:
    if _Catalogue.index is None:
        raise RuntimeError("the item catalogue is not loaded: build the server with build_server()")
    return _Catalogue.index


class RecommendRequest(BaseModel):
    """Body of ``POST /recommend``. Item ids as in the export's items.json (int or str)."""

    model_config = ConfigDict(extra="forbid")

    user_id: StrictInt | StrictStr
    events: list[tuple[StrictInt | StrictStr, StrictInt]] = Field(
        description="[[original item id, Unix seconds], ...], any order (sorted by time, stably)")
    k: StrictInt = 10
    request_time: StrictInt | None = Field(None, description="Unix seconds; default: the last event's")

    @model_validator(mode="after")
    def _known_to_the_model(self) -> "RecommendRequest":
        index = _check_catalogue_loaded()
        if not 1 <= self.k <= _Catalogue.num_items:
            raise ValueError(f"k={self.k} is out of range: it must lie in [1, {_Catalogue.num_items}] (the number of items)")
        if not self.events:
            raise ValueError("events is empty: at least one [item, timestamp] event is needed")
        items = [item for item, _ in self.events]
        unknown = np.flatnonzero(index.lookup(items) == 0)
        if unknown.size:
            shown = [items[i] for i in unknown[:10]]
            raise ValueError(f"events: {unknown.size} item id(s) unknown to the model, e.g. {shown} "
                             f"(at positions {unknown[:10].tolist()})")
        return self


class RecommendAPI(ls.LitAPI):
    """One inference worker: a Recommender with its own ServingEngine (and KV cache)."""

    def __init__(self, export_dir: str, kernels: dict[str, bool] | None, cache_bytes: int, shared_stats,
                 max_batch_size: int, batch_timeout: float, warm_up: bool = True, cuda_graphs: bool = True,
                 graph_bytes: int = DEFAULT_GRAPH_BYTES):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout, api_path="/recommend")
        self.export_dir = export_dir
        self.kernels = kernels
        self.cache_bytes = cache_bytes
        self.cuda_graphs = cuda_graphs
        self.graph_bytes = graph_bytes
        self.shared_stats = shared_stats
        self.warm_up = warm_up

    def setup(self, device: str) -> None:
        self.worker = f"worker {os.environ.get('LITSERVE_WORKER_ID', os.getpid())} ({device}, pid {os.getpid()})"
        self.recommender = Recommender.from_export(self.export_dir, device=device, kernels=self.kernels)
        self.engine = self.recommender.serving_engine(ServingOptions(
            cache_bytes=self.cache_bytes, cuda_graphs=self.cuda_graphs, graph_bytes=self.graph_bytes))
        if self.warm_up:
            self.engine.warm_up()
        self._published = -1
        self._publish()
        threading.Thread(target=self._publish_periodically, name="stats-publisher", daemon=True).start()

    def decode_request(self, request: RecommendRequest) -> Request:
        items, timestamps = zip(*request.events)  # events is not empty (validated)
        return Request(request.user_id, items, timestamps, request.k, request.request_time)

    def predict(self, requests):
        if isinstance(requests, Request):  # max_batch_size 1: LitServe passes requests one by one
            return self.engine.infer_batch([requests])[0]
        return self.engine.infer_batch(list(requests))

    def encode_response(self, output: dict[str, Any]) -> dict[str, Any]:
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
                 batch_timeout: float = 0.002, cache_bytes: int = 1 << 30, kernels: dict[str, bool] | None = None,
                 timeout: float = 30.0, warm_up: bool = True, cuda_graphs: bool = True,
                 graph_bytes: int = DEFAULT_GRAPH_BYTES) -> ls.LitServer:
    """A LitServer for ``export_dir`` (not started: call ``.run(host=..., port=...)``).

    ``workers`` inference workers on ``device`` ("cpu" or "cuda"), each with its own KV cache of
    ``cache_bytes``; ``kernels``: operator flags (None: Triton where it can run, see
    ``hstu.serving.engine.serving_kernel_flags``); ``cuda_graphs`` and ``graph_bytes`` (per worker): the
    ``ServingOptions`` fields.
    """
    export_dir = str(Path(export_dir).resolve())
    config = read_export_config(export_dir)
    num_items = config["model"]["num_items"]
    _Catalogue.index, _Catalogue.num_items = ItemIdIndex(read_item_ids(export_dir, num_items)), num_items
    stats_manager = multiprocessing.Manager()
    shared_stats = stats_manager.dict()
    kernels = serving_kernel_flags(device) if kernels is None else kernels
    api = RecommendAPI(export_dir, kernels, cache_bytes, shared_stats, max_batch_size, batch_timeout, warm_up,
                       cuda_graphs, graph_bytes)
    server = ls.LitServer(api, accelerator=device, devices=1, workers_per_device=workers, timeout=timeout,
                          model_metadata={"export_dir": export_dir, "num_items": num_items})
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
