"""Gram matrices with a symmetric backward (engines/gram.py) and a convolution's per-sample
weight gradient whose backward computes only what is asked (engines/closed_forms.py), against
PyTorch's own derivatives and finite differences in float64."""

import os
import sys

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from noisy_label_sgd.engines.closed_forms import _WeightGradient, _weight_gradient
from noisy_label_sgd.engines.gram import gram

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from cost import cost  # noqa: E402


def randn(*shape, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(requires_grad)


@pytest.mark.parametrize("of", ["rows", "columns"])
def test_gram_and_its_derivatives_match_finite_differences_and_autograds_product(of):
    x = randn(3, 5, 4)
    product = (lambda x: torch.bmm(x, x.transpose(1, 2))) if of == "rows" else (lambda x: torch.bmm(x.transpose(1, 2), x))
    torch.testing.assert_close(gram(x, of), product(x), rtol=0, atol=0)
    assert gradcheck(lambda x: gram(x, of), (x,))
    assert gradgradcheck(lambda x: gram(x, of), (x,))  # (the backward is written in differentiable operations)
    size = 5 if of == "rows" else 4
    seed = randn(3, size, size, seed=1, requires_grad=False)  # not symmetric: both of its triangles count
    ours, = torch.autograd.grad(gram(x, of), x, seed)
    autograds, = torch.autograd.grad(product(x), x, seed)
    torch.testing.assert_close(ours, autograds, rtol=1e-12, atol=1e-12)


def test_gram_backward_costs_one_product_where_autograd_pays_two():
    x = randn(4, 16, 32)
    seed = randn(4, 16, 16, seed=1, requires_grad=False)
    product = 2 * 4 * 16 * 16 * 32
    ours, autograds = gram(x), torch.bmm(x, x.transpose(1, 2))
    assert cost(lambda: torch.autograd.grad(ours, x, seed, retain_graph=True)).flops == product
    assert cost(lambda: torch.autograd.grad(autograds, x, seed, retain_graph=True)).flops == 2 * product


GEOMETRY = ((2, 1), (1, 1), (1, 2), 3)  # stride, padding, dilation, groups (3 samples, groups 1)


def weight_gradient(g, a):
    weight = torch.empty((), dtype=g.dtype).expand(3 * 4, 2, 3, 3)  # [samples * out, in, kernel]
    return _WeightGradient.apply(g, a, weight, GEOMETRY)


def test_the_weight_gradient_and_its_derivatives_match_finite_differences():
    a = randn(1, 3 * 2, 7, 6, seed=2)  # 3 samples of 2 channels as groups
    g = randn(1, 3 * 4, 4, 4, seed=3)  # their output gradients: 4 channels at 4x4 (stride (2, 1), dilation (1, 2))
    weight = torch.empty((), dtype=g.dtype).expand(3 * 4, 2, 3, 3)
    torch.testing.assert_close(weight_gradient(g, a), _weight_gradient(g, a, weight, GEOMETRY), rtol=0, atol=0)
    assert gradcheck(weight_gradient, (g, a))
    assert gradgradcheck(weight_gradient, (g, a))


def test_the_weight_gradient_differentiates_the_data_input_for_nothing():
    # PyTorch's derivative of convolution_backward computes the input's gradient even where the
    # input is the data: a transposed convolution as costly as the forward, for nothing
    a = randn(1, 3 * 2, 7, 6, seed=2, requires_grad=False)
    g = randn(1, 3 * 4, 4, 4, seed=3)
    weight = torch.empty((), dtype=g.dtype).expand(3 * 4, 2, 3, 3)
    seed = randn(3 * 4, 2, 3, 3, seed=4, requires_grad=False)
    stride, padding, dilation, groups = GEOMETRY
    pytorchs = torch.ops.aten.convolution_backward(g, a, weight, None, stride, padding, dilation, False, [0, 0],
                                                   groups, (False, True, False))[1]
    ours = weight_gradient(g, a)
    ours_cost = cost(lambda: torch.autograd.grad(ours, g, seed, retain_graph=True))
    pytorchs_cost = cost(lambda: torch.autograd.grad(pytorchs, g, seed, retain_graph=True))
    forward = 2 * 3 * 4 * 2 * 9 * 4 * 4  # 2 * samples * out * in * kernel * output positions
    assert (ours_cost.flops, pytorchs_cost.flops) == (forward, 2 * forward)
    torch.testing.assert_close(torch.autograd.grad(ours, g, seed)[0], torch.autograd.grad(pytorchs, g, seed)[0],
                               rtol=1e-12, atol=1e-12)
