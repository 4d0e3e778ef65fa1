"""The operations that consume a module's parameters, as a trace records them.

A closed form is a formula for one operation (``F.linear``, ``F.conv2d``, ``F.layer_norm``, ...)
on its input, not for a module class: a subclass that pads in ``forward`` (timm's Conv2dSame),
permutes around its norm (ConvNeXt's LayerNorm2d) or applies an activation after it (timm's
BatchNormAct2d) computes the same operation on another input, or leaves it at another output.
While the trace runs such a module, :class:`OpRecorder` (a thread-local ``TorchFunctionMode``)
watches every function that takes one of the trainable parameters of the module or of modules
inside it that its own code applies (torchvision's Swin attention applies its never-called qkv's
weight): where recognised operations take them all, each directly as its weight and bias, the
module's call is recorded as those operations' (:class:`OpCall`: its input, its arguments, the
gradient edge of its output), and the closed form binds to each
(:func:`~noisy_label_sgd.engines.closed_forms.bind`). Bare parameters used elementwise (a layer
scale, position embeddings, a class token, through views of the parameter) are operations of
their own (:mod:`~noisy_label_sgd.engines.elementwise`), one per parameter; so is a function of
one parameter and the module's constants alone (``exp(w)``, a bias table indexed by a buffer's
positions), whose result all samples share and which is followed to where they meet it
(:mod:`~noisy_label_sgd.engines.shared`). Any other use (a parameter taken twice, a weight
standardised first, ``2 * weight`` met by ``F.linear``, which has no rule for it) leaves the
module to its per-module fallback. The certificate
(:mod:`~noisy_label_sgd.engines.certificate`) holds the result against autograd either way.

Only modules whose class has no closed form of its own are watched (a mode adds host time to
every function it sees: about 3 us a call on the CPU that measured it), and only while they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from . import convolution, group_norm
from .elementwise import Elementwise, ParameterView, derived, use_of

F = nn.functional

# kind -> the positional names of its arguments (the functional signature), and where the
# trainable parameters may sit
_SIGNATURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "linear": (("input", "weight", "bias"), ("weight", "bias")),
    "conv1d": (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), ("weight", "bias")),
    "conv2d": (("input", "weight", "bias", "stride", "padding", "dilation", "groups"), ("weight", "bias")),
    "layer_norm": (("input", "normalized_shape", "weight", "bias", "eps"), ("weight", "bias")),
    "group_norm": (("input", "num_groups", "weight", "bias", "eps"), ("weight", "bias")),
    "batch_norm": (("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                   ("weight", "bias")),
    "embedding": (("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
                  ("weight",)),
    "rms_norm": (("input", "normalized_shape", "weight", "eps"), ("weight",)),
}

# the functions of each kind (torch's, and the engines' own twice-differentiable ones, which
# lean_second_order puts in their place)
KINDS = {F.linear: "linear", F.conv1d: "conv1d", F.conv2d: "conv2d", F.layer_norm: "layer_norm",
         F.group_norm: "group_norm", F.batch_norm: "batch_norm", F.embedding: "embedding", F.rms_norm: "rms_norm",
         convolution.conv1d: "conv1d", convolution.conv2d: "conv2d", group_norm.layer_norm: "layer_norm",
         group_norm.group_norm: "group_norm"}


@dataclass
class OpCall:
    """One recognised operation that took all of a module's trainable parameters."""

    kind: str
    input: torch.Tensor
    arguments: dict  # the other arguments by their functional names ("stride", "eps", ...)
    params: dict[str, nn.Parameter]  # its parameter slots ("weight", "bias") -> the module's parameter
    edge: torch.autograd.graph.GradientEdge | None
    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    sample_dim: int | None = None  # where the samples run in its output (set after the trace)
    # a bare parameter's elementwise use (``input``: the activations multiplied, or None)
    elementwise: Elementwise | None = None
    # rows per sample in that dim (windows merged into the batch), recorded unflattened: ``shape``
    # and ``edge`` are [.., n, m, ..]'s (:func:`~noisy_label_sgd.engines.trace.sample_rows`)
    rows: int = 1
    # kind "shared": a function of the parameter and the module's constants alone (Swin's bias
    # table indexed by its positions), whose result all samples share: the root's name, the
    # function of the parameter (None where it does not run under vmap), and (after the trace)
    # that result and where it met the samples (:mod:`~noisy_label_sgd.engines.shared`)
    root: str | None = None
    replay: Callable[[torch.Tensor], torch.Tensor] | None = None
    output: torch.Tensor | None = None
    meetings: list = field(default_factory=list)

    def apply(self, input: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The operation again, on ``input`` with the parameters ``params`` (by slot) and its
        other arguments as recorded."""
        names, slots = _SIGNATURES[self.kind]
        values = {**self.arguments, **params, "input": input}
        return getattr(F, self.kind)(**{name: values[name] for name in names if name in values})


@dataclass
class Watch:
    """What the recorder saw during one call of a watched module."""

    ops: list[OpCall] = field(default_factory=list)
    # per operation (by its index), the dim and rows per sample of an output that holds several
    # rows per sample there, for the n samples of the batch: recorded unflattened
    blocks: dict[int, tuple[int, int]] = field(default_factory=dict)
    n: int = 0
    views: dict[int, ParameterView] = field(default_factory=dict)  # tensors that are views of a parameter
    # tensors made from the module's buffers alone (its constants: a table's index)
    constants: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)  # the parameters' names, by id
    owner: str = ""
    kept: list[torch.Tensor] = field(default_factory=list)  # (those tensors, alive while their ids are keys)
    other_use: bool = False  # a parameter taken by anything else

    def partition(self, params: dict[str, nn.Parameter]) -> list[OpCall] | None:
        """The operations that took the module's trainable parameters (``params``, all of them)
        and those of modules inside it that its own code applied, each its own, once; None
        where a parameter was used otherwise (or one of ``params`` not at all)."""
        if self.other_use or not self.ops:
            return None
        taken = [id(p) for op in self.ops for p in op.params.values()]
        return self.ops if len(set(taken)) == len(taken) and {id(p) for p in params.values()} <= set(taken) else None


class OpRecorder(TorchFunctionMode):
    """Records, for the innermost watched module running (``running``: a stack of
    (parameters by id, :class:`Watch`)), the operations that take its parameters."""

    def __init__(self, gradient_edge, shared=None, roots: frozenset[str] = frozenset()) -> None:
        super().__init__()
        self.running: list[tuple[dict[int, nn.Parameter], Watch]] = []
        self.gradient_edge = gradient_edge
        # where a parameter-only function's result named in ``roots`` is handed, to be followed
        # to where it meets the samples (:class:`~noisy_label_sgd.engines.shared.SharedValues`)
        self.shared, self.roots = shared, roots

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.running or not isinstance(result, torch.Tensor):  # (metadata is no use)
            return result
        params, watch = self.running[-1]
        flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        if tensors and all(id(t) in watch.constants for t in tensors):  # (made from constants: one)
            watch.constants.add(id(result))
            watch.kept.append(result)
            return result
        if not any(id(t) in params or id(t) in watch.views for t in tensors):
            return result
        view = derived(func, args, kwargs, result, watch.views, params)
        if view is not None:  # (a view of a parameter: what takes it next is its use)
            watch.views[id(result)] = view
            watch.kept.append(result)
            return result
        op = None
        if not any(id(t) in watch.views for t in tensors):
            op = _op_call(func, args, kwargs, params, result, self.gradient_edge)
        if op is None:
            use = use_of(func, args, kwargs, result, watch.views, params)
            if use is not None:
                elementwise, other = use
                edge = self.gradient_edge(result) if torch.is_grad_enabled() and result.grad_fn is not None else None
                op = OpCall(elementwise.kind, other, {}, {"weight": elementwise.param}, edge, result.shape,
                            result.dtype, result.device, elementwise=elementwise)
        if op is None:
            op = self._parameter_only(func, args, kwargs, tensors, params, watch, result)
        if op is None:
            watch.other_use = True
            return result
        block = watch.blocks.get(len(watch.ops))
        watch.ops.append(op)
        if block is not None and op.edge is not None:  # (the samples in a dim of their own: rows as positions)
            d, op.rows = block
            if result.dim() <= d or result.shape[d] != watch.n * op.rows:
                watch.other_use = True  # (not the rows the sizing forwards saw: the module falls back)
                return result
            recorded = result.unflatten(d, (watch.n, op.rows))
            op.edge, op.shape = self.gradient_edge(recorded), recorded.shape
            return recorded.flatten(d, d + 1)
        return result

    def _parameter_only(self, func, args, kwargs, tensors, params, watch: Watch, result) -> OpCall | None:
        """A function of one parameter (itself, not a view) and the module's constants alone, as
        an operation of kind "shared" whose result all samples share; handed to ``shared`` where
        it is one of ``roots``."""
        taken = [t for t in tensors if id(t) in params]
        if len(taken) != 1 or any(id(t) not in params and id(t) not in watch.constants for t in tensors):
            return None
        param = taken[0]
        root = f"{watch.owner}.{watch.names[id(param)]}"

        def replay(weight: torch.Tensor) -> torch.Tensor:  # (the function again, at another weight)
            swap = lambda a: weight if a is param else type(a)(swap(x) for x in a) if isinstance(a, (list, tuple)) else a
            return func(*swap(args), **{key: swap(value) for key, value in kwargs.items()})

        if self.shared is not None and root in self.roots:
            self.shared.add_root(result, root)
        return OpCall("shared", None, {}, {"weight": param}, None, result.shape, result.dtype, result.device,
                      root=root, replay=replay)


def _op_call(func, args, kwargs, params, result, gradient_edge) -> OpCall | None:
    kind = KINDS.get(func)
    if kind is None:
        return None
    names, slots = _SIGNATURES[kind]
    bound = dict(zip(names, args))
    bound.update(kwargs)
    if not isinstance(bound.get("input"), torch.Tensor) or id(bound["input"]) in params:
        return None
    taken = {slot: bound[slot] for slot in slots if isinstance(bound.get(slot), torch.Tensor)}
    others = [t for name, t in bound.items() if name not in slots and isinstance(t, torch.Tensor) and id(t) in params]
    if others or not all(id(t) in params for t in taken.values()):
        return None  # (a parameter as the input or a statistic, or a slot holding something derived)
    edge = gradient_edge(result) if torch.is_grad_enabled() and result.grad_fn is not None else None
    arguments = {name: value for name, value in bound.items() if name != "input" and name not in slots}
    return OpCall(kind, bound["input"], arguments, {slot: params[id(t)] for slot, t in taken.items()}, edge,
                  result.shape, result.dtype, result.device)
