"""Label noise finds the sparse solution; parameter noise of the same size does not.

    python examples/sparse_quadratic.py [--quick] [--out runs/sparse_quadratic]

HaoChen, Wei, Lee & Ma (COLT 2021, "Shape matters: understanding the implicit bias of the noise
covariance"): the quadratically parametrised linear model f(x) = <theta * theta, x> (elementwise
square, w = theta^2), d = 100, n = 40 Gaussian samples, a sparse truth w* (5 ones), started at
the large uniform theta0 = 1. Fewer samples than unknowns: many w fit. Here
reg(theta) = (1/n) sum_i ||2 theta * x_i||^2 = 4 sum_j theta_j^2 (1/n) sum_i x_ij^2, about
4 ||w||_1: label noise drifts towards the least-l1 fit, the sparse truth. The same
initialisation is trained three ways, full batch, the same steps and learning rate:

* label noise: ``LabelNoiseSGD`` with noise std sigma, annealed to 0 over the last 20%;
* parameter noise: plain SGD, then isotropic Gaussian noise added to theta after every step,
  matched to label noise at every step in total variance (the trace of the covariance of the
  label-noise update, lr^2 sigma^2 (2/n)^2 sum_i ||grad f(x_i)||^2, spread over the d
  coordinates), with the same annealing;
* no noise: plain gradient descent.

The shapes differ, not the sizes: label noise moves theta only along the span of the samples'
gradients, which vanishes where theta_j is 0, so noise dies out on the coordinates it turns off;
parameter noise keeps kicking every coordinate.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import (add_threads_argument, annealed, log_spaced_steps, print_table, save_figure, start_run, style_axes,  # noqa: E402
                    write_summary)
from noisy_label_sgd import LabelNoiseSGD  # noqa: E402

p = add_threads_argument(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
p.add_argument("--steps", type=int, default=20000)
p.add_argument("--lr", type=float, default=0.01)
p.add_argument("--noise-std", type=float, default=3.0, help="label noise std sigma")
p.add_argument("--anneal", type=float, default=0.2, help="fraction of the steps over which the noise falls to 0")
p.add_argument("--init", type=float, default=1.0, help="theta0, every coordinate")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--out", default=os.path.join("runs", "sparse_quadratic"))
p.add_argument("--quick", action="store_true", help="a few seconds, for tests")
args = p.parse_args()
run_record = start_run(args)
if args.quick:
    args.steps = 1000
device = torch.device(args.device)
os.makedirs(args.out, exist_ok=True)

d, n, support = 100, 40, 5
g = torch.Generator().manual_seed(args.seed)
X = torch.randn(n, d, generator=g).to(device)
w_star = torch.zeros(d, device=device)
w_star[:support] = 1.0
y = X @ w_star
sq_feature_sums = X.pow(2).sum(0)  # sum_i x_ij^2: sum_i ||grad f(x_i)||^2 = 4 sum_j theta_j^2 of these
std_at = annealed(args.noise_std, args.steps, args.anneal)


class QuadraticLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.full((d,), args.init))

    def forward(self, x):
        return x @ self.theta.pow(2)


def run(kind: str) -> dict:
    model = QuadraticLinear().to(device)
    if kind == "label_noise":
        opt = LabelNoiseSGD(model.parameters(), lr=args.lr, noise_std=std_at, seed=args.seed)
        loss_fn = opt.noisy_loss(nn.MSELoss())
    else:
        opt, loss_fn = torch.optim.SGD(model.parameters(), lr=args.lr), nn.MSELoss()
    kicks = torch.Generator(device=device).manual_seed(args.seed + 1)
    curve = {"step": [], "test_error": [], "train_loss": []}
    record_at = log_spaced_steps(args.steps)
    for step in tqdm(range(args.steps + 1), desc=kind.replace("_", " "), unit="step", mininterval=0.5):
        if step in record_at:
            with torch.no_grad():
                w = model.theta.pow(2)
                curve["step"].append(step)
                curve["test_error"].append(float((w - w_star).norm() / w_star.norm()))
                curve["train_loss"].append(float(nn.functional.mse_loss(model(X), y)))
        if step == args.steps:
            break
        opt.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()
        opt.step()
        if kind == "parameter_noise":
            with torch.no_grad():
                label_noise_trace = (args.lr * std_at(step) * 2 / n) ** 2 * 4 * model.theta.pow(2) @ sq_feature_sums
                model.theta.add_(torch.randn(d, generator=kicks, device=device) * (label_noise_trace / d).sqrt())
    w = model.theta.detach().pow(2)
    return {"test_error": curve["test_error"][-1], "train_loss": curve["train_loss"][-1],
            "mass_off_support": float(w[support:].sum() / w.sum()), "curve": curve, "w": w.cpu().tolist()}


runs = {kind: run(kind) for kind in ("label_noise", "parameter_noise", "no_noise")}
results = {k: {m: v for m, v in r.items() if m not in ("curve", "w")} for k, r in runs.items()}
print(f"sparse quadratic model d={d}, n={n}, {support}-sparse truth, theta0 = {args.init}, {args.steps} full-batch "
      f"steps, lr {args.lr}, noise std {args.noise_std} annealed over the last {args.anneal:.0%}")
print_table(results, columns=("no_noise", "parameter_noise", "label_noise"))
ratio = min(results["parameter_noise"]["test_error"], results["no_noise"]["test_error"]) / results["label_noise"]["test_error"]
print(f"label noise's test error is {ratio:.0f}x smaller than the better of the other two")

colors = {"label_noise": "tab:red", "parameter_noise": "tab:blue", "no_noise": "gray"}
fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
for kind, r in runs.items():
    label = kind.replace("_", " ")
    axes[0].loglog(r["curve"]["step"][1:], r["curve"]["test_error"][1:], color=colors[kind], label=label)
axes[0].axvline((1 - args.anneal) * args.steps, color="gray", lw=0.8, ls=":", label="noise starts falling")
axes[0].set(xlabel="step", ylabel="||w - w*|| / ||w*||", title="test error (w = theta^2)")
offsets = {"no_noise": -0.25, "parameter_noise": 0.0, "label_noise": 0.25}
for kind, r in runs.items():
    axes[1].plot(torch.arange(d) + offsets[kind], r["w"], "o", ms=3, color=colors[kind], label=kind.replace("_", " "))
axes[1].plot(torch.arange(d), w_star.cpu(), "k_", ms=8, mew=1.5, label="truth w*")
axes[1].set(xlabel="coordinate j", ylabel="w_j = theta_j^2", title="learned weights against the truth")
style_axes(axes)
figure = save_figure(fig, f"Quadratically parametrised linear model (HaoChen et al. 2021): d={d}, n={n}, theta0={args.init}, "
                     f"lr {args.lr}, {args.steps} steps", device, os.path.join(args.out, "sparse_quadratic.png"))
summary = write_summary(args.out, results, run_record, {"config": {
    **{k: getattr(args, k) for k in ("steps", "lr", "noise_std", "anneal", "init", "seed")}, "d": d, "n": n, "support": support}})
print(f"figure:  {figure}\nsummary: {summary}")
