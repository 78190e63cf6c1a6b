"""Dropout shared by every operator: torch's own, or a seeded mask that a kernel can regenerate.

With a seed, the mask of a tensor is a pure function of (seed, row, column) of the tensor viewed as
[rows, width]: width = its last dimension, rows = the product of the others (a 0-d tensor is one
row of width 1). Element (r, c):

- belongs to group g = r * ceil(width / 8) + c // 8 (groups of eight columns, never straddling rows;
  the last group of a row whose width is not a multiple of 8 leaves its surplus draws unused);
- draws 16 bits from one Philox-4x32-10 evaluation (Salmon et al., "Parallel random numbers: as easy
  as 1, 2, 3", SC 2011) with key (seed mod 2**32, (seed >> 32) mod 2**32) and counter
  (g mod 2**32, g >> 32, 0, 0), whose four 32-bit words are those of ``triton.language.randint4x(seed, g)``
  in order: with j = c mod 8, the low half (bits 0-15) of word j // 2 for even j, the high half for odd j;
- has the uniform draw / 2**16 in [0, 1), exact in float32, and is kept iff that uniform >= p (p as
  float32), i.e. iff draw >= ceil(p * 2**16) (``keep_threshold``); kept elements are scaled by 1 / (1 - p).

One Philox evaluation thus serves eight elements of a row, and the kernels compare 16-bit integers
(BENCHMARKS.md, `fused_attention_layernorm`, "Where the gate's time goes"). The keep probability,
1 - ceil(p * 2**16) / 2**16, is within 2**-16 of 1 - p. A Triton kernel holding a row tile whose
column start is a multiple of 8 regenerates the very same mask inside its forward and backward without
storing it (``hstu_kernels.triton.common.dropout_keep``), and the mask is identical on every device.

A seed is a Python int in [0, 2**63) or an int64 device tensor, whose bits are read as an unsigned
64-bit key (a negative one is taken mod 2**64, as Triton's generator takes it). Training passes device
tensors drawn from torch's own generator (:func:`draw_seed`): a captured CUDA graph then draws a new seed,
hence a new mask, on every replay, where a Python int would be frozen into the graph (and would recompile
a ``torch.compile`` graph whenever it changed).
"""
from __future__ import annotations

import math
import struct

import torch
import torch.nn.functional as F

from hstu_kernels.arguments import check_probability

# Philox-4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
# the generator behind triton.language.randint4x.
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10
_UINT32_MASK = 0xFFFFFFFF
# Bits of a draw: eight draws an evaluation, two a word.
DRAW_BITS = 16
_DRAW_MASK = (1 << DRAW_BITS) - 1
# Seeds drawn by draw_seed lie in [0, SEED_BOUND).
SEED_BOUND = 2**62

def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh int64 seed on ``device`` from torch's generator there (CUDA-graph safe, no host read)."""
    return torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=device)


