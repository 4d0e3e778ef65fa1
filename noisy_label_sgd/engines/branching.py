"""Whether a model's forward reads a tensor's values on the host under ``vmap`` (``if
mask.all():``, ``.item()``): torch.func cannot batch that, and says so in a RuntimeError that
carries nothing but its message. So the engines ask the forward itself, after a failure: one
vmapped forward of two samples under :class:`ValueReads`, which sees every such read of a
batched tensor."""

from __future__ import annotations

import torch
from torch.func import vmap
from torch.overrides import TorchFunctionMode

from .functional import Batch, FunctionalModel
from .torch_internals import is_batched

# Tensor methods that hand a value to Python: under vmap each of them needs one sample's value
HOST_READS = frozenset({torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__,
                        torch.Tensor.__float__, torch.Tensor.__index__})


class _BatchedValueRead(Exception):
    """Raised by :class:`ValueReads` at the first read (the forward cannot go on past it)."""


class ValueReads(TorchFunctionMode):
    """Raises :class:`_BatchedValueRead` where the forward reads a batched tensor's value."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS and args and isinstance(args[0], torch.Tensor) and is_batched(args[0]):
            raise _BatchedValueRead(func.__name__)
        return func(*args, **(kwargs or {}))


def reads_values_under_vmap(fm: FunctionalModel, batch: Batch) -> bool:
    """Whether the model's forward, vmapped per sample over (up to) two samples of ``batch``,
    reads a batched tensor's value on the host."""
    two = tuple(t[:2] for t in batch)
    try:
        with ValueReads():
            vmap(fm.sample_output, in_dims=(None,) + (0,) * len(two))(fm.params, *two)
    except _BatchedValueRead:
        return True
    except RuntimeError:  # (another failure: not this question's to explain)
        return False
    return False
