"""Convolutions differentiated twice by their own kernels, and a per-sample weight gradient
differentiated only where asked (engines/convolution.py), against PyTorch's own and finite
differences, in float64."""

import os
import sys

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from noisy_label_sgd.engines.convolution import conv1d, conv2d, weight_gradient

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from cost import cost  # noqa: E402

CASES = {  # ours, PyTorch's, input shape, weight shape, geometry
    "strided_dilated_grouped": (conv2d, nn.functional.conv2d, (2, 4, 7, 6), (6, 2, 3, 3),
                                dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)),
    "stride_2_unpadded": (conv2d, nn.functional.conv2d, (2, 3, 5, 5), (4, 3, 3, 3), dict(stride=2)),
    "pointwise": (conv2d, nn.functional.conv2d, (2, 3, 5, 5), (4, 3, 1, 1), {}),
    "conv1d": (conv1d, nn.functional.conv1d, (2, 3, 9), (4, 3, 3), dict(stride=2, padding=2, dilation=2)),
}


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", CASES)
def test_values_and_two_derivatives_match_finite_differences(name, bias):
    ours, pytorchs, x_shape, w_shape, geometry = CASES[name]
    x, weight = randn(*x_shape), randn(*w_shape, seed=1)
    args = (x, weight, randn(w_shape[0], seed=2)) if bias else (x, weight)
    f = lambda *a: ours(*a, **geometry)  # noqa: E731
    torch.testing.assert_close(f(*args), pytorchs(*args, **geometry), rtol=1e-12, atol=1e-12)
    assert gradcheck(f, args)
    # every second derivative, the upstream gradient included (an input of the backward), and a
    # third, through the backward written in differentiable operations
    assert gradgradcheck(f, args)
    (gx,) = torch.autograd.grad(f(*args).pow(2).sum(), x, create_graph=True)
    (hx,) = torch.autograd.grad(gx.pow(2).sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(pytorchs(*args, **geometry).pow(2).sum(), x, create_graph=True)
    (hx_ref,) = torch.autograd.grad(gx_ref.pow(2).sum(), x, create_graph=True)
    third, third_ref = (torch.autograd.grad(h.sin().sum(), args) for h in (hx, hx_ref))
    for actual, expected in zip(third, third_ref):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def norms_backward_then_grad(conv, x, weight, bias):
    """As grad reg does: a backward to the layer's input with a graph (autograd.grad, not the
    parameters'), a function of it, its gradient in the parameters."""
    out = conv(x, weight, bias, stride=2, padding=1)
    (gx,) = torch.autograd.grad((out * out.sin()).sum(), x, create_graph=True)
    return lambda: torch.autograd.grad(gx.pow(2).sum(), [x, weight, bias], retain_graph=True)


def test_a_strided_layers_second_derivative_costs_what_the_kernels_do():
    # PyTorch computes the weight's part over 4x4 output positions of the padded input, for a
    # 3x3 kernel: 16/9 of the arithmetic
    x, weight, bias = randn(4, 8, 16, 16), randn(16, 8, 3, 3, seed=1), randn(16, seed=2)
    forward = 2 * 4 * 16 * 8 * 9 * 8 * 8  # 2 n out in kernel positions (8x8 at stride 2)
    first = [cost(lambda: torch.autograd.grad(conv(x, weight, bias, stride=2, padding=1).sum(), x,
                                              create_graph=True)).flops for conv in (conv2d, nn.functional.conv2d)]
    # forward and the input's gradient alone: the parameters' are not asked (a Function is
    # told only that they could be: the engine says whether they are)
    assert first == [2 * forward, 2 * forward]
    ours = cost(norms_backward_then_grad(conv2d, x, weight, bias))
    pytorchs = cost(norms_backward_then_grad(nn.functional.conv2d, x, weight, bias))
    # the second derivative: the output gradient's part and the weight's (one kernel each), and
    # the forward's backward (input and weight)
    assert ours.flops == 4 * forward
    assert pytorchs.flops == 3 * forward + forward * 16 // 9
    assert ours.syncs == 0 and ours.operations < pytorchs.operations
    for actual, expected in zip(norms_backward_then_grad(conv2d, x, weight, bias)(),
                                norms_backward_then_grad(nn.functional.conv2d, x, weight, bias)()):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_the_gradients_asked_and_only_those_are_computed():
    # the engine says which of a Function's inputs it needs: a leaf autograd.grad returns (it
    # raises when asked about one: taken as yes), one it leaves alone (no), every leaf under
    # .backward() (yes)
    x, weight, bias = randn(2, 3, 8, 8), randn(4, 3, 3, 3, seed=1), randn(4, seed=2)
    forward = 2 * 2 * 4 * 3 * 9 * 8 * 8  # 2 n out in kernel positions
    for conv in (conv2d, nn.functional.conv2d):
        asked = lambda: torch.autograd.grad(conv(x, weight, bias, padding=1).sum(), [weight])  # noqa: E731
        # forward and the weight's gradient: not the input's
        assert cost(asked).flops == 2 * forward
    for inputs in ([weight], [bias], [x, weight, bias]):
        ours, pytorchs = (torch.autograd.grad(conv(x, weight, bias, padding=1).sin().sum(), inputs)
                          for conv in (conv2d, nn.functional.conv2d))
        for actual, expected in zip(ours, pytorchs):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grads = []
    for conv in (conv2d, nn.functional.conv2d):
        conv(x, weight, bias, padding=1).sin().sum().backward()
        grads.append([t.grad for t in (x, weight, bias)])
        for t in (x, weight, bias):
            t.grad = None
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_a_batched_backward_is_differentiable_and_equals_one_direction_at_a_time():
    # is_grads_batched runs the backward under vmap, where a Function records no graph: PyTorch's
    # own differentiable backward takes over there
    x, weight, bias = randn(3, 4, 6, 6), randn(5, 4, 3, 3, seed=1), randn(5, seed=2)
    rows = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def grads_and_their_gradient(conv, batched):
        y = conv(x, weight, bias, stride=2)
        h = (y * y.sin()).sum((2, 3))
        if batched:
            grads = torch.autograd.grad(h, [x, weight], rows, is_grads_batched=True, create_graph=True)
        else:
            grads = [torch.stack(c) for c in zip(*[torch.autograd.grad(h, [x, weight], r, create_graph=True)
                                                   for r in rows])]
        return [*grads, *torch.autograd.grad(sum(g.pow(2).sum() for g in grads), [x, weight, bias])]

    reference = grads_and_their_gradient(nn.functional.conv2d, False)
    for batched in (False, True):
        for actual, expected in zip(grads_and_their_gradient(conv2d, batched), reference):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


GEOMETRY = ([2, 1], [1, 1], [1, 2], 3)  # stride, padding, dilation, groups (3 samples, groups 1)


def per_sample_weight_gradient(g, a):
    weight = torch.empty((), dtype=g.dtype).expand(3 * 4, 2, 3, 3)  # [samples * out, in, kernel]
    return weight_gradient(g, a, weight, GEOMETRY)


def test_the_weight_gradient_and_its_derivatives_match_finite_differences():
    a = randn(1, 3 * 2, 7, 6, seed=2)  # 3 samples of 2 channels as groups
    g = randn(1, 3 * 4, 4, 4, seed=3)  # their output gradients: 4 channels at 4x4 (stride (2, 1), dilation (1, 2))
    weight = torch.empty((), dtype=g.dtype).expand(3 * 4, 2, 3, 3)
    stride, padding, dilation, groups = GEOMETRY
    pytorchs = torch.ops.aten.convolution_backward(g, a, weight, None, stride, padding, dilation, False, [0, 0],
                                                   groups, (False, True, False))[1]
    torch.testing.assert_close(per_sample_weight_gradient(g, a), pytorchs, rtol=0, atol=0)
    assert gradcheck(per_sample_weight_gradient, (g, a))
    assert gradgradcheck(per_sample_weight_gradient, (g, a))


def test_the_weight_gradient_differentiates_the_data_input_for_nothing():
    # PyTorch's derivative of convolution_backward computes the input's gradient even where the
    # input is the data: a transposed convolution as costly as the forward, for nothing
    a = randn(1, 3 * 2, 7, 6, seed=2).detach()
    g = randn(1, 3 * 4, 4, 4, seed=3)
    weight = torch.empty((), dtype=g.dtype).expand(3 * 4, 2, 3, 3)
    seed = randn(3 * 4, 2, 3, 3, seed=4).detach()
    stride, padding, dilation, groups = GEOMETRY
    pytorchs = torch.ops.aten.convolution_backward(g, a, weight, None, stride, padding, dilation, False, [0, 0],
                                                   groups, (False, True, False))[1]
    ours = per_sample_weight_gradient(g, a)
    ours_cost = cost(lambda: torch.autograd.grad(ours, g, seed, retain_graph=True))
    pytorchs_cost = cost(lambda: torch.autograd.grad(pytorchs, g, seed, retain_graph=True))
    forward = 2 * 3 * 4 * 2 * 9 * 4 * 4  # 2 * samples * out * in * kernel * output positions
    assert (ours_cost.flops, pytorchs_cost.flops) == (forward, 2 * forward)
    torch.testing.assert_close(torch.autograd.grad(ours, g, seed)[0], torch.autograd.grad(pytorchs, g, seed)[0],
                               rtol=1e-12, atol=1e-12)
