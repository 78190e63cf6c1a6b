"""End-to-end training-step benchmark: this project's step against a plain padded PyTorch HSTU (the yardstick).

    python scripts/bench_e2e.py [--configs ml1m,ml20m,long] [--variants NAME,...] [--steps 30] [--warmup 10]
        [--batches 10] [--out outputs/bench_e2e] [--time-limit 540] [--variant-timeout 300] [--trace] [--no-profile]
        [--data-dir data] [--synthetic-batches]
    python scripts/bench_e2e.py --list

Every (config, variant) runs in a fresh Python process on this machine, one after another, on the same
seeded batches: the parent builds each config's batches once and hands the file to every child. A row
reports samples/s (real sequences) and tokens/s (real tokens) per wall second, step ms, CUDA kernel ms,
GPU busy % (the union of kernel intervals over wall time), GPU kernels per step, peak memory and the
warm-up time (compilation, capture), all from ``hstu.profiling.profile_steps``, and the first and last
training loss, a check that every variant trains. Batches sit on the device before timing: no row pays
for data loading, host-to-device copies or Lightning's loop, so trainer rows are the step alone, not
the ``metrics.json`` throughput of a run. Two columns divide samples/s by the config's
``yardstick-reduce-overhead`` row and by its fastest yardstick row; the targets (1.5x, and GPU busy >= 80%
on ML-1M) are printed under the table and stored in the JSON.

Results go to ``<out>/<date>_<time>/bench_e2e.json`` and ``.csv`` (rewritten after each row, so a run cut
short keeps what it measured), each child's log to ``logs/`` there. A row that cannot run says why
(``unavailable``, ``error``, ``out of memory``, ``timeout``, ``skipped``); ``--time-limit`` bounds the run.

Variants (``--list`` prints them with the configs):
  yardstick-*: ``hstu.yardstick.PaddedHSTU`` in bf16 autocast with a fused AdamW (``--yardstick-adamw``),
    eager, ``torch.compile`` and ``torch.compile(mode="reduce-overhead")`` (CUDA graphs).
  trainer-*: this project's training step outside Lightning: the RecModule built from the composed config,
    ``model.training_loss`` (under bf16 autocast where the trainer's precision is bf16-mixed), the backward
    on the calling thread as ``RecModule.backward`` does, the module's own AdamW.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import hashlib
import itertools
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"
RESULT_NAME = "bench_e2e"
SEED = 0
TARGET_SPEEDUP = 1.5
TARGET_BUSY_PCT = 80.0

# ML-1M, paper protocol, training histories cut to 200: the history length at 100 evenly spaced quantile
# midpoints of the 6,040 training examples (mean 107.95; real batches of 128 hold about 13,800 tokens).
# Used for ML-1M-shaped lengths when the ML-1M cache is absent, and for the ML-20M-shaped config.
ML1M_HISTORY_LENGTH_QUANTILES = (
    18, 19, 19, 20, 21, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 39, 40, 41, 43, 44,
    45, 47, 48, 50, 51, 53, 55, 57, 59, 60, 62, 65, 66, 69, 71, 73, 75, 78, 80, 83, 86, 89, 92, 95, 98, 100, 102,
    105, 109, 113, 116, 119, 123, 126, 130, 135, 140, 144, 149, 153, 157, 163, 168, 173, 181, 189, 196,
    *([200] * 26),
)


# ---------------------------------------------------------------------------------------------
# Configs and variants
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    name: str
    summary: str
    batch_size: int
    model_overrides: tuple[str, ...]  # Hydra overrides of the train config (conf/)
    num_items: int
    lengths: str  # "ml1m": ML-1M's real batches (or their length quantiles); "ml1m-quantiles"; "uniform-half": [N/2, N]


LARGE = ("model=hstu-large",)
CONFIGS = {
    c.name: c for c in (
        BenchConfig("ml1m", "ML-1M HSTU-large: B 128, N 200, D 50, 8 blocks, 2 heads, d 25, 3,706 items; "
                    "real training batches (paper protocol), or with --synthetic-batches and no ML-1M cache "
                    "synthetic ones of ML-1M's history lengths", 128, LARGE, 3706, "ml1m"),
        BenchConfig("ml20m", "ML-20M-shaped HSTU-large, synthetic: B 128, N 200, D 256, 16 blocks, 8 heads, d 32, "
                    "26,744 items; ML-1M's history lengths", 128,
                    LARGE + ("model.dim=256", "model.encoder.num_blocks=16", "model.encoder.num_heads=8",
                             "model.encoder.dqk=32", "model.encoder.dv=32"), 26744, "ml1m-quantiles"),
        BenchConfig("long", "Long sequences, synthetic: B 32, N 1,024, D 256, 4 blocks, 4 heads, d 64, 100,000 items; "
                    "lengths uniform in [N/2, N]", 32,
                    LARGE + ("model.max_seq_len=1024", "model.dim=256", "model.encoder.num_blocks=4",
                             "model.encoder.num_heads=4", "model.encoder.dqk=64", "model.encoder.dv=64"),
                    100_000, "uniform-half"),
        BenchConfig("smoke", "Smoke test, synthetic: B 16, N 32, D 32, 2 blocks, 2 heads, d 16, 1,000 items; "
                    "lengths uniform in [N/2, N]", 16,
                    LARGE + ("model.max_seq_len=32", "model.dim=32", "model.encoder.num_blocks=2",
                             "model.encoder.dqk=16", "model.encoder.dv=16"), 1000, "uniform-half"),
    )
}
DEFAULT_CONFIGS = ("ml1m", "ml20m", "long")


class VariantUnavailable(Exception):
    """The variant cannot run here; the message is the reason shown in its row."""


@dataclass(frozen=True)
class Variant:
    name: str
    summary: str
    family: str  # "yardstick", "trainer" or "captured": which step builder runs it
    overrides: tuple[str, ...] = ()  # Hydra overrides on top of the config's (trainer variants)
    bf16: bool = True
    form: str = ""  # yardstick: eager, compile, reduce-overhead
    needs_cuda: bool = True


VARIANTS = {
    v.name: v for v in (
        Variant("yardstick-eager", "padded PyTorch HSTU, eager", "yardstick", form="eager", needs_cuda=False),
        Variant("yardstick-compile", "padded PyTorch HSTU, torch.compile", "yardstick", form="compile"),
        Variant("yardstick-reduce-overhead", 'padded PyTorch HSTU, torch.compile(mode="reduce-overhead")',
                "yardstick", form="reduce-overhead"),
        Variant("trainer-eager-fp32", "this trainer's step, eager, fp32", "trainer", bf16=False, needs_cuda=False),
        Variant("trainer-triton-bf16", "+triton=all, bf16 autocast", "trainer", overrides=("+triton=all",)),
        Variant("trainer-compile-triton-bf16", "model.compile=true +triton=all, bf16 autocast", "trainer",
                overrides=("+triton=all", "model.compile=true")),
        Variant("trainer-captured", "CUDA-graph captured step (hstu.train_step), +triton=all, bf16 autocast",
                "captured", overrides=("+triton=all",)),
        Variant("trainer-captured-compile", "captured step, model.compile=true +triton=all, bf16 autocast",
                "captured", overrides=("+triton=all", "model.compile=true")),
    )
}
YARDSTICK_BASELINE = "yardstick-reduce-overhead"


# ---------------------------------------------------------------------------------------------
# Batches (built once by the parent, read by every child)
# ---------------------------------------------------------------------------------------------
def compose_model_config(overrides: Sequence[str]):
    """``cfg.model`` of the train config under ``overrides``, as the trainer composes it."""
    from hydra import compose, initialize_config_dir

    import hstu.config  # noqa: F401  (registers the KernelFlags schema)

    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("train", overrides=list(overrides)).model


def ml1m_cache(data_dir: Path) -> Path:
    from hstu.data.sources import MovieLens1M

    return data_dir / f"{MovieLens1M().cache_key()}.npz"


def ml1m_batches(data_dir: Path, batch_size: int, max_seq_len: int, count: int, seed: int) -> tuple[list, int]:
    """The first ``count`` full training batches of an ML-1M epoch (paper protocol), shuffled under ``seed``,
    and the number of items."""
    from hstu.data import MovieLens1M, SequenceDataModule

    datamodule = SequenceDataModule(MovieLens1M(), data_dir=str(data_dir), max_seq_len=max_seq_len,
                                    protocol="paper", batch_size=batch_size)
    datamodule.setup("fit")
    torch.manual_seed(seed)
    full = (b for b in datamodule.train_dataloader() if b.batch_size == batch_size)
    batches = list(itertools.islice(full, count))
    if len(batches) < count:
        raise SystemExit(f"--batches {count}: ML-1M has only {len(batches)} full training batches of {batch_size}")
    return batches, datamodule.num_items


def synthetic_batch(g: torch.Generator, lengths: torch.Tensor, num_items: int, max_seq_len: int):
    """Uniform item ids; per sequence, non-decreasing timestamps with log-spread gaps of 0 s to about 12 days."""
    from hstu.data.batch import JaggedBatch

    lengths = lengths.to(torch.int64)
    size, total = lengths.numel(), int(lengths.sum())
    offsets = torch.zeros(size + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    # Each sequence owns length + 1 events, its history's then its target's, from index first[b] on.
    gaps = (torch.rand(total + size, generator=g, dtype=torch.float64)
            * torch.pow(10.0, torch.randint(0, 7, (total + size,), generator=g).double())).to(torch.int64)
    owner = torch.repeat_interleave(torch.arange(size), lengths + 1)
    first = torch.zeros(size + 1, dtype=torch.int64)
    first[1:] = (lengths + 1).cumsum(0)
    elapsed = gaps.cumsum(0)
    elapsed = elapsed - elapsed[first[:-1]][owner]  # 0 at each sequence's first event
    start = 1_600_000_000 + torch.randint(0, 10**8, (size,), generator=g)
    times = start[owner] + elapsed
    is_target = torch.zeros(total + size, dtype=torch.bool)
    is_target[first[1:] - 1] = True
    batch = JaggedBatch(
        item_ids=torch.randint(1, num_items + 1, (total,), generator=g),
        timestamps=times[~is_target],
        seq_offsets=offsets,
        targets=torch.randint(1, num_items + 1, (size,), generator=g),
        target_timestamps=times[is_target],
        user_ids=torch.arange(size),
    )
    return batch.check(max_seq_len, num_items)


def synthetic_lengths(g: torch.Generator, kind: str, batch_size: int, max_seq_len: int) -> torch.Tensor:
    if kind in ("ml1m", "ml1m-quantiles"):
        quantiles = torch.tensor(ML1M_HISTORY_LENGTH_QUANTILES)
        return quantiles[torch.randint(0, quantiles.numel(), (batch_size,), generator=g)].clamp(max=max_seq_len)
    if kind == "uniform-half":
        return torch.randint(math.ceil(max_seq_len / 2), max_seq_len + 1, (batch_size,), generator=g)
    raise ValueError(f"unknown length distribution {kind!r}")


SYNTHETIC_SOURCES = {
    "ml1m": "uniform items, history lengths drawn from ML-1M's stored length quantiles",
    "ml1m-quantiles": "synthetic: uniform items, history lengths drawn from ML-1M's length quantiles",
    "uniform-half": "synthetic: uniform items, history lengths uniform in [N/2, N]",
}


def build_batches(config: BenchConfig, count: int, data_dir: Path, seed: int) -> dict[str, Any]:
    """The config's batch pool and what it is: real ML-1M batches when the cache is there, else synthetic."""
    max_seq_len = int(compose_model_config(config.model_overrides).max_seq_len)
    batches, absent, num_items = None, "", config.num_items
    if config.lengths == "ml1m":
        cache = ml1m_cache(data_dir)
        if cache.exists():
            batches, num_items = ml1m_batches(data_dir, config.batch_size, max_seq_len, count, seed)
            source = f"ML-1M training batches (paper protocol, seed {seed}) from {cache}"
        else:
            absent = f"SYNTHETIC, the ML-1M cache {cache} is absent: "
    if batches is None:
        g = torch.Generator().manual_seed(seed)
        batches = [synthetic_batch(g, synthetic_lengths(g, config.lengths, config.batch_size, max_seq_len),
                                   config.num_items, max_seq_len) for _ in range(count)]
        source = absent + SYNTHETIC_SOURCES[config.lengths]
    digest = hashlib.sha256()
    for b in batches:
        for t in (b.item_ids, b.timestamps, b.seq_offsets, b.targets, b.target_timestamps):
            digest.update(t.numpy().tobytes())
    tokens = [b.num_tokens for b in batches]
    return {
        "num_items": num_items, "max_seq_len": max_seq_len, "batch_size": config.batch_size, "source": source,
        "checksum": digest.hexdigest()[:16], "mean_tokens": sum(tokens) / len(tokens),
        "padded_tokens": config.batch_size * max_seq_len,
        "batches": [{"item_ids": b.item_ids, "timestamps": b.timestamps, "seq_offsets": b.seq_offsets,
                     "targets": b.targets, "target_timestamps": b.target_timestamps, "user_ids": b.user_ids,
                     "extent": list(b.extent)} for b in batches],
    }


