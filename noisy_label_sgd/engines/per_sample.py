"""Per-sample gradients of one traced module's own parameters, from its recorded inputs and
output gradients: materialised where the closed forms (norms only) do not suffice, for the
fast engine's J (:meth:`~noisy_label_sgd.engines.fast.FastEngine.jacobian`), its per-module
fallbacks and the cross terms of a parameter shared by two modules
(:mod:`~noisy_label_sgd.engines.ties`).
"""

from __future__ import annotations

import torch
from torch.func import functional_call, vjp, vmap

from .trace import FastPathUnsupported, Owner, grads_over_calls, input_over_calls


def per_sample_grads(owner: Owner, grads: list[torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """The per-sample gradients of the owner's parameters, name -> [c, n, *param.shape] over c
    output directions: an affine map (a Linear, or a written-out map; its calls are positions)
    from its input and output gradients, any other module by :func:`module_per_sample_grads`."""
    call = owner.calls[0]
    linear = isinstance(owner.module, torch.nn.Linear) and len(owner.calls) == 1 and len(call.args) == 1
    if not (owner.affine or linear):
        return module_per_sample_grads(owner, grads, n)
    d = call.sample_dim  # (0 where several calls are stacked)
    a, g = input_over_calls(owner).movedim(d, 0), grads_over_calls(grads).movedim(d + 1, 1)
    a = a.reshape(n, -1, a.shape[-1]).to(g.dtype)  # [n, positions, in]
    g = g.reshape(g.shape[0], n, -1, g.shape[-1])  # [c, n, positions, out]
    return {name: torch.einsum("cnto,nti->cnoi", g, a) if "weight" in name else g.sum(2)
            for name in owner.params}


def module_per_sample_grads(owner: Owner, grads: list[torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """Per-sample gradients of this module's own parameters, summed over its calls, by a
    vmapped vjp of the module at its recorded inputs: name -> [c, n, *param.shape].

    Samples must run along dim 0 of the module's output; a tensor argument (positional or
    keyword) whose dim 0 has n entries is taken per sample, any other as shared by all samples.
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
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n
                   and not (attention and name == "attn_mask")  # ([T, S]: shared, even where T = n)
                   for t, name in zip(values, [None] * len(call.args) + names)]

        def sample_output(p, *values):
            full = [t.unsqueeze(0) if b else t for t, b in zip(values, batched)]
            split = len(full) - len(names)
            out = functional_call(owner.module, p, tuple(full[:split]), dict(zip(names, full[split:])))
            return (out[0] if isinstance(out, tuple) else out)[0]

        def sample_grads(cotangent, *values):
            return vjp(lambda p: sample_output(p, *values), params)[1](cotangent)[0]

        in_dims = (0,) + tuple(0 if b else None for b in batched)
        per_direction = vmap(vmap(sample_grads, in_dims=in_dims), in_dims=(0,) + (None,) * len(batched))
        grads_call = per_direction(g.detach(), *[t.detach() if isinstance(t, torch.Tensor) else t for t in values])
        summed = grads_call if summed is None else {k: summed[k] + v for k, v in grads_call.items()}
    assert summed is not None
    return summed
