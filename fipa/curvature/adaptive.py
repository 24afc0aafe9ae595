"""The authors' adaptive FIPA (FIPA_SPEC 7) as pure functions: a per-client relative eigenvalue cut-off and a
per-client number of local epochs, both from Gauss-Newton gradient norms at the broadcast point.

The server applies the cut-off to the uploaded eigenpairs (FIPA's `adaptive_cutoff`); a client uses the same
cut-off to choose its local epochs before it trains (`adaptive_epochs`).
"""

from __future__ import annotations

import math

from torch import Tensor

MAX_CUTOFF = 0.99  # at least the largest eigenpair is always kept


def relative_cutoff(coef: float, round_idx: int, client_norm: float, total_norm: float) -> float:
    """thr_m = clip(C / (k (||g_m|| + ||sum_m g_m|| + 1e-12)), 0, 0.99) at round k: a client keeps the eigenpairs
    with lambda > thr_m x its largest. Large gradients (early rounds, far from a solution) keep more of the
    spectrum; the cut tightens as the gradients shrink and k grows."""
    return min(max(coef / (max(round_idx, 1) * (client_norm + total_norm + 1e-12)), 0.0), MAX_CUTOFF)


def kept_by_cutoff(eigenvalues: Tensor, cutoff: float) -> Tensor:
    """The mask of the eigenvalues above `cutoff` x the largest (all of an empty spectrum)."""
    if not eigenvalues.numel():
        return eigenvalues > 0
    return eigenvalues > cutoff * eigenvalues.max()


def adaptive_local_epochs(
    kept_eigenvalues: Tensor, gradient_norm: float, round_idx: int, lr: float, coef: float, cap: int
) -> int:
    """tau_m = ceil(log(C_tau / (k ||g_m||)) / log(rho_m)), rho_m = 1 - lr x lambda_min of the kept eigenvalues,
    clipped to [1, cap]: the epochs a gradient step of size lr needs to shrink the slowest kept direction of the
    client's Gauss-Newton model from ||g_m|| to C_tau / k, so that the local solves (and hence FIPA's step, FIPA_SPEC 7)
    grow more accurate with the rounds.

    Degenerate cases resolve to the cap's ends: a gradient already below the target needs one epoch; a contraction
    rho <= 0 (lr x lambda_min >= 1) means one step overshoots, so one epoch; rho >= 1 (no curvature kept) the cap."""
    target = coef / (max(round_idx, 1) * max(gradient_norm, 1e-300))
    if target >= 1.0:
        return 1
    if not kept_eigenvalues.numel():
        return cap
    rho = 1.0 - lr * float(kept_eigenvalues.min())
    if rho <= 0.0:
        return 1
    if rho >= 1.0:
        return cap
    epochs = math.ceil(math.log(target) / math.log(rho))
    return int(min(max(epochs, 1), cap))
