"""How the framework's processes allocate host memory.

glibc's malloc maps every block above its mmap threshold (at most 32 MiB) afresh and unmaps it when freed,
so each large CPU tensor that an op allocates starts as untouched pages. At ML-1M's shapes (the reference
attention's [512, 200, 200] tensors) the page faults took longer than the arithmetic: on a CPU, training,
full-ranking evaluation and serving ran up to 2.7x slower (BENCHMARKS.md, "Host memory on a CPU"). Served
from the heap, which is then never trimmed, a freed block is reused by the next op, at the price of the
process keeping its peak memory. Runs on a GPU do not ask for it: their host tensors are small, and the process
would keep the peak memory of its data preparation.
"""
from __future__ import annotations

import ctypes
import os
import sys

import torch

# glibc's <malloc.h> parameters
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4


def computes_on_cpu(accelerator: str | None) -> bool:
    """Whether a run given Lightning's ``accelerator`` computes on the CPU (None and "auto" take CUDA where
    it is visible)."""
    return accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())


def tunes_malloc(name: str) -> bool:
    """Whether environment variable ``name`` is one glibc's malloc reads at start-up: a user who set one tunes
    malloc themself (GLIBC_TUNABLES=glibc.malloc.perturb=0, a no-op, keeps glibc's defaults)."""
    return name.startswith("MALLOC_") or name == "GLIBC_TUNABLES"


def reuse_freed_host_memory() -> bool:
    """Serve every later malloc of this process from the heap and never trim it (glibc only). False, and
    nothing changed, off glibc or where the environment already tunes malloc."""
    if not sys.platform.startswith("linux") or any(tunes_malloc(name) for name in os.environ):
        return False
    libc = ctypes.CDLL(None)  # the symbols the process has loaded: its C library's among them
    if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: their mallopt is not glibc's
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
