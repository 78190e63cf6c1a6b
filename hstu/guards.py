"""A NaN/inf training loss, noticed without making the host wait for the device.

:class:`NonFiniteLossFlag` keeps its state in device tensors that each training step updates with a
few device operations and no host read, so the step stays asynchronous (and capturable in a CUDA
graph). Its ``flag`` is a float32 0/1 scalar in the form torch's fused Adam/AdamW read as
``found_inf``: while it is 1 they skip the whole update (parameters, moments and step count). The
host reads the flag once an epoch (``hstu.callbacks.StopOnNonFiniteLoss``), before any checkpoint of
that epoch is written.
"""
from __future__ import annotations

from typing import Callable

import torch

NO_STEP = torch.iinfo(torch.int64).max


class NonFiniteLossFlag:
    """Device-side record of the first step whose loss was NaN or inf."""

    def __init__(self) -> None:
        self.flag: torch.Tensor | None = None  # float32 [], 1.0 once a loss was not finite
        self.first_bad_step: torch.Tensor | None = None  # int64 [], the step's number, NO_STEP if none
        self.step: torch.Tensor | None = None  # int64 [], number of the next recorded step

    def reset(self, device: torch.device | str, step: int = 0) -> None:
        """Clear the record and number the next step ``step``. The tensors are refilled in place, so an
        optimizer given ``flag`` by :meth:`attach` keeps reading the same one."""
        device = torch.device(device)
        if self.flag is None or self.flag.device != device:
            self.flag = torch.zeros((), dtype=torch.float32, device=device)
            self.first_bad_step = torch.full((), NO_STEP, dtype=torch.int64, device=device)
            self.step = torch.zeros((), dtype=torch.int64, device=device)
        self.flag.zero_()
        self.first_bad_step.fill_(NO_STEP)
        self.step.fill_(step)

    def record(self, loss: torch.Tensor) -> None:
        """Note whether ``loss`` is finite; device operations only."""
        if self.flag is None or self.flag.device != loss.device:
            self.reset(loss.device)
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step.copy_(torch.where(bad & (self.flag == 0), self.step, self.first_bad_step))
        self.flag.copy_(torch.maximum(self.flag, bad.to(torch.float32)))
        self.step.add_(1)

    def attach(self, optimizer: torch.optim.Optimizer) -> bool:
        """Make a fused Adam/AdamW skip its update while the flag is set; False for other optimizers,
        which would refuse the attribute."""
        if self.flag is None or not all(group.get("fused") for group in optimizer.param_groups):
            return False
        optimizer.found_inf = self.flag
        return True

    def first_bad(self, reduce_min: Callable[[torch.Tensor], torch.Tensor] | None = None) -> int | None:
        """The number of the first step with a non-finite loss, or None: the one host read.
        ``reduce_min`` takes the minimum over processes (under DDP each process has its own losses)."""
        if self.first_bad_step is None:
            return None
        step = self.first_bad_step.clone()
        step = int(reduce_min(step) if reduce_min is not None else step)
        return None if step == NO_STEP else step
