"""Fit, select, test, report: what ``scripts/train.py`` runs, from a composed Hydra config."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import re
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from hstu.baselines import baseline_metrics
from hstu.callbacks import (
    CheckpointsOfThisRun,
    EpochLog,
    EpochThroughput,
    LastCheckpoint,
    ParameterSummary,
    RandomState,
    RichProgressBar,
    StopOnNonFiniteLoss,
)
from hstu.checkpoints import check_trained_items, load_checkpoint, model_differences
from hstu.config import check_accelerator, check_config, instantiate_config
from hstu.data.sources import absolute_path
from hstu.distributed import prepare_on_rank_zero, refuse_launched_multirun, summed_operator_stats
from hstu.errors import CheckpointError, ConfigError, MissingFileError
from hstu.files import write_text_atomically
from hstu.inference import MODEL_KEYS

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"  # written at every epoch's end (hstu.callbacks.LastCheckpoint): ckpt_path=last
RUN_LOCK = ".run.lock"  # locked by the process writing into the run directory (claim_run_dir)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    return [instantiate_config(node) for node in (section or {}).values() if node is not None and "_target_" in node]


def resume_checkpoint(ckpt_path: str | None, run_dir: Path, cfg: DictConfig) -> Path | None:
    """The checkpoint to resume from: None, ``<run_dir>/checkpoints/last.ckpt`` for ``last``, else the file.
    A checkpoint that is missing, unreadable, holding pickled objects or the weights alone, of another
    model (settings that differ from ``cfg.model``), already at ``cfg.trainer``'s epoch or step limit, or
    stopped early where ``cfg.callbacks`` stops early too is an error: training never silently starts
    over, mixes models, trains nothing or trains past a stop it would repeat."""
    if ckpt_path is None:
        return None
    path = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT if ckpt_path == "last" else absolute_path(ckpt_path)
    if path.is_dir():
        raise MissingFileError(f"ckpt_path={ckpt_path}: {path} is a folder, not a checkpoint file (to resume a run "
                               "from its folder: hydra.run.dir=<run dir> ckpt_path=last)")
    if not path.is_file():
        hint = "; to resume a run, give its directory too: hydra.run.dir=<run dir> ckpt_path=last" \
            if ckpt_path == "last" else ""
        raise MissingFileError(f"ckpt_path={ckpt_path}: {path} does not exist{hint}")
    try:
        checkpoint = load_checkpoint(path)
    except CheckpointError as error:
        raise CheckpointError(f"ckpt_path={ckpt_path}: {error}") from error
    missing = [key for key in ("optimizer_states", "loops") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"ckpt_path={ckpt_path}: {path} holds no {' or '.join(missing)} (saved with "
                              "save_weights_only?): a run resumes from a full checkpoint such as last.ckpt")
    differ = model_differences(OmegaConf.to_container(cfg.model, resolve=True), checkpoint["hyper_parameters"],
                               MODEL_KEYS)
    if differ:
        raise CheckpointError(f"ckpt_path={ckpt_path}: a checkpoint of another model: it differs from this run's "
                              f"config in {', '.join(differ)}")
    _check_trains_further(f"ckpt_path={ckpt_path}: {path}", checkpoint, cfg.trainer)
    if _stops_early(cfg.get("callbacks")):
        _check_not_stopped_early(f"ckpt_path={ckpt_path}: {path}", checkpoint)
    return path


def _stops_early(callbacks_config: DictConfig | None) -> bool:
    return any(node is not None and str(node.get("_target_", "")).endswith(EarlyStopping.__name__)
               for node in (callbacks_config or {}).values())


def _check_not_stopped_early(name: str, checkpoint: dict[str, Any]) -> None:
    """ConfigError when the checkpoint's early stopping has stopped its run: restored, it would stop again
    after one more epoch, and that epoch would replace the stopped run's last checkpoint and results."""
    for key, state in (checkpoint.get("callbacks") or {}).items():
        stopped = state.get("stopped_epoch") if key.startswith(EarlyStopping.__name__) else None
        if isinstance(stopped, int) and stopped > 0:
            monitor = re.search(r"'monitor': '([^']*)'", key)
            waited = state.get("wait_count")
            raise ConfigError(f"{name}: its run stopped early at epoch {stopped} ({monitor[1] if monitor else 'the metric'}"
                              f" did not improve for {waited} validation{'' if waited == 1 else 's'}); evaluate it "
                              "with scripts/eval.py, or train on without early stopping (~callbacks.early_stopping)")


