"""Export and serving: a tiny synthetic run is trained once, exported, and served from its export folder.

The export must reproduce RecModule's own top-k, load under any kernel flags without torch.load,
name the file or key at fault when something is broken, and never leave a half-written folder.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

import hstu.config  # noqa: F401  (registers the KernelFlags schema)
import hstu.export
from hstu.errors import CheckpointError, ConfigError, DataError, RequestError
from hstu.export import (
    build_datamodule,
    evaluate_run,
    export_run,
    load_checkpoint,
    load_run,
    recommender_state_dict,
    resolve_checkpoint,
)
from hstu.files import sha256_of
from hstu.inference import ExportFormatError, Recommender, check_export_weights, read_export_config, training_history
from hstu.module import RecModule
from hstu_kernels import OPERATORS
from cli import run_script
from tiny_run import MAX_SEQ_LEN

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tiny_run_dir) -> Path:
    return tiny_run_dir


@pytest.fixture(scope="module")
def export_dir(tiny_export_dir) -> Path:
    return tiny_export_dir


@pytest.fixture(scope="module")
def datamodule(run_dir):
    return build_datamodule(load_run(run_dir))


@pytest.fixture(scope="module")
def recommender(export_dir) -> Recommender:
    return Recommender.from_export(export_dir)


def _test_histories(datamodule, users):
    """Each user's test-time history (every event before the last) in original ids, and the last event's time."""
    seq = datamodule.sequences
    histories, target_times = [], []
    for user in users:
        begin, end = seq.offsets[user], seq.offsets[user + 1]
        items = seq.item_original_ids[seq.item_ids[begin:end - 1] - 1].tolist()
        histories.append((items, seq.timestamps[begin:end - 1].tolist()))
        target_times.append(int(seq.timestamps[end - 1]))
    return histories, target_times


def _assert_same_top_k(got, want, atol):
    """Same scores within atol, and the same ids except where two scores tie within atol."""
    assert len(got) == len(want)
    for got_row, want_row in zip(got, want):
        torch.testing.assert_close([s for _, s in got_row], [s for _, s in want_row], atol=atol, rtol=0)
        for (got_id, got_score), (want_id, want_score) in zip(got_row, want_row):
            assert got_id == want_id or abs(got_score - want_score) < atol


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


@pytest.fixture(scope="module")
def other_checkpoint(run_dir, tmp_path_factory) -> Path:
    """A checkpoint of another model (dim 16, the run's is 8) that loads and evaluates."""
    checkpoint = load_checkpoint(resolve_checkpoint(load_run(run_dir)))
    hparams = dict(checkpoint["hyper_parameters"], dim=16)
    checkpoint.update(hyper_parameters=hparams, state_dict=RecModule(**hparams).state_dict())
    path = tmp_path_factory.mktemp("other") / "other.ckpt"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def eval_report(run_dir) -> dict:
    return evaluate_run(run_dir, accelerator="cpu")


# ---- the export folder ---------------------------------------------------------------------------

def test_export_folder_holds_weights_config_and_ids(export_dir, run_dir, datamodule):
    assert sorted(p.name for p in export_dir.iterdir()) == ["config.json", "items.json", "model.safetensors"]
    weights = load_file(export_dir / "model.safetensors")
    assert "embedding.item_table" in weights
    assert not [k for k in weights if k.startswith("model.") or "_orig_mod." in k]
    config = json.loads((export_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert config["format_version"] == 2
    assert config["files"] == {name: sha256_of(export_dir / name) for name in ("model.safetensors", "items.json")}
    assert config["model"]["max_seq_len"] == MAX_SEQ_LEN and config["model"]["num_items"] == 40
    assert config["metrics"]["test"] == metrics["test"]
    assert config["data"]["source"] == "synthetic"
    items = json.loads((export_dir / "items.json").read_text())
    assert items["id_type"] == "int"
    assert items["original_ids"] == datamodule.sequences.item_original_ids.tolist()


def test_state_dict_keys_lose_module_and_compile_prefixes():
    t = torch.zeros(1)
    state = {"model.embedding.item_table": t, "model.encoder._orig_mod.blocks.0.uvqk": t, "val_metrics.hits": t}
    assert sorted(recommender_state_dict(state)) == ["embedding.item_table", "encoder.blocks.0.uvqk"]


def test_hydra_config_resolves_output_dir_to_the_run_dir(run_dir):
    run = load_run(run_dir)
    assert run.config_path == run_dir / ".hydra" / "config.yaml"
    assert run.resolved("trainer.default_root_dir") == str(run_dir.resolve())


# ---- serving reproduces training-time ranking ----------------------------------------------------

def test_export_reproduces_recmodule_topk(run_dir, recommender, datamodule):
    checkpoint = load_checkpoint(resolve_checkpoint(load_run(run_dir)))
    module = RecModule(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    module.eval()
    batch = next(iter(datamodule.test_dataloader()))
    k = 10
    ref_scores, ref_ids, _ = module.model.recommend(batch, k)

    histories, target_times = _test_histories(datamodule, batch.user_ids.tolist())
    assert max(len(items) for items, _ in histories) > MAX_SEQ_LEN  # truncation is exercised
    served = recommender.recommend(histories, k=k, request_time=target_times)

    original = datamodule.sequences.item_original_ids
    assert [[item for item, _ in row] for row in served] == original[ref_ids - 1].tolist()
    torch.testing.assert_close(torch.tensor([[s for _, s in row] for row in served]), ref_scores, atol=1e-6, rtol=0)


def test_request_time_defaults_to_last_event_and_moves_scores(recommender, datamodule):
    histories, _ = _test_histories(datamodule, range(6))
    last_times = [times[-1] for _, times in histories]
    default = recommender.recommend(histories, k=5)
    assert default == recommender.recommend(histories, k=5, request_time=last_times)
    ten_years = 10 * 365 * 86_400
    later = recommender.recommend(histories, k=5, request_time=[t + ten_years for t in last_times])
    assert [[s for _, s in row] for row in later] != [[s for _, s in row] for row in default]


def test_seen_items_of_the_whole_history_are_excluded(recommender, datamodule):
    histories, _ = _test_histories(datamodule, range(len(datamodule.sequences.offsets) - 1))
    long_ones = [h for h in histories if len(h[0]) > MAX_SEQ_LEN]
    num_items = datamodule.num_items
    for (items, _), row in zip(long_ones, recommender.recommend(long_ones, k=num_items)):
        returned = [item for item, _ in row]
        assert not set(returned) & set(items)
        assert len(returned) == num_items - len(set(items))  # everything else, nothing padded
    everything = recommender.recommend(long_ones[:1], k=num_items, exclude_seen=False)[0]
    assert sorted(item for item, _ in everything) == datamodule.sequences.item_original_ids.tolist()


def test_histories_are_put_in_time_order(recommender, datamodule):
    (items, times), = _test_histories(datamodule, [0])[0]
    order = np.random.default_rng(0).permutation(len(items))
    shuffled = ([items[i] for i in order], [times[i] for i in order])
    assert recommender.recommend([shuffled], k=5) == recommender.recommend([(items, times)], k=5)


def test_batching_does_not_change_results(recommender, datamodule):
    histories, _ = _test_histories(datamodule, range(10))
    # Other batch shapes may sum in another order: equal up to float32 rounding.
    _assert_same_top_k(recommender.recommend(histories, k=5, batch_size=3), recommender.recommend(histories, k=5),
                       atol=1e-6)


def test_unknown_items_raise_or_are_skipped(recommender, datamodule):
    (items, times), = _test_histories(datamodule, [0])[0]
    with_unknown = (items + [999_999], times + [times[-1] + 60])
    with pytest.raises(KeyError, match="999999"):
        recommender.recommend([with_unknown], k=5)
    skipped = recommender.recommend([with_unknown], k=5, unknown_items="skip", request_time=[times[-1] + 60])
    assert skipped == recommender.recommend([(items, times)], k=5, request_time=[times[-1] + 60])


def test_bad_requests_are_named(recommender):
    with pytest.raises(ValueError, match="history 0: 2 items but 1 timestamps"):
        recommender.recommend([([0, 1], [5])])
    with pytest.raises(ValueError, match="history 1: timestamps must be integer"):
        recommender.recommend([([0], [5]), ([1], [5.5])])
    with pytest.raises(ValueError, match="^history 0: empty: no items to recommend from$"):
        recommender.recommend([([], [])])
    with pytest.raises(ValueError, match="^history 0: no known items to recommend from$"):
        recommender.recommend([([-5], [5])], unknown_items="skip")


def test_training_history_of_a_user(recommender, datamodule):
    seq = datamodule.sequences
    user = int(seq.user_original_ids[3])
    items, times = training_history(recommender.config, user)
    begin, end = seq.offsets[3], seq.offsets[4]
    assert items == seq.item_original_ids[seq.item_ids[begin:end] - 1].tolist()
    assert times == seq.timestamps[begin:end].tolist()
    with pytest.raises(KeyError, match="user 123456"):
        training_history(recommender.config, 123456)


def test_training_history_refuses_data_other_than_the_trained_events(recommender):
    """A relative data path read from another directory (or data that changed since training) would give
    another history without a word: the export records the trained events' digest."""
    assert recommender.config["data"]["events_digest"] == load_checkpoint_hparams(recommender)["events_digest"]
    config = {**recommender.config, "data": {**recommender.config["data"], "events_digest": "0" * 64}}
    with pytest.raises(DataError, match=r"^config\.json: the data found at data\.datamodule's paths \(data_dir .*\) "
                                        r"holds other events than the model was trained on"):
        training_history(config, 1)


def load_checkpoint_hparams(recommender):
    return torch.load(recommender.config["training"]["checkpoint"], map_location="cpu", weights_only=True,
                      mmap=True)["hyper_parameters"]


# ---- loading: any kernel flags, no pickles, broken files named --------------------------------------

@pytest.mark.parametrize("flags", [{op: True for op in OPERATORS}, {"hstu_hierarchical_attention": True}],
                         ids=["all", "attention"])
def test_loads_under_other_kernel_flags(export_dir, recommender, datamodule, flags):
    other = Recommender.from_export(export_dir, kernels=flags, kernel_fallback="warn")
    histories, _ = _test_histories(datamodule, range(4))
    _assert_same_top_k(other.recommend(histories, k=5), recommender.recommend(histories, k=5), atol=1e-5)
    stats = other.model.manager.get_stats()
    assert all(stats[op]["requested"] == "triton" for op in flags)


def test_inference_never_calls_torch_load(export_dir, datamodule, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called while serving")

    monkeypatch.setattr(torch, "load", refuse)
    histories, _ = _test_histories(datamodule, range(2))
    assert len(Recommender.from_export(export_dir).recommend(histories, k=3)[0]) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing"])
def test_broken_weights_file_is_named(export_dir, tmp_path, damage):
    broken = _copy(export_dir, tmp_path / "export")
    weights = broken / "model.safetensors"
    if damage == "garbage":
        weights.write_bytes(b"\x00\xff" * 100)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    with pytest.raises(ExportFormatError, match=r"model\.safetensors"):
        Recommender.from_export(broken)


def test_weights_of_another_network_are_named_in_one_line(export_dir, tmp_path, monkeypatch):
    """What differs, a few names of each kind, on one line; the header alone tells (no tensor loaded), so a
    server checks an export in its main process before its workers start."""
    broken = _copy(export_dir, tmp_path / "export")
    config = json.loads((broken / "config.json").read_text())
    config["model"].update(dim=config["model"]["dim"] * 2)
    (broken / "config.json").write_text(json.dumps(config))
    one_line = rf"^{re.escape(str(broken / 'model.safetensors'))}: does not match .*config\.json: \d+ of another " \
               r"shape: embedding\.item_table \[\d+, \d+\] for the model's \[\d+, \d+\], [^\n]*$"
    with pytest.raises(ExportFormatError, match=one_line):
        Recommender.from_export(broken)
    monkeypatch.setattr("hstu.inference.load_file", lambda *a, **k: pytest.fail("a tensor was loaded"))
    with pytest.raises(ExportFormatError, match=one_line):
        check_export_weights(broken, read_export_config(broken))
    check_export_weights(export_dir, read_export_config(export_dir))


def test_recommend_refuses_a_batch_size_below_one_and_a_missing_gpu(export_dir):
    recommender = Recommender.from_export(export_dir)
    for batch_size in (-1, 0, 2.0):  # -1 returned no result for any history
        with pytest.raises(RequestError, match=rf"^batch_size must be an int >= 1, got {batch_size}$"):
            recommender.recommend([([1], [1])], k=3, batch_size=batch_size)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^device=cuda: no CUDA GPU is visible here"):
            Recommender.from_export(export_dir, device="cuda")


def _reorder_items(folder: Path) -> None:
    items = json.loads((folder / "items.json").read_text())
    items["original_ids"] = items["original_ids"][1:] + items["original_ids"][:1]  # the same ids, each moved
    (folder / "items.json").write_text(json.dumps(items))


def _perturb_weights(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    weights["embedding.item_table"] += 0.01  # the same names and shapes: another training's weights
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("replace, name", [(_reorder_items, "items.json"), (_perturb_weights, "model.safetensors")],
                         ids=["items.json reordered", "weights of another training"])
def test_a_file_replaced_after_export_is_refused_by_name(export_dir, tmp_path, replace, name):
    """A catalogue or weights copied in from elsewhere pass every shape check and would change every answer."""
    broken = _copy(export_dir, tmp_path / "export")
    replace(broken)
    with pytest.raises(ExportFormatError, match=rf"^{re.escape(str(broken / name))}: not the file this export recorded "
                                                rf"\(its SHA-256 differs from .*config\.json's files\.{re.escape(name)}\); "
                                                r"export the run again instead of replacing its files$"):
        Recommender.from_export(broken)


def test_weights_without_the_model_settings_digest_are_refused(export_dir, tmp_path):
    """An export written before the weights recorded config.json's model settings could have them edited unseen."""
    broken = _copy(export_dir, tmp_path / "export")
    weights = broken / "model.safetensors"
    save_file(load_file(weights), str(weights), metadata={"format": "pt"})
    config = json.loads((broken / "config.json").read_text())
    config["files"]["model.safetensors"] = sha256_of(weights)  # consistent files: only the record is missing
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=rf"^{re.escape(str(weights))}: records no SHA-256 of config\.json's "
                                                r"model settings \(written before exports recorded it\); export the "
                                                r"run again with scripts/export\.py$"):
        Recommender.from_export(broken)


@pytest.mark.parametrize("key", ["format_version", "model", "model.dim", "model.encoder", "data"])
def test_missing_config_key_is_named(export_dir, tmp_path, key):
    broken = _copy(export_dir, tmp_path / "export")
    config = json.loads((broken / "config.json").read_text())
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    del node[leaf]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=rf"config\.json: missing key\(s\) .*'{key}'"):
        Recommender.from_export(broken)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(dim=16), r"model\.safetensors: does not match"),
    (lambda c: c["model"]["encoder"].update(_target_="os.system"), r"model\.encoder\._target_"),
    (lambda c: c.update(format_version=1), r"format_version 1 is not supported \(this code reads 2\); export the run "
                                           r"again with scripts/export\.py$"),
    # settings no weight shape shows: every answer would change
    (lambda c: c["model"]["encoder"].update(alpha=c["model"]["encoder"]["alpha"] * 2),
     r"config\.json: its model settings are not those the weights were exported with \(model\.safetensors records "
     r"their SHA-256\); export the run again instead of editing them$"),
    (lambda c: c["model"].update(position_from_end=not c["model"]["position_from_end"]),
     r"config\.json: its model settings are not those the weights were exported with"),
])
def test_inconsistent_config_is_named(export_dir, tmp_path, edit, message):
    broken = _copy(export_dir, tmp_path / "export")
    config = json.loads((broken / "config.json").read_text())
    edit(config)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=message):
        Recommender.from_export(broken)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update(dim="abc"), r"model\.dim='abc': must be of type int$"),
    (lambda c: c["model"].update(max_seq_len=-3), r"model\.max_seq_len=-3: must be >= 1$"),
    (lambda c: c["model"].update(num_items=0), r"model\.num_items=0: must be an integer >= 1$"),
    (lambda c: c["model"].update(input_dropout=True), r"model\.input_dropout=True: must be of type float$"),
    (lambda c: c["model"].update(time_scales=[[0]]), r"model\.time_scales=\[\[0\]\]: must be \[seconds, buckets\]"),
    (lambda c: c["model"].update(encoder=[1]), r"model\.encoder must be a mapping, got list$"),
    (lambda c: c["model"]["encoder"].update(foo=1), r"model\.encoder\.foo: unknown key; model\.encoder has \["),
    (lambda c: c["model"]["loss"].update(kind="x"), r"model\.loss\.kind='x': must be one of \["),
    (lambda c: c["model"]["encoder"].pop("dqk"), r"model does not build a network \(.*'dqk'"),
    (lambda c: c.update(data="x"), r"data must be a mapping, got str$"),
    (lambda c: c.update(model=[1]), r"model must be a mapping, got list$"),
    (lambda c: c["data"]["datamodule"].update(repeats="no"),
     r"data\.datamodule\.repeats must be one of \['drop_exact', 'collapse_consecutive', 'keep'\], got 'no'$"),
    (lambda c: c["data"]["datamodule"].update(max_seq_len=c["model"]["max_seq_len"] - 1),
     r"data\.datamodule\.max_seq_len=\d+: the model was trained and evaluated on windows of \d+ events, and serving "
     r"takes model\.max_seq_len=\d+; train again with data\.max_seq_len equal to model\.max_seq_len$"),
], ids=["dim", "max_seq_len", "num_items", "input_dropout", "time_scales", "encoder", "encoder key", "loss.kind",
        "encoder without dqk", "data", "model", "data.repeats", "data window"])
