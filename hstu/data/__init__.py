"""Data: raw sources -> cached arrays -> time-ordered user sequences -> jagged batches."""
from .batch import JaggedBatch
from .datamodule import EpochShuffle, SequenceDataModule
from .sequences import (
    PROTOCOL_MIN_EVENTS,
    REPEAT_POLICIES,
    Examples,
    UserSequences,
    build_sequences,
    make_batch,
    seen_before,
    split_examples,
)
from .sources import (
    AmazonBooks,
    InteractionSource,
    Interactions,
    MovieLens1M,
    MovieLens20M,
    RawInteractions,
    cache_interactions,
    load_interactions,
    read_table,
)
from .synthetic import Synthetic

__all__ = [
    "AmazonBooks",
    "EpochShuffle",
    "Examples",
    "InteractionSource",
    "Interactions",
    "JaggedBatch",
    "MovieLens1M",
    "MovieLens20M",
    "PROTOCOL_MIN_EVENTS",
    "REPEAT_POLICIES",
    "RawInteractions",
    "SequenceDataModule",
    "Synthetic",
    "UserSequences",
    "build_sequences",
    "cache_interactions",
    "load_interactions",
    "make_batch",
    "read_table",
    "seen_before",
    "split_examples",
]
