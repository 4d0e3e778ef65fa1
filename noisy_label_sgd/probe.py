"""RegularizerProbe: reg, grad reg and its manifold component for a model on a fixed probe set."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .arguments import is_int
from .distributed import all_gather_cat, all_reduce_sum, is_distributed
from .engines import Engine, select_engine
from .engines.functional import (FunctionalModel, Inputs, as_input_tuple, check_chunk_size, check_memory_budget,
                                 evaluation_mode, per_sample_outputs, unwrapped)
from .engines.finite import check_finite
from .engines.select import check_method
from .engines.tangent import check_solver, project
from .sharded import sharded

__all__ = ["RegularizerProbe", "ProbeReport"]

LOSSES = ("auto", "mse", "cross_entropy")
IGNORE_INDEX = -100  # (nn.CrossEntropyLoss's default: labels equal to it are left out)


@dataclass(frozen=True)
class ProbeReport:
    """What the probe measured at the current parameters.

    Attributes:
        reg: :math:`\\frac1n \\sum_i \\|J_i\\|_F^2`.
        reg_grad_norm: :math:`\\|\\nabla \\mathrm{reg}\\|`.
        manifold_grad_norm: :math:`\\|P_T \\nabla \\mathrm{reg}\\|`, the part tangent to the
            zero-error manifold: the direction label noise drifts along (zero at a stable point).
        normal_grad_norm: :math:`\\|\\nabla \\mathrm{reg} - P_T \\nabla \\mathrm{reg}\\|`.
        loss: the clean loss on the probe set (``None`` without targets): the mean squared
            error, or for class labels the cross-entropy of the logits (see ``loss_function``).
        loss_function: ``"mse"`` or ``"cross_entropy"`` (``None`` without targets).
        accuracy: for class labels, the fraction of probe samples (targets other than the
            ignore index) whose largest logit is the label's; ``None`` otherwise.
        per_sample: :math:`\\|J_i\\|_F^2` per sample, shape [n].
        manifold_grad: :math:`P_T \\nabla \\mathrm{reg}` itself, flat over the trainable
            parameters in ``named_parameters()`` order (the direction the drift takes, with a
            minus sign).
        outputs_per_sample: k, the number of output entries per sample.
        jacobian_rank: the numerical rank of J the projection used (singular values kept
            above the cutoff, :func:`~noisy_label_sgd.engines.tangent.default_rcond`); ``None``
            where LSQR ran (no spectrum formed).
        smallest_kept_singular_ratio: the smallest singular value kept over the largest: how
            close the answer sits to the cutoff (near it, the manifold gradient depends on
            where the cutoff is); ``None`` with LSQR.
        method: the path that computed the norms: "jacobian" (a small J formed whole, which
            also gives grad reg and the projection), "fast", "fast (per-module fallback: ...)"
            or "vmap" (torch.func per sample; where J fits the dense solver, the J that grad
            reg's forward-over-reverse forms gives the norms and the projection too).
        seconds: wall time of the measurement.
    """

    reg: float
    reg_grad_norm: float
    manifold_grad_norm: float
    normal_grad_norm: float
    loss: float | None
    per_sample: torch.Tensor = field(repr=False)
    outputs_per_sample: int
    method: str
    seconds: float
    jacobian_rank: int | None = None
    smallest_kept_singular_ratio: float | None = None
    manifold_grad: torch.Tensor | None = field(default=None, repr=False)
    loss_function: str | None = None
    accuracy: float | None = None

    @property
    def manifold_fraction(self) -> float:
        """manifold_grad_norm / reg_grad_norm (0 when grad reg vanishes)."""
        return self.manifold_grad_norm / self.reg_grad_norm if self.reg_grad_norm > 0 else 0.0

    def scalars(self) -> dict[str, float]:
        """The numbers a logger records, by the names every integration logs them under."""
        values = {
            "reg": self.reg,
            "reg_grad_norm": self.reg_grad_norm,
            "manifold_grad_norm": self.manifold_grad_norm,
            "normal_grad_norm": self.normal_grad_norm,
            "manifold_fraction": self.manifold_fraction,
            "probe_seconds": self.seconds,
        }
        if self.loss is not None:
            values["probe_loss"] = self.loss
        if self.accuracy is not None:
            values["probe_accuracy"] = self.accuracy
        if self.jacobian_rank is not None:
            values["jacobian_rank"] = self.jacobian_rank
        return values


def check_probe_and_period(probe: object, every: int) -> int:
    """What every logger of the probe takes (the monitor, the trainer callbacks): a callable
    probe and a period of at least one optimizer step; returns the period as an int."""
    if isinstance(probe, nn.Module):  # (a module is callable too: the usual slip)
        raise TypeError(
            f"probe must be a RegularizerProbe, got the module {type(probe).__name__}; wrap it: "
            "RegularizerProbe(model, probe_inputs)")
    if not callable(probe):
        raise TypeError(f"probe must be a RegularizerProbe, got {type(probe).__name__}")
    if not is_int(every) or every < 1:
        raise ValueError(f"Invalid every: {every!r} (must be an int >= 1)")
    return int(every)


class RegularizerProbe:
    """Measures the implicit regularizer of ``model`` on a fixed probe set, on demand.

    The probe keeps a reference to the model and reads its current parameters at every call.
    Under torch.distributed (a DistributedDataParallel model, or any model once a process group
    is initialised) every rank passes its own shard of the probe set and must call the probe
    together: reg, grad reg, the projection (distributed LSQR) and the loss are
    those of the union of the shards, identical on every rank, and ``per_sample`` holds the
    union in rank order. A model sharded by FSDP is measured through an unsharded replica whose
    parameters are gathered at every call (:mod:`noisy_label_sgd.sharded`: one full copy of the
    parameters per rank); ``manifold_grad`` is then flat over the whole parameters.
    The model is evaluated in eval mode (BatchNorm on running statistics, dropout off: samples
    are independent); the call changes no parameter, mode, gradient or random state.

    Args:
        model: any module returning a tensor of predictions with a leading sample dimension.
        inputs: probe inputs, a tensor [n, ...] or a sequence of tensors (the model's args).
        targets: optional targets [n, ...] for the clean probe loss: floating point for the
            mean squared error against the outputs, or integer class labels for the
            cross-entropy of the outputs as logits (``nn.CrossEntropyLoss``'s convention: logits
            [n, C] for labels [n], [n, C, d...] for [n, d...]; labels equal to -100 ignored);
            the report then also has the accuracy. reg is that of the outputs either way: for
            a classifier, of all C logits.
        loss: ``"auto"`` (the mean squared error for float targets, cross-entropy for
            integer class labels), ``"mse"`` or ``"cross_entropy"``.
        method, chunk_size, memory_budget: see :func:`per_sample_sq_grad_norms`.
        solver: tangent projection solver, ``"auto"``, ``"dense"`` or ``"lsqr"``.

    Example:
        >>> probe = RegularizerProbe(model, x_train, y_train)
        >>> report = probe()
        >>> report.reg, report.manifold_grad_norm
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        targets: torch.Tensor | None = None,
        *,
        method: str = "auto",
        chunk_size: int | None = None,
        solver: str = "auto",
        memory_budget: int | None = None,
        loss: str = "auto",
    ) -> None:
        check_method(method)
        if not isinstance(loss, str) or loss not in LOSSES:
            raise ValueError(f"Invalid loss: {loss!r} (choose one of {LOSSES})")
        model = unwrapped(model)
        self.inputs = as_input_tuple(inputs)
        n = self.inputs[0].shape[0]
        if targets is not None:
            if not isinstance(targets, torch.Tensor):
                raise TypeError(f"targets must be a tensor, got {type(targets).__name__}")
            if targets.dim() == 0:
                raise ValueError(f"targets need a leading sample dimension of size {n}, got a 0-dim tensor")
            if targets.shape[0] != n:
                raise ValueError(
                    f"inputs have {n} samples but targets have {targets.shape[0]}"
                )
        check_solver(solver)
        check_chunk_size(chunk_size)
        check_memory_budget(memory_budget)
        # an FSDP model is measured through its unsharded replica, gathered before each measurement
        self._shards = sharded(model)
        if self._shards is not None:
            model = self._shards.gather()
        if targets is not None and targets.is_floating_point() and not bool(torch.isfinite(targets).all()):
            raise ValueError("the probe targets contain NaN or Inf values")
        FunctionalModel(model)  # the model's own errors, at construction
        check_finite(model, self.inputs)  # (again at every measurement: the parameters change)
        self.model = model
        self.loss_function: str | None = None
        self._output_shape: torch.Size | None = None  # one sample's output, as the model returns it
        self.targets = None if targets is None else self._checked_targets(targets, loss)
        self.method = method
        self.chunk_size = chunk_size
        self.solver = solver
        self.memory_budget = memory_budget
        self._engine: Engine | None = None

    def _checked_targets(self, targets: torch.Tensor, loss: str) -> torch.Tensor:
        """The targets as the clean loss will use them, checked now against one forward of the
        first probe sample (a probe that cannot work fails here, in the user's code, not as a
        warning from inside an optimizer step), on the model's device: for the mean squared
        error floating point, as many entries per sample as the model outputs, in its output
        dtype; for cross-entropy integer labels in [0, C) (or the ignore index) that
        ``nn.functional.cross_entropy`` takes beside the model's output."""
        with evaluation_mode(self.model), torch.no_grad():
            raw = self.model(*(t[:1] for t in self.inputs))
            out = per_sample_outputs(raw, tuple(t[:1] for t in self.inputs))
        if targets.device != out.device:
            raise ValueError(f"targets are on {targets.device} but the model's outputs on {out.device}")
        self._output_shape = raw.shape[1:]
        k = out.shape[1]
        integer = not targets.is_floating_point() and not targets.is_complex() and targets.dtype != torch.bool
        self.loss_function = ("cross_entropy" if integer else "mse") if loss == "auto" else loss
        if self.loss_function == "mse":
            if not targets.is_floating_point():
                raise TypeError(
                    f"targets have dtype {targets.dtype}, but the probe's loss is the mean squared error "
                    f"against the model's {k} outputs per sample: pass floating-point targets of that "
                    "shape, or integer class labels with loss='auto' or 'cross_entropy'"
                )
            if targets[0].numel() != k:
                raise ValueError(f"targets have {targets[0].numel()} entries per sample but the model outputs {k}")
            return targets.to(out.dtype)
        if not integer:
            raise TypeError(f"loss='cross_entropy' takes integer class labels, got targets of dtype {targets.dtype}")
        if raw.dim() < 2 or tuple(targets.shape[1:]) != tuple(raw.shape[2:]):
            raise ValueError(
                f"class labels of shape [n, {', '.join(map(str, targets.shape[1:]))}] need logits of shape "
                f"[n, C{''.join(f', {d}' for d in targets.shape[1:])}] (nn.CrossEntropyLoss's convention); "
                f"the model outputs [n, {', '.join(map(str, raw.shape[1:]))}]"
            )
        classes = raw.shape[1]
        labels = targets.long()
        if not bool(((labels >= 0) & (labels < classes) | (labels == IGNORE_INDEX)).all()):
            raise ValueError(f"class labels must lie in [0, {classes}) (or be {IGNORE_INDEX}, ignored), the "
                             f"model's {classes} logits")
        return labels

    @property
    def num_samples(self) -> int:
        return self.inputs[0].shape[0]

    @property
    def engine(self) -> Engine:
        """The engine that measures the model, chosen at the first call and kept
        (:func:`~noisy_label_sgd.engines.select_engine`)."""
        if self._engine is None:
            self._engine = select_engine(
                self.model, self.inputs, self.method, chunk_size=self.chunk_size, memory_budget=self.memory_budget,
                dense_projection=self.solver != "lsqr" and not is_distributed())
        return self._engine

    def __call__(self) -> ProbeReport:
        """Measure reg, grad reg and its tangent and normal parts (and the clean loss, with
        targets) at the model's current parameters; see :class:`ProbeReport`. Changes no
        parameter, gradient, mode or random state; works under the caller's no_grad or
        inference mode."""
        start = time.perf_counter()
        distributed = is_distributed()
        if self._shards is not None:
            self._shards.gather()
        engine = self.engine
        with engine.measuring():
            fm = engine.fm
            per_sample, reg_grad = engine.norms_and_grad()
            grad_flat = fm.flatten(reg_grad)
            if distributed:  # local means -> the mean over the union of the shards
                n_local = self.num_samples
                n_total = int(all_reduce_sum(torch.tensor(float(n_local))).item())
                per_sample = all_gather_cat(per_sample)
                grad_flat = all_reduce_sum(grad_flat * n_local) / n_total
            projection = project(engine, grad_flat, solver=self.solver,
                                 all_reduce=all_reduce_sum if distributed else None)
            manifold_flat = projection.vector
            loss, accuracy = (None, None) if self.targets is None else self._clean_loss(fm, engine.measurement.outputs)
        numbers = [per_sample.mean(), grad_flat.norm(), manifold_flat.norm(), (grad_flat - manifold_flat).norm()]
        dense = projection.rank is not None
        if dense:
            numbers += [projection.rank, projection.smallest_kept_ratio]
        # one conversion to Python numbers (one device sync on a GPU)
        reg, grad_norm, manifold_norm, normal_norm, *spectrum = torch.stack(
            [t.to(device=grad_flat.device, dtype=torch.float64) for t in numbers]).tolist()
        return ProbeReport(
            reg=reg,
            reg_grad_norm=grad_norm,
            manifold_grad_norm=manifold_norm,
            normal_grad_norm=normal_norm,
            loss=loss,
            per_sample=per_sample,
            outputs_per_sample=engine.k,
            method=engine.method,
            seconds=time.perf_counter() - start,
            jacobian_rank=int(spectrum[0]) if dense else None,
            smallest_kept_singular_ratio=spectrum[1] if dense else None,
            manifold_grad=manifold_flat.detach(),
            loss_function=self.loss_function,
            accuracy=accuracy,
        )

    def _clean_loss(self, fm: FunctionalModel, out: torch.Tensor | None) -> tuple[float, float | None]:
        """The clean loss (and for class labels the accuracy) over every target of the (union
        of the) probe set(s), from the outputs ``out`` [n, k] when already at hand."""
        assert self.targets is not None and self._output_shape is not None
        with torch.no_grad():
            if out is None:
                out = fm.batch_output(fm.params, self.inputs)
            if self.loss_function == "mse":
                sums = [(out - self.targets.reshape(out.shape)).pow(2).sum(), out.new_tensor(float(out.numel()))]
            else:
                logits = out.reshape(out.shape[0], *self._output_shape)
                counted = self.targets != IGNORE_INDEX
                correct = (logits.argmax(1) == self.targets) & counted
                sums = [nn.functional.cross_entropy(logits, self.targets, reduction="sum", ignore_index=IGNORE_INDEX),
                        counted.sum().to(out.dtype), correct.sum().to(out.dtype)]
            sums = torch.stack(sums).to(torch.float64)
            if is_distributed():
                sums = all_reduce_sum(sums)
            totals = sums.tolist()  # (one host sync for all of them)
        count = max(totals[1], 1.0)
        return totals[0] / count, (totals[2] / count if len(totals) > 2 else None)

    def __repr__(self) -> str:
        return (
            f"RegularizerProbe({type(self.model).__name__}, n={self.num_samples}, "
            f"solver={self.solver!r})"
        )
