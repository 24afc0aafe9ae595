"""Pure tensor math of the server-side aggregation rules (FedAvg, diagonal Fisher, FIPA).

FIPA (spec section 4) combines the client updates ``Delta_m`` with matrix weights built from the clients'
low-rank curvature factors ``H_m ~= U_m diag(lam_m) U_m^T``::

    H = sum_m w_m U_m diag(lam_m) U_m^T
    b = sum_m w_m U_m diag(lam_m) U_m^T Delta_m
    direction = solve(H, b)

A ``p x p`` matrix is never formed. ``H`` is represented by the stacked scaled factor::

    F = [U_1 sqrt(w_1 lam_1), ..., U_M sqrt(w_M lam_M)]      (p x R,  R = sum_m r_m)
    H = F F^T

and every solve goes through a thin QR ``F = Q R`` (``Q``: p x k, ``k = min(p, R)``), so that
``H = Q K Q^T`` with the small symmetric ``K = R R^T`` (k x k).

Implementation notes
--------------------
* The solvers never materialise ``Q``: they keep LAPACK's Householder representation of it
  (``torch.geqrf``) and apply ``Q^T`` and ``Q`` to a single vector with ``torch.ormqr``. This skips the
  costly explicit formation of ``Q`` (``orgqr``, about as expensive as the factorisation itself), so the
  whole solve costs about half of a bare ``torch.linalg.qr`` of ``F``. :func:`subspace_curvature` still
  returns an explicit ``Q`` for callers that want one.
* The small ``k x k`` problem (``K``, its eigendecomposition, the projected right-hand side) is always
  handled in float64, whatever the dtype of ``F``: it costs nothing next to the ``O(p R^2)``
  factorisation and keeps the eigenvalues of ``H`` that lie close to the ``rcond`` threshold accurate
  when ``F`` is float32.
* ``K`` is symmetrised before ``eigh``; its (round-off) negative eigenvalues are treated as zero, which
  is exact for the positive semi-definite ``H = F F^T``.
* ``R > p`` (more stacked columns than parameters) is exact: the QR then has ``k = p`` and ``Q`` is a
  full orthogonal matrix. Rank-deficient ``F`` (e.g. duplicated columns) is handled by the pinv
  threshold on the eigenvalues of ``K`` (Householder QR returns an orthonormal ``Q`` even then).
* Degenerate cases: ``F == 0`` (or ``F`` with no column) means ``H = 0``; the pinv solve returns zeros
  (like ``torch.linalg.pinv`` of the zero matrix) and the damped solve returns
  ``gamma * beta * (0 + beta I)^{-1} b = gamma * b``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "accumulate_diagonal",
    "accumulate_weighted",
    "aggregate_rhs",
    "diagonal_fisher_solve",
    "diagonal_solve",
    "diagonal_weighted_average",
    "factor_rhs",
    "lowrank_anchored_solve",
    "lowrank_damped_solve",
    "lowrank_pinv_solve",
    "lowrank_pinv_solve_with_complement",
    "mean_from_sum",
    "scaled_factor",
    "stack_scaled_factors",
    "subspace_complement",
    "subspace_curvature",
    "weighted_average",
]


# --------------------------------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------------------------------
def _positive(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0.0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def _nonnegative(name: str, value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}") from None
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
    return v


def _checked_weights(weights: Sequence[float], n: int, what: str) -> list[float]:
    ws = [_nonnegative(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if len(ws) != n:
        raise ValueError(f"got {n} {what} but {len(ws)} weights")
    if n == 0:
        raise ValueError(f"need at least one of the {what}")
    if math.fsum(ws) <= 0.0:
        raise ValueError("weights must not all be zero")
    return ws


def _check_shapes(vectors: list[Tensor], what: str) -> None:
    shape = vectors[0].shape
    for i, v in enumerate(vectors):
        if v.shape != shape:
            raise ValueError(f"{what}[{i}] has shape {tuple(v.shape)}, expected {tuple(shape)}")


def _check_factor(eigenvectors: Tensor, eigenvalues: Tensor) -> None:
    if eigenvectors.dim() != 2:
        raise ValueError(f"eigenvectors must be a (p, r) matrix, got shape {tuple(eigenvectors.shape)}")
    if eigenvalues.dim() != 1 or eigenvalues.shape[0] != eigenvectors.shape[1]:
        raise ValueError(
            f"eigenvalues must have shape ({eigenvectors.shape[1]},) to match eigenvectors "
            f"{tuple(eigenvectors.shape)}, got {tuple(eigenvalues.shape)}"
        )
    if not eigenvectors.is_floating_point():
        raise ValueError(f"eigenvectors must be a real floating tensor, got {eigenvectors.dtype}")
    if eigenvalues.numel() and bool((eigenvalues < 0).any()):
        raise ValueError("eigenvalues must be non-negative (the curvature is positive semi-definite)")


def _check_F(F: Tensor) -> None:
    if F.dim() != 2:
        raise ValueError(f"F must be a (p, R) matrix, got shape {tuple(F.shape)}")
    if not F.is_floating_point():
        raise ValueError(f"F must be a real floating tensor, got {F.dtype}")


def _check_rhs(F: Tensor, b: Tensor) -> Tensor:
    if b.dim() != 1 or b.shape[0] != F.shape[0]:
        raise ValueError(f"b must be a vector of length p={F.shape[0]}, got shape {tuple(b.shape)}")
    if b.device != F.device:
        raise ValueError(f"b is on {b.device} but F is on {F.device}")
    return b.to(F.dtype)


# --------------------------------------------------------------------------------------------------
# FedAvg and the diagonal-Fisher baseline
# --------------------------------------------------------------------------------------------------
def accumulate_weighted(total: Tensor, vector: Tensor, weight: float) -> Tensor:
    """``total += weight * vector`` in place: FedAvg's running sum ``sum_m N_m Delta_m``, one client at a time."""
    return total.add_(vector, alpha=weight)


