"""A serving step on fixed shapes: a batch of requests padded to bucketed capacities, so that one CUDA
graph per bucket can replay it (``hstu.serving.graphs`` captures them; everything here runs on any
device, and the CPU tests compare it with the engine's eager step).

A graph replays fixed shapes, while requests differ in users, window lengths, cached positions,
history lengths and k. A step is laid out in the capacities of a :class:`StaticShape`:

- users: a power of two; padded users are empty sequences (repeated offsets) whose results are not read;
- computed tokens: rounded up to three significant bits (at most 25% padding), at most users x the
  longest sequence. The padding tokens form dummy sequences after the padded users, each at most as
  long as a sequence may be (max_seq_len for whole windows, the query-row bound for incremental
  steps), as ``hstu.data.packing`` lays out training batches: every token belongs to a sequence, so
  no index (a token's sequence, its position, its padded row) points past the offsets;
- cached tokens (incremental steps): rounded the same way; the padding forms dummy sequences of cached
  positions without new tokens;
- query rows per sequence of an incremental step (``max_new_len`` of ``hstu_attention_delta``): a
  power of two at least the most new tokens of one user, at most max_seq_len. The delta attention is
  exact for any bound at least the true one (the Triton kernel's query blocks past a sequence's new
  tokens return at once; the reference computes the padded rows and drops them);
- exclusions (every history event, masked in the top-k): a power of two, at least ``MIN_EXCLUSIONS``
  so that one bucket serves single users of any usual history length (the padding costs the top-k
  one pass over the padded entries and their sort). The padding belongs to one extra top-k query
  after the padded users, whose results are not read: the Triton top-k sorts the keys of every
  exclusion, so none may lie past the last offset;
- k: a power of two from 16 on, at most the catalogue and the Triton kernel's largest k; the lists are cut.

Padding tokens carry item 0, position 0 and time 0. Nothing reads their outputs: each user's query is
the state of its last token, taken by index (padded users and the extra query take token 0's), and
the cache keeps the keys and values of real tokens only. No step reads a device value on the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

import hstu_kernels
from hstu_kernels.normalize import l2_normalize
from hstu.serving.incremental import DeltaBatch, IncrementalEncoder

SIGNIFICANT_BITS = 3  # token capacities: n rounded up to this many significant bits
MIN_K = 16
MIN_EXCLUSIONS = 4096
TOPK_KERNEL_MAX_K = 2048  # hstu_kernels.triton.topk.MAX_TOPK: a larger k runs the reference inside the kernel's op

# The int64 inputs of a step, in the order they are packed into one buffer (one host-to-device copy).
FIELDS = ("item_ids", "timestamps", "positions", "query_times", "seq_offsets", "cached_offsets", "cached_times",
          "last", "exclude_ids", "exclude_offsets")


def round_up(n: int) -> int:
    """The smallest token capacity >= n: n itself up to 2**SIGNIFICANT_BITS, then n rounded up to
    SIGNIFICANT_BITS significant bits (8, 10, 12, 14, 16, 20, ...)."""
    if n <= 1 << SIGNIFICANT_BITS:
        return max(n, 1)
    shift = n.bit_length() - SIGNIFICANT_BITS
    return -(-n >> shift) << shift


def round_down(n: int) -> int:
    """The largest token capacity <= n (0 for n <= 0)."""
    if n <= 1 << SIGNIFICANT_BITS:
        return max(n, 0)
    shift = n.bit_length() - SIGNIFICANT_BITS
    return (n >> shift) << shift


def power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def capacity(n: int, cap: int) -> int:
    """The capacity that holds n tokens: ``round_up(n)``, at most ``cap`` (n <= cap)."""
    return min(round_up(n), cap)


def dummy_sequences(tokens: int, longest: int) -> int:
    """Dummy sequences of at most ``longest`` tokens that hold the padding of any count that
    ``capacity`` puts in ``tokens``: such a count exceeds the capacity below it."""
    padding = tokens - 1 - round_down(tokens - 1)
    return -(-padding // longest)


@dataclass(frozen=True)
class StaticShape:
    """The capacities of one static step (one graph): see the module docstring."""

    form: str  # "whole": every token computed; "delta": new tokens against cached ones
    users: int
    tokens: int  # computed tokens
    query_rows: int  # the most computed tokens of one sequence (max_seq_len for "whole")
    cached: int  # cached tokens (0 for "whole")
    exclusions: int
    k: int
    max_seq_len: int
    token_dummies: int  # dummy sequences of at most query_rows padding tokens
    cached_dummies: int  # dummy sequences of at most max_seq_len padding cached tokens

    @classmethod
    @functools.lru_cache(maxsize=4096)
    def of(cls, form: str, num_users: int, num_tokens: int, max_new_len: int, num_cached: int,
           num_exclusions: int, k: int, max_seq_len: int, num_items: int) -> "StaticShape":
        """The bucket of a step with these counts."""
        users = power_of_two(num_users)
        rows = max_seq_len if form == "whole" else min(power_of_two(max_new_len), max_seq_len)
        tokens = capacity(num_tokens, users * rows)
        cached = capacity(num_cached, users * max_seq_len) if form == "delta" else 0
        k_cap = min(num_items, max(k, TOPK_KERNEL_MAX_K))
        return cls(form, users, tokens, rows, cached, max(power_of_two(num_exclusions), MIN_EXCLUSIONS),
                   min(max(power_of_two(k), MIN_K), k_cap), max_seq_len, dummy_sequences(tokens, rows),
                   dummy_sequences(cached, max_seq_len) if cached else 0)

    @cached_property
    def sequences(self) -> int:
        return self.users + self.token_dummies + self.cached_dummies

    @cached_property
    def sizes(self) -> tuple[int, ...]:
        """Sizes of ``FIELDS`` in the packed int64 buffer."""
        t, s, c, u = self.tokens, self.sequences + 1, self.cached, self.users
        return t, t, t, t, s, s, c, u + 1, self.exclusions, u + 2

    @cached_property
    def size(self) -> int:
        return sum(self.sizes)

    @cached_property
    def _slices(self) -> tuple[tuple[str, slice], ...]:
        bounds = np.concatenate([[0], np.cumsum(self.sizes)]).tolist()
        return tuple((name, slice(begin, end)) for name, begin, end in zip(FIELDS, bounds, bounds[1:]))

    def split(self, packed):
        """Views of a packed buffer (numpy array or tensor) by field name."""
        return {name: packed[where] for name, where in self._slices}

    def describe(self) -> str:
        cached = f" cached={self.cached} rows={self.query_rows}" if self.form == "delta" else ""
        return f"{self.form} users={self.users} tokens={self.tokens}{cached} exclusions={self.exclusions} k={self.k}"


@dataclass
class HostStep:
    """A step's real inputs as host arrays: computed tokens jagged by ``seq_offsets``, cached ones by
    ``cached_offsets`` (all zero for a whole-window step), each user's exclusions by ``exclude_offsets``."""

    item_ids: np.ndarray
    timestamps: np.ndarray
    positions: np.ndarray
    query_times: np.ndarray
    seq_offsets: np.ndarray  # [B+1]
    cached_offsets: np.ndarray  # [B+1]
    cached_times: np.ndarray
    exclude_ids: np.ndarray  # model item index - 1 (rows of the normalised item table)
    exclude_offsets: np.ndarray  # [B+1]

    @property
    def num_users(self) -> int:
        return self.seq_offsets.shape[0] - 1

    def shape(self, form: str, k: int, max_seq_len: int, num_items: int) -> StaticShape:
        lengths = np.diff(self.seq_offsets)
        return StaticShape.of(form, self.num_users, int(self.seq_offsets[-1]), int(lengths.max()),
                              int(self.cached_offsets[-1]), int(self.exclude_offsets[-1]), k, max_seq_len, num_items)