def load_batches(path: Path) -> tuple[dict[str, Any], list]:
    from hstu.data.batch import JaggedBatch

    pool = torch.load(path, weights_only=True)  # plain tensors, numbers and strings only
    batches = [JaggedBatch(**{k: v for k, v in b.items() if k != "extent"}, extent=tuple(b["extent"]))
               for b in pool.pop("batches")]
    return pool, batches


# ---------------------------------------------------------------------------------------------
# Child: one variant's step, profiled
# ---------------------------------------------------------------------------------------------
@dataclass
class Setup:
    config: BenchConfig
    variant: Variant
    model_cfg: Any
    num_items: int
    batches: list
    device: torch.device
    args: argparse.Namespace


def autocast(setup: Setup):
    if not setup.variant.bf16:
        return contextlib.nullcontext()
    return torch.autocast(setup.device.type, dtype=torch.bfloat16)


def yardstick_step(setup: Setup) -> tuple[Callable[[], torch.Tensor], dict]:
    from hstu.yardstick import PaddedBatch, PaddedHSTU

    model = PaddedHSTU.from_model_config(setup.model_cfg, setup.num_items).to(setup.device).train()
    opt = setup.model_cfg.optimizer
    fused = setup.args.yardstick_adamw == "fused" and setup.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=tuple(opt.betas), weight_decay=opt.weight_decay,
                                  **({"fused": True} if fused else {"foreach": True}))
    max_seq_len = int(setup.model_cfg.max_seq_len)
    pool = itertools.cycle([PaddedBatch.from_jagged(b, max_seq_len).to(setup.device) for b in setup.batches])
    form = setup.variant.form
    forward = model if form == "eager" else torch.compile(
        model, dynamic=False, mode="reduce-overhead" if form == "reduce-overhead" else None)

    def step() -> torch.Tensor:
        batch = next(pool)
        if form == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(setup):
            loss = forward(*batch.tensors())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    where = "" if form == "eager" else ", outside the compiled graph"
    return step, {"optimizer": f"AdamW {'fused' if fused else 'foreach'}, capturable=False{where}",
                  "precision": "bf16 autocast" if setup.variant.bf16 else "fp32"}


