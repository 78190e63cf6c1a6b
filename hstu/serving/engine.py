"""The serving engine behind ``Recommender.infer_with_optimal_strategy``: one path per request, chosen
from what is available, and a report of what ran.

How the path is chosen (checked in this order; each call reports the outcome in
``optimizations_applied``):

1. Device: the Recommender's (``device=`` at load; ``scripts/serve.py`` takes CUDA when present).
2. Kernels: every operator runs the backend its ``TritonOperatorManager`` decided for these inputs:
   Triton where the export was loaded with that operator's flag and the kernel can run on this
   device and dtype, the PyTorch reference otherwise (``serving_kernel_flags`` asks for Triton on
   CUDA). The report lists, per operator, the backends its calls of this request ran on.
3. KV cache: when the model can be computed incrementally (an HSTU encoder without ``time_scales``
   or ``position_from_end``) and the cache is on, a user whose cached events are a prefix of this
   request's window gets only the new positions computed (``hstu.serving.incremental``); every other
   request computes its whole window and leaves its keys and values in the cache. The report says
   hit or miss and why (no entry, window slid past max_seq_len, events changed, another export),
   or why the cache is off.
4. Compiled package: when the cache does not serve (off, or no incremental path) and the export
   folder holds a scoring package built for exactly this target (``hstu.serving.compiled``: device,
   CPU and GPU architecture, torch version) whose k covers the request, whole windows run through
   it (``compiled``: true). Otherwise operators are launched eagerly. The package is native code (a
   shared library AOTInductor compiled) from the export folder, loaded and run in this process: serve
   only export folders you trust. ``ServingOptions(compiled=False)`` never loads it, and an export
   written with ``compiled=none`` has none.
5. dtype: the model's parameter dtype (float32 unless loaded otherwise), reported.
6. CPU threads: on the CPU, a step whose computed tokens hold fewer than ``SINGLE_THREAD_ELEMENTS``
   activations (tokens x dim) runs on one intra-op thread, then torch's thread count is restored
   (``intra_op_threads`` in the report). Such a step is a few hundred operators on a few rows each:
   splitting them across OpenMP threads gains nothing, and where the cores are shared the idle
   workers' spinning and each region's barrier cost far more than the arithmetic (one user of ML-1M's
   HSTU-large on a 2-core CPU with other processes busy: a cache hit took ~10x, a whole window ~17x
   longer on two threads than on one). The setting is process-wide while the step runs; the engine's
   lock serialises steps.
7. CUDA graphs: on CUDA, unless switched off (``ServingOptions.cuda_graphs``), a step that the
   incremental encoder computes (cache hit, miss or off) and the compiled package does not serve
   runs on the fixed shapes of its bucket (``hstu.serving.static_shapes``: users, computed and
   cached tokens, query rows, exclusions and k rounded up) and is replayed from the CUDA graph
   captured for that bucket at its first use (``hstu.serving.graphs``; the buckets' buffers and graph
   memory pools held within ``ServingOptions.graph_bytes``, least recently used first out, a bucket
   larger than that alone run eagerly; batches of at most ``MAX_GRAPH_USERS`` users).
   The whole step, top-k included, is one replay: the host copies the packed inputs in, the
   cached keys and values of hit users into the bucket's buffer, and scores and ids out. The
   report says ``cuda_graph`` true with the bucket, or false and why (switched off, not CUDA, a
   model without the incremental path, the compiled package, a batch above the cap, a bucket
   above ``graph_bytes``, a failed capture, which switches graphs off for the engine).

The host work of a batch (history conversion, id mapping, plans, reports, result dicts) is array
operations and comprehensions, with no Python call per user or event where the cache is off; a
cache lookup and store per user where it is on. On the device the reports are built while the step
runs; only the recommendations wait for its outputs.

Results equal ``Recommender.recommend`` on the same history and request time within float32
rounding (1e-5 on cosine scores, tests/test_serving.py): an incremental step, a batch, a padded
static step or the compiled package sums in another order than a whole window computed alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Hashable, Sequence

import numpy as np
import torch

import hstu_kernels
from hstu_kernels.normalize import l2_normalize
from hstu.errors import ExportFormatError, RequestError
from hstu.serving.histories import Events, check_k, check_request_times, prepare_histories
from hstu.serving.graphs import DEFAULT_MAX_BYTES as DEFAULT_GRAPH_BYTES
from hstu.serving.graphs import MAX_USERS as MAX_GRAPH_USERS
from hstu.serving.graphs import StaticSteps
from hstu.serving.incremental import DeltaBatch, IncrementalEncoder, unsupported_reason
from hstu.serving.kv_cache import CacheEntry, KVCache, events_fingerprint
from hstu.serving.static_shapes import HostStep

if TYPE_CHECKING:
    from hstu.inference import Recommender

DEFAULT_CACHE_BYTES = 1 << 30
LATENCY_WINDOW = 100_000  # latencies kept for the percentiles (the most recent)
# Activations (computed tokens x model dim) below which a CPU step runs on one intra-op thread: torch's
# own grain size (at::internal::GRAIN_SIZE), below which its elementwise kernels do not split work either.
SINGLE_THREAD_ELEMENTS = 1 << 15


def serving_kernel_flags(device: str | torch.device) -> dict[str, bool]:
    """Operator flags for serving on ``device``: Triton for every operator on CUDA (the manager falls
    back to the reference, with a logged reason, where a kernel is missing or cannot run); the
    reference on the CPU, where Triton runs only in its interpreter (a test tool)."""
    on_cuda = torch.device(device).type == "cuda"
    return {op: on_cuda for op in hstu_kernels.OPERATORS}


@dataclass(frozen=True)
class ServingOptions:
    """How the engine may serve: ``cache_bytes`` 0 switches the KV cache off; ``compiled`` False
    ignores a compiled scoring package in the export folder; ``cuda_graphs`` False launches every
    operator eagerly on CUDA instead of replaying a captured step; ``graph_bytes`` bounds the bytes the
    static-shape buckets hold (buffers and CUDA-graph memory pools, least recently used first out)."""

    cache_bytes: int = DEFAULT_CACHE_BYTES
    compiled: bool = True
    cuda_graphs: bool = True
    graph_bytes: int = DEFAULT_GRAPH_BYTES


@dataclass
class Request:
    """One user's request: original item ids and Unix-second timestamps, k, the time it is for."""

    user_id: Hashable
    items: Sequence[Hashable]
    timestamps: Sequence[int]
    k: int
    request_time: int | None = None

    @classmethod
    def from_behaviors(cls, user_id, user_behaviors, k, request_time=None) -> "Request":
        """``user_behaviors``: (original item id, Unix seconds) pairs."""
        pairs = list(user_behaviors)
        if not set(map(len, pairs)) <= {2}:
            position = next(i for i, pair in enumerate(pairs) if len(pair) != 2)
            raise RequestError(f"user_behaviors[{position}] must be an (item, timestamp) pair, got {pairs[position]!r}")
        items, timestamps = zip(*pairs) if pairs else ((), ())
        return cls(user_id, list(items), list(timestamps), k, request_time)


