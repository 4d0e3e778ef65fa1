"""Worker functions for tests/test_distributed.py: each runs in a spawned gloo process."""

import os
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DistributedSampler, TensorDataset

from helpers import mlp
from noisy_label_sgd import LabelNoise, LabelNoiseSGD, RegularizerProbe, TensorBoardMonitor

TIMEOUT = timedelta(seconds=30)  # a collective waiting on a dead peer fails instead of hanging


def setup(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=TIMEOUT)


def teardown() -> None:
    """Every rank done before any leaves, then exit at once: an ordinary interpreter exit
    sometimes aborted a worker ("terminate called without an active exception") while gloo and
    DDP threads were torn down, after all results had been written."""
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def dataset(n: int = 64):
    g = torch.Generator().manual_seed(123)
    return TensorDataset(torch.randn(n, 6, generator=g, dtype=torch.float64),
                         torch.randn(n, 3, generator=g, dtype=torch.float64))


def train(rank, world, init_file, out_dir, steps, hook, start=0, save_at=None, resume=None):
    """DDP + LabelNoiseSGD, DistributedSampler, 2 micro-batches per step (the first under no_sync)."""
    setup(rank, world, init_file)
    try:
        model = DDP(mlp())
        opt = LabelNoiseSGD(model.parameters(), lr=0.05, momentum=0.9, noise_std=0.5, seed=7)
        if resume:
            ckpt = torch.load(resume, weights_only=True)
            model.module.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
        if hook in ("output", "output_module"):  # on the DDP wrapper, or on the module inside
            opt.attach_output_noise(model if hook == "output" else model.module)
            loss_fn = nn.MSELoss()
        else:
            loss_fn = opt.noisy_loss(nn.MSELoss())
        data = dataset()
        sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=1)
        draws = []
        for step in range(start, steps):
            sampler.set_epoch(step)  # the batches of a step depend only on the step
            idx = list(sampler)[:16]
            opt.zero_grad()
            for micro, part in enumerate((idx[:8], idx[8:])):
                x, y = data[part]
                if micro == 0:
                    with model.no_sync():
                        loss_fn(model(x), y).backward()
                else:
                    loss_fn(model(x), y).backward()
                draws.append(opt.label_noise.last_noise.clone())
            opt.step()
            if save_at is not None and step + 1 == save_at and rank == 0:
                torch.save({"model": model.module.state_dict(), "optimizer": opt.state_dict()},
                           os.path.join(out_dir, "checkpoint.pt"))
        torch.save({"params": [p.detach() for p in model.parameters()], "draws": draws,
                    "noise_step": opt.label_noise.step},
                   os.path.join(out_dir, f"train_rank{rank}.pt"))
    finally:
        teardown()


def noise_streams(rank, world, init_file, out_dir):
    """Large draws of a rank-aware stream (rank picked up from torch.distributed)."""
    setup(rank, world, init_file)
    try:
        noise = LabelNoise(1.0, seed=3)
        draws = [noise.sample(torch.zeros(20000, dtype=torch.float64)) for _ in range(2)]
        torch.save({"rank": noise.rank, "draws": draws}, os.path.join(out_dir, f"noise_rank{rank}.pt"))
    finally:
        teardown()


def probe(rank, world, init_file, out_dir, x, y, bounds):
    """Each rank probes its shard; the monitor writes from rank 0 only."""
    setup(rank, world, init_file)
    try:
        model = DDP(mlp())
        lo, hi = bounds[rank], bounds[rank + 1]
        p = RegularizerProbe(model, x[lo:hi], y[lo:hi])
        report = p()
        with TensorBoardMonitor(p, log_dir=os.path.join(out_dir, f"tb_rank{rank}"), every=1) as monitor:
            monitor.log(1)
        torch.save(report, os.path.join(out_dir, f"probe_rank{rank}.pt"))
    finally:
        teardown()