def build_module(setup: Setup):
    from hydra.utils import instantiate

    module = instantiate(setup.model_cfg, num_items=setup.num_items, _recursive_=False, _convert_="all")
    return module.to(setup.device).train()


def first_optimizer(configured) -> torch.optim.Optimizer:
    """The optimizer out of whatever ``configure_optimizers`` returns (an optimizer, a list, or a dict)."""
    if isinstance(configured, dict):
        configured = configured["optimizer"]
    if isinstance(configured, (list, tuple)):
        configured = configured[0]
    return configured


def describe_optimizer(optimizer: torch.optim.Optimizer) -> str:
    group = optimizer.param_groups[0]
    if group.get("fused"):
        kind = "fused"
    elif group.get("foreach") is None:
        kind = "default implementation (foreach on CUDA)"
    else:
        kind = "foreach" if group["foreach"] else "for-loop"
    return f"{type(optimizer).__name__} {kind}, capturable={bool(group.get('capturable'))}"


def kernel_backends(module) -> dict[str, str]:
    """What each operator ran with: triton, reference, or reference with the reason it fell back."""
    out = {}
    for op, state in module.manager.get_operator_availability().items():
        chosen = state["chosen"] or state["requested"]
        out[op] = f"{chosen} ({state['fallback_reason']})" if state["fallback_reason"] else str(chosen)
    return out


