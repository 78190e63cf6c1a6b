"""One optimisation step (forward, backward, optimizer update) run eagerly or replayed from CUDA graphs.

At ML-1M sizes a step is microseconds of GPU work per kernel and hundreds of kernels: launched one by one
from Python, the GPU idles most of the step. ``TrainStep`` captures the whole step - packing the batch on
the device, forward, backward, the optimizer update, the loss sum and the non-finite flag - as one CUDA
graph per token capacity (``hstu.data.packing``), and replays it: one launch per step.

How a step stays capturable:
- the batch is assembled on the device from two static [B] index buffers, so a step's inputs are two
  small copies; nothing reads device values on the host;
- gradients are zeroed inside the graph (not set to None), so they stay the same static tensors in
  every graph and between replays;
- dropout seeds and sampled negatives are drawn from torch's device generator, whose state a captured
  graph advances on every replay (a Python seed would freeze one mask into the graph);
- the optimizer is AdamW with ``capturable=True`` (fused where available) and skips its update on the
  device while the non-finite-loss flag (``hstu.guards.NonFiniteLossFlag``) is set; the host reads the
  flag and the loss sum once per epoch.

Under DDP (never captured) the backward goes through the strategy (``backward``:
``RecModule._ddp_backward``, which readies DDP's gradient all-reduce) and, with several processes, the
non-finite flag is made the maximum over processes before the update (``share_flag``): the all-reduced
gradients of a step carry one process's NaN to all of them, so all of them must skip that update.

The first step of each capacity runs eagerly (on a side stream, as warm-up before capture must) and is
then captured (``hstu.graph_capture.GraphCapture``); later steps of that capacity replay. Operator
calls inside the graph are counted by the manager per replay (``TritonOperatorManager.region``).
"""
from __future__ import annotations

from typing import Callable

import torch

from hstu.data.batch import JaggedBatch
from hstu.data.packing import DeviceSequences, PackingLayout, PlannedBatch, StaticJaggedInput, pack_batch
from hstu.graph_capture import GraphCapture
from hstu.guards import NonFiniteLossFlag
from hstu.model.recommender import SequentialRecommender


def make_optimizer(parameters, lr: float, betas, weight_decay: float, device: torch.device, capturable: bool):
    """AdamW, fused where the device supports it (one multi-tensor kernel instead of a loop over
    parameters), capturable when its step will be captured in a CUDA graph."""
    return torch.optim.AdamW(parameters, lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                             fused=device.type in ("cuda", "cpu"), capturable=capturable)


