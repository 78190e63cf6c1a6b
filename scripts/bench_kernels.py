"""Time the HSTU operators: ours (Triton) against the PyTorch reference, plain eager ops, torch.compile, and a peer.

    python scripts/bench_kernels.py --op hstu_hierarchical_attention [--shapes 64,1024,4,64 ...]
        [--dtype bf16] [--mode fwd,bwd,fwd+bwd] [--bias none|pos|time|both] [--call api|api-unchecked|direct]
        [--providers triton,reference,eager,compiled,peer,copy] [--backward-thread worker|caller] [--csv BENCHMARKS.csv]

Providers run in this process on the same seeded inputs, except ``peer`` (Meta's generative-recommenders
Triton HSTU attention, imported from the git-ignored ``.peers/generative-recommenders``), which runs in
a child process per shape because a crash there (an illegal memory access) poisons the CUDA context.
Times are medians of ``triton.testing.do_bench`` on CUDA (a perf_counter median on CPU, where Triton
runs in the interpreter). ``bwd`` times the backward alone (graph retained), ``fwd`` a training forward
(inputs require grad); a backward computes the inputs' gradients with ``torch.autograd.grad``, never
accumulating them into ``.grad``. A provider that cannot run (not implemented, OOM, error) gets its
reason in the table and in the CSV; the script then exits non-zero if that provider is ``triton`` and
it raised (rather than being unavailable here). The operators and their cases come from the registry
(``hstu_kernels.registry``): each spec's ``bench`` holds its shape fields, target shapes and a case
builder (seeded inputs, how to call each backend, the peer's inputs if any, FLOPs or bytes per mode); an
operator without a Triton backend still compares its baselines.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
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
    "card", "torch", "triton", "note", "variant", "peak_mb", "kernel_ms",
]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PROVIDERS = ("triton", "reference", "eager", "compiled", "peer", "copy")
BASELINES = ("reference", "eager", "compiled", "peer")
PEER_RESULT_TAG = "PEER_RESULT "

if not torch.cuda.is_available():  # Triton kernels can only run interpreted here; set before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hstu_kernels  # noqa: E402
from hstu_kernels.benchmarking import ProviderUnavailable  # noqa: E402
from hstu_kernels.manager import TritonUnavailableError  # noqa: E402
from hstu_kernels.spec import MODES, BenchCase, OperatorSpec  # noqa: E402


OPERATORS = hstu_kernels.REGISTRY


# ---------------------------------------------------------------------------------------------
# The peer (black box: called through its public entry point only)
# ---------------------------------------------------------------------------------------------
def peer_attention() -> Callable:
    """Meta's ``triton_hstu_mha`` from .peers/generative-recommenders (jagged, causal, no bias), called
    with a case's ``peer_inputs``."""
    if not PEER_DIR.is_dir():
        raise ProviderUnavailable(f"peer not checked out at {PEER_DIR}")
    if str(PEER_DIR) not in sys.path:
        sys.path.insert(0, str(PEER_DIR))
    try:
        from generative_recommenders.ops.triton.triton_hstu_attention import triton_hstu_mha
    except Exception as exc:  # missing optional dependencies of the peer, API moved, ...
        raise ProviderUnavailable(f"cannot import the peer: {type(exc).__name__}: {exc}") from exc
    return lambda max_seq_len, alpha, q, k, v, seq_offsets: triton_hstu_mha(
        N=max_seq_len, alpha=alpha, q=q, k=k, v=v, seq_offsets=seq_offsets)


PEERS = {"hstu_hierarchical_attention": peer_attention}  # operator -> loader of its peer's entry point


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    if torch.cuda.is_available():
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return cpu_median_ms(fn, warmup_ms, rep_ms)


def cpu_median_ms(fn, warmup_ms, rep_ms) -> float:
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
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return float(torch.tensor(times).median())


def timed_function(forward: Callable[[], torch.Tensor], mode: str,
                   leaves: Sequence[torch.Tensor]) -> Callable[[], object]:
    """The callable to time for ``mode``: forward, backward alone (graph retained), or both.

    The backward returns the gradients of ``leaves`` (``torch.autograd.grad``) as the operator makes them,
    as a model's autograd hands them on: accumulated into ``.grad``, a gradient whose layout differs
    from its input's (the output side's aligned rows at widths that are not multiples of 8) would be
    copied, a cost of the harness and not of the operator. A backward that reaches none of ``leaves``
    would time nothing: ProviderUnavailable."""
    if mode == "fwd":
        return forward
    inputs = [t for t in leaves if t.requires_grad]
    out = forward()
    grad = torch.randn_like(out.detach())
    retain = mode == "bwd"
    if all(g is None for g in torch.autograd.grad(out, inputs, grad, retain_graph=retain, allow_unused=True)):
        raise ProviderUnavailable("its backward reaches none of the case's inputs")
    if retain:
        return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(forward(), inputs, grad, allow_unused=True)