def _drop_expected_resume_warnings(callbacks_config: DictConfig | None) -> None:
    """Lightning's warnings on resuming that state what is expected here: the run's own checkpoints folder is not
    empty; and, where this run leaves early stopping out (the remedy a stopped run's refusal gives), that the
    checkpoint holds early-stopping state with no callback to restore it into."""
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    if not _stops_early(callbacks_config):
        warnings.filterwarnings("ignore", message=r"Be aware that when using `ckpt_path`, callbacks used to create the "
                                r"checkpoint .* Please add the following callbacks: \[\"EarlyStopping[^\"]*\"\]\.$")


def _check_trains_further(name: str, checkpoint: dict[str, Any], trainer_config: DictConfig) -> None:
    """ConfigError when the checkpoint has reached ``trainer.max_epochs`` or ``trainer.max_steps``: Lightning
    would train nothing and the run would only test the old weights again."""
    epochs = checkpoint.get("loops")
    for key in ("fit_loop", "epoch_progress", "current", "processed"):
        epochs = epochs.get(key) if isinstance(epochs, dict) else None
    steps = checkpoint.get("global_step")
    for key, done, unit in (("max_epochs", epochs, "epochs"), ("max_steps", steps, "steps")):
        limit = trainer_config.get(key)
        if isinstance(limit, int) and isinstance(done, int) and 0 <= limit <= done:
            raise ConfigError(f"{name}: has trained {done} {unit}, and trainer.{key}={limit} trains no more; raise "
                              f"trainer.{key} to train on, or evaluate it with scripts/eval.py")


def check_resumed_items(path: Path, ckpt_path: str, datamodule, run_dir: Path) -> None:
    """DataError naming the checkpoint when it was trained on other items than the data has (a data
    override left out): its item embeddings would be loaded against other items. A run resumed in its
    own directory must also find the events it trained on, or its epochs would mix two datasets (a new
    run may start from another run's checkpoint on new events of the same items)."""
    in_place = path.resolve().parent == (run_dir / CHECKPOINT_DIR).resolve()
    check_trained_items(f"ckpt_path={ckpt_path}: {path}", load_checkpoint(path)["hyper_parameters"],
                        datamodule.num_items, datamodule.item_ids_digest,
                        "resume with the data settings of the run that wrote it",
                        datamodule.events_digest if in_place else None)


def _check_kernels_can_run(manager) -> None:
    """With model.kernel_fallback=error, a switched-on Triton operator that cannot run on this machine
    stops the run before training, not at its first call."""
    for op, state in manager.get_operator_availability().items():
        if state["requested"] and not state["available"]:
            raise ConfigError(f"model.kernel_fallback=error: the Triton operator {op!r} cannot run here: "
                              f"{state['reason']}")


def check_run_dir(run_dir: Path, resume: Path | None) -> None:
    """Refuse to write into a directory that holds another run's results or checkpoints, unless this run
    resumes it from its last checkpoint (``ckpt_path=last``): starting from another run's checkpoint, or
    from an earlier checkpoint of this one, makes a new run, which needs a directory of its own (in place it
    would overwrite the later epochs' last checkpoint and the results)."""
    checkpoints = run_dir / CHECKPOINT_DIR
    if resume is not None and resume.resolve().parent == checkpoints.resolve():
        if resume.name == LAST_CHECKPOINT:
            return
        raise ConfigError(f"ckpt_path={resume}: an earlier checkpoint of the run in {run_dir}; resuming it there "
                          "would overwrite the run's last checkpoint and results: resume the run with ckpt_path=last, "
                          "or leave hydra.run.dir unset to start a new run from this file")
    for found in (run_dir / METRICS_FILE, *(sorted(checkpoints.glob("*.ckpt")) if checkpoints.is_dir() else [])):
        if found.is_file():
            raise ConfigError(f"{run_dir} holds another run ({found.relative_to(run_dir)}); resume it with "
                              "ckpt_path=last, or leave hydra.run.dir unset for a new directory")


