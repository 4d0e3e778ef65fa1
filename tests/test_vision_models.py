"""Convolutional models people bring, written here (torchvision's wheels do not load with this
torch build): a ResNet with BatchNorm in eval mode and a MobileNet-style block (depthwise
convolution, squeeze-excitation, hardswish), each on the fast path and exact against the loops."""

import pytest
import torch
from torch import nn

from helpers import (FD_ATOL, FLOAT64_RTOL, assert_rel_close, brute_jacobian, brute_reg_grad, finite_difference_grad,
                     seeded, svd_tangent_projection)
from noisy_label_sgd import RegularizerProbe, implicit_regularizer


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class TinyResNet(nn.Module):
    """Stem, two basic blocks (one strided, projection shortcuts), pooling, 2 outputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.blocks = nn.Sequential(BasicBlock(4, 4, 1), BasicBlock(4, 6, 2))
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class SqueezeExcitation(nn.Module):
    def __init__(self, channels, squeezed):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(channels, squeezed, 1), nn.Conv2d(squeezed, channels, 1)

    def forward(self, x):
        scale = x.mean((2, 3), keepdim=True)
        return x * nn.functional.hardsigmoid(self.expand(torch.relu(self.reduce(scale))))


class MobileNetBlock(nn.Module):
    """Inverted residual: 1x1 expansion, 3x3 depthwise, squeeze-excitation, 1x1 projection,
    BatchNorm and hardswish between them, a residual, and a head on the pooled features."""

    def __init__(self, channels=4, expanded=8):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(channels, expanded, 1, bias=False), nn.BatchNorm2d(expanded), nn.Hardswish())
        self.depthwise = nn.Sequential(nn.Conv2d(expanded, expanded, 3, padding=1, groups=expanded, bias=False),
                                       nn.BatchNorm2d(expanded), nn.Hardswish())
        self.se = SqueezeExcitation(expanded, 2)
        self.project = nn.Sequential(nn.Conv2d(expanded, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.head = nn.Linear(channels, 2)

    def forward(self, x):
        return self.head((x + self.project(self.se(self.depthwise(self.expand(x))))).mean((2, 3)))


def with_running_statistics(model, x):
    """Running statistics from a few training-mode forwards, and non-trivial affine parameters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.3, 0.3)
                m.momentum = 0.5
        model.train()
        for _ in range(3):
            model(x)
    return model.eval()


MODELS = {"resnet_batchnorm": (TinyResNet, (3, 6, 6)), "mobilenet_block": (MobileNetBlock, (4, 5, 5))}


@pytest.fixture(autouse=True)
def hardsigmoid_differentiable_twice():
    # the references differentiate twice too: F.hardsigmoid's backward has no derivative in
    # torch, so they run with the library's equal composite (tested below to be equal)
    from noisy_label_sgd.engines.functional import forward_replacements, twice_differentiable

    with twice_differentiable(), forward_replacements():
        yield


def test_the_composite_hardsigmoid_equals_torchs_in_every_dtype_and_differentiates_twice():
    from noisy_label_sgd.engines.functional import _hardsigmoid

    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        x = 4 * torch.randn(10000, generator=torch.Generator().manual_seed(5)).to(dtype)
        assert torch.equal(_hardsigmoid(x), torch.ops.aten.hardsigmoid(x)), dtype
    x = torch.linspace(-4, 4, 9, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(_hardsigmoid(x).pow(2).sum(), x, create_graph=True)
    (h,) = torch.autograd.grad(g.sum(), x)
    inside = (x.abs() < 3).double()
    assert torch.equal(g.detach(), 2 * _hardsigmoid(x).detach() * inside / 6)
    assert torch.equal(h, 2 * inside / 36)
    y = x.detach().clone()
    assert _hardsigmoid(y, inplace=True) is y and torch.equal(y, torch.ops.aten.hardsigmoid(x.detach()))


@pytest.mark.parametrize("name", MODELS)
def test_a_convolutional_model_is_probed_exactly_on_the_fast_path(name):
    build, shape = MODELS[name]
    # 40 samples x 2 outputs: past the small-J path
    x = torch.randn(40, *shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    model = with_running_statistics(seeded(43, build), x)
    report = RegularizerProbe(model, x)()
    assert report.method == "fast"
    J = brute_jacobian(model, x)
    assert_rel_close(report.per_sample, J.pow(2).reshape(40, -1).sum(1))
    grad = brute_reg_grad(model, x)
    assert_rel_close(report.reg_grad_norm, float(grad.norm()))
    manifold = svd_tangent_projection(J, grad)
    assert_rel_close(report.manifold_grad_norm, float(manifold.norm()), rtol=0, atol=FLOAT64_RTOL * float(grad.norm()))
    assert not any(m.training for m in model.modules())  # (the probe restored eval mode)


@pytest.mark.parametrize("name", MODELS)
def test_a_convolutional_models_grad_reg_matches_finite_differences(name):
    from noisy_label_sgd import regularizer_grad

    build, shape = MODELS[name]
    x = torch.randn(6, *shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    model = with_running_statistics(seeded(44, build), x)
    grad = regularizer_grad(model, x, method="fast")
    reg = lambda: implicit_regularizer(model, x)
    g = torch.Generator().manual_seed(0)
    for pname, p in model.named_parameters():
        idx = int(torch.randint(0, p.numel(), (1,), generator=g))
        fd = finite_difference_grad(reg, model, pname, idx)
        assert abs(grad[pname].reshape(-1)[idx].item() - fd) <= FD_ATOL * max(1.0, float(reg())), (pname, idx)
