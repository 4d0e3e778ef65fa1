"""Shared fixtures: small models and data made from explicit generators."""

import torch
from torch import nn


def mlp(seed: int = 0, sizes=(6, 16, 16, 3), dtype=torch.float64) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g, dtype=dtype) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=g, dtype=dtype))
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def batch(step: int, n: int = 16, d_in: int = 6, d_out: int = 3, dtype=torch.float64):
    """The data of one training step, a pure function of the step (so resumed runs match)."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)
