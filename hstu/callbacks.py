"""Throughput per training epoch: samples/s, real (unpadded) tokens/s and wall time.

Measured from the epoch's start to its last training step, with the device synchronised at both
ends, so it counts every step and no validation (Lightning runs the end-of-epoch validation before
``on_train_epoch_end``). Lightning's ThroughputMonitor only reports after ``window_size`` steps,
and ML-1M has about 48 steps an epoch.
"""
from __future__ import annotations

import time

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn


class EpochThroughput(L.Callback):
    def __init__(self):
        self.history: list[dict[str, float]] = []
        self._start = 0.0
        self._seconds: float | None = None
        self._samples = 0
        self._tokens = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._samples = self._tokens = 0
        self._seconds = None
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch.batch_size
        self._tokens += batch.num_tokens

    def _stop_clock(self, pl_module) -> None:
        if self._seconds is None:
            self._sync(pl_module)
            self._seconds = time.perf_counter() - self._start

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # the end-of-epoch validation inside fit
            self._stop_clock(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_clock(pl_module)
        seconds = self._seconds
        row = {
            "epoch": trainer.current_epoch,
            "epoch_time_s": seconds,
            "samples_per_sec": self._samples / seconds,
            "tokens_per_sec": self._tokens / seconds,
        }
        self.history.append(row)
        pl_module.log_dict({f"train/{k}": float(v) for k, v in row.items() if k != "epoch"})

    def summary(self) -> dict[str, float]:
        """Means over epochs after the first (which pays compilation and warm-up)."""
        rows = self.history[1:] or self.history
        if not rows:
            return {}
        return {
            "epochs_timed": len(rows),
            "epoch_time_s": sum(r["epoch_time_s"] for r in rows) / len(rows),
            "samples_per_sec": sum(r["samples_per_sec"] for r in rows) / len(rows),
            "tokens_per_sec": sum(r["tokens_per_sec"] for r in rows) / len(rows),
            "first_epoch_time_s": self.history[0]["epoch_time_s"],
        }
