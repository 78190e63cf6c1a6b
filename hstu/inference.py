"""Serving: rebuild a trained SequentialRecommender from an export folder and recommend in original ids.

An export folder (written by :func:`hstu.export.export_run`) holds three files, and a fourth with
``compiled`` set:
  * ``model.safetensors``: ``SequentialRecommender.state_dict()``. Safetensors holds raw tensors only,
    so loading it runs no code (a pickled checkpoint can).
  * ``config.json``: ``format_version``, the ``model`` hyperparameters that rebuild the network, the
    run's ``metrics``, the ``data`` section (source name and the datamodule config), and ``files``: the
    SHA-256 of ``model.safetensors`` and ``items.json``. Loading checks both, so weights or a catalogue
    copied in from another export, which would change every answer silently, are refused by name; each
    compiled package's entry under ``compiled`` records its own SHA-256 the same way.
  * ``items.json``: ``{"id_type": "int" | "str", "original_ids": [...]}``; ``original_ids[i]`` is the
    original id of item index ``i + 1`` (index 0 is padding, never an item).
  * ``scoring-<target>.pt2`` (exports with ``compiled``): an AOTInductor package, native code that the
    serving engine loads and runs where the KV cache does not serve (:mod:`hstu.serving.compiled`), so
    serve only export folders you trust; ``compiled=none`` at export leaves it out.

Requests speak original item ids. Unknown ids (items the model never saw in training) raise an
``UnknownIdError`` (a ``KeyError``) naming them, unless ``unknown_items="skip"``, which drops them
from the history. Other malformed requests raise ``RequestError`` (a ``ValueError``). Histories are
mapped and ordered as whole arrays (:mod:`hstu.serving.histories`).

``recommend`` ranks batches of histories from scratch. ``infer_with_optimal_strategy`` serves one
user's request on the path the hardware and the export allow (cached incremental inference, CUDA
graphs, kernels), reports what ran, and feeds ``get_comprehensive_stats`` (:mod:`hstu.serving.engine`).
"""
from __future__ import annotations

import hashlib
import json
import operator
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable, Mapping, Sequence, get_args, get_origin, get_type_hints

import numpy as np
import torch
from hydra.errors import InstantiationException
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from hstu.checkpoints import load_state_strictly, state_dict_mismatch

from hstu.config import (
    HSTUEncoderConfig,
    LossConfig,
    ModelConfig,
    SASRecEncoderConfig,
    check_data_targets,
    instantiate_config,
)
from hstu.data.batch import JaggedBatch
from hstu.data.sequences import CONSECUTIVE_ONLY, DEFAULT_REPEATS, REPEAT_POLICIES
from hstu.data.sources import absolute_path
from hstu.errors import (
    ConfigError, DataError, ExportFormatError, MissingFileError, RequestError, UnknownIdError, UserError,
)
from hstu.files import check_folder_path, sha256_of
from hstu.model.recommender import ENCODER_TARGETS, SequentialRecommender
from hstu.serving.config import device_errors
from hstu.serving.engine import ServingEngine, ServingOptions
from hstu.serving.histories import Events, History, check_k, check_request_times, prepare_histories
from hstu.serving.ids import ItemIdIndex

FORMAT_VERSION = 2
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ITEMS_FILE = "items.json"
# SequentialRecommender's arguments that describe the network (kernel flags are chosen at load time).
MODEL_KEYS = ("num_items", "max_seq_len", "dim", "input_dropout", "encoder", "loss", "time_scales",
              "position_from_end")
CONFIG_KEYS = ("format_version", "model", "metrics", "data", "files")
# The files whose SHA-256 config.json records under "files".
RECORDED_FILES = (WEIGHTS_FILE, ITEMS_FILE)
MODEL_DIGEST_KEY = "model_settings_sha256"  # in the weights file's metadata
# The MODEL_KEYS settings checked against the training config's ModelConfig schema (the rest: their own).
MODEL_SCHEMA_KEYS = ("max_seq_len", "dim", "input_dropout", "time_scales", "position_from_end")
ENCODER_SCHEMAS = {"hstu.model.hstu.HSTUEncoder": HSTUEncoderConfig, "hstu.model.sasrec.SASRecEncoder": SASRecEncoderConfig}


