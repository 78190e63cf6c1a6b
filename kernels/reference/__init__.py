"""PyTorch references of the five operators: the source of truth; any device, autograd through float inputs."""
from hstu_kernels.reference.attention import hstu_attention
from hstu_kernels.reference.attention_output import attention_output
from hstu_kernels.reference.losses import full_softmax_loss, sampled_softmax_loss
from hstu_kernels.reference.sequence_fusion import sequence_fusion
from hstu_kernels.reference.topk import topk_items

__all__ = [
    "attention_output",
    "full_softmax_loss",
    "hstu_attention",
    "sampled_softmax_loss",
    "sequence_fusion",
    "topk_items",
]
