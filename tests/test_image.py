"""Image classification: models, client methods (SCAFFOLD, MOON) with any server rule, schedules, checkpoints."""

import csv

import pytest
import torch
from torch import nn

from conftest import compose_config
from fipa.client import ClientUpdate
from fipa.client_methods import Scaffold
from fipa.errors import ConfigError
from fipa.models import ResNet20GN, SmallCNN
from fipa.train import build, run

# digits: 1500 real 8x8 training images from scikit-learn, fast enough for the default suite
DIGITS = [
    "experiment=fmnist_dirichlet",
    "task.dataset=digits",
    "task.num_clients=10",
    "federation.clients_per_round=3",
    "federation.local_epochs=1",
    "federation.rounds=3",
    "model.image_size=8",
    "partition.alpha=0.5",
    "preset.last_layer=9.*",
    "torch_threads=1",
]


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_resnet20_gn_has_the_reference_parameter_count():
    # conv 432 + GN 32 + stage1 3*(2*2304 + 2*32) + stage2 (4608 + 9216 + 128) + 2*(2*9216 + 128)
    # + stage3 (18432 + 36864 + 256) + 2*(2*36864 + 256) + fc 650 = 269,722 (option-A shortcuts)
    model = ResNet20GN()
    assert sum(p.numel() for p in model.parameters()) == 269_722
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 2 for m in model.modules()) == 19
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_small_cnn_is_about_55k_parameters_and_exposes_features():
    model = SmallCNN()
    assert sum(p.numel() for p in model.parameters()) == 55_338
    assert model.features(torch.randn(3, 1, 28, 28)).shape == (3, 32)


class FakeModule(nn.Module):
    def __init__(self, model, client_id, round_idx, num_clients):
        super().__init__()
        self.model, self.client_id, self.round_idx, self.num_clients = model, client_id, round_idx, num_clients


def scaffold_steps(scaffold: Scaffold, model: nn.Module, module: FakeModule, lr: float, steps: int = 2) -> None:
    """SGD steps on a zero-gradient loss, so that SCAFFOLD's correction alone moves the weights."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    scaffold.on_train_start(None, module)
    for _ in range(steps):
        optimizer.zero_grad()
        (0.0 * model(torch.ones(1, 2)).sum()).backward()
        scaffold.on_before_optimizer_step(None, module, optimizer)
        optimizer.step()
    scaffold.on_train_end(None, module)


def linear_at(weights: list[float]) -> nn.Linear:
    model = nn.Linear(len(weights), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weights]))
    return model


def test_scaffold_control_variates_follow_option_two_by_hand():
    """Two SGD steps on a zero-gradient loss: the correction alone moves the weights, so every number is known."""
    lr, num_clients = 0.1, 4
    model = linear_at([1.0, -1.0])
    scaffold = Scaffold()
    scaffold.server_control = torch.tensor([0.5, 0.2])
    scaffold.client_controls[1] = torch.tensor([0.1, 0.4])
    module = FakeModule(model, client_id=1, round_idx=1, num_clients=num_clients)
    # server side ships c and c_1 with the job; the worker side trains client 1 with them
    scaffold.on_round_start(1, num_clients)
    scaffold.begin_client(1, scaffold.round_state(), scaffold.client_state(1))
    scaffold_steps(scaffold, model, module, lr)
    # each step: w -= lr * (c - c_i) = lr * [0.4, -0.2]
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.0 - 0.08, -1.0 + 0.04]]))
    # c_i+ = c_i - c + (x - y) / (K lr) = [0.1, 0.4] - [0.5, 0.2] + [0.08, -0.04] / 0.2 = [0.0, 0.0]
    new_control = scaffold.end_client()
    torch.testing.assert_close(new_control, torch.tensor([0.0, 0.0]))
    statistics = scaffold.client_statistics()
    torch.testing.assert_close(statistics["control_variate"], torch.tensor([-0.1, -0.4]))
    # back on the server side: c_1 is kept, and c moves by sum(delta c_i) / num_clients when the next round starts
    scaffold.on_client_result(1, ClientUpdate(1, 1, torch.zeros(2), statistics), new_control)
    torch.testing.assert_close(scaffold.client_state(1), torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(scaffold.round_state(), torch.tensor([0.5, 0.2]))  # unchanged within the round
    scaffold.on_round_start(2, num_clients)
    torch.testing.assert_close(scaffold.server_control, torch.tensor([0.5 - 0.025, 0.2 - 0.1]))


def test_scaffold_clips_the_corrected_gradient_and_its_control_sees_the_clipped_steps():
    """Zero-gradient loss: the correction c - c_i = [0.3, 0.4] (norm 0.5) alone moves the weights; clip_norm 0.25
    halves every step, and option II's c_i+ is computed from the clipped displacement."""
    model = linear_at([1.0, -1.0])
    scaffold = Scaffold(clip_norm=0.25)
    scaffold.begin_client(1, torch.tensor([0.5, 0.2]), torch.tensor([0.2, -0.2]))
    scaffold_steps(scaffold, model, FakeModule(model, client_id=1, round_idx=1, num_clients=4), lr=0.1)
    # each step: w -= lr * 0.5 * [0.3, 0.4] = [0.015, 0.02]
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[1.0 - 0.03, -1.0 - 0.04]]))
    # c_i+ = [0.2, -0.2] - [0.5, 0.2] + [0.03, 0.04] / (2 * 0.1) = [-0.15, -0.2]
    torch.testing.assert_close(scaffold.end_client(), torch.tensor([-0.15, -0.2]))
    with pytest.raises(ConfigError, match="clip_norm"):
        Scaffold(clip_norm=0.0)