def test_bad_config_values_are_named(export_dir, tmp_path, edit, message):
    broken = _copy(export_dir, tmp_path / "export")
    config = json.loads((broken / "config.json").read_text())
    edit(config)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportFormatError, match=r"^.*/config\.json: " + message) as error:
        Recommender.from_export(broken)
    assert "\n" not in str(error.value)


def test_user_history_needs_an_export_of_a_training_run(recommender):
    config = {**recommender.config, "data": {"source": "random weights"}}
    with pytest.raises(ExportFormatError, match=r"^config\.json: data\.datamodule is not a data config"):
        training_history(config, 1)


def test_item_ids_must_match_the_model(export_dir, tmp_path):
    broken = _copy(export_dir, tmp_path / "export")
    items = json.loads((broken / "items.json").read_text())
    items["original_ids"] = items["original_ids"][:-1]
    (broken / "items.json").write_text(json.dumps(items))
    with pytest.raises(ExportFormatError, match=r"items\.json: 39 original_ids, but the model has 40"):
        Recommender.from_export(broken)


# ---- export: atomic, checkpoint choice, safe loading ---------------------------------------------

def test_failed_export_leaves_no_folder(run_dir, tmp_path, monkeypatch):
    real_save = hstu.export.save_file

    def save_then_fail(*args, **kwargs):
        real_save(*args, **kwargs)  # the weights are written, then the disk "fills up"
        raise OSError("No space left on device")

    monkeypatch.setattr(hstu.export, "save_file", save_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_run(run_dir, tmp_path / "export")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_previous_export(run_dir, export_dir, tmp_path, monkeypatch):
    previous = _copy(export_dir, tmp_path / "export")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_run(run_dir, previous)
    def fail(*args, **kwargs):
        raise OSError("boom")

    monkeypatch.setattr(hstu.export, "save_file", fail)
    with pytest.raises(OSError, match="boom"):
        export_run(run_dir, previous, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    assert (previous / "config.json").read_text() == (export_dir / "config.json").read_text()


@pytest.mark.parametrize("target", ["the run", "above the run", "its checkpoints", "an export with notes",
                                    "another json"])
def test_overwrite_replaces_only_an_export_folder(run_dir, export_dir, tmp_path, monkeypatch, target):
    run = _copy(run_dir, tmp_path / "parent" / "run")
    out_dir = {"the run": run, "above the run": run.parent, "its checkpoints": run / "checkpoints",
               "an export with notes": _copy(export_dir, tmp_path / "export"),
               "another json": tmp_path / "other"}[target]
    if target == "an export with notes":
        (out_dir / "notes.txt").write_text("mine")
    if target == "another json":
        out_dir.mkdir()
        (out_dir / "config.json").write_text(json.dumps({"model": {}}))
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    monkeypatch.setattr(hstu.export, "load_checkpoint", lambda path: pytest.fail("loaded the checkpoint"))
    with pytest.raises(FileExistsError, match=rf"^out_dir={re.escape(str(out_dir))}: not an export folder, so "
                                              r"overwrite=true does not replace it \(.*\); give another out_dir$"):
        export_run(run, out_dir, overwrite=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_an_export_with_its_packages(run_dir, export_dir, tmp_path):
    previous = _copy(export_dir, tmp_path / "export")
    (previous / "scoring-cpu-x86_64.pt2").write_bytes(b"an old package")
    (previous / ".scoring-cpu-x86_64.pt2.tmp-abc.pt2").write_bytes(b"a killed build's")
    assert sorted(p.name for p in export_run(run_dir, previous, overwrite=True).iterdir()) == \
        ["config.json", "items.json", "model.safetensors"]


def test_export_into_its_own_run_is_refused_on_the_command_line(run_dir, tmp_path):
    run = _copy(run_dir, tmp_path / "run")
    before = sorted(str(p) for p in run.rglob("*"))
    result = run_script("export", f"run_dir={run}", f"out_dir={run}", "overwrite=true", "compiled=none")
    assert result.code == 1 and len(result.error_lines) == 2, result.stderr  # Hydra's "Error executing job" first
    assert re.match(r"^out_dir=.*run: not an export folder, so overwrite=true does not replace it",
                    result.error_lines[-1]), result.stderr
    assert sorted(str(p) for p in run.rglob("*")) == before


def test_moved_run_finds_its_checkpoint(run_dir, tmp_path):
    moved = _copy(run_dir, tmp_path / "moved")
    assert resolve_checkpoint(load_run(moved)).is_relative_to(moved)


def test_run_without_best_checkpoint_needs_ckpt_path(run_dir, tmp_path):
    paper = _copy(run_dir, tmp_path / "paper")
    checkpoint = resolve_checkpoint(load_run(paper))
    metrics = json.loads((paper / "metrics.json").read_text())
    metrics["best_checkpoint"] = metrics["last_checkpoint"] = None  # a run that recorded no checkpoint
    (paper / "metrics.json").write_text(json.dumps(metrics))
    with pytest.raises(FileNotFoundError, match="ckpt_path="):
        export_run(paper)
    assert (export_run(paper, ckpt_path=checkpoint) / "model.safetensors").is_file()
    metrics["last_checkpoint"] = str(checkpoint)  # what a data.protocol=paper run records: no best, the last
    (paper / "metrics.json").write_text(json.dumps(metrics))
    assert resolve_checkpoint(load_run(paper)) == checkpoint


def test_checkpoint_records_the_trained_item_ids(run_dir, datamodule):
    hparams = load_checkpoint(resolve_checkpoint(load_run(run_dir)))["hyper_parameters"]
    assert hparams["item_ids_digest"] == datamodule.item_ids_digest


def test_data_with_a_replaced_item_is_refused(run_dir, tmp_path):
    """Same number of items, one id replaced: every item's index would shift under the trained weights."""
    run = _copy(run_dir, tmp_path / "run")
    (cache,) = (run / "data").glob("*.npz")
    with np.load(cache) as npz:
        arrays = dict(npz)
    arrays["item"] = np.where(arrays["item"] == arrays["item"].max(), 1000, arrays["item"])
    np.savez(cache, **arrays)
    message = r"\.ckpt: trained on other item ids than the data has \(both 40 items, but their ids or order differ"
    with pytest.raises(DataError, match=message):
        export_run(run, tmp_path / "export", data_dir=str(run / "data"))
    with pytest.raises(DataError, match=message):
        evaluate_run(run, accelerator="cpu", data_dir=str(run / "data"))
    assert not (tmp_path / "export").exists()


def test_data_with_changed_events_is_refused_by_evaluation_not_by_export(run_dir, tmp_path, datamodule):
    """The same items, one event's time moved: the splits and targets differ from those trained and selected on,
    so the test metrics would not be the run's; the export needs only the items."""
    hparams = load_checkpoint(resolve_checkpoint(load_run(run_dir)))["hyper_parameters"]
    assert hparams["events_digest"] == datamodule.events_digest
    run = _copy(run_dir, tmp_path / "run")
    (cache,) = (run / "data").glob("*.npz")
    with np.load(cache) as npz:
        arrays = dict(npz)
    arrays["timestamp"][0] += 1
    np.savez(cache, **arrays)
    with pytest.raises(DataError, match=r"\.ckpt: trained on other events than the data has \(the same 40 items, but "
                                        r"events_digest \w{12}\.\.\. at training, \w{12}\.\.\. now: other splits and "
                                        r"targets\); the data source or its settings changed since training"):
        evaluate_run(run, accelerator="cpu", data_dir=str(run / "data"))
    assert (export_run(run, tmp_path / "export", data_dir=str(run / "data")) / "model.safetensors").is_file()


def test_checkpoint_without_item_ids_digest_exports_with_a_warning(run_dir, tmp_path, caplog):
    checkpoint = load_checkpoint(resolve_checkpoint(load_run(run_dir)))
    del checkpoint["hyper_parameters"]["item_ids_digest"]
    torch.save(checkpoint, tmp_path / "old.ckpt")
    out = export_run(run_dir, tmp_path / "export", ckpt_path=tmp_path / "old.ckpt")
    assert (out / "model.safetensors").is_file()
    (warning,) = [r.getMessage() for r in caplog.records if "item_ids_digest" in r.getMessage()]
    assert re.match(r"^.*old\.ckpt: records no item_ids_digest .*only the number of items \(40\) is checked", warning)


@pytest.mark.parametrize("num_items", ["40", 40.0, None, 0])
def test_checkpoint_with_a_malformed_item_count_is_refused(run_dir, tmp_path, num_items):
    checkpoint = load_checkpoint(resolve_checkpoint(load_run(run_dir)))
    checkpoint["hyper_parameters"]["num_items"] = num_items
    torch.save(checkpoint, tmp_path / "edited.ckpt")
    with pytest.raises(CheckpointError, match=rf"edited\.ckpt: hyper_parameters\.num_items is {num_items!r}, not the "
                       "positive item count training records$"):
        export_run(run_dir, tmp_path / "export", ckpt_path=tmp_path / "edited.ckpt")
    assert not (tmp_path / "export").exists()


def test_checkpoint_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "callbacks": {"x": Path("/")}}, path)
    with pytest.raises(ValueError, match="evil.ckpt: holds objects that weights_only loading refuses") as error:
        load_checkpoint(path)
    assert "pathlib.PosixPath" in str(error.value) and "False" not in str(error.value), error.value
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content", [b'{"best_checkpoint": "checkpoints/epoch', b"[1, 2]", b"\xff\xfe\x00"],
                         ids=["cut", "not an object", "not text"])
