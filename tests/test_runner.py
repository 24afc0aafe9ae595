"""The worker seam: a ClientRunner trains one client job the same way in any process and in any order."""

import torch

from conftest import compose_config
from fipa.components import build_components
from fipa.runner import ClientRunner
from test_image import DIGITS

# Augmented training images and MOON's previous model: the randomness and state that must not depend on where or
# after which other client a job runs.
AUGMENTED = [*DIGITS, "task.augment=true", "client=moon", "aggregator=fedavg", "federation.local_epochs=2"]


def job(runner, client_id, round_idx, params):
    update, states = runner.train(client_id, round_idx, params, [None], [None])
    return update.delta, states


def test_a_job_gives_the_same_update_whatever_ran_before_it_and_in_a_runner_built_from_the_config():
    cfg = compose_config(*AUGMENTED)
    driver = ClientRunner.from_components(build_components(cfg))
    start = driver.flat.get().clone()
    first, _ = job(driver, 4, 2, start)
    for other in (1, 7):  # other clients and rounds train in between on the same runner
        job(driver, other, 3, start)
    again, _ = job(driver, 4, 2, start)
    remote = ClientRunner.from_config(compose_config(*AUGMENTED))  # what a Ray worker or Flower client builds
    elsewhere, _ = job(remote, 4, 2, start)
    assert torch.equal(first, again) and torch.equal(first, elsewhere)
    assert not torch.equal(first, job(driver, 4, 3, start)[0])  # another round draws other crops and flips


def test_augmentation_draws_from_the_round_and_client_stream():
    cfg = compose_config(*AUGMENTED)
    runner = ClientRunner.from_components(build_components(cfg))
    start = runner.flat.get().clone()
    augmented, _ = job(runner, 4, 2, start)
    runner.module.augment = None
    plain, _ = job(runner, 4, 2, start)
    assert not torch.equal(augmented, plain)  # the augmentation is really applied to the training batches


def test_the_runner_returns_the_client_methods_new_state():
    cfg = compose_config(*AUGMENTED)
    runner = ClientRunner.from_components(build_components(cfg))
    start = runner.flat.get().clone()
    delta, (moon_state,) = job(runner, 4, 2, start)
    torch.testing.assert_close(moon_state, start + delta)  # MOON keeps the client's trained local model
