"""The local update loop: a full-batch fit runs its epochs as updates inside one Lightning step (bit-identical to real
epochs), per-update hooks fire in Lightning's order on every path, and compiled updates stay within round-off of the
eager ones while reusing their graphs from round to round."""

import lightning as L
import pytest
import torch

from conftest import compose_config
from fipa.client import ClientCallback, LocalTrainer
from fipa.components import build_components
from fipa.errors import ConfigError
from fipa.local_steps import EagerSteps
from fipa.runner import ClientRunner


class NeedsEpochs(L.Callback):
    """A callback with an epoch hook: local training must then run every epoch as a real Lightning epoch."""

    def __init__(self):
        self.epochs = 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs += 1


class StepRecorder(ClientCallback):
    """Records the per-update hooks in the order they fire."""

    def __init__(self):
        self.calls: list[str] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls.append("before_backward")

    def on_after_backward(self, trainer, pl_module):
        self.calls.append("after_backward")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.calls.append("before_optimizer_step")


def runner_for(*overrides, extra=()):
    runner = ClientRunner.from_components(build_components(compose_config(*overrides)))
    for local in runner.local_trainers:  # the same trainer settings, with extra callbacks
        local.__init__([*local.callbacks, *extra], local.settings)
    return runner


def job(runner, client_id=1, round_idx=2, states=None):
    start = runner.flat.get().clone()
    update, new_states = runner.train(client_id, round_idx, start, [None] * len(runner.client_methods),
                                      states or [None] * len(runner.client_methods))  # fmt: skip
    return update, new_states


