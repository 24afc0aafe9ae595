"""Server optimizers (fipa.server_optimizers): hand-computed steps, the sgd identity, resume, and composition with
every kind of aggregator."""

import math

import pytest
import torch
from conftest import metrics_without_timing, resumed_equals_uninterrupted

from fipa.errors import ConfigError
from fipa.server_optimizers import ServerAdaptive, ServerMomentum, ServerSGD
from fipa.train import run

DT = torch.float64
X0 = torch.tensor([1.0, -2.0], dtype=DT)
PROPOSED1 = torch.tensor([3.0, -2.5], dtype=DT)  # direction d1 = (2, -0.5)
PROPOSED2 = torch.tensor([2.9, -2.0], dtype=DT)  # from x1, see each test


def test_sgd_with_lr_one_returns_the_aggregators_model_itself_and_otherwise_scales_its_direction():
    assert ServerSGD().step(X0, PROPOSED1) is PROPOSED1  # no x + (x~ - x) rounding: results stay bit-identical
    # x + 0.5 (x~ - x) = (1 + 1, -2 - 0.25)
    torch.testing.assert_close(ServerSGD(lr=0.5).step(X0, PROPOSED1), torch.tensor([2.0, -2.25], dtype=DT))


def test_momentum_by_hand():
    opt = ServerMomentum(lr=1.0, momentum=0.9)
    x1 = opt.step(X0, PROPOSED1)  # m = (2, -0.5); x1 = (3, -2.5)
    torch.testing.assert_close(x1, torch.tensor([3.0, -2.5], dtype=DT))
    x2 = opt.step(x1, PROPOSED2)  # d2 = (-0.1, 0.5); m = 0.9 (2, -0.5) + d2 = (1.7, 0.05); x2 = (4.7, -2.45)
    torch.testing.assert_close(x2, torch.tensor([4.7, -2.45], dtype=DT))
    halved = ServerMomentum(lr=0.5, momentum=0.0)  # no memory: sgd with that lr
    torch.testing.assert_close(halved.step(X0, PROPOSED1), ServerSGD(lr=0.5).step(X0, PROPOSED1))


@pytest.mark.parametrize("rule", ["adam", "yogi", "adagrad"])
def test_adaptive_rules_by_hand(rule):
    lr, b1, b2, tau = 0.1, 0.9, 0.99, 0.1
    opt = ServerAdaptive(rule, lr=lr, beta1=b1, beta2=b2, tau=tau)
    # round 1: d = (2, -0.5), m = 0.1 d = (0.2, -0.05), v from tau^2 = 0.01
    v1 = {
        "adam": [0.99 * 0.01 + 0.01 * 4, 0.99 * 0.01 + 0.01 * 0.25],
        "yogi": [0.01 + 0.01 * 4, 0.01 + 0.01 * 0.25],  # v < d^2: sign -1, v grows by (1 - b2) d^2
        "adagrad": [0.01 + 4, 0.01 + 0.25],
    }[rule]
    x1 = opt.step(X0, PROPOSED1)
    expected1 = [1 + lr * 0.2 / (math.sqrt(v1[0]) + tau), -2 + lr * -0.05 / (math.sqrt(v1[1]) + tau)]
    torch.testing.assert_close(x1, torch.tensor(expected1, dtype=DT))
    # round 2: a small direction (0.01, 0.01): m = 0.9 m + 0.1 d; v shrinks for adam and yogi (v > d^2: sign +1)
    d2 = 0.01
    x2 = opt.step(x1, x1 + d2)
    m2 = [0.9 * 0.2 + 0.1 * d2, 0.9 * -0.05 + 0.1 * d2]
    v2 = {
        "adam": [0.99 * v + 0.01 * d2**2 for v in v1],
        "yogi": [v - 0.01 * d2**2 for v in v1],
        "adagrad": [v + d2**2 for v in v1],
    }[rule]
    expected2 = [x + lr * m / (math.sqrt(v) + tau) for x, m, v in zip(expected1, m2, v2)]
    torch.testing.assert_close(x2, torch.tensor(expected2, dtype=DT))


