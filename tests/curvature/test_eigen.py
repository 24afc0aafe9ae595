"""Low-rank eigensolvers against torch.linalg.eigh of the dense matrix."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from fipa.curvature import (
    CurvatureGroup,
    LowRankCurvature,
    curvature_matvec,
    factor_rows,
    randomized_eigenpairs,
    top_eigenpairs_from_rows,
)
from fipa.curvature.callback import EXACT_MAX_DIM, ROWS_MAX_BYTES, CurvatureCallback, choose_eigensolver

DT = torch.float64


def top_dense(H: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    lam, U = torch.linalg.eigh(H)
    return lam.flip(0)[:r], U.flip(1)[:, :r]


def assert_same_subspace(U1: torch.Tensor, U2: torch.Tensor, atol: float) -> None:
    torch.testing.assert_close(U1 @ U1.T, U2 @ U2.T, atol=atol, rtol=0)


def assert_orthonormal(U: torch.Tensor) -> None:
    torch.testing.assert_close(U.T @ U, torch.eye(U.shape[1], dtype=U.dtype), atol=1e-10, rtol=0)


def rows_with_gap(m: int, p: int, seed: int) -> torch.Tensor:
    """B with distinct, well separated singular values so the top-r subspace is well defined."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, p)
    left, _ = torch.linalg.qr(torch.randn(m, k, dtype=DT, generator=g))
    right, _ = torch.linalg.qr(torch.randn(p, k, dtype=DT, generator=g))
    sing = torch.logspace(1, -1, k, dtype=DT)
    return (left * sing) @ right.T


@pytest.mark.parametrize("m, p", [(8, 30), (40, 12)], ids=["gram m<p", "direct m>=p"])
def test_top_eigenpairs_from_rows_match_eigh(m, p):
    B = rows_with_gap(m, p, seed=0)
    H = B.T @ B
    r = 5
    low = top_eigenpairs_from_rows(B, r)
    lam, U = top_dense(H, r)
    assert low.rank == r and low.eigenvectors.shape == (p, r)
    torch.testing.assert_close(low.eigenvalues, lam, rtol=1e-10, atol=0)
    assert_same_subspace(low.eigenvectors, U, atol=1e-10)
    assert_orthonormal(low.eigenvectors)


@pytest.mark.parametrize("m, p", [(8, 30), (40, 12)], ids=["gram m<p", "direct m>=p"])
def test_full_rank_reconstructs_exactly(m, p):
    B = torch.randn(m, p, dtype=DT, generator=torch.Generator().manual_seed(1))
    low = top_eigenpairs_from_rows(B, None)
    assert low.rank == min(m, p)
    assert bool((low.eigenvalues[:-1] >= low.eigenvalues[1:]).all()) and bool((low.eigenvalues > 0).all())
    torch.testing.assert_close(low.dense(), B.T @ B, atol=1e-10, rtol=0)
    v = torch.randn(p, 3, dtype=DT)
    torch.testing.assert_close(low.matvec(v), B.T @ (B @ v), atol=1e-10, rtol=0)
    torch.testing.assert_close(low.matvec(v[:, 0]), B.T @ (B @ v[:, 0]), atol=1e-10, rtol=0)


@pytest.mark.parametrize("m, p", [(10, 30), (40, 12)], ids=["gram m<p", "direct m>=p"])
def test_rank_deficient_drops_null_space_and_clamps(m, p):
    g = torch.Generator().manual_seed(2)
    B = torch.randn(m, 4, dtype=DT, generator=g) @ torch.randn(4, p, dtype=DT, generator=g)  # rank 4
    for rank in (None, 9, 100):
        low = top_eigenpairs_from_rows(B, rank)
        assert low.rank == 4
        assert_orthonormal(low.eigenvectors)
        torch.testing.assert_close(low.dense(), B.T @ B, atol=1e-9, rtol=0)
    assert top_eigenpairs_from_rows(torch.zeros(3, 5, dtype=DT), None).rank == 0


def gapped_matrix(p: int, head: list[float], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(p, p, dtype=DT, generator=g))
    spectrum = torch.full((p,), 1e-3, dtype=DT)
    spectrum[: len(head)] = torch.tensor(head, dtype=DT)
    spectrum[len(head):] *= torch.rand(p - len(head), dtype=DT, generator=g)
    return (Q * spectrum) @ Q.T


