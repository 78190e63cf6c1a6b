"""The registry: one :class:`~hstu_kernels.spec.OperatorSpec` per operator, the single source of truth.

The flag keys (``KernelFlags``, ``conf/triton/*.yaml``), the manager's dispatch, the benchmark
harness's operator list and the test map all derive from it. Adding an operator means one ops module
(spec, input checks, public functions), one reference module, one Triton module and one test file.
"""
from __future__ import annotations

import importlib

from hstu_kernels.ops import attention_layernorm, hstu_attention, sequence_fusion, softmax_losses, topk
from hstu_kernels.spec import OperatorSpec

REGISTRY: dict[str, OperatorSpec] = {
    ops.SPEC.key: ops.SPEC
    for ops in (hstu_attention, attention_layernorm, sequence_fusion, softmax_losses, topk)
}
OPERATORS: tuple[str, ...] = tuple(REGISTRY)
for _spec in REGISTRY.values():  # imported now: a torch.compile trace cannot import them later
    importlib.import_module(_spec.reference_module)
