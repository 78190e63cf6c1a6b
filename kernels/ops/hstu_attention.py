"""Operator ``hstu_hierarchical_attention``: jagged causal HSTU attention with relative biases."""
from __future__ import annotations

import math

import torch

from hstu_kernels.arguments import check_count, check_flags, check_floating, check_one_device, check_real
from hstu_kernels.benchmarking import (
    increasing_timestamps, jagged_lengths, offsets_of, random_values, seeded, triton_function,
)
from hstu_kernels.jagged import check_offsets
from hstu_kernels.manager import implementation
from hstu_kernels.reference import hstu_attention as reference
from hstu_kernels.reference.hstu_attention import AttentionLayout
from hstu_kernels.spec import BenchCase, BenchSpec, OperatorSpec
from hstu_kernels.time_buckets import MAX_NUM_BUCKETS, check_timestamp_range

KEY = "hstu_hierarchical_attention"


def hstu_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    time_weight: torch.Tensor | None = None,
    layout: AttentionLayout | None = None,
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """Jagged causal HSTU attention: out[s+i] = sum_{j<=i} SiLU(alpha q.k + rab(i,j)) / max_seq_len * v[s+j].

    q, k [L, H, dqk], v [L, H, dv]; rab = pos_weight[max_seq_len-1+j-i] + time_weight[bucket(|t_q(i)-t_k(j)|)].
    Returns [L, H, dv]; the Triton backend's rows of H*dv start 16 bytes apart (``hstu_kernels.layout``),
    so where H*dv is not a multiple of 8 the output is a view of padded rows: ``reshape(L, -1)`` is free,
    ``view(-1)`` needs ``contiguous()`` first.
    ``layout``: this batch's :func:`hstu_attention_layout`, built once and shared by calls over the same
    offsets and timestamps (the blocks of a model); the reference uses it, the Triton kernel computes
    its indices itself. ``validate=False`` skips the checks of the offsets' values, which wait for the
    GPU, and of a layout's offsets and timestamps against these: for callers that checked their batch
    once (the model does, see ``JaggedBatch.check``).
    """
    check_flags("hstu_attention", validate=validate)
    check_one_device("hstu_attention", q=q, k=k, v=v, seq_offsets=seq_offsets, q_timestamps=q_timestamps,
                     k_timestamps=k_timestamps, pos_weight=pos_weight, time_weight=time_weight)
    check_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, q_timestamps, k_timestamps, pos_weight, time_weight,
                         validate)
    if layout is not None:
        check_layout(layout, "hstu_attention", "whole", seq_offsets, None, max_seq_len, max_seq_len, q,
                     0, (q_timestamps, k_timestamps), pos_weight, time_weight, validate)
    impl = implementation(KEY, "hstu_attention", backend, (q, k, v))
    return impl(q, k, v, seq_offsets, max_seq_len, alpha, q_timestamps=q_timestamps, k_timestamps=k_timestamps,
                pos_weight=pos_weight, time_weight=time_weight, layout=layout)