def read_export_config(export_dir: str | Path) -> dict[str, Any]:
    """config.json of an export folder, checked for its format version, every required key, and the types and
    ranges of the model's settings (those of the training config's schemas)."""
    path = Path(export_dir) / CONFIG_FILE
    config = _read_json(path)
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ExportFormatError(f"{path}: missing key(s) {missing}")
    if config["format_version"] != FORMAT_VERSION:
        raise ExportFormatError(
            f"{path}: format_version {config['format_version']!r} is not supported (this code reads {FORMAT_VERSION}); "
            "export the run again with scripts/export.py"
        )
    _require_mappings(path, config, ("model", "metrics", "data", "files"), "")
    model = config["model"]
    missing = [f"model.{key}" for key in MODEL_KEYS if key not in model]
    if missing:
        raise ExportFormatError(f"{path}: missing key(s) {missing}")
    _require_mappings(path, model, ("encoder", "loss"), "model.")
    target = model["encoder"].get("_target_")
    if target not in ENCODER_SCHEMAS:
        raise ExportFormatError(f"{path}: model.encoder._target_ must be one of {ENCODER_TARGETS}, got {target!r}")
    errors = _setting_errors({key: model[key] for key in MODEL_SCHEMA_KEYS}, ModelConfig, "model")
    errors += _setting_errors(model["encoder"], ENCODER_SCHEMAS[target], "model.encoder")
    errors += _setting_errors(model["loss"], LossConfig, "model.loss")
    if isinstance(model["num_items"], bool) or not isinstance(model["num_items"], int) or model["num_items"] < 1:
        errors.insert(0, f"model.num_items={model['num_items']!r}: must be an integer >= 1")
    if errors:
        raise ExportFormatError(f"{path}: {'; '.join(errors)}")
    check_data_targets(config["data"].get("datamodule"), f"{path}: data.datamodule")
    window = (config["data"].get("datamodule") or {}).get("max_seq_len")
    if isinstance(window, int) and window != model["max_seq_len"]:
        raise ExportFormatError(f"{path}: data.datamodule.max_seq_len={window}: the model was trained and evaluated on "
                                f"windows of {window} events, and serving takes model.max_seq_len={model['max_seq_len']}; "
                                "train again with data.max_seq_len equal to model.max_seq_len")
    repeats = repeats_policy(config)
    if repeats not in REPEAT_POLICIES:
        raise ExportFormatError(f"{path}: data.datamodule.repeats must be one of {list(REPEAT_POLICIES)}, got {repeats!r}")
    return config


def repeats_policy(config: Mapping[str, Any]) -> Any:
    """The training data's ``repeats`` rule in an export config (the datamodule's default where it has none):
    serving drops the events that training dropped."""
    datamodule = (config.get("data") or {}).get("datamodule") or {}
    return datamodule.get("repeats", DEFAULT_REPEATS) if isinstance(datamodule, Mapping) else DEFAULT_REPEATS


def _require_mappings(path: Path, section: Mapping[str, Any], keys: Sequence[str], prefix: str) -> None:
    for key in keys:
        if not isinstance(section[key], dict):
            raise ExportFormatError(f"{path}: {prefix}{key} must be a mapping, got {type(section[key]).__name__}")


def _setting_errors(settings: Mapping[str, Any], schema: type, key: str) -> list[str]:
    """One message per setting that ``schema`` (a training config schema) does not have, or whose value is
    not of its type or outside its range."""
    known = {schema_field.name: schema_field for schema_field in fields(schema)}
    types = get_type_hints(schema)
    errors = []
    for name, value in settings.items():
        if name not in known:
            errors.append(f"{key}.{name}: unknown key; {key} has {sorted(k for k in known if not k.startswith('_'))}")
        elif not _is_of_type(value, types[name]):
            type_name = getattr(types[name], "__name__", None) or str(types[name]).replace("typing.", "")
            errors.append(f"{key}.{name}={value!r}: must be of type {type_name}")
        elif "check" in known[name].metadata and not known[name].metadata["check"].test(value):
            errors.append(f"{key}.{name}={value!r}: {known[name].metadata['check'].rule}")
    return errors


def _is_of_type(value: Any, hint: Any) -> bool:
    """Whether a JSON value is of a schema field's type (bool is not an int; an int is a float)."""
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint in (bool, int, str):
        return isinstance(value, hint)
    if hint is float:
        return isinstance(value, (int, float))
    if get_origin(hint) is list:
        (item,) = get_args(hint)
        return isinstance(value, list) and all(_is_of_type(v, item) for v in value)
    return True  # Any


