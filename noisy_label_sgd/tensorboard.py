r"""TensorBoardMonitor: log the implicit regularizer while training, from an optimizer step hook.

Theory printed beside the measurements (Blanc et al. 2020, Lemma 8 and Sec. 3.2, with this
library's loss normalisation). Train with ``nn.MSELoss()`` (mean over the :math:`B k` entries of a
batch of :math:`B` samples with :math:`k` outputs), learning rate :math:`\eta` and label noise of
standard deviation :math:`\sigma`. Near the zero-error manifold the label-noise part of the
gradient has covariance :math:`\frac{2\sigma^2}{Bk} H` with :math:`H = \frac{2}{nk} J^\top J` the
Hessian of the full loss. The normal directions then behave like an Ornstein-Uhlenbeck process with
stationary covariance :math:`\frac{\eta\sigma^2}{Bk} P_N`, and the mean drift along the manifold per
step is

.. math:: \Delta\theta_T \approx -\frac{\eta^2 \sigma^2}{B k^2}\, P_T \nabla \mathrm{reg}(\theta),

so the monitor logs ``predicted_drift_per_step`` :math:`= \eta^2\sigma^2 /(B k^2) \cdot`
``manifold_grad_norm``, and beside it ``observed_drift_per_step``: how far the parameters moved
since the previous probe along the previous probe's :math:`-P_T\nabla\mathrm{reg}` direction, per
step (a dot product; positive when they moved down reg). The Ornstein-Uhlenbeck spread puts the
clean mean squared error on the training set at
:math:`\mathbb{E}[\text{loss}] \approx \frac{\eta\sigma^2}{Bk}\cdot\frac{\mathrm{tr}\,K}{nk}
= \frac{\eta\sigma^2\,\mathrm{reg}}{B k^2}` (:math:`K = JJ^\top`, :math:`\mathrm{tr}\,K = n\,\mathrm{reg}`),
logged as ``predicted_probe_loss`` next to ``probe_loss`` (meaningful when the probe set is the
training set). With heavy-ball momentum :math:`\beta`, :math:`\eta` is replaced by the effective
step :math:`\eta / (1 - \beta)`. The predictions are first order in :math:`\eta` around the
manifold: ``examples/theory_check.py`` holds them against training where their assumptions hold.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch
from torch.utils.hooks import RemovableHandle
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams as hparams_summaries

from .arguments import check_positive_int
from .distributed import rank as process_rank
from .optim import label_noise_of
from .probe import ProbeReport, RegularizerProbe, check_probe_and_period

__all__ = ["TensorBoardMonitor"]

SCALARS = (
    "reg",
    "reg_grad_norm",
    "manifold_grad_norm",
    "normal_grad_norm",
    "manifold_fraction",
    "probe_loss",
    "probe_accuracy",
    "lr",
    "noise_std",
    "flip_p",
    "predicted_drift_per_step",
    "probe_seconds",
    "jacobian_rank",
    "observed_drift_per_step",
    "predicted_probe_loss",
)


def _open_log_dir(log_dir: str | os.PathLike) -> str:
    """Create ``log_dir`` and prove it writable now, not in the middle of training."""
    path = os.fspath(log_dir)
    if not path:
        raise ValueError("log_dir must be a non-empty path")
    try:
        os.makedirs(path, exist_ok=True)
        probe_file = os.path.join(path, ".write_test")
        with open(probe_file, "w") as f:
            f.write("ok")
        os.remove(probe_file)
    except OSError as e:
        raise ValueError(f"log_dir {path!r} is not a writable directory: {e.strerror or e}") from e
    return path


def _restart_clock(bar: Any) -> None:
    """Time a tqdm bar from now on: the first probe (at ``attach``) and the first step (first
    allocations, the engine's first measurement) take many steps' time and would otherwise set
    its first ETA (hours, on a run of minutes). The steps done so far stay counted, outside
    the rate."""
    if not hasattr(bar, "reset"):  # (another kind of bar: left as it is)
        return
    done = bar.n
    bar.reset(total=bar.total)
    bar.update(done)
    bar.last_print_n = done  # (the next rate is measured from here)


class TensorBoardMonitor:
    """Logs a :class:`RegularizerProbe` to TensorBoard every ``every`` optimizer steps.

    Scalars (under ``prefix``/): reg, reg_grad_norm, manifold_grad_norm, normal_grad_norm,
    manifold_fraction (= manifold / total), probe_loss (the clean loss on the probe set, if the
    probe has targets: MSE, or cross-entropy for class labels, with probe_accuracy), lr,
    noise_std (additive noise) or flip_p (class-label flips), predicted_drift_per_step and
    observed_drift_per_step, predicted_probe_loss (see the module docstring; for the MSE
    only), probe_seconds, jacobian_rank (the
    numerical rank of J the projection used, where a dense solver ran); a histogram of the
    per-sample :math:`\\|J_i\\|^2`; a custom-scalars layout that
    groups them; and hparams (lr, momentum, noise std, distribution, batch size) so that runs
    with and without noise compare side by side in the HPARAMS tab.

    Under torch.distributed every rank runs the probe (a collective: each passes its own shard)
    and only rank 0 writes events or shows a progress bar.

    The monitor changes nothing in training: the probe touches no parameter, gradient, mode or
    random state. A probe that fails (e.g. out of memory) is reported once as a warning; training
    goes on and later failures are counted in ``failures``.

    Args:
        probe: a RegularizerProbe (or any callable returning a ProbeReport).
        log_dir: directory for the event files (created; must be writable).
        writer: an existing SummaryWriter instead of ``log_dir`` (the monitor won't close it).
        every: log after every ``every``-th optimizer step.
        histograms: log the per-sample histogram.
        prefix: tag prefix.
        batch_size: training batch size B, for the drift prediction and hparams (default: the
            samples the label noise saw in the last step, summed over micro-batches; unknown
            before a step, when no drift is logged). The drift prediction is logged for
            SGD-type optimizers only.
        hparams: extra hyperparameters to record.
        progress: True for a tqdm progress bar (``total_steps`` long) showing the latest reg
            and loss, or an existing tqdm bar to update.
        total_steps: length of the progress bar.

    Example:
        >>> with TensorBoardMonitor(RegularizerProbe(model, x, y), log_dir="runs/exp") as monitor:
        ...     monitor.attach(opt)
        ...     train(...)
    """

    def __init__(
        self,
        probe: RegularizerProbe | Callable[[], ProbeReport],
        log_dir: str | os.PathLike | None = None,
        *,
        writer: SummaryWriter | None = None,
        every: int = 100,
        histograms: bool = True,
        prefix: str = "implicit_reg",
        batch_size: int | None = None,
        hparams: dict[str, Any] | None = None,
        progress: Any = False,
        total_steps: int | None = None,
    ) -> None:
        every = check_probe_and_period(probe, every)
        if (log_dir is None) == (writer is None):
            raise ValueError("pass exactly one of log_dir and writer")
        check_positive_int("batch_size", batch_size)
        check_positive_int("total_steps", total_steps)
        if not isinstance(prefix, str):
            raise TypeError(f"Invalid prefix: {prefix!r} (must be a str)")
        if hparams is not None and not isinstance(hparams, dict):
            raise TypeError(f"Invalid hparams: {hparams!r} (must be a dict name -> value)")
        self.probe = probe
        self.every = int(every)
        self.histograms = histograms
        self.prefix = prefix
        self.batch_size = batch_size
        self.extra_hparams = dict(hparams or {})
        self.is_writer = process_rank() == 0
        self._owns_writer = writer is None
        self.writer: SummaryWriter | None = None
        if self.is_writer:
            self.writer = SummaryWriter(_open_log_dir(log_dir)) if writer is None else writer
            self._write_layout()
        self._optimizer: torch.optim.Optimizer | None = None
        self._handle: RemovableHandle | None = None
        self._steps = 0
        self._hparams_written = False
        self._said_no_drift = False
        self._previous: tuple[int, torch.Tensor, torch.Tensor] | None = None  # (step, theta, P_T grad reg)
        self.failures = 0
        self.last_report: ProbeReport | None = None
        self._owns_bar = progress is True and self.is_writer
        self._bar = self._make_bar(progress if self.is_writer else False, total_steps)

    # -- wiring ---------------------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Log after every ``every``-th ``optimizer.step()``; returns the hook's handle.

        The probe runs once here and is logged at the current step (the starting point of the
        curves): a probe that cannot work raises now, in the caller's code, before training
        starts, instead of leaving an empty TensorBoard. (Distributed: every rank attaches.)
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._handle is not None:
            raise RuntimeError("this monitor is already attached to an optimizer")
        self._optimizer = optimizer
        try:
            self.log()
        except Exception:
            self._optimizer = None
            raise
        self._handle = optimizer.register_step_post_hook(self._after_step)
        return self._handle

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._steps += 1
        if self._bar is not None:
            self._bar.update(1)
            if self._steps == 1:
                _restart_clock(self._bar)
        step = self.global_step
        if step % self.every == 0:
            try:
                self.log(step)
            except Exception as error:  # a monitor must never stop training
                self.failures += 1
                if self.failures == 1:
                    warnings.warn(
                        f"TensorBoardMonitor: the probe failed at step {step} ({error!r}); training "
                        "continues, later failures are only counted in monitor.failures",
                        RuntimeWarning,
                        stacklevel=2,
                    )

    @property
    def global_step(self) -> int:
        """Completed optimizer steps: the label-noise step counter when there is one (so a
        resumed run continues its curves), else the steps seen by this monitor."""
        noise = label_noise_of(self._optimizer) if self._optimizer is not None else None
        return noise.step if noise is not None else self._steps

    # -- logging --------------------------------------------------------------------------------

    def log(self, step: int | None = None) -> ProbeReport:
        """Run the probe now and log it at ``step`` (default: the current global step)."""
        step = self.global_step if step is None else step
        report = self.probe()
        tag = lambda name: f"{self.prefix}/{name}"
        values = report.scalars()
        values.update(self._training_values(report))
        values.update(self._observed_drift(report, step))
        self.last_report = report
        if self.writer is None:  # not rank 0: the probe ran (a collective), nothing to write
            return report
        for name, value in values.items():
            self.writer.add_scalar(tag(name), value, step)
        if self.histograms:
            self.writer.add_histogram(tag("per_sample_sq_grad_norm"), report.per_sample.float().cpu(), step)
        if not self._hparams_written and (self._optimizer is None or self._steps > 0):  # (B seen)
            self._write_hparams(report)
        if self._bar is not None:
            postfix = {"reg": f"{report.reg:.4g}"}
            if report.loss is not None:
                postfix["loss"] = f"{report.loss:.3g}"
            self._bar.set_postfix(postfix, refresh=False)
        return report

    def _observed_drift(self, report: ProbeReport, step: int) -> dict[str, float]:
        """The parameters' displacement since the previous probe along that probe's
        -P_T grad reg direction, per step; kept: the parameters and direction of this probe."""
        model = getattr(self.probe, "model", None)
        if model is None or report.manifold_grad is None:
            return {}
        with torch.no_grad():
            theta = torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad])
        values = {}
        if self._previous is not None and step > self._previous[0]:
            previous_step, previous_theta, direction = self._previous
            if direction.norm() > 0 and previous_theta.shape == theta.shape:
                moved = -(theta - previous_theta).to(direction.dtype).dot(direction) / direction.norm()
                values["observed_drift_per_step"] = float(moved) / (step - previous_step)
        self._previous = (step, theta, report.manifold_grad)  # (theta: a new tensor, from cat)
        return values

    def _batch_size(self) -> int | None:
        """B: as given, else the samples the label noise saw in the last step (summed over
        micro-batches); None before a step (or without label noise)."""
        noise = label_noise_of(self._optimizer) if self._optimizer is not None else None
        seen = noise.samples_last_step if noise is not None else 0
        return self.batch_size or seen or None

    def _training_values(self, report: ProbeReport) -> dict[str, float]:
        """lr, noise std and the theory's drift prediction, from the attached optimizer."""
        if self._optimizer is None:
            return {}
        group = self._optimizer.param_groups[0]
        lr = float(group["lr"])
        values = {"lr": lr}
        noise = label_noise_of(self._optimizer)
        if noise is not None and not noise.is_additive:
            values["flip_p"] = float(noise.p)
        elif noise is not None:
            sigma = noise.current_std()
            values["noise_std"] = sigma
            if isinstance(self._optimizer, torch.optim.SGD):
                if self._batch_size() is None:  # (at attach(), before a step showed B)
                    return values
                step_size = lr / (1.0 - float(group.get("momentum", 0.0) or 0.0))
                scale = step_size * sigma**2 / (self._batch_size() * report.outputs_per_sample**2)
                values["predicted_drift_per_step"] = step_size * scale * report.manifold_grad_norm
                if report.loss_function != "cross_entropy":  # (an MSE prediction)
                    values["predicted_probe_loss"] = scale * report.reg
            elif not self._said_no_drift:
                self._said_no_drift = True
                warnings.warn(
                    f"TensorBoardMonitor: predicted_drift_per_step is derived for SGD (momentum folded "
                    f"into the step size); {type(self._optimizer).__name__} rescales each step, so it is "
                    "not logged (reg and the manifold gradient still are)",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return values

    def _write_layout(self) -> None:
        t = lambda *names: [f"{self.prefix}/{n}" for n in names]
        self.writer.add_custom_scalars(
            {
                "implicit regularizer": {
                    "reg(theta)": ["Multiline", t("reg")],
                    "grad reg: total, manifold (tangent), normal": [
                        "Multiline", t("reg_grad_norm", "manifold_grad_norm", "normal_grad_norm")],
                    "manifold / total": ["Multiline", t("manifold_fraction")],
                    "numerical rank of J (the projection's)": ["Multiline", t("jacobian_rank")],
                    "drift per step along the manifold: predicted, observed": [
                        "Multiline", t("predicted_drift_per_step", "observed_drift_per_step")],
                },
                "training": {
                    "clean probe loss, and its Ornstein-Uhlenbeck prediction": [
                        "Multiline", t("probe_loss", "predicted_probe_loss")],
                    "probe accuracy (class labels)": ["Multiline", t("probe_accuracy")],
                    "learning rate, noise std or flip probability": ["Multiline", t("lr", "noise_std", "flip_p")],
                    "probe seconds": ["Multiline", t("probe_seconds")],
                },
            }
        )

    def _write_hparams(self, report: ProbeReport) -> None:
        params: dict[str, Any] = {"probe_every": self.every}
        if self._batch_size() is not None:
            params["batch_size"] = self._batch_size()
        if self._optimizer is not None:
            group = self._optimizer.param_groups[0]
            params["lr"] = float(group["lr"])
            params["momentum"] = float(group.get("momentum", 0.0) or 0.0)
            noise = label_noise_of(self._optimizer)
            if noise is not None:
                params["noise_distribution"] = noise.distribution
                if noise.is_additive:
                    params["noise_std"] = noise.current_std()
                else:
                    params["flip_p"] = float(noise.p or 0.0)
            else:
                params["noise_std"] = 0.0
        params.update(self.extra_hparams)
        metrics = {f"{self.prefix}/{name}": 0.0 for name in ("reg", "manifold_grad_norm", "probe_loss")}
        writer = self.writer._get_file_writer()
        for summary in hparams_summaries(params, metrics):
            writer.add_summary(summary)
        self._hparams_written = True

    # -- progress bar and closing ---------------------------------------------------------------

    @staticmethod
    def _make_bar(progress: Any, total_steps: int | None):
        if progress is False or progress is None:
            return None
        if progress is True:
            try:
                from tqdm.auto import tqdm
            except ImportError as e:
                raise ImportError("progress=True needs tqdm: pip install tqdm") from e
            return tqdm(total=total_steps, unit="step")
        if not (hasattr(progress, "update") and hasattr(progress, "set_postfix")):
            raise TypeError(f"progress must be a bool or a tqdm bar, got {type(progress).__name__}")
        return progress

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Detach from the optimizer, flush, and close what the monitor opened."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.writer is not None:
            self.writer.flush()
            if self._owns_writer:
                self.writer.close()
        if self._owns_bar:
            self._bar.close()

    def __enter__(self) -> "TensorBoardMonitor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorBoardMonitor(every={self.every}, prefix={self.prefix!r}, step={self.global_step})"
