"""Dropout shared by every operator: torch's own, or a seeded mask that a kernel can regenerate.

With a seed, the mask is a pure function of (seed, element index), defined as Triton's
``tl.rand(seed, offsets) >= p`` with ``offsets`` the row-major element index. A Triton kernel can
therefore regenerate the very same mask inside its forward and backward without storing it, and the
mask is identical on every device.

A seed is a Python int or an int64 device tensor. Training passes device tensors drawn from torch's
own generator (:func:`draw_seed`): a captured CUDA graph then draws a new seed, hence a new mask, on
every replay, where a Python int would be frozen into the graph (and would recompile a
``torch.compile`` graph whenever it changed).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# Philox-4x32-10 constants (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011),
# the generator behind triton.language.rand.
_PHILOX_ROUND_A = 0xD2511F53
_PHILOX_ROUND_B = 0xCD9E8D57
_PHILOX_KEY_A = 0x9E3779B9
_PHILOX_KEY_B = 0xBB67AE85
_PHILOX_ROUNDS = 10
_UINT32_MASK = 0xFFFFFFFF
# triton.language.random.uint_to_uniform_float: the largest scale with (2**31 - 1) * scale < 1 in float32.
_INT31_TO_UNIT_SCALE = 4.6566127342e-10
# Seeds drawn by draw_seed lie in [0, SEED_BOUND).
SEED_BOUND = 2**62

def draw_seed(device: torch.device | str) -> torch.Tensor:
    """A fresh int64 seed on ``device`` from torch's generator there (CUDA-graph safe, no host read)."""
    return torch.randint(0, SEED_BOUND, (), dtype=torch.int64, device=device)


def seed_tensor(seed: int | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``seed`` as an int64 0-d tensor on ``device`` (a tensor seed is only moved, never read)."""
    if isinstance(seed, torch.Tensor):
        if seed.dtype != torch.int64 or seed.numel() != 1:
            raise ValueError(f"a dropout seed tensor must be one int64 value; got {seed.dtype} {tuple(seed.shape)}")
        return seed.reshape(()).to(device)
    if not 0 <= seed < 2**63:
        raise ValueError(f"dropout seed must be in [0, 2**63), got {seed}")
    return torch.tensor(seed, dtype=torch.int64, device=device)


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``constant * x`` (both uint32, held in int64) without int64 overflow."""
    partial_lo = x * (constant & 0xFFFF)  # < 2**48
    partial_hi = x * (constant >> 16)  # < 2**48
    middle = partial_hi + (partial_lo >> 16)  # the product shifted right by 16 bits
    hi = middle >> 16
    lo = ((middle & 0xFFFF) << 16) | (partial_lo & 0xFFFF)
    return hi, lo


def philox_uniform(seed: int | torch.Tensor, numel: int, device: torch.device | str | None = None) -> torch.Tensor:
    """float32 [numel] in [0, 1): element i equals ``triton.language.rand(seed, i)`` bit for bit.

    Counter = (i mod 2**32, i >> 32, 0, 0), key = (seed mod 2**32, seed >> 32), first output word
    folded to 31 bits and scaled as Triton does. Computed with int64 tensor ops, so any device works.
    """
    device = torch.device("cpu" if device is None else device)
    return _philox_uniform_op(seed_tensor(seed, device), numel, device)


# An opaque custom op so that torch.compile calls it as one unit: Inductor would inline the ten
# rounds into one expression whose tracing cost doubles every round (minutes to compile).
@torch.library.custom_op("hstu_kernels::philox_uniform", mutates_args=())
def _philox_uniform_op(seed: torch.Tensor, numel: int, device: torch.device) -> torch.Tensor:
    index = torch.arange(numel, dtype=torch.int64, device=device)
    c0, c1 = index & _UINT32_MASK, index >> 32
    c2 = torch.zeros_like(index)
    c3 = torch.zeros_like(index)
    seed = seed.to(device)
    k0, k1 = seed & _UINT32_MASK, seed >> 32
    for _ in range(_PHILOX_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _PHILOX_KEY_A) & _UINT32_MASK
        k1 = (k1 + _PHILOX_KEY_B) & _UINT32_MASK
    # Reinterpret as int32 and fold negatives with bitwise not: a value in [0, 2**31 - 1].
    folded = torch.where(c0 >= 2**31, _UINT32_MASK - c0, c0)
    return folded.to(torch.float32) * torch.tensor(_INT31_TO_UNIT_SCALE, dtype=torch.float32, device=device)


@_philox_uniform_op.register_fake
def _(seed: torch.Tensor, numel: int, device: torch.device) -> torch.Tensor:
    return torch.empty(numel, dtype=torch.float32, device=device)


def seeded_dropout_mask(shape, p: float, seed: int | torch.Tensor, device=None) -> torch.Tensor:
    """bool mask of ``shape``: element at row-major index i is kept iff philox_uniform(seed)[i] >= p (float32)."""
    numel = 1
    for size in shape:
        numel *= size
    uniform = philox_uniform(seed, numel, device)
    return (uniform >= torch.tensor(p, dtype=torch.float32, device=uniform.device)).reshape(shape)


def check_dropout_p(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {p}")


def dropout(x: torch.Tensor, p: float, training: bool, seed: int | torch.Tensor | None) -> torch.Tensor:
    """Inverted dropout: ``F.dropout`` (torch's RNG) when seed is None, else the seeded Philox mask."""
    check_dropout_p(p)
    if not training or p == 0.0:
        return x
    if seed is None:
        return F.dropout(x, p, training=True)
    if p == 1.0:
        return torch.zeros_like(x)
    keep = seeded_dropout_mask(x.shape, p, seed, x.device)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))
