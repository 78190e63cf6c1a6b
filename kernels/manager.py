"""TritonOperatorManager: which backend each operator runs, why, and how often.

Flags say which operators *ask* for Triton; the manager decides at the first call with real inputs
whether the Triton kernel can run there (Triton importable, kernel written, tensors on CUDA or the
Triton interpreter active, the module's own ``unsupported_reason``). When it cannot, it falls back to
the PyTorch reference and warns once per operator (``fallback="warn"``) or raises (``"error"``).
:meth:`TritonOperatorManager.implementation` hands back the function to call, so no call site can
run one backend while another is counted.

What does not depend on inputs (Triton installed, the kernel module imported, a GPU or the
interpreter) is settled when the manager is built, so that the first-call decision is plain checks
of devices, dtypes and trailing dimensions: a ``torch.compile`` trace runs through it without a
graph break. Eager decisions are cached per operator on exactly those properties of the inputs; a
trace decides afresh and never reads that cache (a guard on it would recompile the graph once the
cache is written).

What a "call" is: one execution of an operator's forward. Eager calls are counted as they are
dispatched. Inside a ``torch.compile`` trace or a CUDA-graph capture the dispatch runs once while the
graph it lands in runs many times, with no Python: such dispatches are recorded for the innermost
open :meth:`region`, and every execution of that region adds them to the counts, whether it ran
compiled code or replayed a captured graph. When dynamo analyses a frame again (a restart or a
recompile), that frame's latest graph replaces its earlier records (``TraceRecords``). Dispatches
traced outside any region are reported as ``traced`` (seen at trace time, executions unknown).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import logging
import os
import sys
import time
from collections import Counter
from types import ModuleType
from typing import Callable, Iterator, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

BACKENDS = ("triton", "reference")
FALLBACK_POLICIES = ("warn", "error")
# A call's plain arguments that a kernel has limits on (topk's k), as (name, value) pairs: they join the
# tensors' metadata in the decision, and reach the Triton module's ``unsupported_reason`` by name.
Limits = tuple[tuple[str, int], ...]


class TritonUnavailableError(RuntimeError):
    """A Triton operator was requested with ``fallback="error"`` (or forced) and cannot run."""


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_import_error() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def _specs():
    from hstu_kernels.registry import REGISTRY  # the registry imports the ops modules, which import this one

    return REGISTRY


def _tracing() -> bool:
    """True inside a torch.compile trace or a CUDA-graph capture: Python here runs once, the graph many times."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _record_at_trace_time(manager: "TritonOperatorManager", op: str, choice: str, reason: str | None = None) -> None:
    """Record a traced dispatch (and, inside torch.compile, its fallback ``reason``) without entering the
    graph: a plain call during a CUDA-graph capture, ``comptime`` (run once, at trace time, with no guard
    and no graph break) inside torch.compile."""
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime

        comptime(_record_from_trace)
    else:
        manager._record_traced(op, choice)


def _record_from_trace(ctx) -> None:
    """Runs inside dynamo with the frame of ``_record_at_trace_time``: its locals as real Python values."""
    def value(name):
        return ctx.get_local(name)._i_will_not_complain_if_bc_breaks_VariableTracker().value

    manager, op, choice, reason = (value(name) for name in ("manager", "op", "choice", "reason"))
    manager._record_traced(op, choice, _trace_of(ctx))
    manager._decisions[(op, "traced")] = choice  # for get_operator_availability's "chosen"
    if reason is not None:
        manager._note_fallback(op, reason)


_TRACE_TOKENS = itertools.count()


def _trace_of(ctx) -> tuple[object, int] | None:
    """(code of the frame dynamo started from, token of the graph being built) for a comptime context;
    None where this torch's dynamo internals differ (records then add up, as for a capture)."""
    try:
        tx = ctx._i_will_not_complain_if_bc_breaks_InstructionTranslator()
        while tx.parent is not None:
            tx = tx.parent
        frame, graph = tx.f_code, ctx.graph()
    except AttributeError:
        return None
    if not hasattr(graph, "_hstu_trace_token"):  # a token, not id(): a discarded graph's id can be reused
        graph._hstu_trace_token = next(_TRACE_TOKENS)
    return frame, graph._hstu_trace_token


