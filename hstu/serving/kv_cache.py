"""Per-user cache of what the HSTU blocks computed for a history: in memory, bounded in bytes, LRU.

An entry holds, for every block, the keys and values of positions 0..n-2 of the window the model
saw (``kv`` [num_blocks, n-1, H*(dv+dqk)], on the model's device), and a fingerprint of the n
events they were computed from: the first n - 1 events fix those positions' inputs and the n-th
their query time (the time bias of position i uses the time of event i+1). Position n-1 is not
kept: its query time was the request time, which the next request changes.

Entries are keyed by user and stamped with the fingerprint of the export they came from; a
lookup states why it missed. Eviction drops least recently used entries until the bytes held fit.
"""
from __future__ import annotations

import hashlib
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Hashable

import numpy as np
import torch

# Bookkeeping per entry beyond its tensor (the fingerprint, the key, the dict slot): counted so that
# a bound in bytes also bounds the number of tiny entries.
ENTRY_OVERHEAD_BYTES = 256


def events_fingerprint(item_ids: np.ndarray, timestamps: np.ndarray) -> bytes:
    """16-byte digest of events (model item indices and timestamps, in order)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(np.ascontiguousarray(item_ids, dtype=np.int64).tobytes())
    digest.update(np.ascontiguousarray(timestamps, dtype=np.int64).tobytes())
    return digest.digest()


@dataclass
class CacheEntry:
    export: str  # fingerprint of the export (weights, model config, dtype, device)
    num_events: int  # n: the window events the entry was computed from
    history_len: int  # the length of the whole history then (a longer one slides the window)
    prefix: bytes  # events_fingerprint of those n window events
    kv: torch.Tensor  # [num_blocks, n - 1, H * (dv + dqk)]

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + ENTRY_OVERHEAD_BYTES


class KVCache:
    """LRU map user -> :class:`CacheEntry`, holding at most ``capacity_bytes``; thread-safe."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self._entries: OrderedDict[Hashable, CacheEntry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses: Counter[str] = Counter()  # reason -> count
        self.evictions = 0
        self.rejected = 0  # entries larger than the whole capacity

    def lookup(self, user: Hashable, export: str, window_items: np.ndarray, window_times: np.ndarray,
               history_len: int, max_seq_len: int) -> tuple[CacheEntry | None, str]:
        """(the entry whose events are a prefix of this window, "hit") or (None, why it missed)."""
        with self._lock:
            entry = self._entries.get(user)
            reason = self._miss_reason(entry, export, window_items, window_times, history_len, max_seq_len)
            if reason is None:
                self._entries.move_to_end(user)
                self.hits += 1
                return entry, "hit"
            self.misses[reason] += 1
            return None, reason

    @staticmethod
    def _miss_reason(entry, export, window_items, window_times, history_len, max_seq_len) -> str | None:
        if entry is None:
            return "no entry for this user"
        if entry.export != export:
            return "entry from another export"
        if history_len > max_seq_len and history_len != entry.history_len:
            return f"window slid: history beyond max_seq_len={max_seq_len}"
        if entry.num_events > len(window_items):
            return "history shorter than the cached one"
        n = entry.num_events
        if events_fingerprint(window_items[:n], window_times[:n]) != entry.prefix:
            return "cached events changed (an edit, or an event out of time order)"
        return None

    def store(self, user: Hashable, entry: CacheEntry) -> None:
        """Insert or replace ``user``'s entry as the most recent, then evict down to the capacity."""
        with self._lock:
            old = self._entries.pop(user, None)
            if old is not None:
                self._bytes -= old.nbytes
            if entry.nbytes > self.capacity_bytes:
                self.rejected += 1
                return
            self._entries[user] = entry
            self._bytes += entry.nbytes
            while self._bytes > self.capacity_bytes:
                _, evicted = self._entries.popitem(last=False)
                self._bytes -= evicted.nbytes
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            lookups = self.hits + sum(self.misses.values())
            return {
                "enabled": True,
                "entries": len(self._entries),
                "bytes": self._bytes,
                "capacity_bytes": self.capacity_bytes,
                "hits": self.hits,
                "misses": sum(self.misses.values()),
                "miss_reasons": dict(self.misses),
                "hit_rate": self.hits / lookups if lookups else None,
                "evictions": self.evictions,
                "rejected_too_large": self.rejected,
            }