def test_unreadable_metrics_json_is_named(run_dir, tmp_path, content):
    broken = _copy(run_dir, tmp_path / "run")
    (broken / "metrics.json").write_bytes(content)
    with pytest.raises(DataError, match=r"metrics\.json: "):
        load_run(broken)


@pytest.mark.parametrize("content", [b"model: {dim: 8\n", b"- a list\n", b"\xff\xfe\x00"],
                         ids=["cut short", "a list", "not text"])
def test_unreadable_run_config_is_named(run_dir, tmp_path, content):
    broken = _copy(run_dir, tmp_path / "run")
    (broken / ".hydra" / "config.yaml").write_bytes(content)
    with pytest.raises(ConfigError, match=r"\.hydra/config\.yaml: "):
        load_run(broken)


@pytest.mark.parametrize("write", [lambda path: path.write_text("just notes\n"), lambda path: path.write_bytes(b"")],
                         ids=["text", "empty"])
def test_file_that_is_not_a_checkpoint_is_named(tmp_path, write):
    path = tmp_path / "notes.ckpt"
    write(path)
    with pytest.raises(CheckpointError, match=r"notes\.ckpt: not a readable checkpoint .*: not a zip archive$"):
        load_checkpoint(path)


def test_another_models_checkpoint_is_refused(run_dir, other_checkpoint, tmp_path):
    message = r"other\.ckpt: not a checkpoint of the run in .*: its model differs .* in model\.dim \(16; the run has 8"
    with pytest.raises(CheckpointError, match=message):
        evaluate_run(run_dir, other_checkpoint, accelerator="cpu")
    with pytest.raises(CheckpointError, match=message):
        export_run(run_dir, tmp_path / "export", ckpt_path=other_checkpoint)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["hyper_parameters", "state_dict"])
