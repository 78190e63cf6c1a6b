"""RecModule: the LightningModule that trains a SequentialRecommender and ranks every item to evaluate it."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import lightning as L
import torch

from hstu.data.batch import JaggedBatch
from hstu.guards import NonFiniteLossFlag
from hstu.metrics import RetrievalMetrics
from hstu.model.recommender import SequentialRecommender


# Devices where torch's fused AdamW runs, and so can skip an update on the device (see hstu.guards).
FUSED_OPTIMIZER_DEVICES = ("cpu", "cuda")


class RecModule(L.LightningModule):
    """Hyperparameters are plain values (saved in checkpoints, loadable without unpickling objects).

    Each training loss is recorded in ``nonfinite`` (device tensors, no host read); AdamW runs fused
    and skips its update while that flag is set (``hstu.callbacks.StopOnNonFiniteLoss`` ends the run
    at the epoch's end)."""

    def __init__(
        self,
        num_items: int,
        max_seq_len: int,
        dim: int,
        input_dropout: float,
        encoder: Mapping[str, Any],
        loss: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        kernels: Mapping[str, bool] | None = None,
        kernel_fallback: str = "warn",
        compile: bool = False,
        backward_on_caller_thread: bool = True,
        eval_ks: Sequence[int] = (10, 50, 200),
        time_scales: Sequence[Sequence[int]] = (),
        position_from_end: bool = False,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = SequentialRecommender(
            num_items, max_seq_len, dim, input_dropout, encoder, loss, kernels, kernel_fallback,
            time_scales, position_from_end,
        )
        if compile:
            self.model.compile_parts()
        self.eval_ks = tuple(eval_ks)
        self.val_metrics = RetrievalMetrics(ks=self.eval_ks, validate=False)
        self.test_metrics = RetrievalMetrics(ks=self.eval_ks, validate=False)
        self.nonfinite = NonFiniteLossFlag()

    @property
    def manager(self):
        return self.model.manager

    def training_step(self, batch: JaggedBatch, batch_idx: int) -> torch.Tensor:
        loss = self.model.training_loss(batch)
        self.nonfinite.record(loss)
        self.log("train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=batch.batch_size)
        return loss

    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        """With ``backward_on_caller_thread`` (the default), autograd runs the backward on this thread
        instead of handing it to its per-device worker thread. On one GPU the handoff buys nothing and
        costs host time: the attention's forward+backward ran 1.0-3.2x as fast on the caller thread
        at the model's shapes, never slower; end to end, five paired runs gave -27% to +36%, median +19%
        (BENCHMARKS.md, "The backward thread")."""
        with torch.autograd.set_multithreading_enabled(not self.hparams.backward_on_caller_thread):
            super().backward(loss, *args, **kwargs)

    def _rank(self, batch: JaggedBatch, metrics: RetrievalMetrics) -> None:
        _, _, target_rank = self.model.recommend(batch, k=max(self.eval_ks), with_target_rank=True)
        metrics.update(target_rank)

    def validation_step(self, batch: JaggedBatch, batch_idx: int) -> None:
        self._rank(batch, self.val_metrics)

    def test_step(self, batch: JaggedBatch, batch_idx: int) -> None:
        self._rank(batch, self.test_metrics)

    def _log_metrics(self, stage: str, metrics: RetrievalMetrics) -> None:
        values = metrics.compute()
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=False)
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def configure_optimizers(self):
        opt = self.hparams.optimizer
        optimizer = torch.optim.AdamW(
            self.parameters(), lr=opt["lr"], betas=tuple(opt["betas"]), weight_decay=opt["weight_decay"],
            fused=self.device.type in FUSED_OPTIMIZER_DEVICES,
        )
        self.nonfinite.reset(self.device)
        self.nonfinite.attach(optimizer)
        return optimizer
