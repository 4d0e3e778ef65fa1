"""Worker functions for tests/test_distributed.py: each runs in a spawned gloo process."""

import os
import sys
import traceback
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


def failed() -> None:
    """A worker's error, printed, and the process ended with a failure (teardown's exit would
    report success, and the test would only see a missing result file)."""
    traceback.print_exc()
    sys.stderr.flush()
    os._exit(1)


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
    except BaseException:
        failed()
    teardown()


def noise_streams(rank, world, init_file, out_dir):
    """Large draws of a rank-aware stream (rank picked up from torch.distributed)."""
    setup(rank, world, init_file)
    try:
        noise = LabelNoise(1.0, seed=3)
        draws = [noise.sample(torch.zeros(20000, dtype=torch.float64)) for _ in range(2)]
        torch.save({"rank": noise.rank, "draws": draws}, os.path.join(out_dir, f"noise_rank{rank}.pt"))
    except BaseException:
        failed()
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
    except BaseException:
        failed()
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
    except BaseException:
        failed()
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


def doubled_head(model: nn.Module) -> nn.Module:
    """A user's forward hook on the last layer (the replica must keep it, and drop FSDP's)."""
    model[-1].register_forward_hook(lambda module, args, out: 2 * out)
    return model


def sharded_measured(rank, world, init_file, out_dir, wrapper, x):
    """An FSDP-sharded model measured by every entry point (each rank the same inputs, the probe a
    shard each), then trained one backward as FSDP does: the measurements leave FSDP working."""
    from torch.distributed.fsdp import FullyShardedDataParallel, fully_shard
    from torch.distributed.tensor import DTensor

    from noisy_label_sgd import implicit_regularizer, per_sample_sq_grad_norms, regularizer_grad, tangent_projection
    from noisy_label_sgd.engines import select_engine
    from noisy_label_sgd.sharded import sharded

    setup(rank, world, init_file)
    try:
        model = doubled_head(mlp())
        if wrapper == "fsdp2":
            fully_shard(model[0])
            fully_shard(model)
        elif wrapper == "fsdp2_group":  # (two modules sharded as one group: FSDP wraps its hooks)
            fully_shard([model[0], model[2]])
            fully_shard(model)
        elif wrapper == "fsdp1_flat":  # (its parameters a flat shard: the modules' views exist only unsharded)
            model = FullyShardedDataParallel(model, use_orig_params=False, device_id=torch.device("cpu"))
        else:
            model[0] = FullyShardedDataParallel(model[0], use_orig_params=True, device_id=torch.device("cpu"))
            model = FullyShardedDataParallel(model, use_orig_params=True, device_id=torch.device("cpu"))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}

        def full(values):
            return {name: v.full_tensor() if isinstance(v, DTensor) else v for name, v in values.items()}

        grad = regularizer_grad(model, x)
        layout = {name: (type(g).__name__, tuple(g.to_local().shape) if isinstance(g, DTensor) else tuple(g.shape))
                  for name, g in grad.items()}
        own = {name: (type(p).__name__, tuple(p.to_local().shape) if isinstance(p, DTensor) else tuple(p.shape))
               for name, p in model.named_parameters()}
        result = {"norms": per_sample_sq_grad_norms(model, x), "reg": implicit_regularizer(model, x),
                  "grad": full(grad), "layout": layout, "own_layout": own,
                  "projection": full(tangent_projection(model, x, grad)),
                  "norms_by": {method: per_sample_sq_grad_norms(model, x, method=method) for method in ("fast", "vmap")}}
        half = x.shape[0] // world
        probe = RegularizerProbe(model, x[rank * half:(rank + 1) * half])
        report = probe()
        with TensorBoardMonitor(probe, log_dir=os.path.join(out_dir, f"tb_rank{rank}"), every=1) as monitor:
            monitor.log(1)
        result["probe"] = (report.reg, report.reg_grad_norm, report.manifold_grad_norm)
        errors = {}
        for name, error_type, call in (
                ("different inputs", ValueError, lambda: regularizer_grad(model, x[rank:])),
                ("create_graph", NotImplementedError, lambda: implicit_regularizer(model, x, create_graph=True)),
                ("engine", NotImplementedError, lambda: select_engine(model, x, "auto").sq_norms())):
            try:
                call()
                errors[name] = None
            except error_type as error:
                errors[name] = str(error)
        result["errors"] = errors
        replica = sharded(model).replica  # the user's classes and hook only, none of FSDP's
        result["replica"] = ([type(m).__name__ for m in replica.modules()],
                             sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in replica.modules()))
        result["unchanged"] = all(torch.equal(p.detach(), before[name]) for name, p in model.named_parameters())
        model(x).pow(2).sum().backward()  # (FSDP's own forward and backward, hooks and all)
        if wrapper.startswith("fsdp2"):
            result["loss_grad"] = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
        elif wrapper == "fsdp1_flat":  # (summon_full_params(with_grads=True) needs use_orig_params)
            result["loss_grad"] = None
        else:
            with FullyShardedDataParallel.summon_full_params(model, with_grads=True):
                result["loss_grad"] = {name.replace("_fsdp_wrapped_module.", ""): p.grad.clone()
                                       for name, p in model.named_parameters()}
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        result["reg_after_step"] = implicit_regularizer(model, x)  # (gathered again: the new values)
        torch.save(result, os.path.join(out_dir, f"sharded_rank{rank}.pt"))
    except BaseException:
        failed()
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
    except BaseException:
        failed()
    teardown()
