"""What the written-out backwards (:mod:`.group_norm`, :mod:`.convolution`) ask of the engine
and of the call."""

from __future__ import annotations

import torch
from .torch_internals import functorch_transforms_active, is_legacy_batched, will_engine_execute_node


def asked(ctx, index: int) -> bool:
    """Whether this backward call needs the gradient of input ``index``: it requires grad and
    the engine will use it (``autograd.grad`` at the layers' outputs, as the norms' backward is,
    needs no parameter's gradient; ``ctx.needs_input_grad`` says only that one could be asked).
    The Function's forward sets ``ctx.tensor_inputs`` (:func:`tensor_inputs`)."""
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[ctx.tensor_inputs.index(index)][0]
    if node is None:
        return True
    try:
        return will_engine_execute_node(node)
    except RuntimeError:  # (raised only for a node the engine will run: a leaf that
        return True       # autograd.grad returns; a leaf it does not need is answered False)


def tensor_inputs(*inputs) -> tuple[int, ...]:
    """The positions of the tensors among a Function's inputs: its nodes' edges, in order."""
    return tuple(i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor))


def kernels_apply(input: torch.Tensor, *params: torch.Tensor | None) -> bool:
    """Whether a written-out Function may take a call: not under torch.func transforms (a
    Function there needs rules of its own) and every tensor in the input's dtype (the fused
    kernels take one)."""
    return not functorch_transforms_active() and all(
        t is None or t.dtype == input.dtype for t in params)


def batched(grad: torch.Tensor) -> bool:
    """Whether a backward runs under vmap (``is_grads_batched``, torch.func), where a Function
    applied inside records no graph: the differentiable composite must be used there."""
    return is_legacy_batched(grad) or functorch_transforms_active()
