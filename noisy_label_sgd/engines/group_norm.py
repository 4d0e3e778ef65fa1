r"""GroupNorm with its second derivative written out: grad reg's double backward in a few fused
operations a layer.

PyTorch differentiates ``F.group_norm``'s backward through its composite formula: about 38
operations for the differentiable backward and 150 for their derivative, against one kernel each
way in a training step. Here the forward and the backward are the fused kernels
(``native_group_norm`` and its backward) and the backward's derivative is the closed form below.

Per sample and group (M elements): :math:`d = x - \mu`, :math:`r = (\operatorname{var} x +
\epsilon)^{-1/2}`, :math:`\hat x = r d`; the backward of an upstream gradient :math:`g` with
:math:`\hat g = \gamma g` (per channel) is

.. math::
    g_x = r\,P\hat g,\quad P t = t - \bar t - \hat x\,\overline{t \hat x},\qquad
    g_\gamma = \textstyle\sum g \hat x,\quad g_\beta = \sum g,

where bars are means over the group; :math:`P` is symmetric. For the double backward's seeds
:math:`u, w, z` (of :math:`g_x, g_\gamma, g_\beta`), with :math:`\bar u = u - \operatorname{mean} u`,
:math:`D_t = \langle t, d\rangle` and :math:`q = w g`:

.. math::
    \partial_g = \gamma\,rPu + w\hat x + z,\qquad \partial_\gamma = \textstyle\sum g\, rPu,\\
    \partial_x = r\bar q - \tfrac{r^3}{M}\big[(\langle \bar u, \hat g\rangle
        - \tfrac{3r^2}{M} D_u D_{\hat g} + D_q)\,d + D_u\,\bar{\hat g} + D_{\hat g}\,\bar u\big].

Evaluated through the kernels where a term is one of theirs: :math:`rPt` is the backward kernel's
input gradient at :math:`t` without a weight (so :math:`r\bar q - \tfrac{r^3}{M} D_q d = rPq` is
one call, with weight :math:`w`), :math:`w\hat x + z` the forward kernel's output and
:math:`\sum g\,rPu` the backward kernel's weight gradient at the input :math:`rPu` taken as
normalised (mean 0, deviation 1). The remaining terms of :math:`\partial_x`, written in the first
backward's own output :math:`g_x` and :math:`v = rPu` (substituting :math:`\bar u = v/r + \hat x\,
\overline{u \hat x}` and :math:`\bar{\hat g} = g_x/r + \hat x\,\overline{\hat g \hat x}`), are
:math:`-r\,[\overline{u g_x}\,\hat x + \overline{u \hat x}\,g_x + \overline{\hat g \hat x}\,v]`, evaluated in
:math:`y = -\hat x` (the forward kernel's output at a weight of -1s) as :math:`r\,[\overline{u g_x}\,y
+ \overline{u y}\,g_x + \overline{\hat g y}\,v]`: the sign without an operation.
:func:`per_sample_affine_sq_norms` (GroupNorm's closed form) runs the same backward for all
samples at once, told they are one sample whose channels are theirs.

Differentiable twice (a third derivative raises: the second is written out, not recorded).
:func:`layer_norm` is the same with one group over rows.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .backward import asked, batched, kernels_apply, tensor_inputs
from .gram import squared_norms


def group_norm(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.group_norm``, the same numbers, with a twice-differentiable backward of few operations.
    Falls back to ``F.group_norm`` where the fused kernel does not apply (torch.func transforms,
    mixed dtypes)."""
    if has_torch_function_variadic(input, weight, bias):  # (seen by modes as itself, as F.group_norm is)
        return handle_torch_function(group_norm, (input, weight, bias), input, num_groups, weight, bias, eps)
    if not kernels_apply(input, weight, bias):
        return _original_group_norm(input, num_groups, weight, bias, eps)
    # (the backward kernel misreads a channels-last input beside a contiguous gradient: both
    # contiguous, the same layout as the formulas' views)
    return _GroupNorm.apply(input.contiguous(), weight, bias, (*input.shape[:2], num_groups), eps)