def trainer_step(setup: Setup) -> tuple[Callable[[], torch.Tensor], dict]:
    module = build_module(setup)
    optimizer = first_optimizer(module.configure_optimizers())
    pool = itertools.cycle([b.to(setup.device) for b in setup.batches])
    threaded_backward = not module.hparams.backward_on_caller_thread

    def step() -> torch.Tensor:
        batch = next(pool)
        with autocast(setup):
            loss = module.model.training_loss(batch)
        with torch.autograd.set_multithreading_enabled(threaded_backward):
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return step, {"optimizer": describe_optimizer(optimizer), "module": module,
                  "precision": "bf16 autocast" if setup.variant.bf16 else "fp32 (TF32 matmuls on CUDA)"}


def captured_step(setup: Setup) -> tuple[Callable[[], torch.Tensor], dict]:
    """This trainer's step as training runs it on one GPU: ``hstu.train_step.TrainStep`` with CUDA-graph
    capture (one graph per token capacity, fused capturable AdamW inside), under bf16 autocast as
    Lightning's bf16-mixed precision calls ``training_step``. Batches are copied into the step's static
    buffers (the trainer's own device-resident batches skip even those copies)."""
    from hstu.data.packing import PackingLayout
    from hstu.train_step import TrainStep, make_optimizer

    if setup.device.type != "cuda":
        raise VariantUnavailable("CUDA-graph capture needs a CUDA device")
    module = build_module(setup)
    opt = setup.model_cfg.optimizer
    optimizer = make_optimizer(module.parameters(), opt.lr, opt.betas, opt.weight_decay, setup.device, capturable=True)
    layout = PackingLayout(setup.config.batch_size, int(setup.model_cfg.max_seq_len), setup.args.bucket_tokens)
    train_step = TrainStep(module.model, optimizer, module.nonfinite, layout=layout, capture=True)
    pool = itertools.cycle([b.to(setup.device) for b in setup.batches])
    threaded_backward = not module.hparams.backward_on_caller_thread

    def step() -> torch.Tensor:
        with autocast(setup), torch.autograd.set_multithreading_enabled(threaded_backward):
            train_step(next(pool))
        return train_step.last_loss

    return step, {"optimizer": describe_optimizer(optimizer), "module": module, "precision": "bf16 autocast",
                  "bucket_tokens": setup.args.bucket_tokens}


