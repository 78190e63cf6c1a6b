"""EpochThroughput counts training steps only: no validation (at the epoch's end or within it) is in the epoch
time. The epoch line's loss is the epoch's own, also for an epoch that trainer.max_steps cuts short. The
progress-bar flag turns the configured progress bar off."""
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import DataLoader

from hstu.callbacks import EpochThroughput, parameter_counts
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


@pytest.mark.parametrize("val_check_interval", [1.0, 0.5])  # 0.5: a validation after batch 2 as well
def test_epoch_time_excludes_validation(val_check_interval):
    throughput = EpochThroughput()
    trainer = L.Trainer(max_epochs=2, callbacks=[throughput], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu", val_check_interval=val_check_interval)
    trainer.fit(SleepyModule(), batches(5), batches(2))
    assert len(throughput.history) == 2
    for row in throughput.history:
        assert 5 * STEP_S <= row["epoch_time_s"] < 5 * STEP_S + VAL_S, row  # each validation sleeps 2 * VAL_S
        assert row["samples_per_sec"] == 20 / row["epoch_time_s"]
        assert row["tokens_per_sec"] == 200 / row["epoch_time_s"]
    assert throughput.summary()["epochs_timed"] == 1


def test_an_epoch_cut_short_by_max_steps_reports_its_own_loss(tmp_path):
    """Two batches an epoch and max_steps=3: epoch 1 trains one step, and its line has that step's loss, not
    epoch 0's (the loss was logged at an epoch's last batch only)."""
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        cfg = compose("train", overrides=[*TINY_RUN, "trainer.max_epochs=5", "+trainer.max_steps=3",
                                          f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"])
    epochs = train(cfg)["epochs"]
    assert [row["epoch"] for row in epochs] == [0, 1] and epochs[1]["loss"] != epochs[0]["loss"], epochs


def test_progress_bar_flag_drops_the_configured_progress_bar(tmp_path):
    """The default callbacks hold a progress bar, which Lightning refuses next to enable_progress_bar=false."""
    overrides = [arg for arg in TINY_RUN if arg != "~callbacks.rich_progress_bar"]
    assert "+trainer.enable_progress_bar=false" in overrides
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}",
                                          f"paths.data_dir={tmp_path / 'data'}"])
    assert "rich_progress_bar" in cfg.callbacks
    assert train(cfg)["epochs_trained"] == 1


def test_the_parameter_summary_counts_every_part_and_the_frozen_ones():
    model = torch.nn.Module()
    model.embedding = torch.nn.Embedding(1000, 50)
    model.encoder = torch.nn.Linear(50, 50)
    model.dropout = torch.nn.Dropout()
    model.encoder.bias.requires_grad_(False)
    assert parameter_counts(model) == "52,550 (0.21 MB), 50 frozen: embedding 50,000, encoder 2,550"