def fill(shape: StaticShape, step: HostStep, packed: np.ndarray) -> None:
    """Write ``step`` padded to ``shape`` into ``packed`` (int64 [shape.size])."""
    views = shape.split(packed)
    n, c, e, u = int(step.seq_offsets[-1]), int(step.cached_offsets[-1]), int(step.exclude_offsets[-1]), step.num_users
    for name in ("item_ids", "timestamps", "positions", "query_times"):
        views[name][:n] = getattr(step, name)
        views[name][n:] = 0
    users, token_end = shape.users, shape.users + shape.token_dummies
    offsets = views["seq_offsets"]
    offsets[:u + 1] = step.seq_offsets
    offsets[u + 1:users + 1] = n
    offsets[users + 1:token_end + 1] = np.minimum(n + shape.query_rows * np.arange(1, shape.token_dummies + 1),
                                                  shape.tokens)
    offsets[token_end + 1:] = shape.tokens
    cached_offsets = views["cached_offsets"]
    cached_offsets[:u + 1] = step.cached_offsets
    cached_offsets[u + 1:token_end + 1] = c
    cached_offsets[token_end + 1:] = np.minimum(c + shape.max_seq_len * np.arange(1, shape.cached_dummies + 1),
                                                shape.cached)
    views["cached_times"][:c] = step.cached_times
    views["cached_times"][c:] = 0
    last = views["last"]
    last[:u] = step.seq_offsets[1:] - 1
    last[u:] = 0
    views["exclude_ids"][:e] = step.exclude_ids
    views["exclude_ids"][e:] = 0
    exclude_offsets = views["exclude_offsets"]
    exclude_offsets[:u + 1] = step.exclude_offsets
    exclude_offsets[u + 1:users + 1] = e
    exclude_offsets[users + 1] = shape.exclusions
    if offsets[-1] != shape.tokens or cached_offsets[-1] != shape.cached or n > shape.tokens or c > shape.cached:
        raise RuntimeError(f"static step: {n} tokens and {c} cached do not fit {shape.describe()}")


def run(encoder: IncrementalEncoder, unit_items: torch.Tensor, shape: StaticShape, inputs: dict[str, torch.Tensor],
        cached_kv: torch.Tensor | None, keep_kv: bool):
    """The step on the device: (scores and ids packed as float64 [users + 1, 2k]: scores in the first k
    columns, item rows in the last k; keys and values of every token [num_blocks, tokens, W] or None).
    ``inputs``: ``shape.split`` of the packed buffer on the device; ``cached_kv`` [num_blocks,
    shape.cached, W] for a "delta" step. Fixed shapes, no host reads: capturable."""
    batch = DeltaBatch(
        item_ids=inputs["item_ids"], timestamps=inputs["timestamps"], positions=inputs["positions"],
        query_timestamps=inputs["query_times"], seq_offsets=inputs["seq_offsets"],
        cached_offsets=inputs["cached_offsets"], cached_timestamps=inputs["cached_times"],
        cached_kv=cached_kv if shape.form == "delta" else None, max_new_len=shape.query_rows,
    )
    states, new_kv = encoder.encode(batch, keep_kv=keep_kv)
    queries = l2_normalize(states.index_select(0, inputs["last"]).float())
    scores, ids, _ = hstu_kernels.topk_items(
        queries, unit_items, shape.k, exclude_ids=inputs["exclude_ids"], exclude_offsets=inputs["exclude_offsets"],
        l2_norm=False, backend=encoder.model.manager, validate=False)
    return torch.cat([scores.double(), ids.double()], dim=1), new_kv
