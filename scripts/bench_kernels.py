"""Time the HSTU operators: ours (Triton) against the PyTorch reference, torch.compile of it, and a peer.

    python scripts/bench_kernels.py --op hstu_hierarchical_attention [--shapes 64,1024,4,64 ...]
        [--dtype bf16] [--mode fwd,bwd,fwd+bwd] [--bias none|pos|time|both]
        [--providers triton,reference,compiled,peer] [--backward-thread worker|caller] [--csv BENCHMARKS.csv]

Providers run in this process on the same seeded inputs, except ``peer`` (Meta's generative-recommenders
Triton HSTU attention, imported from the git-ignored ``.peers/generative-recommenders``), which runs in
a child process per shape because a crash there (an illegal memory access) poisons the CUDA context.
Times are medians of ``triton.testing.do_bench`` on CUDA (a perf_counter median on CPU, where Triton
runs in the interpreter). ``bwd`` times the backward alone (graph retained), ``fwd`` a training forward
(inputs require grad). A provider that cannot run (not implemented, OOM, error) gets its reason in the
table and in the CSV. Each operator registers in ``OPERATORS`` its shape fields, default shapes and a
case builder (seeded inputs, how to call each backend, the peer if any, FLOPs or bytes per mode); an
operator without a Triton backend still compares reference and compiled.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
PEER_DIR = REPO / ".peers" / "generative-recommenders"
DEFAULT_CSV = REPO / "BENCHMARKS.csv"
CSV_FIELDS = [
    "date", "op", "provider", "mode", "shape", "dtype", "bias", "call", "backward_thread", "ms", "rate", "rate_unit",
    "card", "torch", "triton", "note",
]
MODES = ("fwd", "bwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BASELINES = ("reference", "compiled", "peer")
PEER_RESULT_TAG = "PEER_RESULT "

if not torch.cuda.is_available():  # Triton kernels can only run interpreted here; set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hstu_kernels  # noqa: E402
from hstu_kernels import reference  # noqa: E402


class ProviderUnavailable(Exception):
    """A provider cannot run this case; the message is the reason shown in the table."""


@dataclass
class Case:
    """Inputs of one benchmark shape and how to call each backend on them."""

    shape: tuple[int, ...]
    call: Callable[[str], torch.Tensor]  # backend name ("triton" / "reference") -> output
    leaves: list[torch.Tensor]  # tensors that receive gradients (reset between timed runs)
    work: dict[str, float]  # mode -> FLOPs or bytes, in units of ``OpSpec.rate_unit``
    peer_call: Callable[[], torch.Tensor] | None = None
    peer_skip_reason: str | None = "no peer implementation of this operator"
    checksum: float = 0.0  # identifies the inputs, to check that the peer's child process saw the same


@dataclass
class OpSpec:
    name: str
    shape_fields: tuple[str, ...]
    default_shapes: list[tuple[int, ...]]
    build: Callable[[tuple[int, ...], torch.dtype, torch.device, argparse.Namespace], Case]  # shape, dtype, device, options
    rate_unit: str = "TFLOP/s"  # or "GB/s"
    modes: tuple[str, ...] = MODES
    uses_bias: bool = False


# ---------------------------------------------------------------------------------------------
# Input helpers
# ---------------------------------------------------------------------------------------------
def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_values(g: torch.Generator, *shape, dtype, device, scale=0.5, requires_grad=True) -> torch.Tensor:
    """Seeded normal values drawn on the CPU (identical on every device and in every process)."""
    x = (torch.randn(*shape, generator=g) * scale).to(dtype=dtype, device=device)
    return x.requires_grad_(requires_grad)


def jagged_lengths(g: torch.Generator, batch: int, max_len: int) -> torch.Tensor:
    """Uniform lengths in [0.5N, N] for N <= 1024 and in [0.9N, N] above (issue 3's target shapes)."""
    low = math.ceil((0.5 if max_len <= 1024 else 0.9) * max_len)
    return torch.randint(low, max_len + 1, (batch,), generator=g)


def offsets_of(lengths: torch.Tensor, device) -> torch.Tensor:
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(device)


def increasing_timestamps(g: torch.Generator, lengths: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_timestamps, k_timestamps) int64: per sequence, event times with log-spread gaps; q = next event."""
    count = int(lengths.sum()) + len(lengths)
    magnitude = torch.pow(10.0, torch.randint(0, 7, (count,), generator=g).double())
    gaps = (torch.rand(count, generator=g, dtype=torch.float64) * magnitude).to(torch.int64)
    q_parts, k_parts, start = [], [], 0
    for n in lengths.tolist():
        times = 1_700_000_000 + gaps[start:start + n + 1].cumsum(0)
        k_parts.append(times[:n])
        q_parts.append(times[1:])
        start += n + 1
    return torch.cat(q_parts).to(device), torch.cat(k_parts).to(device)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# Operators
# ---------------------------------------------------------------------------------------------
def build_attention(shape, dtype, device, options) -> Case:
    """(B, N, H, d): jagged q, k, v [L, H, d]; pos/time bias tables in float32 (model parameters)."""
    batch, max_len, heads, dim = shape
    bias = options.bias
    g = seeded(options.seed)
    lengths = jagged_lengths(g, batch, max_len)
    offsets = offsets_of(lengths, device)
    total = int(lengths.sum())
    q, k, v = (random_values(g, total, heads, dim, dtype=dtype, device=device) for _ in range(3))
    alpha = 1.0 / math.sqrt(dim)
    pos_weight = time_weight = q_ts = k_ts = None
    if bias in ("pos", "both"):
        pos_weight = random_values(g, 2 * max_len - 1, dtype=torch.float32, device=device, scale=0.1)
    if bias in ("time", "both"):
        time_weight = random_values(g, 129, dtype=torch.float32, device=device, scale=0.1)
        q_ts, k_ts = increasing_timestamps(g, lengths, device)
    leaves = [t for t in (q, k, v, pos_weight, time_weight) if t is not None]

    direct = {}  # backend -> function, resolved once per case as a model resolves it once when built

    def call(backend: str) -> torch.Tensor:
        if options.call == "direct":  # the backend itself: no input validation, whose checks sync the GPU
            if backend not in direct:
                direct[backend] = triton_attention((q, k, v)) if backend == "triton" else reference.hstu_attention
            return direct[backend](q, k, v, offsets, max_len, alpha, q_timestamps=q_ts, k_timestamps=k_ts,
                                   pos_weight=pos_weight, time_weight=time_weight)
        return hstu_kernels.hstu_attention(
            q, k, v, offsets, max_len, alpha, q_timestamps=q_ts, k_timestamps=k_ts,
            pos_weight=pos_weight, time_weight=time_weight, backend=backend,
        )

    causal_pairs = float((lengths * (lengths + 1) // 2).sum())
    forward_flops = 4 * causal_pairs * heads * dim  # two matmuls over the causal triangle
    work = {"fwd": forward_flops, "bwd": 2.5 * forward_flops, "fwd+bwd": 3.5 * forward_flops}

    def peer_call() -> torch.Tensor:
        return peer_attention()(N=max_len, alpha=alpha, q=q, k=k, v=v, seq_offsets=offsets)

    peer_skip = None if bias == "none" else "the peer has no relative attention bias (runs with --bias none only)"

    checksum = float(sum(t.detach().double().sum() for t in leaves))
    return Case(tuple(shape), call, leaves, work, peer_call if peer_skip is None else None, peer_skip, checksum)


def build_attention_output(shape, dtype, device, options) -> Case:
    """(B, N, D, HDV): x + Dropout(LayerNorm(attn) * u) @ W.T + b over the jagged tokens."""
    batch, max_len, model_dim, attn_dim = shape
    g = seeded(options.seed)
    total = int(jagged_lengths(g, batch, max_len).sum())
    x = random_values(g, total, model_dim, dtype=dtype, device=device)
    attn, u = (random_values(g, total, attn_dim, dtype=dtype, device=device) for _ in range(2))
    weight = random_values(g, model_dim, attn_dim, dtype=dtype, device=device, scale=0.02)
    bias_vec = random_values(g, model_dim, dtype=dtype, device=device, scale=0.02)
    leaves = [x, attn, u, weight, bias_vec]

    def call(backend: str) -> torch.Tensor:
        return hstu_kernels.attention_output(x, attn, u, weight, bias_vec, dropout_p=0.2, training=True, seed=0, backend=backend)

    flops = 2.0 * total * model_dim * attn_dim
    return Case(tuple(shape), call, leaves, {"fwd": flops, "bwd": 2 * flops, "fwd+bwd": 3 * flops})


TIME_SCALES = [(3600, 24), (86400, 30), (604800, 52)]  # the multi-scale experiment config: hour, day, week


def build_sequence_fusion(shape, dtype, device, options) -> Case:
    """(B, N, D, items): item gather * sqrt(D) + position + hour/day/week time embeddings, dropout."""
    batch, max_len, dim, num_items = shape
    g = seeded(options.seed)
    lengths = jagged_lengths(g, batch, max_len)
    total = int(lengths.sum())
    item_ids = torch.randint(0, num_items, (total,), generator=g).to(device)
    _, timestamps = increasing_timestamps(g, lengths, device)
    offsets = offsets_of(lengths, device)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device)
    pos_table = random_values(g, max_len, dim, dtype=dtype, device=device)
    time_tables = [random_values(g, n, dim, dtype=dtype, device=device) for _, n in TIME_SCALES]

    def call(backend: str) -> torch.Tensor:
        return hstu_kernels.sequence_fusion(
            item_ids, timestamps, offsets, item_table, pos_table, time_tables, scale=math.sqrt(dim),
            time_scales=TIME_SCALES, dropout_p=0.2, training=True, seed=0, backend=backend,
        )

    # Rows gathered (item, position, 3 time tables) and written, per token.
    moved = total * dim * element_size(dtype) * (2 + len(TIME_SCALES) + 1)
    return Case(tuple(shape), call, [item_table, pos_table, *time_tables], {"fwd": moved, "bwd": 2 * moved, "fwd+bwd": 3 * moved})


def build_sampled_softmax(shape, dtype, device, options) -> Case:
    """(M, D, R, items): sampled softmax over M rows with R shared-per-row negatives."""
    rows, dim, negatives, num_items = shape
    g = seeded(options.seed)
    states = random_values(g, rows, dim, dtype=dtype, device=device)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device)
    pos_ids = torch.randint(0, num_items, (rows,), generator=g).to(device)
    neg_ids = torch.randint(0, num_items, (rows, negatives), generator=g).to(device)

    def call(backend: str) -> torch.Tensor:
        return hstu_kernels.sampled_softmax_loss(states, pos_ids, neg_ids, item_table, temperature=0.05, backend=backend)

    moved = rows * (negatives + 2) * dim * element_size(dtype)  # gathered item rows + states
    return Case(tuple(shape), call, [states, item_table], {"fwd": moved, "bwd": 2 * moved, "fwd+bwd": 3 * moved})


def build_topk(shape, dtype, device, options) -> Case:
    """(B, D, items, K): score every item for B queries, mask 50 seen items each, keep the top K."""
    queries_n, dim, num_items, top = shape
    g = seeded(options.seed)
    queries = random_values(g, queries_n, dim, dtype=dtype, device=device, requires_grad=False)
    item_table = random_values(g, num_items, dim, dtype=dtype, device=device, requires_grad=False)
    seen = min(50, num_items - 1)
    exclude_ids = torch.randint(0, num_items, (queries_n * seen,), generator=g).to(device)
    exclude_offsets = torch.arange(0, queries_n * seen + 1, seen).to(device)
    target_ids = torch.randint(0, num_items, (queries_n,), generator=g).to(device)

    def call(backend: str) -> torch.Tensor:
        scores, _, _ = hstu_kernels.topk_items(
            queries, item_table, top, exclude_ids=exclude_ids, exclude_offsets=exclude_offsets,
            target_ids=target_ids, backend=backend,
        )
        return scores

    return Case(tuple(shape), call, [], {"fwd": 2.0 * queries_n * num_items * dim})


OPERATORS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in [
        OpSpec(
            "hstu_hierarchical_attention", ("B", "N", "H", "d"),
            [(64, 1024, 4, 64), (16, 4096, 4, 64), (8, 8192, 4, 64), (16, 4096, 4, 128), (8, 8192, 4, 128),
             (128, 200, 2, 25), (128, 200, 1, 50), (128, 200, 2, 32), (128, 200, 4, 64)],
            build_attention, uses_bias=True,
        ),
        OpSpec("fused_attention_layernorm", ("B", "N", "D", "HDV"),
               [(128, 200, 50, 50), (64, 1024, 256, 256), (32, 4096, 512, 512)], build_attention_output),
        OpSpec("hierarchical_sequence_fusion", ("B", "N", "D", "items"),
               [(128, 200, 50, 3706), (64, 1024, 256, 1_000_000)], build_sequence_fusion, rate_unit="GB/s"),
        OpSpec("sequence_recommendation_interaction", ("M", "D", "R", "items"),
               [(25600, 50, 128, 3706), (65536, 256, 128, 1_000_000)], build_sampled_softmax, rate_unit="GB/s"),
        OpSpec("interaction", ("B", "D", "items", "K"),
               [(128, 50, 3706, 200), (1024, 256, 1_000_000, 200)], build_topk, modes=("fwd",)),
    ]
}


def triton_attention(tensors: Sequence[torch.Tensor]) -> Callable:
    """Our Triton attention function, or ProviderUnavailable with the manager's reason."""
    reason = hstu_kernels.TritonOperatorManager.unsupported_reason("hstu_hierarchical_attention", tensors)
    if reason is not None:
        raise ProviderUnavailable(reason)
    from hstu_kernels.triton.hstu_attention import hstu_attention_triton

    return hstu_attention_triton


# ---------------------------------------------------------------------------------------------
# The peer (black box: called through its public entry point only)
# ---------------------------------------------------------------------------------------------
def peer_attention() -> Callable:
    """Meta's ``triton_hstu_mha`` from .peers/generative-recommenders (jagged, causal, no bias)."""
    if not PEER_DIR.is_dir():
        raise ProviderUnavailable(f"peer not checked out at {PEER_DIR}")
    if str(PEER_DIR) not in sys.path:
        sys.path.insert(0, str(PEER_DIR))
    try:
        from generative_recommenders.ops.triton.triton_hstu_attention import triton_hstu_mha
    except Exception as exc:  # missing optional dependencies of the peer, API moved, ...
        raise ProviderUnavailable(f"cannot import the peer: {type(exc).__name__}: {exc}") from exc
    return triton_hstu_mha


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], leaves: Sequence[torch.Tensor], warmup_ms: float, rep_ms: float) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(leaves), return_mode="median")
    return cpu_median_ms(fn, leaves, warmup_ms, rep_ms)


