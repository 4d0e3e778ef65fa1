r"""Batched Gram matrices :math:`K = X X^\top` whose backward knows that K is symmetric.

Autograd sees ``torch.bmm(x, x.transpose(1, 2))`` as a product of two tensors and
differentiates each factor: two products :math:`\bar K X` and :math:`\bar K^\top X` and a sum.
Since both factors are X, the gradient is :math:`(\bar K + \bar K^\top) X`: one product. grad reg
differentiates every Gram matrix of the ghost norm once, so this halves their backward's FLOPs
(the Gram path then costs 4 T^2 (in + out) a sample against the per-sample gradients' 6 T in out,
as :func:`~noisy_label_sgd.engines.closed_forms.ghost_is_cheaper` assumes). The backward is
written in differentiable operations, so higher derivatives stay exact.

The closed forms end in the sums these products feed: :math:`\sum_{ts} A_{ts} B_{ts}` of two
Gram matrices (:func:`gram_inner`) and squared norms (:func:`squared_norms`, the one-entry Gram
matrix of each sample), each with a backward of one product per factor where autograd's of a
product or power and a sum dispatches five or six operations: grad reg differentiates every one.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from .torch_internals import functorch_transforms_active


def gram(x: torch.Tensor, of: str = "rows", symmetric_seed: bool = False) -> torch.Tensor:
    r"""The Gram matrices of x [b, r, c]: of its rows, ``x @ x^T`` [b, r, r], or of its columns,
    ``x^T @ x`` [b, c, c]. ``symmetric_seed``: the caller uses them only through
    :func:`gram_inner` with other Gram matrices (their gradient is then symmetric, and the
    backward is :math:`2 \bar K X`: no transpose and sum; the full form where the backward is
    itself differentiated)."""
    columns = of == "columns"
    if not torch.is_grad_enabled() or not x.requires_grad or functorch_transforms_active():
        # (nothing to differentiate, or under torch.func)
        return torch.bmm(x.transpose(1, 2), x) if columns else torch.bmm(x, x.transpose(1, 2))
    return _Gram.apply(x, columns, symmetric_seed)


SYMMETRIC_MIN_ROWS, SYMMETRIC_BLOCKS = 1024, 8


def row_gram(x: torch.Tensor) -> torch.Tensor:
    """``x @ x^T`` for x [m, d] (the dense projection's K of a whole probe set). On the CPU from
    :data:`SYMMETRIC_MIN_ROWS` rows on only the blocks on and below the diagonal are multiplied,
    :data:`SYMMETRIC_BLOCKS` block rows, and the rest mirrored: (B + 1) / 2B of the arithmetic
    (56%), since a matrix product does not know its factors are the same. On an accelerator one
    product: there each block's dozen operations cost host time its arithmetic does not."""
    from .functional import launch_bound  # (functional imports the engines' modules)

    m = x.shape[0]
    if m < SYMMETRIC_MIN_ROWS or torch.is_grad_enabled() and x.requires_grad or launch_bound(x.device):
        return x @ x.T
    out = x.new_empty(m, m)
    step = -(-m // SYMMETRIC_BLOCKS)
    for start in range(0, m, step):
        stop = min(start + step, m)
        torch.mm(x[start:stop], x[:stop].T, out=out[start:stop, :stop])  # a block row, up to the diagonal
        out[:start, start:stop].copy_(out[start:stop, :start].mT)
    return out


def gram_inner(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_{ts} a_{ts} b_{ts}` per matrix of a, b [n, T, T] (the ghost norm's product of
    two Gram matrices), [n]. Its backward is one product per factor (autograd's of a product and
    a sum dispatches five operations)."""
    if not torch.is_grad_enabled() or not (a.requires_grad or b.requires_grad) \
            or functorch_transforms_active():
        return (a * b).sum((-1, -2))
    return _GramInner.apply(a, b)


def squared_norms(x: torch.Tensor, dims) -> torch.Tensor:
    """``x.pow(2).sum(dims)`` (each sample's squared norm: the one-entry Gram matrix), whose
    backward is one broadcast product (autograd's of a power and a sum dispatches about six
    operations; the closed forms end in one each)."""
    if not torch.is_grad_enabled() or not x.requires_grad or functorch_transforms_active():
        return x.pow(2).sum(dims)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    return _SquaredNorms.apply(x, tuple(d % x.dim() for d in dims))


class _Gram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, columns, symmetric_seed):
        ctx.save_for_backward(x)
        ctx.columns, ctx.symmetric_seed = columns, symmetric_seed
        return torch.bmm(x.transpose(1, 2), x) if columns else torch.bmm(x, x.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        # (differentiated again, the seed's own gradient need not be symmetric: the full form then)
        both = grad * 2 if ctx.symmetric_seed and not torch.is_grad_enabled() else grad + grad.transpose(1, 2)
        return (torch.bmm(x, both) if ctx.columns else torch.bmm(both, x)), None, None


class _GramInner(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return (a * b).sum((-1, -2))

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad = grad.view(-1, 1, 1)
        return (grad * b if ctx.needs_input_grad[0] else None), (grad * a if ctx.needs_input_grad[1] else None)


class _SquaredNorms(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dims):
        ctx.save_for_backward(x)
        ctx.dims = dims
        return x.pow(2).sum(dims)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        shape = [1 if d in ctx.dims else size for d, size in enumerate(x.shape)]
        # 2 x grad as one operation: a product added to a zero, doubled as it is added
        return torch.addcmul(_zero(x.dtype, x.device), x, grad.view(shape), value=2), None


@lru_cache(maxsize=64)
def _zero(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=dtype, device=device)  # (made once)
