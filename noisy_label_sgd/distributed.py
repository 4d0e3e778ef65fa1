"""The collectives the probe needs when torch.distributed is initialised.

Every rank holds its own shard of the probe set; reductions make the results those of the union
of the shards, identical on every rank. Without an initialised process group (or with one rank)
every helper is the identity, so single-process code pays nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "all_reduce_sum", "all_gather_cat"]


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