# FedAvg, a proximal term and SCAFFOLD's correction (per-update hooks and client state), FIPA's curvature at the
# broadcast point, and a PINN's loss: every kind of full-batch client.
CASES = {
    "fedavg": ["aggregator=fedavg", "task.points_per_client=60", "federation.local_epochs=7"],
    "fedprox": ["aggregator=fedprox", "aggregator.mu=0.5", "task.points_per_client=60", "federation.local_epochs=7"],
    "scaffold": ["aggregator=fedavg", "client=scaffold", "optimizer.lr=1e-3", "task.points_per_client=60",
                 "federation.local_epochs=7"],
    "fipa": ["aggregator=fipa", "task.points_per_client=60", "federation.local_epochs=7"],
    "pinn": ["experiment=poisson_1d", "aggregator=fedavg", "task.points_per_client=40", "federation.local_epochs=5"],
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_epochs_inside_one_lightning_step_are_bit_identical_to_real_epochs(case):
    epochs = NeedsEpochs()
    real = runner_for(*CASES[case], extra=[epochs])
    fused = runner_for(*CASES[case])
    assert not real.local_trainers[0].epochs_in_one_step and fused.local_trainers[0].epochs_in_one_step
    (update_real, states_real), (update_fused, states_fused) = job(real), job(fused)
    assert epochs.epochs == real.epochs_per_round  # tau real epochs there, one step here
    assert torch.equal(update_real.delta, update_fused.delta)
    assert update_real.metrics["train_loss"] == update_fused.metrics["train_loss"]
    for key, value in update_real.statistics.items():
        assert torch.equal(value, update_fused.statistics[key]), key
    for a, b in zip(states_real, states_fused):
        assert (a is None and b is None) or torch.equal(a, b)


def test_curvature_after_every_epoch_keeps_real_epochs():
    runner = runner_for("aggregator=fipa", "aggregator.curvature_at=epoch_end", "task.points_per_client=30",
                        "federation.local_epochs=3")  # fmt: skip
    assert not runner.local_trainers[0].epochs_in_one_step
    update, _ = job(runner)
    assert runner.local_trainers[0].trainer.fit_loop.epoch_progress.current.completed % 3 == 0
    assert update.metrics["curvature_rank"] >= 1


def test_shuffled_mini_batches_keep_real_epochs():
    runner = runner_for("aggregator=fedavg", "task.points_per_client=30", "task.batch_size=10",
                        "federation.local_epochs=2")  # fmt: skip
    recorder = StepRecorder()
    for local in runner.local_trainers:
        local.__init__([*local.callbacks, recorder], local.settings)
    job(runner)
    assert recorder.calls.count("before_optimizer_step") == 2 * 3  # 2 epochs x 3 batches, one update each


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_every_update_calls_the_step_hooks_in_lightnings_order(compiled):
    recorder = StepRecorder()
    runner = runner_for("aggregator=fedavg", "task.points_per_client=20", "federation.local_epochs=4",
                        f"trainer.compile={str(compiled).lower()}", extra=[recorder])  # fmt: skip
    job(runner)
    assert recorder.calls == ["before_backward", "after_backward", "before_optimizer_step"] * 4


def test_the_lean_hook_dispatch_equals_lightnings_own_backward_and_step(monkeypatch):
    overrides = CASES["scaffold"]
    lean, _ = job(runner_for(*overrides))
    original = EagerSteps.__init__

    def through_lightning(self, module, loss_fn):
        original(self, module, loss_fn)
        self.through_lightning = True  # what a gradient scaler (16-mixed) selects

    monkeypatch.setattr(EagerSteps, "__init__", through_lightning)
    lightning, _ = job(runner_for(*overrides))
    assert torch.equal(lean.delta, lightning.delta)
    assert torch.equal(lean.statistics["control_variate"], lightning.statistics["control_variate"])


COMPILED = {
    "adam": ["aggregator=fedavg", "task.points_per_client=60", "federation.local_epochs=10"],
    "sgd_momentum_decay": ["aggregator=fedavg", "optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9",
                           "optimizer.weight_decay=1e-2", "task.points_per_client=60", "federation.local_epochs=10"],
    "scaffold_hooks": CASES["scaffold"],
    "real_epochs": ["aggregator=fipa", "aggregator.curvature_at=epoch_end", "task.points_per_client=30",
                    "federation.local_epochs=4"],
    "pinn": CASES["pinn"],
}  # fmt: skip


@pytest.mark.parametrize("case", COMPILED)
def test_compiled_updates_stay_within_round_off_of_the_eager_ones_and_reuse_their_graphs(case):
    from torch._dynamo.utils import counters

    eager = runner_for(*COMPILED[case])
    compiled = runner_for(*COMPILED[case], "trainer.compile=true")
    for round_idx in (2, 3):  # the second round has another lr (decay) and a fresh optimizer state
        eager.lr_decay = compiled.lr_decay = 0.9
        reference, _ = job(eager, round_idx=round_idx)
        frames = counters["stats"]["unique_graphs"]
        update, _ = job(compiled, round_idx=round_idx)
        scale = reference.delta.abs().max()
        assert (update.delta - reference.delta).abs().max() <= 1e-10 * scale, case
        assert update.metrics["train_loss"] == pytest.approx(reference.metrics["train_loss"], rel=1e-10)
        if round_idx == 3:
            assert counters["stats"]["unique_graphs"] == frames, "a new round recompiled"


def test_compiled_updates_accept_only_torch_optimizers_with_a_functional_form(tmp_path):
    from fipa.train import run

    with pytest.raises(ConfigError, match="supports one-group Adam, AdamW, SGD client optimizers, got RMSprop"):
        run(compose_config("trainer.compile=true", "optimizer._target_=torch.optim.RMSprop"), tmp_path)
    with pytest.raises(ConfigError, match="SGD momentum with dampening=0 only"):
        run(compose_config("trainer.compile=true", "optimizer=sgd", "optimizer.momentum=0.9",
                           "+optimizer.dampening=0.1"), tmp_path)  # fmt: skip
    assert not (tmp_path / "metrics.csv").exists()


def test_the_local_trainer_keeps_the_module_on_its_device_after_a_fit():
    trainer = LocalTrainer([])
    runner = runner_for("aggregator=fedavg", "task.points_per_client=10")
    module = runner.module
    moved = []
    module.cpu = lambda: moved.append(True) or module  # Lightning's teardown would move it back to the CPU
    trainer.fit(module, runner.task.client_loader(0, None), 1)
    assert moved == []