def provider_forward(spec: OperatorSpec, case: BenchCase, provider: str, compile_mode: str) -> Callable[[], torch.Tensor]:
    """``eager`` is the operator in plain PyTorch ops where the case defines that form (e.g. torch's own
    dropout instead of the seeded one); ``compiled`` is torch.compile of the eager form, else of the reference."""
    if provider in ("triton", "reference"):
        return lambda: case.call(provider)
    if provider == "eager":
        if case.eager_call is None:
            raise ProviderUnavailable("no eager form apart from the reference")
        return case.eager_call
    if provider == "compiled":
        eager = case.eager_call or (lambda: case.call("reference"))
        # Each case compiles afresh: cases share their eager function, and past dynamo's recompile limit
        # (8 shapes) a compiled call silently runs eagerly.
        torch.compiler.reset()
        return torch.compile(eager, dynamic=False, mode=compile_mode)
    if provider == "copy":
        return copy_of_same_bytes(spec, case)
    if provider == "peer":
        if case.peer_inputs is None:
            raise ProviderUnavailable(case.peer_skip_reason)
        if spec.key not in PEERS:
            raise ProviderUnavailable("no peer implementation of this operator")
        peer = PEERS[spec.key]()
        return lambda: peer(**case.peer_inputs)
    raise ValueError(f"unknown provider {provider!r}; valid: {', '.join(PROVIDERS)}")


