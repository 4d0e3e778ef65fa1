r"""The "vmap" engine: torch.func per-sample Jacobians of the whole model.

Works for any model whose forward torch.func can transform. Chosen for ``method="vmap"``, for a
model with layers that have no closed form when J fits the dense solver (its grad reg forms J
anyway), and as the whole-model fallback of the fast engine.

* norms: ``vmap(jacrev)`` per chunk of samples;
* grad reg :math:`= \frac2n\sum_i\sum_j H_{ij}\nabla h_{ij}`, forward-over-reverse (a jvp of the
  per-output gradient in the direction of that gradient), which stays exact through LayerNorm
  where reverse-over-reverse under vmap did not. It passes through every per-sample Jacobian:
  where J fits (:meth:`~noisy_label_sgd.engines.engine.Engine.jacobian_fits`),
  :meth:`VmapEngine.norms_and_grad` keeps it, and the norms and the projection come from it.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .engine import Engine, per_sample_jacobians
from .functional import Batch, FunctionalModel, ParamDict, replaced_in_forwards


class VmapEngine(Engine):
    method = "vmap"

    def measuring(self):
        """As every engine's, inside :meth:`contexts`."""
        return _inside(self.contexts(), super().measuring())

    def contexts(self) -> ExitStack:
        """What torch.func needs around every question: autocast off (its vmapped backward
        formulas mix the autocast dtypes: LayerNorm raised "expected scalar type BFloat16 but
        found Float"), so this path computes in the parameters' dtype; and embeddings' padding
        rows as constants in forward mode too (:func:`padding_rows_constant`). Entered by the
        router for every question it sends here."""
        stack = ExitStack()
        stack.enter_context(torch.autocast(self.batch[0].device.type, enabled=False))
        stack.enter_context(padding_rows_constant())
        return stack

    def sq_norms(self) -> torch.Tensor:
        parts = []
        for c in self.chunks():
            jac = per_sample_jacobians(self.fm, c)
            parts.append(sum(j.pow(2).flatten(1).sum(1) for j in jac.values()))
        return torch.cat(parts)

    def grad(self) -> ParamDict:
        return self._grad(keep_jacobian=False)

    def norms_and_grad(self) -> tuple[torch.Tensor, ParamDict]:
        if not self.jacobian_fits():
            return self.sq_norms(), self.grad()
        grad_reg = self._grad(keep_jacobian=True)
        J = self.measurement.jacobian
        return J.pow(2).sum(1).view(self.num_samples, self.k).sum(1), grad_reg

    def _grad(self, keep_jacobian: bool) -> ParamDict:
        fm, n, k = self.fm, self.num_samples, self.k
        total = {name: torch.zeros_like(p) for name, p in fm.trainable.items()}
        rows = []
        # per sample and output: the gradient, its jvp and the jvp's primal: ~3 Jacobian copies
        for c in self.chunks(copies=3):
            products, jac = hessian_gradient_products(fm, c, k)
            for name, v in products.items():
                total[name] += v
            if keep_jacobian:
                rows.append(fm.jacobian_rows(jac))
        if keep_jacobian:
            self.measurement.jacobian = torch.cat(rows)
        return {name: v.mul_(2.0 / n) for name, v in total.items()}


def hessian_gradient_products(fm: FunctionalModel, batch: Batch, k: int) -> tuple[ParamDict, ParamDict]:
    """sum_i sum_j H_ij grad h_ij over the samples of ``batch`` (forward-over-reverse), and
    the per-sample Jacobians it passes through on the way (name -> [b, k, *param.shape])."""
    directions = torch.eye(k, dtype=fm.dtype, device=fm.device)

    def hessian_times_gradient(direction: torch.Tensor, *sample: torch.Tensor) -> tuple[ParamDict, ParamDict]:
        output_j = lambda params: (fm.sample_output(params, *sample) * direction).sum()
        gradient = grad(output_j)(fm.params)
        return jvp(grad(output_j), (fm.params,), (gradient,))[1], gradient

    def per_sample(*sample: torch.Tensor) -> tuple[ParamDict, ParamDict]:
        per_output = vmap(hessian_times_gradient, in_dims=(0,) + (None,) * len(sample))
        products, gradients = per_output(directions, *sample)
        return {n: v.sum(0) for n, v in products.items()}, gradients

    summed, jac = vmap(per_sample)(*batch)
    return {n: v.sum(0) for n, v in summed.items()}, jac


@contextmanager
def _inside(outer: ExitStack, inner):
    with outer, inner as engine:
        yield engine


def padding_rows_constant():
    """``F.embedding`` with the padding row of its weight detached, in the engines' forwards for
    the duration.

    Reverse mode gives the padding row no gradient through the lookup, forward mode (a jvp)
    still carries its tangent: grad reg's forward-over-reverse then mixed the two, 5% off where
    the row also gets gradient elsewhere (a weight tied to an output head). Detached, the row is
    a constant of the lookup in both modes, as autograd's double backward has it; the values
    are unchanged."""
    original = nn.functional.embedding

    def embedding(input, weight, padding_idx=None, *args, **kwargs):
        # (whatever requires_grad says: a jvp's weight does not require grad, and with that
        # condition here J v carried the padding row's tangent, and LSQR's projection was wrong)
        if padding_idx is not None:
            row = torch.zeros(weight.shape[0], 1, dtype=torch.bool, device=weight.device)
            row[padding_idx] = True
            weight = torch.where(row, weight.detach(), weight)
        return original(input, weight, padding_idx, *args, **kwargs)

    return replaced_in_forwards({original: embedding})