def claim_run_dir(run_dir: Path, key: str = "hydra.run.dir", what: str = "run") -> int | None:
    """Lock ``<run_dir>/.run.lock`` (flock) until the returned descriptor is closed or the process ends,
    however it ends: of two runs (or sweeps: ``key`` and ``what`` name them) started into one directory,
    new or resumed, the second stops here with a ConfigError, before either has written what
    :func:`check_run_dir` looks for. The ranks other than zero of a DDP job write into rank zero's
    directory and claim nothing (None)."""
    if rank_zero_only.rank != 0 or os.environ.get("NODE_RANK", "0") != "0":
        return None
    descriptor = os.open(run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise ConfigError(f"{key}={run_dir}: another {what} is writing into this directory now; wait for it "
                          f"to end, or leave {key} unset for a new directory") from None
    return descriptor


def _checkpoint_callbacks(callbacks: list[Any], has_validation: bool, checkpoint_dir: Path) -> list[Any]:
    """The configured callbacks with what every run needs: under data.protocol=paper (no validation,
    no model selection) no monitored checkpoint or early stopping; always a :class:`LastCheckpoint`."""
    if not has_validation:
        callbacks = [c for c in callbacks if not isinstance(c, EarlyStopping)
                     and not (isinstance(c, ModelCheckpoint) and c.monitor is not None)]
    if not any(isinstance(c, LastCheckpoint) for c in callbacks):
        callbacks.append(LastCheckpoint(str(checkpoint_dir)))
    return callbacks


def _with_run_callbacks(callbacks: list[Any]) -> tuple[list[Any], EpochThroughput, EpochLog]:
    """Adds the callbacks a run relies on when the config has none; EpochLog must follow EpochThroughput."""
    def existing(kind):
        return next((c for c in callbacks if isinstance(c, kind)), None)

    throughput = existing(EpochThroughput) or EpochThroughput()
    epoch_log = existing(EpochLog) or EpochLog()
    rest = [c for c in callbacks if c is not throughput and c is not epoch_log]
    extras = [kind() for kind in (RandomState, StopOnNonFiniteLoss, CheckpointsOfThisRun)
              if existing(kind) is None]
    return [*rest, throughput, epoch_log, *extras], throughput, epoch_log


def default_precision(trainer_cfg: DictConfig) -> str:
    """``trainer.precision`` as set, or when it is null: bf16-mixed on a CUDA device that has bf16 (the
    kernels accumulate in fp32 and the loss takes fp32 logits), 32-true elsewhere."""
    if trainer_cfg.get("precision") is not None:
        return str(trainer_cfg.precision)
    on_cuda = trainer_cfg.get("accelerator", "auto") in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_cuda and torch.cuda.is_bf16_supported() else "32-true"


@contextlib.contextmanager
def float32_matmul_precision(precision: str | None) -> Iterator[None]:
    """torch's float32 matmul precision set for a block and restored after it (None: left as it is). It is
    process-wide: a run called in process (tests, notebooks) must not leave TF32 on for what follows."""
    previous = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def train(cfg: DictConfig) -> dict[str, Any]:
    """Train, evaluate with full ranking and write ``metrics.json`` in ``paths.output_dir``; on CUDA with
    TF32 matmuls for the run's duration."""
    with float32_matmul_precision("high" if torch.cuda.is_available() else None):
        return _train(cfg)


def _train(cfg: DictConfig) -> dict[str, Any]:
    check_config(cfg)
    check_accelerator(cfg.trainer.get("accelerator"), "trainer.accelerator")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        log.info("run directory: %s", out_dir.resolve())
    resume = resume_checkpoint(cfg.get("ckpt_path"), out_dir, cfg)
    check_run_dir(out_dir, resume)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate_config(cfg.data)
    has_validation = datamodule.has_validation
    callbacks = _checkpoint_callbacks(_instantiate_all(cfg.get("callbacks")), has_validation, out_dir / CHECKPOINT_DIR)
    callbacks, throughput, epoch_log = _with_run_callbacks(callbacks)
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a progress-bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    elif not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(RichProgressBar())  # Lightning's default would print its bars into log files too
    if cfg.trainer.get("enable_model_summary", True):
        callbacks.append(ParameterSummary())
    trainer_kwargs = {"enable_model_summary": False}  # Lightning's summary table: ParameterSummary instead
    if not has_validation:
        trainer_kwargs["limit_val_batches"] = 0
    with open_dict(cfg):
        cfg.trainer.precision = default_precision(cfg.trainer)
    trainer: L.Trainer = instantiate_config(
        cfg.trainer, callbacks=callbacks, logger=_instantiate_all(cfg.get("logger")) or False, **trainer_kwargs
    )
    refuse_launched_multirun(trainer)
    prepare_on_rank_zero(trainer, datamodule.prepare_data)
    datamodule.setup("fit")
    if resume is not None:
        check_resumed_items(resume, cfg.ckpt_path, datamodule, out_dir)
    module = instantiate_config(cfg.model, num_items=datamodule.num_items, _recursive_=False, _convert_="all")
    if cfg.model.kernel_fallback == "error":
        _check_kernels_can_run(module.manager)

    start = time.perf_counter()
    with warnings.catch_warnings():
        if resume is not None:
            _drop_expected_resume_warnings(cfg.get("callbacks"))
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    fit_seconds = time.perf_counter() - start

    selection = next((c for c in trainer.checkpoint_callbacks if c.monitor is not None), None)
    best_path = (selection.best_model_path or None) if selection is not None else None
    last_path = next(c.path for c in trainer.checkpoint_callbacks if isinstance(c, LastCheckpoint))
    results: dict[str, Any] = {"val": {}, "test": {}}
    if has_validation:
        val = trainer.validate(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        results["val"] = _strip(val[0], "val/")
    if cfg.get("test", True):
        test = trainer.test(module, datamodule=datamodule, ckpt_path=best_path, verbose=False)
        results["test"] = _strip(test[0], "test/")
    splits = [split for split in ("val", "test") if results[split]]
    results["totals"] = {split: module.eval_totals[split] for split in splits}  # exact counts and float64 sums

    report = {
        **results,
        # counted on the host over the whole split: once, by the process that writes the report
        "baselines": {name: {split: baseline_metrics(name, datamodule, split, module.eval_ks) for split in splits}
                      for name in ("popularity", "repeat_last")} if trainer.is_global_zero else {},
        "best_checkpoint": best_path,
        "last_checkpoint": last_path,
        "resumed_from": str(resume) if resume else None,
        "best_epoch": _epoch_of(best_path),
        "epochs_trained": trainer.current_epoch,
        "epochs": epoch_log.history,
        "fit_wall_time_s": fit_seconds,
        "throughput": throughput.summary(),
        "processes": trainer.world_size,
        "card": device_name(),
        "torch": torch.__version__,
        "kernels": {
            "flags": dict(cfg.model.kernels),
            "fallbacks": module.manager.fallbacks(),
            "availability": module.manager.get_operator_availability(),
            "stats": summed_operator_stats(trainer, module.manager.get_stats()),  # over every process
        },
        "data": datamodule.stats,
        "overrides": _task_overrides(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = out_dir / METRICS_FILE
    if trainer.is_global_zero:
        write_text_atomically(path, json.dumps(report, indent=2, default=str))
        print_report(report, path)
    return report


def optimized_metric(cfg: DictConfig, report: dict[str, Any]) -> float | None:
    """The value of ``optimized_metric`` (e.g. ``val/ndcg@10``) for a hyperparameter search, else None."""
    name = cfg.get("optimized_metric")
    if not name:
        return None
    split, _, metric = name.partition("/")
    return report[split][metric]


def _task_overrides() -> list[str]:
    """The command line's overrides of this job, when it runs under Hydra."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def _strip(metrics: dict[str, float], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def _epoch_of(path: str | None) -> int | None:
    if not path:
        return None
    match = re.search(r"epoch=?(\d+)", Path(path).stem)
    return int(match.group(1)) if match else None


def report_console():
    """A rich console for tables; 120 columns when the output is a file or pipe (rich would wrap at 80)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=120)


def print_report(report: dict[str, Any], path: Path) -> None:
    from rich.table import Table

    names = list(report["test"] or report["val"])
    table = Table(title=f"Full-ranking metrics ({report['card']})")
    table.add_column("split", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")

    def cells(metrics: dict[str, float]) -> list[str]:
        return [f"{metrics.get(name, float('nan')):.4f}" for name in names]

    for split in ("val", "test"):
        if report[split]:
            table.add_row(split, *cells(report[split]))
    if report.get("recorded_test"):  # an evaluation's report (scripts/eval.py): what the run recorded
        table.add_row("test, recorded at training", *cells(report["recorded_test"]), style="dim")
    for baseline, per_split in report.get("baselines", {}).items():
        for split, metrics in per_split.items():
            table.add_row(f"{split}, {baseline.replace('_', ' ')}", *cells(metrics), style="dim")
    console = report_console()
    console.print(table)
    tp = report["throughput"]
    if tp:
        console.print(
            f"epochs {report['epochs_trained']}, "
            + ("no model selection (last epoch tested)" if report["best_epoch"] is None
               else f"best epoch {report['best_epoch']}")
            + f", fit {report['fit_wall_time_s']:.1f}s, "
            f"{tp['samples_per_sec']:.0f} samples/s, {tp['tokens_per_sec']:.0f} tokens/s"
            f"{_over_processes(report)}, "
            f"{tp['epoch_time_s']:.2f}s/epoch"
        )
    share = report.get("data", {}).get("test_target_in_history")
    if share:
        console.print(f"{100 * share:.1f}% of test targets already occur in the user's history (data.repeats="
                      f"{report['data'].get('repeats')}); compare with the repeat-last baseline")
    if report["kernels"]["fallbacks"]:
        console.print(f"kernel fallbacks: {report['kernels']['fallbacks']}", soft_wrap=True)
    console.print(f"metrics written to {path}", soft_wrap=True)


def _over_processes(report: dict[str, Any]) -> str:
    processes = report.get("processes", 1)
    return f" (all {processes} processes)" if processes > 1 else ""