def copy_of_same_bytes(spec: OperatorSpec, case: BenchCase) -> Callable[[], torch.Tensor]:
    """A device copy that reads and writes as many bytes as the case's forward moves: the bandwidth
    a memory-bound kernel is held against (timed in fwd mode only; its rate column is copy GB/s)."""
    if spec.bench.rate_unit != "GB/s":
        raise ProviderUnavailable("copy bandwidth applies to memory-bound operators (GB/s)")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    source = torch.empty(int(case.work["fwd"] // 2), dtype=torch.uint8, device=device).random_()
    target = torch.empty_like(source)
    return lambda: target.copy_(source)


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
    peak_mb: float | None = None  # device memory allocated beyond the inputs during one timed call (CUDA)
    kernel_ms: float | None = None  # GPU kernel time per call from the profiler (--kernel-time), against ms (wall)
    kernels: list[KernelShare] | None = None  # its kernels, longest first (--kernel-breakdown)
    failed: bool = False  # it raised an error that fails the run (``run_provider`` says which)


@dataclass
class KernelShare:
    """One GPU kernel's part of a call: its name, its time and its launches per call."""
    name: str
    ms: float
    launches: float


def profiled_kernels(fn: Callable[[], object], calls: int = 20) -> list[KernelShare] | None:
    """The GPU kernels of one call from torch.profiler (CUDA only), longest first. Their summed time, with
    ``ms`` (events around back-to-back calls), tells host-bound calls (ms >> kernel ms) from GPU-bound ones."""
    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    by_name: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_name.setdefault(event.name, []).append(event.device_time)
    shares = [KernelShare(name, sum(times) / 1e3 / calls, len(times) / calls) for name, times in by_name.items()]
    return sorted(shares, key=lambda share: -share.ms)


def extra_peak_mb(fn: Callable[[], object]) -> float | None:
    """Peak device memory one call allocates beyond what was allocated before it, in MB (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def run_provider(spec: OperatorSpec, case: BenchCase, provider: str, modes: Sequence[str], args,
                 reference_out) -> tuple[list[Result], torch.Tensor | None]:
    """Time one provider in every mode; a failure becomes the reason of each remaining mode.
    Returns the results and the provider's first (detached) output."""
    results, first_out = [], None
    try:
        forward = provider_forward(spec, case, provider, args.compile_mode)
        first_out = forward().detach()
        max_diff = None
        if provider != "copy" and reference_out is not None and first_out.shape == reference_out.shape:
            max_diff = (first_out.float() - reference_out.float()).abs().max().item() if first_out.numel() else 0.0
        for mode in modes if provider != "copy" else [m for m in modes if m == "fwd"]:
            timed = timed_function(forward, mode, case.leaves)
            ms = median_ms(timed, args.warmup, args.rep)
            kernels = profiled_kernels(timed) if args.kernel_time else None
            results.append(Result(provider, mode, ms, max_diff=max_diff, peak_mb=extra_peak_mb(timed),
                                  kernel_ms=sum(k.ms for k in kernels) if kernels is not None else None,
                                  kernels=kernels))
            free_memory()
    except Exception as exc:  # a provider that cannot run is reported, not fatal
        unavailable = isinstance(exc, (ProviderUnavailable, TritonUnavailableError))
        # A baseline out of memory is a finding (eager's [M, I] logits at 1M items, say); ours out of memory
        # breaks its memory bound, and any other error is a broken run whichever provider raised it.
        finding = provider != "triton" and isinstance(exc, torch.OutOfMemoryError)
        reason = str(exc) if isinstance(exc, ProviderUnavailable) else short_error(exc)
        done = {r.mode for r in results}
        results += [Result(provider, mode, note=reason, failed=not (unavailable or finding))
                    for mode in modes if mode not in done]
    free_memory()
    return results, first_out


def run_peer_in_child(spec: OperatorSpec, shape, args, modes, case: BenchCase) -> list[Result]:
    """Run the peer for one shape in a fresh process; its crash cannot touch this process's CUDA context."""
    if case.peer_inputs is None:
        return [Result("peer", mode, note=case.peer_skip_reason) for mode in modes]
    command = [
        sys.executable, str(Path(__file__).resolve()), "--op", spec.key, "--shapes", ",".join(map(str, shape)),
        "--dtype", args.dtype, "--bias", args.bias, "--mode", ",".join(modes), "--seed", str(args.seed),
        "--warmup", str(args.warmup), "--rep", str(args.rep), "--call", args.call, "--variant", args.variant,
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


def build_case(spec: OperatorSpec, shape, args, device: torch.device) -> BenchCase:
    """The op's case at ``shape``. An op takes --variant if its case builder reads ``variant`` (and
    then checks the name itself); a --variant given to one that never reads it is refused. Only that
    one read is watched: the case's calls read the other options as plain attributes."""
    read = []

    class Options(argparse.Namespace):
        @property
        def variant(self) -> str:
            read.append(True)
            return args.variant

    options = Options(**{name: value for name, value in vars(args).items() if name != "variant"})
    case = spec.bench.build(shape, DTYPES[args.dtype], device, options)
    if args.variant and not read:
        raise SystemExit(f"--variant {args.variant!r}: {spec.key} takes no --variant")
    return case


def peer_worker(spec: OperatorSpec, shape, args, modes) -> None:
    """Child side of run_peer_in_child: time the peer, print one tagged JSON line per mode.
    max_diff is against our Triton output when that runs here (a check that the peer is called right)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = build_case(spec, shape, args, device)
    try:
        with torch.no_grad():
            ours = case.call("triton")
    except Exception:  # our kernel unavailable here: no cross-check
        ours = None
    results, _ = run_provider(spec, case, "peer", modes, args, ours)
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


def rate_of(spec: OperatorSpec, work: dict[str, float], mode: str, ms: float | None) -> float | None:
    if ms is None or mode not in work:
        return None
    scale = 1e12 if spec.bench.rate_unit == "TFLOP/s" else 1e9
    return work[mode] / (ms * 1e-3) / scale


def speedup_note(results: list[Result], result: Result) -> str:
    """For a baseline row: how many times faster ours (triton) is in the same mode."""
    ours = next((r for r in results if r.provider == "triton" and r.mode == result.mode and r.ms), None)
    if result.provider not in BASELINES or ours is None or result.ms is None:
        return ""
    return f"{result.ms / ours.ms:.3g}x"


def shape_label(spec: OperatorSpec, shape) -> str:
    return "x".join(map(str, shape))


def print_table(spec: OperatorSpec, rows: list[tuple[str, dict[str, float], list[Result]]], args) -> None:
    header = ["shape " + "x".join(spec.bench.shape_fields), "mode", "provider", "ms", spec.bench.rate_unit,
              "triton speed-up", "max|diff| vs reference", "peak MB", "kernel ms", "note"]
    lines = []
    for label, work, results in rows:
        for r in results:
            rate = rate_of(spec, work, r.mode, r.ms)
            lines.append([
                label, r.mode, r.provider, f"{r.ms:.4f}" if r.ms else "-", f"{rate:.4g}" if rate else "-",
                speedup_note(results, r), f"{r.max_diff:.2e}" if r.max_diff is not None else "",
                f"{r.peak_mb:.1f}" if r.peak_mb is not None else "",
                f"{r.kernel_ms:.4f}" if r.kernel_ms is not None else "", r.note,
            ])
    variant = f" | variant={args.variant}" if args.variant else ""
    title = (f"{spec.key}{variant} | {args.dtype} | bias={args.bias if spec.bench.uses_bias else '-'} | call={args.call} "
             f"| {card_name()}")
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


def print_kernel_breakdown(rows: list[tuple[str, dict[str, float], list[Result]]], top: int) -> None:
    """The ``top`` longest kernels of each profiled call: where its kernel time goes."""
    for label, _, results in rows:
        for r in results:
            if not r.kernels:
                continue
            print(f"\n{label} {r.mode} {r.provider}: {r.kernel_ms:.4f} ms in {sum(k.launches for k in r.kernels):g} "
                  f"launches a call")
            for share in r.kernels[:top]:
                print(f"  {share.ms * 1e3:9.1f} us {share.ms / r.kernel_ms:6.1%} x{share.launches:g}  {share.name[:110]}")
            rest = r.kernels[top:]
            if rest:
                print(f"  {sum(k.ms for k in rest) * 1e3:9.1f} us in {len(rest)} other kernels")


def append_csv(path: Path, spec: OperatorSpec, rows, args) -> None:
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
                    "date": today, "op": spec.key, "provider": r.provider, "mode": r.mode, "shape": label,
                    "dtype": args.dtype, "bias": args.bias if spec.bench.uses_bias else "-", "call": args.call,
                    "backward_thread": args.backward_thread, "ms": f"{r.ms:.5f}" if r.ms else "", "rate": f"{rate:.5g}" if rate else "",
                    "rate_unit": spec.bench.rate_unit, "card": card, "torch": torch_version, "triton": triton_version,
                    "note": r.note, "variant": args.variant,
                    "peak_mb": f"{r.peak_mb:.1f}" if r.peak_mb is not None else "",
                    "kernel_ms": f"{r.kernel_ms:.5f}" if r.kernel_ms is not None else "",
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
    parser.add_argument("--providers", default=",".join(PROVIDERS))
    parser.add_argument("--csv", default=str(DEFAULT_CSV), help="file to append rows to ('' for none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=float, default=25, help="do_bench warmup, ms")
    parser.add_argument("--rep", type=float, default=100, help="do_bench repetition time, ms")
    parser.add_argument("--call", default="api", choices=["api", "api-unchecked", "direct"],
                        help="api: hstu_kernels.<op>(backend=...) with its input checks, some of which read the "
                             "device each call; api-unchecked: the same with validate=False, as the model calls it; "
                             "direct: the backend function itself (the operators whose bench cases have one: "
                             f"{', '.join(op for op, spec in OPERATORS.items() if spec.bench.direct_call)}), as a "
                             "compiled model runs it")
    parser.add_argument("--backward-thread", default="worker", choices=["worker", "caller"],
                        help="worker: autograd's CUDA device thread runs the backward (PyTorch's default); caller: "
                             "the calling thread does (torch.autograd.set_multithreading_enabled(False)), as the "
                             "training loop does by default (model.backward_on_caller_thread)")
    parser.add_argument("--compile-mode", default="default", help="torch.compile mode of the 'compiled' provider")
    parser.add_argument("--kernel-time", action="store_true",
                        help="also profile the GPU kernel time per call (kernel ms column), to compare with wall ms")
    parser.add_argument("--kernel-breakdown", type=int, default=0, metavar="N",
                        help="with --kernel-time: after the table, the N longest kernels of each timed call "
                             "(ms and launches per call)")
    parser.add_argument("--variant", default="", help="a part of the operator that its bench cases can time alone "
                                                       "(named in the operator's ops module); '' for the whole operator")
    parser.add_argument("--peer-timeout", type=int, default=900, help="seconds for the peer's child process per shape")
    parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_shapes(spec: OperatorSpec, texts: Sequence[str] | None) -> list[tuple[int, ...]]:
    """Each of --shapes as the op's fields: integers >= 1, or >= 0 in a field that the op's own target
    shapes set to 0 (the full softmax's R)."""
    if not texts:
        return list(spec.bench.default_shapes)
    fields = spec.bench.shape_fields
    zero_allowed = {i for shape in spec.bench.default_shapes for i, size in enumerate(shape) if size == 0}
    shapes = []
    for text in texts:
        parts = text.split(",")
        if len(parts) != len(fields):
            raise SystemExit(f"--shapes {text!r}: {spec.key} takes {','.join(fields)}")
        for i, (field, part) in enumerate(zip(fields, parts)):
            lowest = 0 if i in zero_allowed else 1
            if not (part.strip().isdecimal() and int(part) >= lowest):
                raise SystemExit(f"--shapes {text!r}: {field} must be an integer >= {lowest}, got {part!r}")
        shapes.append(tuple(int(part) for part in parts))
    return shapes


def parse_modes(spec: OperatorSpec, text: str) -> list[str]:
    modes = [m for m in text.split(",") if m]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"--mode {text!r}: unknown {unknown}; valid: {', '.join(MODES)}")
    modes = [m for m in modes if m in spec.bench.modes]
    if not modes:
        raise SystemExit(f"--mode {text!r}: {spec.key} times only {', '.join(spec.bench.modes)}")
    return modes


def parse_providers(text: str) -> list[str]:
    providers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown or not providers:
        problem = f"unknown {unknown}" if unknown else "no provider named"
        raise SystemExit(f"--providers {text!r}: {problem}; valid: {', '.join(PROVIDERS)}")
    return providers


def check_csv(text: str) -> None:
    """--csv must name a new file in an existing folder, or a CSV of this script's rows to append to (its header
    line): checked before any timing."""
    path = Path(text)
    if path.is_dir():
        raise SystemExit(f"--csv {text}: is a folder, not a file")
    if not path.parent.is_dir():
        raise SystemExit(f"--csv {text}: {path.parent} is not an existing folder")
    if path.is_file() and path.stat().st_size:
        with path.open(newline="") as handle:
            header = handle.readline().rstrip("\r\n")
        if header != ",".join(CSV_FIELDS):
            raise SystemExit(f"--csv {text}: not a CSV of this script's rows (its first line is not the header "
                             f"{','.join(CSV_FIELDS[:3])},...); name a new file")


def main(argv: Sequence[str] | None = None) -> list[tuple[str, dict[str, float], list[Result]]]:
    args = parse_args(argv)
    # Autograd's threading is thread-local state: set for this (single-threaded) harness, restored after.
    with torch.autograd.set_multithreading_enabled(args.backward_thread == "worker"):
        return run_benchmark(args)


def run_benchmark(args: argparse.Namespace) -> list[tuple[str, dict[str, float], list[Result]]]:
    spec = OPERATORS[args.op]
    args.validate = args.call == "api"  # read by the operators' case builders
    shapes, modes = parse_shapes(spec, args.shapes), parse_modes(spec, args.mode)
    providers = parse_providers(args.providers)
    if args.csv:
        check_csv(args.csv)
    if args.kernel_breakdown < 0 or (args.kernel_breakdown and not args.kernel_time):
        raise SystemExit(f"--kernel-breakdown {args.kernel_breakdown}: give N >= 1 together with --kernel-time")
    if args.call == "direct" and not spec.bench.direct_call:
        raise SystemExit(f"--call direct: {spec.key} has no direct call (its backend function alone); "
                         "use --call api-unchecked")
    if args.peer_worker:
        peer_worker(spec, shapes[0], args, modes)
        return []
    # The reference first: its output is what the others' max|diff| is measured against.
    providers.sort(key=lambda p: (p != "reference", p == "peer"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for shape in shapes:
        case = build_case(spec, shape, args, device)
        results, reference_out = [], None
        for provider in providers:
            if provider == "peer":
                results += run_peer_in_child(spec, shape, args, modes, case)
                continue
            provider_results, first_out = run_provider(spec, case, provider, modes, args, reference_out)
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
    if args.kernel_breakdown:
        print_kernel_breakdown(rows, args.kernel_breakdown)
    failures = [(label, r) for label, _, results in rows for r in results if r.failed]
    if failures:  # a scripted run must not pass a broken provider off as a table with a note
        label, first = failures[0]
        raise SystemExit(f"bench_kernels.py: {spec.key}: {len(failures)} row(s) failed; "
                         f"first {first.provider} at {label} {first.mode}: {first.note}")
    return rows


if __name__ == "__main__":
    main()
