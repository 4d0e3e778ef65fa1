"""Two-layer tanh/logistic net on one data point: label noise collapses the hidden units.

    python examples/sigmoid_single_point.py [--quick] [--activation tanh|logistic] [--out ...]

The paper's third setting (Blanc et al. 2020, Sec. 5, Thm. 3, Appendix C): f(x) = sum_i c_i
s(w_i^T x) with no biases, trained on a single point (x, y). Every zero-error point has
sum_i c_i h_i = y with h_i = s(w_i^T x); plain gradient descent stops at whichever it reaches
first, so the units keep their diverse initial (c_i, h_i). With label noise the iterates drift
down reg = sum_i h_i^2 + c_i^2 s'(w_i^T x)^2 ||x||^2 until the active units take at most two
values: for tanh (alpha, beta), (-alpha, -beta) or dead.

Reported per unit: (c_i, h_i). active_units: units with |c_i h_i| above 1% of |y|. unit_types:
distinct (c, h) among active units at 5% relative tolerance, with (c, h) identified with
(-c, -h) for tanh (an odd activation).

Differences from the paper (CPU default): width 10, input dimension 10, learning rate 0.05,
noise std 1 annealed over the last 20% of the steps so that both runs end at zero error.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common import cap_steps, counted, finish, parser, print_table, save_figure, start_run, train, write_summary  # noqa: E402
from noisy_label_sgd.paper_models import TwoLayerSigmoid  # noqa: E402

args = parser("sigmoid_single_point", __doc__, steps=50000, lr=0.05, noise_std=1.0, every=2500, anneal=0.2)
args.add_argument("--activation", choices=("tanh", "logistic"), default="tanh")
args.add_argument("--width", type=int, default=10)
args.add_argument("--dim", type=int, default=10)
args.add_argument("--target", type=float, default=1.0, help="the label y")
args = args.parse_args()
run_record = start_run(args)
if args.paper:
    args.width, args.steps = 100, max(args.steps, 500000)
if args.quick:
    args.steps, args.every = 300, 100
cap_steps(args)
device = torch.device(args.device)
os.makedirs(args.out, exist_ok=True)

g = torch.Generator().manual_seed(args.seed)
x = torch.randn(1, args.dim, generator=g)
x = (x / x.norm()).to(device)
y = torch.tensor([args.target], device=device)


def units(model):
    """(c_i, h_i) per hidden unit."""
    with torch.no_grad():
        return model.c.detach().cpu().clone(), model.hidden(x)[0].cpu().clone()


def count_types(model) -> tuple[int, int]:
    c, h = units(model)
    active = (c * h).abs() > 0.01 * abs(args.target)
    points = torch.stack([c[active], h[active]], 1)
    if args.activation == "tanh":  # (c, h) ~ (-c, -h): put every point in the h >= 0 half-plane
        points = points * torch.where(points[:, 1:2] < 0, -1.0, 1.0)
    types: list[torch.Tensor] = []
    for p in points:
        if not any(float((p - q).norm()) <= 0.05 * float(q.norm()) for q in types):
            types.append(p)
    return int(active.sum()), len(types)


def evaluate(model):
    active, types = count_types(model)
    return {"active_units": active, "unit_types": types}


results, histories, start_units, end_units = {}, {}, {}, {}
for key, std in (("without_noise", 0.0), ("with_noise", args.noise_std)):
    model = TwoLayerSigmoid(args.width, args.dim, args.activation, torch.Generator().manual_seed(args.seed + 1)).to(device)
    start_units[key] = units(model)
    histories[key] = train(model, x, y, args=args, noise_std=std, log_dir=os.path.join(args.out, key),
                           evaluate=evaluate, desc=f"{args.activation} single point, noise {std:g}")
    end_units[key] = units(model)
    c, h = end_units[key]
    results[key] = {**histories[key].final(), "units": [[float(ci), float(hi)] for ci, hi in zip(c, h)]}

print(f"{args.activation} net, width {args.width}, one point in R^{args.dim}, y = {args.target}, {args.steps} steps, "
      f"lr {args.lr}, noise std {args.noise_std}")
print_table(results)
for key in ("without_noise", "with_noise"):
    c, h = end_units[key]
    print(f"{key:>14}: (c, h) = " + ", ".join(f"({ci:+.2f}, {hi:+.2f})" for ci, hi in zip(c.tolist(), h.tolist())))

fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
for ax, key in zip(axes[:2], ("without_noise", "with_noise")):
    c0, h0 = start_units[key]
    c1, h1 = end_units[key]
    ax.scatter(c0, h0, marker="o", facecolors="none", edgecolors="gray", label="start")
    ax.scatter(c1, h1, marker="x", color="tab:red", label="end")
    for a, b, cc, hh in zip(c0, h0, c1, h1):
        ax.annotate("", xy=(cc, hh), xytext=(a, b), arrowprops=dict(arrowstyle="->", color="lightgray", lw=0.6))
    ax.axhline(0, color="k", lw=0.4)
    ax.axvline(0, color="k", lw=0.4)
    r = results[key]
    ax.set(title=f"{key.replace('_', ' ')}: {counted(r['active_units'], 'active unit')}, {counted(r['unit_types'], 'type')}",
           xlabel="c_i (output weight)", ylabel="h_i = s(w_i . x)")
    ax.legend(fontsize=8)
for key, style in (("without_noise", "--"), ("with_noise", "-")):
    h = histories[key]
    axes[2].plot(h.probe_steps, h.probe["reg"], style, marker=".", label=key.replace("_", " "))
axes[2].set(title="implicit regularizer reg(theta)", xlabel="step")
axes[2].legend(fontsize=8)
figure = save_figure(fig, f"{args.activation} two-layer net on one point, width {args.width}, lr {args.lr}, "
                     f"label noise std {args.noise_std} annealed over the last {args.anneal:.0%}", device,
                     os.path.join(args.out, "sigmoid_single_point.png"))
summary = write_summary(args.out, results, run_record, {"config": {"activation": args.activation, "width": args.width,
                                                       "dim": args.dim, "steps": args.steps, "lr": args.lr,
                                                       "noise_std": args.noise_std}})
finish(args.out, figure, summary)
