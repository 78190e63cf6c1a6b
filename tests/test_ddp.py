"""Training and evaluation on several processes (Lightning's DDP, gloo on CPU).

The runs go through ``scripts/*.py`` in a subprocess: Lightning's launcher starts the other ranks by
re-running the command line, which inside pytest would re-run pytest."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hstu.data.datamodule import EpochShuffle, shard_bounds
from hstu.distributed import external_job, shared_new_directory
from hstu.errors import ConfigError
from tests.cli import run_script
from tests.tiny_run import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
# 63 users: an odd count, so a distributed sampler would pad evaluation with a duplicate user.
USERS = 63
TINY = [
    "data=synthetic", f"data.source.num_users={USERS}", "data.source.num_items=60", "data.source.max_len=24",
    "model.max_seq_len=16", "model.dim=16", "model.encoder.dqk=8", "model.encoder.dv=8", "model.encoder.num_blocks=1",
    "model.loss.num_negatives=16", "data.batch_size=16", "trainer.max_epochs=2",
    "logger=[]", "~callbacks.rich_progress_bar", "~callbacks.early_stopping",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def run(script: str, *args: str, cwd: Path, succeeds: bool = True) -> subprocess.CompletedProcess:
    """``scripts/<script>.py args`` (or ``tests/<script>.py``) in a new process started in ``cwd``, which
    must exit with status 0 (``succeeds``) or not."""
    path = ROOT / "scripts" / f"{script}.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / ".pypath"), str(ROOT),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(path if path.is_file() else ROOT / "tests" / f"{script}.py"), *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert (proc.returncode == 0) == succeeds, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def assert_same_totals(one: dict, two: dict) -> None:
    """Counts exactly equal; float sums within 1e-9 relative (only the order of additions differs)."""
    assert set(one) == set(two)
    for name, value in one.items():
        if isinstance(value, int):
            assert two[name] == value, name
        else:
            assert math.isclose(two[name], value, rel_tol=1e-9, abs_tol=0.0), (name, value, two[name])


@pytest.mark.slow
def test_two_gloo_processes_train_and_evaluate_like_one(tmp_path):
    """Two processes train in one shared run directory; rank zero writes metrics.json with every user counted
    once and the throughput of both processes; one checkpoint evaluated on 1 and 2 processes gives the same sums."""
    data = tmp_path / "data"
    run("train", *TINY, *DDP, f"paths.data_dir={data}", cwd=tmp_path)
    (run_dir,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]  # one directory for both ranks
    assert (run_dir / "train_ddp_process_1.log").is_file()
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["processes"] == 2
    for split in ("val", "test"):
        assert report["totals"][split]["count"] == USERS  # each user once: no padding, no user left out
    throughput = report["throughput"]
    assert throughput["samples_per_sec_per_process"] == pytest.approx(throughput["samples_per_sec"] / 2)
    # the operator calls of both ranks: two ranks run the same number of steps, so the sum is even
    calls = report["kernels"]["stats"]["hstu_hierarchical_attention"]["calls"]
    assert calls["reference"] > 0 and calls["reference"] % 2 == 0

    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    common = [f"run_dir={run_dir}", f"ckpt_path={checkpoint}", "accelerator=cpu"]
    run("eval", *common, "devices=1", f"out_file={tmp_path / 'one.json'}", cwd=tmp_path)
    run("eval", *common, "devices=2", f"out_file={tmp_path / 'two.json'}", cwd=tmp_path)
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["totals"]["test"]["count"] == USERS
    assert_same_totals(one["totals"]["test"], two["totals"]["test"])
    for name, value in one["test"].items():
        assert two["test"][name] == pytest.approx(value, rel=1e-6), name  # logged in float32 by Lightning


@pytest.mark.slow
def test_ranks_keep_the_same_weights(tmp_path):
    """DDP's all-reduce runs in the step's backward (manual optimisation): after several steps on different
    examples both ranks hold the same parameters; the gradients are views of DDP's bucket."""
    run("ddp_weights", str(tmp_path), *TINY, *DDP, "trainer.max_epochs=1", "data.batch_size=8", "test=false",
        cwd=tmp_path)
    reports = sorted(path.read_text().strip().split("\n") for path in tmp_path.glob("parameter_sum_rank*.txt"))
    lines = [report[0] for report in reports]
    assert [line.split()[:4] for line in lines] == [["rank", "0", "steps", "4"], ["rank", "1", "steps", "4"]]
    assert lines[0].split()[-1] == lines[1].split()[-1]
    # conf/trainer/ddp.yaml's settings reach DDP on CPU too: the gradients are views of one bucket (the tiny
    # model fills one), all-reduced by the comm hook, with no copy or division per parameter
    for report in reports:
        assert report[1] == ("gradient_as_bucket_view True static_graph False comm_hook allreduce_hook "
                             "gradient_storages 1 of 7"), report


