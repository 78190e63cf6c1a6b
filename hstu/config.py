"""Config schemas, checks and resolvers: what Hydra needs from the framework before a job starts.

Schemas. Structured configs registered in Hydra's ConfigStore give each key a type, so a value of the
wrong type fails when Hydra composes the config, with the key named (``model.optimizer.lr=abc``).
``conf/train.yaml`` extends ``schema/train``; each ``conf/model``, ``conf/model/encoder`` and
``conf/data`` option extends its schema (``schema/model`` ...); ``model.kernels`` is ``KernelFlags``,
one boolean per operator of the registry (defaults entry ``/kernel_flags@kernels``; ``+triton=<name>``, conf/triton/*.yaml, switches flags on).
Boolean fields take only ``true`` or ``false``: OmegaConf would read ``2`` or ``yes`` as true.

Checks. Ranges and choices cannot be typed, so :func:`check_config` tests them (and keys added with
``+``, which Hydra lets past a schema) before anything is built, naming the key the user typed:
``data.max_seq_len`` is ``${model.max_seq_len}``, so its error names ``model.max_seq_len``.

Resolver. ``${hstu.new_dir:<path>}`` makes a directory that did not exist (``<path>``, else
``<path>_1``, ``<path>_2`` ...) and returns it, once per config (cached like Hydra's ``${now:...}``):
two jobs started in the same second get two run directories, and the ranks of one job that torchrun or
srun started share rank zero's (``hstu.distributed.shared_new_directory``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, get_type_hints

from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ValidationError
from omegaconf.nodes import BooleanNode
import torch

from hstu.data.sequences import PROTOCOL_MIN_EVENTS, REPEAT_POLICIES
from hstu.distributed import shared_new_directory
from hstu.errors import ConfigError, UserError
from hstu.model.loss import LOSS_KINDS
from hstu.module import CUDA_GRAPH_MODES
from hstu_kernels import OPERATORS
from hstu_kernels.manager import FALLBACK_POLICIES
from hstu_kernels.time_buckets import MAX_NUM_BUCKETS

# One boolean per operator of the registry (hstu_kernels.registry), all off by default.
KernelFlags = make_dataclass("KernelFlags", [(op, bool, field(default=False)) for op in OPERATORS])
KernelFlags.__module__ = __name__  # pickled by reference: launchers such as submitit ship configs to their jobs


# ---- checks attached to schema fields ------------------------------------------------------------

@dataclass(frozen=True)
class Check:
    """A range or choice rule for one field: ``test(value)`` is true when the value is allowed."""

    test: Callable[[Any], bool]
    rule: str  # completes "<key>=<value>: ..." when the test fails


def at_least(low: float) -> Check:
    return Check(lambda v: v >= low, f"must be >= {low}")


def above(low: float) -> Check:
    return Check(lambda v: v > low, f"must be > {low}")


def probability() -> Check:
    return Check(lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)")


def one_of(*choices: str) -> Check:
    return Check(lambda v: v in choices, f"must be one of {list(choices)}")


SEED = Check(lambda v: 0 <= v < 2**32, "must lie in [0, 2**32)")  # what seed_everything and numpy accept


def checked(check: Check, default: Any = MISSING) -> Any:
    """A schema field with a check (MISSING default: the YAML option must set it)."""
    return field(default=default, metadata={"check": check})


# ---- schemas -------------------------------------------------------------------------------------
# Defaults live in the YAML files; a schema gives types and checks (MISSING: the YAML must set it).

@dataclass
class OptimizerConfig:
    lr: float = checked(above(0))
    betas: List[float] = checked(Check(lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v),
                                       "must be two values in [0, 1)"))
    weight_decay: float = checked(at_least(0))


@dataclass
class LossConfig:
    kind: str = checked(one_of(*LOSS_KINDS))
    num_negatives: int = checked(at_least(1))
    temperature: float = checked(above(0))
    shared_negatives: bool = MISSING


@dataclass
class HSTUEncoderConfig:
    _target_: str = MISSING
    num_blocks: int = checked(at_least(1))
    num_heads: int = checked(at_least(1))
    dqk: int = checked(at_least(1))
    dv: int = checked(at_least(1))
    dropout: float = checked(probability())
    alpha: float = MISSING
    position_bias: bool = MISSING
    time_bias: bool = MISSING
    num_time_buckets: int = checked(Check(lambda v: 1 <= v <= MAX_NUM_BUCKETS,
                                          f"must lie in [1, {MAX_NUM_BUCKETS}] (the bucket thresholds in seconds "
                                          "must fit int64)"))


@dataclass
class SASRecEncoderConfig:
    _target_: str = MISSING
    num_blocks: int = checked(at_least(1))
    num_heads: int = checked(at_least(1))
    dropout: float = checked(probability())


@dataclass
class ModelConfig:
    _target_: str = MISSING
    max_seq_len: int = checked(at_least(1))
    dim: int = checked(at_least(1))
    input_dropout: float = checked(probability())
    time_scales: List[List[int]] = checked(Check(lambda v: all(len(p) == 2 and min(p) >= 1 for p in v),
                                                 "must be [seconds, buckets] pairs of positive integers"))
    position_from_end: bool = MISSING
    kernel_fallback: str = checked(one_of(*FALLBACK_POLICIES))
    compile: bool = MISSING
    cuda_graphs: str = checked(one_of(*CUDA_GRAPH_MODES))
    backward_on_caller_thread: bool = MISSING
    eval_ks: List[int] = checked(Check(lambda v: len(v) > 0 and len(set(v)) == len(v) and min(v) >= 1,
                                       "must be distinct cut-offs >= 1"))
    loss: LossConfig = field(default_factory=LossConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    encoder: Any = MISSING
    kernels: Any = MISSING


@dataclass
class DataConfig:
    _target_: str = MISSING
    source: Any = MISSING
    data_dir: str = MISSING
    max_seq_len: int = checked(at_least(1))
    protocol: str = checked(one_of(*PROTOCOL_MIN_EVENTS))
    repeats: str = checked(one_of(*REPEAT_POLICIES))
    batch_size: int = checked(at_least(1))
    eval_batch_size: int = checked(at_least(1))
    num_workers: int = checked(at_least(0))
    bucket_tokens: int = checked(at_least(1))
    max_users: Optional[int] = checked(at_least(1))
    seed: int = checked(SEED)


@dataclass
class TrainConfig:
    """The top level of conf/train.yaml: the config groups and the run's own keys."""

    data: Any = MISSING
    model: Any = MISSING
    trainer: Any = MISSING
    callbacks: Any = None
    logger: Any = None
    paths: Any = MISSING
    task_name: str = MISSING
    seed: int = checked(SEED)
    test: bool = MISSING
    ckpt_path: Optional[str] = None
    optimized_metric: Optional[str] = None  # what scripts/train.py returns to a hyperparameter search


