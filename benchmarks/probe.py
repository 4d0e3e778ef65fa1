"""Time and peak memory of the probe's parts against a naive per-sample loop and a training step.

    python benchmarks/probe.py [--cases mlp,mlp10,cnn,transformer,relu1d] [--repeats 5] [--device cpu]

Every (case, method) runs in its own subprocess so that its peak memory is its own, measured
over the first call, from a fresh model (no gradients held yet): on CUDA
torch.cuda.max_memory_allocated above the memory before; on CPU the CPU allocator's peak above
what it held before (profiler memory events; not for the slow naive loops), and, cruder, the
growth of peak RSS. Then one more subprocess per case times every method that ran, call by call
in turn with a training step: "vs train step" is the ratio of medians taken in the same process
and moments, so a row's methods compare with each other as well as with the step (on a shared
machine the speed of a process varies by tens of percent). The slow ones (the naive loop, vmap
of the 10-output MLP) are timed once each in their own process, in turn with a step. With
``--one-process`` (the default on CUDA, where every process start costs seconds of a short
lease) a case's methods all run in one process, the peak memory still around each first call
(no RSS growth), a failing method recorded and skipped. The JSON is written after every case,
so a run cut off keeps what it measured.
Methods:
  train_step    forward + backward + SGD step on the batch (the baseline);
  naive_reg     reg by a per-sample, per-output loop of torch.autograd.grad;
  vmap_reg      torch.func vmap(jacrev) per-sample Jacobians (per_sample_sq_grad_norms, method="vmap");
  reg           per_sample_sq_grad_norms, method="auto" (the norm-only fast path where it applies);
  reg_grad      regularizer_grad, method="auto";
  projection    tangent_projection of a random vector, solver and method "auto";
  penalty_step  a training step on MSE + 0.1 implicit_regularizer(model, x, create_graph=True)
                (the explicit-regularizer mode; reg of the training batch);
  penalty_probe_step  the same with reg of a probe batch: the batch's first quarter;
  opacus_reg    Opacus ghost-clipping per-sample norms (scalar outputs; optional extra);
  backpack_reg  BackPACK BatchL2Grad (scalar outputs; optional extra).
Every reg figure is checked against the naive loop (relative difference printed).
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_peak_allocated_bytes, environment, interleaved_median_seconds, print_table, sync, write_json  # noqa: E402
from noisy_label_sgd import implicit_regularizer, per_sample_sq_grad_norms, regularizer_grad, tangent_projection  # noqa: E402

METHODS = ["train_step", "naive_reg", "vmap_reg", "reg", "reg_grad", "projection", "penalty_step", "penalty_probe_step",
           "opacus_reg", "backpack_reg"]


class SumOutputs(nn.Module):
    """Scalar output = the sum of a network's outputs (one h per sample)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).sum(-1)


class PooledTransformer(nn.Module):
    def __init__(self, d=64, layers=2):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, 1)

    def forward(self, x):
        return self.head(self.encoder(x).mean(1)).squeeze(-1)


class ReLU1D(nn.Module):
    """The paper's 1-D two-layer ReLU net (sum_i c_i ReLU(a_i x + b_i) + a x + b) from nn.Linear."""

    def __init__(self, width=1000):
        super().__init__()
        self.hidden, self.out, self.skip = nn.Linear(1, width), nn.Linear(width, 1, bias=False), nn.Linear(1, 1)

    def forward(self, x):
        return (self.out(torch.relu(self.hidden(x))) + self.skip(x)).squeeze(-1)


def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, 10),
    )


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm, in-place ReLU and an in-place residual add."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(8, cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(8, cout))

    def forward(self, x):
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        out += self.shortcut(x)
        return self.relu(out)


def resnet18_gn():
    """ResNet-18 for 3x32x32 inputs (CIFAR stem), GroupNorm instead of BatchNorm, 10 outputs."""
    layers, cin = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(8, 64), nn.ReLU(inplace=True)], 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


class LanguageModelScore(nn.Module):
    """A Hugging Face causal language model built from a config (no weights downloaded; token
    embedding tied to the output head), scalar output: the logsumexp of the last position's
    logits (the head applied at that position only)."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(input_ids=ids, logits_to_keep=1).logits[:, -1].logsumexp(-1)


def gpt2_4x256():
    import transformers

    config = transformers.GPT2Config(n_embd=256, n_layer=4, n_head=4, n_positions=64, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)  # GPT-2's vocabulary, 50257
    return LanguageModelScore(transformers.GPT2LMHeadModel(config))


def llama_4x256():
    import transformers

    config = transformers.LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LanguageModelScore(transformers.LlamaForCausalLM(config))  # vocabulary 32000


class PooledHidden(nn.Module):
    """A Hugging Face vision model built from a config, scalar output: the mean of its last hidden state."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).last_hidden_state.flatten(1).mean(1)


