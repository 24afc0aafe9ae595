"""Faulty clients: one that raises and one that returns NaN are dropped and counted, the run goes on; dropout is
seeded; a round without any surviving client keeps the previous global model."""

import csv
import math

import pytest
import torch

from fipa.client import ClientCallback, LocalTrainer, train_client
from fipa.seeding import SHUFFLE, torch_generator
from fipa.train import build

FEDAVG = ["aggregator=fedavg", "optimizer.lr=1e-3"]


class Sabotage(ClientCallback):
    """Breaks the chosen clients: `raise` after the first local epoch (so some training has happened), or `nan`."""

    def __init__(self, clients: set[int], how: str):
        self.clients, self.how = clients, how

    def on_train_epoch_end(self, trainer, pl_module):
        if pl_module.client_id in self.clients and self.how == "raise":
            raise RuntimeError(f"simulated crash of client {pl_module.client_id}")

    def on_train_end(self, trainer, pl_module):
        if pl_module.client_id in self.clients and self.how == "nan":
            with torch.no_grad():
                next(pl_module.model.parameters()).fill_(float("nan"))


def trainer_with(cfg, tmp_path, *callbacks):
    trainer = build(cfg, tmp_path)
    for phase in trainer.phases:  # the client halves run inside each phase's Lightning trainer
        phase.local_trainer = LocalTrainer([*phase.local_trainer.callbacks, *callbacks])
    return trainer


def fedavg_of(trainer, clients: list[int], round_idx: int, start: torch.Tensor) -> torch.Tensor:
    """FedAvg of the given clients' updates, each trained independently from `start` (the reference)."""
    local = LocalTrainer([])
    total, weighted = 0, torch.zeros_like(start)
    for c in clients:
        loader = trainer.task.client_loader(c, torch_generator(trainer.seed, SHUFFLE, round_idx, c))
        update = train_client(c, trainer.module, trainer.flat, start, trainer.task.client_dataset(c), loader,
                              trainer.federation.local_epochs, local, round_idx)
        total += update.num_samples
        weighted += update.num_samples * update.delta
    return start + weighted / total


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_raising_client_and_a_nan_client_are_dropped_and_the_others_aggregate_as_without_them(tiny_config, tmp_path):
    cfg = tiny_config(*FEDAVG, "federation.rounds=1")
    trainer = trainer_with(cfg, tmp_path, Sabotage({1}, "raise"), Sabotage({2}, "nan"))
    start = trainer.flat.get().clone()
    summary = trainer.fit()
    assert summary["status"] == "completed"
    (row,) = rows(tmp_path / "metrics.csv")
    assert int(row["clients"]) == 4 and int(row["clients_failed"]) == 2
    result = trainer.flat.get().clone()
    torch.testing.assert_close(result, fedavg_of(trainer, [0, 3], 1, start), rtol=1e-12, atol=1e-15)


def test_the_run_finishes_and_improves_with_a_client_that_always_fails(tiny_config, tmp_path, caplog):
    cfg = tiny_config(*FEDAVG, "federation.rounds=4")
    trainer = trainer_with(cfg, tmp_path, Sabotage({3}, "raise"))
    summary = trainer.fit()
    metrics = rows(tmp_path / "metrics.csv")
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    assert [int(r["clients_failed"]) for r in metrics] == [1, 1, 1, 1]
    assert float(metrics[-1]["test_mse"]) < float(metrics[0]["test_mse"])
    assert "client 3 failed (RuntimeError: simulated crash of client 3)" in caplog.text


def test_a_round_without_survivors_keeps_the_previous_model(tiny_config, tmp_path):
    trainer = trainer_with(tiny_config(*FEDAVG, "federation.rounds=2"), tmp_path, Sabotage({0, 1, 2, 3}, "raise"))
    start = trainer.flat.get().clone()
    summary = trainer.fit()
    assert summary["status"] == "completed"
    assert torch.equal(trainer.flat.get(), start)
    assert [int(r["clients_failed"]) for r in rows(tmp_path / "metrics.csv")] == [4, 4]


def test_dropout_is_seeded_and_dropped_clients_do_not_contribute(tiny_config, tmp_path):
    def dropped(seed, out):
        cfg = tiny_config(*FEDAVG, "federation.rounds=12", "federation.dropout_prob=0.5", f"seed={seed}")
        build(cfg, out).fit()
        return rows(out / "metrics.csv")

    first, again, other = dropped(0, tmp_path / "a"), dropped(0, tmp_path / "b"), dropped(1, tmp_path / "c")
    pattern = [int(r["clients_dropped"]) for r in first]
    assert pattern == [int(r["clients_dropped"]) for r in again]
    assert [r["test_mse"] for r in first] == [r["test_mse"] for r in again]  # same seed, same numbers
    assert pattern != [int(r["clients_dropped"]) for r in other]
    assert all(int(r["clients"]) + int(r["clients_dropped"]) == 4 for r in first)
    assert 12 <= sum(pattern) <= 36  # about half of 48 client slots (binomial, p = 0.5)
    for previous, row in zip([None, *first], first):  # a round where every client dropped leaves the model as it was
        if int(row["clients"]) == 0 and previous is not None:
            assert row["test_mse"] == previous["test_mse"]
        assert math.isfinite(float(row["test_mse"]))


def test_dropout_probability_must_be_below_one(tiny_config, tmp_path):
    from fipa.errors import ConfigError

    with pytest.raises(ConfigError, match=r"federation.dropout_prob must be in \[0, 1\)"):
        build(tiny_config("federation.dropout_prob=1.0"), tmp_path)


def test_a_nan_client_does_not_poison_scaffold_state(tiny_config, tmp_path):
    """A NaN client's control variate must not reach the server control, or every later round would be NaN."""
    trainer = trainer_with(tiny_config(*FEDAVG, "client=scaffold", "federation.rounds=3"), tmp_path, Sabotage({2}, "nan"))
    trainer.fit()
    (scaffold,) = trainer.client_callbacks
    assert torch.isfinite(scaffold.server_control).all()
    assert sorted(scaffold.client_controls) == [0, 1, 3]  # the NaN client kept no state
    assert all(torch.isfinite(c).all() for c in scaffold.client_controls.values())
    failed = [int(r["clients_failed"]) for r in rows(tmp_path / "metrics.csv")]
    assert failed == [1, 1, 1]  # only the sabotaged client, every round: the others stay finite