@dataclass
class EvalConfig:
    """conf/eval.yaml (defaults there; devices, accelerator and kernels are checked by the evaluation)."""

    run_dir: str = MISSING
    ckpt_path: Optional[str] = None
    accelerator: Any = MISSING
    devices: Any = MISSING
    num_nodes: Any = MISSING
    kernels: Any = None
    data_dir: Optional[str] = None
    out_file: str = MISSING
    overwrite: bool = MISSING


@dataclass
class ExportConfig:
    """conf/export.yaml (defaults there; compiled and compiled_k are checked by the export)."""

    run_dir: str = MISSING
    out_dir: str = MISSING
    ckpt_path: Optional[str] = None
    data_dir: Optional[str] = None
    overwrite: bool = MISSING
    compiled: Any = MISSING
    compiled_k: Any = MISSING


SCHEMAS = {
    "schema/train": TrainConfig,
    "schema/eval": EvalConfig,
    "schema/export": ExportConfig,
    "schema/model": ModelConfig,
    "schema/data": DataConfig,
    "schema/encoder_hstu": HSTUEncoderConfig,
    "schema/encoder_sasrec": SASRecEncoderConfig,
}


# ---- booleans that are booleans ------------------------------------------------------------------

class StrictBooleanNode(BooleanNode):
    """A boolean config value that accepts only true or false (OmegaConf's accepts 1, "yes", "on" ...)."""

    def _validate_and_convert_impl(self, value: Any) -> bool:
        if isinstance(value, bool):
            return value
        raise ValidationError("Value '$VALUE' is not a boolean (type $VALUE_TYPE): use true or false")

    def __deepcopy__(self, memo: dict) -> "StrictBooleanNode":  # BooleanNode's would copy into a BooleanNode
        copy = StrictBooleanNode()
        self._deepcopy_impl(copy, memo)
        return copy


