r"""Theory you can watch: label-noise SGD's three predictions held against training.

    python examples/theory_check.py [--quick] [--out runs/theory_check]

Blanc et al. (2020) predict, near the zero-error manifold, an Ornstein-Uhlenbeck spread of the
residuals, a drift along the manifold down the implicit regularizer, and a timescale of
1/(eta^2 sigma^2) steps for that drift. This script measures all three on the paper's tanh net
on a single data point, started on the manifold, and writes each prediction beside what
training did (figure, summary.json, TensorBoard logs with the monitor's live counterparts).

Derivation, for the loss and optimizer the library uses. n training samples with k outputs,
residual r = h(theta) - y in R^{nk}, J its Jacobian (nk x p), K = J J^T, reg = tr(K) / n.
LabelNoiseSGD with nn.MSELoss (the mean over the B k entries of a batch; here full batch, B = n),
step size eta, no momentum (with momentum beta, eta becomes eta / (1 - beta)), label noise
xi ~ N(0, sigma^2 I) fresh at every step: the gradient is (2 / (nk)) J^T (r - xi).

1. Ornstein-Uhlenbeck spread. Linearised at a zero-error point (J fixed),
   r' = (I - A) r + A xi with A = (2 eta / (nk)) K. The stationary covariance S solves
   S = (I - A) S (I - A) + sigma^2 A^2; on an eigenvalue a of A, s_a = sigma^2 a / (2 - a). The
   mean squared clean residual per entry is therefore
       E[|r|^2 / (nk)] = sigma^2 / (nk) * sum_a a / (2 - a)
   (small steps: sigma^2 eta reg / (n k^2), what the monitor logs as predicted_probe_loss).
2. Drift. The parameters fluctuate in the normal space with covariance
   (eta sigma^2 / (nk)) P_N (that is J S J^+ read back); averaging the gradient over them, the
   third derivative of the clean loss gives a mean step along the manifold of
   -eta/2 P_T grad tr(H Sigma) with H = (2 / (nk)) J^T J, tr(H Sigma) = 2 eta sigma^2 reg / (n k^2):
       E[Delta theta_T] per step = -(eta^2 sigma^2 / (n k^2)) P_T grad reg.
   Over a window of W steps: -(eta^2 sigma^2 / (n k^2)) W P_T grad reg, against the observed
   P_T (theta_{t+W} - theta_t) (P_T and grad reg at theta_t).
3. Timescale. The drift's speed is proportional to eta^2 sigma^2, so the parameters follow one
   path along the manifold at a speed set by eta^2 sigma^2: reg against eta^2 sigma^2 x steps
   is one curve for every (eta, sigma), while against steps the curves spread apart by the ratio
   of their eta^2 sigma^2.

Assumptions, and how this run meets them: small steps (the drift and OU measurements use the
first pair, whose eigenvalues a of A are about 0.01; the timescale runs go up to a = 0.17), the
run starts on the manifold (noiseless gradient descent first, to a train loss below 1e-30), fixed
noise (no annealing), and residuals small enough for the linearisation (rms about 0.24). Each
prediction is an expectation over the noise: the network is trained as an ensemble of
independent copies (--copies, each the paper's net with its own initialisation and its own
noise), which to the library is one model with k = copies outputs on the one data point; its
step size is copies x the per-copy step, so that each copy trains exactly as alone (the
mean-reduced loss divides by k), and every formula above holds with that n = 1, k = copies.
Reported reg is per copy (the ensemble's divided by k).

The default pairs hold eta sigma^2 at 0.04 while eta^2 sigma^2 spans 16x. The eta^2 sigma^2 law
is the leading order: its corrections grow with eta sigma^2 (the size of the OU fluctuations, which
also shift reg measured at the noisy iterate). With eta sigma^2 varying from 0.01 to 0.09
(--pairs 0.01:1,0.02:1,0.01:3,0.02:2) the runs with the larger noise drifted 10-20% faster in
rescaled time over three seeds (speed factors 0.85-0.91 against 1.05-1.15; spread 1.18-1.35).
"""

import argparse
import copy
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import add_threads_argument, save_figure, start_run, write_summary  # noqa: E402
from noisy_label_sgd import LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor, tangent_projection  # noqa: E402

SETTING = "tanh_single_point"
CHECKS = {"timescale.spread_rescaled": 1.3, "timescale.spread_steps": 8.0, "drift.mean_cosine": 0.7,
          "drift.median_length_ratio": (0.5, 2.0), "ou.relative_error": 0.25}