@pytest.mark.parametrize("client", ["fedprox", "scaffold", "moon"])
def test_client_methods_combine_with_last_layer_fipa(client, tmp_path):
    cfg = compose_config(*DIGITS, f"client={client}", "aggregator=fipa_lastlayer")
    summary = run(cfg, tmp_path)
    rows = read_rows(tmp_path / "metrics.csv")
    assert summary["status"] == "completed" and len(rows) == 3
    assert all(0.0 <= float(r["test_acc"]) <= 1.0 for r in rows)
    assert float(rows[0]["curvature_rank_mean"]) >= 1
    assert (tmp_path / "class_histogram.csv").exists() and (tmp_path / "class_histogram.png").exists()
    if client == "scaffold":
        assert int(rows[0]["bytes_up_update"]) > 0  # the control-variate delta is uploaded too
        assert int(rows[0]["bytes_up"]) > int(rows[0]["bytes_up_update"]) + int(rows[0]["bytes_up_eigenvectors"])


def test_full_model_damped_fipa_with_the_randomized_solver(tmp_path, monkeypatch):
    """eigensolver=randomized: every client's curvature comes from matrix-free products H V (jvp/vjp over sample
    blocks), never from the explicit Jacobian rows that `auto` builds for a model this small."""
    from fipa.curvature import callback

    widths = []
    matrix_free = callback.curvature_matvec

    def counting_matvec(params, groups, V, *args, **kwargs):
        widths.append(V.shape[1])
        return matrix_free(params, groups, V, *args, **kwargs)

    def no_rows(*args, **kwargs):
        raise AssertionError("eigensolver=randomized built the explicit Jacobian rows")

    monkeypatch.setattr(callback, "curvature_matvec", counting_matvec)
    monkeypatch.setattr(callback, "factor_rows", no_rows)
    cfg = compose_config(*DIGITS, "aggregator=fipa_damped", "aggregator.rank=5", "aggregator.eigensolver=randomized")
    summary = run(cfg, tmp_path)
    rows = read_rows(tmp_path / "metrics.csv")
    assert summary["status"] == "completed"
    assert all(int(r["clients_failed"]) == 0 for r in rows)  # a raising factor_rows would show up here
    assert all(1 <= float(r["curvature_rank_mean"]) <= 5 for r in rows)
    # 3 rounds x 3 clients x (q + 1 = 3) block products of r + s = 5 + 10 columns
    assert widths == [15] * (3 * 3 * 3)


