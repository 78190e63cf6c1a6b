"""Lightning callbacks of a training run: throughput, the console's epoch line, checkpoints that a run
resumes from exactly, and the stop on a NaN/inf loss.

``hstu.train.train`` adds the ones a run cannot do without (:class:`EpochThroughput`,
:class:`EpochLog`, :class:`RandomState`, :class:`StopOnNonFiniteLoss`, :class:`LastCheckpoint`,
:class:`CheckpointsOfThisRun`)
when the ``callbacks`` config group has none, and :class:`ParameterSummary` in place of Lightning's model
summary. The states that a resumed run must continue from
(throughput and epoch records, random number generators) are saved in every checkpoint and
restored only when fitting resumes: ``trainer.validate/test(ckpt_path=...)`` restore callbacks too,
and must not rewind them.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks import RichProgressBar as _RichProgressBar
from lightning.pytorch.trainer.states import TrainerFn

from hstu.data.datamodule import batches_done_within_epoch
from hstu.distributed import gathered_over_processes, max_over_processes, sum_over_processes
from hstu.errors import TrainingDivergedError

log = logging.getLogger(__name__)


class _ResumableState(L.Callback):
    """A callback whose ``state_dict`` is saved in checkpoints and restored only when fitting resumes."""

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None and trainer.state.fn == TrainerFn.FITTING:
            self.restore(state)

    def restore(self, state: dict[str, Any]) -> None:
        raise NotImplementedError


class EpochThroughput(_ResumableState):
    """Throughput per training epoch: samples/s, real (unpadded) tokens/s and wall time. Under DDP the
    samples and tokens of every process are added up over the slowest process's epoch time (the job's
    throughput, as ``samples_per_sec``), and ``samples_per_sec_per_process`` is that divided by the processes.

    Measured from the epoch's start to its last training step, with the device synchronised at both
    ends, so it counts every step and no validation: the clock pauses while any validation of the epoch
    runs (``trainer.val_check_interval`` < 1 validates within it) and resumes at the next training
    batch. Lightning's ThroughputMonitor only reports after ``window_size`` steps, and ML-1M has about
    48 steps an epoch.
    """

    def __init__(self):
        self.history: list[dict[str, float]] = []
        self._running_since: float | None = None  # None while paused
        self._timed_here = False  # whether this process has trained an epoch (a resumed run restores others)
        self._seconds = 0.0
        self._samples = 0
        self._tokens = 0

    @staticmethod
    def _sync(pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._samples = self._tokens = 0
        self._seconds = 0.0
        self._start_clock(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._running_since is None:  # after a validation within the epoch
            self._start_clock(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._samples += batch.batch_size
        self._tokens += batch.num_tokens

    def _start_clock(self, pl_module) -> None:
        self._sync(pl_module)
        self._running_since = time.perf_counter()

    def _stop_clock(self, pl_module) -> None:
        if self._running_since is not None:
            self._sync(pl_module)
            self._seconds += time.perf_counter() - self._running_since
            self._running_since = None

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # a validation inside fit (the epoch's end, or within it)
            self._stop_clock(pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_clock(pl_module)
        samples, tokens = sum_over_processes(trainer, [self._samples, self._tokens])
        seconds = max_over_processes(trainer, self._seconds)  # the slowest process's epoch
        row = {
            "epoch": trainer.current_epoch,
            "epoch_time_s": seconds,
            "samples_per_sec": samples / seconds,
            "tokens_per_sec": tokens / seconds,
        }
        if trainer.world_size > 1:
            row["samples_per_sec_per_process"] = samples / seconds / trainer.world_size
        # the same on every process (sums over them): max over processes passes them unchanged
        pl_module.log_dict({f"train/{k}": float(v) for k, v in row.items() if k != "epoch"}, sync_dist=True,
                           reduce_fx="max")
        row["warm_up"] = not self._timed_here  # this process's first epoch: compilation, capture, caches
        self._timed_here = True
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def restore(self, state: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state["history"]]

    def summary(self) -> dict[str, float]:
        """Means over the epochs that were not a process's first (which pays compilation and warm-up: the
        run's first epoch, and a resumed run's first)."""
        rows = [r for i, r in enumerate(self.history) if i > 0 and not r.get("warm_up")] or self.history
        if not rows:
            return {}
        means = {key: sum(r[key] for r in rows) / len(rows)
                 for key in ("epoch_time_s", "samples_per_sec", "tokens_per_sec", "samples_per_sec_per_process")
                 if all(key in r for r in rows)}
        return {"epochs_timed": len(rows), **means, "first_epoch_time_s": self.history[0]["epoch_time_s"]}


class EpochLog(_ResumableState):
    """One console line per training epoch (loss, samples/s, validation NDCG@10 and HR@10), and the
    same values kept in ``history`` for metrics.json. Reads what the epoch logged, so it must come
    after :class:`EpochThroughput` in the callback list."""

    METRICS = {"loss": "train/loss", "samples_per_sec": "train/samples_per_sec", "epoch_time_s": "train/epoch_time_s",
               "val_ndcg@10": "val/ndcg@10", "val_hr@10": "val/hr@10"}

    def __init__(self):
        self.history: list[dict[str, float | int]] = []
        self._validated_epoch: int | None = None

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        logged = trainer.callback_metrics
        validated = self._validated_epoch == trainer.current_epoch  # else val/* are an older epoch's
        row: dict[str, float | int] = {"epoch": trainer.current_epoch}
        for name, key in self.METRICS.items():
            if key in logged and (validated or not name.startswith("val_")):
                row[name] = float(logged[key])
        if self.history and self.history[-1]["epoch"] == row["epoch"]:  # resumed inside this epoch: its whole row
            self.history[-1] = row
        else:
            self.history.append(row)
        if trainer.is_global_zero:
            log.info(self.line(row, trainer.max_epochs))

    @staticmethod
    def line(row: dict[str, float | int], max_epochs: int | None) -> str:
        last = f"/{max_epochs - 1}" if max_epochs and max_epochs > 0 else ""
        parts = [f"epoch {row['epoch']}{last}", f"loss {row.get('loss', float('nan')):.4f}"]
        if "val_ndcg@10" in row:
            parts.append(f"val ndcg@10 {row['val_ndcg@10']:.4f} hr@10 {row.get('val_hr@10', float('nan')):.4f}")
        if "samples_per_sec" in row:
            parts.append(f"{row['samples_per_sec']:.0f} samples/s ({row.get('epoch_time_s', float('nan')):.2f} s)")
        return "  ".join(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(row) for row in self.history]}

    def restore(self, state: dict[str, Any]) -> None:
        self.history = [dict(row) for row in state["history"]]


class RandomState(_ResumableState):
    """Saves the random number generators (torch CPU and CUDA, numpy, Python) in every checkpoint and
    restores them when a run resumes, so dropout and sampled negatives continue as if uninterrupted.
    Stored as tensors and plain values: checkpoints stay loadable with ``weights_only=True``. Under DDP
    every process's generators are saved (``ranks``, by global rank; the top level holds rank zero's) and
    each process restores its own; on another number of processes every one restores rank zero's.

    The generators of a checkpoint written inside an epoch (a ``trainer.max_steps`` stop, a validation within
    the epoch) are restored once the resumed run has made its training loader, which draws a seed from them:
    the epoch's own loader had drawn it before the steps the checkpoint follows."""

    def __init__(self):
        self._within_epoch: dict[str, Any] | None = None  # to restore when the resumed training starts
        self._rank, self._processes = 0, 1

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._rank, self._processes = trainer.global_rank, trainer.world_size

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if "callbacks" not in checkpoint:  # a weights-only checkpoint holds no callback states (on every process)
            return
        state = checkpoint["callbacks"][self.state_key]
        if batches_done_within_epoch(trainer):
            state["within_epoch"] = True
        if trainer.world_size > 1:
            state["ranks"] = gathered_over_processes(trainer, self.state_dict())

    def restore(self, state: dict[str, Any]) -> None:
        ranks = state.get("ranks")
        own = ranks[self._rank] if ranks is not None and len(ranks) == self._processes else state
        if state.get("within_epoch"):
            self._within_epoch = own
        else:
            self._restore(own)

    def on_train_start(self, trainer, pl_module) -> None:
        if self._within_epoch is not None:
            self._restore(self._within_epoch)
            self._within_epoch = None

    def state_dict(self) -> dict[str, Any]:
        numpy_state = np.random.get_state(legacy=False)
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {
                "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
                "pos": int(numpy_state["state"]["pos"]),
                "has_gauss": int(numpy_state["has_gauss"]),
                "gauss": float(numpy_state["gauss"]),
            },
            "python": random.getstate(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])
        numpy_state = state["numpy"]
        np.random.set_state({
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        })
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))


