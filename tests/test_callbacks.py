"""EpochThroughput counts training steps only: the end-of-epoch validation is not in the epoch time. The
progress-bar flag turns the configured progress bar off."""
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from hstu.callbacks import EpochThroughput
from hstu.train import train
from tiny_run import TINY_RUN

STEP_S, VAL_S = 0.02, 0.3


class SleepyModule(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def training_step(self, batch, batch_idx):
        time.sleep(STEP_S)
        return self.layer(torch.ones(1, 1)).sum()

    def validation_step(self, batch, batch_idx):
        time.sleep(VAL_S)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def batches(n):
    return DataLoader([SimpleNamespace(batch_size=4, num_tokens=40)] * n, batch_size=None, collate_fn=lambda b: b)


def test_epoch_time_excludes_validation():
    throughput = EpochThroughput()
    trainer = L.Trainer(max_epochs=2, callbacks=[throughput], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu")
    trainer.fit(SleepyModule(), batches(5), batches(2))
    assert len(throughput.history) == 2
    for row in throughput.history:
        assert 5 * STEP_S <= row["epoch_time_s"] < 5 * STEP_S + VAL_S, row  # validation sleeps 2 * VAL_S
        assert row["samples_per_sec"] == 20 / row["epoch_time_s"]
        assert row["tokens_per_sec"] == 200 / row["epoch_time_s"]
    assert throughput.summary()["epochs_timed"] == 1


def test_progress_bar_flag_drops_the_configured_progress_bar(tmp_path):
    """The default callbacks hold a progress bar, which Lightning refuses next to enable_progress_bar=false."""
    overrides = [arg for arg in TINY_RUN if arg != "~callbacks.rich_progress_bar"]
    assert "+trainer.enable_progress_bar=false" in overrides
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}",
                                          f"paths.data_dir={tmp_path / 'data'}"])
    assert "rich_progress_bar" in cfg.callbacks
    assert train(cfg)["epochs_trained"] == 1
