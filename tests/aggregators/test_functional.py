"""Tests of fipa.aggregators.functional against dense p x p references (float64, small p)."""

from __future__ import annotations

import math

import pytest
import torch

from fipa.aggregators.functional import (
    aggregate_rhs,
    diagonal_weighted_average,
    factor_rhs,
    lowrank_damped_solve,
    lowrank_pinv_solve,
    scaled_factor,
    stack_scaled_factors,
    subspace_curvature,
    weighted_average,
)

DT = torch.float64


# --------------------------------------------------------------------------------------------------
# helpers: random clients and dense references
# --------------------------------------------------------------------------------------------------
def orthonormal(p: int, r: int, gen: torch.Generator) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(p, r, dtype=DT, generator=gen))
    return Q


def make_clients(p, ranks, seed=0, lam_lo=0.1, lam_hi=2.0):
    gen = torch.Generator().manual_seed(seed)
    Us = [orthonormal(p, r, gen) for r in ranks]
    lams = [lam_lo + (lam_hi - lam_lo) * torch.rand(r, dtype=DT, generator=gen) for r in ranks]
    counts = torch.randint(5, 50, (len(ranks),), generator=gen).tolist()
    ws = [n / sum(counts) for n in counts]
    deltas = [torch.randn(p, dtype=DT, generator=gen) for _ in ranks]
    return Us, lams, ws, deltas


def dense_H(Us, lams, ws):
    p = Us[0].shape[0]
    H = torch.zeros(p, p, dtype=DT)
    for U, lam, w in zip(Us, lams, ws):
        H += w * (U * lam) @ U.T
    return H


def dense_b(Us, lams, ws, deltas):
    return sum(w * (U * lam) @ U.T @ d for U, lam, w, d in zip(Us, lams, ws, deltas))


def dense_pinv_solve(H, b, rcond):
    return torch.linalg.pinv(H, rtol=rcond, hermitian=True) @ b


def dense_damped_solve(H, b, beta, gamma):
    p = H.shape[0]
    return gamma * beta * torch.linalg.solve(H + beta * torch.eye(p, dtype=DT), b)


def assert_vec_close(x, ref, rel=1e-9):
    scale = max(1.0, ref.abs().max().item())
    err = (x - ref).abs().max().item()
    assert err <= rel * scale, f"max abs error {err:.3e} > {rel:.1e} * {scale:.3e}"


# (p, ranks): R < p, R == p, R > p
SHAPES = [(30, [3, 5, 4]), (12, [4, 4, 4]), (12, [5, 6, 7, 3]), (30, [1]), (12, [12, 12])]


# --------------------------------------------------------------------------------------------------
# building F and b
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,ranks", SHAPES)
def test_factor_and_rhs_match_dense(p, ranks):
    Us, lams, ws, deltas = make_clients(p, ranks, seed=1)
    H = dense_H(Us, lams, ws)
    b_ref = dense_b(Us, lams, ws, deltas)

    F_cat = torch.cat([scaled_factor(U, lam, w) for U, lam, w in zip(Us, lams, ws)], dim=1)
    F = stack_scaled_factors(Us, lams, ws)
    assert F.shape == (p, sum(ranks))
    assert F.stride() == (1, p)  # column-major, ready for in-place LAPACK
    torch.testing.assert_close(F, F_cat, rtol=0, atol=1e-15)
    torch.testing.assert_close(F @ F.T, H, rtol=1e-12, atol=1e-12)

    b_sum = sum(factor_rhs(U, lam, w, d) for U, lam, w, d in zip(Us, lams, ws, deltas))
    assert_vec_close(b_sum, b_ref, 1e-12)
    assert_vec_close(aggregate_rhs(Us, lams, ws, deltas), b_ref, 1e-12)


