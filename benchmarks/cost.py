"""What a GPU pays for, counted on any device: dispatched operations, FLOPs, host syncs.

    python benchmarks/cost.py [--cases mlp,mlp_b8,mlp10,cnn,resnet18,transformer4,vit] [--device cpu] [--autocast bf16]
    for c in mlp mlp_b8 mlp10 cnn resnet18 transformer4 transformer relu1d gpt2 llama vit convnext t5 swin; do
        python benchmarks/cost.py --cases $c; done   # one case a process

The cases run replace their rows of the stored table (results/cost_<device>*.json); the others stay.

On a GPU the host is the bottleneck when a call dispatches thousands of small operations, and a
device-to-host sync stalls the queue. Both are deterministic and can be counted on a CPU:

* operations: every ATen operation the call dispatches (a counting ``TorchDispatchMode``);
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode``, with ``aten.convolution_backward``
  counted as 2 N prod(weight shape) prod(output spatial) per gradient asked for (its own formula
  overcounts grouped convolutions: 84.9 MFLOP for 18.9 MFLOP of work at groups=8);
  and the CPU's fused attention (``aten._scaled_dot_product_flash_attention_for_cpu`` and its
  backward) by the formula of the GPU's fused kernels (the counter has none for it, so a
  training step's attention counted as 0 FLOPs on the CPU);
* host syncs: ``aten._local_scalar_dense`` calls (``.item()``, ``bool(t)``, ``float(t)``...).

Every figure is a ratio to the same case's training step (forward, MSE backward, SGD step), the
second call of each (the first may size and cache). The functions are imported by the tests,
which assert the targets that hold, so CI catches a regression.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, write_json  # noqa: E402

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    operations: int
    flops: int
    syncs: int


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.operations = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.operations += 1
        if func is aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask, out_shape=None, **kwargs) -> int:
    """Each of grad_input and grad_weight costs the forward's 2 N prod(w) prod(out spatial), for
    any groups (w is [out, in / groups, *kernel]); transposed: the roles of input and output
    spatial sizes swap."""
    spatial = x_shape[2:] if transposed else grad_out_shape[2:]
    forward = 2 * grad_out_shape[0] * _prod(w_shape) * _prod(spatial)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


# FLOP formulas the counter lacks or gets wrong
FLOP_FORMULAS = {
    aten.convolution_backward: _conv_backward_flops,
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def _prod(shape) -> int:
    total = 1
    for s in shape:
        total *= int(s)
    return total


def cost(fn: Callable[[], object]) -> Cost:
    """Operations, FLOPs and host syncs of one call of ``fn``."""
    flop_counter = FlopCounterMode(display=False, custom_mapping=FLOP_FORMULAS)
    with flop_counter, _Counter() as counter:
        fn()
    return Cost(counter.operations, flop_counter.get_total_flops(), counter.syncs)


def second_call_cost(fn: Callable[[], object]) -> Cost:
    """The cost of a call after one under the same counters (which add module hooks, and so
    nodes to the autograd graph: the fast engine certifies a graph it has not seen)."""
    cost(fn)
    return cost(fn)


def certifying_cost(fn: Callable[[], object]) -> Cost:
    """The cost of a call that certifies its closed forms (as the first call on a model and a
    graph does): the second call, with the certificates' verdicts forgotten."""
    from noisy_label_sgd.engines import certificate

    cost(fn)
    certificate._VERDICTS.clear()
    return cost(fn)


@contextmanager
def as_accelerator(enabled: bool = True, free_memory: int = 128 << 30) -> Iterator[None]:
    """The engines' choices for an accelerator (whole layers, not cache-sized pieces; a memory
    budget of a quarter of ``free_memory``, by default what an H200 has free beside a small
    model), made on whatever device runs: what a GPU would dispatch, counted on the CPU."""
    from noisy_label_sgd.engines import functional

    originals = functional.launch_bound, functional.available_memory
    if enabled:
        functional.launch_bound = lambda device: True
        functional.available_memory = lambda device: free_memory
    try:
        yield
    finally:
        functional.launch_bound, functional.available_memory = originals


# -- the cases: the benchmark's models, and a batch of 8 where the host dominates ----------------


