"""hstu_kernels: the five HSTU operators, each with a PyTorch reference and a Triton backend where written.

Import name ``hstu_kernels`` (folder ``kernels/``): a PyPI package called ``kernels`` exists.
Every public function dispatches through the operator registry (``hstu_kernels.registry``): its
``backend=`` is None (the default manager: Triton where it can run), ``"triton"`` / ``"reference"``
(forced), or a ``TritonOperatorManager`` (what models pass). Set ``TRITON_INTERPRET`` before importing
this package: the default manager, built on import, reads it.
"""
from hstu_kernels.manager import TritonOperatorManager, TritonUnavailableError, default_manager
from hstu_kernels.ops.attention_layernorm import attention_input, attention_output
from hstu_kernels.ops.hstu_attention import (
    AttentionLayout, hstu_attention, hstu_attention_delta, hstu_attention_delta_layout, hstu_attention_layout,
)
from hstu_kernels.ops.sequence_fusion import sequence_fusion
from hstu_kernels.ops.softmax_losses import full_softmax_loss, sampled_softmax_loss
from hstu_kernels.ops.topk import topk_items
from hstu_kernels.registry import OPERATORS, REGISTRY
from hstu_kernels.time_buckets import bucket_thresholds, time_bucket

default_manager()  # built here: a torch.compile trace that calls with backend=None cannot import its modules

__all__ = [
    "AttentionLayout",
    "OPERATORS",
    "REGISTRY",
    "TritonOperatorManager",
    "TritonUnavailableError",
    "attention_input",
    "attention_output",
    "bucket_thresholds",
    "default_manager",
    "full_softmax_loss",
    "hstu_attention",
    "hstu_attention_delta",
    "hstu_attention_delta_layout",
    "hstu_attention_layout",
    "sampled_softmax_loss",
    "sequence_fusion",
    "time_bucket",
    "topk_items",
]
