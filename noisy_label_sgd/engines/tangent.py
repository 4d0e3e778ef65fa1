r"""Tangent-space solvers: :math:`P_T v = v - J^+ J v`, the part of v in :math:`\mathrm{null}(J)`.

Written only against the engine interface (:class:`~noisy_label_sgd.engines.engine.Engine`:
``jacobian``, ``gram``, ``J_times``, ``J_transpose_times``), so a solver never knows which
engine answers:

* dense on J, for a J formed in float64 (the jacobian and vmap engines hold it, the fast engine
  forms it from its trace, torch.func otherwise, when it fits): the row space of J from J itself:
  a QR factorisation of :math:`J^\top` and an SVD of its small triangular factor, backward
  stable on J (relative errors of :math:`\varepsilon_{64}` in the singular values, not of
  :math:`\varepsilon_{64}\,\mathrm{cond}(J)^2` as through :math:`JJ^\top`), at 2.4-3x the
  time of forming K and its eigendecomposition;
* dense on K: where the engine forms :math:`K = JJ^\top` in closed form without J (the fast
  engine on Linear/LayerNorm/GroupNorm models), layer by layer from per-sample gradients where
  J is too large to form (the fast engine's convolutional models), or from a J of lower precision (float32: its own
  rounding, :math:`\varepsilon_{32}\,\mathrm{cond}(J)`, exceeds what K in float64 adds,
  :math:`\varepsilon_{64}\,\mathrm{cond}(J)^2`, for every singular value above the cutoff),
  :math:`K^+` from K's eigenvalues in float64 (from 512 rows on :math:`K^{-1}` by a Cholesky
  factorisation where one certifies that every eigenvalue is above the cutoff:
  :func:`project_on_gram`), with J v and J^T u from J or as a jvp and a vjp;
* LSQR on :math:`\min_u \|J^\top u - v\|`, matrix-free (J never formed; J v and J^T u from one
  forward kept for the solve: :meth:`~noisy_label_sgd.engines.engine.Engine.linear_products`),
  whose residual is :math:`P_T v`; accurate to cond(J), with the row-space basis kept
  orthogonal;
* distributed: LSQR whose inner products and :math:`J^\top u` are summed over ranks (each rank
  holds the rows of J of its shard of the probe set).

Both dense solvers keep the singular values of J above ``rcond`` times the largest
(:func:`default_rcond`: one rule, so that the engines agree) and say how many they kept
(:class:`Projection`). ``solver="auto"`` takes dense when J is at hand, K has a closed form, J
fits the memory budget, or K can be accumulated layer by layer, with :math:`nk \le`
:data:`~noisy_label_sgd.engines.engine.JACOBIAN_MAX_ROWS`, or on an accelerator for K more
rows where K and its factor fit the memory budget (:func:`gram_solve_fits`); else LSQR.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..arguments import check_positive_int, is_real
from .engine import JACOBIAN_MAX_ROWS, Engine

SOLVERS = ("auto", "dense", "lsqr")


def check_solver(solver: str) -> None:
    if solver == "cg":
        raise ValueError("solver='cg' was replaced by 'lsqr': least squares on J itself, accurate to cond(J) "
                         "where conjugate gradients on J J^T lost cond(J)^2")
    if solver not in SOLVERS:
        raise ValueError(f"Invalid solver: {solver!r} (choose one of {SOLVERS})")


def check_solver_options(rcond: float | None, tol: float | None, max_iter: int | None) -> None:
    """The projection's options, refused alike whichever solver would run: ``rcond`` a real in
    [0, 1), ``tol`` a real in (0, 1), ``max_iter`` an int >= 1 (None: the defaults)."""
    if rcond is not None and not (is_real(rcond) and 0 <= rcond < 1):  # (NaN fails the comparison)
        raise ValueError(f"Invalid rcond: {rcond!r} (must be a real number in [0, 1))")
    if tol is not None and not (is_real(tol) and 0 < tol < 1):
        raise ValueError(f"Invalid tol: {tol!r} (must be a real number in (0, 1))")
    check_positive_int("max_iter", max_iter)


def default_rcond(rows: int, dtype: torch.dtype) -> float:
    r"""Relative singular-value cutoff of :math:`J^+` for a J computed in ``dtype``: singular
    values of J below ``rcond`` times the largest count as zero (their directions as tangent).

    J itself carries relative errors of :math:`\varepsilon` of its dtype, which move its singular
    values by about :math:`\sqrt{nk}\,\varepsilon\, s_{max}`. Where K is decomposed instead of J
    (its closed form, in float64), its eigenvalues :math:`\lambda = s^2` are resolved down to
    about :math:`nk\,\varepsilon_{64}\lambda_{max}`, so singular values below
    :math:`\sqrt{nk\,\varepsilon_{64}}\, s_{max}` are not resolved. The cutoff is the larger of the
    two, for both dense solvers alike (the engines then agree): for float64,
    :math:`\sqrt{nk\,\varepsilon_{64}}` (4.7e-7 for a thousand rows); for float32,
    :math:`\sqrt{nk}\,\varepsilon_{32}` (2.9e-7 for six rows, 3.8e-6 for a thousand).
    """
    return max(math.sqrt(rows * torch.finfo(torch.float64).eps), math.sqrt(rows) * torch.finfo(dtype).eps)


def default_lsqr_tol(dtype: torch.dtype) -> float:
    r"""LSQR stops when :math:`\|J r\| \le tol\,\|J\|\,\|r\|` for the residual r = P_T v (r
    orthogonal to the row space of J), which leaves r about tol cond(J) off: 1e-14 in float64,
    16 eps in lower precision (where the jvp/vjp products themselves carry relative errors of
    eps: once the row space is exhausted, the next direction is their rounding)."""
    return 1e-14 if torch.finfo(dtype).eps < 1e-15 else 16 * torch.finfo(dtype).eps


def default_max_iter(rows: int) -> int:
    """Iterations of LSQR: nk + 10. With the row-space basis kept orthogonal, nk iterations span
    the whole row space, so the solve ends by then at the latest."""
    return rows + 10


@dataclass
class Projection:
    """P_T v, and where a dense solver ran, the numerical rank of J it used and the ratio of the
    smallest singular value it kept to the largest (0-dim tensors: no host sync until read). The
    ratio may be given as a function, computed at the first read (the Cholesky solve's costs
    about one more factorisation, which a caller that wants only the vector does not pay)."""

    vector: torch.Tensor
    rank: torch.Tensor | None = None
    ratio: torch.Tensor | Callable[[], torch.Tensor] | None = None

    @property
    def smallest_kept_ratio(self) -> torch.Tensor | None:
        if callable(self.ratio):
            self.ratio = self.ratio()
        return self.ratio

    def to(self, dtype: torch.dtype) -> Projection:
        return Projection(self.vector.to(dtype), self.rank, self.ratio)


def project(engine: Engine, v: torch.Tensor, *, solver: str = "auto", rcond: float | None = None,
            tol: float | None = None, max_iter: int | None = None,
            all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> Projection:
    """P_T v for a flat v over the engine's trainable parameters (inside ``engine.measuring()``).

    The solvers' own arithmetic runs in float64 whatever the model's dtype; J, J v and J^T u come
    from the engine in the model's dtype. The vector is returned in v's dtype. With
    ``all_reduce`` (this rank holds a shard of the rows of J) it always runs LSQR, the solver
    whose only cross-rank need is a sum.
    """
    check_solver(solver)
    check_solver_options(rcond, tol, max_iter)
    rcond = default_rcond(engine.rows, v.dtype) if rcond is None else float(rcond)
    products = Products(engine, v.dtype, all_reduce)
    v64 = v.double()
    dense = all_reduce is None and solver != "lsqr"
    J = engine.measurement.jacobian if dense else None
    if dense and J is None:
        gram_fits = gram_solve_fits(engine.rows, engine.memory_budget, v.device)
        K = engine.gram() if gram_fits else None
        if K is None and gram_fits and not engine.jacobian_fits():
            K = engine.gram_by_layers()  # J too large to form: K a layer at a time, if the engine can
        if K is not None:
            return project_on_gram(products, K, v64, rcond).to(v.dtype)
        if solver == "dense" or engine.jacobian_fits():
            J = engine.jacobian()
    if J is not None and J.dtype == torch.float64:
        return project_on_jacobian(J, v64, rcond).to(v.dtype)
    if J is not None:
        J64 = J.double()
        return project_on_gram(products, J64 @ J64.T, v64, rcond).to(v.dtype)
    return Projection(project_lsqr(products, v64, tol, max_iter, engine.memory_budget).to(v.dtype))


def gram_solve_fits(rows: int, memory_budget: int, device: torch.device) -> bool:
    """Whether the dense solve on K may run: nk is at most
    :data:`~noisy_label_sgd.engines.engine.JACOBIAN_MAX_ROWS` (what the default CPU budget of
    1 GiB holds), or on an accelerator K and its factor (two float64 [nk, nk]) fit the memory
    budget. Not past it on the CPU, whatever the budget: there the dense solve's arithmetic,
    about (nk)^3 / 3 for the factor and (nk)^2 a layer width for K, outgrew LSQR's iterations
    (measured in benchmarks/README.md, projection_scaling.py). An accelerator does that
    arithmetic fast, and LSQR's host sync an iteration stalls it."""
    from . import functional  # (functional imports the engines' modules)

    return rows <= JACOBIAN_MAX_ROWS or functional.launch_bound(device) and 2 * 8 * rows * rows <= memory_budget


