"""TritonOperatorManager: which backend each operator runs, why, and how often.

Flags say which operators *ask* for Triton; the manager decides at the first call
with real inputs whether the Triton kernel can run there (Triton importable,
kernel implemented, tensors on CUDA or the Triton interpreter active, dtype and
shape supported). When it cannot, it falls back to the PyTorch reference and
warns once per operator (``fallback="warn"``) or raises (``fallback="error"``).

What does not depend on inputs (Triton installed, the kernel module imported, a GPU or the
interpreter) is settled when the manager is built, so that the first-call decision is plain
checks of devices, dtypes and shapes: a ``torch.compile`` trace runs through it without a
graph break, even when the model's very first call is compiled.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from dataclasses import asdict, dataclass
from types import ModuleType
from typing import Mapping, Sequence

import torch

log = logging.getLogger(__name__)

OPERATORS: tuple[str, ...] = (
    "hstu_hierarchical_attention",
    "fused_attention_layernorm",
    "hierarchical_sequence_fusion",
    "sequence_recommendation_interaction",
    "interaction",
)

# Operator -> module under hstu_kernels.triton that implements it (None: not written yet).
# Each module defines ``unsupported_reason(tensors) -> str | None`` for input-specific limits.
TRITON_MODULES: dict[str, str | None] = {
    "hstu_hierarchical_attention": "hstu_kernels.triton.hstu_attention",
    "fused_attention_layernorm": None,
    "hierarchical_sequence_fusion": None,
    "sequence_recommendation_interaction": None,
    "interaction": None,
}

BACKENDS = ("triton", "reference")
FALLBACK_POLICIES = ("warn", "error")


class TritonUnavailableError(RuntimeError):
    """A Triton operator was requested with ``fallback="error"`` and cannot run."""


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


@dataclass
class OperatorStats:
    requested: str = "reference"
    triton_calls: int = 0
    reference_calls: int = 0
    fallback_reason: str | None = None


class TritonOperatorManager:
    """Resolves ``"triton"``/``"reference"`` per operator from flags and inputs."""

    def __init__(self, enabled: Mapping[str, bool] | None = None, fallback: str = "warn"):
        enabled = dict(enabled or {})
        unknown = sorted(set(enabled) - set(OPERATORS))
        if unknown:
            raise KeyError(f"unknown kernel flag(s) {unknown}; valid keys: {list(OPERATORS)}")
        if fallback not in FALLBACK_POLICIES:
            raise ValueError(f"kernel_fallback must be one of {FALLBACK_POLICIES}, got {fallback!r}")
        self.fallback = fallback
        self._stats = {
            op: OperatorStats(requested="triton" if enabled.get(op, False) else "reference")
            for op in OPERATORS
        }
        self._decisions: dict[tuple, str] = {}
        # Input-independent facts, settled now (imports and environment reads cannot be traced).
        self._interpreter = interpreter_active()
        self._static: dict[str, tuple[bool, str]] = {}
        self._modules: dict[str, ModuleType] = {}
        for op, stats in self._stats.items():
            if stats.requested == "triton":
                self._static[op] = self.availability(op)
                if self._static[op][0]:
                    self._modules[op] = importlib.import_module(TRITON_MODULES[op])

    # ---- static availability -------------------------------------------------------
    @staticmethod
    def availability(op: str) -> tuple[bool, str]:
        """(available, reason) for the Triton backend of ``op``, before seeing inputs."""
        _check_op(op)
        module = TRITON_MODULES[op]
        if module is None:
            return False, "not implemented yet"
        err = triton_import_error()
        if err:
            return False, err
        if not torch.cuda.is_available() and not interpreter_active():
            return False, "no CUDA device and TRITON_INTERPRET is not set"
        return True, "available"

    @classmethod
    def unsupported_reason(cls, op: str, tensors: Sequence[torch.Tensor]) -> str | None:
        """Why the Triton kernel of ``op`` cannot run on these tensors (None: it can)."""
        ok, reason = cls.availability(op)
        if not ok:
            return reason
        return _input_reason(importlib.import_module(TRITON_MODULES[op]), tensors, interpreter_active())

    # ---- per-call resolution ---------------------------------------------------------
    def backend(self, op: str, tensors: Sequence[torch.Tensor]) -> str:
        """The backend ``op`` runs with on these inputs; decided once per (device, dtype)."""
        stats = self._stats[op]
        if stats.requested == "reference":
            self._count(stats, "reference")
            return "reference"
        key = (op, tuple((t.device.type, t.dtype) for t in tensors))
        choice = self._decisions.get(key)
        if choice is None:
            choice = self._decide(op, tensors)
            self._decisions[key] = choice
        self._count(stats, choice)
        return choice

    def _decide(self, op: str, tensors: Sequence[torch.Tensor]) -> str:
        """Checks of tensor metadata only (traceable); the input-independent part was settled in __init__."""
        available, reason = self._static[op]
        if available:
            reason = _input_reason(self._modules[op], tensors, self._interpreter)
        if reason is None:
            return "triton"
        self._fall_back(op, reason)
        return "reference"

    @torch.compiler.disable  # logging breaks a trace; only the fallback path comes here
    def _fall_back(self, op: str, reason: str) -> None:
        msg = f"Triton operator '{op}' cannot run: {reason}"
        if self.fallback == "error":
            raise TritonUnavailableError(msg + " (model.kernel_fallback=error)")
        if self._stats[op].fallback_reason is None:
            log.warning("%s; falling back to the PyTorch reference", msg)
        self._stats[op].fallback_reason = reason

    @staticmethod
    def _count(stats: OperatorStats, choice: str) -> None:
        # Reading a counter inside a torch.compile trace would put its value in a guard
        # and recompile every step: calls made by compiled graphs are not counted.
        if torch.compiler.is_compiling():
            return
        if choice == "triton":
            stats.triton_calls += 1
        else:
            stats.reference_calls += 1

    def stats(self) -> dict[str, dict]:
        return {op: asdict(s) for op, s in self._stats.items()}

    def fallbacks(self) -> dict[str, str]:
        return {op: s.fallback_reason for op, s in self._stats.items() if s.fallback_reason}

    def report(self) -> str:
        lines = []
        for op in OPERATORS:
            s = self._stats[op]
            ok, why = self.availability(op)
            lines.append(
                f"{op:38s} requested={s.requested:9s} triton_available={str(ok):5s} ({why})"
                f" calls triton={s.triton_calls} reference={s.reference_calls}"
                + (f" FALLBACK: {s.fallback_reason}" if s.fallback_reason else "")
            )
        return "\n".join(lines)


def _input_reason(module, tensors: Sequence[torch.Tensor], interpreter: bool) -> str | None:
    """Why the kernel in ``module`` cannot run on these tensors: their devices, then the module's own limits."""
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not (devices == {"cpu"} and interpreter):
        return f"inputs on {sorted(devices)}; Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    return module.unsupported_reason(tensors)