class TraceRecords:
    """Dispatches recorded while tracing, per traced frame. Dynamo may restart a frame's analysis from
    scratch (a new graph for the same frame, the earlier attempt discarded) or recompile it: the latest
    graph's records replace the frame's earlier ones. A graph break resumes in another frame, whose
    records add. Records without a trace (a CUDA-graph capture, run once) always add."""

    def __init__(self):
        self._frames: dict[object, tuple[int | None, Counter]] = {}
        self._untraced = Counter()

    def add(self, key: tuple[str, str], times: int = 1, trace: tuple[object, int] | None = None) -> None:
        if trace is None:
            self._untraced[key] += times
            return
        frame, token = trace
        last_token, records = self._frames.get(frame, (None, None))
        if last_token != token:
            records = Counter()
            self._frames[frame] = (token, records)
        records[key] += times

    def total(self) -> Counter:
        out = Counter(self._untraced)
        for _, records in self._frames.values():
            out.update(records)
        return out


class TritonOperatorManager:
    """Resolves each operator's backend from flags and inputs, and keeps per-operator statistics.

    ``timing=True`` also times each eager call (CUDA events on a GPU, read only by :meth:`get_stats`;
    a wall clock on the CPU). With timing off nothing here waits for the device.
    """

    def __init__(self, enabled: Mapping[str, bool] | None = None, fallback: str = "warn", timing: bool = False):
        specs = _specs()
        enabled = dict(enabled or {})
        unknown = sorted(set(enabled) - set(specs))
        if unknown:
            raise KeyError(f"unknown kernel flag(s) {unknown}; valid keys: {list(specs)}")
        not_bool = {op: value for op, value in enabled.items() if not isinstance(value, bool)}
        if not_bool:
            raise TypeError(f"kernel flags must be True or False; got {not_bool}")
        if fallback not in FALLBACK_POLICIES:
            raise ValueError(f"kernel_fallback must be one of {FALLBACK_POLICIES}, got {fallback!r}")
        self.fallback = fallback
        self.timing = bool(timing)
        self._requested = {op: "triton" if enabled.get(op, False) else "reference" for op in specs}
        self._fallback_reason: dict[str, str] = {}
        self._decisions: dict[tuple, str] = {}
        self._calls = {op: Counter() for op in specs}
        self._traced = TraceRecords()  # traced outside any region: (op, backend) -> calls
        self._regions: list[tuple[str, TraceRecords, Counter]] = []  # (name, traced now, counted eagerly now)
        self._flags_key = tuple(sorted(self._requested.items()))
        self._timings: dict[str, list] = {op: [] for op in specs}
        # Input-independent facts, settled now (imports and environment reads cannot be traced).
        self._interpreter = interpreter_active()
        self._static: dict[str, tuple[bool, str]] = {}
        self._modules: dict[str, ModuleType] = {}
        for op, requested in self._requested.items():
            if requested == "triton":
                self._static[op] = self.availability(op)
                if self._static[op][0]:
                    self._modules[op] = importlib.import_module(specs[op].triton_module)
        # Every function a call can resolve to, looked up now: a trace then reads a table that never changes.
        self._functions: dict[tuple[str, str, str], Callable] = {
            (op, function, backend): resolve_function(op, function, backend)
            for op, spec in specs.items() for function in spec.functions
            for backend in (("reference", "triton") if op in self._modules else ("reference",))}

    # ---- availability ---------------------------------------------------------------------
    @staticmethod
    def availability(op: str) -> tuple[bool, str]:
        """(available, reason) for the Triton backend of ``op``, before seeing inputs."""
        spec = _spec(op)
        if not spec.triton:
            return False, "not implemented yet"
        err = triton_import_error()
        if err:
            return False, err
        if not torch.cuda.is_available() and not interpreter_active():
            return False, "no CUDA device and TRITON_INTERPRET is not set"
        return True, "available"

    @classmethod
    def unsupported_reason(cls, op: str, tensors: Sequence[torch.Tensor], limits: Limits = ()) -> str | None:
        """Why the Triton kernel of ``op`` cannot run on these tensors and ``limits`` (None: it can)."""
        ok, reason = cls.availability(op)
        if not ok:
            return reason
        return _input_reason(importlib.import_module(_spec(op).triton_module), tensors, interpreter_active(), limits)

    def get_operator_availability(self) -> dict[str, dict]:
        """Per operator: whether Triton was requested, whether it can run here and why; and, once it
        has been called, the backend the manager chose (with the fallback reason, if any)."""
        out = {}
        for op, requested in self._requested.items():
            available, reason = self._static.get(op) or self.availability(op)
            chosen = {choice for (name, *_), choice in self._decisions.items() if name == op}
            if requested == "reference" and self._calls[op]["reference"]:  # decided without the cache
                chosen.add("reference")
            chosen = sorted(chosen)
            out[op] = {
                "requested": requested,
                "available": available,
                "reason": reason,
                "chosen": chosen[0] if len(chosen) == 1 else (chosen or None),
                "fallback_reason": self._fallback_reason.get(op),
            }
        return out

    # ---- per-call resolution ----------------------------------------------------------------
    def implementation(self, op: str, function: str, tensors: Sequence[torch.Tensor], limits: Limits = ()) -> Callable:
        """The function that computes ``hstu_kernels.<function>`` of operator ``op`` on these inputs
        (Triton or reference), counted as one call; ``limits``: the call's plain arguments that the
        kernel has limits on, as (name, value) pairs."""
        if (op, function, "reference") not in self._functions:  # checked before the call is counted
            self._requested_backend(op)  # an unknown operator is named first
            raise KeyError(f"operator {op!r} has no function {function!r}; it has {list(_spec(op).functions)}")
        choice = self.backend(op, tensors, limits)
        impl = self._functions[(op, function, choice)]
        if self.timing and not _tracing():
            return self._timed(op, impl, tensors[0].device)
        return impl

    def choice(self, op: str, tensors: Sequence[torch.Tensor], limits: Limits = ()) -> str:
        """The backend ``op`` runs with on these inputs, as :meth:`backend` decides it, not counted as a
        call: for eager callers that prepare what only one backend needs (the reference attention's
        index layout)."""
        if self._requested_backend(op) == "reference":
            return "reference"
        if torch.compiler.is_compiling():  # never read the cache in a trace (see backend)
            return self._traced_decision(op, tensors, limits)[0]
        key = (op, *((t.device.type, t.dtype, tuple(t.shape[1:])) for t in tensors), *limits)
        choice = self._decisions.get(key)
        if choice is None:
            choice = self._decide(op, tensors, limits)
            self._decisions[key] = choice
        return choice

    def backend(self, op: str, tensors: Sequence[torch.Tensor], limits: Limits = ()) -> str:
        """The backend ``op`` runs with on these inputs (decided once per device, dtype and trailing
        dims of each tensor, and per ``limits``), counted as one call."""
        reason = None
        if self._requested_backend(op) == "reference":
            choice = "reference"
        elif torch.compiler.is_compiling():
            # Decided afresh in each trace, from metadata, and recorded at trace time: reading the decision
            # cache here would guard the graph on it, and the cache's first write would then recompile the
            # graph on its next call (inside a CUDA-graph capture, a failed capture).
            choice, reason = self._traced_decision(op, tensors, limits)
        else:
            choice = self.choice(op, tensors, limits)
        if _tracing():
            _record_at_trace_time(self, op, choice, reason)
        else:
            self._count(op, choice, 1)
        return choice

    def _requested_backend(self, op: str) -> str:
        """The backend the flags request for ``op``; a KeyError naming the operators for an unknown one."""
        try:
            return self._requested[op]
        except KeyError:
            raise KeyError(f"unknown operator {op!r}; valid: {list(self._requested)}") from None

    def _unsupported(self, op: str, tensors: Sequence[torch.Tensor], limits: Limits) -> str | None:
        """Why Triton cannot run ``op`` on these tensors: checks of tensor metadata only (traceable); the
        input-independent part was settled in __init__."""
        available, reason = self._static[op]
        return _input_reason(self._modules[op], tensors, self._interpreter, limits) if available else reason

    def _traced_decision(self, op: str, tensors: Sequence[torch.Tensor], limits: Limits = ()) -> tuple[str, str | None]:
        """(backend, fallback reason) without touching the manager's state; raises under ``fallback="error"``."""
        reason = self._unsupported(op, tensors, limits)
        if reason is not None and self.fallback == "error":
            raise TritonUnavailableError(self._fallback_message(op, reason))
        return ("triton" if reason is None else "reference"), reason

    def _decide(self, op: str, tensors: Sequence[torch.Tensor], limits: Limits) -> str:
        choice, reason = self._traced_decision(op, tensors, limits)
        if reason is not None:
            self._note_fallback(op, reason)
        return choice

    @staticmethod
    def _fallback_message(op: str, reason: str) -> str:
        return f"Triton operator '{op}' cannot run: {reason} (model.kernel_fallback=error)"

    def _note_fallback(self, op: str, reason: str) -> None:
        """Log the first fallback of ``op`` and keep its reason for the stats (never inside a trace)."""
        if op not in self._fallback_reason:
            log.warning("Triton operator '%s' cannot run: %s; falling back to the PyTorch reference", op, reason)
        self._fallback_reason[op] = reason

    # ---- counting ---------------------------------------------------------------------------
    def _count(self, op: str, choice: str, times: int) -> None:
        self._calls[op][choice] += times
        if self._regions:
            self._regions[-1][2][(op, choice)] += times

    def _record_traced(self, op: str, choice: str, trace: tuple[object, int] | None = None) -> None:
        (self._regions[-1][1] if self._regions else self._traced).add((op, choice), trace=trace)

    @contextlib.contextmanager
    def region(self, name: str, executes: bool = True) -> Iterator[None]:
        """Count the operator calls of a compiled or captured callable run inside this block.

        The dispatches traced (or captured) during an execution become the region's calls per
        execution; each execution that ran without Python dispatch (compiled code, a graph replay)
        adds them. ``executes=False`` for a block that only captures (a CUDA-graph capture runs nothing).
        The calls per execution belong to the compiled code, which torch.compile shares between models
        whose guards agree (another model of the same flags may have traced it): they are kept per
        region name and flag set, for every manager.
        """
        self._regions.append((name, TraceRecords(), Counter()))
        try:
            yield
        finally:
            _, records, eager = self._regions.pop()
            traced = records.total()
            key = (name, self._flags_key)
            if traced:
                _REGION_TEMPLATES[key] = traced
            if executes and not eager:
                for (op, choice), times in _REGION_TEMPLATES.get(key, Counter()).items():
                    if self._regions and _tracing():
                        self._regions[-1][1].add((op, choice), times)
                    else:
                        self._count(op, choice, times)

    def _timed(self, op: str, impl: Callable, device: torch.device) -> Callable:
        records = self._timings[op]

        def timed(*args, **kwargs):
            if device.type == "cuda":
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = impl(*args, **kwargs)
                stop.record()
                records.append((start, stop))
            else:
                begin = time.perf_counter()
                out = impl(*args, **kwargs)
                records.append((time.perf_counter() - begin) * 1e3)
            return out

        return timed

    # ---- reports ----------------------------------------------------------------------------
    def get_stats(self) -> dict[str, dict]:
        """Per operator: requested backend, calls per backend (see the module docstring), dispatches
        traced outside any region, the fallback reason, and with ``timing`` the forward time in ms."""
        out = {}
        traced = self._traced.total()
        for op, requested in self._requested.items():
            calls = self._calls[op]
            entry = {
                "requested": requested,
                "calls": {backend: int(calls[backend]) for backend in BACKENDS},
                "traced": {backend: int(n) for (name, backend), n in traced.items() if name == op},
                "fallback_reason": self._fallback_reason.get(op),
            }
            if self.timing:
                entry["timing_ms"] = _summarise_times(self._timings[op])
            out[op] = entry
        return out

    def call_counts(self) -> dict[str, dict[str, int]]:
        """Per operator: calls per backend so far, as copies (what :meth:`get_stats` reports under
        "calls", without its other entries: cheap enough to take around every serving request)."""
        return {op: dict(calls) for op, calls in self._calls.items()}

    def fallbacks(self) -> dict[str, str]:
        return dict(self._fallback_reason)

    def report(self) -> str:
        lines = []
        availability = self.get_operator_availability()
        for op, stats in self.get_stats().items():
            info = availability[op]
            calls = stats["calls"]
            lines.append(
                f"{op:38s} requested={stats['requested']:9s} triton_available={str(info['available']):5s} "
                f"({info['reason']}) calls triton={calls['triton']} reference={calls['reference']}"
                + (f" FALLBACK: {stats['fallback_reason']}" if stats["fallback_reason"] else "")
            )
        return "\n".join(lines)


