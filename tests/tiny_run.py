"""The tiny synthetic training run shared by the export, serving and bad-input tests (conftest.py trains it once)."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import hstu.config  # noqa: F401  (registers the config schemas)
from hstu.train import train

ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 8
# Histories of 4..11 events against max_seq_len 8: test histories are cut, and the cut must not unmask.
TINY_RUN = [
    "data=synthetic", "data.source.num_users=64", "data.source.num_items=40", "data.source.num_clusters=4",
    "data.source.min_len=6", "data.source.max_len=12", f"model.max_seq_len={MAX_SEQ_LEN}", "model.dim=8",
    "model.encoder.dqk=8", "model.encoder.dv=8", "model.encoder.num_blocks=1", "model.loss.num_negatives=8",
    "model.eval_ks=[5,10]", "data.batch_size=32", "trainer.max_epochs=1", "trainer.accelerator=cpu",
    "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "~callbacks.rich_progress_bar",
    "logger=csv",
]


def train_tiny_run(out: Path) -> Path:
    """Train the tiny run into ``out``, laid out as the Hydra command line leaves it (.hydra/config.yaml included)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[*TINY_RUN, f"paths.output_dir={out}", f"paths.data_dir={out / 'data'}"])
    train(cfg)
    saved = OmegaConf.to_container(cfg, resolve=False)
    saved["paths"]["output_dir"] = "${hydra:runtime.output_dir}"  # what Hydra writes there
    (out / ".hydra").mkdir()
    OmegaConf.save(OmegaConf.create(saved), out / ".hydra" / "config.yaml")
    return out
