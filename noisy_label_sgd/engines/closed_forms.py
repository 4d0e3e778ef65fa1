r"""Per-layer closed forms of the per-sample squared gradient norms, and of the Gram matrix.

The fast engine (:mod:`~noisy_label_sgd.engines.fast`) hands each module that owns trainable
parameters its recorded input ``a`` and the output gradients ``g`` = [c, *output.shape] for c
output directions; a closed form turns them into that module's part of every sample's
:math:`\|J_i\|_F^2`, summed over the c directions, without a per-sample gradient of the model:

* ``nn.Linear`` (and Hugging Face's ``Conv1D``, its weight transposed), :math:`y_t = W a_t + b`
  over positions t (none for 2-D inputs):
  :math:`\|\nabla_W h_{ij}\|^2 = \sum_{t,s} (a_{it}\cdot a_{is})(g_{ijt}\cdot g_{ijs})` (for one
  position :math:`\|g_{ij}\|^2\|a_i\|^2`), :math:`\|\nabla_b h_{ij}\|^2 = \|\sum_t g_{ijt}\|^2`;
  the projections of ``nn.MultiheadAttention`` and the maps of ``nn.RNN`` / ``nn.LSTM`` /
  ``nn.GRU`` (traced as affine maps; a recurrent map's time steps are its positions) take the
  same formula;
* ``nn.Conv1d`` / ``nn.Conv2d`` (zero padding): a Linear over output positions applied to the
  input patches (a few samples at a time); with many positions and at least 16 input channels,
  and for grouped and depthwise convolutions, the per-sample weight gradients instead as the
  weight gradient of one convolution grouped by sample (the batch folded into channels);
* ``nn.LayerNorm`` / ``nn.GroupNorm`` affine parameters, and BatchNorm's in eval mode (its
  running statistics: an affine map per channel): :math:`\nabla_\gamma = \sum g\,\hat{x}`,
  :math:`\nabla_\beta = \sum g` over the positions that share a parameter;
* ``nn.RMSNorm`` and Llama's RMSNorm: :math:`\nabla_w = \sum g\,\hat{x}` over positions;
* ``nn.Embedding`` (no ``scale_grad_by_freq``; a ``max_norm`` renormalises as a constant inside a
  measurement, :mod:`~noisy_label_sgd.engines.untouched`): :math:`\|\nabla_W h_{ij}\|^2 =
  \sum_{t,s:\ x_{it} = x_{is}} g_{ijt}\cdot g_{ijs}` over positions whose index is not the
  padding index.

To add a layer: write ``sq_norms(module, a, g, trainable, memo) -> [n]`` (``trainable``: the
names of the module's own trainable parameters; ``memo``: a dict shared by the output
directions of one call and by every call on the same input tensor (Llama's q, k and v
projections share their input's Gram matrix), so key what you store by what it depends on
besides the input) and register it in this file, with a Gram closed form if there is one::

    @register_closed_form(MyLayer, contract=my_layer_contract, gram=my_layer_gram,
                          applies=lambda m: m.mode == "plain")
    def my_layer_sq_norms(module, a, g, trainable, memo): ...

``contract(module, a, g, trainable)`` gives, for one output gradient ``g`` shaped like the
output, the parameters' gradient summed over samples that the formula's per-sample gradients
imply: the fast engine's certificate (:mod:`~noisy_label_sgd.engines.certificate`) holds it
against autograd's gradient through the same forward on every measurement, and a module whose
formula disagrees falls back (a subclass or an instance that overrides ``forward`` never gets
its base class's formula).

Nothing else changes: the fast engine finds every registered type (subclasses that keep its
``forward`` included), and the
model tests compare every closed form with a per-sample autograd loop. A module of another type
falls back, for that module only, to torch.func per-sample gradients of its own parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial, reduce
from typing import Callable

import torch
from torch import nn

from . import functional
from .backward import kernels_apply
from .convolution import weight_gradient
from .elementwise import elementwise_sq_norms
from .functional import cat_or_one
from .gram import gram, gram_inner, row_gram, squared_norms
from .group_norm import per_sample_affine_sq_norms
from .recurrent import is_stock_recurrent
from .shared import SharedUse
from .trace import Call, FastPathUnsupported, Owner, input_over_calls, owners_of, recorded_input


@dataclass(frozen=True)
class ClosedForm:
    sq_norms: Callable[..., torch.Tensor]  # (module, a, g, trainable, memo) -> [n]
    # (module, a, g, trainable) -> name -> gradient: the sum over samples of the per-sample
    # gradients the formula assumes, for one output gradient g [*y] (what the certificate
    # holds against autograd: :mod:`~noisy_label_sgd.engines.certificate`)
    contract: Callable[..., dict[str, torch.Tensor]]
    gram: Callable[..., torch.Tensor] | None  # (module, a, g, trainable) -> [n k, n k], in g's dtype
    applies: Callable[[nn.Module], bool]  # whether this instance is in the formula's scope
    # the formula treats every leading dim of input and output alike (positions), so the samples
    # may run along any of them (moved first for it): Linear, LayerNorm
    samples_anywhere: bool = False
    # sq_norms also takes one direction's output gradient bare, [*y] instead of [1, *y]: the
    # streamed backward hands them so (an unsqueeze is an operation, paid per layer in host time)
    bare: bool = False


# by class, or by the qualified name of a class from a library that is not imported here
# (``"transformers.pytorch_utils.Conv1D"``)
CLOSED_FORMS: dict[type[nn.Module] | str, ClosedForm] = {}


def register_closed_form(*types: type[nn.Module] | str, contract=None, gram=None, applies=None,
                         samples_anywhere=False, bare=False):
    """Register ``sq_norms`` (the decorated function) as the closed form of ``types`` (classes,
    or qualified class names ``"module.Class"`` of optional libraries), with ``contract``: the
    gradient of the module's parameters, summed over samples, that the formula's per-sample
    gradients imply for one output gradient (``contract(module, a, g, trainable) -> {name:
    tensor}``), which the fast engine checks against autograd on every measurement.

    Raises:
        TypeError: no ``contract`` (a formula that could not be checked would be trusted blindly).
    """
    if contract is None:
        raise TypeError("register_closed_form needs contract=: the parameters' gradient summed over samples "
                        "that the formula's per-sample gradients imply, contract(module, a, g, trainable) -> "
                        "{name: tensor}; the fast engine checks it against autograd on every measurement")

    def register(sq_norms):
        for t in types:
            CLOSED_FORMS[t] = ClosedForm(sq_norms, contract, gram, applies or (lambda module: True),
                                         samples_anywhere, bare)
        return sq_norms

    return register


def _registered(cls: type) -> ClosedForm | None:
    return CLOSED_FORMS.get(cls) or CLOSED_FORMS.get(f"{cls.__module__}.{cls.__qualname__}")


def closed_form_of(module: nn.Module) -> ClosedForm | None:
    """The registered closed form of the module's type or its nearest registered base class,
    where the module computes what that class computes: a subclass that overrides ``forward``
    (weight standardisation, padding in ``forward``, an activation inside a norm module) or an
    instance with its own ``forward`` has none (its per-module fallback differentiates what it
    does)."""
    if "forward" in vars(module):
        return None
    for cls in type(module).__mro__:
        form = _registered(cls)
        if form is not None:
            return form if form.applies(module) and type(module).forward is cls.forward else None
    return None


def covered(owners: list[Owner], parameter_roots: frozenset[str] = frozenset()) -> bool:
    """Whether every owner of a sizing forward (:func:`~noisy_label_sgd.engines.trace.one_sample_layout`)
    has a closed form: its class's, or its operations' (none of them falls back; a function of a
    parameter alone, one of ``parameter_roots``: followed to where it meets the samples)."""
    return all(o.affine or isinstance(o.module, nn.MultiheadAttention) or is_stock_recurrent(o.module)
               or closed_form_of(o.module) is not None
               or operation_owners(o, sizing=True, parameter_roots=parameter_roots) is not None for o in owners)


def closed_form_layers(model: nn.Module) -> bool:
    """Whether every module owning trainable parameters is of a registered type (or
    ``nn.MultiheadAttention`` or a recurrent layer, traced as affine maps); a look at the types
    only."""
    try:
        owners = owners_of(model)
    except FastPathUnsupported:
        return False
    return all(isinstance(o.module, nn.MultiheadAttention) or is_stock_recurrent(o.module)
               or any(_registered(c) is not None for c in type(o.module).__mro__) for o in owners)


def bind(owners: list[Owner]) -> None:
    """Set each traced owner's ``closed_form`` and ``gram`` (None where it has none): a
    registered type in the formula's scope, called once on one positional input, every own
    trainable parameter its own; attention's projections as affine maps. Calls on the same
    input tensor share one memo."""
    memos: dict[tuple[int, int], dict] = {}  # (id of the input, its sample dim) -> memo
    memo_of = lambda call, d=0: memos.setdefault((id(call.args[0]), d), call.memo)
    for i in reversed(range(len(owners))):  # (an owner may become several: its operations)
        made = operation_owners(owners[i])
        if made is not None:
            owners[i:i + 1] = made
    for o in owners:
        call = o.calls[0]
        if o.shared is not None:  # (an output all samples share: its meetings' per-sample gradients)
            o.closed_form, o.contract = o.shared.sq_norms, o.shared.contract
            continue
        if o.elementwise is not None:
            use, other, d = o.elementwise, call.args[0], call.sample_dim
            o.closed_form = partial(elementwise_sq_norms, use, other, d)
            o.bare = True
            name = next(iter(o.params))
            # (no one-sample check: its norm is that of the very per-sample gradients its contract sums)
            o.contract = lambda grads, use=use, other=other, d=d, name=name: {
                name: use.per_sample(other, grads[0].unsqueeze(0), d).sum((0, 1))}
            continue
        if o.affine:  # (applied at several time steps: the steps are positions)
            weight, bias = (next((name for name in o.params if kind in name), None) for kind in ("weight", "bias"))
            a = input_over_calls(o)
            o.closed_form = partial(affine_map_sq_norms, a, weight=weight is not None, bias=bias is not None,
                                    memo=memo_of(call) if len(o.calls) == 1 else call.memo)
            o.bare = len(o.calls) == 1
            o.contract = lambda grads, a=a, w=weight, b=bias: affine_map_contract(a, _stacked(grads), w, b)
            o.one_sample = partial(_affine_one_sample, a, weight, bias)
            continue
        own = {n for n, p in o.module._parameters.items() if p is not None and p.requires_grad}
        form = o.form or closed_form_of(o.module)
        if form is None or len(o.calls) != 1 or call.kwargs or len(call.args) != 1 or set(o.params) != own:
            if any(c.rows > 1 for c in o.calls):
                raise _rows_unread(o)
            continue
        trainable = frozenset(o.params)
        a, d = call.args[0], call.sample_dim
        if call.rows > 1:  # (its output recorded unflattened, [.., n, m, ..]: the input alike)
            if not form.samples_anywhere:
                raise _rows_unread(o)
            try:
                a = recorded_input(call)
            except FastPathUnsupported:
                raise _rows_unread(o) from None
        if d == 0:
            o.closed_form = partial(form.sq_norms, o.module, a, trainable=trainable, memo=memo_of(call))
            o.bare = form.bare
            if form.gram is not None:
                o.gram = partial(form.gram, o.module, a, trainable=trainable)
        elif form.samples_anywhere and isinstance(a, torch.Tensor) and a.dim() == len(call.shape):
            # samples first for the formula: the input's dims lead as the output's do
            o.closed_form = partial(samples_moved_first, form.sq_norms, o.module, a.movedim(d, 0), d,
                                    trainable=trainable, memo=memo_of(call, d))
        if o.closed_form is not None:
            o.contract = lambda grads, form=form, o=o, a=a, t=trainable: form.contract(o.module, a, grads[0], t)
            o.one_sample = partial(_one_sample, form, o.module, a, d, trainable)


def _rows_unread(o: Owner) -> FastPathUnsupported:
    return FastPathUnsupported(f"module {o.name!r} holds several rows per sample in one dim of its output, which "
                               "only a closed form over positions (Linear, LayerNorm, ...) reads apart")


def operation_owners(o: Owner, sizing: bool = False, parameter_roots: frozenset[str] = frozenset()
                     ) -> list[Owner] | None:
    """The owners made of the operations a module without a closed form of its own applied to
    its parameters (:mod:`~noisy_label_sgd.engines.ops`), where each has one: a ``F.linear`` as
    an affine map, a stock layer's operation with the module's own arguments (a subclass that
    pads, permutes or activates around it) by that layer's closed form, a bare parameter's
    elementwise use written out. None where one has none (the module falls back whole).
    (``sizing``: of a forward without gradients, which records no edges, nor where a function
    of a parameter meets the samples: those of ``parameter_roots`` will.)"""
    if o.affine or o.original is not None or len(o.calls) != 1 or not o.calls[0].ops:
        return None
    taken = {id(p) for op in o.calls[0].ops for p in op.params.values()}
    if taken != {id(p) for p in o.params.values()}:  # (a never-called child's parameters, merged in, not among them)
        return None
    name_of = {id(p): name for name, p in o.params.items()}
    made = []
    for op in o.calls[0].ops:
        name = o.name if len(o.calls[0].ops) == 1 else f"{o.name}.{name_of[id(next(iter(op.params.values())))]}"
        if op.kind == "shared":  # (a parameter-only function's result, reached where it meets the samples)
            if not op.meetings if not sizing else op.root not in parameter_roots:
                return None
            (key, weight), = ((name_of[id(p)], p) for p in op.params.values())
            calls = [Call((m.operand,), {}, m.edge, m.shape, m.operand.dtype, m.operand.device, sample_dim=m.sample_dim)
                     for m in op.meetings]
            replay = None if op.replay is None else lambda p, replay=op.replay, key=key: replay(p[key])
            made.append(Owner(name, o.module, {key: weight}, calls, original=o, shared=SharedUse(
                {key: weight}, [m.operand for m in op.meetings], [m.sample_dim for m in op.meetings], op.output, replay)))
            continue
        if op.sample_dim is None or op.edge is None and not sizing:
            return None
        params, form = dict(op.params), None
        if op.elementwise is not None:
            if op.elementwise.view_shape[op.sample_dim] != 1 or op.rows > 1:  # (shared by the samples, or not per-sample)
                return None
            params = {name: p for name, p in o.params.items() if p is op.elementwise.param}
        elif op.kind == "linear":
            if op.sample_dim != 0 or "weight" not in op.params:  # (an affine map's input: samples first)
                return None
        else:
            form = _stock_form(o.module, op.kind, op.arguments)
            if form is None or any(getattr(o.module, slot, None) is not p for slot, p in op.params.items()):
                return None
            if op.rows > 1 and not form.samples_anywhere:  # (rows per sample: only a form over positions)
                return None
        call = Call((op.input,), {}, op.edge, op.shape, op.dtype, op.device, sample_dim=op.sample_dim, rows=op.rows,
                    ops=[op])
        made.append(Owner(name, o.module, params, [call], affine=op.kind == "linear", original=o, form=form,
                          elementwise=op.elementwise))
    return made


def _stock_form(module: nn.Module, kind: str, arguments: dict) -> ClosedForm | None:
    """The closed form of the stock layer whose operation ``kind`` the module applied, where the
    module is one and the operation's arguments are its own (its formula reads them off it)."""
    same = lambda name, value, default=None: arguments.get(name, default) == value
    pair = lambda v, d: tuple(v) if isinstance(v, (tuple, list)) else (v,) * d
    if kind in ("conv1d", "conv2d"):
        d = 1 if kind == "conv1d" else 2
        if not isinstance(module, nn.Conv1d if d == 1 else nn.Conv2d) or isinstance(arguments.get("padding"), str):
            return None
        if (pair(arguments.get("stride", 1), d), pair(arguments.get("padding", 0), d), pair(arguments.get("dilation", 1), d),
                arguments.get("groups", 1)) != (module.stride, module.padding, module.dilation, module.groups):
            return None
        form = CLOSED_FORMS[nn.Conv1d if d == 1 else nn.Conv2d]
    elif kind == "layer_norm" and isinstance(module, nn.LayerNorm):
        if tuple(arguments.get("normalized_shape", ())) != module.normalized_shape or not same("eps", module.eps, 1e-5):
            return None
        form = CLOSED_FORMS[nn.LayerNorm]
    elif kind == "group_norm" and isinstance(module, nn.GroupNorm):
        if not same("num_groups", module.num_groups) or not same("eps", module.eps, 1e-5):
            return None
        form = CLOSED_FORMS[nn.GroupNorm]
    elif kind == "batch_norm" and isinstance(module, nn.modules.batchnorm._BatchNorm):
        if (arguments.get("running_mean") is not module.running_mean or arguments.get("running_var") is not
                module.running_var or arguments.get("training", False) or not same("eps", module.eps, 1e-5)):
            return None
        form = CLOSED_FORMS[nn.BatchNorm2d]
    elif kind == "rms_norm" and isinstance(module, nn.RMSNorm):
        if tuple(arguments.get("normalized_shape", ())) != module.normalized_shape or arguments.get("eps") != module.eps:
            return None
        form = CLOSED_FORMS["torch.nn.modules.normalization.RMSNorm"]
    elif kind == "embedding" and isinstance(module, nn.Embedding):
        if not (same("padding_idx", module.padding_idx) and not arguments.get("scale_grad_by_freq", False)):
            return None
        form = CLOSED_FORMS[nn.Embedding]
    else:
        return None
    return form if form.applies(module) else None


