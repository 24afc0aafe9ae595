"""The report generator: a document's report blocks rebuilt from tiny real runs, numbers checked against the runs'
own summaries and metrics; prose kept byte for byte; blocks without runs kept; bad blocks named by line."""

from __future__ import annotations

import csv
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import TINY, compose_config
from fipa.errors import ConfigError
from fipa.report import format_number, regenerate, seed_cell, setting
from fipa.results import load_run, run_command
from fipa.train import command_line, run

REPO = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """results/tiny/aggregator=<a>,seed=<s>/: the layout scripts/study.py writes, three seeds of two arms."""
    root = tmp_path_factory.mktemp("report")
    for aggregator in ("fedavg", "fipa"):
        for seed in SEEDS:
            directory = root / "results" / "tiny" / f"aggregator={aggregator},seed={seed}"
            run(compose_config(*TINY, f"aggregator={aggregator}", f"seed={seed}"), directory)
    return root


def summary(study: Path, aggregator: str, seed: int) -> dict:
    return json.loads((study / "results" / "tiny" / f"aggregator={aggregator},seed={seed}" / "summary.json").read_text())


def last_mean(study: Path, aggregator: str, seed: int, metric: str, k: int) -> float:
    path = study / "results" / "tiny" / f"aggregator={aggregator},seed={seed}" / "metrics.csv"
    with open(path) as f:
        values = [float(row[metric]) for row in csv.DictReader(f) if row[metric]]
    return statistics.fmean(values[-k:])