def check_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, q_timestamps, k_timestamps, pos_weight,
                         time_weight, validate=True, name="hstu_attention"):
    """Shapes, dtypes and scalars always; with ``validate``, the offsets' values too (one host read)."""
    check_count(name, "max_seq_len", max_seq_len, 1)
    check_real(name, "alpha", alpha)
    if q.dim() != 3 or k.shape != q.shape or v.dim() != 3 or v.shape[:2] != q.shape[:2]:
        raise ValueError(f"hstu_attention: expected q, k [L, H, dqk] and v [L, H, dv]; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise TypeError(f"hstu_attention: q, k, v must share a floating-point dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if 0 in q.shape[1:] or v.shape[2] == 0:
        raise ValueError(f"hstu_attention: heads and head dims must be >= 1; got q {tuple(q.shape)}, v {tuple(v.shape)}")
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError("hstu_attention: seq_offsets must be a 1-D int32/int64 tensor [B+1]")
    if (q_timestamps is None) != (k_timestamps is None):
        raise ValueError("hstu_attention: q_timestamps and k_timestamps are given together")
    if time_weight is not None and q_timestamps is None:
        raise ValueError("hstu_attention: time_weight needs q_timestamps and k_timestamps")
    if q_timestamps is not None:
        if q_timestamps.dtype != torch.int64 or k_timestamps.dtype != torch.int64:
            raise TypeError("hstu_attention: timestamps must be int64 (differences are taken in int64)")
        if q_timestamps.shape != (q.shape[0],) or k_timestamps.shape != (q.shape[0],):
            raise ValueError(f"hstu_attention: timestamps must be [L={q.shape[0]}]")
    if pos_weight is not None and pos_weight.shape != (2 * max_seq_len - 1,):
        raise ValueError(f"hstu_attention: pos_weight must be [2*max_seq_len-1={2 * max_seq_len - 1}], "
                         f"got {tuple(pos_weight.shape)}")
    if time_weight is not None and (time_weight.dim() != 1 or time_weight.numel() == 0):
        raise ValueError(f"hstu_attention: time_weight must be 1-D [num_buckets >= 1]; got {tuple(time_weight.shape)}")
    if time_weight is not None and time_weight.numel() > MAX_NUM_BUCKETS:
        raise ValueError(f"{name}: time_weight has {time_weight.numel()} buckets; at most {MAX_NUM_BUCKETS} "
                         "(the thresholds of more overflow int64)")
    check_floating(name, pos_weight=pos_weight, time_weight=time_weight)
    if validate:
        check_offsets(seq_offsets, q.shape[0], max_seq_len, "hstu_attention")
        if time_weight is not None:  # the timestamps feed only the time bias
            check_timestamp_range(name, q_timestamps=q_timestamps, k_timestamps=k_timestamps)


def hstu_attention_delta(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    seq_offsets: torch.Tensor,
    cached_k: torch.Tensor,
    cached_v: torch.Tensor,
    cached_offsets: torch.Tensor,
    max_seq_len: int,
    alpha: float,
    *,
    max_new_len: int | None = None,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    cached_k_timestamps: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    time_weight: torch.Tensor | None = None,
    layout: AttentionLayout | None = None,
    backend=None,
    validate: bool = True,
) -> torch.Tensor:
    """HSTU attention of new tokens against the cached keys and values of earlier positions (forward only).

    Sequence b has n_b cached positions (cached_k [C, H, dqk], cached_v [C, H, dv] jagged by
    ``cached_offsets``) and m_b new tokens (q, k [M, H, dqk], v [M, H, dv] jagged by ``seq_offsets``)
    at positions n_b..n_b+m_b-1, with n_b + m_b <= max_seq_len. New token i attends to every cached
    key and to new keys 0..i: its output equals row n_b+i of ``hstu_attention`` over the whole
    sequence. ``max_new_len`` bounds m_b (default max_seq_len; a tighter bound saves padded work).
    Timestamps: q_timestamps, k_timestamps [M] and cached_k_timestamps [C], int64, for the time bias.
    ``layout``: this batch's :func:`hstu_attention_delta_layout`, shared by calls over the same offsets
    and timestamps (as in ``hstu_attention``). ``validate=False`` skips the checks of the offsets'
    values (host reads), and of a layout's offsets and timestamps against these.
    """
    check_flags("hstu_attention_delta", validate=validate)
    check_one_device("hstu_attention_delta", q=q, k=k, v=v, seq_offsets=seq_offsets, cached_k=cached_k,
                     cached_v=cached_v, cached_offsets=cached_offsets, q_timestamps=q_timestamps,
                     k_timestamps=k_timestamps, cached_k_timestamps=cached_k_timestamps, pos_weight=pos_weight,
                     time_weight=time_weight)
    check_hstu_attention_delta(q, k, v, seq_offsets, cached_k, cached_v, cached_offsets, max_seq_len, alpha,
                               max_new_len, q_timestamps, k_timestamps, cached_k_timestamps, pos_weight, time_weight,
                               validate)
    if layout is not None:
        check_layout(layout, "hstu_attention_delta", "delta", seq_offsets, cached_offsets, max_seq_len,
                     max_seq_len if max_new_len is None else max_new_len, q, cached_k.shape[0],
                     (q_timestamps, k_timestamps, cached_k_timestamps), pos_weight, time_weight, validate)
    impl = implementation(KEY, "hstu_attention_delta", backend, (q, k, v))
    return impl(q, k, v, seq_offsets, cached_k, cached_v, cached_offsets, max_seq_len, alpha,
                max_new_len=max_new_len, q_timestamps=q_timestamps, k_timestamps=k_timestamps,
                cached_k_timestamps=cached_k_timestamps, pos_weight=pos_weight, time_weight=time_weight,
                layout=layout)


def check_hstu_attention_delta(q, k, v, seq_offsets, cached_k, cached_v, cached_offsets, max_seq_len, alpha,
                               max_new_len, q_timestamps, k_timestamps, cached_k_timestamps, pos_weight, time_weight,
                               validate=True):
    """The new tokens as ``check_hstu_attention`` checks a sequence; the cache against them; with
    ``validate``, n_b + m_b <= max_seq_len and m_b <= max_new_len (host reads)."""
    name = "hstu_attention_delta"
    check_hstu_attention(q, k, v, seq_offsets, max_seq_len, alpha, q_timestamps, k_timestamps, pos_weight,
                         time_weight, validate=False, name=name)
    if cached_k.dim() != 3 or cached_k.shape[1:] != q.shape[1:] or cached_v.shape != (cached_k.shape[0], *v.shape[1:]):
        raise ValueError(f"{name}: expected cached_k [C, H, dqk] and cached_v [C, H, dv] like q {tuple(q.shape)} and "
                         f"v {tuple(v.shape)}; got {tuple(cached_k.shape)} and {tuple(cached_v.shape)}")
    if not (cached_k.dtype == cached_v.dtype == q.dtype):
        raise TypeError(f"{name}: cached_k, cached_v must have q's dtype {q.dtype}; got {cached_k.dtype}, {cached_v.dtype}")
    if (cached_k_timestamps is None) != (q_timestamps is None):
        raise ValueError(f"{name}: cached_k_timestamps are given with q_timestamps and k_timestamps")
    if cached_k_timestamps is not None and (cached_k_timestamps.dtype != torch.int64
                                            or cached_k_timestamps.shape != (cached_k.shape[0],)):
        raise ValueError(f"{name}: cached_k_timestamps must be int64 [C={cached_k.shape[0]}]")
    check_delta_offsets(name, seq_offsets, q.shape[0], cached_offsets, cached_k.shape[0], max_seq_len, max_new_len,
                        validate)
    if validate and time_weight is not None:
        check_timestamp_range(name, q_timestamps=q_timestamps, k_timestamps=k_timestamps,
                              cached_k_timestamps=cached_k_timestamps)


def check_delta_offsets(name, seq_offsets, num_new, cached_offsets, num_cached, max_seq_len, max_new_len,
                        validate) -> None:
    """cached_offsets against seq_offsets, max_new_len against max_seq_len; with ``validate``, the
    offsets' values: n_b + m_b <= max_seq_len and m_b <= max_new_len (host reads)."""
    if cached_offsets.shape != seq_offsets.shape or cached_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: cached_offsets must be a 1-D int32/int64 tensor shaped like seq_offsets "
                         f"{tuple(seq_offsets.shape)}; got {cached_offsets.dtype} {tuple(cached_offsets.shape)}")
    if max_new_len is not None:
        check_count(name, "max_new_len", max_new_len, 0)
    if max_new_len is not None and not max_new_len <= max_seq_len:
        raise ValueError(f"{name}: max_new_len={max_new_len} must lie in [0, max_seq_len={max_seq_len}]")
    if validate:
        check_offsets(seq_offsets, num_new, max_seq_len if max_new_len is None else max_new_len,
                      name if max_new_len is None else f"{name} (new tokens, max_seq_len here is max_new_len)")
        check_offsets(cached_offsets, num_cached, max_seq_len, name + " (cached_offsets)")
        if seq_offsets.numel() > 1 and not torch.compiler.is_compiling():
            total = (seq_offsets[1:] - seq_offsets[:-1]) + (cached_offsets[1:] - cached_offsets[:-1])
            longest = int(total.max())
            if longest > max_seq_len:
                raise ValueError(f"{name}: a sequence of {longest} cached + new tokens exceeds max_seq_len={max_seq_len}")