def _summarise_times(records: list) -> dict[str, float] | None:
    if not records:
        return None
    if isinstance(records[0], tuple):
        torch.cuda.synchronize()
        times = [start.elapsed_time(stop) for start, stop in records]
    else:
        times = list(records)
    times.sort()
    return {"count": len(times), "total": sum(times), "median": times[len(times) // 2]}


def _spec(op: str):
    specs = _specs()
    if op not in specs:
        raise KeyError(f"unknown operator {op!r}; valid: {list(specs)}")
    return specs[op]


def _input_reason(module, tensors: Sequence[torch.Tensor], interpreter: bool, limits: Limits = ()) -> str | None:
    """Why the kernel in ``module`` cannot run on these tensors: their devices, then the module's own limits
    (``unsupported_reason(tensors, **dict(limits))``)."""
    devices = {t.device.type for t in tensors}
    if devices != {"cuda"} and not (devices == {"cpu"} and interpreter):
        return f"inputs on {sorted(devices)}; Triton needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
    return module.unsupported_reason(tensors, **dict(limits))


_FUNCTIONS: dict[tuple[str, str, str], Callable] = {}
# (region name, requested backend per operator) -> operator calls per execution of that region.
_REGION_TEMPLATES: dict[tuple[str, tuple], Counter] = {}


def resolve_function(op: str, function: str, backend: str) -> Callable:
    """``hstu_kernels.<reference|triton>.<module>.<function>`` of operator ``op``. Inside a torch.compile
    trace the module must already be imported (the registry imports every reference module; a
    manager imports the Triton modules it was asked for), since a trace cannot import."""
    key = (op, function, backend)
    impl = _FUNCTIONS.get(key)
    if impl is None:
        spec = _spec(op)
        if function not in spec.functions:
            raise KeyError(f"operator {op!r} has no function {function!r}; it has {list(spec.functions)}")
        name = spec.triton_module if backend == "triton" else spec.reference_module
        module = sys.modules.get(name) if torch.compiler.is_compiling() else importlib.import_module(name)
        if module is None:
            raise RuntimeError(f"{name} is not imported: call {function} once outside torch.compile first")
        impl = _FUNCTIONS[key] = getattr(module, function)
    return impl


_default_manager: TritonOperatorManager | None = None


def default_manager() -> TritonOperatorManager:
    """Used when an operator is called with ``backend=None`` outside a model: every operator asks
    for Triton and falls back, with one logged warning, to the reference. ``import hstu_kernels``
    builds it (with the Triton modules it imports), so that a torch.compile trace only reads it."""
    global _default_manager
    if _default_manager is None:
        _default_manager = TritonOperatorManager({op: True for op in _specs()}, fallback="warn")
    return _default_manager


def implementation(op: str, function: str, backend: "str | TritonOperatorManager | None",
                   tensors: Sequence[torch.Tensor], limits: Limits = ()) -> Callable:
    """The function to call for the ``backend=`` argument of a public operator function: a manager's
    choice, the default manager's (None), or the backend forced by name ("triton" raises if it cannot run)."""
    if isinstance(backend, TritonOperatorManager):
        return backend.implementation(op, function, tensors, limits)
    if backend is None:
        return default_manager().implementation(op, function, tensors, limits)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, a TritonOperatorManager or None; got {backend!r}")
    if backend == "triton":
        if torch.compiler.is_compiling():  # metadata only, from the module a trace cannot import (resolve_function)
            module = sys.modules.get(_spec(op).triton_module)
            reason = None if module is None else _input_reason(module, tensors, interpreter_active(), limits)
        else:
            reason = TritonOperatorManager.unsupported_reason(op, tensors, limits)
        if reason is not None:
            raise TritonUnavailableError(f"Triton operator '{op}' cannot run: {reason}")
    return resolve_function(op, function, backend)
