"""Checks of the operators' plain arguments (counts, scales, probabilities, flags, dtypes, devices), run in
the dispatch layer: one TypeError or ValueError that names the function and the argument, the same on every
backend (a backend would otherwise fail deep inside, each in its own way, or run on a value it misreads).

Symbolic ints and floats of a ``torch.compile`` trace pass as numbers; nothing here reads device values.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

_INTEGERS = (numbers.Integral, torch.SymInt)
_REALS = (numbers.Real, torch.SymInt, torch.SymFloat)
_SYMBOLIC = (torch.SymInt, torch.SymFloat)
# Plain ints and floats are told by their exact type first: an isinstance against the abstract number
# classes costs about a microsecond a call on the eager path.


def is_int(value) -> bool:
    """An int, numpy's included, or a symbolic one; not a bool."""
    kind = type(value)
    return kind is int or (kind is not bool and isinstance(value, _INTEGERS))


def check_count(name: str, argument: str, value, low: int) -> None:
    """``value`` is an int (not a bool) >= ``low``."""
    if not is_int(value):
        raise TypeError(f"{name}: {argument} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name}: {argument} must be >= {low}, got {value}")


def check_real(name: str, argument: str, value, *, positive: bool = False) -> None:
    """``value`` is a finite real number (not a bool), > 0 where ``positive``."""
    kind = type(value)
    if kind is not float and kind is not int and (kind is bool or not isinstance(value, _REALS)):
        raise TypeError(f"{name}: {argument} must be a real number, got {value!r}")
    # a comparison, as math.isfinite would break a dynamo graph; a symbolic value is left to its trace
    if not -math.inf < value < math.inf and not isinstance(value, _SYMBOLIC):
        raise ValueError(f"{name}: {argument} must be finite, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name}: {argument} must be > 0, got {value}")


def check_probability(name: str, argument: str, value) -> None:
    """``value`` is a real number in [0, 1]."""
    check_real(name, argument, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: {argument} must be in [0, 1], got {value}")


def check_flags(name: str, **flags) -> None:
    """Every flag is a bool (numpy's included): a string such as "no" would otherwise count as true."""
    for argument, value in flags.items():
        if type(value) is not bool and not isinstance(value, (np.bool_, torch.SymBool)):
            raise TypeError(f"{name}: {argument} must be a bool, got {value!r}")


def check_one_device(name: str, **tensors: torch.Tensor | None) -> None:
    """Every tensor given (None skipped) is on one device: a mix would fail deep inside a backend."""
    first = None
    for argument, tensor in tensors.items():
        if tensor is None:
            continue
        if first is None:
            first = argument, tensor.device
        elif tensor.device != first[1]:
            raise ValueError(f"{name}: {argument} is on {tensor.device} but {first[0]} on {first[1]}; "
                             "all tensor arguments must be on one device")


def check_floating(name: str, **tensors: torch.Tensor | None) -> None:
    """Every tensor given (None skipped) has a floating-point dtype."""
    for argument, tensor in tensors.items():
        if tensor is not None and not tensor.dtype.is_floating_point:
            raise TypeError(f"{name}: {argument} must be a floating-point tensor, got {tensor.dtype}")
