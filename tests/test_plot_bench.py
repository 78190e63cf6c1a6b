"""scripts/plot_bench.py: one plot holds one measurement (card, variant, call, backward thread), and bad inputs
are named in one line."""
import csv

import pytest
from cli import load_script

FIELDS = ["date", "op", "provider", "mode", "shape", "dtype", "bias", "call", "backward_thread", "ms", "rate",
          "rate_unit", "card", "torch", "triton", "note", "variant", "peak_mb", "kernel_ms"]


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({field: row.get(field, "") for field in FIELDS})


def row(provider, variant, ms, call="api-unchecked", card="H200"):
    return dict(op="fused_attention_layernorm", provider=provider, mode="fwd+bwd", shape="200000x256x256",
                dtype="bf16", bias="-", call=call, backward_thread="worker", ms=ms, rate="1", rate_unit="GB/s",
                card=card, variant=variant)


@pytest.fixture
def plot(monkeypatch):
    return load_script("plot_bench", monkeypatch)


def test_a_plot_keeps_to_the_newest_rows_variant_and_call(plot, tmp_path):
    """The gate's reference row and the input side's Triton row are different measurements: never side by side."""
    path = tmp_path / "bench.csv"
    write_csv(path, [row("reference", "gate", "53.5"), row("triton", "gate", "0.23"), row("triton", "input", "1.16")])
    args = plot.parse_args(["--op", "fused_attention_layernorm", "--csv", str(path)])
    rows, settings = plot.select_rows(plot.read_rows(str(path)), args)
    assert settings["variant"] == "input" and [r["provider"] for r in rows] == ["triton"]
    args = plot.parse_args(["--op", "fused_attention_layernorm", "--csv", str(path), "--variant", "gate"])
    rows, _ = plot.select_rows(plot.read_rows(str(path)), args)
    assert [(r["provider"], r["ms"]) for r in rows] == [("reference", "53.5"), ("triton", "0.23")]
    out = plot.main(["--op", "fused_attention_layernorm", "--csv", str(path), "--variant", "gate",
                     "--out", str(tmp_path / "gate.png")])
    assert out.stat().st_size > 0


@pytest.mark.parametrize("case, message", [
    ("missing csv", r"^--csv .*/nope\.csv: cannot be read \("),
    ("not a bench csv", r"^--csv .*/other\.csv: not a bench_kernels\.py CSV \(no column op, mode, "),
    ("no such call", r"^.*/bench\.csv: no timed rows for op=fused_attention_layernorm mode=fwd\+bwd dtype=bf16 "
                     r"bias='-' card='H200' variant='input' call='direct'$"),
    ("out folder missing", r"^--out .*/missing/plot\.png: .*/missing is not an existing folder$"),
])
def test_bad_inputs_are_named_in_one_line(plot, tmp_path, case, message):
    write_csv(tmp_path / "bench.csv", [row("triton", "input", "1.16")])
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    args = {"missing csv": ["--csv", str(tmp_path / "nope.csv")],
            "not a bench csv": ["--csv", str(tmp_path / "other.csv")],
            "no such call": ["--csv", str(tmp_path / "bench.csv"), "--call", "direct"],
            "out folder missing": ["--csv", str(tmp_path / "bench.csv"), "--out", str(tmp_path / "missing" / "plot.png")],
            }[case]
    with pytest.raises(SystemExit, match=message):
        plot.main(["--op", "fused_attention_layernorm", "--out", str(tmp_path / "p.png"), *args]
                  if "--out" not in args else ["--op", "fused_attention_layernorm", *args])
