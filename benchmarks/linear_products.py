"""LSQR's products one at a time, as ratios to a training step on the same n samples: J^T u
from the held vjp's graph, J v from that pullback's vjp (what the solve uses,
``FunctionalModel.linear_products``) and J v as a jvp (the baseline: the forward recomputed with
its tangent), interleaved in one process; with the peak memory of building each.

    .venv/bin/python benchmarks/linear_products.py --sizes 4096 16384
    .venv/bin/python benchmarks/linear_products.py --model gpt2 --sizes 64 256

Writes results/linear_products[_gpt2]_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_peak_allocated_bytes, environment, interleaved_median_seconds, print_table, write_json  # noqa: E402
from projection_scaling import model_and_data  # noqa: E402

from noisy_label_sgd.engines.functional import FunctionalModel, evaluation_mode  # noqa: E402


def case(model_name: str, n: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    model, x, y = model_and_data(model_name, n, 1, g)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x).reshape(y.shape), y).backward()
        opt.step()

    with evaluation_mode(model):
        fm = FunctionalModel(model)
        batch = (x,)
        held = {}
        build = lambda: held.update(products=fm.linear_products(batch))  # noqa: E731
        build_bytes = cpu_peak_allocated_bytes(build)
        J_times, J_transpose_times = held["products"]
        v = torch.randn(fm.num_params, generator=g)
        u = torch.randn(n, generator=g)
        jvp_bytes = cpu_peak_allocated_bytes(lambda: fm.J_times([batch], v))
        assert torch.allclose(J_times(v), fm.J_times([batch], v), rtol=1e-3, atol=1e-3 * float(J_times(v).abs().max()))
    # (timed outside the measurement's evaluation mode, which refuses the step's write: the held
    # graphs do not depend on it, and these models have no dropout; the math attention kernel,
    # as in the measurement: the jvp has no other)
    with sdpa_kernel(SDPBackend.MATH):
        step_s, transpose_s, pushforward_s, jvp_s = interleaved_median_seconds(
            [step, lambda: J_transpose_times(u), lambda: J_times(v), lambda: fm.J_times([batch], v)],
            torch.device("cpu"), repeats)
    return {"n": n, "step_s": step_s, "J_transpose_u": transpose_s / step_s, "J_v_pullback_vjp": pushforward_s / step_s,
            "J_v_jvp": jvp_s / step_s, "held_build_peak_bytes": build_bytes, "jvp_peak_bytes": jvp_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--model", default="mlp", choices=["mlp", "gpt2"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results, rows = [], []
    for n in args.sizes:
        r = case(args.model, n, args.repeats)
        results.append(r)
        rows.append([n, f"{r['step_s'] * 1e3:.0f}", f"{r['J_transpose_u']:.2f}", f"{r['J_v_pullback_vjp']:.2f}",
                     f"{r['J_v_jvp']:.2f}", f"{r['held_build_peak_bytes'] / 2**20:.0f}",
                     f"{r['jvp_peak_bytes'] / 2**20:.0f}"])
        print_table(["n", "step ms", "J^T u (held)", "J v (pullback's vjp)", "J v (jvp)", "held MiB", "jvp MiB"], rows)
        print(flush=True)
    model = "MLP 784-512-512-1" if args.model == "mlp" else "GPT-2 2x128, 64 positions, scalar"
    path = write_json("linear_products" + ("" if args.model == "mlp" else "_gpt2") + "_cpu",
                      {"environment": environment(torch.device("cpu")), "model": model, "dtype": "float32",
                       "results": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