@pytest.mark.slow
def test_a_nan_loss_on_one_rank_skips_the_update_on_both(tmp_path):
    """Rank 1's losses turn NaN from its third step: its NaN gradients reach rank 0 through the all-reduce, so
    both ranks skip every update from there (the non-finite flag is shared) and keep the same finite weights;
    the run then stops on both."""
    proc = run("ddp_weights", str(tmp_path), *TINY, *DDP, "trainer.max_epochs=1", "data.batch_size=8", "test=false",
               "+callbacks.fault._target_=train_faults.NaNLossFrom", "+callbacks.fault.epoch=0",
               "+callbacks.fault.batch=2", "+callbacks.fault.rank=1", cwd=tmp_path, succeeds=False)
    assert "the training loss was NaN or inf at epoch 0, batch 2" in proc.stderr
    lines = sorted(path.read_text().split("\n")[0] for path in tmp_path.glob("parameter_sum_rank*.txt"))
    assert [line.split()[:4] for line in lines] == [["rank", "0", "steps", "4"], ["rank", "1", "steps", "4"]]
    sums = [float(line.split()[-1]) for line in lines]
    assert math.isfinite(sums[0]) and sums[0] == sums[1], lines


def test_multirun_with_processes_lightning_starts_is_refused(tmp_path):
    """-m with trainer=ddp on 2 devices would run the sweep once per rank: one line, before any data is read."""
    result = run_script("train", "-m", *TINY, *DDP, f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        f"paths.data_dir={tmp_path / 'data'}")
    assert result.code != 0
    assert result.error_lines[-1:] == [  # after Hydra's line naming the job's overrides
        "-m with trainer.devices x trainer.num_nodes = 2 processes: Lightning would re-run this command line, so the "
        "sweep, once per process; sweep multi-GPU jobs with a launcher that starts the ranks itself "
        "(hydra/launcher=submitit_slurm with tasks_per_node = GPUs, or torchrun)"]
    assert not (tmp_path / "data").exists()


def test_distributed_sampler_is_refused():
    result = run_script("train", *TINY, "trainer.use_distributed_sampler=true")
    assert result.code != 0 and "trainer.use_distributed_sampler=true" in result.error_lines[-1]


@pytest.mark.parametrize("size,world_size", [(0, 2), (1, 2), (7, 2), (8, 4), (10, 3), (5, 8)])
def test_evaluation_slices_count_each_example_once(size, world_size):
    bounds = [shard_bounds(size, rank, world_size) for rank in range(world_size)]
    covered = np.concatenate([np.arange(start, stop) for start, stop in bounds])
    assert covered.tolist() == list(range(size))
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1


