"""A batch of request histories as arrays: original ids mapped, events in time order, windows cut.

Every step works on the concatenation of all histories (one id lookup, one sortedness check, one
window computation), so preparing 1,024 histories costs a few array operations plus one pass over
the users for their lengths and types, not a Python loop over events. Histories given as Python
lists are flattened into one list and converted by one C call (``int64_values``).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Hashable, Optional, Sequence

import numpy as np

from hstu.data.sequences import DEFAULT_REPEATS, _ranges, repeated_events
from hstu.errors import RequestError, UnknownIdError
from hstu.serving.ids import ItemIdIndex, int64_values
from hstu_kernels.time_buckets import OUTSIDE_TIMESTAMP_RANGE, TIMESTAMP_BOUND

History = tuple[Sequence[Hashable], Sequence[int]]
UNKNOWN_ITEM_POLICIES = ("error", "skip")


@dataclass(frozen=True)
class Events:
    """Histories in model item indices, each in stable time order: user b owns [offsets[b], offsets[b+1])."""

    item_ids: np.ndarray  # int64 [E], 1..num_items
    timestamps: np.ndarray  # int64 [E]
    offsets: np.ndarray  # int64 [B+1]

    def __len__(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def users(self, start: int, stop: int) -> "Events":
        """Users start..stop-1, offsets from 0."""
        begin, end = self.offsets[start], self.offsets[min(stop, len(self))]
        return Events(self.item_ids[begin:end], self.timestamps[begin:end], self.offsets[start:stop + 1] - begin)

    def recent(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(event indices of each user's ``max_len`` most recent events, their offsets [B+1])."""
        lengths = np.minimum(self.lengths, max_len)
        return _ranges(self.offsets[1:] - lengths, lengths)

    def last_timestamps(self) -> np.ndarray:
        """[B] each user's latest event time (users have at least one event)."""
        return self.timestamps[self.offsets[1:] - 1]


