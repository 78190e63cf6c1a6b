"""Finished training runs: export one for serving, or re-evaluate one of its checkpoints.

A run directory is the ``paths.output_dir`` of :func:`hstu.train.train`. It holds ``metrics.json``
(with ``best_checkpoint`` and a resolved copy of the config) and, for runs started from the command
line, Hydra's ``.hydra/config.yaml``. The config is read from ``.hydra/config.yaml`` when present,
else from ``metrics.json``; ``paths.output_dir`` is taken to be the run directory itself, so a run
folder that was moved or copied elsewhere still resolves (checkpoint paths are re-rooted likewise).

Checkpoints are read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
arbitrary pickled objects. The export folder (format: :mod:`hstu.inference`), with its scoring package
when one is asked for, is written to a temporary folder next to its destination and moved into place
with ``os.replace``: a failed export leaves nothing. Bad options and output paths are refused before
the checkpoint is read.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file

from hstu.checkpoints import check_trained_items, load_checkpoint, load_state_strictly, model_differences
from hstu.config import check_accelerator, check_data_targets, instantiate_config, kernel_flag_errors
from hstu.data.datamodule import SequenceDataModule
from hstu.data.sources import absolute_path
from hstu.distributed import prepare_on_rank_zero
from hstu.errors import CheckpointError, ConfigError, DataError, MissingFileError, OutputExistsError
from hstu.files import check_folder_path, current_umask, owned_prefix, remove_abandoned, sha256_of
from hstu.inference import (
    CONFIG_FILE, FORMAT_VERSION, ITEMS_FILE, MODEL_DIGEST_KEY, MODEL_KEYS, RECORDED_FILES, WEIGHTS_FILE,
    model_settings_digest,
)
from hstu.model.recommender import SequentialRecommender
from hstu.module import RecModule
from hstu.serving.compiled import DEFAULT_K, compile_export
from hstu.train import device_name

METRICS_FILE = "metrics.json"
HYDRA_CONFIG_FILE = Path(".hydra") / "config.yaml"
# Prefixes a LightningModule state_dict adds to SequentialRecommender's keys: the module attribute,
# and the wrapper of a torch.compile'd submodule.
MODULE_PREFIX = "model."
COMPILED_PREFIX = "_orig_mod."
COMPILED_CHOICES = ("auto", "cpu", "cuda", "none")
# The files of an export folder: the three of hstu.inference, and scoring packages (hstu.serving.compiled).
EXPORT_FILE_PATTERNS = (WEIGHTS_FILE, CONFIG_FILE, ITEMS_FILE, "scoring-*.pt2")
# Keys of evaluate_run's report that tell it from other JSON files.
EVAL_REPORT_KEYS = ("recorded_test", "checkpoint")
DATA_CHANGED = "the data source or its settings changed since training"


@dataclass
class TrainingRun:
    """What a run directory says about its run."""

    run_dir: Path
    config: DictConfig  # the composed training config, paths.output_dir = run_dir
    config_path: Path  # the file it was read from
    metrics: dict[str, Any]  # metrics.json ({} when the run wrote none)

    def resolved(self, key: str) -> Any:
        """A config section as plain values, interpolations resolved; errors name the file and key."""
        try:
            node = OmegaConf.select(self.config, key, throw_on_missing=True)
            return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
        except OmegaConfBaseException as error:
            raise ConfigError(f"{self.config_path}: cannot resolve {key!r} ({error})") from error


def load_run(run_dir: str | Path) -> TrainingRun:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MissingFileError(f"run_dir={run_dir}: no such directory")
    metrics_path = run_dir / METRICS_FILE
    metrics = _read_metrics(metrics_path) if metrics_path.is_file() else {}
    config_path = run_dir / HYDRA_CONFIG_FILE
    if config_path.is_file():
        try:
            config = OmegaConf.load(config_path)
        except Exception as error:  # YAML's parser errors, or a file that is not text
            raise ConfigError(f"{config_path}: not a readable config ({str(error).splitlines()[0]}); was it cut "
                              "short or edited?") from error
        if not isinstance(config, DictConfig):
            raise ConfigError(f"{config_path}: holds a {type(config).__name__}, not the mapping a run writes")
    elif "config" in metrics:
        config_path = metrics_path
        config = OmegaConf.create(metrics["config"])
    else:
        raise MissingFileError(f"run_dir={run_dir}: neither {HYDRA_CONFIG_FILE} nor a {METRICS_FILE} with the run's "
                               "config; is it a training run's directory?")
    # .hydra/config.yaml has ${hydra:runtime.output_dir} here, which only the training job could resolve.
    OmegaConf.update(config, "paths.output_dir", str(run_dir.resolve()), force_add=True)
    return TrainingRun(run_dir, config, config_path, metrics)


def _read_metrics(path: Path) -> dict[str, Any]:
    try:
        metrics = json.loads(path.read_bytes())
    except ValueError as error:  # not JSON, or not text at all
        raise DataError(f"{path}: not valid JSON ({error}); was it cut short or edited?") from error
    if not isinstance(metrics, dict):
        raise DataError(f"{path}: holds a JSON {type(metrics).__name__}, not the object a run writes")
    return metrics


def resolve_checkpoint(run: TrainingRun, ckpt_path: str | Path | None = None) -> Path:
    """``ckpt_path`` if given, else the run's best checkpoint (``last_checkpoint`` when there is none)."""
    if ckpt_path is not None:
        path = Path(ckpt_path)
        if path.is_dir():
            raise ConfigError(f"ckpt_path={path}: is a folder; give a checkpoint file (.ckpt) in it")
    else:
        recorded = run.metrics.get("best_checkpoint") or run.metrics.get("last_checkpoint")
        if not recorded:
            raise MissingFileError(
                f"{run.run_dir / METRICS_FILE}: no best_checkpoint (a data.protocol=paper run selects none, "
                "and an unfinished run writes no metrics.json); pass ckpt_path=<file.ckpt>"
            )
        path = _rerooted(Path(recorded), run)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist")
    return path