def cpu_median_ms(fn, leaves, warmup_ms, rep_ms) -> float:
    """do_bench's protocol with a wall clock: a first call, five to estimate, warm up, then the median.
    A smoke test of the harness more than a measurement: one thread, since on a busy 2-core machine
    OpenMP threads waiting on each other turn a 0.2 ms call into tens of ms."""
    torch.set_num_threads(1)
    fn()
    start = time.perf_counter()
    for _ in range(5):
        fn()
    estimate = max((time.perf_counter() - start) * 1e3 / 5, 1e-3)
    for _ in range(max(3, int(warmup_ms / estimate))):
        fn()
    times = []
    for _ in range(max(1, int(rep_ms / estimate))):
        for t in leaves:
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(torch.tensor(times).median())


def timed_function(forward: Callable[[], torch.Tensor], mode: str) -> Callable[[], object]:
    """The callable to time for ``mode``: forward, backward alone (graph retained), or both."""
    if mode == "fwd":
        return forward
    if mode == "bwd":
        retained = forward()
        grad = torch.randn_like(retained)
        return lambda: retained.backward(grad, retain_graph=True)
    grad = torch.randn_like(forward().detach())
    return lambda: forward().backward(grad)


def provider_forward(case: Case, provider: str, compile_mode: str) -> Callable[[], torch.Tensor]:
    if provider in ("triton", "reference"):
        return lambda: case.call(provider)
    if provider == "compiled":
        compiled = torch.compile(lambda: case.call("reference"), dynamic=False, mode=compile_mode)
        return compiled
    if provider == "peer":
        if case.peer_call is None:
            raise ProviderUnavailable(case.peer_skip_reason)
        peer_attention()
        return case.peer_call
    raise ValueError(f"unknown provider {provider!r}; valid: triton, reference, compiled, peer")


