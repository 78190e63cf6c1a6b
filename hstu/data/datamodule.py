"""The LightningDataModule: source -> cached arrays -> user sequences -> jagged batches.

``prepare_data`` obtains and parses the raw file once (download, checksum, cache); ``setup``
loads the cache and builds sequences and splits (see ``sequences.py`` for the rules). Loaders
yield :class:`JaggedBatch` objects, page-locked when training on a GPU (``transfer_batch_to_device`` copies
them there without waiting). When the model captures its training steps as CUDA graphs, the training loader
yields :class:`~hstu.data.packing.PlannedBatch` objects instead (example indices and a token capacity)
and the sequences live on the device, where each batch is gathered inside the step.

Training batches come in an order drawn from ``(seed, epoch)`` alone (:class:`EpochShuffle`), so a
run resumed from a checkpoint sees the same batches as one that was never interrupted.

Under DDP the module shards examples by rank itself (Lightning's ``use_distributed_sampler`` stays off):
training takes every ``world_size``-th example of the epoch's permutation, padded by wrapping around so
that every rank runs the same number of steps; validation and test give each rank one contiguous slice
of the users, with no padding, so each user is counted exactly once when the metrics' sums are added up.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
from typing import Callable, Iterator

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, Sampler

from hstu.errors import ConfigError, DataError

from .batch import JaggedBatch
from .packing import DeviceSequences, PackingLayout, PlanCollate, PlannedBatch
from .sequences import (
    DEFAULT_REPEATS,
    PROTOCOL_HELD_OUT,
    PROTOCOL_MIN_EVENTS,
    REPEAT_POLICIES,
    Examples,
    UserSequences,
    build_sequences,
    make_batch,
    seen_before,
    split_examples,
)
from .sources import InteractionSource, absolute_path, cache_interactions, load_interactions

log = logging.getLogger(__name__)

# Above this share of evaluation targets already in the user's history, setup() warns: seen items
# are masked except the target, so a model that favours history items can single the target out.
REPEATED_TARGET_WARNING = 0.05


class _ExampleIndices(Dataset):
    """Example numbers ``start..stop-1``; the collate function turns a list of them into one batch."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = int(start), int(stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> int:
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self.start + index


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The contiguous slice ``[start, stop)`` of ``size`` examples that ``rank`` of ``world_size`` evaluates:
    every example in exactly one slice, slice sizes differing by at most one."""
    return size * rank // world_size, size * (rank + 1) // world_size


class EpochShuffle(Sampler[int]):
    """A permutation of ``range(size)`` drawn from ``(seed, epoch)`` only, never from global RNG state.

    Lightning calls ``set_epoch`` on the training sampler at the start of every epoch, so epoch ``e``
    has the same order whether the run got there directly or resumed from a checkpoint. With
    ``world_size`` > 1, ``rank`` takes positions ``rank, rank + world_size, ...`` of that permutation,
    extended by wrapping around to a multiple of ``world_size`` (every rank the same number of steps;
    at most ``world_size - 1`` examples twice an epoch)."""

    def __init__(self, size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochShuffle: rank {rank} outside 0..{world_size - 1}")
        self.size = int(size)
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, examples of this rank's order already trained)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_within(self, epoch: int, examples_done: int) -> None:
        """The next pass is the rest of epoch ``epoch``, after its first ``examples_done`` examples (of this rank)."""
        self._resume = (int(epoch), int(examples_done))

    def __len__(self) -> int:
        return -(-self.size // self.world_size)

    def __iter__(self) -> Iterator[int]:
        # a resumed epoch by its own number: Lightning numbers the sampler's epoch after it when it resumes inside one
        epoch, skip = self._resume or (self.epoch, 0)
        self._resume = None
        order = np.random.default_rng([self.seed, epoch]).permutation(self.size)
        if self.world_size > 1:
            order = np.resize(order, len(self) * self.world_size)[self.rank::self.world_size]
        return iter(order[skip:].tolist())


def batches_done_within_epoch(trainer: L.Trainer | None) -> int:
    """Training batches of the current epoch done so far while it is under way; 0 at its end (or without a trainer).
    What a checkpoint written now must record to resume inside the epoch."""
    if trainer is None:
        return 0
    done = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return done if done < trainer.num_training_batches else 0


class ResumableTrainLoader(DataLoader):
    """The training loader, resumable inside an epoch: Lightning saves its ``state_dict`` in every checkpoint
    and hands it back on resume. A checkpoint written inside an epoch (a ``trainer.max_steps`` stop, a
    validation within the epoch) records how many of the epoch's batches were trained, and the resumed
    loader starts after them in the same ``(seed, epoch)`` order; a plain loader would start the epoch over,
    training its first batches twice and its last never."""

    def __init__(self, *args, batches_done: Callable[[], int], **kwargs):
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "batches_done": int(self._batches_done())}  # 0 at an epoch's end

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["batches_done"]:  # 0 at an epoch's end: the next epoch starts as usual
            self.sampler.resume_within(state["epoch"], state["batches_done"] * self.batch_size)


class _CollateExamples:
    """Builds a :class:`JaggedBatch` from example numbers (a class, not a closure, so workers can pickle it)."""

    def __init__(self, sequences: UserSequences, examples: Examples, max_seq_len: int, with_seen: bool):
        self.sequences = sequences
        self.examples = examples
        self.max_seq_len = max_seq_len
        self.with_seen = with_seen

    def __call__(self, indices: list[int]) -> JaggedBatch:
        chosen = np.asarray(indices, dtype=np.int64)
        return make_batch(
            self.sequences,
            self.examples.users[chosen],
            self.examples.target_positions[chosen],
            max_seq_len=self.max_seq_len,
            with_seen=self.with_seen,
        )


class SequenceDataModule(L.LightningDataModule):
    """Leave-last-out sequential recommendation data from any interaction source.

    ``protocol`` is ``ours`` (train / val / test) or ``paper`` (train / test, no validation).
    ``repeats`` is ``drop_exact``, ``collapse_consecutive`` or ``keep`` (``sequences.py``).
    ``max_users`` keeps only the first N users by id (smoke tests on a slice). ``seed`` and the
    epoch number decide the order of training batches (:class:`EpochShuffle`).
    """

    def __init__(
        self,
        source: InteractionSource,
        data_dir: str = "data",
        max_seq_len: int = 200,
        protocol: str = "ours",
        batch_size: int = 128,
        eval_batch_size: int = 512,
        num_workers: int = 0,
        max_users: int | None = None,
        repeats: str = DEFAULT_REPEATS,
        seed: int = 0,
        bucket_tokens: int = 1024,
    ):
        super().__init__()
        if protocol not in PROTOCOL_MIN_EVENTS:
            raise ConfigError(f"data.protocol must be one of {sorted(PROTOCOL_MIN_EVENTS)}, got {protocol!r}")
        if repeats not in REPEAT_POLICIES:
            raise ConfigError(f"data.repeats must be one of {list(REPEAT_POLICIES)}, got {repeats!r}")
        for key, value, least in (("max_seq_len", max_seq_len, 1), ("batch_size", batch_size, 1),
                                  ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0),
                                  ("seed", seed, 0), ("bucket_tokens", bucket_tokens, 1)):
            if value < least:
                raise ConfigError(f"data.{key} must be >= {least}, got {value}")
        if max_users is not None and max_users < 1:
            raise ConfigError(f"data.max_users must be null or >= 1, got {max_users}")
        self.source = source
        self.data_dir = absolute_path(data_dir)
        self.max_seq_len = int(max_seq_len)
        self.protocol = protocol
        self.repeats = repeats
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.max_users = None if max_users is None else int(max_users)
        self.seed = int(seed)
        self.bucket_tokens = int(bucket_tokens)
        # Set by a model that packs and captures its training steps on the device (RecModule.setup): the
        # training loader then yields PlannedBatch objects and the sequences live on the device.
        self.planned_batches = False
        self._device_sequences: DeviceSequences | None = None
        self._sequences: UserSequences | None = None
        self._examples: dict[str, Examples] = {}
        self._repeated_targets: dict[str, float | None] = {}

    def prepare_data(self) -> None:
        cache_interactions(self.source, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._sequences is not None:
            return
        raw = load_interactions(self.source, self.data_dir)
        sequences = build_sequences(
            raw, min_events=PROTOCOL_MIN_EVENTS[self.protocol], max_users=self.max_users, repeats=self.repeats
        )
        examples = split_examples(sequences, self.protocol)
        if len(examples["train"]) == 0:
            raise DataError(self._no_training_examples(len(np.unique(raw.user)), sequences))
        self._sequences, self._examples = sequences, examples
        repeated = seen_before(sequences)
        for split in ("val", "test"):
            chosen = examples[split]
            targets = sequences.offsets[chosen.users] + chosen.target_positions
            self._repeated_targets[split] = float(repeated[targets].mean()) if len(chosen) else None
        if rank_zero_only.rank != 0:  # the same lines from every process
            return
        log.info("%s (%s protocol): %s", self.source.name, self.protocol, self.stats)
        share = self._repeated_targets["test"]
        if share is not None and share > REPEATED_TARGET_WARNING:
            log.warning(
                "%.1f%% of test targets already occur in the user's history (data.repeats=%s). Seen items are "
                "masked except the target, so a model that favours history items can single it out: compare "
                "with the repeat-last-item baseline in metrics.json.", 100 * share, self.repeats,
            )

    def _no_training_examples(self, raw_users: int, sequences: UserSequences) -> str:
        held_out = PROTOCOL_HELD_OUT[self.protocol]
        needed = held_out + 2
        where = getattr(self.source, "path", None) or self.source.name
        return (
            f"{where}: no training examples. Of {raw_users} users, {sequences.num_dropped_users} have fewer than "
            f"{PROTOCOL_MIN_EVENTS[self.protocol]} events and were dropped, and none of the other "
            f"{sequences.num_users} has the {needed} events a training example needs under data.protocol="
            f"{self.protocol} ({held_out} held out for evaluation, then a history and its target)"
            f"{'; data.protocol=paper holds out only the last event' if self.protocol != 'paper' else ''}"
        )

    def _require_setup(self) -> None:
        if self._sequences is None:
            raise RuntimeError("SequenceDataModule.setup() must run before its data is used")

    @property
    def sequences(self) -> UserSequences:
        self._require_setup()
        return self._sequences

    @property
    def examples(self) -> dict[str, Examples]:
        """The train / val / test examples (val is empty under protocol=paper)."""
        self._require_setup()
        return self._examples

    @property
    def num_items(self) -> int:
        """Real items are 1..num_items; an item table needs num_items + 1 rows (row 0 is padding)."""
        return self.sequences.num_items

    @functools.cached_property  # the sequences never change once set up
    def item_ids_digest(self) -> str:
        """sha256 of the original item ids in index order (JSON): a checkpoint records it (RecModule), so that
        data whose items changed since training, even with the same count, is not paired with its item table."""
        ids = json.dumps(self.sequences.item_original_ids.tolist(), separators=(",", ":"))
        return hashlib.sha256(ids.encode()).hexdigest()

    @functools.cached_property  # the sequences never change once set up
    def events_digest(self) -> str:
        """sha256 of the protocol and every kept user's events (offsets, item indices, timestamps): a checkpoint
        records it (RecModule), so that evaluation and resuming refuse data whose events changed since
        training even where the items did not (a file that lost each user's newest events would make
        training targets into test targets)."""
        digest = hashlib.sha256(self.protocol.encode())
        for array in (self.sequences.offsets, self.sequences.item_ids, self.sequences.timestamps):
            digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
        return digest.hexdigest()

    @property
    def has_validation(self) -> bool:
        """False under protocol=paper: fixed epochs, no model selection."""
        return self.protocol != "paper"

    @property
    def num_users(self) -> int:
        return self.sequences.num_users

    @property
    def stats(self) -> dict[str, float | int | str | None]:
        """Counts of the data as trained on. ``*_target_in_history``: the share of evaluation targets
        whose item occurs earlier in the user's history (None for a split with no examples)."""
        lengths = self.sequences.lengths
        return {
            "ratings": int(lengths.sum()),
            "users": self.num_users,
            "items": self.num_items,
            "dropped_users": self.sequences.num_dropped_users,
            "repeats": self.repeats,
            "dropped_repeats": self.sequences.num_dropped_repeats,
            "mean_length": float(lengths.mean()) if lengths.size else 0.0,
            "max_length": int(lengths.max()) if lengths.size else 0,
            **{f"{split}_examples": len(examples) for split, examples in self._examples.items()},
            **{f"{split}_target_in_history": share for split, share in self._repeated_targets.items()},
        }

    @property
    def packing_layout(self) -> PackingLayout:
        """How training batches are packed for CUDA-graph steps (``hstu.data.packing``)."""
        return PackingLayout(self.batch_size, self.max_seq_len, self.bucket_tokens)

    def device_sequences(self, device: torch.device) -> DeviceSequences:
        """Every user's events on ``device``, copied once (planned batches are gathered from them there).
        Under DDP each rank holds all of them: its planned batches come from its share of the epoch's
        permutation (:class:`EpochShuffle`), which takes examples of any user."""
        if self._device_sequences is None or self._device_sequences.item_ids.device != device:
            self._device_sequences = DeviceSequences.from_sequences(self.sequences, device)
        return self._device_sequences

    def _rank_and_world_size(self) -> tuple[int, int]:
        """This process's rank and the number of processes (0 and 1 outside a trainer)."""
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _loader(self, split: str, batch_size: int, collate, sampler: Sampler | None = None,
                shard: bool = True, loader: type[DataLoader] = DataLoader, **options) -> DataLoader:
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        size = len(self._examples[split])
        # Training shards through its sampler; evaluation through the rank's contiguous slice of examples.
        sharded = shard and sampler is None
        start, stop = shard_bounds(size, *self._rank_and_world_size()) if sharded else (0, size)
        return loader(
            _ExampleIndices(start, stop),
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=on_gpu,  # page-locked batches: transfer_batch_to_device copies them without waiting
            **options,
        )

    def _collate(self, split: str, with_seen: bool) -> _CollateExamples:
        return _CollateExamples(self.sequences, self._examples[split], self.max_seq_len, with_seen)

    def train_dataloader(self) -> DataLoader:
        sampler = EpochShuffle(len(self._examples["train"]), self.seed, *self._rank_and_world_size())
        if self.planned_batches:
            collate = PlanCollate(self._examples["train"], self.packing_layout)
        else:
            collate = self._collate("train", with_seen=False)
        return self._loader("train", self.batch_size, collate, sampler=sampler, loader=ResumableTrainLoader,
                            batches_done=lambda: batches_done_within_epoch(self.trainer))

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_validation:
            return []  # Lightning skips validation when given no loaders
        return self.evaluation_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.evaluation_dataloader("test")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Batches arrive page-locked from the loaders (on GPU runs): copy them without waiting. Lightning
        passes ``non_blocking`` to plain tensors only."""
        if isinstance(batch, (JaggedBatch, PlannedBatch)):
            return batch.to(device, non_blocking=True)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def evaluation_dataloader(self, split: str, shard: bool = True) -> DataLoader:
        """The ``split`` ("val" or "test") loader: this rank's slice, or with ``shard=False`` every example
        (host-side evaluations such as the baselines, counted whole by one process)."""
        return self._loader(split, self.eval_batch_size, self._collate(split, with_seen=True), shard=shard)
