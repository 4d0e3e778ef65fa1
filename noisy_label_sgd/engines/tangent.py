r"""Tangent-space solvers: :math:`P_T v = v - J^+ J v = v - J^\top K^+ J v`, :math:`K = JJ^\top`.

Written only against the engine interface (:class:`~noisy_label_sgd.engines.engine.Engine`:
``gram``, ``jacobian``, ``J_times``, ``J_transpose_times``), so a solver never knows which
engine answers:

* dense: :math:`K^+` on the eigenvalues of K above ``rcond**2`` times the largest; K from the
  engine where it forms K cheaply (closed forms, or a J the measurement already holds), else from
  J formed by torch.func;
* conjugate gradients on :math:`Ku = Jv`, matrix-free (jvp/vjp products; J never formed);
* distributed: conjugate gradients whose inner products and :math:`J^\top u` are summed over
  ranks (each rank holds the rows of J of its shard of the probe set).

``solver="auto"`` takes dense when the engine has K at hand or J fits the memory budget and
:math:`nk \le` :data:`~noisy_label_sgd.engines.engine.JACOBIAN_MAX_ROWS`, else conjugate gradients.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from .engine import JACOBIAN_MAX_ROWS, Engine

SOLVERS = ("auto", "dense", "cg")


def check_solver(solver: str) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"Invalid solver: {solver!r} (choose one of {SOLVERS})")


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


def project(engine: Engine, v: torch.Tensor, *, solver: str = "auto", rcond: float | None = None,
            tol: float | None = None, max_iter: int | None = None,
            all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """P_T v for a flat v over the engine's trainable parameters (inside ``engine.measuring()``).

    With ``all_reduce`` (this rank holds a shard of the rows of J) it always runs conjugate
    gradients, the solver whose only cross-rank need is a sum.
    """
    check_solver(solver)
    if all_reduce is not None:
        return project_cg(engine, v, tol, max_iter, all_reduce)
    if solver != "cg" and engine.rows <= JACOBIAN_MAX_ROWS:
        K = engine.gram()
        if K is not None:
            return project_dense(engine, K, v, rcond)
    if solver == "dense" or (solver == "auto" and engine.jacobian_fits()):
        J = engine.jacobian()
        return project_dense(engine, J @ J.T, v, rcond)
    return project_cg(engine, v, tol, max_iter)


def pinv_solve(K: torch.Tensor, b: torch.Tensor, rcond: float | None) -> torch.Tensor:
    """u = K^+ b on the eigenvalues of K above rcond^2 times the largest."""
    rcond = default_rcond(K.shape[0], K.dtype) if rcond is None else rcond
    eigenvalues, Q = torch.linalg.eigh(K)
    keep = eigenvalues > (rcond**2) * eigenvalues.max().clamp_min(0)
    inverse = torch.where(keep, 1.0 / eigenvalues.where(keep, torch.ones_like(eigenvalues)), 0.0)
    return Q @ (inverse * (Q.T @ b))


def project_dense(engine: Engine, K: torch.Tensor, v: torch.Tensor, rcond: float | None) -> torch.Tensor:
    return v - engine.J_transpose_times(pinv_solve(K, engine.J_times(v), rcond))


def project_cg(engine: Engine, v: torch.Tensor, tol: float | None, max_iter: int | None,
               all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """P_T v = v - J^T u with K u = J v solved by conjugate gradients, J never formed.

    CG started at 0 stays in range(K) = range(J), so it finds K^+ J v even though K is singular.
    Distributed (``all_reduce`` given): J^T u and every inner product are summed over ranks, so
    all ranks run the same iteration.
    """
    reduce = all_reduce or (lambda t: t)
    J_transpose_times = lambda u: reduce(engine.J_transpose_times(u))
    dot = lambda a, b: reduce(a.dot(b))
    b = engine.J_times(v)
    tol = default_cg_tol(v.dtype) if tol is None else tol
    rows = int(reduce(torch.tensor(float(b.numel()), dtype=b.dtype, device=b.device)).item())
    max_iter = 2 * rows + 10 if max_iter is None else max_iter  # the same on every rank
    u = torch.zeros_like(b)
    r, d = b.clone(), b.clone()
    rr = dot(r, r)
    target = tol**2 * rr
    for _ in range(max_iter):
        if rr <= target:
            break
        Kd = engine.J_times(J_transpose_times(d))
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
