"""The operations that consume a module's parameters, as a trace records them.

A closed form is a formula for one operation (``F.linear``, ``F.conv2d``, ``F.layer_norm``, ...)
on its input, not for a module class: a subclass that pads in ``forward`` (timm's Conv2dSame),
permutes around its norm (ConvNeXt's LayerNorm2d) or applies an activation after it (timm's
BatchNormAct2d) computes the same operation on another input, or leaves it at another output.
While the trace runs such a module, :class:`OpRecorder` (a thread-local ``TorchFunctionMode``)
watches every function that takes one of the module's own trainable parameters: where exactly one
recognised operation takes them all, directly as its weight and bias, the module's call is
recorded as that operation's (:class:`OpCall`: its input, its arguments, the gradient edge of its
output), and the closed form binds to it (:func:`~noisy_label_sgd.engines.closed_forms.bind`).
Bare parameters used elementwise (a layer scale, position embeddings, a class token, through
views of the parameter) are operations of their own (:mod:`~noisy_label_sgd.engines.elementwise`),
one per parameter. Any other use (``2 * weight`` as a weight, a weight standardised first, a
parameter taken twice) leaves the module to its per-module fallback. The certificate (:mod:`~noisy_label_sgd.engines.certificate`) holds the
result against autograd either way.

Only modules whose class has no closed form of its own are watched (a mode adds host time to
every function it sees: about 3 us a call on the CPU that measured it), and only while they run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    views: dict[int, ParameterView] = field(default_factory=dict)  # tensors that are views of a parameter
    kept: list[torch.Tensor] = field(default_factory=list)  # (those tensors, alive while their ids are keys)
    other_use: bool = False  # a parameter taken by anything else

    def partition(self, params: dict[str, nn.Parameter]) -> list[OpCall] | None:
        """The operations that took the module's trainable parameters, each its own, all of them
        once; None where a parameter was used otherwise (or not at all)."""
        if self.other_use or not self.ops:
            return None
        taken = [id(p) for op in self.ops for p in op.params.values()]
        return self.ops if sorted(taken) == sorted(id(p) for p in params.values()) else None


class OpRecorder(TorchFunctionMode):
    """Records, for the innermost watched module running (``running``: a stack of
    (parameters by id, :class:`Watch`)), the operations that take its parameters."""

    def __init__(self, gradient_edge) -> None:
        super().__init__()
        self.running: list[tuple[dict[int, nn.Parameter], Watch]] = []
        self.gradient_edge = gradient_edge

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not self.running or not isinstance(result, torch.Tensor):  # (metadata is no use)
            return result
        params, watch = self.running[-1]
        flat = [t for a in (*args, *kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else (a,))]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
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
            watch.other_use = True
        else:
            watch.ops.append(op)
        return result


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
