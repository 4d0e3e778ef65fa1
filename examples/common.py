"""What the three paper examples share: arguments, the paired training run, outputs.

Each example trains the same initialisation twice, with and without label noise (same seeds,
same batches, same steps), with LabelNoiseSGD, a RegularizerProbe on the training set and a
TensorBoardMonitor; it then writes a figure and summary.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

import noisy_label_sgd
from noisy_label_sgd import LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor


def add_threads_argument(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """--threads, which :func:`start_run` applies. On a machine busy with other work, torch's
    default of one thread per core makes every small operation wait on the others: 1 is faster."""
    p.add_argument("--threads", type=int, default=None,
                   help=f"torch CPU threads (default: torch's, {torch.get_num_threads()} here; 1 on a busy machine)")
    return p


def load_average() -> list[float]:
    return [round(load, 2) for load in os.getloadavg()]


@dataclass
class RunRecord:
    """Where and how a run ran, for summary.json: numbers that depend on the machine (times,
    probe costs) mean nothing without it."""

    device: str
    started: float = field(default_factory=time.perf_counter)
    load_at_start: list[float] = field(default_factory=load_average)

    def as_dict(self) -> dict:
        return {"device": self.device, "device_name": device_name(torch.device(self.device)),
                "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                "load_average_1_5_15_min": {"start": self.load_at_start, "end": load_average()},
                "wall_seconds": round(time.perf_counter() - self.started, 2), "torch": torch.__version__,
                "noisy_label_sgd": noisy_label_sgd.__version__, "python": platform.python_version()}


def start_run(args: argparse.Namespace, device: str | torch.device | None = None) -> RunRecord:
    """Applies --threads and starts the clock and the record of the machine's load."""
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    return RunRecord(device=str(device if device is not None else args.device))


def parser(name: str, doc: str, **defaults) -> argparse.ArgumentParser:
    p = add_threads_argument(argparse.ArgumentParser(description=doc.splitlines()[0]))
    p.add_argument("--steps", type=int, default=defaults["steps"], help="optimizer steps per run")
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--noise-std", type=float, default=defaults["noise_std"], help="label noise std")
    p.add_argument("--batch-size", type=int, default=defaults.get("batch_size"), help="default: full batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=os.path.join("runs", name), help="output directory")
    p.add_argument("--every", type=int, default=defaults["every"], help="probe/log every N steps")
    p.add_argument("--anneal", type=float, default=defaults.get("anneal", 0.0),
                   help="fraction of the steps at the end over which the noise std falls to 0")
    p.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    p.add_argument("--paper", action="store_true", help="the paper's sizes (meant for a GPU)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="at most this many steps after the presets: a smoke run of --paper")
    return p


def cap_steps(args: argparse.Namespace) -> None:
    """--max-steps applied after an example's presets (probing at least at the end)."""
    if args.max_steps:
        args.steps = min(args.steps, args.max_steps)
        args.every = min(args.every, args.steps)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}"


def environment_note(device: torch.device) -> str:
    return (f"{device_name(device)}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"noisy_label_sgd {noisy_label_sgd.__version__}, python {platform.python_version()}")


def save_figure(fig, title: str, device: torch.device, path: str, dpi: int = 110) -> str:
    """Title, the device and versions in the corner, tight layout, PNG."""
    fig.suptitle(title, fontsize=10)
    fig.text(0.01, 0.01, environment_note(device), fontsize=7, color="gray")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=dpi)
    return path


def style_axes(axes) -> None:
    """Legend and light grid on every panel, as every figure here has them."""
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")


def annealed(std: float, steps: int, fraction: float) -> Callable[[int], float]:
    """Constant std, then a linear decay to 0 over the last ``fraction`` of the steps."""
    start = (1.0 - fraction) * steps

    def schedule(step: int) -> float:
        if fraction <= 0 or step < start:
            return std
        return std * max(0.0, (steps - step) / (steps - start))

    return schedule


@dataclass
class History:
    """Metrics against steps: cheap ones on a log-spaced grid, the probe's every --every steps."""

    curve_steps: list[int] = field(default_factory=list)
    curve: dict[str, list[float]] = field(default_factory=dict)
    probe_steps: list[int] = field(default_factory=list)
    probe: dict[str, list[float]] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)  # probe cost against training time

    @staticmethod
    def _append(steps, store, step, values):
        steps.append(step)
        for k, v in values.items():
            store.setdefault(k, []).append(v)

    def final(self) -> dict[str, float]:
        return {**{k: v[-1] for k, v in self.curve.items()}, **{k: v[-1] for k, v in self.probe.items()},
                **self.cost}