def seed_tensor(seed: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``seed`` as an int64 0-d tensor on ``device`` (a tensor seed is only moved, never read). An int
    becomes a fill on the device, as do the constants below: ``torch.tensor(value, device="cuda")``
    copies from the host and waits for the stream, on every call (and fails inside a CUDA-graph capture)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"a dropout seed tensor must be one int64 value; got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(()).to(device)
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be in [0, 2**63), got {seed}")
    return torch.full((), seed, dtype=torch.int64, device=device)


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``constant * x`` (both uint32, held in int64) without int64 overflow."""
    partial_lo = x * (constant & 0xFFFF)  # < 2**48
    partial_hi = x * (constant >> 16)  # < 2**48
    middle = partial_hi + (partial_lo >> 16)  # the product shifted right by 16 bits
    hi = middle >> 16
    lo = ((middle & 0xFFFF) << 16) | (partial_lo & 0xFFFF)
    return hi, lo


def philox_uniform(seed: int | torch.Tensor, rows: int, width: int, device: torch.device | str | None = None,
                   first_row: int = 0) -> torch.Tensor:
    """float32 [rows, width] uniforms of rows first_row .. first_row + rows - 1 of a [*, width] tensor
    under ``seed``, as the module docstring defines them (bit for bit what the kernels draw).

    Computed with int64 tensor ops, one Philox evaluation per group of eight columns, so any device
    works. ``first_row`` places the block anywhere in a tall tensor without materialising the rows above.
    """
    if rows < 0 or width < 0 or first_row < 0:
        raise ValueError(f"philox_uniform: rows, width and first_row must be >= 0, got {rows}, {width}, {first_row}")
    device = torch.device("cpu" if device is None else device)
    return _philox_uniform_op(seed_tensor(seed, device), first_row, rows, width, device)


def keep_threshold(p: float) -> int:
    """The smallest 16-bit draw kept at dropout probability ``p``: ceil(float32(p) * 2**16) (exact in
    float64), so that draw >= it iff draw / 2**16 >= p as float32. The kernels compare draws to it."""
    return math.ceil(struct.unpack("f", struct.pack("f", p))[0] * (1 << DRAW_BITS))


def kernel_dropout_args(p: float) -> tuple[int, float]:
    """What a kernel regenerating the mask takes: (``keep_threshold(p)``, the kept elements' scale
    1 / (1 - p), 0 at p = 1 where nothing is kept)."""
    return keep_threshold(p), 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def _philox_4x32(seed: torch.Tensor, counter: torch.Tensor) -> list[torch.Tensor]:
    """The four output words (uint32 held in int64) of Philox-4x32-10 at counters (counter mod 2**32,
    counter >> 32, 0, 0) under key (seed mod 2**32, (seed >> 32) mod 2**32): seed's bits as a uint64."""
    c0, c1 = counter & _UINT32_MASK, counter >> 32
    c2 = torch.zeros_like(counter)
    c3 = torch.zeros_like(counter)
    k0, k1 = seed & _UINT32_MASK, (seed >> 32) & _UINT32_MASK  # >> keeps a negative seed's sign bits
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _UINT32_MASK
        k1 = (k1 + _PHILOX_KEY_B) & _UINT32_MASK
    return [c0, c1, c2, c3]


# An opaque custom op so that torch.compile calls it as one unit: Inductor would inline the ten
# rounds into one expression whose tracing cost doubles every round (minutes to compile).
@torch.library.custom_op("hstu_kernels::philox_uniform", mutates_args=())
def _philox_uniform_op(seed: torch.Tensor, first_row: int, rows: int, width: int, device: torch.device) -> torch.Tensor:
    groups = -(-width // 8)
    row = torch.arange(first_row, first_row + rows, dtype=torch.int64, device=device)
    counter = row[:, None] * groups + torch.arange(groups, dtype=torch.int64, device=device)
    words = _philox_4x32(seed.to(device), counter)
    halves = [half for word in words for half in (word & _DRAW_MASK, word >> DRAW_BITS)]  # low, then high
    draws = torch.stack(halves, dim=-1).reshape(rows, 8 * groups)[:, :width]
    scale = torch.full((), 2.0 ** -DRAW_BITS, dtype=torch.float32, device=device)
    return (draws.to(torch.float32) * scale).contiguous()


@_philox_uniform_op.register_fake
def _(seed: torch.Tensor, first_row: int, rows: int, width: int, device: torch.device) -> torch.Tensor:
    return torch.empty((rows, width), dtype=torch.float32, device=device)


def seeded_dropout_mask(shape, p: float, seed: int | torch.Tensor, device=None) -> torch.Tensor:
    """bool mask of ``shape``: kept iff the element's uniform (module docstring; width = shape[-1]) >= p."""
    shape = tuple(shape)
    width = shape[-1] if shape else 1
    rows = 1
    for size in shape[:-1]:
        rows *= size
    uniform = philox_uniform(seed, rows, width, device)
    return (uniform >= torch.full((), p, dtype=torch.float32, device=uniform.device)).reshape(shape)


def check_dropout_p(p: float, name: str = "dropout") -> None:
    check_probability(name, "dropout_p", p)


def dropout(x: torch.Tensor, p: float, training: bool, seed: int | torch.Tensor | None) -> torch.Tensor:
    """Inverted dropout: ``F.dropout`` (torch's RNG) when seed is None, else the seeded Philox mask."""
    check_dropout_p(p)
    if not training or p == 0.0:
        return x
    if seed is None:
        return F.dropout(x, p, training=True)
    if p == 1.0:
        return x * 0.0  # as F.dropout: zeros that keep the graph (zero gradients, not none)
    keep = seeded_dropout_mask(x.shape, p, seed, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
