"""FedNova (aggregator=fednova) and unequal local work (federation.local_epochs_max): hand-computed numbers."""

import pytest
import torch
from conftest import record_updates

from fipa.aggregators import FedAvg, FedNova
from fipa.aggregators.fednova import momentum_step_norm
from fipa.client import ClientUpdate
from fipa.config import FederationConfig
from fipa.errors import ConfigError

DT = torch.float64


def updates(deltas, samples, norms):
    return [
        ClientUpdate(m, n, torch.tensor(d, dtype=DT), metrics={"normalized_steps": a})
        for m, (d, n, a) in enumerate(zip(deltas, samples, norms))
    ]


def aggregate(rule, global_params, client_updates):
    rule.reset(global_params)
    for update in client_updates:
        rule.update(update)
    return rule.compute()


def test_momentum_step_norm_by_hand():
    assert momentum_step_norm(5, 0.0) == 5.0
    # tau 3, rho 0.5: sum_k (1 - 0.5^k) / 0.5 = (0.5 + 0.75 + 0.875) / 0.5 = 4.25
    assert momentum_step_norm(3, 0.5) == pytest.approx(4.25)
    assert momentum_step_norm(0, 0.9) == 0.0


def test_normalized_averaging_by_hand():
    x = torch.tensor([1.0, 1.0], dtype=DT)
    ups = updates([[2.0, 0.0], [0.0, 4.0]], samples=[1, 3], norms=[2.0, 4.0])
    # sum N d / a = [2, 0] / 2 + 3 [0, 4] / 4 = [1, 3]; tau_eff = (1 x 2 + 3 x 4) / 4 = 3.5; step = 3.5 [1, 3] / 4
    rule = FedNova()
    torch.testing.assert_close(aggregate(rule, x, ups), x + torch.tensor([0.875, 2.625], dtype=DT))
    assert rule.diagnostics() == {"tau_eff": 3.5}
    # FedAvg of the same updates: (1 [2, 0] + 3 [0, 4]) / 4 = [0.5, 3], biased towards the client that stepped more
    torch.testing.assert_close(aggregate(FedAvg(), x, ups), x + torch.tensor([0.5, 3.0], dtype=DT))
    # step_size scales the move
    torch.testing.assert_close(aggregate(FedNova(step_size=0.5), x, ups), x + torch.tensor([0.4375, 1.3125], dtype=DT))


def test_equal_work_is_fedavg_and_a_client_without_steps_adds_nothing():
    x = torch.zeros(3, dtype=DT)
    ups = updates([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0]], samples=[2, 5], norms=[6.0, 6.0])
    torch.testing.assert_close(aggregate(FedNova(), x, ups), aggregate(FedAvg(), x, ups))
    idle = updates([[1.0, 2.0, 3.0], [-1.0, 0.5, 2.0], [0.0, 0.0, 0.0]], samples=[2, 5, 9], norms=[6.0, 6.0, 0.0])
    torch.testing.assert_close(aggregate(FedNova(), x, idle), aggregate(FedAvg(), x, ups))


def test_local_epochs_max_draws_each_clients_epochs_from_the_seed():
    fed = FederationConfig(local_epochs=2, local_epochs_max=5, local_epochs_scale=3)
    draws = [fed.client_epochs(0, r, m) for r in range(1, 6) for m in range(8)]
    assert set(draws) <= {6, 9, 12, 15} and len(set(draws)) > 1  # U{2..5} x the scale, not all equal
    assert draws == [fed.client_epochs(0, r, m) for r in range(1, 6) for m in range(8)]  # the same in any process
    assert FederationConfig(local_epochs=4).client_epochs(0, 1, 0) == 4
    with pytest.raises(ConfigError):
        FederationConfig(local_epochs=4, local_epochs_max=3)


def test_a_fednova_round_with_unequal_local_work_matches_the_formula_on_its_clients_updates(tiny_config, tmp_path):
    """Real clients (plain SGD, full batch: one step per epoch) with epochs drawn per client: each reports its
    step count, and the new model is FedNova's formula on the recorded updates (not FedAvg's)."""
    from fipa.train import build

    cfg = tiny_config("aggregator=fednova", "optimizer=sgd", "optimizer.lr=0.05", "federation.local_epochs=1",
                      "federation.local_epochs_max=6", "federation.rounds=1")  # fmt: skip
    trainer = build(cfg, tmp_path)
    seen = record_updates(trainer)
    start = trainer.flat.get()
    new, row = trainer.run_round(1, start)
    steps = [int(u.metrics["local_steps"]) for u in seen]
    assert steps == [trainer.federation.client_epochs(cfg.seed, 1, u.client_id) for u in seen]
    assert len(set(steps)) > 1, "the draw gave every client the same work; pick another seed"
    total = sum(u.num_samples for u in seen)
    tau_eff = sum(u.num_samples * s for u, s in zip(seen, steps)) / total
    expected = start + tau_eff * sum(u.num_samples * u.delta / s for u, s in zip(seen, steps)) / total
    torch.testing.assert_close(new, expected)
    assert row["tau_eff"] == pytest.approx(tau_eff)
    fedavg = start + sum(u.num_samples * u.delta for u in seen) / total
    assert not torch.allclose(new, fedavg)


def test_momentum_sgd_clients_report_the_heavy_ball_norm(tiny_config, tmp_path):
    from fipa.train import build

    cfg = tiny_config("aggregator=fednova", "optimizer=sgd", "optimizer.lr=0.01", "optimizer.momentum=0.9",
                      "federation.local_epochs=4", "federation.rounds=1")  # fmt: skip
    trainer = build(cfg, tmp_path)
    seen = record_updates(trainer)
    trainer.run_round(1, trainer.flat.get())
    assert {u.metrics["local_steps"] for u in seen} == {4.0}
    # 4 heavy-ball steps with rho 0.9: (1 + 1.9 + 2.71 + 3.439) = 9.049
    assert [u.metrics["normalized_steps"] for u in seen] == pytest.approx([9.049] * len(seen))
