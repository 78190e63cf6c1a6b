"""Where a request's time goes through the HTTP server: one keep-alive client, stamps at every hand-off.

    python scripts/bench_http_stages.py --out results/http-stages                      # ML-1M HSTU-large
    python scripts/bench_http_stages.py --configs tiny --devices cpu --out results/http-stages-cpu

For each server variant (``max_batch_size:batch_timeout``; default 1:0, 32:0, 32:0.0005, 32:0.002) it
starts scripts/serve.py with ``stage_timing=true`` on 127.0.0.1 and sends one request at a time
(the bench_serving scenario: a 200-event history, k = 10, cache off for ``full``) from each client
(``requests``: a requests.Session, as bench_serving's HTTP rows; ``http.client``: the standard
library's connection, asking for gzip as requests does). Every request is stamped with
``time.perf_counter_ns`` (CLOCK_MONOTONIC, one clock for all processes of the host) by the client,
the HTTP process and the inference worker (``hstu.serving.server.STAGE_STAMPS``); consecutive stamps
make the stages below, so a request's stages add up to its latency at the client:

  client_serialise       json.dumps of the body
  request_transfer       client library, loopback socket, uvicorn's HTTP parsing, ASGI dispatch
  body_read_json         reading the body, JSON decoding (FastAPI)
  validation             the pydantic request model with the catalogue checks
  endpoint_dispatch      FastAPI to LitServe's handler, up to the queue
  request_queue          the hand-off to the inference worker process (a multiprocessing queue, one
                         pipe: pickling and a write; FastLitServer in hstu.serving.server)
  batch_wait             waiting for companions (batch_timeout; GreedyBatchLoop)
  decode_request         body to the engine's Request
  predict                the engine's infer_batch (the model, top-k, history preparation)
  encode_response        encode_response
  response_queue         the answer's way back to the HTTP process (the same kind of queue, read
                         by a thread of uvicorn's event loop)
  response_serialise     FastAPI's serialisation of the answer and gzip
  response_transfer      uvicorn, loopback socket, the client library reading the response
  client_parse           JSON decoding at the client

Stage means add up to the mean latency; medians need not. A control run of the first variant with
``stage_timing=false`` times the same requests unstamped (the stamps' own cost), and an in-process
row times ``Recommender.infer_with_optimal_strategy`` on the same requests (bench_serving's "in
process"). Results: a table, <out>.json (every row and the per-request stamps' summary) and <out>.csv.
"""
from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import (CONFIGS, Histories, build_model, card_name, check_counts, check_new_out,  # noqa: E402
                           checked_devices, csv_text, model_config, percentiles, scenario_calls, timed_requests, write_new_results)

from hstu.export import write_export  # noqa: E402
from hstu.inference import Recommender  # noqa: E402
from hstu.serving.engine import ServingOptions, serving_kernel_flags  # noqa: E402
from hstu.serving.process import ServerProcess  # noqa: E402
from hstu.serving.server import STAGE_HEADER, STAGE_STAMPS  # noqa: E402

K = 10
SCENARIOS = ("full", "hit-199+1")
CLIENTS = ("requests", "http.client")
CLIENT_STAMPS_BEFORE = ("client_start", "client_send")  # json.dumps runs between them
CLIENT_STAMPS_AFTER = ("client_received", "client_end")  # the response's JSON decoding runs between them
STAMPS = CLIENT_STAMPS_BEFORE + STAGE_STAMPS + CLIENT_STAMPS_AFTER
STAGES = ("client_serialise", "request_transfer", "body_read_json", "validation", "endpoint_dispatch",
          "request_queue", "batch_wait", "decode_request", "predict", "encode_response", "response_queue",
          "response_serialise", "response_transfer", "client_parse")
assert len(STAGES) == len(STAMPS) - 1  # stage i runs from stamp i to stamp i + 1


