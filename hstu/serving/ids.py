"""Original item ids -> the model's item indices, for whole arrays at once.

Integer ids map through a dense table indexed by ``id - smallest id`` when the ids span a range of
at most ``DENSE_SPAN_LIMIT`` (ML-1M's and ML-20M's do: one gather per event), else through a hash
index (``pandas.Index.get_indexer``). String ids map through a dict, called from C with ``map``.
For int ids, integer values (Python, numpy or bool, as ``operator.index`` takes them) and integral
floats (5.0 is the id 5, as in a Python dict) match; anything else is unknown. For str ids a value
matches as its ``str``.
"""
from __future__ import annotations

import array
import itertools
import operator
from typing import Hashable, Sequence

import numpy as np
import pandas as pd

DENSE_SPAN_LIMIT = 1 << 24  # table entries (int64: 128 MiB at most) for a dense int lookup


class ItemIdIndex:
    """The model index (1..num_items) of every original id; index 0 means unknown."""

    def __init__(self, original_ids: Sequence[Hashable]):
        ids = np.asarray(list(original_ids))
        self.str_ids = ids.dtype.kind in "US"
        self.size = int(ids.shape[0])
        if ids.size and not self.str_ids and ids.dtype.kind not in "iu":
            raise TypeError(f"original item ids must be all int or all str; got dtype {ids.dtype}")
        indices = np.arange(1, self.size + 1, dtype=np.int64)
        self._dense = self._hashed = self._index_of = None
        if self.str_ids:
            self._index_of = dict(zip(ids.tolist(), indices.tolist()))
        elif self.size:
            ids = ids.astype(np.int64)
            self._lowest = int(ids.min())
            span = int(ids.max()) - self._lowest + 1
            if span <= max(DENSE_SPAN_LIMIT, 4 * self.size):
                self._dense = np.zeros(span, dtype=np.int64)
                self._dense[ids - self._lowest] = indices
            else:
                self._hashed = pd.Index(ids)

    def __len__(self) -> int:
        return self.size

    def lookup(self, items: Sequence[Hashable] | np.ndarray) -> np.ndarray:
        """int64 [len(items)]: the model index of each original id, 0 where the model never saw it."""
        if len(items) == 0 or self.size == 0:
            return np.zeros(len(items), dtype=np.int64)
        if self.str_ids:
            return self._lookup_str(items)
        query, comparable = self._as_int_query(items)
        if self._dense is not None:
            offset = query - self._lowest
            if offset.min() >= 0 and offset.max() < self._dense.shape[0]:  # the usual case: one gather
                found = self._dense[offset]
            else:
                inside = (offset >= 0) & (offset < self._dense.shape[0])
                found = np.where(inside, self._dense[np.where(inside, offset, 0)], 0)
        else:
            found = self._hashed.get_indexer(query).astype(np.int64) + 1  # -1 (missing) -> 0
        return found if comparable is None else np.where(comparable, found, 0)

    def _lookup_str(self, items) -> np.ndarray:
        found = np.fromiter(map(self._index_of.get, items, itertools.repeat(0)), dtype=np.int64, count=len(items))
        for i in np.flatnonzero(found == 0):  # values given as other types compare as their str
            if not isinstance(items[i], str):
                found[i] = self._index_of.get(str(items[i]), 0)
        return found

    @staticmethod
    def _as_int_query(items) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids as int64, which of them are ids at all; None: all)."""
        exact = int64_values(items) if isinstance(items, list) else None
        if exact is not None:
            return exact, None
        query = items if isinstance(items, np.ndarray) else np.asarray(items)
        if query.ndim == 1 and (query.dtype.kind == "i" or (query.dtype.kind == "u" and query.dtype.itemsize < 8)):
            return query.astype(np.int64, copy=False), None
        values = np.zeros(len(items), dtype=np.int64)
        comparable = np.zeros(len(items), dtype=bool)
        for i, item in enumerate(items):  # mixed or non-integer values: the slow path
            try:
                value = operator.index(item)
            except TypeError:
                if not (isinstance(item, (float, np.floating)) and float(item).is_integer()):
                    continue
                value = int(item)
            if -(2**63) <= value < 2**63:
                values[i], comparable[i] = value, True
        return values, comparable


def int64_values(values: list) -> np.ndarray | None:
    """A list of integers (Python ints, numpy integers: what ``operator.index`` takes) as int64 in one C
    pass, or None where a value is not such an integer or does not fit int64 (the caller's slower,
    type-aware path decides). ``np.asarray`` of the same list costs about 1.5x: it first infers a
    dtype over every value."""
    try:
        return np.frombuffer(array.array("q", values), dtype=np.int64)
    except (TypeError, OverflowError):
        return None
