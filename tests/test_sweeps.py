"""Hydra multirun: kernels on/off sweeps and the Optuna search run end to end (tiny synthetic data), each
ending with its summary table."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli import run_script
from hstu.train import RUN_LOCK, claim_run_dir


ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "data=synthetic", "data.source.num_users=64", "data.source.max_len=30", "model.max_seq_len=32", "model.dim=16",
    "model.encoder.dqk=8", "model.encoder.dv=8", "trainer.max_epochs=1", "trainer.accelerator=cpu",
    "callbacks=none", "logger=[]",
]


def multirun(tmp_path, *overrides):
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *TINY, *overrides,
           f"hydra.sweep.dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=os.environ.copy())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_triton_none_all_sweep(tmp_path):
    """+triton=none,all: same data and seed; 'all' records one fallback per operator without a kernel here.
    The sweep ends with one table of both jobs, printed and written as summary.csv."""
    proc = multirun(tmp_path, "+triton=none,all")
    off, on = (json.loads((tmp_path / str(i) / "metrics.json").read_text()) for i in (0, 1))
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["job"] for row in rows] == ["0", "1"] and [row["status"] for row in rows] == ["done", "done"]
    assert ["+triton=none" in row["overrides"].split() for row in rows] == [True, False]
    assert ["+triton=all" in row["overrides"].split() for row in rows] == [False, True]
    assert [float(row["test/ndcg@10"]) for row in rows] == [off["test"]["ndcg@10"], on["test"]["ndcg@10"]]
    assert float(rows[0]["samples_per_sec"]) == off["throughput"]["samples_per_sec"]
    assert rows[0]["kernel_fallbacks"] == "" and rows[1]["kernel_fallbacks"] == ""
    table = proc.stdout[proc.stdout.index("Sweep summary (2 jobs)"):]
    assert "+triton=none" in table and "+triton=all" in table and "summary.csv" in table
    assert off["kernels"]["fallbacks"] == {} and not any(off["kernels"]["flags"].values())
    assert all(on["kernels"]["flags"].values()) and on["kernels"]["fallbacks"] == {}
    # Under the Triton interpreter (tests/conftest.py) the kernels run on CPU tensors: every operator that the
    # run called went through its Triton backend only.
    called = {op: stats["calls"] for op, stats in on["kernels"]["stats"].items() if sum(stats["calls"].values())}
    assert {"hstu_hierarchical_attention", "fused_attention_layernorm"} <= set(called)
    assert all(calls.get("reference", 0) == 0 and calls["triton"] > 0 for calls in called.values()), called
    assert set(on["test"]) == set(off["test"])


@pytest.mark.slow
def test_optuna_search_runs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = multirun(tmp_path, "hparams_search=ml1m-optuna", "hydra.sweeper.n_trials=2",
             "hydra.sweeper.sampler.n_startup_trials=1")
    result = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert 0.0 <= result["best_value"] <= 1.0
    assert set(result["best_params"]) >= {"model.optimizer.lr", "model.loss.temperature"}
    assert "setup plugin" not in proc.stdout + proc.stderr  # alembic's lines, one per plugin
    assert (tmp_path / "summary.csv").read_text().count("\n") == 3  # a header and two trials


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    """hydra/launcher=submitit_local (the local twin of submitit_slurm) runs a 2-job sweep in submitit's own
    processes, and the summary reads both jobs' metrics."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    multirun(tmp_path, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", "seed=1,2")
    with open(tmp_path / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["status"] for row in rows] == ["done", "done"]
    assert [("seed=1" in row["overrides"], "seed=2" in row["overrides"]) for row in rows] == [(True, False), (False, True)]
    assert (tmp_path / ".submitit").is_dir()  # the jobs ran through submitit


def test_a_sweep_with_a_bad_job_stops_before_any_job_runs(tmp_path):
    """Hydra's sweeper would run job 0, fail at job 1 and end with no summary; every job is checked first."""
    result = run_script("train", "-m", *TINY, "model.optimizer.lr=0.001,-1,0.002", "seed=1,2",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}", f"paths.data_dir={tmp_path / 'data'}")
    assert result.code == 1
    assert result.error_lines == ["sweep job 2 (model.optimizer.lr=-1 seed=1): model.optimizer.lr=-1.0: must be > 0"]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "data").exists()


def test_a_sweep_into_an_earlier_sweeps_directory_is_refused_before_it_writes(tmp_path):
    """Hydra writes each job's .hydra files before the job runs: a second sweep into the first one's folder
    would rewrite the finished jobs' configs (eval and export then refuse them) before any job could stop."""
    sweep = tmp_path / "sweep"
    (sweep / "0" / ".hydra").mkdir(parents=True)
    earlier = {sweep / "0" / "metrics.json": "{}", sweep / "0" / ".hydra" / "config.yaml": "model:\n  dim: 8\n"}
    for path, text in earlier.items():
        path.write_text(text)
    result = run_script("train", "-m", *TINY, "model.dim=16,32", f"hydra.sweep.dir={sweep}",
                        f"paths.data_dir={tmp_path / 'data'}")
    assert result.code == 1
    assert result.error_lines == [f"hydra.sweep.dir={sweep} holds an earlier sweep's jobs (0/metrics.json); leave "
                                  "hydra.sweep.dir unset for a new directory"]
    assert {path: path.read_text() for path in earlier} == earlier
    written = sorted(p.relative_to(sweep).as_posix() for p in sweep.rglob("*"))
    assert written == ["0", "0/.hydra", "0/.hydra/config.yaml", "0/metrics.json"]


def test_a_sweep_whose_jobs_share_a_directory_is_refused_before_it_writes(tmp_path):
    result = run_script("train", "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                        "hydra.sweep.subdir=job", f"paths.data_dir={tmp_path / 'data'}")
    assert result.code == 1
    assert result.error_lines == ["hydra.sweep.subdir=job: gives all 2 jobs of the sweep one directory, where each would "
                                  "overwrite the one before; keep ${hydra.job.num} in it"]
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_into_a_directory_another_sweep_writes_now_is_refused(tmp_path):
    """Two sweeps given one hydra.sweep.dir: the second stops with one line while the first holds it (their
    jobs would share folders, checkpoints and metrics.json), and writes nothing there."""
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    claim = claim_run_dir(sweep, "hydra.sweep.dir", "sweep")  # a sweep running there now
    try:
        result = run_script("train", "-m", *TINY, "seed=1,2", f"hydra.sweep.dir={sweep}",
                            f"paths.data_dir={tmp_path / 'data'}")
    finally:
        os.close(claim)
    assert result.code == 1
    assert result.error_lines == [f"hydra.sweep.dir={sweep}: another sweep is writing into this directory now; wait "
                                  "for it to end, or leave hydra.sweep.dir unset for a new directory"]
    assert [p.name for p in sweep.iterdir()] == [RUN_LOCK]


@pytest.mark.slow
def test_a_sweep_that_a_failing_job_stops_keeps_its_summary(tmp_path):
    """A job that fails while it runs (its data folder is a file) stops Hydra's sweep before its end; the
    summary written as each job ended lists the finished job and the failed one."""
    blocked = tmp_path / "a_file"
    blocked.write_text("")
    result = run_script("train", "-m", *TINY, f"data.data_dir={tmp_path / 'data'},{blocked}",
                        f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert result.code == 1
    with open(tmp_path / "sweep" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["job"], row["status"]) for row in rows] == [("0", "done"), ("1", "failed")]
    assert float(rows[0]["test/ndcg@10"]) > 0