p = add_threads_argument(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
p.add_argument("--pairs", default="0.0025:4,0.005:2.8284,0.01:2,0.04:1",
               help="per-copy step size : noise std, comma-separated (default: eta^2 sigma^2 spanning 16x "
                    "at one eta sigma^2 = 0.04)")
p.add_argument("--tau", type=float, default=1.0, help="each run's length in eta^2 sigma^2 x steps")
p.add_argument("--window", type=float, default=0.1, help="drift window in eta^2 sigma^2 x steps")
p.add_argument("--copies", type=int, default=128, help="independent copies of the net trained together")
p.add_argument("--width", type=int, default=10)
p.add_argument("--dim", type=int, default=10)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--out", default=os.path.join("runs", "theory_check"))
p.add_argument("--quick", action="store_true", help="a few seconds, for tests (the checks need the full run)")
args = p.parse_args()
run_record = start_run(args)
if args.quick:
    args.copies, args.tau, args.window = 4, 0.1, 0.02
pairs = [tuple(float(v) for v in pair.split(":")) for pair in args.pairs.split(",")]
device = torch.device(args.device)
dtype = torch.float64
os.makedirs(args.out, exist_ok=True)


class TanhCopies(nn.Module):
    """``copies`` independent nets f_s(x) = sum_i c_si tanh(w_si . x): one output per copy."""

    def __init__(self, copies: int, width: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(copies, width, dim, generator=generator, dtype=dtype) / dim**0.5)
        self.c = nn.Parameter(torch.randn(copies, width, generator=generator, dtype=dtype) / width**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, dim] -> [n, copies]
        return torch.einsum("sw,nsw->ns", self.c, torch.tanh(torch.einsum("swd,nd->nsw", self.w, x)))


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([q.detach().reshape(-1) for q in model.parameters()])


def jacobian(model: nn.Module) -> torch.Tensor:
    """J [n k, p] by autograd (tiny here): the OU prediction needs K's eigenvalues."""
    out = model(x).reshape(-1)
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o, list(model.parameters()), retain_graph=True)])
            for o in out]
    return torch.stack(rows).detach()


S = args.copies
g = torch.Generator().manual_seed(args.seed)
x = torch.randn(1, args.dim, generator=g, dtype=dtype)
x = (x / x.norm()).to(device)
y = torch.ones(1, S, dtype=dtype, device=device)
n, k = 1, S

# on the manifold: noiseless gradient descent to zero error, the same start for every run
start = TanhCopies(S, args.width, args.dim, torch.Generator().manual_seed(args.seed + 1)).to(device)
descent = torch.optim.SGD(start.parameters(), lr=0.1 * S)
for _ in range(3000):
    descent.zero_grad()
    nn.functional.mse_loss(start(x), y).backward()
    descent.step()
with torch.no_grad():
    start_loss = float(nn.functional.mse_loss(start(x), y))
print(f"{S} copies of a width-{args.width} tanh net on one point in R^{args.dim}; start: train loss {start_loss:.1e}")


