import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from fipa.train import CONFIG_DIR

torch.set_num_threads(1)  # the suite runs on 2 shared cores: more threads only contend
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

# Tiny but real: every test run trains actual Lightning clients on the actual task code.
TINY = [
    "aggregator=fedavg",  # the tests choose FIPA where they mean it; bare fipa-train runs it
    "federation.rounds=3",
    "federation.local_epochs=3",
    "task.points_per_client=40",
]


def compose_config(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.fixture
def tiny_config():
    def make(*overrides: str):
        return compose_config(*TINY, *overrides)

    return make


def fipa_cli(*args: str, cwd: Path, timeout: float = 300):
    import subprocess

    return subprocess.run(
        [sys.executable, "-m", "fipa.train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HYDRA_FULL_ERROR": "0"},
    )


TIMING_COLUMNS = {"elapsed_s", "round_s", "wall_s", "curvature_s", "aggregate_s"}


def metrics_without_timing(path) -> list[dict[str, str]]:
    """metrics.csv rows minus the clock columns: what two runs of the same seed must agree on bit for bit."""
    import csv

    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in TIMING_COLUMNS} for row in csv.DictReader(f)]


def resumed_equals_uninterrupted(make_config, overrides, tmp_path) -> bool:
    """Run `overrides` for 5 rounds; run them for 2 with a checkpoint, resume that run as if it had been killed
    after round 2, and tell whether its metrics equal the uninterrupted run's, bit for bit."""
    from fipa.train import run, run_resumable

    run(make_config(*overrides, "federation.rounds=5", "federation.checkpoint_every=2"), tmp_path / "full")
    partial = tmp_path / "partial"
    run(make_config(*overrides, "federation.rounds=2", "federation.checkpoint_every=2"), partial)
    (partial / "summary.json").unlink()  # as if killed after the round-2 checkpoint
    (partial / "config.yaml").write_text((partial / "config.yaml").read_text().replace("rounds: 2", "rounds: 5"))
    run_resumable([], partial)
    return metrics_without_timing(partial / "metrics.csv") == metrics_without_timing(tmp_path / "full" / "metrics.csv")


def record_updates(trainer) -> list:
    """The ClientUpdates the first phase's aggregator receives, in order (the aggregator still gets them)."""
    seen: list = []
    rule = trainer.phases[0].aggregator
    fold = rule.update
    rule.update = lambda update: (seen.append(update), fold(update))[1]
    return seen