def vit_4x128():
    import transformers

    config = transformers.ViTConfig(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                                    image_size=32, patch_size=4, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0)  # 64 patches and a class token
    return PooledHidden(transformers.ViTModel(config, add_pooling_layer=False))


def convnext_4stage():
    import transformers

    config = transformers.ConvNextConfig(hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 2, 1], image_size=32)
    return PooledHidden(transformers.ConvNextModel(config))


def t5_encoder_4x256():
    import transformers

    config = transformers.T5Config(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_heads=4, dropout_rate=0.0,
                                   vocab_size=32128)  # its relative position bias: one table, shared by the layers
    return PooledHidden(transformers.T5EncoderModel(config))


class LinearScore(nn.Module):
    """A Hugging Face vision model, scalar output: a linear head on its last hidden state's mean over
    tokens (the mean over everything of a LayerNorm's output is zero to rounding, no score)."""

    def __init__(self, model, width):
        super().__init__()
        self.model = model
        self.head = nn.Linear(width, 1)

    def forward(self, x):
        return self.head(self.model(x).last_hidden_state.mean(1)).squeeze(1)


def swin_3stage():
    import transformers

    config = transformers.SwinConfig(image_size=32, patch_size=2, embed_dim=32, depths=[2, 2, 2], num_heads=[2, 4, 8],
                                     window_size=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return LinearScore(transformers.SwinModel(config, add_pooling_layer=False), 128)  # 16x16 patches, windows of 4x4


def token_ids(vocabulary):
    return lambda shape, generator: torch.randint(0, vocabulary, shape, generator=generator)


CASES = {
    "mlp": ("MLP 784-512-512-10, scalar, batch 256", lambda: SumOutputs(mlp()), (256, 784)),
    "mlp_4096": ("MLP 784-512-512-10, scalar, batch 4096", lambda: SumOutputs(mlp()), (4096, 784)),
    "mlp_b8": ("MLP 784-512-512-10, scalar, batch 8 (the host dominates)", lambda: SumOutputs(mlp()), (8, 784)),
    "resnet18": ("ResNet-18 (GroupNorm) 3x32x32, scalar, batch 128", lambda: SumOutputs(resnet18_gn()), (128, 3, 32, 32)),
    "transformer4": ("TransformerEncoder 4x(d=256), seq 128, scalar, batch 32",
                     lambda: PooledTransformer(256, 4), (32, 128, 256)),
    "mlp10": ("MLP 784-512-512-10, 10 outputs, batch 256", mlp, (256, 784)),
    "cnn": ("CNN 3x32x32 (3 conv + linear), scalar, batch 128", lambda: SumOutputs(cnn()), (128, 3, 32, 32)),
    "transformer": ("Transformer 2x(d=64), seq 32, scalar, batch 32", PooledTransformer, (32, 32, 64)),
    "relu1d": ("1-D two-layer ReLU, width 1000, n = 12", ReLU1D, (12, 1)),
    "gpt2": ("GPT-2 4x(d=256), tied head, seq 64, scalar, batch 16", gpt2_4x256, ((16, 64), token_ids(50257))),
    "llama": ("Llama 4x(d=256), GQA, tied head, seq 64, scalar, batch 16", llama_4x256, ((16, 64), token_ids(32000))),
    "vit": ("ViT 4x(d=128) (Hugging Face), 3x32x32 in 64 patches, scalar, batch 32", vit_4x128, (32, 3, 32, 32)),
    "convnext": ("ConvNeXt 4 stages 32-256 (Hugging Face), 3x32x32, scalar, batch 32", convnext_4stage,
                 (32, 3, 32, 32)),
    "swin": ("Swin 3 stages 32-128 (Hugging Face), 3x32x32 in 4x4 windows, scalar, batch 32", swin_3stage,
             (32, 3, 32, 32)),
    "t5": ("T5 encoder 4x(d=256) (Hugging Face), seq 64, scalar, batch 16", t5_encoder_4x256,
           ((16, 64), token_ids(32128))),
}


def case_input(shape, generator: torch.Generator) -> torch.Tensor:
    """A case's probe batch: standard normal of ``shape``, or (shape, draw) for other inputs."""
    if isinstance(shape[0], tuple):
        shape, draw = shape
        return draw(shape, generator)
    return torch.randn(shape, generator=generator)


def naive_reg(model, x):
    params = [p for p in model.parameters() if p.requires_grad]
    total = 0.0
    for i in range(x.shape[0]):
        out = model(x[i : i + 1]).reshape(-1)
        for j in range(out.numel()):
            grads = torch.autograd.grad(out[j], params, retain_graph=j + 1 < out.numel())
            total += sum(float(g.pow(2).sum()) for g in grads)
    return total / x.shape[0]


def opacus_reg(model, x):
    import warnings

    from opacus.grad_sample import GradSampleModuleFastGradientClipping

    warnings.simplefilter("ignore")
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="sum",
                                               use_ghost_clipping=True)

    def run():
        gsm.zero_grad()
        gsm(x).sum().backward()
        return gsm.get_norm_sample().pow(2)

    return run