@pytest.mark.parametrize("size,world_size", [(1, 2), (7, 2), (8, 4), (10, 3), (3, 4)])
def test_training_shards_cover_the_epoch_with_equal_steps(size, world_size):
    """Every rank the same number of examples, together every example of the epoch's permutation; the order is
    (seed, epoch)'s, so the ranks' shards change from epoch to epoch."""
    for epoch in (0, 1):
        shards = []
        for rank in range(world_size):
            sampler = EpochShuffle(size, seed=3, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert {len(shard) for shard in shards} == {-(-size // world_size)}
        assert set(np.concatenate(shards).tolist()) == set(range(size))
        single = EpochShuffle(size, seed=3)
        single.set_epoch(epoch)
        assert [shard[0] for shard in shards][: min(size, world_size)] == list(single)[: min(size, world_size)]


def test_ranks_started_by_srun_share_rank_zeros_run_directory(tmp_path, monkeypatch):
    """Rank zero makes the run directory (a second later than rank one's clock would name it) and the other
    rank finds it through rank zero's note."""
    for key in ("TORCHELASTIC_RUN_ID", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    made = []

    def make(path):
        Path(path).mkdir(parents=True)
        made.append(path)
        return path

    monkeypatch.setenv("SLURM_PROCID", "0")
    assert external_job() == (0, 2, "slurm-4242.0")
    zero = shared_new_directory("outputs/day/12-00-01", make)
    monkeypatch.setenv("SLURM_PROCID", "1")
    one = shared_new_directory("outputs/day/12-00-00", make)
    assert made == ["outputs/day/12-00-01"] and Path(one) == (tmp_path / zero).resolve()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # one task: an ordinary new directory
    assert external_job() is None and shared_new_directory("outputs/day/x", make) == "outputs/day/x"


def test_torchrun_without_a_job_id_asks_for_the_run_directory(monkeypatch):
    monkeypatch.delenv("SLURM_PROCID", raising=False)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="pass hydra.run.dir"):
        shared_new_directory("outputs/a/b", lambda path: path)


def test_baselines_cover_the_whole_split_whatever_the_rank(tmp_path, monkeypatch):
    """Baselines are counted on the host over every example, on any rank, without a collective (NCCL
    cannot gather CPU tensors)."""
    from hydra.utils import instantiate

    from hstu.baselines import BASELINES, baseline_metrics
    from test_train import SYNTHETIC_SMALL, compose_train

    cfg = compose_train(*SYNTHETIC_SMALL, f"paths.data_dir={tmp_path}")
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    one_process = {name: baseline_metrics(name, datamodule, "test") for name in BASELINES}
    monkeypatch.setattr(datamodule, "_rank_and_world_size", lambda: (1, 2))
    assert len(datamodule.test_dataloader().dataset) < len(datamodule.evaluation_dataloader("test", shard=False).dataset)
    assert {name: baseline_metrics(name, datamodule, "test") for name in BASELINES} == one_process


@pytest.mark.slow
def test_two_processes_resume_as_if_uninterrupted(tmp_path):
    """Each process's generators and epoch loss are its own in a checkpoint: resumed at an epoch's end or inside
    an epoch, the two processes go on as the uninterrupted run (its epoch losses and metrics, exactly); inside an
    epoch, where each process's remaining batches are its own, another number of processes is refused."""
    data = f"paths.data_dir={tmp_path / 'data'}"
    # 67 users in batches of 8: the processes' shares differ, and so do the random numbers each draws
    uneven = [*TINY_RUN, "data.source.num_users=67", "data.batch_size=8"]
    untimed = lambda rows: [{k: v for k, v in row.items() if k not in ("samples_per_sec", "epoch_time_s")}  # noqa: E731
                            for row in rows]
    run("train", *uneven, *DDP, "trainer.max_epochs=3", "hydra.run.dir=full", data, cwd=tmp_path)
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    for stop in ("trainer.max_epochs=2", "+trainer.max_steps=7"):  # 5 steps an epoch: the second inside epoch 1
        run_dir = tmp_path / stop.split(".")[-1].split("=")[0]
        run("train", *uneven, *DDP, "trainer.max_epochs=3", stop, f"hydra.run.dir={run_dir}", "test=false", data,
            cwd=tmp_path)
        if stop.startswith("+"):
            shutil.copytree(run_dir, tmp_path / "one-process")
        run("train", *uneven, *DDP, "trainer.max_epochs=3", f"hydra.run.dir={run_dir}", "ckpt_path=last", data,
            cwd=tmp_path)
        resumed = json.loads((run_dir / "metrics.json").read_text())
        assert untimed(resumed["epochs"]) == untimed(full["epochs"]), stop
        assert resumed["val"] == full["val"] and resumed["test"] == full["test"], stop
    refused = run("train", *uneven, *DDP[:2], "trainer.devices=1", "trainer.max_epochs=3", "hydra.run.dir=one-process",
                  "ckpt_path=last", data, cwd=tmp_path, succeeds=False)
    assert "written inside an epoch by 2 process(es), resumed by 1: the epoch's remaining batches are each " \
           "process's own" in refused.stderr