def strict_schema(schema: type) -> DictConfig:
    """The structured config of ``schema`` with every boolean field (nested ones too) made strict."""
    node = OmegaConf.structured(schema)
    _make_booleans_strict(node, schema)
    return node


def _make_booleans_strict(node: DictConfig, schema: type) -> None:
    raw = OmegaConf.to_container(node, resolve=False)
    for name, hint in get_type_hints(schema).items():
        if hint is bool:
            node[name] = StrictBooleanNode(value=raw[name], is_optional=False)
        elif is_dataclass(hint):
            _make_booleans_strict(node[name], hint)


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="kernel_flags", node=strict_schema(KernelFlags))
    for name, schema in SCHEMAS.items():
        group, _, option = name.rpartition("/")
        store.store(group=group, name=option, node=strict_schema(schema))


# ---- Lightning's Trainer keys (trainer.*: no schema, Lightning takes many; the common ones checked) ---

def _integer(low: int, rule: str) -> Check:
    return Check(lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= low, rule)


def _batches_limit() -> Check:  # limit_*_batches: a count of batches, or a fraction of them
    return Check(lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                 or (isinstance(v, float) and 0.0 <= v <= 1.0), "must be a batch count >= 0 or a fraction in [0, 1]")


def _devices(value: Any) -> bool:
    """What Lightning takes as ``devices``: a count, -1, "auto", device indices as a list or a string."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1 or value == -1
    if isinstance(value, str):
        return value == "auto" or re.fullmatch(r"-1|\d+(,\d+)*,?", value.replace(" ", "")) is not None
    value = list(value) if isinstance(value, ListConfig) else value
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value)


def _trains(rule: str) -> Check:
    """A limit of 0 (epochs, steps or training batches) trains nothing: the run would test untrained weights."""
    return Check(lambda v: v != 0, f"trains nothing (the run would test untrained weights); {rule}")


# Lightning's precision names (it also takes 16, 32 and 64 as integers)
TRAINER_PRECISIONS = ("transformer-engine", "transformer-engine-float16", "16-true", "16-mixed", "bf16-true",
                      "bf16-mixed", "32-true", "64-true", "64", "32", "16", "bf16")
# a key's checks in order; the first that fails is reported
TRAINER_CHECKS = {
    "max_epochs": (_integer(-1, "must be an integer >= -1 (-1: no limit)"), _trains("use >= 1, or -1 for no limit")),
    "min_epochs": _integer(0, "must be an integer >= 0"),
    "max_steps": (_integer(-1, "must be an integer >= -1 (-1: no limit)"), _trains("use >= 1, or -1 for no limit")),
    "check_val_every_n_epoch": _integer(1, "must be an integer >= 1"),
    "log_every_n_steps": _integer(1, "must be an integer >= 1"),
    # the training step optimises manually (hstu.train_step): Lightning's accumulation and clipping do not apply
    "accumulate_grad_batches": Check(lambda v: v == 1 and not isinstance(v, bool), "is not supported: the training "
                                     "step (hstu.train_step) updates after every batch; raise data.batch_size instead"),
    "num_sanity_val_steps": _integer(-1, "must be an integer >= -1 (-1: the whole validation set)"),
    "limit_train_batches": (_batches_limit(), _trains("use a batch count >= 1 or a fraction in (0, 1]")),
    # the run selects its best checkpoint, and stops early, on validation
    "limit_val_batches": (_batches_limit(), Check(lambda v: v != 0, "validates nothing, and the run selects its best "
                                                  "checkpoint on validation; use a batch count >= 1 or a fraction in "
                                                  "(0, 1]")),
    "limit_test_batches": _batches_limit(),
    "gradient_clip_val": Check(lambda v: v == 0 and not isinstance(v, bool), "is not supported: the training "
                               "step (hstu.train_step) does not clip gradients; leave it unset"),
    "accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "deterministic": Check(lambda v: isinstance(v, bool) or v == "warn", "must be true, false or warn"),
    "devices": Check(_devices, "must be a count >= 1, -1 (all), auto, a list of device indices or a string of "
                     "them ('0,1')"),
    "precision": (Check(lambda v: str(v) in TRAINER_PRECISIONS and not isinstance(v, (bool, float)),
                        f"must be one of {list(TRAINER_PRECISIONS)}"),
                  Check(lambda v: str(v) not in ("16-mixed", "16"), "fp16 autocast needs loss scaling, which the "
                        "training step (hstu.train_step) does not do; use bf16-mixed or 32-true")),
}


def _trainer_errors(trainer: Any) -> list[str]:
    if not isinstance(trainer, DictConfig):
        return []
    errors = []
    for key, checks in TRAINER_CHECKS.items():
        if key not in trainer or OmegaConf.is_missing(trainer, key) or trainer[key] is None:
            continue
        failed = next((c for c in (checks if isinstance(checks, tuple) else (checks,)) if not c.test(trainer[key])),
                      None)
        if failed is not None:
            errors.append(f"trainer.{key}={trainer[key]}: {failed.rule}")
    if not errors and _runs_on_cpu(trainer.get("accelerator")) and not _cpu_devices(trainer.get("devices")):
        errors.append(f"trainer.devices={trainer.devices}: a CPU run takes a process count >= 1 or auto (device "
                      "indices and -1 select GPUs)")
    return errors


def _runs_on_cpu(accelerator: Any) -> bool:
    """Whether Lightning will pick its CPU accelerator (auto picks CUDA where a GPU is visible)."""
    return accelerator == "cpu" or (accelerator in (None, "auto") and not torch.cuda.is_available())


def _cpu_devices(value: Any) -> bool:
    """What Lightning's CPU accelerator takes as ``devices``: a process count, as an int or a digit string."""
    if value is None or value == "auto":
        return True
    if isinstance(value, str):
        value = int(value) if value.strip().isdigit() else None
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_accelerator(accelerator: Any, key: str) -> None:
    """ConfigError naming ``key`` when the accelerator asks for a GPU that this machine does not have."""
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key}={accelerator}: no CUDA GPU is visible on this machine ({key}=cpu or auto runs "
                          "on the CPU)")


