"""Two-layer ReLU on 1-D data: label noise and the curve length / convexity of the fit.

    python examples/relu_1d.py [--quick] [--seed 0] [--seeds 3] [--out runs/relu_1d]

The paper's second setting (Blanc et al. 2020, Sec. 5, Thm. 2, Figs. 2-3): f(x) = sum_i c_i
ReLU(a_i x + b_i) + a x + b with every weight trainable, fit to 12 equally spaced points whose
heights follow the paper's Figure 2 (relative levels 0, 3.5, 2, 2, 4, 3, 2, 1, 2, 3, 4, 1). For
every seed the same initialisation is trained with and without label noise; the script reports
the curve length of the fit over the data range and its number of convexity changes, against
the minimum the data allow (those of the linear interpolation of the points; Theorem 2 says the
fits that label noise can settle on have no extra convexity changes).

Differences from the paper (CPU default): width 100, full-batch steps with heavy-ball momentum
0.9 (the batch-1 runs of the paper need millions of steps), x in [-1, 1] and heights 0.25 x the
levels (the paper's length scale: its curves are about 4-5 long), a larger initialisation (first
layer a_i, b_i x 3 and output weights c_i x 8: a wiggly random initial function, near the lazy
regime, whose wiggles plain GD keeps between the data points, as in the paper's Figure 2), and
the noise annealed to 0 over the last half of the steps so that both runs end at (near) zero
training error.
"""

import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common import cap_steps, finish, parser, save_figure, start_run, train, write_summary  # noqa: E402
from noisy_label_sgd.paper_models import TwoLayerReLU1D  # noqa: E402

LEVELS = [0, 3.5, 2, 2, 4, 3, 2, 1, 2, 3, 4, 1]

args = parser("relu_1d", __doc__, steps=40000, lr=0.0015, noise_std=2.0, every=2000, anneal=0.5)
args.add_argument("--width", type=int, default=100)
args.add_argument("--seeds", type=int, default=3, help="number of initialisations")
args.add_argument("--height-scale", type=float, default=0.25, help="data heights = levels x scale")
args.add_argument("--hidden-scale", type=float, default=3.0,
                  help="multiply the initial first-layer weights a_i, b_i by this")
args.add_argument("--init-scale", type=float, default=8.0,
                  help="multiply the initial output weights c_i by this (a larger, wigglier initial "
                       "function, whose wiggles plain GD keeps)")
args = args.parse_args()
run_record = start_run(args)
if args.paper:
    args.width, args.seeds, args.steps = 1000, 5, max(args.steps, 200000)
    args.lr = min(args.lr, 3e-4)  # the tangent kernel grows with the width: larger steps diverge
if args.quick:
    args.steps, args.every, args.seeds, args.width = 300, 100, 2, 20
cap_steps(args)
device = torch.device(args.device)
os.makedirs(args.out, exist_ok=True)

x = torch.linspace(-1, 1, len(LEVELS), device=device)
y = torch.tensor(LEVELS, dtype=torch.float32, device=device) * args.height_scale
grid = torch.linspace(-1, 1, 4001, device=device)


def curve_length(f: torch.Tensor) -> float:
    return float(torch.sqrt((grid[1] - grid[0]) ** 2 + f.diff() ** 2).sum())


def convexity_changes(values: torch.Tensor, xs: torch.Tensor, rel_tol: float = 1e-2) -> int:
    """Sign changes of the slope increments (kinks) of a piecewise-linear curve, ignoring
    kinks below rel_tol of the largest."""
    slopes = values.diff() / xs.diff()
    kinks = slopes.diff()
    signs = torch.sign(kinks[kinks.abs() > rel_tol * kinks.abs().max().clamp_min(1e-30)])
    return int((signs.diff() != 0).sum())


def evaluate(model):
    f = model(grid)
    return {"curve_length": curve_length(f), "convexity_changes": convexity_changes(f, grid)}


data_changes = convexity_changes(y, x)
data_length = float(torch.sqrt(x.diff() ** 2 + y.diff() ** 2).sum())  # the linear interpolation
per_seed = {"with_noise": [], "without_noise": []}
histories, fits = {}, {}
seeds = list(range(args.seed, args.seed + args.seeds))  # --seed S: seeds S, S+1, ...
for i, seed in enumerate(seeds):
    args.seed = seed
    for key, std in (("without_noise", 0.0), ("with_noise", args.noise_std)):
        model = TwoLayerReLU1D(args.width, torch.Generator().manual_seed(seed)).to(device)
        with torch.no_grad():
            model.a_hidden.mul_(args.hidden_scale)
            model.b_hidden.mul_(args.hidden_scale)
            model.c.mul_(args.init_scale)
        history = train(model, x, y, args=args, noise_std=std, log_dir=os.path.join(args.out, f"seed{seed}", key),
                        evaluate=evaluate, desc=f"relu 1-d seed {seed}, noise {std:g}", momentum=0.9)
        per_seed[key].append(history.final())
        histories[(i, key)] = history
        with torch.no_grad():
            fits[(i, key)] = model.eval()(grid).cpu()

