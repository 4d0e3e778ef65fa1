"""The dense projection against the probe set's size: the certified Cholesky solve on K beside
the eigendecomposition it replaces (the baseline, in the same process), each as a ratio to a
training step on the same n samples; reg and grad reg beside them.

    .venv/bin/python benchmarks/projection_scaling.py                      # MLP 784-512-512-1
    .venv/bin/python benchmarks/projection_scaling.py --outputs 10 --sizes 128 256 512
    .venv/bin/python benchmarks/projection_scaling.py --model gpt2 --sizes 64 256   # GPT-2 2x128, T = 64

Writes results/projection_scaling_cpu.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import asdict

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_peak_allocated_bytes, environment, print_table, write_json  # noqa: E402
from cost import as_accelerator, cost  # noqa: E402

from noisy_label_sgd import implicit_regularizer, regularizer_grad, tangent_projection  # noqa: E402
from noisy_label_sgd.engines import tangent  # noqa: E402


def seconds(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls after one warm-up (big calls: the fastest is the least
    disturbed by the machine's other work); ``repeats`` 0: one call, no warm-up (the
    projections of the largest sizes, whose arithmetic dwarfs any first-call cost)."""
    if repeats == 0:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    fn()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gpt2_2x128() -> nn.Module:
    """GPT-2, 2 layers of width 128, 64 positions, its vocabulary (50257, the embedding tied to
    the head), scalar: the logsumexp of the last position's logits."""
    import transformers
    from probe import LanguageModelScore

    config = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    return LanguageModelScore(transformers.GPT2LMHeadModel(config))


def model_and_data(name: str, n: int, k: int, g: torch.Generator):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if name == "gpt2":
            model = gpt2_2x128()
            return model, torch.randint(0, model.lm.config.vocab_size, (n, 64), generator=g), torch.randn(n, generator=g)
        model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, k))
    return model, torch.randn(n, 784, generator=g), torch.randn(n, k, generator=g)


def case(n: int, k: int, repeats: int, baseline_max_rows: int, memory_budget: int | None, solver: str = "auto",
         model_name: str = "mlp", count_max_rows: int = 0) -> dict:
    g = torch.Generator().manual_seed(0)
    model, x, y = model_and_data(model_name, n, k, g)
    v = {name: torch.randn(p.shape, generator=g) for name, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    verdicts, products = [], {"J v": 0}
    certify, J_times = tangent.certified_solve, tangent.Products.J_times
    tangent.certified_solve = lambda *a: (lambda f: verdicts.append(f is not None) or f)(certify(*a))

    def counted(self, u):  # (LSQR's iterations: one J v each, and one to start)
        products["J v"] += 1
        return J_times(self, u)
    tangent.Products.J_times = counted
    try:
        cheap = max(repeats, 1)  # (a step, reg and grad reg always warmed up: a first call's costs would flatter)
        row = {"n": n, "outputs": k, "rows": n * k, "step_s": seconds(step, cheap),
               "reg_s": seconds(lambda: implicit_regularizer(model, x), cheap),
               "grad_reg_s": seconds(lambda: regularizer_grad(model, x), cheap),
               "memory_budget": memory_budget}
        row["solver"] = solver
        project = lambda: tangent_projection(model, x, v, solver=solver, memory_budget=memory_budget)  # noqa: E731
        if repeats == 0:  # (one call, timed and its memory profiled together)
            start = time.perf_counter()
            row["projection_peak_bytes"] = cpu_peak_allocated_bytes(project)
            row["projection_s"] = time.perf_counter() - start
        else:
            row["projection_s"] = seconds(project, repeats)
            products["J v"] = 0
            row["projection_peak_bytes"] = cpu_peak_allocated_bytes(project)
        row["cholesky_certified"] = bool(verdicts) and all(verdicts)
        row["J_v_products"] = products["J v"]  # (of one call: 1 for a dense solve)
        if n * k <= count_max_rows:  # what an accelerator would dispatch: its choices, counted here
            with as_accelerator():
                row["projection_accelerator"] = asdict(cost(project))
        if n * k <= baseline_max_rows:
            threshold = tangent.CHOLESKY_MIN_ROWS
            tangent.CHOLESKY_MIN_ROWS = math.inf  # the eigendecomposition, as before
            try:
                row["projection_eigh_s"] = seconds(lambda: tangent_projection(model, x, v), repeats)
            finally:
                tangent.CHOLESKY_MIN_ROWS = threshold
    finally:
        tangent.certified_solve, tangent.Products.J_times = certify, J_times
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 2048, 4096])
    parser.add_argument("--outputs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline-max-rows", type=int, default=4096,
                        help="the eigendecomposition baseline up to this many rows (it grows like rows^3)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--memory-budget", type=int, default=None,
                        help="the projection's memory_budget in bytes: K and its factor fit past 8192 rows with "
                             "16 rows^2 bytes (16384 rows: 4 GiB)")
    parser.add_argument("--solver", default="auto", choices=["auto", "dense", "lsqr"])
    parser.add_argument("--model", default="mlp", choices=["mlp", "gpt2"])
    parser.add_argument("--count-max-rows", type=int, default=4096,
                        help="the accelerator's dispatched operations counted up to this many rows (one call more)")
    parser.add_argument("--json-suffix", default="", help="appended to the results file's name")
    args = parser.parse_args()
    if args.model == "gpt2" and args.outputs != 1:
        parser.error("the GPT-2 case has one output per sample")
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, results = [], []
    for n in args.sizes:
        r = case(n, args.outputs, args.repeats, args.baseline_max_rows, args.memory_budget, args.solver, args.model,
                 args.count_max_rows)
        accelerator = r.get("projection_accelerator")
        results.append(r)
        eigh = r.get("projection_eigh_s")
        rows.append([n, r["rows"], f"{r['step_s'] * 1e3:.0f}", f"{r['reg_s'] / r['step_s']:.2f}x",
                     f"{r['grad_reg_s'] / r['step_s']:.2f}x", f"{r['projection_s']:.2f}",
                     f"{r['projection_s'] / r['step_s']:.1f}x",
                     "-" if eigh is None else f"{eigh:.2f}", "-" if eigh is None else f"{eigh / r['step_s']:.1f}x",
                     f"{r['projection_peak_bytes'] / 2**20:.0f}", "yes" if r["cholesky_certified"] else "no",
                     r["J_v_products"], "-" if accelerator is None else accelerator["operations"]])
        print_table(["n", "rows", "step ms", "reg", "grad reg", "proj s", "proj", "eigh s", "eigh", "proj MiB",
                     "cholesky", "J v", "accel. ops"], rows)
        print(flush=True)
    suffix = ("" if args.model == "mlp" else f"_{args.model}") + ("" if args.outputs == 1 else f"_k{args.outputs}")
    suffix += args.json_suffix
    model = f"MLP 784-512-512-{args.outputs}" if args.model == "mlp" else "GPT-2 2x128, 64 positions, scalar"
    path = write_json(f"projection_scaling{suffix}_cpu",
                      {"environment": environment(torch.device("cpu")), "model": model,
                       "dtype": "float32", "results": results})
    print("wrote", path)


if __name__ == "__main__":
    main()
