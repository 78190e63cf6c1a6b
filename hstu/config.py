"""Structured config schemas registered in Hydra's ConfigStore.

``KernelFlags`` holds one boolean per Triton operator, all false by default. Every model config
pulls it in at ``model.kernels`` (defaults entry ``/kernel_flags@kernels``), so a typo'd key or a
non-boolean value fails at composition with the key named; ``+triton=<name>`` (conf/triton/*.yaml,
``# @package model.kernels``) switches flags on.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from hydra.core.config_store import ConfigStore

from hstu_kernels import OPERATORS


@dataclass
class KernelFlags:
    hstu_hierarchical_attention: bool = False
    fused_attention_layernorm: bool = False
    hierarchical_sequence_fusion: bool = False
    sequence_recommendation_interaction: bool = False
    interaction: bool = False


assert tuple(f.name for f in fields(KernelFlags)) == OPERATORS, "KernelFlags must list exactly the operators"


def register_configs() -> None:
    ConfigStore.instance().store(name="kernel_flags", node=KernelFlags)


register_configs()