def test_state_round_trips_through_state_dict():
    first = ServerAdaptive("yogi", lr=0.1)
    x1 = first.step(X0, PROPOSED1)
    second = ServerAdaptive("yogi", lr=0.1)
    second.load_state_dict(first.state_dict())
    torch.testing.assert_close(second.step(x1, PROPOSED2), first.step(x1, PROPOSED2))


@pytest.mark.parametrize(
    "make",
    [
        lambda: ServerSGD(lr=0),
        lambda: ServerMomentum(momentum=1.0),
        lambda: ServerAdaptive("sgd"),
        lambda: ServerAdaptive("adam", tau=0),
        lambda: ServerAdaptive("adam", beta2=1.0),
    ],
)
def test_bad_settings_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


@pytest.mark.parametrize("aggregator", ["fedavg", "fipa", "fipa_diag", "fipa_lastlayer", "fednova"])
@pytest.mark.parametrize("server_optimizer", ["momentum", "adam", "yogi", "adagrad"])
def test_every_aggregator_runs_with_every_server_optimizer(tiny_config, tmp_path, aggregator, server_optimizer):
    last_layer = ["+preset.last_layer=6.*"] if aggregator == "fipa_lastlayer" else []  # the regression MLP's
    summary = run(
        tiny_config(f"aggregator={aggregator}", f"server_optimizer={server_optimizer}", "federation.rounds=2", *last_layer),
        tmp_path,
    )
    assert summary["status"] == "completed" and math.isfinite(summary["test_mse"])


def test_the_default_is_sgd_with_lr_one_and_fedavgm_moves_the_model_further_than_fedavg(tiny_config, tmp_path):
    cfg = tiny_config("aggregator=fedavg")
    assert cfg.server_optimizer._target_.endswith("ServerSGD") and cfg.server_optimizer.lr == 1.0
    plain = run(cfg, tmp_path / "sgd")
    explicit = run(tiny_config("aggregator=fedavg", "server_optimizer=sgd"), tmp_path / "explicit")
    assert metrics_without_timing(tmp_path / "sgd" / "metrics.csv") == metrics_without_timing(
        tmp_path / "explicit" / "metrics.csv"
    )
    assert plain["test_mse"] == explicit["test_mse"]
    momentum = run(tiny_config("aggregator=fedavg", "server_optimizer=momentum"), tmp_path / "momentum")
    assert momentum["test_mse"] != plain["test_mse"]


@pytest.mark.parametrize("server_optimizer", ["momentum", "adam"])
def test_a_resumed_run_restores_the_server_optimizer_state(tiny_config, tmp_path, server_optimizer):
    assert resumed_equals_uninterrupted(tiny_config, ["aggregator=fedavg", f"server_optimizer={server_optimizer}"], tmp_path)
    state = torch.load(tmp_path / "partial" / "checkpoints" / "round_2.pt", weights_only=False)["server_optimizer"]
    assert state["m"] is not None  # the momentum (and adam's moments) are in the checkpoint


def test_a_non_finite_proposal_reaches_neither_the_model_nor_the_optimizer_state(tiny_config, tmp_path):
    """If the aggregator's proposal is non-finite the round keeps the model, and the moments stay as they were
    (a NaN in v would make every later round NaN)."""
    from fipa.train import build

    trainer = build(tiny_config("aggregator=fedavg", "server_optimizer=adam", "federation.rounds=3"), tmp_path)
    aggregator = trainer.phases[0].aggregator
    compute = aggregator.compute
    poisoned_rounds = {2}
    calls = []

    def sometimes_nan():
        calls.append(None)
        proposed = compute()
        return proposed * float("nan") if len(calls) in poisoned_rounds else proposed

    aggregator.compute = sometimes_nan
    params = trainer.flat.get()
    after_one, _ = trainer.run_round(1, params)
    moments = {k: v.clone() for k, v in trainer.server_optimizer.state_dict().items()}
    after_two, _ = trainer.run_round(2, after_one)
    assert torch.equal(after_two, after_one)
    assert all(torch.equal(trainer.server_optimizer.state_dict()[k], v) for k, v in moments.items())
    after_three, _ = trainer.run_round(3, after_two)
    assert torch.isfinite(after_three).all() and not torch.equal(after_three, after_two)