def hstu_attention_layout(
    seq_offsets: torch.Tensor,
    max_seq_len: int,
    num_tokens: int,
    *,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    position_bias: bool = True,
    num_time_buckets: int | None = None,
    validate: bool = True,
) -> AttentionLayout:
    """What ``hstu_attention`` derives from a batch's offsets and timestamps alone (padded rows, bias
    indices, causal mask), built once for every call over that batch (``layout=``).

    ``position_bias``: index the position bias (for calls with ``pos_weight``); ``num_time_buckets``:
    bucket the time gaps for a time_weight of that size (needs q_timestamps, k_timestamps [L]).
    ``validate=False`` skips the checks of the offsets' values (host reads).
    """
    name = "hstu_attention_layout"
    check_flags(name, position_bias=position_bias, validate=validate)
    check_one_device(name, seq_offsets=seq_offsets, q_timestamps=q_timestamps, k_timestamps=k_timestamps)
    _check_layout_inputs(name, seq_offsets, max_seq_len, num_tokens, num_time_buckets,
                         {"q_timestamps": (q_timestamps, num_tokens), "k_timestamps": (k_timestamps, num_tokens)})
    if validate:
        check_offsets(seq_offsets, num_tokens, max_seq_len, name)
    return reference.hstu_attention_layout(
        seq_offsets, max_seq_len, num_tokens, q_timestamps=q_timestamps, k_timestamps=k_timestamps,
        position_bias=position_bias, num_time_buckets=num_time_buckets)


