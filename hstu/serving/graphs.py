"""Serving steps replayed from CUDA graphs: one graph per :class:`~hstu.serving.static_shapes.StaticShape`.

A single user's step is a few hundred small kernels whose launches, not the GPU, set its latency.
:class:`StaticSteps` lays each step out on the fixed shapes of its bucket and, on CUDA, captures the
whole of it (embedding, blocks, delta or whole-window attention, top-k with exclusions) as one graph
the first time the bucket is met, then replays it: a request costs one host-to-device copy of its
packed int64 inputs, a device-to-device copy of its users' cached keys and values, one replay and
one device-to-host copy of scores and ids. Without capture (the CPU) the same fixed-shape step runs
eagerly: that is what the CPU tests compare with the engine's eager path.

Per bucket (a "slot"): a host buffer of the packed inputs (page-locked on CUDA), its device copy, the
static cached keys and values of "delta" steps, and the graph with its outputs. The slots are bounded
in bytes (``max_bytes``, ``ServingOptions.graph_bytes``), least recently used first out, because
neither their number nor their size is fixed: a bucket is one of many combinations of users, tokens,
cached tokens, query rows, exclusions and k, and a bucket of 1,024 ML-1M windows computes some 200,000
tokens where a single user's computes at most 200. A slot's bytes are its buffers plus its graph's
memory pool, measured as the allocator's segments of that pool once the graph is captured.
Each graph therefore has a pool of its own (unlike ``hstu.train_step``'s graphs, which share one): a
shared pool is freed only when its last graph goes, so evicting a graph would release nothing, and no
graph's share of it could be measured. Evicted pools are returned to the device
(``torch.cuda.empty_cache``). Steps are warmed up and captured by ``hstu.graph_capture.GraphCapture``
(one side and one capture stream per engine, cuBLAS workspaces allocated in each graph's own pool and
counted with it). A bucket larger than the whole bound is captured once (to measure it),
dropped when the next step starts, and from then on runs eagerly on its fixed shapes, saying why.
Each replay's outputs are read (and the cache's keys and values copied out) before the next replay
of the same graph; the engine's lock serialises steps. Operator calls inside a graph are counted per
replay by the manager (``TritonOperatorManager.region``). A capture that fails switches graphs off
for the engine (``reason`` says why) and the step runs eagerly.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from hstu.graph_capture import GraphCapture
from hstu.serving import static_shapes
from hstu.serving.incremental import IncrementalEncoder
from hstu.serving.static_shapes import HostStep, StaticShape

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 8 << 30  # ServingOptions.graph_bytes: 8 GiB of an H200's 141 GB
MAX_USERS = 1024  # batches above this run eagerly: a bucket of 2,048 windows would hold ~1 GB of activations per graph


@dataclass
class _Slot:
    shape: StaticShape
    host: torch.Tensor  # int64 [shape.size], page-locked on CUDA
    host_view: np.ndarray
    device_inputs: torch.Tensor  # int64 [shape.size] on the device (the host buffer itself on the CPU)
    inputs: dict[str, torch.Tensor]
    cached_kv: torch.Tensor | None  # [num_blocks, shape.cached, W] for "delta" steps
    keep_kv: bool
    graph: "torch.cuda.CUDAGraph | None" = None
    outputs: tuple[torch.Tensor, torch.Tensor | None] | None = None
    graph_bytes: int = 0  # the graph's memory pool (its outputs included), measured at capture

    @property
    def buffer_bytes(self) -> int:
        tensors = [self.host, self.cached_kv] + ([self.device_inputs] if self.device_inputs is not self.host else [])
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def nbytes(self) -> int:
        return self.buffer_bytes + self.graph_bytes


class StaticSteps:
    """Runs serving steps on bucketed static shapes, replayed from CUDA graphs when ``capture``."""

    def __init__(self, encoder: IncrementalEncoder, unit_items: torch.Tensor, device: torch.device, capture: bool,
                 max_bytes: int = DEFAULT_MAX_BYTES):
        if capture and device.type != "cuda":
            raise ValueError("StaticSteps: CUDA-graph capture needs a CUDA device")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"StaticSteps: max_bytes (graph_bytes) must be an integer >= 0, got {max_bytes!r}")
        self.encoder = encoder
        self.model = encoder.model
        self.manager = self.model.manager
        self.unit_items = unit_items
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.capture = capture
        self.max_bytes = max_bytes
        self.reason: str | None = None  # why graphs are off after a failed capture
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self._bytes = 0  # nbytes of the slots held
        self._too_large: dict[tuple, int] = {}  # (shape, keep_kv) -> the bytes its slot needs, above max_bytes
        self._dropped: list[tuple] = []  # slots above max_bytes, held until the step that used them is read
        self.evictions = 0
        self._graph_capture = GraphCapture(device) if capture else None

    def shape(self, form: str, step: HostStep, k: int) -> StaticShape:
        return step.shape(form, k, self.model.max_seq_len, self.model.num_items)

    def launch(self, shape: StaticShape, step: HostStep, cached: list[torch.Tensor], keep_kv: bool):
        """(scores and item rows packed on the device [shape.users + 1, 2 * shape.k] (:meth:`unpack`
        reads them), keys and values of the step's tokens [num_blocks, shape.tokens, W] on the device
        or None, "replayed", "captured and replayed" or None where the step ran eagerly). Nothing
        waits for the device: the host may work while the step runs.
        ``cached``: the cached keys and values of the step's users in order (a "delta" step); the
        returned tensors are valid until the next step."""
        slot = self._slot(shape, keep_kv)
        static_shapes.fill(shape, step, slot.host_view)
        if slot.device_inputs is not slot.host:
            slot.device_inputs.copy_(slot.host, non_blocking=True)
        if shape.form == "delta":
            num_cached = int(step.cached_offsets[-1])
            slot.cached_kv[:, :num_cached].copy_(cached[0] if len(cached) == 1 else torch.cat(cached, dim=1))
        graphed = "replayed" if self.capture and self.reason is None and (shape, keep_kv) in self._slots else None
        if graphed and slot.graph is None:
            graphed = "captured and replayed" if self._capture(slot) else None
        if graphed:
            with self.manager.region(self._region(shape)):
                slot.graph.replay()
            packed, new_kv = slot.outputs
        else:
            with torch.no_grad():
                packed, new_kv = static_shapes.run(self.encoder, self.unit_items, shape, slot.inputs, slot.cached_kv,
                                                   keep_kv)
        return packed, new_kv, graphed

    def run(self, shape: StaticShape, step: HostStep, cached: list[torch.Tensor], keep_kv: bool):
        """:meth:`launch` and :meth:`unpack`: (scores, item rows, keys and values, how it ran)."""
        packed, new_kv, graphed = self.launch(shape, step, cached, keep_kv)
        return *self.unpack(packed, step.num_users, shape.k), new_kv, graphed

    @staticmethod
    def unpack(packed: torch.Tensor, num_users: int, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores float32 [B, k], item rows int64 [B, k]) as host arrays, from a launched step's output
        (waits for the device)."""
        result = packed[:num_users].cpu().numpy()
        return result[:, :k].astype(np.float32), result[:, k:].astype(np.int64)

    def eager_reason(self, shape: StaticShape, keep_kv: bool) -> str | None:
        """Why a step of this bucket runs eagerly although graphs are on (None: no such reason)."""
        needed = self._too_large.get((shape, keep_kv))
        if needed is None:
            return None
        return (f"the bucket needs {needed:,} bytes, more than graph_bytes={self.max_bytes:,}: run eagerly "
                f"({shape.describe()})")

    def _slot(self, shape: StaticShape, keep_kv: bool) -> _Slot:
        """The bucket's slot, most recently used now; a new one evicts least recently used slots until
        it fits (one too large for the bound is made for this step only)."""
        for key in self._dropped:  # the steps that used them were read
            self._remove(key)
        self._dropped.clear()
        key = (shape, keep_kv)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        on_cuda = self.device.type == "cuda"
        host = torch.zeros(shape.size, dtype=torch.int64, pin_memory=on_cuda)
        device_inputs = host.to(self.device) if on_cuda else host
        cached_kv = None
        if shape.form == "delta":
            cached_kv = torch.zeros((len(self.encoder.blocks), shape.cached, self.encoder.kv_width), dtype=self.dtype,
                                    device=self.device)
        slot = _Slot(shape, host, host.numpy(), device_inputs, shape.split(device_inputs), cached_kv, keep_kv)
        if key in self._too_large or slot.buffer_bytes > self.max_bytes:
            self._too_large[key] = max(self._too_large.get(key, 0), slot.buffer_bytes)
            return slot  # not kept
        self._slots[key] = slot
        self._bytes += slot.nbytes
        self._fit(key)
        return slot

    def _fit(self, key: tuple) -> None:
        """Evict least recently used slots other than ``key``'s until the bytes held fit ``max_bytes``."""
        evicted = False
        while self._bytes > self.max_bytes and len(self._slots) > 1:
            oldest = next(iter(self._slots))
            if oldest == key:
                self._slots.move_to_end(key)
                continue
            self._remove(oldest)
            self.evictions += 1
            evicted = True
        if evicted and self.capture:
            torch.cuda.empty_cache()  # the evicted graphs' pools back to the device

    def _remove(self, key: tuple) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._bytes -= slot.nbytes
            slot.graph = slot.outputs = None

    def _region(self, shape: StaticShape) -> str:
        return f"serving_step_{id(self)}_{shape.describe()}"

    def _capture(self, slot: _Slot) -> bool:
        """Warm the step up on a side stream, then capture it; False (graphs off, ``reason`` set) when
        the capture fails."""
        def step():
            with torch.no_grad():
                return static_shapes.run(self.encoder, self.unit_items, slot.shape, slot.inputs, slot.cached_kv,
                                         slot.keep_kv)

        try:
            graph = torch.cuda.CUDAGraph()  # a pool of its own
            slot.outputs, graph_bytes = self._graph_capture(
                graph, step, capture_context=self.manager.region(self._region(slot.shape), executes=False))
        except Exception as error:  # noqa: BLE001 - any failure: serve eagerly, say why
            torch.cuda.synchronize()
            self.reason = f"capture of {slot.shape.describe()} failed: {type(error).__name__}: {error}"
            log.warning("CUDA graphs switched off for this engine: %s", self.reason)
            slot.outputs = None
            return False
        slot.graph = graph
        self._account(slot, graph_bytes)
        return True

    def _account(self, slot: _Slot, graph_bytes: int) -> None:
        """Add a captured graph's pool to its slot's bytes; evict others to fit, or, when the slot alone
        exceeds ``max_bytes``, drop it after this step and run its bucket eagerly from then on."""
        key = (slot.shape, slot.keep_kv)
        slot.graph_bytes = graph_bytes
        self._bytes += graph_bytes
        if slot.nbytes > self.max_bytes:
            self._too_large[key] = slot.nbytes
            self._dropped.append(key)
        else:
            self._fit(key)

    def __len__(self) -> int:
        return len(self._slots)

    def stats(self) -> dict:
        """Buckets and graphs held, their bytes (buffers and graph pools) against the bound, evictions, and
        the buckets that run eagerly because they alone exceed it."""
        slots = self._slots.values()
        return {"enabled": self.reason is None, "buckets": len(self._slots),
                "captured": sum(slot.graph is not None for slot in slots),
                "bytes": self._bytes, "graph_pool_bytes": sum(slot.graph_bytes for slot in slots),
                "max_bytes": self.max_bytes, "evictions": self.evictions,
                "too_large_buckets": len(self._too_large), "reason": self.reason}
