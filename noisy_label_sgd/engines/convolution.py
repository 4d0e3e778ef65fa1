r"""Convolutions whose backward is differentiated by the convolution kernels themselves.

grad reg differentiates each convolution's backward. PyTorch's derivative of
``convolution_backward`` computes the weight's part as a convolution of the input with the
output gradient as its weight, over the padded input: for a strided layer it computes more
output positions than the kernel has and drops the rest (16 for 9 for the benchmark CNN's
stride-2 3x3 layers: 1.78x the arithmetic), and it computes the gradient of every input, needed
or not. The derivative here comes from the identities of the bilinear maps (for seeds
:math:`u, w, z` of the input, weight and bias gradients of output gradient :math:`g`):

.. math::
    \langle u, \nabla_x(g, W)\rangle = \langle W, \nabla_W(g, u)\rangle
        = \langle \operatorname{conv}(u, W), g\rangle,\qquad
    \langle w, \nabla_W(g, x)\rangle = \langle x, \nabla_x(g, w)\rangle
        = \langle \operatorname{conv}(x, w), g\rangle,

so :math:`\partial_g = \operatorname{conv}(u, W) + \operatorname{conv}(x, w) + z`,
:math:`\partial_W = \nabla_W(g, u)`, :math:`\partial_x = \nabla_x(g, w)`: each one call of the
kernels a training step uses, and only those asked for. Written in differentiable operations,
so higher derivatives stay exact.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic
from torch import nn

from .backward import asked, batched, kernels_apply, tensor_inputs
from .torch_internals import functorch_transforms_active

_original = {"conv1d": nn.functional.conv1d, "conv2d": nn.functional.conv2d}


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv1d``, the same numbers, with the backward of :mod:`this module <.convolution>`
    (seen by torch function modes as itself, as ``F.conv1d`` is: the trace's op recorder)."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(conv1d, (input, weight, bias), input, weight, bias, stride, padding, dilation,
                                     groups)
    return _convolution("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """``F.conv2d``, the same numbers, with the backward of :mod:`this module <.convolution>`."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(conv2d, (input, weight, bias), input, weight, bias, stride, padding, dilation,
                                     groups)
    return _convolution("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)


def _convolution(name, dims, input, weight, bias, stride, padding, dilation, groups):
    # (the original where its own handling matters: "same"/"valid" padding, an unbatched
    # input, mixed dtypes, torch.func transforms)
    if isinstance(padding, str) or input.dim() != dims + 2 or not kernels_apply(input, weight, bias):
        return _original[name](input, weight, bias, stride, padding, dilation, groups)
    geometry = (_tuple(stride, dims), _tuple(padding, dims), _tuple(dilation, dims), groups)
    return _Convolution.apply(input, weight, bias, geometry)


def _tuple(value, dims: int) -> list[int]:
    return list(value) if isinstance(value, (tuple, list)) else [value] * dims


def _conv(x, weight, geometry):
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution(x, weight, None, stride, padding, dilation, False, [0] * len(stride), groups)


def _conv_backward(g, x, weight, geometry, mask, bias_size=None):
    stride, padding, dilation, groups = geometry
    return torch.ops.aten.convolution_backward(g, x, weight, bias_size, stride, padding, dilation, False,
                                               [0] * len(stride), groups, list(mask))


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, geometry):
        stride, padding, dilation, groups = geometry
        ctx.save_for_backward(x, weight)
        ctx.tensor_inputs = tensor_inputs(x, weight, bias)
        ctx.geometry, ctx.bias_size = geometry, None if bias is None else list(bias.shape)
        return torch.ops.aten.convolution(x, weight, bias, stride, padding, dilation, False, [0] * len(stride),
                                          groups)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mask = (asked(ctx, 0), asked(ctx, 1), ctx.bias_size is not None and asked(ctx, 2))
        if batched(grad):
            # a batched backward (is_grads_batched runs it under vmap) records no graph through
            # a Function: PyTorch's own, differentiable, there
            return (*_conv_backward(grad, x, weight, ctx.geometry, mask, ctx.bias_size), None)
        return (*_ConvolutionBackward.apply(grad, x, weight, ctx.geometry, mask, ctx.bias_size), None)


class _ConvolutionBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, weight, geometry, mask, bias_size):
        ctx.save_for_backward(grad, x, weight)
        ctx.geometry = geometry
        ctx.set_materialize_grads(False)  # an output nobody used costs nothing
        return _conv_backward(grad, x, weight, geometry, mask, bias_size)

    @staticmethod
    def backward(ctx, u, w, z):
        grad, x, weight = ctx.saved_tensors
        geometry, needs = ctx.geometry, ctx.needs_input_grad
        d_grad = d_x = d_weight = None
        if needs[0]:
            parts = [_conv(u, weight, geometry) if u is not None else None,
                     _conv(x, w, geometry) if w is not None else None]
            if z is not None:  # (the bias's gradient sums g over samples and positions)
                parts.append(z.view(1, -1, *[1] * (grad.dim() - 2)).expand_as(grad))
            parts = [p for p in parts if p is not None]
            d_grad = functools.reduce(torch.add, parts) if parts else None
        if needs[1] and w is not None:
            d_x = _conv_backward(grad, x, w, geometry, (True, False, False))[0]
        if needs[2] and u is not None:
            d_weight = _conv_backward(grad, u, weight, geometry, (False, True, False))[1]
        return d_grad, d_x, d_weight, None, None, None


def weight_gradient(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, geometry) -> torch.Tensor:
    """A convolution's weight gradient at output gradient g and input x (``weight`` is read for
    its shape), differentiable in both by the identities above, each part computed only when
    asked: PyTorch's derivative of ``convolution_backward`` computes the input's too, a
    transposed convolution as costly as the forward, where x is the data (a first layer's
    per-sample gradients, :func:`~noisy_label_sgd.engines.closed_forms.grouped_weight_grads`)."""
    if torch.is_grad_enabled() and (g.requires_grad or x.requires_grad) \
            and not functorch_transforms_active():
        return _WeightGradient.apply(g, x, weight, geometry)
    return _conv_backward(g, x, weight, geometry, (False, True, False))[1]


class _WeightGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, x, weight, geometry):
        ctx.save_for_backward(g, x)
        ctx.geometry = geometry
        return _conv_backward(g, x, weight, geometry, (False, True, False))[1]

    @staticmethod
    def backward(ctx, seed):
        g, x = ctx.saved_tensors
        # <seed, dW(g, x)> = <conv(x, seed), g> = <x, the input gradient at g with weight seed>
        d_g = _conv(x, seed, ctx.geometry) if ctx.needs_input_grad[0] else None
        d_x = _conv_backward(g, x, seed, ctx.geometry, (True, False, False))[0] if ctx.needs_input_grad[1] else None
        return d_g, d_x, None, None