def test_checkpoint_parts_that_are_not_mappings_are_named(run_dir, tmp_path, key):
    checkpoint = load_checkpoint(resolve_checkpoint(load_run(run_dir)))
    checkpoint[key] = list(checkpoint[key])
    torch.save(checkpoint, tmp_path / "hand-made.ckpt")
    message = rf"^.*hand-made\.ckpt: its {key} is a list, not the mapping a RecModule checkpoint holds$"
    with pytest.raises(CheckpointError, match=message):
        evaluate_run(run_dir, tmp_path / "hand-made.ckpt", accelerator="cpu")
    with pytest.raises(CheckpointError, match=message):
        export_run(run_dir, tmp_path / "export", ckpt_path=tmp_path / "hand-made.ckpt")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("compiled, k", [("cdu", 100), ("cpu", 0), ("cpu", "10"), ("cuda", 100)])
def test_bad_compiled_options_write_nothing(run_dir, tmp_path, monkeypatch, compiled, k):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"^compiled(_k)?={compiled if k == 100 else k}: "):
        export_run(run_dir, tmp_path / "export", compiled=compiled, compiled_k=k)
    assert list(tmp_path.iterdir()) == []


def test_scoring_package_is_built_before_the_folder_is_moved_into_place(run_dir, tmp_path, monkeypatch):
    def build(folder, device, k):
        assert (folder / "model.safetensors").is_file() and not (tmp_path / "export").exists()
        (folder / "scoring-cpu.pt2").write_bytes(b"package")
        return folder / "scoring-cpu.pt2"

    monkeypatch.setattr(hstu.export, "compile_export", build)
    out = export_run(run_dir, tmp_path / "export", compiled="cpu", compiled_k=5)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "items.json", "model.safetensors",
                                                     "scoring-cpu.pt2"]


