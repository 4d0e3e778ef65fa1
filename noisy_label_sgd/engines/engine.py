r"""The interface every measurement engine answers, for one model and one probe set.

An engine is chosen once per (model, probe inputs) by :func:`~noisy_label_sgd.engines.select.select_engine`
and then asked, inside ``with engine.measuring():`` (the model in evaluation mode, the
parameters read as they are now), any of:

* :meth:`Engine.sq_norms`: per-sample :math:`\|J_i\|_F^2`, shape [n];
* :meth:`Engine.grad`: :math:`\nabla\mathrm{reg}` as a dict over the trainable parameters;
* :meth:`Engine.norms_and_grad`: both, sharing one pass where the engine can;
* :meth:`Engine.J_times` / :meth:`Engine.J_transpose_times`: :math:`Jv` and :math:`J^\top u`
  (matrix-free, or with a J the measurement already formed);
* :meth:`Engine.gram`: :math:`K = JJ^\top` (float64) where the engine has it in closed form
  without J, else None; :meth:`Engine.gram_by_layers`: K from each layer's per-sample
  gradients, a block at a time (for a J too large to form); :meth:`Engine.jacobian` forms J [n k, p] by torch.func and keeps it
  (``measurement.jacobian``: a J the engine formed anyway).

What an engine learns about the model and the probe set (the outputs per sample k, the fast
path's sizing, whether it had to fall back) it keeps for the next measurement; what depends on
the parameters (a formed J, the outputs) lives only for one ``measuring()`` block.
The tangent-space solvers (:mod:`~noisy_label_sgd.engines.tangent`) use only this interface.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import jacrev, vmap

from .branching import reads_values_under_vmap
from .finite import check_finite
from .functional import Batch, FunctionalModel, ParamDict, chunks_of, evaluation_mode

# Above this many rows of J an eigendecomposition of K = J J^T costs too much: J is not formed
# for the dense solver, and the projection runs LSQR instead.
JACOBIAN_MAX_ROWS = 8192


class Measurement:
    """What one ``measuring()`` block holds: the parameters as read at its start, and what the
    engine formed from them (J, the outputs) for the later questions of the same block."""

    def __init__(self, fm: FunctionalModel) -> None:
        self.fm = fm
        self.jacobian: torch.Tensor | None = None
        self.outputs: torch.Tensor | None = None


class Engine:
    """Base class: the torch.func answers every engine can fall back on (J formed per sample,
    jvp/vjp products); subclasses answer norms and grad reg their own way.

    Args:
        model: the module measured (its current parameters at every measurement).
        batch: the probe inputs, a tuple of tensors with a shared first dimension n.
        chunk_size: samples per chunk (None: as many as fit ``memory_budget``).
        memory_budget: bytes of per-sample Jacobians or layer gradients held at once.
        k: the outputs per sample, where the selection already ran the model for them.
    """

    method = "?"  # the word in ProbeReport.method

    def __init__(self, model: nn.Module, batch: Batch, chunk_size: int | None, memory_budget: int,
                 *, k: int | None = None) -> None:
        self.model, self.batch = model, batch
        self.chunk_size, self.memory_budget = chunk_size, memory_budget
        self.num_samples = batch[0].shape[0]
        self.k = k  # outputs per sample: learned at the first measurement (parameters don't change it)
        self.rows = None if k is None else self.num_samples * k  # of J: n k
        # samples per chunk of the matrix-free products, where the engine knows its activations'
        # size (a jvp or vjp holds a chunk's forward and backward, never a per-sample Jacobian)
        self.product_chunk_size: int | None = None
        self.helpers: list[Engine] = []  # engines this one delegates to, sharing its measurement
        self.measurement: Measurement | None = None
        self.fm: FunctionalModel | None = None  # the measurement's, for short

    @contextmanager
    def measuring(self) -> Iterator[Engine]:
        """Evaluation mode, the parameters read now; what was formed is dropped at the end."""
        with evaluation_mode(self.model):
            check_finite(self.model, self.batch)
            measurement = Measurement(FunctionalModel(self.model))
            for engine in (self, *self.helpers):
                engine.measurement, engine.fm = measurement, measurement.fm
            if self.k is None:
                self.k = self.output_size()
                self.rows = self.num_samples * self.k
            for helper in self.helpers:
                helper.k, helper.rows = self.k, self.rows
            try:
                yield self
            except RuntimeError as error:
                # (asked of the forward, not of the message; never an out-of-memory error)
                if isinstance(error, torch.OutOfMemoryError) or not reads_values_under_vmap(measurement.fm,
                                                                                            self.batch):
                    raise
                raise ValueError(
                    "torch.func cannot vmap this model per sample: its forward branches on the values "
                    "of a tensor (data-dependent control flow, e.g. transformers' check of "
                    "attention_mask.all()); method='auto' or 'fast' run the forward on whole batches"
                ) from error
            finally:
                for engine in (self, *self.helpers):
                    engine.measurement = engine.fm = None

    def output_size(self) -> int:
        """k, from a one-sample forward without gradients."""
        return self.fm.output_size(self.batch)

    def jacobian_fits(self) -> bool:
        """Whether J fits the memory budget and is small enough for a dense solve."""
        return self.rows <= JACOBIAN_MAX_ROWS and self.fm.jacobian_fits(self.rows, self.memory_budget)

    def chunks(self, copies: int = 1) -> list[Batch]:
        """The probe set in chunks whose ``copies`` per-sample Jacobians fit the budget."""
        return chunks_of(self.batch, self.fm.chunk_size(self.k, self.chunk_size, self.memory_budget, copies))

    def product_chunks(self) -> list[Batch]:
        """The probe set in chunks for the matrix-free products J v and J^T u: by
        ``product_chunk_size`` where the engine set it, else as :meth:`chunks`."""
        if self.product_chunk_size is None:
            return self.chunks()
        return chunks_of(self.batch, self.product_chunk_size)

    # -- the questions -------------------------------------------------------------------------

    def sq_norms(self) -> torch.Tensor:
        raise NotImplementedError

    def grad(self) -> ParamDict:
        raise NotImplementedError

    def norms_and_grad(self) -> tuple[torch.Tensor, ParamDict]:
        return self.sq_norms(), self.grad()

    def jacobian(self) -> torch.Tensor:
        """J [n k, p] (rows sample-major, columns in named_parameters() order), formed from
        torch.func per-sample Jacobians and kept for the rest of the measurement."""
        m = self.measurement
        if m.jacobian is None:
            m.jacobian = torch.cat([self.fm.jacobian_rows(per_sample_jacobians(self.fm, c)) for c in self.chunks()])
        return m.jacobian

    def gram(self) -> torch.Tensor | None:
        """K = J J^T in float64 (whatever the model's dtype: the solver decomposes it) where the
        engine has it in closed form without forming J, else None."""
        return None

    def gram_by_layers(self) -> torch.Tensor | None:
        """K = J J^T in float64 accumulated layer by layer from per-sample gradients, never
        holding J, where the engine can (the fast engine), else None."""
        return None

    def J_times(self, v: torch.Tensor) -> torch.Tensor:
        J = self.measurement.jacobian
        return J @ v if J is not None else self.fm.J_times(self.product_chunks(), v)

    def J_transpose_times(self, u: torch.Tensor) -> torch.Tensor:
        J = self.measurement.jacobian
        return J.T @ u if J is not None else self.fm.J_transpose_times(self.product_chunks(), u)

    def linear_products(self) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
        """(v -> J v, u -> J^T u) for many products at the same parameters (LSQR's iterations):
        on a probe set that takes one chunk, both from one forward kept for all of them
        (:meth:`~noisy_label_sgd.engines.functional.FunctionalModel.linear_products`); else as
        :meth:`J_times` and :meth:`J_transpose_times` (from J where it is held, else a jvp and a
        vjp a product)."""
        if self.measurement.jacobian is None:
            chunks = self.product_chunks()
            if len(chunks) == 1:
                return self.fm.linear_products(chunks[0])
        # (the router enters its contexts around these)
        return (lambda v: Engine.J_times(self, v)), (lambda u: Engine.J_transpose_times(self, u))


def per_sample_jacobians(fm: FunctionalModel, batch: Batch) -> ParamDict:
    """J_i for every sample of ``batch``: name -> [b, k, *param.shape]."""
    in_dims = (None,) + (0,) * len(batch)
    return vmap(jacrev(fm.sample_output), in_dims=in_dims)(fm.params, *batch)
