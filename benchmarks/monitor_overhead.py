"""Training time with a TensorBoardMonitor (every=100) against the same training without it.

    python benchmarks/monitor_overhead.py [--steps 500] [--probe-size 64] [--repeats 3]

The MLP of benchmarks/probe.py (784-512-512-10, scalar output = sum of the outputs), batch 256,
LabelNoiseSGD with its loss hook. The monitor probes a fixed probe set of --probe-size samples
(reg, grad reg and the tangent projection) every 100 steps and writes TensorBoard events into a
temporary directory. Runs alternate (without, with, without, ...); the ratio of the medians is
reported. Target: at most 1.05.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, write_json  # noqa: E402
from probe import SumOutputs, mlp  # noqa: E402
from noisy_label_sgd import LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--steps", type=int, default=500)
p.add_argument("--every", type=int, default=100)
p.add_argument("--probe-size", type=int, default=64)
p.add_argument("--repeats", type=int, default=3)
args = p.parse_args()
device = torch.device("cpu")
g = torch.Generator().manual_seed(0)
x = torch.randn(256, 784, generator=g)
y = torch.randn(256, generator=g)
probe_x, probe_y = x[: args.probe_size], y[: args.probe_size]


def run(monitored: bool) -> tuple[float, float]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SumOutputs(mlp())
    opt = LabelNoiseSGD(model.parameters(), lr=1e-4, momentum=0.9, noise_std=0.1)
    loss_fn = opt.noisy_loss(nn.MSELoss())
    with tempfile.TemporaryDirectory() as log_dir:
        monitor = None
        if monitored:
            monitor = TensorBoardMonitor(RegularizerProbe(model, probe_x, probe_y), log_dir=log_dir,
                                         every=args.every, batch_size=256)
            monitor.attach(opt)
        start = time.perf_counter()
        for _ in range(args.steps):
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        seconds = time.perf_counter() - start
        probe_seconds = 0.0
        if monitor is not None:
            probe_seconds = monitor.last_report.seconds
            method = monitor.last_report.method
            monitor.close()
            print(f"  probe: {probe_seconds * 1e3:.1f} ms per call, method {method}")
    return seconds, probe_seconds


run(False), run(True)  # warm-up
times = {False: [], True: []}
probe_times = []
for _ in range(args.repeats):
    for monitored in (False, True):
        seconds, probe_seconds = run(monitored)
        times[monitored].append(seconds)
        if monitored:
            probe_times.append(probe_seconds)
plain, monitored = statistics.median(times[False]), statistics.median(times[True])
ratio = monitored / plain
env = environment(device)
print(f"# {env}")
print_table(["steps", "every", "probe set", "without s", "with monitor s", "ratio", "probe ms"],
            [[args.steps, args.every, args.probe_size, f"{plain:.2f}", f"{monitored:.2f}", f"{ratio:.3f}",
              f"{1e3 * statistics.median(probe_times):.1f}"]])
print("wrote", write_json("monitor_overhead_cpu", {
    "environment": env, "target_ratio": 1.05, "steps": args.steps, "every": args.every,
    "probe_size": args.probe_size, "without_seconds": times[False], "with_seconds": times[True],
    "ratio": ratio, "probe_seconds": probe_times}))
