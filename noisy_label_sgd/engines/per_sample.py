"""Per-sample gradients of one traced module's own parameters, from its recorded inputs and
output gradients: materialised where the closed forms (norms only) do not suffice, for the
fast engine's J (:meth:`~noisy_label_sgd.engines.fast.FastEngine.jacobian`) and K by layers
(:meth:`~noisy_label_sgd.engines.fast.FastEngine.gram_by_layers`), its per-module fallbacks
and the cross terms of a parameter shared by two modules (:mod:`~noisy_label_sgd.engines.ties`).
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from .closed_forms import _plain_convolution, conv_geometry, grouped_weight_grads
from .functional import OwnForward, forward_replacements
from .trace import FastPathUnsupported, Owner, grads_over_calls, input_over_calls


def per_sample_grads(owner: Owner, grads: list[torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The per-sample gradients of the owner's parameters, name -> [c, n, *param.shape] over c
    output directions: an affine map (a Linear, or a written-out map; its calls are positions)
    from its input and output gradients, a convolution by :func:`conv_per_sample_grads`, any
    other module by :func:`module_per_sample_grads`."""
    if owner.shared is not None:  # (an output all samples share, through its meetings with them)
        return owner.shared.per_sample(grads)
    if owner.elementwise is not None:  # (a bare parameter's elementwise use)
        call = owner.calls[0]
        return {name: owner.elementwise.per_sample(call.args[0], grads[0], call.sample_dim) for name in owner.params}
    if _plain_conv_owner(owner):
        return conv_per_sample_grads(owner, grads[0])
    if not (owner.affine or _linear_owner(owner)):
        return module_per_sample_grads(owner, grads, n)
    d = owner.calls[0].sample_dim  # (0 where several calls are stacked)
    # (rows per sample: unflattened in both, [.., n, m, ..], their order as positions alike)
    a, g = input_over_calls(owner).movedim(d, 0), grads_over_calls(grads).movedim(d + 1, 1)
    a = a.reshape(n, -1, a.shape[-1]).to(g.dtype)  # [n, positions, in]
    g = g.reshape(g.shape[0], n, -1, g.shape[-1])  # [c, n, positions, out]
    return {name: torch.einsum("cnto,nti->cnoi", g, a) if "weight" in name else g.sum(2)
            for name in owner.params}


def per_sample_direct(owner: Owner) -> bool:
    """Whether the owner's per-sample gradients come without autograd (a Linear or affine map
    by einsum, a convolution by a grouped weight gradient): safe inside a backward hook, and
    differentiable once more."""
    return owner.affine or owner.elementwise is not None or _linear_owner(owner) or _plain_conv_owner(owner)


def _linear_owner(owner: Owner) -> bool:
    # (a certified formula: the module computes what nn.Linear computes)
    return (isinstance(owner.module, nn.Linear) and owner.closed_form is not None and len(owner.calls) == 1
            and len(owner.calls[0].args) == 1)


def _plain_conv_owner(owner: Owner) -> bool:
    module = owner.module
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and _plain_convolution(module) and not owner.affine
            and owner.closed_form is not None and len(owner.calls) == 1 and len(owner.calls[0].args) == 1 and owner.calls[0].sample_dim == 0)


def conv_per_sample_grads(owner: Owner, g: torch.Tensor, channels: slice = slice(None)) -> dict[str, torch.Tensor]:
    """A convolution's per-sample gradients, name -> [c, n, *param.shape] (the weight's of the
    output channels ``channels``): one weight gradient of a convolution grouped by sample per
    output direction."""
    module = owner.module
    a, g2, kernel, stride, padding, dilation = conv_geometry(module, owner.calls[0].args[0], g)
    out = {}
    if "weight" in owner.params:
        weight = torch.stack([grouped_weight_grads(module, a, g_j, kernel, stride, padding, dilation, channels)
                              for g_j in g2])  # [c, n * out, ...]
        out["weight"] = weight.reshape(weight.shape[0], g.shape[1], *module.weight[channels].shape)
    if "bias" in owner.params and channels == slice(None):
        out["bias"] = g2.sum((-1, -2))
    return out


