r"""The implicit regularizer of label-noise SGD, as pure torch.func functions of a model's parameters.

Notation (see the package README): the model output of sample :math:`i` is flattened to
:math:`h_i \in \mathbb{R}^k`; :math:`\theta \in \mathbb{R}^p` are the trainable parameters in
``named_parameters()`` order; :math:`J_i = \partial h_i / \partial\theta \in \mathbb{R}^{k\times p}`
and :math:`J` is the :math:`nk \times p` stack.

* ``per_sample_sq_grad_norms``: :math:`\|J_i\|_F^2` for every sample;
* ``implicit_regularizer``: :math:`\mathrm{reg}(\theta) = \frac1n\sum_i \|J_i\|_F^2`;
* ``regularizer_grad``: :math:`\nabla\mathrm{reg} = \frac2n\sum_i\sum_j H_{ij}\,\nabla h_{ij}`,
  computed forward-over-reverse (a jvp of the per-output gradient in the direction of that
  gradient), which stays exact through LayerNorm where reverse-over-reverse under vmap did not;
* ``tangent_projection``: :math:`P_T v = v - J^+ J v`, the component of :math:`v` tangent to the
  zero-error manifold :math:`\{\theta: h_i(\theta) = y_i\ \forall i\}` (tangent space
  :math:`\mathrm{null}(J)`).

Every function evaluates the model in eval mode (dropout off, BatchNorm on running statistics, so
samples are independent) and restores each submodule's mode afterwards; it never touches
parameters, ``.grad`` or any random state. Frozen parameters and buffers are constants. Work is
split into chunks of samples so that the per-sample Jacobians held at once fit ``memory_budget``.
"""

from __future__ import annotations

import math
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from .fast_norms import FastPathUnsupported, closed_form_layers, fast_chunk_size, fast_gram, fast_sq_norms

__all__ = [
    "per_sample_sq_grad_norms",
    "implicit_regularizer",
    "regularizer_grad",
    "tangent_projection",
    "DEFAULT_MEMORY_BUDGET",
]

Inputs = torch.Tensor | Sequence[torch.Tensor]
ParamDict = dict[str, torch.Tensor]

DEFAULT_MEMORY_BUDGET = 1 << 30  # bytes of per-sample Jacobians held at once
DENSE_MAX_ROWS = 8192  # above this many rows of J, an eigendecomposition of K costs too much
# A J this small is cheapest formed whole by one backward batched over its n k rows: that costs
# n k backward passes of the whole batch, but for tiny models and probe sets the fixed cost of
# the per-sample paths is many times their arithmetic.
SMALL_JACOBIAN_MAX_ROWS = 64
SMALL_JACOBIAN_MAX_ENTRIES = 1 << 18
SOLVERS = ("auto", "dense", "cg")
METHODS = ("auto", "fast", "vmap")


# -- the model as a pure function ------------------------------------------------------------


