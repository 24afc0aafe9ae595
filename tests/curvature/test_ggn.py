"""GGN products against dense references built sample by sample with torch.autograd.functional."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call, jacrev

from fipa.curvature import (
    ESTIMATORS,
    CurvatureGroup,
    curvature_diagonal,
    curvature_matvec,
    factor_rows,
    flatten_params,
    output_factors,
    subsample_groups,
    unflatten_like,
)

DT = torch.float64


def mlp(sizes: list[int], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(DT)


def output_fn_of(model: nn.Module):
    return lambda params, x: functional_call(model, params, (x,))


def detached_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def loss_fn(loss: str):
    if loss == "mse":
        return lambda z, y: 0.5 * (z - y.reshape(z.shape)).square().sum()
    return lambda z, y: torch.nn.functional.cross_entropy(z.unsqueeze(0), y.reshape(1))


def dense_jacobians(params, group: CurvatureGroup) -> list[torch.Tensor]:
    """Per-sample C x p Jacobians of the output, a Python loop over samples (reference only)."""
    theta = flatten_params(params)
    return [
        jacobian(lambda t: group.output_fn(unflatten_like(t, params), x).reshape(-1), theta)
        for x in group.inputs
    ]


def dense_ggn(params, groups) -> torch.Tensor:
    """sum_groups w sum_i J_i^T S_i J_i with S_i the autograd Hessian of the loss w.r.t. the outputs."""
    p = flatten_params(params).numel()
    H = torch.zeros(p, p, dtype=DT)
    for group in groups:
        loss = loss_fn(group.loss)
        for i, J in enumerate(dense_jacobians(params, group)):
            z = group.output_fn(params, group.inputs[i]).reshape(-1).detach()
            y = group.targets[i] if group.targets is not None else torch.zeros_like(z)
            S = hessian(lambda zz: loss(zz, y), z)
            H += group.weight * J.T @ S @ J
    return H


@pytest.fixture(scope="module")
def regression():
    model = mlp([2, 5, 5, 1], seed=0)
    torch.manual_seed(1)
    x = torch.rand(13, 2, dtype=DT)
    y = torch.randn(13, 1, dtype=DT)
    return detached_params(model), CurvatureGroup(output_fn_of(model), x, y, "mse", weight=1 / 13)


@pytest.fixture(scope="module")
def classification():
    model = mlp([3, 6, 4], seed=2)
    torch.manual_seed(3)
    x = torch.randn(11, 3, dtype=DT)
    y = torch.randint(0, 4, (11,))
    return detached_params(model), CurvatureGroup(output_fn_of(model), x, y, "cross_entropy", weight=0.7)


@pytest.fixture(params=["regression", "classification"])
def problem(request):
    return request.getfixturevalue(request.param)


def test_flatten_roundtrip(classification):
    params, _ = classification
    vec = flatten_params(params)
    back = unflatten_like(vec, params)
    assert list(back) == list(params)
    assert all(torch.equal(back[k], params[k]) for k in params)
    batched = unflatten_like(torch.stack([vec, 2 * vec]), params)
    assert all(torch.equal(batched[k][1], 2 * params[k]) for k in params)


def test_cross_entropy_factor_matches_autograd_hessian():
    torch.manual_seed(4)
    z = torch.randn(6, 5, dtype=DT)
    A = output_factors(z, None, "cross_entropy", "ggn")
    assert A.shape == (6, 5, 5)
    p = torch.softmax(z, -1)
    for i in range(6):
        S = hessian(lambda zz: torch.nn.functional.cross_entropy(zz.unsqueeze(0), torch.tensor([0])), z[i])
        torch.testing.assert_close(A[i] @ A[i].T, S, atol=1e-13, rtol=0)
        torch.testing.assert_close(S, torch.diag(p[i]) - torch.outer(p[i], p[i]), atol=1e-13, rtol=0)


def test_factor_rows_match_dense_ggn(problem):
    params, group = problem
    B = factor_rows(params, [group], chunk_size=4)
    C = group.output_fn(params, group.inputs[0]).numel()
    assert B.shape == (group.inputs.shape[0] * C, flatten_params(params).numel())
    torch.testing.assert_close(B.T @ B, dense_ggn(params, [group]), atol=1e-10, rtol=0)


def test_two_groups_sum_including_pinn_residual(regression):
    """A PINN-like second group: the residual u_x1 + u_x2 - u needs derivatives w.r.t. the input inside output_fn."""
    params, group = regression
    model_fn = group.output_fn

    def residual(p, x):
        u = lambda xx: model_fn(p, xx).squeeze(-1)  # noqa: E731
        return (jacrev(u)(x).sum() - u(x)).reshape(1)

    torch.manual_seed(5)
    bc = CurvatureGroup(residual, torch.rand(7, 2, dtype=DT), None, "mse", weight=3.0)
    groups = [group, bc]
    H = dense_ggn(params, groups)
    B = factor_rows(params, groups, chunk_size=5)
    torch.testing.assert_close(B.T @ B, H, atol=1e-10, rtol=0)
    V = torch.randn(H.shape[0], 3, dtype=DT)
    torch.testing.assert_close(curvature_matvec(params, groups, V, chunk_size=5), H @ V, atol=1e-10, rtol=0)
    torch.testing.assert_close(curvature_diagonal(params, groups, chunk_size=5), torch.diagonal(H), atol=1e-10, rtol=0)


def test_matvec_and_diagonal_match_dense(problem):
    params, group = problem
    H = dense_ggn(params, [group])
    torch.manual_seed(6)
    V = torch.randn(H.shape[0], 4, dtype=DT)
    torch.testing.assert_close(curvature_matvec(params, [group], V, chunk_size=5), H @ V, atol=1e-10, rtol=0)
    v = V[:, 0]
    torch.testing.assert_close(curvature_matvec(params, [group], v), H @ v, atol=1e-10, rtol=0)
    torch.testing.assert_close(curvature_diagonal(params, [group], chunk_size=5), torch.diagonal(H), atol=1e-10, rtol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_products_agree_with_rows_for_every_estimator(problem, estimator):
    """matvec = B^T (B V) and diag = sum B**2 for the same sample: mc draws are fixed by the generator state."""
    params, group = problem
    gen = torch.Generator().manual_seed(7)
    B = factor_rows(params, [group], estimator, gen, chunk_size=4)
    V = torch.randn(B.shape[1], 3, dtype=DT, generator=torch.Generator().manual_seed(8))
    HV = curvature_matvec(params, [group], V, estimator, gen, chunk_size=3)
    torch.testing.assert_close(HV, B.T @ (B @ V), atol=1e-12, rtol=0)
    diag = curvature_diagonal(params, [group], estimator, gen, chunk_size=None)
    torch.testing.assert_close(diag, B.square().sum(0), atol=1e-12, rtol=0)


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_chunking_does_not_change_results(problem, estimator):
    params, group = problem
    gen = torch.Generator().manual_seed(9)
    V = torch.randn(flatten_params(params).numel(), 2, dtype=DT, generator=torch.Generator().manual_seed(10))
    for fn, args in [(factor_rows, ()), (curvature_diagonal, ())]:
        torch.testing.assert_close(
            fn(params, [group], estimator, gen, chunk_size=3), fn(params, [group], estimator, gen, chunk_size=None),
            atol=1e-13, rtol=0,
        )
    torch.testing.assert_close(
        curvature_matvec(params, [group], V, estimator, gen, chunk_size=2),
        curvature_matvec(params, [group], V, estimator, gen, chunk_size=None),
        atol=1e-13, rtol=0,
    )


def test_empirical_rows_are_per_sample_loss_gradients(problem):
    params, group = problem
    B = factor_rows(params, [group], "empirical", chunk_size=4)
    loss = loss_fn(group.loss)
    theta = flatten_params(params).clone().requires_grad_(True)
    for i, x in enumerate(group.inputs):
        (grad,) = torch.autograd.grad(loss(group.output_fn(unflatten_like(theta, params), x), group.targets[i]), theta)
        torch.testing.assert_close(B[i], math.sqrt(group.weight) * grad, atol=1e-12, rtol=0)


def test_mc_rows_use_output_factors_and_keep_generator(problem):
    """factor_rows(mc) = sqrt(w) s^T J with s = output_factors from the same generator state, which is not advanced."""
    params, group = problem
    gen = torch.Generator().manual_seed(11)
    state = gen.get_state()
    B = factor_rows(params, [group], "mc", gen)
    assert torch.equal(gen.get_state(), state)
    z = torch.stack([group.output_fn(params, x).reshape(-1) for x in group.inputs])
    s = output_factors(z, None, group.loss, "mc", gen)
    J = torch.stack(dense_jacobians(params, group))
    expected = math.sqrt(group.weight) * torch.einsum("nck,ncp->nkp", s, J).reshape(-1, J.shape[-1])
    torch.testing.assert_close(B, expected, atol=1e-12, rtol=0)
    assert torch.equal(factor_rows(params, [group], "mc", gen), B)
    other = factor_rows(params, [group], "mc", torch.Generator().manual_seed(12))
    assert not torch.allclose(other, B)


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_mc_factors_are_unbiased(loss):
    """E[s s^T] = S per sample, hence E[B^T B] = GGN: average 4000 draws (vectorized by repeating the outputs)."""
    torch.manual_seed(13)
    n, C, draws = 5, 4, 4000
    z = torch.randn(n, C, dtype=DT)
    S_draws = output_factors(z.repeat(draws, 1), None, loss, "mc", torch.Generator().manual_seed(14))
    S_mc = (S_draws @ S_draws.transpose(1, 2)).reshape(draws, n, C, C).mean(0)
    A = output_factors(z, None, loss, "ggn")
    S = A @ A.transpose(1, 2)
    J = torch.randn(n, C, 6, dtype=DT)  # any fixed Jacobians: the estimator only enters through S
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, S, J)
    ggn_mc = torch.einsum("ncp,ncd,ndq->pq", J, S_mc, J)
    assert torch.linalg.norm(ggn_mc - ggn) / torch.linalg.norm(ggn) < 0.05


def test_mc_noise_does_not_depend_on_model_dtype(classification):
    params, group = classification
    gen = torch.Generator().manual_seed(15)
    params32 = {k: v.float() for k, v in params.items()}
    group32 = CurvatureGroup(group.output_fn, group.inputs.float(), group.targets, group.loss, group.weight)
    torch.testing.assert_close(
        factor_rows(params32, [group32], "mc", gen).double(), factor_rows(params, [group], "mc", gen),
        atol=1e-5, rtol=1e-4,
    )


def test_dtypes_grad_and_empty(regression):
    params, group = regression
    live = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    B = factor_rows(live, [group])
    assert not B.requires_grad
    V32 = torch.randn(B.shape[1], 2)
    out = curvature_matvec(params, [group], V32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (B.T @ (B @ V32.double())).float())
    assert factor_rows(params, []).shape == (0, B.shape[1])
    assert torch.equal(curvature_matvec(params, [], V32), torch.zeros_like(V32))


def test_bad_arguments(regression):
    params, group = regression
    with pytest.raises(ValueError):
        factor_rows(params, [group], "fisher")
    with pytest.raises(ValueError):
        factor_rows(params, [CurvatureGroup(group.output_fn, group.inputs, None, "mse")], "empirical")
    with pytest.raises(ValueError):
        factor_rows(params, [CurvatureGroup(group.output_fn, group.inputs, group.targets, "hinge")])
    with pytest.raises(ValueError):
        factor_rows(params, [CurvatureGroup(group.output_fn, group.inputs, group.targets, "mse", -1.0)])


def test_subsampled_curvature_is_the_reweighted_ggn_of_the_chosen_samples_and_unbiased(classification):
    params, group = classification  # 11 samples
    assert subsample_groups([group], 11, torch.Generator().manual_seed(0)) == [group]  # no cap reached: unchanged
    generator = torch.Generator().manual_seed(5)
    (sub,) = subsample_groups([group], 4, generator)
    assert len(sub.inputs) == 4 and sub.weight == pytest.approx(group.weight * 11 / 4)
    chosen = [int(torch.nonzero((group.inputs == x).all(1))[0]) for x in sub.inputs]
    assert len(set(chosen)) == 4 and torch.equal(sub.targets, group.targets[chosen])  # no sample twice, labels follow
    rows = factor_rows(params, [sub])
    reference = CurvatureGroup(group.output_fn, group.inputs[chosen], group.targets[chosen], group.loss, group.weight * 11 / 4)
    torch.testing.assert_close(rows.T @ rows, dense_ggn(params, [reference]))
    # unbiased: over many subsets the mean equals the full GGN (each sample is kept with probability 4/11)
    draws = [subsample_groups([group], 4, generator)[0] for _ in range(600)]
    mean = sum(factor_rows(params, [d]).T @ factor_rows(params, [d]) for d in draws) / len(draws)
    full = dense_ggn(params, [group])
    assert torch.linalg.norm(mean - full) / torch.linalg.norm(full) < 0.08