def test_factor_rhs_single_client_formula():
    gen = torch.Generator().manual_seed(3)
    U = orthonormal(10, 3, gen)
    lam = torch.tensor([3.0, 2.0, 0.5], dtype=DT)
    d = torch.randn(10, dtype=DT, generator=gen)
    ref = 0.25 * U @ torch.diag(lam) @ U.T @ d
    assert_vec_close(factor_rhs(U, lam, 0.25, d), ref, 1e-13)
    S = scaled_factor(U, lam, 0.25)
    torch.testing.assert_close(S @ S.T, 0.25 * U @ torch.diag(lam) @ U.T)


def test_stack_scaled_factors_reuses_out_buffer():
    Us, lams, ws, _ = make_clients(20, [3, 4], seed=2)
    out = torch.empty(7, 20, dtype=DT).T
    F = stack_scaled_factors(Us, lams, ws, out=out)
    assert F.data_ptr() == out.data_ptr()
    torch.testing.assert_close(F @ F.T, dense_H(Us, lams, ws))
    with pytest.raises(ValueError, match="column-major"):
        stack_scaled_factors(Us, lams, ws, out=torch.empty(20, 7, dtype=DT))
    with pytest.raises(ValueError, match="shape"):
        stack_scaled_factors(Us, lams, ws, out=torch.empty(8, 20, dtype=DT).T)


