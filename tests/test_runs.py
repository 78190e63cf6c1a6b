"""Runs as processes: a directory of their own, resume after SIGKILL or SIGINT exactly where the
uninterrupted run would be, and the stop on a NaN loss that keeps the last good checkpoint."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import hstu.config  # noqa: F401
from hstu.config import new_directory, remove_new_directory
from hstu.errors import TrainingDivergedError
from hstu.export import load_run
from hstu.guards import NonFiniteLossFlag
from cli import run_script
from hstu.train import RUN_LOCK, claim_run_dir, train
from tiny_run import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
# 64 users, 4 training batches an epoch: tiny, yet dropout, sampled negatives and shuffling all draw.
TINY = ["data=synthetic", "data.source.num_users=64", "data.source.max_len=30", "model.max_seq_len=32",
        "model.dim=16", "data.batch_size=16", "trainer.accelerator=cpu", "logger=[]"]


def run(cwd: Path, *overrides: str, data_dir: Path) -> subprocess.CompletedProcess:
    """scripts/train.py as a process; tests/ is on its path for the fault-injecting callbacks."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, *overrides,
                           f"paths.data_dir={data_dir}"], capture_output=True, text=True, cwd=cwd, env=env, timeout=900,
                          preexec_fn=_default_sigint)


def _default_sigint() -> None:
    """Python turns SIGINT into KeyboardInterrupt only if it was not ignored at start-up, and a shell
    that starts pytest in the background (``pytest &``) ignores it for all its children."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


# ---- run directories ---------------------------------------------------------------------------------

def test_new_directory_never_returns_one_that_existed(tmp_path):
    (tmp_path / "runs" / "12-00-00").mkdir(parents=True)
    made = [new_directory(str(tmp_path / "runs" / "12-00-00")) for _ in range(3)]
    assert [Path(m).name for m in made] == ["12-00-00_1", "12-00-00_2", "12-00-00_3"]
    assert all(Path(m).is_dir() and not any(Path(m).iterdir()) for m in made)


def test_a_new_directory_is_removed_only_while_it_holds_nothing_but_the_named_files(tmp_path):
    made = Path(new_directory(str(tmp_path / "runs" / "a")))
    (made / ".hydra").mkdir()
    (made / ".hydra" / "config.yaml").write_text("x")
    (made / "train.log").write_text("x")
    (made / "metrics.json").write_text("{}")
    leftovers = (".hydra/config.yaml", "train.log")
    assert not remove_new_directory(made, leftovers) and (made / "metrics.json").is_file()  # a file of its own
    (made / "metrics.json").unlink()
    (made / "csv" / "version_0").mkdir(parents=True)  # a logger's folders, made before it logged anything
    assert remove_new_directory(made, leftovers) and not made.exists() and (tmp_path / "runs").is_dir()
    (tmp_path / "mine").mkdir()  # a directory this process's new_directory did not make: never removed
    assert not remove_new_directory(tmp_path / "mine") and (tmp_path / "mine").is_dir()


def test_run_directory_comes_from_the_resolver():
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", return_hydra_config=True)
    for node in (cfg.hydra.run, cfg.hydra.sweep):
        raw = node._get_node("dir")._value()
        assert raw.startswith("${hstu.new_dir:") and "${now:" in raw, raw


@pytest.mark.slow
def test_two_runs_started_together_get_their_own_directories(tmp_path):
    """The default hydra.run.dir (one per second before) for two runs started at once, as processes."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = {model: subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, f"model={model}",
                                      "trainer.max_epochs=1", "callbacks=none", f"paths.data_dir={tmp_path / 'data'}"],
                                     cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for model in ("hstu", "sasrec")}
    for model, proc in procs.items():
        assert proc.wait(timeout=900) == 0, proc.stdout.read()[-3000:]
    run_dirs = sorted(p.parent for p in tmp_path.glob("outputs/*/*/metrics.json"))
    assert len(run_dirs) == 2
    models = {metrics(d)["config"]["model"]["encoder"]["_target_"].rsplit(".", 1)[1] for d in run_dirs}
    assert models == {"HSTUEncoder", "SASRecEncoder"}
    for run_dir in run_dirs:  # each run's own config and overrides
        model = metrics(run_dir)["config"]["model"]["encoder"]["_target_"]
        assert ("sasrec" in model) == ("model=sasrec" in (run_dir / ".hydra" / "overrides.yaml").read_text())