def _stacked(grads: list[torch.Tensor]) -> torch.Tensor:
    """One output gradient per call, bare, stacked as positions after the samples (as
    :func:`~noisy_label_sgd.engines.trace.input_over_calls` stacks the inputs)."""
    return grads[0] if len(grads) == 1 else torch.stack(grads, 1)


def _one_sample(form: ClosedForm, module, a, d, trainable, grads, i) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample i's squared norm by the formula, and that of its own per-sample gradient."""
    a_i, g_i = a.narrow(d, i, 1), grads[0].narrow(d, i, 1)
    formula = form.sq_norms(module, a_i.movedim(d, 0), g_i.movedim(d, 0).unsqueeze(0), trainable, {})
    return formula.sum(), sum(v.double().pow(2).sum() for v in form.contract(module, a_i, g_i, trainable).values())


def _affine_one_sample(a, weight, bias, grads, i) -> tuple[torch.Tensor, torch.Tensor]:
    a_i, g_i = a[i:i + 1], _stacked(grads)[i:i + 1]
    formula = affine_map_sq_norms(a_i, g_i.unsqueeze(0), weight is not None, bias is not None, {})
    return formula.sum(), sum(v.double().pow(2).sum() for v in affine_map_contract(a_i, g_i, weight, bias).values())


