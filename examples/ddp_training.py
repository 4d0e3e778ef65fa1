"""Label-noise training under torch.distributed (DDP), with the probe and TensorBoard monitor.

    torchrun --standalone --nproc_per_node 2 examples/ddp_training.py [--steps 600] [--out runs/ddp]
    torchrun --standalone --nproc_per_node 2 examples/ddp_training.py --resume   # continue a run

gloo on CPU, nccl when CUDA is present (one GPU per rank). A small MLP learns a teacher network's
outputs; every rank draws its own label noise (the stream mixes in the rank: seed, rank, step
and micro-batch decide every draw), DistributedSampler splits the data, the probe runs on each
rank's shard of a probe set and reports on their union, and only rank 0 writes TensorBoard
events and checkpoints. Resuming on the same world size continues the same noise streams.
"""

import argparse
import os
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
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
p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
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

model = DDP(seeded_mlp(args.seed).to(device))  # the same initialisation on every rank
opt = LabelNoiseSGD(model.parameters(), lr=args.lr, momentum=0.9, noise_std=args.noise_std, seed=args.seed)
start = 0
if args.resume:
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    model.module.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])  # the noise stream position travels with it
    start = state["step"]
    if start >= args.steps:
        if rank == 0:
            print(f"{checkpoint} is at step {start}: nothing left to run (pass --steps above {start} to go on)")
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
    if (step + 1) % args.save_every == 0 and rank == 0:
        # atomically: a kill inside the save leaves the previous checkpoint, never a truncated one
        partial = f"{checkpoint}.partial"
        torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict(), "step": step + 1}, partial)
        os.replace(partial, checkpoint)
    dist.barrier() if (step + 1) % args.save_every == 0 else None

report = monitor.log()  # a collective: every rank takes part
monitor.close()
if rank == 0:
    print(f"{world} ranks, {args.steps} steps: reg {report.reg:.4g}, manifold grad {report.manifold_grad_norm:.3g}, "
          f"clean probe loss {report.loss:.3g}")
    print(f"logs: tensorboard --logdir {args.out}; checkpoint: {checkpoint}")
dist.barrier()  # no rank leaves while another is still in a collective
dist.destroy_process_group()
# Everything is saved and printed: leave at once. An ordinary interpreter exit sometimes aborts
# a rank ("terminate called without an active exception") while gloo's and DDP's threads are
# torn down, which would turn a finished run into a failed one.
sys.stdout.flush()
os._exit(0)
