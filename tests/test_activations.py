"""GELU with its second derivative written out (engines/gelu.py) against PyTorch's F.gelu,
Hugging Face's NewGELUActivation and finite differences, in float64."""

import os
import sys

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

from noisy_label_sgd.engines import functional
from noisy_label_sgd.engines.activations import gelu, relu

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from cost import cost  # noqa: E402


def randn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_values_and_two_derivatives_match_finite_differences(approximate):
    x = randn(4, 7)
    f = lambda x: gelu(x, approximate)
    torch.testing.assert_close(f(x), torch.nn.functional.gelu(x, approximate=approximate), rtol=0, atol=0)
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))  # (the upstream gradient's derivative too)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_the_second_derivative_matches_pytorchs_batched_and_not(approximate):
    # the gradients of several directions at once (is_grads_batched runs the backward under
    # vmap, where a Function records no graph: PyTorch's differentiable kernel there)
    x = randn(3, 5)
    rows = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grad_reg(norm, batched):
        y = norm(x, approximate=approximate)
        h = y * y.cos()
        if batched:
            g, = torch.autograd.grad(h, x, rows, is_grads_batched=True, create_graph=True)
        else:
            g = torch.stack([torch.autograd.grad(h, x, r, create_graph=True)[0] for r in rows])
        return torch.autograd.grad(g.pow(2).sum(), x)[0]

    reference = grad_reg(torch.nn.functional.gelu, False)
    for batched in (False, True):
        torch.testing.assert_close(grad_reg(gelu, batched), reference, rtol=1e-12, atol=1e-12)


def test_a_third_derivative_raises_rather_than_being_wrong():
    x = randn(5)
    gx, = torch.autograd.grad(gelu(x, "tanh").pow(3).sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable twice, not three times"):
        torch.autograd.grad(gx.pow(2).sum(), [x], create_graph=True)


def test_hugging_faces_new_gelu_is_swapped_for_the_kernel_and_restored():
    activations = pytest.importorskip("transformers.activations")
    module, x = activations.NewGELUActivation(), randn(6, 8)
    own = module(x)
    with functional.lean_second_order(module):
        swapped = module(x)
        assert swapped.grad_fn.name() == "_GeluBackward"
    torch.testing.assert_close(swapped, own, rtol=1e-15, atol=1e-15)
    assert module(x).grad_fn.name() != "_GeluBackward"  # (restored)


def test_the_double_backward_dispatches_a_fraction_of_pytorchs():
    def double_backward(norm):
        x = randn(64, 32)
        gx, = torch.autograd.grad((norm(x, approximate="tanh") * x).sum(), [x], create_graph=True)
        return lambda: torch.autograd.grad(gx.pow(2).sum(), [x], retain_graph=True)

    ours, pytorchs = cost(double_backward(gelu)), cost(double_backward(torch.nn.functional.gelu))
    assert ours.operations * 3 < pytorchs.operations * 2, (ours, pytorchs)  # (27 against 49)
    assert ours.syncs == 0


@pytest.mark.parametrize("inplace", [False, True])
def test_relu_values_and_derivatives_match_pytorchs(inplace):
    x = randn(4, 7)
    f = lambda x: relu(x * 1, inplace=inplace)  # (in place on a non-leaf, as a model's ReLU is)
    torch.testing.assert_close(f(x), torch.relu(x), rtol=0, atol=0)
    assert gradcheck(f, (x,))
    assert gradgradcheck(f, (x,))
    if inplace:
        y = x * 1
        out = relu(y, inplace=True)
        assert out is y and torch.equal(y, torch.relu(x))


def test_relus_double_backward_makes_no_zeros_and_matches_pytorchs_batched_and_not():
    x, rows = randn(3, 5), torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def grad_reg(norm, batched):
        h = norm(x * x.sin()).cos()
        if batched:
            g, = torch.autograd.grad(h, x, rows, is_grads_batched=True, create_graph=True)
        else:
            g = torch.stack([torch.autograd.grad(h, x, r, create_graph=True)[0] for r in rows])
        return lambda: torch.autograd.grad(g.pow(2).sum(), x, retain_graph=True)[0]

    reference = grad_reg(torch.nn.functional.relu, False)
    for batched in (False, True):
        torch.testing.assert_close(grad_reg(relu, batched)(), reference(), rtol=1e-12, atol=1e-12)
    assert cost(grad_reg(relu, False)).operations < cost(reference).operations  # (no zeros_like and add)


def test_the_replacements_are_local_to_the_engines_forwards_and_to_the_thread():
    # (torch.nn.functional is never rebound: the caller's code and other threads see torch's)
    import threading

    seen = {}
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU()).double()
    x = randn(2, 3)
    with functional.lean_second_order(model):
        assert nn.functional.gelu is torch._C._nn.gelu
        seen["caller"] = model(x).grad_fn.name()
        thread = threading.Thread(target=lambda: seen.update(thread=model(x).grad_fn.name()))
        thread.start()
        thread.join()
        with functional.forward_replacements():
            seen["engine"] = model(x).grad_fn.name()
    assert seen == {"caller": "GeluBackward0", "thread": "GeluBackward0", "engine": "_GeluBackward"}