@dataclass
class _Plans:
    """The users of a batch, as arrays and lists: what each reuses and what it computes."""

    user_ids: list
    history_lengths: np.ndarray  # int64 [B]
    window_offsets: np.ndarray  # int64 [B+1]: user b's window in the batch's window arrays
    first_new: np.ndarray  # int64 [B]: window position of the first computed token (the positions reused)
    cached: list  # [B] the CacheEntry of a hit, else None
    outcomes: list[str]  # [B] "hit", "miss", "off"
    details: list[str]  # [B] why

    @property
    def window_lengths(self) -> np.ndarray:
        return np.diff(self.window_offsets)

    def hits(self) -> list[CacheEntry]:
        return [entry for entry in self.cached if entry is not None]


@dataclass
class _Stats:
    requests: int = 0
    batches: int = 0
    errors: int = 0
    paths: Counter = field(default_factory=Counter)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))


class ServingEngine:
    """Serves requests for one Recommender: see the module docstring for the path rule."""

    def __init__(self, recommender: "Recommender", options: ServingOptions | None = None):
        self.recommender = recommender
        self.options = options or ServingOptions()
        self.model = recommender.model
        self.manager = self.model.manager
        self.device = recommender.device
        self.dtype = next(self.model.parameters()).dtype
        self._device_name, self._dtype_name = str(self.device), str(self.dtype).removeprefix("torch.")
        self.incremental_reason = unsupported_reason(self.model)
        self.encoder = IncrementalEncoder(self.model) if self.incremental_reason is None else None
        if self.encoder is None:
            self.cache, self.cache_off_reason = None, self.incremental_reason
        elif self.options.cache_bytes <= 0:
            self.cache, self.cache_off_reason = None, "switched off (cache_bytes=0)"
        else:
            self.cache, self.cache_off_reason = KVCache(self.options.cache_bytes), None
        self.export_fingerprint = model_fingerprint(self.model, self.device)
        with torch.no_grad():  # the served weights never change: normalise the item table once, not per request
            self.unit_items = l2_normalize(self.model.item_table[1:].float())
        self.package, self.package_k, self.package_reason = self._load_package()
        self.static_steps, self.graph_reason = self._static_steps()
        self._stats = _Stats()
        self._lock = threading.Lock()  # one batch at a time: the cache and the model are shared

    def _load_package(self):
        """(the export's compiled scoring package for this target or None, its k, why not). Loading it runs
        the package's native code (module docstring, 4.)."""
        if not self.options.compiled:
            return None, 0, "switched off"
        if self.cache is not None:
            return None, 0, "the KV cache serves (the package computes whole windows only)"
        export_dir = getattr(self.recommender, "export_dir", None)
        if export_dir is None:
            return None, 0, "not loaded from an export folder"
        from hstu.serving.compiled import matching_package, package_file_name, target_name

        path = matching_package(export_dir, self.recommender.config, self.device)
        if path is None:
            return None, 0, f"no {package_file_name(target_name(self.device))} in {export_dir}"
        from torch._inductor import aoti_load_package

        try:
            package = aoti_load_package(str(path))
        except (RuntimeError, OSError, ValueError) as error:  # a truncated or damaged archive
            reason = " ".join(str(error).split())
            raise ExportFormatError(f"{path}: the compiled scoring package does not load ({reason}); serve without "
                                    "it with compiled=false (ServingOptions(compiled=False))") from error
        return package, self.recommender.config["compiled"][path.name]["k"], f"{path.name}"

    def _static_steps(self) -> tuple[StaticSteps | None, str | None]:
        """(the captured static-shape steps, or None and why not)."""
        if not self.options.cuda_graphs:
            return None, "switched off (cuda_graphs=False)"
        if self.encoder is None:
            return None, f"no static-shape step for this model: {self.incremental_reason}"
        if self.device.type != "cuda":
            return None, f"CUDA only (device {self.device})"
        return StaticSteps(self.encoder, self.unit_items, self.device, capture=True,
                           max_bytes=self.options.graph_bytes), None

    # ---- requests -----------------------------------------------------------------------------
    def infer(self, user_id, user_behaviors, num_recommendations: int, request_time: int | None = None) -> dict:
        (result,) = self.infer_batch([Request.from_behaviors(user_id, user_behaviors, num_recommendations,
                                                             request_time)])
        return result

    def check(self, request: Request) -> None:
        """Raise ValueError / KeyError naming what is wrong with a request, before it joins a batch."""
        self._check_fields(request)
        prepare_histories(self.recommender._ids, [(request.items, request.timestamps)],
                          repeats=self.recommender.repeats)

    def _check_batch_fields(self, requests: Sequence[Request]) -> None:
        """:meth:`_check_fields` of every request: a few C-level passes where every k and request time
        is a plain int (or None) and no history is empty, else request by request (the first fault named)."""
        ks = [request.k for request in requests]
        times = [request.request_time for request in requests]
        if (not requests or set(map(type, ks)) != {int} or not set(map(type, times)) <= {int, type(None)}
                or not 1 <= min(ks) <= max(ks) <= self.model.num_items
                or not all(map(len, [request.items for request in requests]))):
            for request in requests:
                self._check_fields(request)

    def _check_fields(self, request: Request) -> None:
        check_k(request.k, self.model.num_items)
        if request.request_time is not None and (isinstance(request.request_time, bool)
                                                 or not isinstance(request.request_time, (int, np.integer))):
            raise RequestError(f"request_time must be integer Unix seconds, got {request.request_time!r}")
        if len(request.items) == 0:
            raise RequestError("the history is empty: at least one (item, timestamp) event is needed")

    def _histories(self, requests: Sequence[Request]) -> Events:
        """The batch's histories, prepared at once; a bad one raises the error its own :meth:`check` raises."""
        try:
            return prepare_histories(self.recommender._ids, [(r.items, r.timestamps) for r in requests],
                                     repeats=self.recommender.repeats)
        except RequestError:
            for request in requests:
                self.check(request)
            raise

    def infer_batch(self, requests: Sequence[Request], count_errors: bool = True) -> list[dict]:
        """One result dict per request (see ``Recommender.infer_with_optimal_strategy``), computed together.
        ``count_errors=False``: a failed batch adds nothing to the error count (a caller that serves its
        requests again one by one counts the ones that fail then)."""
        start = time.perf_counter()
        self._check_batch_fields(requests)
        if not requests:
            return []
        events = self._histories(requests)
        with self._lock:
            try:
                results, plans = self._serve(requests, events)
            except Exception:
                if count_errors:
                    self._stats.errors += len(requests)
                raise
            elapsed_ms = (time.perf_counter() - start) * 1e3
            self._stats.batches += 1
            self._stats.requests += len(requests)
            for result in results:
                result["latency_ms"] = elapsed_ms
            self._stats.latencies_ms.extend(itertools.repeat(elapsed_ms, len(results)))
            num_hits = len(plans.hits())
            if num_hits:
                self._stats.paths["incremental"] += num_hits
            if num_hits < len(results):
                self._stats.paths["whole window"] += len(results) - num_hits
        return results

    def _serve(self, requests: Sequence[Request], events: Events) -> tuple[list[dict], _Plans]:
        """(the result dicts, the plans). On the device, the per-user reports are built while the step
        runs: only the recommendations wait for its outputs."""
        num_users = len(requests)
        recent, window_offsets = events.recent(self.model.max_seq_len)
        window_items, window_times = events.item_ids[recent], events.timestamps[recent]
        request_times = events.last_timestamps()
        times = [request.request_time for request in requests]
        given = [b for b, request_time in enumerate(times) if request_time is not None]
        if given:
            check_request_times(times, request_times, lambda b: f"user {requests[b].user_id!r}")
            request_times[given] = [times[b] for b in given]
        plans = self._plans(requests, events.lengths, window_offsets, window_items, window_times)
        ks = [request.k for request in requests]
        k = max(ks)
        if self.package is not None and k <= self.package_k:
            scores, ids = self.package(*self._upload(
                window_items, window_times, window_offsets, request_times, events.item_ids, events.offsets))
            reports = self._reports(plans, {}, compiled=True, threads=torch.get_num_threads(), graph=(False, ""))
            return self._results(ids.cpu().numpy(), scores.cpu().numpy(), ks, reports), plans
        calls_before = self.manager.call_counts()
        computed_tokens = int(window_offsets[-1] - plans.first_new.sum())
        static, graph_detail = self._graph_use(num_users)
        graph = (False, graph_detail)
        with intra_op_threads_for(self.device, computed_tokens * self.model.embedding.dim) as threads:
            if static:
                packed, packed_k, graph = self._encode_static(plans, window_items, window_times, request_times,
                                                              events, k)
            elif self.encoder is None:
                queries = self._whole_windows_by_model(window_items, window_times, window_offsets, request_times)
                exclude_ids, exclude_offsets = self._upload(events.item_ids - 1, events.offsets)
            else:
                queries, exclude_ids, exclude_offsets = self._encode(plans, window_items, window_times, request_times,
                                                                     events)
        if not static:
            with torch.no_grad():
                scores, ids, _ = hstu_kernels.topk_items(
                    l2_normalize(queries.float()), self.unit_items, k, exclude_ids=exclude_ids,
                    exclude_offsets=exclude_offsets, l2_norm=False, backend=self.manager, validate=False)
        kernels = _backends_run(calls_before, self.manager.call_counts())
        reports = self._reports(plans, kernels, compiled=False, threads=threads, graph=graph)
        if static:
            scores, ids = StaticSteps.unpack(packed, num_users, packed_k)
        else:
            scores, ids = scores.cpu().numpy(), ids.cpu().numpy()
        return self._results(ids + 1, scores, ks, reports), plans

    def _graph_use(self, num_users: int) -> tuple[bool, str]:
        """(whether this batch runs as a static step, why not / which)."""
        if self.static_steps is None:
            return False, self.graph_reason
        if self.static_steps.reason is not None:
            return False, self.static_steps.reason
        if num_users > MAX_GRAPH_USERS:
            return False, f"batch of {num_users} users: graphs hold at most {MAX_GRAPH_USERS}"
        return True, ""

    def _plans(self, requests: Sequence[Request], history_lengths: np.ndarray, window_offsets: np.ndarray,
               window_items: np.ndarray, window_times: np.ndarray) -> _Plans:
        """Each user's cache lookup (none when the cache is off)."""
        num_users = len(requests)
        user_ids = [request.user_id for request in requests]
        first_new = np.zeros(num_users, dtype=np.int64)
        if self.cache is None:
            return _Plans(user_ids, history_lengths, window_offsets, first_new, [None] * num_users,
                          ["off"] * num_users, [self.cache_off_reason] * num_users)
        cached, outcomes, details = [], [], []
        bounds, lengths = window_offsets.tolist(), history_lengths.tolist()
        for b, user_id in enumerate(user_ids):
            window = slice(bounds[b], bounds[b + 1])
            entry, detail = self.cache.lookup(user_id, self.export_fingerprint, window_items[window],
                                              window_times[window], lengths[b], self.model.max_seq_len)
            cached.append(entry)
            outcomes.append("miss" if entry is None else "hit")
            details.append(detail)
            if entry is not None:
                first_new[b] = entry.num_events - 1
        return _Plans(user_ids, history_lengths, window_offsets, first_new, cached, outcomes, details)

    def _encode_static(self, plans: _Plans, window_items, window_times, request_times, events: Events, k: int):
        """(scores and item rows packed on the device (``StaticSteps.unpack`` reads them), their k,
        (graph replayed, the step's shape)) of the batch as a static step (``hstu.serving.static_shapes``),
        launched and not waited for; replayed from its CUDA graph when the steps capture; fills the cache."""
        new_index, positions, query_times, seq_offsets, cached_offsets, cached_times = _delta_layout(
            plans, window_times, request_times)
        hits = [entry.kv for entry in plans.hits()]
        step = HostStep(window_items[new_index], window_times[new_index], positions, query_times, seq_offsets,
                        cached_offsets, cached_times, events.item_ids - 1, events.offsets)
        shape = self.static_steps.shape("delta" if hits else "whole", step, k)
        keep_kv = self.cache is not None
        packed, new_kv, graphed = self.static_steps.launch(shape, step, hits, keep_kv=keep_kv)
        if self.cache is not None:
            self._store(plans, window_items, window_times, new_kv, seq_offsets)
        if graphed:
            return packed, shape.k, (True, f"{graphed}: {shape.describe()}")
        return packed, shape.k, (False, self.static_steps.reason or self.static_steps.eager_reason(shape, keep_kv)
                                 or f"static shapes run eagerly: {shape.describe()}")

    def _encode(self, plans: _Plans, window_items, window_times, request_times, events: Events):
        """(states after each user's last event, the exclusions for top-k on the device), computing only
        what the cache does not hold; fills the cache."""
        new_index, positions, query_times, seq_offsets, cached_offsets, cached_times = _delta_layout(
            plans, window_times, request_times)
        hits = plans.hits()
        (item_ids, timestamps, positions, query_times, device_offsets, cached_offsets, cached_times, last,
         exclude_ids, exclude_offsets) = self._upload(
            window_items[new_index], window_times[new_index], positions, query_times, seq_offsets, cached_offsets,
            cached_times, seq_offsets[1:] - 1, events.item_ids - 1, events.offsets)
        batch = DeltaBatch(
            item_ids=item_ids, timestamps=timestamps, positions=positions, query_timestamps=query_times,
            seq_offsets=device_offsets, cached_offsets=cached_offsets, cached_timestamps=cached_times,
            cached_kv=(hits[0].kv if len(hits) == 1 else torch.cat([e.kv for e in hits], dim=1)) if hits else None,
            max_new_len=int(np.diff(seq_offsets).max()),
        )
        states, new_kv = self.encoder.encode(batch, keep_kv=self.cache is not None)
        if self.cache is not None:
            self._store(plans, window_items, window_times, new_kv, seq_offsets)
        return states[last], exclude_ids, exclude_offsets

    def _store(self, plans: _Plans, window_items, window_times, new_kv, seq_offsets) -> None:
        bounds, lengths = plans.window_offsets.tolist(), plans.history_lengths.tolist()
        for b, (user_id, entry) in enumerate(zip(plans.user_ids, plans.cached)):
            window, window_len = slice(bounds[b], bounds[b + 1]), bounds[b + 1] - bounds[b]
            if window_len < 2:
                continue
            computed = new_kv[:, seq_offsets[b]:seq_offsets[b + 1] - 1]  # all but the last position
            # A copy, never a view: new_kv may be a graph's output, which the next replay overwrites.
            kv = computed.clone(memory_format=torch.contiguous_format) if entry is None else \
                torch.cat([entry.kv, computed], dim=1)
            self.cache.store(user_id, CacheEntry(
                export=self.export_fingerprint, num_events=window_len, history_len=lengths[b],
                prefix=events_fingerprint(window_items[window], window_times[window]), kv=kv))

    def _whole_windows_by_model(self, window_items, window_times, window_offsets, request_times):
        """Encoders without an incremental path: the model's own forward over whole windows."""
        from hstu.data.batch import JaggedBatch

        num_users = window_offsets.shape[0] - 1
        batch = JaggedBatch(
            item_ids=torch.from_numpy(window_items), timestamps=torch.from_numpy(window_times),
            seq_offsets=torch.from_numpy(window_offsets), targets=torch.zeros(num_users, dtype=torch.int64),
            target_timestamps=torch.from_numpy(request_times), user_ids=torch.arange(num_users),
        ).check(self.model.max_seq_len, self.model.num_items)
        with torch.no_grad():
            return self.model.user_states(batch.to(self.device))

    def _reports(self, plans: _Plans, kernels: dict, compiled: bool, threads: int,
                 graph: tuple[bool, str]) -> list[dict]:
        """Each user's ``optimizations_applied``: one dict per user (a caller may change its own)."""
        batch_size = len(plans.user_ids)
        kernels = kernels if not compiled else "inside the compiled package"
        graph_used, graph_detail = graph if not compiled else (False, "inside the compiled package: not captured")
        device, dtype, package = self._device_name, self._dtype_name, self.package_reason
        computed = (plans.window_lengths - plans.first_new).tolist()
        return [{
            "path": "incremental" if entry is not None else "whole window",
            "device": device,
            "dtype": dtype,
            "kernels": kernels,
            "kv_cache": outcome,
            "kv_cache_detail": detail,
            "positions_reused": reused,
            "positions_computed": positions_computed,
            "cuda_graph": graph_used,
            "cuda_graph_detail": graph_detail,
            "compiled": compiled,
            "compiled_detail": package,
            "batch_size": batch_size,
            "intra_op_threads": threads,
        } for entry, outcome, detail, reused, positions_computed in zip(
            plans.cached, plans.outcomes, plans.details, plans.first_new.tolist(), computed)]

    def _results(self, ids: np.ndarray, scores: np.ndarray, ks: list[int], reports: list[dict]) -> list[dict]:
        """Result dicts from model item indices and scores [B, k] (the first ``ks[b]`` of row b kept)."""
        recommendations = self.recommender.ranked(ids, scores, limits=ks, as_dicts=True)
        return [{"recommendations": ranked, "optimizations_applied": report}
                for ranked, report in zip(recommendations, reports)]

    def _upload(self, *arrays: np.ndarray) -> list[torch.Tensor]:
        """int64 host arrays -> device tensors, in one copy (each copy to a GPU costs ~10 us of host time)."""
        packed = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.int64).ravel() for a in arrays]))
        return list(packed.to(self.device).split([int(np.size(a)) for a in arrays]))

    def warm_up(self) -> None:
        """Run a whole window and an incremental step once (kernels compile, memory pools grow), then
        forget them: the cache and the counters start empty."""
        catalogue = self.recommender.item_original_ids
        length = self.model.max_seq_len
        items = [catalogue[i % len(catalogue)] for i in range(length + 1)]
        times = list(range(1_000_000_000, 1_000_000_000 + length + 1))
        for n in (length - 1, length, 1):
            self.infer_batch([Request("__warm_up__", items[:n], times[:n], 1)])
        with self._lock:
            if self.cache is not None:
                self.cache = KVCache(self.options.cache_bytes)
            self._stats = _Stats()

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Taken between batches (the manager's counters change while one runs)."""
        with self._lock:
            latencies = np.asarray(self._stats.latencies_ms, dtype=np.float64)
            return {
                "serving": {
                    "requests": self._stats.requests,
                    "batches": self._stats.batches,
                    "errors": self._stats.errors,
                    "paths": dict(self._stats.paths),
                    "latency_ms": _percentiles(latencies),
                },
                "kv_cache": self.cache.stats() if self.cache is not None else {
                    "enabled": False, "reason": self.cache_off_reason},
                "device": self._device_name,
                "dtype": self._dtype_name,
                "compiled_package": self.package_reason,
                "cuda_graphs": self.static_steps.stats() if self.static_steps is not None else {
                    "enabled": False, "reason": self.graph_reason},
                "kernels": self.manager.get_stats(),
                "kernel_availability": self.manager.get_operator_availability(),
            }


def _delta_layout(plans: _Plans, window_times: np.ndarray, request_times: np.ndarray):
    """Host arrays of a DeltaBatch: which window events are computed (an index, or ``slice(None)``: all,
    when nothing is cached), at which positions, with which query times, and the jagged offsets of the
    new and the cached parts (no loop over events)."""
    window_starts, window_stops = plans.window_offsets[:-1], plans.window_offsets[1:]
    cached_lengths = plans.first_new
    starts = window_starts + cached_lengths
    new_lengths = window_stops - starts
    seq_offsets = np.zeros(new_lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(new_lengths, out=seq_offsets[1:])
    # Token i of user b is window event i - seq_offsets[b] + starts[b], at position that - window_starts[b].
    tokens = np.arange(seq_offsets[-1], dtype=np.int64)
    positions = tokens - np.repeat(seq_offsets[:-1] - cached_lengths, new_lengths)
    # The query time of position i is the time of event i+1; the last position's is the request time.
    query_times = np.empty_like(tokens)
    if cached_lengths.any():
        new_index = tokens + np.repeat(starts - seq_offsets[:-1], new_lengths)
        query_times[:-1] = window_times[np.minimum(new_index[:-1] + 1, window_times.shape[0] - 1)]
    else:  # whole windows: the tokens are the window events
        new_index = slice(None)
        query_times[:-1] = window_times[1:]
    query_times[seq_offsets[1:] - 1] = request_times
    cached_offsets = np.zeros_like(seq_offsets)
    np.cumsum(cached_lengths, out=cached_offsets[1:])
    cached_index = np.arange(cached_offsets[-1], dtype=np.int64) + np.repeat(window_starts - cached_offsets[:-1],
                                                                             cached_lengths)
    return new_index, positions, query_times, seq_offsets, cached_offsets, window_times[cached_index]


@contextlib.contextmanager
def intra_op_threads_for(device: torch.device, activations: int):
    """Yield the intra-op thread count a step of ``activations`` (tokens x dim) runs with: one on the
    CPU below ``SINGLE_THREAD_ELEMENTS`` (torch's count restored afterwards), torch's count otherwise."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or activations >= SINGLE_THREAD_ELEMENTS or threads == 1:
        yield threads
        return
    torch.set_num_threads(1)
    try:
        yield 1
    finally:
        torch.set_num_threads(threads)


def model_fingerprint(model: torch.nn.Module, device: torch.device) -> str:
    """Digest of the model's weights, their dtypes and the device: what cached keys and values depend on."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(str(device).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _backends_run(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, str]:
    """Per operator called in between: the backend it ran on ("triton", "reference", or both joined)."""
    out = {}
    for op, calls in after.items():
        earlier = before.get(op, {})
        ran = sorted(backend for backend, n in calls.items() if n > earlier.get(backend, 0))
        if ran:
            out[op] = "+".join(ran)
    return out


def _percentiles(latencies: np.ndarray) -> dict[str, float | int | None]:
    if latencies.size == 0:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    p50, p90, p99 = np.percentile(latencies, [50, 90, 99]).tolist()
    return {"count": int(latencies.size), "p50": p50, "p90": p90, "p99": p99,
            "mean": float(latencies.mean()), "max": float(latencies.max())}