def test_failed_scoring_package_leaves_no_folder(run_dir, tmp_path, monkeypatch):
    def build_then_fail(folder, device, k):
        (folder / "scoring-cpu.pt2").write_bytes(b"half a package")
        raise RuntimeError("the package does not load and run in a fresh process")

    monkeypatch.setattr(hstu.export, "compile_export", build_then_fail)
    with pytest.raises(RuntimeError, match="fresh process"):
        export_run(run_dir, tmp_path / "export", compiled="cpu")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("below", ["", "/export"], ids=["a file", "under a file"])
def test_out_dir_on_a_file_is_refused_before_loading(run_dir, tmp_path, monkeypatch, below):
    (tmp_path / "notes").write_text("x")
    monkeypatch.setattr(hstu.export, "load_checkpoint", lambda path: pytest.fail("loaded the checkpoint"))
    with pytest.raises(ConfigError, match=r"^out_dir=.*notes.*: .*is a file, not a folder$"):
        export_run(run_dir, f"{tmp_path / 'notes'}{below}", overwrite=True)


@pytest.mark.parametrize("where", ["data_dir", "the run's data.data_dir"])
def test_data_dir_on_a_file_is_refused_before_loading(run_dir, tmp_path, monkeypatch, where):
    (tmp_path / "notes").write_text("x")
    data_dir = None
    if where == "data_dir":
        run, data_dir, key = run_dir, str(tmp_path / "notes"), "data_dir"
    else:
        run, key = _copy(run_dir, tmp_path / "run"), r".*config\.yaml: data\.data_dir"
        config = OmegaConf.load(run / ".hydra" / "config.yaml")
        config.data.data_dir = str(tmp_path / "notes")
        OmegaConf.save(config, run / ".hydra" / "config.yaml")
    monkeypatch.setattr(hstu.export, "load_checkpoint", lambda path: pytest.fail("loaded the checkpoint"))
    message = rf"^{key}=.*notes: .*notes is a file, not a folder$"
    with pytest.raises(ConfigError, match=message):
        export_run(run, tmp_path / "export", data_dir=data_dir)
    with pytest.raises(ConfigError, match=message):
        evaluate_run(run, accelerator="cpu", data_dir=data_dir)
    assert not (tmp_path / "export").exists()