# --------------------------------------------------------------------------------------------------
# subspace representation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,ranks", SHAPES)
def test_subspace_curvature(p, ranks):
    Us, lams, ws, _ = make_clients(p, ranks, seed=4)
    F = stack_scaled_factors(Us, lams, ws)
    Q, K = subspace_curvature(F)
    k = min(p, sum(ranks))
    assert Q.shape == (p, k) and K.shape == (k, k)
    torch.testing.assert_close(Q.T @ Q, torch.eye(k, dtype=DT), rtol=0, atol=1e-12)
    assert torch.equal(K, K.T)
    torch.testing.assert_close(Q @ K @ Q.T, dense_H(Us, lams, ws), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# pinv solve vs dense torch.linalg.pinv
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,ranks", SHAPES)
@pytest.mark.parametrize("rhs", ["fipa", "arbitrary"])
def test_pinv_solve_matches_dense(p, ranks, rhs):
    Us, lams, ws, deltas = make_clients(p, ranks, seed=5)
    H = dense_H(Us, lams, ws)
    if rhs == "fipa":
        b = dense_b(Us, lams, ws, deltas)
    else:  # not in range(F): the component in the null space must be dropped
        b = torch.randn(p, generator=torch.Generator().manual_seed(9), dtype=DT)
    F = stack_scaled_factors(Us, lams, ws)
    for rcond in (1e-5, 1e-2):
        x = lowrank_pinv_solve(F, b, rcond)
        assert_vec_close(x, dense_pinv_solve(H, b, rcond))


def test_pinv_solve_full_rank_when_R_exceeds_p_is_the_inverse():
    Us, lams, ws, deltas = make_clients(12, [5, 6, 7, 3], seed=6)
    H = dense_H(Us, lams, ws)
    assert torch.linalg.matrix_rank(H) == 12
    b = dense_b(Us, lams, ws, deltas)
    x = lowrank_pinv_solve(stack_scaled_factors(Us, lams, ws), b)
    assert_vec_close(x, torch.linalg.solve(H, b))


def test_pinv_solve_duplicate_factors_rank_deficient():
    # two clients with the SAME eigenvectors, plus one F built with literally duplicated columns
    Us, lams, ws, deltas = make_clients(30, [4, 3], seed=7)
    Us = [Us[0], Us[0].clone(), Us[1]]
    lams = [lams[0], lams[0] * 0.5, lams[1]]
    ws = [0.3, 0.3, 0.4]
    deltas = deltas + [deltas[0] * -2.0]
    H = dense_H(Us, lams, ws)
    b = dense_b(Us, lams, ws, deltas)
    F = stack_scaled_factors(Us, lams, ws)
    assert torch.linalg.matrix_rank(F) < F.shape[1]
    assert_vec_close(lowrank_pinv_solve(F, b), dense_pinv_solve(H, b, 1e-5))

    G = torch.cat([F, F, F[:, :2]], dim=1)  # duplicated columns, R = 20 < p
    HG = G @ G.T
    assert_vec_close(lowrank_pinv_solve(G, b), dense_pinv_solve(HG, b, 1e-5))
    # duplicated columns with R > p
    small = F[:12, :5]
    Gs = torch.cat([small, small, small], dim=1)  # 12 x 15, rank 5
    bs = torch.randn(12, dtype=DT, generator=torch.Generator().manual_seed(1))
    assert_vec_close(lowrank_pinv_solve(Gs, bs), dense_pinv_solve(Gs @ Gs.T, bs, 1e-5))


def test_pinv_solve_drops_eigenvalues_below_rcond():
    gen = torch.Generator().manual_seed(8)
    p = 30
    U = orthonormal(p, 6, gen)
    # eigenvalues of H: 1, 0.5, 0.1, 2e-5 (kept), 3e-6 and 1e-9 (dropped at rcond=1e-5)
    lam = torch.tensor([1.0, 0.5, 0.1, 2e-5, 3e-6, 1e-9], dtype=DT)
    Us, lams, ws = [U[:, :3], U[:, 3:]], [lam[:3] * 2, lam[3:] * 2], [0.5, 0.5]
    H = dense_H(Us, lams, ws)
    F = stack_scaled_factors(Us, lams, ws)
    b = torch.randn(p, dtype=DT, generator=gen)
    x = lowrank_pinv_solve(F, b, 1e-5)
    ref = dense_pinv_solve(H, b, 1e-5)
    assert_vec_close(x, ref)
    # the threshold really acted: keeping everything gives a very different answer ...
    assert (lowrank_pinv_solve(F, b, 1e-12) - ref).abs().max() > 1e3
    # ... and the dropped directions carry nothing, the kept tiny one (2e-5) is inverted
    assert abs(U[:, 4] @ x) < 1e-8 and abs(U[:, 5] @ x) < 1e-8
    assert math.isclose(U[:, 3] @ x, (U[:, 3] @ b) / 2e-5, rel_tol=1e-8)


def test_pinv_solve_zero_and_empty_factor():
    b = torch.randn(12, dtype=DT)
    assert torch.equal(lowrank_pinv_solve(torch.zeros(12, 5, dtype=DT), b), torch.zeros(12, dtype=DT))
    assert torch.equal(lowrank_pinv_solve(torch.zeros(12, 0, dtype=DT), b), torch.zeros(12, dtype=DT))
    assert torch.equal(dense_pinv_solve(torch.zeros(12, 12, dtype=DT), b, 1e-5), torch.zeros(12, dtype=DT))


# --------------------------------------------------------------------------------------------------
# damped solve vs dense solve
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("p,ranks", SHAPES)
@pytest.mark.parametrize("beta,gamma", [(0.5, 0.5), (0.01, 1.0), (3.0, 0.7)])
def test_damped_solve_matches_dense(p, ranks, beta, gamma):
    Us, lams, ws, deltas = make_clients(p, ranks, seed=10)
    H = dense_H(Us, lams, ws)
    F = stack_scaled_factors(Us, lams, ws)
    b_fipa = dense_b(Us, lams, ws, deltas)
    b_any = torch.randn(p, dtype=DT, generator=torch.Generator().manual_seed(11))
    for b in (b_fipa, b_any):
        assert_vec_close(lowrank_damped_solve(F, b, beta, gamma), dense_damped_solve(H, b, beta, gamma))


def test_damped_solve_rank_deficient_and_zero():
    Us, lams, ws, _ = make_clients(30, [4], seed=12)
    F = stack_scaled_factors(Us, lams, ws)
    G = torch.cat([F, F], dim=1)
    b = torch.randn(30, dtype=DT)
    assert_vec_close(lowrank_damped_solve(G, b, 0.5, 0.5), dense_damped_solve(G @ G.T, b, 0.5, 0.5))
    # H = 0: gamma * beta * (beta I)^{-1} b = gamma * b
    assert_vec_close(lowrank_damped_solve(torch.zeros(30, 3, dtype=DT), b, 0.5, 0.7), 0.7 * b, 1e-15)
    assert_vec_close(lowrank_damped_solve(torch.zeros(30, 0, dtype=DT), b, 0.5, 0.7), 0.7 * b, 1e-15)


@pytest.mark.parametrize("p,ranks", [(30, [3, 5, 4]), (12, [5, 6, 7, 3])])
@pytest.mark.parametrize("gamma", [0.5, 1.0])
def test_damped_solve_tends_to_gamma_b_as_beta_grows_at_rate_one_over_beta(p, ranks, gamma):
    """x(beta) = gamma beta (H + beta I)^-1 b = gamma b - gamma H (H + beta I)^-1 b, expanded in 1/beta:

        x = gamma b - gamma H b / beta + gamma H^2 b / beta^2 - ...,   with the remainders
        ||beta (x - gamma b) + gamma H b||                 = gamma ||H^2 (H + beta I)^-1 b|| <= gamma ||H||^2 ||b|| / beta
        ||beta^2 (x - gamma b) + beta gamma H b - gamma H^2 b|| <= gamma ||H||^3 ||b|| / beta.

    H b is formed as F (F^T b) and ||H|| as sigma_max(F)^2, never through the solver's QR of F. The first
    remainder says x -> gamma b with error exactly gamma ||H b|| / beta to first order (the rate 1/beta, not
    faster); the second pins the next term of the expansion."""
    Us, lams, ws, _ = make_clients(p, ranks, seed=21)
    F = stack_scaled_factors(Us, lams, ws)
    b = torch.randn(p, dtype=DT, generator=torch.Generator().manual_seed(22))
    Hb = F @ (F.T @ b)
    H2b = F @ (F.T @ Hb)
    norm_H = torch.linalg.matrix_norm(F, 2).item() ** 2
    nb = b.norm().item()
    eps = torch.finfo(DT).eps
    errors = []
    for beta in (1e1, 1e2, 1e3, 1e4, 1e5, 1e6):
        x = lowrank_damped_solve(F, b, beta, gamma)
        slack = 50 * eps * nb * beta  # round-off of x - gamma b, magnified by beta
        error = (x - gamma * b).norm().item()
        errors.append(error)
        assert error <= gamma * norm_H * nb / beta + 50 * eps * nb
        first = (beta * (x - gamma * b) + gamma * Hb).norm().item()
        assert first <= gamma * norm_H**2 * nb / beta + slack, beta
        if beta <= 1e4:  # beyond, the round-off (beta^2 eps ||b||) swamps the third-order term
            second = (beta**2 * (x - gamma * b) + beta * gamma * Hb - gamma * H2b).norm().item()
            assert second <= gamma * norm_H**3 * nb / beta + slack * beta, beta
    # each tenfold beta divides the distance to gamma b by ten (to within the O(1/beta) correction)
    ratios = [a / b_ for a, b_ in zip(errors[1:], errors[2:])]
    assert all(abs(r - 10) < 0.2 for r in ratios), ratios


# --------------------------------------------------------------------------------------------------
# in-place factorisation and float32
# --------------------------------------------------------------------------------------------------
def test_overwrite_factor():
    Us, lams, ws, deltas = make_clients(30, [3, 5, 4], seed=13)
    H = dense_H(Us, lams, ws)
    b = dense_b(Us, lams, ws, deltas)
    F = stack_scaled_factors(Us, lams, ws)
    F0 = F.clone()
    x = lowrank_pinv_solve(F, b)
    assert torch.equal(F, F0)  # default: the caller's F is untouched
    x_over = lowrank_pinv_solve(F, b, overwrite_factor=True)
    assert not torch.equal(F, F0)  # column-major F was factorised in place
    assert_vec_close(x_over, x, 1e-13)
    F = stack_scaled_factors(Us, lams, ws)
    x_damped = lowrank_damped_solve(F, b, 0.5, 0.5, overwrite_factor=True)
    assert_vec_close(x_damped, dense_damped_solve(H, b, 0.5, 0.5))
    # a row-major F cannot be factorised in place: it is copied and left intact
    Fr = F0.contiguous()
    Fr0 = Fr.clone()
    assert_vec_close(lowrank_pinv_solve(Fr, b, overwrite_factor=True), x, 1e-13)
    assert torch.equal(Fr, Fr0)


def test_float32_close_to_float64():
    Us, lams, ws, deltas = make_clients(200, [10, 10, 10], seed=14)
    F = stack_scaled_factors(Us, lams, ws)
    b = aggregate_rhs(Us, lams, ws, deltas)
    x64 = lowrank_pinv_solve(F, b)
    x32 = lowrank_pinv_solve(F.float(), b.float())
    assert x32.dtype == torch.float32
    assert (x32.double() - x64).norm() <= 1e-4 * x64.norm()
    d64 = lowrank_damped_solve(F, b, 0.5, 0.5)
    d32 = lowrank_damped_solve(F.float(), b.float(), 0.5, 0.5)
    assert (d32.double() - d64).norm() <= 1e-5 * d64.norm()


# --------------------------------------------------------------------------------------------------
# FIPA facts from the spec
# --------------------------------------------------------------------------------------------------
def full_rank_factor(H0):
    lam, U = torch.linalg.eigh(H0)
    return U, lam.clamp_min(0.0)


def test_same_full_rank_curvature_equals_fedavg():
    gen = torch.Generator().manual_seed(20)
    p = 12
    A = torch.randn(p, p, dtype=DT, generator=gen)
    H0 = A @ A.T / p + 0.1 * torch.eye(p, dtype=DT)
    U, lam = full_rank_factor(H0)  # r = p
    counts = [10, 30, 25, 35]
    deltas = [torch.randn(p, dtype=DT, generator=gen) for _ in counts]
    fedavg = weighted_average(deltas, counts)
    for ws in ([n / sum(counts) for n in counts], counts):  # normalised weights or raw counts
        F = stack_scaled_factors([U] * 4, [lam] * 4, ws)
        b = aggregate_rhs([U] * 4, [lam] * 4, ws, deltas)
        assert_vec_close(lowrank_pinv_solve(F, b), fedavg, 1e-10)


def test_direction_seen_by_one_client_takes_its_update():
    gen = torch.Generator().manual_seed(21)
    p = 12
    B = orthonormal(p, p, gen)
    Us = [B[:, 0:3], B[:, 3:7], B[:, 5:9]]  # client 0's subspace is orthogonal to the others'
    lams = [torch.tensor([2.0, 1.0, 0.3], dtype=DT), torch.rand(4, dtype=DT, generator=gen) + 0.1,
            torch.rand(4, dtype=DT, generator=gen) + 0.1]
    ws = [0.2, 0.5, 0.3]
    deltas = [torch.randn(p, dtype=DT, generator=gen) for _ in ws]
    F = stack_scaled_factors(Us, lams, ws)
    x = lowrank_pinv_solve(F, aggregate_rhs(Us, lams, ws, deltas))
    P0 = Us[0] @ Us[0].T
    assert_vec_close(P0 @ x, P0 @ deltas[0], 1e-12)
    # a single direction too, e.g. the one of client 0's smallest eigenvalue
    d = B[:, 2]
    assert math.isclose(d @ x, d @ deltas[0], rel_tol=1e-10, abs_tol=1e-12)
    # and FedAvg does not do that
    assert abs(d @ weighted_average(deltas, ws) - d @ deltas[0]) > 1e-3


@pytest.mark.parametrize("p,ranks", [(30, [3, 5, 4, 6]), (12, [5, 6, 7, 3])])
def test_permuting_clients_leaves_direction_unchanged(p, ranks):
    Us, lams, ws, deltas = make_clients(p, ranks, seed=22)
    F = stack_scaled_factors(Us, lams, ws)
    b = aggregate_rhs(Us, lams, ws, deltas)
    x_pinv = lowrank_pinv_solve(F, b)
    x_damp = lowrank_damped_solve(F, b, 0.5, 0.5)
    for perm in ([3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1]):
        P = lambda seq: [seq[i] for i in perm]  # noqa: E731
        Fp = stack_scaled_factors(P(Us), P(lams), P(ws))
        bp = aggregate_rhs(P(Us), P(lams), P(ws), P(deltas))
        assert (lowrank_pinv_solve(Fp, bp) - x_pinv).abs().max() <= 1e-12
        assert (lowrank_damped_solve(Fp, bp, 0.5, 0.5) - x_damp).abs().max() <= 1e-12


def test_linear_least_squares_round_is_centralized_solution():
    """Linear model, MSE, full-rank GGN, exact local solves, step 1 -> centralized least squares."""
    gen = torch.Generator().manual_seed(23)
    p = 8
    sizes = [15, 40, 25]
    Xs = [torch.randn(n, p, dtype=DT, generator=gen) * torch.linspace(0.2, 3.0, p, dtype=DT) ** (i + 1)
          for i, n in enumerate(sizes)]  # clients with different designs
    ys = [torch.randn(n, dtype=DT, generator=gen) for n in sizes]
    theta = torch.randn(p, dtype=DT, generator=gen)
    ws = [n / sum(sizes) for n in sizes]
    Us, lams, deltas = [], [], []
    for X, y, n in zip(Xs, ys, sizes):
        U, lam = full_rank_factor(X.T @ X / n)  # GGN of (1/2N_m)||X theta - y||^2
        Us.append(U)
        lams.append(lam)
        deltas.append(torch.linalg.lstsq(X, y).solution - theta)
    F = stack_scaled_factors(Us, lams, ws)
    direction = lowrank_pinv_solve(F, aggregate_rhs(Us, lams, ws, deltas))
    central = torch.linalg.lstsq(torch.cat(Xs), torch.cat(ys)).solution
    assert_vec_close(theta + direction, central, 1e-9)
    assert (theta + weighted_average(deltas, ws) - central).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------------
# FedAvg and the diagonal baseline, by hand
# --------------------------------------------------------------------------------------------------
def test_weighted_average_by_hand():
    v1 = torch.tensor([1.0, 2.0, 3.0], dtype=DT)
    v2 = torch.tensor([5.0, 6.0, 7.0], dtype=DT)
    # (1*[1,2,3] + 3*[5,6,7]) / 4 = [16, 20, 24] / 4
    torch.testing.assert_close(weighted_average([v1, v2], [1, 3]), torch.tensor([4.0, 5.0, 6.0], dtype=DT))
    torch.testing.assert_close(
        weighted_average([v1, v2], [0.25, 0.75]), torch.tensor([4.0, 5.0, 6.0], dtype=DT)
    )
    torch.testing.assert_close(weighted_average([v1, v2], [1, 0]), v1)
    # any common shape works
    m = torch.arange(6, dtype=DT).reshape(2, 3)
    torch.testing.assert_close(weighted_average([m, 3 * m], [1, 1]), 2 * m)


def test_diagonal_weighted_average_by_hand():
    d1 = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)
    d2 = torch.tensor([5.0, 6.0, 11.0, 8.0], dtype=DT)
    c1 = torch.tensor([1.0, 0.0, 1e-9, 1.0], dtype=DT)
    c2 = torch.tensor([1.0, 2.0, 0.0, 1e-3], dtype=DT)
    # weights 1:3 (normalised 1/4, 3/4)
    # coord 0: (1*1*1 + 3*1*5) / (1*1 + 3*1)      = 16/4        = 4
    # coord 1: only client 2 sees it: (3*2*6)/(3*2) = 6
    # coord 2: total curvature 1e-9/4 < 1e-5 * max  -> plain average (1*3 + 3*11)/4 = 9
    # coord 3: (1*1*4 + 3*1e-3*8) / (1 + 3e-3)    = 4.024/1.003
    expected = torch.tensor([4.0, 6.0, 9.0, 4.024 / 1.003], dtype=DT)
    out = diagonal_weighted_average([d1, d2], [c1, c2], [1, 3])
    torch.testing.assert_close(out, expected, rtol=1e-14, atol=1e-14)
    # with rcond large enough coord 3 (total 1.003/4) stays, coord 2 still falls back
    out2 = diagonal_weighted_average([d1, d2], [c1, c2], [1, 3], rcond=0.1)
    torch.testing.assert_close(out2, expected, rtol=1e-14, atol=1e-14)
    # with rcond = 0.2 coord 3 (0.25075 / max 1.5 = 0.167) falls back too: (4 + 24)/4 = 7
    out3 = diagonal_weighted_average([d1, d2], [c1, c2], [1, 3], rcond=0.2)
    torch.testing.assert_close(out3, torch.tensor([4.0, 6.0, 9.0, 7.0], dtype=DT), rtol=1e-14, atol=1e-14)
    # zero curvature everywhere -> FedAvg
    z = torch.zeros(4, dtype=DT)
    torch.testing.assert_close(
        diagonal_weighted_average([d1, d2], [z, z], [1, 3]), weighted_average([d1, d2], [1, 3])
    )