def samples_moved_first(sq_norms, module, a, d, g, trainable, memo) -> torch.Tensor:
    """A closed form on output gradients g [c, *y.shape] whose samples run along dim d of y."""
    return sq_norms(module, a, g.movedim(d + 1, 1), trainable, memo)


# -- Linear and affine maps ------------------------------------------------------------------


def ghost_is_cheaper(positions: int, inputs: int, outputs: int) -> bool:
    """Whether a weight's per-sample squared norms cost fewer FLOPs from the Gram matrices of its
    inputs and output gradients over T positions (the ghost norm: 2 T^2 (in + out) per sample)
    than from its per-sample gradients (2 T in out). Differentiated once more (grad reg), the
    Gram products' backward costs their forward again, the per-sample gradient's twice (one
    product for each factor): 4 T^2 (in + out) against 6 T in out."""
    if torch.is_grad_enabled():
        return 2 * positions * (inputs + outputs) <= 3 * inputs * outputs
    return positions * (inputs + outputs) <= inputs * outputs


def linear_gram(module: nn.Linear, a: torch.Tensor, g: torch.Tensor, trainable) -> torch.Tensor:
    """(a_i . a_i')(g_ij . g_i'j') for the weight, g_ij . g_i'j' for the bias (2-D inputs)."""
    if a.dim() != 2:
        raise FastPathUnsupported("no closed-form Gram for a Linear on sequence inputs")
    k, n = g.shape[:2]
    a = a.to(g.dtype)  # (the caller's precision for K)
    G = g.permute(1, 0, *range(2, g.dim())).reshape(n * k, -1)  # rows (i, j)
    GG = row_gram(G)
    parts = []
    if "weight" in trainable:
        aa = row_gram(a)
        parts.append((aa if k == 1 else aa.repeat_interleave(k, 0).repeat_interleave(k, 1)) * GG)
    if "bias" in trainable:
        parts.append(GG)
    return sum(parts[1:], parts[0]) if parts else torch.zeros_like(GG)