_original_group_norm = torch.nn.functional.group_norm
_original_layer_norm = torch.nn.functional.layer_norm


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm`` as a GroupNorm of one group over rows (the normalised dims as channels,
    one position each): the same numbers, with :func:`group_norm`'s second derivative. The input
    keeps its shape (the kernels are told the rows and channels: no view to record and
    differentiate twice)."""
    if has_torch_function_variadic(input, weight, bias):
        return handle_torch_function(layer_norm, (input, weight, bias), input, normalized_shape, weight, bias, eps)
    size = 1
    for d in normalized_shape:
        size *= d
    if input.numel() == 0 or not kernels_apply(input, weight, bias):
        return _original_layer_norm(input, normalized_shape, weight, bias, eps)
    x = input.contiguous()  # (rows in memory order; no operation where it already is)
    weight, bias = (t.reshape(size) if t is not None and t.dim() != 1 else t for t in (weight, bias))
    return _GroupNorm.apply(x, weight, bias, (x.numel() // size, size, 1), eps)


def per_sample_affine_sq_norms(x: torch.Tensor, grads: list[torch.Tensor], num_groups: int, eps: float,
                               weight: bool = True, bias: bool = True) -> torch.Tensor:
    """Each sample's squared norm of a GroupNorm's weight and bias gradients (those asked), summed
    over the output gradients ``grads`` (one per output direction, in x's shape), [n]. One
    backward kernel a direction for all samples, told they are one sample whose channels are
    theirs (layout [1, n C], n groups), twice differentiable as :func:`group_norm`'s backward is.
    Where :func:`~.backward.kernels_apply` holds for x and the gradients."""
    n, c = x.shape[:2]
    x = x.contiguous()
    with torch.no_grad():  # (constants of the backward: its derivative in x includes theirs)
        _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, math.prod(x.shape[2:]),
                                                         num_groups, eps)
    total = None
    for grad in grads:
        _, gw, gb = _GroupNormBackward.apply(grad, x, None, mean, rstd, (1, n * c, n * num_groups), eps,
                                             (False, weight, bias))
        # (one flat cat: its backward's pieces are contiguous, as the kernels read them)
        flat = torch.cat((gw, gb)) if weight and bias else gw if weight else gb
        sq = squared_norms(flat.view(-1, n, c), (0, 2))
        total = sq if total is None else total + sq
    return total


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, layout, eps):
        n, c, groups = layout  # (samples or rows, channels, groups)
        out, mean, rstd = torch.ops.aten.native_group_norm(x, weight, bias, n, c, _positions(x, layout),
                                                           groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.tensor_inputs = tensor_inputs(x, weight, bias)
        ctx.layout, ctx.eps, ctx.has_bias = layout, eps, bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        mask = (asked(ctx, 0), weight is not None and asked(ctx, 1), ctx.has_bias and asked(ctx, 2))
        if batched(grad):
            # a batched backward (is_grads_batched runs it under vmap) records no graph through
            # a Function: PyTorch's composite there
            return (*_composite_backward(grad, x, weight, ctx.layout, ctx.eps, mask), None, None)
        gx, gw, gb = _GroupNormBackward.apply(grad, x, weight, mean, rstd, ctx.layout, ctx.eps, mask)
        return gx, gw, gb, None, None


def _composite_backward(grad, x, weight, layout, eps, mask):
    """The backward in differentiable operations (statistics recomputed from x): the module
    docstring's g_x, g_gamma, g_beta."""
    n, c, groups = layout
    grouped = (n, groups, c // groups, -1)
    group = (2, 3)
    x4 = x.reshape(grouped)
    var, mean = torch.var_mean(x4, group, correction=0, keepdim=True)
    r = torch.rsqrt(var + eps)
    x_hat = (x4 - mean) * r
    g = grad.reshape(grouped)
    g_hat = g * weight.view(1, groups, c // groups, 1) if weight is not None else g
    gx = gw = gb = None
    if mask[0]:
        centred = g_hat - g_hat.mean(group, keepdim=True)
        gx = (r * (centred - x_hat * (g_hat * x_hat).mean(group, keepdim=True))).reshape(x.shape)
    if mask[1]:
        gw = (g * x_hat).sum((0, 3)).reshape(c)
    if mask[2]:
        gb = g.sum((0, 3)).reshape(c)
    return gx, gw, gb


class _GroupNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, weight, mean, rstd, layout, eps, mask):
        n, c, groups = layout
        # (the kernel reads a strided gradient by the shape it is told, [rows, channels] for a
        # LayerNorm, not the tensor's own: in memory order then)
        grad = grad.contiguous()
        # (the kernel takes its outputs' dtype and device from the weight, and fails asked for
        # the weight's or bias's gradient without one: a weight of ones then, the same numbers)
        kernel_weight = weight if weight is not None or not (mask[1] or mask[2]) else _filled(c, 1.0, x)
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, kernel_weight, n, c, _positions(x, layout), groups, list(mask))
        ctx.save_for_backward(grad, x, weight, mean, rstd, gx)
        ctx.layout, ctx.eps = layout, eps
        ctx.set_materialize_grads(False)  # an output nobody used costs nothing
        return gx, gw, gb

    @staticmethod
    def backward(ctx, u, w, z):
        if torch.is_grad_enabled():  # (a backward runs with grad mode on only under create_graph)
            # (not once_differentiable: its error fires only on .backward(), and autograd.grad
            # would silently leave the third derivative's terms through here out)
            raise RuntimeError("this GroupNorm is differentiable twice, not three times: its second "
                               "derivative is written out, not recorded")
        d_grad, d_x, d_weight = _second_derivative(u, w, z, *ctx.saved_tensors, ctx.layout, ctx.eps,
                                                   ctx.needs_input_grad[:3])
        return d_grad, d_x, d_weight, None, None, None, None, None


def _positions(x: torch.Tensor, layout) -> int:
    return x.numel() // max(layout[0] * layout[1], 1)


def _per_channel(t: torch.Tensor, x: torch.Tensor, layout) -> torch.Tensor:
    """A per-channel t [C] as it broadcasts against x, whose dims are [*rows, *channels,
    *positions] for the kernels' layout (a GroupNorm's [n, C, H, W], a LayerNorm's [..., *normalised],
    the per-sample layout's [n C, H, W])."""
    channels_end = _trailing(x.shape, x.dim(), _positions(x, layout))
    channels_start = _trailing(x.shape, channels_end, layout[1])
    shape = (*x.shape[channels_start:channels_end], *[1] * (x.dim() - channels_end))
    return t if t.shape == shape else t.view(shape)


def _trailing(shape, end: int, size: int) -> int:
    """Where the dims before ``end`` holding ``size`` elements start."""
    start, held = end, 1
    while held < size:
        start -= 1
        held *= shape[start]
    return start


def _filled(size: int, value: float, like: torch.Tensor) -> torch.Tensor:
    return _filled_with(size, value, like.dtype, like.device)


@lru_cache(maxsize=64)
def _statistics_of_none(n: int, groups: int, dtype: torch.dtype, device: torch.device):
    """Mean 0 and inverse deviation 1 per sample and group (made once): the kernels' statistics of
    an input used as it is."""
    return torch.zeros(n, groups, dtype=dtype, device=device), torch.ones(n, groups, dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _filled_with(size: int, value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # (made once; materialised: the kernel reads the weight as contiguous memory, an expanded
    # one past its end)
    return torch.full((size,), value, dtype=dtype, device=device)


def _second_derivative(u, w, z, grad, x, weight, mean, rstd, gx, layout, eps, needs):
    """The derivatives of <u, g_x> + <w, g_gamma> + <z, g_beta> in (grad, x, weight) (module
    docstring): the fused kernels where a term is one of theirs (r P t is the backward kernel's
    input gradient, x_hat w + z the forward's output), the rest on [n, groups, channels per
    group, positions] views."""
    n, c, groups = layout
    positions = _positions(x, layout)
    grouped = (n, groups, c // groups, -1)
    group = (2, 3)
    # (the kernels read the seeds in memory order, whatever their strides)
    u, w, z = (t if t is None else t.contiguous() for t in (u, w, z))
    d_grad = d_x = d_weight = None
    if u is not None:
        # y = -x_hat: the forward kernel with a weight of -1s (the sign of d_x's bracket, below)
        flat_y = torch.ops.aten.native_group_norm(x, _filled(c, -1.0, x), None, n, c, positions, groups, eps)[0]
        flat_v = torch.ops.aten.native_group_norm_backward(  # v = r P u
            u, x, mean, rstd, None, n, c, positions, groups, [True, False, False])[0]
        gamma = _per_channel(weight, x, layout) if weight is not None else None
        if needs[0]:
            d_grad = flat_v * gamma if gamma is not None else flat_v
            if w is not None:
                d_grad = torch.addcmul(d_grad, flat_y, _per_channel(w, x, layout), value=-1)
            if z is not None:
                d_grad = d_grad + _per_channel(z, x, layout)
        if needs[2] and weight is not None:  # sum g v per channel: the kernel's weight gradient at an
            # input v "normalised" by mean 0 and deviation 1 (one operation, not three)
            zeros, ones = _statistics_of_none(n, groups, x.dtype, x.device)
            d_weight = torch.ops.aten.native_group_norm_backward(
                grad, flat_v, zeros, ones, _filled(c, 1.0, x), n, c, positions, groups, [False, True, False])[1]
        if needs[1]:  # -r [mean(u g_x) x_hat + mean(u x_hat) g_x + mean(g_hat x_hat) v], in y = -x_hat:
            # r [mean(u g_x) y + mean(u y) g_x + mean(g_hat y) v]
            g_hat = (grad * gamma if gamma is not None else grad).view(grouped)
            y, v, u, gx = flat_y.view(grouped), flat_v.view(grouped), u.view(grouped), gx.view(grouped)
            bracket = torch.addcmul(torch.addcmul(y * (u * gx).mean(group, keepdim=True),
                                                  (u * y).mean(group, keepdim=True), gx),
                                    (g_hat * y).mean(group, keepdim=True), v)
            d_x = (bracket * rstd.view(n, groups, 1, 1)).view(x.shape)
    elif needs[0] and w is not None:  # x_hat w + z: the forward kernel's output
        d_grad = torch.ops.aten.native_group_norm(x, w, z, n, c, positions, groups, eps)[0]
    elif needs[0] and z is not None:
        d_grad = _per_channel(z, x, layout).expand(grad.shape).contiguous()
    if w is not None and needs[1]:  # r P (w g): the backward kernel's input gradient with weight w
        part = torch.ops.aten.native_group_norm_backward(
            grad, x, mean, rstd, w, n, c, positions, groups, [True, False, False])[0]
        d_x = part if d_x is None else d_x + part
    return d_grad, d_x, d_weight
