"""The end-to-end benchmark: the padded yardstick computes the model's loss, the step profiler's
figures, the batches every variant shares, and one tiny run of scripts/bench_e2e.py."""
import csv
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from hstu.data.batch import JaggedBatch
from hstu.model.recommender import SequentialRecommender
from hstu.profiling import profile_steps, summarise_gpu_events, union_ms
from hstu.yardstick import PaddedBatch, PaddedHSTU
from hstu_kernels.jagged import padded_rows, to_padded

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_e2e.py"
NUM_ITEMS, MAX_LEN, DIM, NEGATIVES = 30, 12, 8, 7


def load_script():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_e2e"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def jagged_batch(lengths, seed=0) -> JaggedBatch:
    """Item ids that repeat (so accidental hits occur) and timestamps with gaps from 0 s to days."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    offsets = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    offsets[1:] = lengths.cumsum(0)
    total = int(offsets[-1])
    gaps = (torch.rand(total + len(lengths), generator=g) * 10.0 ** torch.randint(0, 6, (total + len(lengths),),
                                                                              generator=g)).long()
    times = 1_000_000_000 + gaps.cumsum(0)
    return JaggedBatch(
        item_ids=torch.randint(1, NUM_ITEMS + 1, (total,), generator=g), timestamps=times[:total],
        seq_offsets=offsets, targets=torch.randint(1, NUM_ITEMS + 1, (len(lengths),), generator=g),
        target_timestamps=times[total:], user_ids=torch.arange(len(lengths)),
    )


MODEL_CONFIGS = {
    "both-biases": {"num_blocks": 2, "num_heads": 2, "dqk": 6, "dv": 5, "alpha": 1.0},
    "position-bias-only": {"num_blocks": 1, "num_heads": 1, "dqk": 4, "dv": 3, "alpha": 0.5, "time_bias": False},
}


@pytest.mark.parametrize("name", list(MODEL_CONFIGS))
def test_yardstick_loss_and_gradients_equal_the_models(name, monkeypatch):
    """Same weights, batch and negatives, dropout 0, fp32: PaddedHSTU's loss and every gradient equal
    SequentialRecommender.training_loss's (lengths 1 and max_seq_len included)."""
    torch.manual_seed(0)
    config = {
        "max_seq_len": MAX_LEN, "dim": DIM, "input_dropout": 0.0,
        "encoder": {"_target_": "hstu.model.hstu.HSTUEncoder", "dropout": 0.0, **MODEL_CONFIGS[name]},
        "loss": {"kind": "sampled", "num_negatives": NEGATIVES, "temperature": 0.05},
    }
    model = SequentialRecommender(NUM_ITEMS, MAX_LEN, DIM, 0.0, config["encoder"], config["loss"])
    yardstick = PaddedHSTU.from_model_config(config, NUM_ITEMS)
    yardstick.load_state_dict(model.state_dict())  # strict: the parameter names match one to one
    batch = jagged_batch([5, 1, MAX_LEN, 3, 9])
    negatives = torch.randint(1, NUM_ITEMS + 1, (batch.num_tokens, NEGATIVES), generator=torch.Generator().manual_seed(1))

    def draw(low, high, size, device=None, **kwargs):  # the model's per-row draw, replaced by the fixed negatives
        assert (low, high, tuple(size)) == (1, NUM_ITEMS + 1, tuple(negatives.shape))
        return negatives.to(device)

    with monkeypatch.context() as patch:
        patch.setattr(torch, "randint", draw)
        expected = model.training_loss(batch)
    expected.backward()

    rows = padded_rows(batch.seq_offsets, batch.num_tokens, MAX_LEN)
    padded_negatives = to_padded(negatives, rows, batch.batch_size, MAX_LEN)
    loss = yardstick(*PaddedBatch.from_jagged(batch, MAX_LEN).tensors(), negatives=padded_negatives)
    loss.backward()

    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    model_params = dict(model.named_parameters())
    for param_name, param in yardstick.named_parameters():
        # The two sum each gradient element's fp32 terms in different orders (padded against jagged), so an
        # element's error scales with the largest terms, not with its own value where they cancel: atol is
        # 1e-5 of the tensor's largest gradient (an item_table element of 9.65e-3 came 2.3e-6 apart on one
        # CPU, 5.5e-7 of that tensor's largest, 4.2).
        expected_grad = model_params[param_name].grad
        torch.testing.assert_close(param.grad, expected_grad, rtol=1e-4, atol=1e-5 * float(expected_grad.abs().max()),
                                   msg=param_name)