def affine_map_contract(a: torch.Tensor, g: torch.Tensor, weight: str | None, bias: str | None,
                        transposed: bool = False) -> dict[str, torch.Tensor]:
    """W a + b over all leading dims (samples and positions): sum g^T a and sum g (``transposed``:
    the weight stored [in, out], Hugging Face's Conv1D)."""
    a2, g2 = a.reshape(-1, a.shape[-1]).to(g.dtype), g.reshape(-1, g.shape[-1])
    out = {}
    if weight is not None:
        out[weight] = a2.T @ g2 if transposed else g2.T @ a2
    if bias is not None:
        out[bias] = g2.sum(0)
    return out


def linear_contract(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable) -> dict[str, torch.Tensor]:
    return affine_map_contract(a, g, "weight" if "weight" in trainable else None,
                               "bias" if "bias" in trainable else None, transposed=not isinstance(module, nn.Linear))


# Hugging Face's Conv1D (GPT-2) is a Linear with its weight stored transposed: the same norms
@register_closed_form(nn.Linear, "transformers.pytorch_utils.Conv1D", contract=linear_contract, gram=linear_gram,
                      samples_anywhere=True, bare=True)
def linear_sq_norms(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable, memo: dict) -> torch.Tensor:
    return affine_map_sq_norms(a, g, "weight" in trainable, "bias" in trainable, memo)


