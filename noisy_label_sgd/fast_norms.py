r"""Norm-only per-sample :math:`\|J_i\|_F^2` from layer inputs and output gradients.

No per-sample gradient of a whole model is ever formed. Forward hooks keep each parametrised
module's input and the gradient edge of its output; a backward of the outputs, one direction j
at a time (the summed outputs for k = 1) or batched over a group of directions
(``is_grads_batched``), gives :math:`g_{ij} = \partial h_{ij}/\partial y` at every module output
:math:`y`; one direction at a time, each module's part is taken by a hook on its output's node as
the backward passes it. Per module, in closed form:

* ``nn.Linear``, :math:`y_t = W a_t + b` over positions t (none for 2-D inputs):
  :math:`\|\nabla_W h_{ij}\|^2 = \sum_{t,s} (a_{it}\cdot a_{is})(g_{ijt}\cdot g_{ijs})` (for one
  position :math:`\|g_{ij}\|^2\|a_i\|^2`), :math:`\|\nabla_b h_{ij}\|^2 = \|\sum_t g_{ijt}\|^2`;
* ``nn.Conv1d`` / ``nn.Conv2d`` (groups 1, zero padding): a Linear over output positions applied
  to the input patches (a few samples at a time); with many positions and at least 16 input channels, the
  per-sample weight gradients instead as the weight gradient of one convolution grouped by
  sample (the batch folded into channels);
* ``nn.MultiheadAttention`` as plain self-attention (packed projections, no masks): traced with
  its forward written out (:func:`_packed_forward`), so in_proj and out_proj are two affine maps
  whose output gradients the model's own backward reaches;
* ``nn.LayerNorm`` / ``nn.GroupNorm`` affine parameters: :math:`\nabla_\gamma = \sum g\,\hat{x}`,
  :math:`\nabla_\beta = \sum g` over the positions that share a parameter.

Any other module with parameters, and any module called more than once (a reused weight: its
per-sample gradient is the sum over the calls, cross terms included), falls back, for that module
only, to torch.func per-sample gradients of its own parameters (a vmapped vjp of the module at its
recorded input). Outputs are recorded by their gradient edges (:class:`Call`), which in-place ops
after the module (``ReLU(inplace=True)``, a residual ``+=``) leave pointing at the module's own
output.

Whole-model fallback (:class:`FastPathUnsupported`): a parameter owned by two modules, a module
with parameters that is never called (its weight used by a parent's functional code, as in
``nn.MultiheadAttention``), or a module returning a non-tensor.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["FastPathUnsupported", "fast_sq_norms", "fast_gram", "fast_chunk_size", "closed_form_layers"]

CLOSED_FORM = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.LayerNorm, nn.GroupNorm)
MHA_PARAMS = {"in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias"}


class FastPathUnsupported(RuntimeError):
    """The model needs the whole-model torch.func path (the message says why)."""


@dataclass
class Call:
    """One recorded call: its arguments, and where its output enters the autograd graph.

    Only the output's gradient edge is kept, not the tensor: the record holds no extra copy,
    and an in-place op after the module (``ReLU(inplace=True)``, a residual ``+=``) moves the
    tensor to a new node while the edge still leads to the module's own output.
    """

    args: tuple
    kwargs: dict
    edge: torch.autograd.graph.GradientEdge | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    # what every output direction reuses: the input's per-sample squared norms (2-D inputs)
    memo: dict = field(default_factory=dict, repr=False)


@dataclass
class Owner:
    """A module that owns trainable parameters directly, and its recorded calls."""

    name: str
    module: nn.Module
    params: dict[str, nn.Parameter]
    calls: list[Call] = field(default_factory=list)
    # nn.MultiheadAttention run as plain self-attention: per call, its two projections
    packed: list[tuple[Call, Call]] = field(default_factory=list)
    # a projection of such a module: an affine map of calls[0].args[0]
    affine: bool = False


def _owners(model: nn.Module) -> list[Owner]:
    owners, seen = [], {}
    for name, module in model.named_modules():
        params = {n: p for n, p in module._parameters.items() if p is not None and p.requires_grad}
        for p in params.values():
            if id(p) in seen:
                raise FastPathUnsupported(f"parameter shared by modules {seen[id(p)]!r} and {name!r}")
            seen[id(p)] = name
        if params:
            owners.append(Owner(name or type(module).__name__, module, params))
    return owners


def closed_form_layers(model: nn.Module) -> bool:
    """Whether every module owning trainable parameters is of a type with a closed form; a
    look at the types only, before any trace."""
    try:
        return all(isinstance(o.module, (*CLOSED_FORM, nn.MultiheadAttention)) for o in _owners(model))
    except FastPathUnsupported:
        return False


def _record(owners: list[Owner], model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    def make_hook(owner: Owner):
        def hook(module, args, kwargs, output):
            # a tuple whose other entries are None (nn.MultiheadAttention, need_weights=False)
            if isinstance(output, tuple) and output and all(t is None for t in output[1:]):
                output = output[0]
            if not isinstance(output, torch.Tensor):
                raise FastPathUnsupported(f"module {owner.name!r} returns {type(output).__name__}")
            edge = None  # (a forward under no_grad only measures sizes)
            if torch.is_grad_enabled():
                if output.grad_fn is None:
                    raise FastPathUnsupported(f"the output of module {owner.name!r} is not differentiable")
                edge = torch.autograd.graph.get_gradient_edge(output)
            owner.calls.append(Call(args, kwargs, edge, output.shape, output.dtype, output.device))

        return hook

    handles = [o.module.register_forward_hook(make_hook(o), with_kwargs=True) for o in owners]
    attention = [o for o in owners if isinstance(o.module, nn.MultiheadAttention) and "forward" not in vars(o.module)]
    for o in attention:
        o.module.forward = _packed_forward(o)
    try:
        out = model(*batch)
    finally:
        for h in handles:
            h.remove()
        for o in attention:
            del o.module.forward
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the model must return a tensor of predictions, got {type(out).__name__}")
    return out


def _call_of(inputs: torch.Tensor, output: torch.Tensor) -> Call:
    return Call((inputs,), {}, torch.autograd.graph.get_gradient_edge(output), output.shape, output.dtype,
                output.device)


def _packed_forward(owner: Owner):
    """nn.MultiheadAttention's forward, with plain self-attention (query is key is value,
    packed projections, no masks, no attention weights returned: what TransformerEncoderLayer
    does) written out as in_proj, the attention product and out_proj, so that the backward
    reaches both projections' outputs and the projections are affine maps with closed forms.
    Anything else goes to the module's own forward."""
    m = owner.module
    own_forward = type(m).forward.__get__(m)

    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        plain = (query is key is value and query.dim() == 3 and key_padding_mask is None and attn_mask is None
                 and not need_weights and not is_causal and m._qkv_same_embed_dim and m.bias_k is None
                 and not m.add_zero_attn and (m.dropout == 0 or not m.training) and torch.is_grad_enabled())
        if not plain:
            return own_forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                               attn_mask=attn_mask, average_attn_weights=average_attn_weights, is_causal=is_causal)
        x = query if m.batch_first else query.transpose(0, 1)
        n, length, embed = x.shape
        heads = lambda t: t.reshape(n, length, m.num_heads, -1).transpose(1, 2)
        qkv = nn.functional.linear(x, m.in_proj_weight, m.in_proj_bias)
        q, k, v = qkv.chunk(3, -1)
        attended = nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v))
        attended = attended.transpose(1, 2).reshape(n, length, embed)
        out = nn.functional.linear(attended, m.out_proj.weight, m.out_proj.bias)
        owner.packed.append((_call_of(x, qkv), _call_of(attended, out)))
        return (out if m.batch_first else out.transpose(0, 1)), None

    return forward