def short_error(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160] if text else ''}"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class Result:
    provider: str
    mode: str
    ms: float | None = None
    note: str = ""
    max_diff: float | None = None  # max |out - out_reference| of the first forward


def run_provider(case: Case, provider: str, modes: Sequence[str], args, reference_out) -> tuple[list[Result], torch.Tensor | None]:
    """Time one provider in every mode; a failure becomes the reason of each remaining mode.
    Returns the results and the provider's first (detached) output."""
    results, first_out = [], None
    try:
        forward = provider_forward(case, provider, args.compile_mode)
        first_out = forward().detach()
        max_diff = None
        if reference_out is not None and first_out.shape == reference_out.shape:
            max_diff = (first_out.float() - reference_out.float()).abs().max().item() if first_out.numel() else 0.0
        for mode in modes:
            ms = median_ms(timed_function(forward, mode), case.leaves, args.warmup, args.rep)
            results.append(Result(provider, mode, ms, max_diff=max_diff))
            free_memory()
    except Exception as exc:  # a provider that cannot run is reported, not fatal
        reason = str(exc) if isinstance(exc, ProviderUnavailable) else short_error(exc)
        done = {r.mode for r in results}
        results += [Result(provider, mode, note=reason) for mode in modes if mode not in done]
    free_memory()
    return results, first_out


