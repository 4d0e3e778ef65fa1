r"""The implicit regularizer of label-noise SGD: the public functions, each a question to an engine.

Notation (see the package README): the model output of sample :math:`i` is flattened to
:math:`h_i \in \mathbb{R}^k`; :math:`\theta \in \mathbb{R}^p` are the trainable parameters in
``named_parameters()`` order; :math:`J_i = \partial h_i / \partial\theta \in \mathbb{R}^{k\times p}`
and :math:`J` is the :math:`nk \times p` stack.

* ``per_sample_sq_grad_norms``: :math:`\|J_i\|_F^2` for every sample;
* ``implicit_regularizer``: :math:`\mathrm{reg}(\theta) = \frac1n\sum_i \|J_i\|_F^2`;
* ``regularizer_grad``: :math:`\nabla\mathrm{reg} = \frac2n\sum_i\sum_j H_{ij}\,\nabla h_{ij}`;
* ``tangent_projection``: :math:`P_T v = v - J^+ J v`, the component of :math:`v` tangent to the
  zero-error manifold :math:`\{\theta: h_i(\theta) = y_i\ \forall i\}` (tangent space
  :math:`\mathrm{null}(J)`).

Each selects an engine (:func:`~noisy_label_sgd.engines.select_engine`; the rules are in
:mod:`noisy_label_sgd.engines.select`) and asks it. Every function evaluates the model in eval
mode (dropout off, BatchNorm on running statistics, so samples are independent) and restores
each submodule's mode afterwards; it never touches parameters, ``.grad`` or any random state (with ``create_graph`` the
caller's backward of the result fills ``.grad``).
Frozen parameters and buffers are constants. Work is split into chunks of samples so that what is
held at once fits ``memory_budget``. None of them is a collective: under torch.distributed each
rank measures the inputs it passes (:class:`~noisy_label_sgd.probe.RegularizerProbe` reduces over
the ranks' shards). The exception is a model sharded by FSDP: its parameters are gathered into an
unsharded replica first (:mod:`noisy_label_sgd.sharded`), so every rank calls; ``regularizer_grad``
and ``tangent_projection`` then return DTensors sharded like the parameters (FSDP2) or full tensors
under the full state dict's names (FSDP1), and need the same inputs on every rank.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .engines import select_engine
from .engines.functional import DEFAULT_MEMORY_BUDGET, Inputs, ParamDict
from .engines.tangent import check_solver, check_solver_options, project
from .sharded import gathered, sharded

__all__ = [
    "per_sample_sq_grad_norms",
    "implicit_regularizer",
    "regularizer_grad",
    "tangent_projection",
    "DEFAULT_MEMORY_BUDGET",
]


def per_sample_sq_grad_norms(
    model: nn.Module,
    inputs: Inputs,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> torch.Tensor:
    r"""Per-sample :math:`\|J_i\|_F^2 = \|\partial h(x_i;\theta)/\partial\theta\|_F^2`.

    Args:
        model: any module mapping a batch of inputs to a batch of predictions.
        inputs: a tensor [n, ...] or a sequence of tensors (the model's arguments) with a
            shared first dimension n.
        method: ``"fast"``: norm-only closed forms from layer inputs and output gradients
            (see :mod:`noisy_label_sgd.engines.fast`; other modules fall back per module);
            ``"vmap"``: torch.func per-sample Jacobians of the whole model; ``"auto"``: a
            model of closed-form layers gets fast; any other model with a small J (at most 64
            rows n k and 2^18 entries) gets J formed whole by one batched backward, one whose J
            fits ``memory_budget`` vmap, else fast with per-module fallbacks.
        chunk_size: samples per chunk; by default the largest chunk whose working set fits
            memory_budget: layer inputs, outputs and output gradients (fast) or per-sample
            Jacobians (vmap).
        memory_budget: bytes held at once (default: 1 GiB on the CPU; on an accelerator a
            quarter of the memory free for PyTorch when the engine is chosen, at least 1 GiB).

    Returns:
        a tensor of shape [n] (multi-output models: Frobenius norm over all output entries).

    Raises:
        ValueError: no trainable parameters, an empty probe set, mismatched inputs, a BatchNorm
            without running statistics, an output without a sample dimension, an unknown
            method, or ``method="fast"`` on a model it cannot handle.
        TypeError: a non-tensor model output.
    """
    model, _ = gathered(model, inputs)
    engine = select_engine(model, inputs, method, chunk_size=chunk_size, memory_budget=memory_budget)
    with engine.measuring():
        return engine.sq_norms()


def implicit_regularizer(
    model: nn.Module,
    inputs: Inputs,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    create_graph: bool = False,
) -> torch.Tensor:
    r""":math:`\mathrm{reg}(\theta) = \frac1n \sum_i \|J_i\|_F^2` (a 0-dim tensor).

    Equals the trace of the Gauss-Newton matrix :math:`\frac1n J^\top J`. Arguments as for
    :func:`per_sample_sq_grad_norms`.

    With ``create_graph=True`` it is a differentiable penalty, the mechanism of label noise made
    explicit and trained on directly, e.g.
    ``loss = mse(model(x), y) + lam * implicit_regularizer(model, x_probe, create_graph=True)``:
    ``loss.backward()`` adds ``lam`` times :func:`regularizer_grad` to the trainable parameters'
    ``.grad``. grad reg is computed here, with the value, by the engine's exact pass (a double
    backward through the closed forms where the fast path applies, forward-over-reverse
    torch.func otherwise: reverse-over-reverse under vmap is wrong through LayerNorm), so the
    backward holds one parameter-sized gradient, not a graph. It can be differentiated once (a
    second derivative raises). reg is measured in evaluation mode as always (dropout off,
    BatchNorm on running statistics), on a probe batch or the training batch.
    """
    if not create_graph or not torch.is_grad_enabled():
        return per_sample_sq_grad_norms(
            model, inputs, method=method, chunk_size=chunk_size, memory_budget=memory_budget
        ).mean()
    if sharded(model) is not None:
        raise NotImplementedError(
            "create_graph=True on an FSDP model: the penalty's gradient would reach the replica the probe "
            "measures, not FSDP's shards; add lam * regularizer_grad(model, x) to each parameter's .grad after "
            "the loss's backward instead")
    engine = select_engine(model, inputs, method, chunk_size=chunk_size, memory_budget=memory_budget)
    with engine.measuring():
        norms, grad_reg = engine.norms_and_grad()
    live = dict(engine.model.named_parameters())
    return _Penalty.apply(norms.mean(), tuple(grad_reg.values()), *(live[name] for name in grad_reg))


class _Penalty(torch.autograd.Function):
    """reg as a function of the live parameters, with the gradient measured beside it."""

    @staticmethod
    def forward(ctx, reg: torch.Tensor, grad_reg: tuple[torch.Tensor, ...], *params: torch.Tensor) -> torch.Tensor:
        ctx.grad_reg = grad_reg
        ctx.save_for_backward(*params)  # (a parameter changed in place before the backward raises)
        return reg.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        ctx.saved_tensors  # noqa: B018 (the version check)
        return (None, None, *(grad_output * g for g in ctx.grad_reg))


def regularizer_grad(
    model: nn.Module,
    inputs: Inputs,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
) -> ParamDict:
    r""":math:`\nabla_\theta \mathrm{reg} = \frac2n \sum_i \sum_j H_{ij} \nabla_\theta h_{ij}`.

    :math:`H_{ij}` is the Hessian of output entry :math:`j` of sample :math:`i`. ``"fast"``
    differentiates the closed-form norms once more (double backward; only when no module needs a
    per-module fallback); ``"vmap"`` is forward-over-reverse per sample and output, which stays
    exact through LayerNorm where reverse-over-reverse under vmap did not; ``"auto"``
    differentiates a small J (see :func:`per_sample_sq_grad_norms`) once more, else takes fast
    where it applies, else vmap. Arguments as for :func:`per_sample_sq_grad_norms`.

    Returns:
        a dict parameter name -> gradient, over the trainable parameters.
    """
    model, shards = gathered(model, inputs, "regularizer_grad")
    engine = select_engine(model, inputs, method, chunk_size=chunk_size, memory_budget=memory_budget)
    with engine.measuring():
        grad = engine.grad()
    return grad if shards is None else shards.to_model_layout(grad)


def tangent_projection(
    model: nn.Module,
    inputs: Inputs,
    vector: ParamDict,
    *,
    solver: str = "auto",
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int | None = None,
    rcond: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
) -> ParamDict:
    r"""Project ``vector`` on the tangent space :math:`T = \mathrm{null}(J)` of the zero-error manifold.

    :math:`P_T v = v - J^+ J v = v - J^\top (JJ^\top)^+ J v`.

    Args:
        model, inputs, method, chunk_size, memory_budget: as for :func:`per_sample_sq_grad_norms`.
        vector: dict parameter name -> tensor over the trainable parameters.
        solver: ``"dense"``: the row space of J from J in float64 (a QR factorisation of
            :math:`J^\top` and an SVD of its triangular factor; J formed by torch.func unless the
            engine holds it), or, where the fast engine has :math:`K = JJ^\top` (the empirical
            NTK, :math:`nk \times nk`) in closed form (Linear on 2-D inputs, LayerNorm,
            GroupNorm), :math:`K^+` from K's eigenvalues in float64 with J v, J^T u as a jvp and
            a vjp, never forming J; ``"lsqr"``: :math:`P_T v` as the residual of
            :math:`\min_u \|J^\top u - v\|` by LSQR on J v and J^T u products (from one forward
            kept for the solve where they fit ``memory_budget`` in one chunk), never forming J
            (accurate to cond(J), the row-space basis kept orthogonal within ``memory_budget``);
            ``"auto"``: dense where K has a closed form or J is held or fits ``memory_budget``,
            with :math:`nk \le 8192` (on an accelerator, K past it where K and its factor fit
            ``memory_budget``); else lsqr.
        rcond: relative singular-value cutoff of :math:`J^+` (dense): singular values of J below
            ``rcond`` times the largest count as zero; default
            :func:`~noisy_label_sgd.engines.tangent.default_rcond`: :math:`\sqrt{nk\,\varepsilon_{64}}`
            for float64 models, :math:`\sqrt{nk}\,\varepsilon_{32}` for float32 (the solver works
            in float64; the cutoff follows J's precision).
        tol: LSQR stops at :math:`\|J r\| \le tol\,\|J\|\,\|r\|` (r the result); default
            1e-14 (float64) or sqrt(eps).
        max_iter: LSQR iteration cap; default :math:`nk + 10`. It warns if it stops unconverged.

    Returns:
        :math:`P_T v` as a dict name -> tensor.
    """
    check_solver(solver)
    check_solver_options(rcond, tol, max_iter)
    if not isinstance(vector, dict):  # (before any forward of the model)
        check_vector({}, vector)
    model, shards = gathered(model, inputs, "tangent_projection")
    if shards is not None:
        vector = shards.from_model_layout(vector)
    engine = select_engine(model, inputs, method, chunk_size=chunk_size, memory_budget=memory_budget)
    with engine.measuring():
        fm = engine.fm
        v = fm.flatten(check_vector(fm.trainable, vector))
        projected = fm.unflatten(project(engine, v, solver=solver, rcond=rcond, tol=tol, max_iter=max_iter).vector)
    return projected if shards is None else shards.to_model_layout(projected)


def check_vector(params: ParamDict, vector: ParamDict) -> ParamDict:
    """``vector`` over the trainable parameters, in their dtype, or the error that says why not."""
    if not isinstance(vector, dict):
        raise TypeError(
            f"vector must be a dict name -> tensor over the trainable parameters, got "
            f"{type(vector).__name__}"
        )
    if set(vector) != set(params):
        raise ValueError(
            f"vector keys must be the trainable parameter names; missing "
            f"{sorted(set(params) - set(vector))}, unexpected {sorted(set(vector) - set(params))}"
        )
    for name, p in params.items():
        if not isinstance(vector[name], torch.Tensor):
            raise TypeError(f"vector[{name!r}] must be a tensor, got {type(vector[name]).__name__}")
        if vector[name].shape != p.shape:
            raise ValueError(f"vector[{name!r}] has shape {tuple(vector[name].shape)}, expected {tuple(p.shape)}")
    return {name: vector[name].to(p.dtype) for name, p in params.items()}