def case_runs(case: str, device: torch.device, build_and_shape=None) -> dict[str, Callable[[], object]]:
    """The calls measured for a case: train_step, sgd_step, label_noise_step, reg, reg_grad,
    projection, each on a fresh copy of the case's model."""
    from probe import CASES, case_input

    from noisy_label_sgd import LabelNoiseSGD, per_sample_sq_grad_norms, regularizer_grad, tangent_projection

    if build_and_shape is None:
        build, shape = CASES[case][1:]
    else:
        build, shape = build_and_shape
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().to(device)
    x = case_input(shape, torch.Generator().manual_seed(1)).to(device)
    y = torch.zeros_like(model(x))
    g = torch.Generator().manual_seed(2)
    v = {n: torch.randn(p.shape, generator=g).to(device) for n, p in model.named_parameters()}

    def stepper(opt, loss_fn):
        def run():
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        return run

    sgd = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the model stays as built
    noisy = LabelNoiseSGD(model.parameters(), lr=0.0, noise_std=0.1)
    return {
        "train_step": stepper(sgd, nn.functional.mse_loss),
        "label_noise_step": stepper(noisy, noisy.noisy_loss(nn.MSELoss())),
        "reg": lambda: per_sample_sq_grad_norms(model, x),
        "reg_certifying": lambda: per_sample_sq_grad_norms(model, x),
        "reg_grad": lambda: regularizer_grad(model, x),
        "projection": lambda: tangent_projection(model, x, v),
    }


def case_costs(case: str, device: torch.device, methods=None, build_and_shape=None,
               accelerator: bool = True, autocast: torch.dtype | None = None) -> dict[str, Cost]:
    """Each call's cost, with the accelerator's choices by default (see :func:`as_accelerator`),
    under autocast to ``autocast`` where given (the training step too: each ratio compares like
    with like)."""
    runs = case_runs(case, device, build_and_shape)

    def autocast_run(run):
        def call():
            with torch.autocast(device.type, dtype=autocast):
                run()
        return call

    with as_accelerator(accelerator):
        return {m: (certifying_cost if m.endswith("_certifying") else second_call_cost)(
                    autocast_run(run) if autocast else run)
                for m, run in runs.items() if methods is None or m in methods}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="mlp,mlp_b8,mlp10,cnn,resnet18,transformer4,transformer,relu1d,gpt2,llama,vit,convnext,t5,swin")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cpu-choices", action="store_true",
                   help="count the CPU's own choices (cache-sized pieces), not an accelerator's")
    p.add_argument("--autocast", choices=["none", "bf16"], default="none",
                   help="every call (the training step too) under autocast to bfloat16")
    args = p.parse_args()
    autocast = torch.bfloat16 if args.autocast == "bf16" else None
    device = torch.device(args.device)
    from tqdm import tqdm

    results, rows = {}, []
    for case in tqdm(args.cases.split(","), desc="cost", unit="case"):
        costs = case_costs(case, device, accelerator=not args.cpu_choices, autocast=autocast)
        results[case] = {m: asdict(c) for m, c in costs.items()}
        step = costs["train_step"]
        for method, c in costs.items():
            rows.append([case, method, c.operations, f"{c.operations / step.operations:.2f}x",
                         f"{c.flops / 1e6:.1f}", f"{c.flops / max(1, step.flops):.2f}x", c.syncs])
    env = environment(device)
    print(f"# {env}; the engines' choices for {'the CPU' if args.cpu_choices else 'an accelerator'}"
          + ("; bf16 autocast" if autocast else ""))
    print_table(["case", "call", "ops", "ops vs step", "MFLOP", "FLOPs vs step", "host syncs"], rows)
    name = f"cost_{device.type}" + ("_cpu_choices" if args.cpu_choices else "") + ("_bf16" if autocast else "")
    # the cases run replace theirs in the stored table, the others kept (a case can be rerun
    # alone: ResNet-18's projection holds most of this 24 GB machine, 22.9 GB resident at its peak)
    stored = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", f"{name}.json")
    if os.path.exists(stored):
        with open(stored) as f:
            results = {**json.load(f)["results"], **results}
    print("wrote", write_json(name, {"environment": env, "choices": "cpu" if args.cpu_choices else "accelerator",
                                     "autocast": args.autocast, "results": results}))


if __name__ == "__main__":
    main()
