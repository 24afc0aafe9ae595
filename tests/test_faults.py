"""Faulty clients: one that raises and one that returns NaN are dropped and counted, the run goes on; dropout is
seeded; a round where some clients drop is FedAvg over exactly the survivors; a round without any surviving client
keeps the previous global model."""

import csv
import math
from typing import ClassVar

import pytest
import torch

from fipa.client import ClientCallback, LocalTrainer, train_client
from fipa.seeding import SHUFFLE, torch_generator
from fipa.train import build, run

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
    runner = trainer.executor.runner  # the client halves run inside each phase's Lightning trainer
    runner.local_trainers = [LocalTrainer([*local.callbacks, *callbacks]) for local in runner.local_trainers]
    return trainer


def fedavg_of(trainer, clients: list[int], round_idx: int, start: torch.Tensor) -> torch.Tensor:
    """FedAvg of the given clients' updates, each trained independently from `start` (the reference)."""
    local = LocalTrainer([])
    total, weighted = 0, torch.zeros_like(start)
    for c in clients:
        loader = trainer.task.client_loader(c, torch_generator(trainer.seed, SHUFFLE, round_idx, c))
        update = train_client(c, trainer.executor.runner.module, trainer.flat, start, trainer.task.client_dataset(c), loader,
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


def test_dropout_is_seeded_and_a_round_where_every_client_drops_keeps_the_model(tiny_config, tmp_path):
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


class LocalFits(ClientCallback):
    """Records every local fit through the client-method hooks: (round, client, broadcast parameters, local
    parameters). Hydra builds the instance inside run(cfg), so the records live on the class."""

    fits: ClassVar[list[tuple[int, int, torch.Tensor, torch.Tensor]]] = []
    names: ClassVar[list[str]] = []

    def on_round_start(self, round_idx, num_clients):
        self.round = round_idx

    def begin_client(self, client_id, round_state, client_state):
        self.client = client_id

    def on_train_start(self, trainer, pl_module):
        LocalFits.names = [name for name, _ in pl_module.model.named_parameters()]
        self.start = torch.nn.utils.parameters_to_vector(pl_module.model.parameters()).detach().clone()

    def on_train_end(self, trainer, pl_module):
        local = torch.nn.utils.parameters_to_vector(pl_module.model.parameters()).detach().clone()
        LocalFits.fits.append((self.round, self.client, self.start, local))


RECORD = "client.callbacks=[{_target_:test_faults.LocalFits}]"


def recorded_run(cfg, out):
    LocalFits.fits = []
    run(cfg, out)
    state = torch.load(out / "model.pt", weights_only=True)
    final = torch.cat([state[name].reshape(-1) for name in LocalFits.names])
    return list(LocalFits.fits), rows(out / "metrics.csv"), final


def test_a_partial_dropout_round_is_fedavg_over_exactly_the_surviving_clients(tiny_config, tmp_path):
    """dropout_prob=0.5: in a round where some but not all clients drop, the new global model is FedAvg over
    the survivors' updates, with each survivor's update the one it computes in a run without dropout (the dropped
    clients absent, not merely zero-weighted). The regression clients hold 40 points each: FedAvg is the mean."""
    for seed in range(20):  # a seed whose first round loses some, not all, of the 4 clients
        cfg = tiny_config(*FEDAVG, "federation.rounds=4", "federation.dropout_prob=0.5", f"seed={seed}", RECORD)
        fits, metrics, final = recorded_run(cfg, tmp_path / f"dropout_{seed}")
        if 0 < int(metrics[0]["clients"]) < 4:
            break
    else:
        pytest.fail("no seed in 0..19 has a partial dropout in round 1")
    # reference: the same seed without dropout, one round: every client's own update from the same start
    reference, _, _ = recorded_run(tiny_config(*FEDAVG, "federation.rounds=1", f"seed={seed}", RECORD), tmp_path / "ref")
    assert sorted(c for _, c, _, _ in reference) == [0, 1, 2, 3]
    start = reference[0][2]
    reference_delta = {c: local - begin for _, c, begin, local in reference}
    assert all(torch.equal(begin, start) for _, _, begin, _ in reference)

    by_round = {r: [(c, begin, local) for r_, c, begin, local in fits if r_ == r] for r in range(1, 5)}
    survivors = sorted(c for c, _, _ in by_round[1])
    assert len(survivors) == int(metrics[0]["clients"]) and int(metrics[0]["clients_dropped"]) == 4 - len(survivors)
    for c, begin, local in by_round[1]:  # the survivors train exactly as without dropout
        assert torch.equal(begin, start)
        torch.testing.assert_close(local - begin, reference_delta[c], rtol=0, atol=0)
    expected = start + sum(reference_delta[c] for c in survivors) / len(survivors)
    everyone = start + sum(reference_delta.values()) / 4
    assert (expected - everyone).abs().max() > 1e-6  # the dropped clients would have moved the model
    # every round: the next broadcast (or the final model) is the survivors' FedAvg; no survivor -> unchanged
    current = start
    partial_rounds = 0
    for r in range(1, 5):
        trained = by_round[r]
        assert len(trained) == int(metrics[r - 1]["clients"]), r
        partial_rounds += 0 < len(trained) < 4
        for _, begin, _ in trained:  # the broadcast: last round's aggregate, the same for every client
            torch.testing.assert_close(begin, current, rtol=1e-12, atol=1e-15)
        if trained:
            current = trained[0][1] + sum(local - begin for _, begin, local in trained) / len(trained)
        if r == 1:
            torch.testing.assert_close(current, expected, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(final, current, rtol=1e-12, atol=1e-15)
    assert partial_rounds >= 1


def test_dropout_probability_must_be_below_one(tiny_config, tmp_path):
    from fipa.errors import ConfigError

    with pytest.raises(ConfigError, match=r"federation.dropout_prob must be in \[0, 1\)"):
        build(tiny_config("federation.dropout_prob=1.0"), tmp_path)


def test_a_nan_client_does_not_poison_scaffold_state(tiny_config, tmp_path):
    """A NaN client's control variate must not reach the server control, or every later round would be NaN."""
    trainer = trainer_with(tiny_config(*FEDAVG, "client=scaffold", "federation.rounds=3"), tmp_path, Sabotage({2}, "nan"))
    trainer.fit()
    (scaffold,) = trainer.client_methods
    assert torch.isfinite(scaffold.server_control).all()
    assert sorted(scaffold.client_controls) == [0, 1, 3]  # the NaN client kept no state
    assert all(torch.isfinite(c).all() for c in scaffold.client_controls.values())
    failed = [int(r["clients_failed"]) for r in rows(tmp_path / "metrics.csv")]
    assert failed == [1, 1, 1]  # only the sabotaged client, every round: the others stay finite
