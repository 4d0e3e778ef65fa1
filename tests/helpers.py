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


# -- models for the regularizer tests (float64) ----------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2)
        self.head = nn.Linear(4 * 2 * 2, 2)

    def forward(self, x):
        x = torch.tanh(self.norm(self.conv1(x)))
        return self.head(torch.tanh(self.conv2(x)).flatten(1))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(self.layer(x).mean(1)).squeeze(-1)


class FrozenAndBuffers(nn.Module):
    """A frozen layer, BatchNorm buffers (eval mode) and an affine LayerNorm."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(5, 6)
        self.frozen.requires_grad_(False)
        self.bn = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(6)
        self.out = nn.Linear(6, 2)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)
            self.ln.weight.uniform_(0.5, 1.5)
            self.ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.out(torch.tanh(self.ln(self.bn(self.frozen(x)))))


class ReusedWeight(nn.Module):
    """One Linear applied twice: its weight enters the output through two paths."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(x))))).squeeze(-1)


class InplaceResidual(nn.Module):
    """In-place ReLU right after a Linear, and a residual += : what breaks hook-based peers."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 6)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(6, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.act(self.fc1(x))  # in place on fc1's output
        r = self.fc2(h)
        r += h  # in place on fc2's output (a ResNet-style residual)
        return self.head(torch.tanh(r))


class ConvSequence(nn.Module):
    """Conv1d (per-module fallback) feeding a Linear over sequence positions (Gram closed form)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 4, 3)
        self.proj = nn.Linear(4, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # [n, positions, channels]
        return self.head(torch.tanh(self.proj(h)).mean(1)).squeeze(-1)


class Attention(nn.Module):
    """nn.MultiheadAttention, sequence-first (closed form) or batch-first with a causal mask
    (per-module fallback)."""

    def __init__(self, masked: bool = False):
        super().__init__()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=masked)
        self.head = nn.Linear(6, 1)
        self.masked = masked

    def forward(self, x):  # x: [n, L, 6]
        if self.masked:
            mask = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
            out, _ = self.attn(x, x, x, need_weights=False, attn_mask=mask)
            return self.head(torch.tanh(out).mean(1)).squeeze(-1)
        seq = x.transpose(0, 1)
        out, _ = self.attn(seq, seq, seq, need_weights=False)
        return self.head(torch.tanh(out).mean(0)).squeeze(-1)


def brute_jacobian(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """J [n k, p] by a per-sample, per-output loop of torch.autograd.grad (the reference)."""
    training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(inputs.shape[0]):
        out = model(inputs[i : i + 1]).reshape(-1)
        for j in range(out.numel()):
            grads = torch.autograd.grad(out[j], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    model.train(training)
    return torch.stack(rows).detach()


def brute_reg(model: nn.Module, inputs: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """reg by the same loop; with create_graph it can be differentiated by plain autograd."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # fused CPU attention kernels have no double backward
        return _brute_reg(model, inputs, create_graph)


def _brute_reg(model, inputs, create_graph):
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    n = inputs.shape[0]
    for i in range(n):
        out = model(inputs[i : i + 1]).reshape(-1)
        for j in range(out.numel()):
            grads = torch.autograd.grad(out[j], params, create_graph=create_graph, retain_graph=True, allow_unused=True)
            total = total + sum((g**2).sum() for g in grads if g is not None)
    return total / n


def brute_reg_grad(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """grad reg, flat over trainable parameters, by plain autograd through the loop."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(brute_reg(model, inputs, create_graph=True), params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
