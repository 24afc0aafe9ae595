"""K-FAC curvature (FIPA representation=kfac) and FedFisher, against dense references built independently."""

import csv
import math

import pytest
import torch
from torch import nn

from fipa.aggregators import FIPA, FedFisher
from fipa.aggregators.fedfisher import adam_minimise, fisher_objective_gradient
from fipa.aggregators.functional import diagonal_fisher_solve
from fipa.client import ClientUpdate, LocalTrainer, train_client
from fipa.curvature import CurvatureGroup
from fipa.curvature.ggn import curvature_diagonal
from fipa.curvature.kfac import (
    KFACLayout,
    compress_factor,
    compressed_size,
    conjugate_gradient,
    decompress_factor,
    group_norms,
    kfac_curvature,
    kfac_layers,
    kfac_solve,
    kron_mean_preconditioner,
    kron_sum_matvec,
    pack,
    unpack,
)
from fipa.data import batch_loader
from fipa.errors import ConfigError
from fipa.parameters import FlatParameters
from fipa.tasks import Sine1D
from fipa.train import run

DT = torch.float64


def conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, stride=1, dtype=DT),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4, dtype=DT),
        nn.Tanh(),
        nn.Linear(4, 3, dtype=DT),
    )


def dense_kfac_reference(model, x, loss, estimator, targets=None):
    """Per-sample loop: activations by hand (padded windows read one location at a time), output gradients as the
    rows J_t^T S J_t of the Jacobian of the outputs w.r.t. each layer's output; A and G as in fipa.curvature.kfac."""
    conv, lin1, lin2 = model[0], model[3], model[5]
    n = len(x)
    A = [torch.zeros(2 * 9 + 1, 2 * 9 + 1, dtype=DT), torch.zeros(49, 49, dtype=DT), torch.zeros(5, 5, dtype=DT)]
    G = [torch.zeros(3, 3, dtype=DT), torch.zeros(4, 4, dtype=DT), torch.zeros(3, 3, dtype=DT)]
    for i in range(n):
        xi = x[i]
        padded = torch.nn.functional.pad(xi, (1, 1, 1, 1))
        for r in range(4):
            for c in range(4):
                a = torch.cat([padded[:, r : r + 3, c : c + 3].reshape(-1), torch.ones(1, dtype=DT)])
                A[0] += torch.outer(a, a) / 16 / n
        h1 = conv(xi.unsqueeze(0))[0]
        a2 = torch.tanh(h1).reshape(-1)
        h2 = lin1(a2)
        a3 = torch.tanh(h2)
        z = lin2(a3)
        for index, a in ((1, a2), (2, a3)):
            a1 = torch.cat([a, torch.ones(1, dtype=DT)])
            A[index] += torch.outer(a1, a1).detach() / n
        p = torch.softmax(z, 0)
        if loss == "mse":
            S = torch.eye(3, dtype=DT)
        elif estimator == "ggn":
            S = torch.diag(p) - torch.outer(p, p)
        else:  # empirical cross-entropy: (p - y)(p - y)^T
            e = p - nn.functional.one_hot(targets[i], 3).to(DT)
            S = torch.outer(e, e)
        S = S.detach()
        J1 = torch.autograd.functional.jacobian(lambda h: lin2(torch.tanh(lin1(torch.tanh(h).reshape(-1)))), h1)
        J1 = J1.reshape(3, 3, 16)  # (C, channels, locations)
        for t in range(16):
            G[0] += J1[:, :, t].T @ S @ J1[:, :, t] / n
        J2 = torch.autograd.functional.jacobian(lambda h: lin2(torch.tanh(h)), h2)
        G[1] += J2.T @ S @ J2 / n
        G[2] += S / n
    return list(zip(A, G))


@pytest.mark.parametrize("loss,estimator", [("cross_entropy", "ggn"), ("cross_entropy", "empirical"), ("mse", "ggn")])
def test_factors_match_a_dense_per_sample_reference(loss, estimator):
    model = conv_net()
    x = torch.randn(5, 2, 4, 4, dtype=DT)
    y = torch.randint(3, (5,)) if loss == "cross_entropy" else torch.randn(5, 3, dtype=DT)

    def output_fn(params, xi):
        return torch.func.functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    groups = [CurvatureGroup(output_fn, x, y, loss=loss, weight=1 / 5)]
    layers, rest = kfac_layers(model, [n for n, _ in model.named_parameters()])
    assert [layer.module for layer in layers] == ["0", "3", "5"] and rest == []
    factors = kfac_curvature(model, layers, groups, estimator, chunk_size=2)[0]  # chunks must not change the sums
    reference = dense_kfac_reference(model, x, loss, estimator, y)
    for (A, G), (A_ref, G_ref) in zip(factors, reference):
        torch.testing.assert_close(A, A_ref)
        torch.testing.assert_close(G, G_ref)


def test_linear_layer_over_a_sequence_counts_every_position_as_a_location():
    """A Linear applied to (batch, positions, features): A averages the positions, G sums them (K-FAC expand), the
    layout features-last (a 4-D Linear input must not be read as a convolution's channels-first gradient)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 4, 2, dtype=DT))
    x = torch.randn(6, 2, 5, 3, dtype=DT)  # two leading location dims

    def output_fn(params, xi):
        return torch.func.functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    layers, _ = kfac_layers(model, [n for n, _ in model.named_parameters()])
    (A, G), _ = kfac_curvature(model, layers, [CurvatureGroup(output_fn, x, None, loss="mse", weight=1 / 6)], "ggn")[0]
    A_ref, G_ref = torch.zeros(4, 4, dtype=DT), torch.zeros(4, 4, dtype=DT)
    for xi in x:
        rows = torch.cat([xi.reshape(10, 3), torch.ones(10, 1, dtype=DT)], dim=1)
        A_ref += rows.T @ rows / 10 / 6
        J = torch.autograd.functional.jacobian(lambda h: model[3](torch.tanh(h).reshape(-1)), model[0](xi))
        J = J.reshape(2, 10, 4)  # (outputs, locations, features)
        for t in range(10):
            G_ref += J[:, t].T @ J[:, t] / 6
    torch.testing.assert_close(A, A_ref)
    torch.testing.assert_close(G, G_ref)


@pytest.mark.parametrize("estimator", ["ggn", "mc", "empirical"])
def test_group_norm_diagonal_from_the_kfac_pass_matches_per_sample_jacobians(estimator):
    """GroupNorm's weight and bias diagonal, read off the K-FAC backward passes, equals the per-sample-Jacobian
    diagonal of fipa.curvature.ggn (itself tested against dense Jacobians), for every estimator (mc: same noise)."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False, dtype=DT),
        nn.GroupNorm(2, 4, dtype=DT),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 3, dtype=DT),
    )
    with torch.no_grad():  # away from the identity affine map, so a wrong formula shows
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(7, 2, 4, 4, dtype=DT), torch.randint(3, (7,))

    def output_fn(params, xi):
        return torch.func.functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    groups = [CurvatureGroup(output_fn, x, y, loss="cross_entropy", weight=1 / 7)]
    names = [n for n, _ in model.named_parameters()]
    layers, rest = kfac_layers(model, names)
    assert rest == ["1.weight", "1.bias"] and group_norms(model, rest) == ["1"]
    factors, diagonals = kfac_curvature(
        model, layers, groups, estimator, torch.Generator().manual_seed(5), chunk_size=3, norms=["1"]
    )
    params = {n: p.detach() for n, p in model.named_parameters() if n in rest}
    expected = curvature_diagonal(params, groups, estimator, torch.Generator().manual_seed(5)).detach()
    torch.testing.assert_close(torch.cat([diagonals["1.weight"], diagonals["1.bias"]]), expected)
    assert expected.abs().min() > 0
    for (A, G), (A_ref, G_ref) in zip(factors, kfac_curvature(model, layers, groups, estimator, torch.Generator().manual_seed(5))[0]):
        torch.testing.assert_close(A, A_ref)
        torch.testing.assert_close(G, G_ref)


def test_mc_factors_average_to_the_ggn_factors():
    model = conv_net()
    x = torch.randn(4, 2, 4, 4, dtype=DT)

    def output_fn(params, xi):
        return torch.func.functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    groups = [CurvatureGroup(output_fn, x.repeat(2000, 1, 1, 1), None, loss="cross_entropy", weight=1 / 8000)]
    layers, _ = kfac_layers(model, [n for n, _ in model.named_parameters()])
    mc = kfac_curvature(model, layers, groups, "mc", torch.Generator().manual_seed(0), chunk_size=4000)[0]
    exact = kfac_curvature(model, layers, groups[:1], "ggn", chunk_size=4000)[0]
    for (_, G), (_, G_ref) in zip(mc, exact):
        assert (G - G_ref).abs().max() < 0.1 * G_ref.abs().max()


def test_norm_layers_and_unselected_biases_go_to_the_diagonal():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    layers, rest = kfac_layers(model, ["0.weight", "1.weight", "1.bias", "2.weight", "2.bias"])
    assert [(layer.weight, layer.bias, layer.in_dim) for layer in layers] == [
        ("0.weight", None, 3),
        ("2.weight", "2.bias", 5),
    ]
    assert rest == ["1.weight", "1.bias"]


def dense_kron_sum(Gs, As, weights):
    return sum(w * torch.kron(G, A) for G, A, w in zip(Gs, As, weights))


def random_spd(n, generator, rank=None):
    B = torch.randn(n, rank or n, dtype=DT, generator=generator)
    return B @ B.T / n


def test_kronecker_matvec_and_cg_solve_match_the_dense_kronecker_matrix():
    g = torch.Generator().manual_seed(1)
    Gs = torch.stack([random_spd(3, g, rank=2) for _ in range(3)])  # singular factors: the damping carries them
    As = torch.stack([random_spd(5, g) for _ in range(3)])
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=DT)
    X = torch.randn(3, 5, dtype=DT, generator=g)
    dense = dense_kron_sum(Gs, As, weights)
    torch.testing.assert_close(kron_sum_matvec(Gs, As, weights, X).reshape(-1), dense @ X.reshape(-1))
    solved, iterations = kfac_solve(Gs, As, weights, X, damping=0.05, rtol=1e-12)
    expected = torch.linalg.solve(dense + 0.05 * torch.eye(15, dtype=DT), X.reshape(-1))
    torch.testing.assert_close(solved.reshape(-1), expected)
    assert 0 < iterations <= 15 + 5


def test_kronecker_preconditioner_inverts_the_mean_factors_product_and_cuts_cg_iterations():
    g = torch.Generator().manual_seed(2)
    Gs = torch.stack([random_spd(4, g) for _ in range(3)])
    As = torch.stack([random_spd(6, g) for _ in range(3)])
    weights = torch.tensor([1.0, 2.0, 1.0], dtype=DT)  # not normalised: A_bar divides by the sum, G_bar does not
    R = torch.randn(4, 6, dtype=DT, generator=g)
    G_bar, A_bar = torch.einsum("m,mij->ij", weights, Gs), torch.einsum("m,mij->ij", weights, As) / 4
    dense = torch.kron(G_bar, A_bar) + 0.3 * torch.eye(24, dtype=DT)
    applied = kron_mean_preconditioner(Gs, As, weights, 0.3)(R)
    torch.testing.assert_close(applied.reshape(-1), torch.linalg.solve(dense, R.reshape(-1)))

    # one client: the preconditioner is the exact inverse, so CG stops after one step
    one_matvec = lambda X: kron_sum_matvec(Gs[:1], As[:1], weights[:1], X) + 1e-6 * X  # noqa: E731
    _, one = conjugate_gradient(one_matvec, R, preconditioner=kron_mean_preconditioner(Gs[:1], As[:1], weights[:1], 1e-6), rtol=1e-10)
    assert one == 1
    # heterogeneous clients, small damping: the same solution as the dense system in far fewer steps than plain CG
    Gs = torch.stack([random_spd(8, g) * scale for scale in (1.0, 3.0)])
    As = torch.stack([random_spd(30, g, rank=10) for _ in range(2)])  # rank-deficient: only the damping lifts them
    weights = torch.tensor([0.4, 0.6], dtype=DT)
    B = torch.randn(8, 30, dtype=DT, generator=g)
    damping = 1e-5
    expected = torch.linalg.solve(dense_kron_sum(Gs, As, weights) + damping * torch.eye(240, dtype=DT), B.reshape(-1))
    solved, preconditioned = kfac_solve(Gs, As, weights, B, damping, rtol=1e-10)
    torch.testing.assert_close(solved.reshape(-1), expected)
    matvec = lambda X: kron_sum_matvec(Gs, As, weights, X) + damping * X  # noqa: E731
    _, plain = conjugate_gradient(matvec, B, rtol=1e-10, max_iters=2000)
    assert preconditioned < plain / 3, (preconditioned, plain)


def test_a_compressed_factor_keeps_its_top_eigenpairs_and_its_trace():
    g = torch.Generator().manual_seed(6)
    Q, _ = torch.linalg.qr(torch.randn(40, 40, dtype=DT, generator=g))
    spectrum = torch.cat([torch.tensor([50.0, 20.0, 9.0], dtype=DT), torch.full((37,), 0.5, dtype=DT)])
    F = (Q * spectrum) @ Q.T  # three large eigenvalues and a flat remainder: rank 3 plus sigma is exact
    flat = compress_factor(F, 3, torch.Generator().manual_seed(0))
    assert flat.numel() == compressed_size(40, 3) == 40 * 3 + 3 + 1
    torch.testing.assert_close(decompress_factor(flat, 40, 3), F, rtol=0, atol=1e-4)  # randomized (4 power steps)
    generic = random_spd(40, g)
    approx = decompress_factor(compress_factor(generic, 5, torch.Generator().manual_seed(0)), 40, 5)
    torch.testing.assert_close(approx.trace(), generic.trace())  # the remainder's mass is kept, spread evenly
    top = torch.linalg.eigvalsh(generic)[-5:]
    torch.testing.assert_close(torch.linalg.eigvalsh(approx)[-5:], top, rtol=1e-2, atol=0)  # a generic spectrum
    # pack: large factors compressed, a factor no larger dense; unpack gives dense matrices back
    small = random_spd(2, g)
    packed = pack([F, small], rank=3, generator=torch.Generator().manual_seed(0))
    assert packed.numel() == compressed_size(40, 3) + 4 and compressed_size(2, 3) is None
    back = unpack(packed, [40, 2], rank=3)
    torch.testing.assert_close(back[0], F, rtol=0, atol=1e-4)
    assert torch.equal(back[1], small)
    assert torch.equal(pack([F, small]), torch.cat([F.reshape(-1), small.reshape(-1)]))  # no rank: dense, as before


class _Layout:
    """Dense reference layout: the flat index of entry (r, c) of a layer's [W | b] matrix, written out by hand."""

    def __init__(self, model):
        self.offsets, offset = {}, 0
        for name, p in model.named_parameters():
            self.offsets[name] = offset
            offset += p.numel()
        self.p = offset

    def indices(self, weight, bias, out_dim, in_dim):
        idx = []
        for r in range(out_dim):
            for c in range(in_dim + (bias is not None)):
                idx.append(self.offsets[weight] + r * in_dim + c if c < in_dim else self.offsets[bias] + r)
        return torch.tensor(idx)


def tiny_kfac_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.LayerNorm(4, dtype=DT), nn.Tanh(), nn.Linear(4, 2, dtype=DT))


def random_kfac_updates(model, generator, clients=3, factor_rank=None):
    """ClientUpdates with random (PSD) factors and diagonals, and the dense H_m of each (with `factor_rank`, of the
    factors as the server decompresses them)."""
    ref = _Layout(model)
    blocks = [("0.weight", "0.bias", 4, 3), ("3.weight", "3.bias", 2, 4)]
    rest = torch.tensor([ref.offsets["1.weight"] + i for i in range(4)] + [ref.offsets["1.bias"] + i for i in range(4)])
    updates, dense = [], []
    for m in range(clients):
        As = [random_spd(4, generator), random_spd(5, generator, rank=2)]
        Gs = [random_spd(4, generator, rank=3), random_spd(2, generator)]
        diagonal = torch.rand(8, dtype=DT, generator=generator)
        stats = {"kfac_input_factors": pack(As, factor_rank, generator), "kfac_output_factors": pack(Gs, factor_rank, generator),
                 "curvature_diagonal": diagonal}  # fmt: skip
        As = unpack(stats["kfac_input_factors"], [4, 5], factor_rank)
        Gs = unpack(stats["kfac_output_factors"], [4, 2], factor_rank)
        H = torch.zeros(ref.p, ref.p, dtype=DT)
        for (w, b, o, i), A, G in zip(blocks, As, Gs):
            idx = ref.indices(w, b, o, i)
            H[idx.unsqueeze(1), idx] = torch.kron(G, A)
        H[rest, rest] = diagonal
        delta = torch.randn(ref.p, dtype=DT, generator=generator)
        updates.append(ClientUpdate(m, 10 * (m + 1), delta, stats))
        dense.append(H)
    return updates, dense


@pytest.mark.parametrize("factor_rank", [None, 1])
def test_fipa_kfac_round_matches_the_dense_damped_rule(factor_rank):
    model = tiny_kfac_model()
    updates, dense = random_kfac_updates(model, torch.Generator().manual_seed(4), factor_rank=factor_rank)
    fipa = FIPA(representation="kfac", rank=None, beta=0.3, gamma=0.7, step_size=0.9, cg_tol=1e-12,
                factor_rank=factor_rank)  # fmt: skip
    fipa.bind(FlatParameters(model))
    theta = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    fipa.reset(theta)
    for update in updates:
        fipa.update(update)
    new = fipa.compute()
    weights = [u.num_samples / sum(v.num_samples for v in updates) for u in updates]
    H = sum(w * Hm for w, Hm in zip(weights, dense))
    b = sum(w * Hm @ u.delta for w, Hm, u in zip(weights, dense, updates))
    expected = theta + 0.9 * 0.7 * 0.3 * torch.linalg.solve(H + 0.3 * torch.eye(len(b), dtype=DT), b)
    torch.testing.assert_close(new, expected)
    assert fipa.diagnostics()["cg_iterations"] > 0


def test_fedfisher_kfac_closed_form_matches_dense_and_adam():
    model = tiny_kfac_model()
    updates, dense = random_kfac_updates(model, torch.Generator().manual_seed(5))
    theta = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    results = {}
    for solver, extra in (("closed_form", {}), ("adam", {"server_steps": 4000, "server_lr": 1e-2})):
        agg = FedFisher(representation="kfac", solver=solver, damping=0.01, **extra)
        agg.bind(FlatParameters(model))
        agg.reset(theta)
        for update in updates:
            agg.update(update)
        results[solver] = agg.compute()
    weights = [u.num_samples / sum(v.num_samples for v in updates) for u in updates]
    H = sum(w * Hm for w, Hm in zip(weights, dense))
    b = sum(w * Hm @ u.delta for w, Hm, u in zip(weights, dense, updates))
    g = sum(w * u.delta for w, u in zip(weights, updates))
    # the minimiser of sum_m w_m (theta - theta_m)^T H_m (theta - theta_m) + 0.01 ||theta - theta_avg||^2
    expected = theta + torch.linalg.solve(H + 0.01 * torch.eye(len(b), dtype=DT), b + 0.01 * g)
    torch.testing.assert_close(results["closed_form"], expected)
    torch.testing.assert_close(results["adam"], expected, atol=2e-3, rtol=0)


def test_fedfisher_diagonal_closed_form_by_hand_and_against_adam():
    # two clients, three coordinates; w = (1/4, 3/4); the third coordinate has no curvature: it keeps FedAvg's step
    d1, d2 = torch.tensor([1.0, 2.0, 0.0], dtype=DT), torch.tensor([3.0, 0.0, 0.0], dtype=DT)
    x1, x2 = torch.tensor([1.0, 1.0, 4.0], dtype=DT), torch.tensor([-1.0, 5.0, 8.0], dtype=DT)
    updates = [ClientUpdate(0, 1, x1, {"curvature_diagonal": d1}), ClientUpdate(1, 3, x2, {"curvature_diagonal": d2})]
    # coordinate 0: (1/4*1*1 + 3/4*3*(-1)) / (1/4*1 + 3/4*3) = (0.25 - 2.25) / 2.5 = -0.8; coordinate 1: only
    # client 0 sees it: 1; coordinate 2: FedAvg 1/4*4 + 3/4*8 = 7
    expected = torch.tensor([-0.8, 1.0, 7.0], dtype=DT)
    model = nn.Linear(2, 1, dtype=DT)  # 3 parameters
    for solver, extra, tol in (("closed_form", {}, 1e-12), ("adam", {"server_steps": 3000, "server_lr": 1e-2}, 1e-3)):
        agg = FedFisher(representation="diagonal", solver=solver, **extra)
        agg.bind(FlatParameters(model))
        agg.reset(torch.zeros(3, dtype=DT))
        for update in updates:
            agg.update(update)
        torch.testing.assert_close(agg.compute(), expected, atol=tol, rtol=0)


def test_fedfisher_pieces():
    rhs, diagonal, anchor = torch.tensor([2.0, 0.0]), torch.tensor([4.0, 0.0]), torch.tensor([1.0, 3.0])
    torch.testing.assert_close(diagonal_fisher_solve(rhs, diagonal, anchor, 0.0), torch.tensor([0.5, 3.0]))
    torch.testing.assert_close(diagonal_fisher_solve(rhs, diagonal, anchor, 1.0), torch.tensor([3 / 5, 3.0]))
    gradient = fisher_objective_gradient(diagonal.mul, rhs, 1.0, anchor)
    x = adam_minimise(gradient, torch.zeros(2), 3000, 1e-2)
    torch.testing.assert_close(x, torch.tensor([0.6, 3.0]), atol=1e-3, rtol=0)


def test_curvature_at_end_is_taken_at_the_trained_model():
    task = Sine1D([0.0, 0.5, 1.0], frequency=2, seed=0, points_per_client=20, test_points=16)
    model = nn.Sequential(nn.Linear(1, 5, dtype=DT), nn.Tanh(), nn.Linear(5, 1, dtype=DT))
    module = task.build_module(model, lambda params: torch.optim.Adam(params, lr=1e-1))
    agg = FedFisher(representation="kfac")
    flat = FlatParameters(model)
    agg.bind(flat)
    trainer = LocalTrainer(agg.client_callbacks())
    data = task.client_dataset(0)
    start = flat.get()
    update = train_client(0, module, flat, start, data, batch_loader(data, None, False), 5, trainer)
    x = data.tensors[0]
    flat.set(start + update.delta)  # the trained local model: its factors are what the client uploaded
    layers, _ = kfac_layers(model, flat.names)
    expected = kfac_curvature(model, layers, module.curvature_groups(data))[0]
    torch.testing.assert_close(update.statistics["kfac_input_factors"], pack([A for A, _ in expected]))
    torch.testing.assert_close(update.statistics["kfac_output_factors"], pack([G for _, G in expected]))
    flat.set(start)
    at_start = kfac_curvature(model, layers, module.curvature_groups(data))[0]
    assert not torch.allclose(pack([G for _, G in at_start]), update.statistics["kfac_output_factors"])
    assert len(x) == 20


def test_layout_round_trips():
    model = tiny_kfac_model()
    flat = FlatParameters(model)
    layers, _ = kfac_layers(model, flat.names)
    layout = KFACLayout(layers, flat.names, [p.shape for p in model.parameters()])
    v = torch.randn(flat.numel, dtype=DT)
    torch.testing.assert_close(layout.vector(layout.matrices(v), v[layout.rest]), v)
    ref = _Layout(model)
    torch.testing.assert_close(layout.matrices(v)[1].reshape(-1), v[ref.indices("3.weight", "3.bias", 2, 4)])


def test_bad_kfac_settings_are_config_errors():
    with pytest.raises(ConfigError, match="solver=pinv"):
        FIPA(representation="kfac", rank=None, solver="pinv")
    with pytest.raises(ConfigError, match="rank=20 has no effect"):
        FIPA(representation="kfac")
    with pytest.raises(ConfigError, match="cg_tol"):
        FIPA(rank=20, cg_tol=1e-6)
    fipa = FIPA(representation="kfac", rank=None, params="1.*")  # only the LayerNorm
    with pytest.raises(ConfigError, match="Linear or Conv2d"):
        fipa.bind(FlatParameters(tiny_kfac_model()))
    with pytest.raises(ConfigError, match="server_steps"):
        FedFisher(server_steps=10)
    with pytest.raises(ConfigError, match="damping must be > 0"):
        FedFisher(representation="kfac", damping=0.0)
    with pytest.raises(ConfigError, match="factor_rank"):
        FIPA(rank=20, factor_rank=8)  # low-rank FIPA has no factors
    with pytest.raises(ConfigError, match="factor_rank"):
        FedFisher(factor_rank=8)
    with pytest.raises(ConfigError, match="factor_rank must be >= 1"):
        FIPA(representation="kfac", rank=None, factor_rank=0)


@pytest.mark.parametrize("aggregator", ["fipa_kfac", "fedfisher", "fedfisher_kfac"])
def test_two_rounds_end_to_end(aggregator, tiny_config, tmp_path):
    run(tiny_config(f"aggregator={aggregator}", "federation.rounds=2", "optimizer.lr=1e-2"), tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(math.isfinite(float(r["test_mse"])) for r in rows)
    assert float(rows[-1]["test_mse"]) < float(rows[0]["test_mse"])
    if "kfac" in aggregator:  # every layer is a Linear: nothing goes to the diagonal
        assert int(rows[0]["bytes_up_kfac_input_factors"]) > 0 and int(rows[0]["bytes_up_curvature_diagonal"]) == 0


def normed_client(representation):
    """A client with GroupNorm and LayerNorm between a convolution and Linear layers, uploading `representation`,
    after one local fit; returns its model (at the broadcast point), data, module, flat layout and update."""
    from fipa.tasks.classification import ClassificationTask

    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1, bias=False, dtype=DT), nn.GroupNorm(2, 4, dtype=DT), nn.Tanh(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6, dtype=DT), nn.LayerNorm(6, dtype=DT), nn.Tanh(), nn.Linear(6, 3, dtype=DT),
    )  # fmt: skip
    with torch.no_grad():  # affine maps away from the identity, so a misplaced coordinate shows
        for norm in (model[1], model[5]):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    x, y = torch.randn(9, 1, 5, 5, dtype=DT), torch.randint(3, (9,))
    task = ClassificationTask(client_data=[(x, y)], test_data=(x, y), num_classes=3, batch_size=9)
    module = task.build_module(model, lambda params: torch.optim.SGD(params, lr=1e-3))
    fipa = FIPA(representation=representation, rank=None)
    flat = FlatParameters(model)
    fipa.bind(flat)
    data = task.client_dataset(0)
    start = flat.get()
    callbacks = LocalTrainer(fipa.client_callbacks())
    update = train_client(0, module, flat, start, data, batch_loader(data, None, False), 1, callbacks)
    flat.set(start)  # the broadcast point, where the curvature was taken
    return model, data, module, flat, update


def test_the_uploaded_diagonal_covers_group_norm_and_other_parameters_in_the_layouts_order():
    """A K-FAC client with GroupNorm (diagonal from the K-FAC pass) and LayerNorm (per-sample Jacobians) between
    Kronecker-factored layers uploads one diagonal whose coordinates are the layout's `rest`, in order: it must
    equal the per-sample-Jacobian diagonal of those parameters, however the two sources interleave."""
    model, data, module, flat, update = normed_client("kfac")
    layers, rest = kfac_layers(model, flat.names)
    assert rest == ["1.weight", "1.bias", "5.weight", "5.bias"]
    params = {n: p.detach() for n, p in model.named_parameters() if n in rest}
    expected = curvature_diagonal(params, module.curvature_groups(data), "ggn").detach()
    torch.testing.assert_close(update.statistics["curvature_diagonal"], expected)
    layout = KFACLayout(layers, flat.names, [p.shape for p in model.parameters()])
    names_of_rest = [n for n, p in model.named_parameters() for _ in range(p.numel())]
    assert [names_of_rest[i] for i in layout.rest.tolist()] == [n for n in rest for _ in range(params[n].numel())]


def test_a_diagonal_client_uploads_the_per_sample_jacobian_diagonal_of_every_parameter():
    """representation=diagonal reads Linear, Conv2d and GroupNorm diagonals off the backward passes and LayerNorm's
    from per-sample Jacobians: together, the per-sample-Jacobian diagonal of the whole model, in parameter order."""
    model, data, module, flat, update = normed_client("diagonal")
    params = {n: p.detach() for n, p in model.named_parameters()}
    expected = curvature_diagonal(params, module.curvature_groups(data), "ggn").detach()
    torch.testing.assert_close(update.statistics["curvature_diagonal"], expected)


@pytest.mark.parametrize("estimator", ["ggn", "mc", "empirical"])
def test_layer_diagonals_from_the_kfac_pass_match_per_sample_jacobians(estimator):
    """The Linear / Conv2d diagonal read off the K-FAC backward passes (representation=diagonal's fast path) equals
    the per-sample-Jacobian diagonal of fipa.curvature.ggn, for a convolution, Linear layers with and without a
    selected bias, and a Linear over extra locations."""
    model = conv_net()
    x, y = torch.randn(7, 2, 4, 4, dtype=DT), torch.randint(3, (7,))

    def output_fn(params, xi):
        return torch.func.functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    groups = [CurvatureGroup(output_fn, x, y, loss="cross_entropy", weight=1 / 7)]
    selected = ["0.weight", "0.bias", "3.weight", "5.weight", "5.bias"]  # 3.bias left out: it goes to the fallback
    layers, rest = kfac_layers(model, selected)
    assert rest == [] and layers[1].bias is None
    _, diagonals = kfac_curvature(model, [], groups, estimator, torch.Generator().manual_seed(2), 3, diagonal_layers=layers)
    params = {n: p.detach() for n, p in model.named_parameters() if n in selected}
    expected = curvature_diagonal(params, groups, estimator, torch.Generator().manual_seed(2)).detach()
    torch.testing.assert_close(torch.cat([diagonals[n].reshape(-1) for n in params]), expected)

    torch.manual_seed(3)
    sequence = nn.Sequential(nn.Linear(3, 4, dtype=DT), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 4, 2, dtype=DT))
    xs = torch.randn(6, 2, 5, 3, dtype=DT)

    def sequence_fn(params, xi):
        return torch.func.functional_call(sequence, params, (xi.unsqueeze(0),)).squeeze(0)

    groups = [CurvatureGroup(sequence_fn, xs, None, loss="mse", weight=1 / 6)]
    names = [n for n, _ in sequence.named_parameters()]
    layers, _ = kfac_layers(sequence, names)
    _, diagonals = kfac_curvature(sequence, [], groups, "ggn", diagonal_layers=layers)
    params = {n: p.detach() for n, p in sequence.named_parameters()}
    expected = curvature_diagonal(params, groups, "ggn").detach()
    torch.testing.assert_close(torch.cat([diagonals[n].reshape(-1) for n in names]), expected)
