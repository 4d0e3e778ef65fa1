"""Label-noise training under torch.distributed (DDP or FSDP2), with the probe and TensorBoard monitor.

    torchrun --standalone --nproc_per_node 2 examples/ddp_training.py [--steps 600] [--out runs/ddp]
    torchrun --standalone --nproc_per_node 2 examples/ddp_training.py --resume   # continue a run
    torchrun --standalone --nproc_per_node 2 examples/ddp_training.py --fsdp [--resume]

gloo on CPU, nccl when CUDA is present (one GPU per rank). A small MLP learns a teacher network's
outputs; every rank draws its own label noise (the stream mixes in the rank: seed, rank, step
and micro-batch decide every draw), DistributedSampler splits the data, the probe runs on each
rank's shard of a probe set and reports on their union, and only rank 0 writes TensorBoard
events and checkpoints. Resuming on the same world size continues the same noise streams.

With ``--fsdp`` every layer and the model are sharded by ``fully_shard`` (FSDP2): the probe
measures the sharded model as it is (a replica gathered from the shards at each probe), and
checkpoints are torch.distributed.checkpoint directories every rank writes its shards to
(``get_state_dict`` carries the noise stream), with ``OUT/latest`` naming the last complete one.
"""

import argparse
import os
import shutil
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler, TensorDataset

from common import add_threads_argument, start_run
from noisy_label_sgd import LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor

p = add_threads_argument(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
p.add_argument("--steps", type=int, default=600)
p.add_argument("--lr", type=float, default=0.02)
p.add_argument("--noise-std", type=float, default=0.5)
p.add_argument("--batch-size", type=int, default=32, help="per rank")
p.add_argument("--every", type=int, default=100, help="probe/log every N steps")
p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--out", default=os.path.join("runs", "ddp"))
p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt (--fsdp: OUT/latest)")
p.add_argument("--fsdp", action="store_true", help="shard the model with FSDP2 (fully_shard) instead of DDP")
args = p.parse_args()

use_cuda = torch.cuda.is_available()
dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=120))
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if use_cuda else "cpu")
checkpoint = os.path.join(args.out, "checkpoint.pt")
start_run(args, device)  # (--threads: per rank)


def seeded_mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(10, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


g = torch.Generator().manual_seed(args.seed)
x = torch.randn(512, 10, generator=g)
with torch.no_grad():
    y = seeded_mlp(args.seed + 1000)(x)
data = TensorDataset(x, y)
sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)


def build_model() -> nn.Module:
    model = seeded_mlp(args.seed).to(device)  # the same initialisation on every rank
    if not args.fsdp:
        return DDP(model)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def save(step: int) -> None:
    """A checkpoint after ``step`` steps; a kill inside it leaves the previous one whole."""
    if args.fsdp:  # every rank writes its shards, then rank 0 points ``latest`` at the finished directory
        model_state, optim_state = get_state_dict(model, opt)
        directory = os.path.join(args.out, f"dcp-{step}")
        dcp.save({"model": model_state, "optim": optim_state, "step": step}, checkpoint_id=directory)
        dist.barrier()
        if rank == 0:
            previous = checkpoint_directory() if os.path.exists(latest) else None
            with open(f"{latest}.partial", "w") as f:
                f.write(os.path.basename(directory))
            os.replace(f"{latest}.partial", latest)
            if previous not in (None, directory):
                shutil.rmtree(previous)  # (only once ``latest`` names the new one)
    elif rank == 0:
        partial = f"{checkpoint}.partial"
        torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "step": step}, partial)
        os.replace(partial, checkpoint)


def checkpoint_directory() -> str:
    with open(latest) as f:
        return os.path.join(args.out, f.read().strip())


def load() -> int:
    """The step the last checkpoint was saved at, its model and optimizer state loaded."""
    if args.fsdp:
        directory = checkpoint_directory()
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": 0}
        dcp.load(state, checkpoint_id=directory)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        return state["step"]
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])  # the noise stream position travels with it
    return state["step"]


latest = os.path.join(args.out, "latest")
model = build_model()
opt = LabelNoiseSGD(model.parameters(), lr=args.lr, momentum=0.9, noise_std=args.noise_std, seed=args.seed)
start = 0
if args.resume:
    start = load()
    if start >= args.steps:
        if rank == 0:
            print(f"{latest if args.fsdp else checkpoint} is at step {start}: nothing left to run "
                  f"(pass --steps above {start} to go on)")
        dist.destroy_process_group()
        sys.exit(0)
loss_fn = opt.noisy_loss(nn.MSELoss())

shard = torch.arange(rank, 64, world)  # each rank holds its part of a 64-point probe set
probe = RegularizerProbe(model, x[shard].to(device), y[shard].to(device))
monitor = TensorBoardMonitor(probe, log_dir=args.out, every=args.every, batch_size=args.batch_size * world,
                             progress=True, total_steps=args.steps - start)
monitor.attach(opt)

for step in range(start, args.steps):
    sampler.set_epoch(step)  # a step's batch depends only on the step: resumable
    idx = list(sampler)[: args.batch_size]
    xb, yb = x[idx].to(device), y[idx].to(device)
    opt.zero_grad()
    loss_fn(model(xb), yb).backward()
    opt.step()
    if (step + 1) % args.save_every == 0:
        save(step + 1)
        dist.barrier()

report = monitor.log()  # a collective: every rank takes part
monitor.close()
if rank == 0:
    print(f"{world} ranks ({'FSDP2' if args.fsdp else 'DDP'}), {args.steps} steps: reg {report.reg:.4g}, manifold grad {report.manifold_grad_norm:.3g}, "
          f"clean probe loss {report.loss:.3g}")
    print(f"logs: tensorboard --logdir {args.out}; checkpoint: {latest if args.fsdp else checkpoint}")
dist.barrier()  # no rank leaves while another is still in a collective
dist.destroy_process_group()
# Everything is saved and printed: leave at once. An ordinary interpreter exit sometimes aborts
# a rank ("terminate called without an active exception") while gloo's and DDP's threads are
# torn down, which would turn a finished run into a failed one.
sys.stdout.flush()
os._exit(0)