def test_evaluate_run_reproduces_the_recorded_test_metrics(eval_report):
    report = eval_report
    assert report["test"] == pytest.approx(report["recorded_test"], abs=1e-6)
    assert set(report["test"]) == {"hr@5", "hr@10", "ndcg@5", "ndcg@10", "mrr"}


@pytest.mark.parametrize("kernels, message", [
    ({"interction": True}, r"^kernels\.interction: unknown kernel flag; kernels has \["),
    ({"interaction": 2}, r"^kernels\.interaction=2: must be true or false$"),
    (True, r"^kernels=True: must be null or a mapping of operator flags"),
])
def test_bad_kernel_flags_are_named(run_dir, kernels, message):
    with pytest.raises(ConfigError, match=message):
        evaluate_run(run_dir, kernels=kernels, accelerator="cpu")


# ids other than "gpu": that keyword is the marker conftest.py skips without a GPU
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"], ids=["accelerator=gpu", "accelerator=cuda"])
def test_gpu_accelerator_without_a_gpu_is_named(run_dir, monkeypatch, accelerator):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=rf"^accelerator={accelerator}: no CUDA GPU is visible"):
        evaluate_run(run_dir, accelerator=accelerator)


def test_unusable_devices_are_named(run_dir):
    with pytest.raises(ConfigError, match=r"^accelerator=cpu devices=0 num_nodes=1: "):
        evaluate_run(run_dir, accelerator="cpu", devices=0)


