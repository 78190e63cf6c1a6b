"""hstu.host_memory: large CPU tensors come from the heap, and a freed one's memory serves the next."""
import ctypes
import json
import os
import subprocess
import sys

import pytest
import torch

from hstu.host_memory import computes_on_cpu, tunes_malloc

GLIBC = sys.platform.startswith("linux") and hasattr(ctypes.CDLL(None), "mallinfo2")
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's malloc (2.33 or later, for mallinfo2)")


def test_runs_ask_for_it_on_a_cpu_only():
    assert computes_on_cpu("cpu") and not computes_on_cpu("gpu") and not computes_on_cpu("cuda")
    assert computes_on_cpu("auto") == computes_on_cpu(None) == (not torch.cuda.is_available())


# In a fresh process: per allocation of a tensor (bytes malloc mapped for it, page faults while it was written,
# heap bytes once it was freed), before and after the call, and the call's result. The second tensor after
# the call is a little smaller: small allocations may have taken part of the first one's freed block.
PROBE = """
import ctypes, json, resource, torch
from hstu.host_memory import reuse_freed_host_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2

def allocate_and_free(mebibytes):
    mapped, faults = libc.mallinfo2().hblkhd, resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensor = torch.ones(mebibytes << 20, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd - mapped
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    del tensor
    return mapped, faults, libc.mallinfo2().arena

before = allocate_and_free(64)
result = reuse_freed_host_memory()
print(json.dumps([before, result, allocate_and_free(64), allocate_and_free(60)]))
"""


def probe(**environment) -> list:
    env = {key: value for key, value in os.environ.items() if not tunes_malloc(key)}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**env, **environment}, capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@needs_glibc
def test_large_tensors_come_from_the_heap_and_reuse_freed_memory():
    (mapped_before, _, _), result, (mapped_first, faults_first, heap_first), (mapped_second, faults_second, _) = probe()
    assert mapped_before >= 64 << 20  # glibc's default: a block of its own, unmapped when freed
    assert result is True
    assert mapped_first == mapped_second == 0
    assert heap_first >= 64 << 20  # kept by the heap once freed, not trimmed
    assert faults_second * 4 <= faults_first  # the second tensor wrote pages the first had touched


@needs_glibc
@pytest.mark.parametrize("environment", [{"MALLOC_MMAP_MAX_": "65536"}, {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}],
                         ids=["MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"])
def test_a_malloc_setting_in_the_environment_is_left_alone(environment):
    (mapped_before, _, _), result, (mapped_after, _, _), _ = probe(**environment)
    assert result is False
    assert mapped_before >= 64 << 20 and mapped_after >= 64 << 20