def run(lr: float, std: float, *, windows: bool) -> dict:
    """One label-noise run from the start, for tau / (lr^2 std^2) steps: reg on a grid of steps;
    with ``windows``, the drift windows and the clean residual at every step."""
    model = copy.deepcopy(start)
    eta = S * lr  # the library's step size: each copy then trains with lr (the loss is a mean over k)
    opt = LabelNoiseSGD(model.parameters(), lr=eta, noise_std=std, seed=args.seed)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    probe = RegularizerProbe(model, x, y)
    steps = max(1, round(args.tau / (lr * std) ** 2))
    every = max(1, steps // 100)
    window = max(1, round(args.window / (lr * std) ** 2))
    result = {"lr": lr, "std": std, "steps": steps, "curve_steps": [], "reg": [], "windows": [],
              "residual": [], "predicted_residual": []}
    log_dir = os.path.join(args.out, SETTING, f"lr{lr:g}_std{std:g}")
    bar = tqdm(total=steps, desc=f"lr {lr:g}, std {std:g}", unit="step", mininterval=0.5)
    with bar, TensorBoardMonitor(probe, log_dir=log_dir, every=every, progress=bar, total_steps=steps) as monitor:
        monitor.attach(opt)
        window_start = None
        for step in range(steps + 1):
            if step % every == 0:  # (the monitor probed at attach() and after every `every` steps)
                result["curve_steps"].append(step)
                result["reg"].append(monitor.last_report.reg / S)
            if windows and step % window == 0:
                if window_start is not None:  # the window [t, t + W] closes
                    t, theta_t, model_t, manifold_t = window_start
                    observed = tangent_projection(model_t, x, unflat(model_t, flat(model) - theta_t))
                    predicted = -(eta * std) ** 2 / (n * k**2) * window * manifold_t
                    result["windows"].append((t, flat_dict(observed), predicted))
                window_start = (step, flat(model), copy.deepcopy(model), probe().manifold_grad)
            if windows and step > steps // 4 and step % every == 0:  # OU: K's eigenvalues now
                J = jacobian(model)
                a = torch.linalg.eigvalsh(J @ J.T) * 2 * eta / (n * k)
                result["predicted_residual"].append(float(std**2 / (n * k) * (a / (2 - a)).sum()))
            if step == steps:
                break
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if windows and step + 1 > steps // 4:
                with torch.no_grad():
                    result["residual"].append(float(nn.functional.mse_loss(model(x), y)))
    return result


def unflat(model: nn.Module, vector: torch.Tensor) -> dict:
    out, start_index = {}, 0
    for name, q in model.named_parameters():
        out[name] = vector[start_index:start_index + q.numel()].view_as(q)
        start_index += q.numel()
    return out


def flat_dict(tensors: dict) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


runs = [run(lr, std, windows=i == 0) for i, (lr, std) in enumerate(pairs)]

# 1. timescale: how many steps each run needs to take reg half-way down. Read off one noisy
# curve, a crossing moves by the noise over the slope (about 10% here); so each run's speed is
# fitted over its whole curve instead: the factor c_j that best maps it onto the runs' pooled
# curve, reg_j(tau) ~ pooled(c_j tau) in tau = eta^2 sigma^2 x steps (theory: c_j = 1 for all),
# and its half-way point is the pooled curve's, divided by c_j.
taus = [numpy.array(r["curve_steps"], dtype=float) * (r["lr"] * r["std"]) ** 2 for r in runs]
regs = [numpy.array(r["reg"]) for r in runs]
grid = numpy.linspace(0.0, min(t[-1] for t in taus), 401)
pooled = numpy.mean([numpy.interp(grid, t, reg) for t, reg in zip(taus, regs)], 0)
factors = numpy.exp(numpy.linspace(numpy.log(0.5), numpy.log(2.0), 1601))


def speed(tau: numpy.ndarray, reg: numpy.ndarray) -> float:
    """c minimising the mean squared gap between reg(tau) and pooled(c tau), where c tau lies
    on the pooled curve."""
    gaps = [numpy.mean((reg[c * tau <= grid[-1]] - numpy.interp(c * tau[c * tau <= grid[-1]], grid, pooled)) ** 2)
            for c in factors]
    return float(factors[int(numpy.argmin(gaps))])


target = pooled[0] - 0.5 * (pooled[0] - pooled[-1])
below = int(numpy.argmax(pooled <= target))  # the pooled curve's first grid point at or below the target
pooled_half_way = float(grid[below - 1] + (pooled[below - 1] - target) / (pooled[below - 1] - pooled[below])
                        * (grid[below] - grid[below - 1]))
speeds = [speed(t, reg) for t, reg in zip(taus, regs)]
rescaled = [pooled_half_way / c for c in speeds]
crossing = [h / (r["lr"] * r["std"]) ** 2 for h, r in zip(rescaled, runs)]
timescale = {"spread_steps": max(crossing) / min(crossing), "spread_rescaled": max(rescaled) / min(rescaled),
             "eta2_sigma2": [(r["lr"] * r["std"]) ** 2 for r in runs],
             "eta_sigma2": [r["lr"] * r["std"] ** 2 for r in runs], "speed_factors": speeds,
             "half_way_steps": crossing, "half_way_rescaled": rescaled, "target_reg": float(target),
             "curves": [{"lr": r["lr"], "std": r["std"], "steps": r["curve_steps"], "reg": r["reg"]} for r in runs]}

# 2. drift: observed tangent displacement over each window against the prediction
cosines, ratios = [], []
for _, observed, predicted in runs[0]["windows"]:
    cosines.append(float(observed.dot(predicted) / (observed.norm() * predicted.norm())))
    ratios.append(float(observed.norm() / predicted.norm()))
drift = {"mean_cosine": statistics.fmean(cosines), "median_length_ratio": statistics.median(ratios),
         "windows": len(cosines), "cosines": cosines, "length_ratios": ratios}

# 3. OU: the mean squared clean residual at stationarity against the Lyapunov prediction
ou = {"measured": statistics.fmean(runs[0]["residual"]), "predicted": statistics.fmean(runs[0]["predicted_residual"])}
ou["relative_error"] = abs(ou["measured"] - ou["predicted"]) / ou["predicted"]

checks = {
    "timescale.spread_rescaled": timescale["spread_rescaled"] <= CHECKS["timescale.spread_rescaled"],
    "timescale.spread_steps": timescale["spread_steps"] >= CHECKS["timescale.spread_steps"],
    "drift.mean_cosine": drift["mean_cosine"] >= CHECKS["drift.mean_cosine"],
    "drift.median_length_ratio": CHECKS["drift.median_length_ratio"][0] <= drift["median_length_ratio"]
    <= CHECKS["drift.median_length_ratio"][1],
    "ou.relative_error": ou["relative_error"] <= CHECKS["ou.relative_error"],
}
print(f"timescale: half-way at {', '.join(f'{c:.0f}' for c in crossing)} steps (spread {timescale['spread_steps']:.1f}x); "
      f"rescaled {', '.join(f'{c:.3f}' for c in rescaled)} (spread {timescale['spread_rescaled']:.3f}x; "
      f"speed factors {', '.join(f'{c:.3f}' for c in speeds)})")
print(f"drift: mean cosine {drift['mean_cosine']:.3f} over {drift['windows']} windows, "
      f"median length ratio {drift['median_length_ratio']:.3f}")
print(f"OU: mean squared clean residual {ou['measured']:.4g} measured, {ou['predicted']:.4g} predicted "
      f"({ou['relative_error']:.1%} apart)")
for name, passed in checks.items():
    print(f"  {'pass' if passed else 'FAIL'}  {name}")

# the figure: each prediction beside the measurement
fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
for r in runs:
    label = f"lr {r['lr']:g}, std {r['std']:g} (eta^2 sigma^2 = {(r['lr'] * r['std']) ** 2:.1e})"
    axes[0, 0].plot([max(s, 1) for s in r["curve_steps"]], r["reg"], label=label)
    axes[0, 1].plot([s * (r["lr"] * r["std"]) ** 2 for s in r["curve_steps"]], r["reg"], label=label)
for ax, xs in ((axes[0, 0], crossing), (axes[0, 1], rescaled)):
    ax.axhline(target, color="gray", lw=0.6, ls=":")
    ax.plot(xs, [target] * len(xs), "k|", markersize=12)
axes[0, 0].set(xscale="log", xlabel="step", ylabel="reg per copy",
               title=f"against steps: half-way points {timescale['spread_steps']:.1f}x apart")
axes[0, 1].set(xlabel="eta^2 sigma^2 x step", ylabel="reg per copy",
               title=f"against eta^2 sigma^2 x steps: {timescale['spread_rescaled']:.2f}x apart (theory: one curve)")
axes[0, 0].legend(fontsize=7)
predicted_lengths = [float(w[2].norm()) for w in runs[0]["windows"]]
observed_lengths = [float(w[1].norm()) for w in runs[0]["windows"]]
ax = axes[1, 0]
points = ax.scatter(predicted_lengths, observed_lengths, c=cosines, cmap="viridis", vmin=0, vmax=1)
top = max(predicted_lengths + observed_lengths) * 1.1
ax.plot([0, top], [0, top], "k--", lw=0.8, label="observed = predicted")
fig.colorbar(points, ax=ax, label="cosine(observed, predicted)")
ax.set(xlim=(0, top), ylim=(0, top), xlabel="predicted |drift| over a window", ylabel="observed |P_T displacement|",
       title=f"drift: mean cosine {drift['mean_cosine']:.2f}, median length ratio {drift['median_length_ratio']:.2f}")
ax.legend(fontsize=8)
ax = axes[1, 1]
residual = torch.tensor(runs[0]["residual"])
smooth = residual.unfold(0, min(200, len(residual)), max(1, min(200, len(residual)) // 4)).mean(1)
ax.plot(torch.linspace(0, len(residual), len(smooth)), smooth, label="measured (running mean over 200 steps)")
ax.axhline(ou["measured"], color="tab:blue", ls=":", lw=0.8)
ax.axhline(ou["predicted"], color="tab:red", label="predicted: sigma^2/(nk) sum a/(2-a)")
ax.set(xlabel="step (from a quarter of the run on)", ylabel="mean squared clean residual",
       title=f"Ornstein-Uhlenbeck spread: {ou['measured']:.3g} measured, {ou['predicted']:.3g} predicted")
ax.legend(fontsize=8)
figure = save_figure(fig, f"label-noise SGD against its theory: {S} copies of a tanh net on one point "
                     f"(width {args.width}, dim {args.dim})", device, os.path.join(args.out, "theory_check.png"))

results = {
    SETTING: {"timescale": timescale, "drift": {k_: v for k_, v in drift.items() if k_ not in ("cosines", "length_ratios")},
              "ou": ou, "checks": checks, "passed": all(checks.values())},
    "thresholds": CHECKS,
    "config": {**vars(args), "start_train_loss": start_loss},
}
summary_path = write_summary(args.out, results, run_record)
print(f"figure:  {figure}\nsummary: {summary_path}\nlogs:    tensorboard --logdir {args.out}")
