"""fipa.results, the new fipa.plotting figures, scripts/collect.py and scripts/plot.py on directories of tiny real runs.

A module-scoped "sweep" (2 aggregators x 2 seeds, laid out like scripts/pinn_table.py, without .hydra) is made once;
a copy with .hydra/overrides.yaml stands for a Hydra multirun. The CLIs run in a subprocess, so the exit codes
and messages are the ones a user sees.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY, compose_config
from fipa.plotting import is_error_metric, plot_learning_curves, plot_prediction_panels, switch_positions
from fipa.results import (completed_runs, find_run_dirs, group_arms, load_run, load_runs, run_settings, seed_of, series,
                          seed_stats, switch_round)
from fipa.train import run

REPO = Path(__file__).resolve().parent.parent
AGGREGATORS, SEEDS = ("fedavg", "fipa"), (0, 1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sweep")
    for aggregator in AGGREGATORS:
        for seed in SEEDS:
            run(compose_config(*TINY, f"aggregator={aggregator}", f"seed={seed}"), root / aggregator / f"seed{seed}")
    return root


@pytest.fixture
def hydra_sweep(sweep, tmp_path) -> Path:
    """The same runs as Hydra multirun jobs <sweep>/<job num>/ with their overrides."""
    for num, (aggregator, seed) in enumerate((a, s) for a in AGGREGATORS for s in SEEDS):
        job = tmp_path / "multirun" / str(num)
        shutil.copytree(sweep / aggregator / f"seed{seed}", job)
        (job / ".hydra").mkdir()
        overrides = [f"aggregator={aggregator}", f"seed={seed}", f"hydra.run.dir=x{num}", "federation.rounds=3"]
        (job / ".hydra/overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return tmp_path / "multirun"


def summaries(root: Path) -> dict[str, dict]:
    return {str(p.parent): json.loads(p.read_text()) for p in root.rglob("summary.json")}


def script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, f"scripts/{name}", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def markdown_rows(text: str) -> list[dict[str, str]]:
    lines = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0]]
    return [dict(zip(header, (c.strip() for c in line))) for line in lines[2:]]


def assert_png(path: Path) -> None:
    assert path.is_file() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000, path


# ------------------------------------------------------------------------------------------------ fipa.results
def test_find_and_load_runs(sweep):
    dirs = find_run_dirs(sweep)
    assert dirs == [sweep / a / f"seed{s}" for a in AGGREGATORS for s in SEEDS]
    assert find_run_dirs(dirs[0]) == [dirs[0]]  # a run directory given directly counts
    one = load_run(dirs[0])
    expected = json.loads((dirs[0] / "summary.json").read_text())
    assert one.completed and one.summary == expected and one.overrides is None
    assert [row["round"] for row in one.metrics] == [1.0, 2.0, 3.0]
    assert one.metrics[-1]["test_mse"] == expected["test_mse"]  # floats survive the CSV round trip exactly


def test_empty_cells_are_nan_and_skipped_by_series(sweep, tmp_path):
    shutil.copytree(sweep / "fedavg/seed0", tmp_path / "run")
    path = tmp_path / "run/metrics.csv"
    rows = list(csv.DictReader(path.open()))
    rows[1]["test_mse"] = ""  # evaluation skipped in round 2
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    loaded = load_run(tmp_path / "run")
    assert math.isnan(loaded.metrics[1]["test_mse"])
    assert series(loaded, "test_mse")[0] == [1.0, 3.0]


def test_unreadable_summary_is_a_problem_not_a_crash(sweep, tmp_path):
    shutil.copytree(sweep / "fipa/seed0", tmp_path / "run")
    (tmp_path / "run/summary.json").write_text('{"status": "compl')  # cut off mid-write
    done, problems = completed_runs([load_run(tmp_path / "run"), load_run(sweep / "fipa/seed1")])
    assert [r.dir for r in done] == [sweep / "fipa/seed1"]
    assert len(problems) == 1 and problems[0].startswith(f"{tmp_path / 'run'}: unreadable (JSONDecodeError")


def test_arms_group_seeds_from_the_config_and_from_overrides(sweep, hydra_sweep):
    # the config: only what differs (aggregator.step_size differs too, but comes with the aggregator's class)
    # overrides: all but seed and hydra.*, even when equal across runs (they say what the sweep was)
    for root, extra in ((sweep, ""), (hydra_sweep, " federation.rounds=3")):
        arms = group_arms(load_runs(root))
        assert [arm.label for arm in arms] == [f"aggregator=fedavg{extra}", f"aggregator=fipa{extra}"]
        assert [[seed_of(r) for r in arm.runs] for arm in arms] == [[0, 1], [0, 1]]
    assert run_settings(load_runs(hydra_sweep))[0] == {"aggregator": "fedavg", "federation.rounds": "3"}


def test_seed_stats_numbers():
    stats = seed_stats([1.0, 2.0, 4.0, math.nan])
    assert stats == {"mean": pytest.approx(7 / 3), "std": pytest.approx(statistics.stdev([1, 2, 4])), "median": 2.0,
                     "min": 1.0, "max": 4.0, "n": 3}
    assert seed_stats([0.5])["std"] == 0.0 and seed_stats([])["n"] == 0


# ------------------------------------------------------------------------------------------------ scripts/collect.py
def test_collect_rows_and_table_match_the_summaries(sweep, tmp_path):
    result = script("collect.py", sweep, "--out", tmp_path / "res")
    assert result.returncode == 0, result.stderr
    expected = summaries(sweep)
    rows = list(csv.DictReader((tmp_path / "res.csv").open()))
    assert len(rows) == 4 and list(rows[0])[:2] == ["aggregator", "seed"]
    for row in rows:
        summary = expected[row["dir"]]
        assert float(row["test_mse"]) == summary["test_mse"]
        assert int(row["rounds_completed"]) == 3 and float(row["elapsed_s"]) == summary["elapsed_s"]
        assert row["aggregator"] == Path(row["dir"]).parent.name and int(row["seed"]) == summary["config"]["seed"]
    table = markdown_rows((tmp_path / "res.md").read_text())
    assert table == markdown_rows(result.stdout)
    assert [t["aggregator"] for t in table] == list(AGGREGATORS)
    for t in table:
        values = [expected[str(sweep / t["aggregator"] / f"seed{s}")]["test_mse"] for s in SEEDS]
        assert int(t["seeds"]) == 2
        assert float(t["test_mse_mean"]) == pytest.approx(statistics.fmean(values), rel=1e-3)
        assert float(t["test_mse_std"]) == pytest.approx(statistics.stdev(values), rel=1e-3)
        assert float(t["test_mse_min"]) == pytest.approx(min(values), rel=1e-3)
        assert float(t["test_mse_max"]) == pytest.approx(max(values), rel=1e-3)
        assert float(t["rounds_median"]) == 3


def test_collect_counts_stalled_seeds_and_the_worst_ratio_to_a_baseline_at_any_round(sweep, tmp_path):
    threshold = statistics.median(s["test_mse"] for s in summaries(sweep).values())
    result = script("collect.py", sweep, "--out", tmp_path / "res", "--stall", threshold, "--baseline",
                    "aggregator=FedAvg")  # fmt: skip (case-insensitive)
    assert result.returncode == 0, result.stderr
    table = {t["aggregator"]: t for t in markdown_rows((tmp_path / "res.md").read_text())}
    for aggregator in AGGREGATORS:
        finals = [json.loads((sweep / aggregator / f"seed{s}" / "summary.json").read_text())["test_mse"] for s in SEEDS]
        assert int(table[aggregator]["stalled"]) == sum(v > threshold for v in finals)
    worst = 0.0
    for seed in SEEDS:  # by hand from the two metrics.csv files, round by round
        curves = [{int(r["round"]): float(r["test_mse"]) for r in csv.DictReader((sweep / a / f"seed{seed}" /
                   "metrics.csv").open())} for a in ("fipa", "fedavg")]  # fmt: skip
        worst = max(worst, *(curves[0][r] / curves[1][r] for r in curves[0]))
    assert float(table["fipa"]["worst_ratio_to_baseline"]) == pytest.approx(worst, rel=1e-3)
    assert table["fedavg"]["worst_ratio_to_baseline"] == "nan"  # the baseline itself
    bad = script("collect.py", sweep, "--out", tmp_path / "bad", "--baseline", "aggregator=fednova")
    assert bad.returncode == 2 and "no run has aggregator=fednova" in bad.stderr


def test_collect_partial_sweep_lists_the_missing_runs_and_tabulates_the_rest(hydra_sweep):
    (hydra_sweep / "3/summary.json").unlink()  # fipa seed 1: still running or crashed
    summary = json.loads((hydra_sweep / "1/summary.json").read_text())
    (hydra_sweep / "1/summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))  # fedavg seed 1
    result = script("collect.py", hydra_sweep)
    assert result.returncode == 0, result.stderr
    missing = [line for line in result.stderr.splitlines() if "missing" in line]
    assert len(missing) == 2
    assert str(hydra_sweep / "1") in missing[0] and "interrupted" in missing[0]
    assert str(hydra_sweep / "3") in missing[1] and "no summary.json" in missing[1] and "3 rounds" in missing[1]
    table = markdown_rows(result.stdout)
    assert [(t["aggregator"], t["seeds"]) for t in table] == [("fedavg", "1"), ("fipa", "1")]
    fipa_seed0 = summaries(hydra_sweep)[str(hydra_sweep / "2")]["test_mse"]
    assert float(table[1]["test_mse_mean"]) == pytest.approx(fipa_seed0, rel=1e-3)
    assert len(list(csv.DictReader((hydra_sweep / "results.csv").open()))) == 2

    for job in ("0", "2"):
        (hydra_sweep / job / "summary.json").unlink()
    nothing = script("collect.py", hydra_sweep)
    assert nothing.returncode == 1 and "no completed runs" in nothing.stderr


def test_collect_bad_input_gives_one_message(sweep, tmp_path):
    (tmp_path / "empty").mkdir()
    empty = script("collect.py", tmp_path / "empty")
    assert empty.returncode == 1 and empty.stderr.strip() == f"collect: no runs found under {tmp_path / 'empty'}"
    absent = script("collect.py", tmp_path / "absent")
    assert absent.returncode == 2 and "is not a directory" in absent.stderr and "Traceback" not in absent.stderr
    unknown = script("collect.py", sweep, "--metric", "test_acc", "--out", tmp_path / "x")
    assert unknown.returncode == 2 and "Traceback" not in unknown.stderr
    assert "unknown metric 'test_acc'" in unknown.stderr
    assert all(name in unknown.stderr for name in ("test_mse", "train_loss", "bytes_up"))
    other = script("collect.py", sweep, "--metric", "train_loss", "--out", tmp_path / "loss")
    assert other.returncode == 0 and "train_loss_mean" in other.stdout


# ------------------------------------------------------------------------------------------------ plots
def test_plot_writes_curves_and_panels(sweep, tmp_path):
    result = script("plot.py", sweep, "--out", tmp_path / "figs")
    assert result.returncode == 0, result.stderr
    written = [Path(line) for line in result.stdout.split()]
    assert [p.name for p in written] == ["curves_test_mse.png", "fit_panels.png"]
    for path in written:
        assert_png(path)


def test_plot_refuses_unknown_metric_and_empty_dirs(sweep, tmp_path):
    unknown = script("plot.py", sweep, "--metric", "test_acc", "--out", tmp_path)
    assert unknown.returncode == 2 and "unknown metric 'test_acc'" in unknown.stderr
    assert all(name in unknown.stderr for name in ("test_mse", "elapsed_s", "curvature_rank_mean"))
    assert not list(tmp_path.glob("*.png"))
    (tmp_path / "empty").mkdir()
    empty = script("plot.py", tmp_path / "empty")
    assert empty.returncode == 1 and "no runs found" in empty.stderr and "Traceback" not in empty.stderr


def test_error_metrics_get_a_log_scale():
    assert all(map(is_error_metric, ("test_mse", "test_rel_l2", "test_loss", "train_loss", "test_max_abs")))
    assert not any(map(is_error_metric, ("test_acc", "bytes_up", "curvature_rank_mean")))


def test_pinn_run_gets_its_1d_panel(tmp_path):
    cfg = compose_config("experiment=poisson_1d", "federation.rounds=2", "federation.local_epochs=2",
                         "task.points_per_client=20")
    run(cfg, tmp_path / "pinn")
    pinn = load_run(tmp_path / "pinn")
    assert pinn.summary["metric"] == "test_rel_l2"
    assert plot_prediction_panels([pinn], tmp_path / "panels.png") == 1
    assert_png(tmp_path / "panels.png")
    plot_learning_curves([pinn], "test_rel_l2", tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


def test_2d_predictions_get_an_error_map(sweep, tmp_path):
    shutil.copytree(sweep / "fipa/seed0", tmp_path / "run2d")
    axis = np.linspace(0, 1, 16)
    x = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)  # x2 fastest, as the tasks save it
    np.savez(tmp_path / "run2d/predictions.npz", x=x, target=np.sin(x[:, 0]), prediction=x[:, 1],
             region_lo=np.array([[0, 0], [0.5, 0]]), region_hi=np.array([[0.5, 1], [1, 1]]))
    runs = [load_run(tmp_path / "run2d"), load_run(sweep / "fedavg/seed0")]
    assert plot_prediction_panels(runs, tmp_path / "panels.png") == 2
    assert_png(tmp_path / "panels.png")


def test_switch_round_is_found_and_placed_on_both_axes(sweep, tmp_path):
    cfg = compose_config(*TINY, "aggregator=fedavg", "schedule.switch_round=2", "schedule.after=fipa")
    run(cfg, tmp_path / "switch")
    switched = load_run(tmp_path / "switch")
    plain = load_run(sweep / "fedavg/seed0")
    assert switch_round(switched) == 2 and switch_round(plain) is None
    assert [row["phase"] for row in switched.metrics] == [0.0, 0.0, 1.0]
    assert switch_positions([switched, plain], "round") == [2.0]
    assert switch_positions([switched, plain], "elapsed_s") == [switched.metrics[1]["elapsed_s"]]
    assert switch_positions([plain], "round") == []
    done, problems = completed_runs([switched, plain])
    assert len(done) == 2 and problems == []
    plot_learning_curves(done, "test_mse", tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


def test_how_often_a_run_checkpoints_does_not_define_an_arm():
    from fipa.results import settings_from_configs

    configs = [{"federation": {"checkpoint_every": 20, "rounds": 3}}, {"federation": {"checkpoint_every": None, "rounds": 3}},
               {"federation": {"checkpoint_every": None, "rounds": 5}}]  # fmt: skip
    assert settings_from_configs(configs) == [{"federation.rounds": "3"}, {"federation.rounds": "3"},
                                              {"federation.rounds": "5"}]  # fmt: skip


def _image_table():
    spec = importlib.util.spec_from_file_location("image_table", REPO / "scripts" / "image_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant", ["warmup", "fedavg", "fedavg_lr01", "fipa_lastlayer", "fipa_lastlayer_robust"])
def test_image_table_warms_up_and_branches_from_fedavg_whatever_the_default_aggregator(variant):
    from fipa.config import compose

    table = _image_table()
    args = argparse.Namespace(experiment="fmnist_dirichlet", warmup=100, phase=20, override=[], checkpoint_every=None)
    if variant == "warmup":
        overrides = table.warmup_overrides(args, "plain", 0)
    else:
        overrides = table.branch_overrides(args, "plain", variant, 0, Path("/nowhere/round_100.pt"), 100)
    cfg = compose(overrides)
    assert cfg.aggregator._target_.endswith("FedAvg")  # bare fipa-train's default is FIPA
    after = {"warmup": None, "fedavg": None, "fedavg_lr01": "fedavg"}.get(variant, variant)
    assert cfg.schedule.after == after


@pytest.mark.parametrize("variant", ["warmup", "fedavg", "fipa_lastlayer", "fedadam", "fedadam_tuned", "fednova"])
def test_image_table_gives_fedrcl_a_fedavgm_warm_up_and_plain_steps_after_it(variant):
    from fipa.config import compose

    table = _image_table()
    args = argparse.Namespace(experiment="fmnist_dirichlet", warmup=100, phase=20, override=[], checkpoint_every=10)
    if variant == "warmup":
        overrides = table.warmup_overrides(args, "fedrcl", 0)
        assert "federation.checkpoint_every=10" in overrides
    else:
        overrides = table.branch_overrides(args, "fedrcl", variant, 0, Path("/nowhere/round_100.pt"), 100)
    cfg = compose(overrides)
    assert cfg.client.callbacks[0]._target_.endswith("FedRCL")
    assert cfg.server_optimizer._target_.endswith("ServerMomentum")  # the warm-up's, and the fedavg arm's
    after = {"warmup": None, "fedavg": None, "fedadam": "adam", "fedadam_tuned": "adam"}.get(variant, "sgd")
    assert cfg.schedule.after_server_optimizer == after
    expected = {"warmup": None, "fedavg": None, "fedadam": "fedavg", "fedadam_tuned": "fedavg"}.get(variant, variant)
    assert cfg.schedule.after == expected


def test_rounds_table_medians_worst_ratio_and_first_round_ahead(tmp_path):
    errors = {("fedavg", 0): [1.0, 0.5, 0.4], ("fedavg", 1): [1.0, 0.6, 0.5],
              ("fipa", 0): [2.0, 0.4, 0.1], ("fipa", 1): [0.5, 0.9, 0.2]}  # fmt: skip
    for (variant, seed), values in errors.items():
        run_dir = tmp_path / f"experiment=p,variant={variant},seed={seed}"
        run_dir.mkdir()
        run_dir.joinpath("metrics.csv").write_text(
            "round,test_rel_l2\n" + "".join(f"{k},{v}\n" for k, v in enumerate(values, 1))
        )
    result = script("rounds_table.py", tmp_path, "--rounds", 1, 3)
    assert result.returncode == 0, result.stderr
    table = {row["variant"]: row for row in markdown_rows(result.stdout)}
    assert float(table["fedavg"]["r1"]) == 1.0 and float(table["fedavg"]["r3"]) == 0.45
    assert float(table["fipa"]["r1"]) == 1.25 and float(table["fipa"]["r3"]) == 0.15
    assert float(table["fipa"]["worst"]) == 2.0  # seed 0, round 1; seed 1 is behind only in round 2 (1.5x)
    assert table["fipa"]["ahead_from"] == "2 3"
    assert script("rounds_table.py", tmp_path / "nothing").returncode == 1


@pytest.mark.parametrize("client", ["plain", "fedrcl", "scaffold"])
def test_image_tables_matrix_arms_branch_as_the_sweep_presets_variants_do(client):
    """scripts/image_table.py --variants matrix and fipa-train -m sweep=matrix(_fedrcl, _scaffold) run the same
    warm-up and later phase."""
    from fipa.config import compose

    table = _image_table()
    args = argparse.Namespace(experiment="fmnist_dirichlet", warmup=100, phase=20, override=[], checkpoint_every=None)
    sweep = {"fedrcl": "matrix_fedrcl", "scaffold": "matrix_scaffold"}.get(client, "matrix")
    warmup = compose(table.warmup_overrides(args, client, 0))
    assert warmup.client == compose([f"sweep={sweep}", "experiment=fmnist_dirichlet", f"client={client}"]).client
    if client == "scaffold":  # clipped, as Acar et al.'s baseline; unclipped it diverged
        assert warmup.client.callbacks[0].clip_norm == 10
    for arm in table.MATRIX:
        script = compose(table.branch_overrides(args, client, arm, 0, Path("/nowhere/round_100.pt"), 100))
        preset = compose([f"sweep={sweep}", "experiment=fmnist_dirichlet", f"client={client}", f"variant=phase_{arm}"])
        run_optimizer = {"ServerSGD": "sgd", "ServerMomentum": "momentum"}
        for cfg in (script, preset):  # null: the run's own server optimizer, or the paper's 0.1 lr cut
            own = run_optimizer[cfg.server_optimizer._target_.rsplit(".", 1)[-1]]
            cfg.schedule.after_server_optimizer = cfg.schedule.after_server_optimizer or own
            cfg.schedule.lr_scale_after = 1.0 if arm == "fedavg" else (cfg.schedule.lr_scale_after or 0.1)
        if arm != "fedavg":  # the script's fedavg arm does not switch; the preset's switches to the same rule
            assert script.schedule.after == preset.schedule.after, arm
        assert script.schedule.after_server_optimizer == preset.schedule.after_server_optimizer, arm
        assert script.schedule.after_server_optimizer_settings == preset.schedule.after_server_optimizer_settings, arm
        assert script.schedule.lr_scale_after == preset.schedule.lr_scale_after, arm
        assert script.federation.local_epochs == preset.federation.local_epochs, arm
        assert script.federation.local_epochs_max == preset.federation.local_epochs_max, arm
        assert script.server_optimizer == preset.server_optimizer, arm
        assert script.client == preset.client, arm


def test_image_table_branches_at_several_points_of_one_warm_up(tmp_path):
    """--branch-at 2 4: one 4-round warm-up with checkpoints at 2 and 4, each arm branched from both; the change is
    measured from the warm-up's accuracy at the branch point, and each branch starts where the warm-up was."""
    digits = ["task.dataset=digits", "task.num_clients=10", "federation.clients_per_round=5", "federation.local_epochs=3",
              "model.image_size=8", "partition.alpha=5", "preset.last_layer=9.*", "torch_threads=1"]  # fmt: skip
    out = tmp_path / "branches"
    result = script("image_table.py", "--branch-at", 4, 2, "--phase", 1, "--variants", "fedavg", "fedavg_lr01",
                    "--out", out, "--override", *digits)  # fmt: skip
    assert result.returncode == 0, result.stderr
    warmup = load_run(out / "plain" / "warmup" / "seed0")
    assert warmup.summary["rounds_completed"] == 4
    assert sorted(p.name for p in (warmup.dir / "checkpoints").iterdir()) == ["round_2.pt", "round_4.pt"]
    assert sorted(p.name for p in (out / "plain").iterdir()) == ["fedavg", "fedavg@2", "fedavg_lr01", "fedavg_lr01@2", "warmup"]
    accuracy = dict(zip(*series(warmup, "test_acc")))
    with open(out / "results.csv") as f:
        rows = {row["variant"]: row for row in csv.DictReader(f)}
    assert rows["fedavg@2"]["warmup_rounds"] == "2" and rows["fedavg@2"]["rounds"] == "3"
    assert float(rows["fedavg@2"]["warmup_test_acc"]) == accuracy[2.0]
    assert float(rows["fedavg"]["warmup_test_acc"]) == accuracy[4.0]
    assert accuracy[4.0] > accuracy[2.0] > 0.15  # it learns, so the branch points differ
    # continuing FedAvg from round 2 for one round is the warm-up's round 3; the lr cut is another round
    assert float(rows["fedavg@2"]["test_acc"]) == accuracy[3.0] != float(rows["fedavg_lr01@2"]["test_acc"])
    table = (out / "table.md").read_text()
    assert table.index("| fedavg@2 |") < table.index("| fedavg_lr01@2 |") < table.index("| fedavg |")


def test_image_table_draws_the_matrix_figure(tmp_path):
    table = _image_table()
    rows = [{"client": c, "variant": v, "seed": s, "test_acc_last5": 0.5 + 0.01 * s}
            for c in ("plain", "fedrcl") for v in table.MATRIX for s in (0, 1)]  # fmt: skip
    table.plot_matrix(rows, tmp_path)
    assert (tmp_path / "matrix.png").stat().st_size > 10_000