def _split_packed(owners: list[Owner]) -> list[Owner]:
    """An attention module run once as plain self-attention becomes its two projections."""
    split = []
    for o in owners:
        if not (len(o.calls) == 1 and len(o.packed) == 1 and set(o.params) <= MHA_PARAMS):
            split.append(o)
            continue
        for prefix, call in zip(("in_proj", "out_proj"), o.packed[0]):
            params = {n: p for n, p in o.params.items() if n.startswith(prefix)}
            if params:
                split.append(Owner(f"{o.name}.{prefix}", o.module, params, [call], affine=True))
    return split


def _merge_uncalled(owners: list[Owner]) -> list[Owner]:
    """Give the parameters of a never-called module to its called parent (the parent's own
    code uses them, e.g. MultiheadAttention's out_proj), for the parent's per-module fallback."""
    by_name = {o.name: o for o in owners}
    kept = []
    for o in owners:
        if o.calls:
            kept.append(o)
            continue
        parent_name, _, child = o.name.rpartition(".")
        parent = by_name.get(parent_name)
        if parent is None or not parent.calls:
            raise FastPathUnsupported(f"the parameters of {o.name!r} are used without calling it")
        parent.params.update({f"{child}.{n}": p for n, p in o.params.items()})
    return kept


def _output_grads(h: torch.Tensor, calls: list[Call], directions: range, create_graph: bool) -> list[torch.Tensor]:
    """d h_ij / d y for every recorded output y and the output directions j in ``directions``,
    stacked over them: [len(directions), *y.shape]."""
    n, k = h.shape
    edges = [c.edge for c in calls]
    if k == 1:
        grads = torch.autograd.grad(h.sum(), edges, retain_graph=create_graph, create_graph=create_graph,
                                    allow_unused=True)
        grads = [None if g is None else g.unsqueeze(0) for g in grads]
    else:
        rows = torch.eye(k, dtype=h.dtype, device=h.device)[directions.start:directions.stop, None, :]
        rows = rows.expand(len(directions), n, k)
        try:
            if len(directions) == 1:
                grads = torch.autograd.grad(h, edges, rows[0], retain_graph=True, create_graph=create_graph,
                                            allow_unused=True)
                grads = [None if g is None else g.unsqueeze(0) for g in grads]
            else:
                grads = torch.autograd.grad(h, edges, rows, is_grads_batched=True, retain_graph=True,
                                            create_graph=create_graph, allow_unused=True)
        except RuntimeError:  # a backward op without a batching rule: one direction at a time
            per_direction = [torch.autograd.grad(h, edges, d, retain_graph=True,
                                                 create_graph=create_graph, allow_unused=True)
                             for d in rows]
            grads = [None if column[0] is None else torch.stack(column) for column in zip(*per_direction)]
    return [torch.zeros((len(directions), *c.shape), dtype=c.dtype, device=c.device) if g is None else g
            for g, c in zip(grads, calls)]