def test_a_later_phase_may_take_its_own_server_optimizer(tmp_path):
    """FedAvgM warm-up, then plain steps: after the switch the new model is the aggregator's proposal itself."""
    from conftest import compose_config

    from fipa.train import build

    cfg = compose_config("experiment=regression_1d_m4", "task.points_per_client=20", "federation.local_epochs=2",
                         "aggregator=fedavg", "server_optimizer=momentum", "federation.rounds=4",
                         "schedule.switch_round=2", "schedule.after=fedavg", "schedule.after_server_optimizer=sgd")  # fmt: skip
    trainer = build(cfg, tmp_path)
    proposals = {}
    for phase in trainer.phases:
        compute = phase.aggregator.compute
        phase.aggregator.compute = lambda compute=compute: proposals.setdefault(len(proposals), compute())
    params = trainer.flat.get()
    for round_idx in (1, 2):
        params, _ = trainer.run_round(round_idx, params)
    assert not torch.equal(params, proposals[1])  # FedAvgM moved past the second proposal
    params, _ = trainer.run_round(3, params)
    assert params is proposals[2]  # sgd lr 1: the proposal itself
    assert trainer.phases[1].server_optimizer is not None and trainer.server_optimizer.state_dict()["m"] is not None


def test_the_fedrcl_fipa_preset_composes(tmp_path):
    from conftest import compose_config

    cfg = compose_config("experiment=fmnist_dirichlet", "variant=phase_fedrcl_fipa_lastlayer", "schedule.switch_round=100")
    assert cfg.client.callbacks[0]._target_.endswith("FedRCL")
    assert cfg.server_optimizer._target_.endswith("ServerMomentum") and cfg.schedule.after_server_optimizer == "sgd"
    assert cfg.schedule.after == "fipa_lastlayer"


def test_the_later_phase_server_optimizer_takes_its_own_settings(tmp_path):
    """A tuned FedAdam after a FedAvg warm-up: the schedule's settings replace the yaml's, bad keys are refused."""
    from conftest import compose_config

    from fipa.server_optimizers import ServerAdaptive
    from fipa.train import build

    phased = ["experiment=regression_1d_m4", "task.points_per_client=20", "aggregator=fedavg",
              "schedule.switch_round=2", "schedule.after=fedavg", "schedule.after_server_optimizer=adam"]  # fmt: skip
    tuned = build(compose_config(*phased, "+schedule.after_server_optimizer_settings.lr=0.3",
                                 "+schedule.after_server_optimizer_settings.tau=1e-2"), tmp_path / "a")  # fmt: skip
    later = tuned.phases[-1].server_optimizer
    assert isinstance(later, ServerAdaptive) and (later.rule, later.lr, later.tau, later.beta1) == ("adam", 0.3, 0.01, 0.9)
    default = build(compose_config(*phased), tmp_path / "b").phases[-1].server_optimizer
    assert isinstance(default, ServerAdaptive) and (default.lr, default.tau) == (0.01, 1e-3)  # conf/server_optimizer/adam
    with pytest.raises(ConfigError, match="after_server_optimizer_settings: lrr not settings of server_optimizer=adam"):
        build(compose_config(*phased, "+schedule.after_server_optimizer_settings.lrr=0.1"), tmp_path / "c")
    with pytest.raises(ConfigError, match="after_server_optimizer_settings needs schedule.after_server_optimizer"):
        build(compose_config(*phased[:-1], "+schedule.after_server_optimizer_settings.lr=0.1"), tmp_path / "d")
    with pytest.raises(ConfigError, match="after_server_optimizer_settings take effect only with schedule.switch_round"):
        build(compose_config(*phased[:3], "+schedule.after_server_optimizer_settings.lr=0.1"), tmp_path / "e")