@pytest.mark.slow
def test_ddp_ranks_share_the_run_directory(tmp_path):
    """Lightning starts rank 1 as a new process of the script with hydra.run.dir set to rank 0's."""
    proc = run(tmp_path, "trainer.devices=2", "+trainer.strategy=ddp", "trainer.max_epochs=1", "callbacks=none",
               data_dir=tmp_path / "data")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = tmp_path.glob("outputs/*/*")
    assert {"metrics.json", "train.log", "train_ddp_process_1.log"} <= {p.name for p in run_dir.iterdir()}
    assert proc.stdout.count("run directory:") == 1 and proc.stdout.count("epoch 0/0") == 1


IN_USE = ("hydra.run.dir={}: another run is writing into this directory now; wait for it to end, or leave "
          "hydra.run.dir unset for a new directory")


@pytest.mark.slow
def test_two_runs_started_together_into_one_directory_one_stops(tmp_path):
    """Both find the directory empty (neither has written yet); the claim lets exactly one in."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HYDRA_FULL_ERROR", None)
    procs = [subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *TINY, "trainer.max_epochs=1",
                               "callbacks=none", f"paths.data_dir={tmp_path / 'data'}", "hydra.run.dir=run"],
                              cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outcomes = sorted((proc.wait(timeout=900), proc.stderr.read()) for proc in procs)
    assert [code for code, _ in outcomes] == [0, 1], outcomes
    # On a loaded machine the second may start only once the first has finished: its results refuse it then
    # (the claim alone: test_a_run_directory_in_use_stops_the_run_and_frees_when_it_ends).
    finished = ("run holds another run (metrics.json); resume it with ckpt_path=last, or leave hydra.run.dir unset "
                "for a new directory")
    assert outcomes[1][1].strip().splitlines() in ([IN_USE.format("run")], [finished])
    assert [row["epoch"] for row in metrics(tmp_path / "run")["epochs"]] == [0]


def test_a_run_directory_in_use_stops_the_run_and_frees_when_it_ends(tmp_path, monkeypatch):
    """While a run holds its directory, another (new or resumed) stops with one line and writes nothing there;
    once the claim is gone, the run and then its resumption go ahead."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = [*TINY_RUN, f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path / 'data'}"]
    run_dir.mkdir()
    claim = claim_run_dir(run_dir)  # a run writing there now
    try:
        refused = run_script("train", *args)
    finally:
        os.close(claim)
    assert refused.code == 1 and refused.error_lines == [IN_USE.format(run_dir)]
    assert [p.name for p in run_dir.iterdir()] == [RUN_LOCK]
    assert run_script("train", *args).code == 0
    resumed = run_script("train", *args, "ckpt_path=last", "trainer.max_epochs=2")
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert [row["epoch"] for row in metrics(run_dir)["epochs"]] == [0, 1]


# ---- resume --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resume_after_sigkill_or_sigint_continues_exactly(tmp_path):
    """A 4-epoch run killed in epoch 2 (0-based) and resumed from last.ckpt has the same per-epoch losses,
    validation and test metrics as the run that was never interrupted (fp32, CPU: bit for bit)."""
    data_dir = tmp_path / "data"
    full = run(tmp_path, "trainer.max_epochs=4", "hydra.run.dir=full", data_dir=data_dir)
    assert full.returncode == 0, full.stderr[-3000:]
    reference = metrics(tmp_path / "full")
    assert [row["epoch"] for row in reference["epochs"]] == [0, 1, 2, 3]
    for name, code in (("SIGKILL", -signal.SIGKILL), ("SIGINT", 1)):
        killed = run(tmp_path, "trainer.max_epochs=4", f"hydra.run.dir={name}", "+callbacks.fault._target_="
                     "train_faults.SignalAt", "+callbacks.fault.epoch=2", f"+callbacks.fault.signal_name={name}",
                     data_dir=data_dir)
        assert killed.returncode == code, killed.stderr[-3000:]
        run_dir = tmp_path / name
        assert not (run_dir / "metrics.json").exists()
        assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["epoch"] == 1
        resumed = run(tmp_path, "trainer.max_epochs=4", f"hydra.run.dir={name}", "ckpt_path=last", data_dir=data_dir)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        result = metrics(run_dir)
        assert result["resumed_from"] == str(run_dir / "checkpoints" / "last.ckpt")
        assert result["epochs"] == [{**row, "samples_per_sec": r["samples_per_sec"], "epoch_time_s": r["epoch_time_s"]}
                                    for row, r in zip(reference["epochs"], result["epochs"])]  # timings differ
        assert result["val"] == reference["val"] and result["test"] == reference["test"]
        assert result["best_epoch"] == reference["best_epoch"]
        assert result["throughput"]["epochs_timed"] == 2  # epochs 1 and 3: 0 and 2 were a process's first


