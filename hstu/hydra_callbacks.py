"""Hydra callbacks of ``scripts/train.py`` (``hydra.callbacks`` in conf/train.yaml).

:class:`SweepSummary` writes one table for a multirun: a row per job with its overrides, test
metrics, samples/s and kernel fallbacks, as ``summary.csv`` in the sweep directory, and prints it.
It reads the jobs' ``metrics.json`` files when the sweep ends, so it works under any launcher,
including ones that run jobs elsewhere and capture their output.

:class:`CheckBeforeStart` stops a run or a sweep with one line before Hydra writes any file or starts
any job: a config that :func:`hstu.config.check_config` rejects (a search over ``data.protocol=paper``
included, and any job of a grid sweep), a new run pointed (``hydra.run.dir=...``) at the directory of
another run, or a run (or sweep) pointed at a directory that another run (or sweep) is writing into now
(a claim held while it runs). The new
directory the run (or sweep) was given goes with it, as does a run's when the job itself stops with
a user error before writing anything but Hydra's files.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import yaml
from hydra import compose
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.errors import ConfigCompositionException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from hstu.config import check_accelerator, check_config, config_errors, make_directory, remove_new_directory
from hstu.errors import ConfigError, UserError
from hstu.files import write_text_atomically
from hstu.train import (
    CHECKPOINT_DIR,
    LAST_CHECKPOINT,
    METRICS_FILE,
    RUN_LOCK,
    check_run_dir,
    claim_run_dir,
    report_console,
    resume_checkpoint,
)

SUMMARY_FILE = "summary.csv"
HYDRA_FILES = ("config.yaml", "hydra.yaml", "overrides.yaml")  # what Hydra writes in hydra.output_subdir
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"


class CheckBeforeStart(Callback):
    """The checks that must pass before Hydra writes into the run directory, the run's claim on that
    directory (:func:`hstu.train.claim_run_dir`, held until the run ends), and the removal of the new
    directory a run or sweep was given when a user error stops it."""

    def __init__(self) -> None:
        self._claim: int | None = None
        self._resumed_run: ResumedRun | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = Path(config.hydra.run.dir)
        data_key = "paths.data_dir" if OmegaConf.is_interpolation(config.data, "data_dir") else "data.data_dir"

        def claim_and_check_run_dir() -> None:
            resume = resume_checkpoint(config.get("ckpt_path"), run_dir, config)
            make_directory(run_dir, "hydra.run.dir")
            self._claim = claim_run_dir(run_dir)
            check_run_dir(run_dir, resume)  # under the claim: no other run writes there meanwhile
            if resume is not None and config.hydra.output_subdir is not None:
                self._resumed_run = ResumedRun(run_dir, run_dir / config.hydra.output_subdir)

        self._check(config, run_dir,
                    lambda: check_accelerator(OmegaConf.select(config, "trainer.accelerator"), "trainer.accelerator"),
                    claim_and_check_run_dir,
                    lambda: make_directory(config.data.data_dir, data_key))

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)

        def claim_sweep_dir() -> None:  # held by the sweeping process until the sweep ends
            make_directory(sweep_dir, "hydra.sweep.dir")
            self._claim = claim_run_dir(sweep_dir, "hydra.sweep.dir", "sweep")

        self._check(config, sweep_dir, lambda: check_slurm_launcher(config), lambda: check_sweep_dir(sweep_dir),
                    claim_sweep_dir, lambda: check_sweep_jobs(config))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """A run that a user error stopped (bad data, say) before it wrote anything of its own leaves no
        directory: Hydra's copies of the config and the job's log go, with the directory made for it
        (by ``hstu.new_dir``, or an explicit ``hydra.run.dir`` that did not exist). Anything else in it
        (a checkpoint, Lightning's logs), or another error, keeps it all."""
        error = job_return._return_value if job_return.status == JobStatus.FAILED else None  # no public getter
        if isinstance(error, UserError) and HydraConfig.get().mode == RunMode.RUN:
            if self._resumed_run is not None:
                self._resumed_run.restore_if_untrained()
            hydra_files = tuple(f"{config.hydra.output_subdir}/{name}" for name in HYDRA_FILES)
            remove_new_directory(config.hydra.runtime.output_dir,
                                 (*hydra_files, f"{config.hydra.job.name}.log", RUN_LOCK))

    def _release(self) -> None:
        if self._claim is not None:
            os.close(self._claim)
            self._claim = None

    def _check(self, config: DictConfig, job_dir: Path, *more: Callable[[], None]) -> None:
        """Stop with one line on a user error; the run's (or sweep's) new directory goes, empty as it is."""
        try:
            check_config(config)
            for check in more:
                check()
        except UserError as error:
            # Hydra turns a callback's exception into a warning and carries on: this must stop the job.
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                traceback.print_exc()
            sys.stderr.write(f"{error}\n")
            self._release()
            remove_new_directory(job_dir, (RUN_LOCK,))
            sys.exit(1)


class ResumedRun:
    """A run directory's Hydra files and last checkpoint as they were before a resume in it. Hydra rewrites
    the files with the resuming command's config before the job starts; a resume that a user error stops
    before it trains (data of other items, say) puts them back, or eval and export of the run would read
    the refused command's config."""

    def __init__(self, run_dir: Path, hydra_dir: Path):
        self.files = {path: path.read_text() for path in (hydra_dir / name for name in HYDRA_FILES) if path.is_file()}
        self.last = run_dir / CHECKPOINT_DIR / LAST_CHECKPOINT
        self.last_written = self._written(self.last)

    def restore_if_untrained(self) -> None:
        if self._written(self.last) == self.last_written:
            for path, text in self.files.items():
                write_text_atomically(path, text)

    @staticmethod
    def _written(path: Path) -> int | None:
        return path.stat().st_mtime_ns if path.is_file() else None


def check_slurm_launcher(config: DictConfig) -> None:
    """ConfigError when a SLURM launcher (``hydra/launcher=slurm_ddp``) cannot submit: no ``srun`` here (not a
    SLURM node), or slurm_ddp without ``trainer=ddp``, whose keys it reads for nodes and tasks."""
    target = OmegaConf.select(config, "hydra.launcher._target_") or ""
    if not target.endswith(".SlurmLauncher"):
        return
    if shutil.which("srun") is None:
        raise ConfigError("hydra/launcher: the SLURM launcher submits with sbatch and srun, and this machine has no "
                          "srun on its PATH; sweep from a SLURM login node, or use hydra/launcher=submitit_local")
    missing = [key for key in ("trainer.num_nodes", "trainer.devices") if OmegaConf.select(config, key) is None]
    if missing and OmegaConf.is_interpolation(config.hydra.launcher, "nodes"):
        raise ConfigError(f"hydra/launcher=slurm_ddp reads {' and '.join(missing)}, which this trainer config lacks; "
                          "add trainer=ddp")


def check_sweep_dir(sweep_dir: Path) -> None:
    """ConfigError when ``hydra.sweep.dir`` holds an earlier sweep's jobs (a job folder's Hydra files, results
    or checkpoints): Hydra writes each new job's files into its folder before the job could refuse it."""
    if not sweep_dir.is_dir():
        return
    for pattern in (f"*/{METRICS_FILE}", f"*/{CHECKPOINT_DIR}/*.ckpt", f"*/{OVERRIDES_FILE}"):
        found = next(iter(sorted(sweep_dir.glob(pattern))), None)
        if found is not None:
            raise ConfigError(f"hydra.sweep.dir={sweep_dir} holds an earlier sweep's jobs "
                              f"({found.relative_to(sweep_dir)}); leave hydra.sweep.dir unset for a new directory")


def check_sweep_jobs(config: DictConfig) -> None:
    """ConfigError naming the job and its swept values when the config of a job of the command line's grid
    (``a=1,2 b=x,y``) fails composition or :func:`hstu.config.config_errors`: the sweep stops before any job
    trains, not when that job comes (Hydra's sweeper stops there, and the sweep ends with no summary)."""
    if OmegaConf.select(config, "hydra.sweeper._target_") != f"{BasicSweeper.__module__}.{BasicSweeper.__name__}":
        return  # another sweeper (Optuna) draws its jobs' values as it runs
    overrides = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    swept = {override.get_key_element() for override in overrides if override.is_sweep_override()}
    if not swept:
        return  # the one job's config is the one checked already
    (jobs,) = BasicSweeper.split_arguments(overrides, None)
    subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]
    if len(jobs) > 1 and "${" not in str(subdir):
        raise ConfigError(f"hydra.sweep.subdir={subdir}: gives all {len(jobs)} jobs of the sweep one directory, where "
                          "each would overwrite the one before; keep ${hydra.job.num} in it")
    for number, job in enumerate(jobs):
        values = " ".join(override for override in job if override.split("=", 1)[0] in swept)
        try:
            errors = config_errors(compose(config.hydra.job.config_name, overrides=job))
        except ConfigCompositionException as error:
            errors = [str(error)]
        if errors:
            raise ConfigError(f"sweep job {number} ({values}): {'; '.join(errors)}")