def affine_map_sq_norms(a: torch.Tensor, g: torch.Tensor, weight: bool, bias: bool, memo: dict) -> torch.Tensor:
    """sum_j ||grad of (W a + b) at output gradient g_j||^2 per sample, over positions
    (``memo``: what other output directions, and other maps of the same input, reuse). Batched products by
    ``torch.bmm`` on 3-D views: ``@`` on them dispatches expands and reshapes around its bmm,
    operations a GPU pays for in host time. One direction may come bare ([*y], as a's dims)."""
    k, n = (1, g.shape[0]) if g.dim() == a.dim() else g.shape[:2]
    if a.dim() == 2:  # one position: ||g||^2 (||a||^2 + 1), summed over the directions
        sq = squared_norms(g, -1 if g.dim() == 2 else (0, -1))  # [n]
        if not weight:
            return sq
        key = ("input_factor", bias)  # (memo: shared by the directions and the calls on this input)
        if key not in memo:
            memo[key] = squared_norms(a, -1) + 1 if bias else squared_norms(a, -1)
        return sq * memo[key]
    if a.dim() != 3:  # (a reshape to the same shape is still an operation)
        a = a.reshape(n, -1, a.shape[-1])  # [n, T, in]
    g = g.reshape(k * n, -1, g.shape[-1])  # [k n, T, out]
    positions = a.shape[1]
    parts = []
    if weight:
        if ghost_is_cheaper(positions, a.shape[-1], g.shape[-1]):
            key = ("input_gram", bias)
            if key not in memo:
                gram_a = memo.get(("input_gram", False))
                if gram_a is None:
                    gram_a = memo[("input_gram", False)] = gram(a, symmetric_seed=True)  # [n, T, T]
                # the bias's part, ||sum_t g_t||^2 = sum_ts g_t . g_s, in the same product:
                # (a_t . a_s + 1)(g_t . g_s)
                memo[key] = gram_a + 1 if bias else gram_a
            gram_g = gram(g, symmetric_seed=True)  # [k n, T, T]
            if k > 1:  # summed over the directions first: one product with the input's Gram
                gram_g = gram_g.view(k, n, positions, positions).sum(0)
            return gram_inner(memo[key], gram_g)
        else:  # long sequences: the per-sample weight gradient costs less than the Gram matrices
            g4 = g.view(k, n, positions, -1)
            parts.append(squared_norms(torch.einsum("knto,nti->knoi", g4, a.to(g.dtype)), (0, -1, -2)))
    if bias:
        bias_sq = squared_norms(g.sum(1), -1)  # [k n]
        parts.append(bias_sq if k == 1 else bias_sq.view(k, n).sum(0))
    return parts[0] if len(parts) == 1 else parts[0] + parts[1]


# -- convolutions ---------------------------------------------------------------------------


def _plain_convolution(module: nn.Module) -> bool:
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


def conv_geometry(module: nn.Module, a: torch.Tensor, g: torch.Tensor):
    """Input, output gradients [c, n, out, H, W] (or one direction's, bare: [n, out, H, W]) and
    kernel, stride, padding, dilation as a 2-D convolution's (a Conv1d as one of height 1)."""
    if isinstance(module, nn.Conv1d):
        return (a.unsqueeze(2), g.unsqueeze(-2), (1, module.kernel_size[0]), (1, module.stride[0]),
                (0, module.padding[0]), (1, module.dilation[0]))
    return a, g, module.kernel_size, module.stride, module.padding, module.dilation


