"""Log-scale time buckets shared by every backend of the HSTU attention bias.

bucket(x) = #{k in 1..NB-1 : x >= T_k}, T_k = ceil(exp(0.301 * k)), for x = |t_q - t_k| in
seconds (int64). The thresholds are computed once with exact decimal arithmetic, so that
bucket(x) == clamp(floor(ln(max(x, 1)) / 0.301), 0, NB-1) holds at every bucket edge;
float32/float64 ``log`` can be off by one there. 0.301 and NB = 129 follow the public
HSTU code's time-bucketing ("Actions Speak Louder than Words", Zhai et al. 2024).
"""
from __future__ import annotations

import decimal
import functools

import torch

BUCKET_LOG_BASE = decimal.Decimal("0.301")
DEFAULT_NUM_BUCKETS = 129
# Unix seconds in [-TIMESTAMP_BOUND, TIMESTAMP_BOUND) differ by less than 2**63, so every gap the time bias
# and the time embeddings take fits int64 and never wraps (2**62 seconds are about 1.5e11 years).
TIMESTAMP_BOUND = 2**62
OUTSIDE_TIMESTAMP_RANGE = "lies outside [-2**62, 2**62) seconds, where the gaps between times (int64) cannot wrap"


def check_timestamp_range(name: str, **timestamps: torch.Tensor | None) -> None:
    """ValueError naming the first of ``timestamps`` (None and empty ones skipped) that holds a time outside
    [-TIMESTAMP_BOUND, TIMESTAMP_BOUND): its gaps could wrap. One host read for all of them; skipped inside
    a torch.compile trace."""
    given = {argument: values for argument, values in timestamps.items() if values is not None and values.numel()}
    if not given or torch.compiler.is_compiling():
        return
    bounds = torch.stack([bound for values in given.values() for bound in (values.min(), values.max())]).tolist()
    for (argument, _), lowest, highest in zip(given.items(), bounds[0::2], bounds[1::2]):
        if lowest < -TIMESTAMP_BOUND or highest >= TIMESTAMP_BOUND:
            outside = lowest if lowest < -TIMESTAMP_BOUND else highest
            raise ValueError(f"{name}: {argument} holds {outside}, which {OUTSIDE_TIMESTAMP_RANGE}")


def _threshold(k: int) -> int:
    """T_k, exactly."""
    ctx = decimal.Context(prec=60, rounding=decimal.ROUND_CEILING)
    return int(ctx.exp(BUCKET_LOG_BASE * k).to_integral_value(rounding=decimal.ROUND_CEILING))


@functools.lru_cache(maxsize=None)
def max_num_buckets() -> int:
    """The most buckets whose thresholds T_1 .. T_{NB-1} fit int64."""
    k = 1
    while _threshold(k) < 2**63:
        k += 1
    return k


# a constant for the checks that torch.compile traces (dynamo cannot trace ``decimal``)
MAX_NUM_BUCKETS = max_num_buckets()


@functools.lru_cache(maxsize=None)
def _thresholds(num_buckets: int) -> tuple[int, ...]:
    if num_buckets > max_num_buckets():
        raise ValueError(f"num_buckets={num_buckets} overflows int64 thresholds (at most {max_num_buckets()})")
    return tuple(_threshold(k) for k in range(1, num_buckets))


@torch.compiler.assume_constant_result
def threshold_values(num_buckets: int) -> tuple[int, ...]:
    """T_1 .. T_{NB-1} as Python ints; a constant to torch.compile (dynamo cannot trace ``decimal``)."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return _thresholds(num_buckets)


def bucket_thresholds(num_buckets: int = DEFAULT_NUM_BUCKETS, device=None) -> torch.Tensor:
    """int64 tensor [num_buckets - 1]: T_1 .. T_{NB-1} (non-decreasing)."""
    return torch.tensor(threshold_values(num_buckets), dtype=torch.int64, device=device)


def time_bucket(delta: torch.Tensor, num_buckets: int = DEFAULT_NUM_BUCKETS) -> torch.Tensor:
    """Bucket of |delta| (int64 seconds) -> int64 in [0, num_buckets - 1]."""
    if delta.dtype != torch.int64:
        raise TypeError(f"time differences must be int64 (got {delta.dtype}); float32 loses Unix-second digits")
    if torch.compiler.is_compiling():  # a constant of the compiled graph
        thresholds = bucket_thresholds(num_buckets, delta.device)
    else:
        thresholds = _device_thresholds(num_buckets, delta.device)
    return torch.searchsorted(thresholds, delta.abs(), right=True)


@functools.lru_cache(maxsize=None)
def _device_thresholds(num_buckets: int, device: torch.device) -> torch.Tensor:
    """The thresholds on ``device``, copied there once: inside a CUDA-graph capture a host-to-device copy
    is not allowed, so the table must exist before (a warm-up step builds it)."""
    return bucket_thresholds(num_buckets, device)
