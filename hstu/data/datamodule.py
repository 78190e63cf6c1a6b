"""The LightningDataModule: source -> cached arrays -> user sequences -> jagged batches.

``prepare_data`` obtains and parses the raw file once (download, checksum, cache); ``setup``
loads the cache and builds sequences and splits (see ``sequences.py`` for the rules). Loaders
yield :class:`JaggedBatch` objects; Lightning moves them to the device through ``JaggedBatch.to``
(its ``move_data_to_device`` calls ``.to`` on any object that has one).
"""
from __future__ import annotations

import logging

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from .batch import JaggedBatch
from .sequences import PROTOCOL_MIN_EVENTS, Examples, UserSequences, build_sequences, make_batch, split_examples
from .sources import InteractionSource, absolute_path, load_interactions

log = logging.getLogger(__name__)


class _ExampleIndices(Dataset):
    """Example numbers 0..E-1; the collate function turns a list of them into one batch."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


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
    ``max_users`` keeps only the first N users by id (smoke tests on a slice). Training batches
    are shuffled by the global torch generator, hence seeded by ``seed_everything``.
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
    ):
        super().__init__()
        if protocol not in PROTOCOL_MIN_EVENTS:
            raise ValueError(f"data.protocol must be one of {sorted(PROTOCOL_MIN_EVENTS)}, got {protocol!r}")
        if max_seq_len < 1:
            raise ValueError(f"data.max_seq_len must be >= 1, got {max_seq_len}")
        self.source = source
        self.data_dir = absolute_path(data_dir)
        self.max_seq_len = int(max_seq_len)
        self.protocol = protocol
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.max_users = None if max_users is None else int(max_users)
        self._sequences: UserSequences | None = None
        self._examples: dict[str, Examples] = {}

    def prepare_data(self) -> None:
        load_interactions(self.source, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        if self._sequences is not None:
            return
        raw = load_interactions(self.source, self.data_dir)
        self._sequences = build_sequences(
            raw, min_events=PROTOCOL_MIN_EVENTS[self.protocol], max_users=self.max_users
        )
        self._examples = split_examples(self._sequences, self.protocol)
        log.info("%s (%s protocol): %s", self.source.name, self.protocol, self.stats)

    @property
    def sequences(self) -> UserSequences:
        if self._sequences is None:
            raise RuntimeError("SequenceDataModule.setup() must run before its data is used")
        return self._sequences

    @property
    def num_items(self) -> int:
        """Real items are 1..num_items; an item table needs num_items + 1 rows (row 0 is padding)."""
        return self.sequences.num_items

    @property
    def has_validation(self) -> bool:
        """False under protocol=paper: fixed epochs, no model selection."""
        return self.protocol != "paper"

    @property
    def num_users(self) -> int:
        return self.sequences.num_users

    @property
    def stats(self) -> dict[str, float | int]:
        lengths = self.sequences.lengths
        return {
            "ratings": int(lengths.sum()),
            "users": self.num_users,
            "items": self.num_items,
            "dropped_users": self.sequences.num_dropped_users,
            "mean_length": float(lengths.mean()) if lengths.size else 0.0,
            "max_length": int(lengths.max()) if lengths.size else 0,
            **{f"{split}_examples": len(examples) for split, examples in self._examples.items()},
        }

    def _loader(self, split: str, batch_size: int, shuffle: bool, with_seen: bool) -> DataLoader:
        sequences, examples = self.sequences, self._examples[split]
        return DataLoader(
            _ExampleIndices(len(examples)),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=_CollateExamples(sequences, examples, self.max_seq_len, with_seen),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True, with_seen=False)

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_validation:
            return []  # Lightning skips validation when given no loaders
        return self._loader("val", self.eval_batch_size, shuffle=False, with_seen=True)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False, with_seen=True)
