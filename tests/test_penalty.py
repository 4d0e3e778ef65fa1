"""reg as an explicit, differentiable penalty (``create_graph=True``) against the brute-force loop."""

import pytest
import torch
from torch import nn

from helpers import FAST_REFUSES_GRAD, IDS, NO_FAST_GRAD, assert_rel_close, brute_reg, brute_reg_grad, make, mlp, randn
from noisy_label_sgd import implicit_regularizer, regularizer_grad

LAM = 0.3


def flat_grads(model):
    return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1)
                      for p in model.parameters() if p.requires_grad])


@pytest.mark.parametrize("method", ["auto", "fast", "vmap"])
@pytest.mark.parametrize("name", IDS)
def test_the_penalty_is_reg_and_its_backward_adds_lam_times_grad_reg(name, method):
    model, x = make(name)
    args = x if isinstance(x, tuple) else (x,)
    model.train()
    if method == "fast" and name in NO_FAST_GRAD:  # (grad reg would be torch.func's: refused alike)
        with pytest.raises(ValueError, match=FAST_REFUSES_GRAD):
            implicit_regularizer(model, args, method=method, create_graph=True)
        return
    penalty = implicit_regularizer(model, args, method=method, create_graph=True)
    assert all(m.training for m in model.modules())  # modes restored
    assert_rel_close(penalty.detach(), brute_reg(model, x))
    if not penalty.requires_grad:  # J independent of the parameters: grad reg is 0
        assert not brute_reg_grad(model, x).any()
        return
    (LAM * penalty).backward()
    assert_rel_close(flat_grads(model), LAM * brute_reg_grad(model, x))
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all(dict(model.named_parameters())[n].grad is None for n in frozen)


def test_the_penalty_adds_to_the_training_loss_gradient_and_changes_nothing_else():
    model, x = mlp(seed=3, sizes=(5, 8, 8, 2)), randn(6, 5)
    y = randn(6, 2, seed=1)
    probe = randn(4, 5, seed=2)
    nn.functional.mse_loss(model(x), y).backward()
    loss_grad = flat_grads(model).clone()
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    model.zero_grad()
    loss = nn.functional.mse_loss(model(x), y) + LAM * implicit_regularizer(model, probe, create_graph=True)
    loss.backward()
    grad_reg = regularizer_grad(model, probe)
    expected = loss_grad + LAM * torch.cat([g.reshape(-1) for g in grad_reg.values()])
    assert_rel_close(flat_grads(model), expected)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())


def test_the_fast_penalty_is_one_double_backward_through_the_closed_forms(monkeypatch):
    from noisy_label_sgd.engines.fast import FastEngine

    calls = []
    original = FastEngine._double_backward
    monkeypatch.setattr(FastEngine, "_double_backward", lambda self: calls.append(1) or original(self))
    model, x = mlp(seed=4, sizes=(6, 16, 16, 3)), randn(40, 6)
    penalty = implicit_regularizer(model, x, create_graph=True)
    assert calls == [1]
    penalty.backward()
    assert calls == [1]
    assert_rel_close(flat_grads(model), brute_reg_grad(model, x))


def test_without_grad_mode_the_penalty_is_the_plain_value():
    model, x = mlp(seed=5, sizes=(4, 6, 1)), randn(5, 4)
    with torch.no_grad():
        value = implicit_regularizer(model, x, create_graph=True)
    assert not value.requires_grad
    assert_rel_close(value, brute_reg(model, x))


def test_a_second_derivative_and_a_parameter_changed_before_the_backward_raise():
    model, x = mlp(seed=6, sizes=(4, 6, 1)), randn(5, 4)
    penalty = implicit_regularizer(model, x, create_graph=True)
    (grads,) = torch.autograd.grad(penalty, [model[0].weight], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad|double backward"):
        grads.sum().backward()
    penalty = implicit_regularizer(model, x, create_graph=True)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        penalty.backward()