def test_warm_up_checkpoint_then_a_fipa_phase_branches_from_it(tmp_path):
    warm = run(compose_config(*DIGITS, "federation.rounds=2", "federation.checkpoint_every=2", "federation.lr_decay=0.5"), tmp_path / "warm")
    checkpoint = tmp_path / "warm" / "checkpoints" / "round_2.pt"
    assert warm["rounds_completed"] == 2 and checkpoint.exists()

    overrides = [*DIGITS, f"init_from={checkpoint}", "federation.rounds=4", "federation.lr_decay=0.5"]
    fipa_phase = build(compose_config(*overrides, "schedule.switch_round=2", "schedule.after=fipa_lastlayer"), tmp_path / "fipa")
    start = fipa_phase.flat.get()
    saved = torch.load(checkpoint, weights_only=True)["global_params"]
    assert torch.equal(start, saved) and fipa_phase.first_round == 3
    fipa_phase.fit()
    rows = read_rows(tmp_path / "fipa" / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [3, 4] and {r["phase"] for r in rows} == {"1"}
    # the last-layer phase freezes everything but the final linear layer ("9.*")
    moved = {name: not torch.equal(a, b) for name, a, b in zip(fipa_phase.flat.names, saved.split(fipa_phase.flat.sizes), fipa_phase.flat.get().split(fipa_phase.flat.sizes))}
    assert moved == {name: name.startswith("9.") for name in fipa_phase.flat.names}
    # lr x 0.5^(round-1) x 0.1 in the FIPA phase
    assert fipa_phase.executor.runner.module.lr_scale == pytest.approx(0.5**3 * 0.1)


def test_foreign_or_truncated_checkpoints_fail_clearly(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot be read"):
        build(compose_config(*DIGITS, f"init_from={bad}"), tmp_path / "run")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ConfigError, match="not a fipa checkpoint"):
        build(compose_config(*DIGITS, f"init_from={tmp_path / 'foreign.pt'}"), tmp_path / "run2")


def test_unknown_later_phase_aggregator_lists_the_choices(tmp_path):
    with pytest.raises(ConfigError, match="unknown aggregator 'nope'; choose one of .*fipa_lastlayer"):
        build(compose_config(*DIGITS, "schedule.switch_round=1", "schedule.after=nope"), tmp_path)


def test_the_later_phase_takes_settings_for_its_aggregator(tmp_path):
    phased = [*DIGITS, "schedule.switch_round=1", "schedule.after=fipa_lastlayer_robust"]
    trainer = build(compose_config(*phased, "+schedule.after_settings.damping=0.05"), tmp_path / "a")
    later = trainer.phases[-1].aggregator
    assert later.solver == "anchored" and later.damping == 0.05 and later.params == "9.*"  # the yaml says 1e-2
    with pytest.raises(ConfigError, match="schedule.after_settings: dampnig not settings of aggregator=fipa_lastlayer"):
        build(compose_config(*phased, "+schedule.after_settings.dampnig=0.01"), tmp_path / "b")
    with pytest.raises(ConfigError, match="schedule.after_settings take effect only with schedule.switch_round"):
        build(compose_config(*DIGITS, "+schedule.after_settings.damping=0.01"), tmp_path / "c")


def test_moon_changes_local_training(tmp_path):
    plain = run(compose_config(*DIGITS, "federation.rounds=2"), tmp_path / "plain")
    moon = run(compose_config(*DIGITS, "federation.rounds=2", "client=moon", "client.mu=5"), tmp_path / "moon")
    assert moon["test_loss"] != plain["test_loss"]