def as_input_tuple(inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """Inputs as a tuple of tensors sharing a non-empty first (sample) dimension."""
    batch = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    if not batch or not all(isinstance(t, torch.Tensor) for t in batch):
        raise TypeError("inputs must be a tensor or a sequence of tensors (the model's arguments)")
    if any(t.dim() == 0 for t in batch):
        raise ValueError("inputs need a leading sample dimension, got a 0-dim tensor")
    n = batch[0].shape[0]
    if any(t.shape[0] != n for t in batch):
        raise ValueError(f"inputs disagree in their sample dimension: {[t.shape[0] for t in batch]}")
    if n == 0:
        raise ValueError("the probe set is empty (0 samples)")
    return batch


class FunctionalModel:
    """A module as a pure function of its trainable parameters (frozen ones and buffers fixed)."""

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.params: ParamDict = {
            name: p.detach() for name, p in model.named_parameters() if p.requires_grad
        }
        if not self.params:
            raise ValueError(
                "the model has no trainable parameters (requires_grad=True): reg is defined "
                "over trainable parameters only"
            )
        self.constants: ParamDict = {
            name: p.detach() for name, p in model.named_parameters() if not p.requires_grad
        }
        self.constants.update((name, b.detach()) for name, b in model.named_buffers())
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
                raise ValueError(
                    f"{type(module).__name__} without running statistics normalises with batch "
                    "statistics even in eval mode, so samples are not independent and "
                    "per-sample gradients are undefined; use track_running_stats=True or GroupNorm"
                )
        self.num_params = sum(p.numel() for p in self.params.values())
        first = next(iter(self.params.values()))
        self.dtype, self.device = first.dtype, first.device

    def batch_output(self, params: ParamDict, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Model outputs of a batch, flattened per sample: shape [b, k]."""
        return self._per_sample(functional_call(self.model, (params, self.constants), batch), batch)

    def live_output(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """batch_output at the module's own parameters, differentiable in them (with
        :meth:`live_params`): the same numbers, without functional_call's swap in and out."""
        return self._per_sample(self.model(*batch), batch)

    def live_params(self) -> list[torch.Tensor]:
        """The module's trainable parameters themselves, in the order of ``params``."""
        live = dict(self.model.named_parameters())
        return [live[name] for name in self.params]

    @staticmethod
    def _per_sample(out, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        if not isinstance(out, torch.Tensor):
            raise TypeError(
                f"the model must return a tensor of predictions, got {type(out).__name__}; wrap "
                "it in a module that returns the prediction tensor"
            )
        b = batch[0].shape[0]
        if out.dim() == 0 or out.shape[0] != b:
            raise ValueError(
                f"the model output has shape {tuple(out.shape)}; expected a leading sample "
                f"dimension of size {b}"
            )
        return out.reshape(b, -1)

    def sample_output(self, params: ParamDict, *sample: torch.Tensor) -> torch.Tensor:
        """Output of one sample, shape [k] (vmapped over samples by the callers)."""
        return self.batch_output(params, tuple(s.unsqueeze(0) for s in sample))[0]

    def output_size(self, batch: tuple[torch.Tensor, ...]) -> int:
        with torch.no_grad():
            return self.batch_output(self.params, tuple(t[:1] for t in batch)).shape[1]

    def jacobian_rows(self, jac: ParamDict) -> torch.Tensor:
        """Per-sample Jacobians (name -> [b, k, *param.shape]) as rows of J: [b k, p]."""
        blocks = (jac[name] for name in self.params)
        return torch.cat([j.reshape(j.shape[0] * j.shape[1], -1) for j in blocks], dim=1)

    def flatten(self, tensors: ParamDict) -> torch.Tensor:
        return torch.cat([tensors[name].reshape(-1) for name in self.params])

    def unflatten(self, flat: torch.Tensor) -> ParamDict:
        out, start = {}, 0
        for name, p in self.params.items():
            out[name] = flat[start : start + p.numel()].view_as(p)
            start += p.numel()
        return out


@contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, the math attention kernel (it has double backward), no RNG side effects."""
    modes = [(module, module.training) for module in model.modules()]
    cuda_devices = sorted(
        {t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"}
    )
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH), torch.random.fork_rng(devices=cuda_devices):
            yield
    finally:
        for module, training in modes:
            module.training = training


def fused_attention() -> AbstractContextManager:
    """Every scaled-dot-product attention kernel allowed again inside :func:`evaluation_mode`."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.MATH])


def chunk_slices(n: int, chunk_size: int) -> Iterator[slice]:
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def auto_chunk_size(
    fm: FunctionalModel, k: int, chunk_size: int | None, memory_budget: int, copies: int = 1
) -> int:
    """Samples per chunk so that ``copies`` per-sample Jacobians of [k, p] fit the budget."""
    if chunk_size is not None:
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"Invalid chunk_size: {chunk_size} (must be a positive int)")
        return int(chunk_size)
    itemsize = torch.empty((), dtype=fm.dtype).element_size()
    per_sample = max(1, copies * k * fm.num_params * itemsize)
    return max(1, memory_budget // per_sample)


# -- per-sample norms and reg ----------------------------------------------------------------


def per_sample_jacobians(fm: FunctionalModel, batch: tuple[torch.Tensor, ...]) -> ParamDict:
    """J_i for every sample of ``batch``: name -> [b, k, *param.shape]."""
    in_dims = (None,) + (0,) * len(batch)
    return vmap(jacrev(fm.sample_output), in_dims=in_dims)(fm.params, *batch)


def _sq_norms(fm: FunctionalModel, batch: tuple[torch.Tensor, ...], chunk: int) -> torch.Tensor:
    parts = []
    for s in chunk_slices(batch[0].shape[0], chunk):
        jac = per_sample_jacobians(fm, tuple(t[s] for t in batch))
        parts.append(sum(j.pow(2).flatten(1).sum(1) for j in jac.values()))
    return torch.cat(parts)


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"Invalid method: {method!r} (choose one of {METHODS})")


def _fast_chunks(model, batch, chunk_size, memory_budget):
    """fast_sq_norms over chunks of samples (by default as many as fit memory_budget)."""
    n = batch[0].shape[0]
    fitting, k = fast_chunk_size(model, batch, memory_budget)
    parts, fell_back = [], set()
    # Norms alone need no double backward: scalar outputs may take the fused attention kernels
    # training uses (their backward has no batching rule, which several output directions at
    # once would need)
    with fused_attention() if k == 1 else nullcontext():
        for s in chunk_slices(n, chunk_size or fitting):
            norms, modules = fast_sq_norms(model, tuple(t[s] for t in batch))
            parts.append(norms)
            fell_back.update(modules)
    return torch.cat(parts), sorted(fell_back)


def sq_norms_with_method(
    model: nn.Module, fm: FunctionalModel, batch, method: str, chunk_size, memory_budget
) -> tuple[torch.Tensor, str]:
    """Per-sample norms (model in evaluation mode) and a word on the path that computed them."""
    if method == "auto" and not closed_form_layers(model):
        small = small_jacobian_norms_and_grad(fm, batch, with_grad=False)
        if small is not None:
            return small[1], "jacobian"
    if method in ("auto", "fast"):
        try:
            norms, fell_back = _fast_chunks(model, batch, chunk_size, memory_budget)
            used = "fast" + (f" (per-module fallback: {', '.join(fell_back)})" if fell_back else "")
            return norms.detach(), used
        except FastPathUnsupported as why:
            if method == "fast":
                raise ValueError(f"method='fast' cannot handle this model: {why}") from None
    k = fm.output_size(batch)
    return _sq_norms(fm, batch, auto_chunk_size(fm, k, chunk_size, memory_budget)), "vmap"


def per_sample_sq_grad_norms(
    model: nn.Module,
    inputs: Inputs,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    r"""Per-sample :math:`\|J_i\|_F^2 = \|\partial h(x_i;\theta)/\partial\theta\|_F^2`.

    Args:
        model: any module mapping a batch of inputs to a batch of predictions.
        inputs: a tensor [n, ...] or a sequence of tensors (the model's arguments) with a
            shared first dimension n.
        method: ``"fast"``: norm-only closed forms from layer inputs and output gradients
            (see :mod:`noisy_label_sgd.fast_norms`; other modules fall back per module);
            ``"vmap"``: torch.func per-sample Jacobians of the whole model; ``"auto"``: a
            model of closed-form layers gets fast; any other model with a small J (at most 64
            rows n k and 2^18 entries) gets J formed whole by one batched backward, else fast with
            per-module fallbacks where the model allows, else vmap.
        chunk_size: samples per chunk; by default the largest chunk whose working set fits
            memory_budget: layer inputs, outputs and output gradients (fast) or per-sample
            Jacobians (vmap).
        memory_budget: bytes held at once (1 GiB).

    Returns:
        a tensor of shape [n] (multi-output models: Frobenius norm over all output entries).

    Raises:
        ValueError: no trainable parameters, an empty probe set, mismatched inputs, a BatchNorm
            without running statistics, an output without a sample dimension, an unknown
            method, or ``method="fast"`` on a model it cannot handle.
        TypeError: a non-tensor model output.
    """
    check_method(method)
    batch = as_input_tuple(inputs)
    with evaluation_mode(model):
        fm = FunctionalModel(model)
        chunk = None if chunk_size is None else auto_chunk_size(fm, 1, chunk_size, memory_budget)
        return sq_norms_with_method(model, fm, batch, method, chunk, memory_budget)[0]


def implicit_regularizer(
    model: nn.Module,
    inputs: Inputs,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> torch.Tensor:
    r""":math:`\mathrm{reg}(\theta) = \frac1n \sum_i \|J_i\|_F^2` (a 0-dim tensor).

    Equals the trace of the Gauss-Newton matrix :math:`\frac1n J^\top J`. Arguments as for
    :func:`per_sample_sq_grad_norms`.
    """
    return per_sample_sq_grad_norms(
        model, inputs, method=method, chunk_size=chunk_size, memory_budget=memory_budget
    ).mean()


# -- grad reg --------------------------------------------------------------------------------


def _reg_grad_sum(fm: FunctionalModel, batch: tuple[torch.Tensor, ...], k: int) -> tuple[ParamDict, ParamDict]:
    """sum_i sum_j H_ij grad h_ij over the samples of ``batch`` (forward-over-reverse), and
    the per-sample Jacobians it passes through on the way (name -> [b, k, *param.shape])."""
    directions = torch.eye(k, dtype=fm.dtype, device=fm.device)

    def hessian_times_gradient(direction: torch.Tensor, *sample: torch.Tensor) -> tuple[ParamDict, ParamDict]:
        output_j = lambda params: (fm.sample_output(params, *sample) * direction).sum()
        gradient = grad(output_j)(fm.params)
        return jvp(grad(output_j), (fm.params,), (gradient,))[1], gradient

    def per_sample(*sample: torch.Tensor) -> tuple[ParamDict, ParamDict]:
        per_output = vmap(hessian_times_gradient, in_dims=(0,) + (None,) * len(sample))
        products, gradients = per_output(directions, *sample)
        return {n: v.sum(0) for n, v in products.items()}, gradients

    summed, jac = vmap(per_sample)(*batch)
    return {n: v.sum(0) for n, v in summed.items()}, jac


def regularizer_grad(
    model: nn.Module,
    inputs: Inputs,
    *,
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> ParamDict:
    r""":math:`\nabla_\theta \mathrm{reg} = \frac2n \sum_i \sum_j H_{ij} \nabla_\theta h_{ij}`.

    :math:`H_{ij}` is the Hessian of output entry :math:`j` of sample :math:`i`. ``"fast"``
    differentiates the closed-form norms once more (double backward; only when no module needs a
    per-module fallback); ``"vmap"`` is forward-over-reverse per sample and output; ``"auto"``
    differentiates a small J (see :func:`per_sample_sq_grad_norms`) once more, else takes fast
    where it applies, else vmap. Arguments as for :func:`per_sample_sq_grad_norms`.

    Returns:
        a dict parameter name -> gradient, over the trainable parameters.
    """
    check_method(method)
    batch = as_input_tuple(inputs)
    with evaluation_mode(model):
        fm = FunctionalModel(model)
        return reg_grad_with_method(model, fm, batch, method, chunk_size, memory_budget)


def _fast_norms_and_grad(
    model: nn.Module, fm: FunctionalModel, batch, chunk_size, memory_budget
) -> tuple[torch.Tensor, ParamDict]:
    """Per-sample norms and grad reg from one pass: double backward through the closed forms."""
    named = {name: p for name, p in model.named_parameters() if name in fm.params}
    n = batch[0].shape[0]
    total = {name: torch.zeros_like(p) for name, p in fm.params.items()}
    parts = []
    # the double backward keeps about twice the first backward's tensors
    chunk = chunk_size or max(1, fast_chunk_size(model, batch, memory_budget)[0] // 2)
    for s in chunk_slices(n, chunk):
        norms, _ = fast_sq_norms(model, tuple(t[s] for t in batch), create_graph=True)
        grads = torch.autograd.grad(norms.sum(), list(named.values()), allow_unused=True)
        for name, g in zip(named, grads):
            if g is not None:
                total[name] += g.detach()
        parts.append(norms.detach())
    return torch.cat(parts), {name: v.mul_(1.0 / n) for name, v in total.items()}


def reg_grad_with_method(model, fm, batch, method, chunk_size, memory_budget) -> ParamDict:
    if method == "auto" and not closed_form_layers(model):
        small = small_jacobian_norms_and_grad(fm, batch)
        if small is not None:
            return small[2]
    if method in ("auto", "fast"):
        try:
            return _fast_norms_and_grad(model, fm, batch, chunk_size, memory_budget)[1]
        except FastPathUnsupported as why:
            if method == "fast":
                raise ValueError(f"method='fast' cannot differentiate this model's norms: {why}") from None
    return _reg_grad(fm, batch, chunk_size, memory_budget)


def norms_and_grad_with_method(
    model, fm, batch, method, chunk_size, memory_budget
) -> tuple[torch.Tensor, ParamDict, str]:
    """What the probe needs: norms, grad reg and the path, sharing one pass when it can.

    With ``method="fast"`` only the norms must come from the fast path: a model whose norms
    need a per-module fallback gets its gradient from the vmap path.
    """
    closed_forms = closed_form_layers(model)
    if method == "auto" and not closed_forms:
        small = small_jacobian_norms_and_grad(fm, batch)
        if small is not None:
            return small[1], small[2], "jacobian"
    if method in ("auto", "fast") and closed_forms:  # else the fast double backward must refuse
        try:
            norms, grad_reg = _fast_norms_and_grad(model, fm, batch, chunk_size, memory_budget)
            return norms, grad_reg, "fast"
        except FastPathUnsupported:
            pass
    norms, used = sq_norms_with_method(model, fm, batch, method, chunk_size, memory_budget)
    grad_method = "auto" if method == "fast" else method
    return norms, reg_grad_with_method(model, fm, batch, grad_method, chunk_size, memory_budget), used


def is_small_jacobian(fm: FunctionalModel, rows: int) -> bool:
    return rows <= SMALL_JACOBIAN_MAX_ROWS and rows * fm.num_params <= SMALL_JACOBIAN_MAX_ENTRIES


def small_jacobian_norms_and_grad(
    fm: FunctionalModel, batch: tuple[torch.Tensor, ...], with_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, ParamDict | None, torch.Tensor] | None:
    """J ([n k, p]), the per-sample norms, grad reg (``with_grad``) and the outputs [n, k];
    None when J is not small (:func:`is_small_jacobian`: known once the outputs are).

    J comes from one backward of the batch outputs batched over its n k rows, grad reg from one
    more backward of ||J||_F^2 / n (reverse over reverse). Some ops lack a batched double
    backward (GroupNorm in torch 2.13 raises): then J is formed row by row instead. The work is
    n k backward passes of the whole batch, so this is only for a small J.
    """
    if not is_small_jacobian(fm, batch[0].shape[0]):
        return None
    # the live parameters: autograd.grad never touches their .grad; a probe of a few rows is
    # mostly per-op overhead, and functional_call's swap is a tenth of it
    leaves = fm.live_params()

    def differentiate(jac: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, ParamDict | None]:
        J = torch.cat([j.reshape(n * k, -1) for j in jac], dim=1)
        norms = J.pow(2).sum(1).view(n, k).sum(1)
        if not with_grad:
            return J, norms, None
        grads = torch.autograd.grad(norms.sum() / n, leaves, allow_unused=True, materialize_grads=True)
        return J, norms, dict(zip(fm.params, grads))

    with torch.enable_grad():
        out = fm.live_output(batch)
        n, k = out.shape
        if not is_small_jacobian(fm, n * k):
            return None
        try:
            if n * k == 1:  # one row: a plain backward, without the batching machinery
                jac = [j.unsqueeze(0) for j in torch.autograd.grad(
                    out.sum(), leaves, retain_graph=with_grad, create_graph=with_grad, allow_unused=True,
                    materialize_grads=True)]
            else:
                rows = torch.eye(n * k, dtype=out.dtype, device=out.device).view(n * k, n, k)
                jac = torch.autograd.grad(out, leaves, rows, is_grads_batched=True, retain_graph=with_grad,
                                          create_graph=with_grad, allow_unused=True, materialize_grads=True)
            J, norms, grad_reg = differentiate(jac)
        except RuntimeError:
            if not with_grad:
                raise
            per_row = [torch.autograd.grad(out.reshape(-1)[r], leaves, retain_graph=True, create_graph=True,
                                           allow_unused=True, materialize_grads=True) for r in range(n * k)]
            J, norms, grad_reg = differentiate([torch.stack(js) for js in zip(*per_row)])
    return J.detach(), norms.detach(), grad_reg, out.detach()


def _reg_grad(fm: FunctionalModel, batch, chunk_size, memory_budget) -> ParamDict:
    return reg_grad_and_jacobian(fm, batch, chunk_size, memory_budget, keep_jacobian=False)[0]


def reg_grad_and_jacobian(
    fm: FunctionalModel, batch, chunk_size, memory_budget, keep_jacobian: bool = True
) -> tuple[ParamDict, torch.Tensor | None]:
    """grad reg, and J [n k, p] (``keep_jacobian``: the caller checked that it fits), which the
    forward-over-reverse forms anyway."""
    n = batch[0].shape[0]
    k = fm.output_size(batch)
    # per sample and output: the gradient, its jvp and the jvp's primal: ~3 Jacobian copies
    chunk = auto_chunk_size(fm, k, chunk_size, memory_budget, copies=3)
    total = {name: torch.zeros_like(p) for name, p in fm.params.items()}
    rows = []
    for s in chunk_slices(n, chunk):
        products, jac = _reg_grad_sum(fm, tuple(t[s] for t in batch), k)
        for name, v in products.items():
            total[name] += v
        if keep_jacobian:
            rows.append(fm.jacobian_rows(jac))
    J = torch.cat(rows) if keep_jacobian else None
    return {name: v.mul_(2.0 / n) for name, v in total.items()}, J


# -- tangent projection ----------------------------------------------------------------------


def default_rcond(rows: int, dtype: torch.dtype) -> float:
    r"""Relative singular-value cutoff of :math:`J^+`: :math:`\sqrt{nk\,\varepsilon}`.

    The dense solver works with eigenvalues :math:`\lambda = s^2` of :math:`K = JJ^\top`, which are
    resolved only down to about :math:`nk\,\varepsilon\,\lambda_{max}`; singular values below
    :math:`\sqrt{nk\,\varepsilon}\, s_{max}` are treated as zero.
    """
    return math.sqrt(rows * torch.finfo(dtype).eps)


def default_cg_tol(dtype: torch.dtype) -> float:
    """CG stops at ||K u - J v|| <= tol ||J v||: 1e-10 in float64, sqrt(eps) in lower precision
    (where the jvp/vjp products themselves carry relative errors of order 1e-5 and more)."""
    return 1e-10 if torch.finfo(dtype).eps < 1e-15 else math.sqrt(torch.finfo(dtype).eps)


def jacobian_matrix(fm: FunctionalModel, batch, chunk: int) -> torch.Tensor:
    """J as an [n k, p] matrix, rows sample-major, columns in named_parameters() order."""
    rows = []
    for s in chunk_slices(batch[0].shape[0], chunk):
        rows.append(fm.jacobian_rows(per_sample_jacobians(fm, tuple(t[s] for t in batch))))
    return torch.cat(rows)


def _pinv_solve(K: torch.Tensor, b: torch.Tensor, rcond: float | None) -> torch.Tensor:
    """u = K^+ b on the eigenvalues of K above rcond^2 times the largest."""
    rcond = default_rcond(K.shape[0], K.dtype) if rcond is None else rcond
    eigenvalues, Q = torch.linalg.eigh(K)
    keep = eigenvalues > (rcond**2) * eigenvalues.max().clamp_min(0)
    inverse = torch.where(keep, 1.0 / eigenvalues.where(keep, torch.ones_like(eigenvalues)), 0.0)
    return Q @ (inverse * (Q.T @ b))


def project_with_jacobian(J: torch.Tensor, v: torch.Tensor, rcond: float | None = None) -> torch.Tensor:
    """P_T v = v - J^T K^+ J v with K = J J^T, for a J at hand."""
    return v - J.T @ _pinv_solve(J @ J.T, J @ v, rcond)


def _project_dense(fm, batch, v: torch.Tensor, chunk: int, rcond: float | None) -> torch.Tensor:
    return project_with_jacobian(jacobian_matrix(fm, batch, chunk), v, rcond)


def _chunks(batch, chunk: int) -> list[tuple[torch.Tensor, ...]]:
    return [tuple(t[s] for t in batch) for s in chunk_slices(batch[0].shape[0], chunk)]


def _J_times(fm: FunctionalModel, chunks, w: torch.Tensor) -> torch.Tensor:
    """J w: a jvp of the batched outputs per chunk (forward mode, J never formed)."""
    tangent = fm.unflatten(w)
    return torch.cat(
        [jvp(lambda p: fm.batch_output(p, c), (fm.params,), (tangent,))[1].reshape(-1) for c in chunks]
    )


def _J_transpose_times(fm: FunctionalModel, chunks, u: torch.Tensor) -> torch.Tensor:
    """J^T u: a vjp of the batched outputs per chunk."""
    total = torch.zeros(fm.num_params, dtype=fm.dtype, device=fm.device)
    start = 0
    for c in chunks:
        out, pullback = vjp(lambda p: fm.batch_output(p, c), fm.params)
        total += fm.flatten(pullback(u[start : start + out.numel()].view_as(out))[0])
        start += out.numel()
    return total


def _project_gram(model, fm, batch, v: torch.Tensor, chunk: int, rcond: float | None) -> torch.Tensor:
    """Dense solve with K = J J^T from the fast path's closed forms; J v and J^T u matrix-free."""
    K = fast_gram(model, batch)
    chunks = _chunks(batch, chunk)
    return v - _J_transpose_times(fm, chunks, _pinv_solve(K, _J_times(fm, chunks, v), rcond))


def _project_cg(fm, batch, v: torch.Tensor, chunk: int, tol: float | None, max_iter: int | None,
                all_reduce=None):
    """P_T v = v - J^T u with K u = J v solved by conjugate gradients, J never formed.

    CG started at 0 stays in range(K) = range(J), so it finds K^+ J v even though K is singular.
    Distributed (``all_reduce`` given): each rank holds the rows of J of its shard; J^T u and
    every inner product are summed over ranks, so all ranks run the same iteration.
    """
    reduce = all_reduce or (lambda t: t)
    chunks = _chunks(batch, chunk)
    J_transpose_times = lambda u: reduce(_J_transpose_times(fm, chunks, u))
    dot = lambda a, b: reduce(a.dot(b))
    b = _J_times(fm, chunks, v)
    tol = default_cg_tol(fm.dtype) if tol is None else tol
    rows = int(reduce(torch.tensor(float(b.numel()), dtype=b.dtype, device=b.device)).item())
    max_iter = 2 * rows + 10 if max_iter is None else max_iter  # the same on every rank
    u = torch.zeros_like(b)
    r, d = b.clone(), b.clone()
    rr = dot(r, r)
    target = tol**2 * rr
    for _ in range(max_iter):
        if rr <= target:
            break
        Kd = _J_times(fm, chunks, J_transpose_times(d))
        alpha = rr / dot(d, Kd)
        u += alpha * d
        r -= alpha * Kd
        rr_new = dot(r, r)
        d = r + (rr_new / rr) * d
        rr = rr_new
    else:
        if rr > target:
            warnings.warn(
                f"tangent_projection: CG stopped after {max_iter} iterations at relative residual "
                f"{float((rr / dot(b, b)).sqrt()):.2e} > tol {tol:.1e}; J is ill-conditioned, try "
                "solver='dense'",
                stacklevel=3,
            )
    return v - J_transpose_times(u)


def choose_solver(fm: FunctionalModel, rows: int, memory_budget: int) -> str:
    itemsize = torch.empty((), dtype=fm.dtype).element_size()
    fits = rows * fm.num_params * itemsize <= memory_budget and rows <= DENSE_MAX_ROWS
    return "dense" if fits else "cg"


def _check_vector(fm: FunctionalModel, vector: ParamDict) -> torch.Tensor:
    if not isinstance(vector, dict):
        raise TypeError(
            f"vector must be a dict name -> tensor over the trainable parameters, got "
            f"{type(vector).__name__}"
        )
    if set(vector) != set(fm.params):
        raise ValueError(
            f"vector keys must be the trainable parameter names; missing "
            f"{sorted(set(fm.params) - set(vector))}, unexpected {sorted(set(vector) - set(fm.params))}"
        )
    for name, p in fm.params.items():
        if vector[name].shape != p.shape:
            raise ValueError(f"vector[{name!r}] has shape {tuple(vector[name].shape)}, expected {tuple(p.shape)}")
    return fm.flatten({n: t.to(fm.dtype) for n, t in vector.items()})


def project(
    model: nn.Module,
    fm: FunctionalModel,
    batch: tuple[torch.Tensor, ...],
    vector: ParamDict,
    *,
    solver: str,
    method: str = "auto",
    chunk_size: int | None,
    memory_budget: int,
    rcond: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
    all_reduce=None,
) -> ParamDict:
    """tangent_projection on a FunctionalModel already in evaluation mode.

    With ``all_reduce`` (distributed: this rank holds a shard of the rows of J) it always runs
    conjugate gradients, the solver whose only cross-rank need is a sum.
    """
    if solver not in SOLVERS:
        raise ValueError(f"Invalid solver: {solver!r} (choose one of {SOLVERS})")
    v = _check_vector(fm, vector)
    k = fm.output_size(batch)
    chunk = auto_chunk_size(fm, k, chunk_size, memory_budget)
    rows = batch[0].shape[0] * k
    if all_reduce is not None:
        return fm.unflatten(_project_cg(fm, batch, v, chunk, tol, max_iter, all_reduce))
    if solver in ("auto", "dense") and method in ("auto", "fast") and rows <= DENSE_MAX_ROWS:
        try:
            return fm.unflatten(_project_gram(model, fm, batch, v, chunk, rcond))
        except FastPathUnsupported:
            pass
    if solver == "auto":
        solver = choose_solver(fm, rows, memory_budget)
    if solver == "dense":
        return fm.unflatten(_project_dense(fm, batch, v, chunk, rcond))
    return fm.unflatten(_project_cg(fm, batch, v, chunk, tol, max_iter))


def tangent_projection(
    model: nn.Module,
    inputs: Inputs,
    vector: ParamDict,
    *,
    solver: str = "auto",
    method: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    rcond: float | None = None,
    tol: float | None = None,
    max_iter: int | None = None,
) -> ParamDict:
    r"""Project ``vector`` on the tangent space :math:`T = \mathrm{null}(J)` of the zero-error manifold.

    :math:`P_T v = v - J^+ J v = v - J^\top (JJ^\top)^+ J v`.

    Args:
        model, inputs, chunk_size, memory_budget: as for :func:`per_sample_sq_grad_norms`.
        vector: dict parameter name -> tensor over the trainable parameters.
        solver: ``"dense"`` forms :math:`K = JJ^\top` (the empirical NTK, :math:`nk \times nk`)
            and inverts it on the eigenvalues above ``rcond**2 * max eigenvalue``; ``"cg"``
            solves :math:`K u = Jv` by conjugate gradients with jvp/vjp products, never forming
            J; ``"auto"`` takes dense when J fits ``memory_budget`` and
            :math:`nk \le 8192`, else cg. With ``method`` "fast"/"auto", a model of Linear
            (2-D inputs), LayerNorm and GroupNorm layers gets K in closed form from the fast
            path and J v, J^T u as a jvp and a vjp: dense without ever forming J.
        rcond: relative singular-value cutoff of :math:`J^+` (dense); default
            :func:`default_rcond` = :math:`\sqrt{nk\,\varepsilon}`.
        tol: CG relative residual tolerance; default 1e-10 (float64) or sqrt(eps).
        max_iter: CG iteration cap; default :math:`2nk + 10`. CG warns if it stops unconverged.

    Returns:
        :math:`P_T v` as a dict name -> tensor.
    """
    check_method(method)
    batch = as_input_tuple(inputs)
    with evaluation_mode(model):
        fm = FunctionalModel(model)
        return project(
            model, fm, batch, vector, solver=solver, method=method, chunk_size=chunk_size,
            memory_budget=memory_budget, rcond=rcond, tol=tol, max_iter=max_iter,
        )