def table_rows(report: str) -> dict[str, list[str]]:
    """The generated table's cells by row label."""
    rows = [line.strip("|").split(" | ") for line in report.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


TEMPLATE = """# Results

Prose before, kept *as is*.

<!-- report:table
runs: results/tiny
rows: aggregator
metric: test_mse
stall: {stall}
rounds: true
-->
(old table)
<!-- /report -->

Prose between.

<!-- report:figure
runs: results/tiny
where: {{aggregator: fipa}}
plot: curves
metric: test_mse
out: figures/tiny.png
caption: tiny curves
-->
<!-- /report -->
The end.
"""


def test_table_cells_are_median_min_max_over_seeds_of_the_runs_summaries(study):
    finals = {a: [summary(study, a, s)["test_mse"] for s in SEEDS] for a in ("fedavg", "fipa")}
    stall = statistics.median(finals["fedavg"])  # the fedavg seeds above their median count as stalled
    template = TEMPLATE.format(stall=stall)
    report, outcomes = regenerate(template, study, study / "docs")
    assert [(o.kind, o.runs) for o in outcomes] == [("table", 6), ("figure", 3)]
    rows = table_rows(report)
    for aggregator, values in finals.items():
        stalled = sum(v > stall for v in values)
        expected = (
            f"{format_number(statistics.median(values))} [{format_number(min(values))}, {format_number(max(values))}]"
            f" (n=3, {stalled} stalled); 3 rounds"
        )
        assert rows[aggregator] == [expected]
    assert rows["fedavg"][0].endswith("(n=3, 1 stalled); 3 rounds")
    # the prose outside the blocks is untouched, and a second pass changes nothing
    assert report.startswith("# Results\n\nProse before, kept *as is*.\n\n<!-- report:table\n")
    assert "(old table)" not in report and "\n<!-- report:runs\n{" in report  # the table and its run records
    assert "\n<!-- /report -->\n\nProse between.\n\n<!-- report:figure\n" in report
    assert report.endswith("<!-- /report -->\nThe end.\n")
    assert regenerate(report, study, study / "docs")[0] == report
    # the figure: a PNG beside the document, and the commands that made the runs
    assert (study / "docs" / "figures" / "tiny.png").read_bytes()[:8] == PNG_MAGIC
    assert "![tiny curves](figures/tiny.png)" in report
    assert f"```bash\n{command_line()}\n```" in report


def test_mean_of_the_last_rounds_scaled_and_formatted(study):
    block = """<!-- report:table
runs: results/tiny
rows: aggregator
metric: test_mse
cell: mean
last: 2
scale: 100
format: ".4f"
row_order: [fipa]
labels: {fipa: FIPA, aggregator: rule}
-->
<!-- /report -->
"""
    report, _ = regenerate(block, study, study)
    rows = table_rows(report)
    assert list(rows) == ["FIPA", "fedavg"]  # row_order first, then sorted; labels rename rows and the header
    assert "\n| rule | test_mse |\n" in report
    for aggregator, label in (("fipa", "FIPA"), ("fedavg", "fedavg")):
        values = [100 * last_mean(study, aggregator, s, "test_mse", 2) for s in SEEDS]
        assert rows[label] == [f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f} (n=3)"]


def test_a_cell_counts_diverged_and_stalled_seeds():
    options = {"stall": 0.1}
    cell = seed_cell([0.05, float("nan"), 0.2, 0.01], options, rounds=[10, 4, 8, 12])
    assert cell == "0.05 [0.01, 0.2] (n=4, 1 diverged, 2 stalled)"
    assert seed_cell([float("inf")], {"rounds": True}, rounds=[3]) == "diverged (n=1, 1 diverged); 3 rounds"
    assert seed_cell([0.5, 0.7], {"cell": "mean", "scale": 100, "format": ".1f"}) == "60.0 ± 14.1 (n=2)"
    # one finite seed: its value alone, with no spread, whichever the cell form
    assert seed_cell([0.5, float("nan")], {"cell": "mean", "scale": 100, "format": ".1f"}) == "50.0 (n=2, 1 diverged)"
    assert seed_cell([0.25], {}) == "0.25 (n=1)"


def test_settings_come_from_path_pairs_path_components_and_the_config(study):
    run_dir = study / "results" / "tiny" / "aggregator=fipa,seed=1"
    loaded = load_run(run_dir)
    bases = [study / "results" / "other", study / "results"]  # paths count from the first study dir that holds it
    assert setting(loaded, "aggregator", bases) == "fipa"
    assert setting(loaded, "seed", bases) == "1"
    assert setting(loaded, "path[0]", bases) == "tiny"
    assert setting(loaded, "path[-1]", bases) == "aggregator=fipa,seed=1"
    assert setting(loaded, "path[2]", bases) is None
    assert setting(loaded, "federation.rounds", bases) == "3"
    assert setting(loaded, "no.such.key", bases) is None
    assert run_command(loaded) == command_line()


def test_command_line_reads_as_typed(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fipa-train", "-m", "sweep=regression"])
    assert command_line() == "fipa-train -m sweep=regression"
    monkeypatch.setattr(sys, "argv", ["scripts/study.py", "regression", "--out", "my results"])
    assert command_line() == "python scripts/study.py regression --out 'my results'"


def test_a_resumed_run_keeps_its_first_command(tiny_config, tmp_path):
    directory = tmp_path / "run"
    run(tiny_config("federation.checkpoint_every=1", "federation.rounds=2"), directory)
    first = (directory / "command.txt").read_text()
    run(compose_config(f"resume={directory}"), None)
    lines = (directory / "command.txt").read_text().splitlines()
    assert lines[0] == first.strip() and lines[1].startswith("# resumed by: ")


def test_blocks_without_runs_are_kept_and_bad_blocks_name_their_line(study, tmp_path):
    template = TEMPLATE.format(stall=1).replace("results/tiny", "results/not_run_yet")
    report, outcomes = regenerate(template, study, tmp_path)
    assert report == template and [o.runs for o in outcomes] == [0, 0]
    # with only=..., the blocks of other studies keep their content even where their runs exist
    present = TEMPLATE.format(stall=1)
    assert regenerate(present, study, tmp_path, only="results/other")[0] == present
    assert regenerate(present, study, tmp_path, only="results/ti")[0] == present  # a directory, not a prefix
    assert "(old table)" not in regenerate(present, study, tmp_path, only="results/tiny/")[0]
    with pytest.raises(ConfigError, match="line 3: report:table has unknown options \\['colums'\\]"):
        regenerate("x\n\n<!-- report:table\nruns: a\nmetric: m\nrows: r\ncolums: c\n-->\n<!-- /report -->\n", study, study)
    with pytest.raises(ConfigError, match="line 1: unknown report block 'tabel'"):
        regenerate("<!-- report:tabel\nruns: a\n-->\n<!-- /report -->\n", study, study)
    with pytest.raises(ConfigError, match="report:figure needs plot, out"):
        regenerate("<!-- report:figure\nruns: a\n-->\n<!-- /report -->\n", study, study)


def script(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / "report.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_the_command_line_writes_checks_and_refuses_missing_runs_with_strict(study, tmp_path):
    document = study / "docs" / "results.md"
    document.parent.mkdir(exist_ok=True)
    document.write_text(TEMPLATE.format(stall=1))
    assert script("docs/results.md", "--check", cwd=study).returncode == 1  # the old table would change
    made = script("docs/results.md", "--strict", cwd=study)
    assert made.returncode == 0, made.stderr
    assert "2 of 2 blocks made from runs, 0 kept" in made.stderr and "(old table)" not in document.read_text()
    assert script("docs/results.md", "--check", cwd=study).returncode == 0  # up to date now
    elsewhere = script(str(document), "--strict", "--root", str(tmp_path), "--out", str(tmp_path / "r.md"), cwd=tmp_path)
    # elsewhere the table is made from the runs it recorded; the figure needs its runs and is kept
    assert elsewhere.returncode == 1 and "1 of 2 blocks made from runs, 1 kept" in elsewhere.stderr
    assert (tmp_path / "r.md").read_text() == document.read_text()
    bad = script(str(tmp_path / "missing.md"), cwd=tmp_path)
    assert bad.returncode == 2 and "is not a file" in bad.stderr


def test_the_results_documents_blocks_parse_and_are_kept_without_their_runs(tmp_path):
    document = (REPO / "docs" / "results.md").read_text()
    report, outcomes = regenerate(document, tmp_path, tmp_path)
    assert report == document  # tables from their recorded runs reproduce themselves; the rest are kept
    assert len(outcomes) >= 6 and all(o.runs == 0 for o in outcomes if o.kind == "figure")


def test_a_table_adds_up_runs_recorded_elsewhere_and_runs_here_replace_their_records(study, tmp_path):
    """Seeds made on two machines: each regenerates the document from its own runs plus the other's records."""
    template = TEMPLATE.format(stall=1).split("Prose between.")[0]
    full, _ = regenerate(template, study, tmp_path)
    assert full.count('"run": "results/tiny/aggregator=') == 6
    # machine A has seeds 0 and 1, machine B seed 2 only: B's pass over A's document gives the full table
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    for seed in SEEDS:
        for aggregator in ("fedavg", "fipa"):
            name = f"aggregator={aggregator},seed={seed}"
            target = (machine_b if seed == 2 else machine_a) / "results" / "tiny" / name
            shutil.copytree(study / "results" / "tiny" / name, target)
    from_a, outcomes = regenerate(template, machine_a, tmp_path)
    assert outcomes[0].runs == 4 and "(n=2" in from_a
    from_b, outcomes = regenerate(from_a, machine_b, tmp_path)
    assert from_b == full and outcomes[0].note == "table from 6 runs (2 here, 4 recorded before)"
    # with no runs at all, the table regenerates to itself
    assert regenerate(full, tmp_path / "empty", tmp_path)[0] == full
    # a run here replaces its record (a record edited by hand does not survive its run's return)
    tampered = full.replace('"test_mse": ', '"test_mse": 1', 1)
    assert tampered != full and regenerate(tampered, study, tmp_path)[0] == full
    # a change of rows that the records cannot answer needs the runs
    regrouped = full.replace("rows: aggregator", "rows: seed")
    with pytest.raises(ConfigError, match="line 5: results/tiny/aggregator=fedavg,seed=0 has no seed"):
        regenerate(regrouped, tmp_path / "empty", tmp_path)
    assert "| seed |" in regenerate(regrouped, study, tmp_path)[0]


BARS = """<!-- report:figure
runs: results/tiny
plot: bars
rows: aggregator
metric: test_mse
last: 2
scale: 1000
labels: {fedavg: FedAvg}
out: figures/bars.png
caption: tiny bars
-->
<!-- /report -->
"""


def test_a_bars_figure_draws_a_tables_cells_and_adds_up_recorded_runs_like_a_table(study, tmp_path, monkeypatch):
    import fipa.plotting

    drawn = []
    real = fipa.plotting.plot_grouped_bars
    monkeypatch.setattr(fipa.plotting, "plot_grouped_bars", lambda *args, **kw: (drawn.append(args), real(*args, **kw)))
    full, outcomes = regenerate(BARS, study, tmp_path)
    assert outcomes[0].note == "bars from 6 runs (6 here)" and full.count('"run": "results/tiny/aggregator=') == 6
    assert (tmp_path / "figures" / "bars.png").read_bytes()[:8] == PNG_MAGIC
    cells, groups, bars, _, ylabel, names = drawn[-1]
    assert groups == ["fedavg", "fipa"] and bars == ["test_mse"] and names == {"fedavg": "FedAvg"}
    assert ylabel == "test_mse, mean of the last 2 rounds"
    for aggregator in groups:  # each bar's seeds: the runs' own last-2 means, scaled
        expected = [1000 * last_mean(study, aggregator, seed, "test_mse", 2) for seed in SEEDS]
        assert cells[(aggregator, "test_mse")] == pytest.approx(expected, rel=1e-12)
    # seeds 0-1 here, seed 2 on another machine: the second pass draws all six from its runs and the records
    machine_a, machine_b = tmp_path / "a", tmp_path / "b"
    for seed in SEEDS:
        for aggregator in ("fedavg", "fipa"):
            name = f"aggregator={aggregator},seed={seed}"
            shutil.copytree(study / "results" / "tiny" / name, (machine_b if seed == 2 else machine_a) / "results" / "tiny" / name)
    from_a, _ = regenerate(BARS, machine_a, tmp_path)
    assert len(drawn[-1][0][("fipa", "test_mse")]) == 2
    from_b, outcomes = regenerate(from_a, machine_b, tmp_path)
    assert from_b == full and outcomes[0].note == "bars from 6 runs (2 here)"
    assert drawn[-1][0] == cells
    # no runs here: the block and its picture are left as they are
    count = len(drawn)
    assert regenerate(full, tmp_path / "empty", tmp_path)[0] == full and len(drawn) == count
    with pytest.raises(ConfigError, match="plot: bars needs rows"):
        regenerate(BARS.replace("rows: aggregator\n", ""), study, tmp_path)
