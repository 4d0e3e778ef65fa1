"""Measuring a model sharded by FSDP: an unsharded replica whose parameters are gathered from the shards.

The engines differentiate whole parameters, and FSDP delivers gradients to its shards only through
its own backward hooks (a measurement's ``autograd.grad`` read zeros). So a sharded model is
measured through a replica of its module tree: the same modules (their classes without FSDP's, their
code, buffers and the user's hooks), FSDP's hooks left out, and full parameters, refreshed from the
shards before every measurement (``DTensor.full_tensor`` for ``fully_shard``,
``FullyShardedDataParallel.summon_full_params`` for FSDP1: collectives, so every rank calls).

Memory: one full copy of the parameters per rank, held as long as the model (the sharding's saving
is given up for the measurement's parameters, not for training). The replica computes in the
parameters' own dtype: an FSDP mixed-precision policy is not applied, so the numbers are those of
the unsharded model in full precision.

Results come back in the model's layout: under FSDP2 gradients and projections are DTensors sharded
like the parameters; FSDP1's parameters are views of flat shards, so there they are full tensors
named as in FSDP1's full state dict (``get_model_state_dict(..., full_state_dict=True)``).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import nn

from .engines import torch_internals

__all__ = ["ShardedModel", "sharded", "gathered", "fsdp_kind", "check_same_inputs"]

# where a model keeps its ShardedModel: on the model, so that the two are collected together (a
# weak-keyed table would be kept alive by the ShardedModel's own reference to its model)
_ATTRIBUTE = "_noisy_label_sgd_sharded"


def fsdp_kind(model: nn.Module) -> str | None:
    """``"fsdp2"`` (``fully_shard``), ``"fsdp1"`` (``FullyShardedDataParallel``) or None."""
    if not (dist.is_available() and dist.is_initialized()):
        return None  # (sharding needs a process group)
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for module in model.modules():
        if isinstance(module, FSDPModule):
            return "fsdp2"
        if isinstance(module, FullyShardedDataParallel):
            return "fsdp1"
    return None


def sharded(model: nn.Module) -> ShardedModel | None:
    """The model's :class:`ShardedModel` (built at the first call, kept as long as the model), or
    None for a model FSDP does not shard."""
    if fsdp_kind(model) is None:
        return None
    if _ATTRIBUTE not in model.__dict__:
        model.__dict__[_ATTRIBUTE] = ShardedModel(model)
    return model.__dict__[_ATTRIBUTE]


class ShardedModel:
    """An FSDP model and its unsharded replica; :meth:`gather` brings the replica up to date (its
    values are unset until the first gather)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kind = fsdp_kind(model)
        if self.kind is None:
            raise ValueError("the model is not sharded by FSDP")
        # (owner module in the model, parameter name there, the replica's parameter), once per tensor
        self._sources: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._replicated: dict[int, object] = {}
        with self._full_parameters():
            self.replica = self._replicate(model)
        self._replicated.clear()
        sharded_params = dict(model.named_parameters())
        # the model's parameter for each of the replica's names (FSDP2 keeps the names)
        self._model_params = {name: sharded_params[name] for name, _ in self.replica.named_parameters()} \
            if self.kind == "fsdp2" else {}

    def gather(self) -> nn.Module:
        """Copy the model's current parameters into the replica (a collective) and return it."""
        with torch.no_grad(), self._full_parameters():
            for owner, name, target in self._sources:
                target.copy_(full_tensor(owner._parameters[name]))
        return self.replica

    def to_model_layout(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full tensors over the replica's parameters -> the model's layout (DTensor shards under
        FSDP2; FSDP1: unchanged). Needs the same full values on every rank."""
        if self.kind != "fsdp2":
            return values
        from torch.distributed.tensor import DTensor, distribute_tensor

        out = {}
        for name, value in values.items():
            p = self._model_params[name]
            # (every rank holds the whole value: each keeps its own shard, no communication)
            out[name] = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None) \
                if isinstance(p, DTensor) else value
        return out

    def from_model_layout(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The model's layout -> full tensors (DTensors gathered: a collective)."""
        return {name: full_tensor(v) for name, v in values.items()}

    def _full_parameters(self):
        if self.kind == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.summon_full_params(self.model, writeback=False)
        return contextlib.nullcontext()

    def _replicate(self, module: nn.Module) -> nn.Module:
        """The module tree without FSDP: FSDP1 wrappers replaced by what they wrap, FSDP2's classes
        by the user's, FSDP's forward hooks dropped; a shared module or parameter stays shared."""
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

        if id(module) in self._replicated:
            return self._replicated[id(module)]
        if isinstance(module, FullyShardedDataParallel):
            clone = self._replicate(module.module)
            self._replicated[id(module)] = clone
            return clone
        cls = type(module)
        if isinstance(module, FSDPModule):  # (fully_shard made the class FSDP<cls>(FSDPModule, cls))
            cls = next(c for c in cls.__mro__ if not issubclass(c, FSDPModule))
        clone = cls.__new__(cls)
        self._replicated[id(module)] = clone
        clone.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith(("_fsdp", "_is_fsdp", _ATTRIBUTE))})
        clone._parameters = {name: None if p is None else self._replicate_parameter(module, name, p)
                             for name, p in module._parameters.items()}
        clone._buffers = dict(module._buffers)
        clone._modules = {name: None if child is None else self._replicate(child) for name, child in module._modules.items()}
        for hooks in ("_forward_pre_hooks", "_forward_hooks"):
            setattr(clone, hooks, OrderedDict((key, hook) for key, hook in getattr(module, hooks).items()
                                             if not torch_internals.is_fsdp_forward_hook(hook)))
        return clone

    def _replicate_parameter(self, owner: nn.Module, name: str, p: torch.Tensor) -> nn.Parameter:
        if id(p) not in self._replicated:
            # (the whole shape; the values come with the first gather: a DTensor's shape is the whole one,
            # and FSDP1's parameters are built whole inside summon_full_params)
            copy = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=p.device), requires_grad=p.requires_grad)
            self._replicated[id(p)] = copy
            self._sources.append((owner, name, copy))
        return self._replicated[id(p)]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (an all-gather), any other tensor detached."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor().detach() if isinstance(t, DTensor) else t.detach()


def check_same_inputs(batch: tuple[torch.Tensor, ...], question: str) -> None:
    """Under FSDP a gradient or projection comes back sharded like the parameters: one value cut
    across the ranks, so every rank must measure the same inputs (checked by a fingerprint)."""
    fingerprint = torch.stack([torch.stack([t.new_tensor(float(t.numel()), dtype=torch.float64),
                                            t.detach().to(torch.float64).sum(),
                                            t.detach().to(torch.float64).pow(2).sum()]) for t in batch])
    everyone = [torch.empty_like(fingerprint) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, fingerprint)
    if not all(torch.equal(other, everyone[0]) for other in everyone):
        raise ValueError(
            f"{question} of an FSDP model returns a result sharded like its parameters, so every rank must pass "
            "the same inputs, and these ranks passed different ones; for a probe set split over the ranks use "
            "RegularizerProbe, which reduces over them")


def gathered(model: nn.Module, inputs, question: str | None = None) -> tuple[nn.Module, ShardedModel | None]:
    """The module a public function measures: the model itself, or for an FSDP model its replica,
    gathered now (every rank calls). ``question``: a function whose result is sharded like the
    parameters, which needs the same inputs on every rank."""
    shards = sharded(model)
    if shards is None:
        return model, None
    if question is not None:
        from .engines.functional import as_input_tuple

        check_same_inputs(as_input_tuple(inputs), question)
    return shards.gather(), shards