def _direction_groups(owners: list[Owner], k: int) -> list[range]:
    """The k output directions in groups, one batched backward each, so that the norms need
    about a training step's memory: a step holds the parameters' gradients, a group its output
    gradients at every recorded output plus temporaries of their size (their squares), so a
    group's gradients take at most half the parameters' size (at least one direction)."""
    per_direction = sum(c.shape.numel() for o in owners for c in o.calls)
    params = sum(p.numel() for o in owners for p in o.params.values())
    size = max(1, min(k, params // max(1, 2 * per_direction)))
    return [range(start, min(start + size, k)) for start in range(0, k, size)]


def _linear(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, memo: dict) -> torch.Tensor:
    bias = module.bias is not None and module.bias.requires_grad
    return _affine_map(a, g, module.weight.requires_grad, bias, memo)


def _affine_map(a: torch.Tensor, g: torch.Tensor, weight: bool, bias: bool, memo: dict) -> torch.Tensor:
    """sum_j ||grad of (W a + b) at output gradient g_j||^2 per sample, over positions
    (``memo``: the call's store of what other output directions reuse)."""
    k, n = g.shape[:2]
    a = a.reshape(n, -1, a.shape[-1])  # [n, T, in]
    g = g.reshape(k, n, -1, g.shape[-1])  # [k, n, T, out]
    positions = a.shape[1]
    if positions == 1:  # ||g||^2 (||a||^2 + 1)
        if weight and "input_sq_norms" not in memo:
            memo["input_sq_norms"] = a.pow(2).sum((-1, -2))
        factor = (memo["input_sq_norms"] if weight else 0) + (1 if bias else 0)
        return (g.pow(2).sum((-1, -2)) * factor).sum(0)
    total = torch.zeros(k, n, dtype=g.dtype, device=g.device)
    if weight:
        if positions * positions <= a.shape[-1] * g.shape[-1]:
            gram_a = a @ a.transpose(1, 2)  # [n, T, T]
            total = total + (gram_a * (g @ g.transpose(2, 3))).sum((-1, -2))
        else:  # long sequences: the per-sample weight gradient is smaller than the Gram matrices
            total = total + torch.einsum("knto,nti->knoi", g, a).pow(2).sum((-1, -2))
    if bias:
        total = total + g.sum(2).pow(2).sum(-1)
    return total.sum(0)


def _conv(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """A convolution is a Linear over output positions on the input patches."""
    if isinstance(module, nn.Conv1d):  # as a 2-D convolution of height 1
        a, g = a.unsqueeze(2), g.unsqueeze(3)
        kernel, stride, padding, dilation = ((1, module.kernel_size[0]), (1, module.stride[0]),
                                             (0, module.padding[0]), (1, module.dilation[0]))
    else:
        kernel, stride, padding, dilation = module.kernel_size, module.stride, module.padding, module.dilation
    count = g.shape[3] * g.shape[4]  # output positions
    width = module.in_channels * kernel[0] * kernel[1] * module.out_channels
    if count * count > width and module.in_channels >= GROUPED_MIN_IN_CHANNELS:
        return _conv_grouped(module, a, g, kernel, stride, padding, dilation)
    return _conv_patches(module, a, g, kernel, stride, padding, dilation)


# The patches of this many bytes at a time: copied out of the input and multiplied while in
# cache. As a strided view of the padded input, copied a few samples at a time, they cost about
# a third of nn.functional.unfold on CPU (3 -> 32 and 64 -> 64 channels, 32x32 and 16x16).
PATCH_CHUNK_BYTES = 4 << 20


def _conv_patches(module, a, g, kernel, stride, padding, dilation) -> torch.Tensor:
    """Per sample and output direction j, the weight gradient g_j P^T from the input patches P
    [in * kernel, positions] (or, for few positions, the Gram matrices of P and g_j)."""
    k, n, out, out_h, out_w = g.shape
    g = g.reshape(k, n, out, -1)  # [k, n, out, L]
    positions, rows = out_h * out_w, a.shape[1] * kernel[0] * kernel[1]
    total = torch.zeros(n, dtype=g.dtype, device=g.device)
    if module.bias is not None and module.bias.requires_grad:
        total = total + g.sum(-1).pow(2).sum((0, -1))
    if not module.weight.requires_grad:
        return total
    chunk = max(1, PATCH_CHUNK_BYTES // (rows * positions * a.element_size()))
    if torch.is_grad_enabled() and a.requires_grad:
        # unfold, whose backward is one fold; a strided view's scatters into zeroed patches
        pieces = a.split(chunk)  # split, not sliced: differentiated, the pieces' backward is one cat
        patches = lambda piece: nn.functional.unfold(piece, kernel, dilation, padding, stride)
    else:
        x = nn.functional.pad(a, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else a
        st = x.stride()  # any strides: the view reads the input where it lies
        pieces = x.as_strided((n, x.shape[1], *kernel, out_h, out_w), (
            st[0], st[1], dilation[0] * st[2], dilation[1] * st[3], stride[0] * st[2], stride[1] * st[3])).split(chunk)
        patches = lambda piece: piece.reshape(-1, rows, positions)  # the copy
    gram = positions * positions <= rows * out
    parts = []
    for piece, g_chunk in zip(pieces, g.split(chunk, dim=1)):
        p = patches(piece)  # [c, in * kernel, L]
        if gram:
            gram_p = p.transpose(1, 2) @ p  # [c, L, L]
            parts.append(sum((gram_p * (g_j.transpose(1, 2) @ g_j)).sum((1, 2)) for g_j in g_chunk))
        else:
            parts.append(sum(torch.bmm(g_j, p.transpose(1, 2)).pow(2).sum((1, 2)) for g_j in g_chunk))
    return total + torch.cat(parts)


# Per-sample weight gradients as one weight gradient of a convolution grouped by sample: on CPU
# (oneDNN) faster than the patches for 32 -> 64 channels (about 10 against 13 ms, batch 128 at
# 32x32), much slower for 3 input channels (11 against 4 ms).
GROUPED_MIN_IN_CHANNELS = 16


def _conv_grouped(module, a, g, kernel, stride, padding, dilation) -> torch.Tensor:
    """The samples as groups of one convolution: its weight gradient is [n * out, in, *kernel],
    the per-sample gradients stacked, for each output direction."""
    k, n, out_channels = g.shape[:3]
    x = a.reshape(1, n * a.shape[1], *a.shape[2:])
    total = torch.zeros(n, dtype=g.dtype, device=g.device)
    for g_j in g:  # one weight gradient per output direction
        if module.weight.requires_grad:
            weight = torch.nn.grad.conv2d_weight(
                x, (n * out_channels, module.in_channels, *kernel), g_j.reshape(1, n * out_channels, *g.shape[3:]),
                stride=stride, padding=padding, dilation=dilation, groups=n)
            total = total + weight.reshape(n, -1).pow(2).sum(1)
        if module.bias is not None and module.bias.requires_grad:
            total = total + g_j.sum((-1, -2)).pow(2).sum(-1)
    return total


def _norm_affine(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return _norm_affine_grads(module, a, g).pow(2).sum((0, -1))


def _norm_affine_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per-sample gradients of the affine parameters, [k, n, d] (small: d = channels)."""
    k, n = g.shape[:2]
    if isinstance(module, nn.LayerNorm):
        x_hat = nn.functional.layer_norm(a, module.normalized_shape, eps=module.eps)
        shared = tuple(range(2, g.dim() - len(module.normalized_shape)))  # positions per sample
    else:
        x_hat = nn.functional.group_norm(a, module.num_groups, eps=module.eps)
        shared = tuple(range(3, g.dim()))  # spatial positions; parameters are per channel
    over_shared = (lambda t: t.sum(shared)) if shared else (lambda t: t)  # sum(()) would sum all
    parts = []
    if module.weight is not None and module.weight.requires_grad:
        parts.append(over_shared(g * x_hat).reshape(k, n, -1))
    if module.bias is not None and module.bias.requires_grad:
        parts.append(over_shared(g).reshape(k, n, -1))
    return torch.cat(parts, -1)


def _per_module_fallback(owner: Owner, grads: list[torch.Tensor], n: int) -> torch.Tensor:
    """Per-sample gradients of this module's own parameters, summed over its calls.

    Samples must run along dim 0 of the module's output and tensor arguments.
    """
    if isinstance(owner.module, nn.MultiheadAttention) and not owner.module.batch_first or any(
        c.shape[0] != n for c in owner.calls
    ):
        raise FastPathUnsupported(f"module {owner.name!r} does not put samples first")
    params = {name: p.detach() for name, p in owner.params.items()}
    summed: dict[str, torch.Tensor] | None = None
    for call, g in zip(owner.calls, grads):
        batched = [isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == n for t in call.args]

        def sample_output(p, *args):
            full = tuple(t.unsqueeze(0) if b else t for t, b in zip(args, batched))
            out = functional_call(owner.module, p, full, call.kwargs)
            return (out[0] if isinstance(out, tuple) else out)[0]

        def sample_grads(cotangent, *args):
            return vjp(lambda p: sample_output(p, *args), params)[1](cotangent)[0]

        in_dims = (0,) + tuple(0 if b else None for b in batched)
        per_direction = vmap(vmap(sample_grads, in_dims=in_dims), in_dims=(0,) + (None,) * len(batched))
        grads_call = per_direction(g.detach(), *[t.detach() if isinstance(t, torch.Tensor) else t for t in call.args])
        summed = grads_call if summed is None else {k: summed[k] + v for k, v in grads_call.items()}
    assert summed is not None
    return sum(v.reshape(*v.shape[:2], -1).pow(2).sum(-1) for v in summed.values()).sum(0)


# The one-sample sizing per model and per-sample input signature: a probe calls with the same
# model and shapes every time, and for a small model the sizing forward is a sixth of the norms'
# time. A model changed in place behind an unchanged signature could only mis-size the chunks.
_SIZES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def fast_chunk_size(model: nn.Module, batch: tuple[torch.Tensor, ...], memory_budget: int) -> tuple[int, int]:
    """Samples per chunk so that what the fast path holds fits ``memory_budget`` bytes, and the
    outputs per sample k.

    Per sample it holds every recorded layer input and output (in the graph) and at most k
    output gradients of each (fewer when the directions go in groups): measured on a one-sample
    forward (once per model and per-sample input shapes), times (k + 2).
    """
    signature = (tuple((t.shape[1:], t.dtype, t.device) for t in batch),
                 tuple((p.shape, p.requires_grad) for p in model.parameters()))
    sizes = _SIZES.setdefault(model, {})
    if signature not in sizes:
        owners = _owners(model)
        with torch.no_grad():
            out = _record(owners, model, tuple(t[:1] for t in batch))
        sizes[signature] = (out.numel(), sum(c.shape.numel() for o in owners for c in o.calls), out.element_size())
    k, floats, itemsize = sizes[signature]
    return max(1, memory_budget // max(1, itemsize * floats * (k + 2))), k


def _trace(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> tuple[list[Owner], torch.Tensor]:
    """Forward with recording hooks: the owners with their calls, and the outputs h [n, k]
    (with their graph)."""
    owners = _owners(model)
    n = batch[0].shape[0]
    with torch.enable_grad():
        out = _record(owners, model, batch)
        if out.dim() == 0 or out.shape[0] != n:
            raise ValueError(f"the model output has shape {tuple(out.shape)}; expected a leading "
                             f"sample dimension of size {n}")
        h = out.reshape(n, -1)
    return _split_packed(_merge_uncalled(owners)), h


def _grads_by_owner(owners: list[Owner], h: torch.Tensor, directions: range,
                    create_graph: bool) -> dict[int, list[torch.Tensor]]:
    """The output gradients of every recorded call, per owner (by id), for ``directions``."""
    records = [(o, c) for o in owners for c in o.calls]
    with torch.enable_grad():
        grads = _output_grads(h, [c for _, c in records], directions, create_graph)
    by_owner: dict[int, list[torch.Tensor]] = {}
    for (o, _), g in zip(records, grads):
        by_owner.setdefault(id(o), []).append(g)
    return by_owner


def _closed_form(o: Owner) -> bool:
    if o.affine:
        return True
    own = {n for n, p in o.module._parameters.items() if p is not None and p.requires_grad}
    m = o.module
    if isinstance(m, (nn.Conv1d, nn.Conv2d)) and (
        m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str)
    ):
        return False
    return (isinstance(m, CLOSED_FORM) and len(o.calls) == 1 and not o.calls[0].kwargs
            and len(o.calls[0].args) == 1 and set(o.params) == own)


def _owner_part(o: Owner, grads: list[torch.Tensor], n: int) -> torch.Tensor:
    """This module's part of every sample's squared norm, from its output gradients (one
    [c, *y.shape] per call, over c output directions)."""
    if o.affine:
        weight, bias = (any(name.endswith(end) for name in o.params) for end in ("weight", "bias"))
        return _affine_map(o.calls[0].args[0], grads[0], weight, bias, o.calls[0].memo)
    if _closed_form(o):
        if isinstance(o.module, nn.Linear):
            return _linear(o.module, o.calls[0].args[0], grads[0], o.calls[0].memo)
        norm = _conv if isinstance(o.module, (nn.Conv1d, nn.Conv2d)) else _norm_affine
        return norm(o.module, o.calls[0].args[0], grads[0])
    with sdpa_kernel(SDPBackend.MATH):  # vmapped: the fused attention kernels have no batching rule
        return _per_module_fallback(o, grads, n)


def _held_part(owners: list[Owner], h: torch.Tensor, directions: range, create_graph: bool) -> torch.Tensor:
    """The modules' parts for ``directions`` from one (batched) backward that returns every
    module's output gradients together."""
    by_owner = _grads_by_owner(owners, h, directions, create_graph)
    total = 0
    # closed forms first: their gradients are freed before the per-module fallbacks, which need
    # working memory of their own
    for o in sorted(owners, key=lambda o: not _closed_form(o)):
        total = total + _owner_part(o, by_owner.pop(id(o)), h.shape[0])
    return total


def _streamed_part(owners: list[Owner], h: torch.Tensor, j: int, retain_graph: bool) -> torch.Tensor | None:
    """The modules' parts for output direction j from one plain backward that never holds all
    output gradients at once: a hook on each closed-form module's output node (attention's
    projections included) takes its part as the backward passes through. Modules whose inputs
    need no gradient (the backward ends there) and per-module fallbacks get their gradients as
    the backward's results instead.

    None when a hooked node was not reached (a module whose output reaches h only through
    parameters used outside any module, or inputs that require grad): the caller then takes
    :func:`_held_part` on a fresh trace.
    """
    n, k = h.shape
    parts, reached, handles, ended = [], set(), [], []
    for o in owners:
        call = o.calls[0]
        needs_grad = any(isinstance(t, torch.Tensor) and t.requires_grad for t in call.args)
        if not _closed_form(o) or not needs_grad:
            ended.append(o)
            continue

        def hook(grad_outputs, o=o, call=call):
            g = grad_outputs[call.edge.output_nr]
            if g is not None:
                parts.append(_owner_part(o, [g.unsqueeze(0)], n))
            reached.add(id(o))

        handles.append(call.edge.node.register_prehook(hook))
    edges = [c.edge for o in ended for c in o.calls]
    if not edges:
        for handle in handles:
            handle.remove()
        return None
    try:
        with torch.enable_grad():
            seed = h.sum() if k == 1 else h[:, j].sum()
            grads = torch.autograd.grad(seed, edges, retain_graph=retain_graph, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    if len(reached) + len(ended) < len(owners):
        return None
    start = 0
    for o in ended:
        mine = grads[start:start + len(o.calls)]
        start += len(o.calls)
        if any(g is not None for g in mine):
            mine = [torch.zeros(c.shape, dtype=c.dtype, device=c.device) if g is None else g
                    for g, c in zip(mine, o.calls)]
            parts.append(_owner_part(o, [g.unsqueeze(0) for g in mine], n))
    return sum(parts, torch.zeros(n, dtype=h.dtype, device=h.device))


def fast_sq_norms(
    model: nn.Module, batch: tuple[torch.Tensor, ...], *, create_graph: bool = False, stream: bool = True
) -> tuple[torch.Tensor, list[str]]:
    """Per-sample ||J_i||_F^2 (model already in eval mode) and the modules that fell back.

    One output direction at a time (always for scalar outputs) the parts are taken as the
    backward passes each module (:func:`_streamed_part`: less memory, and faster); several
    at a time, or with ``create_graph``, from all output gradients held together. With
    ``create_graph`` the result is differentiable w.r.t. the parameters (double backward gives
    grad reg); it then refuses per-module fallbacks, whose vmapped vjps are not.

    Raises:
        FastPathUnsupported: the model needs the whole-model torch.func path.
    """
    owners, h = _trace(model, batch)
    n, k = h.shape
    if create_graph and not all(_closed_form(o) for o in owners):
        raise FastPathUnsupported("a module needs a per-module fallback, which has no double backward")
    total = torch.zeros(n, dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    for directions in _direction_groups(owners, k):
        part = None
        with torch.set_grad_enabled(create_graph):  # the parts' own graph only for double backward
            if stream and len(directions) == 1 and not create_graph:
                part = _streamed_part(owners, h, directions.start, retain_graph=directions.stop < k)
                if part is None:  # (its graph may be gone)
                    return fast_sq_norms(model, batch, stream=False)
            if part is None:
                part = _held_part(owners, h, directions, create_graph)
        total = total + part
    fell_back = [o.name for o in owners if not _closed_form(o)]
    return total, fell_back


def fast_gram(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """K = J J^T ([n k, n k], rows sample-major) without forming J.

    Linear layers on 2-D inputs contribute (a_i . a_i')(g_ij . g_i'j') (+ g_ij . g_i'j' for the
    bias); LayerNorm/GroupNorm affine parameters their small per-sample gradients' Gram.

    Raises:
        FastPathUnsupported: any other module, sequence inputs, or a reused module.
    """
    owners, h = _trace(model, batch)
    n, k = h.shape
    by_owner = _grads_by_owner(owners, h, range(k), create_graph=False)
    K = None
    for o in owners:
        if not _closed_form(o) or o.affine or isinstance(o.module, (nn.Conv1d, nn.Conv2d)):
            raise FastPathUnsupported(f"no closed-form Gram for module {o.name!r}")
        a, g = o.calls[0].args[0], by_owner[id(o)][0]
        if isinstance(o.module, nn.Linear):
            if a.dim() != 2:
                raise FastPathUnsupported(f"no closed-form Gram for {o.name!r} on sequence inputs")
            G = g.permute(1, 0, *range(2, g.dim())).reshape(n * k, -1)  # rows (i, j)
            GG = G @ G.T
            part = torch.zeros_like(GG)
            if o.module.weight.requires_grad:
                part = part + (a @ a.T).repeat_interleave(k, 0).repeat_interleave(k, 1) * GG
            if o.module.bias is not None and o.module.bias.requires_grad:
                part = part + GG
        else:
            vectors = _norm_affine_grads(o.module, a, g)  # [k, n, d]
            V = vectors.permute(1, 0, 2).reshape(n * k, -1)
            part = V @ V.T
        K = part if K is None else K + part
    assert K is not None
    return K.detach()