def per_sample_gradient_blocks(owner: Owner, grads: list[torch.Tensor], n: int,
                               max_bytes: int) -> Iterator[torch.Tensor | None]:
    """The owner's rows of J in column blocks of at most ``max_bytes``: [n c, columns] each,
    rows sample-major (i, j) over the c output directions of ``grads``; a convolution's weight
    in slices of its output channels (groups 1), any other owner whole. None where a block
    cannot fit."""
    c = grads[0].shape[0]
    module = owner.module
    if _plain_conv_owner(owner):
        if "bias" in owner.params:
            yield grads[0].flatten(3).sum(-1).transpose(0, 1).reshape(n * c, -1)  # [c, n, out] -> [n c, out]
        if "weight" in owner.params:
            itemsize = max(grads[0].element_size(), owner.calls[0].args[0].element_size())
            per_channel = n * c * module.weight[0].numel() * itemsize
            step = module.out_channels if module.groups > 1 else max(1, max_bytes // per_channel)
            if step * per_channel > max_bytes:
                yield None
                return
            for start in range(0, module.out_channels, step):
                weight = conv_per_sample_grads(owner, grads[0], slice(start, start + step))["weight"]
                yield weight.transpose(0, 1).reshape(n * c, -1)
        return
    size = n * c * sum(p.numel() for p in owner.params.values()) * grads[0].element_size()
    if size > max_bytes:
        yield None
        return
    for g in per_sample_grads(owner, grads, n).values():
        yield g.transpose(0, 1).reshape(n * c, -1)


def module_per_sample_grads(owner: Owner, grads: list[torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients of this module's own parameters, summed over its calls, by a
    vmapped vjp of the module at its recorded inputs: name -> [c, n, *param.shape].

    Samples must run along dim 0 of the module's output; a tensor argument (positional or
    keyword) whose dim 0 has n entries is taken per sample, any other as shared by all samples.
    Where the output holds m rows per sample in dim 0 (``Call.rows``), an argument with n m
    entries there is taken a block of m rows per sample: the module applied to one sample's rows.
    """
    attention = isinstance(owner.module, torch.nn.MultiheadAttention)
    if attention and (not owner.module.batch_first or any(
            isinstance(c.kwargs.get("attn_mask"), torch.Tensor) and c.kwargs["attn_mask"].dim() == 3
            for c in owner.calls)) or any(c.shape[0] != n or c.sample_dim != 0 for c in owner.calls):
        # (a 3-D attention mask is [n * heads, T, S]: per sample, but not along dim 0 alone)
        raise FastPathUnsupported(f"module {owner.name!r} does not put samples first")
    params = {name: p.detach() for name, p in owner.params.items()}
    summed: dict[str, torch.Tensor] | None = None
    for call, g in zip(owner.calls, grads):
        names = list(call.kwargs)
        values = [*call.args, *call.kwargs.values()]
        rows = call.rows
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n * rows
                   and not (attention and name == "attn_mask")  # ([T, S]: shared, even where T = n)
                   for t, name in zip(values, [None] * len(call.args) + names)]
        if rows > 1:  # (a sample's block of rows: the module applied to it)
            values = [t.unflatten(0, (n, rows)) if b else t for t, b in zip(values, batched)]

        def sample_output(p, *values):
            full = [t.unsqueeze(0) if b and rows == 1 else t for t, b in zip(values, batched)]
            split = len(full) - len(names)
            if owner.original is not None:  # (an operation's owner: the operation, not the module)
                return call.ops[0].apply(full[0], p)[0]
            with forward_replacements():
                out = functional_call(OwnForward(owner.module), {f"module.{k}": v for k, v in p.items()},
                                      tuple(full[:split]), dict(zip(names, full[split:])))
            out = out[0] if isinstance(out, tuple) else out
            return out[0] if rows == 1 else out

        def sample_grads(cotangent, *values):
            return vjp(lambda p: sample_output(p, *values), params)[1](cotangent)[0]

        in_dims = (0,) + tuple(0 if b else None for b in batched)
        per_direction = vmap(vmap(sample_grads, in_dims=in_dims), in_dims=(0,) + (None,) * len(batched))
        grads_call = per_direction(g.detach(), *[t.detach() if isinstance(t, torch.Tensor) else t for t in values])
        summed = grads_call if summed is None else {k: summed[k] + v for k, v in grads_call.items()}
    assert summed is not None
    return summed
