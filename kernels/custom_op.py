"""The registration pattern every Triton operator with a backward follows.

A forward and a backward launcher become ``torch.library`` custom ops (``hstu_kernels::<name>_fwd`` and
``_bwd``) with fake kernels and the VJP registered, so ``torch.compile`` traces through them as opaque
nodes without graph breaks. Eager calls skip the dispatcher instead: an ``autograd.Function`` calls the
same launchers directly, since the custom op's dispatch costs tens of microseconds of host time a
call, as much as the kernels themselves at the model's sizes. Both paths share ``setup_context`` and
``gradients``, so they cannot drift apart.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def autograd_custom_op(
    name: str,
    *,
    forward: Callable,
    forward_fake: Callable,
    backward: Callable,
    backward_fake: Callable,
    setup_context: Callable[[Any, tuple, Any], None],
    gradients: Callable[[Any, tuple, Callable], tuple],
) -> Callable:
    """Register ``forward`` / ``backward`` (type-annotated launchers) as custom ops and return ``apply``.

    ``setup_context(ctx, inputs, output)`` saves what the backward needs; ``gradients(ctx, grad_outputs,
    backward_fn)`` calls ``backward_fn`` (the backward custom op, or its launcher in eager mode) and
    returns one gradient (or None) per forward input. ``apply(*inputs)`` runs the custom op inside a
    torch.compile trace and the direct autograd.Function otherwise.
    """
    forward_op = torch.library.custom_op(f"hstu_kernels::{name}_fwd", forward, mutates_args=())
    forward_op.register_fake(forward_fake)
    backward_op = torch.library.custom_op(f"hstu_kernels::{name}_bwd", backward, mutates_args=())
    backward_op.register_fake(backward_fake)

    def custom_op_backward(ctx, *grad_outputs):
        return gradients(ctx, grad_outputs, backward_op)

    forward_op.register_autograd(custom_op_backward, setup_context=setup_context)

    class EagerFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = forward(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grad_outputs):
            # Under create_graph=True these graph-free gradients would give a second backward zeros
            # wherever another term kept the graph alive: refused instead.
            if torch.is_grad_enabled():
                raise RuntimeError(
                    f"hstu_kernels::{name}: the Triton backward cannot be differentiated again "
                    "(create_graph=True); use the reference backend for higher-order gradients")
            return gradients(ctx, grad_outputs, backward)

    EagerFunction.__name__ = EagerFunction.__qualname__ = f"{name}_eager"

    def apply(*inputs):
        if torch.compiler.is_compiling():
            return forward_op(*inputs)
        return EagerFunction.apply(*inputs)

    apply.forward_op = forward_op
    apply.backward_op = backward_op
    return apply
