"""The mechanism made explicit: matrix sensing trained on loss + lam reg, no label noise.

    python examples/explicit_penalty.py [--quick] [--lam 1e-3] [--out runs/explicit_penalty]

Label noise drives the iterates down grad reg along the zero-error manifold (Blanc et al. 2020);
here reg(U) = (1/n) sum_i ||(A_i + A_i^T) U||_F^2 is added to the mean squared error as a
penalty through ``implicit_regularizer(model, A, create_graph=True)`` (its backward adds lam
grad reg to .grad) and trained by plain full-batch gradient descent, beside gradient descent on
the loss alone, from the same U0 = I on the data of ``matrix_sensing.py`` (d=50, r=3, n = 4 d r = 600).
lam falls linearly to 0 over the last --anneal of the steps, as the noise does there, so that
the run ends on the zero-error manifold and not at the penalised optimum. The penalty does
directly, in a few thousand steps, what label noise does through its fluctuations.
"""

import argparse
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import (add_threads_argument, annealed, log_spaced_steps, matrix_sensing_problem, print_table, save_figure,  # noqa: E402
                    start_run, style_axes, write_summary)
from noisy_label_sgd import implicit_regularizer  # noqa: E402
from noisy_label_sgd.paper_models import MatrixSensing  # noqa: E402

p = add_threads_argument(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
p.add_argument("--steps", type=int, default=1500)
p.add_argument("--lr", type=float, default=0.02)
p.add_argument("--lam", type=float, default=1e-3, help="weight of reg in the loss")
p.add_argument("--anneal", type=float, default=0.2, help="fraction of the steps over which lam falls to 0")
p.add_argument("--d", type=int, default=None, help="matrix size (default 50)")
p.add_argument("--rank", type=int, default=None, help="rank of X* (default 3)")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--out", default=os.path.join("runs", "explicit_penalty"))
p.add_argument("--quick", action="store_true", help="a few seconds, for tests")
args = p.parse_args()
run_record = start_run(args)
d = args.d or (12 if args.quick else 50)
r = args.rank or (2 if args.quick else 3)
if args.quick:
    args.steps = 300
device = torch.device(args.device)
os.makedirs(args.out, exist_ok=True)
n = 4 * d * r
A, y, X_star = matrix_sensing_problem(d, r, n, args.seed, device)
lam_at = annealed(args.lam, args.steps, args.anneal)


def run(lam: float, desc: str) -> dict:
    model = MatrixSensing(d).to(device)  # U0 = I in both runs
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    curve = {"step": [], "train_loss": [], "test_error": [], "reg": []}
    record_at = log_spaced_steps(args.steps)
    seconds = 0.0
    for step in tqdm(range(args.steps + 1), desc=desc, unit="step", mininterval=0.5):
        if step in record_at:
            with torch.no_grad():
                X = model.U @ model.U.T
                values = {"step": step, "train_loss": nn.functional.mse_loss(model(A), y).item(),
                          "test_error": float((X - X_star).norm() / X_star.norm()),
                          "reg": float(implicit_regularizer(model, A))}
            for k, v in values.items():
                curve[k].append(v)
        if step == args.steps:
            break
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(A), y)
        if lam > 0:
            loss = loss + lam_at(step) * implicit_regularizer(model, A, create_graph=True)
        loss.backward()
        opt.step()
        seconds += time.perf_counter() - start
    final = {k: v[-1] for k, v in curve.items() if k != "step"}
    return {**final, "ms_per_step": 1e3 * seconds / args.steps, "curve": curve}


runs = {"without_penalty": run(0.0, "gradient descent"), "with_penalty": run(args.lam, f"gradient descent + {args.lam:g} reg")}
print(f"matrix sensing d={d}, r={r}, n={n}, {args.steps} full-batch steps, lr {args.lr}, lam {args.lam} "
      f"annealed over the last {args.anneal:.0%}")
results = {k: {m: v for m, v in run_.items() if m != "curve"} for k, run_ in runs.items()}
print_table(results, columns=("without_penalty", "with_penalty"))

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for key, style in (("without_penalty", "--"), ("with_penalty", "-")):
    c, label = runs[key]["curve"], key.replace("_", " ")
    axes[0].loglog(c["step"][1:], c["test_error"][1:], style, color="tab:red", label=f"test error, {label}")
    axes[0].loglog(c["step"][1:], c["train_loss"][1:], style, color="tab:blue", label=f"train loss, {label}")
    axes[1].semilogx(c["step"][1:], c["reg"][1:], style, color="tab:green", label=label)
axes[0].axvline((1 - args.anneal) * args.steps, color="gray", lw=0.8, ls=":", label="lam starts falling")
axes[0].set(xlabel="step", title="train loss and test error ||UU^T - X*||_F / ||X*||_F")
axes[1].set(xlabel="step", ylabel="reg(U)", title="the penalised quantity, reg")
style_axes(axes)
figure = save_figure(fig, f"Matrix sensing d={d}, r={r}, n={n}: gradient descent with and without the explicit penalty "
                     f"{args.lam:g} reg (no label noise)", device, os.path.join(args.out, "explicit_penalty.png"))
summary = write_summary(args.out, results, run_record, {"config": {k: getattr(args, k) for k in ("steps", "lr", "lam", "anneal", "seed")}
                                            | {"d": d, "r": r, "n": n}})
print(f"figure:  {figure}\nsummary: {summary}")
