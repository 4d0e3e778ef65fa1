"""Two ways to put label noise into a training loop: wrap the loss, or hook the model output.

Both draw noise only while training with gradients on: in ``eval()`` mode or under
``torch.no_grad()`` (validation) they leave the numbers alone and consume no draws.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .noise import LabelNoise

__all__ = ["NoisyLoss", "noisy_loss", "attach_output_noise"]


def _check_noise(noise: Any) -> LabelNoise:
    if not isinstance(noise, LabelNoise):
        raise TypeError(f"noise must be a LabelNoise, got {type(noise).__name__}")
    return noise


class NoisyLoss(nn.Module):
    """``criterion(output, noise.perturb(target))`` while training; ``criterion`` otherwise.

    For additive noise the output and target shapes must be equal (no silent broadcasting);
    for ``"flip"`` they must agree in the batch dimension.
    """

    def __init__(self, criterion: nn.Module | Any, noise: LabelNoise) -> None:
        super().__init__()
        if not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        self.criterion = criterion
        self.noise = _check_noise(noise)

    def forward(self, output: torch.Tensor, target: torch.Tensor, *args: Any, **kwargs: Any):
        if not isinstance(output, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(
                "noisy_loss expects (output, target) tensors, got "
                f"({type(output).__name__}, {type(target).__name__})"
            )
        if self.noise.is_additive and not target.is_floating_point():
            raise TypeError(
                f"integer targets ({target.dtype}) with {self.noise.distribution!r} noise: additive noise "
                "is for float targets; for class labels use LabelNoise(distribution='flip', p=..., "
                "num_classes=...)"
            )
        if self.noise.is_additive and output.shape != target.shape:
            raise ValueError(
                f"output shape {tuple(output.shape)} does not match target shape "
                f"{tuple(target.shape)}; label noise is added per target entry, so reshape one "
                "of them (e.g. output.squeeze(-1)) instead of relying on broadcasting"
            )
        if not self.noise.is_additive and output.shape[:1] != target.shape[:1]:
            raise ValueError(
                f"output batch size {output.shape[:1]} does not match target batch size "
                f"{target.shape[:1]}"
            )
        if self.training and torch.is_grad_enabled():
            target = self.noise.perturb(target)
        return self.criterion(output, target, *args, **kwargs)


def noisy_loss(criterion: nn.Module | Any, noise: LabelNoise) -> NoisyLoss:
    """Wrap a loss so that its target gets fresh label noise at every training step.

    Args:
        criterion: any ``loss(output, target, ...)``, e.g. ``nn.MSELoss()``.
        noise: the stream; its step counter is advanced by the optimizer integration
            (:class:`LabelNoiseSGD` or :func:`add_label_noise`).

    Example:
        >>> loss_fn = noisy_loss(nn.MSELoss(), noise)
        >>> loss_fn(model(x), y).backward()
    """
    return NoisyLoss(criterion, noise)


def attach_output_noise(model: nn.Module, noise: LabelNoise) -> RemovableHandle:
    r"""Forward hook: in training mode the model returns ``h(x) - eps``.

    For the squared loss, :math:`\|(h - \epsilon) - y\|^2 = \|h - (y + \epsilon)\|^2`, so the
    gradient is exactly the noisy-label gradient, with an unchanged loss function. The outputs
    you see in training mode then carry the noise; ``model.eval()`` or ``torch.no_grad()``
    gives clean outputs. Only additive distributions make sense here.

    Returns:
        a handle whose ``remove()`` detaches the hook.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    noise = _check_noise(noise)
    if not noise.is_additive:
        raise ValueError(
            "attach_output_noise subtracts additive noise from outputs; for class-label "
            "flipping use noisy_loss(criterion, LabelNoise(distribution='flip', ...))"
        )

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if not (module.training and torch.is_grad_enabled()):
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"attach_output_noise needs a model that returns a tensor, got "
                f"{type(output).__name__}; hook the submodule that produces the prediction"
            )
        return output - noise.sample(output)

    return model.register_forward_hook(hook)