# ---- the command-line entry points ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["export", "eval", "recommend"])
def test_entry_point_configs_compose(name):
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(name, overrides=["run_dir=r"] if name != "recommend" else ["export_dir=e"])
    if name == "export":
        assert cfg.out_dir == "r/export"


@pytest.fixture
def evaluations(monkeypatch, eval_report):
    """evaluate_run replaced by one that returns ``eval_report`` and records its calls."""
    calls = []

    def evaluate(*args, **kwargs):
        calls.append(args)
        return eval_report

    monkeypatch.setattr(hstu.export, "evaluate_run", evaluate)
    return calls


@pytest.mark.parametrize("out_file, message", [
    ("nope/eval.json", r"^out_file=.*nope/eval\.json: .*nope is not an existing folder$"),
    ("folder", r"^out_file=.*folder: is a folder$"),
    ("eval.json", r"^out_file=.*eval\.json exists; pass overwrite=true to replace it"),
])
def test_eval_checks_its_out_file_before_evaluating(run_dir, tmp_path, evaluations, out_file, message):
    (tmp_path / "folder").mkdir()
    (tmp_path / "eval.json").write_text("an earlier report")
    result = run_script("eval", f"run_dir={run_dir}", f"out_file={tmp_path / out_file}", "overwrite=true"
                        if out_file == "folder" else "overwrite=false")
    assert result.code == 1 and re.search(message, result.error_lines[-1]), result.stderr
    assert evaluations == [] and (tmp_path / "eval.json").read_text() == "an earlier report"


def test_eval_replaces_a_report_only_with_overwrite(run_dir, tmp_path, evaluations, eval_report):
    (tmp_path / "eval.json").write_text(json.dumps({**eval_report, "test": {}}))  # an earlier report
    result = run_script("eval", f"run_dir={run_dir}", f"out_file={tmp_path / 'eval.json'}", "overwrite=true")
    assert result.code == 0, result.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["test"] == eval_report["test"]
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    # The metrics the run recorded, beside the new ones in the table: a row each, to four places.
    for split, metrics in (("test", eval_report["test"]), ("test, recorded at training", eval_report["recorded_test"])):
        assert re.search(rf"│ {re.escape(split)} +│ +{metrics['hr@5']:.4f} │", result.stdout), result.stdout


@pytest.mark.parametrize("out_file", ["metrics.json", ".hydra/config.yaml"])
def test_eval_overwrites_only_an_earlier_report(run_dir, tmp_path, evaluations, out_file):
    run = _copy(run_dir, tmp_path / "run")
    before = (run / out_file).read_bytes()
    result = run_script("eval", f"run_dir={run}", f"out_file={run / out_file}", "overwrite=true")
    assert result.code == 1 and re.match(r"^out_file=.*: not an earlier evaluation report, so overwrite=true does "
                                         r"not replace it; give another out_file$", result.error_lines[-1]), \
        result.stderr
    assert evaluations == [] and (run / out_file).read_bytes() == before