def _rerooted(path: Path, run: TrainingRun) -> Path:
    """A path recorded under the run's original output_dir, found under run_dir if the run was moved or copied."""
    recorded_dir = run.metrics.get("config", {}).get("paths", {}).get("output_dir")
    if recorded_dir:
        try:
            moved = run.run_dir / path.relative_to(recorded_dir)
        except ValueError:
            return path
        if moved.exists():
            return moved
    return path


def model_hyperparameters(checkpoint: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """SequentialRecommender's network arguments from a RecModule checkpoint's ``hyper_parameters``."""
    hparams = checkpoint["hyper_parameters"]
    missing = [key for key in MODEL_KEYS if key not in hparams]
    if missing:
        raise CheckpointError(f"{path}: hyper_parameters lack {missing}")
    return {key: hparams[key] for key in MODEL_KEYS}


def check_checkpoint_of_run(run: TrainingRun, checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """CheckpointError naming the model keys whose values in the checkpoint differ from the run's config."""
    model = run.resolved("model")
    differ = model_differences(model if isinstance(model, dict) else {}, checkpoint["hyper_parameters"], MODEL_KEYS)
    if differ:
        raise CheckpointError(f"{path}: not a checkpoint of the run in {run.run_dir}: its model differs from "
                              f"{run.config_path} in {', '.join(differ)}")


def recommender_state_dict(module_state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SequentialRecommender keys from a RecModule state_dict: "model." dropped, "_orig_mod." removed."""
    return {
        key[len(MODULE_PREFIX):].replace(COMPILED_PREFIX, ""): value
        for key, value in module_state.items()
        if key.startswith(MODULE_PREFIX)
    }


def build_datamodule(run: TrainingRun, data_dir: str | None = None, trainer: L.Trainer | None = None) -> SequenceDataModule:
    """The run's datamodule, set up (ids assigned as in training); ``data_dir`` overrides where data lives.
    With a ``trainer`` of several processes, its rank zero alone prepares the data."""
    data_config = run.resolved("data")
    if not isinstance(data_config, dict):
        raise ConfigError(f"{run.config_path}: no 'data' section")
    check_data_targets(data_config, f"{run.config_path}: data")
    if data_dir is not None:
        data_config["data_dir"] = data_dir
    datamodule = instantiate_config(data_config, _convert_="all")
    if trainer is None:
        datamodule.prepare_data()
    else:
        prepare_on_rank_zero(trainer, datamodule.prepare_data)
    datamodule.setup()
    return datamodule


def check_data_dir(run: TrainingRun, data_dir: str | None) -> None:
    """ConfigError naming ``data_dir`` (or the run's data.data_dir when it is None) when a file stands where
    the data's folder would be."""
    if data_dir is not None:
        check_folder_path(absolute_path(data_dir), "data_dir")
    else:
        run_data_dir = run.resolved("data.data_dir")
        if run_data_dir is not None:
            check_folder_path(absolute_path(run_data_dir), f"{run.config_path}: data.data_dir")


def export_run(
    run_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    ckpt_path: str | Path | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
    compiled: str = "none",
    compiled_k: int = DEFAULT_K,
) -> Path:
    """Write the export folder of a run (default ``<run_dir>/export``) and return its path; with ``compiled``
    (auto|cpu|cuda) it also holds the scoring package (:mod:`hstu.serving.compiled`) of ``compiled_k`` items."""
    device = compiled_device(compiled, compiled_k)
    run = load_run(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run.run_dir / "export"
    check_out_dir(out_dir, overwrite)
    check_data_dir(run, data_dir)
    checkpoint_path = resolve_checkpoint(run, ckpt_path)
    checkpoint = load_checkpoint(checkpoint_path)
    model_config = model_hyperparameters(checkpoint, checkpoint_path)
    check_checkpoint_of_run(run, checkpoint, checkpoint_path)

    model = SequentialRecommender(**model_config)
    load_state_strictly(model, recommender_state_dict(checkpoint["state_dict"]), lambda mismatch: CheckpointError(
        f"{checkpoint_path}: weights do not fit its hyper_parameters: {mismatch}"))
    datamodule = build_datamodule(run, data_dir)
    check_trained_items(checkpoint_path, checkpoint["hyper_parameters"], datamodule.num_items,
                        datamodule.item_ids_digest, DATA_CHANGED)
    original_ids = datamodule.sequences.item_original_ids

    return write_export(
        out_dir, model, model_config, original_ids,
        # measured by the run on its best (or, with no validation, last) weights: see "measured_on"
        metrics={
            **{key: run.metrics.get(key) for key in ("val", "test", "best_epoch", "epochs_trained")},
            "measured_on": run.metrics.get("best_checkpoint") or run.metrics.get("last_checkpoint"),
        },
        data={
            "source": datamodule.source.name,
            "protocol": datamodule.protocol,
            "stats": datamodule.stats,
            "datamodule": run.resolved("data"),
            # the events the model was trained on, which recommend.py's user= rebuilds
            "events_digest": checkpoint["hyper_parameters"].get("events_digest"),
        },
        training={
            "run_dir": str(run.run_dir.resolve()),
            "checkpoint": str(checkpoint_path.resolve()),
            "epoch": checkpoint.get("epoch"),
            "global_step": checkpoint.get("global_step"),
            "kernels": checkpoint["hyper_parameters"].get("kernels"),
            "card": run.metrics.get("card"),
            "torch": run.metrics.get("torch"),
        },
        overwrite=overwrite,
        compiled=device,
        compiled_k=compiled_k,
    )


def compiled_device(compiled: str, k: int) -> str | None:
    """The device that ``compiled`` (auto|cpu|cuda|none) builds a scoring package for here, None for none;
    ConfigError when it is not one of those, cuda without a GPU, or ``k`` is not an integer >= 1."""
    if compiled not in COMPILED_CHOICES:
        raise ConfigError(f"compiled={compiled}: must be one of {list(COMPILED_CHOICES)}")
    if compiled == "none":
        return None
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"compiled_k={k}: must be an integer >= 1")
    check_accelerator(compiled, "compiled")
    return ("cuda" if torch.cuda.is_available() else "cpu") if compiled == "auto" else compiled


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Before anything is loaded: OutputExistsError if ``out_dir`` exists (without ``overwrite``), or is not
    an export folder (see :func:`check_replaceable_export`); ConfigError if it, or the nearest existing folder
    above it, is a file."""
    check_folder_path(out_dir, "out_dir")
    if out_dir.exists():
        if not overwrite:
            raise OutputExistsError(f"{out_dir} exists; pass overwrite=true to replace it")
        check_replaceable_export(out_dir)


def check_replaceable_export(out_dir: Path) -> None:
    """OutputExistsError unless ``out_dir`` is empty or an export folder: its config.json an export's (with
    ``format_version``) and nothing in it but an export's files. Overwriting replaces the whole folder, so
    a run folder, a folder above one, or any other files must never be taken for an earlier export."""
    refusal = f"out_dir={out_dir}: not an export folder, so overwrite=true does not replace it"
    entries = sorted(out_dir.iterdir())
    foreign = next((entry for entry in entries if entry.is_symlink() or not entry.is_file()
                    or not _is_export_file(entry.name)), None)
    if foreign is not None:
        raise OutputExistsError(f"{refusal} ({foreign.name} is not a file of an export); give another out_dir")
    if entries and "format_version" not in _json_object(out_dir / CONFIG_FILE):
        raise OutputExistsError(f"{refusal} (no {CONFIG_FILE} with a format_version); give another out_dir")


def _is_export_file(name: str) -> bool:
    """Whether ``name`` is a file an export folder holds, or the temporary one of them is written through."""
    if name.startswith(".") and ".tmp-" in name:
        name = name[1:].split(".tmp-", 1)[0]
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in EXPORT_FILE_PATTERNS)


def _json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``; {} when it is missing, unreadable or not an object."""
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return {}
    return content if isinstance(content, dict) else {}


def write_export(
    out_dir: str | Path,
    model: SequentialRecommender,
    model_config: Mapping[str, Any],
    original_ids,
    *,
    metrics: Mapping[str, Any],
    data: Mapping[str, Any],
    training: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    compiled: str | None = None,
    compiled_k: int = DEFAULT_K,
) -> Path:
    """Write an export folder (format: :mod:`hstu.inference`) for ``model``, built from ``model_config``
    (the MODEL_KEYS arguments); ``original_ids[i]`` is the original id of item index i + 1. With a
    ``compiled`` device it also holds the scoring package, built before the folder is moved into place."""
    out_dir = Path(out_dir)
    original_ids = np.asarray(original_ids)
    config = {"format_version": FORMAT_VERSION, "model": dict(model_config), "metrics": dict(metrics),
              "data": dict(data), "training": dict(training or {})}
    items = {"id_type": "str" if original_ids.dtype.kind in "OUS" else "int", "original_ids": original_ids.tolist()}
    weights = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    # the settings as config.json will read back, so that a digest of what is read compares equal
    settings_digest = model_settings_digest(json.loads(json.dumps(config["model"], default=str)))

    def write_config(path: Path) -> None:  # after the files whose SHA-256 it records
        config["files"] = {name: sha256_of(path.parent / name) for name in RECORDED_FILES}
        path.write_text(json.dumps(config, indent=2, default=str))

    _write_folder_atomically(out_dir, {
        WEIGHTS_FILE: lambda path: save_file(weights, str(path),
                                             metadata={"format": "pt", MODEL_DIGEST_KEY: settings_digest}),
        ITEMS_FILE: lambda path: path.write_text(json.dumps(items)),
        CONFIG_FILE: write_config,
    }, overwrite, finish=None if compiled is None else lambda folder: compile_export(folder, compiled, k=compiled_k))
    return out_dir


def _write_folder_atomically(out_dir: Path, writers: Mapping[str, Any], overwrite: bool,
                             finish: Callable[[Path], Any] | None = None) -> None:
    """Each writer fills one file of a temporary sibling folder, ``finish`` (if any) then adds to the
    complete folder, and the folder replaces ``out_dir`` (with ``overwrite``, an export folder only)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(out_dir.parent, f".{out_dir.name}.tmp-")  # staging folders of exports that were killed
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=owned_prefix(f".{out_dir.name}.tmp-")))
    previous = None
    umask = current_umask()
    try:
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the export is an ordinary folder
        for name, write in writers.items():
            write(staging / name)
            os.chmod(staging / name, 0o666 & ~umask)
            with open(staging / name, "rb") as f:
                os.fsync(f.fileno())
        if finish is not None:
            finish(staging)
        if out_dir.exists():
            if not overwrite:
                raise OutputExistsError(f"{out_dir} exists; pass overwrite=true to replace it")
            check_replaceable_export(out_dir)
            previous = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=owned_prefix(f".{out_dir.name}.old-")))
            os.replace(out_dir, previous)  # a folder replaces only an empty one, hence the move aside
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None and not out_dir.exists():
            os.replace(previous, out_dir)
        raise
    if previous is not None:
        shutil.rmtree(previous)


def is_evaluation_report(path: Path) -> bool:
    """Whether ``path`` holds a report of :func:`evaluate_run` (a run's metrics.json lacks these keys)."""
    report = _json_object(path)
    return all(key in report for key in EVAL_REPORT_KEYS)


def evaluate_run(
    run_dir: str | Path | TrainingRun,
    ckpt_path: str | Path | None = None,
    *,
    accelerator: str = "auto",
    kernels: Mapping[str, bool] | None = None,
    data_dir: str | None = None,
    devices: int | str = 1,
    num_nodes: int = 1,
) -> dict[str, Any]:
    """Full-ranking test metrics of a checkpoint (default: the run's best) on the run's own test split.

    Returns a report shaped like ``metrics.json`` (``test``, ``totals``, ``card``, ``kernels`` ...) plus
    ``recorded_test``, the test metrics the run wrote, for comparison. ``kernels`` (default: the
    run's flags) chooses the operators' backends. ``devices`` x ``num_nodes`` > 1 evaluates on that many
    DDP processes, each ranking its own slice of the users (the same metrics as one process)."""
    run = run_dir if isinstance(run_dir, TrainingRun) else load_run(run_dir)
    errors = kernel_flag_errors(kernels)
    if errors:
        raise ConfigError("; ".join(errors))
    trainer = _evaluation_trainer(run, accelerator, devices, num_nodes)
    check_data_dir(run, data_dir)
    checkpoint_path = resolve_checkpoint(run, ckpt_path)
    checkpoint = load_checkpoint(checkpoint_path)
    check_checkpoint_of_run(run, checkpoint, checkpoint_path)
    hparams = dict(checkpoint["hyper_parameters"], compile=False)
    if kernels is not None:
        hparams["kernels"] = dict(kernels)
    module = RecModule(**hparams)
    load_state_strictly(module.model, recommender_state_dict(checkpoint["state_dict"]), lambda mismatch: CheckpointError(
        f"{checkpoint_path}: weights do not fit its hyper_parameters: {mismatch}"))
    datamodule = build_datamodule(run, data_dir, trainer)
    check_trained_items(checkpoint_path, hparams, datamodule.num_items, datamodule.item_ids_digest, DATA_CHANGED,
                        datamodule.events_digest)
    (test,) = trainer.test(module, datamodule=datamodule, verbose=False)
    return {
        "val": {},
        "test": {key.removeprefix("test/"): float(value) for key, value in test.items() if key.startswith("test/")},
        "totals": {"test": module.eval_totals["test"]},
        "processes": trainer.world_size,
        "recorded_test": run.metrics.get("test", {}),
        "checkpoint": str(checkpoint_path),
        "card": device_name(),
        "throughput": {},
        "kernels": {"flags": hparams["kernels"], "fallbacks": module.manager.fallbacks()},
        "data": datamodule.stats,
    }


def _evaluation_trainer(run: TrainingRun, accelerator: str, devices: int | str, num_nodes: int) -> L.Trainer:
    """The Trainer that tests the checkpoint; ConfigError naming accelerator, devices and num_nodes when
    Lightning refuses them."""
    check_accelerator(accelerator, "accelerator")
    single = devices == 1 and num_nodes == 1
    precision = run.resolved("trainer.precision") or "32-true"
    try:
        return L.Trainer(
            accelerator=accelerator, devices=devices, num_nodes=num_nodes,
            strategy="auto" if single else DDPStrategy(broadcast_buffers=False), use_distributed_sampler=False,
            precision=precision,
            logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        )
    except (MisconfigurationException, ValueError, TypeError) as error:  # how Lightning refuses these arguments
        raise ConfigError(f"accelerator={accelerator} devices={devices} num_nodes={num_nodes}: "
                          f"{' '.join(str(error).split())}") from error
