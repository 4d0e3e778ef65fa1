"""A short end-to-end label-noise run: a small MLP on a toy regression, with and without noise.

    python examples/demo.py [--steps 2000] [--noise-std 0.5]

Both runs start from the same initialisation and see the same batches; the only difference is
the label noise. It prints the clean training loss at the end of each run and how far the two
parameter vectors drifted apart.
"""

import argparse

import torch
from torch import nn

from noisy_label_sgd import LabelNoiseSGD

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=2000)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--noise-std", type=float, default=0.5)
p.add_argument("--seed", type=int, default=0)
args = p.parse_args()

g = torch.Generator().manual_seed(args.seed)
x = torch.linspace(-1, 1, 16).unsqueeze(1)
y = torch.sin(3 * x) + 0.1 * torch.randn(x.shape, generator=g)


def make_model():
    torch_g = torch.Generator().manual_seed(args.seed)
    model = nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 1))
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=torch_g) / param.shape[-1] ** 0.5)
    return model


def run(noise_std):
    model = make_model()
    opt = LabelNoiseSGD(model.parameters(), lr=args.lr, noise_std=noise_std, seed=args.seed)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    for _ in range(args.steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        clean = nn.functional.mse_loss(model(x), y).item()
    return model, clean


quiet, quiet_loss = run(0.0)
noisy, noisy_loss = run(args.noise_std)
distance = torch.nn.utils.parameters_to_vector(quiet.parameters()) - torch.nn.utils.parameters_to_vector(noisy.parameters())
print(f"{args.steps} full-batch steps, lr {args.lr}, 16 points")
print(f"  without label noise: clean train loss {quiet_loss:.2e}")
print(f"  with label noise std {args.noise_std}: clean train loss {noisy_loss:.2e}")
print(f"  parameter distance between the two runs: {distance.norm():.3f}")