def compiled_graphs() -> int | None:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:  # private counters: absent in some versions
        return None


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    config, variant = CONFIGS[args.config], VARIANTS[args.variant]
    row: dict[str, Any] = {"config": config.name, "variant": variant.name, "summary": variant.summary}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    row["card"] = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {platform.machine()}"
    if variant.needs_cuda and device.type != "cuda":
        raise VariantUnavailable("needs a CUDA device")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as hstu.train does on CUDA
    else:  # a smoke test: on a busy machine, OpenMP threads waiting on each other cost more than they give
        torch.set_num_threads(1)
    info, batches = load_batches(Path(args.batches_file))
    row["batches_checksum"] = info["checksum"]
    torch.manual_seed(args.seed)
    setup = Setup(config, variant, compose_model_config(config.model_overrides + variant.overrides),
                  info["num_items"], batches, device, args)
    build = {"yardstick": yardstick_step, "trainer": trainer_step, "captured": captured_step}[variant.family]
    build_start = time.perf_counter()
    step, details = build(setup)
    row["build_s"] = time.perf_counter() - build_start
    module = details.pop("module", None)
    row.update(details)

    from hstu.profiling import profile_steps

    calls, graphs_at_timing = 0, None

    def counted_step():
        nonlocal calls, graphs_at_timing
        if calls == args.warmup:
            graphs_at_timing = compiled_graphs()
        calls += 1
        return step()

    tokens = [b.num_tokens for b in batches]
    timed_tokens = [tokens[(args.warmup + i) % len(tokens)] for i in range(args.steps)]
    trace = Path(args.trace_dir) / f"{config.name}__{variant.name}.json.gz" if args.trace_dir else None
    profile = profile_steps(counted_step, steps=args.steps, warmup=args.warmup, samples_per_step=config.batch_size,
                            tokens_per_step=sum(timed_tokens) / len(timed_tokens), device=device, trace_path=trace,
                            with_profiler=not args.no_profile)
    graphs_after = compiled_graphs()
    row.update(profile.to_dict())
    row["status"] = "ok"
    if graphs_at_timing is not None and graphs_after is not None:
        row["graphs_compiled_while_timed"] = graphs_after - graphs_at_timing
        if graphs_after > graphs_at_timing:
            row["note"] = (row.get("note", "") + f" {graphs_after - graphs_at_timing} graph(s) compiled during the "
                           "timed steps").strip()
    if module is not None:
        row["kernel_backends"] = kernel_backends(module)
    return row


def child_main(args: argparse.Namespace) -> int:
    try:
        row = run_child(args)
    except VariantUnavailable as reason:
        row = {"config": args.config, "variant": args.variant, "status": "unavailable", "reason": str(reason)}
    except Exception as error:  # reported in the row; the traceback goes to the child's log
        traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        status = "out of memory" if isinstance(error, torch.OutOfMemoryError) else "error"
        row = {"config": args.config, "variant": args.variant, "status": status,
               "reason": f"{type(error).__name__}: {first_line}"}
    row.setdefault("torch", torch.__version__)
    row.setdefault("triton", triton_version())
    write_atomically(Path(args.result_file), json.dumps(row, indent=1, default=str))
    return 0