def backpack_reg(model, x):
    from backpack import backpack, extend
    from backpack.extensions import BatchL2Grad

    model = extend(model)

    def run():
        model.zero_grad()
        with backpack(BatchL2Grad()):
            model(x).sum().backward()
        return sum(p.batch_l2 for p in model.parameters())

    return run


def method_run(case: str, method: str, device: torch.device, autocast: str):
    """A fresh model of the case and a call of the method on it."""
    _, build, shape = CASES[case]
    if method == "opacus_reg" or method == "backpack_reg":
        __import__("opacus" if method == "opacus_reg" else "backpack")  # optional extras
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().to(device)
    x = case_input(shape, torch.Generator().manual_seed(1)).to(device)
    if method in ("train_step", "penalty_step", "penalty_probe_step"):
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)
        model.train()
        y = torch.zeros_like(model(x))
        penalty = 0.0 if method == "train_step" else 0.1
        probe = x[: len(x) // 4] if method == "penalty_probe_step" else x

        def run():
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if penalty:
                loss = loss + penalty * implicit_regularizer(model, probe, create_graph=True)
            loss.backward()
            opt.step()
    elif method == "naive_reg":
        model.eval()
        run = lambda: naive_reg(model, x)
    elif method == "vmap_reg":
        run = lambda: per_sample_sq_grad_norms(model, x, method="vmap")
    elif method == "reg":
        run = lambda: per_sample_sq_grad_norms(model, x)
    elif method in ("opacus_reg", "backpack_reg"):
        if case == "mlp10":
            raise SystemExit("scalar outputs only")
        run = (opacus_reg if method == "opacus_reg" else backpack_reg)(model, x)
    elif method == "reg_grad":
        run = lambda: regularizer_grad(model, x)
    elif method == "projection":
        g = torch.Generator().manual_seed(2)
        v = {n: torch.randn(p.shape, generator=g).to(device) for n, p in model.named_parameters()}
        run = lambda: tangent_projection(model, x, v)
    else:
        raise ValueError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")
    if autocast == "bf16":  # mixed precision as users train with it; fp32 parameters
        plain_run = run

        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return plain_run()

    return run


def is_slow(case: str, method: str) -> bool:
    return method == "naive_reg" or (method == "vmap_reg" and case == "mlp10")


def worker(case: str, method: str, device: torch.device, autocast: str, own_process: bool = True) -> dict:
    """Peak memory of the method's first call from a fresh model, its reg value, and for a slow
    method its time (one call, then one training step). The growth of peak RSS only in a process
    of its own (``own_process``; RSS peaks never fall)."""
    run = method_run(case, method, device, autocast)
    slow = is_slow(case, method)
    # peak memory over the first call, from a fresh model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    allocated = None
    if device.type == "cpu" and not slow:
        allocated = cpu_peak_allocated_bytes(run) / 2**20
    else:
        run()
        sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    result = {"peak_mb": peak / 2**20 if device.type == "cuda" else allocated,
              "rss_growth_mb": None if device.type == "cuda" or not own_process else peak / 2**20}
    if slow:
        step = method_run(case, "train_step", device, autocast)
        step()
        result["seconds"], result["step_seconds"] = interleaved_median_seconds([run, step], device, repeats=1)
    if method.endswith("reg"):
        value = run()
        result["reg"] = float(value.mean()) if isinstance(value, torch.Tensor) else value
    return result


def timing_worker(case: str, methods: list[str], repeats: int, device: torch.device, autocast: str) -> dict:
    """Median seconds of each method and of a training step, called in turn ``repeats`` times
    after one warm-up call each."""
    runs = [method_run(case, m, device, autocast) for m in ["train_step", *methods]]
    for run in runs:
        run()
    seconds = interleaved_median_seconds(runs, device, repeats)
    return dict(zip(["train_step", *methods], seconds))


def one_process_case(case: str, methods: list[str], repeats: int, device: torch.device, autocast: str) -> dict:
    """Every method of a case in this process, as :func:`worker` and :func:`timing_worker` do in
    processes of their own (on a GPU lease each process's start-up cost about 9 s on the H200):
    peak memory around each first call (CUDA: from ``reset_peak_memory_stats``), then all timed
    in turn with a training step. A method that fails (out of memory, a peer that cannot run
    the model) is recorded and the others go on."""
    by_method = {}
    for method in methods:
        try:
            by_method[method] = worker(case, method, device, autocast, own_process=False)
        except Exception as error:
            by_method[method] = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    timed = [m for m in methods if "error" not in by_method[m] and not is_slow(case, m) and m != "train_step"]
    try:
        seconds = timing_worker(case, timed, repeats, device, autocast)
    except Exception as error:
        seconds = {"error": f"{type(error).__name__}: {error}".splitlines()[0][:200]}
    for method in ["train_step", *timed]:
        if method not in by_method or "error" in by_method[method]:
            continue
        if "error" in seconds:
            by_method[method] = {"error": f"timing: {seconds['error']}"}
        else:
            by_method[method].update(seconds=seconds[method], step_seconds=seconds["train_step"])
    return by_method


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="mlp,mlp10,cnn,transformer,relu1d",
                   help=f"comma-separated, from {', '.join(CASES)}")
    p.add_argument("--autocast", choices=("none", "bf16"), default="none")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--name", help="results file name (default probe_<device>, _bf16 under autocast)")
    p.add_argument("--json", help="results file path (instead of benchmarks/results/<name>.json)")
    p.add_argument("--one-process", action=argparse.BooleanOptionalAction, default=None,
                   help="every method of a case in this process (default on CUDA: a short GPU lease); "
                        "else one process per (case, method) for its own peak memory")
    p.add_argument("--worker", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--timing-worker", metavar="CASE", help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    # fp32 as in the GPU table: no TF32 in matmuls or cuDNN convolutions (bf16 autocast
    # is the separate --autocast run)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if args.worker:
        print(json.dumps(worker(*args.worker, device, args.autocast)))
        return
    if args.timing_worker:
        methods = [m for m in args.methods.split(",") if m != "train_step"]
        print(json.dumps(timing_worker(args.timing_worker, methods, args.repeats, device, args.autocast)))
        return

    from tqdm import tqdm

    cases, methods = args.cases.split(","), args.methods.split(",")
    one_process = device.type == "cuda" if args.one_process is None else args.one_process
    results = {}
    env = environment(device)
    suffix = "" if args.autocast == "none" else f"_{args.autocast}"
    name = args.name or f"probe_{device.type}{suffix}"

    def save() -> str:  # after every case: a run cut off keeps what it measured
        payload = {"environment": env, "autocast": args.autocast, "one_process": one_process, "results": results}
        if args.json:
            with open(args.json, "w") as f:
                json.dump(payload, f, indent=2)
            return args.json
        return write_json(name, payload)

    def subprocess_json(*worker_args: str) -> dict:
        cmd = [sys.executable, __file__, *worker_args, "--repeats", str(args.repeats), "--device", args.device,
               "--autocast", args.autocast]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            return {"error": (out.stderr.strip() or "failed").splitlines()[-1]}
        return json.loads(out.stdout.strip().splitlines()[-1])

    with tqdm(total=len(cases) * (len(methods) + 1), desc="probe benchmark", unit="run") as bar:
        for case in cases:
            if one_process:
                results[case] = one_process_case(case, methods, args.repeats, device, args.autocast)
                bar.update(len(methods) + 1)
                save()
                continue
            by_method = results.setdefault(case, {})
            for method in methods:
                by_method[method] = subprocess_json("--worker", case, method)
                bar.update()
            timed = [m for m in methods if "error" not in by_method[m] and not is_slow(case, m)]
            seconds = subprocess_json("--timing-worker", case, "--methods", ",".join(timed)) if timed else {}
            bar.update()
            for method in timed:
                if "error" in seconds:
                    by_method[method] = {"error": f"timing: {seconds['error']}"}
                else:
                    by_method[method].update(seconds=seconds[method], step_seconds=seconds["train_step"])
            save()

    rows = []
    for case, by_method in results.items():
        naive = by_method.get("naive_reg", {}).get("reg")
        for method, r in by_method.items():
            if "error" in r:
                rows.append([CASES[case][0], method, "error", "", "", "", r["error"][:60]])
                continue
            ratio = f"{r['seconds'] / r['step_seconds']:.2f}x"
            agree = ""
            if method.endswith("reg") and method != "naive_reg" and naive:
                agree = f"rel diff {abs(r['reg'] - naive) / abs(naive):.1e}"
            peak = f"{r['peak_mb']:.1f}" if r["peak_mb"] is not None else "-"
            rss = f"{r['rss_growth_mb']:.0f}" if r.get("rss_growth_mb") is not None else "-"
            rows.append([CASES[case][0], method, f"{1e3 * r['seconds']:.1f}", ratio, peak, rss, agree])
    print(f"# {env}")
    print_table(["case", "method", "ms", "vs train step", "peak MB", "RSS growth MB", "check vs naive"], rows)
    print("wrote", save())


if __name__ == "__main__":
    main()
