"""The Hugging Face Trainer: the probe's report through ``Trainer.log``, and label noise in
``compute_loss``.

:class:`LabelNoiseTrainer` perturbs the ``labels`` of every training batch with a
:class:`~noisy_label_sgd.LabelNoise` stream that advances with the Trainer's optimizer: additive
noise for a regression head (float labels, ``num_labels=1`` and MSE), ``distribution="flip"`` for
class labels (cross-entropy). Evaluation batches (eval mode or no gradients) keep clean labels.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from transformers import Trainer, TrainerCallback

from ..noise import LabelNoise
from ..optim import add_label_noise, label_noise_of, remove_label_noise
from ..probe import ProbeReport, check_probe_and_period

__all__ = ["LabelNoiseTrainer", "ProbeCallback"]


class LabelNoiseTrainer(Trainer):
    """A :class:`transformers.Trainer` whose training labels get fresh noise at every step.

    Args:
        label_noise: the stream, e.g. ``LabelNoise(0.1, seed=0)`` for a regression head or
            ``LabelNoise(distribution="flip", p=0.2, num_classes=2)`` for classification. It is
            attached to the optimizer the Trainer builds (or the one passed in ``optimizers``),
            so it advances once per optimizer step and is saved in its checkpoints.
        *args, **kwargs: as for :class:`transformers.Trainer`.
    """

    def __init__(self, *args: Any, label_noise: LabelNoise, **kwargs: Any) -> None:
        if not isinstance(label_noise, LabelNoise):
            raise TypeError(f"label_noise must be a LabelNoise, got {type(label_noise).__name__}")
        super().__init__(*args, **kwargs)
        self.label_noise = label_noise

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(*args, **kwargs)
        if label_noise_of(optimizer) is None:
            previous = self.label_noise._optimizer() if self.label_noise._optimizer is not None else None
            if previous is not None:  # an optimizer this Trainer built before (another train() call)
                remove_label_noise(previous)
            add_label_noise(optimizer, noise=self.label_noise)
        elif label_noise_of(optimizer) is not self.label_noise:
            raise RuntimeError("the optimizer already carries another label-noise stream")
        return optimizer

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training and torch.is_grad_enabled() and inputs.get("labels") is not None:
            inputs = {**inputs, "labels": self.label_noise.perturb(inputs["labels"])}
        return super().compute_loss(model, inputs, *args, **kwargs)


class ProbeCallback(TrainerCallback):
    """Runs ``probe`` at the start of training and after every ``every``-th optimizer step and
    logs its :meth:`~noisy_label_sgd.ProbeReport.scalars` (as ``prefix/name``) with the
    Trainer's ``log``: they reach ``state.log_history`` and every reporting integration
    (TensorBoard, W&B, ...). Every process calls the probe (a distributed probe is a
    collective); ``Trainer.log`` reports from the main process.

    Attach with :meth:`attach` (the callback needs the Trainer to log through it).

    Args:
        probe: a :class:`~noisy_label_sgd.RegularizerProbe` of the model being trained.
        every: optimizer steps between probes.
        prefix: metric name prefix.
    """

    def __init__(self, probe: Callable[[], ProbeReport], every: int = 100, prefix: str = "implicit_reg") -> None:
        self.probe, self.every, self.prefix = probe, check_probe_and_period(probe, every), prefix
        self.trainer: Trainer | None = None
        self.last_report: ProbeReport | None = None

    def attach(self, trainer: Trainer) -> "ProbeCallback":
        """Add this callback to ``trainer``; returns it."""
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a transformers.Trainer, got {type(trainer).__name__}")
        self.trainer = trainer
        trainer.add_callback(self)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._log()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step % self.every == 0:
            self._log()

    def _log(self) -> None:
        if self.trainer is None:
            raise RuntimeError("ProbeCallback is not attached: use callback.attach(trainer)")
        self.last_report = self.probe()
        self.trainer.log({f"{self.prefix}/{name}": value for name, value in self.last_report.scalars().items()})