def _check_op(op: str) -> None:
    if op not in OPERATORS:
        raise KeyError(f"unknown operator {op!r}; valid: {list(OPERATORS)}")


_default_manager: TritonOperatorManager | None = None


def default_manager() -> TritonOperatorManager:
    """Used when a functional op is called with ``backend=None`` outside a model:
    every operator asks for Triton and falls back silently-but-logged to the reference."""
    global _default_manager
    if _default_manager is None:
        _default_manager = TritonOperatorManager({op: True for op in OPERATORS}, fallback="warn")
    return _default_manager


def resolve_backend(op: str, backend: "str | TritonOperatorManager | None", tensors: Sequence[torch.Tensor]) -> str:
    """Turn the ``backend=`` argument of a functional op into "triton" or "reference"."""
    if isinstance(backend, TritonOperatorManager):
        return backend.backend(op, tensors)
    if backend is None:
        return default_manager().backend(op, tensors)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, a TritonOperatorManager or None; got {backend!r}")
    if backend == "triton" and not torch.compiler.is_compiling():  # checked by the eager call; a trace cannot import
        reason = TritonOperatorManager.unsupported_reason(op, tensors)
        if reason is not None:
            raise TritonUnavailableError(f"Triton operator '{op}' cannot run: {reason}")
    return backend