class SweepSummary(Callback):
    """``summary.csv`` of a sweep's jobs, rewritten as each job ends (Hydra's sweeper stops a sweep with a
    failed job before its end, and the file keeps what ran), and the table printed at the sweep's end."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            self._write(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        rows, path = self._write(Path(config.hydra.sweep.dir))
        if rows:
            print_summary(rows, path)

    @staticmethod
    def _write(sweep_dir: Path) -> tuple[list[dict[str, Any]], Path]:
        rows, path = sweep_rows(sweep_dir), sweep_dir / SUMMARY_FILE
        if rows:
            write_text_atomically(path, _csv(rows))
        return rows, path


def sweep_rows(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job directory under ``sweep_dir`` (a finished job has metrics.json, a failed one only .hydra/)."""
    jobs = {p.parent for p in sweep_dir.glob(f"**/{METRICS_FILE}")}
    jobs |= {p.parent.parent for p in sweep_dir.glob(f"**/{OVERRIDES_FILE}")}
    rows = [_row(job, sweep_dir) for job in jobs]
    return sorted(rows, key=lambda r: (not r["job"].isdigit(), int(r["job"]) if r["job"].isdigit() else 0, r["job"]))


def _row(job: Path, sweep_dir: Path) -> dict[str, Any]:
    metrics_path, overrides_path = job / METRICS_FILE, job / OVERRIDES_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    if metrics is not None and metrics.get("overrides") is not None:
        overrides = metrics["overrides"]
    else:
        overrides = yaml.safe_load(overrides_path.read_text()) if overrides_path.is_file() else []
    row: dict[str, Any] = {"job": str(job.relative_to(sweep_dir)), "overrides": " ".join(overrides or []),
                           "status": "done" if metrics is not None else "failed"}
    if metrics is None:
        return row
    row.update({f"test/{name}": value for name, value in metrics.get("test", {}).items()})
    row["val/ndcg@10"] = metrics.get("val", {}).get("ndcg@10")
    row["samples_per_sec"] = metrics.get("throughput", {}).get("samples_per_sec")
    row["epochs"] = metrics.get("epochs_trained")
    fallbacks = metrics.get("kernels", {}).get("fallbacks", {})
    row["kernel_fallbacks"] = "; ".join(f"{op}: {why}" for op, why in fallbacks.items())
    return row


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    return columns


