"""What the registry holds for each operator (``hstu_kernels.registry`` lists them).

An operator is one flag key and a few public functions. Each function ``f`` has a reference
``hstu_kernels.reference.<module>.f`` and, once written, a Triton backend
``hstu_kernels.triton.<module>.f`` with the same signature: matching names, side by side. The Triton
module also defines ``unsupported_reason(tensors, **limits) -> str | None`` (its limits on the tensors the
public function dispatches on: device, dtype and trailing dimensions only, and on the plain arguments
the public function passes as ``limits``, such as topk's k: what the manager keys its decisions on).
Input checks live in ``hstu_kernels.ops.<module>`` next to the public
functions, so that every backend gets them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

import torch

MODES = ("fwd", "bwd", "fwd+bwd")


@dataclass
class BenchCase:
    """Inputs of one benchmark shape and how to call each backend on them."""

    shape: tuple[int, ...]
    call: Callable[[str], torch.Tensor]  # backend name ("triton" / "reference") -> output
    leaves: list[torch.Tensor]  # the inputs whose gradients a timed backward computes
    work: dict[str, float]  # mode -> FLOPs or bytes, in units of ``BenchSpec.rate_unit``
    eager_call: Callable[[], torch.Tensor] | None = None  # plain PyTorch ops, where they differ from the reference
    peer_inputs: dict | None = None  # named inputs for the harness's peer adapter of this operator
    peer_skip_reason: str | None = "no peer implementation of this operator"
    checksum: float = 0.0  # identifies the inputs, to check that the peer's child process saw the same


@dataclass(frozen=True)
class BenchSpec:
    """The benchmark cases of an operator: shape fields, target shapes and a case builder."""

    shape_fields: tuple[str, ...]
    default_shapes: tuple[tuple[int, ...], ...]
    build: Callable[[tuple[int, ...], torch.dtype, torch.device, argparse.Namespace], BenchCase]
    rate_unit: str = "TFLOP/s"  # or "GB/s"
    modes: tuple[str, ...] = MODES
    uses_bias: bool = False
    direct_call: bool = False  # whether ``build`` honours options.call == "direct" (the backend itself)


@dataclass(frozen=True)
class OperatorSpec:
    """One operator: everything else (flags, configs, dispatch, benchmarks, test map) derives from these."""

    key: str  # the flag key in model.kernels and conf/triton/<key>.yaml
    summary: str
    module: str  # <module> of hstu_kernels.reference.<module>, .triton.<module> and .ops.<module>
    functions: tuple[str, ...]  # the public functions (in hstu_kernels) of this operator
    triton: bool  # whether hstu_kernels.triton.<module> exists
    bench: BenchSpec

    @property
    def reference_module(self) -> str:
        return f"hstu_kernels.reference.{self.module}"

    @property
    def triton_module(self) -> str:
        return f"hstu_kernels.triton.{self.module}"

    @property
    def test_file(self) -> str:
        """The operator's tests, as a repository path."""
        return f"tests/kernels/test_{self.module}.py"
