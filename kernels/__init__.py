"""hstu_kernels: the five HSTU operators, each with a PyTorch reference and (where written) a Triton backend.

Import name ``hstu_kernels`` (folder ``kernels/``): a PyPI package called ``kernels`` exists.
"""
from hstu_kernels.functional import (
    attention_output,
    full_softmax_loss,
    hstu_attention,
    sampled_softmax_loss,
    sequence_fusion,
    topk_items,
)
from hstu_kernels.manager import (
    OPERATORS,
    TritonOperatorManager,
    TritonUnavailableError,
    default_manager,
)
from hstu_kernels.time_buckets import bucket_thresholds, time_bucket

__all__ = [
    "OPERATORS",
    "TritonOperatorManager",
    "TritonUnavailableError",
    "attention_output",
    "bucket_thresholds",
    "default_manager",
    "full_softmax_loss",
    "hstu_attention",
    "sampled_softmax_loss",
    "sequence_fusion",
    "time_bucket",
    "topk_items",
]
