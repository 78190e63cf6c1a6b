"""Throughput per training epoch: samples/s, real (unpadded) tokens/s and wall time.

Measured between epoch start and end with the device synchronised at both ends, so it counts
every step (Lightning's ThroughputMonitor only reports after ``window_size`` steps, and ML-1M has
about 48 steps an epoch).
"""
from __future__ import annotations

import time

import lightning as L
import torch


class EpochThroughput(L.Callback):
    def __init__(self):
        self.history: list[dict[str, float]] = []
        self._start = 0.0
        self._samples = 0
        self._tokens = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        self._samples = self._tokens = 0
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch.batch_size
        self._tokens += batch.num_tokens

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._sync(pl_module)
        seconds = time.perf_counter() - self._start
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