def hstu_attention_delta_layout(
    seq_offsets: torch.Tensor,
    cached_offsets: torch.Tensor,
    max_seq_len: int,
    num_new: int,
    num_cached: int,
    *,
    max_new_len: int | None = None,
    q_timestamps: torch.Tensor | None = None,
    k_timestamps: torch.Tensor | None = None,
    cached_k_timestamps: torch.Tensor | None = None,
    position_bias: bool = True,
    num_time_buckets: int | None = None,
    validate: bool = True,
) -> AttentionLayout:
    """What ``hstu_attention_delta`` derives from the offsets and timestamps alone, built once for every
    call over that batch (``layout=``): ``num_new`` new tokens jagged by ``seq_offsets`` after
    ``num_cached`` cached ones jagged by ``cached_offsets``. Bias options as in
    :func:`hstu_attention_layout`; timestamps q, k [M] and cached k [C]. ``validate=False`` skips the
    checks of the offsets' values (host reads).
    """
    name = "hstu_attention_delta_layout"
    check_flags(name, position_bias=position_bias, validate=validate)
    check_one_device(name, seq_offsets=seq_offsets, cached_offsets=cached_offsets, q_timestamps=q_timestamps,
                     k_timestamps=k_timestamps, cached_k_timestamps=cached_k_timestamps)
    _check_layout_inputs(name, seq_offsets, max_seq_len, num_new, num_time_buckets,
                         {"q_timestamps": (q_timestamps, num_new), "k_timestamps": (k_timestamps, num_new),
                          "cached_k_timestamps": (cached_k_timestamps, num_cached)})
    check_count(name, "num_cached", num_cached, 0)
    check_delta_offsets(name, seq_offsets, num_new, cached_offsets, num_cached, max_seq_len, max_new_len, validate)
    return reference.hstu_attention_delta_layout(
        seq_offsets, cached_offsets, max_seq_len, num_new, num_cached, max_new_len=max_new_len,
        q_timestamps=q_timestamps, k_timestamps=k_timestamps, cached_k_timestamps=cached_k_timestamps,
        position_bias=position_bias, num_time_buckets=num_time_buckets)


