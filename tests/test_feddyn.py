"""FedDyn (client=feddyn): hand-computed terms, its fixed point on heterogeneous quadratics, the server state in a real
round, resume, a NaN client, and the last-layer FIPA phase."""

import types

import pytest
import torch
from conftest import record_updates, resumed_equals_uninterrupted
from torch import nn

from fipa.client_methods import FedDyn, feddyn_client_state, feddyn_model, feddyn_server_state
from fipa.errors import ConfigError
from fipa.train import build, run

DT = torch.float64


def test_the_three_updates_by_hand():
    state, delta = torch.tensor([1.0, -1.0], dtype=DT), torch.tensor([0.5, 2.0], dtype=DT)
    # g - alpha delta with alpha 0.1: (1 - 0.05, -1 - 0.2)
    torch.testing.assert_close(feddyn_client_state(state, delta, 0.1), torch.tensor([0.95, -1.2], dtype=DT))
    # h + (new - old) / m with m 4: h (2, 2), old (1, -1), new (0.95, -1.2) -> (2 - 0.0125, 2 - 0.05)
    h = feddyn_server_state(torch.tensor([2.0, 2.0], dtype=DT), state, torch.tensor([0.95, -1.2], dtype=DT), 4)
    torch.testing.assert_close(h, torch.tensor([1.9875, 1.95], dtype=DT))
    # theta - h / alpha: (3 - 19.875, 1 - 19.5)
    torch.testing.assert_close(feddyn_model(torch.tensor([3.0, 1.0], dtype=DT), h, 0.1), torch.tensor([-16.875, -18.5], dtype=DT))
    with pytest.raises(ConfigError):
        FedDyn(alpha=0)


def test_the_gradient_gets_alpha_times_the_drift_minus_the_client_state():
    callback = FedDyn(alpha=0.5)
    model = nn.Linear(2, 1, bias=False, dtype=DT)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]], dtype=DT))
    module = types.SimpleNamespace(model=model)
    callback.begin_client(0, None, torch.tensor([0.25, -1.0], dtype=DT))
    callback.on_train_start(None, module)  # the anchor is the broadcast point (1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[3.0, 0.0]], dtype=DT))  # after some local steps
    model.weight.grad = torch.tensor([[10.0, 20.0]], dtype=DT)
    callback.on_before_optimizer_step(None, module, None)
    # grad + 0.5 (theta - anchor) - g = (10 + 1 - 0.25, 20 - 1 + 1)
    torch.testing.assert_close(model.weight.grad, torch.tensor([[10.75, 20.0]], dtype=DT))
    callback.on_train_end(None, module)
    # g - alpha delta = (0.25 - 0.5 x 2, -1 - 0.5 x -2)
    torch.testing.assert_close(callback.end_client(), torch.tensor([-0.75, 0.0], dtype=DT))


def test_on_heterogeneous_quadratics_feddyn_reaches_the_global_optimum_and_fedavg_does_not():
    """L_k = a_k/2 (theta - c_k)^2, clients solving their local problems exactly: FedAvg's fixed point is mean(c_k),
    FedDyn's is the global optimum sum a_k c_k / sum a_k (Acar et al.'s claim, checked by hand on a small case)."""
    a, c, alpha = [1.0, 4.0, 0.5], [0.0, 1.0, 3.0], 0.1
    optimum = sum(ak * ck for ak, ck in zip(a, c)) / sum(a)
    theta_avg, theta, g, h = 0.0, 0.0, [0.0, 0.0, 0.0], torch.zeros(1, dtype=DT)
    for _ in range(400):
        theta_avg = sum(c) / len(c)  # exact local minimisation: each FedAvg client lands on c_k
        # FedDyn's local problem: a_k (t - c_k) - g_k + alpha (t - theta) = 0
        local = [(ak * ck + gk + alpha * theta) / (ak + alpha) for ak, ck, gk in zip(a, c, g)]
        for k in range(3):
            new = feddyn_client_state(torch.tensor([g[k]], dtype=DT), torch.tensor([local[k] - theta], dtype=DT), alpha)
            h = feddyn_server_state(h, torch.tensor([g[k]], dtype=DT), new, 3)
            g[k] = float(new)
        theta = float(feddyn_model(torch.tensor([sum(local) / 3], dtype=DT), h, alpha))
    assert theta == pytest.approx(optimum, abs=1e-8)  # (0 + 4 + 1.5) / 5.5 = 1
    assert abs(theta_avg - optimum) > 0.1  # FedAvg: 1.333...
    assert float(h) == pytest.approx(sum(g) / 3)  # h stays the mean of the client states


def test_a_real_round_keeps_the_client_states_and_corrects_the_model_by_h(tiny_config, tmp_path):
    trainer = build(tiny_config("aggregator=fedavg", "client=feddyn", "client.callbacks.0.alpha=0.1",
                                "federation.rounds=2"), tmp_path)  # fmt: skip
    (feddyn,) = trainer.client_methods
    seen = record_updates(trainer)
    start = trainer.flat.get()
    new, _ = trainer.run_round(1, start)
    m = trainer.task.num_clients
    states = {u.client_id: -0.1 * u.delta for u in seen}  # g_k = 0 - alpha Delta_k in the first round
    for k, state in states.items():
        torch.testing.assert_close(feddyn.client_states[k], state)
    h = sum(states.values()) / m
    torch.testing.assert_close(feddyn.h, h)
    total = sum(u.num_samples for u in seen)
    fedavg = start + sum(u.num_samples * u.delta for u in seen) / total
    torch.testing.assert_close(new, fedavg - h / 0.1)


def test_a_nan_client_does_not_poison_feddyn_state(tiny_config, tmp_path):
    from test_faults import Sabotage, trainer_with

    trainer = trainer_with(tiny_config("aggregator=fedavg", "client=feddyn", "federation.rounds=3"), tmp_path,
                           Sabotage({2}, "nan"))  # fmt: skip
    trainer.fit()
    (feddyn,) = trainer.client_methods
    assert torch.isfinite(feddyn.h).all() and sorted(feddyn.client_states) == [0, 1, 3]
    assert all(torch.isfinite(s).all() for s in feddyn.client_states.values())


def test_a_resumed_feddyn_run_ends_as_the_uninterrupted_one(tiny_config, tmp_path):
    assert resumed_equals_uninterrupted(tiny_config, ["aggregator=fedavg", "client=feddyn"], tmp_path)


def test_feddyn_runs_with_the_last_layer_fipa_phase(tmp_path):
    from conftest import compose_config

    cfg = compose_config(
        "experiment=fmnist_dirichlet", "task.dataset=digits", "model.image_size=8", "task.num_clients=6",
        "federation.clients_per_round=3", "federation.local_epochs=1", "partition.alpha=0.5", "torch_threads=1",
        "aggregator=fedavg", "client=feddyn", "federation.rounds=4", "schedule.switch_round=2",
        "schedule.after=fipa_lastlayer", "+schedule.after_settings.rank=2",
    )  # fmt: skip
    summary = run(cfg, tmp_path)
    assert summary["status"] == "completed" and summary["rounds_completed"] == 4
    assert 0 < summary["test_acc"] <= 1