# The tiny run at a high learning rate: validation peaks at epoch 1 of 4, so resuming after epoch 2 must keep
# an earlier epoch's checkpoint as the best.
PEAKS_EARLY = [*TINY_RUN, "model.optimizer.lr=0.3", "seed=1"]


def train_in(out: Path, *overrides: str, data_dir: Path) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[*PEAKS_EARLY, *overrides, f"paths.output_dir={out}",
                                          f"paths.data_dir={data_dir}"])
    return train(cfg)


def test_a_moved_or_copied_run_resumes_with_its_own_best_checkpoint(tmp_path):
    """A run resumed in the folder it was moved or copied to selects the epoch the uninterrupted run selects,
    from its own folder's file (the checkpoints record absolute paths of the old folder)."""
    data_dir = tmp_path / "data"
    reference = train_in(tmp_path / "full", "trainer.max_epochs=4", data_dir=data_dir)
    assert reference["best_epoch"] < 2
    for how, transfer in (("moved", shutil.move), ("copied", shutil.copytree)):
        first, second = tmp_path / f"{how}-first", tmp_path / f"{how}-second"
        train_in(first, "trainer.max_epochs=3", data_dir=data_dir)
        transfer(first, second)
        resumed = train_in(second, "trainer.max_epochs=4", "ckpt_path=last", data_dir=data_dir)
        assert resumed["best_epoch"] == reference["best_epoch"], how
        assert resumed["best_checkpoint"] == str(second / "checkpoints" / f"epoch{reference['best_epoch']:03d}.ckpt")
        assert resumed["val"] == reference["val"] and resumed["test"] == reference["test"], how


def test_a_new_run_from_another_runs_checkpoint_selects_over_the_epochs_before_it(tmp_path):
    """A run started in a new folder from another run's last.ckpt copies that run's best file into its own
    folder and selects the epoch the uninterrupted run selects; the other run's files stay as they were.
    Where that file is gone, the best is chosen among the epochs this run trains."""
    data_dir = tmp_path / "data"
    reference = train_in(tmp_path / "full", "trainer.max_epochs=4", data_dir=data_dir)
    assert reference["best_epoch"] < 2
    first = tmp_path / "first"
    train_in(first, "trainer.max_epochs=3", data_dir=data_dir)
    before = {path.name: path.read_bytes() for path in (first / "checkpoints").iterdir()}
    resumed = train_in(tmp_path / "new", "trainer.max_epochs=4", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                       data_dir=data_dir)
    best = f"epoch{reference['best_epoch']:03d}.ckpt"
    assert resumed["best_epoch"] == reference["best_epoch"]
    assert resumed["best_checkpoint"] == str(tmp_path / "new" / "checkpoints" / best)
    assert resumed["val"] == reference["val"] and resumed["test"] == reference["test"]
    assert {path.name: path.read_bytes() for path in (first / "checkpoints").iterdir()} == before
    (first / "checkpoints" / best).unlink()
    resumed = train_in(tmp_path / "without-best", "trainer.max_epochs=4",
                       f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}", data_dir=data_dir)
    assert resumed["best_epoch"] == 3 and Path(resumed["best_checkpoint"]).is_file()