def _check_layout_inputs(name, seq_offsets, max_seq_len, num_tokens, num_time_buckets, timestamps) -> None:
    if seq_offsets.dim() != 1 or seq_offsets.numel() < 1 or seq_offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: seq_offsets must be a 1-D int32/int64 tensor [B+1]")
    check_count(name, "max_seq_len", max_seq_len, 1)
    check_count(name, "the token count", num_tokens, 0)
    if num_time_buckets is None:
        return
    check_count(name, "num_time_buckets", num_time_buckets, 1)
    for what, (tensor, size) in timestamps.items():
        if tensor is None or tensor.dtype != torch.int64 or tensor.shape != (size,):
            got = "None" if tensor is None else f"{tensor.dtype} {tuple(tensor.shape)}"
            raise ValueError(f"{name}: num_time_buckets needs {what} int64 [{size}]; got {got}")


LAYOUT_SIZES = ("max_seq_len", "batch size", "token count", "cached token count",
                "query rows per sequence (max_new_len)")


def check_layout(layout, name, form, seq_offsets, cached_offsets, max_seq_len, query_rows_per_sequence, q,
                 num_cached, timestamps, pos_weight, time_weight, validate) -> None:
    """A layout must have been built for this call's batch: one message naming what differs. Shapes and
    sizes always; with ``validate``, the offsets' and timestamps' values too (host reads), unless
    they are the very tensors it was built from."""
    if not isinstance(layout, AttentionLayout):
        raise TypeError(f"{name}: layout must be an AttentionLayout from hstu_kernels.{name}_layout, "
                        f"got {type(layout).__name__}")
    if layout.form != form:
        raise ValueError(f"{name}: layout was built by hstu_attention{'' if layout.form == 'whole' else '_delta'}"
                         f"_layout; this call needs one from {name}_layout")
    built = (layout.max_seq_len, layout.batch, layout.num_tokens, layout.num_cached, layout.query_rows_per_sequence)
    expected = (max_seq_len, seq_offsets.numel() - 1, q.shape[0], num_cached, query_rows_per_sequence)
    if built != expected:
        what, built_for, has = next(d for d in zip(LAYOUT_SIZES, built, expected) if d[1] != d[2])
        raise ValueError(f"{name}: layout was built for {what} {built_for}, this call has {has}")
    if layout.query_rows.device != q.device:
        raise ValueError(f"{name}: layout is on {layout.query_rows.device}, the inputs on {q.device}")
    if pos_weight is not None and layout.pos_index is None:
        raise ValueError(f"{name}: layout was built without the position bias (position_bias=False), "
                         "this call has pos_weight")
    if time_weight is not None and layout.num_time_buckets != time_weight.numel():
        built_for = "without the time bias" if layout.num_time_buckets is None else \
            f"for {layout.num_time_buckets} time buckets"
        raise ValueError(f"{name}: layout was built {built_for}, this call has a time_weight of "
                         f"{time_weight.numel()} buckets")
    if not validate or torch.compiler.is_compiling():  # the comparisons below read the device
        return
    given = {"seq_offsets": (layout.seq_offsets, seq_offsets), "cached_offsets": (layout.cached_offsets, cached_offsets)}
    if time_weight is not None:
        given.update(zip(("q_timestamps", "k_timestamps", "cached_k_timestamps"), zip(layout.timestamps, timestamps)))
    for what, (built_from, passed) in given.items():
        if built_from is not passed and (built_from.shape != passed.shape or not bool((built_from == passed).all())):
            raise ValueError(f"{name}: layout was built from other {what} than this call's")


