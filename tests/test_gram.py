"""Gram matrices with a symmetric backward (engines/gram.py) against autograd's product and
finite differences in float64."""

import os
import sys

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from noisy_label_sgd.engines.gram import gram, gram_inner, squared_norms

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


def test_gram_inner_and_its_derivatives_match_finite_differences():
    a, b = randn(3, 4, 4), randn(3, 4, 4, seed=1)
    torch.testing.assert_close(gram_inner(a, b), (a * b).sum((-1, -2)), rtol=0, atol=0)
    assert gradcheck(gram_inner, (a, b))
    assert gradgradcheck(gram_inner, (a, b))


@pytest.mark.parametrize("of", ["rows", "columns"])
def test_a_symmetric_seed_gram_under_gram_inner_matches_autograds_products(of):
    # the ghost norm sum_ts (x_t . x_s + 1)(y_t . y_s): its gradient, and its gradient's, with the
    # symmetric-seed backward (2 K' X) against autograd's plain products
    x, y = randn(3, 5, 4), randn(*((3, 5, 6) if of == "rows" else (3, 6, 4)), seed=1)
    plain = (lambda t: torch.bmm(t, t.transpose(1, 2))) if of == "rows" else (lambda t: torch.bmm(t.transpose(1, 2), t))
    ghost = lambda x, y: gram_inner(gram(x, of, symmetric_seed=True) + 1, gram(y, of, symmetric_seed=True))
    reference = lambda x, y: ((plain(x) + 1) * plain(y)).sum((-1, -2))
    seed = randn(3, seed=2, requires_grad=False)
    for ours, expected in zip(torch.autograd.grad(ghost(x, y), [x, y], seed, create_graph=True),
                              torch.autograd.grad(reference(x, y), [x, y], seed, create_graph=True)):
        torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
        # differentiated once more (grad reg differentiates the norms)
        torch.testing.assert_close(torch.autograd.grad(ours.sin().sum(), [x, y], retain_graph=True),
                                   torch.autograd.grad(expected.sin().sum(), [x, y], retain_graph=True),
                                   rtol=1e-12, atol=1e-12)
    assert gradcheck(ghost, (x, y))


def test_the_ghost_products_backward_dispatches_fewer_operations():
    x, y = randn(4, 16, 8), randn(4, 16, 6, seed=1)
    ours = gram_inner(gram(x, symmetric_seed=True) + 1, gram(y, symmetric_seed=True))
    autograds = ((torch.bmm(x, x.transpose(1, 2)) + 1) * torch.bmm(y, y.transpose(1, 2))).sum((-1, -2))
    seed = randn(4, seed=2, requires_grad=False)
    backward = lambda out: cost(lambda: torch.autograd.grad(out, [x, y], seed, retain_graph=True))
    assert backward(ours).operations <= backward(autograds).operations - 6  # (7 against 15)


@pytest.mark.parametrize("dims", [1, -1, (1, 2), (0, 2)])
def test_squared_norms_and_their_derivatives_match_finite_differences(dims):
    x = randn(3, 4, 5)
    torch.testing.assert_close(squared_norms(x, dims), x.pow(2).sum(dims), rtol=0, atol=0)
    assert gradcheck(lambda x: squared_norms(x, dims), (x,))
    assert gradgradcheck(lambda x: squared_norms(x, dims), (x,))
    seed = randn(*x.pow(2).sum(dims).shape, seed=1, requires_grad=False)
    ours = cost(lambda: torch.autograd.grad(squared_norms(x, dims), x, seed))
    autograds = cost(lambda: torch.autograd.grad(x.pow(2).sum(dims), x, seed))
    assert ours.operations <= autograds.operations - 2, (ours, autograds)  # (5 against 7, 8 for two dims)


@pytest.mark.parametrize("rows", [1, 7, 8, 13, 1030])
def test_the_row_gram_of_blocks_below_the_diagonal_is_the_whole_product(rows, monkeypatch):
    from noisy_label_sgd.engines import gram as module

    monkeypatch.setattr(module, "SYMMETRIC_MIN_ROWS", 1)
    x = randn(rows, 9, requires_grad=False)
    product = x @ x.T
    torch.testing.assert_close(module.row_gram(x), product, rtol=0, atol=1e-14 * float(product.abs().max()))
    step = -(-rows // module.SYMMETRIC_BLOCKS)
    # each block row multiplied up to the diagonal only: 2 d (stop - start) stop FLOPs
    blocks = [(start, min(start + step, rows)) for start in range(0, rows, step)]
    assert cost(lambda: module.row_gram(x)).flops == sum(2 * 9 * (stop - start) * stop for start, stop in blocks)
    if rows == 1030:
        assert cost(lambda: module.row_gram(x)).flops < 0.57 * 2 * 9 * rows * rows