def kernel_flag_errors(kernels: Any, key: str = "kernels") -> list[str]:
    """One message per wrong entry of ``kernels``: null, or a mapping of operator names to booleans."""
    if kernels is None:
        return []
    if isinstance(kernels, DictConfig):
        kernels = OmegaConf.to_container(kernels)
    if not isinstance(kernels, dict):
        return [f"{key}={kernels}: must be null or a mapping of operator flags, e.g. {{{OPERATORS[0]}: true}}"]
    errors = []
    for name, value in kernels.items():
        if name not in OPERATORS:
            errors.append(f"{key}.{name}: unknown kernel flag; {key} has {list(OPERATORS)}")
        elif not isinstance(value, bool):
            errors.append(f"{key}.{name}={value}: must be true or false")
    return errors


# ---- checks before anything is built -------------------------------------------------------------

_SIMPLE_INTERPOLATION = re.compile(r"^\$\{([\w.]+)\}$")


def unset_key_errors(cfg: DictConfig) -> list[str]:
    """One message per key the config leaves for the command line (``???``), such as a data file's path
    (read without resolving interpolations, which may need such a key)."""
    def unset(node: Any, path: str) -> Iterator[str]:
        if node == "???":
            yield path
        elif isinstance(node, dict):
            for key, value in node.items():
                yield from unset(value, f"{path}.{key}" if path else str(key))

    plain = OmegaConf.to_container(cfg, resolve=False)
    return [f"{key} is not set: give {key}=<value>" for key in unset(plain, "") if not key.startswith("hydra.")]