def test_yardstick_draws_fresh_negatives_and_refuses_what_it_does_not_implement():
    config = {"max_seq_len": MAX_LEN, "dim": DIM, "input_dropout": 0.0,
              "encoder": {"_target_": "hstu.model.hstu.HSTUEncoder", "num_blocks": 1, "num_heads": 1, "dqk": 4,
                          "dv": 4, "dropout": 0.0},
              "loss": {"kind": "sampled", "num_negatives": NEGATIVES, "temperature": 0.05}}
    yardstick = PaddedHSTU.from_model_config(config, NUM_ITEMS)
    inputs = PaddedBatch.from_jagged(jagged_batch([4, 7]), MAX_LEN).tensors()
    assert yardstick(*inputs) != yardstick(*inputs)  # a new draw every step
    with pytest.raises(ValueError, match="model.loss.kind='full'"):
        PaddedHSTU.from_model_config({**config, "loss": {"kind": "full"}}, NUM_ITEMS)


def test_union_counts_overlapping_kernels_once():
    assert union_ms([(0, 4), (2, 6), (10, 11), (10.5, 10.7)]) == 7
    events = [
        {"cat": "kernel", "name": "a", "ts": 0.0, "dur": 400.0},
        {"cat": "kernel", "name": "b", "ts": 200.0, "dur": 400.0},  # another stream, overlapping a
        {"cat": "kernel", "name": "a", "ts": 1000.0, "dur": 100.0},
        {"cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 2000.0, "dur": 50.0},
        {"cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 0.0, "dur": 5.0},
    ]
    gpu = summarise_gpu_events(events, steps=2)
    assert gpu["kernel_ms"] == pytest.approx(0.45)  # (400 + 400 + 100) us over 2 steps
    assert gpu["busy_ms"] == pytest.approx(0.35)  # the union: 600 + 100 us
    assert gpu["kernels_per_step"] == 1.5 and gpu["copies_per_step"] == 0.5
    assert [k["name"] for k in gpu["top_kernels"]] == ["a", "b"]


def test_profile_steps_on_cpu_reports_wall_time_only():
    calls = []

    def step():
        calls.append(1)
        time.sleep(0.004)
        return torch.tensor(float(len(calls)))

    profile = profile_steps(step, steps=5, warmup=2, samples_per_step=128, tokens_per_step=1000, device="cpu")
    assert len(calls) == 7  # no profiled phase without CUDA
    assert 4.0 <= profile.wall_ms < 200
    assert profile.samples_per_s == pytest.approx(128 / profile.wall_ms * 1e3)
    assert profile.tokens_per_s == pytest.approx(1000 / profile.wall_ms * 1e3)
    assert profile.warmup_s >= 0.008
    assert (profile.first_value, profile.last_value) == (1.0, 7.0)
    assert profile.kernel_ms is None and profile.busy_pct is None and profile.peak_memory_mb is None
    assert "wall time only" in profile.note


def test_batches_are_seeded_and_fall_back_to_ml1m_lengths_without_the_cache(tmp_path):
    bench = load_script()
    first = bench.build_batches(bench.CONFIGS["ml1m"], 2, tmp_path, seed=3)
    again = bench.build_batches(bench.CONFIGS["ml1m"], 2, tmp_path, seed=3)
    assert first["checksum"] == again["checksum"]
    assert first["source"].startswith("SYNTHETIC, the ML-1M cache") and str(tmp_path) in first["source"]
    torch.save(first, tmp_path / "pool.pt")
    info, batches = bench.load_batches(tmp_path / "pool.pt")
    assert info["num_items"] == 3706 and len(batches) == 2
    for batch in batches:
        lengths = batch.seq_offsets.diff()
        assert batch.batch_size == 128 and lengths.min() >= 18 and lengths.max() <= 200
        assert batch.check(200, 3706) is batch  # the extent travelled with it: no read on the device
        starts_sequence = torch.zeros(batch.num_tokens, dtype=torch.bool)
        starts_sequence[batch.seq_offsets[:-1]] = True
        assert (batch.timestamps.diff()[~starts_sequence[1:]] >= 0).all()  # time never goes back in a sequence
        assert (batch.target_timestamps >= batch.timestamps[batch.seq_offsets[1:] - 1]).all()


def test_captured_variant_is_reported_unavailable_without_cuda():
    bench = load_script()
    with pytest.raises(bench.VariantUnavailable, match="needs a CUDA device"):
        bench.captured_step(setup=SimpleNamespace(device=torch.device("cpu")))


@pytest.mark.slow
def test_script_runs_a_tiny_variant_end_to_end(tmp_path, capsys):
    """The parent in this process (its argument parsing, batches, table and files), the variant in a child."""
    bench = load_script()
    report = bench.main(["--configs", "smoke", "--variants", "yardstick-eager", "--steps", "2", "--warmup", "1",
                         "--batches", "2", "--out", str(tmp_path)])
    (run_dir,) = tmp_path.iterdir()
    assert json.loads((run_dir / "bench_e2e.json").read_text()) == json.loads(json.dumps(report, default=str))
    (row,) = report["rows"]
    assert row["status"] == "ok", row
    assert row["samples_per_s"] == pytest.approx(16 / row["wall_ms"] * 1e3)
    assert row["batches_checksum"] == report["configs"]["smoke"]["checksum"]
    assert row["first_value"] > 0 and row["last_value"] > 0
    with open(run_dir / "bench_e2e.csv") as handle:
        (csv_row,) = list(csv.DictReader(handle))
    assert csv_row["variant"] == "yardstick-eager" and float(csv_row["samples_per_s"]) > 0
    assert (run_dir / "logs" / "smoke__yardstick-eager.log").exists()
    assert not list(run_dir.rglob("*.partial"))
    assert "yardstick-eager" in capsys.readouterr().out


@pytest.mark.gpu
def test_profile_steps_on_cuda_counts_kernels_of_eager_steps_and_of_graph_replays():
    """Kernel time never exceeds wall time, the union never exceeds the sum, and kernels replayed from a
    CUDA graph captured before the profiler attaches are still counted."""
    x = torch.randn(2048, 2048, device="cuda")

    def eager_step():
        return (x @ x).relu().sum()

    eager = profile_steps(eager_step, steps=5, warmup=2, samples_per_step=1, device="cuda")
    assert eager.kernels_per_step >= 3  # matmul, relu, reduction
    # The profiled steps are not the timed ones (the clocks may differ a little between them).
    assert 0 < eager.busy_ms <= eager.kernel_ms * (1 + 1e-6) and eager.kernel_ms <= eager.wall_ms * 1.2
    assert 0 < eager.busy_pct <= 120 and eager.peak_memory_mb > 2048 * 2048 * 4 / 2**20

    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        eager_step()  # warm up (cuBLAS workspace) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    with torch.cuda.graph(graph):
        out = eager_step()
    replayed = profile_steps(lambda: (graph.replay(), out)[1], steps=5, warmup=2, samples_per_step=1, device="cuda")
    assert replayed.kernels_per_step >= 3, replayed.note
    assert replayed.last_value == pytest.approx(eager.last_value, rel=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_compiled_yardstick_matches_eager_on_cuda(mode):
    """torch.compile and its CUDA-graph mode compute the eager yardstick's loss (fp32, dropout 0, fixed
    negatives), step after step with the optimizer in between."""
    torch.manual_seed(0)
    config = {"max_seq_len": MAX_LEN, "dim": 16, "input_dropout": 0.0,
              "encoder": {"_target_": "hstu.model.hstu.HSTUEncoder", "num_blocks": 2, "num_heads": 2, "dqk": 8,
                          "dv": 8, "dropout": 0.0},
              "loss": {"kind": "sampled", "num_negatives": NEGATIVES, "temperature": 0.05}}
    eager = PaddedHSTU.from_model_config(config, NUM_ITEMS).cuda()
    compiled_model = PaddedHSTU.from_model_config(config, NUM_ITEMS).cuda()
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, dynamic=False, mode=mode)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for m in (eager, compiled_model)]
    g = torch.Generator().manual_seed(2)
    for step in range(4):
        batch = PaddedBatch.from_jagged(jagged_batch([5, 1, MAX_LEN, 3], seed=step), MAX_LEN).to("cuda")
        negatives = torch.randint(1, NUM_ITEMS + 1, (4, MAX_LEN, NEGATIVES), generator=g).cuda()
        losses = []
        for forward, optimizer in zip((eager, compiled), optimizers):
            if mode == "reduce-overhead" and forward is compiled:
                torch.compiler.cudagraph_mark_step_begin()
            loss = forward(*batch.tensors(), negatives=negatives)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        # Inductor sums in another order, and after a few AdamW steps (which divide by sqrt(v) and so
        # magnify differences in small gradients) fp32 rounding shows in the 4th-5th digit.
        assert losses[1] == pytest.approx(losses[0], rel=1e-3), step


@pytest.mark.parametrize("out", ["file/bench", "file/deeper/bench", "file"])
def test_an_out_folder_that_cannot_be_made_is_refused_in_one_line_before_any_batch_is_built(tmp_path, monkeypatch, out):
    bench = load_script()
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(bench, "build_batches", lambda *args: pytest.fail("built batches for a run it cannot write"))
    with pytest.raises(SystemExit, match=f"^--out {tmp_path}/{out}: cannot make a run folder there "
                                         r"\(Not a directory\)$"):
        bench.main(["--configs", "smoke", "--variants", "yardstick-eager", "--out", str(tmp_path / out)])
    assert (tmp_path / "file").read_text() == ""


def test_batches_the_data_cannot_fill_stop_the_run_before_its_folder_is_made(tmp_path, monkeypatch):
    bench = load_script()

    def build_batches(config, count, data_dir, seed):  # as ML-1M refuses more batches than it has
        raise SystemExit(f"--batches {count}: ML-1M has only 47 full training batches of 128")

    monkeypatch.setattr(bench, "build_batches", build_batches)
    with pytest.raises(SystemExit, match="^--batches 100000: ML-1M has only 47"):
        bench.main(["--configs", "smoke", "--variants", "yardstick-eager", "--batches", "100000",
                    "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_ml1m_without_its_cache_is_refused_unless_synthetic_batches_are_asked_for(tmp_path, monkeypatch):
    """No row labelled ml1m is measured on synthetic batches unless --synthetic-batches asks for them; then
    every ml1m row says so."""
    bench = load_script()
    args = ["--configs", "ml1m,smoke", "--variants", "trainer-eager-fp32", "--steps", "1", "--warmup", "1",
            "--batches", "1", "--data-dir", str(tmp_path / "no-data"), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match=f"^--data-dir {tmp_path}/no-data: no ML-1M cache ml-1m-.*npz there .*"
                                         "downloads it, or --synthetic-batches times ml1m on synthetic batches$"):
        bench.main(args)
    assert not (tmp_path / "out").exists()

    def run_variant(config, variant, batches_file, run_dir, timeout, args):  # no child process: a row as it returns
        checksum = torch.load(batches_file, weights_only=True)["checksum"]
        return {"config": config, "variant": variant, "status": "ok", "samples_per_s": 1.0, "wall_ms": 1.0,
                "batches_checksum": checksum}

    monkeypatch.setattr(bench, "run_variant", run_variant)
    report = bench.main(args + ["--synthetic-batches"])
    notes = {row["config"]: row.get("note", "") for row in report["rows"]}
    assert notes == {"ml1m": "SYNTHETIC batches (no ML-1M cache)", "smoke": ""}
    assert report["configs"]["ml1m"]["source"].startswith("SYNTHETIC")
