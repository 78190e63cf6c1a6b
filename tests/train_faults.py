"""Faults injected into real training runs by the tests, as Lightning callbacks added from the command line:
``+callbacks.fault._target_=train_faults.SignalAt +callbacks.fault.epoch=2`` (tests/ on PYTHONPATH).
Test-only: no product config names them."""
from __future__ import annotations

import os
import signal

import lightning as L
import torch


class SignalAt(L.Callback):
    """Sends ``signal_name`` to this process before batch ``batch`` of epoch ``epoch``: a crash (SIGKILL)
    or a Ctrl-C (SIGINT) in the middle of an epoch, after every checkpoint of the epochs before."""

    def __init__(self, epoch: int, batch: int = 1, signal_name: str = "SIGKILL"):
        self.epoch, self.batch, self.signal = epoch, batch, getattr(signal, signal_name)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            os.kill(os.getpid(), self.signal)


class NaNLossFrom(L.Callback):
    """Makes every training loss NaN from batch ``batch`` of epoch ``epoch`` on (on global rank ``rank``
    alone when given)."""

    def __init__(self, epoch: int, batch: int, rank: int | None = None):
        self.epoch, self.batch, self.rank = epoch, batch, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            clean = pl_module.model.training_loss
            pl_module.model.training_loss = lambda b: clean(b) * torch.tensor(float("nan"))