class TrainStep:
    """Runs training steps for ``model`` and ``optimizer``, keeping the epoch's loss sum on the device and
    recording each loss in ``nonfinite`` (whose flag the optimizer reads as ``found_inf``). Steps take a ``PlannedBatch`` (needs ``sequences``: packed on the device from two
    index buffers) or a ``JaggedBatch`` (any loader's: copied into static buffers when captured).
    ``capture`` replays one CUDA graph per capacity of ``layout`` (CUDA only); without it steps run
    eagerly (planned batches packed, jagged ones as they are). ``backward`` (default ``Tensor.backward``)
    and ``share_flag`` (default none) are the DDP hooks of the module docstring."""

    def __init__(self, model: SequentialRecommender, optimizer: torch.optim.Optimizer, nonfinite: NonFiniteLossFlag,
                 *, sequences: DeviceSequences | None = None, layout: PackingLayout | None = None,
                 capture: bool = False, backward: Callable[[torch.Tensor], None] | None = None,
                 share_flag: Callable[[torch.Tensor], None] | None = None):
        device = next(model.parameters()).device
        if capture and device.type != "cuda":
            raise ValueError("TrainStep: CUDA-graph capture needs the model on a CUDA device")
        if capture and (backward is not None or share_flag is not None):
            raise ValueError("TrainStep: captured steps run their own backward and keep their flag to this process")
        self.backward = backward or torch.Tensor.backward
        self.share_flag = share_flag
        self.model, self.optimizer = model, optimizer
        self.sequences, self.layout = sequences, layout
        self.capture = capture
        self.nonfinite = nonfinite
        if nonfinite.flag is None or nonfinite.flag.device != device:
            nonfinite.reset(device)
        nonfinite.attach(optimizer)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.last_loss = torch.zeros((), dtype=torch.float32, device=device)  # the latest step's (static) loss
        self.steps = 0  # host count of steps this epoch
        self.graphs: dict[tuple[str, int], torch.cuda.CUDAGraph] = {}  # (input kind, capacity) -> graph
        self._pool = None
        self._captured_gradients: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its gradient) in the graphs
        self._graph_capture = GraphCapture(device) if capture else None
        if capture and layout is None:
            raise ValueError("TrainStep: capture needs a PackingLayout (the capacities graphs are captured for)")
        if sequences is not None:
            rows = layout.batch_size
            self._users = torch.zeros(rows, dtype=torch.int64, device=device)
            self._positions = torch.zeros(rows, dtype=torch.int64, device=device)
        self._jagged = StaticJaggedInput(layout, model.num_items, device) if capture else None

    # ---- one step --------------------------------------------------------------------------
    def __call__(self, batch: PlannedBatch | JaggedBatch) -> None:
        if isinstance(batch, JaggedBatch):
            if self.capture:
                self._run_captured(("jagged", self._jagged.fill(batch)))
            else:
                self._eager(batch)
        else:
            self._users.copy_(batch.users, non_blocking=True)
            self._positions.copy_(batch.target_positions, non_blocking=True)
            if self.capture:
                self._run_captured(("planned", batch.capacity))
            else:
                self._eager(self._packed(("planned", batch.capacity)))
        self.steps += 1

    def _packed(self, key: tuple[str, int]) -> JaggedBatch:
        """The packed batch a step reads: from the planned indices, or from the jagged input's buffers."""
        kind, capacity = key
        if kind == "planned":
            return pack_batch(self.sequences, self._users, self._positions, capacity, self.layout)
        return self._jagged.packed(capacity)

    def _run_captured(self, key: tuple[str, int]) -> None:
        self._check_captured_gradients()
        graph = self.graphs.get(key)
        if graph is None:
            self._warm_up_and_capture(key)
        else:
            with self.model.manager.region(f"train_step_{key}"):
                graph.replay()

    def _check_captured_gradients(self) -> None:
        """The graphs accumulate into the gradient tensors that existed when the first was captured: refuse
        to replay or capture once any was replaced or set to None (``zero_grad(set_to_none=True)``), after
        which the graphs would write into freed memory."""
        if any(p.grad is not g for p, g in self._captured_gradients):
            raise RuntimeError("TrainStep: a parameter's gradient was replaced or freed after its step was captured "
                               "(zero_grad with set_to_none=True?); captured steps write into the gradient tensors "
                               "they were captured with, so gradients must only be zeroed in place")

    def _body(self, batch: JaggedBatch) -> None:
        """The step: gradients zeroed in place, loss, backward, flag, update, loss sum."""
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.model.training_loss(batch)
        self.backward(loss)
        self.nonfinite.record(loss)
        if self.share_flag is not None:
            self.share_flag(self.nonfinite.flag)
        self.optimizer.step()
        self.loss_sum.add_(torch.where(torch.isfinite(loss.detach()), loss.detach().double(), 0.0))
        self.last_loss.copy_(loss.detach())

    def _eager(self, batch: JaggedBatch) -> None:
        self._ensure_grads()
        self._body(batch)

    def _ensure_grads(self) -> None:
        """Gradients exist before the first step (zeroed in place from then on, in and out of graphs)."""
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is None:
                    p.grad = torch.zeros_like(p)

    def _warm_up_and_capture(self, key: tuple[str, int]) -> None:
        """Run this step eagerly on a side stream (warm-up: kernels compiled, optimizer state and
        workspaces allocated), then capture it for the steps to come (a capture runs nothing)."""
        self._ensure_grads()
        graph = torch.cuda.CUDAGraph()
        self._graph_capture(graph, lambda: self._body(self._packed(key)), pool=self._pool,
                            capture_context=self.model.manager.region(f"train_step_{key}", executes=False))
        self._pool = graph.pool() if self._pool is None else self._pool
        self.graphs[key] = graph
        if not self._captured_gradients:
            self._captured_gradients = [(p, p.grad) for group in self.optimizer.param_groups
                                        for p in group["params"] if p.requires_grad]

    # ---- epoch bookkeeping (host reads, once per epoch) -------------------------------------
    def epoch_loss(self) -> tuple[torch.Tensor, int]:
        """(the loss sum so far this epoch, on the CPU; the steps it sums), for a checkpoint inside an epoch."""
        return self.loss_sum.detach().cpu().clone(), self.steps  # a copy: end_epoch zeroes the sum in place

    def resume_epoch_loss(self, loss_sum: torch.Tensor, steps: int) -> None:
        """Continue an epoch whose first ``steps`` steps summed to ``loss_sum`` (from :meth:`epoch_loss`)."""
        self.loss_sum.copy_(loss_sum)
        self.steps = int(steps)

    def end_epoch(self) -> float:
        """The mean loss of the epoch's steps (non-finite ones count 0: the flag reports them); resets the sum."""
        mean = self.loss_sum.item() / max(self.steps, 1)
        self.loss_sum.zero_()
        self.steps = 0
        return mean