def test_diagonal_weighted_average_identical_diagonals_is_fedavg():
    gen = torch.Generator().manual_seed(30)
    deltas = [torch.randn(50, dtype=DT, generator=gen) for _ in range(3)]
    c = torch.rand(50, dtype=DT, generator=gen) + 0.1
    torch.testing.assert_close(diagonal_weighted_average(deltas, [c, c, c], [2, 5, 3]),
                               weighted_average(deltas, [2, 5, 3]))


# --------------------------------------------------------------------------------------------------
# argument validation
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -1e-5, float("nan"), float("inf")])
def test_invalid_scalars_raise(bad):
    F = torch.randn(10, 3, dtype=DT)
    b = torch.randn(10, dtype=DT)
    with pytest.raises(ValueError, match="rcond"):
        lowrank_pinv_solve(F, b, rcond=bad)
    with pytest.raises(ValueError, match="beta"):
        lowrank_damped_solve(F, b, beta=bad)
    with pytest.raises(ValueError, match="gamma"):
        lowrank_damped_solve(F, b, beta=0.5, gamma=bad)
    with pytest.raises(ValueError, match="rcond"):
        diagonal_weighted_average([b], [b.abs()], [1.0], rcond=bad)


def test_invalid_shapes_and_weights_raise():
    F = torch.randn(10, 3, dtype=DT)
    with pytest.raises(ValueError, match="length p"):
        lowrank_pinv_solve(F, torch.randn(9, dtype=DT))
    with pytest.raises(ValueError, match="matrix"):
        lowrank_pinv_solve(torch.randn(10, dtype=DT), torch.randn(10, dtype=DT))
    v = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="weights"):
        weighted_average([v, v], [1.0])
    with pytest.raises(ValueError, match="at least one"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="all be zero"):
        weighted_average([v, v], [0.0, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_average([v, v], [1.0, -1.0])
    U = orthonormal(10, 3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="non-negative"):
        scaled_factor(U, torch.tensor([1.0, -0.1, 0.2], dtype=DT), 0.5)
    with pytest.raises(ValueError, match="eigenvalues must have shape"):
        factor_rhs(U, torch.ones(2, dtype=DT), 0.5, torch.ones(10, dtype=DT))
    with pytest.raises(ValueError, match="delta"):
        factor_rhs(U, torch.ones(3, dtype=DT), 0.5, torch.ones(11, dtype=DT))
    with pytest.raises(ValueError, match="negative"):
        diagonal_weighted_average([v], [-v], [1.0])


# --------------------------------------------------------------------------------------------------
# robust FIPA pieces: the complement of the kept subspace and the FedAvg-anchored (Levenberg-Marquardt) solve
# --------------------------------------------------------------------------------------------------
def dense_pieces(p=12, ranks=(2, 3), seed=3):
    Us, lams, ws, deltas = make_clients(p, list(ranks), seed=seed)
    F = stack_scaled_factors(Us, lams, ws)
    H = F @ F.T
    b = aggregate_rhs(Us, lams, ws, deltas)
    fedavg = weighted_average(deltas, ws)
    return F, H, b, fedavg


@pytest.mark.parametrize("rcond", [1e-5, 0.3])
def test_pinv_with_complement_matches_the_dense_projector_of_the_kept_eigenvectors(rcond):
    from fipa.aggregators.functional import lowrank_pinv_solve_with_complement

    F, H, b, v = dense_pieces()
    evals, evecs = torch.linalg.eigh(H)
    kept = evecs[:, evals > rcond * evals.max()]
    assert 0 < kept.shape[1] < H.shape[0]  # a proper subspace: the complement is not trivial
    direction, complement = lowrank_pinv_solve_with_complement(F.clone(), b, v, rcond)
    assert_vec_close(direction, torch.linalg.pinv(H, rtol=rcond, hermitian=True) @ b, 1e-10)
    assert_vec_close(complement, v - kept @ (kept.T @ v), 1e-12)
    assert (kept.T @ complement).abs().max() < 1e-12  # nothing of the kept subspace is left in the complement
    if rcond == 0.3:  # a larger cut-off drops eigenvectors inside span(F): the complement then holds them
        span = torch.linalg.qr(F)[0]
        assert (complement - (v - span @ (span.T @ v))).abs().max() > 1e-3


def test_subspace_complement_is_orthogonal_to_every_client_factor():
    from fipa.aggregators.functional import subspace_complement

    F, _, _, v = dense_pieces()
    out = subspace_complement(F.clone(), v)
    span = torch.linalg.qr(F)[0]
    assert_vec_close(out, v - span @ (span.T @ v), 1e-12)
    assert (F.T @ out).abs().max() < 1e-12


@pytest.mark.parametrize("mu", [1e-3, 0.7, 50.0])
def test_anchored_solve_matches_the_dense_regularised_system(mu):
    from fipa.aggregators.functional import lowrank_anchored_solve

    F, H, b, anchor = dense_pieces()
    expected = torch.linalg.solve(H + mu * torch.eye(H.shape[0], dtype=DT), b + mu * anchor)
    assert_vec_close(lowrank_anchored_solve(F.clone(), b, anchor, mu), expected, 1e-9)


def test_anchored_solve_spans_fipa_and_the_anchor():
    from fipa.aggregators.functional import lowrank_anchored_solve

    F, H, b, anchor = dense_pieces(p=8, ranks=(4, 5))  # R = 9 > p: H is full rank
    fipa = torch.linalg.solve(H, b)
    assert_vec_close(lowrank_anchored_solve(F.clone(), b, anchor, 1e-9), fipa, 1e-6)  # mu -> 0: FIPA
    far = lowrank_anchored_solve(F.clone(), b, anchor, 1e9)
    assert_vec_close(far, anchor, 1e-7)  # mu -> inf: the anchor (FedAvg)
    # with a rank-deficient H, the part of the anchor outside span(F) passes through unchanged for any mu
    F, H, b, anchor = dense_pieces()
    span = torch.linalg.qr(F)[0]
    outside = anchor - span @ (span.T @ anchor)
    for mu in (1e-6, 1.0):
        d = lowrank_anchored_solve(F.clone(), b, anchor, mu)
        assert_vec_close(d - span @ (span.T @ d), outside, 1e-9)
