"""Capturing a step as a CUDA graph, the one way training (``hstu.train_step``) and serving
(``hstu.serving.graphs``) do it.

:class:`GraphCapture` runs the step once eagerly on a side stream (the warm-up capture needs: kernels
compiled, lazily built state allocated), then captures it on a capture stream of its own. Both
streams live as long as their owner: cuBLAS keeps a workspace for every stream it meets (32 MiB on
an H200), so a fresh stream per capture leaves one behind each time. Around each warm-up and capture
torch's cached cuBLAS workspaces are dropped (:func:`own_cublas_workspaces`), and a host-device
synchronisation inside the captured step raises where it is called (:func:`syncs_raise`). Captures run
in CUDA's thread-local mode: a loader's pin-memory thread may keep allocating page-locked memory
meanwhile, which the default (global) mode would count against the capture.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch


class GraphCapture:
    """Warm-up and capture of steps on ``device``, with one side stream and one capture stream."""

    def __init__(self, device: torch.device):
        self.device = device
        self.side = torch.cuda.Stream(device)
        self.capture_stream = torch.cuda.Stream(device)

    def __call__(self, graph: torch.cuda.CUDAGraph, step: Callable[[], Any], *, pool=None,
                 capture_context: contextlib.AbstractContextManager | None = None) -> tuple[Any, int]:
        """Run ``step`` eagerly on the side stream, then capture it into ``graph`` (in ``pool``, or a pool
        of its own), inside ``capture_context`` -> (the captured call's output, the bytes the graph's
        memory pool grew by: the allocator's segments of that pool, after against before)."""
        with own_cublas_workspaces():
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                step()
            torch.cuda.current_stream().wait_stream(self.side)
            before = 0 if pool is None else pool_bytes(pool, self.device)
            with capture_context or contextlib.nullcontext(), syncs_raise():
                with torch.cuda.graph(graph, pool=pool, stream=self.capture_stream, capture_error_mode="thread_local"):
                    output = step()
            return output, pool_bytes(graph.pool(), self.device) - before


def pool_bytes(pool, device: torch.device) -> int:
    """Bytes of the caching allocator's segments in memory pool ``pool`` on ``device``. Not the growth of
    reserved memory across a capture: the first graph a CUDA generator meets allocates its graph-safe
    seed and offset outside the graph's pool (a 2 MiB segment just after an emptied cache)."""
    pool, index = tuple(pool), torch.device(device).index
    index = torch.cuda.current_device() if index is None else index
    return sum(segment["total_size"] for segment in torch.cuda.memory_snapshot()
               if tuple(segment["segment_pool_id"]) == pool and segment["device"] == index)


@contextlib.contextmanager
def own_cublas_workspaces() -> Iterator[None]:
    """Drop torch's cached cuBLAS workspaces before and after a warm-up and capture, so that the graph
    captures a workspace allocated in its own memory pool, and no later eager call or capture reuses a
    workspace that a live graph has baked in. torch caches one workspace per (handle, stream), and
    destroying a graph frees the workspace of the stream it was captured on even where other live
    graphs use it (pytorch#193402). torch's own CUDA-graph trees clear the cache the same way."""
    torch._C._cuda_clearCublasWorkspaces()
    try:
        yield
    finally:
        torch._C._cuda_clearCublasWorkspaces()


@contextlib.contextmanager
def syncs_raise() -> Iterator[None]:
    """Make a host-device synchronisation inside the captured step raise where it is called (a Python
    traceback naming the line) instead of failing the capture with CUDA's generic error at its end."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)
