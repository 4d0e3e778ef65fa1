"""Every private PyTorch API the engines use, in one place, each checked on torch 2.13.0 (CPU) and
2.14.1 (the build torchvision 0.29.1 needs); a torch that lacks one fails here, by name.

Each has no public equivalent: the engines need to know whether they run under a torch.func
transform (a written-out Function has no rules there), whether autograd will run a node (so a
backward computes only the gradients asked for), and whether saved-tensor hooks are active (the
non-reentrant ``torch.utils.checkpoint``, which torch.func refuses); and, for the optimizer's
noise stream, whether a step is the one torch.distributed.checkpoint takes to create optimizer
state (a zero-gradient, zero-lr ``step()`` that nothing marks); and, for measuring an FSDP model
through a replica, which forward hooks are FSDP2's own.
"""

from __future__ import annotations

import sys

import torch


def functorch_transforms_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp, ...) is running (``torch._C._are_functorch_transforms_active``)."""
    return torch._C._are_functorch_transforms_active()


def is_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a batched tensor of a running ``torch.func.vmap`` (``torch._C._functorch.is_batchedtensor``)."""
    return torch._C._functorch.is_batchedtensor(t)


def is_legacy_batched(t: torch.Tensor) -> bool:
    """Whether ``t`` is a batched gradient of ``autograd.grad(..., is_grads_batched=True)``."""
    return torch._C._functorch.is_legacy_batchedtensor(t)


def will_engine_execute_node(node) -> bool:
    """Whether the running backward will execute ``node`` (``torch._C._will_engine_execute_node``;
    it raises RuntimeError for a leaf that ``autograd.grad`` returns: see
    :func:`~noisy_label_sgd.engines.backward.asked`)."""
    return torch._C._will_engine_execute_node(node)


def saved_tensors_hooks_active() -> bool:
    """Whether default saved-tensor hooks are set now (the non-reentrant checkpoint sets them
    around its function): ``torch._C._autograd._top_saved_tensors_default_hooks``."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def inside_dcp_optimizer_init(depth: int = 8) -> bool:
    """Whether the caller runs inside ``torch.distributed.checkpoint.state_dict._init_optim_state``
    (``get_state_dict`` and ``set_state_dict`` call ``optimizer.step()`` there, with zero gradients
    and lr 0, when the optimizer has no state yet: SGD without momentum always), looked up on the
    Python stack within ``depth`` frames."""
    frame = sys._getframe(1)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code.co_name == "_init_optim_state" and \
                frame.f_globals.get("__name__") == "torch.distributed.checkpoint.state_dict":
            return True
        frame = frame.f_back
    return False


# GradientEdge carries an ownership token (torch 2.9 and later): an edge built from a node and an
# output index then keeps its tensor alive, with no view made to own the node
EDGES_OWNED = "ownership_token" in torch.autograd.graph.GradientEdge._fields


def version_of(t: torch.Tensor) -> int:
    """The in-place write counter of ``t`` (``Tensor._version``), shared with its views and with
    ``detach()`` (not with ``.data``): how a measurement sees a forward write a parameter or buffer."""
    return t._version


def is_fsdp_forward_hook(hook) -> bool:
    """Whether a module's forward (pre-)hook is one ``fully_shard`` registered: a method of its
    ``FSDPState``, or (for a group of modules sharded together) one under ``functools.wraps``
    decorators, followed down their ``__wrapped__`` chain."""
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    for _ in range(8):  # (the chain is two decorators deep on torch 2.13)
        if hook is None or isinstance(getattr(hook, "__self__", None), FSDPState):
            return hook is not None
        hook = getattr(hook, "__wrapped__", None)
    return False