def read_item_ids(export_dir: str | Path, num_items: int) -> list:
    """items.json of an export folder: the original id of item index 1..num_items, in order."""
    path = Path(export_dir) / ITEMS_FILE
    items = _read_json(path)
    for key in ("id_type", "original_ids"):
        if key not in items:
            raise ExportFormatError(f"{path}: missing key {key!r}")
    ids, id_type = items["original_ids"], items["id_type"]
    expected_type = {"int": int, "str": str}.get(id_type)
    if expected_type is None:
        raise ExportFormatError(f"{path}: id_type must be 'int' or 'str', got {id_type!r}")
    if len(ids) != num_items:
        raise ExportFormatError(f"{path}: {len(ids)} original_ids, but the model has {num_items} items")
    if not all(type(i) is expected_type for i in ids):
        raise ExportFormatError(f"{path}: original_ids must all be of id_type {id_type!r}")
    if len(set(ids)) != len(ids):
        raise ExportFormatError(f"{path}: original_ids are not unique")
    return ids


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise ExportFormatError(f"{path}: missing from the export folder") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportFormatError(f"{path}: unreadable ({error})") from error
    if not isinstance(content, dict):
        raise ExportFormatError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, with an error that names the file when it is missing or corrupt."""
    return _read_safetensors(path, lambda: load_file(path, device="cpu"))


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of each tensor of a safetensors file, from its header (checked against the file's size)."""
    def read() -> dict[str, tuple[int, ...]]:
        with safe_open(path, framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    return _read_safetensors(path, read)


def _read_safetensors(path: str | Path, read: Callable[[], Any]) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing from the export folder")
    try:
        return read()
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportFormatError(f"{path}: corrupt or not a safetensors file ({error})") from error


def weights_mismatch(export_dir: Path) -> Callable[[str], ExportFormatError]:
    """The error for weights that do not fit the network config.json describes, given the mismatch."""
    return lambda mismatch: ExportFormatError(
        f"{export_dir / WEIGHTS_FILE}: does not match {export_dir / CONFIG_FILE}: {mismatch}")


def check_export_files(export_dir: str | Path, config: Mapping[str, Any]) -> None:
    """model.safetensors and items.json are the files the export was written with (config.json's "files"):
    a file replaced afterwards, by another training's weights or another export's catalogue, is refused
    by name rather than served. So are edited model settings (``alpha``, say), which no weight shape shows:
    the weights file records their digest, and an export written before it did is refused."""
    export_dir = Path(export_dir)
    for name in RECORDED_FILES:
        check_recorded_digest(export_dir / name, config["files"].get(name), f"files.{name}",
                              "export the run again instead of replacing its files")
    recorded = weights_metadata(export_dir / WEIGHTS_FILE).get(MODEL_DIGEST_KEY)
    if recorded is None:
        raise ExportFormatError(f"{export_dir / WEIGHTS_FILE}: records no SHA-256 of {CONFIG_FILE}'s model settings "
                                "(written before exports recorded it); export the run again with scripts/export.py")
    if recorded != model_settings_digest(config["model"]):
        raise ExportFormatError(f"{export_dir / CONFIG_FILE}: its model settings are not those the weights were "
                                f"exported with ({WEIGHTS_FILE} records their SHA-256); export the run again "
                                "instead of editing them")


def model_settings_digest(model: Mapping[str, Any]) -> str:
    """SHA-256 of config.json's model settings as JSON, keys sorted (the same before and after a JSON round trip)."""
    return hashlib.sha256(json.dumps(model, sort_keys=True, default=str).encode()).hexdigest()


def weights_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata in a safetensors file's header."""
    def read() -> dict[str, str]:
        with safe_open(path, framework="pt") as weights:
            return weights.metadata() or {}
    return _read_safetensors(path, read)


def check_recorded_digest(path: Path, recorded: Any, key: str, remedy: str) -> None:
    """ExportFormatError naming ``path`` when it is missing or its SHA-256 is not config.json's ``key``."""
    if not path.is_file():
        raise ExportFormatError(f"{path}: missing from the export folder")
    if sha256_of(path) != recorded:
        raise ExportFormatError(f"{path}: not the file this export recorded (its SHA-256 differs from "
                                f"{path.parent / CONFIG_FILE}'s {key}); {remedy}")


def check_export_weights(export_dir: str | Path, config: Mapping[str, Any]) -> None:
    """The export's weights file is whole and fits config.json's network, read from its header alone: for
    a server to refuse a broken export before its workers start (no tensor is loaded)."""
    export_dir = Path(export_dir)
    with torch.device("meta"):
        model = build_model(export_dir, config, kernels=None, kernel_fallback="warn")
    mismatch = state_dict_mismatch(model, weight_shapes(export_dir / WEIGHTS_FILE))
    if mismatch:
        raise weights_mismatch(export_dir)(mismatch)


def build_model(export_dir: Path, config: Mapping[str, Any], kernels: Mapping[str, bool] | None,
                kernel_fallback: str) -> SequentialRecommender:
    """The network config.json describes (untrained), or an error naming config.json."""
    model_config = config["model"]
    try:
        return SequentialRecommender(**{key: model_config[key] for key in MODEL_KEYS},
                                     kernels=kernels, kernel_fallback=kernel_fallback)
    except UserError:  # a bad kernels or kernel_fallback argument names itself
        raise
    except (TypeError, ValueError, InstantiationException) as error:  # settings that do not go together
        raise ExportFormatError(f"{export_dir / CONFIG_FILE}: model does not build a network "
                                f"({' '.join(str(error).split())})") from error


class Recommender:
    """Top-K recommendation for histories given in original item ids; see the module docstring."""

    def __init__(
        self,
        model: SequentialRecommender,
        item_original_ids: Sequence[Hashable],
        *,
        config: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
    ):
        if len(item_original_ids) != model.num_items:
            raise ValueError(f"{len(item_original_ids)} original ids for a model of {model.num_items} items")
        errors = device_errors(str(device))
        if errors:
            raise ConfigError(errors[0])
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.config = dict(config or {})
        self.repeats = repeats_policy(self.config)
        if self.repeats not in REPEAT_POLICIES:
            raise ConfigError(f"config data.datamodule.repeats must be one of {list(REPEAT_POLICIES)}, "
                              f"got {self.repeats!r}")
        self.item_original_ids = list(item_original_ids)
        self._ids = ItemIdIndex(self.item_original_ids)
        self._original_ids = np.empty(len(self.item_original_ids), dtype=object)
        self._original_ids[:] = self.item_original_ids
        self._engine = None
        self.export_dir: Path | None = None  # set by from_export; the engine looks for compiled packages there

    @classmethod
    def from_export(
        cls,
        path: str | Path,
        device: str | torch.device = "cpu",
        kernels: Mapping[str, bool] | None = None,
        kernel_fallback: str = "warn",
    ) -> "Recommender":
        """Rebuild the model of an export folder under any kernel flags (parameter names do not depend on them)."""
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"export_dir={path}: no such directory (scripts/export.py writes one)")
        if not (path / CONFIG_FILE).exists() and (path / "metrics.json").is_file():
            raise MissingFileError(f"export_dir={path}: a training run's folder, not an export folder; scripts/export.py "
                                   f"writes its export to {path / 'export'}")
        config = read_export_config(path)
        model = build_model(path, config, kernels, kernel_fallback)
        load_state_strictly(model, load_weights(path / WEIGHTS_FILE), weights_mismatch(path))
        item_ids = read_item_ids(path, model.num_items)
        check_export_files(path, config)  # after the checks that say more than "another file"
        recommender = cls(model, item_ids, config=config, device=device)
        recommender.export_dir = path
        return recommender

    @property
    def max_seq_len(self) -> int:
        return self.model.max_seq_len

    def known_items(self, original_ids: Sequence[Hashable]) -> list[bool]:
        """Whether the model saw each of ``original_ids`` in training."""
        return (self._ids.lookup(list(original_ids)) > 0).tolist()

    def item_index(self, original_id: Hashable) -> int:
        """The model's index (1..num_items) of an original item id; ``UnknownIdError`` (a KeyError) when
        the model never saw it."""
        (index,) = self._ids.lookup([original_id])
        if index == 0:
            raise UnknownIdError(f"item id {original_id!r} is unknown to the model")
        return int(index)

    def prepare(self, histories: Sequence[History], unknown_items: str = "error",
                repeats: str | None = None) -> Events:
        """The histories as the model reads them (:func:`~hstu.serving.histories.prepare_histories`): known
        items in model indices, in time order, without the repeats that ``repeats`` drops (None: the run's
        ``data.repeats``; ``CONSECUTIVE_ONLY`` for histories whose times are made up)."""
        if repeats is not None and repeats not in (*REPEAT_POLICIES, CONSECUTIVE_ONLY):
            raise RequestError(f"repeats must be one of {[*REPEAT_POLICIES, CONSECUTIVE_ONLY]} or None, got {repeats!r}")
        return prepare_histories(self._ids, histories, unknown_items, self.repeats if repeats is None else repeats)

    def recommend(
        self,
        histories: Sequence[History],
        k: int = 10,
        request_time: int | Sequence[int | None] | None = None,
        exclude_seen: bool = True,
        unknown_items: str = "error",
        batch_size: int = 256,
        repeats: str | None = None,
    ) -> list[list[tuple[Hashable, float]]]:
        """Per history, up to ``k`` (original item id, score) pairs, best first.

        ``histories``: (item ids, Unix-second timestamps) per user, in original ids; events are put in
        time order with a stable sort (ties keep the given order) and repeats are dropped by ``repeats``
        (None: the run's ``data.repeats``, as in training). The model sees the ``max_seq_len`` most recent
        events; ``exclude_seen`` masks every item of the full history.
        ``request_time``: Unix seconds per user (or one value for all), the time the recommendation is
        for, not before the user's last event; it is the query time of the last position in the HSTU
        time bias. None: the last event's.
        Scores are cosine similarities. Fewer than ``k`` pairs come back when fewer items are left.
        """
        check_k(k, self.model.num_items)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RequestError(f"batch_size must be an int >= 1, got {batch_size!r}")
        times = _per_user_times(request_time, len(histories))
        events = self.prepare(histories, unknown_items, repeats)
        check_request_times(times, events.last_timestamps(), lambda b: f"history {b}")
        results: list[list[tuple[Hashable, float]]] = []
        for start in range(0, len(events), batch_size):
            results += self._recommend_batch(events.users(start, start + batch_size),
                                             times[start:start + batch_size], k, exclude_seen)
        return results

    def _recommend_batch(self, events: Events, request_times, k, exclude_seen) -> list[list[tuple[Hashable, float]]]:
        recent, seq_offsets = events.recent(self.max_seq_len)
        targets = events.last_timestamps()
        given = [b for b, t in enumerate(request_times) if t is not None]
        if given:
            targets[given] = [request_times[b] for b in given]
        batch = JaggedBatch(
            item_ids=torch.from_numpy(events.item_ids[recent]),
            timestamps=torch.from_numpy(events.timestamps[recent]),
            seq_offsets=torch.from_numpy(seq_offsets),
            targets=torch.zeros(len(events), dtype=torch.int64),
            target_timestamps=torch.from_numpy(targets),
            user_ids=torch.arange(len(events)),
            seen_ids=torch.from_numpy(events.item_ids if exclude_seen else np.zeros(0, dtype=np.int64)),
            seen_offsets=torch.from_numpy(events.offsets if exclude_seen else np.zeros(len(events) + 1, np.int64)),
        )
        with torch.no_grad():
            checked = batch.check(self.model.max_seq_len, self.model.num_items)  # on the CPU: no GPU wait
            scores, ids, _ = self.model.recommend(checked.to(self.device), k)
        return self.ranked(ids.cpu().numpy(), scores.cpu().numpy())

    def infer_with_optimal_strategy(
        self,
        user_id: Hashable,
        user_behaviors: Sequence[tuple[Hashable, int]],
        num_recommendations: int,
        request_time: int | None = None,
    ) -> dict[str, Any]:
        """One user's top ``num_recommendations`` on the best path available here, and what ran.

        ``user_behaviors``: the user's (original item id, Unix seconds) events; ``request_time`` as in
        :meth:`recommend`. Returns ``recommendations`` ([{"item", "score"}], best first; seen items
        excluded), ``optimizations_applied`` (path, device, dtype, each operator's backend, KV-cache
        hit or miss and why, CUDA graph, compile, batch size) and ``latency_ms``. The rule that picks
        the path: :mod:`hstu.serving.engine`. ``RequestError`` / ``UnknownIdError`` name a bad request.
        """
        return self.serving_engine().infer(user_id, user_behaviors, num_recommendations, request_time)

    def get_comprehensive_stats(self) -> dict[str, Any]:
        """Request counts, latency percentiles, KV-cache hits / misses / evictions and hit rate, the
        CUDA-graph buckets held (or why graphs are off), and the operator manager's availability and
        per-backend call counts."""
        return self.serving_engine().stats()

    def serving_engine(self, options: ServingOptions | None = None) -> ServingEngine:
        """The engine behind :meth:`infer_with_optimal_strategy`, built on first use (or anew with ``options``)."""
        if self._engine is None or options is not None:
            self._engine = ServingEngine(self, options)
        return self._engine

    def ranked(self, ids: np.ndarray, scores: np.ndarray, limits: Sequence[int] | None = None,
               as_dicts: bool = False) -> list[list]:
        """Rows of (original item id, score) from model indices [B, k] (index <= 0: no item) and scores;
        ``limits``: at most ``limits[b]`` of row b's items; ``as_dicts``: ``{"item", "score"}`` dicts
        instead of pairs. Built as one flat list cut into rows (no Python loop per row's items)."""
        keep = ids > 0
        if limits is not None:
            keep &= np.cumsum(keep, axis=1) <= np.asarray(limits, dtype=np.int64)[:, None]
        originals, values = self._original_ids[ids[keep] - 1].tolist(), scores[keep].tolist()
        if as_dicts:
            flat = [{"item": original, "score": value} for original, value in zip(originals, values)]
        else:
            flat = list(zip(originals, values))
        bounds = np.zeros(ids.shape[0] + 1, dtype=np.int64)
        np.cumsum(keep.sum(axis=1), out=bounds[1:])
        bounds = bounds.tolist()
        return [flat[begin:end] for begin, end in zip(bounds, bounds[1:])]


