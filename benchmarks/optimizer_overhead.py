"""Step time of LabelNoiseSGD + loss hook against torch.optim.SGD without noise (same run).

    python benchmarks/optimizer_overhead.py [--repeats 200] [--device cpu]

Both optimizers train their own copy of the same model on the same batch; their steps are
interleaved in blocks so that machine noise hits both alike. Target: ratio <= 1.03 on CPU.
"""

import argparse
import statistics
import time

import torch
from torch import nn

from common import environment, print_table, sync, write_json
from noisy_label_sgd import LabelNoiseSGD

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--repeats", type=int, default=200, help="timed steps per optimizer")
p.add_argument("--block", type=int, default=10, help="steps per interleaved block")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = p.parse_args()
device = torch.device(args.device)
g = torch.Generator().manual_seed(0)


class MatrixSensing(nn.Module):
    """h_i(U) = <A_i, U U^T>, U in R^{d x d} (the paper's first setting)."""

    def __init__(self, d: int):
        super().__init__()
        self.U = nn.Parameter(torch.eye(d))

    def forward(self, A):
        return torch.einsum("nij,ij->n", A, self.U @ self.U.T)


def mlp_case():
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    return model, torch.randn(256, 784, generator=g), torch.randn(256, 10, generator=g)


def sensing_case(d=100, r=5):
    n = 5 * d * r
    A = torch.randn(n, d, d, generator=g)
    U_star = torch.randn(d, r, generator=g)
    return MatrixSensing(d), A, torch.einsum("nij,ij->n", A, U_star @ U_star.T)


def make_step(model, opt, loss_fn, x, y):
    def step():
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return step


rows, results = [], {}
for name, case in (("MLP 784-512-512-10, batch 256", mlp_case), ("matrix sensing d=100, n=2500", sensing_case)):
    base_model, x, y = case()
    models = {k: __import__("copy").deepcopy(base_model).to(device) for k in ("sgd", "label_noise")}
    x, y = x.to(device), y.to(device)
    sgd = torch.optim.SGD(models["sgd"].parameters(), lr=1e-4, momentum=0.9)
    lns = LabelNoiseSGD(models["label_noise"].parameters(), lr=1e-4, momentum=0.9, noise_std=0.1)
    steps = {
        "sgd": make_step(models["sgd"], sgd, nn.MSELoss(), x, y),
        "label_noise": make_step(models["label_noise"], lns, lns.noisy_loss(nn.MSELoss()), x, y),
    }
    times = {k: [] for k in steps}
    for fn in steps.values():  # warm-up
        for _ in range(5):
            fn()
    for _ in range(max(1, args.repeats // args.block)):
        for k, fn in steps.items():
            for _ in range(args.block):
                sync(device)
                t = time.perf_counter()
                fn()
                sync(device)
                times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["label_noise"] / med["sgd"]
    results[name] = {"sgd_ms": 1e3 * med["sgd"], "label_noise_sgd_ms": 1e3 * med["label_noise"], "ratio": ratio}
    rows.append([name, f"{1e3 * med['sgd']:.3f}", f"{1e3 * med['label_noise']:.3f}", f"{ratio:.3f}"])

env = environment(device)
print(f"# {env}")
print_table(["case", "SGD ms", "LabelNoiseSGD+hook ms", "ratio"], rows)
print("wrote", write_json(f"optimizer_overhead_{device.type}", {"environment": env, "target_ratio": 1.03, "results": results}))
