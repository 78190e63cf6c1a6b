"""Serving steps replayed from CUDA graphs: one graph per :class:`~hstu.serving.static_shapes.StaticShape`.

A single user's step is a few hundred small kernels whose launches, not the GPU, set its latency.
:class:`StaticSteps` lays each step out on the fixed shapes of its bucket and, on CUDA, captures the
whole of it (embedding, blocks, delta or whole-window attention, top-k with exclusions) as one graph
the first time the bucket is met, then replays it: a request costs one host-to-device copy of its
packed int64 inputs, a device-to-device copy of its users' cached keys and values, one replay and
one device-to-host copy of scores and ids. Without capture (the CPU) the same fixed-shape step runs
eagerly: that is what the CPU tests compare with the engine's eager path.

Per bucket (a "slot"): a host buffer of the packed inputs (page-locked on CUDA), its device copy, the
static cached keys and values of "delta" steps, and the graph with its outputs. Inputs live outside
the graphs' memory pool, which all graphs share (as ``hstu.train_step`` does): a replay may overwrite
another graph's outputs, so each replay's outputs are read (and the cache's keys and values copied
out) before the next replay; the engine's lock serialises steps. At most ``max_graphs`` slots are
kept, least recently used first out. Operator calls inside a graph are counted per replay by the
manager (``TritonOperatorManager.region``). A capture that fails switches graphs off for the engine
(``reason`` says why) and the step runs eagerly.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from hstu.serving import static_shapes
from hstu.serving.incremental import IncrementalEncoder
from hstu.serving.static_shapes import HostStep, StaticShape

log = logging.getLogger(__name__)

MAX_GRAPHS = 64
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


class StaticSteps:
    """Runs serving steps on bucketed static shapes, replayed from CUDA graphs when ``capture``."""

    def __init__(self, encoder: IncrementalEncoder, unit_items: torch.Tensor, device: torch.device, capture: bool,
                 max_graphs: int = MAX_GRAPHS):
        if capture and device.type != "cuda":
            raise ValueError("StaticSteps: CUDA-graph capture needs a CUDA device")
        self.encoder = encoder
        self.model = encoder.model
        self.manager = self.model.manager
        self.unit_items = unit_items
        self.device = device
        self.dtype = next(self.model.parameters()).dtype
        self.capture = capture
        self.max_graphs = max_graphs
        self.reason: str | None = None  # why graphs are off after a failed capture
        self._slots: OrderedDict[tuple, _Slot] = OrderedDict()
        self._pool = torch.cuda.graph_pool_handle() if capture else None

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
        graphed = "replayed" if self.capture and self.reason is None else None
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

    def _slot(self, shape: StaticShape, keep_kv: bool) -> _Slot:
        key = (shape, keep_kv)
        slot = self._slots.get(key)
        if slot is not None:
            self._slots.move_to_end(key)
            return slot
        while len(self._slots) >= self.max_graphs:
            self._slots.popitem(last=False)
        on_cuda = self.device.type == "cuda"
        host = torch.zeros(shape.size, dtype=torch.int64, pin_memory=on_cuda)
        device_inputs = host.to(self.device) if on_cuda else host
        cached_kv = None
        if shape.form == "delta":
            cached_kv = torch.zeros((len(self.encoder.blocks), shape.cached, self.encoder.kv_width), dtype=self.dtype,
                                    device=self.device)
        slot = _Slot(shape, host, host.numpy(), device_inputs, shape.split(device_inputs), cached_kv, keep_kv)
        self._slots[key] = slot
        return slot

    def _region(self, shape: StaticShape) -> str:
        return f"serving_step_{id(self)}_{shape.describe()}"

    def _capture(self, slot: _Slot) -> bool:
        """Warm the step up on a side stream, then capture it; False (graphs off, ``reason`` set) when
        the capture fails."""
        from hstu.train_step import syncs_raise

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), torch.no_grad():
                static_shapes.run(self.encoder, self.unit_items, slot.shape, slot.inputs, slot.cached_kv, slot.keep_kv)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with self.manager.region(self._region(slot.shape), executes=False), syncs_raise(), torch.no_grad():
                with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                    slot.outputs = static_shapes.run(self.encoder, self.unit_items, slot.shape, slot.inputs,
                                                     slot.cached_kv, slot.keep_kv)
        except Exception as error:  # noqa: BLE001 - any failure: serve eagerly, say why
            torch.cuda.synchronize()
            self.reason = f"capture of {slot.shape.describe()} failed: {type(error).__name__}: {error}"
            log.warning("CUDA graphs switched off for this engine: %s", self.reason)
            slot.outputs = None
            return False
        slot.graph = graph
        return True

    def __len__(self) -> int:
        return len(self._slots)

    def stats(self) -> dict:
        return {"enabled": self.reason is None, "buckets": len(self._slots), "max_buckets": self.max_graphs,
                "captured": sum(slot.graph is not None for slot in self._slots.values()), "reason": self.reason}
