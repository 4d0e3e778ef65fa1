"""Classification with label flips: reg of the logits and the sharpness, with and without flips.

    python examples/flip_classification.py [--quick] [--flip 0.2] [--out runs/flip_classification]

Damian, Ma & Lee (NeurIPS 2021, "Label noise SGD provably prefers flat global minimizers") train
with a fraction p of the labels flipped afresh at every step. Here: scikit-learn's digits (1,797
8x8 images that ship inside the package; 1,000 to train, 797 to test), a small convolutional
network with GroupNorm, cross-entropy, SGD with momentum on mini-batches of 64, trained from the
same initialisation and the same batches with ``LabelNoise(distribution="flip", p=0.2)`` and
without flips. Measured at the end:

* accuracy on the clean training labels and on the test set;
* reg of the logits (all 10 outputs) on a fixed probe set of 200 training images
  (``RegularizerProbe``), also along training;
* the sharpness: the largest eigenvalue of the Hessian of the clean training loss (power
  iteration on Hessian-vector products over the 1,000 training images);
* the largest eigenvalue of the Gauss-Newton matrix (1/n) J^T J of the logits on the probe set
  (whose trace is reg): the curvature the logits' geometry gives, whatever the confidence.

Cross-entropy's Hessian is J^T (diag(p) - p p^T) J plus a residual term: without flips the
predicted probabilities p run to one-hot and that factor to 0, so the clean loss's sharpness
falls with the confidence, not with the geometry; with flips p stays near 0.8 on the true class.
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from common import (add_threads_argument, log_spaced_steps, print_table, save_figure, start_run, style_axes,  # noqa: E402
                    write_summary)
from noisy_label_sgd import RegularizerProbe, add_label_noise, implicit_regularizer, noisy_loss  # noqa: E402

p = add_threads_argument(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
p.add_argument("--steps", type=int, default=3000)
p.add_argument("--lr", type=float, default=0.05)
p.add_argument("--momentum", type=float, default=0.9)
p.add_argument("--batch-size", type=int, default=64)
p.add_argument("--flip", type=float, default=0.2, help="probability that a label is flipped at a step")
p.add_argument("--power-iterations", type=int, default=30)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--device", default="cpu")
p.add_argument("--out", default=os.path.join("runs", "flip_classification"))
p.add_argument("--quick", action="store_true", help="a few seconds, for tests")
args = p.parse_args()
run_record = start_run(args)
if args.quick:
    args.steps, args.power_iterations = 60, 5
device = torch.device(args.device)
os.makedirs(args.out, exist_ok=True)

images, labels = load_digits(return_X_y=True)
images = torch.tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
labels = torch.tensor(labels)
order = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))
x_train, y_train = images[order[:1000]].to(device), labels[order[:1000]].to(device)
x_test, y_test = images[order[1000:]].to(device), labels[order[1000:]].to(device)
x_probe, y_probe = x_train[: 40 if args.quick else 200], y_train[: 40 if args.quick else 200]


def network() -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)  # the same initialisation in both runs
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
            nn.Flatten(), nn.Linear(32 * 4 * 4, 10),
        ).to(device)


def top_eigenvalue(loss_fn, model: nn.Module, iterations: int) -> float:
    """The largest eigenvalue of the Hessian of ``loss_fn()`` (power iteration on
    Hessian-vector products, from a seeded random start)."""
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    g = torch.Generator(device=device).manual_seed(args.seed)
    v = [torch.randn(p.shape, generator=g, device=device) for p in params]
    eigenvalue = 0.0
    for _ in range(iterations):
        norm = torch.sqrt(sum(a.pow(2).sum() for a in v))
        v = [a / norm for a in v]
        hv = torch.autograd.grad(grads, params, v, retain_graph=True)
        eigenvalue = float(sum((a * b).sum() for a, b in zip(hv, v)))
        v = [a.detach() for a in hv]
    return eigenvalue


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def run(flip: float) -> dict:
    model = network()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    loss_fn = nn.CrossEntropyLoss()
    if flip > 0:
        loss_fn = noisy_loss(loss_fn, add_label_noise(opt, distribution="flip", p=flip, num_classes=10, seed=args.seed))
    batches = torch.Generator().manual_seed(args.seed + 1)  # the same batches in both runs
    curve = {"step": [], "reg": [], "train_accuracy": []}
    record_at = log_spaced_steps(args.steps, points=40)
    for step in tqdm(range(args.steps + 1), desc=f"flips p={flip:g}", unit="step", mininterval=0.5):
        if step in record_at:
            model.eval()
            curve["step"].append(step)
            curve["reg"].append(float(implicit_regularizer(model, x_probe)))
            curve["train_accuracy"].append(accuracy(model, x_train, y_train))
            model.train()
        if step == args.steps:
            break
        idx = torch.randint(0, len(x_train), (args.batch_size,), generator=batches).to(device)
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x_train[idx]), y_train[idx]).backward()
        opt.step()
    model.eval()
    report = RegularizerProbe(model, x_probe, y_probe)()  # class labels: cross-entropy and accuracy
    clean_loss = lambda: nn.functional.cross_entropy(model(x_train), y_train)
    probe_outputs = model(x_probe).detach()
    gauss_newton = lambda: 0.5 * (model(x_probe) - probe_outputs).pow(2).sum() / len(x_probe)  # Hessian: J^T J / n
    with torch.no_grad():
        train_loss = float(clean_loss())
    return {"train_accuracy": accuracy(model, x_train, y_train), "test_accuracy": accuracy(model, x_test, y_test),
            "clean_train_loss": train_loss, "probe_loss": report.loss, "probe_accuracy": report.accuracy,
            "reg": report.reg, "manifold_grad_norm": report.manifold_grad_norm,
            "sharpness": top_eigenvalue(clean_loss, model, args.power_iterations),
            "gauss_newton_top_eigenvalue": top_eigenvalue(gauss_newton, model, args.power_iterations),
            "probe_method": report.method, "curve": curve}


runs = {"without_flips": run(0.0), "with_flips": run(args.flip)}
results = {k: {m: v for m, v in r.items() if m != "curve"} for k, r in runs.items()}
print(f"digits, {len(x_train)} train / {len(x_test)} test, {args.steps} steps of {args.batch_size}, lr {args.lr}, "
      f"momentum {args.momentum}, flips p={args.flip}")
print_table(results, columns=("without_flips", "with_flips"))
w, f = results["without_flips"], results["with_flips"]
checks = {"reg lower with flips": f["reg"] < w["reg"], "sharpness lower with flips": f["sharpness"] < w["sharpness"],
          "Gauss-Newton top eigenvalue lower with flips": f["gauss_newton_top_eigenvalue"] < w["gauss_newton_top_eigenvalue"],
          "both at 100% clean training accuracy": w["train_accuracy"] == f["train_accuracy"] == 1.0,
          "test accuracy higher with flips": f["test_accuracy"] > w["test_accuracy"]}
for what, ok in checks.items():
    print(f"{'yes' if ok else 'NO '}  {what}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
for key, color in (("without_flips", "tab:blue"), ("with_flips", "tab:red")):
    c, label = runs[key]["curve"], key.replace("_", " ")
    axes[0].loglog(c["step"][1:], c["reg"][1:], color=color, label=label)
    axes[1].semilogx(c["step"][1:], c["train_accuracy"][1:], color=color, label=label)
axes[0].set(xlabel="step", ylabel="reg of the logits (probe set of 200)", title="reg along training")
axes[1].set(xlabel="step", ylabel="accuracy on the clean training labels", title="training accuracy")
names = {"test_accuracy": "test acc", "reg": "reg", "sharpness": "sharpness", "gauss_newton_top_eigenvalue": "GN top eig"}
text = "\n".join(f"{label:>10}: {w[k]:.4g} without, {f[k]:.4g} with flips" for k, label in names.items())
axes[0].text(0.02, 0.02, text, transform=axes[0].transAxes, fontsize=7, family="monospace", va="bottom")
style_axes(axes)
figure = save_figure(fig, f"Digits, small CNN with GroupNorm, cross-entropy: label flips p={args.flip} against none "
                     f"({args.steps} steps)", device, os.path.join(args.out, "flip_classification.png"))
summary = write_summary(args.out, results, run_record, {
    "checks": checks, "config": {**{k: getattr(args, k) for k in ("steps", "lr", "momentum", "batch_size", "flip", "seed")},
               "train_size": len(x_train), "test_size": len(x_test), "probe_size": len(x_probe)}})
print(f"figure:  {figure}\nsummary: {summary}")
