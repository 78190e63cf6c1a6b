"""Profile a training step: wall time, GPU kernel time, GPU busy fraction, kernels and peak memory per step.

:func:`profile_steps` runs any step callable in three phases:

1. ``warmup`` steps, untimed except as a whole (compilation, CUDA-graph capture and autotuning happen here);
2. ``steps`` timed steps with nothing attached: wall ms/step and the peak memory allocated during them;
3. ``steps`` more steps under ``torch.profiler`` (CUDA activity only): every kernel's interval.

Kernel ms/step is the sum of kernel durations; GPU busy is the UNION of kernel intervals (kernels on
several streams that overlap count once) over the phase-2 wall time, so that the profiler's own host
overhead does not dilute it; the phase-3 wall time is reported too. Memory copies and memsets are
not kernels and are counted apart. The profiler attaches after warm-up, so graphs captured during
warm-up replay under it: CUPTI reports their kernels as it does eager launches. On a machine without
CUDA only the wall-clock figures are measured and the GPU fields are None.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

KERNEL_CATEGORY = "kernel"
OTHER_GPU_CATEGORIES = ("gpu_memcpy", "gpu_memset")


@dataclass
class StepProfile:
    steps: int
    warmup_steps: int
    warmup_s: float  # wall time of all warm-up steps
    wall_ms: float  # per step, phase 2 (no profiler attached)
    samples_per_s: float
    tokens_per_s: float | None
    peak_memory_mb: float | None  # torch.cuda.max_memory_allocated during phase 2
    kernel_ms: float | None = None  # per step: sum of kernel durations
    busy_ms: float | None = None  # per step: union of kernel intervals
    busy_pct: float | None = None  # busy_ms / wall_ms
    kernels_per_step: float | None = None
    copies_per_step: float | None = None  # memcpy + memset operations per step
    copy_ms: float | None = None  # their summed durations per step
    profiled_wall_ms: float | None = None  # per step, phase 3 (profiler attached)
    top_kernels: list[dict] = field(default_factory=list)  # by time: name, ms and calls per step
    first_value: float | None = None  # the first warm-up step's return value (a one-element tensor or a number)
    last_value: float | None = None  # the last profiled step's
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def union_ms(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of (start, end) intervals, in their unit."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def _scalar(value) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.detach().float().cpu())
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _trace_events(prof: torch.profiler.profile, keep_at: Path | None) -> list[dict]:
    """The profiler's Chrome-trace events; with ``keep_at``, the trace is also kept there (gzipped)."""
    with tempfile.TemporaryDirectory(prefix="hstu-profile-") as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as handle:
            events = json.load(handle).get("traceEvents", [])
        if keep_at is not None:
            keep_at.parent.mkdir(parents=True, exist_ok=True)
            partial = keep_at.with_name(keep_at.name + ".partial")
            with open(path, "rb") as source, gzip.open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
            partial.replace(keep_at)
    return events


def summarise_gpu_events(events: list[dict], steps: int, top: int = 10) -> dict:
    """Per-step kernel figures from Chrome-trace events (``ts`` and ``dur`` in microseconds)."""
    kernels = [e for e in events if e.get("cat") == KERNEL_CATEGORY and "dur" in e]
    copies = [e for e in events if e.get("cat") in OTHER_GPU_CATEGORIES and "dur" in e]
    by_name: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        entry = by_name[e.get("name", "?")]
        entry[0] += e["dur"]
        entry[1] += 1
    ranked = sorted(by_name.items(), key=lambda item: -item[1][0])[:top]
    return {
        "kernel_ms": sum(e["dur"] for e in kernels) / 1e3 / steps,
        "busy_ms": union_ms([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / 1e3 / steps,
        "kernels_per_step": len(kernels) / steps,
        "copies_per_step": len(copies) / steps,
        "copy_ms": sum(e["dur"] for e in copies) / 1e3 / steps,
        "top_kernels": [{"name": name[:160], "ms_per_step": total / 1e3 / steps, "calls_per_step": calls / steps}
                        for name, (total, calls) in ranked],
    }


def profile_steps(
    step: Callable[[], object],
    *,
    steps: int,
    warmup: int,
    samples_per_step: float,
    tokens_per_step: float | None = None,
    device: torch.device | str | None = None,
    trace_path: str | Path | None = None,
    top_kernels: int = 10,
    with_profiler: bool = True,
) -> StepProfile:
    """Profile ``step`` (see the module docstring). ``samples_per_step`` and ``tokens_per_step`` count
    real sequences and real tokens, never padding. ``trace_path`` keeps the phase-3 Chrome trace (.json.gz);
    ``with_profiler=False`` skips phase 3 (wall time and memory only)."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_cuda = device.type == "cuda"

    def sync() -> None:
        if on_cuda:
            torch.cuda.synchronize(device)

    sync()
    start = time.perf_counter()
    first_value = None
    for index in range(warmup):
        out = step()
        if index == 0:
            first_value = _scalar(out)
    sync()
    warmup_s = time.perf_counter() - start

    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = step()
    sync()
    wall_ms = (time.perf_counter() - start) * 1e3 / steps
    profile = StepProfile(
        steps=steps, warmup_steps=warmup, warmup_s=warmup_s, wall_ms=wall_ms,
        samples_per_s=samples_per_step / wall_ms * 1e3,
        tokens_per_s=None if tokens_per_step is None else tokens_per_step / wall_ms * 1e3,
        peak_memory_mb=torch.cuda.max_memory_allocated(device) / 2**20 if on_cuda else None,
        first_value=first_value,
    )
    if not on_cuda or not with_profiler:
        profile.last_value = _scalar(out)
        profile.note = "no CUDA device: wall time only" if not on_cuda else "profiler off: no kernel figures"
        return profile

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            out = step()
        sync()
        profile.profiled_wall_ms = (time.perf_counter() - start) * 1e3 / steps
    profile.last_value = _scalar(out)
    gpu = summarise_gpu_events(_trace_events(prof, Path(trace_path) if trace_path else None), steps, top_kernels)
    if gpu["kernels_per_step"] == 0:
        profile.note = "the profiler recorded no GPU kernels"
        return profile
    for key, value in gpu.items():
        setattr(profile, key, value)
    profile.busy_pct = 100.0 * profile.busy_ms / wall_ms
    return profile
