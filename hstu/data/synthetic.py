"""Synthetic interactions with a planted sequential pattern, for tests that a model learns order.

Items 0..num_items-1 are split into ``num_clusters`` contiguous clusters, visited in a ring.
Each user starts in a random cluster; at every step, with probability ``stickiness`` the next
event comes from the NEXT cluster of the ring, otherwise from a uniformly random cluster. Inside
a cluster the item follows a Zipf law (weight 1/rank), so popularity alone is informative but far
weaker than knowing the current cluster: a sequential model should beat a popularity ranking by a
wide margin. Timestamps start at a random moment and grow by random gaps of 1 minute to 1 day.
Everything is drawn from ``numpy.random.default_rng(seed)``: the same arguments give the same data.
"""
from __future__ import annotations

import numpy as np

from hstu.errors import ConfigError

from .sources import RawInteractions, identity_digest, source_value

START_TIME = 1_600_000_000  # 2020-09-13, Unix seconds
MIN_GAP_S, MAX_GAP_S = 60, 86_400


class Synthetic:
    """A Markov chain over item clusters; see the module docstring."""

    name = "synthetic"

    def __init__(
        self,
        num_users: int = 1000,
        num_items: int = 300,
        num_clusters: int = 15,
        min_len: int = 20,
        max_len: int = 60,
        stickiness: float = 0.9,
        seed: int = 0,
    ):
        for key, value in (("num_users", num_users), ("num_items", num_items), ("num_clusters", num_clusters),
                           ("min_len", min_len), ("max_len", max_len), ("seed", seed)):
            source_value(key, value, int)
        if isinstance(stickiness, bool) or not isinstance(stickiness, (int, float)):
            raise ConfigError(f"data.source.stickiness={stickiness!r}: must be a number in [0, 1]")
        if not 1 <= num_clusters <= num_items:
            raise ConfigError(f"data.source: need 1 <= num_clusters <= num_items, got {num_clusters} and {num_items}")
        if not 1 <= min_len <= max_len:
            raise ConfigError(f"data.source: need 1 <= min_len <= max_len, got {min_len} and {max_len}")
        if not 0.0 <= stickiness <= 1.0:
            raise ConfigError(f"data.source.stickiness must lie in [0, 1], got {stickiness}")
        if num_users < 1:
            raise ConfigError(f"data.source.num_users must be >= 1, got {num_users}")
        self.num_users = int(num_users)
        self.num_items = int(num_items)
        self.num_clusters = int(num_clusters)
        self.min_len = int(min_len)
        self.max_len = int(max_len)
        self.stickiness = float(stickiness)
        self.seed = int(seed)

    def cache_key(self) -> str:
        return f"{self.name}-{identity_digest(vars(self))}"

    def cluster_of(self, items: np.ndarray) -> np.ndarray:
        """The cluster of each original item id."""
        return np.asarray(items) * self.num_clusters // self.num_items

    def read(self) -> RawInteractions:
        rng = np.random.default_rng(self.seed)
        lengths = rng.integers(self.min_len, self.max_len + 1, size=self.num_users)
        steps = np.arange(self.max_len)
        alive = steps[None, :] < lengths[:, None]  # [U, max_len]

        clusters = np.empty((self.num_users, self.max_len), dtype=np.int64)
        clusters[:, 0] = rng.integers(0, self.num_clusters, size=self.num_users)
        follows = rng.random((self.num_users, self.max_len)) < self.stickiness
        jumps = rng.integers(0, self.num_clusters, size=(self.num_users, self.max_len))
        for t in range(1, self.max_len):
            clusters[:, t] = np.where(follows[:, t], (clusters[:, t - 1] + 1) % self.num_clusters, jumps[:, t])

        # Cluster c holds items [first[c], first[c+1]); the item of rank r in it has weight 1/(r+1).
        first = (np.arange(self.num_clusters + 1) * self.num_items + self.num_clusters - 1) // self.num_clusters
        sizes = np.diff(first)
        uniform = rng.random((self.num_users, self.max_len))
        ranks = np.empty_like(clusters)
        for c in range(self.num_clusters):
            cdf = np.cumsum(1.0 / np.arange(1, sizes[c] + 1))
            in_c = clusters == c
            ranks[in_c] = np.searchsorted(cdf / cdf[-1], uniform[in_c], side="right")
        items = first[clusters] + np.minimum(ranks, sizes[clusters] - 1)

        gaps = rng.integers(MIN_GAP_S, MAX_GAP_S + 1, size=(self.num_users, self.max_len))
        starts = START_TIME + rng.integers(0, 365 * 86_400, size=self.num_users)
        timestamps = starts[:, None] + np.cumsum(gaps, axis=1)

        users = np.broadcast_to(np.arange(self.num_users)[:, None], alive.shape)
        return RawInteractions(
            user=users[alive].astype(np.int64),
            item=items[alive].astype(np.int64),
            timestamp=timestamps[alive].astype(np.int64),
        )
