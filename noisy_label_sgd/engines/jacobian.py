"""The "jacobian" engine: a small J formed whole, which answers every question.

Chosen (method "auto") for a model with layers that have no closed form when J is small: at most
:data:`SMALL_JACOBIAN_MAX_ROWS` rows n k and :data:`SMALL_JACOBIAN_MAX_ENTRIES` entries. J comes
from one backward of the batch outputs batched over its n k rows; grad reg from one more
backward of ||J||_F^2 / n (reverse over reverse). That costs n k backward passes of the whole
batch, but for tiny models and probe sets the fixed cost of the per-sample paths is many times
their arithmetic. The J formed for the norms serves the Gram matrix and the projection too.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .engine import Engine
from .functional import ParamDict

SMALL_JACOBIAN_MAX_ROWS = 64
SMALL_JACOBIAN_MAX_ENTRIES = 1 << 18


def is_small_jacobian(rows: int, num_params: int) -> bool:
    return rows <= SMALL_JACOBIAN_MAX_ROWS and rows * num_params <= SMALL_JACOBIAN_MAX_ENTRIES


class JacobianEngine(Engine):
    method = "jacobian"

    def sq_norms(self) -> torch.Tensor:
        return self._differentiate(with_grad=False)[0]

    def grad(self) -> ParamDict:
        return self.norms_and_grad()[1]

    def norms_and_grad(self) -> tuple[torch.Tensor, ParamDict]:
        norms, grad_reg = self._differentiate(with_grad=True)
        assert grad_reg is not None
        return norms, grad_reg

    def jacobian(self) -> torch.Tensor:
        if self.measurement.jacobian is None:
            self._differentiate(with_grad=False)
        return self.measurement.jacobian

    def _differentiate(self, with_grad: bool) -> tuple[torch.Tensor, ParamDict | None]:
        """The per-sample norms and grad reg (``with_grad``); J and the outputs are kept.

        Some ops lack a batched double backward (GroupNorm in torch 2.13 raises): then J is
        formed row by row instead.
        """
        fm, m = self.fm, self.measurement
        # the live parameters: autograd.grad never touches their .grad; a probe of a few rows is
        # mostly per-op overhead, and functional_call's swap is a tenth of it
        leaves = fm.live_params()

        def differentiate(jac: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, ParamDict | None]:
            J = torch.cat([j.reshape(n * k, -1) for j in jac], dim=1)
            norms = J.pow(2).sum(1).view(n, k).sum(1)
            if not with_grad:
                return J, norms, None
            if not norms.requires_grad:  # J does not depend on the parameters (a linear model)
                return J, norms, {name: torch.zeros_like(p) for name, p in fm.trainable.items()}
            grads = torch.autograd.grad(norms.sum() / n, leaves, allow_unused=True, materialize_grads=True)
            return J, norms, dict(zip(fm.trainable, grads))

        with torch.enable_grad():
            out = fm.live_output(self.batch)
            n, k = out.shape
            try:
                if n * k == 1:  # one row: a plain backward, without the batching machinery
                    jac = [j.unsqueeze(0) for j in torch.autograd.grad(
                        out.sum(), leaves, retain_graph=with_grad, create_graph=with_grad, allow_unused=True,
                        materialize_grads=True)]
                else:
                    rows = torch.eye(n * k, dtype=out.dtype, device=out.device).view(n * k, n, k)
                    jac = torch.autograd.grad(out, leaves, rows, is_grads_batched=True, retain_graph=with_grad,
                                              create_graph=with_grad, allow_unused=True, materialize_grads=True)
                J, norms, grad_reg = differentiate(jac)
            except RuntimeError:
                if not with_grad:
                    raise
                per_row = [torch.autograd.grad(out.reshape(-1)[r], leaves, retain_graph=True, create_graph=True,
                                               allow_unused=True, materialize_grads=True) for r in range(n * k)]
                J, norms, grad_reg = differentiate([torch.stack(js) for js in zip(*per_row)])
        m.jacobian, m.outputs = J.detach(), out.detach()
        return norms.detach(), grad_reg
