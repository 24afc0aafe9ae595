"""Checkpoint and resume: a run killed mid-way and resumed ends with the metrics of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import compose_config, metrics_without_timing, fipa_cli
from fipa.errors import ConfigError
from fipa.federated_trainer import rng_states, set_rng_states
from fipa.train import run

# FIPA with SCAFFOLD clients: the resumed run needs the model, the client controls and the server control.
SCAFFOLD_FIPA = [
    "experiment=regression_1d_m4", "aggregator=fipa", "client=scaffold", "optimizer.lr=1e-3",
    "task.points_per_client=40", "federation.local_epochs=25", "federation.rounds=12", "federation.checkpoint_every=2",
]
# Images with crops and flips and MOON clients: the resumed run needs every client's previous model, and its
# augmentation must not depend on what ran before the checkpoint.
AUGMENTED_MOON = [
    "experiment=fmnist_dirichlet", "task.dataset=digits", "model.image_size=8", "task.num_clients=6",
    "federation.clients_per_round=3", "federation.local_epochs=1", "partition.alpha=0.5", "task.augment=true",
    "client=moon", "aggregator=fedavg", "torch_threads=1", "federation.rounds=12", "federation.checkpoint_every=2",
]


@pytest.mark.parametrize("OVERRIDES", [SCAFFOLD_FIPA, AUGMENTED_MOON], ids=["scaffold_fipa", "augmented_moon"])
def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path, OVERRIDES):
    reference = run(compose_config(*OVERRIDES), tmp_path / "reference")

    killed = tmp_path / "killed"
    process = subprocess.Popen(
        [sys.executable, "-m", "fipa.train", *OVERRIDES, f"hydra.run.dir={killed}"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "round_4.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)  # no cleanup of any kind, as in a crash or a pre-empted job
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
    checkpoints = sorted(int(p.stem.split("_")[1]) for p in (killed / "checkpoints").glob("round_*.pt"))
    assert 4 in checkpoints and max(checkpoints) < 12

    result = fipa_cli(f"resume={killed}", f"hydra.run.dir={tmp_path / 'resume_log'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith("fipa: completed rounds=12")
    assert metrics_without_timing(killed / "metrics.csv") == metrics_without_timing(tmp_path / "reference" / "metrics.csv")  # every round, bit for bit
    resumed = torch.load(killed / "model.pt", weights_only=True)
    expected = torch.load(tmp_path / "reference" / "model.pt", weights_only=True)
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    metric = reference["metric"]
    assert reference[metric] == float(metrics_without_timing(killed / "metrics.csv")[-1][metric])


def test_rng_states_round_trip():
    import random

    import numpy as np

    state = rng_states()
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_resume_needs_a_run_directory_with_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="no such run directory"):
        run(compose_config(f"resume={tmp_path / 'nowhere'}"), tmp_path / "x")
    with pytest.raises(ConfigError, match=r"not a fipa run directory \(no config.yaml\)"):
        run(compose_config(f"resume={tmp_path}"), tmp_path / "x")
    finished = tmp_path / "finished"
    run(compose_config("task.points_per_client=20", "federation.rounds=1", "federation.local_epochs=1"), finished)
    with pytest.raises(ConfigError, match="no checkpoint to resume from"):
        run(compose_config(f"resume={finished}"), tmp_path / "x")
    (finished / "checkpoints").mkdir()
    (finished / "checkpoints" / "round_1.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ConfigError, match="cannot be read .*truncated or not a checkpoint"):
        run(compose_config(f"resume={finished}"), tmp_path / "x")


def test_study_scripts_resume_a_run_that_left_a_checkpoint(tmp_path):
    from fipa.train import run_resumable

    overrides = ["task.points_per_client=20", "federation.local_epochs=2", "federation.rounds=4", "federation.checkpoint_every=2"]
    full = run(compose_config(*overrides), tmp_path / "full")
    partial = tmp_path / "experiment=regression_1d_m4,seed=0"  # study.py names its run directories this way
    run(compose_config(*overrides[:-2], "federation.rounds=2", "federation.checkpoint_every=2"), partial)
    (partial / "summary.json").unlink()  # as if killed after the round-2 checkpoint
    # the saved config says 2 rounds; the study asks for 4 -> a fresh run would redo round 1, resume must not
    config = (partial / "config.yaml").read_text().replace("rounds: 2", "rounds: 4")
    (partial / "config.yaml").write_text(config)
    summary = run_resumable(overrides, partial)
    assert summary["rounds_completed"] == 4 and summary["test_mse"] == full["test_mse"]
    assert metrics_without_timing(partial / "metrics.csv") == metrics_without_timing(tmp_path / "full" / "metrics.csv")


@pytest.mark.parametrize("path", ["/runs/experiment=a,variant=b,seed=0", "/it's", "a\\b", "end\\", "q\\'z"])
def test_quoted_override_survives_hydra_parsing(path):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from fipa.train import quoted_override

    assert OverridesParser.create().parse_override(quoted_override("resume", path)).value() == path
