r"""Batched Gram matrices :math:`K = X X^\top` whose backward knows that K is symmetric.

Autograd sees ``torch.bmm(x, x.transpose(1, 2))`` as a product of two tensors and
differentiates each factor: two products :math:`\bar K X` and :math:`\bar K^\top X` and a sum.
Since both factors are X, the gradient is :math:`(\bar K + \bar K^\top) X`: one product. grad reg
differentiates every Gram matrix of the ghost norm once, so this halves their backward's FLOPs
(the Gram path then costs 4 T^2 (in + out) a sample against the per-sample gradients' 6 T in out,
as :func:`~noisy_label_sgd.engines.closed_forms.ghost_is_cheaper` assumes). The backward is
written in differentiable operations, so higher derivatives stay exact.
"""

from __future__ import annotations

import torch


def gram(x: torch.Tensor, of: str = "rows") -> torch.Tensor:
    """The Gram matrices of x [b, r, c]: of its rows, ``x @ x^T`` [b, r, r], or of its columns,
    ``x^T @ x`` [b, c, c]."""
    columns = of == "columns"
    if not torch.is_grad_enabled() or not x.requires_grad or torch._C._are_functorch_transforms_active():
        # (nothing to differentiate, or under torch.func)
        return torch.bmm(x.transpose(1, 2), x) if columns else torch.bmm(x, x.transpose(1, 2))
    return _Gram.apply(x, columns)


class _Gram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, columns):
        ctx.save_for_backward(x)
        ctx.columns = columns
        return torch.bmm(x.transpose(1, 2), x) if columns else torch.bmm(x, x.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        both = grad + grad.transpose(1, 2)
        return torch.bmm(x, both) if ctx.columns else torch.bmm(both, x), None
