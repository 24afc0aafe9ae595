"""Low-rank eigendecompositions H ~= U diag(lam) U^T of a client's curvature (spec section 3, step 3).

Two routes: exact, from the factor rows B of H = B^T B (small models), and matrix-free randomized subspace
iteration with Rayleigh-Ritz that only needs products H @ block (large models).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LowRankCurvature", "effective_rank", "randomized_eigenpairs", "top_eigenpairs_from_rows"]


@dataclass
class LowRankCurvature:
    """H ~= U diag(lam) U^T with orthonormal U (p x r) and descending positive eigenvalues lam (r,)."""

    eigenvectors: Tensor
    eigenvalues: Tensor

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.shape[0])

    def matvec(self, v: Tensor) -> Tensor:
        """U diag(lam) U^T v for v of shape (p,) or (p, k)."""
        coeff = self.eigenvectors.T @ v
        lam = self.eigenvalues.reshape(-1, *([1] * (v.dim() - 1)))
        return self.eigenvectors @ (lam * coeff)

    def dense(self) -> Tensor:
        """The p x p matrix; for tests and small problems only."""
        return (self.eigenvectors * self.eigenvalues) @ self.eigenvectors.T


def effective_rank(eigenvalues: Tensor) -> float:
    """exp(entropy of lam / sum(lam)) (Roy & Vetterli, 2007): r for r equal eigenvalues, near 1 when one dominates.

    A per-round diagnostic of how many directions a client's kept curvature really spans.
    """
    lam = eigenvalues.clamp_min(0)
    total = lam.sum()
    if total <= 0:
        return 0.0
    p = lam[lam > 0] / total
    return float(torch.exp(-(p * p.log()).sum()))


def _select(eigenvalues: Tensor, eigenvectors: Tensor, rank: int | None, tol: float) -> tuple[Tensor, Tensor]:
    """Descending order; keep at most `rank` eigenpairs, and only those with lam > tol * lam_max."""
    order = torch.argsort(eigenvalues, descending=True)
    eigenvalues, eigenvectors = eigenvalues[order], eigenvectors[:, order]
    if eigenvalues.numel() == 0 or eigenvalues[0] <= 0:
        return eigenvalues[:0], eigenvectors[:, :0]
    keep = int((eigenvalues > tol * eigenvalues[0]).sum())
    if rank is not None:
        keep = min(keep, max(int(rank), 0))
    return eigenvalues[:keep], eigenvectors[:, :keep]


def top_eigenpairs_from_rows(B: Tensor, rank: int | None, tol: float = 1e-8) -> LowRankCurvature:
    """Exact top eigenpairs of H = B^T B from its factor rows B (m x p).

    With m < p the m x m Gram matrix G = B B^T = V diag(lam) V^T has the same nonzero eigenvalues, and
    U = B^T V / sqrt(lam); this costs O(m^2 p) instead of O(p^3). `rank=None` keeps every eigenpair with
    lam > tol * lam_max (the lossless "full-rank" factorization); eigenvalues <= tol * lam_max are dropped even
    if `rank` asks for more, and a `rank` above what is available clamps silently (the caller warns).
    """
    m, p = B.shape
    if m < p:
        gram = B @ B.T
        eigenvalues, vectors = torch.linalg.eigh((gram + gram.T) / 2)
        eigenvalues, vectors = _select(eigenvalues, vectors, rank, tol)
        eigenvectors = (B.T @ vectors) / eigenvalues.sqrt()
    else:
        eigenvalues, eigenvectors = torch.linalg.eigh(B.T @ B)
        eigenvalues, eigenvectors = _select(eigenvalues, eigenvectors, rank, tol)
    return LowRankCurvature(eigenvectors=eigenvectors.contiguous(), eigenvalues=eigenvalues.contiguous())


def randomized_eigenpairs(
    matvec: Callable[[Tensor], Tensor],
    p: int,
    rank: int,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float64,
    tol: float = 1e-8,
    device: torch.device | str | None = None,
) -> LowRankCurvature:
    """Top-`rank` eigenpairs of a symmetric PSD H given only `matvec(V) = H @ V` for blocks V (p x l).

    Randomized subspace iteration with Rayleigh-Ritz: V = orth(randn(p, r + s)); q times V <- QR(H V);
    T = V^T H V; eigh(T); keep the top r with lam > tol * lam_max; U = V @ eigvecs. Uses q + 1 block products.
    The start block is drawn from `generator` (on its device, then moved to `device`), so a seeded generator
    makes the result deterministic.
    """
    width = min(int(rank) + int(oversample), int(p))
    if width <= 0:
        empty = torch.zeros(p, 0, dtype=dtype, device=device)
        return LowRankCurvature(eigenvectors=empty, eigenvalues=empty.new_zeros(0))
    gen_device = generator.device if generator is not None else "cpu"
    start = torch.randn(p, width, generator=generator, dtype=dtype, device=gen_device)
    if device is not None:
        start = start.to(device)
    basis, _ = torch.linalg.qr(start)
    for _ in range(int(power_iters)):
        basis, _ = torch.linalg.qr(matvec(basis).to(basis))
    projected = basis.T @ matvec(basis).to(basis)
    eigenvalues, vectors = torch.linalg.eigh((projected + projected.T) / 2)
    eigenvalues, vectors = _select(eigenvalues, vectors, rank, tol)
    return LowRankCurvature(eigenvectors=(basis @ vectors).contiguous(), eigenvalues=eigenvalues.contiguous())