class Client:
    """POST /recommend on one keep-alive connection; ``send`` returns the report and keeps the stamps."""

    def __init__(self, kind: str, url: str):
        self.kind, self.url = kind, url
        self.last_stamps: dict[str, int] | None = None
        if kind == "requests":
            import requests

            self.session = requests.Session()
        else:
            host, port = url.removeprefix("http://").split(":")
            self.connection = http.client.HTTPConnection(host, int(port), timeout=60)

    def send(self, user, items, times) -> dict:
        client_start = time.perf_counter_ns()
        body = json.dumps({"user_id": user, "events": [[i, t] for i, t in zip(items, times)], "k": K})
        client_send = time.perf_counter_ns()
        status, headers, content = self._post(body)
        client_received = time.perf_counter_ns()
        if status != 200:
            raise RuntimeError(f"/recommend answered {status}: {content[:500]!r}")
        report = json.loads(content)
        client_end = time.perf_counter_ns()
        stamps = dict(client_start=client_start, client_send=client_send)
        if STAGE_HEADER in headers:
            stamps.update((name, int(ns)) for name, ns in
                          (field.split("=") for field in headers[STAGE_HEADER].split(",")))
            stamps.update(report.pop("stage_ns"))
        stamps.update(client_received=client_received, client_end=client_end)
        self.last_stamps = stamps
        return report

    def _post(self, body: str) -> tuple[int, dict[str, str], bytes]:
        if self.kind == "requests":
            response = self.session.post(self.url + "/recommend", data=body, timeout=60,
                                         headers={"Content-Type": "application/json"})
            return response.status_code, {k.lower(): v for k, v in response.headers.items()}, response.content
        self.connection.request("POST", "/recommend", body=body.encode(),
                                headers={"Content-Type": "application/json", "Accept-Encoding": "gzip"})
        response = self.connection.getresponse()
        content = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if headers.get("content-encoding") == "gzip":
            content = gzip.decompress(content)
        return response.status, headers, content

    def close(self) -> None:
        (self.session if self.kind == "requests" else self.connection).close()


def stats_ms(values_ms) -> dict:
    values = np.asarray(values_ms, dtype=float).tolist()
    return {**percentiles(values), "min_ms": min(values)}


def stage_rows(base: dict, latencies: list[float], stamps: list[dict]) -> list[dict]:
    """One row per stage (and one for the client's total) from the per-request stamps."""
    matrix = np.array([[s[name] for name in STAMPS] for s in stamps], dtype=np.int64)
    durations_ms = np.diff(matrix, axis=1) / 1e6
    total = stats_ms(latencies)
    rows = [{**base, "stage": name, **stats_ms(durations_ms[:, i]),
             "share_of_mean": float(durations_ms[:, i].mean() / total["mean_ms"])} for i, name in enumerate(STAGES)]
    stamped_total = durations_ms.sum(axis=1)
    rows.append({**base, "stage": "total (client)", **total, "share_of_mean": 1.0,
                 "note": f"stages' means add up to {stamped_total.mean():.3f} ms"})
    return rows


def http_rows(args, name, config, device, flags, histories, export_dir: Path, scratch: Path) -> list[dict]:
    rows = []
    runs = [(variant, True) for variant in args.variants] + ([(args.variants[0], False)] if args.control else [])
    for (max_batch_size, batch_timeout), stamped in runs:
        variant = f"max_batch_size {max_batch_size}, batch_timeout {batch_timeout:g}"
        log = scratch / f"server-{max_batch_size}-{batch_timeout:g}-{stamped}.log"
        with ServerProcess(export_dir, scratch, log, device=device, max_batch_size=max_batch_size,
                           batch_timeout=batch_timeout, cache_bytes=0 if args.scenario == "full" else args.cache_bytes,
                           cuda_graphs=args.cuda_graphs == "on", kernels=flags, stage_timing=stamped,
                           log_level="error") as server:
            for kind in args.clients:
                client = Client(kind, server.url)
                call, prime = scenario_calls(args.scenario, histories, client.send, config["max_seq_len"])

                stamps = []

                def call_keeping_stamps(i):
                    report = call(i)
                    stamps.append(client.last_stamps)
                    return report

                latencies, _, _ = timed_requests(call_keeping_stamps, prime, args.requests, args.warmup,
                                                 args.time_limit)
                stamps = stamps[args.warmup:]
                client.close()
                base = dict(config=name, device=device, card=card_name(device), scenario=args.scenario,
                            cuda_graphs=args.cuda_graphs if device.startswith("cuda") else "-",
                            transport=f"HTTP (127.0.0.1, LitServe), client {kind}", variant=variant,
                            stage_timing=stamped, requests=len(latencies))
                if stamped:
                    rows += stage_rows(base, latencies, stamps)
                else:
                    rows.append({**base, "stage": "total (client)", **stats_ms(latencies), "share_of_mean": 1.0,
                                 "note": "control: stage_timing off"})
                print_rows([r for r in rows if r["variant"] == variant and r["transport"] == base["transport"]
                            and r["stage_timing"] == stamped])
    return rows


