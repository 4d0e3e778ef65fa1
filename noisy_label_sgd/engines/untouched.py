"""A measurement leaves the model as it found it, even where its forward writes to itself.

Two kinds of forward write to the model in evaluation mode:

* ``nn.Embedding(max_norm=...)`` (``F.embedding`` / ``F.embedding_bag`` with ``max_norm``)
  renormalises the rows it looks up, in place, under no_grad; under vmap that write even fails.
  Inside a measurement the renormalisation is applied as a constant instead
  (:class:`RenormalisedAsConstant`): the table the operation reads has the renormalised values, and
  the gradient reaching the parameter is the lookup's, as in training, where the renormalised
  rows are the parameter itself; the user's table is not written.
* a buffer updated in ``forward`` (a counter, a running statistic of the user's own): in place, or
  by assigning a new tensor to the attribute. :func:`kept_as_found` puts back the tensor each
  buffer attribute held, and its values where they were written in place: which buffers a model
  writes, and whether it renormalises a table, is learned at its first measurement (when every
  buffer is copied once and every lookup watched), after which only those buffers are copied and
  the watch runs only where a table is renormalised.

Any other in-place write to a parameter (which the probe cannot undo without copying every
parameter) is refused after the fact with the parameter's name; a write through ``.data``, which
bypasses the version counter, is not seen.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .torch_internals import version_of

_SIGNATURES = {name: inspect.signature(getattr(nn.functional, name)) for name in ("embedding", "embedding_bag")}



@dataclass
class Writes:
    """What a model's forward was seen to write: buffers by name, and whether it renormalises a
    lookup table (then :class:`RenormalisedAsConstant` runs at every measurement)."""

    buffers: set[str] = field(default_factory=set)
    renormalises: bool = False


# per model, from its first measurement on (which copies every buffer and watches every lookup)
_WRITES: weakref.WeakKeyDictionary[nn.Module, Writes] = weakref.WeakKeyDictionary()


def renormalised(weight: torch.Tensor, max_norm: float, norm_type: float) -> torch.Tensor:
    """``weight`` with the values ``torch.embedding_renorm_`` would write in every row (rows with a
    norm above ``max_norm`` scaled by ``max_norm / (norm + 1e-7)``, computed in float64 as the
    kernel does), and the gradient of ``weight`` itself (the renormalisation a constant)."""
    constant = weight.detach()  # (detached, not no_grad: forward-mode AD ignores no_grad)
    norms = torch.linalg.vector_norm(constant, ord=norm_type, dim=-1, keepdim=True).double()
    scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
    values = constant * scale.to(weight.dtype)
    return values + (weight - weight.detach())  # (adds exact zeros: the values are the kernel's)


class RenormalisedAsConstant(TorchFunctionMode):
    """``F.embedding`` / ``F.embedding_bag`` with ``max_norm``: the lookup of the renormalised table
    (:func:`renormalised`) without the in-place write. Rows the input does not look up are
    renormalised too, which no output reads. ``used`` says whether it rewrote a call."""

    def __init__(self) -> None:
        super().__init__()
        self.used = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # (torch's functions: the engines replace theirs only through a mode of their own, above this one)
        name = next((name for name in _SIGNATURES if func is getattr(nn.functional, name)), None)
        if name is not None:
            bound = _SIGNATURES[name].bind(*args, **kwargs)
            bound.apply_defaults()
            max_norm = bound.arguments["max_norm"]
            if max_norm is not None:
                bound.arguments["weight"] = renormalised(bound.arguments["weight"], max_norm,
                                                         bound.arguments["norm_type"])
                bound.arguments["max_norm"] = None
                self.used = True
                return func(*bound.args, **bound.kwargs)
        return func(*args, **kwargs)


@contextmanager
def kept_as_found(model: nn.Module) -> Iterator[None]:
    """The block runs the model; afterwards every buffer holds what it held before (attribute and
    values), and a parameter written in place raises ValueError naming it."""
    buffers = [(owner, name, f"{prefix}{'.' if prefix else ''}{name}", tensor)
               for prefix, owner in model.named_modules() for name, tensor in owner._buffers.items()
               if tensor is not None]
    known = _WRITES.get(model)
    copies = {full: tensor.clone() for _, _, full, tensor in buffers if known is None or full in known.buffers}
    versions = [version_of(tensor) for *_, tensor in buffers]
    parameters = [(name, p, version_of(p)) for name, p in model.named_parameters()]
    writes = Writes() if known is None else known
    try:
        with ExitStack() as stack:
            if known is None or known.renormalises:
                renorm = stack.enter_context(RenormalisedAsConstant())
            yield
            if known is None:
                writes.renormalises = renorm.used
    finally:
        _put_back(buffers, versions, copies, writes)
        _WRITES[model] = writes
    changed = [name for name, p, version in parameters if version_of(p) != version]
    if changed:
        raise ValueError(
            f"the model's forward wrote parameter {changed[0]!r} in place during the measurement (a "
            "renormalisation or clamp under no_grad?), which the probe cannot undo; move the write out of forward "
            "(e.g. into an optimizer step hook)")


def _put_back(buffers, versions, copies, writes: Writes) -> None:
    """Each buffer attribute's original tensor, with its original values; the written buffers
    remembered."""
    for (owner, name, full, tensor), version in zip(buffers, versions):
        if owner._buffers.get(name) is not tensor:  # assigned anew: the original put back
            owner._buffers[name] = tensor
        if version_of(tensor) != version:
            writes.buffers.add(full)
            if full in copies:
                with torch.no_grad():
                    tensor.copy_(copies[full])
            else:
                warnings.warn(f"the model's forward wrote buffer {full!r}, which it had not written in an earlier "
                              "measurement: its values stay changed; it is restored from the next one on",
                              RuntimeWarning, stacklevel=4)
