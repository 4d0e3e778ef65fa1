"""The README's measured numbers, rendered from the examples' summary.json: they cannot go stale.

    .venv/bin/python tools/readme_numbers.py --check                  # README == render(stored)
    .venv/bin/python tools/readme_numbers.py --write --summaries runs # after `make demo` and the rest

Every block of numbers in README.md sits between ``<!-- numbers: NAME -->`` and
``<!-- end numbers: NAME -->``; this script renders each block from ``SUMMARIES/<example>/summary.json``
(default: the stored copies in ``examples/results/``). ``--write`` rewrites the blocks and, when
the summaries come from elsewhere (``runs/``), stores them in ``examples/results/`` so that the
README and the stored summaries always agree. ``--check`` exits 1 and prints the stale blocks.
The tests run ``--check``, render fresh ``--quick`` summaries, and compare the deterministic
default runs they repeat against the stored ones.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
STORED = os.path.join(ROOT, "examples", "results")
BLOCK = re.compile(r"(<!-- numbers: (?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- end numbers: (?P=name) -->)", re.S)

Summaries = dict[str, dict]


def load(directory: str, names: tuple[str, ...]) -> Summaries:
    return {name: json.load(open(os.path.join(directory, name, "summary.json"))) for name in names}


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def condition(machine: dict) -> str:
    """The machine and how busy it was: a time means nothing without them."""
    load = machine["load_average_1_5_15_min"]["start"][0]
    return (f"{machine['device_name']}, {machine['cpu_count']} cores, {counted(machine['torch_threads'], 'torch thread')}, "
            f"load average {load:.1f} at the start, torch {machine['torch']}")


def percent(value: float) -> str:
    return f"{100 * value:.2f}%"


def counted(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def short(value: float) -> str:
    """Two significant digits, without an exponent for what a person reads as a plain number."""
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.2g}"


def span(values: list[float], fmt: str | Callable[[float], str]) -> str:
    """'low-high', or one number where both read the same."""
    show = fmt if callable(fmt) else (lambda value: format(value, fmt))
    low, high = show(min(values)), show(max(values))
    return low if low == high else f"{low}-{high}"


def paper_table(s: Summaries) -> str:
    ms, relu, sig = s["matrix_sensing"], s["relu_1d"], s["sigmoid_single_point"]
    c = ms["config"]
    rows = ["| example | setting (CPU default) | without noise | with noise | wall time |", "|---|---|---|---|---|"]
    w, n = ms["without_noise"], ms["with_noise"]
    rows.append(
        f"| `matrix_sensing.py` | d={c['d']}, r={c['r']}, n={c['n']}, full batch, lr {c['lr']:g}, std {c['noise_std']:g} "
        f"annealed over the last {c['anneal']:.0%}, {c['steps']} steps | train loss {w['train_loss']:.2g}, test error "
        f"{w['test_error']:.4g}, changed {percent(w['test_error_rel_change_last_quarter'])} over the last "
        f"{c['steps'] // 4} steps | train loss {n['train_loss']:.2g}, test error {n['test_error']:.2g} | "
        f"{minutes(ms['machine']['wall_seconds'])} |")
    c = relu["config"]
    cells = []
    for key in ("without_noise", "with_noise"):
        r = relu[key]
        lengths = ", ".join(f"{run['curve_length']:.3f}" for run in r["per_seed"])
        changes = span([run["convexity_changes"] for run in r["per_seed"]], "d")
        cells.append(f"median curve length {r['median_curve_length']:.3f} (seeds {lengths}), {changes} convexity "
                     f"changes, reg {span([run['reg'] for run in r['per_seed']], '.0f')}")
    shorter = 1 - relu["with_noise"]["median_curve_length"] / relu["without_noise"]["median_curve_length"]
    rows.append(
        f"| `relu_1d.py` | width {c['width']}, 12 points, full batch, lr {c['lr']:g} + momentum 0.9, std {c['noise_std']:g} "
        f"annealed over the last {c['anneal']:.0%}, {c['steps']} steps, {c['seeds']} seeds (the linear interpolation: "
        f"length {relu['data']['curve_length']:.3f}, {relu['data']['convexity_changes']} changes) | {cells[0]} | "
        f"{cells[1]}: {shorter:.1%} shorter | {minutes(relu['machine']['wall_seconds'])} |")
    c = sig["config"]
    cells = [f"{counted(sig[key]['active_units'], 'active unit')}, {counted(sig[key]['unit_types'], 'type')}, "
             f"reg {sig[key]['reg']:.3g}" for key in ("without_noise", "with_noise")]
    rows.append(
        f"| `sigmoid_single_point.py` | {c['activation']}, width {c['width']}, x in R^{c['dim']}, lr {c['lr']:g}, "
        f"std {c['noise_std']:g} annealed over 20%, {c['steps']} steps | {cells[0]} | {cells[1]} | "
        f"{minutes(sig['machine']['wall_seconds'])} |")
    total = sum(s[name]["machine"]["wall_seconds"] for name in ("matrix_sensing", "relu_1d", "sigmoid_single_point"))
    return ("\n".join(rows) + f"\n\n`make demo` (the three): {minutes(total)} on {condition(ms['machine'])}. "
            "On a busy machine pass `--threads 1` (torch's one thread per core then waits on the other work).\n")


def probe_costs(s: Summaries) -> str:
    parts = []
    for name, label in (("matrix_sensing", "matrix sensing"), ("relu_1d", "ReLU"), ("sigmoid_single_point", "tanh")):
        summary = s[name]
        runs = [summary[k] for k in ("without_noise", "with_noise")]
        if "per_seed" in runs[0]:
            runs = [run for r in runs for run in r["per_seed"]]
        probe = span([r["probe_ms_per_call"] for r in runs], short)
        step = span([100 * r["train_ms_per_step"] for r in runs], short)
        share = span([100 * r["probe_share_at_every_100"] for r in runs], short)
        parts.append(f"{label} {probe} ms against {step} ms ({share}%)")
    return (f"The probe's cost per call (median) against 100 training steps ({condition(s['matrix_sensing']['machine'])}): "
            + "; ".join(parts) + ".\n")


def beyond_times(s: Summaries) -> str:
    lines = [f"    .venv/bin/python examples/{name}.py{' ' * (22 - len(name))}# {minutes(s[name]['machine']['wall_seconds'])}"
             for name in ("sparse_quadratic", "flip_classification", "explicit_penalty")]
    return "\n".join(lines) + f"\n\n(times on {condition(s['sparse_quadratic']['machine'])})\n"


def sparse(s: Summaries) -> str:
    r = s["sparse_quadratic"]
    kinds = ("label_noise", "parameter_noise", "no_noise")
    error = {k: r[k]["test_error"] for k in kinds}
    ratio = min(error["parameter_noise"], error["no_noise"]) / error["label_noise"]
    return (f"Measured (seed {r['config']['seed']}): test error ||w - w*|| / ||w*|| {error['label_noise']:.2g} with "
            f"label noise, {error['parameter_noise']:.3g} with parameter noise, {error['no_noise']:.3g} without noise "
            f"({ratio:.0f}x smaller than the better of the two); train loss "
            + ", ".join(f"{r[k]['train_loss']:.2g}" for k in kinds) + "; weight mass outside the true support "
            + ", ".join(f"{r[k]['mass_off_support']:.1%}" for k in kinds) + ".\n")


def flips(s: Summaries) -> str:
    r = s["flip_classification"]
    w, f = r["without_flips"], r["with_flips"]
    test_size = r["config"]["test_size"]
    images = round(abs(f["test_accuracy"] - w["test_accuracy"]) * test_size)
    return (f"Measured (seed {r['config']['seed']}): clean training accuracy {w['train_accuracy']:.2%} without flips, "
            f"{f['train_accuracy']:.2%} with; reg of the logits on {r['config']['probe_size']} probe images {f['reg']:,.1f} with flips against "
            f"{w['reg']:,.0f} without (the probe's `{f['probe_method']}` path; its cross-entropy on the probe's "
            f"class labels {f['probe_loss']:.2g} and {w['probe_loss']:.2g}); the largest eigenvalue of the "
            f"Gauss-Newton matrix J^T J / n of the logits {f['gauss_newton_top_eigenvalue']:.4g} against "
            f"{w['gauss_newton_top_eigenvalue']:,.0f}; test accuracy {f['test_accuracy']:.2%} against "
            f"{w['test_accuracy']:.2%} ({counted(images, 'image')} of {test_size}, one seed: not evidence of better generalisation). "
            f"**The sharpness of the clean training loss (its Hessian's largest eigenvalue) is not lower with flips: "
            f"{f['sharpness']:.4g} against {w['sharpness']:.2g}**, clean training loss {f['clean_train_loss']:.2g} "
            f"with flips and {w['clean_train_loss']:.2g} without.\n")


BLOCKS: dict[str, tuple[tuple[str, ...], Callable[[Summaries], str]]] = {
    "paper_table": (("matrix_sensing", "relu_1d", "sigmoid_single_point"), paper_table),
    "probe_costs": (("matrix_sensing", "relu_1d", "sigmoid_single_point"), probe_costs),
    "beyond_times": (("sparse_quadratic", "flip_classification", "explicit_penalty"), beyond_times),
    "sparse_quadratic": (("sparse_quadratic",), sparse),
    "flip_classification": (("flip_classification",), flips),
}
EXAMPLES = tuple(sorted({name for names, _ in BLOCKS.values() for name in names}))


def render_block(name: str, directory: str) -> str:
    names, render = BLOCKS[name]
    return render(load(directory, names))


def stale_blocks(readme: str, directory: str) -> tuple[str, list[str]]:
    """``readme`` with every numbers block rendered from the summaries in ``directory``, and the
    names of the blocks that changed."""
    found = {m.group("name"): m.group("body") for m in BLOCK.finditer(readme)}
    if sorted(found) != sorted(BLOCKS):
        raise ValueError(f"README blocks {sorted(found)} are not the blocks this script renders {sorted(BLOCKS)}")
    bodies = {name: render_block(name, directory) for name in BLOCKS}
    rendered = BLOCK.sub(lambda m: m.group(1) + bodies[m.group("name")] + m.group(4), readme)
    return rendered, [name for name in BLOCKS if bodies[name] != found[name]]


def render(readme: str, directory: str) -> str:
    """``readme`` with every numbers block rendered from the summaries in ``directory``."""
    return stale_blocks(readme, directory)[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = p.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="exit 1 if a block differs from its rendering")
    action.add_argument("--write", action="store_true", help="rewrite the blocks (and store the summaries)")
    p.add_argument("--summaries", default=STORED, help="a directory of <example>/summary.json (default: the stored)")
    p.add_argument("--readme", default=README)
    args = p.parse_args(argv)
    readme = open(args.readme).read()
    rendered, stale = stale_blocks(readme, args.summaries)
    if args.check:
        if stale:
            print(f"stale README blocks: {', '.join(stale)} (run tools/readme_numbers.py --write)")
            return 1
        print(f"README numbers match {args.summaries}")
        return 0
    if os.path.abspath(args.summaries) != os.path.abspath(STORED):
        for name in EXAMPLES:
            os.makedirs(os.path.join(STORED, name), exist_ok=True)
            shutil.copyfile(os.path.join(args.summaries, name, "summary.json"), os.path.join(STORED, name, "summary.json"))
    with open(args.readme, "w") as f:
        f.write(rendered)
    print(f"README blocks rewritten from {args.summaries}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
