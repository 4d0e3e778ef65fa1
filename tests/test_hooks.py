"""Loss hook and output hook: modes, shapes, errors."""

import pytest
import torch
from torch import nn

from noisy_label_sgd import LabelNoise, attach_output_noise, noisy_loss
from helpers import batch, mlp


def test_output_hook_is_silent_in_eval_mode_and_under_no_grad():
    model = mlp()
    x, _ = batch(0)
    clean = model(x).detach()
    noise = LabelNoise(1.0)
    handle = attach_output_noise(model, noise)
    assert not torch.equal(model(x).detach(), clean)  # training mode: noisy
    draws = noise.call
    model.eval()
    assert torch.equal(model(x), clean)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), clean)
    assert noise.call == draws  # no draws consumed
    handle.remove()
    assert torch.equal(model(x).detach(), clean)


def test_loss_hook_is_clean_in_eval_mode_and_under_no_grad():
    x, y = batch(0)
    out = mlp()(x).detach()
    clean = nn.functional.mse_loss(out, y)
    loss_fn = noisy_loss(nn.MSELoss(), LabelNoise(1.0))
    assert not torch.equal(loss_fn(out, y), clean)
    with torch.no_grad():
        assert torch.equal(loss_fn(out, y), clean)
    loss_fn.eval()
    assert torch.equal(loss_fn(out, y), clean)


def test_flip_noise_with_cross_entropy():
    noise = LabelNoise(distribution="flip", p=1.0, num_classes=4, seed=0)
    loss_fn = noisy_loss(nn.CrossEntropyLoss(), noise)
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (32,), generator=torch.Generator().manual_seed(1))
    flipped = (y + noise.sample(y)) % 4
    noise.rewind()
    torch.testing.assert_close(loss_fn(logits, y), nn.functional.cross_entropy(logits, flipped))
    assert (flipped != y).all()


def test_shape_mismatch_raises_and_draws_nothing():
    noise = LabelNoise(0.1)
    loss_fn = noisy_loss(nn.MSELoss(), noise)
    with pytest.raises(ValueError, match=r"output shape \(8, 1\) does not match target shape \(8,\)"):
        loss_fn(torch.zeros(8, 1), torch.zeros(8))
    flip_fn = noisy_loss(nn.CrossEntropyLoss(), LabelNoise(distribution="flip", p=0.1, num_classes=3))
    with pytest.raises(ValueError, match="batch size"):
        flip_fn(torch.zeros(8, 3), torch.zeros(7, dtype=torch.long))
    assert noise.call == 0


def test_non_tensor_model_output_raises():
    class DictModel(nn.Module):
        def forward(self, x):
            return {"out": x}

    attach_output_noise(DictModel(), LabelNoise(0.1))
    model = DictModel()
    attach_output_noise(model, LabelNoise(0.1))
    with pytest.raises(TypeError, match="returns a tensor, got dict"):
        model(torch.zeros(2))
    with pytest.raises(TypeError, match=r"\(output, target\) tensors, got \(dict, Tensor\)"):
        noisy_loss(nn.MSELoss(), LabelNoise(0.1))({"out": 1}, torch.zeros(2))


def test_bad_hook_arguments():
    with pytest.raises(ValueError, match="use noisy_loss"):
        attach_output_noise(mlp(), LabelNoise(distribution="flip", p=0.1, num_classes=3))
    with pytest.raises(TypeError, match="noise must be a LabelNoise, got float"):
        noisy_loss(nn.MSELoss(), 0.1)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        attach_output_noise(lambda x: x, LabelNoise(0.1))



def test_integer_targets_with_additive_noise_are_told_about_flip():
    loss_fn = noisy_loss(nn.CrossEntropyLoss(), LabelNoise(0.1))
    with pytest.raises(TypeError, match="integer targets .*additive noise is for float targets.*distribution='flip'"):
        loss_fn(torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 1]))
