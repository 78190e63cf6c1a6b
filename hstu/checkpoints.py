"""Reading Lightning checkpoints safely: tensors and plain containers only, never pickled objects.

:func:`load_checkpoint` names the file and what is wrong with it in one line (not a torch file, cut
short, holding objects, no positive item count); :func:`model_differences` names the model settings
in which a checkpoint differs from a config, and :func:`check_trained_items` the data whose items
differ from those it was trained on, so that neither evaluation, export nor a resumed run pairs one
model with another's weights, records or items.
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from hstu.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of a torch.save file (a zip archive)
MISSING = "<missing>"


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint's contents, unpickling tensors and plain containers only. The tensors are
    memory-mapped: a caller that only checks the checkpoint (a resumed run) reads none of their bytes."""
    unreadable = f"{path}: not a readable checkpoint (truncated, or not written by torch.save)"
    with open(path, "rb") as f:
        if f.read(len(ZIP_MAGIC)) != ZIP_MAGIC:  # else torch would try its legacy format, with any error
            raise CheckpointError(f"{unreadable}: not a zip archive")
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, which would run whatever the file names: not repeated
        found = re.search(r"GLOBAL (\S+)", str(error))
        raise CheckpointError(f"{path}: holds objects that weights_only loading refuses"
                              f"{f' ({found.group(1)})' if found else ''}, not only tensors and plain data; "
                              "it is not loaded") from error
    except Exception as error:  # torch's zip reader fails on a cut file
        raise CheckpointError(f"{unreadable}: {(str(error).splitlines() or [type(error).__name__])[0]}") from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: holds a {type(checkpoint).__name__}, not a Lightning checkpoint")
    for key in ("state_dict", "hyper_parameters"):
        if key not in checkpoint:
            raise CheckpointError(f"{path}: no {key!r} entry; is it a RecModule checkpoint?")
        if not isinstance(checkpoint[key], Mapping):
            raise CheckpointError(f"{path}: its {key} is a {type(checkpoint[key]).__name__}, not the mapping a "
                                  "RecModule checkpoint holds")
    num_items = checkpoint["hyper_parameters"].get("num_items", 1)  # a missing one is named by the model's loader
    if not isinstance(num_items, int) or isinstance(num_items, bool) or num_items < 1:
        raise CheckpointError(f"{path}: hyper_parameters.num_items is {num_items!r}, not the positive item count "
                              "training records")
    return checkpoint


def check_trained_items(path: str | Path, hyper_parameters: Mapping[str, Any], num_items: int,
                        item_ids_digest: str, remedy: str, events_digest: str | None = None) -> None:
    """DataError when the data's items are not those the checkpoint was trained on: another count, or (by
    the ``item_ids_digest`` the checkpoint records) other ids or another order; with ``events_digest``,
    also when its events are not (by the ``events_digest`` recorded, where there is one). ``remedy`` ends
    the line. A checkpoint that records no item digest is checked by the count alone, with a warning."""
    trained = hyper_parameters.get("num_items")
    if trained != num_items:
        raise DataError(f"{path}: trained on {trained} items but the data has {num_items}; {remedy}")
    recorded = hyper_parameters.get("item_ids_digest")
    if recorded is None:
        log.warning("%s: records no item_ids_digest (written by an older version); only the number of items (%d) "
                    "is checked against the data", path, num_items)
    elif not isinstance(recorded, str):
        raise CheckpointError(f"{path}: hyper_parameters.item_ids_digest is a {type(recorded).__name__}, not the "
                              "sha256 string training records")
    elif recorded != item_ids_digest:
        raise DataError(f"{path}: trained on other item ids than the data has (both {num_items} items, but their "
                        f"ids or order differ: item_ids_digest {recorded[:12]}... at training, "
                        f"{item_ids_digest[:12]}... now); {remedy}")
    trained_events = hyper_parameters.get("events_digest")
    if events_digest is not None and isinstance(trained_events, str) and trained_events != events_digest:
        raise DataError(f"{path}: trained on other events than the data has (the same {num_items} items, but "
                        f"events_digest {trained_events[:12]}... at training, {events_digest[:12]}... now: "
                        f"other splits and targets); {remedy}")


def model_differences(config: Mapping[str, Any], hyper_parameters: Mapping[str, Any], keys: Iterable[str]) -> list[str]:
    """``model.<key> (checkpoint value; the config has value)`` for each setting under ``keys`` (nested
    ones flattened) that differs; ``num_items`` is left out, since the data decides it
    (:func:`check_trained_items`)."""
    ours, theirs = {}, {}
    for key in keys:
        if key != "num_items":
            ours.update(_flat(config.get(key, MISSING), f"model.{key}"))
            theirs.update(_flat(hyper_parameters.get(key, MISSING), f"model.{key}"))
    return [f"{key} ({theirs.get(key, MISSING)}; the run has {ours.get(key, MISSING)})"
            for key in sorted(ours.keys() | theirs.keys()) if ours.get(key, MISSING) != theirs.get(key, MISSING)]


def _flat(value: Any, key: str) -> dict[str, Any]:
    if isinstance(value, Mapping):
        return {k: v for name, sub in value.items() for k, v in _flat(sub, f"{key}.{name}").items()}
    return {key: value}


def state_dict_mismatch(model: torch.nn.Module, shapes: Mapping[str, Sequence[int]]) -> str | None:
    """One line on what keeps tensors of these ``shapes`` (name -> shape) from loading into ``model``
    strictly: missing, unexpected and resized names, a few of each (None: they load)."""
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    given = {name: tuple(shape) for name, shape in shapes.items()}
    kinds = {
        "missing": [name for name in expected if name not in given],
        "unexpected": [name for name in given if name not in expected],
        "of another shape": [f"{name} {list(given[name])} for the model's {list(shape)}"
                             for name, shape in expected.items() if name in given and given[name] != shape],
    }
    parts = [f"{len(names)} {kind}: {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}"
             for kind, names in kinds.items() if names]
    return "; ".join(parts) or None


def load_state_strictly(model: torch.nn.Module, state: Mapping[str, torch.Tensor],
                        error: Callable[[str], Exception]) -> None:
    """``model.load_state_dict(state, strict=True)``, or ``error(one line on the mismatch)`` raised."""
    mismatch = state_dict_mismatch(model, {name: tensor.shape for name, tensor in state.items()})
    if mismatch:
        raise error(mismatch)
    model.load_state_dict(state, strict=True)
