"""Bad input, and what the user reads: each case is a command and the line it must answer with.

A mistake the user can fix (data, config, checkpoint, export, request) ends the script with exit
status 1 and a message naming the file and line, the key or the field, with no traceback before it.
Errors nobody expected keep their traceback, and HYDRA_FULL_ERROR=1 shows it for every error.

The cases run the scripts' ``@hydra.main`` in this process (tests/cli.py): the command line's
composition, checks and printing without a new Python process each. ``test_real_process`` runs one
case as a real process, to show the exit status and the clean output end to end.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from cli import SCRIPTS, run_script
from tiny_run import TINY_RUN
from hstu.module import RecModule

# One tiny data set: 6 users with 6-9 events each over 30 items, as an interactions CSV.
TRAIN = ["data=interactions", "data.source.columns=[user,item,timestamp]", "model.max_seq_len=8", "model.dim=8",
         "model.loss.num_negatives=4", "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=none", "logger=[]"]


@dataclass
class Case:
    script: str
    args: list[str]
    message: str  # a regular expression the first line of the answer must match
    more: str = ""  # a regular expression the rest of the answer must contain, where there is more


CASES = {
    # ---- data -------------------------------------------------------------------------------------
    "malformed line": Case("train", [*TRAIN, "data.source.path={bad}"],
                           r"^bad\.csv:4: item 'x7' is not an integer \(string ids need id_dtype: str\) in '2,x7,1003'$"),
    "missing file": Case("train", [*TRAIN, "data.source.path={tmp}/nope.csv"],
                         r"^data\.source\.path: .*nope\.csv does not exist or is not a file$"),
    "no training examples": Case("train", [*TRAIN, "data.source.path={short}"],
                                 r"short\.csv: no training examples\. Of 6 users, 0 have fewer than 3 events and were "
                                 r"dropped, and none of the other 6 has the 4 events a training example needs"),
    "count filter leaves nothing": Case("train", [*TRAIN, "data.source.path={good}",
                                                  "data.source.min_user_interactions=100"],
                                        r"^good\.csv: the count filter \(min_user_interactions=100, min_item_interactions=0, "
                                        r"filter_mode=one_pass\) leaves none of its 43 rows$"),
    "header not a bool": Case("train", [*TRAIN, "data.source.path={good}", "data.source.header=maybe"],
                              r"^data\.source\.header='maybe': must be true or false$"),  # 'maybe' dropped a line
    "empty separator": Case("train", [*TRAIN, "data.source.path={good}", "data.source.sep="],
                            r"^data\.source\.sep='': must be a non-empty string \(tab: 'tab'\)$"),
    "count not an integer": Case("train", [*TRAIN, "data.source.path={good}", "data.source.min_item_interactions=abc"],
                                 r"^data\.source\.min_item_interactions='abc': must be an integer >= 0$"),
    # ---- config: types at composition, ranges and keys before anything is built ----------------------
    "lr not a number": Case("train", [*TRAIN, "data.source.path={good}", "model.optimizer.lr=abc"],
                            r"^Error merging override model\.optimizer\.lr=abc$",
                            r"Value 'abc' of type 'str' could not be converted to Float"),
    "deterministic not a bool": Case("train", [*TRAIN, "data.source.path={good}", "trainer.deterministic=maybe"],
                                     r"^trainer\.deterministic=maybe: must be true, false or warn$"),
    "no devices": Case("train", [*TRAIN, "data.source.path={good}", "trainer.devices=0"],
                       r"^trainer\.devices=0: must be a count >= 1, -1 \(all\), auto, a list of device indices or a "
                       r"string of them \('0,1'\)$"),
    "device indices on a CPU": Case("train", [*TRAIN, "data.source.path={good}", "trainer.devices=[0]"],
                                    r"^trainer\.devices=\[0\]: a CPU run takes a process count >= 1 or auto \(device "
                                    r"indices and -1 select GPUs\)$"),
    "gradient clipping": Case("train", [*TRAIN, "data.source.path={good}", "+trainer.gradient_clip_val=1.0"],
                              r"^trainer\.gradient_clip_val=1\.0: is not supported: the training step \(hstu\.train_step\) "
                              r"does not clip gradients; leave it unset$"),
    "gradient accumulation": Case("train", [*TRAIN, "data.source.path={good}", "+trainer.accumulate_grad_batches=2"],
                                  r"^trainer\.accumulate_grad_batches=2: is not supported: .* raise data\.batch_size "
                                  r"instead$"),
    "fp16 autocast": Case("train", [*TRAIN, "data.source.path={good}", "trainer.precision=16-mixed"],
                          r"^trainer\.precision=16-mixed: fp16 autocast needs loss scaling, which the training step "
                          r"\(hstu\.train_step\) does not do; use bf16-mixed or 32-true$"),
    "monitored metric not computed": Case("train", [*TINY_RUN, "model.eval_ks=[5,20]"],
                                          r"^callbacks\.model_checkpoint\.monitor=val/ndcg@10: must be one of "
                                          r"\['val/ndcg@5', 'val/ndcg@20', 'val/hr@5', 'val/hr@20', 'val/mrr'\]"),
    "batch size 0": Case("train", [*TRAIN, "data.source.path={good}", "data.batch_size=0"],
                         r"^data\.batch_size=0: must be >= 1$"),
    "batch size -1": Case("train", [*TRAIN, "data.source.path={good}", "data.batch_size=-1"],
                          r"^data\.batch_size=-1: must be >= 1$"),
    "kernel flag 2": Case("train", [*TRAIN, "data.source.path={good}", "model.kernels.interaction=2"],
                          r"^Error merging override model\.kernels\.interaction=2$", r"Value '2' is not a boolean"),
    "kernel flag yes": Case("train", [*TRAIN, "data.source.path={good}", "model.kernels.interaction=yes"],
                            r"^Error merging override model\.kernels\.interaction=yes$", r"Value 'yes' is not a boolean"),
    "max_seq_len 0": Case("train", [*TRAIN, "data.source.path={good}", "model.max_seq_len=0"],
                          r"^model\.max_seq_len=0: must be >= 1$"),
    "dropout 1.5": Case("train", [*TRAIN, "data.source.path={good}", "model.encoder.dropout=1.5"],
                        r"^model\.encoder\.dropout=1\.5: must lie in \[0, 1\)$"),
    "unknown repeats": Case("train", [*TRAIN, "data.source.path={good}", "data.repeats=drop"],
                            r"^data\.repeats=drop: must be one of \['drop_exact', 'collapse_consecutive', 'keep'\]$"),
    "SASRec heads": Case("train", [*TRAIN, "data.source.path={good}", "model=sasrec", "model.encoder.num_heads=3"],
                         r"^model\.dim=8: SASRec needs it divisible by model\.encoder\.num_heads=3$"),
    "unknown top-level key": Case("train", [*TRAIN, "data.source.path={good}", "+foo=1"],
                                  r"^foo: unknown key; the top level has \['callbacks', 'ckpt_path', "),
    "unknown kernel flag": Case("train", [*TRAIN, "data.source.path={good}", "+model.kernels.hstu_attn=true"],
                                r"^model\.kernels\.hstu_attn: unknown key; model\.kernels has "),
    "max_epochs not a number": Case("train", [*TRAIN, "data.source.path={good}", "trainer.max_epochs=1O"],
                                    r"^trainer\.max_epochs=1O: must be an integer >= -1 \(-1: no limit\)$"),
    "precision unknown": Case("train", [*TRAIN, "data.source.path={good}", "trainer.precision=fp16"],
                              r"^trainer\.precision=fp16: must be one of \['transformer-engine', "),
    "GPU asked for, none here": Case("train", [*TRAIN, "data.source.path={good}", "trainer.accelerator=gpu"],
                                     r"^trainer\.accelerator=gpu: no CUDA GPU is visible on this machine"),
    "captured steps on a CPU": Case("train", [*TRAIN, "data.source.path={good}", "model.cuda_graphs=on"],
                                    r"^model\.cuda_graphs=on: steps cannot be captured: the run is on cpu$"),
    "Triton required, cannot run": Case("train", [*TRAIN, "data.source.path={good}", "+triton=all",
                                                  "model.kernel_fallback=error"],
                                        r"^model\.kernel_fallback=error: the Triton operator '\w+' cannot run here: "
                                        r"no CUDA device and TRITON_INTERPRET is not set"),
    "search without validation": Case("train", ["-m", "hparams_search=ml1m-optuna", *TRAIN, "data.source.path={good}",
                                                "data.protocol=paper"],
                                      r"^optimized_metric=val/ndcg@10: data\.protocol=paper has no validation split"),
    "SLURM launcher, no srun here": Case("train", ["-m", "hydra/launcher=slurm_ddp", "trainer=ddp", *TRAIN,
                                                   "data.source.path={good}"],
                                         r"^hydra/launcher: the SLURM launcher submits with sbatch and srun, and this "
                                         r"machine has no srun on its PATH; sweep from a SLURM login node"),
    "SLURM launcher without trainer=ddp": Case("train", ["-m", "hydra/launcher=slurm_ddp", *TRAIN,
                                                         "data.source.path={good}"],
                                               r"^hydra/launcher=slurm_ddp reads trainer\.num_nodes, which this trainer "
                                               r"config lacks; add trainer=ddp$"),
    # ---- resuming and run directories ---------------------------------------------------------------
    "ckpt_path with +": Case("train", [*TRAIN, "data.source.path={good}", "+ckpt_path=x.ckpt"],  # not ignored
                             r"^ckpt_path=x\.ckpt: .*x\.ckpt does not exist$"),
    "missing checkpoint": Case("train", [*TRAIN, "data.source.path={good}", "ckpt_path={tmp}/nope.ckpt"],
                               r"^ckpt_path=.*nope\.ckpt: .*nope\.ckpt does not exist$"),
    "ckpt_path=last, new directory": Case("train", [*TRAIN, "data.source.path={good}", "ckpt_path=last"],
                                          r"^ckpt_path=last: .*last\.ckpt does not exist; to resume a run, give its "
                                          r"directory too: hydra\.run\.dir=<run dir> ckpt_path=last$"),
    "resume from pickled objects": Case("train", [*TRAIN, "data.source.path={good}", "ckpt_path={evil}"],
                                        r"^ckpt_path=.*evil\.ckpt: .*evil\.ckpt: holds objects that weights_only loading "
                                        r"refuses \(pathlib\.PosixPath\), not only tensors and plain data; it is not loaded$"),
    "resume from another model": Case("train", [*TRAIN, "data.source.path={good}", "ckpt_path={other_ckpt}"],
                                      r"^ckpt_path=.*other\.ckpt: a checkpoint of another model: it differs from this "
                                      r"run's config in .*model\.dim \(16; the run has 8\)"),
    "resume a run in place from an earlier checkpoint": Case(
        "train", [*TINY_RUN, "trainer.max_epochs=2", "hydra.run.dir={second_run}",
                  "ckpt_path={second_run}/checkpoints/epoch000.ckpt"],
        r"^ckpt_path=.*second-run/checkpoints/epoch000\.ckpt: an earlier checkpoint of the run in .*second-run; "
        r"resuming it there would overwrite the run's last checkpoint and results: resume the run with ckpt_path=last, "
        r"or leave hydra\.run\.dir unset to start a new run from this file$"),
    "a data file's path left unset": Case("train", ["data=interactions", "trainer.accelerator=cpu"],
                                          r"^data\.source\.path is not set: give data\.source\.path=<value>$"),
    "eval: run_dir left unset": Case("eval", ["accelerator=cpu"], r"^run_dir is not set: give run_dir=<value>$"),
    "export: run_dir left unset": Case("export", ["compiled=none"], r"^run_dir is not set: give run_dir=<value>$"),
    # "no" is a non-empty string: it replaced the earlier report and export folder
    "eval: overwrite=no": Case("eval", ["run_dir={run}", "overwrite=no"], r"^Error merging override overwrite=no$",
                               r"Value 'no' is not a boolean \(type str\): use true or false"),
    "export: overwrite=no": Case("export", ["run_dir={run}", "out_dir={export}", "overwrite=no"],
                                 r"^Error merging override overwrite=no$",
                                 r"Value 'no' is not a boolean \(type str\): use true or false"),
    "ckpt_path a folder": Case("train", [*TRAIN, "data.source.path={good}", "ckpt_path={tmp}"],
                               r"^ckpt_path=.*: .* is a folder, not a checkpoint file \(to resume a run from its "
                               r"folder: hydra\.run\.dir=<run dir> ckpt_path=last\)$"),
    "resume from a weights-only checkpoint": Case(
        "train", [*TRAIN, "data.source.path={good}", "ckpt_path={weights_only}"],
        r"^ckpt_path=.*weights-only\.ckpt: .*weights-only\.ckpt holds no optimizer_states or loops \(saved with "
        r"save_weights_only\?\): a run resumes from a full checkpoint such as last\.ckpt$"),
    "truncated checkpoint": Case("train", [*TRAIN, "data.source.path={good}", "ckpt_path={truncated}"],
                                 r"^ckpt_path=.*: .*: not a readable checkpoint \(truncated, or not written by"),
    "another run's checkpoint into a run's directory": Case(
        "train", [*TINY_RUN, "trainer.max_epochs=2", "hydra.run.dir={second_run}",
                  "ckpt_path={planted_run}/checkpoints/last.ckpt"],
        r"^.* holds another run \(metrics\.json\); resume it with ckpt_path=last, or leave hydra\.run\.dir unset"),
    "run directory under a file": Case("train", [*TRAIN, "data.source.path={good}", "hydra.run.dir={good}/run"],
                                       r"^hydra\.run\.dir=.*good\.csv/run: cannot create this folder \(Not a directory\)$"),
    "data folder under a file": Case("train", [*TRAIN, "data.source.path={good}", "data.data_dir={good}/data"],
                                     r"^data\.data_dir=.*good\.csv/data: cannot create this folder \(Not a directory\)$"),
    "another run's directory": Case("train", [*TRAIN, "data.source.path={good}", "hydra.run.dir={run}"],
                                    r"^.* holds another run \(metrics\.json\); resume it with ckpt_path=last, or "
                                    r"leave hydra\.run\.dir unset for a new directory$"),
    # ---- export and evaluation ----------------------------------------------------------------------
    "export: no run_dir": Case("export", ["run_dir={tmp}/nope"], r"^run_dir=.*nope: no such directory$"),
    "export: truncated checkpoint": Case("export", ["run_dir={truncated_run}", "out_dir={tmp}/export"],
                                         r"^.*\.ckpt: not a readable checkpoint \(truncated, or not written by "
                                         r"torch\.save\): PytorchStreamReader failed"),
    "eval: truncated checkpoint": Case("eval", ["run_dir={truncated_run}"],
                                       r"^.*\.ckpt: not a readable checkpoint \(truncated"),
    "export: folder exists": Case("export", ["run_dir={run}", "out_dir={export}"],
                                  r"^.*export exists; pass overwrite=true to replace it$"),
    "export: metrics.json cut short": Case("export", ["run_dir={cut_run}", "out_dir={tmp}/never"],
                                           r"^.*cut-run/metrics\.json: not valid JSON \(.*: line \d+ column \d+ "
                                           r"\(char \d+\)\); was it cut short or edited\?$"),
    "export: a text file as checkpoint": Case("export", ["run_dir={run}", "ckpt_path={notes}", "out_dir={tmp}/never"],
                                              r"^.*notes\.ckpt: not a readable checkpoint \(truncated, or not written "
                                              r"by torch\.save\): not a zip archive$"),
    "eval: checkpoint with pickled objects": Case("eval", ["run_dir={run}", "ckpt_path={evil}"],
                                                  r"^.*evil\.ckpt: holds objects that weights_only loading refuses "
                                                  r"\(pathlib\.PosixPath\), not only tensors and plain data; it is not "
                                                  r"loaded$"),
    "eval: another run's checkpoint": Case("eval", ["run_dir={run}", "ckpt_path={other_ckpt}", "out_file=eval.json"],
                                           r"^.*other\.ckpt: not a checkpoint of the run in .*run: its model differs "
                                           r"from .*config\.yaml in model\.dim \(16; the run has 8\)$"),
    "eval: out_file in a missing folder": Case("eval", ["run_dir={run}", "out_file={tmp}/nope/eval.json"],
                                               r"^out_file=.*nope/eval\.json: .*nope is not an existing folder$"),
    "eval: report exists": Case("eval", ["run_dir={run}", "out_file={report}"],
                                r"^out_file=.*report\.json exists; pass overwrite=true to replace it, or another "
                                r"out_file$"),
    "export: compiled=cdu": Case("export", ["run_dir={run}", "out_dir={tmp}/never", "compiled=cdu"],
                                 r"^compiled=cdu: must be one of \['auto', 'cpu', 'cuda', 'none'\]$"),
    "export: compiled_k=0": Case("export", ["run_dir={run}", "out_dir={tmp}/never", "compiled=cpu", "compiled_k=0"],
                                 r"^compiled_k=0: must be an integer >= 1$"),
    "export: out_dir under a file": Case("export", ["run_dir={run}", "out_dir={notes}/export"],
                                         r"^out_dir=.*notes\.ckpt/export: .*notes\.ckpt is a file, not a folder$"),
    "eval: unknown kernel flag": Case("eval", ["run_dir={run}", "kernels={{interction: true}}"],
                                      r"^kernels\.interction: unknown kernel flag; kernels has \['hstu_hierarchical_"),
    "eval: unknown accelerator": Case("eval", ["run_dir={run}", "accelerator=foo"],
                                      r"^accelerator=foo devices=1 num_nodes=1: You selected an invalid accelerator "
                                      r"name"),
    # ---- recommendation requests --------------------------------------------------------------------
    "recommend: no export_dir": Case("recommend", ["export_dir={tmp}/nope", "history=[0]"],
                                     r"^export_dir=.*nope: no such directory \(scripts/export\.py writes one\)$"),
    "recommend: unknown item": Case("recommend", ["export_dir={export}", "history=[0,1,999999]"],
                                    r"^history 0: item id\(s\) \[999999\] unknown to the model \(pass "
                                    r"unknown_items=skip to drop them\)$"),
    "recommend: unknown user": Case("recommend", ["export_dir={export}", "user=123456", "data_dir={run}/data"],
                                    r"^user 123456 is not in the synthetic data$"),
    "recommend: no request": Case("recommend", ["export_dir={export}"],
                                  r"^give either user=<original user id> or history=\[original item ids\]$"),
    "recommend: k=0": Case("recommend", ["export_dir={export}", "history=[0]", "k=0"], r"^k must be an integer in \[1, \d+\] \(the number of items\), got 0$"),
    "recommend: k=ten": Case("recommend", ["export_dir={export}", "history=[0]", "k=ten"],
                             r"^Error merging override k=ten$", r"Value 'ten' of type 'str' could not be converted"),
    "recommend: history not a list": Case("recommend", ["export_dir={export}", "history=12"],
                                          r"^Error merging override history=12$", r"int is not a ListConfig, list"),
    "recommend: nested history": Case("recommend", ["export_dir={export}", "history=[[1,2],3]"],
                                      r"^history: item 0 is \[1, 2\]; give original item ids \(numbers or strings\), "
                                      r"oldest first$"),
    "recommend: request_time beyond int64": Case("recommend", ["export_dir={export}", "history=[0,1]",
                                                                "request_time=99999999999999999999"],
                                                 r"^request_time=99999999999999999999 lies outside \[-2\*\*62, 2\*\*62\)"),
    "recommend: no such GPU": Case("recommend", ["export_dir={export}", "history=[0]", "device=cuda:99"],
                                   r"^device=cuda:99: (no CUDA GPU is visible here|only \d+ CUDA GPU\(s\) are "
                                   r"visible)"),
    "recommend: request_time=yesterday": Case("recommend", ["export_dir={export}", "history=[0,1]",
                                                            "request_time=yesterday"],
                                              r"^Error merging override request_time=yesterday$",
                                              r"Value 'yesterday' of type 'str' could not be converted"),
    "recommend: request_time before the history": Case(
        "recommend", ["export_dir={export}", "history=[0,1,2]", "timestamps=[1600000000,1600000060,1600000120]",
                      "request_time=1500000000"],
        r"^request_time=1500000000 is before the last event of history 0 \(1600000120\): a request comes after"),
    # ---- serving -------------------------------------------------------------------------------------
    "serve: no export_dir": Case("serve", ["export_dir={tmp}/nope"],
                                 r"^export_dir=.*nope: no such directory \(scripts/export\.py writes one\)$"),
    "serve: port not a number": Case("serve", ["export_dir={export}", "port=80OO"],
                                     r"^Error merging override port=80OO$", r"Value '80OO' of type 'str' could not be"),
    "serve: port below 1024": Case("serve", ["export_dir={export}", "port=80"],
                                   r"^port=80: must lie in \[1024, 65535\] \(what LitServe binds to\)$"),
    "serve: workers=0": Case("serve", ["export_dir={export}", "workers=0"], r"^workers=0: must be >= 1$"),
    "serve: unknown host": Case("serve", ["export_dir={export}", "host=example.com"],
                                r"^host=example\.com: must be one of \['127\.0\.0\.1', '0\.0\.0\.0', '::', "
                                r"'localhost'\]$"),
    "serve: unknown kernel flag": Case("serve", ["export_dir={export}", "kernels={{interction: true}}"],
                                       r"^kernels\.interction: unknown kernel flag; kernels has \['hstu_hierarchical_"),
    "serve: kernel flag yes": Case("serve", ["export_dir={export}", "kernels={{interaction: yes}}"],
                                   r"^kernels\.interaction=yes: must be true or false$"),
    "serve: batch_timeout above timeout": Case("serve", ["export_dir={export}", "batch_timeout=40", "timeout=30"],
                                               r"^batch_timeout=40\.0: must not exceed timeout=30\.0$"),
    "serve: weights of another network": Case("serve", ["export_dir={resized_export}"],  # a worker's traceback before
                                              r"^.*resized-export/model\.safetensors: does not match .*config\.json: "
                                              r"\d+ of another shape: embedding\.item_table \[\d+, \d+\] for the model's "),
    "serve: truncated weights": Case("serve", ["export_dir={truncated_export}"],
                                     r"^.*truncated-export/model\.safetensors: corrupt or not a safetensors file "),
    "serve: items.json of another export": Case("serve", ["export_dir={reordered_export}"],
                                                r"^.*reordered-export/items\.json: not the file this export recorded "
                                                r"\(its SHA-256 differs from .*config\.json's files\.items\.json\); "),
    "serve: LitServe not installed": Case("serve", ["export_dir={export}"],
                                          r"^the HTTP server needs LitServe, the serve extra \(.*litserve.*\): "
                                          r"pip install -e '\.\[serve\]'$"),
    # ---- loading never calls what a file names ------------------------------------------------------
    "recommend: config.json names a function": Case(
        "recommend", ["export_dir={planted_export}", "user=1"],
        r"^.*config\.json: data\.datamodule\._target_='hstu\.files\.write_text_atomically': a data config read "
        r"from a file may name only \['hstu\.data\.datamodule\.SequenceDataModule', "),
    "eval: the run's config names a function": Case(
        "eval", ["run_dir={planted_run}"],
        r"^.*config\.yaml: data\.source\._target_='hstu\.files\.write_text_atomically': a data config read from "
        r"a file may name only "),
}


NEEDS_NO_GPU = {"GPU asked for, none here", "Triton required, cannot run"}


def _csv(path: Path, rows: list[tuple[int, str, int]]) -> str:
    path.write_text("".join(f"{u},{i},{t}\n" for u, i, t in rows))
    return str(path)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_run_dir, tiny_export_dir) -> dict[str, str]:
    """The files the cases name: data files, a finished run, its export, and a run whose checkpoints are cut."""
    tmp = tmp_path_factory.mktemp("bad-inputs")
    rows = [(u, str((7 * u + 3 * k) % 30), 1000 + k) for u in range(6) for k in range(6 + u % 4)]
    bad = rows[:3] + [(2, "x7", 1003)] + rows[3:]
    truncated_run = Path(shutil.copytree(tiny_run_dir, tmp / "truncated-run"))
    for checkpoint in (truncated_run / "checkpoints").glob("*.ckpt"):
        checkpoint.write_bytes(checkpoint.read_bytes()[:2000])
    run = Path(shutil.copytree(tiny_run_dir, tmp / "run"))
    second_run = Path(shutil.copytree(tiny_run_dir, tmp / "second-run"))
    cut_run = Path(shutil.copytree(tiny_run_dir, tmp / "cut-run"))
    (cut_run / "metrics.json").write_bytes((cut_run / "metrics.json").read_bytes()[:300])
    (tmp / "notes.ckpt").write_text("not a checkpoint\n")
    (tmp / "report.json").write_text("{}")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "callbacks": {"x": Path("/")}}, tmp / "evil.ckpt")
    other = torch.load(next((run / "checkpoints").glob("*.ckpt")), weights_only=True)  # a model of another dim
    hparams = dict(other["hyper_parameters"], dim=16)
    other.update(hyper_parameters=hparams, state_dict=RecModule(**hparams).state_dict())
    torch.save(other, tmp / "other.ckpt")
    trained = torch.load(next((run / "checkpoints").glob("*.ckpt")), weights_only=True)  # as save_weights_only saves
    torch.save({key: value for key, value in trained.items() if key not in ("optimizer_states", "lr_schedulers", "loops")},
               tmp / "weights-only.ckpt")
    planted = {"_target_": "hstu.files.write_text_atomically", "path": str(tmp / "planted.txt"), "text": "ran"}
    planted_export = Path(shutil.copytree(tiny_export_dir, tmp / "planted-export"))
    config = json.loads((planted_export / "config.json").read_text())
    config["data"]["datamodule"] = planted
    (planted_export / "config.json").write_text(json.dumps(config))
    resized_export = Path(shutil.copytree(tiny_export_dir, tmp / "resized-export"))
    config = json.loads((resized_export / "config.json").read_text())
    config["model"]["dim"] *= 2
    (resized_export / "config.json").write_text(json.dumps(config))
    reordered_export = Path(shutil.copytree(tiny_export_dir, tmp / "reordered-export"))
    items = json.loads((reordered_export / "items.json").read_text())
    items["original_ids"].reverse()
    (reordered_export / "items.json").write_text(json.dumps(items))
    truncated_export = Path(shutil.copytree(tiny_export_dir, tmp / "truncated-export"))
    weights = truncated_export / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    planted_run = Path(shutil.copytree(tiny_run_dir, tmp / "planted-run"))
    run_config = OmegaConf.load(planted_run / ".hydra" / "config.yaml")
    run_config.data.source = planted
    OmegaConf.save(run_config, planted_run / ".hydra" / "config.yaml")
    return {
        "tmp": str(tmp), "good": _csv(tmp / "good.csv", rows), "bad": _csv(tmp / "bad.csv", bad),
        "short": _csv(tmp / "short.csv", [r for r in rows if r[2] < 1003]),
        "run": str(run), "export": str(tiny_export_dir), "truncated_run": str(truncated_run),
        "truncated": str(next((truncated_run / "checkpoints").glob("*.ckpt"))),
        "planted_export": str(planted_export), "planted_run": str(planted_run), "planted": str(tmp / "planted.txt"),
        "resized_export": str(resized_export), "truncated_export": str(truncated_export),
        "reordered_export": str(reordered_export),
        "second_run": str(second_run),
        "cut_run": str(cut_run), "notes": str(tmp / "notes.ckpt"), "report": str(tmp / "report.json"),
        "evil": str(tmp / "evil.ckpt"), "other_ckpt": str(tmp / "other.ckpt"),
        "weights_only": str(tmp / "weights-only.ckpt"),
    }


def answer(result) -> list[str]:
    """The lines the user reads about the error: after Hydra's "Error executing job" line when a job
    failed (Lightning's start-up lines come before it), else all of stderr."""
    lines = result.error_lines
    job = [i for i, line in enumerate(lines) if line.startswith("Error executing job with overrides")]
    return lines[job[-1] + 1:] if job else lines


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gets_one_clear_line(name, inputs, tmp_path, monkeypatch):
    case = CASES[name]
    if name in NEEDS_NO_GPU and torch.cuda.is_available():
        pytest.skip("the case is about a machine without a CUDA GPU")
    if name == "Triton required, cannot run":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter would run the kernels on the CPU
    if name == "serve: LitServe not installed":  # as if only `pip install -e .` had run
        monkeypatch.setitem(sys.modules, "litserve", None)
        monkeypatch.delitem(sys.modules, "hstu.serving.server", raising=False)
    monkeypatch.chdir(tmp_path)  # new run directories go here
    if case.args[0] == "-m":
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    if "hydra/launcher=slurm_ddp" in case.args:
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
        if name == "SLURM launcher, no srun here" and shutil.which("srun"):
            pytest.skip("this machine has srun")
        if name == "SLURM launcher without trainer=ddp":  # as on a SLURM login node
            (tmp_path / "bin").mkdir()
            (tmp_path / "bin" / "srun").write_text("#!/bin/sh\nexit 1\n")
            (tmp_path / "bin" / "srun").chmod(0o755)
            monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    args = [arg.format(**inputs) for arg in case.args]
    if case.script == "train":
        args.append(f"paths.data_dir={tmp_path / 'data'}")
    result = run_script(case.script, *args)
    lines = answer(result)
    assert result.code == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    assert lines and len(lines) <= 5, lines
    assert lines[0] == lines[0].strip() and re.search(case.message, lines[0]), lines
    if case.more:
        assert re.search(case.more, "\n".join(lines[1:])), lines
    if name == "another run's directory":  # stopped before Hydra wrote anything there
        assert not (Path(inputs["run"]) / ".hydra" / "hydra.yaml").exists()
    if case.script == "train":  # the new run (or sweep) directory went with the run, whatever stopped it
        assert not [str(p) for top in ("outputs", "multirun") for p in (tmp_path / top).glob("*/*")]
    assert not Path(inputs["planted"]).exists(), "a function named in a file ran"  # for every case


def test_unknown_items_can_be_skipped(inputs):
    """recommend.py's own error message suggests unknown_items=skip: the command line takes it."""
    result = run_script("recommend", f"export_dir={inputs['export']}", "history=[0,1,999999]",
                        "timestamps=[1600000000,1600000060,1600000120]", "unknown_items=skip", "k=3")
    assert result.code == 0, result.stderr
    assert "history: 2 events, most recent [0, 1]; skipped as unknown to the model: [999999]" in result.stdout
    assert [line.split()[0] for line in result.stdout.splitlines() if line.strip()[:1].isdigit()] == ["1", "2", "3"]


def test_a_history_without_timestamps_drops_only_consecutive_repeats(inputs, monkeypatch):
    """Events given without times sit at one made-up time, so none is an exact repeat (a run trained with
    data.repeats=drop_exact keeps them all); a run trained with collapse_consecutive still drops an item
    given twice in a row, counted after the unknown ones are skipped, as the training data did."""
    history = ["history=[0,0,1,999999,1,0]", "unknown_items=skip", "k=3"]
    result = run_script("recommend", f"export_dir={inputs['export']}", *history)
    assert result.code == 0, result.stderr
    assert "history: 5 events, most recent [0, 0, 1, 1, 0]; skipped as unknown to the model: [999999]\n" in result.stdout
    monkeypatch.setattr("hstu.inference.repeats_policy", lambda config: "collapse_consecutive")
    result = run_script("recommend", f"export_dir={inputs['export']}", *history)
    assert result.code == 0, result.stderr
    assert ("history: 3 events, most recent [0, 1, 0]; skipped as unknown to the model: [999999]; 2 dropped as "
            "repeats (data.repeats=collapse_consecutive)\n") in result.stdout


def test_unexpected_errors_keep_their_traceback(inputs, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal bug")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("hstu.data.datamodule.build_sequences", broken)
    result = run_script("train", *TRAIN, f"data.source.path={inputs['good']}", f"paths.data_dir={tmp_path / 'data'}")
    assert result.code == 1
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: an internal bug" in result.stderr


def test_hydra_full_error_shows_the_traceback(inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(Exception, match=r"bad\.csv:4: item 'x7' is not an integer"):
        run_script("train", *TRAIN, f"data.source.path={inputs['bad']}", f"paths.data_dir={tmp_path / 'data'}")
    result = run_script("train", *TRAIN, f"data.source.path={inputs['good']}", "data.batch_size=0")
    assert "Traceback (most recent call last)" in result.stderr and "data.batch_size=0: must be >= 1" in result.stderr


def test_real_process(inputs, tmp_path):
    """The command line itself: exit status 1, the message last, no traceback and nothing of pandas'."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run([sys.executable, str(SCRIPTS / "train.py"), *TRAIN, f"data.source.path={inputs['bad']}",
                           f"paths.data_dir={tmp_path / 'data'}"], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and "pandas" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-2] == "bad.csv:4: item 'x7' is not an integer (string ids need id_dtype: str) in '2,x7,1003'"