def check_keys_set(cfg: DictConfig) -> None:
    """ConfigError naming every key the config leaves for the command line and the command line left out."""
    errors = unset_key_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def config_errors(cfg: DictConfig) -> list[str]:
    """One message per wrong key of a composed config: keys left unset, keys a schema does not have, values
    outside their range or choices, and combinations that cannot work. Each names the key as typed."""
    errors: list[str] = unset_key_errors(cfg)
    _check_node(cfg, "", errors)
    errors += _trainer_errors(cfg.get("trainer"))
    metric = cfg.get("optimized_metric")
    if metric:
        if OmegaConf.select(cfg, "data.protocol") == "paper":
            errors.append(f"optimized_metric={metric}: data.protocol=paper has no validation split to measure it "
                          "on; search with data.protocol=ours")
        else:
            known = _validation_metrics(cfg)
            if metric not in known:
                errors.append(f"optimized_metric={metric}: must be one of {known} (a search tunes on validation "
                              "metrics; test metrics would tune on the test split)")
    errors += _monitor_errors(cfg)
    if OmegaConf.select(cfg, "trainer.use_distributed_sampler") is True:
        errors.append("trainer.use_distributed_sampler=true: the datamodule shards examples by rank itself (a "
                      "distributed sampler would pad evaluation with duplicate users); leave it false")
    data_len, model_len = OmegaConf.select(cfg, "data.max_seq_len"), OmegaConf.select(cfg, "model.max_seq_len")
    if isinstance(data_len, int) and isinstance(model_len, int) and data_len != model_len:
        errors.append(f"data.max_seq_len={data_len}: must equal model.max_seq_len={model_len}, the window the model "
                      "is trained, evaluated and served on (unset, data.max_seq_len follows model.max_seq_len)")
    encoder = OmegaConf.select(cfg, "model.encoder")
    if isinstance(encoder, DictConfig) and OmegaConf.get_type(encoder) is SASRecEncoderConfig:
        dim, heads = cfg.model.dim, encoder.num_heads
        if isinstance(dim, int) and isinstance(heads, int) and heads >= 1 and dim % heads:
            errors.append(f"model.dim={dim}: SASRec needs it divisible by model.encoder.num_heads={heads}")
    return list(dict.fromkeys(errors))  # a value shared by interpolation is reported once


def _validation_metrics(cfg: DictConfig) -> list[str]:
    """The validation metrics a run logs: NDCG and HR at each of ``model.eval_ks``, and MRR."""
    ks = OmegaConf.select(cfg, "model.eval_ks") or []
    return [f"val/{name}@{k}" for name in ("ndcg", "hr") for k in ks] + ["val/mrr"]


def _monitor_errors(cfg: DictConfig) -> list[str]:
    """The callbacks' monitored metrics (best checkpoint, early stopping) must be validation metrics the model
    computes: a missing one stops the run after its first epoch. Under data.protocol=paper they are dropped."""
    callbacks = cfg.get("callbacks")
    if not isinstance(callbacks, DictConfig) or OmegaConf.select(cfg, "data.protocol") == "paper":
        return []
    known = _validation_metrics(cfg)
    return [f"callbacks.{name}.monitor={node.monitor}: must be one of {known} (the validation metrics of "
            f"model.eval_ks)"
            for name, node in callbacks.items()
            if isinstance(node, DictConfig) and isinstance(node.get("monitor"), str) and node.monitor not in known]


def check_config(cfg: DictConfig) -> None:
    """Raise one ConfigError listing :func:`config_errors`, if there are any."""
    errors = config_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))


def _check_node(node: DictConfig, path: str, errors: list[str]) -> None:
    keys = [key for key in node.keys() if path or key != "hydra"]  # Hydra checks its own node
    schema = OmegaConf.get_type(node)
    if is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        unknown = [key for key in keys if key not in known]
        if unknown:
            where = f"{path}." if path else ""
            errors += [f"{where}{key}: unknown key; {'the top level' if not path else path} has "
                       f"{sorted(k for k in known if not k.startswith('_'))}" for key in unknown]
        raw = OmegaConf.to_container(node, resolve=False)
        for schema_field in fields(schema):
            check = schema_field.metadata.get("check")
            if check is None or schema_field.name not in node or OmegaConf.is_missing(node, schema_field.name):
                continue
            value = node[schema_field.name]
            if value is None:
                continue
            plain = OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value
            if not check.test(plain):
                key = _typed_key(raw.get(schema_field.name), f"{path}.{schema_field.name}".lstrip("."))
                errors.append(f"{key}={_show(plain)}: {check.rule}")
    for key in keys:
        if OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
            continue
        child = node[key]
        if isinstance(child, DictConfig):
            _check_node(child, f"{path}.{key}".lstrip("."), errors)


def _typed_key(raw: Any, key: str) -> str:
    """The key whose value the user typed: the target of a plain ``${other.key}`` interpolation."""
    match = _SIMPLE_INTERPOLATION.match(raw) if isinstance(raw, str) else None
    return match.group(1) if match else key


