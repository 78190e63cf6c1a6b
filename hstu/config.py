"""Structured config schemas registered in Hydra's ConfigStore.

``KernelFlags`` holds one boolean per operator of the registry, all false by default. Every model config
pulls it in at ``model.kernels`` (defaults entry ``/kernel_flags@kernels``), so a typo'd key or a
non-boolean value fails at composition with the key named; ``+triton=<name>`` (conf/triton/*.yaml,
``# @package model.kernels``) switches flags on.
"""
from __future__ import annotations

from dataclasses import field, make_dataclass

from hydra.core.config_store import ConfigStore

from hstu_kernels import OPERATORS

# One boolean per operator of the registry (hstu_kernels.registry), all off by default.
KernelFlags = make_dataclass("KernelFlags", [(op, bool, field(default=False)) for op in OPERATORS])


def register_configs() -> None:
    ConfigStore.instance().store(name="kernel_flags", node=KernelFlags)


register_configs()