class Products:
    """J v and J^T u in float64 for the solvers, from the engine's products in the model's dtype;
    J^T u summed over ranks where ``all_reduce`` is given (each rank holds its rows of J)."""

    def __init__(self, engine: Engine, dtype: torch.dtype,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.engine, self.dtype = engine, dtype
        self.reduce = all_reduce or (lambda t: t)
        self._times, self._transpose_times = engine.J_times, engine.J_transpose_times

    def for_iterations(self) -> None:
        """From here on the products of an iterative solve: J v and J^T u from one forward kept
        for all of them (:meth:`~noisy_label_sgd.engines.engine.Engine.linear_products`), not one
        each."""
        with self._own_dtype():
            self._times, self._transpose_times = self.engine.linear_products()

    def J_times(self, v: torch.Tensor) -> torch.Tensor:
        with self._own_dtype():
            return self._times(v.to(self.dtype)).double()

    def J_transpose_times(self, u: torch.Tensor) -> torch.Tensor:
        with self._own_dtype():
            return self.reduce(self._transpose_times(u.to(self.dtype)).double())

    def _own_dtype(self):
        """Autocast off: a jvp under it met bfloat16 weights with float32 tangents (a convolution
        raised), and the solver wants the products in the parameters' dtype anyway."""
        return torch.autocast(self.engine.batch[0].device.type, enabled=False)

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """An inner product of two vectors over the rows of J (summed over ranks)."""
        return self.reduce(a.dot(b))


def project_on_jacobian(J: torch.Tensor, v: torch.Tensor, rcond: float) -> Projection:
    """v minus its part in the row space of J, spanned by the right singular vectors of J with
    singular values above rcond times the largest: J^T = QR, R^T = U S W^T, so J = U S (QW)^T."""
    Q, R = torch.linalg.qr(J.double().T)  # Q [p, m], R [m, nk], m = min(p, nk)
    _, s, Wt = torch.linalg.svd(R.T, full_matrices=False)
    keep = s > rcond * s[0]
    coefficients = torch.where(keep, Wt @ (Q.T @ v), 0.0)  # v on the singular vectors kept
    return Projection(v - Q @ (Wt.T @ coefficients), *kept(s, keep))


# From this many rows on, the dense solve on K tries a Cholesky factorisation first: n^3 / 3
# arithmetic against the eigendecomposition's about 9 n^3, the cost that made the dense projection
# grow like (nk)^3 (benchmarks/README.md); below it, the eigendecomposition costs little and gives
# the spectrum exactly.
CHOLESKY_MIN_ROWS = 512
SPECTRUM_BLOCK, SPECTRUM_ITERATIONS = 16, 20  # subspace iteration for the extreme eigenvalues
CG_STEPS = 6  # preconditioned conjugate-gradient steps of the Cholesky solve
# the residual the Cholesky solve must reach, relative to (bound on the largest eigenvalue) x |u|:
# about what a backward-stable solve leaves in float64 at these sizes
CG_RESIDUAL_RTOL = 1e-12


def project_on_gram(products: Products, K: torch.Tensor, v: torch.Tensor, rcond: float) -> Projection:
    """v - J^T K^+ J v, K^+ on the eigenvalues of K (singular values of J squared) above
    rcond^2 times the largest.

    From :data:`CHOLESKY_MIN_ROWS` rows on, K^+ is K^{-1} where that is certified to be the same
    thing (:func:`certified_solve`); the rank is then nk, and the smallest kept singular value
    over the largest is estimated on the factor when it is read (:func:`extreme_singular_ratio`,
    an upper bound). Otherwise (K singular, or an eigenvalue near or below the cutoff) the
    eigendecomposition runs."""
    K = K.double()
    Jv = products.J_times(v)
    if K.shape[0] >= CHOLESKY_MIN_ROWS:
        solved = certified_solve(K, Jv, rcond)
        if solved is not None:
            u, factor = solved
            return Projection(v - products.J_transpose_times(u), torch.tensor(K.shape[0], device=K.device),
                              lambda: extreme_singular_ratio(K, factor))
    eigenvalues, Q = torch.linalg.eigh(K)
    keep = eigenvalues > (rcond**2) * eigenvalues.max().clamp_min(0)
    inverse = torch.where(keep, 1.0 / eigenvalues.where(keep, torch.ones_like(eigenvalues)), 0.0)
    u = Q @ (inverse * (Q.T @ Jv))
    return Projection(v - products.J_transpose_times(u), *kept(eigenvalues.clamp_min(0).sqrt(), keep))


def certified_solve(K: torch.Tensor, b: torch.Tensor, rcond: float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """K^{-1} b and the lower Cholesky factor L of K - tau I, where that factor exists, tau the
    cutoff on K's eigenvalues: rcond^2 times an upper bound of the largest (the trace or the
    largest absolute row sum, whichever is less). Its existence certifies every eigenvalue above
    the cutoff (K^+ = K^{-1}), and it preconditions conjugate gradients on K: the preconditioned
    eigenvalues lambda / (lambda - tau) all lie within tau / (lambda_min - tau) of 1, so
    :data:`CG_STEPS` steps reach the residual of a backward-stable solve unless an eigenvalue sits
    near the cutoff. None where the factorisation fails or the residual is not reached (the caller
    then takes the eigendecomposition). One factorisation, in place on one copy of K; one host
    sync, for the verdict."""
    largest_bound = torch.minimum(K.diagonal().sum(), K.abs().sum(1).max())
    factor = K.clone()
    factor.diagonal().sub_(rcond**2 * largest_bound)
    info = torch.empty((), dtype=torch.int32, device=K.device)
    torch.linalg.cholesky_ex(factor, out=(factor, info))
    upper = factor.mT

    def precondition(r: torch.Tensor) -> torch.Tensor:  # (two triangular solves: cholesky_solve was 10x slower)
        return torch.linalg.solve_triangular(
            upper, torch.linalg.solve_triangular(factor, r.unsqueeze(1), upper=False), upper=True).squeeze(1)
    u, r = torch.zeros_like(b), b.clone()
    z = precondition(r)
    p, rz = z.clone(), r.dot(z)
    for _ in range(CG_STEPS):  # (no host sync: a converged step divides 0 by 0, kept as a zero step)
        Kp = K @ p
        curvature = p.dot(Kp)
        alpha = torch.where(curvature > 0, rz / curvature, 0.0)
        u, r = u + alpha * p, r - alpha * Kp
        z = precondition(r)
        rz_next = r.dot(z)
        p = z + torch.where(rz > 0, rz_next / rz, 0.0) * p
        rz = rz_next
    residual = (b - K @ u).norm()
    solved = (info == 0) & (residual <= CG_RESIDUAL_RTOL * largest_bound * u.norm())
    return (u, factor) if bool(solved) else None


def extreme_singular_ratio(K: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """sqrt(lambda_min / lambda_max) of K, where L L^T = K - tau I (any tau below lambda_min: the
    same eigenvectors), by block subspace iteration on (K - tau I)^{-1} (two triangular solves
    with L) and on K, :data:`SPECTRUM_BLOCK` vectors and
    :data:`SPECTRUM_ITERATIONS` steps each, and Rayleigh-Ritz on the blocks: Ritz values bound the
    extreme eigenvalues from inside, so the ratio is an upper bound (a block converges at the rate
    of the eigenvalue past it, so clustered small eigenvalues, slow for a single vector, converge).
    Each step reads K or L once, whatever the block's width. From a fixed start: no random state
    touched."""
    n = K.shape[0]
    generator = torch.Generator(device=K.device).manual_seed(0)
    start = torch.randn(n, min(SPECTRUM_BLOCK, n), generator=generator, dtype=K.dtype, device=K.device)
    upper = factor.mT  # (the triangular solves read either triangle in place)
    smallest, largest = start, start
    for _ in range(SPECTRUM_ITERATIONS):
        solved = torch.linalg.solve_triangular(upper, torch.linalg.solve_triangular(factor, smallest, upper=False),
                                               upper=True)
        smallest = torch.linalg.qr(solved)[0]
        largest = torch.linalg.qr(K @ largest)[0]
    ritz = lambda block: torch.linalg.eigvalsh(block.T @ (K @ block))  # of Q^T K Q
    return (ritz(smallest)[0] / ritz(largest)[-1]).clamp_min(0).sqrt().clamp_max(1.0)


def kept(s: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank (singular values kept) and the smallest kept over the largest (reductions
    only: indexing by the rank would be a host sync)."""
    rank = keep.sum()
    smallest = torch.where(keep, s, torch.inf).min() / s.max().clamp_min(torch.finfo(s.dtype).tiny)
    return rank, torch.where(rank > 0, smallest, 0.0)


def project_lsqr(products: Products, v: torch.Tensor, tol: float | None, max_iter: int | None,
                 basis_budget: int) -> torch.Tensor:
    """P_T v as the residual of the least-squares problem min_u ||J^T u - v|| (r = v - J^T u*
    is orthogonal to the row space of J), solved by LSQR (Paige & Saunders 1982) on J itself:
    its accuracy follows cond(J), not cond(J)^2 as conjugate gradients on K = J J^T did. The
    Golub-Kahan vectors in row space (nk entries each) are kept orthogonal by reorthogonalising
    each new one against all before it (one-sided, which suffices: Simon & Zha 2000), as long
    as they fit ``basis_budget`` bytes; without it, lost orthogonality stretched an
    ill-conditioned solve far beyond nk iterations.

    Distributed: J^T u and every inner product over rows are summed over ranks (each rank holds
    its rows of J and of the row-space vectors), so all ranks run the same iteration.
    """
    tol = default_lsqr_tol(products.dtype) if tol is None else tol
    beta = v.norm()
    if beta == 0:
        return v.clone()
    products.for_iterations()
    u = v / beta
    row = products.J_times(u)
    rows = int(products.reduce(torch.tensor(float(row.numel()), dtype=row.dtype, device=row.device)).item())
    max_iter = default_max_iter(rows) if max_iter is None else max_iter  # the same on every rank
    capacity = max(1, basis_budget // max(1, 8 * row.numel()))  # row-space vectors kept for reorthogonalising
    alpha = products.dot(row, row).sqrt()
    if alpha == 0:  # v is orthogonal to the row space already
        return v.clone()
    row = row / alpha
    basis = [row]
    w = row.clone()
    x = torch.zeros_like(row)
    phibar, rhobar = beta, alpha
    norm_J_sq = alpha**2  # ||J||_F estimate from the bidiagonal
    c = torch.ones_like(alpha)  # (the rotation's cosine; for the warning when max_iter is 0)
    converged = False
    for _ in range(max_iter):
        u = products.J_transpose_times(row) - alpha * u
        beta = u.norm()
        u = u / beta.clamp_min(torch.finfo(u.dtype).tiny)
        row = products.J_times(u) - beta * row
        if len(basis) < capacity:
            stacked = torch.stack(basis, 1)
            for _ in range(2):  # twice is enough (Giraud et al.)
                row = row - stacked @ products.reduce(stacked.T @ row)
        alpha = products.dot(row, row).sqrt()
        norm_J_sq = norm_J_sq + alpha**2 + beta**2
        rho = torch.sqrt(rhobar**2 + beta**2)
        c, s = rhobar / rho, beta / rho
        theta, rhobar = s * alpha, -c * alpha
        phi, phibar = c * phibar, s * phibar
        x = x + (phi / rho) * w
        # ||J r|| / (||J|| ||r||) = alpha |c| / ||J||; alpha ~ 0: the row space is exhausted
        if alpha * c.abs() <= tol * norm_J_sq.sqrt():
            converged = True
            break
        row = row / alpha
        w = row - (theta / rho) * w
        if len(basis) < capacity:
            basis.append(row)
    if not converged:
        warnings.warn(
            f"tangent_projection: LSQR stopped after {max_iter} iterations at ||J r|| / (||J|| ||r||) = "
            f"{float(alpha * c.abs() / norm_J_sq.sqrt()):.2e} > tol {tol:.1e}; try solver='dense' or a larger "
            "max_iter",
            stacklevel=3,
        )
    return v - products.J_transpose_times(x)
