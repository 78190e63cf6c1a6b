"""Original item ids -> the model's item indices, for whole arrays at once.

The catalogue's original ids are sorted once; a lookup is one ``np.searchsorted`` over a request's
ids, so mapping a batch of histories costs array operations, not a dict access per event. Ids
compare as the export's ``id_type`` says: for ``str`` ids any value is compared as its ``str``; for
``int`` ids integer values (Python, numpy or bool, as ``operator.index`` takes them, and integral
floats: 5.0 is the id 5, as in a Python dict) compare as integers and anything else is unknown.
"""
from __future__ import annotations

import operator
from typing import Hashable, Sequence

import numpy as np


class ItemIdIndex:
    """Sorted original ids with the model index (1..num_items) of each; index 0 means unknown."""

    def __init__(self, original_ids: Sequence[Hashable]):
        ids = np.asarray(list(original_ids))
        self.str_ids = ids.dtype.kind in "US"
        if ids.size and not self.str_ids and ids.dtype.kind not in "iu":
            raise TypeError(f"original item ids must be all int or all str; got dtype {ids.dtype}")
        ids = ids.astype(str) if self.str_ids else ids.astype(np.int64)
        order = np.argsort(ids, kind="stable")
        self._sorted = ids[order]
        self._index = (order + 1).astype(np.int64)

    def __len__(self) -> int:
        return int(self._sorted.shape[0])

    def lookup(self, items: Sequence[Hashable] | np.ndarray) -> np.ndarray:
        """int64 [len(items)]: the model index of each original id, 0 where the model never saw it."""
        query, comparable = self._as_query(items)
        if query.size == 0 or len(self) == 0:
            return np.zeros(query.shape[0], dtype=np.int64)
        position = np.minimum(np.searchsorted(self._sorted, query), len(self) - 1)
        found = self._sorted[position] == query
        if comparable is not None:
            found &= comparable
        return np.where(found, self._index[position], 0)

    def _as_query(self, items) -> tuple[np.ndarray, np.ndarray | None]:
        """(ids in the catalogue's dtype, which of them are valid ids at all; None: all)."""
        if self.str_ids:
            return (np.asarray(items, dtype=str) if len(items) else np.zeros(0, dtype=str)), None
        array = np.asarray(items) if not isinstance(items, np.ndarray) else items
        if array.ndim == 1 and (array.dtype.kind == "i" or (array.dtype.kind == "u" and array.dtype.itemsize < 8)):
            return array.astype(np.int64, copy=False), None
        if array.size == 0:
            return np.zeros(0, dtype=np.int64), None
        values = np.zeros(len(items), dtype=np.int64)
        comparable = np.zeros(len(items), dtype=bool)
        for i, item in enumerate(items):  # mixed or non-integer values: the slow path
            try:
                value = operator.index(item)
            except TypeError:
                if not (isinstance(item, (float, np.floating)) and float(item).is_integer()):
                    continue
                value = int(item)  # 5.0 equals the id 5, as it does in a Python dict
            if -(2**63) <= value < 2**63:
                values[i], comparable[i] = value, True
        return values, comparable