def test_randomized_matches_eigh_on_gapped_spectrum():
    p, r = 60, 6
    H = gapped_matrix(p, [100.0, 70.0, 40.0, 20.0, 9.0, 5.0], seed=3)
    calls = []

    def matvec(V):
        calls.append(V.shape[1])
        return H @ V

    low = randomized_eigenpairs(matvec, p, r, oversample=4, power_iters=2, generator=torch.Generator().manual_seed(4))
    lam, U = top_dense(H, r)
    assert calls == [r + 4] * 3  # q + 1 block products
    torch.testing.assert_close(low.eigenvalues, lam, rtol=1e-6, atol=0)
    assert_same_subspace(low.eigenvectors, U, atol=1e-6)
    assert_orthonormal(low.eigenvectors)


def test_randomized_is_deterministic_with_seeded_generator():
    p = 40
    H = gapped_matrix(p, [10.0, 8.0, 3.0], seed=5)
    run = lambda: randomized_eigenpairs(lambda V: H @ V, p, 3, generator=torch.Generator().manual_seed(6))  # noqa: E731
    a, b = run(), run()
    assert torch.equal(a.eigenvalues, b.eigenvalues) and torch.equal(a.eigenvectors, b.eigenvectors)


def test_randomized_drops_tiny_eigenvalues_and_clamps_width():
    p = 12
    g = torch.Generator().manual_seed(7)
    F = torch.randn(p, 3, dtype=DT, generator=g)
    H = F @ F.T  # rank 3
    low = randomized_eigenpairs(lambda V: H @ V, p, rank=8, oversample=20, generator=g)
    assert low.rank == 3
    torch.testing.assert_close(low.dense(), H, atol=1e-10, rtol=0)


