"""Matrix sensing: label noise recovers the low-rank truth; plain gradient descent stops elsewhere.

    python examples/matrix_sensing.py [--quick] [--paper] [--out runs/matrix_sensing]

The paper's first setting (Blanc et al. 2020, Sec. 4, Fig. 1): X* = U* U*^T of rank r in
R^{d x d}, n measurements y_i = <A_i, X*> with A_i of i.i.d. N(0, 1) entries, and the
over-parameterised model h_i(U) = <A_i, U U^T> with U in R^{d x d} started at U0 = I. Fewer
measurements than unknowns: many U fit the data exactly. Plain gradient descent stops at one of
them; with label noise the iterates drift along the zero-error manifold down
reg(U) = (1/n) sum_i ||(A_i + A_i^T) U||_F^2 (about 2d ||U||_F^2 for Gaussian A_i: a nuclear
norm penalty on X = U U^T), which leads to the low-rank X*. The noise is annealed to 0 over the
last steps so that both runs end at zero training error. ``summary.json`` reports how much the
noiseless run's test error still moved over its last quarter of steps
(``without_noise.test_error_rel_change_last_quarter``): a plateau, not a slow run.

Differences from the paper (CPU default): d=50, r=3, n = 4 d r = 600 instead of d=100, r=5,
n = 5 d r, and full-batch steps with a larger learning rate and noise instead of batch-1 SGD,
which reach the effect in seconds. At d=50 the paper's n = 5 d r = 750 leaves (nearly) no other
zero-error point: plain gradient descent keeps approaching X* itself, only slowly (test error
0.229 at 20k steps, 0.0087 at 200k), so the contrast would be one of speed. With 600
measurements it converges within a few thousand steps to a zero-error X far from X*. (Likely
why: U U^T is positive semidefinite, and enough measurements leave X* the only PSD matrix
consistent with them.) --paper uses d=100, r=5, n = 5 d r.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common import (cap_steps, finish, matrix_sensing_problem, parser, print_table, save_figure, start_run, style_axes,  # noqa: E402
                    train, write_summary)
from noisy_label_sgd.paper_models import MatrixSensing  # noqa: E402

args = parser("matrix_sensing", __doc__, steps=20000, lr=0.02, noise_std=3.0, every=1000, anneal=0.2)
args.add_argument("--d", type=int, default=None, help="matrix size (default 50; --paper 100)")
args.add_argument("--rank", type=int, default=None, help="rank of X* (default 3; --paper 5)")
args.add_argument("--measurements", type=int, default=None, help="n (default 4 d r; --paper 5 d r)")
args = args.parse_args()
run_record = start_run(args)
d = args.d or (100 if args.paper else 12 if args.quick else 50)
r = args.rank or (5 if args.paper else 2 if args.quick else 3)
if args.paper:
    args.steps, args.lr = max(args.steps, 50000), 0.01
if args.quick:
    args.steps, args.every = 300, 100
cap_steps(args)
device = torch.device(args.device)
os.makedirs(args.out, exist_ok=True)

n = args.measurements or (5 if args.paper else 4) * d * r
A, y, X_star = matrix_sensing_problem(d, r, n, args.seed, device)


def evaluate(model):
    X = model.U @ model.U.T
    return {"test_error": float((X - X_star).norm() / X_star.norm()),
            "sq_frobenius_U": float(model.U.pow(2).sum())}  # = nuclear norm of U U^T


results, histories = {}, {}
for key, std in (("without_noise", 0.0), ("with_noise", args.noise_std)):
    model = MatrixSensing(d).to(device)  # U0 = I in both runs
    history = train(model, A, y, args=args, noise_std=std, log_dir=os.path.join(args.out, key),
                    evaluate=evaluate, desc=f"matrix sensing, noise {std:g}")
    histories[key] = history
    results[key] = history.final()

# the plateau: how much the noiseless test error moved over the last quarter of the steps
curve = histories["without_noise"]
quarter = curve.curve["test_error"][curve.curve_steps.index(3 * args.steps // 4)]
results["without_noise"]["test_error_rel_change_last_quarter"] = abs(curve.curve["test_error"][-1] - quarter) / quarter
print(f"matrix sensing d={d}, r={r}, n={n}, {args.steps} steps, lr {args.lr}, noise std {args.noise_std}")
print_table(results)
print(f"without noise, test error over the last quarter of the steps: {quarter:.4g} -> "
      f"{curve.curve['test_error'][-1]:.4g} ({results['without_noise']['test_error_rel_change_last_quarter']:.2%} change)")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for key, style in (("without_noise", "--"), ("with_noise", "-")):
    h = histories[key]
    steps = h.curve_steps[1:]  # log x axis: from step 1
    label = key.replace("_", " ")
    axes[0].loglog(steps, h.curve["train_loss"][1:], style, color="tab:blue", label=f"train loss, {label}")
    axes[0].loglog(steps, h.curve["test_error"][1:], style, color="tab:red", label=f"test error, {label}")
    axes[1].semilogx(steps, h.curve["sq_frobenius_U"][1:], style, color="tab:green", label=label)
axes[0].axvspan(3 * args.steps // 4, args.steps, color="gray", alpha=0.12, label="last quarter")
axes[0].set(xlabel="step", title="train loss and test error ||UU^T - X*||_F / ||X*||_F")
axes[1].set(xlabel="step", ylabel="||U||_F^2 = nuclear norm of UU^T",
            title=f"nuclear norm falls with noise (||X*||_* = {float(torch.linalg.matrix_norm(X_star, 'nuc')):.2f})")
style_axes(axes)
figure = save_figure(fig, f"Matrix sensing, d={d}, r={r}, n={n}, lr {args.lr}, label noise N(0, {args.noise_std}^2) "
                     f"annealed over the last {args.anneal:.0%}", device, os.path.join(args.out, "matrix_sensing.png"), dpi=120)
summary = write_summary(args.out, results, run_record, {"config": {"d": d, "r": r, "n": n, "steps": args.steps, "lr": args.lr,
                                                       "noise_std": args.noise_std, "anneal": args.anneal}})
finish(args.out, figure, summary)
