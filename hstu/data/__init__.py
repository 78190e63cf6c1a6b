"""Data: raw sources -> cached arrays -> time-ordered user sequences -> jagged batches."""
from .batch import JaggedBatch
from .datamodule import SequenceDataModule
from .sequences import (
    PROTOCOL_MIN_EVENTS,
    Examples,
    UserSequences,
    build_sequences,
    make_batch,
    split_examples,
)
from .sources import (
    AmazonBooks,
    InteractionSource,
    Interactions,
    MovieLens1M,
    MovieLens20M,
    RawInteractions,
    load_interactions,
    read_table,
)
from .synthetic import Synthetic

__all__ = [
    "AmazonBooks",
    "Examples",
    "InteractionSource",
    "Interactions",
    "JaggedBatch",
    "MovieLens1M",
    "MovieLens20M",
    "PROTOCOL_MIN_EVENTS",
    "RawInteractions",
    "SequenceDataModule",
    "Synthetic",
    "UserSequences",
    "build_sequences",
    "load_interactions",
    "make_batch",
    "read_table",
    "split_examples",
]
