"""The fast engine's norms and grad reg on a device against torch.func's (vmap) in float64.

    python benchmarks/device_check.py [--device cuda] [--cases gn_cnn,gn_cnn_channels_last,...]

The written-out second derivatives (GroupNorm and LayerNorm, convolutions, Gram matrices) run
their own kernels on the device; this checks them there in seconds, on small models: a GroupNorm
CNN with strided convolutions (also channels-last), two ResNet basic blocks, a sequence-first
TransformerEncoderLayer, a 2-layer GPT-2 (if transformers is installed). Exits 1 when a relative
error exceeds 1e-8. benchmarks/gpu.sh runs it first; a CPU test runs it too.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch
from torch import nn
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, print_table, write_json  # noqa: E402
from probe import BasicBlock, LanguageModelScore, SumOutputs  # noqa: E402

TOLERANCE = 1e-8


class SequenceFirstEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, activation="gelu")
        self.head = nn.Linear(16, 1)

    def forward(self, x):  # [n, T, d] -> [T, n, d]: LayerNorm sees strided rows
        return self.head(self.layer(x.transpose(0, 1)).mean(0)).squeeze(-1)


def gn_cnn():
    return SumOutputs(nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.GroupNorm(2, 8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(4, 8), nn.Tanh(), nn.Flatten(),
                                    nn.Linear(8 * 4 * 4, 2)))


def tiny_gpt2():
    import transformers

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=8, vocab_size=50, bos_token_id=0,
                                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return LanguageModelScore(transformers.GPT2LMHeadModel(config))


def images(shape):
    return lambda g: torch.randn(shape, generator=g, dtype=torch.float64)


CASES = {  # model builder, input maker, memory format
    "gn_cnn": (gn_cnn, images((6, 3, 8, 8)), torch.contiguous_format),
    "gn_cnn_channels_last": (gn_cnn, images((6, 3, 8, 8)), torch.channels_last),
    "resnet_blocks": (lambda: SumOutputs(nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16, 1), nn.Flatten(),
                                                       nn.LazyLinear(1))), images((4, 8, 8, 8)),
                      torch.contiguous_format),
    "encoder_sequence_first": (SequenceFirstEncoder, images((4, 5, 16)), torch.contiguous_format),
    "gpt2_tiny": (tiny_gpt2, lambda g: torch.randint(0, 50, (4, 8), generator=g), torch.contiguous_format),
}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300))


def check(case: str, device: torch.device) -> dict:
    from noisy_label_sgd import per_sample_sq_grad_norms, regularizer_grad

    build, make_input, memory_format = CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().double()
    x = make_input(torch.Generator().manual_seed(1))
    model(x)  # (lazy layers take their shapes)
    model = model.to(device)
    x = x.to(device)
    if memory_format is torch.channels_last:
        model, x = model.to(memory_format=memory_format), x.to(memory_format=memory_format)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    fast, reference = (regularizer_grad(model, x, method=m) for m in ("fast", "vmap"))
    flat = lambda g: torch.cat([g[n].reshape(-1) for n in names])  # noqa: E731
    return {"norms": relative_error(per_sample_sq_grad_norms(model, x, method="fast"),
                                    per_sample_sq_grad_norms(model, x, method="vmap")),
            "grad_reg": relative_error(flat(fast), flat(reference))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("--json", help="write the results here (default: benchmarks/results/device_check_<device>.json)")
    args = p.parse_args()
    device = torch.device(args.device)
    cases = [c for c in args.cases.split(",") if c != "gpt2_tiny" or _has_transformers()]
    results = {case: check(case, device) for case in tqdm(cases, desc="device check", unit="case")}
    env = environment(device)
    print(f"# {env}; float64, the fast engine against torch.func (vmap)")
    print_table(["case", "norms rel. error", "grad reg rel. error"],
                [[c, f"{r['norms']:.1e}", f"{r['grad_reg']:.1e}"] for c, r in results.items()])
    payload = {"environment": env, "tolerance": TOLERANCE, "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    print("wrote", args.json or write_json(f"device_check_{device.type}", payload))
    failed = [c for c, r in results.items() if max(r.values()) > TOLERANCE]
    if failed:
        print("FAILED:", ", ".join(failed))
    return 1 if failed else 0


def _has_transformers() -> bool:
    return importlib.util.find_spec("transformers") is not None


if __name__ == "__main__":
    sys.exit(main())