def run_peer_in_child(spec: OpSpec, shape, args, modes, case: Case) -> list[Result]:
    """Run the peer for one shape in a fresh process; its crash cannot touch this process's CUDA context."""
    if case.peer_call is None:
        return [Result("peer", mode, note=case.peer_skip_reason) for mode in modes]
    command = [
        sys.executable, str(Path(__file__).resolve()), "--op", spec.name, "--shapes", ",".join(map(str, shape)),
        "--dtype", args.dtype, "--bias", args.bias, "--mode", ",".join(modes), "--seed", str(args.seed),
        "--warmup", str(args.warmup), "--rep", str(args.rep), "--call", args.call,
        "--backward-thread", args.backward_thread, "--peer-worker",
    ]
    try:
        child = subprocess.run(command, capture_output=True, text=True, timeout=args.peer_timeout)
    except subprocess.TimeoutExpired:
        return [Result("peer", mode, note=f"peer process timed out after {args.peer_timeout} s") for mode in modes]
    reports = [json.loads(line[len(PEER_RESULT_TAG):]) for line in child.stdout.splitlines() if line.startswith(PEER_RESULT_TAG)]
    if not reports:
        last = (child.stderr.strip().splitlines() or ["no output"])[-1][:160]
        return [Result("peer", mode, note=f"peer process exited {child.returncode}: {last}") for mode in modes]
    results = []
    for report in reports:
        note = report["note"]
        if report["checksum"] != case.checksum:
            note = f"inputs differ from the parent's (checksum {report['checksum']} vs {case.checksum}); " + note
        results.append(Result("peer", report["mode"], report["ms"], note, report["max_diff"]))
    return results