def tanh_net():
    """The 3-16-1 tanh net of issue 14 (seeded), float64."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()


def probe_manifold_grad(rank, world, init_file, out_dir, x, bounds):
    """The distributed probe's manifold gradient (LSQR over the ranks' shards of J)."""
    setup(rank, world, init_file)
    try:
        lo, hi = bounds[rank], bounds[rank + 1]
        report = RegularizerProbe(DDP(tanh_net()), x[lo:hi])()
        torch.save(report.manifold_grad, os.path.join(out_dir, f"manifold_rank{rank}.pt"))
    finally:
        teardown()


def one_rank_fails(rank, world, init_file, out_dir):
    """Rank 1 gets bad input (NaN targets) while rank 0 waits in a collective."""
    setup(rank, world, init_file)
    noise = LabelNoise(0.1)
    targets = torch.full((4,), float("nan")) if rank == 1 else torch.zeros(4)
    try:
        noise.perturb(targets)
    except ValueError as error:  # recorded, since the job may report rank 0's error first
        with open(os.path.join(out_dir, f"error_rank{rank}.txt"), "w") as f:
            f.write(str(error))
        raise
    dist.all_reduce(torch.zeros(1))
    dist.destroy_process_group()


def sharded_refused(rank, world, init_file, out_dir, wrapper, x):
    """Every entry point on an FSDP-sharded model raises (the same on both ranks, no collective
    left waiting); the replica the error advises, loaded from the full state dict, is probed."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard

    from noisy_label_sgd import implicit_regularizer, per_sample_sq_grad_norms, regularizer_grad, tangent_projection

    setup(rank, world, init_file)
    try:
        model = mlp()
        if wrapper == "fsdp2":
            fully_shard(model[0])
            fully_shard(model)
        else:
            model = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        vector = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
        errors = {}
        for name, call in (("norms", lambda: per_sample_sq_grad_norms(model, x)),
                           ("reg", lambda: implicit_regularizer(model, x)),
                           ("grad", lambda: regularizer_grad(model, x)),
                           ("projection", lambda: tangent_projection(model, x, vector)),
                           ("probe", lambda: RegularizerProbe(model, x)())):
            try:
                call()
                errors[name] = None
            except NotImplementedError as error:
                errors[name] = str(error)
        replica = mlp(seed=1)  # (other values: the load must bring the model's)
        replica.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
        report = RegularizerProbe(replica, x)()
        torch.save({"errors": errors, "reg": report.reg, "grad_norm": report.reg_grad_norm,
                    "grad": regularizer_grad(replica, x)},
                   os.path.join(out_dir, f"sharded_rank{rank}.pt"))
    finally:
        teardown()


def fsdp_train(rank, world, init_file, out_dir, steps, momentum, save_at=None):
    """FSDP2 + LabelNoiseSGD for ``steps`` steps; with ``save_at``: a torch.distributed.checkpoint
    save there, then a fresh model and optimizer (other initial values) loaded from it to go on."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                         set_state_dict)
    from torch.distributed.fsdp import fully_shard

    def build(seed):
        model = mlp(seed=seed)
        fully_shard(model[0])
        fully_shard(model)
        return model, LabelNoiseSGD(model.parameters(), lr=0.05, momentum=momentum, noise_std=0.5, seed=7)

    setup(rank, world, init_file)
    try:
        model, opt = build(0)
        seen = []
        loss_fn = opt.noisy_loss(nn.MSELoss())
        x, y = dataset()[rank * 8:(rank + 1) * 8]
        for step in range(steps):
            if step == save_at:
                model_state, optim_state = get_state_dict(model, opt)
                path = os.path.join(out_dir, "dcp")
                dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)
                model, opt = build(1)
                loss_fn = opt.noisy_loss(nn.MSELoss())
                model_state, optim_state = get_state_dict(model, opt)
                state = {"model": model_state, "optim": optim_state}
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    dcp.load(state, checkpoint_id=path)
                    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
                seen = [str(w.message) for w in caught if "label-noise" in str(w.message)]
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
        torch.save({"params": full, "noise_step": opt.label_noise.step, "warnings": seen},
                   os.path.join(out_dir, f"fsdp_rank{rank}.pt"))
    finally:
        teardown()