def test_resuming_on_other_items_stops_before_training(tmp_path, monkeypatch):
    """A resume on other items than the checkpoint's (a data override left out, or data that changed): one line
    naming the checkpoint and what differs, and the run directory the run made goes with it."""
    data_dir = tmp_path / "data"
    train_in(tmp_path / "first", data_dir=data_dir)
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    # The same count with one id replaced in the cached data: refused by the item-id digest the checkpoint records.
    (cache,) = data_dir.glob("*.npz")
    with np.load(cache) as npz:
        arrays = dict(npz)
    changed = dict(arrays, item=np.where(arrays["item"] == arrays["item"].max(), 1000, arrays["item"]))
    np.savez(cache, **changed)
    result = run_script("train", *PEAKS_EARLY, "trainer.max_epochs=2", f"ckpt_path={last}",
                        f"paths.data_dir={data_dir}")
    assert result.code == 1, result.stderr[-3000:]
    (answer,) = result.error_lines[1:]
    recorded = torch.load(last, weights_only=True)["hyper_parameters"]["item_ids_digest"]
    assert answer.startswith(f"ckpt_path={last}: {last}: trained on other item ids than the data has (both 40 items")
    assert f"item_ids_digest {recorded[:12]}... at training" in answer
    assert answer.endswith("; resume with the data settings of the run that wrote it")
    np.savez(cache, **arrays)
    args = [arg for arg in PEAKS_EARLY if not arg.startswith("data.source.num_items=")]
    result = run_script("train", *args, "data.source.num_items=50", "trainer.max_epochs=2", f"ckpt_path={last}",
                        f"paths.data_dir={data_dir}")
    assert result.code == 1, result.stderr[-3000:]
    job, *answer = result.error_lines
    assert job.startswith("Error executing job") and answer == [
        f"ckpt_path={last}: {last}: trained on 40 items but the data has 50; resume with the data settings of the "
        "run that wrote it"]
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("outputs/*/*"))
    # An explicit hydra.run.dir goes too when this run made it; one that existed stays.
    (tmp_path / "mine").mkdir()
    for run_dir, existed in ((tmp_path / "new" / "run", False), (tmp_path / "mine", True)):
        result = run_script("train", *args, "data.source.num_items=50", "trainer.max_epochs=2", f"ckpt_path={last}",
                            f"paths.data_dir={data_dir}", f"hydra.run.dir={run_dir}")
        assert result.code == 1 and run_dir.exists() == existed and (tmp_path / "new").is_dir()


def test_a_run_resumed_in_place_on_changed_events_is_refused(tmp_path, monkeypatch):
    """Its epochs would mix two datasets; a new run from its checkpoint may train on the new events of the same items."""
    monkeypatch.chdir(tmp_path)
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    args = [*PEAKS_EARLY, f"paths.data_dir={data_dir}"]
    assert run_script("train", *args, f"hydra.run.dir={run_dir}").code == 0
    (cache,) = data_dir.glob("*.npz")
    with np.load(cache) as npz:
        arrays = dict(npz)
    arrays["timestamp"][0] += 1
    np.savez(cache, **arrays)
    last = run_dir / "checkpoints" / "last.ckpt"
    refused = run_script("train", *args, f"hydra.run.dir={run_dir}", "trainer.max_epochs=2", "ckpt_path=last")
    assert refused.code == 1 and refused.error_lines[-1].startswith(
        f"ckpt_path=last: {last}: trained on other events than the data has (the same 40 items, but events_digest ")
    new_run = run_script("train", *args, f"hydra.run.dir={tmp_path / 'new'}", "trainer.max_epochs=2", f"ckpt_path={last}")
    assert new_run.code == 0, new_run.stderr[-3000:]


