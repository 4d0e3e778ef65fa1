r"""Activations whose second derivative costs few operations: grad reg's double backward.

**GELU.** PyTorch differentiates GELU's backward kernel through a composite of about 35
operations for the tanh approximation; Hugging Face's ``NewGELUActivation`` (GPT-2's
``gelu_new``) writes the function itself in 8, whose two derivatives cost about 50. Here the
forward and the backward are the fused kernels, and the backward's derivative is the closed form:
for the upstream gradient :math:`g`, the backward is :math:`g\,\mathrm{gelu}'(x)`, so the
derivatives of :math:`\langle u, g\,\mathrm{gelu}'(x)\rangle` are :math:`u\,\mathrm{gelu}'(x)`
(the backward kernel again) in :math:`g` and :math:`u\,g\,\mathrm{gelu}''(x)` in :math:`x`, with

.. math::
    \mathrm{gelu}''(x) = \varphi(x)\,(2 - x^2) \quad\text{(exact: } \mathrm{gelu}(x) = x\,\Phi(x)\text{)},\\
    \mathrm{gelu}''(x) = (1 - t^2)\,\big(a - x\,t\,a^2 + 3 k c x^2\big) \quad\text{(tanh)},

where :math:`t = \tanh(k (x + c x^3))`, :math:`a = k (1 + 3 c x^2)`, :math:`k = \sqrt{2/\pi}`,
:math:`c = 0.044715`. Differentiable twice (a third derivative raises).

**ReLU.** Its second derivative is zero: PyTorch's double backward still makes a tensor of zeros
for it and adds it to the output's gradient (two operations a layer); here it is left out, and
the backward's own derivative is the backward kernel again (exact at every order). In place as
``F.relu(x, inplace=True)`` is (torchvision's ResNets).
"""

from __future__ import annotations

import math

import torch

from .backward import batched, kernels_apply

_original_gelu = torch.nn.functional.gelu
_original_relu = torch.nn.functional.relu
_K = math.sqrt(2 / math.pi)
_C = 0.044715


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """``F.gelu``, the same numbers, with a twice-differentiable backward of few operations."""
    if not kernels_apply(input) or approximate not in ("none", "tanh"):
        return _original_gelu(input, approximate=approximate)
    return _Gelu.apply(input, approximate)


def new_gelu_forward(module, input: torch.Tensor) -> torch.Tensor:
    """Hugging Face's ``NewGELUActivation.forward``: the tanh approximation, as one kernel."""
    return gelu(input, approximate="tanh")


class _Gelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return _original_gelu(x, approximate=approximate)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        if batched(grad):  # (under vmap a Function records no graph: PyTorch's differentiable kernel)
            return torch.ops.aten.gelu_backward(grad, x, approximate=ctx.approximate), None
        return _GeluBackward.apply(grad, x, ctx.approximate), None


class _GeluBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, approximate):
        ctx.save_for_backward(grad, x)
        ctx.approximate = approximate
        return torch.ops.aten.gelu_backward(grad, x, approximate=approximate)

    @staticmethod
    def backward(ctx, u):
        if torch.is_grad_enabled():  # (only under create_graph: see group_norm's)
            raise RuntimeError("this GELU is differentiable twice, not three times: its second derivative "
                               "is written out, not recorded")
        grad, x = ctx.saved_tensors
        d_grad = torch.ops.aten.gelu_backward(u, x, approximate=ctx.approximate) if ctx.needs_input_grad[0] else None
        d_x = u * grad * second_derivative(x, ctx.approximate) if ctx.needs_input_grad[1] else None
        return d_grad, d_x, None


def second_derivative(x: torch.Tensor, approximate: str) -> torch.Tensor:
    """gelu''(x) (module docstring)."""
    x2 = x * x
    if approximate == "none":
        return torch.exp(x2 * -0.5).mul_(torch.sub(2, x2)).mul_(1 / math.sqrt(2 * math.pi))
    t = torch.tanh(torch.addcmul(x * _K, x2, x, value=_K * _C))
    a = x2.mul(3 * _K * _C).add_(_K)
    # (a + 3 k c x^2 = k + 6 k c x^2; tanh's backward kernel multiplies by 1 - t^2)
    bracket = torch.addcmul(x2.mul(6 * _K * _C).add_(_K), x * t, a * a, value=-1)
    return torch.ops.aten.tanh_backward(bracket, t)


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``F.relu``, the same numbers, whose double backward makes no zeros."""
    if not kernels_apply(input):
        return _original_relu(input, inplace=inplace)
    return _Relu.apply(input, inplace)


class _Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, inplace):
        if not inplace:  # (the input saved, not the output: the same mask, and unpacking a saved
            # output is an operation)
            ctx.save_for_backward(x)
            return torch.relu(x)
        ctx.mark_dirty(x)
        out = x.relu_()
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        signs, = ctx.saved_tensors  # (the input or the output: positive at the same places)
        if batched(grad):  # (under vmap a Function records no graph: PyTorch's differentiable kernel)
            return torch.ops.aten.threshold_backward(grad, signs, 0), None
        return _ReluBackward.apply(grad, signs), None


class _ReluBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, signs):
        ctx.save_for_backward(signs)
        return torch.ops.aten.threshold_backward(grad, signs, 0)

    @staticmethod
    def backward(ctx, u):
        signs, = ctx.saved_tensors
        # (in the signs: zero, left out; the kernel is differentiable, so any order stays exact)
        return torch.ops.aten.threshold_backward(u, signs, 0) if ctx.needs_input_grad[0] else None, None