def mean_from_sum(weighted_sum: Tensor, total_weight: float, scale: float = 1.0) -> Tensor:
    """``scale * weighted_sum / total_weight``: the (scaled) weighted mean from its running sum."""
    return (scale / total_weight) * weighted_sum


def weighted_average(vectors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """FedAvg: ``sum_m w_m v_m / sum_m w_m``.

    ``vectors`` are tensors of one common shape (usually flattened parameter updates); ``weights`` are
    non-negative numbers, not all zero (e.g. the clients' sample counts ``N_m``; they need not sum to 1).
    Computed as the streaming FedAvg aggregator computes it: a running sum, then one division.
    """
    vectors = list(vectors)
    ws = _checked_weights(weights, len(vectors), "vectors")
    _check_shapes(vectors, "vectors")
    total = torch.zeros_like(vectors[0])
    for v, w in zip(vectors, ws):
        accumulate_weighted(total, v, w)
    return mean_from_sum(total, math.fsum(ws))


def accumulate_diagonal(numerator: Tensor, denominator: Tensor, delta: Tensor, diagonal: Tensor, weight: float) -> None:
    """The diagonal-Fisher running sums, in place: ``numerator += w d * Delta``, ``denominator += w d``."""
    numerator.addcmul_(diagonal, delta, value=weight)
    denominator.add_(diagonal, alpha=weight)


def diagonal_solve(numerator: Tensor, denominator: Tensor, fallback: Tensor, rcond: float = 1e-5) -> Tensor:
    """Per-coordinate ``numerator / denominator``; coordinates whose total curvature is not above ``rcond`` times its
    maximum take ``fallback`` (the FedAvg step), so an all-zero curvature gives FedAvg."""
    if denominator.numel() == 0:
        return fallback
    keep = denominator > rcond * denominator.max()
    return torch.where(keep, numerator / torch.where(keep, denominator, torch.ones_like(denominator)), fallback)


def diagonal_fisher_solve(rhs: Tensor, diagonal: Tensor, anchor: Tensor, damping: float) -> Tensor:
    """``(b + damping g) / (h + damping)`` per coordinate, the minimiser of ``sum_i h_i (x_i - b_i / h_i)^2 +
    damping (x_i - g_i)^2``; a coordinate with ``h + damping = 0`` (no curvature, no damping) takes ``g``."""
    numerator, denominator = rhs + damping * anchor, diagonal + damping
    flat = denominator <= 0
    return torch.where(flat, anchor, numerator / torch.where(flat, torch.ones_like(denominator), denominator))


def diagonal_weighted_average(
    deltas: Sequence[Tensor],
    diagonals: Sequence[Tensor],
    weights: Sequence[float],
    rcond: float = 1e-5,
) -> Tensor:
    """Diagonal-Fisher baseline: per-coordinate ``sum_m w_m d_m Delta_m / sum_m w_m d_m``.

    ``diagonals[m]`` is client m's (non-negative) curvature diagonal, of the same shape as ``deltas[m]``.
    Coordinates whose total curvature ``sum_m w_m d_m`` is not above ``rcond`` times its maximum over
    all coordinates fall back to the plain weighted average ``sum_m w_m Delta_m / sum_m w_m`` (so an
    all-zero curvature gives FedAvg). Computed with the running sums the streaming aggregator keeps.
    """
    rcond = _positive("rcond", rcond)
    deltas = list(deltas)
    diagonals = list(diagonals)
    if len(diagonals) != len(deltas):
        raise ValueError(f"got {len(deltas)} deltas but {len(diagonals)} diagonals")
    ws = _checked_weights(weights, len(deltas), "deltas")
    shape = deltas[0].shape
    for i, (d, c) in enumerate(zip(deltas, diagonals)):
        if d.shape != shape or c.shape != shape:
            raise ValueError(
                f"deltas[{i}] / diagonals[{i}] have shapes {tuple(d.shape)} / {tuple(c.shape)}, expected {tuple(shape)}"
            )
        if c.numel() and bool((c < 0).any()):
            raise ValueError(f"diagonals[{i}] has negative entries; a curvature diagonal must be >= 0")
    numerator, denominator, plain = (torch.zeros_like(deltas[0]) for _ in range(3))
    for d, c, w in zip(deltas, diagonals, ws):
        accumulate_weighted(plain, d, w)
        accumulate_diagonal(numerator, denominator, d, c.to(numerator.dtype), w)
    return diagonal_solve(numerator, denominator, mean_from_sum(plain, math.fsum(ws)), rcond)


# --------------------------------------------------------------------------------------------------
# building F and b
# --------------------------------------------------------------------------------------------------
def scaled_factor(eigenvectors: Tensor, eigenvalues: Tensor, weight: float) -> Tensor:
    """``U diag(sqrt(w lam))`` (p x r), so that ``w U diag(lam) U^T`` = this @ this^T."""
    _check_factor(eigenvectors, eigenvalues)
    w = _nonnegative("weight", weight)
    scale = (eigenvalues.to(eigenvectors.dtype) * w).sqrt()
    return eigenvectors * scale


def factor_rhs(eigenvectors: Tensor, eigenvalues: Tensor, weight: float, delta: Tensor) -> Tensor:
    """``w U diag(lam) U^T delta`` (length p), in O(p r) (two matrix-vector products)."""
    _check_factor(eigenvectors, eigenvalues)
    w = _nonnegative("weight", weight)
    if delta.dim() != 1 or delta.shape[0] != eigenvectors.shape[0]:
        raise ValueError(f"delta must be a vector of length p={eigenvectors.shape[0]}, got shape {tuple(delta.shape)}")
    delta = delta.to(eigenvectors.dtype)
    coef = (eigenvectors.T @ delta) * (eigenvalues.to(eigenvectors.dtype) * w)
    return eigenvectors @ coef


def stack_scaled_factors(
    eigenvectors: Sequence[Tensor],
    eigenvalues: Sequence[Tensor],
    weights: Sequence[float],
    *,
    out: Tensor | None = None,
) -> Tensor:
    """``F = [U_1 sqrt(w_1 lam_1), ..., U_M sqrt(w_M lam_M)]`` (p x R) without intermediate copies.

    The weights are used as given (pass ``w_m = N_m / sum N``). The result is written straight into a
    preallocated **column-major** buffer (``F.stride() == (1, p)``), the layout LAPACK works in, so that
    :func:`lowrank_pinv_solve` / :func:`lowrank_damped_solve` with ``overwrite_factor=True`` can factorise
    it in place without any further copy. ``out`` may supply that buffer (shape (p, R), column-major), e.g.
    to reuse one workspace across rounds.
    """
    eigenvectors = list(eigenvectors)
    eigenvalues = list(eigenvalues)
    weights = list(weights)
    if not (len(eigenvectors) == len(eigenvalues) == len(weights)):
        raise ValueError(
            f"got {len(eigenvectors)} eigenvector blocks, {len(eigenvalues)} eigenvalue vectors and "
            f"{len(weights)} weights"
        )
    if not eigenvectors:
        raise ValueError("need at least one client factor")
    for U, lam in zip(eigenvectors, eigenvalues):
        _check_factor(U, lam)
    ws = [_nonnegative(f"weights[{i}]", w) for i, w in enumerate(weights)]
    p = eigenvectors[0].shape[0]
    for i, U in enumerate(eigenvectors):
        if U.shape[0] != p:
            raise ValueError(f"eigenvectors[{i}] has {U.shape[0]} rows, expected p={p}")
    dtype = eigenvectors[0].dtype
    for U in eigenvectors[1:]:
        dtype = torch.promote_types(dtype, U.dtype)
    device = eigenvectors[0].device
    R = sum(U.shape[1] for U in eigenvectors)

    if out is None:
        buf = torch.empty(R, p, dtype=dtype, device=device)  # F = buf.T is column-major
    else:
        if out.shape != (p, R):
            raise ValueError(f"out must have shape ({p}, {R}), got {tuple(out.shape)}")
        if out.dtype != dtype or out.device != device:
            raise ValueError(f"out must be a {dtype} tensor on {device}, got {out.dtype} on {out.device}")
        if R > 0 and p > 1 and out.stride() != (1, p):
            raise ValueError(f"out must be column-major (stride (1, {p})), got stride {out.stride()}")
        buf = out.T

    off = 0
    for U, lam, w in zip(eigenvectors, eigenvalues, ws):
        r = U.shape[1]
        if r == 0:
            continue
        block = buf[off : off + r]  # (r, p), row-major rows = columns of F
        block.copy_(U.T)  # blocked transposing copy (much faster than a strided elementwise mul)
        block.mul_((lam.to(dtype) * w).sqrt().unsqueeze(1))
        off += r
    return buf.T


def aggregate_rhs(
    eigenvectors: Sequence[Tensor],
    eigenvalues: Sequence[Tensor],
    weights: Sequence[float],
    deltas: Sequence[Tensor],
) -> Tensor:
    """``b = sum_m w_m U_m diag(lam_m) U_m^T Delta_m`` (length p), accumulated in place in O(p R)."""
    eigenvectors = list(eigenvectors)
    eigenvalues = list(eigenvalues)
    weights = list(weights)
    deltas = list(deltas)
    if not (len(eigenvectors) == len(eigenvalues) == len(weights) == len(deltas)):
        raise ValueError(
            f"got {len(eigenvectors)} eigenvector blocks, {len(eigenvalues)} eigenvalue vectors, "
            f"{len(weights)} weights and {len(deltas)} deltas"
        )
    if not eigenvectors:
        raise ValueError("need at least one client")
    p = eigenvectors[0].shape[0]
    dtype = eigenvectors[0].dtype
    for U in eigenvectors[1:]:
        dtype = torch.promote_types(dtype, U.dtype)
    b = torch.zeros(p, dtype=dtype, device=eigenvectors[0].device)
    for i, (U, lam, w, d) in enumerate(zip(eigenvectors, eigenvalues, weights, deltas)):
        if U.shape[0] != p or d.dim() != 1 or d.shape[0] != p:
            raise ValueError(f"client {i}: eigenvectors {tuple(U.shape)} / delta {tuple(d.shape)} do not match p={p}")
        b += factor_rhs(U.to(dtype), lam, w, d)
    return b


# --------------------------------------------------------------------------------------------------
# subspace representation H = Q K Q^T and the two solvers
# --------------------------------------------------------------------------------------------------
def subspace_curvature(F: Tensor) -> tuple[Tensor, Tensor]:
    """Thin QR ``F = Q R`` (``Q``: p x k, ``k = min(p, R)``); returns ``(Q, K)`` with ``K = R R^T``
    (symmetrised), so that ``H = F F^T = Q K Q^T``. ``Q`` and ``K`` have the dtype of ``F``.

    The solvers below do not call this (they keep ``Q`` implicit, which is about twice as fast); it is
    here for callers that need the explicit subspace.
    """
    _check_F(F)
    p, R = F.shape
    k = min(p, R)
    if k == 0:
        return F.new_zeros(p, 0), F.new_zeros(0, 0)
    Q, Rm = torch.linalg.qr(F, mode="reduced")
    K = Rm @ Rm.T
    K = 0.5 * (K + K.T)
    return Q, K


class _ImplicitSubspace:
    """Householder QR of F kept implicit: ``Q`` is applied with ``ormqr``; ``K = R R^T`` in float64."""

    def __init__(self, F: Tensor, overwrite: bool) -> None:
        p, R = F.shape
        self.p = p
        self.k = k = min(p, R)
        a: Tensor | None = None
        tau: Tensor | None = None
        if overwrite and p > 1 and F.stride() == (1, p):
            # F is column-major: LAPACK can factorise it where it lies (torch.geqrf's copy of the input
            # into its output is a no-op when both are the same tensor). Fall back to a copy otherwise.
            tau = torch.empty(k, dtype=F.dtype, device=F.device)
            try:
                a, tau = torch.geqrf(F, out=(F, tau))
                if a.data_ptr() != F.data_ptr():  # pragma: no cover - defensive
                    a = None
            except RuntimeError:  # pragma: no cover - depends on the torch version
                a = None
        if a is None or tau is None:
            a, tau = torch.geqrf(F)
        self.a = a[:, :k]  # the k Householder reflectors (columns k.. of R carry no reflector)
        self.tau = tau
        Rm = a[:k, :].triu().to(torch.float64)  # k x R upper trapezoidal
        K = Rm @ Rm.T
        K = 0.5 * (K + K.T)
        evals, evecs = torch.linalg.eigh(K)
        self.evals = evals.clamp_min(0.0)  # H = F F^T is PSD: negative values are round-off
        self.evecs = evecs

    def project(self, b: Tensor) -> Tensor:
        """``Q^T b`` (length k), returned in float64."""
        c = torch.ormqr(self.a, self.tau, b.unsqueeze(1), left=True, transpose=True)
        return c[: self.k, 0].to(torch.float64)

    def lift(self, z: Tensor, dtype: torch.dtype) -> Tensor:
        """``Q z`` (length p) for ``z`` of length k."""
        full = torch.zeros(self.p, 1, dtype=dtype, device=self.a.device)
        full[: self.k, 0] = z.to(dtype)
        return torch.ormqr(self.a, self.tau, full, left=True, transpose=False)[:, 0]


def lowrank_pinv_solve(F: Tensor, b: Tensor, rcond: float = 1e-5, *, overwrite_factor: bool = False) -> Tensor:
    """``pinv(F F^T, rcond) @ b`` without forming ``F F^T``.

    Eigenvalues of ``H = F F^T`` not above ``rcond`` times the largest are dropped, exactly like
    ``torch.linalg.pinv(H, rtol=rcond, hermitian=True) @ b`` (for the PSD ``H``); computed as
    ``Q pinv(K) Q^T b`` with ``F = Q R``, ``K = R R^T``. ``b`` may be any length-p vector (it need not
    lie in the range of ``F``). ``F == 0`` (or ``R == 0``) returns zeros.

    ``overwrite_factor=True`` lets the routine factorise a column-major ``F`` (as built by
    :func:`stack_scaled_factors`) in place, saving a copy of ``F``; ``F`` is then destroyed. A row-major
    ``F`` is copied regardless and left untouched.
    """
    rcond = _positive("rcond", rcond)
    _check_F(F)
    b = _check_rhs(F, b)
    p, R = F.shape
    if min(p, R) == 0:
        return torch.zeros_like(b)
    sub = _ImplicitSubspace(F, overwrite_factor)
    return _pinv_in(sub, b, rcond)


def _kept(sub: _ImplicitSubspace, rcond: float) -> Tensor:
    """The mask of the eigenvalues of H the pinv solve keeps (above rcond x the largest; none when H == 0)."""
    return sub.evals > rcond * sub.evals.max()


def _pinv_in(sub: _ImplicitSubspace, b: Tensor, rcond: float) -> Tensor:
    keep = _kept(sub, rcond)
    if not bool(keep.any()):
        return torch.zeros_like(b)
    Vk = sub.evecs[:, keep]
    z = Vk @ ((Vk.T @ sub.project(b)) / sub.evals[keep])
    return sub.lift(z, b.dtype)


def lowrank_pinv_solve_with_complement(
    F: Tensor, b: Tensor, v: Tensor, rcond: float = 1e-5, *, overwrite_factor: bool = False
) -> tuple[Tensor, Tensor]:
    """``(pinv(F F^T, rcond) b, (I - P) v)`` from one factorisation, with ``P`` the orthogonal projector onto the
    eigenvectors of ``H = F F^T`` the pinv solve keeps. ``(I - P) v`` is the part of ``v`` (e.g. the FedAvg step)
    that the solve never sees: outside the span of the clients' factors, or along eigenvalues below the cut-off."""
    rcond = _positive("rcond", rcond)
    _check_F(F)
    b, v = _check_rhs(F, b), _check_rhs(F, v)
    if min(F.shape) == 0:
        return torch.zeros_like(b), v.clone()
    sub = _ImplicitSubspace(F, overwrite_factor)
    Vk = sub.evecs[:, _kept(sub, rcond)]
    inside = sub.lift(Vk @ (Vk.T @ sub.project(v)), v.dtype)
    return _pinv_in(sub, b, rcond), v - inside


def subspace_complement(F: Tensor, v: Tensor, *, overwrite_factor: bool = False) -> Tensor:
    """``(I - Q Q^T) v``: the part of ``v`` outside the span of ``F``'s columns (the clients' eigenvectors)."""
    _check_F(F)
    v = _check_rhs(F, v)
    if min(F.shape) == 0:
        return v.clone()
    sub = _ImplicitSubspace(F, overwrite_factor)
    return v - sub.lift(sub.project(v), v.dtype)


def lowrank_anchored_solve(
    F: Tensor, b: Tensor, anchor: Tensor, mu: float, *, relative: bool = False, overwrite_factor: bool = False
) -> Tensor:
    """``(F F^T + mu I)^{-1} (b + mu anchor)`` without forming ``F F^T``: the minimiser ``d`` of

        sum_m w_m (d - Delta_m)^T H_m (d - Delta_m) + mu ||d - anchor||^2,

    FIPA's quadratic model held near ``anchor`` (the FedAvg step): a Levenberg-Marquardt / trust-region solve
    between FIPA (``mu -> 0``, on the span of the factors) and the anchor (``mu -> inf``). Directions outside the
    span of ``F`` take the anchor's component, so no part of the anchor is ever dropped. Computed as
    ``Q (K + mu I)^{-1} Q^T x + (x - Q Q^T x) / mu`` with ``x = b + mu anchor``. ``relative=True`` takes ``mu`` in
    units of the largest eigenvalue of ``H`` (scale-free damping; ``H = 0`` then gives the anchor).
    """
    mu = _positive("mu", mu)
    _check_F(F)
    b, anchor = _check_rhs(F, b), _check_rhs(F, anchor)
    if min(F.shape) == 0:
        return b / mu + anchor
    sub = _ImplicitSubspace(F, overwrite_factor)
    if relative:
        lam_max = float(sub.evals.max())
        if lam_max <= 0:
            return anchor.clone()
        mu = mu * lam_max
    x = b + mu * anchor
    c = sub.project(x)
    z = sub.evecs @ ((sub.evecs.T @ c) / (sub.evals + mu))
    return sub.lift(z, b.dtype) + (x - sub.lift(c, b.dtype)) / mu


def lowrank_damped_solve(
    F: Tensor,
    b: Tensor,
    beta: float,
    gamma: float = 1.0,
    *,
    overwrite_factor: bool = False,
) -> Tensor:
    """``gamma * beta * (F F^T + beta I)^{-1} b`` without forming ``F F^T``.

    With ``F = Q R``, ``K = R R^T = V diag(lam) V^T``::

        gamma*beta*[Q (K + beta I)^{-1} Q^T b + (b - Q Q^T b) / beta]
          = gamma * (b - Q V diag(lam / (lam + beta)) V^T Q^T b)

    (the second form is what is computed; it needs no explicit projection onto the complement of
    ``range(F)``, so ``b`` may be any vector). ``F == 0`` gives ``gamma * b``.
    ``overwrite_factor`` as in :func:`lowrank_pinv_solve`.
    """
    beta = _positive("beta", beta)
    gamma = _positive("gamma", gamma)
    _check_F(F)
    b = _check_rhs(F, b)
    p, R = F.shape
    if min(p, R) == 0:
        return b * gamma
    sub = _ImplicitSubspace(F, overwrite_factor)
    evals, V = sub.evals, sub.evecs
    c = sub.project(b)
    z = V @ ((V.T @ c) * (evals / (evals + beta)))
    out = sub.lift(z, b.dtype)
    # out <- gamma * (b - Q z)
    out.sub_(b).mul_(-gamma)
    return out
