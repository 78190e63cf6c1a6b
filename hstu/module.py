"""RecModule: the LightningModule that trains a SequentialRecommender and ranks every item to evaluate it."""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from torch.nn.parallel import DistributedDataParallel

from hstu.data.batch import JaggedBatch
from hstu.data.datamodule import batches_done_within_epoch
from hstu.data.packing import PlannedBatch
from hstu.distributed import gathered_over_processes
from hstu.errors import ConfigError
from hstu.guards import NonFiniteLossFlag
from hstu.metrics import RetrievalMetrics
from hstu.model.recommender import SequentialRecommender
from hstu.train_step import TrainStep, make_optimizer

log = logging.getLogger(__name__)

CUDA_GRAPH_MODES = ("auto", "on", "off")


class RecModule(L.LightningModule):
    """Hyperparameters are plain values (saved in checkpoints, loadable without unpickling objects).

    Training runs through :class:`~hstu.train_step.TrainStep` (manual optimisation): with ``cuda_graphs``
    (``auto``: on one CUDA device) each step is one CUDA-graph replay over a batch packed on the device;
    otherwise an eager step. Either way nothing in a step waits for the device: each loss is recorded in
    ``nonfinite`` (AdamW runs fused and skips its update while that flag is set;
    ``hstu.callbacks.StopOnNonFiniteLoss`` ends the run at the epoch's end) and added to a sum on the
    device, read once per epoch as ``train/loss``.

    ``item_ids_digest`` (the datamodule's :attr:`~hstu.data.datamodule.SequenceDataModule.item_ids_digest`,
    taken from it at fit when not given) names the items the item table's rows stand for: export,
    evaluation and resuming compare it with the data they rebuild. ``events_digest`` (the datamodule's
    :attr:`~hstu.data.datamodule.SequenceDataModule.events_digest`, taken the same way) names the events
    trained on: evaluation and resuming compare it too."""

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
        cuda_graphs: str = "auto",
        backward_on_caller_thread: bool = True,
        eval_ks: Sequence[int] = (10, 50, 200),
        time_scales: Sequence[Sequence[int]] = (),
        position_from_end: bool = False,
        item_ids_digest: str | None = None,
        events_digest: str | None = None,
    ):
        super().__init__()
        if cuda_graphs not in CUDA_GRAPH_MODES:
            raise ValueError(f"model.cuda_graphs must be one of {CUDA_GRAPH_MODES}, got {cuda_graphs!r}")
        self.save_hyperparameters()
        self.automatic_optimization = False
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
        self.capture = False  # decided in setup(): whether training steps are captured as CUDA graphs
        self.eval_totals: dict[str, dict[str, int | float]] = {}  # stage -> RetrievalMetrics.totals()
        self._train_step: TrainStep | None = None
        self._loss_at_stop: tuple[torch.Tensor, int] | None = None  # the epoch's loss sum where max_steps stopped it
        self._resumed_epoch_loss: dict[str, Any] | None = None  # from a checkpoint written inside an epoch

    @property
    def manager(self):
        return self.model.manager

    def setup(self, stage: str) -> None:
        """At fit: record the datamodule's ``item_ids_digest`` and ``events_digest`` (when not given); capture training steps when
        ``cuda_graphs`` asks for it and the run allows it (one CUDA device, no DDP: NCCL collectives inside
        captured graphs need their own setup, so DDP runs stay eager), and then have the datamodule plan
        batches for device-side packing."""
        if stage != "fit":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        for digest in ("item_ids_digest", "events_digest"):  # saved with the hyperparameters in every checkpoint
            if self.hparams[digest] is None:
                self.hparams[digest] = getattr(datamodule, digest, None)
        mode, device = self.hparams.cuda_graphs, self.trainer.strategy.root_device
        reason = None
        if device.type != "cuda":
            reason = f"the run is on {device.type}"
        elif isinstance(self.trainer.strategy, DDPStrategy):  # one process too: DDP's reducer runs in the backward
            reason = (f"the DDP strategy, {self.trainer.world_size} process(es) (collectives inside captured graphs are "
                      "not set up)")
        if reason is not None and mode == "on":
            raise ConfigError(f"model.cuda_graphs=on: steps cannot be captured: {reason}")
        self.capture = mode != "off" and reason is None
        if mode == "auto" and reason is not None and device.type == "cuda" and self.trainer.is_global_zero:
            log.info("training steps are not captured as CUDA graphs: %s", reason)
        if self.capture and hasattr(datamodule, "planned_batches"):
            datamodule.planned_batches = True

    def training_step(self, batch: PlannedBatch | JaggedBatch, batch_idx: int) -> None:
        if self._train_step is None:
            self._train_step = self._build_train_step()
            if self._resumed_epoch_loss is not None:
                self._train_step.resume_epoch_loss(self._resumed_epoch_loss["sum"], self._resumed_epoch_loss["steps"])
                self._resumed_epoch_loss = None
        optimizer = self.optimizers()
        optimizer._on_before_step()  # Lightning counts global_step in these hooks of LightningOptimizer.step,
        with torch.autograd.set_multithreading_enabled(not self.hparams.backward_on_caller_thread):
            self._train_step(batch)  # but the update runs inside TrainStep (inside the graph, when captured)
        optimizer._on_after_step()

    def _build_train_step(self) -> TrainStep:
        datamodule = getattr(self.trainer, "datamodule", None)
        planned = getattr(datamodule, "planned_batches", False)
        layout = datamodule.packing_layout if self.capture and datamodule is not None else None
        if self.capture and layout is None:
            raise ValueError("model.cuda_graphs: captured steps need a SequenceDataModule (its packing layout)")
        wrapped = isinstance(self.trainer.strategy.model, DistributedDataParallel)
        return TrainStep(self.model, self.optimizers().optimizer, self.nonfinite,
                         sequences=datamodule.device_sequences(self.device) if planned else None,
                         layout=layout, capture=self.capture,
                         # DDP: the strategy readies the gradient all-reduce; one NaN skips every process's update
                         backward=self._ddp_backward if wrapped else None,
                         share_flag=_max_over_processes if wrapped and self.trainer.world_size > 1 else None)

    def _ddp_backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()`` between the DDP strategy's own steps around a backward (it readies DDP's
        reducer, whose hooks all-reduce the gradients). Like the plain step, it calls no
        ``on_before_backward``/``on_after_backward`` hooks: ``manual_backward`` would call every callback's
        twice a step."""
        strategy = self.trainer.strategy
        strategy.pre_backward(loss)
        loss.backward()
        strategy.post_backward(loss)

    def on_validation_model_zero_grad(self) -> None:
        """Lightning frees the gradients before each validation pass (``zero_grad`` to None). Captured
        steps have the gradients' addresses in their graphs: freed, every later replay would accumulate
        into memory that other tensors then hold (and fault once that memory goes back to the device).
        They are kept; each step zeroes them in place itself."""
        if not self.capture:
            super().on_validation_model_zero_grad()

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The epoch's mean loss, read from the device once, after its last training step (the last batch,
        or the step that reaches ``trainer.max_steps``)."""
        trainer = self.trainer
        last = batch_idx + 1 == trainer.num_training_batches or 0 <= trainer.max_steps <= trainer.global_step
        if last and self._train_step is not None:
            if batch_idx + 1 < trainer.num_training_batches:  # a max_steps stop inside the epoch: its checkpoint keeps it
                self._loss_at_stop = self._train_step.epoch_loss()
            self.log("train/loss", self._train_step.end_epoch(), on_step=False, on_epoch=True, prog_bar=True,
                     batch_size=1, sync_dist=True)  # the mean over processes (their own epoch means)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._loss_at_stop = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Inside an epoch (a max_steps stop, a validation within the epoch), the loss sum of its steps so far:
        the data loader resumes after those steps (``ResumableTrainLoader``), and the resumed epoch's mean
        loss then covers the whole epoch."""
        if not batches_done_within_epoch(self.trainer):
            return
        state = self._loss_at_stop or (self._train_step.epoch_loss() if self._train_step is not None else None)
        if state is not None and state[1]:
            # every process's own sum (by global rank; DDP's processes take the same number of steps)
            ranks = gathered_over_processes(self.trainer, [state[0], int(state[1])])
            checkpoint["epoch_loss"] = {"sum": state[0], "steps": state[1], "ranks": ranks}
        # Lightning counts an epoch that max_steps stopped as processed: resumed, it would number the sampler's
        # epoch one ahead and end the run an epoch early. The epoch is not done: processed as completed.
        for progress in checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {}).values():
            progress["processed"] = progress["completed"]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resumed = checkpoint.get("epoch_loss")
        if resumed is not None and self.trainer.state.fn == TrainerFn.FITTING:
            ranks = resumed.get("ranks") or [[resumed["sum"], resumed["steps"]]]
            if len(ranks) != self.trainer.world_size:
                raise ConfigError(f"ckpt_path={self.trainer.ckpt_path}: written inside an epoch by {len(ranks)} "
                                  f"process(es), resumed by {self.trainer.world_size}: the epoch's remaining batches "
                                  "are each process's own; resume on as many, or from a checkpoint at an epoch's end")
            loss, steps = ranks[self.trainer.global_rank]
            resumed = {"sum": loss, "steps": steps}
        self._resumed_epoch_loss = resumed

    def _rank(self, batch: JaggedBatch, metrics: RetrievalMetrics) -> None:
        _, _, target_rank = self.model.recommend(batch, k=0, with_target_rank=True)  # ranks only, no top-k lists
        metrics.update(target_rank)

    def validation_step(self, batch: JaggedBatch, batch_idx: int) -> None:
        self._rank(batch, self.val_metrics)

    def test_step(self, batch: JaggedBatch, batch_idx: int) -> None:
        self._rank(batch, self.test_metrics)

    def _log_metrics(self, stage: str, metrics: RetrievalMetrics) -> None:
        """Log the stage's metrics over every process's users (each counted once: the datamodule shards them)
        and keep their exact sums in ``eval_totals[stage]``."""
        values = metrics.compute()
        self.eval_totals[stage] = metrics.totals()
        # every process holds the same values (sums of all of them): max over processes passes them unchanged
        self.log_dict({f"{stage}/{name}": value for name, value in values.items()}, prog_bar=False,
                      sync_dist=True, reduce_fx="max")
        metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test", self.test_metrics)

    def configure_optimizers(self):
        opt = self.hparams.optimizer
        optimizer = make_optimizer(self.parameters(), opt["lr"], opt["betas"], opt["weight_decay"], self.device,
                                   capturable=self.capture)
        self.nonfinite.reset(self.device)
        self.nonfinite.attach(optimizer)
        return optimizer

    def on_train_start(self) -> None:
        """A resumed run trains with its own ``model.optimizer`` settings: restoring the checkpoint's optimizer
        state put the old run's lr, betas and weight decay back into the parameter groups."""
        opt = self.hparams.optimizer
        for group in self.optimizers().optimizer.param_groups:
            group.update(lr=opt["lr"], betas=tuple(opt["betas"]), weight_decay=opt["weight_decay"])


def _max_over_processes(flag: torch.Tensor) -> None:
    """Make ``flag`` the maximum over the processes (in place; no host read)."""
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