# ---------------------------------------------------------------------------------------------
# Parent: run the children, write the table
# ---------------------------------------------------------------------------------------------
def triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "none"


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def new_run_dir(out: Path) -> Path:
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    for suffix in itertools.count():
        run_dir = out / (stamp if suffix == 0 else f"{stamp}_{suffix}")
        try:
            run_dir.mkdir(parents=True)
            return run_dir
        except FileExistsError:
            continue
        except OSError as error:  # a file on the way, no permission, ...
            raise SystemExit(f"--out {out}: cannot make a run folder there ({error.strerror})") from None


def check_out_folder(out: Path) -> None:
    """Refuse an --out where no run folder can be made before any batch is built: its nearest existing
    ancestor must be a folder this process may write into."""
    existing = next(path for path in (out, *out.parents) if path.exists())
    if not existing.is_dir():
        raise SystemExit(f"--out {out}: cannot make a run folder there (Not a directory)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"--out {out}: cannot make a run folder there (Permission denied)")


def run_variant(config: str, variant: str, batches_file: Path, run_dir: Path, timeout: float,
                args: argparse.Namespace) -> dict[str, Any]:
    result_file = run_dir / "logs" / f"{config}__{variant}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", "--config", config, "--variant", variant,
               "--batches-file", str(batches_file), "--result-file", str(result_file), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--seed", str(args.seed), "--yardstick-adamw", args.yardstick_adamw,
               "--bucket-tokens", str(args.bucket_tokens)]
    if args.trace:
        command += ["--trace-dir", str(run_dir / "traces")]
    if args.no_profile:
        command += ["--no-profile"]
    log_path = run_dir / "logs" / f"{config}__{variant}.log"
    start = time.perf_counter()
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # the child and its compile workers
            child.wait()
            return {"config": config, "variant": variant, "status": "timeout",
                    "reason": f"timed out after {timeout:.0f} s (log: {log_path.name})",
                    "child_s": time.perf_counter() - start}
    if result_file.exists():
        row = json.loads(result_file.read_text())
    else:
        tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-1:] or ["no output"]
        row = {"config": config, "variant": variant, "status": "error",
               "reason": f"exited {child.returncode} without a result: {tail[0][:300]}"}
    row["child_s"] = time.perf_counter() - start
    return row


def add_ratios(rows: list[dict]) -> None:
    """Samples/s of each row over its config's reduce-overhead yardstick and over its best yardstick."""
    for config in {r["config"] for r in rows}:
        same = [r for r in rows if r["config"] == config]
        yardsticks = [r for r in same if r["variant"].startswith("yardstick-") and r.get("status") == "ok"]
        baseline = next((r for r in yardsticks if r["variant"] == YARDSTICK_BASELINE), None)
        best = max(yardsticks, key=lambda r: r["samples_per_s"], default=None)
        for r in same:
            ok = r.get("status") == "ok"
            r["x_yardstick_reduce_overhead"] = r["samples_per_s"] / baseline["samples_per_s"] if ok and baseline else None
            r["x_best_yardstick"] = r["samples_per_s"] / best["samples_per_s"] if ok and best else None
            r["best_yardstick"] = best["variant"] if best else None


def targets(rows: list[dict]) -> list[dict]:
    """The end-to-end targets, per trainer row: ML-1M against the reduce-overhead yardstick with GPU busy
    >= 80%; the other configs against their best yardstick; 1.5x samples/s either way."""
    out = []
    for r in rows:
        if not r["variant"].startswith("trainer-") or r.get("status") != "ok" or r["config"] == "smoke":
            continue
        against = "x_yardstick_reduce_overhead" if r["config"] == "ml1m" else "x_best_yardstick"
        ratio = r.get(against)
        entry = {"config": r["config"], "variant": r["variant"],
                 "against": YARDSTICK_BASELINE if against == "x_yardstick_reduce_overhead" else r.get("best_yardstick"),
                 "speedup": ratio, "speedup_met": None if ratio is None else ratio >= TARGET_SPEEDUP}
        if r["config"] == "ml1m":
            busy = r.get("busy_pct")
            entry.update(busy_pct=busy, busy_met=None if busy is None else busy >= TARGET_BUSY_PCT)
        out.append(entry)
    return out


CSV_FIELDS = [
    "date", "config", "variant", "status", "samples_per_s", "tokens_per_s", "wall_ms", "kernel_ms", "busy_pct",
    "kernels_per_step", "peak_memory_mb", "warmup_s", "x_yardstick_reduce_overhead", "x_best_yardstick",
    "profiled_wall_ms", "copies_per_step", "first_value", "last_value", "precision", "optimizer", "steps",
    "warmup_steps", "batches", "card", "torch", "triton", "reason", "note",
]


