"""What every engine assumes of a model, checked before one is chosen: its samples are independent,
every trainable parameter is used with gradients on, and none inside ``torch.utils.checkpoint``.

Per-sample gradients exist only where each sample's output depends on that sample alone. A forward
that normalises over the batch (BatchNorm without running statistics is refused by name in
:class:`~noisy_label_sgd.engines.functional.FunctionalModel`; a mean over dim 0 written out is
not) or depends on the batch size would make the engines disagree: torch.func's answer is a batch
of one's, a batched backward's the whole batch's. :func:`check_model` compares the outputs of the
first two samples run together with each run alone, and refuses where they differ.

A trainable parameter used under ``torch.no_grad()`` inside ``forward`` (a no_grad block, or the
reentrant ``torch.utils.checkpoint``, which runs its function without gradients) changes the
output while autograd sees no dependence: reg would silently leave it out. The non-reentrant
checkpoint keeps gradients but packs what its function saves with hooks that torch.func refuses
(every engine but the fast one needs it, and so does the projection). Checkpointing is a memory
schedule for training, and the measurement runs in evaluation mode, where Hugging Face models
already skip it: both kinds are refused with what to do. The same forward watches for all of it
(:class:`ParameterUses`).

Both are properties of the model's code, not of its parameters' values: checked once per model
and per-sample input signature (the model changed in place behind an unchanged signature is not
checked again).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..distributed import check_unsharded
from .finite import check_finite
from .functional import Batch, evaluation_mode, per_sample_outputs
from .torch_internals import saved_tensors_hooks_active

_CHECKED: weakref.WeakKeyDictionary[nn.Module, set] = weakref.WeakKeyDictionary()


def check_model(model: nn.Module, batch: Batch) -> None:
    """Refuse a model whose samples are not independent or that uses a trainable parameter under
    ``torch.no_grad()`` in its forward (in evaluation mode, as every engine measures).

    Raises:
        NotImplementedError: a model sharded across ranks (:func:`~noisy_label_sgd.distributed.check_unsharded`).
        ValueError: naming what mixes the samples or the module whose parameter has no gradient.
    """
    check_unsharded(model)  # (first: a sharded parameter fails the other checks' own ops)
    signature = (tuple((t.shape[1:], t.dtype, t.device) for t in batch),
                 tuple((p.shape, p.requires_grad) for p in model.parameters()))
    checked = _CHECKED.setdefault(model, set())
    if signature in checked:
        return
    check_finite(model, batch)  # (NaN would read as samples that depend on each other)
    with evaluation_mode(model):
        with ParameterUses(model) as uses:
            model(*(t[:1] for t in batch))
        if uses.checkpointed:
            raise ValueError(
                f"parameter {uses.checkpointed[0]!r} is used inside torch.utils.checkpoint (use_reentrant=False): "
                "torch.func, which the measurement needs, refuses its saved-tensor hooks. Checkpointing only "
                "schedules a training step's memory: probe the model with it off (a flag in your forward; Hugging "
                "Face models skip it in eval mode, as the probe runs)")
        if uses.without_grad:
            raise ValueError(
                f"parameter {uses.without_grad[0]!r} is used under torch.no_grad() inside the model's forward (a "
                "no_grad block, or the reentrant torch.utils.checkpoint, which runs its function without "
                "gradients): it changes the output but gets no gradient, so reg would leave it out. Freeze it "
                "(requires_grad_(False)), remove the no_grad block, or probe with checkpointing off")
        if batch[0].shape[0] >= 2:
            with torch.no_grad():
                together = per_sample_outputs(model(*(t[:2] for t in batch)), tuple(t[:2] for t in batch))
                alone = torch.cat([per_sample_outputs(model(*(t[i:i + 1] for t in batch)),
                                                      tuple(t[i:i + 1] for t in batch)) for i in range(2)])
            scale = torch.maximum(together.norm(), alone.norm()).clamp_min(torch.finfo(alone.dtype).tiny)
            differ = float((together - alone).norm() / scale)
            if not differ <= torch.finfo(alone.dtype).eps ** 0.5:  # (NaN too)
                raise ValueError(
                    f"the model's output for a sample depends on the other samples of the batch (samples 0 and 1 "
                    f"run together and alone differ by {differ:.2g}, relative): per-sample gradients are undefined. "
                    "A forward that normalises over the batch (a BatchNorm-like statistic over dim 0) or depends "
                    "on the batch size mixes the samples; use running statistics or per-sample normalisation "
                    f"(GroupNorm, LayerNorm). (The outputs' norm is {float(scale):.2g}: an output that is zero to "
                    "rounding, such as the mean of a LayerNorm's output over its features, differs by rounding "
                    "alone; probe a score that is not.)")
    checked.add(signature)


class ParameterUses(TorchFunctionMode):
    """The trainable parameters an op takes while gradients are off, or inside a checkpoint's
    saved-tensor hooks (their names, in order of first use)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.name_of = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
        self.without_grad: list[str] = []
        self.checkpointed: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # (metadata, .shape or .dtype, is no use: only an op with a tensor result enters the output)
        if not isinstance(result, torch.Tensor):
            return result
        seen = self.without_grad if not torch.is_grad_enabled() else \
            self.checkpointed if saved_tensors_hooks_active() else None
        if seen is not None:
            for t in (*args, *kwargs.values()):
                for tensor in (t if isinstance(t, (list, tuple)) else (t,)):
                    name = self.name_of.get(id(tensor))
                    if name is not None and name not in seen:
                        seen.append(name)
        return result