# ---------------------------------------------------------------------------------------------
# Benchmark cases: (B, N, H, d), jagged lengths in [0.5N, N] (N <= 1024) or [0.9N, N]
# ---------------------------------------------------------------------------------------------
def build_bench_case(shape, dtype, device, options) -> BenchCase:
    """Jagged q, k, v [L, H, d]; pos/time bias tables in float32 (model parameters) per ``options.bias``."""
    batch, max_len, heads, dim = shape
    bias = options.bias
    g = seeded(options.seed)
    lengths = jagged_lengths(g, batch, max_len)
    offsets = offsets_of(lengths, device)
    total = int(lengths.sum())
    q, k, v = (random_values(g, total, heads, dim, dtype=dtype, device=device) for _ in range(3))
    alpha = 1.0 / math.sqrt(dim)
    pos_weight = time_weight = q_ts = k_ts = None
    if bias in ("pos", "both"):
        pos_weight = random_values(g, 2 * max_len - 1, dtype=torch.float32, device=device, scale=0.1)
    if bias in ("time", "both"):
        time_weight = random_values(g, 129, dtype=torch.float32, device=device, scale=0.1)
        q_ts, k_ts = increasing_timestamps(g, lengths, device)
    leaves = [t for t in (q, k, v, pos_weight, time_weight) if t is not None]
    direct = {}  # backend -> function, resolved once per case as a model resolves it once when built

    def call(backend: str) -> torch.Tensor:
        if options.call == "direct":  # the backend itself: no input checks
            if backend not in direct:
                direct[backend] = triton_function(KEY, "hstu_attention", (q, k, v)) if backend == "triton" else \
                    implementation(KEY, "hstu_attention", "reference", (q, k, v))
            return direct[backend](q, k, v, offsets, max_len, alpha, q_timestamps=q_ts, k_timestamps=k_ts,
                                   pos_weight=pos_weight, time_weight=time_weight)
        return hstu_attention(q, k, v, offsets, max_len, alpha, q_timestamps=q_ts, k_timestamps=k_ts,
                              pos_weight=pos_weight, time_weight=time_weight, backend=backend,
                              validate=options.validate)

    causal_pairs = float((lengths * (lengths + 1) // 2).sum())
    forward_flops = 4 * causal_pairs * heads * dim  # two matmuls over the causal triangle
    work = {"fwd": forward_flops, "bwd": 2.5 * forward_flops, "fwd+bwd": 3.5 * forward_flops}
    peer_skip = None if bias == "none" else "the peer has no relative attention bias (runs with --bias none only)"
    checksum = float(sum(t.detach().double().sum() for t in leaves))
    peer = dict(max_seq_len=max_len, alpha=alpha, q=q, k=k, v=v, seq_offsets=offsets)
    return BenchCase(tuple(shape), call, leaves, work, peer_inputs=peer if peer_skip is None else None,
                     peer_skip_reason=peer_skip, checksum=checksum)


SPEC = OperatorSpec(
    key=KEY,
    summary="jagged causal SiLU(alpha q.k + rab) / N @ v; relative position and log-bucketed time biases in-kernel",
    module="hstu_attention",
    functions=("hstu_attention", "hstu_attention_delta"),
    triton=True,
    bench=BenchSpec(
        shape_fields=("B", "N", "H", "d"),
        default_shapes=((64, 1024, 4, 64), (16, 4096, 4, 64), (8, 8192, 4, 64), (16, 4096, 4, 128),
                        (8, 8192, 4, 128), (128, 200, 2, 25), (128, 200, 1, 50), (128, 200, 2, 32),
                        (128, 200, 4, 64)),
        build=build_bench_case,
        uses_bias=True,
        direct_call=True,
    ),
)