def check_k(k, num_items: int) -> None:
    """RequestError unless ``k`` is an integer in [1, num_items]: the one rule of every serving path."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_items:
        raise RequestError(f"k must be an integer in [1, {num_items}] (the number of items), got {k!r}")


def check_request_times(times: Sequence[Optional[int]], last_timestamps: Sequence[int],
                        name: Optional[Callable[[int], str]] = None) -> None:
    """RequestError for the first request time outside [-2**62, 2**62) or before its history's last event
    (the time bias would read the gap as if the request came that long after it); ``name(b)`` names
    history b in the message."""
    for b, request_time in enumerate(times):
        if request_time is None:
            continue
        of = f" of {name(b)}" if name is not None else ""
        if not -TIMESTAMP_BOUND <= request_time < TIMESTAMP_BOUND:
            raise RequestError(f"request_time={request_time}{of} {OUTSIDE_TIMESTAMP_RANGE}")
        if request_time < last_timestamps[b]:
            raise RequestError(f"request_time={request_time} is before the last event{of} ({last_timestamps[b]}): "
                               "a request comes after its history")


def prepare_histories(index: ItemIdIndex, histories: Sequence[History], unknown_items: str = "error",
                      repeats: str = DEFAULT_REPEATS) -> Events:
    """(item ids, Unix-second timestamps) per user in original ids -> :class:`Events`.

    Raises ``RequestError`` (a ValueError) naming the history (its position in ``histories``) for
    mismatched lengths, timestamps that are not integers in [-2**62, 2**62), or no known item, and
    ``UnknownIdError`` (a KeyError) for unknown items when ``unknown_items`` is "error" ("skip" drops
    them). Events are put in time order with a stable sort (ties keep the given order), then the repeats that
    the training data dropped are dropped (``repeats``: the run's ``data.repeats``), as in training.
    """
    if unknown_items not in UNKNOWN_ITEM_POLICIES:
        raise RequestError(f"unknown_items must be one of {UNKNOWN_ITEM_POLICIES}, got {unknown_items!r}")
    item_parts = [items for items, _ in histories]
    time_parts = [timestamps for _, timestamps in histories]
    lengths = np.fromiter(map(len, item_parts), dtype=np.int64, count=len(histories))
    mismatched = np.flatnonzero(lengths != np.fromiter(map(len, time_parts), dtype=np.int64, count=len(histories)))
    if mismatched.size:
        user = int(mismatched[0])
        raise RequestError(f"history {user}: {lengths[user]} items but {len(time_parts[user])} timestamps")
    offsets = np.zeros(len(histories) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    timestamps = _concatenated(time_parts)
    if timestamps.size and (timestamps.dtype.kind not in "iu" or timestamps.ndim != 1):
        for user, part in enumerate(time_parts):  # name the first history at fault
            part = np.asarray(part)
            if part.size and (part.dtype.kind not in "iu" or part.ndim != 1):
                beyond = [t for t in time_parts[user] if isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                          and not -TIMESTAMP_BOUND <= t < TIMESTAMP_BOUND] if part.ndim == 1 else []
                if beyond:  # integers beyond int64 make numpy's array float64: the range is the problem
                    raise RequestError(f"history {user}: timestamp {beyond[0]} {OUTSIDE_TIMESTAMP_RANGE}")
                raise RequestError(f"history {user}: timestamps must be integer Unix seconds, got dtype {part.dtype}")
    outside = np.flatnonzero((timestamps < -TIMESTAMP_BOUND) | (timestamps >= TIMESTAMP_BOUND))
    if outside.size:
        user = int(np.searchsorted(offsets, outside[0], side="right") - 1)
        raise RequestError(f"history {user}: timestamp {timestamps[outside[0]]} {OUTSIDE_TIMESTAMP_RANGE}")
    timestamps = timestamps.astype(np.int64, copy=False)
    if _all_arrays(item_parts):
        item_ids = index.lookup(np.concatenate(item_parts))
    else:  # one flat list: converted once, or compared value by value where the types are mixed
        item_ids = index.lookup(list(itertools.chain.from_iterable(item_parts)))

    known = item_ids > 0
    if not known.all():
        if unknown_items == "error":
            user = int(np.searchsorted(offsets, np.argmin(known), side="right") - 1)
            begin = offsets[user]
            unknown = [item_parts[user][i - begin] for i in np.flatnonzero(~known[begin:offsets[user + 1]])[:10] + begin]
            raise UnknownIdError(f"history {user}: item id(s) {unknown} unknown to the model "
                                 "(pass unknown_items=skip to drop them)")
        owner = np.repeat(np.arange(len(histories)), lengths)
        lengths = np.bincount(owner[known], minlength=len(histories)).astype(np.int64)
        np.cumsum(lengths, out=offsets[1:])
        item_ids, timestamps = item_ids[known], timestamps[known]
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        user = int(empty[0])
        raise RequestError(f"history {user}: " + ("no known items to recommend from" if len(item_parts[user])
                                                  else "empty: no items to recommend from"))
    item_ids, timestamps = _in_time_order(item_ids, timestamps, offsets)
    owner = np.repeat(np.arange(len(histories)), lengths)
    dropped = repeated_events(owner, timestamps, item_ids, repeats)
    if dropped.any():
        kept = ~dropped
        np.cumsum(np.bincount(owner[kept], minlength=len(histories)), out=offsets[1:])
        item_ids, timestamps = item_ids[kept], timestamps[kept]
    return Events(item_ids, timestamps, offsets)


def _concatenated(parts: list) -> np.ndarray:
    """Per-user arrays or lists as one array: arrays joined, lists flattened and converted at once."""
    if _all_arrays(parts):
        return np.concatenate(parts)
    values = list(itertools.chain.from_iterable(parts))
    exact = int64_values(values)
    return exact if exact is not None else np.asarray(values)


def _all_arrays(parts: list) -> bool:
    """Whether there are parts and every one is a numpy array (one C-level pass)."""
    return bool(parts) and all(map(isinstance, parts, itertools.repeat(np.ndarray)))


def _in_time_order(item_ids: np.ndarray, timestamps: np.ndarray, offsets: np.ndarray):
    """Each user's events stably sorted by time; histories already in order (the usual case) are left as they are."""
    decreasing = np.diff(timestamps) < 0
    decreasing[offsets[1:-1] - 1] = False  # a new user may start earlier than the last one ended
    if not decreasing.any():
        return item_ids, timestamps
    owner = np.repeat(np.arange(offsets.shape[0] - 1), np.diff(offsets))
    order = np.lexsort((timestamps, owner))  # stable: ties keep the given order
    return item_ids[order], timestamps[order]