def test_a_refused_resume_leaves_the_runs_hydra_files_as_they_were(tmp_path, monkeypatch):
    """Hydra rewrites .hydra/ with the resuming command's config before the job starts: a resume refused before
    it trains (data of other items) puts the run's own files back, so eval and export read the config it
    trained with."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = [*PEAKS_EARLY, f"hydra.run.dir={run_dir}", f"paths.data_dir={tmp_path / 'data'}"]
    assert run_script("train", *args).code == 0
    before = {path.name: path.read_text() for path in (run_dir / ".hydra").iterdir()}
    others = [arg for arg in args if not arg.startswith("data.source.num_items=")]
    refused = run_script("train", *others, "data.source.num_items=50", "trainer.max_epochs=2", "ckpt_path=last")
    assert refused.code == 1 and refused.error_lines[-1].endswith("trained on 40 items but the data has 50; resume "
                                                                  "with the data settings of the run that wrote it")
    assert {path.name: path.read_text() for path in (run_dir / ".hydra").iterdir()} == before
    assert load_run(run_dir).config.data.source.num_items == 40


def test_resuming_a_run_at_its_epoch_or_step_limit_is_refused(tmp_path, monkeypatch):
    """A resume whose checkpoint has reached trainer.max_epochs or trainer.max_steps would train nothing and test
    the old weights again: one line naming the checkpoint and the limit, before anything is written."""
    data_dir = tmp_path / "data"
    train_in(tmp_path / "first", "trainer.max_epochs=2", data_dir=data_dir)  # 2 batches an epoch: step 4
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    monkeypatch.chdir(tmp_path)
    for limits, key, answer in ((["trainer.max_epochs=2"], "trainer.max_epochs", "has trained 2 epochs, and "
                                 "trainer.max_epochs=2 trains no more"),
                                (["trainer.max_epochs=3", "+trainer.max_steps=4"], "trainer.max_steps",
                                 "has trained 4 steps, and trainer.max_steps=4 trains no more")):
        result = run_script("train", *PEAKS_EARLY, *limits, f"ckpt_path={last}", f"paths.data_dir={data_dir}")
        assert result.code == 1, result.stderr[-3000:]
        assert result.error_lines == [f"ckpt_path={last}: {last}: {answer}; raise {key} to train on, or evaluate it "
                                      "with scripts/eval.py"]
        assert "Traceback" not in result.stderr and not list(tmp_path.glob("outputs/*/*"))
    resumed = train_in(tmp_path / "first", "trainer.max_epochs=3", "ckpt_path=last", data_dir=data_dir)
    assert [row["epoch"] for row in resumed["epochs"]] == [0, 1, 2]


def test_resuming_a_run_that_stopped_early_is_refused(tmp_path, monkeypatch):
    """Restored, early stopping would stop again after one more epoch, which would replace the stopped run's last
    checkpoint and results: one line instead. Without early stopping the run trains on."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    args = [*PEAKS_EARLY, "trainer.max_epochs=8", "callbacks.early_stopping.patience=0", f"hydra.run.dir={run_dir}",
            f"paths.data_dir={tmp_path / 'data'}"]
    assert run_script("train", *args).code == 0
    stopped = metrics(run_dir)["epochs_trained"] - 1
    last = run_dir / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    refused = run_script("train", *args, "ckpt_path=last")
    assert refused.code == 1 and refused.error_lines[-1] == (
        f"ckpt_path=last: {last}: its run stopped early at epoch {stopped} (val/ndcg@10 did not improve for 1 "
        "validation); evaluate it with scripts/eval.py, or train on without early stopping (~callbacks.early_stopping)")
    assert last.read_bytes() == before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = run_script("train", *args, "ckpt_path=last", "~callbacks.early_stopping")
    assert resumed.code == 0, resumed.stderr[-3000:]
    assert [row["epoch"] for row in metrics(run_dir)["epochs"]] == list(range(8))
    # Lightning's advice to add the early stopping back contradicts the refusal's: left out on purpose
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]


@pytest.mark.parametrize("validation", [[], ["+trainer.val_check_interval=0.5"]], ids=["epoch-end", "mid-epoch"])
def test_a_run_stopped_inside_an_epoch_by_max_steps_resumes_exactly(tmp_path, validation):
    """Stopped by trainer.max_steps after the first batch of epoch 1 (2 batches an epoch; with a validation there,
    or not), then resumed with a higher limit: the loader goes on after the trained batch in the epoch's order, with
    the generators as the stop left them, and the epoch's loss covers both halves. Weights, epoch losses and
    metrics equal the uninterrupted run's."""
    data_dir = tmp_path / "data"
    full = train_in(tmp_path / "full", "trainer.max_epochs=3", "+trainer.max_steps=5", *validation, data_dir=data_dir)
    train_in(tmp_path / "cut", "trainer.max_epochs=3", "+trainer.max_steps=3", *validation, data_dir=data_dir)
    resumed = train_in(tmp_path / "cut", "trainer.max_epochs=3", "+trainer.max_steps=5", "ckpt_path=last", *validation,
                       data_dir=data_dir)
    untimed = lambda rows: [{k: v for k, v in row.items() if k not in ("samples_per_sec", "epoch_time_s")}  # noqa: E731
                            for row in rows]
    assert [row["epoch"] for row in resumed["epochs"]] == [0, 1, 2]
    assert untimed(resumed["epochs"]) == untimed(full["epochs"])
    assert resumed["val"] == full["val"] and resumed["test"] == full["test"]
    weights = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for run in ("full", "cut")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_a_resumed_run_trains_with_its_own_optimizer_settings(tmp_path):
    """Restoring the optimizer's state put the old run's lr and weight decay back while the run recorded the
    new ones: the resumed epochs train with what the resumed run's config says."""
    data_dir = tmp_path / "data"
    train_in(tmp_path / "run", "trainer.max_epochs=1", data_dir=data_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_in(tmp_path / "run", "trainer.max_epochs=2", "ckpt_path=last", "model.optimizer.lr=0.01",
                 "model.optimizer.weight_decay=0.2", "model.optimizer.betas=[0.8,0.9]", data_dir=data_dir)
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]  # the run's own checkpoints
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 1
    assert [(g["lr"], g["weight_decay"], tuple(g["betas"])) for g in last["optimizer_states"][0]["param_groups"]] \
        == [(0.01, 0.2, (0.8, 0.9))]