def conv_contract(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable) -> dict[str, torch.Tensor]:
    """The weight gradient of the convolution the formula assumes (its geometry read as the
    formula reads it), and the bias's sum g."""
    a, g, kernel, stride, padding, dilation = conv_geometry(module, a, g)
    out = {}
    if "weight" in trainable:
        if a.dtype != g.dtype:
            a = a.to(g.dtype)
        weight = shape_only((module.out_channels, module.in_channels // module.groups, *kernel), g.dtype, g.device)
        out["weight"] = weight_gradient(g, a, weight, (list(stride), list(padding), list(dilation), module.groups)
                                        ).reshape(module.weight.shape)
    if "bias" in trainable:
        out["bias"] = g.sum((0, -1, -2))
    return out


@register_closed_form(nn.Conv1d, nn.Conv2d, contract=conv_contract, applies=_plain_convolution, bare=True)
def conv_sq_norms(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable, memo: dict) -> torch.Tensor:
    """A convolution is a Linear over output positions on the input patches."""
    a, g, kernel, stride, padding, dilation = conv_geometry(module, a, g)
    ghost = ghost_is_cheaper(g.shape[-2] * g.shape[-1], module.in_channels * kernel[0] * kernel[1],
                             module.out_channels)
    if module.groups > 1 or not ghost and grouped_is_faster(module, a.device):
        return conv_grouped(module, a, g, kernel, stride, padding, dilation, trainable)
    return conv_patches(module, a, g, kernel, stride, padding, dilation, trainable, ghost)


def patch_chunk_bytes(device: torch.device) -> int:
    """The patches of this many bytes at a time.

    On the CPU, 4 MB: copied out of the input and multiplied while in cache (as a strided view of
    the padded input, a few samples at a time, they cost about a third of
    nn.functional.unfold: 3 -> 32 and 64 -> 64 channels, 32x32 and 16x16). On an accelerator
    every piece is a few more kernel launches, each paid in host time (ResNet-18's norms
    dispatched 6,594 operations in 4 MB pieces, 2,058 in whole layers): the whole layer at once,
    up to 1 GiB (the fast engine's chunks of samples already fit its memory budget).
    """
    return 1 << 30 if functional.launch_bound(device) else 4 << 20


def conv_patches(module, a, g, kernel, stride, padding, dilation, trainable, ghost: bool) -> torch.Tensor:
    """Per sample and output direction j, the weight gradient g_j P^T from the input patches P
    [in * kernel, positions], or (``ghost``) the Gram matrices of P and g_j over positions."""
    k, n, out, out_h, out_w = g.shape if g.dim() == 5 else (1, *g.shape)
    positions, rows = out_h * out_w, a.shape[1] * kernel[0] * kernel[1]
    # [n, out, L] per direction: as few dispatched operations as the arithmetic allows, since on
    # an accelerator each is paid in host time (one view for one direction)
    directions = [g.reshape(n, out, positions)] if k == 1 else g.reshape(k, n, out, positions).unbind(0)
    bias = None
    if "bias" in trainable:
        bias = reduce(torch.add, [squared_norms(g_j.sum(-1), -1) for g_j in directions])
    if "weight" not in trainable:
        return bias
    chunk = max(1, patch_chunk_bytes(a.device) // (rows * positions * a.element_size()))
    if torch.is_grad_enabled() and a.requires_grad:
        # unfold, whose backward is one fold; a strided view's scatters into zeroed patches
        pieces = split(a, chunk)  # split, not sliced: differentiated, the pieces' backward is one cat
        patches = lambda piece: nn.functional.unfold(piece, kernel, dilation, padding, stride)
    else:
        x = nn.functional.pad(a, (padding[1], padding[1], padding[0], padding[0])) if any(padding) else a
        st = x.stride()  # any strides: the view reads the input where it lies
        pieces = split(x.as_strided((n, x.shape[1], *kernel, out_h, out_w), (
            st[0], st[1], dilation[0] * st[2], dilation[1] * st[3], stride[0] * st[2], stride[1] * st[3])), chunk)
        patches = lambda piece: piece.reshape(-1, rows, positions)  # the copy
    by_direction = [split(g_j, chunk) for g_j in directions]
    parts = []
    for i, piece in enumerate(pieces):
        p = patches(piece)  # [c, in * kernel, L]
        if ghost:  # the Gram matrices over positions, [c, L, L]
            gram_p = gram(p, of="columns", symmetric_seed=True)
            terms = [gram_inner(gram_p, gram(g_j[i], of="columns", symmetric_seed=True)) for g_j in by_direction]
        else:  # the per-sample weight gradients, [c, out, in * kernel]
            p_t = p.transpose(1, 2)
            terms = [squared_norms(torch.bmm(g_j[i], p_t), (1, 2)) for g_j in by_direction]
        parts.append(reduce(torch.add, terms))
    weight = cat_or_one(parts)
    return weight if bias is None else weight + bias


def split(t: torch.Tensor, size: int, dim: int = 0) -> list[torch.Tensor]:
    """``t.split(size, dim)``, or ``[t]`` where one piece holds it (no dispatched split)."""
    return [t] if t.shape[dim] <= size else list(t.split(size, dim))


def grouped_is_faster(module: nn.Module, device: torch.device) -> bool:
    """Whether per-sample weight gradients come faster as the weight gradient of one convolution
    grouped by sample (:func:`conv_grouped`) than from the input patches. On an accelerator, yes:
    a third of the operations. On the CPU (oneDNN) only when differentiated once more and with
    at least 16 input channels: the patches' unfold has a fold for its backward, slower there
    (ResNet-18, batch 32: grad reg 2.15 s against 2.42 s), while for the norms alone the patches'
    strided copy and product are faster (the benchmark CNN's reg: 72 ms against 97 ms), and
    for 3 input channels always (11 against 4 ms)."""
    if functional.launch_bound(device):
        return True
    return torch.is_grad_enabled() and module.in_channels >= 16


def conv_grouped(module, a, g, kernel, stride, padding, dilation, trainable) -> torch.Tensor:
    """The samples as groups of one convolution: its weight gradient is
    [n * out, in / groups, *kernel], the per-sample gradients stacked, for each output direction
    (a grouped or depthwise convolution's own groups nest inside the samples')."""
    directions = [g] if g.dim() == 4 else g.unbind(0)  # (one, bare: [n, out, H, W])
    n = directions[0].shape[0]
    terms = []
    for g_j in directions:  # one weight gradient per output direction
        if "weight" in trainable:
            weight = grouped_weight_grads(module, a, g_j, kernel, stride, padding, dilation)
            terms.append(squared_norms(weight.reshape(n, -1), 1))
        if "bias" in trainable:
            terms.append(squared_norms(g_j.sum((-1, -2)), -1))
    return reduce(torch.add, terms)  # (under autocast, promoted as it adds)


def grouped_weight_grads(module, a, g_j, kernel, stride, padding, dilation, channels: slice = slice(None)):
    """Per-sample weight gradients [n * out, in / groups, *kernel] (sample-major) for one output
    direction g_j [n, out, H, W], of the output channels ``channels`` (whole groups: a slice only
    for groups 1)."""
    # under autocast the recorded input and the output gradient can differ in dtype, and the
    # weight gradient's kernel (no autocast rule) needs one: the wider
    if a.dtype != g_j.dtype:
        dtype = torch.promote_types(a.dtype, g_j.dtype)
        a, g_j = a.to(dtype), g_j.to(dtype)
    n = g_j.shape[0]
    if channels != slice(None):
        g_j = g_j[:, channels]
    out = g_j.shape[1]
    # (torch.nn.grad.conv2d_weight, with the weight it only reads the shape of made once)
    weight = shape_only((n * out, module.in_channels // module.groups, *kernel), g_j.dtype, g_j.device)
    return weight_gradient(g_j.reshape(1, n * out, *g_j.shape[2:]), a.reshape(1, n * a.shape[1], *a.shape[2:]),
                           weight, (list(stride), list(padding), list(dilation), n * module.groups))


@lru_cache(maxsize=64)
def shape_only(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A tensor whose metadata alone is read (the weight of a convolution whose weight gradient
    alone is asked): one element expanded, made once per shape (two operations a call as
    torch.nn.grad.conv2d_weight makes it)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


# -- LayerNorm and GroupNorm affine parameters ----------------------------------------------


def norm_affine_grads(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable) -> torch.Tensor:
    """Per-sample gradients of the affine parameters, [k, n, d] (small: d = channels); for one
    direction's output gradient bare ([*y]), [n, d]."""
    lead = 1 if g.dim() == a.dim() else 2  # the dims of directions and samples
    k, n = (1, g.shape[0]) if lead == 1 else g.shape[:2]
    if isinstance(module, nn.LayerNorm):
        x_hat = nn.functional.layer_norm(a, module.normalized_shape, eps=module.eps)
        shared = tuple(range(lead, g.dim() - len(module.normalized_shape)))  # positions per sample
    elif isinstance(module, nn.GroupNorm):
        x_hat = nn.functional.group_norm(a, module.num_groups, eps=module.eps)
        shared = tuple(range(lead + 1, g.dim()))  # spatial positions; parameters are per channel
    else:  # BatchNorm in eval mode: normalised by its running statistics, an affine map per channel
        shape = (1, -1) + (1,) * (a.dim() - 2)
        x_hat = (a - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
        shared = tuple(range(lead + 1, g.dim()))
    def per_sample(t: torch.Tensor) -> torch.Tensor:  # [k, n, d], or [n, d]
        t = t.sum(shared) if shared else t  # (sum(()) would sum all)
        # (a reshape to the same shape is still an operation)
        return t if t.dim() == lead + 1 else t.reshape(n, -1) if lead == 1 else t.reshape(k, n, -1)

    parts = []
    if "weight" in trainable:
        parts.append(per_sample(g * x_hat))
    if "bias" in trainable:
        parts.append(per_sample(g))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]


def norm_affine_gram(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable) -> torch.Tensor:
    vectors = norm_affine_grads(module, a, g, trainable)  # [k, n, d]
    V = vectors.permute(1, 0, 2).reshape(-1, vectors.shape[-1])
    return V @ V.T


def _running_statistics(module: nn.Module) -> bool:
    return module.track_running_stats and module.running_mean is not None


def norm_affine_contract(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable) -> dict[str, torch.Tensor]:
    """The per-sample affine gradients of :func:`norm_affine_grads` summed over samples."""
    summed = norm_affine_grads(module, a, g, trainable).sum(0)  # [weight | bias]
    names = [name for name in ("weight", "bias") if name in trainable]
    return {name: part.reshape(getattr(module, name).shape) for name, part in zip(names, summed.chunk(len(names)))}


@register_closed_form(nn.LayerNorm, contract=norm_affine_contract, gram=norm_affine_gram, samples_anywhere=True,
                      bare=True)
@register_closed_form(nn.GroupNorm, contract=norm_affine_contract, gram=norm_affine_gram, bare=True)
@register_closed_form(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, contract=norm_affine_contract,
                      gram=norm_affine_gram, applies=_running_statistics, bare=True)
def norm_affine_sq_norms(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable, memo: dict) -> torch.Tensor:
    if isinstance(module, nn.GroupNorm) and kernels_apply(a, g):  # (its backward kernel: one call a direction)
        return per_sample_affine_sq_norms(a, [g] if g.dim() == a.dim() else g.unbind(0), module.num_groups,
                                          module.eps, "weight" in trainable, "bias" in trainable)
    grads = norm_affine_grads(module, a, g, trainable)
    return squared_norms(grads, -1 if grads.dim() == 2 else (0, -1))


# -- Embedding -------------------------------------------------------------------------------


def _plain_embedding(module: nn.Embedding) -> bool:
    # (max_norm: inside a measurement the renormalisation is a constant, engines.untouched, and the
    # gradient the lookup's; scale_grad_by_freq changes it)
    return not module.scale_grad_by_freq


def embedding_contract(module: nn.Embedding, a: torch.Tensor, g: torch.Tensor, trainable) -> dict[str, torch.Tensor]:
    """Each position's output gradient added to the row of its index (none to the padding row)."""
    index, rows = a.reshape(-1), g.reshape(-1, module.embedding_dim)
    if module.padding_idx is not None:
        rows = rows * (index != module.padding_idx).unsqueeze(1).to(rows.dtype)
    return {"weight": torch.zeros(module.weight.shape, dtype=g.dtype, device=g.device).index_add_(0, index, rows)}


@register_closed_form(nn.Embedding, contract=embedding_contract, applies=_plain_embedding, samples_anywhere=True)
def embedding_sq_norms(module: nn.Embedding, a: torch.Tensor, g: torch.Tensor, trainable, memo: dict) -> torch.Tensor:
    """The weight gradient of sample i puts sum_t g_t in the row of each index: its squared norm
    is sum over positions t, s with equal indices of g_t . g_s (the padding index's row gets no
    gradient)."""
    k, n = g.shape[:2]
    index = a.reshape(n, -1)  # [n, T]
    positions = index.shape[1]
    key = ("pairs", module.padding_idx, g.dtype)
    if key not in memo:  # which positions share a row, per sample (the same for every direction)
        same = index.unsqueeze(2) == index.unsqueeze(1)
        if module.padding_idx is not None:
            counted = index != module.padding_idx
            same = same & counted.unsqueeze(2) & counted.unsqueeze(1)
        memo[key] = same.to(g.dtype)
    gram_g = gram(g.reshape(k * n, positions, -1), symmetric_seed=True)  # [k n, T, T]
    if k > 1:
        gram_g = gram_g.view(k, n, positions, positions).sum(0)
    return gram_inner(memo[key], gram_g)


# -- RMSNorm ---------------------------------------------------------------------------------


def rms_normalized(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The input normalised as the module normalises it, before its weight."""
    if hasattr(module, "normalized_shape"):  # torch's
        return nn.functional.rms_norm(a, module.normalized_shape, eps=module.eps)
    x = a.float()  # Llama's: in float32, back to the input's dtype
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(a.dtype)


def rms_norm_contract(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable) -> dict[str, torch.Tensor]:
    width = module.weight.numel()
    return {"weight": (g * rms_normalized(module, a)).reshape(-1, width).sum(0).reshape(module.weight.shape)}


@register_closed_form("torch.nn.modules.normalization.RMSNorm", "transformers.models.llama.modeling_llama.LlamaRMSNorm",
                      contract=rms_norm_contract, samples_anywhere=True)
def rms_norm_sq_norms(module: nn.Module, a: torch.Tensor, g: torch.Tensor, trainable, memo: dict) -> torch.Tensor:
    """The weight's per-sample gradient: g times the normalised input, summed over positions
    (the weight is the module's one parameter, trainable: else it owns none)."""
    k, n = g.shape[:2]
    width = module.weight.numel()
    grads = (g * rms_normalized(module, a)).reshape(k, n, -1, width).sum(2)
    return squared_norms(grads, (0, -1))
