r"""Bare parameters used elementwise: a layer scale, a position embedding, a class token.

A parameter that is not a layer's weight still often enters the model through one broadcast
operation on a sample's activations: ``x * gamma`` (layer scale: ConvNeXt, CaiT), ``x + pos``
(a ViT's position embeddings), ``cat([cls.expand(n, ...), x])`` (its class token), after views
of the parameter that keep its elements in order (``reshape``, ``view``, ``unsqueeze``) and one
``expand``. Each is an operation of its own (:class:`Elementwise`), recorded by the trace's op
recorder (:mod:`~noisy_label_sgd.engines.ops`), with the per-sample gradient written out from its
output gradient g (per sample i, summed over every dim the parameter is broadcast along):

* ``x * P``: :math:`G_i = \sum_{\text{broadcast}} g_i \odot x_i`;
* ``x + P``: :math:`G_i = \sum_{\text{broadcast}} g_i`;
* ``cat([P expanded over the samples, x], k)``: :math:`G_i` = g_i on P's segment of dim k.

These gradients are as large as the parameter per sample (a ViT's position embeddings: T d), so
the norms are taken from them directly ("per-sample gradients first").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gram import squared_norms

VIEWS = {torch.Tensor.reshape, torch.reshape, torch.Tensor.view, torch.Tensor.unsqueeze, torch.unsqueeze,
         torch.Tensor.squeeze, torch.squeeze, torch.Tensor.flatten, torch.flatten}
EXPANDS = {torch.Tensor.expand, torch.Tensor.expand_as}
PRODUCTS = {torch.Tensor.mul, torch.mul}
SUMS = {torch.Tensor.add, torch.add}
CATS = {torch.cat, torch.concat, torch.concatenate}


@dataclass
class ParameterView:
    """A tensor that is a parameter seen through views (``shape``: the view's, as many elements
    as the parameter, in its order), then possibly expanded."""

    param: nn.Parameter
    shape: torch.Size
    expanded: bool = False


def derived(func, args, kwargs, result, views: dict[int, ParameterView], params: dict[int, nn.Parameter]
            ) -> ParameterView | None:
    """The view of a parameter that ``result`` is, where ``func`` is a view or an expand of a
    parameter or of such a view; None otherwise."""
    if not args or not isinstance(args[0], torch.Tensor):
        return None
    if func is not torch.Tensor.expand_as and any(isinstance(t, torch.Tensor) for t in (*args[1:], *kwargs.values())):
        return None
    base = views.get(id(args[0]))
    if base is None and id(args[0]) in params:
        base = ParameterView(params[id(args[0])], args[0].shape)
    if base is None:
        return None
    if func in VIEWS and not base.expanded:
        return ParameterView(base.param, result.shape)
    if func in EXPANDS:
        return ParameterView(base.param, base.shape, expanded=True)
    return None


@dataclass
class Elementwise:
    """One elementwise use of a parameter: ``kind`` "mul", "add" or "cat"; the view's shape
    right-aligned to the output's dims; for "cat" the dim and P's segment in it."""

    kind: str
    param: nn.Parameter
    view_shape: tuple[int, ...]  # right-aligned to the output's dims (leading 1s)
    dim: int = 0
    start: int = 0
    length: int = 0

    def per_sample(self, other: torch.Tensor | None, g: torch.Tensor, sample_dim: int) -> torch.Tensor:
        """The per-sample gradients [c, n, *param.shape] from output gradients g [c, *out]
        (``other``: the activations multiplied, for "mul")."""
        g = self.reduced(other, g, sample_dim, lead=1).movedim(sample_dim + 1, 1)
        return g.reshape(g.shape[0], g.shape[1], *self.param.shape)

    def reduced(self, other: torch.Tensor | None, g: torch.Tensor, sample_dim: int, lead: int) -> torch.Tensor:
        """The per-sample gradients' entries in the output's dims, from output gradients g with
        ``lead`` direction dims (0 or 1): P's segment ("cat"), times the other operand ("mul"),
        summed where P broadcasts but over the samples (keepdim: its backward is one expand)."""
        if self.kind == "cat":
            g = g.narrow(self.dim + lead, self.start, self.length)
        elif self.kind == "mul":
            g = g * other.to(g.dtype)
        shared = [j + lead for j, size in enumerate(self.view_shape)
                  if size == 1 and g.shape[j + lead] != 1 and j != sample_dim]
        return g.sum(shared, keepdim=True) if shared else g


def use_of(func, args, kwargs, result: torch.Tensor, views: dict[int, ParameterView], params: dict[int, nn.Parameter]
           ) -> tuple[Elementwise, torch.Tensor | None] | None:
    """The elementwise use ``func`` makes of a parameter (or a view of one) among its arguments,
    and the other operand ("mul"), where it is one this module writes out; None otherwise."""
    view = lambda t: views.get(id(t)) or (ParameterView(params[id(t)], t.shape) if id(t) in params else None)
    if func in PRODUCTS or func in SUMS:
        if len(args) != 2 or kwargs.get("alpha", 1) != 1 or not all(isinstance(t, torch.Tensor) for t in args):
            return None
        first, second = view(args[0]), view(args[1])
        if (first is None) == (second is None):
            return None
        p, other = (first, args[1]) if first is not None else (second, args[0])
        if p.expanded or len(p.shape) > result.dim() or other.shape != result.shape:
            return None
        aligned = (1,) * (result.dim() - len(p.shape)) + tuple(p.shape)
        return Elementwise("mul" if func in PRODUCTS else "add", p.param, aligned), other if func in PRODUCTS else None
    if func in CATS:
        tensors = args[0] if args else kwargs.get("tensors")
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
            return None
        found = [(i, view(t)) for i, t in enumerate(tensors) if view(t) is not None]
        if len(found) != 1 or not found[0][1].expanded:
            return None
        i, p = found[0]
        dim = dim % result.dim()
        start = sum(t.shape[dim] for t in tensors[:i])
        segment = tensors[i].shape
        if len(p.shape) != len(segment):
            return None
        return Elementwise("cat", p.param, tuple(p.shape), dim, start, segment[dim]), None
    return None


def elementwise_sq_norms(use: Elementwise, other, sample_dim: int, g: torch.Tensor) -> torch.Tensor:
    """Per-sample squared norms summed over the directions of g [c, *out] (or one direction's,
    bare [*out]): the per-sample gradient's entries reduced in place, never put in the
    parameter's shape (a norm does not need its order: two operations fewer, and their
    backwards in grad reg)."""
    lead = 0 if g.dim() == len(use.view_shape) else 1
    g = use.reduced(other, g, sample_dim, lead)
    return squared_norms(g, [d for d in range(g.dim()) if d != lead + sample_dim])
