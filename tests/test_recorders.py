"""What runs record: metrics.csv with empty cells for rounds that were not evaluated, the tracker chosen by the
`logger` group through its `_target_` (TensorBoard here, offline), and the readers that must cope with empty cells."""

import csv
import math
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, compose_config
from fipa.recorders import RunLabels, finite_numbers
from fipa.results import final_value, load_run, series
from fipa.train import run

REPO = Path(__file__).resolve().parent.parent


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def sparse_run(tmp_path_factory):
    """5 rounds evaluated every 2nd round (and at the last), recorded by TensorBoard too."""
    directory = tmp_path_factory.mktemp("sparse") / "run"
    summary = run(compose_config(*TINY, "federation.rounds=5", "federation.eval_every=2", "logger=tensorboard"), directory)
    return directory, summary


def test_rounds_without_evaluation_leave_the_test_metrics_empty(sparse_run):
    directory, summary = sparse_run
    table = rows(directory / "metrics.csv")
    assert [r["round"] for r in table] == ["1", "2", "3", "4", "5"]
    for r in table:
        evaluated = r["round"] in ("2", "4", "5")
        assert (r["test_mse"] != "") == evaluated, r
        assert r["train_loss"] != "" and float(r["elapsed_s"]) > 0  # the round itself is always recorded
    assert float(table[-1]["test_mse"]) == summary["test_mse"]
    assert len({r["test_mse"] for r in table if r["test_mse"]}) == 3  # three evaluations, three numbers


def test_the_result_readers_skip_the_empty_cells(sparse_run, tmp_path):
    directory, summary = sparse_run
    loaded = load_run(directory)
    assert series(loaded, "test_mse")[0] == [2.0, 4.0, 5.0]
    assert final_value(loaded, "test_mse") == summary["test_mse"]
    collect = subprocess.run([sys.executable, "scripts/collect.py", directory.parent, "--out", tmp_path / "c"],
                             cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert collect.returncode == 0, collect.stderr
    plot = subprocess.run([sys.executable, "scripts/plot.py", directory, "--out", tmp_path / "p"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "p" / "curves_test_mse.png").stat().st_size > 1000


def test_tensorboard_event_files_hold_every_round_and_only_the_evaluated_test_metrics(sparse_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    directory, summary = sparse_run
    (events,) = (directory / "tensorboard").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    scalars = accumulator.Tags()["scalars"]
    train_loss = [(e.step, e.value) for e in accumulator.Scalars("train_loss")]
    table = rows(directory / "metrics.csv")
    assert [step for step, _ in train_loss] == [1, 2, 3, 4, 5]
    assert [value for _, value in train_loss] == pytest.approx([float(r["train_loss"]) for r in table], rel=1e-6)
    test_mse = [(e.step, e.value) for e in accumulator.Scalars("test_mse")]
    assert [step for step, _ in test_mse] == [2, 4, 5]
    assert test_mse[-1][1] == pytest.approx(summary["test_mse"], rel=1e-6)
    assert "bytes_up" in scalars and "summary/test_mse" in scalars
    assert "aggregator:fedavg" in str(accumulator.Tensors("labels/text_summary")[0])


def test_finite_numbers_drop_what_a_round_did_not_measure():
    row = {"round": 3, "test_mse": math.nan, "train_loss": 0.5, "phase": 0, "note": "x", "bad": math.inf}
    assert finite_numbers(row) == {"round": 3, "train_loss": 0.5, "phase": 0}


def test_a_recorder_named_by_config_is_built_with_the_run_directory_config_and_labels(tmp_path):
    cfg = compose_config(*TINY, "federation.rounds=1")
    cfg.logger = {"_target_": "test_recorders.ListRecorder", "prefix": "mine"}  # as a yaml in conf/logger/ would
    run(cfg, tmp_path)
    (recorder,) = ListRecorder.instances
    assert recorder.run_dir == tmp_path and recorder.run_config["federation"]["rounds"] == 1
    assert recorder.prefix == "mine" and "seed:0" in recorder.labels.tags
    assert [row["round"] for row in recorder.rows] == [1] and recorder.summary["status"] == "completed"


class ListRecorder:
    """A user's recorder, added by config alone."""

    instances: list["ListRecorder"] = []

    def __init__(self, run_dir, run_config, labels: RunLabels, prefix: str):
        self.run_dir, self.run_config, self.labels, self.prefix = Path(run_dir), run_config, labels, prefix
        self.rows, self.summary = [], None
        ListRecorder.instances.append(self)

    def log_round(self, row):
        self.rows.append(row)

    def restore(self, rows):
        self.rows = list(rows)

    def finish(self, summary):
        self.summary = summary
