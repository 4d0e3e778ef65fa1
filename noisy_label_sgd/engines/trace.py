"""The fast engine's recording forward: which modules own parameters, and what each was called with.

Outputs are recorded by their gradient edges (:class:`Call`), which in-place ops after the
module (``ReLU(inplace=True)``, a residual ``+=``) leave pointing at the module's own output.
``nn.MultiheadAttention`` run as plain self-attention is traced with its forward written out
(:func:`packed_attention_forward`), so its in_proj and out_proj become two affine maps whose
output gradients the model's own backward reaches.

Whole-model refusals (:class:`FastPathUnsupported`): a parameter owned by two modules, a module
with parameters that is never called (its weight used by a parent's functional code), or a
module returning a non-tensor.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .functional import Batch, per_sample_outputs

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
    # set by closed_forms.bind after the trace: this owner's part of the squared norms from its
    # output gradients, and of K = J J^T (None: no closed form)
    closed_form: Callable[[torch.Tensor], torch.Tensor] | None = None
    gram: Callable[[torch.Tensor], torch.Tensor] | None = None


def owners_of(model: nn.Module) -> list[Owner]:
    """The modules owning trainable parameters, in module order (no calls recorded yet)."""
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


def record(owners: list[Owner], model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's forward with a hook on every owner that records its calls."""

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
        o.module.forward = packed_attention_forward(o)
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


def packed_attention_forward(owner: Owner):
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


def trace(model: nn.Module, batch: Batch) -> tuple[list[Owner], torch.Tensor]:
    """Forward with recording hooks: the owners with their calls, and the outputs h [n, k]
    (with their graph)."""
    owners = owners_of(model)
    with torch.enable_grad():
        h = per_sample_outputs(record(owners, model, batch), batch)
    return _split_packed(_merge_uncalled(owners)), h


# The one-sample sizing per model and per-sample input signature: a probe calls with the same
# model and shapes every time, and for a small model the sizing forward is a sixth of the norms'
# time. A model changed in place behind an unchanged signature could only mis-size the chunks.
_SIZES: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def fast_chunk_size(model: nn.Module, batch: Batch, memory_budget: int) -> tuple[int, int]:
    """Samples per chunk so that what the fast path holds fits ``memory_budget`` bytes, and the
    outputs per sample k.

    Per sample it holds every recorded layer input and output (in the graph) and at most k
    output gradients of each (fewer when the directions go in groups): measured on a one-sample
    forward (once per model and per-sample input shapes), times (k + 2). That forward also
    watches where parameters are used (:class:`ParameterUses`).

    Raises:
        FastPathUnsupported: a called module's parameter is also used outside its call.
    """
    signature = (tuple((t.shape[1:], t.dtype, t.device) for t in batch),
                 tuple((p.shape, p.requires_grad) for p in model.parameters()))
    sizes = _SIZES.setdefault(model, {})
    if signature not in sizes:
        owners = owners_of(model)
        with torch.no_grad(), ParameterUses(model, owners) as uses:
            out = record(owners, model, tuple(t[:1] for t in batch))
        outside = sorted(name for name in uses.outside if any(o.name == name and o.calls for o in owners))
        sizes[signature] = (out.numel(), sum(c.shape.numel() for o in owners for c in o.calls), out.element_size(),
                            outside)
    k, floats, itemsize, outside = sizes[signature]
    if outside:
        raise FastPathUnsupported(
            f"the parameters of {outside[0]!r} are also used outside its call (e.g. a parent's forward "
            "reading its weight): the closed forms would miss that use"
        )
    return max(1, memory_budget // max(1, itemsize * floats * (k + 2))), k


class ParameterUses(TorchFunctionMode):
    """Which owners' trainable parameters a forward uses while that owner is not running.

    A module's closed form sees only what flows through its own call; a parameter that also
    enters the output elsewhere (a parent's ``z @ self.emb.weight`` after ``self.emb(x)``) would
    make every norm silently wrong. Watched once per model and input signature, on the sizing
    forward.
    """

    def __init__(self, model: nn.Module, owners: list[Owner]) -> None:
        super().__init__()
        self.owner_of = {id(p): o.name for o in owners for p in o.params.values()}
        self.name_of = {id(o.module): o.name for o in owners}
        self.running: list[str] = []
        self.outside: set[str] = set()
        self.modules = list(model.modules())

    def __enter__(self):
        ids = {id(m) for m in self.modules}

        def enter(module, args) -> None:
            if id(module) in ids:
                self.running.append(self.name_of.get(id(module), ""))

        def leave(module, args, output) -> None:  # (returns None: the output stays as it is)
            if id(module) in ids:
                self.running.pop()

        self._handles = [nn.modules.module.register_module_forward_pre_hook(enter),
                         nn.modules.module.register_module_forward_hook(leave, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        return super().__exit__(*exc)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        # metadata (.shape, .size(), .dtype) does not enter the output: only a tensor result can
        if isinstance(result, torch.Tensor) or (isinstance(result, (list, tuple)) and any(
                isinstance(r, torch.Tensor) for r in result)):
            for t in (*args, *kwargs.values()):
                for tensor in (t if isinstance(t, (list, tuple)) else (t,)):
                    name = self.owner_of.get(id(tensor))
                    if name is not None and name not in self.running:
                        self.outside.add(name)
        return result