def test_eval_keeps_a_file_that_is_no_report_put_there_while_it_ran(run_dir, tmp_path, monkeypatch, eval_report):
    def evaluate_while_another_writes(*args, **kwargs):
        (tmp_path / "eval.json").write_text("notes")
        return eval_report

    monkeypatch.setattr(hstu.export, "evaluate_run", evaluate_while_another_writes)
    result = run_script("eval", f"run_dir={run_dir}", f"out_file={tmp_path / 'eval.json'}", "overwrite=true")
    assert result.code == 1 and "not an earlier evaluation report" in result.error_lines[-1], result.stderr
    assert (tmp_path / "eval.json").read_text() == "notes"


def test_eval_keeps_a_report_written_while_it_ran(run_dir, tmp_path, monkeypatch, eval_report):
    def evaluate_while_another_writes(*args, **kwargs):
        (tmp_path / "eval.json").write_text("the other evaluation's report")
        return eval_report

    monkeypatch.setattr(hstu.export, "evaluate_run", evaluate_while_another_writes)
    result = run_script("eval", f"run_dir={run_dir}", f"out_file={tmp_path / 'eval.json'}")
    assert result.code == 1 and "was written while this evaluation ran; pass overwrite=true" in result.stderr, \
        result.stderr
    assert (tmp_path / "eval.json").read_text() == "the other evaluation's report"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]  # no temporary file left


@pytest.mark.parametrize("where", ["data_dir", "config.json"])
def test_recommend_names_a_data_dir_on_a_file(export_dir, tmp_path, where):
    (tmp_path / "notes").write_text("x")
    args = [f"data_dir={tmp_path / 'notes'}"]
    if where == "config.json":
        export_dir = _copy(export_dir, tmp_path / "export")
        config = json.loads((export_dir / "config.json").read_text())
        config["data"]["datamodule"]["data_dir"] = str(tmp_path / "notes" / "data")
        (export_dir / "config.json").write_text(json.dumps(config))
        args = []
    result = run_script("recommend", f"export_dir={export_dir}", "user=1", *args)
    key = "data_dir" if where == "data_dir" else r"config\.json: data\.datamodule\.data_dir"
    assert result.code == 1 and re.match(rf"^{key}=.*notes.*: .*notes is a file, not a folder$",
                                         result.error_lines[-1]), result.stderr


@pytest.mark.parametrize("args, message", [
    (["user=1", "timestamps=[1600000000]"], r"^timestamps= goes with history=; user= takes the times"),
    (["history=[0,1,2]", "k=41"], r"^k must be an integer in \[1, 40\] \(the number of items\), got 41$"),
], ids=["timestamps with user", "k above num_items"])
def test_recommend_refuses_what_it_would_ignore(export_dir, args, message):
    result = run_script("recommend", f"export_dir={export_dir}", *args)
    assert result.code == 1 and re.match(message, result.error_lines[-1]), result.stderr


def test_recommend_says_when_fewer_than_k_items_are_left(export_dir):
    result = run_script("recommend", f"export_dir={export_dir}", "history=[0,1,2]", "k=40")
    assert result.code == 0, result.stderr
    assert "37 of k=40 items: the other items of the 40 are in the history" in result.stdout


def test_recommend_from_a_run_folder_names_its_export(run_dir):
    result = run_script("recommend", f"export_dir={run_dir}", "history=[0]")
    assert result.code == 1 and re.match(r"^export_dir=.*: a training run's folder, not an export folder; "
                                         r"scripts/export\.py writes its export to .*/export$",
                                         result.error_lines[-1]), result.stderr


def test_ckpt_path_to_a_folder_is_named(run_dir):
    with pytest.raises(ConfigError, match=r"^ckpt_path=.*checkpoints: is a folder; give a checkpoint file"):
        resolve_checkpoint(load_run(run_dir), run_dir / "checkpoints")


def test_recommend_script_prints_top_k(export_dir):
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "recommend.py"), f"export_dir={export_dir}", "history=[0,1,2]",
         "timestamps=[1600000000,1600000060,1600000120]", "k=3"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    ranks = [line.split() for line in result.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[0] for r in ranks] == ["1", "2", "3"]
    assert not {r[1] for r in ranks} & {"0", "1", "2"}


def test_recommend_script_without_timestamps_keeps_an_item_given_twice(export_dir, recommender):
    """Without timestamps every event is at the request time, so no event is an exact repeat of another: the
    second 0 stays (the run's drop_exact would take it for a duplicated line); with real times an item given
    twice at one time is dropped, and the count says so."""
    untimed = run_script("recommend", f"export_dir={export_dir}", "history=[0,1,0]", "k=3", "request_time=1600000000")
    assert untimed.code == 0, untimed.stderr
    assert "history: 3 events, most recent [0, 1, 0]" in untimed.stdout
    expected = recommender.recommend([([0, 1, 0], [1600000000] * 3)], k=3, repeats="keep")[0]
    assert [line.split()[1] for line in untimed.stdout.splitlines() if line.strip()[:1].isdigit()] == \
        [str(item) for item, _ in expected]
    timed = run_script("recommend", f"export_dir={export_dir}", "history=[0,1,1]", "k=3",
                       "timestamps=[1600000000,1600000060,1600000060]")
    assert timed.code == 0, timed.stderr
    assert "history: 2 events, most recent [0, 1]; 1 dropped as repeats (data.repeats=drop_exact)" in timed.stdout