@pytest.mark.parametrize("estimator", ["ggn", "mc"])
def test_randomized_on_curvature_matvec_matches_rows(estimator):
    """Matrix-free route = exact route on a real GGN; for mc the sample stays fixed across the q + 1 products."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)
    params = {k: v.detach() for k, v in model.named_parameters()}
    group = CurvatureGroup(
        lambda q, x: functional_call(model, q, (x,)), torch.randn(6, 3, dtype=DT), None, "cross_entropy", 1 / 6
    )
    gen = torch.Generator().manual_seed(9)
    p = sum(v.numel() for v in params.values())
    exact = top_eigenpairs_from_rows(factor_rows(params, [group], estimator, gen), None)
    # block width >= rank(H) (at most 6 * 3 for ggn): the Krylov space holds the whole range.
    low = randomized_eigenpairs(
        lambda V: curvature_matvec(params, [group], V, estimator, gen, chunk_size=4),
        p, rank=exact.rank, oversample=8, power_iters=1, generator=torch.Generator().manual_seed(10),
    )
    assert low.rank == exact.rank
    torch.testing.assert_close(low.eigenvalues, exact.eigenvalues, rtol=1e-8, atol=0)
    torch.testing.assert_close(low.dense(), exact.dense(), atol=1e-10, rtol=0)


def test_lowrank_container():
    U, _ = torch.linalg.qr(torch.randn(7, 2, dtype=DT))
    low = LowRankCurvature(U, torch.tensor([3.0, 1.0], dtype=DT))
    assert low.rank == 2
    v = torch.randn(7, dtype=DT)
    torch.testing.assert_close(low.matvec(v), low.dense() @ v)


# ------------------------------------------------------------------------- slowly decaying spectrum, no gap
def harmonic_spectrum_matrix(p: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """H = Q diag(1/k) Q^T, k = 1..p, Q a random orthogonal matrix: no gap anywhere, a heavy tail."""
    Q, _ = torch.linalg.qr(torch.randn(p, p, dtype=DT, generator=torch.Generator().manual_seed(seed)))
    lam = 1.0 / torch.arange(1, p + 1, dtype=DT)
    return (Q * lam) @ Q.T, lam


def spectral_error_bound(lam: torch.Tensor, r: int, s: int, q: int) -> float:
    """Bound on ||H - U diag(lam_hat) U^T||_2 for the rank-r output of q subspace-iteration steps with r + s
    columns followed by Rayleigh-Ritz, holding with probability >= 1 - 6 s^-s (s >= 4, q >= 1):

    * P = projector on range(H^q Omega), Omega Gaussian p x (r+s). Halko, Martinsson & Tropp (2011), Cor. 10.9,
      applied to H^q (singular values lam_j^q): ||(I-P) H^q|| <= T = [1 + 17 sqrt(1 + r/s)] lam_{r+1}^q
      + 8 sqrt(r+s)/(s+1) * (sum_{j>r} lam_j^{2q})^{1/2}, failure probability <= 6 s^-s.
    * HMT Prop. 8.5 (||P' M P'||^q <= ||P' M^q P'|| for PSD M, with M = H^2, P' = I-P): ||(I-P)H|| <= T^{1/q}.
    * Rayleigh-Ritz: U diag(lam_hat) U^T is the best rank-r part of PHP, and ||H - PHP|| <= 2 ||(I-P)H||;
      the discarded part has norm lam_{r+1}(PHP) <= lam_{r+1}(H). So the error is <= lam_{r+1} + 2 T^{1/q}.
    The optimum (Eckart-Young) is lam_{r+1}: the bound is a factor 1 + 2 T^{1/q} / lam_{r+1} above it.
    """
    assert s >= 4 and q >= 1
    tail = lam[r:]
    T = (1 + 17 * math.sqrt(1 + r / s)) * tail[0] ** q + 8 * math.sqrt(r + s) / (s + 1) * tail.pow(2 * q).sum().sqrt()
    return float(tail[0] + 2 * T ** (1.0 / q))


def ritz_value_lower_bounds(lam: torch.Tensor, r: int, s: int, q: int) -> torch.Tensor:
    """lam_hat_j >= lam_j / (1 + (lam_{r+1}/lam_j)^{2q} C^2) for j <= r, with probability >= 1 - e^-11 - e^-12.5.

    Derivation (Saibaba 2019, Thm. 1, in this form): in H's eigenbasis Omega = [Omega_1 (r x l); Omega_2],
    l = r + s. The vectors y(c) = H^q Omega Omega_1^+ c, c in span(e_1..e_j), lie in the iterated subspace and
    have coordinates [Lambda_1^q c ; Lambda_2^q Omega_2 Omega_1^+ c], so their Rayleigh quotient is
    >= lam_j / (1 + (lam_{r+1}/lam_j)^{2q} ||Omega_2 Omega_1^+||^2); Courant-Fischer gives lam_hat_j >= that.
    C bounds ||Omega_2|| ||Omega_1^+||: HMT Prop. 10.3 (||Omega_2|| <= sqrt(p-r) + sqrt(l) + u w.p. 1 - e^{-u^2/2},
    u = 5) and Prop. 10.4 (||Omega_1^+|| <= e sqrt(l)/(s+1) * t w.p. 1 - t^{-(s+1)}, t = e; s >= 2).
    """
    p, width = lam.numel(), r + s
    C = (math.sqrt(p - r) + math.sqrt(width) + 5.0) * math.e**2 * math.sqrt(width) / (s + 1)
    head = lam[:r]
    return head / (1 + (lam[r] / head).pow(2 * q) * C**2)


@pytest.mark.parametrize(
    "s,q",
    [
        (10, 2),  # the defaults (conf/aggregator/fipa.yaml; randomized_eigenpairs' own defaults)
        (50, 9),  # the paper's ResNet-20 setting (conf/experiment/cifar10_resnet20.yaml)
    ],
    ids=["defaults s10 q2", "paper s50 q9"],
)
def test_randomized_on_a_slowly_decaying_spectrum_meets_the_subspace_iteration_bounds(s, q):
    p, r = 300, 20
    H, lam = harmonic_spectrum_matrix(p, seed=11)
    bound = spectral_error_bound(lam, r, s, q)
    lower = ritz_value_lower_bounds(lam, r, s, q)
    # The bounds say something: below ||H|| = lam_1 (what the zero matrix achieves), and a top eigenvalue that
    # a purely random subspace (Rayleigh-Ritz with no product by H, i.e. q = 0, s = 0) does not reach.
    assert bound < float(lam[0]) and lower[0] > 0.9 * lam[0]
    naive, _ = torch.linalg.qr(torch.randn(p, r, dtype=DT, generator=torch.Generator().manual_seed(12)))
    theta, vectors = torch.linalg.eigh(naive.T @ H @ naive)
    naive_error = torch.linalg.matrix_norm(H - (naive @ vectors * theta) @ (naive @ vectors).T, 2)
    assert naive_error > bound and theta.max() < lower[0]

    for seed in range(3):
        low = randomized_eigenpairs(lambda V: H @ V, p, r, s, q, generator=torch.Generator().manual_seed(seed))
        assert low.rank == r
        assert_orthonormal(low.eigenvectors)
        # Ritz values interlace (never above the true ones) and meet the lower bounds
        assert bool((low.eigenvalues <= lam[:r] * (1 + 1e-12)).all())
        assert bool((low.eigenvalues >= lower * (1 - 1e-12)).all()), (low.eigenvalues / lam[:r])[:5]
        # the rank-r approximation: within the bound's factor of the optimal error lam_{r+1} (Eckart-Young)
        error = torch.linalg.matrix_norm(H - low.dense(), 2).item()
        assert lam[r] * (1 - 1e-9) <= error <= bound, (error / lam[r], bound / lam[r])
        # captured energy (Ky Fan: at most the top-r sum), at least what the per-eigenvalue bounds add up to
        assert lower.sum() * (1 - 1e-12) <= low.eigenvalues.sum() <= lam[:r].sum() * (1 + 1e-12)


# ------------------------------------------------------------------- the client's choice of eigensolver
def test_choose_eigensolver_follows_rank_memory_and_size():
    # The documented limits: explicit rows while they fit in 2 GiB; a dense eigh up to dimension 5000.
    assert ROWS_MAX_BYTES == 2 * 2**30 and EXACT_MAX_DIM == 5_000
    # rank None (the lossless full-rank factorization) is always exact, even where the rows would not fit
    assert choose_eigensolver(10**9, 10**9, None, 10) == "exact"
    # memory: m * p * element_size > 2 GiB -> matrix-free; exactly 2 GiB still fits
    m, p = 2**16, 2**12  # 2^28 float64 entries = 2 GiB
    assert choose_eigensolver(m, p, 20, 10) == "rows"
    assert choose_eigensolver(m + 1, p, 20, 10) == "randomized"
    assert choose_eigensolver(m, p + 1, 20, 10) == "randomized"
    assert choose_eigensolver(2 * m, p, 20, 10, element_size=4) == "rows"  # float32 rows take half the bytes
    assert choose_eigensolver(2 * m + 1, p, 20, 10, element_size=4) == "randomized"
    # small target: 4 (r + s) < min(m, p) -> subspace iteration on the rows, else a dense eigh (r + s = 25 here)
    assert choose_eigensolver(100, 3000, 20, 5) == "exact"  # 4 * 25 = 100, not below min(m, p) = 100
    assert choose_eigensolver(101, 3000, 20, 5) == "rows"
    assert choose_eigensolver(3000, 100, 20, 5) == "exact"  # the smaller side counts, rows or parameters
    assert choose_eigensolver(3000, 101, 20, 5) == "rows"
    # a large target r + s, but a dense eigh of dimension min(m, p) > 5000 is too slow: rows again
    assert choose_eigensolver(5000, 5000, 2000, 10) == "exact"
    assert choose_eigensolver(5001, 5001, 2000, 10) == "rows"


class FakeClient(nn.Module):
    """What CurvatureCallback reads from a client module: the model, its local data and curvature groups."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        super().__init__()
        self.model, self.local_data, self.client_id, self.round_idx = model, x, 1, 2

    def curvature_groups(self, x):
        return [CurvatureGroup(lambda q, xi: functional_call(self.model, q, (xi,)), x, None, "mse", 0.5)]


def dense_ggn(model: nn.Module, x: torch.Tensor, weight: float) -> torch.Tensor:
    """weight * sum_i J_i^T J_i with J_i the (C x p) Jacobian of the model output, one sample at a time."""
    from torch.autograd.functional import jacobian

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def output(t, xi):
        params, start = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = t[start:start + shape.numel()].view(shape)
            start += shape.numel()
        return functional_call(model, params, (xi,))

    H = torch.zeros(theta.numel(), theta.numel(), dtype=DT)
    for xi in x:
        J = jacobian(lambda t, xi=xi: output(t, xi), theta)
        H += weight * J.T @ J
    return H


def measure(solver: str, model, x, rank, oversample, monkeypatch, forbidden: tuple[str, ...] = ()):
    """The callback's low-rank curvature with `solver`; the functions of the other routes are made to raise."""
    from fipa.curvature import callback as module

    for name in forbidden:
        monkeypatch.setattr(module, name, lambda *a, _name=name, **k: pytest.fail(f"{solver} route called {_name}"))
    callback = CurvatureCallback(rank=rank, eigensolver=solver, oversample=oversample, power_iters=2, sample_block=7)
    callback.on_train_start(None, FakeClient(model, x))
    monkeypatch.undo()
    stats = callback.client_statistics()
    return stats["eigenvectors"], stats["eigenvalues"]


def tiny_regression_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).to(DT)  # p = 38, C = 2