results = {}
for key, runs in per_seed.items():
    lengths = [r["curve_length"] for r in runs]
    median = sorted(range(len(runs)), key=lambda i: lengths[i])[len(runs) // 2]
    results[key] = {
        "median_curve_length": statistics.median(lengths),
        "median_seed": seeds[median],
        "median_seed_convexity_changes": runs[median]["convexity_changes"],
        "median_seed_train_loss": runs[median]["train_loss"],
        "seeds": seeds,
        "per_seed": runs,
    }

print(f"relu 1-d, width {args.width}, {args.steps} steps, lr {args.lr} (momentum 0.9), noise std {args.noise_std}")
print(f"data: linear interpolation length {data_length:.3f}, {data_changes} convexity changes (the minimum)")
print(f"{'seed':>4}  {'length w/o':>10}  {'length with':>11}  {'changes w/o':>11}  {'changes with':>12}  "
      f"{'reg w/o':>8}  {'reg with':>8}  {'loss w/o':>9}  {'loss with':>9}")
for i, seed in enumerate(seeds):
    a, b = per_seed["without_noise"][i], per_seed["with_noise"][i]
    print(f"{seed:>4}  {a['curve_length']:>10.3f}  {b['curve_length']:>11.3f}  {a['convexity_changes']:>11}  "
          f"{b['convexity_changes']:>12}  {a['reg']:>8.2f}  {b['reg']:>8.2f}  {a['train_loss']:>9.1e}  {b['train_loss']:>9.1e}")
print(f"median curve length: without noise {results['without_noise']['median_curve_length']:.3f}, "
      f"with noise {results['with_noise']['median_curve_length']:.3f}")

fig, axes = plt.subplots(1, 5, figsize=(21, 4))
colors = plt.cm.viridis(torch.linspace(0, 0.9, args.seeds).tolist())
for ax, key in zip(axes[:2], ("without_noise", "with_noise")):
    for i, seed in enumerate(seeds):
        ax.plot(grid.cpu(), fits[(i, key)], color=colors[i], lw=1, label=f"seed {seed}")
    ax.plot(x.cpu(), y.cpu(), "ko", ms=4)
    ax.set(title=f"fits {key.replace('_', ' ')}", xlabel="x")
    ax.legend(fontsize=7)
for i in range(len(seeds)):
    for key, style in (("without_noise", "--"), ("with_noise", "-")):
        h = histories[(i, key)]
        axes[2].loglog(h.curve_steps[1:], h.curve["train_loss"][1:], style, color=colors[i], lw=1)
        axes[3].semilogx(h.curve_steps[1:], h.curve["curve_length"][1:], style, color=colors[i], lw=1)
        axes[4].semilogy(h.probe_steps, h.probe["reg"], style, color=colors[i], lw=1)
axes[3].axhline(data_length, color="gray", lw=0.8, label="linear interpolation (minimum)")
# the random initial functions are many times longer; keep the end of training readable
final_lengths = [r["curve_length"] for runs in per_seed.values() for r in runs]
axes[3].set_ylim(0.95 * data_length, 1.3 * max(final_lengths))
axes[2].set(title="clean train loss (dashed: no noise)", xlabel="step")
axes[3].set(title="curve length (dashed: no noise; clipped above)", xlabel="step")
axes[3].legend(fontsize=7)
axes[4].set(title="implicit regularizer reg (dashed: no noise)", xlabel="step")
figure = save_figure(fig, f"Two-layer ReLU, width {args.width}, 12 points, lr {args.lr} (momentum 0.9), label "
                     f"noise std {args.noise_std} annealed over the last {args.anneal:.0%}", device,
                     os.path.join(args.out, "relu_1d.png"))
summary = write_summary(args.out, results, run_record, {"data": {"curve_length": data_length, "convexity_changes": data_changes},
                                            "config": {"width": args.width, "steps": args.steps, "lr": args.lr,
                                                       "noise_std": args.noise_std, "anneal": args.anneal,
                                                       "seeds": args.seeds}})
finish(args.out, figure, summary)
