"""What a training run does differently on several processes (Lightning's DDP strategy).

Who starts the processes decides the rest:
- Lightning itself (``trainer=ddp`` with ``devices`` > 1 on one machine): rank zero runs the script up
  to ``trainer.fit``, then re-runs its command line once per other rank, with ``hydra.run.dir`` set to
  its own run directory. Rank zero has prepared the data by then; the other ranks only read it. A Hydra
  multirun (``-m``) would start one sweep per rank there: :func:`refuse_launched_multirun` stops it.
- torchrun or srun (or any launcher Lightning finds as a cluster environment): every rank starts at
  once. Rank zero prepares the data while the others wait at a barrier (:func:`prepare_on_rank_zero`),
  and the run directory is agreed through a note that rank zero writes (:func:`shared_new_directory`).

Counts that every rank keeps for itself (samples, operator calls) are added up with
:func:`sum_over_processes` once a run ends.

:class:`DDPStrategy` (``conf/trainer/ddp.yaml``) is Lightning's, with its gradient communication hook
registered on CPU (gloo) processes as well as on GPUs.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook
from lightning.pytorch.strategies import DDPStrategy as _LightningDDPStrategy

from hstu.errors import ConfigError
from hstu.files import write_text_atomically
from hstu_kernels.manager import BACKENDS

# How long ranks other than zero wait for rank zero's note of the run directory.
RUN_DIR_NOTE_TIMEOUT_S = 600.0
_STARTED = time.time()


# ---- processes started by torchrun or srun ---------------------------------------------------------

def external_job() -> tuple[int, int, str | None] | None:
    """``(rank, world size, job id)`` of a process that torchrun or srun started among several, else None.
    The job id (shared by the job's ranks) is None when the launcher gives none."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        run_id = env["TORCHELASTIC_RUN_ID"]
        return int(env["RANK"]), int(env["WORLD_SIZE"]), None if run_id in ("", "none") else f"torchrun-{run_id}"
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        job = env.get("SLURM_JOB_ID")
        return (int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                f"slurm-{job}.{env.get('SLURM_STEP_ID', '0')}" if job else None)
    return None


def shared_new_directory(path: str, make: Callable[[str], str]) -> str:
    """``make(path)`` (a new directory), made by rank zero alone in a job that torchrun or srun started:
    the other ranks read its name from a note ``.<job id>.run_dir`` that rank zero writes in the top
    folder of ``path`` (their clocks may name ``path`` a second apart)."""
    job = external_job()
    if job is None:
        return make(path)
    rank, _, job_id = job
    if job_id is None:
        raise ConfigError("hydra.run.dir: the ranks of this job cannot agree on a new run directory (the "
                          "launcher gives no job id: torchrun without --rdzv-id); pass hydra.run.dir=<dir>")
    base = Path(path)
    note = (base.parents[-2] if not base.is_absolute() and len(base.parts) > 1 else base.parent) / f".{job_id}.run_dir"
    if rank == 0:
        made = make(path)
        write_text_atomically(note, str(Path(made).resolve()))
        return made
    deadline = time.time() + RUN_DIR_NOTE_TIMEOUT_S
    while time.time() < deadline:
        if note.is_file() and note.stat().st_mtime >= _STARTED - 60:
            return note.read_text()
        time.sleep(0.2)
    raise ConfigError(f"hydra.run.dir: rank {rank} waited {RUN_DIR_NOTE_TIMEOUT_S:.0f} s for rank zero's run "
                      f"directory in {note}; pass hydra.run.dir=<dir> (the same on every rank)")


# ---- the strategy -----------------------------------------------------------------------------------

class DDPStrategy(_LightningDDPStrategy):
    """Lightning's DDPStrategy, registering ``ddp_comm_hook`` on every device: Lightning registers it on
    CUDA devices only, and the CPU (gloo) runs and tests should take the GPU runs' gradient path. With
    ``gradient_as_bucket_view`` the hook leaves no work per parameter in a step: the gradients are views
    of DDP's buckets, and the hook divides each bucket by the number of processes once and all-reduces it
    (DDP's built-in path divides and copies every gradient into its bucket and back)."""

    def _register_ddp_hooks(self) -> None:
        if self.root_device.type == "cuda":
            return super()._register_ddp_hooks()
        _register_ddp_comm_hook(model=self.model, ddp_comm_state=self._ddp_comm_state,
                                ddp_comm_hook=self._ddp_comm_hook, ddp_comm_wrapper=self._ddp_comm_wrapper)


# ---- checks and data before fit ------------------------------------------------------------------

def launches_processes(trainer) -> bool:
    """Whether ``trainer.fit`` will start the other ranks itself (re-running this command line)."""
    environment = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.world_size > 1 and environment is not None and not environment.creates_processes_externally


def refuse_launched_multirun(trainer) -> None:
    """Stop a Hydra multirun whose jobs Lightning would start several processes for: each of them would
    re-run the whole sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and launches_processes(trainer):
        raise ConfigError(
            f"-m with trainer.devices x trainer.num_nodes = {trainer.world_size} processes: Lightning would re-run "
            "this command line, so the sweep, once per process; sweep multi-GPU jobs with a launcher that starts "
            "the ranks itself (hydra/launcher=submitit_slurm with tasks_per_node = GPUs, or torchrun)")


def prepare_on_rank_zero(trainer, prepare: Callable[[], None]) -> None:
    """Run ``prepare`` (e.g. download and cache the data) on global rank zero only. When the launcher
    started every rank at once, the others wait at a barrier until it is done (the process group is set
    up here; Lightning reuses it). When Lightning starts them, it does so at ``trainer.fit``, after this."""
    strategy = trainer.strategy
    if trainer.world_size > 1 and hasattr(strategy, "set_world_ranks"):
        strategy.set_world_ranks()  # ranks from the environment, before fit sets them
    if trainer.global_rank == 0:
        prepare()
    if trainer.world_size > 1 and not launches_processes(trainer) and _started_externally(strategy):
        strategy.setup_environment()
        strategy.barrier("hstu.prepare_data")


def _started_externally(strategy) -> bool:
    """True under torchrun, srun and other launchers; False for the ranks Lightning's own launcher starts
    (their environment is Lightning's, and rank zero, which started them, never waits at the barrier)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    return not isinstance(strategy.cluster_environment, LightningEnvironment)


# ---- sums over processes -------------------------------------------------------------------------

def sum_over_processes(trainer, values: Sequence[float]) -> list[float]:
    """``values`` added up over the processes, elementwise (float64; integers below 2**53 stay exact)."""
    if trainer.world_size == 1 or not values:
        return list(values)
    tensor = torch.tensor(list(values), dtype=torch.float64, device=trainer.strategy.root_device)
    return trainer.strategy.reduce(tensor, reduce_op="sum").tolist()


def gathered_over_processes(trainer, value: Any) -> list[Any]:
    """Every process's ``value`` (plain data and tensors), by global rank; every process must call it."""
    if trainer.world_size == 1:
        return [value]
    values = [None] * trainer.world_size
    torch.distributed.all_gather_object(values, value)
    return values


def max_over_processes(trainer, value: float) -> float:
    if trainer.world_size == 1:
        return value
    tensor = torch.tensor(value, dtype=torch.float64, device=trainer.strategy.root_device)
    return float(trainer.strategy.reduce(tensor, reduce_op="max"))


def summed_operator_stats(trainer, stats: dict[str, dict]) -> dict[str, dict]:
    """The Triton operator manager's ``get_stats()`` with calls and traced dispatches added up over the
    processes (every rank has the same operators and backends; timings stay rank zero's)."""
    counters = [(op, part, backend) for op in sorted(stats) for part in ("calls", "traced") for backend in BACKENDS]
    if trainer.world_size == 1 or not counters:
        return stats
    sums = sum_over_processes(trainer, [stats[op][part].get(backend, 0) for op, part, backend in counters])
    summed = {op: {**entry, "calls": dict(entry["calls"]), "traced": dict(entry["traced"])}
              for op, entry in stats.items()}
    for (op, part, backend), total in zip(counters, sums):
        summed[op][part][backend] = int(total)
    return summed