def test_rows_route_is_exact_when_the_block_spans_the_range(monkeypatch):
    """4 samples x 2 outputs: rank(H) = 8 < p = 38. With r + s = 8 columns, one product H V already spans
    range(H), so subspace iteration on the explicit rows returns the exact top-r eigenpairs."""
    model = tiny_regression_net()
    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    H = dense_ggn(model, x, 0.5)
    lam, U = top_dense(H, 3)
    V, theta = measure("rows", model, x, 3, 5, monkeypatch, forbidden=("curvature_matvec", "top_eigenpairs_from_rows"))
    torch.testing.assert_close(theta, lam, rtol=1e-10, atol=0)
    assert_same_subspace(V, U, atol=1e-10)
    assert_orthonormal(V)


def test_rows_route_on_a_full_rank_ggn_gives_ritz_pairs_of_the_dense_matrix(monkeypatch):
    """30 samples x 2 outputs: H (38 x 38) has full rank and r + s = 8 columns cannot span it. `auto` picks the
    rows route here (4 (r + s) = 32 < min(60, 38)); its output must be Ritz pairs of the dense H (V^T H V =
    diag(theta), which fails for any other matrix), with Ritz values below the eigenvalues and, H having a
    large gap after its 8th eigenvalue, close to the top three."""
    model = tiny_regression_net()
    x = torch.randn(30, 3, dtype=DT, generator=torch.Generator().manual_seed(2))
    H = dense_ggn(model, x, 0.5)
    r, s = 3, 5
    assert choose_eigensolver(60, 38, r, s) == "rows"
    lam, _ = top_dense(H, r)
    all_lam = torch.linalg.eigvalsh(H).flip(0)
    assert all_lam[r + s] < 0.2 * all_lam[r + s - 1]  # the gap the closeness below relies on
    rows_route = measure("rows", model, x, r, s, monkeypatch, forbidden=("curvature_matvec", "top_eigenpairs_from_rows"))
    auto_route = measure("auto", model, x, r, s, monkeypatch, forbidden=("curvature_matvec", "top_eigenpairs_from_rows"))
    for V, theta in (rows_route, auto_route):
        assert_orthonormal(V)
        torch.testing.assert_close(V.T @ H @ V, torch.diag(theta), rtol=0, atol=1e-12 * float(lam[0]))
        assert bool((theta <= lam * (1 + 1e-12)).all())
        torch.testing.assert_close(theta, lam, rtol=1e-5, atol=0)
    assert torch.equal(rows_route[1], auto_route[1])  # auto ran the same route with the same start block
    # the matrix-free route iterates on the same H from the same start block: same result up to round-off
    V_free, theta_free = measure("randomized", model, x, r, s, monkeypatch, forbidden=("factor_rows",))
    torch.testing.assert_close(theta_free, rows_route[1], rtol=1e-10, atol=0)
    assert_same_subspace(V_free, rows_route[0], atol=1e-8)