class StopOnNonFiniteLoss(L.Callback):
    """Stops the run when a training loss of the epoch was NaN or inf, before any checkpoint of that
    epoch is written, so the last checkpoint holds the last good weights.

    The module records its losses in a :class:`hstu.guards.NonFiniteLossFlag` (``pl_module.nonfinite``)
    on the device; this callback reads it when a validation within fit starts (at the epoch's end, or
    within it with ``trainer.val_check_interval`` < 1) and at the epoch's end, unless no step ran since
    the last read (checkpoint callbacks save after each)."""

    def __init__(self):
        self._checked_step: int | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        flag = getattr(pl_module, "nonfinite", None)
        if flag is None:
            return
        flag.reset(pl_module.device)  # steps are numbered from 0 in each epoch
        for optimizer in trainer.optimizers:
            flag.attach(optimizer)
        self._checked_step = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self._check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def _check(self, trainer, pl_module) -> None:
        flag = getattr(pl_module, "nonfinite", None)
        if flag is None or self._checked_step == trainer.global_step:
            return
        self._checked_step = trainer.global_step
        batch = flag.first_bad(lambda t: trainer.strategy.reduce(t, reduce_op="min"))
        if batch is None:
            return
        last = next((c.path for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint) and c.path), None)
        raise TrainingDivergedError(
            f"the training loss was NaN or inf at epoch {trainer.current_epoch}, batch {batch}; updates were "
            "skipped from there and the run stops; "
            + (f"the last good checkpoint is {last}" if last else "no checkpoint was written before it")
        )


class LastCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt``, rewritten at the end of every epoch: what ``ckpt_path=last`` resumes from.

    A separate callback because Lightning's ``save_last`` on a monitored checkpoint refreshes
    last.ckpt only in epochs that make its top k."""

    def __init__(self, dirpath: str):
        super().__init__(dirpath=dirpath, filename="last", monitor=None, save_top_k=1, save_last=False,
                         enable_version_counter=False)

    @property
    def path(self) -> str | None:
        """The checkpoint written last (with no monitor, Lightning records it as the "best")."""
        return self.best_model_path or None


class CheckpointsOfThisRun(L.Callback):
    """Keeps the checkpoint callbacks' records (best path and score, top k) in the run's own folder.

    A ModelCheckpoint records its files by absolute path and, restored under another ``dirpath``,
    Lightning keeps only its best path, which then names the old folder's file, and forgets the scores:
    the resumed run would select its first new epoch over better ones before it. So the record is
    re-rooted in the run's folder and restored whole. Resuming from a file in a checkpoint callback's own
    folder (a run moved or copied) finds the files there; a new run started from another run's checkpoint
    first copies that run's k best files into its own folder (those no longer there drop out of the
    record). Either way the run selects the epoch the uninterrupted run would."""

    PATH_KEYS = ("best_model_path", "kth_best_model_path", "last_model_path")

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        states = checkpoint.get("callbacks") or {}
        loaded = Path(os.path.realpath(trainer.ckpt_path)).parent if trainer.ckpt_path else None
        for callback in trainer.checkpoint_callbacks:
            state = states.get(callback.state_key)
            if state is None or callback.dirpath is None or state.get("dirpath") in (None, callback.dirpath):
                continue
            old, new = Path(state["dirpath"]), Path(callback.dirpath)
            if loaded != new:
                state = self._with_best_files_copied(trainer, callback, state, old, new)
            states[callback.state_key] = self._rerooted(state, old, new)

    @staticmethod
    def _with_best_files_copied(trainer, callback: ModelCheckpoint, state: dict[str, Any], old: Path,
                                new: Path) -> dict[str, Any]:
        """``state`` once rank zero has copied the files of its k best checkpoints from ``old`` to ``new``;
        the best and k-th are chosen again among the files still there if any are gone."""
        recorded = state.get("best_k_models", {})
        kept = {path: score for path, score in recorded.items() if Path(path).is_relative_to(old) and Path(path).is_file()}
        if trainer.is_global_zero:
            for path in kept:
                target = new / Path(path).relative_to(old)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
        if len(kept) == len(recorded):
            return state
        ranked = sorted(kept, key=lambda path: float(kept[path]), reverse=callback.mode == "max")
        chosen = {"best_k_models": kept, "best_model_path": ranked[0] if ranked else "",
                  "best_model_score": kept[ranked[0]] if ranked else None,
                  "kth_best_model_path": ranked[-1] if ranked else ""}
        if ranked:
            chosen["kth_value"] = kept[ranked[-1]]
        return {**{key: value for key, value in state.items() if key != "kth_value"}, **chosen}

    @classmethod
    def _rerooted(cls, state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
        def moved(path: str) -> str:
            return str(new / Path(path).relative_to(old)) if path and Path(path).is_relative_to(old) else path

        return {**state, "dirpath": str(new), **{key: moved(state[key]) for key in cls.PATH_KEYS if key in state},
                "best_k_models": {moved(path): score for path, score in state.get("best_k_models", {}).items()}}


class ParameterSummary(L.Callback):
    """One line at the start of fitting: the model's parameters in all and by part (``experiment=ml1m-quick``:
    ``parameters: 221,506 (0.89 MB): embedding 195,350, encoder 26,156``). It stands in for Lightning's
    summary table, whose FLOPs column reads 0 without an example input and whose rows are the module's metrics."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if trainer.is_global_zero:
            log.info("parameters: %s", parameter_counts(pl_module.model))


def parameter_counts(model: torch.nn.Module) -> str:
    """``"<total> (<MB>): <part> <count>, ..."`` over the model's top-level parts that hold parameters (those
    frozen counted apart)."""
    parameters = list(model.parameters())
    total = sum(p.numel() for p in parameters)
    megabytes = sum(p.numel() * p.element_size() for p in parameters) / 1e6
    parts = [(name, sum(p.numel() for p in part.parameters())) for name, part in model.named_children()]
    frozen = sum(p.numel() for p in parameters if not p.requires_grad)
    text = f"{total:,} ({megabytes:.2f} MB)"
    if frozen:
        text += f", {frozen:,} frozen"
    return text + ": " + ", ".join(f"{name} {count:,}" for name, count in parts if count)


class RichProgressBar(_RichProgressBar):
    """Lightning's rich progress bar without the logger's version number (``v_num``), and off when the
    output is not a terminal, where it would print only its final state (:class:`EpochLog` prints a
    line per epoch either way)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not sys.stdout.isatty():
            self.disable()
        super().setup(trainer, pl_module, stage)

    def get_metrics(self, trainer, pl_module) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics
