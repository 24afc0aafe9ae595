"""FIPA end to end: the curvature hooks, the server rule's equivalences from the spec, and bad input."""

import csv
import logging
import math

import pytest
import torch
from torch import nn

from fipa.aggregators import FIPA, FedAvg
from fipa.aggregators.functional import diagonal_weighted_average, weighted_average
from fipa.client import ClientUpdate, LocalTrainer, train_client
from fipa.curvature import CurvatureGroup, factor_rows, top_eigenpairs_from_rows
from fipa.data import batch_loader
from fipa.errors import ConfigError
from fipa.parameters import FlatParameters
from fipa.tasks import Sine1D
from fipa.train import run

DT = torch.float64


def dense_mse_ggn(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Reference: (1/N) sum_i J_i^T J_i from per-sample Jacobians of the model output (a loop is fine here)."""
    params = dict(model.named_parameters())
    names = list(params)

    def output(*flat_params, xi):
        return torch.func.functional_call(model, dict(zip(names, flat_params)), (xi.unsqueeze(0),)).reshape(-1)

    rows = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(lambda *ps: output(*ps, xi=xi), tuple(params.values()))
        rows.append(torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1))
    J = torch.cat(rows)
    return J.T @ J / len(x)


def small_task_and_module(seed=0, points=30):
    task = Sine1D([0.0, 0.5, 1.0], frequency=2, seed=seed, points_per_client=points, test_points=32)
    model = nn.Sequential(nn.Linear(1, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 1, dtype=DT))
    torch.manual_seed(seed)
    module = task.build_module(model, lambda params: torch.optim.Adam(params, lr=1e-2))
    return task, module


def fit_one_client(task, module, aggregator, epochs=3, extra_callbacks=()):
    flat = FlatParameters(module.model)
    aggregator.bind(flat)
    trainer = LocalTrainer([*aggregator.client_callbacks(), *extra_callbacks])
    start = flat.get()
    data = task.client_dataset(0)
    update = train_client(0, module, flat, start, data, batch_loader(data, None, False), epochs, trainer)
    return start, update


def test_curvature_is_taken_at_the_broadcast_point_before_training():
    task, module = small_task_and_module()
    dense_at_start = dense_mse_ggn(module.model, task.client_dataset(0).tensors[0])
    _, update = fit_one_client(task, module, FIPA(rank=None, eigensolver="exact"))
    U, lam = update.statistics["eigenvectors"], update.statistics["eigenvalues"]
    assert update.delta.abs().max() > 0  # the client did train
    # full rank keeps every eigenvalue above 1e-8 * largest: exact up to that truncation
    torch.testing.assert_close((U * lam) @ U.T, dense_at_start, rtol=0, atol=1e-7 * dense_at_start.abs().max().item())
    assert update.metrics["curvature_s"] > 0


def test_epoch_end_curvature_is_the_mean_over_epochs():
    import lightning as L

    snapshots = []

    class Snapshot(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            model = pl_module.model
            snapshots.append(dense_mse_ggn(model, task.client_dataset(0).tensors[0]))

    task, module = small_task_and_module()
    aggregator = FIPA(rank=None, eigensolver="exact", curvature_at="epoch_end")
    _, update = fit_one_client(task, module, aggregator, epochs=3, extra_callbacks=[Snapshot()])
    U, lam = update.statistics["eigenvectors"], update.statistics["eigenvalues"]
    assert len(snapshots) == 3
    mean = sum(snapshots) / 3
    torch.testing.assert_close((U * lam) @ U.T, mean, rtol=0, atol=1e-7 * mean.abs().max().item())


def fipa_round(aggregator, start, updates, num_params):
    flat = FlatParameters(nn.Linear(num_params, 1, bias=False))  # only its size matters here
    aggregator.bind(flat)
    aggregator.reset(start)
    for u in updates:
        aggregator.update(u)
    return aggregator.compute()


def lowrank_update(client_id, n, delta, H):
    low = top_eigenpairs_from_rows(torch.linalg.cholesky(H).T, None, tol=0.0)
    return ClientUpdate(client_id, n, delta, {"eigenvectors": low.eigenvectors, "eigenvalues": low.eigenvalues})


def test_fipa_equals_fedavg_when_clients_share_one_full_rank_curvature():
    gen = torch.Generator().manual_seed(1)
    p = 6
    A = torch.randn(p, p, generator=gen, dtype=DT)
    H0 = A @ A.T + 0.1 * torch.eye(p, dtype=DT)
    start = torch.randn(p, generator=gen, dtype=DT)
    deltas = [torch.randn(p, generator=gen, dtype=DT) for _ in range(3)]
    counts = [5, 1, 3]
    updates = [lowrank_update(i, n, d, H0) for i, (n, d) in enumerate(zip(counts, deltas))]
    result = fipa_round(FIPA(rank=None, step_size=0.7), start, updates, p)
    torch.testing.assert_close(result, start + 0.7 * weighted_average(deltas, counts), rtol=1e-9, atol=1e-10)


def test_full_rank_fipa_solves_heterogeneous_least_squares_in_one_round():
    gen = torch.Generator().manual_seed(2)
    d = 4
    scales = [torch.tensor([3.0, 0.2, 1.0, 0.5]), torch.tensor([0.3, 2.0, 0.1, 1.5]), torch.tensor([1.0, 1.0, 4.0, 0.2])]
    clients = []
    for scale in scales:  # different designs: each client constrains other directions
        X = torch.randn(25, d, generator=gen, dtype=DT) * scale.to(DT)
        y = X @ torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DT) + 0.3 * torch.randn(25, generator=gen, dtype=DT)
        clients.append((X, y))
    X_all = torch.cat([X for X, _ in clients])
    y_all = torch.cat([y for _, y in clients])
    centralized = torch.linalg.lstsq(X_all, y_all.unsqueeze(1)).solution.squeeze(1)

    model = nn.Linear(d, 1, bias=False, dtype=DT)
    w0 = torch.randn(d, generator=gen, dtype=DT)
    params = {"weight": w0.reshape(1, d)}
    output_fn = lambda prm, x: torch.func.functional_call(model, prm, (x.unsqueeze(0),)).squeeze(0)  # noqa: E731
    updates = []
    for m, (X, y) in enumerate(clients):
        local_solution = torch.linalg.lstsq(X, y.unsqueeze(1)).solution.squeeze(1)  # an exact local solve
        rows = factor_rows(params, [CurvatureGroup(output_fn, X, y.unsqueeze(1), "mse", 1.0 / len(X))])
        low = top_eigenpairs_from_rows(rows, None)
        updates.append(ClientUpdate(m, len(X), local_solution - w0, {"eigenvectors": low.eigenvectors, "eigenvalues": low.eigenvalues}))

    fipa = fipa_round(FIPA(rank=None, step_size=1.0), w0, updates, d)
    fedavg = fipa_round(FedAvg(), w0, updates, d)
    torch.testing.assert_close(fipa, centralized, rtol=1e-9, atol=1e-10)
    assert (fedavg - centralized).norm() > 1e-2 * centralized.norm()


def test_a_direction_seen_by_one_client_takes_its_update_and_order_does_not_matter():
    p = 4
    e = torch.eye(p, dtype=DT)
    # client 0 sees e0 and e1, client 1 sees e1 and e2; nobody sees e3
    u0 = ClientUpdate(0, 10, torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT),
                      {"eigenvectors": e[:, :2].contiguous(), "eigenvalues": torch.tensor([2.0, 1.0], dtype=DT)})
    u1 = ClientUpdate(1, 10, torch.tensor([-5.0, 6.0, -7.0, 8.0], dtype=DT),
                      {"eigenvectors": e[:, 1:3].contiguous(), "eigenvalues": torch.tensor([3.0, 1.0], dtype=DT)})
    start = torch.zeros(p, dtype=DT)
    forward = fipa_round(FIPA(rank=None, step_size=1.0), start, [u0, u1], p)
    backward = fipa_round(FIPA(rank=None, step_size=1.0), start, [u1, u0], p)
    assert forward[0].item() == pytest.approx(1.0)  # only client 0 sees e0
    assert forward[2].item() == pytest.approx(-7.0)  # only client 1 sees e2
    assert forward[1].item() == pytest.approx((1.0 * 2.0 + 3.0 * 6.0) / 4.0)  # curvature-weighted on e1
    assert forward[3].item() == pytest.approx(0.0, abs=1e-12)  # no curvature, no move (pinv)
    torch.testing.assert_close(forward, backward, rtol=0, atol=1e-12)


def test_damped_solver_matches_the_dense_formula():
    gen = torch.Generator().manual_seed(3)
    p = 5
    updates, H, b = [], torch.zeros(p, p, dtype=DT), torch.zeros(p, dtype=DT)
    for m, n in enumerate([2, 6]):
        A = torch.randn(p, 2, generator=gen, dtype=DT)
        Hm = A @ A.T
        delta = torch.randn(p, generator=gen, dtype=DT)
        low = top_eigenpairs_from_rows(A.T, None)
        updates.append(ClientUpdate(m, n, delta, {"eigenvectors": low.eigenvectors, "eigenvalues": low.eigenvalues}))
        H += n / 8 * Hm
        b += n / 8 * Hm @ delta
    beta, gamma, step = 0.5, 0.7, 0.9
    result = fipa_round(FIPA(solver="damped", beta=beta, gamma=gamma, step_size=step), torch.zeros(p, dtype=DT), updates, p)
    expected = step * gamma * beta * torch.linalg.solve(H + beta * torch.eye(p, dtype=DT), b)
    torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def test_diagonal_variant_is_the_per_coordinate_fisher_average():
    deltas = [torch.tensor([1.0, 2.0, 3.0], dtype=DT), torch.tensor([3.0, -2.0, 5.0], dtype=DT)]
    diagonals = [torch.tensor([1.0, 0.0, 2.0], dtype=DT), torch.tensor([3.0, 1.0, 0.0], dtype=DT)]
    agg = FIPA(representation="diagonal", rank=None, step_size=1.0)
    updates = [ClientUpdate(m, 4, d, {"curvature_diagonal": c}) for m, (d, c) in enumerate(zip(deltas, diagonals))]
    result = fipa_round(agg, torch.zeros(3, dtype=DT), updates, 3)
    # coordinate 0: (1*1 + 3*3) / 4 = 2.5; coordinate 1: only client 1 sees it -> -2; coordinate 2: only client 0 -> 3
    torch.testing.assert_close(result, torch.tensor([2.5, -2.0, 3.0], dtype=DT))
    torch.testing.assert_close(result, diagonal_weighted_average(deltas, diagonals, [4, 4]))


@pytest.mark.parametrize(
    "bad",
    [{"rcond": 0.0}, {"beta": -1.0, "solver": "damped"}, {"gamma": 0.0, "solver": "damped"}, {"step_size": 0.0},
     {"rank": 0}],
)
def test_bad_fipa_arguments_fail_clearly(bad):
    with pytest.raises(ConfigError, match=f"aggregator.{next(iter(bad))} must be"):
        FIPA(**bad)


def test_rank_at_least_p_clamps_with_a_warning(caplog):
    task, module = small_task_and_module()
    num_params = sum(p.numel() for p in module.model.parameters())
    with caplog.at_level(logging.WARNING):
        _, update = fit_one_client(task, module, FIPA(rank=num_params + 5, eigensolver="exact"))
    assert "clamped" in caplog.text
    assert update.statistics["eigenvalues"].numel() <= num_params


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_fipa_run_accounts_bytes_by_payload_kind(tiny_config, tmp_path):
    summary = run(tiny_config("aggregator=fipa", "aggregator.rank=3"), tmp_path)
    rows = read_rows(tmp_path / "metrics.csv")
    assert summary["rounds_completed"] == 3 and len(rows) == 3
    p = 20 + 20 + 420 + 420 + 21
    for row in rows:
        rank = float(row["curvature_rank_mean"])
        assert 1 <= rank <= 3
        assert int(row["bytes_up_update"]) == 4 * p * 8
        assert int(row["bytes_up_eigenvectors"]) == round(4 * rank * p * 8)
        assert int(row["bytes_up_eigenvalues"]) == round(4 * rank * 8)
        assert int(row["bytes_up"]) == sum(int(row[k]) for k in ("bytes_up_update", "bytes_up_eigenvectors", "bytes_up_eigenvalues"))
        assert int(row["bytes_down"]) == 4 * p * 8


def test_last_layer_fipa_with_frozen_others_keeps_the_other_layers(tiny_config, tmp_path):
    cfg = tiny_config("aggregator=fipa", "aggregator.params=6.*", "aggregator.others=freeze", "optimizer.lr=1e-2")
    from fipa.train import build

    trainer = build(cfg, tmp_path)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.fit()
    after = dict(trainer.model.named_parameters())
    for name, value in before.items():
        moved = not torch.equal(value, after[name].detach())
        assert moved == name.startswith("6."), name
    assert all(p.requires_grad for p in trainer.model.parameters())  # unfrozen after each local fit


class NaNClientTask(Sine1D):
    """Client 0's data are corrupt: its update is NaN."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        x, y = self.datasets[0].tensors
        self.datasets[0].tensors = (x, torch.full_like(y, float("nan")))


@pytest.mark.parametrize("aggregator", ["fedavg", "fipa"])
def test_a_client_with_non_finite_values_is_left_out(aggregator, tiny_config, tmp_path, caplog):
    cfg = tiny_config(f"aggregator={aggregator}")
    cfg.task._target_ = f"{__name__}.NaNClientTask"
    with caplog.at_level(logging.WARNING):
        summary = run(cfg, tmp_path)
    rows = read_rows(tmp_path / "metrics.csv")
    assert [int(r["clients_failed"]) for r in rows] == [1, 1, 1]
    assert "non-finite" in caplog.text
    assert all(float(r["test_mse"]) == float(r["test_mse"]) for r in rows)  # finite, not NaN
    assert summary["status"] == "completed"


def test_time_budget_stops_the_run(tiny_config, tmp_path):
    summary = run(tiny_config("federation.rounds=50", "federation.time_budget_s=1e-6"), tmp_path)
    assert summary["rounds_completed"] == 1
    assert len(read_rows(tmp_path / "metrics.csv")) == 1


def test_round_diagnostics_on_a_hand_example():
    p = 4
    e = torch.eye(p, dtype=DT)
    # client 0 keeps e0, e1 (eigenvalues 2, 2); its update (1, 1, 1, 1) has half its energy in that subspace.
    # client 1 keeps e2 alone (eigenvalue 0.5); its update lies entirely along e2.
    u0 = ClientUpdate(0, 10, torch.ones(p, dtype=DT), {"eigenvectors": e[:, :2].contiguous(), "eigenvalues": torch.tensor([2.0, 2.0], dtype=DT)})
    u1 = ClientUpdate(1, 10, 3 * e[:, 2], {"eigenvectors": e[:, 2:3].contiguous(), "eigenvalues": torch.tensor([0.5], dtype=DT)})
    aggregator = FIPA(rank=None)
    fipa_round(aggregator, torch.zeros(p, dtype=DT), [u0, u1], p)
    diagnostics = aggregator.diagnostics()
    assert set(diagnostics) == set(aggregator.diagnostic_keys)
    assert diagnostics["curvature_rank_mean"] == pytest.approx(1.5)
    assert diagnostics["effective_rank_mean"] == pytest.approx((2.0 + 1.0) / 2)  # two equal eigenvalues count 2
    assert diagnostics["eigenvalue_max"] == pytest.approx(2.0)
    assert diagnostics["eigenvalue_min"] == pytest.approx(0.5)
    assert diagnostics["update_in_subspace_mean"] == pytest.approx((0.5 + 1.0) / 2)
    assert diagnostics["update_in_subspace_min"] == pytest.approx(0.5)


def test_effective_rank_counts_the_directions_that_carry_the_spectrum():
    from fipa.curvature.eigen import effective_rank

    assert effective_rank(torch.full((5,), 3.0, dtype=DT)) == pytest.approx(5.0)
    assert effective_rank(torch.tensor([1.0, 1e-12, 1e-12], dtype=DT)) == pytest.approx(1.0, abs=1e-9)
    lam = torch.tensor([4.0, 2.0, 1.0, 1.0], dtype=DT)
    q = lam / lam.sum()
    assert effective_rank(lam) == pytest.approx(math.exp(-(q * q.log()).sum().item()))
    assert effective_rank(torch.zeros(3, dtype=DT)) == 0.0
