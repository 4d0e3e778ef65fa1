"""PyTorch Lightning: the probe's report through the Trainer's own loggers.

Label noise needs nothing Lightning-specific: give the optimizer that ``configure_optimizers``
builds a stream with :func:`~noisy_label_sgd.add_label_noise` and wrap the loss with
:func:`~noisy_label_sgd.noisy_loss`. Lightning steps with a closure that runs
``training_step``; the stream advances once per optimizer step and a closure evaluated twice
sees the same noise. ``optimizer.state_dict()`` carries the stream, so Lightning's checkpoints
resume it. See the README for a complete module.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

from lightning.pytorch import Callback, LightningModule, Trainer

from ..probe import ProbeReport, check_probe_and_period

__all__ = ["ProbeCallback"]

# Lightning 2.6's own pytree copy builds torch's deprecated ``LeafSpec`` on every training step
# (torch >= 2.13 warns); the warning is Lightning's, not the user's, and says nothing they can act
# on. Silenced for that one module only.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


class ProbeCallback(Callback):
    """Runs ``probe`` at the start of training and after every ``every``-th optimizer step, and
    logs its :meth:`~noisy_label_sgd.ProbeReport.scalars` (as ``prefix/name``) to every logger of
    the Trainer at the global step, from global rank zero only. Under DDP every rank calls the
    probe (a distributed probe is a collective: each rank passes its shard).

    The probes after optimizer steps are also logged with ``LightningModule.log`` (``on_step``,
    not to the loggers a second time), so ``trainer.callback_metrics["implicit_reg/reg"]`` holds
    the latest value and can drive ``ModelCheckpoint(monitor=...)`` or ``EarlyStopping`` (give
    them the same period, e.g. ``every_n_train_steps=every``). The probe at the start of
    training goes to the loggers only: Lightning allows no step metrics in ``on_train_start``.

    Args:
        probe: a :class:`~noisy_label_sgd.RegularizerProbe` of the module being trained (or its
            inner network: the same parameters).
        every: optimizer steps between probes (gradient accumulation: once per optimizer step).
        prefix: metric name prefix.
    """

    def __init__(self, probe: Callable[[], ProbeReport], every: int = 100, prefix: str = "implicit_reg") -> None:
        self.probe, self.every, self.prefix = probe, check_probe_and_period(probe, every), prefix
        self.last_report: ProbeReport | None = None
        self._logged_step: int | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # (with gradient accumulation several batches end at one global step: probe once)
        if trainer.global_step % self.every == 0 and trainer.global_step != self._logged_step:
            metrics = self._log(trainer)
            for name, value in metrics.items():
                # a distributed probe reduces over ranks: every rank holds the same numbers, no sync
                pl_module.log(name, value, on_step=True, on_epoch=False, logger=False, batch_size=1)

    def _log(self, trainer: Trainer) -> dict[str, float]:
        step = trainer.global_step
        self.last_report = self.probe()
        self._logged_step = step
        metrics = {f"{self.prefix}/{name}": value for name, value in self.last_report.scalars().items()}
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        return metrics
