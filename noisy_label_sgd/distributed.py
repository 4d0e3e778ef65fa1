"""The collectives the probe needs when torch.distributed is initialised.

Every rank holds its own shard of the probe set; reductions make the results those of the union
of the shards, identical on every rank. Without an initialised process group (or with one rank)
every helper is the identity, so single-process code pays nothing.

The measurements need whole parameters on every rank: a model sharded by FSDP (``fully_shard`` or
``FullyShardedDataParallel``) is measured through a gathered replica (:mod:`noisy_label_sgd.sharded`);
where the sharded parameters themselves would reach an engine, and under tensor parallelism, it is
refused (:func:`check_unsharded`) instead of giving wrong numbers (grad reg came back as zeros: FSDP
routes gradients to its shards only through its own backward hooks, which a measurement's
``autograd.grad`` does not run).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "all_reduce_sum", "all_gather_cat", "check_unsharded"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """The sum over ranks (a new tensor; the input is left alone)."""
    t = t.clone()
    if is_distributed():
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's tensor along dim 0, in rank order (first dims may differ)."""
    if not is_distributed():
        return t
    sizes = [torch.zeros(1, dtype=torch.long, device=t.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=t.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.shape[0]] = t
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def check_unsharded(model: torch.nn.Module) -> None:
    """Refuse a model whose parameters are sharded across ranks where whole ones are needed (an
    engine given the sharded model itself, or tensor parallelism), saying how to probe it.

    Raises:
        NotImplementedError: naming the sharded parameter or the FSDP module.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return  # (sharding needs a process group)
    from torch.distributed.tensor import DTensor

    from .sharded import fsdp_kind

    if fsdp_kind(model) is not None:
        raise NotImplementedError(
            "the engines take whole parameters, and this model is sharded by FSDP (grad reg would read as zeros: "
            "FSDP delivers gradients to its shards only through its own hooks); pass it to the public functions "
            "or RegularizerProbe, which measure it through an unsharded replica gathered from the shards")
    where = next((name for name, p in model.named_parameters() if isinstance(p, DTensor)), None)
    if where is not None:
        raise NotImplementedError(
            f"parameter {where!r} is a DTensor sharded across ranks outside FSDP (tensor parallelism), which the "
            "probe does not gather: probe an unsharded replica on each rank, the same model built without the "
            "parallelisation and loaded with replica.load_state_dict(get_model_state_dict(model, "
            "options=StateDictOptions(full_state_dict=True))) (torch.distributed.checkpoint.state_dict, on every "
            "rank) before each probe")