def write_results(run_dir: Path, report: dict[str, Any]) -> None:
    add_ratios(report["rows"])
    report["targets"] = targets(report["rows"])
    write_atomically(run_dir / f"{RESULT_NAME}.json", json.dumps(report, indent=2, default=str))
    partial = run_dir / f"{RESULT_NAME}.csv.partial"
    with open(partial, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for r in report["rows"]:
            writer.writerow({**{k: fmt_csv(r.get(k)) for k in CSV_FIELDS}, "date": report["date"],
                             "batches": report["configs"].get(r["config"], {}).get("source", "")})
    partial.replace(run_dir / f"{RESULT_NAME}.csv")


def fmt_csv(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def print_table(report: dict[str, Any]) -> None:
    header = ["config", "variant", "samples/s", "tokens/s", "step ms", "kernel ms", "GPU busy", "kernels/step",
              "peak MB", "warm-up s", "x RO yardstick", "x best yardstick", "note"]
    lines = []
    for r in report["rows"]:
        ok = r.get("status") == "ok"
        note = r.get("note", "") if ok else f"{r.get('status')}: {r.get('reason', '')}"
        lines.append([
            r["config"], r["variant"], fmt(r.get("samples_per_s"), ",.0f"), fmt(r.get("tokens_per_s"), ",.0f"),
            fmt(r.get("wall_ms"), ".2f"), fmt(r.get("kernel_ms"), ".2f"), fmt(r.get("busy_pct"), ".0f", "%"),
            fmt(r.get("kernels_per_step"), ",.0f"), fmt(r.get("peak_memory_mb"), ",.0f"), fmt(r.get("warmup_s"), ".1f"),
            fmt(r.get("x_yardstick_reduce_overhead"), ".2f", "x"), fmt(r.get("x_best_yardstick"), ".2f", "x"), note,
        ])
    from rich.console import Console
    from rich.table import Table

    table = Table(*header, title=f"End-to-end training step | {report.get('card') or '?'} | torch {report['torch']}")
    for line in lines:
        table.add_row(*line)
    Console(width=220).print(table)
    for name, info in report["configs"].items():
        print(f"{name}: {info['summary']}; batches: {info['source']}; {info['mean_tokens']:,.0f} real tokens of "
              f"{info['padded_tokens']:,} padded per batch")
    for t in report["targets"]:
        busy = "" if "busy_pct" not in t else f", GPU busy {fmt(t['busy_pct'], '.0f', '%')} (target {TARGET_BUSY_PCT:.0f}%)"
        print(f"target {t['config']} {t['variant']}: {fmt(t['speedup'], '.2f', 'x')} {t['against']} "
              f"(target {TARGET_SPEEDUP}x){busy}")


def parse_names(text: str, known: dict, flag: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"{flag} {text!r}: unknown {unknown or 'empty'}; valid: {', '.join(known)}")
    return names


def parent_main(args: argparse.Namespace) -> dict[str, Any]:
    configs = parse_names(args.configs, CONFIGS, "--configs")
    variants = parse_names(args.variants, VARIANTS, "--variants")
    if args.steps < 1 or args.warmup < 1 or args.batches < 1:
        raise SystemExit("--steps, --warmup and --batches must be >= 1")
    data_dir = Path(args.data_dir)
    cache = ml1m_cache(data_dir)
    synthetic = [] if cache.exists() else [n for n in configs if CONFIGS[n].lengths == "ml1m"]
    if synthetic and not args.synthetic_batches:
        raise SystemExit(f"--data-dir {data_dir}: no ML-1M cache {cache.name} there for the ml1m config; "
                         f"python scripts/train.py experiment=ml1m-quick paths.data_dir={data_dir} downloads it, "
                         "or --synthetic-batches times ml1m on synthetic batches")
    check_out_folder(Path(args.out))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        pools = {}
        for name in configs:  # first: a --batches the data cannot fill stops the run before its folder exists
            pool = build_batches(CONFIGS[name], args.batches, data_dir, args.seed)
            torch.save(pool, Path(tmp) / f"{name}.pt")
            pools[name] = {k: v for k, v in pool.items() if k != "batches"}
        return _run_variants(args, configs, variants, synthetic, pools, Path(tmp), start)


def _run_variants(args: argparse.Namespace, configs: list[str], variants: list[str], synthetic: list[str],
                  pools: dict[str, dict], pool_dir: Path, start: float) -> dict[str, Any]:
    """Each (config, variant) in its child process on the pools saved in ``pool_dir``; the report, written
    after every row into a new run folder under --out."""
    run_dir = new_run_dir(Path(args.out))
    (run_dir / "logs").mkdir()
    report: dict[str, Any] = {
        "benchmark": RESULT_NAME, "date": datetime.date.today().isoformat(),
        "command": " ".join(shlex.quote(a) for a in ["python", "scripts/bench_e2e.py"] + list(args.argv)),
        "torch": torch.__version__, "triton": triton_version(), "card": None,
        "settings": {"steps": args.steps, "warmup": args.warmup, "batches": args.batches, "seed": args.seed,
                     "yardstick_adamw": args.yardstick_adamw, "time_limit_s": args.time_limit,
                     "profiled": not args.no_profile},
        "configs": {name: {"summary": CONFIGS[name].summary, **pools[name]} for name in configs}, "rows": [],
    }
    print(f"writing to {run_dir}", flush=True)
    for name, variant in itertools.product(configs, variants):
        remaining = args.time_limit - (time.perf_counter() - start)
        if remaining < args.min_variant_s:
            row = {"config": name, "variant": variant, "status": "skipped",
                   "reason": f"--time-limit {args.time_limit:.0f} s reached"}
        else:
            print(f"{name} / {variant} ...", flush=True)
            row = run_variant(name, variant, pool_dir / f"{name}.pt", run_dir,
                              min(args.variant_timeout, remaining), args)
        if row.get("status") == "ok" and row.get("batches_checksum") != report["configs"][name]["checksum"]:
            row["note"] = (row.get("note", "") + " batches differ from the parent's").strip()
        if name in synthetic:
            row["note"] = (row.get("note", "") + " SYNTHETIC batches (no ML-1M cache)").strip()
        if row.get("card") and row.get("status") == "ok":
            report["card"] = row["card"]
        report["rows"].append(row)
        write_results(run_dir, report)
        summary = (f"{row['samples_per_s']:,.0f} samples/s, {row['wall_ms']:.2f} ms/step"
                   if row.get("status") == "ok" else f"{row['status']}: {row.get('reason', '')}")
        print(f"  {summary} ({row.get('child_s', 0):.0f} s)", flush=True)
    report["total_s"] = time.perf_counter() - start
    write_results(run_dir, report)
    print_table(report)
    print(f"results: {run_dir / (RESULT_NAME + '.json')} and .csv ({report['total_s']:.0f} s)")
    return report


def list_choices() -> None:
    print("configs:")
    for c in CONFIGS.values():
        print(f"  {c.name:<8} {c.summary}")
    print("variants:")
    for v in VARIANTS.values():
        print(f"  {v.name:<30} {v.summary}{'' if v.needs_cuda else ' (also on CPU)'}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated: {', '.join(CONFIGS)}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated (see --list)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps, and as many again under the profiler")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (compilation, capture)")
    parser.add_argument("--batches", type=int, default=10, help="distinct batches per config, cycled")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", default=str(REPO / "outputs" / RESULT_NAME), help="a new <date>_<time> folder goes here")
    parser.add_argument("--data-dir", default=os.environ.get("HSTU_DATA_DIR", "data"),
                        help="where the ML-1M cache is (default $HSTU_DATA_DIR, else ./data)")
    parser.add_argument("--synthetic-batches", action="store_true",
                        help="time the ml1m config on synthetic batches of ML-1M's history lengths where the ML-1M "
                             "cache is absent (its rows say so), instead of refusing")
    parser.add_argument("--time-limit", type=float, default=540, help="seconds for the whole run; later rows are skipped")
    parser.add_argument("--variant-timeout", type=float, default=300, help="seconds for one variant's process")
    parser.add_argument("--min-variant-s", type=float, default=30, help="skip a variant when less than this is left")
    parser.add_argument("--yardstick-adamw", default="fused", choices=["fused", "foreach"],
                        help="the yardstick's AdamW implementation on CUDA (foreach on CPU)")
    parser.add_argument("--bucket-tokens", type=int, default=1024,
                        help="token capacity step of the captured step's packed batches (data.bucket_tokens)")
    parser.add_argument("--trace", action="store_true", help="keep each variant's profiler trace (traces/*.json.gz)")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profiled steps: wall time and memory only (no kernel ms, GPU busy, kernels/step)")
    parser.add_argument("--list", action="store_true", help="print the configs and variants, then exit")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--batches-file", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    parser.add_argument("--trace-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None):
    args = parse_args(argv)
    if args.list:
        return list_choices()
    if args.child:
        return child_main(args)
    return parent_main(args)


if __name__ == "__main__":
    result = main()
    sys.exit(result if isinstance(result, int) else 0)