def log_spaced_steps(steps: int, points: int = 80) -> set[int]:
    """A log-spaced grid of steps, with 0, the last step and three quarters of the way (where
    the last quarter, for a plateau check, begins)."""
    grid = torch.logspace(0, torch.log10(torch.tensor(float(steps))), points)
    return {int(s) for s in grid.round().tolist()} | {0, 3 * steps // 4, steps}


def train(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    args: argparse.Namespace,
    noise_std: float,
    log_dir: str,
    evaluate: Callable[[nn.Module], dict[str, float]],
    desc: str,
    momentum: float = 0.0,
) -> History:
    """Label-noise SGD (noise_std 0: plain SGD) with the probe and monitor attached.

    The clean train loss and ``evaluate(model)`` (under no_grad, eval mode) are recorded on a
    log-spaced grid of steps; the probe's reg and manifold gradient norm every ``args.every``.
    """
    n = inputs.shape[0]
    batch_size = args.batch_size or n
    schedule = annealed(noise_std, args.steps, args.anneal) if noise_std > 0 else 0.0
    opt = LabelNoiseSGD(model.parameters(), lr=args.lr, momentum=momentum, noise_std=schedule, seed=args.seed)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    probe = RegularizerProbe(model, inputs, targets)
    batches = torch.Generator().manual_seed(args.seed)  # the same batches in both runs
    history = History()
    curve_at = log_spaced_steps(args.steps)

    def record_curve(step: int) -> None:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            values = {"train_loss": nn.functional.mse_loss(model(inputs), targets).item(), **evaluate(model)}
        model.train(was_training)
        history._append(history.curve_steps, history.curve, step, values)

    probe_seconds = []

    def record_probe(step: int, report) -> None:
        history._append(history.probe_steps, history.probe, step,
                        {"reg": report.reg, "manifold_grad_norm": report.manifold_grad_norm})
        if step > 0:
            probe_seconds.append(report.seconds)

    bar = tqdm(total=args.steps, desc=desc, unit="step", mininterval=0.5)
    with bar, TensorBoardMonitor(probe, log_dir=log_dir, every=args.every, batch_size=batch_size,
                                 progress=bar) as monitor:
        monitor.attach(opt)  # (probes and logs step 0)
        record_curve(0)
        record_probe(0, monitor.last_report)
        model.train()
        start = time.perf_counter()
        for step in range(1, args.steps + 1):
            if batch_size < n:
                idx = torch.randint(0, n, (batch_size,), generator=batches).to(inputs.device)
                x, y = inputs[idx], targets[idx]
            else:
                x, y = inputs, targets
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()
            if step in curve_at:
                record_curve(step)
            if step % args.every == 0:
                record_probe(step, monitor.last_report)
        loop_seconds = time.perf_counter() - start
        if args.steps % args.every:
            record_probe(args.steps, monitor.log(args.steps))
    # what the probe would cost at every=100: one call per 100 training steps; the median call,
    # as a full garbage collection of the interpreter (~150 ms, once a run) lands in some call
    probe_ms = 1e3 * statistics.median(probe_seconds) if probe_seconds else 0.0
    step_ms = 1e3 * (loop_seconds - sum(probe_seconds[: args.steps // args.every])) / args.steps
    history.cost = {"probe_ms_per_call": probe_ms, "train_ms_per_step": step_ms,
                    "probe_share_at_every_100": probe_ms / (probe_ms + 100 * step_ms)}
    return history


def write_summary(out: str, results: dict[str, dict], run: RunRecord, extra: dict | None = None) -> str:
    path = os.path.join(out, "summary.json")
    with open(path, "w") as f:
        json.dump({**results, **(extra or {}), "machine": run.as_dict()}, f, indent=2)
    return path


def print_table(results: dict[str, dict[str, float]], columns=("without_noise", "with_noise")) -> None:
    keys = [k for k, v in results[columns[-1]].items() if isinstance(v, (int, float))]
    width = max(len(k) for k in keys)
    print(f"{'':{width}}" + "".join(f"  {c.replace('_', ' '):>16}" for c in columns))
    for k in keys:
        print(f"{k:{width}}" + "".join(f"  {results[c][k]:>16.4g}" for c in columns))


def matrix_sensing_problem(d: int, r: int, n: int, seed: int, device: torch.device):
    """The paper's matrix sensing data: n Gaussian measurements A_i [n, d, d] of X* = U* U*^T
    (rank r, unit columns, so eigenvalues near 1 like U0 U0^T = I); returns (A, y, X*)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, d, generator=g)
    U_star = torch.randn(d, r, generator=g)
    U_star /= U_star.norm(dim=0)
    X_star = U_star @ U_star.T
    y = torch.einsum("nij,ij->n", A, X_star)
    return A.to(device), y.to(device), X_star.to(device)


def counted(count: int, noun: str) -> str:
    """'1 active unit', '2 active units'."""
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def finish(out: str, figure: str, summary: str) -> None:
    print(f"figure:  {figure}\nsummary: {summary}\nlogs:    tensorboard --logdir {out}")
