"""GroupNorm with its second derivative written out (engines/group_norm.py) against PyTorch's
F.group_norm and finite differences, in float64."""

import os
import sys

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from noisy_label_sgd.engines.group_norm import group_norm, layer_norm, per_sample_affine_sq_norms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from cost import cost  # noqa: E402

SHAPES = [((3, 6, 4, 5), 3), ((2, 4), 2), ((2, 8, 7), 4), ((2, 6, 3, 3), 1), ((2, 6, 2, 2), 6)]
AFFINE = [(True, True), (True, False), (False, True), (False, False)]


def inputs(shape, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    c = shape[1]
    weight = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True) if affine[0] else None
    bias = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True) if affine[1] else None
    return x, weight, bias


def as_function(norm, groups, affine, eps):
    """norm as a function of the tensors gradcheck perturbs (x, and the weight and bias given)."""
    def f(x, *params):
        it = iter(params)
        weight = next(it) if affine[0] else None
        bias = next(it) if affine[1] else None
        return norm(x, groups, weight, bias, eps)
    return f


@pytest.mark.parametrize("affine", AFFINE, ids=["weight_bias", "weight", "bias", "plain"])
@pytest.mark.parametrize("shape,groups", SHAPES, ids=[f"{len(s)}d_g{g}" for s, g in SHAPES])
def test_values_and_two_derivatives_match_finite_differences(shape, groups, affine):
    x, weight, bias = inputs(shape, affine)
    args = [t for t in (x, weight, bias) if t is not None]
    f = as_function(group_norm, groups, affine, 1e-3)  # (an eps that matters in the derivatives)
    torch.testing.assert_close(f(*args), as_function(torch.nn.functional.group_norm, groups, affine, 1e-3)(*args),
                               rtol=1e-12, atol=1e-12)
    assert gradcheck(f, args)
    # every second derivative, the upstream gradients included (they are inputs of the backward),
    # with strided seeds too (the kernels read memory in order)
    assert gradgradcheck(f, args, gen_non_contig_grad_outputs=True)


def grads_and_their_gradient(norm, batched, x, weight, bias, rows):
    """Per-direction gradients of a nonlinear function of the output ([directions, ...], as the
    library's batched backward takes them), and the gradient of their squares."""
    y = norm(x, 3, weight, bias, 1e-5)
    h = (y * y.sin()).sum((2, 3))
    if batched:
        grads = torch.autograd.grad(h, [x, weight, bias], rows, is_grads_batched=True, create_graph=True)
    else:
        columns = zip(*[torch.autograd.grad(h, [x, weight, bias], r, create_graph=True) for r in rows])
        grads = [torch.stack(c) for c in columns]
    total = sum(g.pow(2).sum() for g in grads)
    return [*grads, *torch.autograd.grad(total, [x, weight, bias])]


def test_all_three_gradients_differentiated_together_match_pytorch():
    # (gradgradcheck seeds one output at a time: here the weight's and the input's gradients
    # seed the second derivative at once) one direction at a time, and batched: is_grads_batched
    # runs the backward under vmap, where a Function records no graph, so the composite backward
    # takes over there (F.group_norm itself raises in that case)
    x, weight, bias = inputs((3, 6, 4, 5), (True, True))
    rows = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = grads_and_their_gradient(torch.nn.functional.group_norm, False, x, weight, bias, rows)
    for batched in (False, True):
        for actual, expected in zip(grads_and_their_gradient(group_norm, batched, x, weight, bias, rows), reference):
            torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def test_a_third_derivative_raises_rather_than_being_wrong():
    x, weight, bias = inputs((2, 4, 3), (True, True))
    gx, = torch.autograd.grad(group_norm(x, 2, weight, bias).pow(3).sum(), [x], create_graph=True)
    torch.autograd.grad(gx.pow(2).sum(), [x], retain_graph=True)  # (second order: fine)
    with pytest.raises(RuntimeError, match="differentiable twice, not three times"):
        torch.autograd.grad(gx.pow(2).sum(), [x], create_graph=True)


def test_the_parameters_gradients_where_asked_by_grad_and_by_backward():
    # the engine says which inputs it needs (a leaf autograd.grad returns, or every leaf under
    # .backward()): each way the same numbers as PyTorch's
    x, weight, bias = inputs((3, 6, 4, 5), (True, True))
    for asked in ([weight], [bias], [x], [x, weight, bias]):
        ours, pytorchs = (torch.autograd.grad(norm(x, 3, weight, bias, 1e-5).sin().sum(), asked)
                          for norm in (group_norm, torch.nn.functional.group_norm))
        for actual, expected in zip(ours, pytorchs):
            torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    grads = []
    for norm in (group_norm, torch.nn.functional.group_norm):
        norm(x, 3, weight, bias, 1e-5).sin().sum().backward()
        grads.append([t.grad for t in (x, weight, bias)])
        for t in (x, weight, bias):
            t.grad = None
    for actual, expected in zip(*grads):
        torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)


def test_the_double_backward_dispatches_a_fraction_of_pytorchs():
    def double_backward(norm):
        x, weight, bias = inputs((4, 8, 5, 5), (True, True))
        y = norm(x, 4, weight, bias, 1e-5)
        gx, = torch.autograd.grad((y * y.sin()).sum(), [x], create_graph=True)
        return lambda: torch.autograd.grad(gx.pow(2).sum(), [x, weight], retain_graph=True)

    ours, pytorchs = cost(double_backward(group_norm)), cost(double_backward(torch.nn.functional.group_norm))
    assert ours.operations * 2.5 < pytorchs.operations, (ours, pytorchs)  # (49 against 142)
    assert ours.syncs == 0


