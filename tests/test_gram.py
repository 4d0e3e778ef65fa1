"""Gram matrices with a symmetric backward (engines/gram.py) against autograd's product and
finite differences in float64."""

import os
import sys

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

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
