"""Plot BENCHMARKS.csv: one grouped bar chart (shape x provider) for an op / mode / dtype / bias / card /
variant / call / backward thread.

    python scripts/plot_bench.py --op hstu_hierarchical_attention --mode fwd+bwd [--metric rate|ms]
        [--dtype bf16] [--bias none] [--card "NVIDIA H100 80GB HBM3"] [--variant gate] [--call api-unchecked]
        [--backward-thread caller] [--csv BENCHMARKS.csv] [--out bench_plot.png]

Where a (shape, provider) was measured several times, the last row of the file wins. The card, variant,
call and backward thread default to those of the newest matching row, so a plot never mixes cards or
different measurements (an operator's gate against its input side, say).
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROVIDER_ORDER = ["triton", "peer", "compiled", "reference"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", required=True)
    parser.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    parser.add_argument("--metric", default="rate", choices=["rate", "ms"], help="TFLOP/s or GB/s (rate), or ms")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--bias", default=None, help="attention bias setting (default: 'none' if present, else any)")
    parser.add_argument("--card", default=None, help="card name as in the CSV (default: newest matching row's)")
    parser.add_argument("--variant", default=None, help="bench variant as in the CSV (default: newest matching row's)")
    parser.add_argument("--call", default=None, help="api, api-unchecked or direct (default: newest matching row's)")
    parser.add_argument("--backward-thread", default=None, help="worker or caller (default: newest matching row's)")
    parser.add_argument("--csv", default=str(REPO / "BENCHMARKS.csv"))
    parser.add_argument("--out", default=None, help="PNG path (default: bench_plot_<op>_<mode>.png)")
    parser.add_argument("--log", action="store_true", help="log-scale y axis")
    return parser.parse_args(argv)


# Columns that tell one measurement from another besides op, mode and dtype: one value of each per plot.
SETTINGS = ("bias", "card", "variant", "call", "backward_thread")
COLUMNS = ("op", "mode", "dtype", "shape", "provider", "ms", "rate", "rate_unit", *SETTINGS)


def read_rows(path: str) -> list[dict]:
    """The CSV's rows; SystemExit naming the file when it is missing or lacks bench_kernels.py's columns."""
    try:
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise SystemExit(f"--csv {path}: cannot be read ({error})") from None
    missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
    if missing:
        raise SystemExit(f"--csv {path}: not a bench_kernels.py CSV (no column {', '.join(missing)})")
    return rows


def select_rows(rows: list[dict], args) -> tuple[list[dict], dict[str, str]]:
    """Rows of the chosen op/mode/dtype with a time and one value of each setting; (rows, settings)."""
    rows = [r for r in rows if r["op"] == args.op and r["mode"] == args.mode and r["dtype"] == args.dtype and r["ms"]]
    if not rows:
        raise SystemExit(f"{args.csv}: no timed rows for op={args.op} mode={args.mode} dtype={args.dtype}")
    settings = {}
    for column in SETTINGS:
        chosen = getattr(args, column)
        if chosen is None:
            chosen = "none" if column == "bias" and any(r["bias"] == "none" for r in rows) else rows[-1][column]
        rows = [r for r in rows if r[column] == chosen]
        settings[column] = chosen
        if not rows:
            named = " ".join(f"{key}={value!r}" for key, value in settings.items())
            raise SystemExit(f"{args.csv}: no timed rows for op={args.op} mode={args.mode} dtype={args.dtype} {named}")
    return rows, settings


def main(argv: Sequence[str] | None = None) -> Path:
    args = parse_args(argv)
    out = Path(args.out or f"bench_plot_{args.op}_{args.mode.replace('+', '_')}.png")
    if not out.parent.is_dir():
        raise SystemExit(f"--out {out}: {out.parent} is not an existing folder")
    rows, settings = select_rows(read_rows(args.csv), args)
    latest = {(r["shape"], r["provider"]): r for r in rows}  # last measurement wins
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    present = {provider for _, provider in latest}
    providers = [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))
    unit = "ms" if args.metric == "ms" else rows[-1]["rate_unit"]

    width = 0.8 / len(providers)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(shapes) * len(providers) * 0.5 + 2), 4.5))
    for i, provider in enumerate(providers):
        xs, heights = [], []
        for x, shape in enumerate(shapes):
            row = latest.get((shape, provider))
            if row is not None and row[args.metric]:
                xs.append(x + (i - (len(providers) - 1) / 2) * width)
                heights.append(float(row[args.metric]))
        bars = ax.bar(xs, heights, width, label=provider)
        ax.bar_label(bars, fmt="%.3g", fontsize=7, rotation=90, padding=2)
    ax.set_xticks(range(len(shapes)), shapes, rotation=30, ha="right")
    ax.set_xlabel("shape")
    ax.set_ylabel(unit)
    if args.log:
        ax.set_yscale("log")
    ax.margins(y=0.15)
    measured = ", ".join(f"{key}={settings[key] or '-'}" for key in ("bias", "variant", "call", "backward_thread"))
    ax.set_title(f"{args.op} {args.mode} {args.dtype}, {measured}\n{settings['card']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