def _per_user_times(request_time, num_users: int) -> list[int | None]:
    """``recommend``'s request_time as one entry per history (None: the last event's time)."""
    if request_time is None:
        return [None] * num_users
    single = _unix_seconds(request_time)
    if single is not None:
        return [single] * num_users
    if isinstance(request_time, (str, bytes, Mapping)) or not isinstance(request_time, Iterable):
        raise RequestError(f"request_time={request_time!r}: must be Unix seconds (an int) or a list of them, "
                           "one per history")
    times = list(request_time)
    if len(times) != num_users:
        raise RequestError(f"request_time has {len(times)} entries for {num_users} histories")
    seconds = [None if t is None else _unix_seconds(t) for t in times]
    bad = [b for b, (t, s) in enumerate(zip(times, seconds)) if t is not None and s is None]
    if bad:
        raise RequestError(f"request_time[{bad[0]}]={times[bad[0]]!r}: must be Unix seconds (an int) or None")
    return seconds


def _unix_seconds(value) -> int | None:
    """``value`` as an int when it is an integer (not a bool), else None."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def training_history(config: Mapping[str, Any], user: Hashable, data_dir: str | None = None) -> History:
    """(original item ids, timestamps) of every event of ``user`` (an original user id) in the data the
    model was trained on, rebuilt from the ``data`` section of an export's config.json."""
    data_config = config["data"].get("datamodule")
    if not isinstance(data_config, dict):
        raise ExportFormatError("config.json: data.datamodule is not a data config (an export not written from a "
                                "training run has none); give history=[...] instead of user=")
    check_data_targets(data_config, "config.json: data.datamodule")
    data_config = dict(data_config)
    if data_dir is not None:
        data_config["data_dir"] = data_dir
    check_folder_path(absolute_path(data_config.get("data_dir", "data")),
                      "data_dir" if data_dir is not None else "config.json: data.datamodule.data_dir")
    datamodule = instantiate_config(data_config, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup()
    trained = config["data"].get("events_digest")
    if trained is not None and datamodule.events_digest != trained:  # a relative path read elsewhere, or new data
        raise DataError(f"config.json: the data found at data.datamodule's paths (data_dir "
                        f"{absolute_path(data_config.get('data_dir', 'data'))}) holds other events than the model was "
                        "trained on (data.events_digest); run from the directory the export was made in, pass "
                        "data_dir= where the training data is, or give history=[...]")
    sequences = datamodule.sequences
    users = sequences.user_original_ids
    matches = np.flatnonzero(users == _as_id_of(users, user))
    if matches.size == 0:
        raise UnknownIdError(f"user {user!r} is not in the {config['data'].get('source', 'training')} data")
    begin, end = sequences.offsets[matches[0]], sequences.offsets[matches[0] + 1]
    items = sequences.item_original_ids[sequences.item_ids[begin:end] - 1].tolist()
    return items, sequences.timestamps[begin:end].tolist()


def _as_id_of(ids: np.ndarray, value: Hashable) -> Hashable:
    """``value`` as the type of ``ids`` (the command line gives 12 for a string id "12" and vice versa)."""
    if ids.dtype.kind in "OUS":
        return str(value)
    try:
        return int(value) if isinstance(value, str) else operator.index(value)
    except (TypeError, ValueError):
        raise UnknownIdError(f"user {value!r} is not an integer id, as this data's user ids are") from None
