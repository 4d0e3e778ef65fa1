"""Matrix sensing: label noise recovers the low-rank truth that plain gradient descent misses.

    python examples/matrix_sensing.py [--quick] [--paper] [--out runs/matrix_sensing]

The paper's first setting (Blanc et al. 2020, Sec. 4, Fig. 1): X* = U* U*^T of rank r in
R^{d x d}, n = 5 d r measurements y_i = <A_i, X*> with A_i of i.i.d. N(0, 1) entries, and the
over-parameterised model h_i(U) = <A_i, U U^T> with U in R^{d x d} started at U0 = I. Fewer
measurements than unknowns: many U fit the data exactly. Plain gradient descent stops at one of
them; with label noise the iterates drift along the zero-error manifold down
reg(U) = (1/n) sum_i ||(A_i + A_i^T) U||_F^2 (about 2d ||U||_F^2 for Gaussian A_i: a nuclear
norm penalty on X = U U^T), which leads to the low-rank X*. The noise is annealed to 0 over the
last steps so that both runs end at zero training error.

Differences from the paper (CPU default): d=50, r=3 instead of d=100, r=5, and full-batch steps
with a larger learning rate and noise instead of batch-1 SGD, which reach the effect in seconds.
--paper uses d=100, r=5.
"""

import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from common import cap_steps, finish, matrix_sensing_problem, parser, print_table, save_figure, train, write_summary  # noqa: E402
from noisy_label_sgd.paper_models import MatrixSensing  # noqa: E402

args = parser("matrix_sensing", __doc__, steps=20000, lr=0.02, noise_std=3.0, every=1000, anneal=0.2)
args.add_argument("--d", type=int, default=None, help="matrix size (default 50; --paper 100)")
args.add_argument("--rank", type=int, default=None, help="rank of X* (default 3; --paper 5)")
args = args.parse_args()
d = args.d or (100 if args.paper else 12 if args.quick else 50)
r = args.rank or (5 if args.paper else 2 if args.quick else 3)
if args.paper:
    args.steps, args.lr = max(args.steps, 50000), 0.01
if args.quick:
    args.steps, args.every = 300, 100
cap_steps(args)
device = torch.device(args.device)
os.makedirs(args.out, exist_ok=True)

A, y, X_star = matrix_sensing_problem(d, r, args.seed, device)
n = A.shape[0]


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

print(f"matrix sensing d={d}, r={r}, n={n}, {args.steps} steps, lr {args.lr}, noise std {args.noise_std}")
print_table(results)

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for key, style in (("without_noise", "--"), ("with_noise", "-")):
    h = histories[key]
    steps = h.curve_steps[1:]  # log x axis: from step 1
    label = key.replace("_", " ")
    axes[0].loglog(steps, h.curve["train_loss"][1:], style, color="tab:blue", label=f"train loss, {label}")
    axes[0].loglog(steps, h.curve["test_error"][1:], style, color="tab:red", label=f"test error, {label}")
    axes[1].semilogx(steps, h.curve["sq_frobenius_U"][1:], style, color="tab:green", label=label)
axes[0].set(xlabel="step", title="train loss and test error ||UU^T - X*||_F / ||X*||_F")
axes[1].set(xlabel="step", ylabel="||U||_F^2 = nuclear norm of UU^T",
            title=f"nuclear norm falls with noise (||X*||_* = {float(torch.linalg.matrix_norm(X_star, 'nuc')):.2f})")
for ax in axes:
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
figure = save_figure(fig, f"Matrix sensing, d={d}, r={r}, n={n}, lr {args.lr}, label noise N(0, {args.noise_std}^2) "
                     f"annealed over the last {args.anneal:.0%}", device, os.path.join(args.out, "matrix_sensing.png"), dpi=120)
summary = write_summary(args.out, results, {"config": {"d": d, "r": r, "n": n, "steps": args.steps, "lr": args.lr,
                                                       "noise_std": args.noise_std, "anneal": args.anneal}})
finish(args.out, figure, summary)