def _csv(rows: list[dict[str, Any]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=_columns(rows), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def print_summary(rows: list[dict[str, Any]], path: Path) -> None:
    """The summary as a table; overrides shared by every job are left out of its overrides column."""
    from rich.table import Table

    shared = set.intersection(*(set(r["overrides"].split()) for r in rows))
    columns = [c for c in _columns(rows) if c in ("job", "overrides", "status", "test/hr@10", "test/ndcg@10",
                                                   "test/mrr", "val/ndcg@10", "samples_per_sec", "kernel_fallbacks")]
    table = Table(title=f"Sweep summary ({len(rows)} jobs)")
    for column in columns:
        table.add_column(column.replace("kernel_fallbacks", "fallbacks"),
                         justify="right" if column.startswith(("test/", "val/", "samples")) else "left")
    for row in rows:
        cells = []
        for column in columns:
            value = row.get(column)
            if column == "overrides":
                value = " ".join(o for o in value.split() if o not in shared)
            elif column == "kernel_fallbacks":
                value = str(len(value.split("; "))) if value else "0"
            elif isinstance(value, float):
                value = f"{value:.0f}" if column == "samples_per_sec" else f"{value:.4f}"
            cells.append("" if value is None else str(value))
        table.add_row(*cells)
    console = report_console()
    console.print(table)
    console.print(f"sweep summary written to {path}", soft_wrap=True)