# ---- NaN / inf loss --------------------------------------------------------------------------------

def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[*TINY, "trainer.max_epochs=3", "~callbacks.rich_progress_bar",
                                          "+callbacks.fault._target_=train_faults.NaNLossFrom",
                                          "+callbacks.fault.epoch=1", "+callbacks.fault.batch=2",
                                          f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"])
    with pytest.raises(TrainingDivergedError, match=r"^the training loss was NaN or inf at epoch 1, batch 2; updates "
                       r"were skipped from there and the run stops; the last good checkpoint is .*last\.ckpt$"):
        train(cfg)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch000.ckpt", "last.ckpt"]
    assert not (tmp_path / "metrics.json").exists()


def test_nan_loss_after_a_validation_within_the_epoch_stops_the_run(tmp_path):
    """With trainer.val_check_interval=0.5 the flag is read at each validation and at the epoch's end: a NaN
    after the mid-epoch validation (read then) still stops the run."""
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=[*TINY, "trainer.max_epochs=2", "+trainer.val_check_interval=0.5",
                                          "~callbacks.rich_progress_bar",
                                          "+callbacks.fault._target_=train_faults.NaNLossFrom", "+callbacks.fault.epoch=0", "+callbacks.fault.batch=3",
                                          f"paths.output_dir={tmp_path}", f"paths.data_dir={tmp_path / 'data'}"])
    with pytest.raises(TrainingDivergedError, match=r"^the training loss was NaN or inf at epoch 0, batch 3; "):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_fused_adamw_skips_updates_while_the_flag_is_set():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    flag = NonFiniteLossFlag()
    flag.reset("cpu")
    assert flag.attach(optimizer)

    def step(loss_scale):
        optimizer.zero_grad()
        loss = (weight * loss_scale).sum()
        flag.record(loss)
        loss.backward()
        optimizer.step()
        return weight.detach().clone(), {k: v.clone() for k, v in optimizer.state[weight].items()}

    before = step(1.0)
    assert flag.first_bad() is None
    for scale in (float("nan"), 1.0, float("inf")):  # skipped, also after a finite loss: the flag stays set
        after = step(scale)
        assert torch.equal(after[0], before[0]) and all(torch.equal(after[1][k], v) for k, v in before[1].items())
    assert flag.first_bad() == 1  # the second recorded step
    flag.reset("cpu")
    assert not torch.equal(step(1.0)[0], before[0]) and flag.first_bad() is None
    assert not NonFiniteLossFlag().attach(torch.optim.AdamW([weight], fused=False))  # refuses found_inf


@pytest.mark.gpu
def test_recording_the_loss_never_waits_for_the_gpu():
    weight = torch.nn.Parameter(torch.ones(1024, device="cuda"))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    flag = NonFiniteLossFlag()
    flag.reset("cuda")
    flag.attach(optimizer)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for scale in (1.0, float("nan"), 1.0):
            optimizer.zero_grad()
            loss = (weight * scale).sum()
            flag.record(loss)
            loss.backward()
            optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert flag.first_bad() == 1