def peer_worker(spec: OpSpec, shape, args, modes) -> None:
    """Child side of run_peer_in_child: time the peer, print one tagged JSON line per mode.
    max_diff is against our Triton output when that runs here (a check that the peer is called right)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = spec.build(shape, DTYPES[args.dtype], device, args)
    try:
        with torch.no_grad():
            ours = case.call("triton")
    except Exception:  # our kernel unavailable here: no cross-check
        ours = None
    results, _ = run_provider(case, "peer", modes, args, ours)
    for result in results:
        print(PEER_RESULT_TAG + json.dumps({"mode": result.mode, "ms": result.ms, "note": result.note,
                                            "max_diff": result.max_diff, "checksum": case.checksum}), flush=True)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------
def card_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()} (Triton interpreter)"


def library_versions() -> tuple[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return torch.__version__, triton_version


def rate_of(spec: OpSpec, work: dict[str, float], mode: str, ms: float | None) -> float | None:
    if ms is None or mode not in work:
        return None
    scale = 1e12 if spec.rate_unit == "TFLOP/s" else 1e9
    return work[mode] / (ms * 1e-3) / scale


def speedup_note(results: list[Result], result: Result) -> str:
    """For a baseline row: how many times faster ours (triton) is in the same mode."""
    ours = next((r for r in results if r.provider == "triton" and r.mode == result.mode and r.ms), None)
    if result.provider not in BASELINES or ours is None or result.ms is None:
        return ""
    return f"{result.ms / ours.ms:.3g}x"


def shape_label(spec: OpSpec, shape) -> str:
    return "x".join(map(str, shape))


def print_table(spec: OpSpec, rows: list[tuple[str, dict[str, float], list[Result]]], args) -> None:
    header = ["shape " + "x".join(spec.shape_fields), "mode", "provider", "ms", spec.rate_unit,
              "triton speed-up", "max|diff| vs reference", "note"]
    lines = []
    for label, work, results in rows:
        for r in results:
            rate = rate_of(spec, work, r.mode, r.ms)
            lines.append([
                label, r.mode, r.provider, f"{r.ms:.4f}" if r.ms else "-", f"{rate:.4g}" if rate else "-",
                speedup_note(results, r), f"{r.max_diff:.2e}" if r.max_diff is not None else "", r.note,
            ])
    title = f"{spec.name} | {args.dtype} | bias={args.bias if spec.uses_bias else '-'} | call={args.call} | {card_name()}"
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for column in header:
            table.add_column(column, overflow="fold")
        for line in lines:
            table.add_row(*line)
        Console(width=200).print(table)
    except ImportError:
        print(title)
        for line in [header] + lines:
            print(" | ".join(line))


def append_csv(path: Path, spec: OpSpec, rows, args) -> None:
    torch_version, triton_version = library_versions()
    card, today = card_name(), datetime.date.today().isoformat()
    new_file = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new_file:
            writer.writeheader()
        for label, work, results in rows:
            for r in results:
                rate = rate_of(spec, work, r.mode, r.ms)
                writer.writerow({
                    "date": today, "op": spec.name, "provider": r.provider, "mode": r.mode, "shape": label,
                    "dtype": args.dtype, "bias": args.bias if spec.uses_bias else "-", "call": args.call,
                    "backward_thread": args.backward_thread, "ms": f"{r.ms:.5f}" if r.ms else "", "rate": f"{rate:.5g}" if rate else "",
                    "rate_unit": spec.rate_unit, "card": card, "torch": torch_version, "triton": triton_version,
                    "note": r.note,
                })


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True, choices=sorted(OPERATORS))
    parser.add_argument("--shapes", nargs="+", help="comma-separated shapes in the op's fields (default: its target list)")
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--mode", default="fwd,bwd,fwd+bwd", help="comma-separated subset of fwd, bwd, fwd+bwd")
    parser.add_argument("--bias", default="none", choices=["none", "pos", "time", "both"], help="attention only")
    parser.add_argument("--providers", default="triton,reference,compiled,peer")
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="file to append rows to ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=float, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--call", default="api", choices=["api", "direct"],
                        help="api: hstu_kernels.<op>(backend=...), whose input checks sync the GPU each call; "
                             "direct: the backend function itself (attention only), as a compiled model runs it")
    parser.add_argument("--backward-thread", default="worker", choices=["worker", "caller"],
                        help="worker: autograd's CUDA device thread runs the backward (PyTorch's default); caller: "
                             "the calling thread does (torch.autograd.set_multithreading_enabled(False)), as the "
                             "training loop does by default (model.backward_on_caller_thread)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the 'compiled' provider")
    parser.add_argument("--peer-timeout", type=int, default=900, help="seconds for the peer's child process per shape")
    parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_shapes(spec: OpSpec, texts: Sequence[str] | None) -> list[tuple[int, ...]]:
    if not texts:
        return spec.default_shapes
    shapes = []
    for text in texts:
        shape = tuple(int(part) for part in text.split(","))
        if len(shape) != len(spec.shape_fields):
            raise SystemExit(f"--shapes {text!r}: {spec.name} takes {','.join(spec.shape_fields)}")
        shapes.append(shape)
    return shapes


def parse_modes(spec: OpSpec, text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--mode {text!r}: unknown {unknown}; valid: {', '.join(MODES)}")
    return [m for m in modes if m in spec.modes]


def main(argv: Sequence[str] | None = None) -> list[tuple[str, dict[str, float], list[Result]]]:
    args = parse_args(argv)
    # Autograd's threading is thread-local state: set for this (single-threaded) harness, restored after.
    with torch.autograd.set_multithreading_enabled(args.backward_thread == "worker"):
        return run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> list[tuple[str, dict[str, float], list[Result]]]:
    spec = OPERATORS[args.op]
    shapes, modes = parse_shapes(spec, args.shapes), parse_modes(spec, args.mode)
    if args.peer_worker:
        peer_worker(spec, shapes[0], args, modes)
        return []
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    # The reference first: its output is what the others' max|diff| is measured against.
    providers.sort(key=lambda p: (p != "reference", p == "peer"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for shape in shapes:
        case = spec.build(shape, DTYPES[args.dtype], device, args)
        results, reference_out = [], None
        for provider in providers:
            if provider == "peer":
                results += run_peer_in_child(spec, shape, args, modes, case)
                continue
            provider_results, first_out = run_provider(case, provider, modes, args, reference_out)
            results += provider_results
            if provider == "reference":
                reference_out = first_out
            del first_out
        rows.append((shape_label(spec, shape), case.work, results))
        if args.csv:  # each shape as soon as it is timed: a run cut off by a time limit keeps what it measured
            append_csv(Path(args.csv), spec, rows[-1:], args)
        del case, reference_out
        free_memory()
    print_table(spec, rows, args)
    return rows


if __name__ == "__main__":
    main()