def _show(value: Any) -> str:
    return str(value).replace("'", "") if isinstance(value, list) else str(value)


# ---- building objects ----------------------------------------------------------------------------

# The classes a data config read back from a file (a run's .hydra/config.yaml, an export's config.json)
# may name: Hydra calls whatever a _target_ names, so a file that named anything else could run code.
DATA_TARGETS = (
    "hstu.data.datamodule.SequenceDataModule", "hstu.data.sources.MovieLens1M", "hstu.data.sources.MovieLens20M",
    "hstu.data.sources.AmazonBooks", "hstu.data.sources.Interactions", "hstu.data.synthetic.Synthetic",
)


def check_data_targets(config: Any, where: str) -> None:
    """ConfigError naming the key if any ``_target_`` inside ``config`` is not one of ``DATA_TARGETS``."""
    def visit(node: Any, key: str) -> None:
        if isinstance(node, (dict, DictConfig)):
            target = node.get("_target_")
            if target is not None and target not in DATA_TARGETS:
                raise ConfigError(f"{where}{key}._target_={target!r}: a data config read from a file may name only "
                                  f"{list(DATA_TARGETS)}")
            for name, value in node.items():
                visit(value, f"{key}.{name}")
        elif isinstance(node, (list, tuple, ListConfig)):
            for index, value in enumerate(node):
                visit(value, f"{key}[{index}]")

    visit(config, "")


def instantiate_config(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, letting the framework's own errors through as they are (Hydra would
    wrap them in a message that repeats the class path before the useful line)."""
    try:
        return instantiate(config, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, UserError):
            raise error.__cause__ from error.__cause__.__cause__
        raise


# ---- run directories -----------------------------------------------------------------------------

def make_directory(path: str | Path, key: str) -> Path:
    """Create the folder ``key`` names (with its parents) before anything is computed for it; one
    ConfigError naming the key when that cannot be done (a file in the way, no permission). A folder it
    creates (not its parents) may be removed again by :func:`remove_new_directory`."""
    folder = Path(path)
    existed = folder.is_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"{key}={path}: cannot create this folder ({error.strerror or error})") from error
    if not existed:
        _MADE_HERE.add(folder.absolute())
    return folder


# Directories new_directory or make_directory made in this process: only these may be removed again
# (remove_new_directory).
_MADE_HERE: set[Path] = set()


def new_directory(path: str) -> str:
    """Create and return ``path``, or ``path_1``, ``path_2`` ... if it exists: never one that existed."""
    base = Path(path)
    base.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(10_000):
        candidate = base if attempt == 0 else base.with_name(f"{base.name}_{attempt}")
        try:
            os.mkdir(candidate)  # atomic: of two processes, exactly one creates it
        except FileExistsError:
            continue
        _MADE_HERE.add(candidate.absolute())
        return str(candidate)
    raise ConfigError(f"{base}: 10000 directories of that name exist already")


def remove_new_directory(path: str | Path, leftovers: tuple[str, ...] = ()) -> bool:
    """Remove ``path`` if this process made it (:func:`new_directory`, :func:`make_directory`) and it holds
    no file but those named in ``leftovers`` (paths relative to it), in folders (a logger's, say, made before
    anything was logged): a run stopped by a user error before it wrote anything of its own leaves no
    directory behind. True when it was removed."""
    folder = Path(path).absolute()
    if folder not in _MADE_HERE or not folder.is_dir():
        return False
    allowed = {folder / name for name in leftovers}
    if any(entry.is_symlink() or not (entry.is_dir() or entry in allowed) for entry in folder.rglob("*")):
        return False
    try:
        for entry in sorted(folder.rglob("*"), key=lambda entry: len(entry.parts), reverse=True):
            if entry.is_dir():
                entry.rmdir()
            else:
                entry.unlink()
        folder.rmdir()
    except OSError:  # a file appeared meanwhile (another rank's): what is left stays
        return False
    _MADE_HERE.discard(folder)
    return True


def new_run_directory(path: str) -> str:
    """:func:`new_directory`, shared by the ranks of a job that torchrun or srun started (one per job)."""
    return shared_new_directory(path, new_directory)


def register_resolvers() -> None:
    OmegaConf.register_new_resolver("hstu.new_dir", new_run_directory, use_cache=True, replace=True)


register_configs()
register_resolvers()