def in_process_row(args, name, config, device, flags, histories) -> dict:
    recommender = Recommender(build_model(config, flags), histories.item_ids.tolist(), device=device)
    recommender.serving_engine(ServingOptions(cache_bytes=0 if args.scenario == "full" else args.cache_bytes,
                                              cuda_graphs=args.cuda_graphs == "on"))

    def send(user, items, times):
        return recommender.infer_with_optimal_strategy(user, list(zip(items, times)), K)

    call, prime = scenario_calls(args.scenario, histories, send, config["max_seq_len"])
    latencies, _, _ = timed_requests(call, prime, args.requests, args.warmup, args.time_limit)
    row = dict(config=name, device=device, card=card_name(device), scenario=args.scenario,
               cuda_graphs=args.cuda_graphs if device.startswith("cuda") else "-",
               transport="in process (Recommender.infer_with_optimal_strategy)", variant="-", stage_timing=False,
               requests=len(latencies), stage="total (in process)", **stats_ms(latencies), share_of_mean=1.0)
    print_rows([row])
    return row


def print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"{rows[0]['config']} {rows[0]['device']} {rows[0]['scenario']} | {rows[0]['transport']} | "
          f"{rows[0]['variant']} | stage_timing {rows[0]['stage_timing']} | n={rows[0]['requests']}", flush=True)
    for row in rows:
        share = f"{100 * row['share_of_mean']:5.1f}%" if row["stage"] != "total (client)" else "      "
        print(f"    {row['stage']:22s} mean {row['mean_ms']:8.3f}  p50 {row['p50_ms']:8.3f}  "
              f"p99 {row['p99_ms']:8.3f} ms  {share}  {row.get('note', '')}", flush=True)


def parse_variants(text: str) -> list[tuple[int, float]]:
    variants = []
    for field in text.split(","):
        size, _, timeout = field.partition(":")
        try:
            variants.append((int(size), float(timeout or 0)))
        except ValueError:
            raise SystemExit(f"--variants: {field!r} is not max_batch_size:batch_timeout (e.g. 32:0.002)") from None
        if variants[-1][0] < 1 or not variants[-1][1] >= 0:
            raise SystemExit(f"--variants: {field!r}: max_batch_size must be >= 1 and batch_timeout >= 0 seconds")
    return variants


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="ml1m-hstu-large", help=f"comma-separated subset of {list(CONFIGS)}")
    parser.add_argument("--devices", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scenario", default="full", choices=SCENARIOS)
    parser.add_argument("--variants", default="1:0,32:0,32:0.0005,32:0.002",
                        help="server variants, max_batch_size:batch_timeout, comma-separated")
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"comma-separated subset of {CLIENTS}")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the unstamped run of the first variant")
    parser.add_argument("--no-in-process", dest="in_process", action="store_false", help="skip the in-process row")
    parser.add_argument("--cuda-graphs", default="on", choices=("on", "off"))
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per client and variant")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds of timing per run at most")
    parser.add_argument("--cache-bytes", type=int, default=1 << 30)
    parser.add_argument("--data-dir", default=os.environ.get("HSTU_DATA_DIR", "data"))
    parser.add_argument("--out", required=True,
                        help="results path without suffix: writes <out>.json and <out>.csv (new files only)")
    args = parser.parse_args(argv)
    args.variants = parse_variants(args.variants)
    check_new_out(parser, args.out)
    check_counts(parser, args, requests=1, warmup=0, cache_bytes=0)
    args.devices = checked_devices(parser, args.devices)
    args.clients = [c for c in args.clients.split(",") if c]
    unknown = sorted(set(args.clients) - set(CLIENTS)) + sorted(set(args.configs.split(",")) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown client(s) or config(s): {unknown}")

    rows: list[dict] = []
    meta = dict(torch=torch.__version__, python=platform.python_version(), cpu_count=os.cpu_count(),
                clock="time.perf_counter_ns (CLOCK_MONOTONIC)", stages=list(STAGES), stamps=list(STAMPS),
                weights="random weights of the configuration's shapes")
    for name in args.configs.split(","):
        config = CONFIGS[name]
        histories = Histories(config["histories"], config["num_items"], args.data_dir)
        with tempfile.TemporaryDirectory(prefix="bench-http-stages-") as tmp:
            export_dir = write_export(Path(tmp) / "export", build_model(config, None), model_config(config),
                                      histories.item_ids, metrics={},
                                      data={"source": "bench_http_stages (random weights)"})
            for device in args.devices:
                flags = serving_kernel_flags(device)
                if args.in_process:
                    rows.append(in_process_row(args, name, config, device, flags, histories))
                rows += http_rows(args, name, config, device, flags, histories, export_dir, Path(tmp))
    write_new_results(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=2), csv_text(rows))
    return rows


if __name__ == "__main__":
    main()