LAYER_SHAPES = [((3, 5, 4), (4,)), ((2, 3, 4), (3, 4)), ((6, 5), (5,))]


@pytest.mark.parametrize("affine", AFFINE, ids=["weight_bias", "weight", "bias", "plain"])
@pytest.mark.parametrize("shape,normalized", LAYER_SHAPES, ids=["rows", "two_dims", "vectors"])
def test_layer_norm_as_one_group_matches_pytorchs_and_finite_differences(shape, normalized, affine):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(normalized, generator=g, dtype=torch.float64, requires_grad=True) if on else None
              for on in affine]
    args = [x] + [p for p in params if p is not None]

    def norm(function):
        def f(x, *given):
            it = iter(given)
            weight, bias = (next(it) if on else None for on in affine)
            return function(x, normalized, weight, bias, 1e-3)
        return f

    torch.testing.assert_close(norm(layer_norm)(*args), norm(torch.nn.functional.layer_norm)(*args),
                               rtol=1e-12, atol=1e-12)
    assert gradcheck(norm(layer_norm), args)
    assert gradgradcheck(norm(layer_norm), args)


def test_layer_norm_of_a_non_contiguous_input_and_upstream_gradient():
    # sequence first, as nn.TransformerEncoderLayer's default layout: [T, n, d] from a transpose,
    # and an upstream gradient strided the same way (the kernel, told [rows, channels], read it
    # in memory order: wrong numbers before it was made contiguous)
    g = torch.Generator().manual_seed(4)
    base = torch.randn(4, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    weight, bias = (torch.randn(6, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    seed = torch.randn(4, 4, 6, generator=g, dtype=torch.float64).transpose(0, 1)

    def second(norm):
        y = norm(base.transpose(0, 1), (6,), weight, bias, 1e-5)
        gx, gw = torch.autograd.grad(y, [base, weight], seed, create_graph=True)
        return [gx, gw, *torch.autograd.grad(gx.pow(2).sum() + gw.pow(2).sum(), [base, weight])]

    for actual, expected in zip(second(layer_norm), second(torch.nn.functional.layer_norm)):
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("weight,bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("shape,groups", SHAPES[:3], ids=[f"{len(s)}d_g{g}" for s, g in SHAPES[:3]])
def test_per_sample_affine_sq_norms_match_a_per_sample_loop_and_finite_differences(shape, groups, weight, bias):
    # the GroupNorm closed form's kernel path: each sample's ||grad_gamma||^2 + ||grad_beta||^2 at
    # two output directions; its derivatives (grad reg's) against finite differences
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    grads = [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2)]

    def loop(x, *grads):
        rows = []
        for i in range(shape[0]):
            params = [torch.ones(shape[1], dtype=x.dtype, requires_grad=True) for _ in range(2)]
            y = torch.nn.functional.group_norm(x[i:i + 1], groups, *params, 1e-3)
            asked = [p for p, on in zip(params, (weight, bias)) if on]
            rows.append(sum(sum(t.pow(2).sum() for t in torch.autograd.grad(y, asked, gr[i:i + 1], create_graph=True))
                            for gr in grads))
        return torch.stack(rows)

    ours = lambda x, *grads: per_sample_affine_sq_norms(x, list(grads), groups, 1e-3, weight, bias)
    torch.testing.assert_close(ours(x, *grads), loop(x, *grads), rtol=1e-12, atol=1e-12)
    assert gradcheck(ours, (x, *grads))
    # a strided seed (a slice of a wider gradient), which the kernels would misread
    seed = torch.randn(shape[0], 2, generator=g, dtype=torch.float64)[:, 0]
    grad = lambda f: torch.autograd.grad(f(x, *grads), [x, *grads], seed, allow_unused=True, materialize_grads=True)
    for actual, reference in zip(grad(ours), grad(loop)):  # (the bias's alone does not depend on x)
        torch.testing.assert_close(actual, reference, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seeded", ["all", "parameters"])
def test_strided_seeds_of_the_second_derivative(seeded):
    # the second derivative's seeds as slices of wider tensors: the kernels read memory in order,
    # so they must be made contiguous (gradgradcheck's own seeds always are)
    x, weight, bias = inputs((3, 6, 4, 5), (True, True))
    gen = torch.Generator().manual_seed(5)
    upstream = torch.randn(3, 6, 4, 5, generator=gen, dtype=torch.float64, requires_grad=True)

    def second_derivatives(norm):
        gx, gw, gb = torch.autograd.grad(norm(x, 3, weight, bias, 1e-5), [x, weight, bias], upstream,
                                         create_graph=True)
        outputs = [gx, gw, gb] if seeded == "all" else [gw, gb]
        seeds = [torch.randn(*t.shape, 2, generator=torch.Generator().manual_seed(i), dtype=t.dtype)[..., 0]
                 for i, t in enumerate(outputs)]
        assert not any(s.is_contiguous() for s in seeds)
        return torch.autograd.grad(outputs, [x, weight, upstream], seeds, allow_unused=True, materialize_grads=True)

    for ours, reference in zip(second_derivatives(group_norm), second_derivatives(torch.nn.functional.group_norm)):
        torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
