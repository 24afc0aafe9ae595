"""executor=ray trains a round's clients on Ray workers and gives the same numbers as executor=sequential."""


import pytest

from conftest import compose_config, metrics_without_timing
from fipa.train import run

ray = pytest.importorskip("ray")

# SCAFFOLD (client state shipped with every job and returned), FIPA (curvature statistics uploaded), seeded
# dropout and a client subset per round: everything that crosses the process boundary.
OVERRIDES = [
    "aggregator=fipa", "client=scaffold", "optimizer.lr=1e-3", "task.points_per_client=40",
    "federation.local_epochs=5", "federation.rounds=3", "federation.dropout_prob=0.3", "federation.clients_per_round=3",
]
@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module (each run still starts and kills its own workers); RayExecutor joins it."""
    import os

    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_executor_equals_sequential(tmp_path, local_ray):
    sequential = run(compose_config(*OVERRIDES), tmp_path / "sequential")
    parallel = run(compose_config(*OVERRIDES, "executor=ray", "executor.num_workers=2"), tmp_path / "ray")
    assert parallel["status"] == "completed"
    rows = metrics_without_timing(tmp_path / "ray" / "metrics.csv")
    assert rows == metrics_without_timing(tmp_path / "sequential" / "metrics.csv")  # bit for bit, every round
    assert parallel["test_mse"] == sequential["test_mse"]
    assert sum(int(r["clients_dropped"]) for r in rows) >= 1 and float(rows[0]["curvature_rank_mean"]) >= 1


def test_ray_executor_equals_sequential_with_augmentation_and_moon(tmp_path, local_ray):
    """Crops, flips and MOON's previous models come from (seed, round, client) and the shipped client state."""
    from test_runner import AUGMENTED

    overrides = [*AUGMENTED, "federation.rounds=3"]
    run(compose_config(*overrides), tmp_path / "sequential")
    run(compose_config(*overrides, "executor=ray", "executor.num_workers=2"), tmp_path / "ray")
    rows = metrics_without_timing(tmp_path / "ray" / "metrics.csv")
    assert rows == metrics_without_timing(tmp_path / "sequential" / "metrics.csv")
    assert len({r["test_acc"] for r in rows}) > 1


def test_ray_executor_rejects_bad_settings(tmp_path):
    from fipa.errors import ConfigError

    with pytest.raises(ConfigError, match="executor.num_workers must be >= 1"):
        run(compose_config("executor=ray", "executor.num_workers=0"), tmp_path)


def test_a_client_raising_on_a_ray_worker_is_dropped_and_counted(tmp_path, local_ray, caplog):
    # MOON needs model.features; the regression MLP has none, so every client raises inside its worker.
    cfg = compose_config("client=moon", "task.points_per_client=20", "federation.local_epochs=2",
                         "federation.rounds=2", "executor=ray")
    summary = run(cfg, tmp_path)
    rows = metrics_without_timing(tmp_path / "metrics.csv")
    assert summary["status"] == "completed"
    assert [int(r["clients_failed"]) for r in rows] == [4, 4] and rows[0]["test_mse"] == rows[1]["test_mse"]
    assert "client=moon needs a model with a features(x) method" in caplog.text  # the worker's own error
