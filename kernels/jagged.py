"""Index helpers for jagged sequences (values [L, ...] + ``seq_offsets`` [B+1]), shared by every
operator and by the models.

Every token finds its sequence with one ``searchsorted`` over the offsets: no Python loop over
sequences, no host read of offsets (so CUDA graphs and ``torch.export`` can take them), empty
sequences need no special case, and shapes never depend on data.
"""
from __future__ import annotations

import torch


def sequence_index(seq_offsets: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """[L] int64: the sequence each token belongs to (sequence b holds offsets[b] <= t < offsets[b+1]).

    The search runs over all B+1 offsets (offsets[0] = 0 counts once for every token, hence the
    - 1), never over the view ``offsets[1:]``: Inductor's Triton ``searchsorted`` in torch 2.11
    reads a sliced boundary tensor from its buffer's start (pytorch/pytorch#160964, fixed upstream
    by #184043), which puts every token one sequence too far on the GPU.

    The clamp to [0, B-1] changes no valid result (offsets[0] = 0 <= t < offsets[B] = L). It gives
    Inductor's value-range analysis the bound that ``offsets[sequence + 1]`` needs: without it, the
    index ranges over [0, B+1] and a compiled CUDA kernel trips its device-side bounds assert
    (pytorch/pytorch#186536).
    """
    offsets = seq_offsets.to(torch.int64)
    token = torch.arange(num_tokens, dtype=torch.int64, device=offsets.device)
    return (torch.searchsorted(offsets, token, right=True) - 1).clamp(0, offsets.shape[0] - 2)


def token_positions(seq_offsets: torch.Tensor, num_tokens: int, from_end: bool = False):
    """(position in its sequence [L], index of its sequence's last token [L]) of every token, int64.

    Position 0 is the oldest token, or the most recent one when ``from_end``.
    """
    offsets = seq_offsets.to(torch.int64)
    sequence = sequence_index(offsets, num_tokens)
    token = torch.arange(num_tokens, dtype=torch.int64, device=offsets.device)
    last = offsets[sequence + 1] - 1
    position = last - token if from_end else token - offsets[sequence]
    return position, last


def last_index(seq_offsets: torch.Tensor) -> torch.Tensor:
    """[B] index of each sequence's last token. An empty sequence gets the token before its start (an earlier
    sequence's, or 0 when none precedes it, also where there are no tokens at all): callers mask those rows."""
    return (seq_offsets[1:] - 1).clamp(min=0)


def next_in_sequence(values: torch.Tensor, seq_offsets: torch.Tensor, last_values: torch.Tensor) -> torch.Tensor:
    """``values`` shifted one step left inside each sequence, each sequence's last slot taking
    ``last_values[b]``: the next-item targets, and the query timestamps of the HSTU time bias."""
    num_tokens = values.shape[0]
    sequence = sequence_index(seq_offsets, num_tokens)
    token = torch.arange(num_tokens, dtype=torch.int64, device=values.device)
    is_last = token == seq_offsets[1:].to(torch.int64)[sequence] - 1
    return torch.where(is_last, last_values[sequence], torch.roll(values, -1))


def padded_rows(seq_offsets: torch.Tensor, num_tokens: int, max_seq_len: int) -> torch.Tensor:
    """[L] row of each token in the flattened padded layout [B * max_seq_len]: b * max_seq_len + position."""
    position, _ = token_positions(seq_offsets, num_tokens)
    return sequence_index(seq_offsets, num_tokens) * max_seq_len + position


def to_padded(values: torch.Tensor, rows: torch.Tensor, batch: int, max_seq_len: int) -> torch.Tensor:
    """[L, ...] jagged -> [B, max_seq_len, ...] zero-padded, at ``rows`` from :func:`padded_rows`
    (differentiable; the backward is a gather)."""
    padded = values.new_zeros((batch * max_seq_len,) + tuple(values.shape[1:]))
    padded = padded.index_copy(0, rows, values)
    return padded.view((batch, max_seq_len) + tuple(values.shape[1:]))


def from_padded(padded: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, max_seq_len, ...] -> [L, ...]: the rows of :func:`padded_rows` (the inverse of :func:`to_padded`)."""
    return padded.reshape((-1,) + tuple(padded.shape[2:])).index_select(0, rows)


def check_offsets(seq_offsets: torch.Tensor, num_tokens: int, max_seq_len: int | None, name: str) -> None:
    """The offsets' values (one host read): start 0, end ``num_tokens``, non-decreasing, each length
    at most ``max_seq_len``. Skipped inside a torch.compile trace."""
    if torch.compiler.is_compiling():
        return
    lengths = seq_offsets[1:] - seq_offsets[:-1]  # may wrap where offsets decrease: order is compared directly
    if lengths.numel():
        decreasing = (seq_offsets[1:] < seq_offsets[:-1]).any().to(seq_offsets.dtype)
        first, last, decreases, longest = torch.stack(
            [seq_offsets[0], seq_offsets[-1], decreasing, lengths.max()]).tolist()
    else:
        first = last = int(seq_offsets[0])
        decreases, longest = 0, 0
    if first != 0 or last != num_tokens:
        raise ValueError(f"{name}: seq_offsets must start at 0 and end at L={num_tokens}; got {first} and {last}")
    if decreases:
        raise ValueError(f"{name}: seq_offsets must be non-decreasing")
    if max_seq_len is not None and longest > max_seq_len:
        raise ValueError(f"{name}: a sequence of length {longest} exceeds max_seq_len={max_seq_len}")
